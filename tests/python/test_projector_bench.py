"""Smoke test of benchmarks/projector.py at tiny sizes (a 64-wide, 1-layer TinyGPT trained 12 steps on
tinyshakespeare, one 256 x 384 layer for speed): it runs, the last line is the JSON summary with the
documented keys, and projectors learned on the fit-set gradients beat random ones on the LATER
eval gradients (the benchmark's claim, here at d=16, r=4). About 10 s on the 2-core VM."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_projector_benchmark_quick_json():
    args = ["--quick", "--n-embd", "64", "--n-layer", "1", "--n-head", "4", "--block", "32", "--batch", "4",
            "--steps", "12", "--fit-step", "6", "--fit-samples", "3", "--fit-iters", "40",
            "--grid-d", "16,32", "--grid-r", "4", "--l2", "0.01", "--ref-d", "16", "--ref-r", "4",
            "--speed-layers", "256x384", "--speed-d", "64", "--speed-r", "8", "--speed-ref-d", "64", "--speed-ref-r", "8",
            "--tokens", "128", "--reps", "1", "--threads", "1", "--quality-threads", "1"]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "projector.py"), *args],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("learned_vs_random_error_ratio", "cpu_compress_over_gemm", "cpu_compress_over_gemm_bf16",
                "ref_quality", "ref_speed", "max_check_rel_err"):
        assert key in summary, key
    q = summary["ref_quality"]
    assert q["d"] == 16 and q["r"] == 4 and q["layers"] == 4 and q["e_learned_l2"] > 0
    assert 0 < q["e_learned"] < q["e_random"], q
    assert summary["learned_vs_random_error_ratio"] < 1.0
    assert summary["cpu_compress_over_gemm"] > 0 and summary["cpu_compress_over_gemm_bf16"] > 0
    # the speed rows were checked against dense fp32 torch (bf16 is not used in the check)
    assert summary["max_check_rel_err"] < 1e-4
    assert "| 16 | 4 |" in out.stdout and "| 256 x 384 | 64 | 8 |" in out.stdout
