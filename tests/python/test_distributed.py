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


def launch(tmp, cases, world=2, check=True):
    """Runs the cases [(name, args)] in order in one launch (torchrun with `world` ranks, or one plain
    process for world 1): one interpreter start and one process group for all of them (starting
    torchrun and importing torch and lspo took most of a case's time). Returns ({name: rank 0's
    result}, the completed process)."""
    cmd = [sys.executable, WORKER, "--no-dist"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
        f"--master_port={_port()}", WORKER]
    outs = {name: str(tmp / f"{name}.pt") for name, _ in cases}
    for i, (name, args) in enumerate(cases):
        cmd += (["--then"] if i else []) + ["--out", outs[name], *map(str, args)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return {name: torch.load(out, weights_only=False) for name, out in outs.items()}, p


def launch_dying(tmp, name, *args):
    """Both ranks started directly (the env:// variables torchrun would set), so that the survivor's
    error is read no matter when its peer's death is noticed: under torchrun the agent stops every
    worker at its first poll after one died, a race with the survivor writing its error. Returns
    (rank 0's result, [rank 0's, rank 1's exit status])."""
    out = str(tmp / f"{name}.pt")
    port = str(_port())
    procs = []
    for rank in range(2):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, WORKER, "--out", out, *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert os.path.exists(out), f"rank 0 wrote no result; exit codes {codes}\n" + "\n".join(l[-3000:] for l in logs)
    return torch.load(out, weights_only=False), codes


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
def runs(tmp_path_factory):
    """Every two-rank case but the dying ones in one torchrun launch, every one-process reference in
    one process: (folder, checkpoint path, {name: two-rank result}, {name: one-process result})."""
    tmp = tmp_path_factory.mktemp("dist")
    ck = tmp / "ck.pt"
    lsp = ["--opt", "lsp", "--clip", CLIP]
    wrap = ["--opt", "lsp", "--wrap", "--clip", CLIP, "--refit-every", 0]
    amp = ["--opt", "lsp", "--amp", "--inf-step", 2, "--refit-every", 0]
    offload = ["--opt", "offload", "--clip", CLIP]
    two, _ = launch(tmp, [
        ("lsp", lsp + ["--save-at", 3, "--ckpt", ck, "--no-sync"]),
        ("wrap", wrap),
        ("amp", amp),
        ("offload_stale_launches", offload),
        ("offload_no_overlap", offload + ["--no-overlap"]),
        ("resume2", lsp + ["--resume", ck]),  # from the checkpoint "lsp" saved at step 3
        ("svd", lsp + ["--basis", "svd"]),
        # last: its steps end in an error on both ranks
        ("nograd", ["--opt", "lsp", "--no-overlap", "--skip-backward-rank", 1]),
    ])
    one, _ = launch(tmp, [("lsp", lsp), ("wrap", wrap), ("amp", amp), ("offload", offload),
                          ("resume1", lsp + ["--resume", ck]), ("svd", lsp + ["--basis", "svd"])], world=1)
    return tmp, ck, two, one


def test_lsp_two_ranks_match_one_rank(runs):
    _, _, runs2, runs1 = runs
    two, one = runs2["lsp"], runs1["lsp"]
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


def test_svd_basis_two_ranks_match_one_rank(runs):
    # one_sided + basis="svd": the owner's SVD basis reaches the other rank (dense projector values and
    # whitening), and the run equals one process's
    two, one = runs[2]["svd"], runs[3]["svd"]
    assert not two["error"] and two["ranks_identical"]
    assert max_diff(two["params"], one["params"]) < ATOL
    assert state_diff(two["state"], one["state"]) < ATOL
    assert two["refits"] == one["refits"] and len(one["refits"]) == 6 and sum(r[2] for r in one["refits"]) >= 1


def test_lsp_wrap_path_two_ranks_match_one_rank(runs):
    # lspo.wrap: the projected layers' backward hands S to the core (no dense gradient, no hook):
    # their S is reduced at step()
    two, one = runs[2]["wrap"], runs[3]["wrap"]
    assert not two["error"]
    assert max_diff(two["params"], one["params"]) < ATOL
    assert state_diff(two["state"], one["state"]) < ATOL


def test_amp_inf_on_one_rank_skips_everywhere_and_scalers_agree(runs):
    # fp16-style loss scaling: rank 1's loss is inf at step 2 -> the step is skipped on both ranks
    # (global norm), and after sync_grad_scaler both scalers backed off, as one process whose batch
    # holds the inf does
    two, one = runs[2]["amp"], runs[3]["amp"]
    assert not two["error"]
    assert two["skipped"] == one["skipped"] == 1
    assert two["scale"] == one["scale"] == 2.0 ** 9
    assert max_diff(two["params"], one["params"]) < ATOL


def test_lsp_host_state_per_rank_halves(runs):
    two, one = runs[2]["lsp"], runs[3]["lsp"]
    assert len(two["host"]) == 2 and min(two["host"]) > 0
    assert max(two["host"]) <= 0.55 * one["host"][0]
    assert sum(two["host"]) == one["host"][0]  # each slot's state (or range of it) lives on exactly one rank
    assert -1 in two["owners"] and {0, 1} <= set(two["owners"])  # owned slots on both ranks, and a split one


@pytest.mark.parametrize("mode", ["stale_launches", "no_overlap"])
def test_offload_two_ranks_match_one_rank(runs, mode):
    # stale_launches: accumulation without no_sync(): the first micro-batch's launches are outdated by
    # the second and the step reduces again; no_overlap: every reduce at step()
    two, one = runs[2][f"offload_{mode}"], runs[3]["offload"]
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


def test_checkpoint_from_world_two_resumes_in_world_one_and_two(runs):
    tmp, ck, runs2, runs1 = runs
    two = runs2["lsp"]
    assert os.path.exists(ck) and not any(f.startswith("ck.pt.tmp") for f in os.listdir(tmp))
    saved = torch.load(ck, weights_only=False)
    assert saved["step"] == 3 and "lspo_partial" not in saved["optimizer"]
    assert len(saved["optimizer"]["state"]) == 8  # every parameter's state, gathered from both ranks
    again = runs2["resume2"]
    assert not again["error"]
    assert max_diff(again["params"], two["params"]) == 0.0  # same world: bitwise the uninterrupted run
    assert state_diff(again["state"], two["state"]) == 0.0
    alone = runs1["resume1"]
    assert max_diff(alone["params"], two["params"]) < ATOL


def test_rank_without_gradients_gives_clear_error(runs):
    # rank 1 skips its backward at step 2: the presence check names the slot (reduces at step() only:
    # with launches from the hooks, rank 0's launched reduces would meet rank 1's check first)
    res = runs[2]["nograd"]
    assert "rank 0: 'lsp0:[40, 24]->12x12' has a compressed gradient on 1 of 2 ranks" in res["error"], res["error"]


@pytest.mark.parametrize("when", ["step", "save"])
def test_dead_rank_gives_clear_error_and_no_checkpoint(tmp_path, when):
    ck = tmp_path / "ck.pt"
    res, codes = launch_dying(tmp_path, "die", "--opt", "lsp", "--die", when, "--save-at", 2, "--ckpt", ck)
    assert codes == [0, 3]  # rank 1 died (os._exit(3)); rank 0 caught the error and wrote it
    err = res["error"]
    assert err.startswith("lspo.distributed: rank 0 of 2: the collective"), err
    # the first collective that waits on the dead peer: the reduces launched during backward, or the
    # presence check after them
    assert any(w in err for w in (("state_dict gather",) if when == "save" else
                                  ("gradient presence check", "gradient reduce"))), err
    assert not ck.exists() and not [f for f in os.listdir(tmp_path) if f.startswith("ck.pt")]
