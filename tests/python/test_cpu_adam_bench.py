"""Smoke test of benchmarks/cpu_adam.py: it runs, every peer agrees with lspo, the last line is the
JSON summary with the documented keys. (A 1M-parameter run; speed is not asserted here.)"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_quick_json():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cpu_adam.py"), "--quick", "--sizes", "1",
                          "--reps", "1", "--no-deepspeed"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ("gparam_per_s", "roofline_fraction", "vs_torch_fused", "vs_torch_foreach", "vs_deepspeed"):
        assert key in summary, key
    assert summary["vs_deepspeed"] is None and summary["all_agree"] is True
    assert summary["gparam_per_s"] > 0 and summary["roofline_fraction"] > 0
