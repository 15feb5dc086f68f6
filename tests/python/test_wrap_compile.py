"""lspo.wrap (the compressed-gradient layers) under torch.compile, torch.autocast and
torch.utils.checkpoint, and compiled training steps that call opt.step().

Most compiled runs use the "aot_eager" backend: it runs Dynamo, fake tensors and AOTAutograd (where
the wrap path's tracing problems live) without Inductor's C++ code generation, which takes minutes
on a small machine; one test compiles with Inductor."""
import pytest
import torch

import lspo
from lspo import projector as lp
from lspo.wrap import wrap_linear


# ---------------------------------------------------------------- a stand-in optimizer: the interface only
class _Handle:
    """What wrap.py may use of a layer: P, Q, dense_this_step(), accept(S)."""

    def __init__(self, P, Q):
        self.P, self.Q = P, Q
        self.dense = False
        self.S = []

    def dense_this_step(self):
        return self.dense

    def accept(self, S):
        self.S.append(S.clone())


class _InterfaceOpt:
    def __init__(self, model, d=8, r=2):
        self.projected_params = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)
                                 and min(m.weight.shape) >= d]
        self.handles = {}
        for i, w in enumerate(self.projected_params):
            P = lp.SparseProjector.random(w.shape[0], d, r, seed=2 * i)
            Q = lp.SparseProjector.random(w.shape[1], d, r, seed=2 * i + 1)
            self.handles[id(w)] = _Handle(P, Q)

    def _layer(self, w):
        return self.handles[id(w)]


class TwoSame(torch.nn.Module):
    """Two projected layers of the same shape (distinct weights), then one of another shape."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(24, 24)
        self.b = torch.nn.Linear(24, 24)
        self.c = torch.nn.Linear(24, 12)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _x(seed, shape=(3, 5, 24)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference_S(model, opt, x):
    """S = P^T G Q of every projected layer, from the dense gradients of an unwrapped copy."""
    ref = TwoSame()
    ref.load_state_dict(model.state_dict())
    ref(x).square().mean().backward()
    out = []
    for w_ref, w in zip([ref.a.weight, ref.b.weight, ref.c.weight], opt.projected_params):
        h = opt._layer(w)
        out.append(lp.compress(h.P, h.Q, w_ref.grad))
    return out


def test_two_same_shape_layers_compiled_equals_eager_outputs_and_S():
    torch._dynamo.reset()
    eager, comp = TwoSame(), TwoSame()
    oe, oc = _InterfaceOpt(eager), _InterfaceOpt(comp)
    assert wrap_linear(eager, oe) == 3 and wrap_linear(comp, oc) == 3
    assert not torch.equal(eager.a.weight, eager.b.weight)
    f = torch.compile(comp, backend="aot_eager", fullgraph=True)
    for i in range(2):
        x = _x(i)
        ye, yc = eager(x), f(x)
        # the reference: the plain model (wrapping changes no forward math)
        with torch.no_grad():
            plain = TwoSame()
            plain.load_state_dict(eager.state_dict())
            torch.testing.assert_close(ye, plain(x), rtol=0, atol=0)
        torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
        ye.square().mean().backward()
        yc.square().mean().backward()
        ref = _reference_S(eager, oe, x)
        for w_e, w_c, r in zip(oe.projected_params, oc.projected_params, ref):
            Se, Sc = oe._layer(w_e).S[-1], oc._layer(w_c).S[-1]
            assert len(oe._layer(w_e).S) == len(oc._layer(w_c).S) == i + 1
            torch.testing.assert_close(Se, r, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(Sc, Se, rtol=1e-5, atol=1e-6)
            assert w_e.grad is None and w_c.grad is None
    # the two same-shape layers received different S (their weights differ)
    assert not torch.allclose(oc._layer(comp.a.weight).S[-1], oc._layer(comp.b.weight).S[-1])


def test_same_shape_layers_compiled_one_by_one_share_a_graph():
    """Per-layer torch.compile (as for repeated blocks): layers of one shape reuse one compiled graph
    (the layer is a tensor input, not a constant Dynamo specialises on), and each gets its own S."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = TwoSame()
    o = _InterfaceOpt(m)
    wrap_linear(m, o)
    cnt = CompileCounterWithBackend("aot_eager")
    a, b = torch.compile(m.a, backend=cnt), torch.compile(m.b, backend=cnt)
    x = _x(0)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, torch.nn.functional.linear(x, m.b.weight, m.b.bias), rtol=1e-6, atol=1e-6)
    (ya.square().sum() + yb.square().sum()).backward()
    assert cnt.frame_count == 1
    for lin, y in ((m.a, ya), (m.b, yb)):
        h = o._layer(lin.weight)
        G = (2 * y.detach()).reshape(-1, 24).t() @ x.reshape(-1, 24)  # dL/dW = dY^T X
        assert len(h.S) == 1
        torch.testing.assert_close(h.S[0], lp.compress(h.P, h.Q, G), rtol=1e-4, atol=1e-5)


