"""OffloadAdamW with its state in files (the engine's disk tier): bitwise the in-memory run, resume
from the directory, state_dict/load_state_dict through the files, and a kill -9 test -- a training
subprocess killed at random points always leaves a directory that loads to one whole step."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import lspo

# the reference runs in this process: the child uses its torch thread count (the dense projectors of
# LSPAdamW's default layout go through ATen GEMMs, whose rounding depends on it; an earlier test may
# have changed it here)
SCRIPT = r"""
import sys, torch, lspo
torch.set_num_threads({threads})
sys.path.insert(0, {here!r})
from test_state_dir import make_model, grads_for
from test_state_dir import make_opt
model = make_model()
opt = make_opt({kind!r}, model, state_dir={d!r}, host_memory_limit=0)
print("ready", flush=True)
for step in range(1, 100000):
    for p, g in zip(model.parameters(), grads_for(step, model)):
        p.grad = g
    opt.step()
    print("step", step, flush=True)
"""


def make_model():
    torch.manual_seed(0)
    # many slots of odd sizes: a persist() touches many files
    return torch.nn.ModuleList([torch.nn.Linear(17 + i, 9 + 2 * i) for i in range(8)])


def grads_for(step, model):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def make_opt(kind, model, **kw):
    if kind == "lsp":  # the 2-D weights projected (refit checks at steps 1, 3, ...), the biases dense
        return lspo.LSPAdamW(model, lr=1e-2, weight_decay=0.1, subspace=8, nnz=2, min_dim=8, refit_every=2,
                             refit_iters=4, **kw)
    return lspo.OffloadAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)


def run_ram(steps, kind="offload", **kw):
    model = make_model()
    opt = make_opt(kind, model, **kw)
    snaps = {}
    for step in range(1, steps + 1):
        for p, g in zip(model.parameters(), grads_for(step, model)):
            p.grad = g
        opt.step()
        snaps[step] = state_of(opt)
    return model, opt, snaps


def state_of(opt):
    sd = opt.state_dict()["state"]
    return {i: {k: v.clone() for k, v in st.items()} for i, st in sd.items()}


def same_state(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), i
        for k in a[i]:
            same = torch.equal(a[i][k], b[i][k]) or bool(a[i][k].isnan().all() and b[i][k].isnan().all())
            assert same, (i, k)


def test_disk_state_bitwise_equal_and_resume(tmp_path):
    ram_model, _, ram_snaps = run_ram(4)
    d = str(tmp_path / "st")
    model, opt, snaps = run_ram(4, state_dir=d, host_memory_limit=0)
    assert opt.slots_on_disk() == len(list(model.parameters()))
    st = opt.engine_stats()
    assert st["disk_slots"] == opt.slots_on_disk() and st["persists"] == 4 and st["host_state_bytes"] == 0
    for s in range(1, 5):
        same_state(ram_snaps[s], snaps[s])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ram_model.parameters()))
    p0 = next(iter(model.parameters()))  # on disk: state[p] holds copies read from the files
    assert torch.equal(opt.state[p0]["exp_avg"].reshape(-1), ram_snaps[4][0]["exp_avg"].reshape(-1))
    del opt
    # resume: weights and step counts come back from the directory
    model2 = make_model()
    opt2 = lspo.OffloadAdamW(model2.parameters(), lr=1e-2, weight_decay=0.1, state_dir=d, host_memory_limit=0,
                             resume=True)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), ram_model.parameters()))
    same_state(ram_snaps[4], state_of(opt2))
    with pytest.raises(lspo.LspoError, match="already holds a committed optimizer state"):
        lspo.OffloadAdamW(make_model().parameters(), state_dir=d)


def test_mixed_placement_and_load_state_dict(tmp_path):
    _, _, ram_snaps = run_ram(3)
    # a host budget of about half the state: some parameters in memory, the rest in files
    n = sum(p.numel() for p in make_model().parameters())
    model, opt, snaps = run_ram(3, state_dir=str(tmp_path / "a"), host_memory_limit=12 * n + (12 << 20))
    assert 0 < opt.slots_on_disk() < len(list(model.parameters()))
    same_state(ram_snaps[3], snaps[3])
    # load_state_dict writes new generations into the files
    model_b, opt_b, _ = run_ram(1, state_dir=str(tmp_path / "b"), host_memory_limit=0)
    opt_b.load_state_dict(opt.state_dict())
    same_state(state_of(opt), state_of(opt_b))


def _load_dir(d, kind):
    model = make_model()
    try:
        opt = make_opt(kind, model, state_dir=d, host_memory_limit=0, resume=True)
    except lspo.LspoError as e:
        assert "holds no MANIFEST" in str(e)
        return 0, None, None
    steps = {int(opt.state[p]["step"].item()) for p in model.parameters()}
    assert len(steps) == 1, f"slots at different steps: {steps}"
    return steps.pop(), state_of(opt), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["offload", "lsp"])
def test_kill_9_leaves_a_whole_step(tmp_path, kind):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(lspo.__file__)), here,
                                         env.get("PYTHONPATH", "")])
    rng = random.Random(7)
    results = []
    for trial in range(4):
        d = str(tmp_path / f"kill{trial}")
        script = SCRIPT.format(here=here, d=d, kind=kind, threads=torch.get_num_threads())
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        seen = 0
        if trial % 2:  # mid-training: after step 2 (however slow the machine), then at a random point
            while seen < 2:
                line = p.stdout.readline().split()
                assert line, p.stderr.read()
                seen = int(line[1])
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        out = p.communicate()[0].split()
        last_printed = int(out[-1]) if len(out) >= 2 and out[-2] == "step" else seen
        step, state, weights = _load_dir(d, kind)
        # the directory holds the last persisted step: the last printed one or the one after it
        assert last_printed <= step <= last_printed + 1, (last_printed, step)
        results.append((step, state, weights))
    steps = [st for st, _, _ in results]
    assert max(steps) > 0, f"no trial got past its first step: {steps}"
    _, _, ref = run_ram(max(steps), kind)
    for step, state, weights in results:
        if step:
            same_state(ref[step], state)
            # the weights of that step (dense: from the masters; projected: from the projector file)
            model = make_model()
            opt = make_opt(kind, model)
            for s in range(1, step + 1):
                for p, g in zip(model.parameters(), grads_for(s, model)):
                    p.grad = g
                opt.step()
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))


def test_lsp_adamw_with_state_on_disk(tmp_path):
    """LSPAdamW's compressed moments in files: refits carry them through load_state/store_state."""
    def run(**kw):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(24, 20), torch.nn.Linear(20, 16))
        opt = lspo.LSPAdamW(model, lr=1e-2, subspace=8, nnz=2, refit_every=2, refit_threshold=0.0, **kw)
        for step in range(1, 6):
            g = torch.Generator().manual_seed(step)
            x, w = torch.randn(8, 24, generator=g), torch.randn(8, 16, generator=g)
            (model(x) * w).sum().backward()  # (refits run in the gradient hooks)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, opt
    ref, ref_opt = run()
    got, opt = run(state_dir=str(tmp_path / "lsp"), host_memory_limit=0)
    assert opt.slots_on_disk() == 4
    assert sum(1 for r in opt.refits if r["refit"]) == sum(1 for r in ref_opt.refits if r["refit"]) > 2
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), got.parameters()))
    same_lsp = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    for i in same_lsp[1]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(same_lsp[0][i][k], same_lsp[1][i][k]), (i, k)


