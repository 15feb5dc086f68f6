#!/usr/bin/env python3
"""The offload engine on a real small model: convergence and overlap, CPU-only pipeline.

Trains lspo.tinygpt.TinyGPT (bytes as tokens) on examples/data/tinyshakespeare.txt from the same
initialisation, data order and seed with
  * torch.optim.AdamW (fused=False, foreach=False: the single-tensor reference),
  * lspo.OffloadAdamW (same math: full offload, CPU fused Adam on the worker thread),
  * lspo.LSPAdamW (learned sparse projectors on every block matrix, AdamW for the rest),
and reports eval loss ratios, the OffloadAdamW-vs-AdamW parameter difference, per-step time, and
the share of the worker's Adam time hidden under backward (from the engine's Chrome trace).

  python benchmarks/engine.py --quick          # ~1-2 min on a 2-core VM; last line: JSON
JSON also holds core_calls_per_layer_step (calls the Python face makes into the C++ core per projected
layer and step, counted over the last steps) and cpp_vs_python_max_abs_diff (the same run through the
Python and the C++ optimizers, tests/crosscheck).
  python benchmarks/engine.py --steps 300 --trace docs/img/engine_trace.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lspo
from lspo.lsp import PAPER_LAYOUT
from lspo.tinygpt import TinyGPT, TinyGPTConfig, batches, evaluate, load_text

ROOT = Path(__file__).resolve().parents[1]
COUNT_STEPS = 3  # the last steps of the LSP run count the calls into the optimizer core


def faces_max_abs_diff() -> float | None:
    """Max |weight difference| after the same run through the Python and the C++ optimizers (the
    tests/crosscheck driver; None when its executable was not built)."""
    sys.path.insert(0, str(ROOT / "tests" / "crosscheck"))
    import driver
    if not driver.EXE.exists():
        return None
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver's setting: identical ATen reduction order
    diffs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("lsp", "offload"):
                weights, xs, ys = driver.data()
                m = driver.MLP(weights)
                driver.train_py(m, driver.optimizer(kind, m), xs, ys, 0, driver.K + driver.M)
                out = driver.run_cpp(Path(tmp), kind, weights, xs, ys, 0, driver.K + driver.M)
                diffs += [(p.detach() - q).abs().max().item() for p, q in zip(m.parameters(), out["weights"])]
    finally:
        torch.set_num_threads(n)
    return max(diffs)


def _intervals_overlap(a: list, b: list) -> float:
    """Total length of the intersection of two lists of (t0, t1) intervals (b: disjoint)."""
    tot = 0.0
    for x0, x1 in a:
        for y0, y1 in b:
            tot += max(0.0, min(x1, y1) - max(x0, y0))
    return tot


def overlap_fraction(trace: dict) -> tuple[float, float]:
    """(hidden share, total worker seconds): the worker thread's Adam time (tid 1) that falls
    inside backward windows (tid 0, name "backward")."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    bw = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e["name"] == "backward"]
    work = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e["name"] == "adam" and e["tid"] == 1]
    total = sum(t1 - t0 for t0, t1 in work)
    if total <= 0:
        return 0.0, 0.0
    return _intervals_overlap(work, bw) / total, total * 1e-6


