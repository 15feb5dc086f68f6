"""Per-iteration time and peak GPU memory of one optimizer on a LLaMA-architecture model.

One configuration per process (so peak-memory counters and memory caps are isolated); prints one
JSON line, the last line of stdout (warnings and tracebacks go to stderr). Models are built from a
transformers LlamaConfig with random init, directly in bf16 (no fp32 copy is ever allocated).

  python benchmarks/gpu/llama_iter.py --model 1.3b --opt lsp --subspace 1280 --nnz 4 --batch 4
  python benchmarks/gpu/llama_iter.py --model 1.3b --opt lsp --mem-cap-gb 4 --batch 1 --ckpt
  python benchmarks/gpu/llama_iter.py --plan --model 1.3b --subspace 1280 --mem-cap-gb 4
        (no run: the device-memory arithmetic of LSPAdamW under the cap, see memory_plan)

Optimizers: adamw (torch.optim.AdamW fused, bf16 state), lsp (lspo.LSPAdamW), offload
(lspo.OffloadAdamW), torchao (torchao CPUOffloadOptimizer around fused AdamW, offload_gradients=True),
deepspeed (ZeRO-Offload: ZeRO-2 with the optimizer on the CPU, DeepSpeedCPUAdam).

--mem-cap-gb C emulates a card of C GiB: the caching allocator may hold C - --cuda-context-gib
(default 0.5 GiB: the CUDA context and cuBLAS workspaces of a real card live outside the allocator).
Peak memory counts from the end of the model build (optimizer construction and every iteration,
the first included). --smoke turns any command line into a tiny CPU run of the same options (the
harness test uses it; it measures nothing).

Memory tiers (LoHan, docs/tiers.md; lsp and offload): --plan-device-gb D --plan-host-gb H [--state-dir DIR]
asks lspo.planner for the plan of --model (profiled on the meta device: exact weight and activation
bytes, forward times from an ASSUMED --device-tflops, the host<->device link measured here), prints
it and applies it: streamed weights (the model is built in host memory, the decoder layers stay
there, pinned, and TierRunner copies a window of them to the device), per-layer activation policies
(TierRunner; --ckpt is then not allowed: the plan decides), and the optimizer state's host limit and
state directory when the state does not fit H. LSPAdamW then runs without wrap() (its gradient hooks
compress the streamed layers' gradients where the weights live). With --smoke the plan is still that
of the requested model; the tiny run applies the same kinds of decisions (streamed or not, the
policies the plan uses, state on disk or not, in the same proportion).
  python benchmarks/gpu/llama_iter.py --plan --model 30b --opt lsp --subspace 1024 --mem-cap-gb 24 \
        --plan-device-gb 22 --plan-host-gb 110        (no run: the tier plan only)
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch

MODELS = {
    # name: (hidden, intermediate, layers, heads)
    "tiny": (256, 688, 2, 4),
    "0.5b": (1536, 4096, 16, 12),
    "1.3b": (2048, 5504, 24, 16),
    "6.7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "30b": (6656, 17920, 60, 52),  # LLaMA-1 "33B" shapes: 32.5 B parameters
}
VOCAB = 32000
GIB = 2**30


def build_model(name, seq, device, dtype=torch.bfloat16):
    """LlamaForCausalLM with random init, every parameter created in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, l, heads = MODELS[name]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=i, num_hidden_layers=l,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # (building in fp32 and casting held 5.0 GiB at 1.3B, 25.1 GiB at 6.7B)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def projected_shapes(name):
    """[out, in] of every weight LSPAdamW(model) projects: the nn.Linear layers of the decoder
    (q, k, v, o, gate, up, down); embeddings, norms and lm_head stay dense."""
    h, i, l, _ = MODELS[name]
    return [(h, h)] * 4 * l + [(i, h)] * 2 * l + [(h, i)] * l


def param_count(name):
    h, i, l, _ = MODELS[name]
    return 2 * VOCAB * h + l * (4 * h * h + 3 * h * i + 2 * h) + h


