"""GPU speed of the projector primitives: compress_activations + apply for one linear layer, per
backend (lspo gather kernels vs cuSPARSE), next to the dense weight-gradient GEMM X^T dY that the
layer's backward runs anyway (cuBLAS through PyTorch), timed with CUDA events.

  python benchmarks/gpu/projector_gpu.py            full grid: layers 4096x4096 and 4096x11008,
                                                    2048 tokens, d in {512,1024,2048}, r in {4,8,16}
  python benchmarks/gpu/projector_gpu.py --quick    4096x4096, d=1024, r=8 only

Per configuration one JSON line goes to stdout and, when $OUT is set, is appended to
$OUT/bench.jsonl (bench = "projector_gpu/<config>"). The LAST stdout line is one summary JSON object
(run_all.sh's run_bench stores it too). Needs a CUDA device and an lspo build with CUDA; without
them it prints {"ok": false, "error": ...} and exits with status 1.

What is timed (bf16 activations and weight, fp32 projector values and Delta):
  right_x      X P          X  [tokens, m]  -> [tokens, dP]   (= A^T, A = P^T X^T)
  right_dy     dY Q         dY [tokens, n]  -> [tokens, dQ]
  small_gemm   A B          [dP, tokens] x [tokens, dQ] -> [dP, dQ]   (fp32 cuBLAS, TF32 off; and bf16)
  left_W       P^T W        W [m, n] -> [dP, n]   (first half of compress(G); not in compress + apply)
  expand       Q Delta^T    -> [n, dP]; transpose: .t().contiguous() -> T = Delta Q^T [dP, n]
  apply_rows   W += a P T   in place, bf16 W
  expand_u     U = P Delta  -> [m, dQ];  apply_cols: W += a U Q^T in place (the other apply order)
compress = right_x + right_dy + small_gemm(fp32); apply = expand + transpose + apply_rows;
apply2 = expand_u + apply_cols.
The physical floor is the bytes these steps must move (X, dY read; W read and written) divided by
the device-to-device copy bandwidth measured in the same run.
"""
import argparse
import json
import os
import sys

import torch


def fail(msg):
    print(f"projector_gpu.py: {msg}", file=sys.stderr)
    print(json.dumps({"ok": False, "error": msg}))
    sys.exit(1)


def timed(fn, iters, warmup=3):
    """Mean milliseconds per call of fn() on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + write counted), 1 GiB buffers."""
    a = torch.empty(2**28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), 10)
    return 2 * a.numel() * 4 / (ms / 1e3)


def random_projector(n, d, r, gen):
    idx = torch.rand(n, d, generator=gen).argsort(dim=1)[:, :r].to(torch.int32).contiguous()
    val = torch.randn(n, r, generator=gen) / r**0.5
    return idx.cuda(), val.cuda()


def dense_of(idx, val, d):
    return torch.zeros(idx.shape[0], d, device=idx.device).scatter_(1, idx.long(), val)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def sanity(_C, Pi, Pv, Qi, Qv, d, X, W, Delta, be):
    """Relative errors of one backend against dense fp32 PyTorch, so that a broken kernel cannot
    report a fast time unnoticed (timings are only meaningful when these are ~1e-6)."""
    Pd, Qd = dense_of(Pi, Pv, d), dense_of(Qi, Qv, d)
    out = {f"{be}_check_right_rel": rel_err(_C._cuda_right_project(X, Pi, Pv, d, be), X.float() @ Pd)}
    W32 = W.float()
    ref = W32 + Pd @ (Delta @ Qd.t())
    T = _C._cuda_expand(Qi, Qv, d, Delta.t().contiguous(), be).t().contiguous()
    Wr = W32.clone()
    _C._cuda_apply_rows_(Wr, Pi, Pv, d, T, 1.0, be)
    Wc = W32.clone()
    _C._cuda_apply_cols_(Wc, _C._cuda_expand(Pi, Pv, d, Delta, be), Qi, Qv, d, 1.0, be)
    out[f"{be}_check_apply_rows_rel"] = rel_err(Wr - W32, ref - W32)
    out[f"{be}_check_apply_cols_rel"] = rel_err(Wc - W32, ref - W32)
    return out


