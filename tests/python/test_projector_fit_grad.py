"""lspo.projector.fit against a plain PyTorch re-implementation of the same algorithm (dense P, Q built
from the values, autograd through dense matmuls, torch.optim.Adam, best-seen values kept): both must
follow the same trajectory, which checks the hand-written backward of fit's sparse P^T Y (values and Y
gradients) on dense G samples and on (X, dY) samples, at awkward sizes, for plain and whitened
projectors (whitened: U = P L^-T with P^T P = L L^T, here by torch's fp64 Cholesky). fit's Adam runs on
the values divided by their starting RMS s: the reference runs Adam on the values with lr * s."""
import pytest
import torch

import lspo
from lspo import projector as pj


def dense(idx, val, d):
    return torch.zeros(idx.shape[0], d, dtype=val.dtype).scatter(1, idx.long(), val)


def basis(Pd, whitened):
    if not whitened:
        return Pd
    L = torch.linalg.cholesky(Pd.t() @ Pd)
    return torch.linalg.solve_triangular(L, Pd.t(), upper=False).t()  # P L^-T


def reference_fit(P, Q, samples, lr, iters, whitened=False):
    """Mean over samples of e = ||U U^T G V V^T - G|| / ||G||, minimised by Adam over the values."""
    pv = P.values.clone().double().requires_grad_(True)
    qv = Q.values.clone().double().requires_grad_(True)
    sp, sq = float(P.values.square().mean().sqrt()), float(Q.values.square().mean().sqrt())
    Gs = [(s[0].double().t() @ s[1].double()) if isinstance(s, tuple) else s.double() for s in samples]
    opt = torch.optim.Adam([{"params": [pv], "lr": lr * sp}, {"params": [qv], "lr": lr * sq}], lr=lr, foreach=False,
                           eps=1e-8 * min(sp, sq))
    best, best_p, best_q, first = float("inf"), None, None, None
    for it in range(iters + 1):
        opt.zero_grad()
        Pd, Qd = basis(dense(P.indices, pv, P.d), whitened), basis(dense(Q.indices, qv, Q.d), whitened)
        e = sum((Pd @ (Pd.t() @ G @ Qd) @ Qd.t() - G).norm() / G.norm() for G in Gs) / len(Gs)
        if it == 0:
            first = float(e.detach())
        if float(e.detach()) < best:
            best, best_p, best_q = float(e.detach()), pv.detach().clone(), qv.detach().clone()
        if it == iters:
            break
        e.backward()
        opt.step()
    return first, best, best_p.float(), best_q.float()


@pytest.mark.parametrize("whitened", [False, True], ids=["plain", "whitened"])
@pytest.mark.parametrize("kind", ["dense", "pairs"])
@pytest.mark.parametrize("m,n,d,r", [(37, 29, 8, 3), (64, 33, 16, 4), (5, 1, 1, 1)])
def test_fit_follows_reference_adam(kind, m, n, d, r, whitened):
    g = torch.Generator().manual_seed(m * 100 + n)
    if kind == "dense":
        U, V = torch.randn(m, 2, generator=g), torch.randn(2, n, generator=g)
        samples = [U @ V + 0.1 * torch.randn(m, n, generator=g) for _ in range(3)]
    else:
        samples = [(torch.randn(7, m, generator=g), torch.randn(7, n, generator=g)) for _ in range(2)]
    P = lspo.SparseProjector.random(m, d, r, seed=1, whitened=whitened)
    Q = lspo.SparseProjector.random(n, d, r, seed=2, whitened=whitened)
    P0, Q0 = P.values.clone(), Q.values.clone()
    iters = 12
    first, best, best_p, best_q = reference_fit(P, Q, samples, lr=0.05, iters=iters, whitened=whitened)
    res = pj.fit(P, Q, samples, lr=0.05, max_iters=iters)
    assert res["iters"] == iters
    # fit evaluates e in closed form in fp32/fp64; the reference in fp64 with an explicit m x n residual
    assert res["error_before"] == pytest.approx(first, rel=1e-4, abs=1e-5)
    assert res["error_after"] == pytest.approx(best, rel=1e-3, abs=1e-4)
    if best < first - 1e-3:  # the trajectories moved: the learned values must agree too
        if whitened:  # the objective only sees the bases (values up to a per-column scale): compare U, V
            for Pr, bv in ((P, best_p), (Q, best_q)):
                ref = basis(dense(Pr.indices, bv.double(), Pr.d), True)
                torch.testing.assert_close(Pr.dense(torch.float64), ref, rtol=0, atol=0.05 * 0.05)
        else:  # Adam steps of lr * s: agreement to a few percent of one step
            sp, sq = float(P0.square().mean().sqrt()), float(Q0.square().mean().sqrt())
            torch.testing.assert_close(P.values, best_p, rtol=0, atol=0.05 * 0.05 * sp + 1e-6)
            torch.testing.assert_close(Q.values, best_q, rtol=0, atol=0.05 * 0.05 * sq + 1e-6)
        assert not torch.equal(P.values, P0) or not torch.equal(Q.values, Q0)
