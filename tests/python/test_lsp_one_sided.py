"""LSPAdamW(one_sided=True): the larger side of each projected weight kept whole (an identity
projector, never learned, no whitening factor), the smaller one projected to the budget-matched k.
Against dense fp64 references: the step, the refit's moment carry; overlapped == serial with refits;
state_dict continuation."""
import pytest
import torch

import lspo
from lspo import _C

from test_lsp import Net, _params, _same, _train, adam_ref


def _budget_rank(m, n, d, r, whitened=True, dense=False):
    """Brute force of the rule in include/lspo/optim_core.h: the largest k in [r, min(m, n)] whose
    one-sided state bytes fit in the square layout's (dense: the projected side is a dense orthonormal
    basis with shared positions, 4 bytes an entry plus one row of k int32 positions, no whitening factor)."""
    w = 4 if whitened else 0
    dP, dQ = min(d, m), min(d, n)
    budget = 8 * dP * dQ + 8 * r * (m + n) + w * (dP * dP + dQ * dQ)
    big, small = max(m, n), min(m, n)
    side = (lambda k: 4 * k * small + 4 * k) if dense else (lambda k: 8 * r * small + w * k * k)
    ks = [k for k in range(r, small + 1) if 8 * big * k + 8 * big + side(k) <= budget]
    return max(ks) if ks else min(r, small)


@pytest.mark.parametrize("m,n,d,r,wh", [(384, 128, 64, 8, True), (128, 512, 64, 8, True), (37, 29, 8, 3, True),
                                        (1536, 576, 512, 8, True), (576, 576, 512, 8, False), (9, 9, 9, 9, True),
                                        (4097, 1, 1, 1, True)])
def test_one_sided_rank_matches_the_byte_budget(m, n, d, r, wh):
    assert _C.one_sided_rank(m, n, d, r, wh) == _budget_rank(m, n, d, r, wh)
    dP, dQ = min(d, m), min(d, n)
    assert _C.square_state_bytes(m, n, d, r, wh) == 8 * dP * dQ + 8 * r * (m + n) + (4 if wh else 0) * (dP**2 + dQ**2)


def test_matched_galore_rank_and_projectable_weights():
    from lspo import lsp
    shapes = [(384, 128), (128, 384), (512, 128)]
    k = lsp.matched_galore_rank(shapes, 64, 8)
    budget = sum(lsp.square_state_bytes(m, n, 64, 8) for m, n in shapes)
    per_rank = sum(4 * (2 * max(s) + min(s)) for s in shapes)
    assert abs(k * per_rank - budget) <= per_rank / 2  # the nearest rank
    net = torch.nn.Sequential(torch.nn.Embedding(50, 40), torch.nn.Linear(40, 64), torch.nn.Linear(64, 8))
    net[2].weight.requires_grad_(False)
    assert lsp.projectable_weights(net, 8) == [net[1].weight]  # not the embedding, not a frozen weight
    assert lsp.projectable_weights(net, 41) == []


@pytest.mark.parametrize("shape", [(37, 29), (29, 37)])
def test_layout_identity_on_the_larger_side(shape):
    W = torch.nn.Parameter(torch.randn(*shape))
    o = lspo.LSPAdamW([W], lr=1e-2, subspace=8, nnz=3, min_dim=8, refit_every=0, one_sided=True,
                      basis="sparse")
    P, Q = o.projectors(W)
    whole, proj = (P, Q) if shape[0] >= shape[1] else (Q, P)
    assert not whole.whitened and whole.d == max(shape) and whole.indices.shape == (max(shape), 1)
    assert torch.equal(whole.values, torch.ones(max(shape), 1))
    assert torch.equal(whole.indices.view(-1).long(), torch.arange(max(shape)))
    assert proj.whitened and proj.d == _C.one_sided_rank(*shape, 8, 3, True)
    W.grad = torch.randn(*shape)
    o.step()
    sd = o.state_dict()["state"][0]
    assert ("proj_P_whiten" in sd) == (shape[0] < shape[1]) and ("proj_Q_whiten" in sd) == (shape[0] >= shape[1])