def test_dense_step_runs_the_plain_layer_compiled():
    torch._dynamo.reset()
    m = TwoSame()
    o = _InterfaceOpt(m)
    wrap_linear(m, o)
    f = torch.compile(m, backend="aot_eager", fullgraph=True)
    f(_x(0)).sum().backward()
    assert all(p.grad is None for p in o.projected_params)
    for h in o.handles.values():
        h.dense = True
    x = _x(1)
    f(x).square().mean().backward()  # a refit step: another compiled variant, dense gradients
    plain = TwoSame()
    plain.load_state_dict(m.state_dict())
    plain(x).square().mean().backward()
    for w, w_ref in zip(o.projected_params, [plain.a.weight, plain.b.weight, plain.c.weight]):
        torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-7)
        assert len(o._layer(w).S) == 1  # nothing accepted on the dense step


def test_compiled_wrap_shows_lspo_ops_in_profiler():
    torch._dynamo.reset()
    m = TwoSame()
    wrap_linear(m, _InterfaceOpt(m))
    f = torch.compile(m, backend="aot_eager")
    f(_x(0)).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        f(_x(1)).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"lspo::right_project", "lspo::project_grad_output", "lspo::accept_compressed"} <= names, names


def test_wrap_inductor_compile_matches_eager():
    """Inductor (C++ code generation) with the lspo operators; one layer, to keep the compile short."""
    torch._dynamo.reset()
    import torch._inductor.config as inductor_config
    # Inductor probes the CPU's vector ISAs once per process, each by building a test library and
    # loading it in a fresh Python process (~2.5 s each: torch's import; 6 probes, 15 of this test's
    # 20 s here). vec_isa_ok=True takes the base ISAs (AVX2, AVX-512, ...) from /proc/cpuinfo instead
    # (3 probes left: the bf16 and VNNI extensions): the same kernels when the probes pass; when the
    # compiler cannot build that ISA the compile fails here instead of falling back to a narrower one.
    with inductor_config.patch({"cpp.vec_isa_ok": True}):
        _inductor_matches_eager()


