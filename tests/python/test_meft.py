"""lspo.meft: routing against a brute-force top-k, the sparse adapter against a dense masked
reference (forward and gradients), the lazy Adam binding against dense Adam on the touched rows,
training with and without overlap (bit-identical), checkpoint resume (bit-exact), bad arguments."""
import copy
import threading

import pytest
import torch

import lspo
from lspo import meft
from lspo.tinygpt import TinyGPT, TinyGPTConfig


def _int_adapter(hidden, neurons, topk, experts, probe, seed=0, **kw):
    """An adapter whose keys are small integers (exact in bf16 and in every fp32 dot product), so
    batched and brute-force scores agree bit for bit and ties really occur."""
    a = meft.SparseAdapter(hidden, neurons, topk, experts, probe, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    a.master[:, :hidden] = torch.randint(-2, 3, (neurons, hidden), generator=g).float()
    a.master[:, hidden:] = torch.randn(neurons, hidden, generator=g)
    a.reset_working_copy()
    return a


@pytest.mark.parametrize("shape", [(3, 1, 1, 1, 1), (4, 37, 5, 6, 2), (5, 10, 10, 3, 3), (6, 64, 8, 8, 1),
                                   (2, 7, 3, 7, 4)], ids=lambda s: "h{}_N{}_k{}_E{}_p{}".format(*s))
def test_route_matches_brute_force(shape):
    h, n, k, e, p = shape
    a = _int_adapter(h, n, k, e, p, seed=n)
    x = torch.randint(-2, 3, (50, h), generator=torch.Generator().manual_seed(1)).float()
    got, want = a.route(x), meft.route_reference(a, x)
    assert torch.equal(got, want)
    # no neuron twice per token; every selected neuron has a positive score
    for t in range(x.shape[0]):
        sel = got[t][got[t] >= 0]
        assert sel.unique().numel() == sel.numel()
        assert bool(((x[t] @ a.work[sel, :h].float().t()) > 0).all())


def test_route_no_neuron_case():
    a = _int_adapter(4, 12, 3, 3, 1)
    x = torch.zeros(5, 4)  # every score is 0: no neuron is positive
    assert bool((a.route(x) == -1).all())
    y = a(x)
    assert torch.equal(y, torch.zeros_like(x))


def test_adapter_under_bf16_autocast():
    a = meft.SparseAdapter(16, 64, 4, 8, 2, seed=1)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x)
        ids = a.route(x)
    assert torch.equal(ids, a.route(x))  # routing ignores autocast (fp32 on the host)
    assert y.shape == x.shape and bool(torch.isfinite(y.float()).all())


def _dense_reference(a, x, ids):
    h = a.hidden
    kv = a.work.float().clone().requires_grad_(True)
    mask = torch.zeros(x.shape[0], a.neurons)
    for t in range(x.shape[0]):
        sel = ids[t][ids[t] >= 0]
        mask[t, sel] = 1.0
    y = (torch.relu(x @ kv[:, :h].t()) * mask) @ kv[:, h:] * a.scale
    return y, kv


@pytest.mark.parametrize("selection", ["token", "batch"])
@pytest.mark.parametrize("compute", ["masked", "gather"])
@pytest.mark.parametrize("shape", [(16, 64, 4, 8, 2, 6), (9, 33, 1, 5, 5, 33), (4, 5, 5, 1, 1, 2)],
                         ids=lambda s: "h{}_N{}_k{}_E{}_p{}_B{}".format(*s))
