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


def test_finetune_protocol_smoke(tmp_path):
    """--finetune --quick at toy length (5 pretraining steps, cached under tmp_path; 4 fine-tuning steps,
    one lr): every optimizer of the protocol runs, the JSON has the report's keys, LSPAdamW's refit
    statistics are there and the curves are written to --out."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LSPO_CACHE=str(tmp_path))
    out_json = tmp_path / "ft.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "convergence.py"), "--finetune", "--quick",
                          "--pretrain-steps", "5", "--ft-steps", "4", "--ft-lrs", "1e-3", "--ft-eval", "8",
                          "--plot-dir", str(tmp_path), "--out", str(out_json)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(s["runs"]) == {"adamw", "lsp", "lsp_scale1", "lsp_sparse", "lora_r16", "lora_r64", "galore"}
    for k in ("lsp_vs_adamw_finetune_loss_ratio", "lsp_vs_lora_loss_ratio", "lsp_vs_galore_loss_ratio",
              "refit_time_fraction"):
        assert s[k] is not None and s[k] > 0, k
    assert "learned_vs_random_heldout_error" in s  # None here: one refit check in 4 steps
    lsp = s["runs"]["lsp"]  # the defaults: one-sided, SVD basis
    assert lsp["refit_checks"] == 8 and lsp["refits_fitted"] >= 1  # 4 matrices x 2 blocks, checked at step 1
    assert lsp["state_bytes"] < s["runs"]["adamw"]["state_bytes"]
    sparse = s["runs"]["lsp_sparse"]  # the square sparse layout, whose bytes are the one-sided budget
    assert sparse["refit_checks"] == 8 and lsp["state_bytes"] <= sparse["state_bytes"]
    assert s["sparse"]["vs_galore"] > 0 and s["sparse"]["state_bytes_vs_lsp"] >= 1.0
    assert s["sparse_one_sided"]["vs_adamw"] is None  # not run
    assert s["svd_scale1"]["state_bytes_vs_lsp"] == 1.0  # the same layout, another update scale
    full = json.loads(out_json.read_text())
    assert set(full["curves"]) == set(s["runs"])
    for p in s["plots"]:
        assert os.path.getsize(p) > 1000, p
