#!/usr/bin/env python3
"""Learned (d, r)-sparse projectors on the CPU: how well they capture REAL gradients, and how fast
the CPU operations are next to the dense weight-gradient GEMM, in one run.

Part 1, quality. Trains lspo.tinygpt.TinyGPT (n_embd 512, 4 layers, 12.8M parameters; quick: 2
layers) on examples/data/tinyshakespeare.txt from scratch with torch.optim.AdamW (lr 1e-3, batch 8 x
128 tokens), and keeps the weight gradients G of the blocks' nn.Linear layers (qkv, proj, fc, fc_out;
G = dL/dW, [out, in]) of --blocks:
  * fit set:   at step --fit-step, the gradients of --fit-samples extra batches drawn from the training
               text by a separate generator (not training steps: the optimizer never sees them);
  * same step: --holdout-samples more such batches at the fit step, never fitted on;
  * eval set:  at --eval-steps (all later than the fit step), the gradient of that step's own training
               batch, captured before the optimizer step. THE headline error is on this set.
d must be <= both dims of a layer (d = 256 is n_embd / 2, the paper's "d about n/2").
For every layer and (d, r), one random pair (P [out, d], Q [in, d], r nonzeros per row, values
N(0, 1/sqrt(r)): lspo's init) is scored, then its values are learned with lspo.projector.fit
(defaults: Adam lr 0.05, --fit-iters, l2 0) on the FIT set only (positions unchanged) and scored
again: e = ||P P^T G Q Q^T - G||_F / ||G||_F (lspo.projector.relative_error). Beside them:
  * best scale: an error after the optimal scalar rescaling of P P^T G Q Q^T (sqrt(1 - cos^2)); the
    random init's scale is far from 1, so "learned / random" alone overstates what learning buys;
  * learned with an L2 penalty (--l2) at (ref-d, ref-r);
  * GaLore-style SVD of equal communicated floats: rank k = max(1, round(d^2 / (m + n))) (a rank-k
    factorisation of an m x n matrix is k (m + n) floats, the d^2 floats of S = P^T G Q), projector
    from the SVD of the mean fit-set gradient (the same data the learned projector saw), one-sided as
    GaLore does (G V_k V_k^T when m >= n, else U_k U_k^T G), scored on the eval set; and
  * best rank k (oracle): the truncated SVD of each eval gradient itself (Eckart-Young lower bound
    for rank k, not available to an optimizer without an SVD every step).
Times: lspo fit per layer, torch.linalg.svd per layer; memory: bytes of the sparse projector pair
vs the SVD's outputs (U, S, Vh) and the kept rank-k projector.

Part 2, CPU speed. For a 4096 x 4096 and a 4096 x 11008 layer at 2048 tokens, d in {512, 1024, 2048},
r in {4, 8, 16}: compress_activations(P, Q, X, dY) (S = (P^T X^T)(dY Q), the compressed weight
gradient without forming it) + apply_(W, P, Q, Delta) (W += a P Delta Q^T in place), next to the dense
GEMM X^T dY the backward runs anyway (torch.matmul, fp32 and bf16), all timed in this run (median of
--reps after a warm-up), in fp32 (X, dY, W fp32) and bf16 (X, dY, W bf16). Each configuration is first
checked against dense fp32 torch (relative error in the table), so a broken kernel cannot look fast.

  --quick   2 layers, 40 steps, the last block's 4 layers at (d, r) = (256, 8) with 60 fit iterations,
            no L2 variant; speed only 4096 x 4096 at d=1024, r=8 (about 1 minute on a quiet 2-core VM)
Last stdout line: one JSON object with learned_vs_random_error_ratio (mean e learned / mean e random
at --ref-d, --ref-r) and cpu_compress_over_gemm ((compress_activations + apply) / dense GEMM, fp32,
at the first speed layer, --speed-ref-d, --speed-ref-r; _bf16 for bf16), among others.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lspo
from lspo import projector as lp
from lspo.tinygpt import TinyGPT, TinyGPTConfig, batches, evaluate, load_text

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("qkv", "proj", "fc", "fc_out")


def log(*a):
    print(*a, flush=True)


def ints(s):
    return [int(x) for x in s.split(",") if x]


def layers_arg(s):
    out = []
    for x in s.split(","):
        m, n = x.lower().split("x")
        out.append((int(m), int(n)))
    return out


# --------------------------------------------------------------------------- part 1: gradients
def collect_gradients(a):
    """Trains TinyGPT; returns (fit, same-step held-out, eval) gradients and info.
    Gradients: {layer name: [G, ...]} fp32, for the layers of --blocks."""
    torch.manual_seed(a.seed)
    cfg = TinyGPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.block)
    model = TinyGPT(cfg)
    train, val = load_text(ROOT / "examples" / "data" / "tinyshakespeare.txt")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    named = {f"{i}.{k}": getattr(b, k).weight for i, b in enumerate(model.blocks) for k in KINDS}
    it = batches(train, a.batch, a.block, seed=a.seed)
    held = batches(train, a.batch, a.block, seed=a.seed + 1000)   # the fit set's own batches
    fit_g = {k: [] for k in named}
    hold_g = {k: [] for k in named}
    eval_g = {k: [] for k in named}
    eval_steps = set(a.eval_steps)
    n_params = sum(p.numel() for p in model.parameters())
    val0 = evaluate(model, val, batch_size=8, n_batches=4)
    losses = []
    t0 = time.perf_counter()
    for step in tqdm(range(1, a.steps + 1), desc="train TinyGPT", file=sys.stderr, mininterval=2):
        if step == a.fit_step:
            for i in range(a.fit_samples + a.holdout_samples):
                x, y = next(held)
                opt.zero_grad(set_to_none=True)
                model(x, y)[1].backward()
                for k, w in named.items():
                    (fit_g if i < a.fit_samples else hold_g)[k].append(w.grad.detach().clone())
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)[1]
        loss.backward()
        losses.append(loss.item())
        if step in eval_steps:
            for k, w in named.items():
                eval_g[k].append(w.grad.detach().clone())
        opt.step()
    train_s = time.perf_counter() - t0
    val1 = evaluate(model, val, batch_size=8, n_batches=4)
    info = {"params": n_params, "train_s": train_s, "val_loss_start": val0, "val_loss_end": val1,
            "train_loss_last10": statistics.fmean(losses[-10:])}
    keep = [k for k in named if int(k.split(".")[0]) in a.blocks]
    sub = lambda g: {k: g[k] for k in keep}  # noqa: E731
    return sub(fit_g), sub(hold_g), sub(eval_g), info


def scaled_error(P, Q, G):
    """Error of P P^T G Q Q^T after the best scalar rescaling: sqrt(1 - cos^2(A, G))."""
    A = lp.decompress(P, Q, lp.compress(P, Q, G)).double()
    G = G.double()
    c = float((A * G).sum()) / (float(A.norm()) * float(G.norm()) + 1e-300)
    return math.sqrt(max(0.0, 1.0 - c * c))


def galore_projector(Gmean, k):
    """One-sided rank-k projector from the SVD of Gmean, GaLore's side rule; returns (apply fn, s, bytes)."""
    m, n = Gmean.shape
    t0 = time.perf_counter()
    U, S, Vh = torch.linalg.svd(Gmean, full_matrices=False)
    svd_s = time.perf_counter() - t0
    svd_bytes = (U.numel() + S.numel() + Vh.numel()) * 4
    if m >= n:
        V = Vh[:k].t().contiguous()                 # [n, k]
        fn = lambda G: (G @ V) @ V.t()  # noqa: E731
        kept = V.numel() * 4
    else:
        Uk = U[:, :k].contiguous()                  # [m, k]
        fn = lambda G: Uk @ (Uk.t() @ G)  # noqa: E731
        kept = Uk.numel() * 4
    return fn, svd_s, svd_bytes, kept


