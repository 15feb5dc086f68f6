#!/usr/bin/env python3
"""Dense projectors (r = d, what ``LSPAdamW(basis="svd")`` builds) on the CPU: lspo's operations next to
the plain torch GEMM of the same product, in one run.

A dense projector goes through ATen's GEMMs inside lspo (``src/projector.cpp``, r = d >= 16) instead
of the ELL kernels, which are written for r << d. This measures what that path costs over the GEMM
it wraps (the floor on this machine): ``left_project(P, G)`` (``U^T G``, the one-sided compression of
a [m, n] gradient whose m side is projected to k), ``decompress``-free ``apply_(W, P, I, u)`` (W += a U u,
fp32 and bf16 W) against ``U.T @ G`` and ``W.addmm_(U, u)``, each checked against fp64 first.
Shapes: the projected sides LSPAdamW(one_sided=True, basis="svd") picks for SmolLM2-135M at d = 512
(MLP 1536 x 576: k = 241; attention 576 x 576: k = 394) and for the quick protocol's 384 x 128 at
d = 64 (k = 23). Median of --reps after a warm-up.

    python benchmarks/projector_dense.py [--reps 20] [--threads 2]

Last stdout line: JSON {rows: [...], threads, isa, torch}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import lspo
from lspo import _C
from lspo.projector import SparseProjector, apply_, left_project

sys.path.insert(0, str(Path(__file__).resolve().parent))
from projector import timed  # noqa: E402  (median of reps after a warm-up)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lspo.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    print(f"# dense projectors: {a.threads} threads, lspo ISA {lspo.active_isa()}, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print("| W [m, n] (m projected) | k | op | lspo ms | torch GEMM ms | lspo / torch | max rel. error vs fp64 |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for m, n, d in ((576, 1536, 512), (576, 576, 512), (128, 384, 64)):
        k = _C.one_sided_rank(m, n, d, 8, True, True)  # m <= n: the m side is the projected one
        P = SparseProjector.random(m, k, k, seed=1, whitened=True)
        U = P.dense()  # [m, k] fp32: the basis lspo applies (P T)
        U64 = U.double()
        G = torch.randn(m, n)
        u = torch.randn(k, n)
        ident = SparseProjector(torch.arange(n, dtype=torch.int32).view(n, 1), torch.ones(n, 1), n)
        ref_c = U64.T @ G.double()
        err_c = ((left_project(P, G).double() - ref_c).abs().max() / ref_c.abs().max()).item()
        rec = {"m": m, "n": n, "k": k}
        for op, f_lspo, f_torch, err in (
                ("left_project", lambda: left_project(P, G), lambda: U.T @ G, err_c),):
            rec[op] = {"lspo_ms": 1e3 * timed(f_lspo, a.reps), "torch_ms": 1e3 * timed(f_torch, a.reps), "rel_err": err}
        for dt in (torch.float32, torch.bfloat16):
            W0 = torch.randn(m, n).to(dt)
            W = W0.clone()
            apply_(W, P, ident, u, -0.5)
            ref = W0.double() - 0.5 * (U64 @ u.double())
            err = ((W.double() - ref).abs().max() / ref.abs().max()).item()
            Wl, Wt = W0.clone(), W0.clone()
            # torch: the same fp32 accumulation and one rounding to W's dtype
            f_torch = ((lambda: Wt.addmm_(U, u, alpha=-0.5)) if dt == torch.float32 else
                       (lambda: Wt.copy_(Wt.float().addmm_(U, u, alpha=-0.5))))
            rec[f"apply_{dt}".replace("torch.", "")] = {
                "lspo_ms": 1e3 * timed(lambda: apply_(Wl, P, ident, u, -0.5), a.reps),
                "torch_ms": 1e3 * timed(f_torch, a.reps), "rel_err": err}
        rows.append(rec)
        for op in [x for x in rec if isinstance(rec[x], dict)]:
            r = rec[op]
            print(f"| {m} x {n} | {k} | {op} | {r['lspo_ms']:.2f} | {r['torch_ms']:.2f} | "
                  f"{r['lspo_ms'] / r['torch_ms']:.2f} | {r['rel_err']:.1e} |", file=sys.stderr)
    print(json.dumps({"rows": rows, "threads": a.threads, "isa": lspo.active_isa(), "torch": torch.__version__,
                      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
