"""lspo.SparseProjector and the projector functions against a dense fp64 reference (P, Q materialised).

fp32 tolerance: first-order worst-case bound of recursive fp32 summation (terms * 2^-24 * |P|^T|G||Q|).
bf16 tolerance (flash-attention rule): at most 2x the error of the same product in PyTorch bf16 against
fp64, plus a floor 2^-9 * max|ref| for lucky cancellations of the baseline. CUDA cases skip without a GPU.
"""
import io

import pytest
import torch

import lspo
from lspo import projector as pj
from lspo.projector import SparseProjector

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (lspo.with_cuda and torch.cuda.is_available()), reason="no CUDA device"))]


def d64(P):
    return P.dense(torch.float64)


def check_fp32(ours, ref, ref_abs, terms, what):
    assert ours.dtype == torch.float32 and ours.shape == ref.shape, what
    if ref.numel() == 0:
        return
    diff = (ours.double() - ref).abs()
    assert (diff - terms * 2.0**-24 * 1.001 * ref_abs).max().item() <= 0, f"{what}: error {diff.max().item():.3g}"


def check_bf16(ours, baseline, ref, what):
    e = (ours.double() - ref).abs().max().item()
    b = (baseline.double() - ref).abs().max().item()
    floor = 2.0**-9 * max(1.0, ref.abs().max().item())
    assert e <= 2 * b + floor, f"{what}: error {e:.3g} vs PyTorch bf16 {b:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,dP,dQ,r,k", [(1, 1, 1, 1, 1, 1), (7, 5, 1, 2, 1, 3), (9, 13, 4, 4, 4, 5),
                                           (33, 17, 8, 5, 3, 11), (24, 4097, 8, 64, 8, 9)])
def test_ops_match_dense_fp64(device, m, n, dP, dQ, r, k):
    rQ = min(r, dQ)
    P = SparseProjector.random(m, dP, r, seed=m, device=device)
    Q = SparseProjector.random(n, dQ, rQ, seed=n + 1, device=device)
    g = torch.Generator().manual_seed(m + n)
    G, X, dY = (torch.randn(*s, generator=g).to(device) for s in [(m, n), (k, m), (k, n)])
    Delta = torch.randn(dP, dQ, generator=g).to(device)
    P64, Q64 = d64(P), d64(Q)
    Pa, Qa = P64.abs(), Q64.abs()
    G64, X64, dY64, D64 = G.double(), X.double(), dY.double(), Delta.double()
    check_fp32(pj.right_project(X, P), X64 @ P64, X64.abs() @ Pa, m, "right_project")
    check_fp32(pj.left_project(P, G), P64.T @ G64, Pa.T @ G64.abs(), m, "left_project")
    check_fp32(pj.compress(P, Q, G), P64.T @ G64 @ Q64, Pa.T @ G64.abs() @ Qa, m + n + 2, "compress")
    check_fp32(pj.project_input(P, X), P64.T @ X64.T, Pa.T @ X64.abs().T, m, "project_input")
    check_fp32(pj.project_grad_output(Q, dY), dY64 @ Q64, dY64.abs() @ Qa, n, "project_grad_output")
    check_fp32(pj.compress_activations(P, Q, X, dY), P64.T @ X64.T @ dY64 @ Q64,
               Pa.T @ X64.abs().T @ dY64.abs() @ Qa, m + n + k + 2, "compress_activations")
    check_fp32(pj.decompress(P, Q, Delta), P64 @ D64 @ Q64.T, Pa @ D64.abs() @ Qa.T, r + rQ + 2, "decompress")
    for wt in (torch.float32, torch.bfloat16):
        W = torch.randn(m, n, generator=g).to(device=device, dtype=wt)
        W0 = W.double()
        out = pj.apply_(W, P, Q, Delta, alpha=0.5)
        assert out is W and W.dtype == wt
        ref = W0 + 0.5 * P64 @ D64 @ Q64.T
        if wt == torch.float32:
            check_fp32(W, ref, W0.abs() + 0.5 * Pa @ D64.abs() @ Qa.T, r + rQ + 3, "apply_ fp32")
        else:  # one bf16 rounding of the (fp32-accurate) result
            bound = 2.0**-8 * ref.abs() + 1e-5 * (W0.abs() + Pa @ D64.abs() @ Qa.T)
            assert ((W.double() - ref).abs() - bound).max().item() <= 0, "apply_ bf16"
    bf = torch.bfloat16
    check_bf16(pj.right_project(X.to(bf), P), X.to(bf) @ P64.to(bf), X64 @ P64, "right_project bf16")
    check_bf16(pj.compress(P, Q, G.to(bf)), P64.to(bf).T @ G.to(bf) @ Q64.to(bf), P64.T @ G64 @ Q64, "compress bf16")
    check_bf16(pj.compress_activations(P, Q, X.to(bf), dY.to(bf)),
               P64.to(bf).T @ X.to(bf).T @ dY.to(bf) @ Q64.to(bf), P64.T @ X64.T @ dY64 @ Q64,
               "compress_activations bf16")


