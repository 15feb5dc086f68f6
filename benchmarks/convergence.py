#!/usr/bin/env python3
"""Convergence of lspo's optimizers next to their peers: the same model, data, token budget, seed and
learning rate for every optimizer; validation loss against steps and against wall time.

Model: lspo.tinygpt.TinyGPT (default n_embd 256, 4 layers, 4 heads, 3.2M parameters) trained FROM
SCRATCH on examples/data/tinyshakespeare.txt (bytes as tokens; first 90% train, last 10% validation),
batch 8 x 64 tokens, --steps steps (default 400), constant --lr (default 1e-3; docs/convergence.md also
has 3e-4, the best torch AdamW lr of {3e-4, 1e-3, 3e-3}), weight decay 0.01, no clipping. Validation loss
= lspo.tinygpt.evaluate (the same 8 fixed windows of 8 x 64 tokens every time) every --eval-every steps.

Optimizers (--runs picks a subset):
  adamw        torch.optim.AdamW (foreach=False)
  offload      lspo.OffloadAdamW (full offload: fp32 master + moments on the host, CPU Adam on a worker)
  lsp_d64_r4   lspo.LSPAdamW(model, subspace=64, nnz=4, min_dim=64,     every block nn.Linear projected;
  lsp_d128_r8  lspo.LSPAdamW(model, subspace=128, nnz=8, min_dim=128,   embeddings, norms, biases: full AdamW
               one_sided=False, basis="sparse"): the paper's learned sparse square layout
               (refit_every=100, refit_threshold=0.3, refit_iters=50: the defaults)
  lora_r8      peft LoRA (rank 8, alpha = rank, no dropout) on the blocks' nn.Linear layers (qkv, proj,
  lora_r64     fc, fc_out) + torch AdamW; the base weights of those layers stay FROZEN AT THEIR RANDOM
               INIT, everything else (embeddings, norms, biases) trains fully, as under LSPAdamW
  galore       galore-torch's GaLoreAdamW on the same layers, rank k chosen for the optimizer state of
               lsp_d128_r8 (moments + projectors, see state_bytes), update_proj_gap 100 (= refit_every),
               scale 1.0 (so its effective lr equals everyone's), proj_type "std"
Every run is a fresh subprocess (so peak RSS = ru_maxrss of that run alone), on --threads torch/lspo
threads (default 1: on this shared 2-core VM, 2 OpenMP threads stall at barriers whenever another
process holds a core). Optimizer state bytes = every tensor in optimizer.state except "step" and the
host fp32 master copy of OffloadAdamW/LSPAdamW (that copy replaces the GPU's weights in an offload
setting; it is counted in RSS), deduplicated by storage.

  python benchmarks/convergence.py [--lr 3e-4]        all runs; table to stdout; plots
                                                      docs/img/convergence_<steps>steps_lr<lr>_{steps,time}.png
  python benchmarks/convergence.py --quick ...        tiny model, few steps (the smoke test)
Last stdout line: one JSON object {"runs": {name: {final_val_loss, ...}}, "lsp_vs_adamw": ..., ...}.
(The from-scratch runs are a stress test for the subspace optimizers, not their use case.)

Fine-tuning protocol (benchmarks/ft_protocol.py):
  python benchmarks/convergence.py --finetune [--quick] [--ft-runs adamw,lsp,...] [--out results.json]
TinyGPT pretrained with AdamW on tinyshakespeare (cached), fine-tuned on GSM8K SFT (loss on answer
bytes) with torch AdamW, lspo.LSPAdamW (its defaults, subspace n/2; lsp_sparse: the learned sparse
square layout), peft LoRA r=16 and r=64, GaLore at LSPAdamW's optimizer memory; each optimizer's lr is the best of its 3-point grid on the validation
split (seed 0), then more seeds at that lr; reported: test-split answer loss (mean over seeds).
--quick: a CI-sized model and run (a few minutes). Last line JSON: lsp_vs_adamw_finetune_loss_ratio,
lsp_vs_lora_loss_ratio, lsp_vs_galore_loss_ratio, learned_vs_random_heldout_error, refit_time_fraction.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import lspo  # noqa: E402
from lspo.lsp import PAPER_LAYOUT  # noqa: E402
from lspo.tinygpt import TinyGPT, TinyGPTConfig, batches, evaluate, load_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("adamw", "offload", "lsp_d64_r4", "lsp_d128_r8", "lora_r8", "lora_r64", "galore")
TARGETS = ("qkv", "proj", "fc", "fc_out")
LABELS = {"adamw": "torch AdamW", "offload": "lspo.OffloadAdamW", "lsp_d64_r4": "lspo.LSPAdamW d=64 r=4",
          "lsp_d128_r8": "lspo.LSPAdamW d=128 r=8", "lora_r8": "LoRA r=8 (peft)", "lora_r64": "LoRA r=64 (peft)",
          "galore": "GaLore (galore-torch)"}


def log(*a):
    print(*a, flush=True)


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def state_bytes(opt):
    """Bytes of optimizer state tensors (not "step", not the host fp32 master copy), unique storages."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()

    for st in opt.state.values():
        for k, v in st.items():
            if k in ("step", "master_param"):
                continue
            if isinstance(v, torch.Tensor):
                add(v)
            elif hasattr(v, "ortho_matrix"):  # GaLoreProjector
                add(v.ortho_matrix)
    return total