def test_sparse_forward_and_grad_equal_dense_masked(shape, compute, selection):
    h, n, k, e, p, b = shape
    a = meft.SparseAdapter(h, n, k, e, p, seed=3, selection=selection, budget=b)
    a.compute = compute
    a.master[:, h:] = torch.randn(n, h)  # non-zero values so that the key gradients are non-zero too
    a.reset_working_copy()
    x = torch.randn(2, 13, h, requires_grad=True)
    w = torch.randn(2, 13, h)
    y = a(x)
    (y * w).sum().backward()
    idx, g = a.take_gradient()
    if selection == "token":
        ids = a.route(x.detach().reshape(-1, h))
        rows = torch.unique(ids[ids >= 0])
    else:
        rows, ids = a.route_batch(x.detach().reshape(-1, h))
    x2 = x.detach().reshape(-1, h).clone().requires_grad_(True)
    yr, kv = _dense_reference(a, x2, ids)
    (yr.reshape(2, 13, h) * w).sum().backward()
    # fp32 sums of at most 26 O(1) products in another order: differences of a few 1e-6 (absolute)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.detach().reshape(-1, h), yr.detach(), **tol)
    torch.testing.assert_close(x.grad.reshape(-1, h), x2.grad, **tol)
    used = torch.unique(ids[ids >= 0])
    assert torch.equal(idx, used) and bool(torch.isin(used, rows).all())  # rows no token used: no update
    torch.testing.assert_close(g, kv.grad[idx], **tol)
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    assert bool((kv.grad[rest] == 0).all())  # the dense gradient lives on the selected rows only
    st = a.stats  # moved: the rows (batch: + the representative keys); back: the routing input or the
    # batch summary (+ the used mask) and the used rows' gradient
    if selection == "token":
        assert st["bytes_h2d"] == rows.numel() * 2 * h * 2
        assert st["bytes_d2h"] == x.numel() * 4 + idx.numel() * 2 * h * 4
    else:
        assert st["bytes_h2d"] == rows.numel() * 2 * h * 2 + e * h * 4
        assert st["bytes_d2h"] == a.batch_probe * (8 + h * 4) + rows.numel() + idx.numel() * 2 * h * 4


# ---------------------------------------------------------------------- selection="batch"
@pytest.mark.parametrize("shape", [(3, 1, 1, 1, 1, 1), (4, 37, 5, 6, 2, 7), (5, 10, 10, 3, 3, 10), (6, 64, 8, 8, 1, 3),
                                   (2, 7, 3, 7, 4, 2), (4, 33, 2, 5, 2, 40)],
                         ids=lambda s: "h{}_N{}_k{}_E{}_p{}_B{}".format(*s))
def test_route_batch_matches_brute_force(shape):
    h, n, k, e, p, b = shape
    b = min(b, n)
    a = _int_adapter(h, n, k, e, p, seed=n, selection="batch", budget=b)
    for seed in range(3):
        x = torch.randint(-2, 3, (40, h), generator=torch.Generator().manual_seed(seed)).float()
        rows, ids = a.route_batch(x)
        want_rows, want_ids = meft.route_batch_reference(a, x)
        assert torch.equal(rows, want_rows) and torch.equal(ids, want_ids)
        assert rows.numel() <= b and bool((rows[1:] > rows[:-1]).all())
        for t in range(x.shape[0]):  # a token's neurons: rows of the step, each once, positive
            sel = ids[t][ids[t] >= 0]
            assert sel.unique().numel() == sel.numel() and bool(torch.isin(sel, rows).all())
            assert bool(((x[t] @ a.work[sel, :h].float().t()) > 0).all())


def test_route_batch_no_neuron_case():
    a = _int_adapter(4, 12, 3, 3, 1, selection="batch")
    rows, ids = a.route_batch(torch.zeros(5, 4))  # every expert weight is 0: no row is chosen
    assert rows.numel() == 0 and ids.shape == (5, 0)
    x = torch.zeros(5, 4, requires_grad=True)
    y = a(x)
    assert torch.equal(y, torch.zeros_like(x)) and a.stats["rows_moved"] == 0


def _fwd_bwd(a, x, w, overlap):
    a.overlap = overlap
    xx = x.clone().requires_grad_(True)
    a.begin(xx)
    y = a(xx)
    (y * w).sum().backward()
    return y.detach(), xx.grad, a.take_gradient()


@pytest.mark.parametrize("selection", ["token", "batch"])
def test_overlapped_fetch_equals_serial_bitwise(selection):
    """The host side run on the fetch thread while the caller goes on (overlap) gives bit for bit the
    serial result, at torch's default thread count, forward and backward, over several steps."""
    h = 24
    a = meft.SparseAdapter(h, 300, 6, 17, 3, seed=4, selection=selection, budget=9)
    a.master[:, h:] = torch.randn(300, h)
    a.reset_working_copy()
    threads = []
    host_side = a._host_side
    a._host_side = lambda *args: (threads.append(threading.current_thread().name), host_side(*args))[1]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        threads.clear()
        x, w = torch.randn(3, 41, h, generator=g), torch.randn(3, 41, h, generator=g)
        ys, gs, (i_s, r_s) = _fwd_bwd(a, x, w, overlap=False)
        yo, go, (i_o, r_o) = _fwd_bwd(a, x, w, overlap=True)
        assert torch.equal(ys, yo) and torch.equal(gs, go) and torch.equal(i_s, i_o) and torch.equal(r_s, r_o)
        # the serial run routed on the caller's thread, the overlapped one on the fetch thread
        assert threads[0] == threading.current_thread().name and threads[1].startswith("meft-fetch")
    # a fetch started for another input is not used (the adapter routes the input it is given)
    x1, x2 = torch.randn(5, h, generator=g), torch.randn(5, h, generator=g)
    a.overlap = True
    a.begin(x1)
    with torch.no_grad():
        y_stale = a(x2)
        a.overlap = False
        assert torch.equal(y_stale, a(x2))