def low_rank_grads(m, n, rank=4, count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
    return [U @ torch.randn(rank, rank, generator=g) @ V + 0.05 * torch.randn(m, n, generator=g) for _ in range(count)]


@pytest.mark.parametrize("device", DEVICES)
def test_fit_reduces_error(device):
    grads = [G.to(device) for G in low_rank_grads(96, 80)]
    P = SparseProjector.random(96, 16, 4, seed=1, device=device)
    Q = SparseProjector.random(80, 16, 4, seed=2, device=device)
    before = pj.relative_error(P, Q, grads)
    res = pj.fit(P, Q, grads, max_iters=150)
    assert res["error_before"] == pytest.approx(before, rel=1e-4)
    assert res["error_after"] == pytest.approx(pj.relative_error(P, Q, grads), abs=1e-4)
    assert res["error_after"] < 0.5 * res["error_before"] and res["error_after"] < 0.9
    assert pj.should_refit(P, Q, grads, 0.5 * res["error_after"])
    assert not pj.should_refit(P, Q, grads, 1.01 * res["error_after"] + 1e-6)
    # (X, dY) pairs
    g = torch.Generator().manual_seed(3)
    U = torch.randn(96, 3, generator=g)
    pairs = [((torch.randn(10, 3, generator=g) @ U.T).to(device), torch.randn(10, 80, generator=g).to(device))
             for _ in range(2)]
    res2 = pj.fit(P, Q, pairs, max_iters=60)
    assert res2["error_after"] < res2["error_before"]
    assert res2["error_after"] == pytest.approx(pj.relative_error(P, Q, pairs), abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_carry_state_equals_dense_formula(device):
    Po, Qo = SparseProjector.random(40, 8, 3, 1, device), SparseProjector.random(30, 6, 2, 2, device)
    Pn, Qn = SparseProjector.random(40, 5, 3, 3, device), SparseProjector.random(30, 6, 4, 4, device)
    M, V = torch.randn(8, 6, device=device), torch.rand(8, 6, device=device)
    CP, CQ = d64(Pn).T @ d64(Po), d64(Qo).T @ d64(Qn)
    M2, V2 = pj.carry_state(Po, Qo, Pn, Qn, M, V)
    torch.testing.assert_close(M2.double(), CP @ M.double() @ CQ, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(V2.double(), CP.square() @ V.double() @ CQ.square(), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_weights_only():
    P = SparseProjector.random(50, 10, 3, seed=7)
    buf = io.BytesIO()
    torch.save({"P": P.state_dict()}, buf)
    buf.seek(0)
    Q = SparseProjector.from_state_dict(torch.load(buf, weights_only=True)["P"])
    assert Q.d == P.d and torch.equal(Q.indices, P.indices) and torch.equal(Q.values, P.values)
    bad = P.state_dict()
    bad["indices"] = bad["indices"].clone()
    bad["indices"][0, 1] = bad["indices"][0, 0]
    with pytest.raises(lspo.LspoError, match="duplicate"):
        SparseProjector.from_state_dict(bad)
    with pytest.raises(lspo.LspoError, match="missing key"):
        SparseProjector.from_state_dict({"indices": P.indices})


def test_bad_inputs_raise_named_errors():
    with pytest.raises(lspo.LspoError, match="d > n"):
        SparseProjector.random(10, 11, 2)
    with pytest.raises(lspo.LspoError, match="r > d"):
        SparseProjector.random(10, 4, 5)
    with pytest.raises(lspo.LspoError, match="r < 1"):
        SparseProjector.random(10, 4, 0)
    P, Q = SparseProjector.random(12, 4, 2), SparseProjector.random(10, 4, 2, seed=1)
    with pytest.raises(lspo.LspoError, match="G has sizes"):
        pj.compress(P, Q, torch.randn(10, 12))
    with pytest.raises(lspo.LspoError, match="tokens"):
        pj.compress_activations(P, Q, torch.randn(3, 12), torch.randn(4, 10))
    with pytest.raises(lspo.LspoError, match="floating"):
        pj.right_project(torch.ones(3, 12, dtype=torch.int32), P)
    with pytest.raises(lspo.LspoError, match="contiguous"):
        pj.apply_(torch.zeros(10, 12).T, P, Q, torch.randn(4, 4))
    with pytest.raises(lspo.LspoError, match="float32 or bfloat16"):
        pj.apply_(torch.zeros(12, 10, dtype=torch.float16), P, Q, torch.randn(4, 4))
    if torch.cuda.is_available():
        with pytest.raises(lspo.LspoError, match="is on"):
            pj.right_project(torch.randn(2, 12, device="cuda"), P)
