"""The torch.optim.Optimizer contract of lspo.OffloadAdamW (and LSPAdamW where it applies):
schedulers, closures, zero_grad, add_param_group, state_dict round trips (bitwise continuation),
gradient accumulation, clipping, AMP GradScaler, non-finite skips, overlapped == serial."""
import io
import math
import warnings

import pytest
import torch

import lspo


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.GELU(), torch.nn.LayerNorm(33), torch.nn.Linear(33, 5))
    return m.to(dtype)


def _batch(i, n=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, 16, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _loss(m, x, y):
    return torch.nn.functional.cross_entropy(m(x).float(), y)


def _train(m, opt, steps, start=0, accum=1, sched=None):
    for i in range(start, start + steps):
        for k in range(accum):
            x, y = _batch(i * accum + k if accum > 1 else i)
            (_loss(m, x, y) / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _bitwise_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_is_torch_optimizer_and_matches_torch_adamw():
    m1, m2 = _model(), _model()
    o1 = lspo.OffloadAdamW(m1.parameters(), lr=1e-2, weight_decay=0.05)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.05)
    assert isinstance(o1, torch.optim.Optimizer)
    _train(m1, o1, 20)
    _train(m2, o2, 20)
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    assert diff < 1e-5, diff  # same math, fp32; only operation order/rounding differ


def test_overlapped_equals_serial_bitwise():
    m1, m2 = _model(), _model()
    o1 = lspo.OffloadAdamW(m1.parameters(), lr=1e-2, max_grad_norm=0.5, overlap=True)
    o2 = lspo.OffloadAdamW(m2.parameters(), lr=1e-2, max_grad_norm=0.5, overlap=False)
    _train(m1, o1, 15)
    _train(m2, o2, 15)
    assert _bitwise_equal(_params(m1), _params(m2))
    assert o1.engine_stats()["commits"] == o2.engine_stats()["commits"] > 0


def test_speculation_is_committed_when_inputs_match():
    m = _model()
    o = lspo.OffloadAdamW(m.parameters(), lr=1e-3)
    _train(m, o, 5)
    n = len(list(m.parameters()))
    st = o.engine_stats()
    assert st["commits"] == 5 * n
    assert st["jobs_run"] == 5 * n  # no step had to be recomputed


def test_lr_scheduler_steps_once_and_is_read_every_step():
    m1, m2 = _model(), _model()
    o1 = lspo.OffloadAdamW(m1.parameters(), lr=1e-2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.3)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.3)
    _train(m1, o1, 7, sched=s1)
    _train(m2, o2, 7, sched=s2)
    assert o1.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"])
    assert o1.defaults["lr"] == 1e-2  # HF schedulers read this
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    assert diff < 1e-5


def test_lambda_scheduler_hf_style():
    m = _model()
    o = lspo.OffloadAdamW(m.parameters(), lr=1e-2)
    base = o.defaults["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 3))
    lrs = []
    for i in range(4):
        lrs.append(o.param_groups[0]["lr"])
        _train(m, o, 1, start=i, sched=sched)
    assert lrs == pytest.approx([base / 3, 2 * base / 3, base, base])


def test_closure_zero_grad_and_add_param_group():
    m = _model()
    ps = list(m.parameters())
    o = lspo.OffloadAdamW(ps[:2], lr=1e-2)
    o.add_param_group({"params": ps[2:], "lr": 1e-3})
    x, y = _batch(0)

    def closure():
        o.zero_grad()
        loss = _loss(m, x, y)
        loss.backward()
        return loss

    before = _params(m)
    loss = o.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert all(not torch.equal(a, b) for a, b in zip(before, _params(m)))
    o.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m.parameters())
    assert len(o.param_groups) == 2 and o.param_groups[1]["lr"] == 1e-3


def test_state_dict_roundtrip_continues_bitwise(tmp_path):
    m_ref = _model()
    o_ref = lspo.OffloadAdamW(m_ref.parameters(), lr=1e-2, weight_decay=0.1)
    _train(m_ref, o_ref, 10)

    m = _model()
    o = lspo.OffloadAdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    _train(m, o, 4)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, path)
    ck = torch.load(path, weights_only=True)
    m2 = _model(seed=5)
    m2.load_state_dict(ck["model"])
    o2 = lspo.OffloadAdamW(m2.parameters(), lr=1.0)  # hyper-parameters come from the checkpoint
    o2.load_state_dict(ck["opt"])
    assert o2.param_groups[0]["lr"] == 1e-2
    _train(m2, o2, 6, start=4)
    assert _bitwise_equal(_params(m2), _params(m_ref))


