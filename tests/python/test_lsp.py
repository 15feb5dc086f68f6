"""lspo.LSPAdamW: the LSP step against a dense fp64 reference, overlapped == serial (bitwise, with
refits and clipping), gradient accumulation, state_dict continuation, skips, AMP, module selection."""
import math
import warnings

import pytest
import torch

import lspo
from lspo import projector as lp

# the two-sided sparse layout (the paper's; LSPAdamW's default is one-sided SVD): the tests that read
# P and Q or build the dense reference from both sides pin it
SPARSE = dict(one_sided=False, basis="sparse")


class Net(torch.nn.Module):
    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(11, 24)
        self.a = torch.nn.Linear(24, 40)   # weight 40 x 24: projected (min_dim 16)
        self.b = torch.nn.Linear(40, 33)   # weight 33 x 40: projected
        self.head = torch.nn.Linear(33, 5)  # 5 x 33: too small, offloaded AdamW
        self.to(dtype)

    def forward(self, t):
        return self.head(torch.nn.functional.gelu(self.b(torch.tanh(self.a(self.emb(t))))))


def _batch(i, n=12):
    g = torch.Generator().manual_seed(500 + i)
    return torch.randint(0, 11, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)


def _loss(m, t, y):
    return torch.nn.functional.cross_entropy(m(t).float(), y)


def _opt(m, **kw):
    args = dict(lr=1e-2, subspace=16, nnz=4, min_dim=16, refit_every=0)
    args.update(kw)
    return lspo.LSPAdamW(m, **args)


def _train(m, o, steps, start=0, accum=1):
    for i in range(start, start + steps):
        for k in range(accum):
            t, y = _batch(i * accum + k if accum > 1 else i)
            (_loss(m, t, y) / accum).backward()
        o.step()
        o.zero_grad()


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_selection_projects_big_linear_weights_only():
    m = Net()
    o = _opt(m, **SPARSE)
    assert {id(p) for p in o.projected_params} == {id(m.a.weight), id(m.b.weight)}
    P, Q = o.projectors(m.a.weight)
    assert (P.n, P.d, P.r, Q.n, Q.d, Q.r) == (40, 16, 4, 24, 16, 4)
    # a parameter list: every 2-D tensor with both dims >= min_dim, the embedding (11 x 24) is too small
    o2 = lspo.LSPAdamW(list(Net().parameters()), subspace=16, nnz=4, min_dim=16)
    assert len(o2.projected_params) == 2
    # TinyGPT: tied embedding / lm_head stays dense, block matrices are projected
    g = lspo.tinygpt.TinyGPT(lspo.tinygpt.TinyGPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=16))
    o3 = lspo.LSPAdamW(g, subspace=32, nnz=4)
    names = {n for n, p in g.named_parameters() if any(p is q for q in o3.projected_params)}
    assert names == {f"blocks.{i}.{k}.weight" for i in range(2) for k in ("qkv", "proj", "fc", "fc_out")}


