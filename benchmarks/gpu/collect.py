"""Bookkeeping of the GPU benchmark harness (benchmarks/gpu/run_all.sh): one folder OUT per device call.

  collect.py stamp CARRY            HERE, before a call (prepare_carry.sh runs it): CARRY/COMMIT (the git
                                    commit, "+dirty" with local changes), CARRY/FILES (the files that travel)
                                    and CARRY/TREEHASH (their contents' sha256): .git does not travel
  collect.py env OUT [--carry C]    THERE: OUT/env.json (device, torch, CUDA, CPU, commit; the commit is
                                    marked "(tree differs)" when the tree no longer matches the stamp)
  collect.py add OUT NAME --rc RC --wall S --stdout F --stderr F [--limit S] [--tags T] [--skipped WHY]
                                    one bench's row from its STDOUT's last JSON line (stderr only for the
                                    error text), with env's device/torch/cuda/commit; appends it to
                                    OUT/bench.jsonl, rewrites OUT/results.json and OUT/table.md, prints one line
  collect.py stage OUT NAME --rc RC --wall S [--text T]
                                    a build/test stage's outcome -> OUT/stages.jsonl (+ results, table)
  collect.py OUT [--save DIR]       print the table (OUT is only read); --save writes the results
                                    to DIR/<device>-<date>.json (benchmarks/results)
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys

ENV_KEYS = ("device", "torch", "cuda", "commit")


# ---------------------------------------------------------------- commit stamp (here) and env (there)
def tree_hash(root, files):
    h = hashlib.sha256()
    for f in files:
        p = os.path.join(root, f)
        if not os.path.isfile(p):
            return None
        h.update(f.encode() + b"\0")
        with open(p, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def stamp(carry, root):
    git = lambda *a: subprocess.run(["git", "-C", root, *a], check=True, capture_output=True, text=True).stdout
    files = sorted(f for f in git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()
                   if os.path.isfile(os.path.join(root, f)))
    th = tree_hash(root, files)
    commit = git("rev-parse", "HEAD").strip()
    if git("status", "--porcelain").strip():  # local changes: the content hash tells two such trees apart
        commit += f"+dirty.{th[:12]}"
    os.makedirs(carry, exist_ok=True)
    with open(os.path.join(carry, "COMMIT"), "w") as f:
        f.write(commit + "\n")
    with open(os.path.join(carry, "FILES"), "w") as f:
        f.write("\n".join(files) + "\n")
    with open(os.path.join(carry, "TREEHASH"), "w") as f:
        f.write(th + "\n")
    print(f"stamped {carry}: {commit}, {len(files)} files")


def commit_of(carry, root):
    """(commit, tree_verified): LSPO_COMMIT wins; else CARRY/COMMIT checked against the tree here."""
    if os.environ.get("LSPO_COMMIT"):
        return os.environ["LSPO_COMMIT"], None
    try:
        commit = open(os.path.join(carry, "COMMIT")).read().strip()
        files = [l for l in open(os.path.join(carry, "FILES")).read().splitlines() if l]
        want = open(os.path.join(carry, "TREEHASH")).read().strip()
    except OSError:
        return "unknown", None
    ok = tree_hash(root, files) == want
    return (commit if ok else commit + " (tree differs)"), ok


def make_env(out, carry, root):
    import torch

    cuda = torch.cuda.is_available()
    p = torch.cuda.get_device_properties(0) if cuda else None
    cpu = ""
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except (OSError, IndexError):
        pass
    commit, verified = commit_of(carry, root)
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu",
           "sm_count": p.multi_processor_count if p else None,
           "gpu_mem_gib": round(p.total_memory / 2**30, 1) if p else None,
           "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu, "cpu_count": os.cpu_count(),
           "commit": commit, "tree_verified": verified, "python": platform.python_version()}
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f)
    print(json.dumps(env))


# ---------------------------------------------------------------- rows
def load(out):
    env = {}
    if os.path.exists(os.path.join(out, "env.json")):
        env = json.load(open(os.path.join(out, "env.json")))

    def jsonl(name):
        path = os.path.join(out, name)
        return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []

    runs = jsonl("bench.jsonl")
    for r in runs:  # every row names the device, torch, CUDA and commit it ran with
        for k in ENV_KEYS:
            r.setdefault(k, env.get(k))
    return env, runs, jsonl("stages.jsonl")


def last_json(text):
    """The last stdout line that is a JSON object, or None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except ValueError:
                return None
            return d if isinstance(d, dict) else None
        if line:
            return None
    return None


