"""CPU smoke test of the GPU benchmark harness (benchmarks/gpu/): the scripts a GPU session runs
must at least work end to end on a tiny model here, so a device call is not wasted on a typo."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU = os.path.join(ROOT, "benchmarks", "gpu")


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.mark.parametrize("opt", ["adamw", "lsp", "offload"])
def test_llama_iter_runs_on_cpu_and_collects(opt, tmp_path):
    pytest.importorskip("transformers")
    trace = tmp_path / "trace.json"
    p = _run([os.path.join(GPU, "llama_iter.py"), "--device", "cpu", "--model", "tiny", "--seq", "32",
              "--batch", "1", "--steps", "2", "--warmup", "1", "--opt", opt, "--subspace", "16", "--nnz", "4",
              "--trace", str(trace)])
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ok"], res.get("error")
    assert res["iter_s"] > 0 and res["peak_cpu_rss_gib"] > 0
    assert res["params_b"] > 0
    if opt != "adamw":
        assert "adam" in trace.read_text()  # the engine timeline was written
    # the collector turns run_all.sh's folder into results JSON + a table
    (tmp_path / "env.json").write_text(json.dumps({"device": "cpu-smoke", "torch": "x", "cuda": None}))
    (tmp_path / "bench.jsonl").write_text(json.dumps(dict(res, bench="smoke")) + "\n")
    c = _run([os.path.join(GPU, "collect.py"), str(tmp_path), "--save", str(tmp_path / "results")])
    assert c.returncode == 0, c.stderr
    assert f"| smoke | tiny | {opt}" in c.stdout
    saved = list((tmp_path / "results").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("cpu-smoke-")
    assert json.load(open(saved[0]))["runs"][0]["opt"] == opt


def test_gpu_scripts_parse():
    for f in ("pcie.py", "llama_iter.py", "collect.py"):
        p = _run(["-m", "py_compile", os.path.join(GPU, f)])
        assert p.returncode == 0, (f, p.stderr)
    for f in ("run_all.sh", "benches.sh", "prepare_carry.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(GPU, f)]).returncode == 0, f