def galore_rank_for(model, d, r):
    """Rank k whose GaLore state (2 moments of the projected gradient + the projector) matches
    LSPAdamW(d, r)'s (2 moments d x d + ELL projectors, 4-byte index and value per nonzero)."""
    lsp = gal = 0
    for b in model.blocks:
        for name in TARGETS:
            m, n = getattr(b, name).weight.shape
            dP, dQ = min(d, m), min(d, n)
            lsp += 4 * (2 * dP * dQ) + 8 * r * (m + n)
            gal += 4 * (2 * max(m, n) + min(m, n))   # per unit of rank
    return max(1, round(lsp / gal))


def build(name, model, a):
    kw = dict(lr=a.lr, weight_decay=a.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), foreach=False, **kw), model
    if name == "offload":
        return lspo.OffloadAdamW(model.parameters(), **kw), model
    if name.startswith("lsp_"):
        d, r = (int(x[1:]) for x in name.split("_")[1:])
        # the paper's learned (d, r)-sparse square layout (LSPAdamW's default is one-sided with the SVD basis)
        return lspo.LSPAdamW(model, subspace=d, nnz=r, min_dim=min(d, a.n_embd), seed=a.seed, **PAPER_LAYOUT,
                             **kw), model
    if name.startswith("lora_"):
        from peft import LoraConfig, inject_adapter_in_model
        rank = int(name.split("_r")[1])
        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS), bias="none")
        model = inject_adapter_in_model(cfg, model)
        for pname, p in model.named_parameters():   # frozen: only the base weights of the target layers
            p.requires_grad = "lora_" in pname or not (pname.endswith(".base_layer.weight"))
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False, **kw), model
    if name == "galore":
        from galore_torch import GaLoreAdamW
        k = galore_rank_for(model, 128, 8)
        gal = [getattr(b, t).weight for b in model.blocks for t in TARGETS]
        ids = {id(p) for p in gal}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": rest}, {"params": gal, "rank": k, "update_proj_gap": 100, "scale": 1.0,
                                     "proj_type": "std"}]
        opt = GaLoreAdamW(groups, **kw)
        opt.galore_rank = k
        return opt, model
    raise ValueError(f"unknown run {name!r} (choose from {', '.join(RUNS)})")