def bench_row(name, rc, wall, stdout, stderr, limit=None, tags="", skipped=None):
    tags = tags.split()
    if skipped:
        return {"bench": name, "tags": tags, "ok": False, "skipped": True, "error": f"skipped: {skipped}"}
    row = last_json(stdout)
    if rc in (124, 137):
        err = f"timeout: killed after {limit} s"
        row = dict(row or {}, ok=False, timeout=True, error=err)
    elif row is None:
        tail = " / ".join(l.strip() for l in stderr.strip().splitlines()[-3:])
        row = {"ok": False, "error": f"rc={rc}, no JSON line on stdout; stderr: {tail[-300:]}"}
    elif rc != 0 and row.get("ok", True):
        row = dict(row, ok=False, error=f"rc={rc}")
    row.update(bench=name, tags=tags, rc=rc, wall_s=wall)
    if limit is not None:
        row["limit_s"] = limit
    return row


def write(out):
    env, runs, stages = load(out)
    doc = {"env": env, "stages": stages, "runs": runs, "tiers": tier_comparisons(runs)}
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))  # a kill mid-write leaves the previous one
    text = render(env, stages, runs)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    return doc, text


def append(out, name, row):
    with open(os.path.join(out, name), "a") as f:
        f.write(json.dumps(row) + "\n")
    write(out)


def status(r):
    if r.get("ok"):
        return "ok"
    if r.get("skipped"):
        return r["error"]
    if "expect-oom" in r.get("tags", []) and r.get("oom"):
        return "OOM (expected)"
    return "FAILED: " + " ".join(str(r.get("error", "")).split())[:160].replace("|", "/")


def summary_line(r):
    keys = [k for k in ("iter_s", "peak_mem_gib", "h2d_gb_s", "d2h_gb_s", "duplex_total_gb_s",
                        "gather_over_gemm_4096x4096_d1024_r8", "pin_fallbacks") if isinstance(r.get(k), (int, float))]
    facts = " ".join(f"{k}={r[k]:.3g}" for k in keys)
    wall = f" ({r['wall_s']} s)" if "wall_s" in r else ""
    return f"bench {r.get('bench')}: {status(r)}{wall} {facts}".rstrip()


