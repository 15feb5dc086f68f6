"""lspo.CPUAdamW beside torch.optim.AdamW / Adam, state_dict round trips, schedulers, bad input.

Tolerances. lspo and torch compute the same fp32 formula with different rounding (torch's lerp and
addcmul may use FMA, lspo never does), so after 100 steps the two differ by a few fp32 ulps
(eps_32 = 1.2e-7): measured at most ~4 ulp. We allow rtol = 1e-5 (~80 ulp), far below the effect of
any real mistake (a wrong bias correction or eps placement moves parameters by >= 1e-3 relative).
A second, tighter test applies the project's rule: against an fp64 run of torch.optim.AdamW, lspo's
error (max-abs, relative to the largest value) may be at most 2x that of torch's own fp32 run.
"""
import io
import math
import warnings

import pytest
import torch

import lspo

STEPS = 100


def _isas():
    order = ["scalar", "avx2", "avx512"]
    return order[: order.index(lspo.detected_isa()) + 1]


def _run(opt_cls, p0, grads, param_dtype=torch.float32, sched=None, **kw):
    p = p0.clone().to(param_dtype).requires_grad_()
    p.grad_dtype = None  # lspo takes bf16/fp16 gradients of fp32 params as they are
    opt = opt_cls([p], **kw)
    s = sched(opt) if sched else None
    for g in grads:
        p.grad = g.to(param_dtype) if opt_cls is not lspo.CPUAdamW else g
        opt.step()
        if s:
            s.step()
    return p.detach(), opt


def _grads(shape, n=STEPS, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * (0.1 + i % 7)).to(dtype) for i in range(n)]


