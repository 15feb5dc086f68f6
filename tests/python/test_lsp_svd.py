"""LSPAdamW(basis="svd"): dense projected sides set, at each kept refit check, to the leading singular
directions of the check's summed gradient. Against fp64 references: the byte budget, the basis a check
leaves (and the moment carry); accumulation over micro-batches checks on the whole step's gradient;
bad input. (The step against fp64 Adam through the dense GEMM path, overlapped == serial and
state_dict continuation: test_lsp_one_sided.py, parametrised over the basis.)"""
import pytest
import torch

import lspo
from lspo import _C

from test_lsp import Net
from test_lsp_one_sided import _budget_rank


@pytest.mark.parametrize("m,n,d,r,wh", [(384, 128, 64, 8, True), (128, 512, 64, 8, True), (37, 29, 8, 3, True),
                                        (1536, 576, 512, 8, True), (576, 576, 512, 8, False), (9, 9, 9, 9, True)])
def test_one_sided_rank_dense_matches_the_byte_budget(m, n, d, r, wh):
    assert _C.one_sided_rank(m, n, d, r, wh, True) == _budget_rank(m, n, d, r, wh, dense=True)


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
    # dense: every column in every row, orthonormal, positions shared (one row of k int32), no factor
    assert proj.d == k and proj.r == k and not proj.whitened and proj.shared_positions
    assert proj.indices.untyped_storage().nbytes() == 4 * k
    torch.testing.assert_close(proj.values.double().T @ proj.values.double(), torch.eye(k, dtype=torch.float64),
                               rtol=0, atol=1e-5)
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


def test_accumulated_micro_batches_check_on_the_whole_step():
    """With micro-batches, the basis comes from the fit half (even micro-batches) and the step's S is the
    compression of the whole accumulated gradient with the basis the check left."""
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(30, 20))
    o = lspo.LSPAdamW([W], lr=1e-2, subspace=8, nnz=2, min_dim=8, refit_every=1, refit_drift=0.0, one_sided=True,
                      basis="svd", overlap=False)
    # a shared low-rank part, so the fit half's basis also wins on the held-out half (the check keeps it)
    common = 3 * torch.randn(30, 5) @ torch.randn(5, 20)
    gs = [common + torch.randn(30, 20) for _ in range(4)]
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


def test_bad_basis_is_named():
    with pytest.raises(ValueError, match="basis must be 'sparse' or 'svd'"):
        lspo.LSPAdamW(Net(), basis="dense")


def test_state_dict_keeps_the_shared_positions_through_torch_save(tmp_path):
    """torch.save stores the one row of an expanded view: a saved LSPAdamW(basis="svd") state holds k
    positions per dense side, and loads back (weights_only) into an optimizer that continues bitwise."""
    torch.manual_seed(2)
    W = torch.nn.Parameter(torch.randn(40, 26))
    kw = dict(lr=1e-2, subspace=8, nnz=2, min_dim=8, refit_every=2, one_sided=True, basis="svd")
    o = lspo.LSPAdamW([W], **kw)
    for _ in range(3):
        W.grad = torch.randn(40, 26)
        o.step()
    path = tmp_path / "opt.pt"
    torch.save(o.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    st = sd["state"][0]
    k = o.projectors(W)[1].d
    assert st["proj_Q_indices"].stride() == (0, 1)
    assert st["proj_Q_indices"].untyped_storage().nbytes() == 4 * k
    W2 = torch.nn.Parameter(W.detach().clone())
    o2 = lspo.LSPAdamW([W2], **kw)
    o2.load_state_dict(sd)
    assert o2.projectors(W2)[1].shared_positions
    for _ in range(2):
        g = torch.randn(40, 26)
        W.grad, W2.grad = g.clone(), g.clone()
        o.step()
        o2.step()
    assert torch.equal(W, W2)


def test_dense_basis_projector_in_python():
    P = lspo.SparseProjector.dense_basis(33, 6, seed=1)
    assert P.shared_positions and not P.whitened and (P.n, P.d, P.r) == (33, 6, 6)
    torch.testing.assert_close(P.dense().double().T @ P.dense().double(), torch.eye(6, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    assert torch.equal(P.dense(), P.values) and P.dense().data_ptr() != P.values.data_ptr()
    Q = P.to("cpu")
    assert Q.shared_positions
    G = torch.randn(33, 4)
    torch.testing.assert_close(lspo.projector.left_project(P, G).double(), P.values.double().T @ G.double())
    R = lspo.SparseProjector.from_state_dict(P.state_dict())  # validated
    assert R.shared_positions


def test_unset_scale_is_the_basis_default():
    """scale unset: 3.0 with basis="svd" (its measured lr rule), 1.0 with "sparse"; an explicit scale wins."""
    assert (_C.default_update_scale("sparse"), _C.default_update_scale("svd")) == (1.0, 3.0)
    torch.manual_seed(4)
    W0, G = torch.randn(40, 26), torch.randn(40, 26)
    deltas = {}
    for name, kw in {"unset": {}, "3.0": {"scale": 3.0}, "1.0": {"scale": 1.0}}.items():
        W = torch.nn.Parameter(W0.clone())
        o = lspo.LSPAdamW([W], lr=1e-2, subspace=8, nnz=2, min_dim=8, refit_every=0, one_sided=True, basis="svd", **kw)
        W.grad = G.clone()
        o.step()
        deltas[name] = (W.detach() - W0).double()
    assert torch.equal(deltas["unset"], deltas["3.0"])
    # W is fp32: each delta carries W's rounding, about an ulp of |W| (<= 2.4e-7 here)
    ulp = torch.finfo(torch.float32).eps * W0.abs().max().item()
    torch.testing.assert_close(deltas["3.0"], 3 * deltas["1.0"], rtol=0, atol=4 * ulp)
    with pytest.raises(ValueError, match="scale must be None, 'auto' or a finite number > 0"):
        lspo.LSPAdamW(Net(), scale=0.0)