# ---------------------------------------------------------------- table
def table(runs):
    """Markdown table of the LLaMA runs; 'vs AdamW' divides by torch AdamW's time on the whole card
    with the same model, batch and checkpointing."""
    llama = [r for r in runs if r.get("opt")]
    base = {(r.get("model"), r.get("batch"), bool(r.get("ckpt"))): r["iter_s"] for r in llama
            if r.get("opt") == "adamw" and r.get("ok") and not r.get("mem_cap_gb")}
    rows = ["| run | model | optimizer | batch | ckpt | cap GiB | iter s | vs AdamW | peak GPU GiB | pin fallbacks | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in llama:
        opt = r["opt"] + (f" d={r.get('subspace')} r={r.get('nnz')}" if r["opt"] == "lsp" else "")
        it = r.get("iter_s")
        b = base.get((r.get("model"), r.get("batch"), bool(r.get("ckpt"))))
        it_s = f"{it:.3f}" if it else "-"
        ratio = f"{it / b:.2f}" if it and b and not r.get("smoke") else "-"
        peak = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        model = r.get("model", "") + (" (smoke)" if r.get("smoke") else "")
        rows.append(f"| {r.get('bench', '')} | {model} | {opt} | {r.get('batch', '')} | "
                    f"{'yes' if r.get('ckpt') else 'no'} | {r.get('mem_cap_gb') or '-'} | {it_s} | {ratio} | "
                    f"{peak} | {r.get('pin_fallbacks', '-')} | {status(r)} |")
    return "\n".join(rows)


def tier_comparisons(runs):
    """One entry per run with the memory tiers (llama_iter.py --plan-device-gb/--plan-host-gb): its time
    per step against the same model and optimizer without tiers ("native": on the whole card if that
    ran, else under a cap) and against ZeRO-Offload (opt deepspeed) on the same model and batch, as
    ratios where both ran (smoke runs: no ratios)."""
    def find(pred):
        got = [r for r in runs if r.get("ok") and not r.get("smoke") and isinstance(r.get("iter_s"), (int, float))
               and not r.get("tiers") and pred(r)]
        got.sort(key=lambda r: r.get("mem_cap_gb") is not None)  # the whole card first
        return got[0] if got else None

    out = []
    for r in runs:
        if not r.get("tiers"):
            continue
        key = (r.get("model"), r.get("batch"))
        nat = find(lambda q: (q.get("model"), q.get("batch")) == key and q.get("opt") == r.get("opt"))
        zo = find(lambda q: (q.get("model"), q.get("batch")) == key and q.get("opt") == "deepspeed")
        it = r.get("iter_s") if r.get("ok") and not r.get("smoke") else None
        plan = r.get("tier_plan") or {}
        out.append({"bench": r.get("bench"), "model": r.get("model"), "opt": r.get("opt"), "ok": bool(r.get("ok")),
                    "smoke": bool(r.get("smoke")), "iter_s": r.get("iter_s"), "peak_mem_gib": r.get("peak_mem_gib"),
                    "peak_cpu_rss_gib": r.get("peak_cpu_rss_gib"), "plan": plan,
                    "native_bench": nat and nat["bench"], "native_iter_s": nat and nat["iter_s"],
                    "vs_native": it / nat["iter_s"] if it and nat else None,
                    "zero_offload_bench": zo and zo["bench"], "zero_offload_iter_s": zo and zo["iter_s"],
                    "vs_zero_offload": it / zo["iter_s"] if it and zo else None, "status": status(r)})
    return out


def tier_table(runs):
    comps = tier_comparisons(runs)
    if not comps:
        return ""
    f = lambda v, fmt="{:.3f}": fmt.format(v) if isinstance(v, (int, float)) else "-"
    rows = ["| tiers run | model | weights | activations keep/swap/recompute | state host / disk GiB | iter s | "
            "vs native (run) | vs ZeRO-Offload (run) | peak GPU GiB | peak host RSS GiB | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        p = c["plan"]
        pol = p.get("policies") or {}
        w = (f"streamed, window {p.get('window')}" if p.get("streamed") else "resident") if p else "-"
        rows.append(f"| {c['bench']} | {c['model']}{' (smoke)' if c['smoke'] else ''} | {w} | "
                    f"{pol.get('keep', '-')}/{pol.get('swap', '-')}/{pol.get('recompute', '-')} | "
                    f"{f(p.get('state_host_gib'), '{:.1f}')} / {f(p.get('state_disk_gib'), '{:.1f}')} | "
                    f"{f(c['iter_s'])} | {f(c['vs_native'], '{:.2f}')} ({c['native_bench'] or '-'}) | "
                    f"{f(c['vs_zero_offload'], '{:.2f}')} ({c['zero_offload_bench'] or '-'}) | "
                    f"{f(c['peak_mem_gib'], '{:.2f}')} | {f(c['peak_cpu_rss_gib'], '{:.1f}')} | {c['status']} |")
    return "\n".join(rows)


def render(env, stages, runs):
    out = [f"device: {env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
           f"commit {env.get('commit')}", ""]
    out += [f"- {s['stage']}: rc={s['rc']} ({s['wall_s']} s) {s.get('text', '')}".rstrip() for s in stages]
    out += ["", table(runs), ""]
    tt = tier_table(runs)
    if tt:
        out += [tt, ""]
    out += ["- " + summary_line(r) for r in runs if not r.get("opt") and "/" not in str(r.get("bench", ""))]
    return "\n".join(out)


# ---------------------------------------------------------------- command line
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = argv[0] if argv and argv[0] in ("stamp", "env", "add", "stage") else "table"
    if cmd != "table":
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog=f"collect.py {cmd}")
    ap.add_argument("dir")
    if cmd == "env":
        ap.add_argument("--carry", default=os.path.join(root, ".gpu-carry"))
    if cmd in ("add", "stage"):
        ap.add_argument("name")
        ap.add_argument("--rc", type=int, default=0)
        ap.add_argument("--wall", type=int, default=0)
    if cmd == "add":
        ap.add_argument("--stdout", default=None)
        ap.add_argument("--stderr", default=None)
        ap.add_argument("--limit", type=int, default=None)
        ap.add_argument("--tags", default="")
        ap.add_argument("--skipped", default=None)
    if cmd == "stage":
        ap.add_argument("--text", default="")
    if cmd == "table":
        ap.add_argument("--save", default=None, help="folder to copy results.json into, named by device and date")
    a = ap.parse_args(argv)
    if cmd == "stamp":
        return stamp(a.dir, root)
    if cmd == "env":
        return make_env(a.dir, a.carry, root)
    if cmd == "add":
        read = lambda p: open(p, errors="replace").read() if p and os.path.exists(p) else ""
        row = bench_row(a.name, a.rc, a.wall, read(a.stdout), read(a.stderr), a.limit, a.tags, a.skipped)
        append(a.dir, "bench.jsonl", row)
        print(summary_line(row))
        return
    if cmd == "stage":
        append(a.dir, "stages.jsonl", {"stage": a.name, "rc": a.rc, "wall_s": a.wall, "text": a.text})
        return
    env, runs, stages = load(a.dir)  # (read only: OUT may be the device tool's read-only copy)
    doc, text = {"env": env, "stages": stages, "runs": runs, "tiers": tier_comparisons(runs)}, render(env, stages, runs)
    if a.save:
        os.makedirs(a.save, exist_ok=True)
        dev = re.sub(r"[^A-Za-z0-9]+", "-", doc["env"].get("device") or "cpu").strip("-").lower()
        name = f"{dev}-{datetime.date.today().isoformat()}.json"
        with open(os.path.join(a.save, name), "w") as f:
            json.dump(doc, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
