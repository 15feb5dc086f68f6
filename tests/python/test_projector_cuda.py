"""CUDA projector primitives through lspo._C (internal bindings), against a dense fp64 reference.

Device cases skip without a GPU; the input-check cases run everywhere. The C++ suite
(tests/cpp/test_projector_cuda.cpp) covers more shapes; this file checks the Python path.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import lspo
from lspo import _C

need_gpu = pytest.mark.skipif(not (lspo.with_cuda and torch.cuda.is_available()), reason="no CUDA device")


def make_projector(n, d, r, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, d, generator=g).argsort(dim=1)[:, :r].to(torch.int32).contiguous()
    val = torch.randn(n, r, generator=g) / r**0.5
    dense = torch.zeros(n, d, dtype=torch.float64).scatter_(1, idx.long(), val.double())
    return idx.to(device), val.to(device), dense.to(device)


def err(x, ref):
    return (x.double() - ref).abs().max().item() if ref.numel() else 0.0


def check(ours, dtype, baseline, ref, ref_abs, terms, what):
    """fp32 inputs: the worst-case bound of recursive fp32 summation, |err| <= terms * 2^-24 * sum|term|
    elementwise. bf16 inputs: flash-attention rule, at most 2x the error of plain PyTorch in bf16, plus
    a floor for single-product cases where the baseline's roundings cancel by luck (2^-9 x scale)."""
    if ref.numel() == 0:
        return
    diff = (ours.double() - ref).abs()
    if dtype == torch.float32:
        excess = (diff - terms * 2.0**-24 * 1.001 * ref_abs).max().item()
        assert excess <= 0, f"{what}: error {diff.max().item():.3g} exceeds the fp32 summation bound"
        return
    e, b = diff.max().item(), err(baseline, ref)
    floor = 2.0**-9 * max(1.0, ref.abs().max().item())
    assert e <= 2 * b + floor, f"{what}: error {e:.3g} vs PyTorch bf16 {b:.3g}"


@need_gpu
@pytest.mark.parametrize("backend", ["gather", "cusparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,r,k", [(1, 1, 1, 1), (33, 1, 1, 7), (4097, 96, 8, 65), (257, 16, 16, 4)])
def test_primitives_match_fp64(backend, dtype, n, d, r, k):
    dev = torch.device("cuda")
    idx, val, P64 = make_projector(n, d, r, dev, seed=n + k)
    Pd, Pa = P64.to(dtype), P64.abs()
    col_terms = int((P64 != 0).sum(0).max())
    torch.manual_seed(0)
    Y = torch.randn(k, n, device=dev)
    check(_C._cuda_right_project(Y.to(dtype), idx, val, d, backend), dtype, Y.to(dtype) @ Pd, Y.double() @ P64,
          Y.double().abs() @ Pa, col_terms, "right")
    Z = torch.randn(n, k, device=dev)
    check(_C._cuda_left_project(idx, val, d, Z.to(dtype), backend), dtype, Pd.t() @ Z.to(dtype), P64.t() @ Z.double(),
          Pa.t() @ Z.double().abs(), col_terms, "left")
    D = torch.randn(d, k, device=dev)
    check(_C._cuda_expand(idx, val, d, D.to(dtype), backend), dtype, Pd @ D.to(dtype), P64 @ D.double(),
          Pa @ D.double().abs(), r, "expand")
    W0, T = torch.randn(n, k, device=dev), torch.randn(d, k, device=dev)
    W = W0.to(dtype).clone()
    _C._cuda_apply_rows_(W, idx, val, d, T, 0.25, backend)
    assert W.dtype == dtype
    check(W, dtype, W0.to(dtype) + 0.25 * (Pd @ T.to(dtype)), W0.double() + 0.25 * (P64 @ T.double()),
          W0.double().abs() + 0.25 * (Pa @ T.double().abs()), r + 2, "apply_rows")
    U, Wc0 = torch.randn(k, d, device=dev), torch.randn(k, n, device=dev)
    Wc = Wc0.to(dtype).clone()
    _C._cuda_apply_cols_(Wc, U, idx, val, d, 0.25, backend)
    check(Wc, dtype, Wc0.to(dtype) + 0.25 * (U.to(dtype) @ Pd.t()), Wc0.double() + 0.25 * (U.double() @ P64.t()),
          Wc0.double().abs() + 0.25 * (U.double().abs() @ Pa.t()), r + 2, "apply_cols")


@need_gpu
def test_gather_is_bitwise_deterministic():
    dev = torch.device("cuda")
    idx, val, _ = make_projector(3000, 256, 8, dev, seed=7)
    _C._cuda_prepare_projector(idx, val, 256)
    Y = torch.randn(300, 3000, device=dev, dtype=torch.bfloat16)
    a = _C._cuda_right_project(Y, idx, val, 256, "gather")
    b = _C._cuda_right_project(Y, idx, val, 256, "gather")
    assert torch.equal(a, b)


def test_cpu_tensors_are_refused():
    idx = torch.zeros(4, 1, dtype=torch.int32)
    val = torch.ones(4, 1)
    with pytest.raises(lspo.LspoError, match="CUDA"):
        _C._cuda_right_project(torch.randn(3, 4), idx, val, 2, "gather")


def test_unknown_backend_is_refused():
    with pytest.raises(lspo.LspoError, match="unknown projector backend"):
        _C._cuda_resolve_backend("expand", 10, 4, 2, 8, "fast")
    assert _C._cuda_resolve_backend("expand", 4096, 1024, 8, 2048, "auto") == "gather"


BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "gpu", "projector_gpu.py")


def test_gpu_benchmark_parses_and_fails_clearly_without_gpu():
    assert subprocess.run([sys.executable, "-m", "py_compile", BENCH]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark itself runs in benchmarks/gpu/run_all.sh")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(BENCH), "..", "..", "python"))
    p = subprocess.run([sys.executable, BENCH, "--quick"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["ok"] is False and "GPU" in last["error"]