# svd: a dense projected side (r = d = 25 >= 16: lspo's GEMM path, src/projector.cpp), no refit
@pytest.mark.parametrize("shape,basis,d", [((37, 29), "sparse", 8), ((29, 37), "sparse", 8), ((300, 64), "svd", 64)])
def test_one_sided_step_matches_dense_fp64_reference(shape, basis, d):
    torch.manual_seed(3)
    W = torch.nn.Parameter(torch.randn(*shape))
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    o = lspo.LSPAdamW([W], lr=lr, weight_decay=wd, subspace=d, nnz=3, min_dim=d, refit_every=0, one_sided=True,
                      basis=basis)
    P, Q = o.projectors(W)
    if basis == "svd":
        assert Q.r == Q.d >= 16
    Pd, Qd = P.dense(torch.float64), Q.dense(torch.float64)
    sc = _C.default_update_scale(basis)  # scale unset: 1.0 (sparse), 3.0 (svd)
    w = W.detach().double().clone()
    m = torch.zeros(P.d, Q.d, dtype=torch.float64)
    v = torch.zeros_like(m)
    for t in range(1, 4):
        G = torch.randn(*shape)
        W.grad = G.clone()
        o.step()
        m, v, u = adam_ref(m, v, Pd.T @ G.double() @ Qd, t, lr, b1, b2, eps)
        w = w * (1 - lr * wd) + sc * (Pd @ u @ Qd.T)
        # fp32 pipeline vs fp64: a few fp32 ulps of the update and of the weights (as the square layout)
        torch.testing.assert_close(W.detach().double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o.state[W]["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)


def test_one_sided_refit_learns_the_projected_side_and_carries_by_the_dense_formula():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(40, 26))  # rows kept whole, columns projected
    b1, b2 = 0.9, 0.999
    o = lspo.LSPAdamW([W], lr=1e-2, betas=(b1, b2), subspace=8, nnz=2, min_dim=8, refit_every=2,
                      refit_threshold=0.0, refit_iters=10, refit_drift=0.0, one_sided=True,
                      basis="sparse")
    U, V = torch.randn(40, 3), torch.randn(3, 26)
    W.grad = U @ V
    o.step()
    W.grad = U @ torch.randn(3, 26)
    o.step()
    M0, V0 = o.state[W]["exp_avg"].clone().double(), o.state[W]["exp_avg_sq"].clone().double()
    P0, Q0 = (x.clone() for x in o.projectors(W))
    G = torch.randn(40, 3) @ V + 0.01 * torch.randn(40, 26)
    W.grad = G.clone()
    o.step()  # step 3: a check (in-sample), kept, moments carried
    rec = o.refits[-1]
    assert rec["fitted"] and rec["kept"] and rec["heldout_after"] < rec["heldout_before"] <= 1.0 + 1e-5
    P1, Q1 = o.projectors(W)
    assert torch.equal(P1.values, P0.values) and torch.equal(P1.values, torch.ones(40, 1))  # never learned
    assert not torch.equal(Q1.values, Q0.values)
    # the closed-form held-out error of the kept projectors is the true projection error (in-sample)
    R = P1.dense(torch.float64) @ (P1.dense(torch.float64).T @ G.double() @ Q1.dense(torch.float64)) @ \
        Q1.dense(torch.float64).T
    e_true = ((R - G.double()).norm() / G.double().norm()).item()
    assert rec["heldout_after"] == pytest.approx(e_true, rel=1e-4)
    B = Q0.dense(torch.float64).T @ Q1.dense(torch.float64)
    S = G.double() @ Q1.dense(torch.float64)
    M_expect = b1 * (M0 @ B) + (1 - b1) * S
    V_expect = b2 * (V0 @ (B * B)) + (1 - b2) * S * S
    torch.testing.assert_close(o.state[W]["exp_avg"].double(), M_expect, rtol=1e-5,
                               atol=1e-6 * M_expect.abs().max().item())
    torch.testing.assert_close(o.state[W]["exp_avg_sq"].double(), V_expect, rtol=1e-5,
                               atol=1e-6 * V_expect.abs().max().item())


def _opt(m, **kw):
    args = dict(lr=1e-2, subspace=16, nnz=4, min_dim=16, refit_every=3, refit_threshold=0.0, refit_iters=5,
                one_sided=True)
    args.update(kw)
    return lspo.LSPAdamW(m, **args)


# svd (basis="svd", tests/python/test_lsp_svd.py): with 2 micro-batches, so checks fit on one and judge on the other
@pytest.mark.parametrize("basis,accum", [("sparse", 1), ("svd", 2)])
def test_one_sided_overlapped_equals_serial_bitwise_and_state_dict_continues(tmp_path, basis, accum):
    kw = dict(max_grad_norm=0.05, basis=basis)
    m1, m2 = Net(), Net()
    o1, o2 = _opt(m1, **kw), _opt(m2, overlap=False, **kw)
    _train(m1, o1, 8, accum=accum)
    _train(m2, o2, 8, accum=accum)
    assert _same(_params(m1), _params(m2)) and len(o1.refits) == 6
    assert basis == "sparse" or all(r["iters"] == 0 for r in o1.refits)  # the SVD basis runs no fit
    m = Net()
    o = _opt(m, **kw)
    _train(m, o, 5, accum=accum)
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, tmp_path / "c.pt")
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    m3 = Net(seed=9)
    m3.load_state_dict(ck["model"])
    o3 = _opt(m3, seed=5, **kw)
    o3.load_state_dict(ck["opt"])
    _train(m3, o3, 3, start=5, accum=accum)
    assert _same(_params(m3), _params(m1))
    # the other layout refuses the state (a square layout: other subspace sizes; the sparse basis:
    # other projector shapes)
    o4 = _opt(Net(), **(dict(one_sided=False) if basis == "sparse" else dict(basis="sparse")))
    with pytest.raises(Exception, match="subspace|whitened|sizes"):
        o4.load_state_dict(ck["opt"])