def _close(a, b, rtol=1e-5, atol=1e-6, what=""):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shape", [(1,), (17,), (4097,), (64, 33)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adamw_mode", [True, False])
def test_matches_torch_fp32(shape, grad_dtype, adamw_mode):
    torch.manual_seed(1)
    p0 = torch.randn(shape)
    grads = _grads(shape, dtype=grad_dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    ref_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    # torch needs grads of the param's dtype: the exact fp32 upcast of the bf16/fp16 gradient.
    p_ref = p0.clone().requires_grad_()
    ref = ref_cls([p_ref], foreach=False, **kw)
    p = p0.clone().requires_grad_()
    p.grad_dtype = None  # torch >= 2.10: allow a bf16/fp16 .grad on an fp32 param (lspo reads it directly)
    opt = lspo.CPUAdamW([p], adamw_mode=adamw_mode, **kw)
    for g in grads:
        p_ref.grad = g.float()
        p.grad = g
        ref.step()
        opt.step()
    _close(p.detach(), p_ref.detach(), what="param")
    _close(opt.state[p]["exp_avg"], ref.state[p_ref]["exp_avg"], what="exp_avg")
    _close(opt.state[p]["exp_avg_sq"], ref.state[p_ref]["exp_avg_sq"], atol=1e-9, what="exp_avg_sq")
    assert float(opt.state[p]["step"]) == STEPS


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_matches_torch_other_impls(impl):
    p0 = torch.randn(1000)
    grads = _grads((1000,))
    kw = dict(lr=3e-3, weight_decay=0.05)
    ref_p, ref = _run(torch.optim.AdamW, p0, grads, **{impl: True}, **kw)
    p, opt = _run(lspo.CPUAdamW, p0, grads, **kw)
    _close(p, ref_p, what=impl)


def test_error_vs_fp64_at_most_twice_torch_fp32():
    torch.manual_seed(2)
    shape = (20000,)
    p0 = torch.randn(shape)
    grads = _grads(shape)
    kw = dict(lr=1e-2, weight_decay=0.1)
    p64, o64 = _run(torch.optim.AdamW, p0.double(), [g.double() for g in grads], param_dtype=torch.float64,
                    foreach=False, **kw)
    pt, ot = _run(torch.optim.AdamW, p0, grads, foreach=False, **kw)
    pl, ol = _run(lspo.CPUAdamW, p0, grads, **kw)
    for name, got, ref, exact in [
        ("param", pl, pt, p64),
        ("exp_avg", ol.state_dict()["state"][0]["exp_avg"], ot.state_dict()["state"][0]["exp_avg"], o64.state_dict()["state"][0]["exp_avg"]),
        ("exp_avg_sq", ol.state_dict()["state"][0]["exp_avg_sq"], ot.state_dict()["state"][0]["exp_avg_sq"], o64.state_dict()["state"][0]["exp_avg_sq"]),
    ]:
        # Normwise (max-abs over max-abs) relative errors: elementwise relative errors are dominated by
        # the few elements that cancel to ~0 and would make the comparison a coin toss.
        scale = exact.abs().max().item()
        err_lspo = (got.double() - exact).abs().max().item() / scale
        err_torch = (ref.double() - exact).abs().max().item() / scale
        assert err_lspo <= 2 * err_torch, f"{name}: lspo rel err {err_lspo:.3g}, torch fp32 {err_torch:.3g}"


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_master(param_dtype):
    """bf16/fp16 params: the update runs on an fp32 master (state['master_param']) and the param is
    its round-to-nearest copy. Compared with torch.optim.AdamW on an fp32 copy of the params."""
    torch.manual_seed(3)
    shape = (33, 65)
    p0 = torch.randn(shape).to(param_dtype).float()  # representable start
    grads = _grads(shape, dtype=param_dtype)
    kw = dict(lr=1e-2, weight_decay=0.1)
    p_ref = p0.clone().requires_grad_()
    ref = torch.optim.AdamW([p_ref], foreach=False, **kw)
    p = p0.clone().to(param_dtype).requires_grad_()
    opt = lspo.CPUAdamW([p], **kw)
    for g in grads:
        p_ref.grad = g.float()
        p.grad = g
        ref.step()
        opt.step()
    st = opt.state[p]
    assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
    _close(st["master_param"], p_ref.detach(), what="master")
    assert torch.equal(p.detach(), st["master_param"].to(param_dtype)), "param is not the rounded master"
    _close(st["exp_avg"], ref.state[p_ref]["exp_avg"], what="exp_avg")


def _train(opt, p, grads, start, stop, sched=None):
    for g in grads[start:stop]:
        p.grad = g.clone()
        opt.step()
        if sched:
            sched.step()


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_mid_run(param_dtype):
    torch.manual_seed(4)
    p0 = torch.randn(300, 7).to(param_dtype)
    grads = _grads((300, 7), dtype=param_dtype)
    kw = dict(lr=5e-3, weight_decay=0.01)
    # Uninterrupted.
    a = p0.clone().requires_grad_()
    oa = lspo.CPUAdamW([a], **kw)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=10, gamma=0.7)
    _train(oa, a, grads, 0, STEPS, sa)
    # Interrupted at step 40: save (optimizer, scheduler, param), load into fresh objects.
    b = p0.clone().requires_grad_()
    ob = lspo.CPUAdamW([b], **kw)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=10, gamma=0.7)
    _train(ob, b, grads, 0, 40, sb)
    buf = io.BytesIO()
    torch.save({"opt": ob.state_dict(), "sched": sb.state_dict(), "param": b.detach()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    c = ck["param"].clone().requires_grad_()
    oc = lspo.CPUAdamW([c], lr=1.0, weight_decay=0.01)  # lr restored from the checkpoint
    sc = torch.optim.lr_scheduler.StepLR(oc, step_size=10, gamma=0.7)
    oc.load_state_dict(ck["opt"])
    sc.load_state_dict(ck["sched"])
    st = oc.state[c]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    if param_dtype != torch.float32:
        assert st["master_param"].dtype == torch.float32
    _train(oc, c, grads, 40, STEPS, sc)
    assert torch.equal(a.detach(), c.detach())
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(oa.state[a][k], oc.state[c][k]), k
    assert float(oc.state[c]["step"]) == STEPS


def test_load_state_dict_rejects_corrupt_state():
    p = torch.randn(10, requires_grad=True)
    opt = lspo.CPUAdamW([p])
    p.grad = torch.randn(10)
    opt.step()
    sd = opt.state_dict()
    bad = {"state": {0: dict(sd["state"][0], exp_avg=torch.zeros(11))}, "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="exp_avg.*shape"):
        lspo.CPUAdamW([torch.randn(10, requires_grad=True)]).load_state_dict(bad)
    missing = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(10)}}, "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="exp_avg_sq"):
        lspo.CPUAdamW([torch.randn(10, requires_grad=True)]).load_state_dict(missing)


def test_scheduler_changes_lr_like_torch():
    p0 = torch.randn(500)
    grads = _grads((500,))
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s))
    ref_p, ref = _run(torch.optim.AdamW, p0, grads, sched=sched, foreach=False, lr=1e-2)
    p, opt = _run(lspo.CPUAdamW, p0, grads, sched=sched, lr=1e-2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + STEPS))
    _close(p, ref_p, what="param with LambdaLR")
    # Without the schedule the result differs clearly: the schedule was applied.
    p_const, _ = _run(lspo.CPUAdamW, p0, grads, lr=1e-2)
    assert (p_const - p).abs().max() > 1e-2


