"""Whitened projectors and the refit check from Python: state_dict round trip with
torch.load(weights_only=True), the orthonormal basis, refit (keep / drop, moments carried in place)."""
import math

import pytest
import torch

import lspo
from lspo import projector as lp


def test_whitened_roundtrip_and_orthonormal_basis(tmp_path):
    P = lspo.SparseProjector.random(50, 10, 3, seed=7, whitened=True)
    assert P.whitened and P.whiten.shape == (10, 10)
    U = P.dense(torch.float64)
    torch.testing.assert_close(U.T @ U, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-5)
    path = tmp_path / "p.pt"
    torch.save(P.state_dict(), path)
    P2 = lspo.SparseProjector.from_state_dict(torch.load(path, weights_only=True))
    assert P2.whitened and torch.equal(P2.whiten, P.whiten) and torch.equal(P2.values, P.values)
    # scale-correct init: values of RMS sqrt(d / (n r))
    big = lspo.SparseProjector.random(3000, 40, 8, seed=1)
    assert float(big.values.std()) == pytest.approx(math.sqrt(40 / (3000 * 8)), rel=0.03)
    # whiten_ is in place when the factor exists (holders of the tensor see the new one)
    t = P.whiten
    P.values.mul_(2.0)
    P.whiten_()
    assert P.whiten is t
    torch.testing.assert_close(P.dense(torch.float64), U, rtol=0, atol=1e-5)  # same basis at any scale


def test_projection_error_at_most_one():
    torch.manual_seed(0)
    P = lspo.SparseProjector.random(64, 16, 4, seed=1, whitened=True)
    Q = lspo.SparseProjector.random(48, 16, 4, seed=2, whitened=True)
    for _ in range(3):
        assert lp.relative_error(P, Q, [torch.randn(64, 48)]) <= 1.0 + 1e-5
    Pu = lspo.SparseProjector.random(64, 16, 4, seed=1)
    with pytest.raises(lspo.LspoError, match="both be whitened"):
        lp.fit(Pu, Q, [torch.randn(64, 48)])


def test_refit_keeps_improvements_and_carries_moments_in_place():
    torch.manual_seed(2)
    A, B = torch.randn(60, 3), torch.randn(3, 44)
    fit = [A @ torch.randn(3, 3) @ B + 0.05 * torch.randn(60, 44)]
    held = [A @ torch.randn(3, 3) @ B + 0.05 * torch.randn(60, 44)]
    P = lspo.SparseProjector.random(60, 12, 4, seed=1, whitened=True)
    Q = lspo.SparseProjector.random(44, 12, 4, seed=2, whitened=True)
    P0, Q0 = P.clone(), Q.clone()
    M, V = torch.randn(12, 12), torch.rand(12, 12)
    Mref, Vref = lp.carry_state(P0, Q0, P0, Q0, M.clone(), V.clone())  # identity map (whitened)
    torch.testing.assert_close(Mref, M, rtol=0, atol=1e-4)
    ptr = M.data_ptr()
    r = lp.refit(P, Q, fit, held, iters=60, M=M, V=V)
    assert r["fitted"] and r["kept"] and r["heldout_after"] < 0.7 * r["heldout_before"]
    assert r["heldout_after"] == pytest.approx(lp.relative_error(P, Q, held), abs=1e-4)
    assert M.data_ptr() == ptr
    Mc, Vc = lp.carry_state(P0, Q0, P, Q, Mref.clone(), Vref.clone())
    torch.testing.assert_close(M, Mc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(V, Vc, rtol=1e-4, atol=1e-5)
    # drift rule: no fit while the held-out error stays within (1 + drift) of the reference
    r2 = lp.refit(P, Q, fit, held, reference_error=r["reference_error"])
    assert not r2["fitted"] and r2["iters"] == 0
    with pytest.raises(lspo.LspoError, match="reinit"):
        lp.refit(P, Q, fit, held, reinit="sometimes")
