"""Data parallel (lspo.distributed, docs/distributed.md) under ``torchrun --nproc_per_node=2`` with
gloo on localhost: 2 ranks x batch b end within fp32 tolerance of 1 rank x batch 2b (LSPAdamW with
refits on every other step, OffloadAdamW; gradient accumulation and clipping on), host state per
rank about halves, a checkpoint saved by a world of 2 resumes in a world of 1 and of 2, and a rank
that dies gives a clear error on the other and leaves no checkpoint behind. The rank program is
tests/python/dist_worker.py."""
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
PYPATH = os.path.join(os.path.dirname(os.path.dirname(HERE)), "python")
# Reduction order differs (a mean of per-rank means vs one mean over 2b samples): fp32 rounding of
# ~1e-7 relative per gradient element, carried through 6 Adam steps (lr 1e-2) and 3 refits (5 fit
# iterations each); measured max abs difference of the weights ~2e-7 (weights are O(1)).
ATOL = 2e-5
CLIP = 0.5  # below every step's global norm here: clipping is active on every step

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=PYPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


_REFS: dict = {}


def run(tmp_path, name, *args, world=2, check=True, monitor_s=None):
    key = tuple(map(str, args))
    if world == 1 and key in _REFS:  # one-process references are deterministic: run each once
        return _REFS[key], None
    out = str(tmp_path / f"{name}.pt")
    if world == 1:
        cmd = [sys.executable, WORKER, "--no-dist"]
    else:
        # monitor_s: how often torchrun's agent polls its workers (default 0.1 s); once a worker died
        # the agent stops the others at its next poll, so a test that waits for a survivor's error
        # must give it time (on a loaded machine 0.1 s is a race)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={_port()}", *([f"--monitor-interval={monitor_s}"] if monitor_s else []), WORKER]
    p = subprocess.run(cmd + ["--out", out, *map(str, args)], env=_env(), capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = torch.load(out, weights_only=False)
    if world == 1:
        _REFS[key] = res
    return res, p


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def state_diff(a, b):
    assert a["state"].keys() == b["state"].keys()
    d = 0.0
    for k, st in a["state"].items():
        assert st.keys() == b["state"][k].keys()
        for n, t in st.items():
            if n.endswith("indices"):
                assert torch.equal(t, b["state"][k][n]), (k, n)
            else:
                d = max(d, (t.float() - b["state"][k][n].float()).abs().max().item())
    return d


@pytest.fixture(scope="module")
def lsp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lsp")
    ck = str(tmp / "ck.pt")
    two, _ = run(tmp, "two", "--opt", "lsp", "--clip", CLIP, "--save-at", 3, "--ckpt", ck, "--no-sync")
    one, _ = run(tmp, "one", "--opt", "lsp", "--clip", CLIP, world=1)
    return tmp, ck, two, one


def test_lsp_two_ranks_match_one_rank(lsp_runs):
    _, _, two, one = lsp_runs
    assert not two["error"]
    assert max_diff(two["params"], one["params"]) < ATOL
    assert state_diff(two["state"], one["state"]) < ATOL  # moments and projector values
    # 3 checks x 2 layers, the same records on both ranks' side; some checks kept a new fit (so the
    # owners' projector values reached the other rank)
    assert two["refits"] == one["refits"] and len(one["refits"]) == 6 and sum(r[2] for r in one["refits"]) >= 1
    assert two["norm"] == pytest.approx(one["norm"], rel=1e-5) and one["norm"] > CLIP
    assert two["ranks_identical"]  # weights, projector values and whitening bitwise equal on both ranks
    # bytes reduced: on refit-check steps (1, 3, 5) the projected weights send their two dense sums
    # (fit: micro-batch 0, held-out: micro-batch 1; the owner checks on them), on the others the
    # 12 x 12 S; every other parameter its gradient -- once per step
    dense = sum(p.numel() * 4 for p in one["params"].values())
    proj = sum(one["params"][n].numel() * 4 for n in ("0.weight", "3.weight"))
    assert two["comm"]["steps"] == 6
    assert two["comm"]["reduce_bytes"] == 3 * (dense + proj) + 3 * (dense - proj + 2 * 12 * 12 * 4)
    # with no_sync() on the first micro-batch, every reduce was launched from the hooks during the
    # last backward and used as launched
    assert two["comm"]["early_bytes"] == two["comm"]["reduce_bytes"]


def test_lsp_wrap_path_two_ranks_match_one_rank(tmp_path):
    # lspo.wrap: the projected layers' backward hands S to the core (no dense gradient, no hook):
    # their S is reduced at step()
    two, _ = run(tmp_path, "two", "--opt", "lsp", "--wrap", "--clip", CLIP, "--refit-every", 0)
    one, _ = run(tmp_path, "one", "--opt", "lsp", "--wrap", "--clip", CLIP, "--refit-every", 0, world=1)
    assert not two["error"]
    assert max_diff(two["params"], one["params"]) < ATOL
    assert state_diff(two["state"], one["state"]) < ATOL


def test_amp_inf_on_one_rank_skips_everywhere_and_scalers_agree(tmp_path):
    # fp16-style loss scaling: rank 1's loss is inf at step 2 -> the step is skipped on both ranks
    # (global norm), and after sync_grad_scaler both scalers backed off, as one process whose batch
    # holds the inf does
    common = ["--opt", "lsp", "--amp", "--inf-step", 2, "--refit-every", 0]
    two, _ = run(tmp_path, "two", *common)
    one, _ = run(tmp_path, "one", *common, world=1)
    assert not two["error"]
    assert two["skipped"] == one["skipped"] == 1
    assert two["scale"] == one["scale"] == 2.0 ** 9
    assert max_diff(two["params"], one["params"]) < ATOL


def test_lsp_host_state_per_rank_halves(lsp_runs):
    _, _, two, one = lsp_runs
    assert len(two["host"]) == 2 and min(two["host"]) > 0
    assert max(two["host"]) <= 0.55 * one["host"][0]
    assert sum(two["host"]) == one["host"][0]  # each slot's state (or range of it) lives on exactly one rank
    assert -1 in two["owners"] and {0, 1} <= set(two["owners"])  # owned slots on both ranks, and a split one


@pytest.mark.parametrize("mode", ["stale_launches", "no_overlap"])
def test_offload_two_ranks_match_one_rank(tmp_path, mode):
    # stale_launches: accumulation without no_sync(): the first micro-batch's launches are outdated by
    # the second and the step reduces again; no_overlap: every reduce at step()
    two, _ = run(tmp_path, "two", "--opt", "offload", "--clip", CLIP,
                 *(["--no-overlap"] if mode == "no_overlap" else []))
    one, _ = run(tmp_path, "one", "--opt", "offload", "--clip", CLIP, world=1)
    assert not two["error"] and two["ranks_identical"]
    assert max_diff(two["params"], one["params"]) < ATOL
    assert state_diff(two["state"], one["state"]) < ATOL
    assert two["norm"] == pytest.approx(one["norm"], rel=1e-5) and one["norm"] > CLIP
    assert max(two["host"]) <= 0.55 * one["host"][0] and sum(two["host"]) == one["host"][0]
    assert two["owners"].count(-1) == 3  # the three weights (>= 200 elements) are split over the ranks
    dense = sum(p.numel() * 4 for p in one["params"].values())
    if mode == "no_overlap":
        assert two["comm"]["reduce_bytes"] == 6 * dense and two["comm"]["early_bytes"] == 0
    else:  # launched twice (2 micro-batches), the second launch used
        assert two["comm"]["reduce_bytes"] == 2 * 6 * dense and two["comm"]["early_bytes"] == 6 * dense


def test_checkpoint_from_world_two_resumes_in_world_one_and_two(lsp_runs):
    tmp, ck, two, _ = lsp_runs
    assert os.path.exists(ck) and not any(f.startswith("ck.pt.tmp") for f in os.listdir(tmp))
    saved = torch.load(ck, weights_only=False)
    assert saved["step"] == 3 and "lspo_partial" not in saved["optimizer"]
    assert len(saved["optimizer"]["state"]) == 8  # every parameter's state, gathered from both ranks
    again, _ = run(tmp, "resume2", "--opt", "lsp", "--clip", CLIP, "--resume", ck)
    assert max_diff(again["params"], two["params"]) == 0.0  # same world: bitwise the uninterrupted run
    assert state_diff(again["state"], two["state"]) == 0.0
    alone, _ = run(tmp, "resume1", "--opt", "lsp", "--clip", CLIP, "--resume", ck, world=1)
    assert max_diff(alone["params"], two["params"]) < ATOL


def test_rank_without_gradients_gives_clear_error(tmp_path):
    # rank 1 skips its backward at step 2: the presence check names the slot (reduces at step() only:
    # with launches from the hooks, rank 0's launched reduces would meet rank 1's check first)
    res, _ = run(tmp_path, "nograd", "--opt", "lsp", "--no-overlap", "--skip-backward-rank", 1, check=False)
    assert "rank 0: 'lsp0:[40, 24]->12x12' has a compressed gradient on 1 of 2 ranks" in res["error"], res["error"]


@pytest.mark.parametrize("when", ["step", "save"])
def test_dead_rank_gives_clear_error_and_no_checkpoint(tmp_path, when):
    ck = tmp_path / "ck.pt"
    res, p = run(tmp_path, "die", "--opt", "lsp", "--die", when, "--save-at", 2, "--ckpt", ck, check=False,
                 monitor_s=5)
    assert p.returncode != 0  # torchrun reports the dead rank
    err = res["error"]
    assert err.startswith("lspo.distributed: rank 0 of 2: the collective"), err
    # the first collective that waits on the dead peer: the reduces launched during backward, or the
    # presence check after them
    assert any(w in err for w in (("state_dict gather",) if when == "save" else
                                  ("gradient presence check", "gradient reduce"))), err
    assert not ck.exists() and not [f for f in os.listdir(tmp_path) if f.startswith("ck.pt")]