def worker(name, a):
    """One training run; returns its record (printed as the last JSON line in subprocess mode)."""
    torch.set_num_threads(a.threads)
    lspo.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = TinyGPT(TinyGPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.block))
    train, val = load_text(ROOT / "examples" / "data" / "tinyshakespeare.txt")
    rss0 = rss_mb()
    opt, model = build(name, model, a)
    it = batches(train, a.batch, a.block, seed=a.seed)
    ev = lambda: evaluate(model, val, batch_size=8, n_batches=a.eval_batches)  # noqa: E731
    curve = [{"step": 0, "wall_s": 0.0, "val_loss": ev()}]
    train_s = 0.0
    losses = []
    for step in range(1, a.steps + 1):
        t0 = time.perf_counter()
        x, y = next(it)
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0      # evaluation time is not counted
        losses.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            curve.append({"step": step, "wall_s": train_s, "val_loss": ev(),
                          "train_loss": sum(losses[-a.eval_every:]) / len(losses[-a.eval_every:])})
            if a.progress:
                print(f"[{name}] step {step}/{a.steps} val {curve[-1]['val_loss']:.4f} ({train_s:.0f} s)",
                      file=sys.stderr, flush=True)
    rec = {"name": name, "label": LABELS[name], "final_val_loss": curve[-1]["val_loss"], "train_s": train_s,
           "s_per_step": train_s / a.steps, "curve": curve,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "state_bytes": state_bytes(opt), "rss_before_opt_mb": rss0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if name.startswith("lsp_"):
        rec["refits"] = sum(1 for r in opt.refits if r["kept"])
        rec["refit_checks"] = len(opt.refits)
        errs = [r["heldout_before"] for r in opt.refits]
        rec["refit_error_before_mean"] = sum(errs) / len(errs) if errs else None
        rec["projected_params"] = len(opt.projected_params)
    if name == "galore":
        rec["galore_rank"] = opt.galore_rank
    return rec


def run_all(a):
    recs = {}
    for name in a.runs:
        if a.inprocess:
            try:
                recs[name] = worker(name, a)
            except ImportError as e:
                recs[name] = {"name": name, "label": LABELS[name], "error": f"ImportError: {e}"}
            continue
        cmd = [sys.executable, __file__, "--worker", name] + a.passthrough
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            err = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            recs[name] = {"name": name, "label": LABELS[name], "error": err}
            log(f"{name}: FAILED: {err}")
            continue
        recs[name] = json.loads(lines[-1])
        log(f"{name}: final val loss {recs[name]['final_val_loss']:.4f}, {recs[name]['train_s']:.0f} s training, "
            f"peak RSS {recs[name]['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s with start-up)")
    return recs


def plot(recs, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(a.plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    tag = f"{a.steps}steps_lr{a.lr:g}"
    for xkey, xlabel, fname in (("step", "step", f"convergence_{tag}_steps.png"),
                                ("wall_s", "training wall time (s, evaluation excluded)", f"convergence_{tag}_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rec in recs.items():
            if "curve" not in rec:
                continue
            c = rec["curve"]
            ax.plot([p[xkey] for p in c], [p["val_loss"] for p in c], label=rec["label"],
                    linestyle="--" if name.startswith(("lora", "galore")) else "-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/byte)")
        vals = [p["val_loss"] for r in recs.values() if "curve" in r for p in r["curve"]]
        if vals:   # the start (~5.5) squeezes the end of training: show at most 1.6 nats above the best
            ax.set_ylim(min(vals) - 0.05, min(max(vals), min(vals) + 1.6) + 0.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"TinyGPT {a.n_embd}x{a.n_layer} from scratch, tinyshakespeare, {a.steps} steps x "
                     f"{a.batch * a.block} tokens, lr {a.lr:g}", fontsize=9)
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def table(recs):
    base = recs.get("adamw", {}).get("final_val_loss")
    log("\n| optimizer | final val loss | vs torch AdamW | optimizer state | trainable params | peak RSS | "
        "train time | s/step | notes |")
    log("|---|---|---|---|---|---|---|---|---|")
    for name, r in recs.items():
        if "error" in r:
            log(f"| {r['label']} | - | - | - | - | - | - | - | not run: {r['error']} |")
            continue
        rel = f"{100 * (r['final_val_loss'] / base - 1):+.2f}%" if base else "-"
        note = ""
        if "refits" in r:
            note = (f"{r['projected_params']} projected; {r['refits']}/{r['refit_checks']} refit checks kept a fit "
                    f"(mean held-out e before {r['refit_error_before_mean']:.2f})")
        if "galore_rank" in r:
            note = f"rank {r['galore_rank']}"
        log(f"| {r['label']} | {r['final_val_loss']:.4f} | {rel} | {r['state_bytes'] / 2**20:.2f} MiB | "
            f"{r['trainable_params'] / 1e6:.2f}M | {r['peak_rss_mb']:.0f} MB | {r['train_s']:.0f} s | "
            f"{r['s_per_step']:.3f} | {note} |")


# ------------------------------------------------------------------ fine-tuning protocol (--finetune)
FT_RUNS = ("adamw", "lsp", "lsp_scale1", "lsp_sparse", "lora_r16", "lora_r64", "galore")  # (+ lsp_sparse_one_sided on request)
# 3-point grids (a first quick run with adamw/lsp at 1e-4..1e-3 and galore at 3e-4..3e-3 put every best at
# the grid's top: benchmarks/results/finetune_quick_grid1.json)
FT_GRIDS = {"adamw": (1e-3, 3e-3, 1e-2), "lsp": (1e-3, 3e-3, 1e-2), "lsp_sparse": (1e-3, 3e-3, 1e-2),
            "lsp_scale1": (1e-3, 3e-3, 1e-2),
            "lsp_sparse_one_sided": (1e-3, 3e-3, 1e-2),
            "lora_r16": (3e-3, 1e-2, 3e-2),
            "lora_r64": (3e-3, 1e-2, 3e-2), "galore": (1e-3, 3e-3, 1e-2)}


def finetune_main(a):
    import ft_protocol as ftp
    if a.quick:
        spec = ftp.TinySpec(n_layer=2, n_embd=128, block=128, pretrain_steps=a.pretrain_steps or 300, pretrain_batch=16)
        cfg = ftp.FtConfig(steps=a.ft_steps or 150, batch=8, micro=4, eval_every=50, lsp_subspace=64,
                           threads=a.threads)
        n_val = n_test = a.ft_eval or 64
    else:
        spec = ftp.TinySpec(n_layer=6, n_embd=256, block=a.ft_block, pretrain_steps=a.pretrain_steps or 1500,
                            pretrain_batch=16)
        cfg = ftp.FtConfig(steps=a.ft_steps or 500, batch=a.ft_batch, micro=4, eval_every=50, lsp_subspace=128,
                           threads=a.threads)
        n_val = n_test = a.ft_eval or 256
    a.ft_seeds = a.ft_seeds or (1 if a.quick else 2)
    cfg.lsp_kwargs = {"refit_diagnostics": True}
    if a.lsp_kwargs:
        cfg.lsp_kwargs.update(json.loads(a.lsp_kwargs))
    torch.set_num_threads(a.threads)
    lspo.set_num_threads(a.threads)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    _, pre = ftp.pretrained_tinygpt(spec, log=log)
    log(f"finetune: TinyGPT {spec.n_layer}x{spec.n_embd} (block {spec.block}) pretrained {spec.pretrain_steps} steps "
        f"(val loss {pre['val_loss']:.3f}); GSM8K bytes, {cfg.steps} steps x {cfg.batch} seqs ({cfg.micro} micro-batches), "
        f"lsp d={cfg.lsp_subspace} {cfg.lsp_kwargs}; seeds {a.ft_seeds}; {a.threads} thread(s); load {load0:.2f}")
    data = ftp.ByteSFT(spec.block, n_val=n_val, n_test=n_test)
    runs = [r for r in (a.ft_runs.split(",") if a.ft_runs else FT_RUNS) if r]
    results = {}
    for name in runs:
        grid = [float(x) for x in a.ft_lrs.split(",")] if a.ft_lrs else FT_GRIDS[name]
        sweep = []
        for lr in grid:
            try:
                rec = ftp.finetune(name, lr, 0, spec, cfg, data, log=log if a.progress else None)
            except ImportError as e:
                log(f"{name}: not run ({e})")
                sweep = None
                break
            sweep.append(rec)
            log(f"{name} lr {lr:g} seed 0: val {rec['val_loss']:.4f} test {rec['test_loss']:.4f} "
                f"({rec['train_s']:.0f} s{', refit %.1f s' % rec['refit_s'] if 'refit_s' in rec else ''})")
        if sweep is None:
            continue
        best = min(sweep, key=lambda r: r["val_loss"])
        seeds = [best] + [ftp.finetune(name, best["lr"], sd, spec, cfg, data) for sd in range(1, a.ft_seeds)]
        for r in seeds[1:]:
            log(f"{name} lr {r['lr']:g} seed {r['seed']}: val {r['val_loss']:.4f} test {r['test_loss']:.4f}")
        mean = lambda k: sum(r[k] for r in seeds) / len(seeds)  # noqa: E731
        results[name] = {"lr": best["lr"], "sweep_val": {f"{r['lr']:g}": r["val_loss"] for r in sweep},
                         "test_loss": mean("test_loss"), "val_loss": mean("val_loss"),
                         "test_loss_seeds": [r["test_loss"] for r in seeds], "train_s": mean("train_s"),
                         "state_bytes": best["state_bytes"], "trainable_params": best["trainable_params"],
                         "curve": best["curve"]}
        for k in ("galore_rank", "refit_checks", "refits_kept", "refits_fitted", "refit_s", "refit_time_fraction",
                  "learned_vs_random_heldout_error", "heldout_error_learned_mean", "heldout_error_random_mean"):
            if k in best:
                results[name][k] = (sum(r[k] for r in seeds if r.get(k) is not None) /
                                    max(1, sum(1 for r in seeds if r.get(k) is not None))) \
                    if isinstance(best[k], float) else best[k]
    ratio = lambda x, y: (results[x]["test_loss"] / results[y]["test_loss"]  # noqa: E731
                          if x in results and y in results else None)
    lsp = results.get("lsp", {})
    loras = sorted((k for k in results if k.startswith("lora_")), key=lambda k: results[k]["state_bytes"])
    lora_peer = next((k for k in loras if results[k]["state_bytes"] >= lsp.get("state_bytes", 0)),
                     loras[-1] if loras else None)

    def variant(run):
        return {"vs_adamw": ratio(run, "adamw"), "vs_lora": ratio(run, lora_peer) if lora_peer else None,
                "vs_galore": ratio(run, "galore"),
                "learned_vs_random_heldout_error": results.get(run, {}).get("learned_vs_random_heldout_error"),
                "refit_time_fraction": results.get(run, {}).get("refit_time_fraction"),
                "state_bytes_vs_lsp": results[run]["state_bytes"] / lsp["state_bytes"] if run in results and lsp
                else None}

    summary = {
        "protocol": "quick" if a.quick else "full",
        "model": f"TinyGPT {spec.n_layer}x{spec.n_embd} block {spec.block}", "pretrain_val_loss": pre["val_loss"],
        "steps": cfg.steps, "batch": cfg.batch, "micro": cfg.micro, "seeds": a.ft_seeds,
        "lsp_kwargs": cfg.lsp_kwargs, "lsp_subspace": cfg.lsp_subspace,
        "runs": {k: {x: v for x, v in r.items() if x != "curve"} for k, r in results.items()},
        "lsp_vs_adamw_finetune_loss_ratio": ratio("lsp", "adamw"),
        "lsp_vs_lora_loss_ratio": ratio("lsp", lora_peer) if lora_peer else None, "lora_peer": lora_peer,
        "lsp_vs_galore_loss_ratio": ratio("lsp", "galore"),
        "learned_vs_random_heldout_error": lsp.get("learned_vs_random_heldout_error"),
        "refit_time_fraction": lsp.get("refit_time_fraction"),
        # the paper's learned sparse layout (LSPAdamW(one_sided=False, basis="sparse"), the default
        # before issue 12's measurements) and its one-sided form: the same keys against the same peers
        # (None when not run)
        "sparse": variant("lsp_sparse"),
        "sparse_one_sided": variant("lsp_sparse_one_sided"),
        # the default layout at scale 1.0 (the update size of the sparse basis and the paper)
        "svd_scale1": variant("lsp_scale1"),
        "elapsed_s": time.perf_counter() - t0, "load_average_start_end": [load0, os.getloadavg()[0]],
        "cpu": lspo.cpu_info() if hasattr(lspo, "cpu_info") else None,
    }
    log("\n| optimizer | lr (best of grid) | val loss | test loss (mean of seeds) | vs AdamW | optimizer state | "
        "train time | notes |")
    log("|---|---|---|---|---|---|---|---|")
    base = results.get("adamw", {}).get("test_loss")
    for k, r in results.items():
        note = ""
        if k.startswith("lsp"):
            note = (f"{r.get('refits_kept')}/{r.get('refit_checks')} checks kept a fit; refit {r.get('refit_s', 0):.1f} s; "
                    f"held-out e learned {r.get('heldout_error_learned_mean') or float('nan'):.3f} vs random "
                    f"{r.get('heldout_error_random_mean') or float('nan'):.3f}")
        if "galore_rank" in r:
            note = f"rank {r['galore_rank']}"
        rel = f"{100 * (r['test_loss'] / base - 1):+.2f}%" if base else "-"
        log(f"| {k} | {r['lr']:g} | {r['val_loss']:.4f} | {r['test_loss']:.4f} | {rel} | "
            f"{r['state_bytes'] / 2**20:.2f} MiB | {r['train_s']:.0f} s | {note} |")
    if not a.no_plots and results:
        summary["plots"] = plot_finetune(results, spec, cfg, a)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        full = dict(summary)
        full["curves"] = {k: r["curve"] for k, r in results.items()}
        Path(a.out).write_text(json.dumps(full, indent=1))
    print(json.dumps(summary), flush=True)


def plot_finetune(results, spec, cfg, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(a.plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if a.quick else f"{spec.n_layer}x{spec.n_embd}_{cfg.steps}steps"
    paths = []
    for xkey, xlabel in (("step", "step"), ("wall_s", "training wall time (s, evaluation excluded)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, r in results.items():
            c = r["curve"]
            ax.plot([p[xkey] for p in c], [p["val_loss"] for p in c], label=f"{k} (lr {r['lr']:g})",
                    linestyle="--" if k.startswith(("lora", "galore")) else "-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation answer loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"GSM8K SFT, TinyGPT {spec.n_layer}x{spec.n_embd} pretrained; seed 0, best lr of each grid",
                     fontsize=9)
        fig.tight_layout()
        p = out / f"finetune_{tag}_{'steps' if xkey == 'step' else 'time'}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--runs", help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--inprocess", action="store_true", help="run every optimizer in this process (no RSS isolation)")
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-dir", default=str(ROOT / "docs" / "img"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--progress", action="store_true", help="per-eval progress lines on stderr")
    p.add_argument("--finetune", action="store_true", help="the fine-tuning protocol (benchmarks/ft_protocol.py)")
    p.add_argument("--ft-runs", help=f"--finetune: comma-separated subset of {','.join(FT_RUNS)}")
    p.add_argument("--ft-steps", type=int, help="--finetune: steps (default 500, --quick 150)")
    p.add_argument("--ft-seeds", type=int, help="--finetune: seeds at the chosen lr (default 2, --quick 1)")
    p.add_argument("--ft-block", type=int, default=256, help="--finetune (full): context length in bytes")
    p.add_argument("--ft-batch", type=int, default=8, help="--finetune (full): sequences a step")
    p.add_argument("--pretrain-steps", type=int, help="--finetune: AdamW pretraining steps (default 1500, --quick 300)")
    p.add_argument("--ft-eval", type=int, help="--finetune: validation and test problems (default 256, --quick 64)")
    p.add_argument("--ft-lrs", help="--finetune: comma-separated lr grid for every run (default: per-optimizer grids)")
    p.add_argument("--lsp-kwargs", help="--finetune: JSON of extra LSPAdamW arguments (ablations)")
    p.add_argument("--out", help="--finetune: also write the full JSON (with curves) to this file")
    a = p.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    q = a.quick
    a.steps = a.steps or (6 if q else 400)
    a.eval_every = a.eval_every or (3 if q else 25)
    a.n_embd = a.n_embd or (64 if q else 256)
    a.n_layer = a.n_layer or (1 if q else 4)
    a.runs = [r for r in a.runs.split(",") if r] if a.runs is not None else list(RUNS)
    for r in a.runs:
        if r not in RUNS:
            p.error(f"--runs: unknown run {r!r} (choose from {', '.join(RUNS)})")
    # what the workers get: every flag except the ones only the driver uses
    drop_next = {"--runs", "--plot-dir"}
    a.passthrough, skip = [], False
    for x in raw:
        if skip:
            skip = False
            continue
        if x in drop_next:
            skip = True
            continue
        if x in ("--inprocess", "--no-plots") or x.startswith(("--runs=", "--plot-dir=")):
            continue
        a.passthrough.append(x)
    return a


def main(argv=None):
    a = parse(argv)
    if a.finetune:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        return finetune_main(a)
    if a.worker:
        print(json.dumps(worker(a.worker, a)), flush=True)
        return
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    log(f"convergence: TinyGPT n_embd={a.n_embd} n_layer={a.n_layer}, {a.steps} steps x {a.batch}x{a.block} tokens, "
        f"lr {a.lr}, wd {a.weight_decay}, seed {a.seed}, {a.threads} thread(s); runs: {', '.join(a.runs)}; "
        f"load average {load0:.2f}")
    recs = run_all(a) if a.runs else {}
    if recs:
        table(recs)
    paths = [] if (a.no_plots or not recs) else plot(recs, a)
    if paths:
        log("plots: " + ", ".join(paths))
    ok = {k: v for k, v in recs.items() if "error" not in v}
    base = ok.get("adamw", {}).get("final_val_loss")
    summary = {
        "runs": {k: {x: v.get(x) for x in ("final_val_loss", "train_s", "s_per_step", "state_bytes", "peak_rss_mb",
                                           "trainable_params", "refits", "galore_rank", "error")}
                 for k, v in recs.items()},
        "lsp_vs_adamw": ({k: v["final_val_loss"] / base - 1 for k, v in ok.items() if k.startswith("lsp_")}
                         if base else None),
        "plots": paths, "elapsed_s": time.perf_counter() - t0, "load_average_start_end": [load0, os.getloadavg()[0]],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