def memory_plan(name, d, batch=1, seq=1024, cap_gib=None, context_gib=0.5):
    """Device bytes of an LSPAdamW run with activation checkpointing, by piece (GiB), with the optimizer
    core's buffers: per projected layer an fp32 accumulator of S (dP x dQ, dP = min(d, m),
    dQ = min(d, n)) alive from its layer's backward to step(), and one fp32 update at a time (the
    uploaded u is freed once applied; the caching allocator reuses it). The activation terms are estimates (bf16 model,
    sdpa attention, transformers' fp32 loss); the GPU run's peak_mem_gib is the measurement.
    With a cap: the largest d (multiple of 64) whose total stays under cap - context."""
    h, i, l, _ = MODELS[name]
    tok = batch * seq
    shapes = projected_shapes(name)
    n_dense = param_count(name) - sum(m * n for m, n in shapes)

    def pieces(dd):
        return {
            "weights_bf16": 2 * param_count(name),
            # embedding + lm_head + norms: dense bf16 gradients, held until zero_grad
            "dense_grads_bf16": 2 * n_dense,
            # bf16 logits, their fp32 copy, the fp32 log-softmax kept for backward, its fp32 gradient
            "loss_logits": tok * VOCAB * (2 + 4 + 4 + 4),
            # the checkpointed input of every decoder layer
            "checkpointed_inputs": l * tok * h * 2,
            # one layer recomputed and differentiated: q k v o, gate up act product (bf16, twice for
            # their gradients) and the wrapped layers' saved X Q (fp32, tokens x dQ, 7 layers)
            "one_layer_backward": 2 * tok * (4 * h + 4 * i) * 2 + 7 * tok * min(dd, h) * 4,
            "lsp_acc_and_update_fp32": sum(4 * min(dd, m) * min(dd, n) for m, n in shapes)
            + max(4 * min(dd, m) * min(dd, n) for m, n in shapes),
        }

    pc = pieces(d)
    out = {"model": name, "params_b": param_count(name) / 1e9, "projected_layers": len(shapes), "d": d,
           "batch": batch, "seq": seq, "pieces_gib": {k: v / GIB for k, v in pc.items()},
           "total_gib": sum(pc.values()) / GIB}
    if cap_gib:
        budget = (cap_gib - context_gib) * GIB
        fits = [dd for dd in range(64, 4097, 64) if sum(pieces(dd).values()) <= budget]
        out.update(cap_gib=cap_gib, context_gib=context_gib, allocatable_gib=budget / GIB,
                   fits=sum(pc.values()) <= budget, max_d=max(fits) if fits else None)
    return out


def lsp_state(name, d):
    """LSPAdamW's engine on model `name` at subspace d, for the planner: (state elements, host buffer
    bytes). The dense parameters (embeddings, norms, lm_head) get full AdamW state and bf16
    gradient/output buffers; each projected layer dP x dQ fp32 moments and buffers (an estimate: the
    planner counts 24 B per state element, a projected slot holds 16)."""
    shapes = projected_shapes(name)
    proj = sum(min(d, m) * min(d, n) for m, n in shapes)
    dense = param_count(name) - sum(m * n for m, n in shapes)
    return dense + proj, 2 * 2 * dense + 2 * 4 * proj


def tiered(args):
    return args.plan_device_gb is not None or args.plan_host_gb is not None


def tier_plan(args, name, device):
    """lspo.planner's TierPlan for model `name`: built on the meta device (exact sizes and saved
    activation bytes from a meta forward pass of the run's shape), forward times from the ASSUMED
    --device-tflops, the link measured on `device`; the optimizer's state as lsp_state() (lsp) or
    every element (offload)."""
    from lspo import planner, tiers
    import transformers.masking_utils as mu

    dev_gb = args.plan_device_gb
    if dev_gb is None:
        dev_gb = (args.mem_cap_gb - args.cuda_context_gib) if args.mem_cap_gb else (
            torch.cuda.get_device_properties(0).total_memory / GIB if device == "cuda" else 1e6)
    host_gb = args.plan_host_gb if args.plan_host_gb is not None else 1e6
    batch, seq = args.requested_shape
    meta = build_model(name, seq, "meta")
    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    kw = {}
    if args.opt == "lsp":
        kw["state_elems"], kw["buffer_bytes"] = lsp_state(name, args.requested_subspace)
    # meta tensors have no values: transformers' packed-sequence probe (an .item()) cannot run (the
    # batch is one plain sequence per row), as in benchmarks/tiers.py
    probe = getattr(mu, "find_packed_sequence_indices", None)
    if probe is not None:
        mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        return planner.plan_tiers(planner.decoder_layers(meta), list(meta.parameters()),
                                  device_memory=int(dev_gb * GIB), host_memory=int(host_gb * GIB),
                                  state_dir=args.state_dir, run=lambda: meta(input_ids=ids, use_cache=False).logits,
                                  bandwidth=tiers.measure_link_bandwidth(device),
                                  device_flops=args.device_tflops * 1e12, tokens=batch * seq, **kw)
    finally:
        if probe is not None:
            mu.find_packed_sequence_indices = probe


