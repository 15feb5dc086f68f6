"""Smoke test of benchmarks/convergence.py: every optimizer of the report trains a 64-wide, 1-layer
TinyGPT for 6 steps in one process (--inprocess: no per-run subprocess), the loss falls for each, the
table and both PNG plots are written, and the last line is the JSON summary. 15-45 s on the shared
2-core VM, nearly all of it importing torch, peft, transformers and bitsandbytes (for GaLore): the
price of covering every optimizer of the report."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = ("adamw", "offload", "lsp_d64_r4", "lsp_d128_r8", "lora_r8", "lora_r64", "galore")


def test_convergence_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "convergence.py"), "--quick", "--inprocess",
                          "--plot-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary["runs"]) == set(RUNS)
    for name, r in summary["runs"].items():
        assert r["error"] is None, (name, r["error"])
        assert 0 < r["final_val_loss"] < 5.5, (name, r)   # from ~5.55 (uniform over 256 bytes)
        assert r["state_bytes"] > 0 and r["peak_rss_mb"] > 0
    runs = summary["runs"]
    assert runs["lsp_d64_r4"]["refits"] >= 1 and runs["galore"]["galore_rank"] >= 1
    # OffloadAdamW is AdamW: equal to rounding after 6 steps
    assert abs(runs["offload"]["final_val_loss"] - runs["adamw"]["final_val_loss"]) < 1e-3
    assert set(summary["lsp_vs_adamw"]) == {"lsp_d64_r4", "lsp_d128_r8"}
    for p in summary["plots"]:
        assert os.path.getsize(p) > 1000, p
    assert "| lspo.LSPAdamW d=128 r=8 |" in out.stdout