def _lsp_run(model, opt, steps, start=1):
    for step in range(start, start + steps):
        for k in range(2):  # two micro-batches: the refit checks get a fit and a held-out sum
            g = torch.Generator().manual_seed(100 * step + k)
            x, w = torch.randn(8, 24, generator=g), torch.randn(8, 16, generator=g)
            (model(x) * w).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _lsp_model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 20), torch.nn.Linear(20, 16))


# the sparse layout: its positions depend on the seed, which the resume check below changes
LSP_KW = dict(lr=1e-2, subspace=8, nnz=2, min_dim=8, refit_every=2, refit_iters=8, refit_drift=0.0, one_sided=False,
              basis="sparse")


def test_lsp_adamw_resumes_from_the_directory(tmp_path):
    """Projected weights, projectors and refit state come back from the directory: 2 steps, a new
    process-like start (fresh model, resume=True), 4 more steps == 6 uninterrupted steps, bitwise."""
    ref = _lsp_model()
    ref_opt = lspo.LSPAdamW(ref, **LSP_KW)
    _lsp_run(ref, ref_opt, 6)
    d = str(tmp_path / "lsp")
    m1 = _lsp_model()
    o1 = lspo.LSPAdamW(m1, state_dir=d, host_memory_limit=0, **LSP_KW)
    _lsp_run(m1, o1, 2)
    files = sorted(f for f in os.listdir(d) if f.startswith("proj."))
    assert files == ["proj.s2.pt"], files  # the committed step's file only
    del o1
    m2 = _lsp_model(seed=5)  # different initial weights: resume must restore them
    o2 = lspo.LSPAdamW(m2, state_dir=d, host_memory_limit=0, resume=True, **LSP_KW)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    _lsp_run(m2, o2, 4, start=3)
    assert [r["kept"] for r in o2.refits] == [r["kept"] for r in ref_opt.refits[-len(o2.refits):]]
    assert any(r["kept"] and r["step"] >= 3 for r in o2.refits)  # a refit after the resume
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), m2.parameters()))
    a, b = o2.state_dict()["state"], ref_opt.state_dict()["state"]
    for i in b:
        for k in b[i]:
            assert torch.equal(a[i][k], b[i][k]) or (k == "proj_refit_ref" and a[i][k].isnan() and b[i][k].isnan()), \
                (i, k)


# (layout saved, change on resume, the error): the sparse layout's positions depend on the seed; the
# default (one-sided SVD) state cannot be resumed by an optimizer of another layout
_DEFAULT_LAYOUT = {k: v for k, v in LSP_KW.items() if k not in ("one_sided", "basis")}


@pytest.mark.parametrize("saved,change,match", [
    (LSP_KW, dict(seed=3), "positions differ"),
    (_DEFAULT_LAYOUT, dict(one_sided=False), "state_dir holds"),
    (_DEFAULT_LAYOUT, dict(basis="sparse"), "positions differ")], ids=["sparse_seed", "default_to_two_sided",
                                                                     "default_to_sparse"])
def test_lsp_adamw_resume_rejects_a_different_configuration(tmp_path, saved, change, match):
    d = str(tmp_path / "lsp")
    m = _lsp_model()
    o = lspo.LSPAdamW(m, state_dir=d, host_memory_limit=0, **saved)
    _lsp_run(m, o, 1)
    del o
    with pytest.raises(lspo.LspoError, match=match):
        lspo.LSPAdamW(_lsp_model(), state_dir=d, host_memory_limit=0, resume=True, **{**saved, **change})