def test_state_dict_keeps_fp32_state_for_bf16_params():
    m = _model(dtype=torch.bfloat16)
    o = lspo.OffloadAdamW(m.parameters(), lr=1e-2)
    for i in range(3):
        x, y = _batch(i, dtype=torch.bfloat16)
        _loss(m, x, y).backward()
        o.step()
        o.zero_grad()
    sd = o.state_dict()
    st = sd["state"][0]
    assert st["exp_avg"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    o2 = lspo.OffloadAdamW(_model(dtype=torch.bfloat16).parameters(), lr=1e-2)
    o2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(o2.state_dict()["state"][0]["master_param"], st["master_param"])
    assert o2.state[next(iter(o2.state))]["exp_avg"].dtype == torch.float32


def test_load_state_dict_rejects_mismatched_state():
    m = _model()
    o = lspo.OffloadAdamW(m.parameters(), lr=1e-2)
    _train(m, o, 1)
    sd = o.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg"):
        lspo.OffloadAdamW(_model().parameters()).load_state_dict(sd)


def test_gradient_accumulation_equals_big_batch():
    torch.manual_seed(0)
    xs, ys = _batch(0, n=32)
    m1, m2 = _model(), _model()
    o1 = lspo.OffloadAdamW(m1.parameters(), lr=1e-2)
    o2 = lspo.OffloadAdamW(m2.parameters(), lr=1e-2)
    for _ in range(3):
        for k in range(4):
            (_loss(m1, xs[k * 8:(k + 1) * 8], ys[k * 8:(k + 1) * 8]) / 4).backward()
        o1.step()
        o1.zero_grad()
        _loss(m2, xs, ys).backward()
        o2.step()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 summation order only


def test_global_clipping_matches_clip_grad_norm():
    m1, m2 = _model(), _model()
    o1 = lspo.OffloadAdamW(m1.parameters(), lr=1e-2, max_grad_norm=0.05)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    for i in range(5):
        x, y = _batch(i)
        _loss(m1, x, y).backward()
        o1.step()
        o1.zero_grad()
        _loss(m2, x, y).backward()
        n2 = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.05)
        assert o1.last_grad_norm == pytest.approx(n2.item(), rel=1e-5)
        assert n2.item() > 0.05  # clipping was active
        o2.step()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_user_clip_grad_norm_after_backward_is_respected():
    # an in-place change of p.grad after the hook ran invalidates the speculation
    m1, m2 = _model(), _model()
    o1 = lspo.OffloadAdamW(m1.parameters(), lr=1e-2)
    o2 = lspo.OffloadAdamW(m2.parameters(), lr=1e-2, overlap=False)
    for i in range(4):
        for m, o in ((m1, o1), (m2, o2)):
            x, y = _batch(i)
            _loss(m, x, y).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)
            o.step()
            o.zero_grad()
    assert _bitwise_equal(_params(m1), _params(m2))


def test_nonfinite_gradient_skips_step_and_reports():
    m = _model()
    o = lspo.OffloadAdamW(m.parameters(), lr=1e-2)
    _train(m, o, 2)
    before = _params(m)
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in o.state_dict()["state"].items()}
    x, y = _batch(3)
    _loss(m, x, y).backward()
    next(m.parameters()).grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        o.step()
    o.zero_grad()
    assert o.last_step_skipped and o.skipped_steps == 1
    assert _bitwise_equal(before, _params(m))
    after = o.state_dict()["state"]
    for k, v in state_before.items():
        for n, t in v.items():
            assert torch.equal(t, after[k][n]), (k, n)
    _train(m, o, 1, start=4)
    assert not o.last_step_skipped


def test_amp_grad_scaler_matches_unscaled_training():
    # CPU GradScaler with fp32 model: scaling must be undone exactly (powers of two)
    m1, m2 = _model(), _model()
    o1 = lspo.OffloadAdamW(m1.parameters(), lr=1e-2, max_grad_norm=1.0)
    o2 = lspo.OffloadAdamW(m2.parameters(), lr=1e-2, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(5):
        x, y = _batch(i)
        scaler.scale(_loss(m1, x, y)).backward()
        scaler.step(o1)
        scaler.update()
        o1.zero_grad()
        _loss(m2, x, y).backward()
        o2.step()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_amp_overflow_skips_via_scaler():
    m = _model()
    o = lspo.OffloadAdamW(m.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = _params(m)
    x, y = _batch(0)
    scaler.scale(_loss(m, x, y)).backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    scaler.step(o)
    scaler.update()
    assert o.last_step_skipped
    assert _bitwise_equal(before, _params(m))
    assert scaler.get_scale() < 2.0**10


def test_bad_arguments_raise():
    m = _model()
    with pytest.raises(ValueError, match="learning rate"):
        lspo.OffloadAdamW(m.parameters(), lr=-1)
    with pytest.raises(ValueError, match="betas"):
        lspo.OffloadAdamW(m.parameters(), betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="max_grad_norm"):
        lspo.OffloadAdamW(m.parameters(), max_grad_norm=0)
    with pytest.raises(TypeError, match="dtype"):
        lspo.OffloadAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])


def test_timeline_is_chrome_trace():
    import json

    m = _model()
    o = lspo.OffloadAdamW(m.parameters(), lr=1e-2, record_timeline=True)
    _train(m, o, 2)
    tr = json.loads(o.timeline_json())
    names = {e["name"] for e in tr["traceEvents"] if e.get("ph") == "X"}
    assert {"adam", "d2h", "h2d", "step"} <= names
    adam = [e for e in tr["traceEvents"] if e.get("name") == "adam"]
    assert len(adam) == 2 * len(list(m.parameters())) and all(e["dur"] >= 0 for e in adam)