def plan_summary(plan):
    pol = {k: plan.policies.count(k) for k in ("keep", "swap", "recompute")}
    return {"streamed": not plan.params_on_device, "window": plan.window, "policies": pol,
            "state_host_gib": plan.state_host_limit / GIB, "state_disk_gib": plan.state_disk_bytes / GIB,
            "device_gib": plan.device_bytes / GIB, "host_gib": plan.host_bytes / GIB,
            "device_budget_gib": plan.device_memory / GIB, "host_budget_gib": plan.host_memory / GIB,
            "link_gb_s": plan.bandwidth / 1e9, "modelled_iter_s": plan.iteration_s, "feasible": plan.feasible,
            "notes": plan.notes}


def apply_plan(plan, n_layers, smoke, state_elems):
    """(TierRunner kwargs, optimizer kwargs) of the plan for a model of n_layers layers whose engine
    keeps state for state_elems elements: the plan's own for a real run; with --smoke the same kinds of
    decisions (streamed or not, the policies the plan uses, the state's host share), scaled."""
    from lspo import planner

    rk = plan.runner_kwargs()
    ok = plan.optimizer_kwargs()
    if not smoke:
        return rk, ok
    kinds = [k for k in ("keep", "swap", "recompute") if k in plan.policies]
    rk = dict(rk, window=min(rk["window"], n_layers), policies=[kinds[i % len(kinds)] for i in range(n_layers)])
    if ok:
        share = plan.state_host_limit / plan.state_bytes
        ok = dict(ok, host_memory_limit=int(planner.STATE_BYTES_PER_ELEM * state_elems * share))
    return rk, ok


def to_device_outside(model, layers, device):
    """Every buffer, and every parameter outside `layers`, to `device` (the layers' weights stay in
    host memory for TierRunner to stream)."""
    inside = {id(p) for m in layers for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.data = p.data.to(device)
    for mod in model.modules():
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to(device)


def make_optimizer(args, model, extra=None):
    lr = 1e-5
    pinned = int(args.pinned_gb * GIB)
    extra = extra or {}
    if args.opt == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=args.device == "cuda"), None
    if args.opt == "lsp":
        import lspo

        if args.refit_every is not None:
            extra = dict(extra, refit_every=args.refit_every)
        # staggered refit checks: a check step holds two gradient-dtype sums of each checking layer;
        # all layers at once would not fit the capped cards (4 B/param in bf16)
        extra = dict(extra, refit_stagger=True)
        # the paper's two-sided sparse layout (d x d state per layer): memory_plan's arithmetic and the
        # device results count it; the library's default (one-sided SVD) is measured on the CPU protocol
        opt = lspo.LSPAdamW(model, lr=lr, subspace=args.subspace, nnz=args.nnz, record_timeline=bool(args.trace),
                            pinned_limit_bytes=pinned, **lspo.lsp.PAPER_LAYOUT, **extra)
        if not args.no_wrap and not tiered(args):
            opt.wrap(model)  # the memory path: no dense weight gradient of a projected layer is ever formed
        return opt, None
    if args.opt == "offload":
        import lspo

        return lspo.OffloadAdamW(model.parameters(), lr=lr, record_timeline=bool(args.trace),
                                 pinned_limit_bytes=pinned, **extra), None
    if args.opt == "torchao":
        try:
            from torchao.optim import CPUOffloadOptimizer
        except ImportError:
            from torchao.prototype.low_bit_optim import CPUOffloadOptimizer
        # offload_gradients: each gradient moves to the host as soon as it is complete (its fair setting
        # under a memory cap: otherwise every bf16 gradient stays on the card until step())
        return CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=True, lr=lr,
                                   fused=True), None
    if args.opt == "deepspeed":
        import deepspeed

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        cfg = {
            "train_micro_batch_size_per_gpu": args.batch,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                  "overlap_comm": True, "contiguous_gradients": True},
            "optimizer": {"type": "AdamW", "params": {"lr": lr}},
        }
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return opt, engine
    raise ValueError(f"unknown optimizer {args.opt!r} (adamw, lsp, offload, torchao, deepspeed)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.3b", choices=sorted(MODELS))
    ap.add_argument("--opt", default=None, help="adamw | lsp | offload | torchao | deepspeed")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--subspace", type=int, default=1280)
    ap.add_argument("--nnz", type=int, default=4)
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    ap.add_argument("--mem-cap-gb", type=float, default=None, help="emulate a card of this many GiB")
    ap.add_argument("--cuda-context-gib", type=float, default=0.5,
                    help="subtracted from --mem-cap-gb: what a real card's CUDA context takes outside the allocator")
    ap.add_argument("--pinned-gb", type=float, default=16.0,
                    help="lsp/offload: pinned host buffer budget in GiB (the engine's default, 4, is too small for "
                         "1.3B full offload and 6.7B LSP; fallbacks are reported in the result)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test of this script with the tiny model (no timing value)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny CPU run of the same options: model tiny, seq 32, batch 1, 1+1 steps, d <= 32")
    ap.add_argument("--plan", action="store_true", help="print memory_plan() for --model/--subspace/--batch/--seq/"
                                                        "--mem-cap-gb and exit (no run)")
    ap.add_argument("--trace", default=None, help="lsp/offload: write the engine timeline (Chrome trace)")
    ap.add_argument("--no-wrap", action="store_true", help="lsp: compress p.grad in hooks instead of wrapping layers")
    ap.add_argument("--refit-every", type=int, default=None,
                    help="lsp: projector refit check interval (default: LSPAdamW's; 0: never; checks are "
                         "staggered: a step holds two gradient-dtype sums of 1/refit_every of the layers)")
    ap.add_argument("--plan-device-gb", type=float, default=None,
                    help="tiers: device budget (GiB) given to lspo.planner (default: --mem-cap-gb minus "
                         "--cuda-context-gib); the plan is applied (module doc)")
    ap.add_argument("--plan-host-gb", type=float, default=None, help="tiers: host-memory budget (GiB) for the planner")
    ap.add_argument("--state-dir", default=None,
                    help="tiers: where optimizer state beyond the host budget goes (a fresh subfolder per run, "
                         "removed at the end)")
    ap.add_argument("--device-tflops", type=float, default=400.0,
                    help="tiers: ASSUMED device bf16 throughput for the planner's forward-time estimates")
    args = ap.parse_args(argv)
    if not args.plan and args.opt is None:
        ap.error("--opt is required (unless --plan)")
    if tiered(args) and args.opt not in ("lsp", "offload"):
        ap.error("--plan-device-gb/--plan-host-gb need --opt lsp or offload (their state can go to host/disk tiers)")
    if tiered(args) and args.ckpt:
        ap.error("--ckpt with --plan-device-gb/--plan-host-gb: the tier plan picks each layer's activation policy")
    return args