def run(kind: str, args, train, val, trace_steps: int = 0) -> dict:
    torch.manual_seed(args.seed)
    cfg = TinyGPTConfig(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block)
    model = TinyGPT(cfg)
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, foreach=False, fused=False)
    elif kind == "offload":
        opt = lspo.OffloadAdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, record_timeline=True)
    else:
        opt = lspo.LSPAdamW(model, lr=args.lr, weight_decay=args.wd, subspace=args.subspace, nnz=args.nnz,
                            min_dim=args.subspace, refit_every=args.refit_every, refit_threshold=args.refit_threshold,
                            refit_iters=args.refit_iters, record_timeline=True,
                            **PAPER_LAYOUT)  # the learned sparse square layout this benchmark measures
    it = batches(train, args.batch, args.block, seed=args.seed)
    eval0 = evaluate(model, val, batch_size=args.batch, n_batches=args.eval_batches)
    t_fwd = t_bwd = t_step = 0.0
    bar = tqdm(range(args.steps), desc=kind, leave=False, mininterval=2.0)
    count_from = args.steps - COUNT_STEPS
    counter = None
    for i in bar:
        if i == count_from and kind == "lsp":
            counter = lspo.diag.CoreCallCounter(opt).__enter__()
        record = hasattr(opt, "set_record_timeline") and i >= args.steps - max(trace_steps, 1)
        if hasattr(opt, "set_record_timeline"):
            opt.set_record_timeline(record)
        x, y = next(it)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        t1 = time.perf_counter()
        tb0 = opt._core.now_us() if record else 0.0
        loss.backward()
        if record:
            opt._core.add_event("backward", "engine", 0, tb0, opt._core.now_us())
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        t_fwd, t_bwd, t_step = t_fwd + t1 - t0, t_bwd + t2 - t1, t_step + t3 - t2
        if i % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if counter is not None:
        counter.__exit__(None, None, None)
    res = {"optimizer": kind, "eval_loss_before": eval0,
           "eval_loss": evaluate(model, val, batch_size=args.batch, n_batches=args.eval_batches),
           "ms_forward": 1e3 * t_fwd / args.steps, "ms_backward": 1e3 * t_bwd / args.steps,
           "ms_step": 1e3 * t_step / args.steps, "params": [p.detach().clone() for p in model.parameters()]}
    if hasattr(opt, "timeline_json"):
        tr = json.loads(opt.timeline_json())
        res["overlap_fraction"], res["worker_adam_s"] = overlap_fraction(tr)
        res["trace"] = tr
    if kind == "lsp":
        res["projected_params"] = sum(p.numel() for p in opt.projected_params)
        res["core_calls_per_layer_step"] = counter.per_layer_step(COUNT_STEPS)
        res["refits"] = sum(1 for r in opt.refits if r["refit"])
        done = [r for r in opt.refits if r["refit"]]
        if done:
            res["refit_error_before"] = sum(r["error_before"] for r in done) / len(done)
            res["refit_error_after"] = sum(r["error_after"] for r in done) / len(done)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (CI-sized)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--subspace", type=int, default=64)
    ap.add_argument("--nnz", type=int, default=8)
    ap.add_argument("--refit-every", type=int, default=100)
    ap.add_argument("--refit-threshold", type=float, default=0.3)
    ap.add_argument("--refit-iters", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch and lspo threads (0: leave as is)")
    ap.add_argument("--trace", type=Path, help="write the LSPAdamW Chrome trace (last steps) here")
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "tinyshakespeare.txt")
    args = ap.parse_args()
    if args.quick:
        args.steps = min(args.steps, 150)
        args.layers, args.eval_batches = min(args.layers, 2), min(args.eval_batches, 8)
    if args.threads:
        torch.set_num_threads(args.threads)
        lspo.set_num_threads(args.threads)
    train, val = load_text(args.data)
    out = {k: run(k, args, train, val, trace_steps=3) for k in ("adamw", "offload", "lsp")}
    a, o, l_ = out["adamw"], out["offload"], out["lsp"]
    diff = max((x - y).abs().max().item() for x, y in zip(o["params"], a["params"]))
    if args.trace:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        args.trace.write_text(json.dumps(l_["trace"]))
    print(f"\nTinyGPT {args.layers}x{args.embd}, block {args.block}, batch {args.batch}, {args.steps} steps, "
          f"lr {args.lr}; LSP d={args.subspace} r={args.nnz} on {l_['projected_params']} params; "
          f"{platform.machine()} {torch.get_num_threads()} threads")
    print("| optimizer | eval loss before | eval loss after | fwd ms | bwd ms | step ms | Adam hidden under backward |")
    print("|---|---|---|---|---|---|---|")
    for k, r in out.items():
        hid = f"{r['overlap_fraction']:.2f}" if "overlap_fraction" in r else "-"
        print(f"| {k} | {r['eval_loss_before']:.4f} | {r['eval_loss']:.4f} | {r['ms_forward']:.1f} | "
              f"{r['ms_backward']:.1f} | {r['ms_step']:.1f} | {hid} |")
    summary = {
        "lsp_vs_adamw_eval_loss_ratio": l_["eval_loss"] / a["eval_loss"],
        "offload_vs_adamw_max_abs_diff": diff,
        "overlap_fraction": l_["overlap_fraction"],
        "offload_overlap_fraction": o["overlap_fraction"],
        "eval_loss": {k: r["eval_loss"] for k, r in out.items()},
        "ms_per_step": {k: r["ms_forward"] + r["ms_backward"] + r["ms_step"] for k, r in out.items()},
        "lsp_refits": l_.get("refits", 0),
        "core_calls_per_layer_step": l_["core_calls_per_layer_step"],
        "cpp_vs_python_max_abs_diff": faces_max_abs_diff(),
        "lsp_refit_error": [l_.get("refit_error_before"), l_.get("refit_error_after")],
        "steps": args.steps,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