def adam_ref(m, v, S, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One fp64 Adam step on S: the new moments and the update u."""
    m = b1 * m + (1 - b1) * S
    v = b2 * v + (1 - b2) * S * S
    return m, v, -lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


def test_step_matches_dense_fp64_reference():
    # one layer, two steps, weight decay: W <- W (1 - lr wd) + P u Q^T with u from Adam on S = P^T G Q
    torch.manual_seed(3)
    W = torch.nn.Parameter(torch.randn(37, 29))
    o = lspo.LSPAdamW([W], lr=1e-2, weight_decay=0.1, subspace=8, nnz=3, min_dim=8, refit_every=0, **SPARSE)
    P, Q = o.projectors(W)
    assert P.whitened and Q.whitened  # the default: orthonormal bases U = P T
    sc = 1.0  # scale=1.0, the default (scale="auto" is tested below)
    Pd, Qd = P.dense(torch.float64), Q.dense(torch.float64)
    w = W.detach().double().clone()
    m = torch.zeros(8, 8, dtype=torch.float64)
    v = torch.zeros_like(m)
    b1, b2, lr, eps, wd = 0.9, 0.999, 1e-2, 1e-8, 0.1
    for t in range(1, 4):
        G = torch.randn(37, 29)
        W.grad = G.clone()
        o.step()
        m, v, u = adam_ref(m, v, Pd.T @ G.double() @ Qd, t, lr, b1, b2, eps)
        w = w * (1 - lr * wd) + sc * (Pd @ u @ Qd.T)
        # fp32 pipeline vs fp64: relative error a few fp32 ulps of the update and of the weights
        torch.testing.assert_close(W.detach().double(), w, rtol=1e-5, atol=1e-6)
    st = o.state[W]
    torch.testing.assert_close(st["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-9)


def test_overlapped_equals_serial_bitwise_with_refits_and_clipping():
    m1, m2 = Net(), Net()
    o1 = _opt(m1, refit_every=3, refit_threshold=0.0, refit_iters=5, max_grad_norm=0.05, weight_decay=0.01)
    o2 = _opt(m2, refit_every=3, refit_threshold=0.0, refit_iters=5, max_grad_norm=0.05, weight_decay=0.01,
              overlap=False)
    _train(m1, o1, 8)
    _train(m2, o2, 8)
    assert _same(_params(m1), _params(m2))
    assert len(o1.refits) == len(o2.refits) == 3 * 2  # steps 1, 4, 7 x two projected layers
    for r in o1.refits:
        assert r["heldout_after"] <= r["heldout_before"] <= 1.0 + 1e-5  # whitened: a true projection
    assert o1.refits[0]["fitted"]
    for p1, p2 in zip(o1.projected_params, o2.projected_params):
        assert torch.equal(o1.projectors(p1)[0].values, o2.projectors(p2)[0].values)


def test_refit_carries_state_by_the_dense_formula():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(30, 26))
    b1, b2 = 0.9, 0.999
    o = lspo.LSPAdamW([W], lr=1e-2, betas=(b1, b2), subspace=8, nnz=2, min_dim=8, refit_every=2,
                      refit_threshold=0.0, refit_iters=10, refit_drift=0.0, **SPARSE)
    # low-rank gradients: learning the values reduces the error
    U, V = torch.randn(30, 3), torch.randn(3, 26)
    W.grad = U @ V  # (assigned, not from backward: step() compresses it)
    o.step()
    P, Q = o.projectors(W)
    W.grad = U @ torch.randn(3, 26)
    o.step()  # step 2: no refit (refit steps: 1, 3, ...)
    M0, V0 = o.state[W]["exp_avg"].clone().double(), o.state[W]["exp_avg_sq"].clone().double()
    P0, Q0 = P.clone(), Q.clone()
    G = U @ torch.randn(3, 26)
    W.grad = G.clone()
    o.step()  # step 3: check on G (one micro-batch: in-sample), carry the moments, compress G, Adam
    rec = o.refits[-1]
    assert rec["step"] == 3 and rec["check"] == 2 and rec["fitted"] and rec["kept"]
    assert rec["heldout_after"] < rec["heldout_before"]
    P1, Q1 = o.projectors(W)
    assert not torch.equal(P1.values, P0.values)
    A = P1.dense(torch.float64).T @ P0.dense(torch.float64)
    B = Q0.dense(torch.float64).T @ Q1.dense(torch.float64)
    S = P1.dense(torch.float64).T @ G.double() @ Q1.dense(torch.float64)
    M_expect = b1 * (A @ M0 @ B) + (1 - b1) * S
    V_expect = b2 * ((A * A) @ V0 @ (B * B)) + (1 - b2) * S * S
    # fp32 products of d-term sums: errors of a few ulps of the largest magnitude (cancellation)
    torch.testing.assert_close(o.state[W]["exp_avg"].double(), M_expect, rtol=1e-5,
                               atol=1e-6 * M_expect.abs().max().item())
    torch.testing.assert_close(o.state[W]["exp_avg_sq"].double(), V_expect, rtol=1e-5,
                               atol=1e-6 * V_expect.abs().max().item())


def test_refit_step_compresses_the_whole_accumulated_gradient():
    # on a check step the committed S is compress(P', Q', sum of the micro-batch gradients) with the
    # projectors the check left: accumulation stays exact
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(30, 26))
    lr, eps = 1e-2, 1e-8
    o = lspo.LSPAdamW([W], lr=lr, subspace=8, nnz=2, min_dim=8, refit_every=1, refit_iters=20, eps=eps,
                      scale="auto", **SPARSE)
    U = torch.randn(30, 3)
    grads = [U @ torch.randn(3, 26) + 0.01 * torch.randn(30, 26) for _ in range(4)]
    w0 = W.detach().double().clone()
    for g in grads:  # four micro-batches through backward (the hook sends each to a check sum)
        (W * g).sum().backward()
        assert W.grad is None
    o.step()
    P, Q = o.projectors(W)
    S = lp.compress(P, Q, sum(grads)).double()
    u = -lr * S / (S.abs() + eps)  # Adam's first step
    sc = math.sqrt(30 * 26 / 64)  # scale="auto"
    ref = w0 + sc * (P.dense(torch.float64) @ u @ Q.dense(torch.float64).T)
    torch.testing.assert_close(W.detach().double(), ref, rtol=1e-5, atol=1e-5)
    assert o.refits[0]["kept"] and o.refits[0]["heldout_after"] < o.refits[0]["heldout_before"]


def test_gradient_accumulation_equals_big_batch():
    t, y = _batch(0, n=32)
    m1, m2 = Net(), Net()
    o1, o2 = _opt(m1), _opt(m2)
    for _ in range(3):
        for k in range(4):
            (_loss(m1, t[k * 8:(k + 1) * 8], y[k * 8:(k + 1) * 8]) / 4).backward()
        o1.step()
        o1.zero_grad()
        _loss(m2, t, y).backward()
        o2.step()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 summation order only


def test_zero_grad_discards_accumulated_compressed_gradient():
    m1, m2 = Net(), Net()
    o1, o2 = _opt(m1), _opt(m2)
    t, y = _batch(7)
    _loss(m1, t, y).backward()
    o1.zero_grad()  # a discarded batch
    _train(m1, o1, 3)
    _train(m2, o2, 3)
    assert _same(_params(m1), _params(m2))


def test_state_dict_roundtrip_continues_bitwise(tmp_path):
    kw = dict(weight_decay=0.05, refit_every=3, refit_threshold=0.0, refit_iters=5)
    m_ref = Net()
    o_ref = _opt(m_ref, **kw)
    _train(m_ref, o_ref, 8)
    m = Net()
    o = _opt(m, **kw)
    _train(m, o, 5)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, path)
    ck = torch.load(path, weights_only=True)
    m2 = Net(seed=9)
    m2.load_state_dict(ck["model"])
    o2 = _opt(m2, seed=123, **kw)  # other random projectors: the checkpoint's must win
    o2.load_state_dict(ck["opt"])
    _train(m2, o2, 3, start=5)
    assert _same(_params(m2), _params(m_ref))


def test_load_rejects_wrong_subspace():
    m = Net()
    o = _opt(m)
    _train(m, o, 1)
    sd = o.state_dict()
    with pytest.raises(ValueError, match="subspace"):
        _opt(Net(), subspace=8).load_state_dict(sd)


def test_nonfinite_projected_gradient_skips_everything():
    m = Net()
    o = _opt(m, refit_every=2, refit_threshold=0.0, refit_iters=3)
    _train(m, o, 2)
    before = _params(m)
    sd_before = o.state_dict()["state"]
    t, y = _batch(11)
    m.b.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
    _loss(m, t, y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        o.step()
    o.zero_grad()
    assert o.last_step_skipped and o.skipped_steps == 1
    assert _same(before, _params(m))
    after = o.state_dict()["state"]
    for k, v in sd_before.items():
        for n, x in v.items():  # step 3 is a refit step: layer a refitted, the skip undid it
            assert torch.equal(x, after[k][n]), (k, n)


def test_amp_scaler_step_works_and_unscale_is_rejected():
    m1, m2 = Net(), Net()
    o1, o2 = _opt(m1, max_grad_norm=1.0), _opt(m2, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i in range(4):
        t, y = _batch(i)
        scaler.scale(_loss(m1, t, y)).backward()
        scaler.step(o1)
        scaler.update()
        o1.zero_grad()
        _loss(m2, t, y).backward()
        o2.step()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # power-of-two scaling is exact
    t, y = _batch(9)
    scaler.scale(_loss(m1, t, y)).backward()
    scaler.unscale_(o1)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(o1)


def test_scheduler_and_hf_defaults():
    m = Net()
    o = _opt(m)
    sched = torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s)
    assert o.defaults["lr"] == 1e-2
    _train(m, o, 1)
    sched.step()
    assert o.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_bad_arguments():
    m = Net()
    with pytest.raises(ValueError, match="nnz"):
        lspo.LSPAdamW(m, subspace=4, nnz=8)
    with pytest.raises(ValueError, match="subspace"):
        lspo.LSPAdamW(m, subspace=0)
    with pytest.raises(ValueError, match="refit_every"):
        lspo.LSPAdamW(m, refit_every=-1)
    with pytest.raises(ValueError, match="cannot project"):
        lspo.LSPAdamW([{"params": [m.a.bias], "project": True}], subspace=8, nnz=4)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        lspo.LSPAdamW([torch.nn.Parameter(torch.zeros(32, 32, dtype=torch.float16))], subspace=8, nnz=2, min_dim=8)


def test_timeline_has_compress_adam_apply():
    import json

    m = Net()
    o = _opt(m, record_timeline=True, refit_every=5, refit_threshold=0.0, refit_iters=2)
    _train(m, o, 2)
    names = {e["name"] for e in json.loads(o.timeline_json())["traceEvents"] if e.get("ph") == "X"}
    assert {"compress", "adam", "apply", "refit", "d2h", "h2d", "step"} <= names


def test_wrapped_layers_never_form_the_dense_gradient():
    m1, m2 = Net(), Net()
    kw = dict(refit_every=2, refit_threshold=0.0, refit_iters=4, weight_decay=0.01)
    o1, o2 = _opt(m1, **kw), _opt(m2, **kw)
    assert o2.wrap(m2) == 2
    assert list(dict(m1.state_dict())) == list(dict(m2.state_dict()))
    for i in range(4):
        for m, o in ((m1, o1), (m2, o2)):
            t, y = _batch(i)
            _loss(m, t, y).backward()
            if m is m2:
                # never allocated, except on refit steps (1, 3: the check needs the dense sums; the hook
                # moves the gradient into them), so .grad is None after backward either way
                dense = i % 2 == 0
                assert m2.a.weight.grad is None and m2.b.weight.grad is None
                assert (o2._core.accumulated(o2._index[m2.a.weight]) is None) == dense
                assert m2.a.bias.grad is not None
            o.step()
            o.zero_grad()
    assert [r["step"] for r in o2.refits] == [r["step"] for r in o1.refits] == [1, 1, 3, 3]
    # same math, another fp32 summation order ((dY P)^T (X Q) instead of P^T (dY^T X) Q)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_wrapped_conv1d_layout():
    class Conv1D(torch.nn.Module):  # GPT-2's layout: weight [in, out], y = x W + b
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.1)
            self.bias = torch.nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)

    torch.manual_seed(0)
    c1 = Conv1D(36, 20)
    c2 = Conv1D(36, 20)
    c2.load_state_dict(c1.state_dict())
    o1 = lspo.LSPAdamW(c1, lr=1e-2, subspace=12, nnz=3, min_dim=12, refit_every=0)
    o2 = lspo.LSPAdamW(c2, lr=1e-2, subspace=12, nnz=3, min_dim=12, refit_every=0)
    assert o1.projected_params == [c1.weight] and o2.wrap(c2) == 1
    for i in range(3):
        x = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(i))
        for c, o in ((c1, o1), (c2, o2)):
            y = c(x)
            (y.square().mean()).backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(c1.weight, c2.weight, rtol=1e-4, atol=1e-5)


def test_staggered_refit_checks_hold_few_dense_sums():
    # refit_stagger: projected parameter k checks at steps 1 + k % refit_every, then every refit_every
    # steps, so at most ceil(layers / refit_every) layers hold dense check sums after a backward
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(24, 24) for _ in range(5)])
    o = lspo.LSPAdamW(layers, lr=1e-3, subspace=8, nnz=2, min_dim=8, refit_every=3, refit_stagger=True)
    ws = [m.weight for m in layers]
    checking = []
    for step in range(1, 8):
        layers(torch.randn(4, 24)).square().mean().backward()
        dense = [o._core.accumulated(o._index[w]) is None for w in ws]  # sums, no S yet: a check step
        assert sum(dense) <= 2  # ceil(5 / 3)
        checking.append(dense)
        o.step()
        o.zero_grad()
    for k in range(5):  # layer k: steps 1 + k % 3 + 3 j
        assert [t for t in range(1, 8) if checking[t - 1][k]] == [t for t in range(1, 8) if (t - 1 - k % 3) % 3 == 0]
    assert {(r["step"], r["param"].split(":")[0]) for r in o.refits} == \
        {(t, f"lsp{k}") for k in range(5) for t in range(1, 8) if (t - 1 - k % 3) % 3 == 0}


def test_state_of_the_sparse_layout_loads_only_into_that_layout():
    # a state_dict of the paper's layout (the default before the one-sided SVD one) names the options
    # that load it when given to a default optimizer, and loads into one built with them
    m = Net()
    o = _opt(m, **SPARSE)
    _train(m, o, 2)
    sd = o.state_dict()
    with pytest.raises(ValueError, match='one_sided=False, basis="sparse"'):
        _opt(Net()).load_state_dict(sd)
    m2 = Net()
    o2 = _opt(m2, **SPARSE)
    o2.load_state_dict(sd)
    assert torch.equal(o2.state[m2.a.weight]["exp_avg"], o.state[m.a.weight]["exp_avg"])
