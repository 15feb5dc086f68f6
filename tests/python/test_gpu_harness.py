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
       "c13_lsp_4g", "c13_torchao_4g", "n13_lsp2048", "c67_torchao_24g", "c13_offload_4g", "n13_deepspeed",
       "tmax_lsp_tiers_24g", "tmax_lsp_24g", "tmax_lsp_native", "t67_lsp_tiers_24g", "t67_deepspeed_24g"]
CALL1 = ALL[:7]
TIERS = ALL[13:]


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
    assert [r[0] for r in _benches("expect-oom")] == ["c13_offload_4g", "tmax_lsp_24g"]
    assert _benches("nosuchbench") == []
    li = _load_llama_iter()
    for name, tags, est, limit, cmd in _benches():
        assert 0 < est <= limit <= (420 if "tiers" in tags else 300), name
        if not cmd[1].endswith("llama_iter.py"):
            continue
        args = li.parse_args(cmd[2:])  # every flag of every bench exists (argparse exits otherwise)
        assert args.seq == 1024 and args.opt in ("adamw", "lsp", "offload", "torchao", "deepspeed"), name
        if "tiers" in tags:
            continue
        assert ("capped" in tags) == (args.mem_cap_gb is not None) == args.ckpt, name
    c13 = {r[0]: r[4] for r in _benches("c13_lsp_4g", LSPO_C13_D="384")}["c13_lsp_4g"]
    assert li.parse_args(c13[2:]).subspace == 384
    smoke = _benches("n13_adamw", LSPO_GPU_SMOKE="1")[0][4]
    assert li.parse_args(smoke[2:]).smoke


def test_tiers_benches():
    """The issue-13 cases: the largest model with the tier plan under 24 GiB, the same model without
    tiers under the cap (expected OOM) and on the whole card, and the 6.7B pair with ZeRO-Offload."""
    rows = _benches("tiers")
    assert [r[0] for r in rows] == TIERS
    assert [r[0] for r in _benches("call2")][-len(TIERS):] == TIERS  # at the end of call 2
    li = _load_llama_iter()
    a = {name: li.parse_args(cmd[2:]) for name, _, _, _, cmd in rows}
    for name in ("tmax_lsp_tiers_24g", "t67_lsp_tiers_24g"):
        assert li.tiered(a[name]) and a[name].mem_cap_gb == 24 and not a[name].ckpt and a[name].opt == "lsp"
        assert a[name].plan_device_gb <= 24 - a[name].cuda_context_gib and a[name].state_dir
    assert a["tmax_lsp_tiers_24g"].model == a["tmax_lsp_24g"].model == a["tmax_lsp_native"].model == "30b"
    assert not li.tiered(a["tmax_lsp_24g"]) and a["tmax_lsp_24g"].mem_cap_gb == 24
    assert not li.tiered(a["tmax_lsp_native"]) and a["tmax_lsp_native"].mem_cap_gb is None
    assert a["t67_deepspeed_24g"].opt == "deepspeed" and a["t67_deepspeed_24g"].model == "6.7b"
    assert a["t67_deepspeed_24g"].mem_cap_gb == 24
    same = lambda x: (x.batch, x.subspace, x.nnz, x.refit_every, x.steps, x.warmup)
    assert same(a["tmax_lsp_tiers_24g"]) == same(a["tmax_lsp_24g"]) == same(a["tmax_lsp_native"])
    assert a["tmax_lsp_tiers_24g"].refit_every == 0  # a refit check holds an fp32 copy of every gradient
    assert _benches("tmax_lsp_native", LSPO_TIERS_MODEL="13b")[0][4][4:6] == ["--model", "13b"]
    # the planner's verdict the comments in benches.sh rely on: 30b fits 22 GiB streamed, its bf16
    # weights do not fit the cap resident; 65B-class weights would not fit the 128 GiB host
    assert li.param_count("30b") * 2 > 23.5 * 2**30


