"""Turns one run_all.sh output folder into benchmarks/results/<device>-<date>.json material.

  python benchmarks/gpu/collect.py OUT_DIR [--save benchmarks/results]

Reads OUT_DIR/env.json and OUT_DIR/bench.jsonl, writes OUT_DIR/results.json ({"env": ...,
"runs": [...]}, and a copy under --save when given) and prints a markdown table of the LLaMA runs
(per-iteration time, peak memory, ratio to torch AdamW of the same model when it ran).
"""
import argparse
import datetime
import json
import os
import re


def load(out):
    env = json.load(open(os.path.join(out, "env.json")))
    runs = []
    path = os.path.join(out, "bench.jsonl")
    if os.path.exists(path):
        runs = [json.loads(l) for l in open(path) if l.strip()]
    return env, runs


def table(runs):
    llama = [r for r in runs if r.get("opt")]
    base = {r["model"]: r["iter_s"] for r in llama
            if r.get("opt") == "adamw" and r.get("ok") and not r.get("mem_cap_gb")}
    rows = ["| run | model | optimizer | batch | cap GB | iter s | vs AdamW | peak GPU GiB | ok |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in llama:
        opt = r["opt"] + (f" d={r.get('subspace')} r={r.get('nnz')}" if r["opt"] == "lsp" else "")
        it = r.get("iter_s")
        it_s = f"{it:.3f}" if it else "-"
        ratio = f"{it / base[r['model']]:.2f}" if it and r.get("model") in base else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        ok = "yes" if r.get("ok") else "no: " + str(r.get("error", ""))[:80].replace("|", "/")
        rows.append(f"| {r.get('bench', '')} | {r.get('model', '')} | {opt} | {r.get('batch', '')} | "
                    f"{r.get('mem_cap_gb') or '-'} | {it_s} | {ratio} | {mem} | {ok} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--save", default=None, help="folder to copy results.json into, named by device and date")
    a = ap.parse_args()
    env, runs = load(a.out)
    doc = {"env": env, "runs": runs}
    json.dump(doc, open(os.path.join(a.out, "results.json"), "w"), indent=1)
    if a.save:
        os.makedirs(a.save, exist_ok=True)
        dev = re.sub(r"[^A-Za-z0-9]+", "-", env.get("device") or "cpu").strip("-").lower()
        name = f"{dev}-{datetime.date.today().isoformat()}.json"
        json.dump(doc, open(os.path.join(a.save, name), "w"), indent=1)
    print(f"device: {env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, commit {env.get('commit')}\n")
    print(table(runs))


if __name__ == "__main__":
    main()
