"""LSPAdamW(basis="svd"): dense projected sides set, at each kept refit check, to the leading singular
directions of the check's summed gradient. Against fp64 references: the byte budget, the basis a check
leaves (and the moment carry), the step through the dense (GEMM) path; accumulation over micro-batches
checks on the whole step's gradient; overlapped == serial bitwise; state_dict continuation; bad input."""
import pytest
import torch

import lspo
from lspo import _C

from test_lsp import Net, _params, _same, _train, adam_ref


def _budget_rank_dense(m, n, d, r, whitened=True):
    """Brute force of one_sided_rank(dense=True): the projector's ELL holds k entries per row."""
    w = 4 if whitened else 0
    dP, dQ = min(d, m), min(d, n)
    budget = 8 * dP * dQ + 8 * r * (m + n) + w * (dP * dP + dQ * dQ)
    big, small = max(m, n), min(m, n)
    ks = [k for k in range(r, small + 1) if 8 * big * k + 8 * big + 8 * k * small + w * k * k <= budget]
    return max(ks) if ks else min(r, small)


@pytest.mark.parametrize("m,n,d,r,wh", [(384, 128, 64, 8, True), (128, 512, 64, 8, True), (37, 29, 8, 3, True),
                                        (1536, 576, 512, 8, True), (576, 576, 512, 8, False), (9, 9, 9, 9, True)])
def test_one_sided_rank_dense_matches_the_byte_budget(m, n, d, r, wh):
    assert _C.one_sided_rank(m, n, d, r, wh, True) == _budget_rank_dense(m, n, d, r, wh)
    assert _C.one_sided_rank(m, n, d, r, wh, True) <= _C.one_sided_rank(m, n, d, r, wh, False)


def _sub_gap(A, B):  # distance between the column spans of two orthonormal bases
    A, B = A.double(), B.double()
    return (A @ A.T - B @ B.T).norm().item()


@pytest.mark.parametrize("shape", [(40, 26), (26, 40)])
def test_check_sets_the_top_singular_directions_and_carries_moments(shape):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(*shape))
    b1, b2 = 0.9, 0.999
    o = lspo.LSPAdamW([W], lr=1e-2, betas=(b1, b2), subspace=8, nnz=2, min_dim=8, refit_every=2, refit_drift=0.0,
                      one_sided=True, basis="svd")
    P, Q = o.projectors(W)
    whole, proj = (P, Q) if shape[0] >= shape[1] else (Q, P)
    k = _C.one_sided_rank(*shape, 8, 2, True, True)
    assert proj.d == k and proj.r == k and proj.whitened  # dense: every column in every row
    assert whole.d == max(shape) and whole.r == 1 and not whole.whitened
    for t in range(1, 4):
        G = torch.randn(*shape)
        if t == 3:
            M0, V0 = o.state[W]["exp_avg"].double().clone(), o.state[W]["exp_avg_sq"].double().clone()
            U0 = proj.dense(torch.float64)
        W.grad = G.clone()
        o.step()  # checks at steps 1 and 3 (one micro-batch: the held-out sum is the fit sum)
        rec = o.refits[-1]
        if t in (1, 3):
            assert rec["fitted"] and rec["kept"] and rec["iters"] == 0
            P, Q = o.projectors(W)
            proj = Q if shape[0] >= shape[1] else P
            Ug, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
            ref = Vh[:k].T if shape[0] >= shape[1] else Ug[:, :k]
            assert _sub_gap(proj.dense(torch.float64), ref) < 1e-4
            e = (1 - (s[:k] ** 2).sum() / (s ** 2).sum()).sqrt().item()
            assert rec["heldout_after"] == pytest.approx(e, rel=1e-4, abs=1e-6)
    # the moments of step 2 carried into step 3's basis, then step 3's Adam update (dense formula)
    U1 = proj.dense(torch.float64)
    B = U0.T @ U1
    S = G.double() @ U1 if shape[0] >= shape[1] else U1.T @ G.double()
    M_expect = b1 * (M0 @ B if shape[0] >= shape[1] else B.T @ M0) + (1 - b1) * S
    V_expect = b2 * (V0 @ (B * B) if shape[0] >= shape[1] else (B * B).T @ V0) + (1 - b2) * S * S
    torch.testing.assert_close(o.state[W]["exp_avg"].double(), M_expect, rtol=1e-5,
                               atol=1e-6 * M_expect.abs().max().item())
    torch.testing.assert_close(o.state[W]["exp_avg_sq"].double(), V_expect, rtol=1e-5,
                               atol=1e-6 * V_expect.abs().max().item())