def rel(A, G):
    return float((A.double() - G.double()).norm() / G.double().norm())


def best_rank_k_error(G, k):
    S = torch.linalg.svdvals(G.double())
    return math.sqrt(float(S[k:].square().sum() / S.square().sum()))


def quality(a, fit_g, hold_g, eval_g):
    rows = []
    grid = [(d, r) for d in a.grid_d for r in a.grid_r]
    layers = list(fit_g)
    svd_cache = {}
    pbar = tqdm(total=len(grid) * len(layers), desc="fit projectors", file=sys.stderr, mininterval=2)
    for d, r in grid:
        for li, name in enumerate(layers):
            F, H, E = fit_g[name], hold_g[name], eval_g[name]
            m, n = F[0].shape
            if d > min(m, n):
                pbar.update()
                continue
            seed = a.seed + 7919 * li + 31 * d + r
            P = lspo.SparseProjector.random(m, d, r, seed=seed)
            Q = lspo.SparseProjector.random(n, d, r, seed=seed + 1)
            e_rand = lp.relative_error(P, Q, E)
            e_rand_scaled = statistics.fmean(scaled_error(P, Q, G) for G in E)
            t0 = time.perf_counter()
            res = lp.fit(P, Q, F, lr=a.fit_lr, max_iters=a.fit_iters)
            fit_s = time.perf_counter() - t0
            e_learn = lp.relative_error(P, Q, E)
            e_learn_scaled = statistics.fmean(scaled_error(P, Q, G) for G in E)
            e_hold = lp.relative_error(P, Q, H) if H else float("nan")
            e_l2 = float("nan")
            if a.l2 > 0 and (d, r) == (a.ref_d, a.ref_r):   # the same pair, re-learned with an L2 penalty
                P2 = lspo.SparseProjector.random(m, d, r, seed=seed)
                Q2 = lspo.SparseProjector.random(n, d, r, seed=seed + 1)
                lp.fit(P2, Q2, F, lr=a.fit_lr, max_iters=a.fit_iters, l2=a.l2)
                e_l2 = lp.relative_error(P2, Q2, E)
            k = max(1, round(d * d / (m + n)))
            if (name, k) not in svd_cache:
                fn, svd_s, svd_bytes, kept = galore_projector(torch.stack(F).mean(0), k)
                e_gal = statistics.fmean(rel(fn(G), G) for G in E)
                e_best = statistics.fmean(best_rank_k_error(G, k) for G in E)
                svd_cache[(name, k)] = (e_gal, e_best, svd_s, svd_bytes, kept)
            e_gal, e_best, svd_s, svd_bytes, kept = svd_cache[(name, k)]
            rows.append({"layer": name, "kind": name.split(".", 1)[1], "m": m, "n": n, "d": d, "r": r, "k": k,
                         "e_random": e_rand, "e_random_scaled": e_rand_scaled, "e_learned": e_learn,
                         "e_learned_scaled": e_learn_scaled, "e_learned_holdout": e_hold, "e_learned_l2": e_l2,
                         "e_fit_before": res["error_before"], "e_fit_after": res["error_after"],
                         "fit_iters": res["iters"], "fit_s": fit_s, "e_galore": e_gal, "e_best_rank_k": e_best,
                         "svd_s": svd_s, "svd_bytes": svd_bytes, "galore_kept_bytes": kept,
                         "sparse_bytes": (m + n) * r * 8})
            pbar.update()
    pbar.close()
    return rows