@pytest.mark.parametrize("selection", ["token", "batch"])
def test_training_overlapped_fetch_equals_serial(selection):
    ms, mo = _model(), _model()
    kw = dict(neurons=512, topk=4, experts=16, probe=2, selection=selection)
    meft.add_sparse_adapters(ms, overlap=False, **kw)
    meft.add_sparse_adapters(mo, overlap=True, **kw)
    ls = _train(ms, meft.MeftAdamW(ms, lr=1e-2, overlap=False), 3)
    lo = _train(mo, meft.MeftAdamW(mo, lr=1e-2, overlap=False), 3)
    assert ls == lo
    for a, b in zip(meft.adapters_of(ms), meft.adapters_of(mo)):
        assert torch.equal(a.master, b.master) and torch.equal(a.row_steps, b.row_steps)
        assert a.stats == b.stats
        if selection == "batch":  # at most `budget` (= k) rows per step and layer
            assert a.stats["peak_rows"] <= a.budget and 0 < int((a.row_steps > 0).sum()) <= 3 * a.budget


def test_sparse_adam_binding_equals_dense_adam_on_touched_rows():
    rows, cols = 9, 4097
    g = torch.Generator().manual_seed(0)
    p = torch.randn(rows, cols, generator=g)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    steps = torch.zeros(rows, dtype=torch.long)
    work = p.to(torch.bfloat16)
    p0, work0 = p.clone(), work.clone()
    idx = torch.tensor([0, 3, 4, 8])
    for it in range(3):
        grad = torch.randn(idx.numel(), cols, generator=g).to(torch.bfloat16)
        # dense twin on the compacted rows, same step count
        pd, md, vd = p[idx].clone(), m[idx].clone(), v[idx].clone()
        od = torch.empty(idx.numel(), cols, dtype=torch.bfloat16)
        lspo._C.adam_step(pd, md, vd, grad, param_out=od, step=it + 1, lr=1e-2, weight_decay=0.1)
        lspo._C.sparse_adam_step(p, m, v, steps, idx, grad, param_out=work, lr=1e-2, weight_decay=0.1)
        assert torch.equal(p[idx], pd) and torch.equal(m[idx], md) and torch.equal(v[idx], vd)
        assert torch.equal(work[idx], od)
    rest = torch.tensor([1, 2, 5, 6, 7])
    assert torch.equal(p[rest], p0[rest]) and torch.equal(work[rest], work0[rest])
    assert bool((m[rest] == 0).all()) and steps.tolist() == [3, 0, 0, 3, 3, 0, 0, 0, 3]


def test_bad_arguments():
    E = lspo.LspoError
    with pytest.raises(E, match="topk must be in \\[1, neurons=8\\]"):
        meft.SparseAdapter(4, 8, 9, 2, 1)
    with pytest.raises(E, match="experts must be >= 1"):
        meft.SparseAdapter(4, 8, 2, 0, 1)
    with pytest.raises(E, match="experts \\(9\\) > neurons \\(8\\)"):
        meft.SparseAdapter(4, 8, 2, 9, 1)
    with pytest.raises(E, match="probe must be in \\[1, experts=2\\]"):
        meft.SparseAdapter(4, 8, 2, 2, 3)
    with pytest.raises(E, match="selection must be one of"):
        meft.SparseAdapter(4, 8, 2, 2, 1, selection="tokens")
    with pytest.raises(E, match="budget \\(rows per step, selection='batch'\\) must be in \\[1, neurons=8\\]"):
        meft.SparseAdapter(4, 8, 2, 2, 1, selection="batch", budget=9)
    with pytest.raises(E, match="budget"):
        meft.SparseAdapter(4, 8, 2, 2, 1, selection="batch", budget=0)
    with pytest.raises(E, match="input has 5 features"):
        meft.SparseAdapter(4, 8, 2, 2, 1)(torch.zeros(3, 5))
    p = torch.zeros(4, 3)
    z = torch.zeros_like(p)
    s = torch.zeros(4, dtype=torch.long)
    with pytest.raises(E, match="strictly increasing"):
        lspo._C.sparse_adam_step(p, z, z.clone(), s, torch.tensor([1, 1]), torch.ones(2, 3), lr=1e-3)
    with pytest.raises(E, match="out of range"):
        lspo._C.sparse_adam_step(p, z, z.clone(), s, torch.tensor([4]), torch.ones(1, 3), lr=1e-3)
    with pytest.raises(E, match="'grad' must have sizes \\[2, 3\\]"):
        lspo._C.sparse_adam_step(p, z, z.clone(), s, torch.tensor([0, 1]), torch.ones(1, 3), lr=1e-3)
    with pytest.raises(E, match="'idx' must be a contiguous 1-D CPU torch.int64"):
        lspo._C.sparse_adam_step(p, z, z.clone(), s, torch.tensor([0.0]), torch.ones(1, 3), lr=1e-3)
    with pytest.raises(E, match="no FFN block"):
        meft.add_sparse_adapters(torch.nn.Linear(3, 3), 8, 2)


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(TinyGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))