def test_tier_plan_of_the_largest_model(capsys):
    """llama_iter --plan with the tier flags: the meta-device plan of 30b under the benches' budgets."""
    pytest.importorskip("transformers")
    # (in this process, as the tests below: a subprocess spent most of its time importing torch and transformers)
    _load_llama_iter().main(["--plan", "--model", "30b", "--opt", "lsp", "--subspace", "1024", "--nnz", "8",
                             "--mem-cap-gb", "24", "--plan-device-gb", "22", "--plan-host-gb", "110"])
    stdout = capsys.readouterr().out
    plan = json.loads(stdout.strip().splitlines()[-1])
    assert "lspo tier plan" in stdout
    assert plan["feasible"] and plan["streamed"] and plan["window"] >= 1, plan
    assert plan["device_gib"] <= 22 and plan["host_gib"] <= 110 and plan["state_disk_gib"] == 0
    assert abs(plan["params_b"] - 32.53) < 0.01


def test_llama_iter_tiers_state_on_disk(tmp_path, capsys):
    """The state tier through llama_iter: a host budget the plan of 6.7B full offload cannot meet puts
    state in files (the smoke run keeps the plan's proportion), the run's folder is removed after."""
    pytest.importorskip("transformers")
    _load_llama_iter().main(["--smoke", "--model", "6.7b", "--opt", "offload", "--mem-cap-gb", "24",
                             "--plan-device-gb", "22", "--plan-host-gb", "40", "--state-dir", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["ok"], res.get("error")
    assert any("lspo tier plan" in l for l in out)
    p = res["tier_plan"]
    assert p["feasible"] and p["streamed"] and p["state_disk_gib"] > 0 and p["state_host_gib"] > 0
    assert res["tier_applied"]["offload_params"] and res["tier_applied"]["host_memory_limit_gib"] > 0
    assert res["disk_slots"] > 0 and res["disk_state_gib"] > 0 and res["io_gib_per_iter"] > 0
    assert res["runner_peak_weight_gib"] > 0
    assert os.listdir(tmp_path) == []  # the run's state folder is gone


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
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run_all.sh of real benches as tiny CPU runs (--smoke): two of calls 1/2 and every tiers bench
    (one run for both tests below: each run_all.sh start costs a torch import for its env.json).
    (folder, results.json, {bench: row})."""
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("smoke")
    doc, runs, _, _ = _run_all(tmp, None, timeout=640, LSPO_GPU_SMOKE="1", LSPO_GPU_DEADLINE="560",
                               LSPO_GPU_BENCH="n13_lsp c13_offload_4g tiers")
    assert list(runs) == ["n13_lsp", "c13_offload_4g"] + TIERS  # the selection, in benches.sh's order
    return tmp, doc, runs


def test_run_all_smoke_of_real_benches(smoke, tmp_path):
    out, doc, runs = smoke
    for name, model, batch in (("n13_lsp", "1.3b", 4), ("c13_offload_4g", "1.3b", 1)):
        r = runs[name]
        assert r["ok"], (name, r.get("error"))
        assert r["smoke"] and r["model"] == model and r["batch"] == batch  # the requested configuration
        assert r["iter_s"] > 0 and r["param_dtypes"] == ["bfloat16"] and r["params_b"] > 0
    assert runs["c13_offload_4g"]["ckpt"] and runs["c13_offload_4g"]["mem_cap_gb"] == 4
    assert runs["n13_lsp"]["projected_layers"] == 14 and runs["n13_lsp"]["subspace"] == 1280
    assert runs["n13_lsp"]["pin_fallbacks"] == 0
    table = (out / "out" / "table.md").read_text()
    assert "| n13_lsp | 1.3b (smoke) | lsp d=1280 r=4 | 4 | no | - |" in table
    # the collector's --save copy for benchmarks/results
    c = subprocess.run([sys.executable, os.path.join(GPU, "collect.py"), str(out / "out"), "--save",
                        str(tmp_path / "results")], capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    saved = list((tmp_path / "results").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("cpu-")
    assert [r["bench"] for r in json.load(open(saved[0]))["runs"]] == list(runs)


def test_run_all_smoke_of_tiers_benches(smoke):
    """Every tiers command line as a tiny CPU run (the plan is still the requested model's)."""
    out, doc, runs = smoke
    for name in TIERS:
        r = runs[name]
        if r["opt"] == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            assert not r["ok"] and "deepspeed" in r["error"]  # not installed here (the device has its wheel)
            continue
        assert r["ok"], (name, r.get("error"))
        assert r["smoke"] and r["iter_s"] > 0 and r["peak_cpu_rss_gib"] > 0
    for name in ("tmax_lsp_tiers_24g", "t67_lsp_tiers_24g"):
        r = runs[name]
        assert r["tiers"] and r["tier_plan"]["feasible"] and r["tier_plan"]["streamed"], r["tier_plan"]
        assert r["tier_applied"]["offload_params"] and r["runner_peak_weight_gib"] > 0
        assert r["tier_plan"]["state_disk_gib"] == 0 and r["disk_slots"] == 0  # LSP's state fits the host
    assert runs["tmax_lsp_tiers_24g"]["model"] == "30b" and runs["t67_lsp_tiers_24g"]["model"] == "6.7b"
    # the plan of the requested configuration (d=1024), not of the tiny run's d
    assert abs(runs["tmax_lsp_tiers_24g"]["tier_plan"]["state_host_gib"] - 19.38) < 0.01
    table = (out / "out" / "table.md").read_text()
    assert "| tmax_lsp_tiers_24g | 30b (smoke) | streamed, window " in table
    assert [c["bench"] for c in doc["tiers"]] == ["tmax_lsp_tiers_24g", "t67_lsp_tiers_24g"]
    assert all(c["vs_native"] is None for c in doc["tiers"])  # smoke runs give no ratios


def test_collect_tier_ratios():
    spec = importlib.util.spec_from_file_location("collect", os.path.join(GPU, "collect.py"))
    col = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(col)
    runs = [
        {"bench": "cap", "model": "m", "opt": "lsp", "batch": 1, "ok": True, "iter_s": 0.4, "mem_cap_gb": 24},
        {"bench": "nat", "model": "m", "opt": "lsp", "batch": 1, "ok": True, "iter_s": 0.5},
        {"bench": "oom", "model": "m", "opt": "lsp", "batch": 1, "ok": False, "oom": True, "mem_cap_gb": 24},
        {"bench": "t", "model": "m", "opt": "lsp", "batch": 1, "ok": True, "iter_s": 2.0, "tiers": True,
         "tier_plan": {"streamed": True, "window": 4, "policies": {"keep": 3, "swap": 0, "recompute": 57}}},
        {"bench": "zo", "model": "m", "opt": "deepspeed", "batch": 1, "ok": True, "iter_s": 1.0, "mem_cap_gb": 24},
        {"bench": "t2", "model": "n", "opt": "lsp", "batch": 1, "ok": True, "iter_s": 2.0, "tiers": True},
    ]
    c = {x["bench"]: x for x in col.tier_comparisons(runs)}
    assert list(c) == ["t", "t2"]
    assert c["t"]["native_bench"] == "nat" and c["t"]["vs_native"] == 4.0  # the whole card before a capped run
    assert c["t"]["zero_offload_bench"] == "zo" and c["t"]["vs_zero_offload"] == 2.0
    assert c["t2"]["vs_native"] is None and c["t2"]["vs_zero_offload"] is None  # nothing to compare with
    runs.pop(1)
    assert col.tier_comparisons(runs)[0]["native_bench"] == "cap"
    text = col.tier_table(runs)
    assert "| t | m | streamed, window 4 | 3/0/57 |" in text and "5.00 (cap)" in text and "2.00 (zo)" in text


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
    opt = lspo.LSPAdamW(model, subspace=64, nnz=4, one_sided=False, basis="sparse")  # llama_iter's layout
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