def _inductor_matches_eager():
    eager, comp = TwoSame(), TwoSame()
    oe, oc = _InterfaceOpt(eager), _InterfaceOpt(comp)
    wrap_linear(eager, oe)
    wrap_linear(comp, oc)
    f = torch.compile(comp.b)  # Inductor
    x = _x(3)
    ye, yc = eager.b(x), f(x)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    ye.square().mean().backward()
    yc.square().mean().backward()
    torch.testing.assert_close(comp.b.bias.grad, eager.b.bias.grad, rtol=1e-5, atol=1e-7)
    Se, Sc = oe._layer(eager.b.weight).S, oc._layer(comp.b.weight).S
    assert len(Se) == len(Sc) == 1
    torch.testing.assert_close(Sc[0], Se[0], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- with LSPAdamW
def _lsp(m, **kw):
    args = dict(lr=1e-2, subspace=8, nnz=2, min_dim=8, refit_every=2, refit_threshold=0.0, refit_iters=3)
    args.update(kw)
    return lspo.LSPAdamW(m, **args)


def test_autocast_bf16_wrapped_backward_matches_plain():
    """Under CPU autocast the layer computes in bf16 while x and W are fp32: backward must not mix
    them (it crashed), and dX, db and S must be what autocast's own linear gives."""
    m1, m2 = TwoSame(), TwoSame()
    o2 = _InterfaceOpt(m2)
    assert wrap_linear(m2, o2) == 3
    x = _x(0).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y1, y2 = m1(x), m2(x2)
    assert y2.dtype == torch.bfloat16
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    y1.float().square().mean().backward()
    y2.float().square().mean().backward()
    assert x2.grad.dtype == torch.float32 and m2.c.bias.grad.dtype == torch.float32
    # both compute dX and db from bf16 dY and bf16 W (autocast's casts); the kernels may sum in
    # another order: a few bf16 ulps (2^-8 relative each)
    torch.testing.assert_close(x2.grad, x.grad, rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(m2.c.bias.grad, m1.c.bias.grad, rtol=2e-2, atol=1e-5)
    for w1, w2 in zip([m1.a.weight, m1.b.weight, m1.c.weight], o2.projected_params):
        # m1: S of the dense G that autocast computed from bf16 X and dY; m2: from fp32 X Q and bf16
        # dY -- they differ by the bf16 rounding of X and of G (relative 2^-9 per element)
        h = o2._layer(w2)
        S1 = lp.compress(h.P, h.Q, w1.grad)
        assert float((h.S[-1] - S1).norm() / S1.norm()) < 1e-2


def test_autocast_bf16_lsp_training_steps():
    m = TwoSame()
    o = _lsp(m)
    o.wrap(m)
    for i in range(3):  # a refit (dense) step, then compressed ones
        with torch.autocast("cpu", torch.bfloat16):
            loss = m(_x(i)).float().square().mean()
        loss.backward()
        o.step()
        o.zero_grad()
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_checkpoint_non_reentrant_with_wrap():
    class Blocks(TwoSame):
        def forward(self, x):
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.b(torch.tanh(self.a(t)))), x,
                                                  use_reentrant=False)
            return self.c(h)

    m1, m2 = TwoSame(), Blocks()
    o1, o2 = _lsp(m1), _lsp(m2)
    assert o2.wrap(m2) == 3
    for i in range(4):  # steps 1 and 3 are refit steps (dense), 2 and 4 compressed
        for m, o in ((m1, o1), (m2, o2)):
            m(_x(i)).square().mean().backward()
            o.step()
            o.zero_grad()
    assert [r["step"] for r in o1.refits] == [r["step"] for r in o2.refits]
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["offload", "lsp", "lsp_wrap"])
def test_compiled_train_step_with_opt_step_matches_eager(kind):
    torch._dynamo.reset()

    def make():
        m = TwoSame()
        if kind == "offload":
            return m, lspo.OffloadAdamW(m.parameters(), lr=1e-2)
        o = _lsp(m)
        if kind == "lsp_wrap":
            o.wrap(m)
        return m, o

    (me, oe), (mc, oc) = make(), make()

    def train_step(m, o, x):
        loss = m(x).square().mean()
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    step_c = torch.compile(train_step, backend="aot_eager")
    for i in range(4):
        le = train_step(me, oe, _x(i))
        lc = step_c(mc, oc, _x(i))
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    for a, b in zip(me.parameters(), mc.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if kind != "offload":
        assert [r["step"] for r in oc.refits] == [r["step"] for r in oe.refits] == [1, 1, 1, 3, 3, 3]


def test_compiled_wrapped_model_trains_like_eager_across_refits():
    """torch.compile(model) of a wrapped model with LSPAdamW: refit (dense) and compressed steps
    alternate, and the compiled run follows the eager one."""
    torch._dynamo.reset()
    me, mc = TwoSame(), TwoSame()
    oe, oc = _lsp(me), _lsp(mc)
    oe.wrap(me)
    oc.wrap(mc)
    f = torch.compile(mc, backend="aot_eager", fullgraph=True)
    for i in range(5):
        for m, o in ((me, oe), (f, oc)):
            m(_x(i)).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(me.parameters(), mc.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_tiny_llama_wrap_compile_matches_eager():
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)

    def make():
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg)
        m.config._attn_implementation = "sdpa"
        o = lspo.LSPAdamW(m, lr=1e-3, subspace=8, nnz=2, min_dim=8, refit_every=0)
        assert o.wrap(m) == 14  # q, k, v, o, gate, up, down per layer
        return m, o

    (me, oe), (mc, oc) = make(), make()
    f = torch.compile(mc, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        le = me(input_ids=ids, labels=ids).loss
        lc = f(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
        le.backward()
        lc.backward()
        oe.step(), oc.step()
        oe.zero_grad(), oc.zero_grad()
    for a, b in zip(me.parameters(), mc.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