def test_svd_step_matches_dense_fp64_reference():
    """No refit: the dense projected side (k >= 16, the GEMM path) against fp64 Adam in its subspace."""
    torch.manual_seed(3)
    W = torch.nn.Parameter(torch.randn(300, 64))
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    o = lspo.LSPAdamW([W], lr=lr, weight_decay=wd, subspace=64, nnz=4, min_dim=64, refit_every=0, one_sided=True,
                      basis="svd")
    P, Q = o.projectors(W)
    assert Q.r == Q.d >= 16
    Pd, Qd = P.dense(torch.float64), Q.dense(torch.float64)
    w = W.detach().double().clone()
    m = torch.zeros(P.d, Q.d, dtype=torch.float64)
    v = torch.zeros_like(m)
    for t in range(1, 4):
        G = torch.randn(300, 64)
        W.grad = G.clone()
        o.step()
        m, v, u = adam_ref(m, v, Pd.T @ G.double() @ Qd, t, lr, b1, b2, eps)
        w = w * (1 - lr * wd) + Pd @ u @ Qd.T
        torch.testing.assert_close(W.detach().double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o.state[W]["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)


def test_accumulated_micro_batches_check_on_the_whole_step():
    """With micro-batches, the basis comes from the fit half (even micro-batches) and the step's S is the
    compression of the whole accumulated gradient with the basis the check left."""
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(30, 20))
    o = lspo.LSPAdamW([W], lr=1e-2, subspace=8, nnz=2, min_dim=8, refit_every=1, refit_drift=0.0, one_sided=True,
                      basis="svd", overlap=False)
    gs = [torch.randn(30, 20) for _ in range(4)]
    for g in gs:  # four micro-batches, each delivered by backward (the gradient hook): dW = g
        (W * g).sum().backward()
    o.step()
    P, Q = o.projectors(W)
    k = Q.d
    fit = (gs[0] + gs[2]).double()
    Vh = torch.linalg.svd(fit, full_matrices=False)[2]
    assert _sub_gap(Q.dense(torch.float64), Vh[:k].T) < 1e-4
    S = sum(gs).double() @ Q.dense(torch.float64)
    # Adam's first step: m = (1 - b1) S, so the committed exp_avg is 0.1 S
    torch.testing.assert_close(o.state[W]["exp_avg"].double(), 0.1 * S, rtol=1e-5, atol=1e-6)


def _opt(m, **kw):
    args = dict(lr=1e-2, subspace=16, nnz=4, min_dim=16, refit_every=3, refit_threshold=0.0, one_sided=True,
                basis="svd")
    args.update(kw)
    return lspo.LSPAdamW(m, **args)


def test_svd_overlapped_equals_serial_bitwise_and_state_dict_continues(tmp_path):
    m1, m2 = Net(), Net()
    o1, o2 = _opt(m1, max_grad_norm=0.05), _opt(m2, max_grad_norm=0.05, overlap=False)
    _train(m1, o1, 8, accum=2)
    _train(m2, o2, 8, accum=2)
    assert _same(_params(m1), _params(m2)) and len(o1.refits) == 6 and all(r["iters"] == 0 for r in o1.refits)
    m = Net()
    o = _opt(m, max_grad_norm=0.05)
    _train(m, o, 5, accum=2)
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, tmp_path / "c.pt")
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    m3 = Net(seed=9)
    m3.load_state_dict(ck["model"])
    o3 = _opt(m3, seed=5, max_grad_norm=0.05)
    o3.load_state_dict(ck["opt"])
    _train(m3, o3, 3, start=5, accum=2)
    assert _same(_params(m3), _params(m1))
    # the sparse basis has other projector shapes: its optimizer refuses this state
    with pytest.raises(Exception, match="subspace|indices|whitened|sizes"):
        _opt(Net(), basis="sparse").load_state_dict(ck["opt"])


def test_bad_basis_is_named():
    with pytest.raises(ValueError, match="basis must be 'sparse' or 'svd'"):
        lspo.LSPAdamW(Net(), basis="dense")
