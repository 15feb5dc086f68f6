#!/usr/bin/env python3
"""Draws an lspo engine timeline (Chrome-trace JSON from ``opt.timeline_json()``) as a PNG: one lane
per thread (caller, worker, copy streams), one bar per stage, backward windows shaded.

  python benchmarks/plot_trace.py docs/img/engine_trace.json docs/img/engine_trace.png
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"backward": "#d9d9d9", "compress": "#4e79a7", "adam": "#e15759", "d2h": "#59a14f", "h2d": "#76b7b2",
          "apply": "#f28e2b", "refit": "#b07aa1", "step": "#9c755f"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("png")
    ap.add_argument("--title", default="lspo engine timeline")
    args = ap.parse_args()
    tr = json.load(open(args.trace))
    names = {e["tid"]: e["args"]["name"] for e in tr["traceEvents"] if e.get("ph") == "M"}
    ev = [e for e in tr["traceEvents"] if e.get("ph") == "X"]
    if not ev:
        raise SystemExit(f"{args.trace}: no events")
    t0 = min(e["ts"] for e in ev)
    tids = sorted({e["tid"] for e in ev} | set(names))
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(tids)))
    seen = set()
    for e in ev:
        x, w = (e["ts"] - t0) / 1e3, e["dur"] / 1e3
        if e["name"] == "backward":  # shade the window across every lane
            ax.axvspan(x, x + w, color=COLORS["backward"], alpha=0.5, lw=0,
                       label=None if "backward" in seen else "backward")
            seen.add("backward")
            continue
        y = tids.index(e["tid"])
        c = COLORS.get(e["name"], "#bab0ac")
        ax.barh(y, max(w, 0.01), left=x, height=0.6, color=c, edgecolor="none",
                label=None if e["name"] in seen else e["name"])
        seen.add(e["name"])
    ax.set_yticks(range(len(tids)), [names.get(t, f"tid {t}") for t in tids])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(args.title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=8, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