def quality_tables(rows, a):
    def mean(key, rs):
        return statistics.fmean(x[key] for x in rs)

    log("\nPart 1: relative error e = ||P P^T G Q Q^T - G||_F / ||G||_F, mean over layers and gradients."
        "\n  'later steps' = the eval set (training gradients of later steps); learned projectors were fitted"
        "\n  on the fit set only; 'same step' = other held-out batches at the fit step; 'best scale' = after"
        "\n  the optimal scalar rescaling of P P^T G Q Q^T")
    log("| d | r | GaLore k | e random | e random, best scale | **e learned** (later steps) | learned / random | "
        "learned / random best scale | e learned, best scale | e learned, same step | e learned, fit set | "
        "e GaLore SVD rank k | e best rank k (oracle) | fit s/layer | SVD s/layer |")
    log("|" + "---|" * 15)
    for d in a.grid_d:
        for r in a.grid_r:
            rs = [x for x in rows if x["d"] == d and x["r"] == r]
            if not rs:
                continue
            ks = sorted({x["k"] for x in rs})
            el, er, ers = mean("e_learned", rs), mean("e_random", rs), mean("e_random_scaled", rs)
            log(f"| {d} | {r} | {ks[0]}-{ks[-1]} | {er:.3f} | {ers:.3f} | **{el:.3f}** | {el / er:.3f} | "
                f"{el / ers:.3f} | {mean('e_learned_scaled', rs):.3f} | {mean('e_learned_holdout', rs):.3f} | "
                f"{mean('e_fit_after', rs):.3f} | {mean('e_galore', rs):.3f} | {mean('e_best_rank_k', rs):.3f} | "
                f"{mean('fit_s', rs):.2f} | {mean('svd_s', rs):.3f} |")
    ref = [x for x in rows if x["d"] == a.ref_d and x["r"] == a.ref_r]
    if ref:
        l2 = f"e learned, l2={a.l2}" if a.l2 > 0 else "e learned, l2 (not run)"
        log(f"\nPer layer kind at d={a.ref_d}, r={a.ref_r} (eval set = later steps):")
        log(f"| kind | m x n | k | e random | e learned | {l2} | e learned, same step | e learned, fit set | "
            "e GaLore | e best rank k | sparse P,Q bytes | SVD output bytes | GaLore projector bytes |")
        log("|" + "---|" * 13)
        for kind in KINDS:
            rs = [x for x in ref if x["kind"] == kind]
            if rs:
                x = rs[0]
                log(f"| {kind} | {x['m']} x {x['n']} | {x['k']} | {mean('e_random', rs):.3f} | "
                    f"{mean('e_learned', rs):.3f} | {mean('e_learned_l2', rs):.3f} | "
                    f"{mean('e_learned_holdout', rs):.3f} | {mean('e_fit_after', rs):.3f} | {mean('e_galore', rs):.3f} | "
                    f"{mean('e_best_rank_k', rs):.3f} | {x['sparse_bytes']} | {x['svd_bytes']} | "
                    f"{x['galore_kept_bytes']} |")
    return ref