def test_maximize_and_no_bias_correction_and_grad_scale():
    p0 = torch.randn(257)
    grads = _grads((257,), n=20)
    ref_p, _ = _run(torch.optim.AdamW, p0, grads, foreach=False, lr=1e-2, maximize=True)
    p, _ = _run(lspo.CPUAdamW, p0, grads, lr=1e-2, maximize=True)
    _close(p, ref_p, what="maximize")
    # grad_scale: a power-of-two scale is exact, so step(grad_scale=1/4) on 4g == step on g, bit for bit.
    a = p0.clone().requires_grad_()
    b = p0.clone().requires_grad_()
    oa, ob = lspo.CPUAdamW([a]), lspo.CPUAdamW([b])
    for g in grads:
        a.grad, b.grad = g, g * 4
        oa.step()
        ob.step(grad_scale=0.25)
    assert torch.equal(a, b)
    # Without bias correction the first step is lr * (1 - b1) * g / (sqrt(1 - b2) |g| + eps): smaller.
    c = p0.clone().requires_grad_()
    oc = lspo.CPUAdamW([c], lr=1.0, weight_decay=0.0, bias_correction=False)
    c.grad = grads[0]
    oc.step()
    g = grads[0].double()
    expect = p0.double() - 0.1 * g / ((0.001 * g * g).sqrt() + 1e-8)
    _close(c.detach(), expect, rtol=1e-5, atol=1e-5, what="no bias correction")


