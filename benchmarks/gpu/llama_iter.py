"""Per-iteration time and peak GPU memory of one optimizer on a LLaMA-architecture model.

One configuration per process (so peak-memory counters and memory caps are isolated); prints one
JSON line. Models are built from a transformers LlamaConfig with random init, bf16 weights.

  python benchmarks/gpu/llama_iter.py --model 1.3b --opt lsp --subspace 1280 --nnz 4 --batch 4
  python benchmarks/gpu/llama_iter.py --model 1.3b --opt lsp --mem-cap-gb 4 --batch 1 --ckpt

Optimizers: adamw (torch.optim.AdamW fused, bf16 state), lsp (lspo.LSPAdamW), offload
(lspo.OffloadAdamW), torchao (torchao CPUOffloadOptimizer around fused AdamW), deepspeed
(ZeRO-Offload: ZeRO-2 with the optimizer on the CPU, DeepSpeedCPUAdam).
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

MODELS = {
    # name: (hidden, intermediate, layers, heads)
    "tiny": (256, 688, 2, 4),
    "0.5b": (1536, 4096, 16, 12),
    "1.3b": (2048, 5504, 24, 16),
    "6.7b": (4096, 11008, 32, 32),
}


def build_model(name, seq, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, l, heads = MODELS[name]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=h, intermediate_size=i, num_hidden_layers=l,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model


def make_optimizer(args, model):
    lr = 1e-5
    if args.opt == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=args.device == "cuda"), None
    if args.opt == "lsp":
        import lspo

        opt = lspo.LSPAdamW(model, lr=lr, subspace=args.subspace, nnz=args.nnz, record_timeline=bool(args.trace))
        if not args.no_wrap:
            opt.wrap(model)  # the memory path: no dense weight gradient of a projected layer is ever formed
        return opt, None
    if args.opt == "offload":
        import lspo

        return lspo.OffloadAdamW(model.parameters(), lr=lr, record_timeline=bool(args.trace)), None
    if args.opt == "torchao":
        try:
            from torchao.optim import CPUOffloadOptimizer
        except ImportError:
            from torchao.prototype.low_bit_optim import CPUOffloadOptimizer
        return CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=lr, fused=True), None
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
    raise SystemExit(f"unknown optimizer {args.opt}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.3b", choices=sorted(MODELS))
    ap.add_argument("--opt", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--subspace", type=int, default=1280)
    ap.add_argument("--nnz", type=int, default=4)
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    ap.add_argument("--mem-cap-gb", type=float, default=None, help="emulate a smaller card")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test of this script with the tiny model (no timing value)")
    ap.add_argument("--trace", default=None, help="lsp/offload: write the engine timeline (Chrome trace)")
    ap.add_argument("--no-wrap", action="store_true", help="lsp: compress p.grad in hooks instead of wrapping layers")
    args = ap.parse_args()
    res = {"model": args.model, "opt": args.opt, "batch": args.batch, "seq": args.seq, "ckpt": args.ckpt,
           "mem_cap_gb": args.mem_cap_gb,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    if args.opt == "lsp":
        res.update(subspace=args.subspace, nnz=args.nnz)
    try:
        if args.mem_cap_gb and args.device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.mem_cap_gb * 2**30 / total)
        model = build_model(args.model, args.seq, args.device)
        res["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
        if args.ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        opt, engine = make_optimizer(args, model)
        g = torch.Generator(device=args.device).manual_seed(1)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        times, losses = [], []
        for it in range(args.warmup + args.steps):
            ids = torch.randint(0, 32000, (args.batch, args.seq), device=args.device, generator=g)
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
            if it == 0 and args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        res["iter_s"] = statistics.median(times)
        res["iter_s_min"] = min(times)
        res["tokens_per_s"] = args.batch * args.seq / res["iter_s"]
        if args.device == "cuda":
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        import resource
        res["peak_cpu_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if args.trace and hasattr(opt, "timeline_json"):
            with open(args.trace, "w") as f:
                f.write(opt.timeline_json())
        res["loss_first_last"] = [losses[0], losses[-1]]
        res["ok"] = True
    except Exception as e:  # report, don't hide: the table shows the failure and its reason
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc(file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