# --------------------------------------------------------------------------- part 2: CPU speed
def timed(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def speed(a):
    rows = []
    cfgs = [(m, n, d, r) for (m, n) in a.speed_layers for d in a.speed_d for r in a.speed_r]
    gen = torch.Generator().manual_seed(a.seed)
    gemm = {}
    for (m, n, d, r) in tqdm(cfgs, desc="CPU speed", file=sys.stderr):
        T = a.tokens
        if (m, n) not in gemm:
            X = torch.randn(T, m, generator=gen)
            dY = torch.randn(T, n, generator=gen)
            W = torch.randn(m, n, generator=gen) * 0.02
            Xb, dYb, Wb = X.bfloat16(), dY.bfloat16(), W.bfloat16()
            g32 = timed(lambda: torch.matmul(X.t(), dY), a.reps)
            g16 = timed(lambda: torch.matmul(Xb.t(), dYb), a.reps)
            gemm[(m, n)] = (X, dY, W, Xb, dYb, Wb, g32, g16)
        X, dY, W, Xb, dYb, Wb, g32, g16 = gemm[(m, n)]
        P = lspo.SparseProjector.random(m, d, r, seed=a.seed + d + r)
        Q = lspo.SparseProjector.random(n, d, r, seed=a.seed + d + r + 1)
        # correctness against dense fp32 torch first
        Pd, Qd = P.dense(), Q.dense()
        S = lp.compress_activations(P, Q, X, dY)
        S_ref = (X @ Pd).t() @ (dY @ Qd)
        err_c = rel(S, S_ref)
        Delta = torch.randn(d, d, generator=gen) * 1e-3
        rows_chk = torch.arange(0, m, max(1, m // 64))
        W0 = W[rows_chk].clone()
        Wc = W.clone()
        lp.apply_(Wc, P, Q, Delta, -1.0)
        err_a = rel(Wc[rows_chk] - W0, -(Pd[rows_chk] @ Delta) @ Qd.t())
        del Wc, Pd, Qd, S_ref
        t_c32 = timed(lambda: lp.compress_activations(P, Q, X, dY), a.reps)
        t_a32 = timed(lambda: lp.apply_(W, P, Q, Delta, -1e-3), a.reps)
        t_c16 = timed(lambda: lp.compress_activations(P, Q, Xb, dYb), a.reps)
        t_a16 = timed(lambda: lp.apply_(Wb, P, Q, Delta, -1e-3), a.reps)
        rows.append({"m": m, "n": n, "tokens": T, "d": d, "r": r, "gemm_fp32_ms": g32 * 1e3, "gemm_bf16_ms": g16 * 1e3,
                     "compress_fp32_ms": t_c32 * 1e3, "apply_fp32_ms": t_a32 * 1e3,
                     "compress_bf16_ms": t_c16 * 1e3, "apply_bf16_ms": t_a16 * 1e3,
                     "ratio_fp32": (t_c32 + t_a32) / g32, "ratio_bf16": (t_c16 + t_a16) / g16,
                     "check_compress_rel": err_c, "check_apply_rel": err_a})
    log(f"\nPart 2: CPU time (ms, median of {a.reps}) at {a.tokens} tokens; ratio = (compress_activations + apply_) "
        "/ dense GEMM X^T dY of the same dtype")
    log("| layer m x n | d | r | GEMM fp32 | compress fp32 | apply fp32 | ratio fp32 | GEMM bf16 | compress bf16 | "
        "apply bf16 | ratio bf16 | check rel err (compress, apply) |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        log(f"| {x['m']} x {x['n']} | {x['d']} | {x['r']} | {x['gemm_fp32_ms']:.1f} | {x['compress_fp32_ms']:.1f} | "
            f"{x['apply_fp32_ms']:.1f} | **{x['ratio_fp32']:.3f}** | {x['gemm_bf16_ms']:.1f} | "
            f"{x['compress_bf16_ms']:.1f} | {x['apply_bf16_ms']:.1f} | **{x['ratio_bf16']:.3f}** | "
            f"{x['check_compress_rel']:.1e}, {x['check_apply_rel']:.1e} |")
    return rows


# --------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short training, reduced grids (< 2 min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and lspo threads for part 2 (speed)")
    p.add_argument("--quality-threads", type=int, default=1,
                   help="threads for part 1 (training, fits: many small ops; on a shared VM one thread avoids "
                        "OpenMP barrier stalls, measured 10x slower fits with 2 threads at load 9)")
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-layer", type=int, help="default 4 (quick 2)")
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, help="training steps (default 300; quick 40)")
    p.add_argument("--fit-step", type=int, help="step whose extra batches form the fit set (default 2/3 of steps)")
    p.add_argument("--eval-steps", type=ints, help="later steps whose gradients form the eval set")
    p.add_argument("--fit-samples", type=int, default=4)
    p.add_argument("--holdout-samples", type=int, default=2, help="same-step held-out batches (not fitted on)")
    p.add_argument("--blocks", type=ints, help="blocks whose 4 linear layers are measured (default all; quick: last)")
    p.add_argument("--l2", type=float, help="also re-learn at (ref-d, ref-r) with this L2 penalty (default 0.01; "
                   "quick 0 = off)")
    p.add_argument("--fit-iters", type=int, help="default 100 (quick 60)")
    p.add_argument("--fit-lr", type=float, default=0.05)
    p.add_argument("--grid-d", type=ints, help="default 64,128,256 (quick 256)")
    p.add_argument("--grid-r", type=ints, help="default 4,8,16 (quick 8)")
    p.add_argument("--ref-d", type=int, default=256)
    p.add_argument("--ref-r", type=int, default=8)
    p.add_argument("--speed-layers", type=layers_arg, help="default 4096x4096,4096x11008 (quick 4096x4096)")
    p.add_argument("--speed-d", type=ints, help="default 512,1024,2048 (quick 1024)")
    p.add_argument("--speed-r", type=ints, help="default 4,8,16 (quick 8)")
    p.add_argument("--speed-ref-d", type=int, default=1024)
    p.add_argument("--speed-ref-r", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, help="timed repetitions (default 5; quick 3)")
    a = p.parse_args(argv)
    q = a.quick
    a.steps = a.steps or (40 if q else 300)
    a.n_layer = a.n_layer or (2 if q else 4)
    a.fit_iters = a.fit_iters or (60 if q else 100)
    a.blocks = a.blocks if a.blocks is not None else ([a.n_layer - 1] if q else list(range(a.n_layer)))
    a.l2 = a.l2 if a.l2 is not None else (0.0 if q else 0.01)
    if any(b < 0 or b >= a.n_layer for b in a.blocks):
        p.error(f"--blocks must lie in [0, {a.n_layer})")
    a.fit_step = a.fit_step or max(1, (2 * a.steps) // 3)
    a.eval_steps = a.eval_steps or sorted({min(a.steps, a.fit_step + max(1, (a.steps - a.fit_step) * i // 3))
                                           for i in (1, 2, 3)})
    if a.fit_step > a.steps or any(s <= a.fit_step or s > a.steps for s in a.eval_steps):
        p.error("--eval-steps must all lie after --fit-step and within --steps")
    a.grid_d = a.grid_d or ([256] if q else [64, 128, 256])
    a.grid_r = a.grid_r or ([8] if q else [4, 8, 16])
    a.speed_layers = a.speed_layers or ([(4096, 4096)] if q else [(4096, 4096), (4096, 11008)])
    a.speed_d = a.speed_d or ([1024] if q else [512, 1024, 2048])
    a.speed_r = a.speed_r or ([8] if q else [4, 8, 16])
    a.reps = a.reps or (3 if q else 5)
    return a


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(a.quality_threads)
    lspo.set_num_threads(a.quality_threads)
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    log(f"lspo projector benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, threads (torch and lspo): {a.quality_threads} for part 1, {a.threads} for part 2; "
        f"lspo ISA {lspo.active_isa()}; load average {os.getloadavg()[0]:.2f}")
    log(f"TinyGPT n_embd={a.n_embd} n_layer={a.n_layer} batch={a.batch}x{a.block} lr={a.lr}, {a.steps} steps; "
        f"fit set: {a.fit_samples} extra batches at step {a.fit_step} (+ {a.holdout_samples} same-step held-out); "
        f"eval set: training gradients of steps {a.eval_steps}; fit: {a.fit_iters} iters, lr {a.fit_lr}; "
        f"layers of blocks {a.blocks}")
    fit_g, hold_g, eval_g, info = collect_gradients(a)
    log(f"trained {info['params'] / 1e6:.2f}M params in {info['train_s']:.1f} s: val loss {info['val_loss_start']:.3f} "
        f"-> {info['val_loss_end']:.3f} (train loss, last 10 steps: {info['train_loss_last10']:.3f})")
    rows = quality(a, fit_g, hold_g, eval_g)
    ref = quality_tables(rows, a)
    torch.set_num_threads(a.threads)
    lspo.set_num_threads(a.threads)
    srows = speed(a)
    sref = [x for x in srows if (x["m"], x["n"]) == a.speed_layers[0] and x["d"] == a.speed_ref_d
            and x["r"] == a.speed_ref_r]

    def m(key, rs):
        return statistics.fmean(x[key] for x in rs) if rs else None

    summary = {
        "learned_vs_random_error_ratio": (m("e_learned", ref) / m("e_random", ref)) if ref else None,
        "learned_vs_random_best_scale_error_ratio": (m("e_learned", ref) / m("e_random_scaled", ref)) if ref else None,
        "cpu_compress_over_gemm": sref[0]["ratio_fp32"] if sref else None,
        "cpu_compress_over_gemm_bf16": sref[0]["ratio_bf16"] if sref else None,
        "ref_quality": {"d": a.ref_d, "r": a.ref_r, "e_random": m("e_random", ref),
                        "e_random_best_scale": m("e_random_scaled", ref), "e_learned": m("e_learned", ref),
                        "e_learned_best_scale": m("e_learned_scaled", ref),
                        "e_learned_same_step": m("e_learned_holdout", ref), "e_learned_fit_set": m("e_fit_after", ref),
                        "e_learned_l2": m("e_learned_l2", ref) if a.l2 > 0 else None, "l2": a.l2,
                        "layers": len(ref),
                        "e_galore_equal_floats": m("e_galore", ref), "e_best_rank_k": m("e_best_rank_k", ref)},
        "ref_speed": ({k: sref[0][k] for k in ("m", "n", "tokens", "d", "r", "gemm_fp32_ms", "compress_fp32_ms",
                                               "apply_fp32_ms", "gemm_bf16_ms", "compress_bf16_ms", "apply_bf16_ms")}
                      if sref else None),
        "max_check_rel_err": max((max(x["check_compress_rel"], x["check_apply_rel"]) for x in srows), default=None),
        "model": {"n_embd": a.n_embd, "n_layer": a.n_layer, "steps": a.steps, **info},
        "threads": a.threads,
        "quality_threads": a.quality_threads,
        "load_average_start_end": [load0, os.getloadavg()[0]],
        "quick": a.quick,
        "elapsed_s": time.perf_counter() - t_start,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