def _train(model, opt, steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 33), generator=g)
        loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture
def one_torch_thread():
    # torch's multi-threaded CPU GEMMs may split their reductions differently when another thread
    # (here the Adam worker) keeps a core busy, which changes gradients in the last bits; with one
    # torch thread the two schedules must agree bit for bit.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_overlap_equals_serial_and_untouched_rows_stay(one_torch_thread):
    ms, mo = _model(), _model()
    a_s = meft.add_sparse_adapters(ms, neurons=1024, topk=2, experts=32, probe=1)
    a_o = meft.add_sparse_adapters(mo, neurons=1024, topk=2, experts=32, probe=1)
    start = [a.master.clone() for a in a_s]
    ls = _train(ms, meft.MeftAdamW(ms, lr=1e-2, overlap=False), 4)
    lo = _train(mo, meft.MeftAdamW(mo, lr=1e-2, overlap=True), 4)
    assert ls == lo
    assert all(p.grad is None and not p.requires_grad for p in ms.parameters())
    for a, b, s0 in zip(a_s, a_o, start):
        assert torch.equal(a.master, b.master) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)
        assert torch.equal(a.work, a.master.to(torch.bfloat16))
        touched = a.row_steps > 0
        assert 0 < int(touched.sum()) < a.neurons  # sparse: some rows were never selected
        assert torch.equal(a.master[~touched], s0[~touched])
        assert bool((a.exp_avg[~touched] == 0).all())
        st = a.stats
        assert st["bytes_h2d"] == st["rows_moved"] * 2 * a.hidden * 2


def test_adapters_learn_a_fixed_batch():
    model = _model()
    meft.add_sparse_adapters(model, neurons=256, topk=16, experts=16, probe=4)
    opt = meft.MeftAdamW(model, lr=3e-3)
    x = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(25):
        loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses


def test_overlap_rejects_accumulation():
    model = _model()
    meft.add_sparse_adapters(model, neurons=32, topk=2, experts=4, probe=1)
    opt = meft.MeftAdamW(model, lr=1e-3, overlap=True)
    x = torch.randint(0, 256, (2, 9))
    model(x[:, :-1], x[:, 1:])[1].backward()
    with pytest.raises(lspo.LspoError, match="gradient accumulation needs MeftAdamW"):
        model(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()


def test_checkpoint_resume_is_bit_exact(one_torch_thread):
    ref = _model()
    meft.add_sparse_adapters(ref, neurons=64, topk=4, experts=8, probe=2)
    opt = meft.MeftAdamW(ref, lr=1e-2)
    _train(ref, opt, 3, seed=1)
    ck = copy.deepcopy({"adapters": meft.adapter_state_dict(ref), "opt": opt.state_dict()})
    tail = _train(ref, opt, 3, seed=2)
    res = _model()
    meft.add_sparse_adapters(res, neurons=64, topk=4, experts=8, probe=2, seed=123)  # other init: overwritten
    opt2 = meft.MeftAdamW(res, lr=5.0)  # other lr: overwritten
    meft.load_adapter_state_dict(res, ck["adapters"])
    opt2.load_state_dict(ck["opt"])
    assert _train(res, opt2, 3, seed=2) == tail
    for a, b in zip(meft.adapters_of(ref), meft.adapters_of(res)):
        for k in ("master", "exp_avg", "exp_avg_sq", "row_steps", "work", "centroids"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
    bad = _model()
    meft.add_sparse_adapters(bad, neurons=65, topk=4, experts=8, probe=2)
    with pytest.raises(lspo.LspoError, match="neurons 65 differs"):
        meft.load_adapter_state_dict(bad, ck["adapters"])


# ---------------------------------------------------------------------- examples/finetune_lm.py --method meft
def test_finetune_example_meft_gsm8k_and_resume(tmp_path, one_torch_thread):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("peft")
    from pathlib import Path
    from test_finetune import ft, write_checkpoint  # the tiny llama checkpoint writer and the script
    root = Path(__file__).resolve().parents[2]
    model_dir, data = tmp_path / "tiny", tmp_path / "gsm"
    write_checkpoint(model_dir, "llama")
    data.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        lines = (root / "examples" / "data" / "gsm8k" / name).read_text().splitlines(True)[:16]
        (data / name).write_text("".join(lines))

    def run(*extra):
        return ft.main(["--model", str(model_dir), "--data", str(data), "--batch-size", "2", "--seq-len", "48",
                        "--lr", "1e-2", "--warmup", "1", "--eval-windows", "4", "--sample-tokens", "0",
                        "--eval-examples", "1", "--answer-tokens", "4", "--quiet", "--device", "cpu", "--amp", "off",
                        "--threads", "1", "--method", "meft", "--meft-neurons", "256", "--meft-topk", "4",
                        "--meft-probe", "2", "--steps", "6", *extra])

    full = run("--save", str(tmp_path / "c"))
    assert full["val_loss_after"] < full["val_loss_before"]  # the adapters learn (the model is frozen)
    run("--stop-after", "3", "--save", str(tmp_path / "a"))
    resumed = ft.main(["--resume", str(tmp_path / "a"), "--eval-windows", "4", "--sample-tokens", "0",
                       "--eval-examples", "0", "--quiet", "--device", "cpu", "--threads", "1",
                       "--save", str(tmp_path / "b")])
    assert resumed["train_losses"] == full["train_losses"][3:]
    sb = torch.load(tmp_path / "b" / "meft_adapters.pt", weights_only=False)
    sc = torch.load(tmp_path / "c" / "meft_adapters.pt", weights_only=False)
    for x, y in zip(sb["adapters"], sc["adapters"]):
        assert torch.equal(x["master"], y["master"])
    with pytest.raises(ValueError, match="drop --optimizer"):
        run("--optimizer", "adamw")
    batch = run("--meft-selection", "batch", "--meft-budget", "8", "--steps", "2")  # the micro-batch shares 8 rows
    assert len(batch["train_losses"]) == 2 and all(l == l for l in batch["train_losses"])


def test_benchmark_smoke(tmp_path):
    """benchmarks/meft.py end to end at toy sizes: its last line is the JSON the report quotes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("peft")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root / "python"), LSPO_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "meft.py"), "--quick", "--threads", "1", "--rows", "256",
                        "--row-len", "64", "--reps", "2", "--triad-elems", "65536", "--n-embd", "32", "--pretrain-steps", "2", "--sft-steps", "2",
                        "--batch", "2", "--eval-examples", "4", "--neurons", "64", "--topk", "4",
                        "--paper-neurons", "1024", "--paper-hidden", "16", "--paper-tokens", "1,8"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["topk_fraction"] == 4 / 64
    assert 0 < out["bytes_moved_vs_dense"] and out["sparse_adam_rows_per_s"] > 0
    assert out["lora_rank"] >= 1 and out["meft_vs_lora_loss_ratio"] > 0
    assert out["headline_variant"] == "token" and set(out["variants"]) == {"token", "batch"}
    assert out["variants"]["token"]["bytes_moved_vs_dense"] == out["bytes_moved_vs_dense"]
    b = out["variants"]["batch"]
    assert b["budget"] == 4 and b["rows_moved_fraction"] <= 4 / 64  # at most `budget` rows per step and layer
    runs = out["transfer_only"]["runs"]
    assert [(r["selection"], r["tokens"]) for r in runs] == [("token", 1), ("batch", 1), ("token", 8), ("batch", 8)]
    assert all(r["rows_moved_fraction"] <= r["tk_over_n"] for r in runs if r["selection"] == "token")