def run(args, res):
    cuda = args.device == "cuda"
    if args.mem_cap_gb and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        alloc = (args.mem_cap_gb - args.cuda_context_gib) * GIB
        torch.cuda.set_per_process_memory_fraction(alloc / total)
        res["alloc_cap_gib"] = alloc / GIB
    plan = None
    if tiered(args):
        from lspo import planner

        t0 = time.perf_counter()
        plan = tier_plan(args, args.requested_model, args.device)
        print(plan.describe(), flush=True)
        res["tier_plan"] = plan_summary(plan)
        res["plan_s"] = time.perf_counter() - t0
        if not plan.feasible:
            raise ValueError("the tier plan does not fit: " + "; ".join(plan.notes or ["device or host budget"]))
    streamed = plan is not None and not plan.params_on_device
    t0 = time.perf_counter()
    model = build_model(args.model, args.seq, "cpu" if streamed else args.device)
    if streamed:
        to_device_outside(model, planner.decoder_layers(model), args.device)
    res["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    res["param_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    if cuda:
        torch.cuda.synchronize()
        res["build_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()  # from here on: optimizer + every iteration, the first included
    res["build_s"] = time.perf_counter() - t0
    if args.ckpt:  # (transformers 5.24 renamed it; the device image has 5.17)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    rk = okw = state_dir = None
    if plan is not None:
        layers = planner.decoder_layers(model)
        state_elems = lsp_state(args.model, args.subspace)[0] if args.opt == "lsp" else param_count(args.model)
        rk, okw = apply_plan(plan, len(layers), args.smoke, state_elems)
        if okw:  # a fresh folder per run: a leftover MANIFEST would be an error (and fill the disk)
            os.makedirs(args.state_dir, exist_ok=True)
            state_dir = okw["state_dir"] = tempfile.mkdtemp(prefix="llama_iter-", dir=args.state_dir)
        res["tier_applied"] = {"offload_params": rk["offload_params"], "window": rk["window"],
                               "policies": rk["policies"] if len(rk["policies"]) <= 8 else
                               {k: rk["policies"].count(k) for k in ("keep", "swap", "recompute")},
                               "host_memory_limit_gib": okw["host_memory_limit"] / GIB if okw else None}
    try:
        _iterate(args, res, model, plan, rk, okw)
    finally:
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)


def _iterate(args, res, model, plan, rk, opt_kwargs):
    """The optimizer (with the plan's state tier), the TierRunner (its weight and activation tiers),
    warmup + timed iterations, the measurements into res."""
    cuda = args.device == "cuda"
    opt, engine = make_optimizer(args, model, opt_kwargs)
    runner = None
    if plan is not None and plan.needs_runner():
        from lspo.tiers import TierRunner
        from lspo import planner

        t0 = time.perf_counter()
        runner = TierRunner(model, planner.decoder_layers(model), args.device, **rk)
        res["tier_setup_s"] = time.perf_counter() - t0
    g = torch.Generator(device=args.device).manual_seed(1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = [], []
    for it in range(args.warmup + args.steps):
        ids = torch.randint(0, VOCAB, (args.batch, args.seq), device=args.device, generator=g)
        sync()
        t0 = time.perf_counter()
        if engine is not None:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if it >= args.warmup:
            times.append(dt)
    res["iter_s"] = statistics.median(times)
    res["iter_s_min"] = min(times)
    res["tokens_per_s"] = args.batch * args.seq / res["iter_s"]
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / GIB
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    import resource
    res["peak_cpu_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if hasattr(opt, "engine_stats"):
        st = opt.engine_stats()
        res.update(pinned_gib=st["pinned_bytes"] / GIB, pageable_gib=st["pageable_bytes"] / GIB,
                   pin_fallbacks=st["pin_fallbacks"])
        if plan is not None:
            res.update(disk_slots=st["disk_slots"], disk_state_gib=st["disk_state_bytes"] / GIB,
                       host_state_gib=st["host_state_bytes"] / GIB,
                       io_gib_per_iter=(st["io_bytes_read"] + st["io_bytes_written"]) / GIB / (args.warmup + args.steps))
    if runner is not None:
        res.update(runner_peak_weight_gib=runner.meter.peak_param_bytes / GIB,
                   swapped_out_gib=runner.meter.swapped_out_bytes / GIB)
    if hasattr(opt, "projected_params"):
        res["projected_layers"] = len(opt.projected_params)
    if args.trace and hasattr(opt, "timeline_json"):
        with open(args.trace, "w") as f:
            f.write(opt.timeline_json())
    res["loss_first_last"] = [losses[0], losses[-1]]
    res["ok"] = True


def main(argv=None):
    args = parse_args(argv)
    # (--smoke shrinks the run below; the tier plan stays that of the requested configuration)
    args.requested_model, args.requested_shape, args.requested_subspace = args.model, (args.batch, args.seq), \
        args.subspace
    if args.plan and tiered(args):  # the tier plan only (meta device; the link measured here)
        plan = tier_plan(args, args.model, "cuda" if torch.cuda.is_available() else "cpu")
        print(plan.describe())
        print(json.dumps(dict(model=args.model, opt=args.opt, params_b=param_count(args.model) / 1e9,
                              **plan_summary(plan))))
        return
    if args.plan:
        print(json.dumps(memory_plan(args.model, args.subspace, args.batch, args.seq, args.mem_cap_gb,
                                     args.cuda_context_gib)))
        return
    res = {"model": args.model, "opt": args.opt, "batch": args.batch, "seq": args.seq, "ckpt": args.ckpt,
           "mem_cap_gb": args.mem_cap_gb}
    if args.opt == "lsp":
        res.update(subspace=args.subspace, nnz=args.nnz, refit_every=args.refit_every)
    if tiered(args):
        res.update(tiers=True, plan_device_gb=args.plan_device_gb, plan_host_gb=args.plan_host_gb)
    if args.smoke:  # keep the requested configuration in the row, run the tiny one
        res["smoke"] = True
        args.model, args.device, args.seq, args.batch, args.steps, args.warmup = "tiny", "cpu", 32, 1, 1, 1
        args.subspace = min(args.subspace, 32)
        args.nnz = min(args.nnz, args.subspace)
    try:
        res["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        run(args, res)
    except Exception as e:  # report, don't hide: the table shows the failure and its reason
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if isinstance(e, torch.cuda.OutOfMemoryError):
            res["oom"] = True
        traceback.print_exc(file=sys.stderr)
    sys.stdout.flush()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