def test_every_isa_gives_identical_results():
    p0 = torch.randn(4097)
    grads = _grads((4097,), n=10, dtype=torch.bfloat16)
    results = []
    try:
        for isa in _isas():
            lspo.set_isa(isa)
            p, opt = _run(lspo.CPUAdamW, p0, grads, lr=1e-2)
            results.append((isa, p, opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"]))
    finally:
        lspo.set_isa("auto")
    for isa, p, v in results[1:]:
        assert torch.equal(p, results[0][1]), isa
        assert torch.equal(v, results[0][2]), isa


def test_nonfinite_gradient_skips_and_reports():
    p = torch.randn(1000, requires_grad=True)
    opt = lspo.CPUAdamW([p], lr=1e-2)
    p.grad = torch.randn(1000)
    opt.step()
    before = p.detach().clone()
    st = {k: v.clone() for k, v in opt.state[p].items()}
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = torch.randn(1000)
        g[777] = bad
        p.grad = g
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step()
        assert opt.last_step_skipped
        assert torch.equal(p.detach(), before)
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v), k
    assert opt.skipped_steps == 3
    # found_inf from the caller also skips; a finite step then proceeds normally.
    p.grad = torch.randn(1000)
    with pytest.warns(RuntimeWarning):
        opt.step(found_inf=torch.tensor(1.0))
    assert torch.equal(p.detach(), before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert not opt.last_step_skipped and float(opt.state[p]["step"]) == 2
    assert not torch.equal(p.detach(), before)


def test_moments_only_binding():
    """_C.adam_step(None, ...): the update goes to param_out; p + update matches a param-mode step."""
    n = 4097
    gen = torch.Generator().manual_seed(5)
    m, v, g = torch.randn(n, generator=gen), torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    p = torch.randn(n, generator=gen)
    m1, v1, m2, v2 = m.clone(), v.clone(), m.clone(), v.clone()
    upd = torch.empty(n)
    lspo._C.adam_step(None, m1, v1, g, param_out=upd, step=3, lr=0.1)
    p2 = p.clone()
    lspo._C.adam_step(p2, m2, v2, g, step=3, lr=0.1)
    assert torch.equal(m1, m2) and torch.equal(v1, v2)
    assert torch.equal(p + upd, p2)  # p2 = p + u is exactly the same fp32 addition
    with pytest.raises(lspo.LspoError, match="weight decay"):
        lspo._C.adam_step(None, m1, v1, g, param_out=upd, step=1, lr=0.1, weight_decay=0.1)
    with pytest.raises(lspo.LspoError, match="needs param_out"):
        lspo._C.adam_step(None, m1, v1, g, step=1, lr=0.1)


def test_bad_input_optimizer():
    with pytest.raises(ValueError, match="contiguous"):
        lspo.CPUAdamW([torch.randn(8, 8).t().requires_grad_()])
    with pytest.raises(ValueError, match="device meta"):
        lspo.CPUAdamW([torch.empty(4, device="meta", requires_grad=True)])
    with pytest.raises(TypeError, match="torch.int64"):
        lspo.CPUAdamW([torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(TypeError, match="float64"):
        lspo.CPUAdamW([torch.zeros(4, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="beta1"):
        lspo.CPUAdamW([torch.zeros(4, requires_grad=True)], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="learning rate"):
        lspo.CPUAdamW([torch.zeros(4, requires_grad=True)], lr=-1)
    p = torch.zeros(4, 4, requires_grad=True)
    opt = lspo.CPUAdamW([p])
    p.grad = torch.zeros(4, 4)
    p.data = torch.zeros(16)  # torch refuses mismatched .grad assignment; a resized param gets there
    with pytest.raises(ValueError, match=r"shape \(4, 4\) but the parameter has \(16,\)"):
        opt.step()
    p.data = torch.zeros(4, 4)
    p.grad = torch.zeros(4, 8)[:, ::2]
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step()
    p.grad_dtype = None
    p.grad = torch.zeros(4, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="torch.int32"):
        opt.step()
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            lspo.CPUAdamW([torch.zeros(4, device="cuda", requires_grad=True)])


def test_bad_input_binding():
    n = 64
    m, v, g, p = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    cases = [
        (dict(param=torch.zeros(2 * n)[::2]), "'param' must be contiguous"),
        (dict(param=torch.zeros(n + 1)), "'param' has 65 elements"),
        (dict(grad=torch.zeros(n, dtype=torch.int64)), "'grad' has dtype torch.int64"),
        (dict(exp_avg=torch.zeros(n, dtype=torch.bfloat16)), "'exp_avg' has dtype torch.bfloat16, expected torch.float32"),
        (dict(grad=torch.empty(n, device="meta")), "'grad' must be a CPU tensor, got device meta"),
        (dict(exp_avg_sq=m), "'exp_avg' and 'exp_avg_sq' share memory"),
        (dict(param_out=torch.zeros(n, dtype=torch.float64)), "'param_out' has dtype torch.float64"),
    ]
    for override, msg in cases:
        args = dict(param=p, exp_avg=m, exp_avg_sq=v, grad=g)
        args.update(override)
        with pytest.raises(lspo.LspoError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            lspo._C.adam_step(args["param"], args["exp_avg"], args["exp_avg_sq"], args["grad"],
                              param_out=args.get("param_out"), step=1, lr=1e-3)
    with pytest.raises(lspo.LspoError, match="step must be >= 1"):
        lspo._C.adam_step(p, m, v, g, step=0, lr=1e-3)
    if torch.cuda.is_available():
        with pytest.raises(lspo.LspoError, match="CPU tensor"):
            lspo._C.adam_step(p, m, v, g.cuda(), step=1, lr=1e-3)


def test_all_finite_and_triad_bindings():
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(100003).to(dt)
        assert lspo._C.all_finite(t)
        t[100002] = float("inf")
        assert not lspo._C.all_finite(t)
    with pytest.raises(lspo.LspoError, match="torch.int32"):
        lspo._C.all_finite(torch.zeros(3, dtype=torch.int32))
    for kw in ({}, {"streaming_stores": True}, {"in_place": True}):  # each pass checks its own result in C++
        r = lspo._C.stream_triad(1 << 20, 2, **kw)
        assert r["bytes_per_pass"] == 12 * (1 << 20) and r["bytes_per_s"] > 1e8 and math.isfinite(r["best_seconds"])
    with pytest.raises(lspo.LspoError, match="n must be positive"):
        lspo._C.stream_triad(0, 1)
