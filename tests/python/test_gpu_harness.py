"""CPU smoke test of the GPU benchmark harness (benchmarks/gpu/): the scripts a device call runs must
work end to end here, on tiny models and stub benches, so that no device time is lost on the harness:
which benches benches.sh selects and with which command lines, run_all.sh's deadline, per-bench
timeout, skipping and collection after every bench (reading only stdout), the commit stamp, the bf16
model build and the memory arithmetic of the capped LSP run."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU = os.path.join(ROOT, "benchmarks", "gpu")
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), PY=sys.executable)
ALL = ["pcie", "projector", "n13_adamw", "n13_lsp", "c67_lsp_24g", "n13_offload", "n13_torchao",
       "c13_lsp_4g", "c13_torchao_4g", "n13_lsp2048", "c67_torchao_24g", "c13_offload_4g", "n13_deepspeed"]
CALL1 = ALL[:7]


def _load_llama_iter():
    spec = importlib.util.spec_from_file_location("llama_iter", os.path.join(GPU, "llama_iter.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _benches(select=None, **env):
    """Sources benches.sh with a stub runner: [(name, tags, est, limit, argv)] it would run."""
    stub = 'run_bench() { printf "%s\\t%s\\t%s\\t%s" "$1" "$2" "$3" "$4"; shift 4; printf "\\t%q" "$@"; echo; }'
    e = dict(ENV, ROOT=ROOT, **env)
    e.pop("LSPO_GPU_BENCH", None)
    if select is not None:
        e["LSPO_GPU_BENCH"] = select
    p = subprocess.run(["bash", "-c", f'{stub}; source "{GPU}/benches.sh"'], capture_output=True, text=True, env=e)
    assert p.returncode == 0, p.stderr
    rows = []
    for line in p.stdout.splitlines():
        name, tags, est, limit, *cmd = line.split("\t")
        rows.append((name, tags.split(), int(est), int(limit), [shlex.split(c)[0] if c else "" for c in cmd]))
    return rows


def _run_all(tmp_path, benches=None, timeout=120, **env):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    e = dict(ENV, OUT=str(out), LSPO_GPU_STAGES="bench", LSPO_GPU_CARRY=str(tmp_path / "carry"))
    e.pop("LSPO_GPU_BENCH", None)
    e.update(env)
    if benches is not None:
        (tmp_path / "benches.sh").write_text(benches)
        e["LSPO_GPU_BENCHES"] = str(tmp_path / "benches.sh")
    t0 = time.time()
    p = subprocess.run(["bash", os.path.join(GPU, "run_all.sh")], capture_output=True, text=True, env=e,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.load(open(out / "results.json"))
    return doc, {r["bench"]: r for r in doc["runs"]}, p.stdout, time.time() - t0


# ---------------------------------------------------------------- benches.sh: selection and command lines
def test_benches_selection_and_command_lines():
    assert [r[0] for r in _benches()] == ALL  # GROUPS (a bash special variable) once made this empty
    assert "c67_offload_24g" not in ALL
    assert [r[0] for r in _benches("call1")] == CALL1
    assert [r[0] for r in _benches("call2")] == ALL[7:]
    assert [r[0] for r in _benches("kernels n13_lsp c13_lsp_4g")] == ["projector", "n13_lsp", "c13_lsp_4g"]
    assert [r[0] for r in _benches("expect-oom")] == ["c13_offload_4g"]
    assert _benches("nosuchbench") == []
    li = _load_llama_iter()
    for name, tags, est, limit, cmd in _benches():
        assert 0 < est <= limit <= 300, name
        if not cmd[1].endswith("llama_iter.py"):
            continue
        args = li.parse_args(cmd[2:])  # every flag of every bench exists (argparse exits otherwise)
        assert args.seq == 1024 and args.opt in ("adamw", "lsp", "offload", "torchao", "deepspeed"), name
        assert ("capped" in tags) == (args.mem_cap_gb is not None) == args.ckpt, name
    c13 = {r[0]: r[4] for r in _benches("c13_lsp_4g", LSPO_C13_D="384")}["c13_lsp_4g"]
    assert li.parse_args(c13[2:]).subspace == 384
    smoke = _benches("n13_adamw", LSPO_GPU_SMOKE="1")[0][4]
    assert li.parse_args(smoke[2:]).smoke


# ---------------------------------------------------------------- run_all.sh: deadline, timeout, collection
STUB = textwrap.dedent('''
    import json, os, sys, time
    what = sys.argv[1]
    if what == "ok":
        print("some progress output")
        print(json.dumps({"ok": True, "iter_s": 0.5}), flush=True)
        print("Warning: something at interpreter exit", file=sys.stderr)  # once dropped merged-stream runs
    elif what == "sleep":
        print("started", flush=True)
        time.sleep(float(sys.argv[2]))
        print(json.dumps({"ok": True}))
    elif what == "crash":
        raise RuntimeError("boom before any JSON")
    elif what == "seen":  # what the collector had written before this bench started
        doc = json.load(open(os.path.join(os.environ["OUT"], "results.json")))
        print(json.dumps({"ok": True, "seen": [r["bench"] for r in doc["runs"]]}))
''')


def test_run_all_timeout_skip_and_collect_after_every_bench(tmp_path):
    (tmp_path / "stub.py").write_text(STUB)
    s = f'"$PY" {tmp_path / "stub.py"}'
    benches = textwrap.dedent(f'''
        run_bench ok1   "t" 1 30 {s} ok
        run_bench slow  "t" 1 2  {s} sleep 30
        run_bench crash "t" 1 30 {s} crash
        run_bench seen  "t" 1 30 {s} seen
        run_bench late  "t" 1000 2000 {s} ok
    ''')
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("the commit stamp needs a git checkout")
    subprocess.run([sys.executable, os.path.join(GPU, "collect.py"), "stamp", str(tmp_path / "carry")], check=True,
                   capture_output=True)
    commit = (tmp_path / "carry" / "COMMIT").read_text().strip()
    doc, runs, stdout, wall = _run_all(tmp_path, benches, LSPO_GPU_DEADLINE="100")
    assert list(runs) == ["ok1", "slow", "crash", "seen", "late"]
    assert runs["ok1"]["ok"] and runs["ok1"]["iter_s"] == 0.5  # stdout's JSON despite stderr's last line
    assert runs["slow"]["timeout"] and not runs["slow"]["ok"] and runs["slow"]["wall_s"] <= 8
    assert not runs["crash"]["ok"] and "no JSON" in runs["crash"]["error"] and "boom" in runs["crash"]["error"]
    assert runs["seen"]["seen"] == ["ok1", "slow", "crash"]  # results.json was rewritten after each bench
    assert runs["late"]["skipped"] and "needs ~1000 s" in runs["late"]["error"]
    assert doc["env"]["commit"] == commit and doc["env"]["tree_verified"] is True
    for r in runs.values():  # every row names device, torch, CUDA and commit
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["commit"] == commit
        assert "cuda" in r
    assert "bench late: skipped" in stdout and "timeout" in (tmp_path / "out" / "table.md").read_text()
    assert sorted(os.listdir(tmp_path / "out")) == ["bench.jsonl", "env.json", "log.txt", "results.json", "table.md"]

    # the deadline cuts a bench short and skips the next; a changed tree is flagged
    (tmp_path / "carry" / "TREEHASH").write_text("0" * 64 + "\n")
    benches = f'run_bench long "t" 1 100 {s} sleep 60\nrun_bench after "t" 1 100 {s} ok\n'
    doc, runs, _, wall = _run_all(tmp_path / "d", benches, LSPO_GPU_DEADLINE="12",
                                  LSPO_GPU_CARRY=str(tmp_path / "carry"))
    assert runs["long"]["timeout"] and runs["long"]["limit_s"] <= 12 and runs["after"]["skipped"]
    assert wall < 40
    assert doc["env"]["commit"] == commit + " (tree differs)" and doc["env"]["tree_verified"] is False


# ---------------------------------------------------------------- the real benches, as tiny CPU runs
def test_run_all_smoke_of_real_benches(tmp_path):
    pytest.importorskip("transformers")
    doc, runs, stdout, wall = _run_all(tmp_path, None, timeout=240, LSPO_GPU_SMOKE="1", LSPO_GPU_DEADLINE="200",
                                       LSPO_GPU_BENCH="n13_lsp c13_offload_4g")
    assert list(runs) == ["n13_lsp", "c13_offload_4g"]
    for name, model, batch in (("n13_lsp", "1.3b", 4), ("c13_offload_4g", "1.3b", 1)):
        r = runs[name]
        assert r["ok"], (name, r.get("error"))
        assert r["smoke"] and r["model"] == model and r["batch"] == batch  # the requested configuration
        assert r["iter_s"] > 0 and r["param_dtypes"] == ["bfloat16"] and r["params_b"] > 0
    assert runs["c13_offload_4g"]["ckpt"] and runs["c13_offload_4g"]["mem_cap_gb"] == 4
    assert runs["n13_lsp"]["projected_layers"] == 14 and runs["n13_lsp"]["subspace"] == 1280
    assert runs["n13_lsp"]["pin_fallbacks"] == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| n13_lsp | 1.3b (smoke) | lsp d=1280 r=4 | 4 | no | - |" in table
    # the collector's --save copy for benchmarks/results
    c = subprocess.run([sys.executable, os.path.join(GPU, "collect.py"), str(tmp_path / "out"), "--save",
                        str(tmp_path / "results")], capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    saved = list((tmp_path / "results").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("cpu-")
    assert [r["bench"] for r in json.load(open(saved[0]))["runs"]] == list(runs)


@pytest.mark.parametrize("opt", [
    "offload",
    "lsp",
])
def test_llama_iter_ckpt_on_cpu(opt, tmp_path, capsys):
    pytest.importorskip("transformers")
    trace = tmp_path / "trace.json"
    _load_llama_iter().main(["--device", "cpu", "--model", "tiny", "--seq", "32", "--batch", "2", "--steps", "2",
                             "--warmup", "1", "--opt", opt, "--ckpt", "--subspace", "16", "--nnz", "4",
                             "--trace", str(trace)])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ok"], res.get("error")
    assert res["ckpt"] and res["iter_s"] > 0 and res["loss_first_last"][0] > 0
    assert "adam" in trace.read_text()  # the engine timeline was written


# ---------------------------------------------------------------- model build and memory arithmetic
def test_model_is_built_in_bf16_without_an_fp32_copy():
    pytest.importorskip("transformers")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32 = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided) and \
                    out.dtype == torch.float32:
                self.fp32 = max(self.fp32, out.numel())
            return out

    li = _load_llama_iter()
    with Allocs() as a:
        model = li.build_model("tiny", 32, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == li.param_count("tiny")
    h = li.MODELS["tiny"][0]
    assert a.fp32 < h * h  # no fp32 weight was ever allocated (only the small rotary tables are fp32)
    assert torch.get_default_dtype() == torch.float32  # the default dtype is restored


def test_memory_plan_matches_lspadamw_and_the_documented_numbers():
    pytest.importorskip("transformers")
    import lspo

    li = _load_llama_iter()
    model = li.build_model("tiny", 32, "cpu")
    opt = lspo.LSPAdamW(model, subspace=64, nnz=4)
    got = sorted(tuple(p.shape) for p in opt.projected_params)
    assert got == sorted(li.projected_shapes("tiny"))  # the plan counts exactly the layers LSPAdamW projects
    opt.wrap(model)  # the accumulator of S the plan counts: fp32, dP x dQ per projected layer
    x = torch.randint(0, 100, (1, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    for p in opt.projected_params:
        assert tuple(opt.state[p]["exp_avg"].shape) == (min(64, p.shape[0]), min(64, p.shape[1]))
    p13 = li.memory_plan("1.3b", 1280, cap_gib=4)
    assert p13["projected_layers"] == 168 and abs(p13["params_b"] - 1.3454) < 1e-3
    assert abs(p13["pieces_gib"]["lsp_acc_and_update_fp32"] - 1.0315) < 1e-3  # (168 + 1) * 1280^2 * 4 B
    assert abs(p13["pieces_gib"]["weights_bf16"] - 2.506) < 1e-3
    assert not p13["fits"] and p13["max_d"] == 384  # docs/benchmarks.md and benches.sh's LSPO_C13_D default
    p67 = li.memory_plan("6.7b", 2048, cap_gib=24)
    assert p67["fits"] and abs(p67["pieces_gib"]["lsp_acc_and_update_fp32"] - 3.515625) < 1e-6


def test_collect_reads_only_stdout_json():
    spec = importlib.util.spec_from_file_location("collect", os.path.join(GPU, "collect.py"))
    col = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(col)
    r = col.bench_row("b", 0, 3, 'log line\n{"ok": true, "iter_s": 1.0}\n', "UserWarning: at exit\n")
    assert r["ok"] and r["iter_s"] == 1.0
    r = col.bench_row("b", 0, 3, '{"ok": true}\ntrailing text\n', "")
    assert not r["ok"] and "no JSON" in r["error"]
    r = col.bench_row("b", 1, 3, '{"ok": true, "iter_s": 1.0}\n', "")
    assert not r["ok"] and r["error"] == "rc=1"
    r = col.bench_row("b", 0, 3, '{"ok": false, "oom": true, "error": "OutOfMemoryError: x"}\n', "",
                      tags="capped expect-oom")
    assert col.status(r) == "OOM (expected)"


def test_gpu_scripts_parse():
    for f in ("pcie.py", "llama_iter.py", "collect.py", "projector_gpu.py"):
        p = subprocess.run([sys.executable, "-m", "py_compile", os.path.join(GPU, f)], capture_output=True, text=True)
        assert p.returncode == 0, (f, p.stderr)
    for f in ("run_all.sh", "benches.sh", "prepare_carry.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(GPU, f)]).returncode == 0, f