def bench_config(_C, m, n, tokens, d, r, iters, bw):
    gen = torch.Generator().manual_seed(1234 + d + r)
    Pi, Pv = random_projector(m, d, r, gen)
    Qi, Qv = random_projector(n, d, r, gen)
    X = torch.randn(tokens, m, device="cuda", dtype=torch.bfloat16)
    dY = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    Delta = torch.randn(d, d, device="cuda")
    DeltaT = Delta.t().contiguous()
    res = {"layer": f"{m}x{n}", "m": m, "n": n, "tokens": tokens, "d": d, "r": r, "dtype": "bf16"}
    res["dense_gemm_ms"] = timed(lambda: torch.matmul(X.t(), dY), iters)
    A_T = _C._cuda_right_project(X, Pi, Pv, d, "gather")
    B = _C._cuda_right_project(dY, Qi, Qv, d, "gather")
    res["small_gemm_fp32_ms"] = timed(lambda: torch.matmul(A_T.t(), B), iters)
    A16, B16 = A_T.to(torch.bfloat16), B.to(torch.bfloat16)
    res["small_gemm_bf16_ms"] = timed(lambda: torch.matmul(A16.t(), B16), iters)
    floor_bytes = 2 * (X.numel() + dY.numel()) + 2 * 2 * W.numel()  # bf16: read X, dY; read + write W
    res["hbm_floor_ms"] = floor_bytes / bw * 1e3
    _C._cuda_prepare_projector(Pi, Pv, d)  # the one synchronising step, outside the timed loops
    _C._cuda_prepare_projector(Qi, Qv, d)
    for be in ("gather", "cusparse"):
        res.update(sanity(_C, Pi, Pv, Qi, Qv, d, X, W, Delta, be))
        t = {}
        t["right_x"] = timed(lambda: _C._cuda_right_project(X, Pi, Pv, d, be), iters)
        t["right_dy"] = timed(lambda: _C._cuda_right_project(dY, Qi, Qv, d, be), iters)
        t["left_W"] = timed(lambda: _C._cuda_left_project(Pi, Pv, d, W, be), iters)  # P^T W [d, n] (compress(G))
        t["expand"] = timed(lambda: _C._cuda_expand(Qi, Qv, d, DeltaT, be), iters)
        E = _C._cuda_expand(Qi, Qv, d, DeltaT, be)
        t["transpose"] = timed(lambda: E.t().contiguous(), iters)
        T = E.t().contiguous()
        t["apply_rows"] = timed(lambda: _C._cuda_apply_rows_(W, Pi, Pv, d, T, 1e-6, be), iters)
        t["expand_u"] = timed(lambda: _C._cuda_expand(Pi, Pv, d, Delta, be), iters)
        U = _C._cuda_expand(Pi, Pv, d, Delta, be)
        t["apply_cols"] = timed(lambda: _C._cuda_apply_cols_(W, U, Qi, Qv, d, 1e-6, be), iters)
        compress = t["right_x"] + t["right_dy"] + res["small_gemm_fp32_ms"]
        apply = min(t["expand"] + t["transpose"] + t["apply_rows"], t["expand_u"] + t["apply_cols"])
        res[f"{be}_apply_order"] = "rows" if apply == t["expand"] + t["transpose"] + t["apply_rows"] else "cols"
        for k, v in t.items():
            res[f"{be}_{k}_ms"] = v
        res[f"{be}_compress_ms"] = compress
        res[f"{be}_apply_ms"] = apply  # the faster of the two orders
        res[f"{be}_over_gemm"] = (compress + apply) / res["dense_gemm_ms"]
    # the same layer through the public API, when the projector bindings provide it
    if hasattr(_C, "SparseProjector") and hasattr(_C, "compress_activations") and hasattr(_C, "apply_"):
        try:
            P = _C.SparseProjector.from_tensors(Pi, Pv, d)
            Q = _C.SparseProjector.from_tensors(Qi, Qv, d)
            res["api_compress_ms"] = timed(lambda: _C.compress_activations(P, Q, X, dY), iters)
            res["api_apply_ms"] = timed(lambda: _C.apply_(W, P, Q, Delta, 1e-6), iters)
            res["api_over_gemm"] = (res["api_compress_ms"] + res["api_apply_ms"]) / res["dense_gemm_ms"]
        except Exception as e:  # report, do not hide: the primitive numbers above stand on their own
            res["api_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one configuration (4096x4096, d=1024, r=8)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        fail("no CUDA device: this benchmark needs a GPU")
    try:
        import lspo
        from lspo import _C
    except Exception as e:  # noqa: BLE001
        fail(f"cannot import lspo: {e}")
    if not (lspo.with_cuda and hasattr(_C, "_cuda_right_project")):
        fail("lspo was built without CUDA (or without the projector CUDA primitives)")
    torch.backends.cuda.matmul.allow_tf32 = False

    layers = [(4096, 4096)] if a.quick else [(4096, 4096), (4096, 11008)]
    grid = [(1024, 8)] if a.quick else [(d, r) for d in (512, 1024, 2048) for r in (4, 8, 16)]
    bw = copy_bandwidth()
    out_dir = os.environ.get("OUT")
    rows = []
    for m, n in layers:
        for d, r in grid:
            res = bench_config(_C, m, n, a.tokens, d, r, a.iters, bw)
            res["bench"] = f"projector_gpu/{m}x{n}_d{d}_r{r}"
            rows.append(res)
            line = json.dumps(res)
            print(line, flush=True)
            if out_dir:
                with open(os.path.join(out_dir, "bench.jsonl"), "a") as f:
                    f.write(line + "\n")

    def pick(m, n, d, r):
        for x in rows:
            if (x["m"], x["n"], x["d"], x["r"]) == (m, n, d, r):
                return x
        return None

    ref = pick(4096, 4096, 1024, 8)
    faster = {}  # per primitive: configurations where cuSPARSE beat gather (calibrates the auto table)
    for x in rows:
        for prim in ("right_x", "right_dy", "left_W", "expand", "apply_rows", "expand_u", "apply_cols"):
            if x[f"cusparse_{prim}_ms"] < x[f"gather_{prim}_ms"]:
                faster.setdefault(prim, []).append(x["bench"].split("/", 1)[1])
    summary = {
        "ok": True,
        "device": torch.cuda.get_device_name(),
        "copy_gb_s": bw / 1e9,
        "configs": len(rows),
        "target_compress_plus_apply_over_gemm": 0.10,
        "gather_over_gemm_4096x4096_d1024_r8": ref["gather_over_gemm"] if ref else None,
        "cusparse_over_gemm_4096x4096_d1024_r8": ref["cusparse_over_gemm"] if ref else None,
        "dense_gemm_ms_4096x4096": ref["dense_gemm_ms"] if ref else None,
        "cusparse_faster_in": faster,
        "max_check_rel_err": max(v for x in rows for k, v in x.items() if "_check_" in k),
    }
    print(markdown(rows), file=sys.stderr)  # for docs/benchmarks.md; stdout's last line stays the JSON
    print(json.dumps(summary))


def markdown(rows):
    out = ["| layer | d | r | dense X^T dY ms | gather compress ms | gather apply ms (order) | gather / GEMM | "
           "cuSPARSE compress ms | cuSPARSE apply ms | cuSPARSE / GEMM | bytes floor / GEMM |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        out.append(f"| {x['layer']} | {x['d']} | {x['r']} | {x['dense_gemm_ms']:.3f} | {x['gather_compress_ms']:.3f} | "
                   f"{x['gather_apply_ms']:.3f} ({x['gather_apply_order']}) | {x['gather_over_gemm']:.3f} | "
                   f"{x['cusparse_compress_ms']:.3f} | {x['cusparse_apply_ms']:.3f} | {x['cusparse_over_gemm']:.3f} | "
                   f"{x['hbm_floor_ms'] / x['dense_gemm_ms']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
