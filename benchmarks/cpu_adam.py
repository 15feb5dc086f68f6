#!/usr/bin/env python3
"""Fused CPU Adam: lspo against its peers and against the machine's memory bandwidth, in one run.

Measures
  * the memory bandwidth with lspo's own threaded C++ STREAM loops: the triad a = b + s*c with
    ordinary and with streaming stores, and the in-place update a += s*c (the access pattern of an
    in-place optimizer: no read for ownership); the best of the three is the roofline,
  * lspo's fused Adam (lspo._C.adam_step, and the lspo.CPUAdamW optimizer around it),
  * torch.optim.AdamW with foreach=True and fused=True,
  * deepspeed.ops.adam.DeepSpeedCPUAdam when it can be imported and built (said so if not),
on two workloads, for sizes 1M..64M parameters (one flat tensor: the best case for every peer):
  (a) fp32 grads, fp32 params, fp32 moments;
  (b) offload: bf16 grads in, fp32 master params + moments updated, bf16 params out. Peers whose
      optimizer cannot read bf16 grads / write bf16 params are charged for the conversions they need
      (grad bf16 -> fp32 copy before the step, master fp32 -> bf16 copy after it).
Both workloads must move at least 28 bytes per parameter: (a) grad 4 + p, m, v read and written 24;
(b) grad 2 + 24 + bf16 param out 2. roofline_fraction = 28 * n / time / triad bandwidth.

Times are the best of `--reps` steps after one warm-up step (the same for every peer). After timing,
every peer's final fp32 params are compared with lspo's (same start, same gradients, same number of
steps): the `agree` column says whether they match to 1e-4 relative (and, in (b), whether the bf16
params are exactly the rounded master).

  --quick   workload (b) at 16M only, < 1 minute
Last stdout line: one JSON object (workload (b) at 16M):
  {"gparam_per_s", "roofline_fraction", "vs_torch_fused", "vs_torch_foreach", "vs_deepspeed", ...}
"""
import argparse
import gc
import json
import os
import sys
import time

import torch

import lspo

BYTES_PER_PARAM = 28
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- peers
# Each peer: setup(master fp32 [n], grad, out_bf16 or None) -> step() callable. `grad` is fp32 for
# workload (a) and bf16 for (b); `out` is the bf16 param buffer in (b).

def peer_lspo_kernel(master, grad, out):
    m, v = torch.zeros_like(master), torch.zeros_like(master)
    state = {"step": 0}

    def step():
        state["step"] += 1
        lspo._C.adam_step(master, m, v, grad, param_out=out, step=state["step"], lr=LR, beta1=BETAS[0],
                          beta2=BETAS[1], eps=EPS, weight_decay=WD)
    return step, lambda: master


def peer_lspo_optimizer(master, grad, out):
    # lspo.CPUAdamW as a user runs it: (a) fp32 param; (b) bf16 param with its fp32 master in the
    # optimizer state. Includes the non-finite gradient scan (skip_nonfinite=True, the default).
    if out is None:
        p = torch.nn.Parameter(master)
    else:
        p = torch.nn.Parameter(out)
        p.grad_dtype = None
    opt = lspo.CPUAdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    if out is not None:
        opt.state[p]["step"] = torch.tensor(0.0)
        opt.state[p]["exp_avg"] = torch.zeros_like(master)
        opt.state[p]["exp_avg_sq"] = torch.zeros_like(master)
        opt.state[p]["master_param"] = master  # the same fp32 start as every other peer
    p.grad = grad
    return opt.step, lambda: master


def _torch_peer(master, grad, out, **impl):
    p = torch.nn.Parameter(master)
    opt = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **impl)
    if out is None:
        p.grad = grad
        return opt.step, lambda: master
    p.grad = torch.empty_like(master)

    def step():
        p.grad.copy_(grad)      # bf16 -> fp32 gradient
        opt.step()
        out.copy_(master)       # fp32 -> bf16 params for the GPU
    return step, lambda: master


def peer_torch_foreach(master, grad, out):
    return _torch_peer(master, grad, out, foreach=True)


def peer_torch_fused(master, grad, out):
    return _torch_peer(master, grad, out, fused=True)


_DS_STATUS = {"ok": None, "why": ""}


def deepspeed_available():
    if _DS_STATUS["ok"] is None:
        try:
            import deepspeed  # noqa: F401
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            p = torch.nn.Parameter(torch.zeros(64))
            o = DeepSpeedCPUAdam([p], lr=LR)
            p.grad = torch.ones(64)
            o.step()  # builds / loads its C++ op
            _DS_STATUS.update(ok=True, why=f"deepspeed {deepspeed.__version__}")
        except Exception as e:  # ImportError, or its CPU op failed to build
            _DS_STATUS.update(ok=False, why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return _DS_STATUS["ok"]


def peer_deepspeed(master, grad, out):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p = torch.nn.Parameter(master)
    opt = DeepSpeedCPUAdam([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
    if out is None:
        p.grad = grad
        return opt.step, lambda: master
    p.grad = torch.empty_like(master)

    def step():
        p.grad.copy_(grad)
        opt.step()
        out.copy_(master)
    return step, lambda: master


PEERS = [
    ("lspo", peer_lspo_kernel),
    ("lspo.CPUAdamW", peer_lspo_optimizer),
    ("torch foreach", peer_torch_foreach),
    ("torch fused", peer_torch_fused),
    ("deepspeed", peer_deepspeed),
]


# --------------------------------------------------------------------------- measurement
def time_peer(make, n, workload, reps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    master = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen)
    out = None
    if workload == "b":
        grad = grad.to(torch.bfloat16)
        out = torch.empty(n, dtype=torch.bfloat16)
    step, result = make(master, grad, out)
    step()  # warm-up: allocates state, first-touches pages
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    final = result()
    # (b): the bf16 params handed back must be the round-to-nearest copy of the fp32 master.
    out_ok = out is None or torch.equal(out, final.to(torch.bfloat16))
    return best, final, out_ok


def triad(n, reps):
    plain = lspo._C.stream_triad(n, reps)["bytes_per_s"]
    nt = lspo._C.stream_triad(n, reps, streaming_stores=True)["bytes_per_s"]
    inplace = lspo._C.stream_triad(n, reps, in_place=True)["bytes_per_s"]
    return plain, nt, inplace


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="workload (b) at 16M parameters only, < 1 minute")
    ap.add_argument("--sizes", default=None, help="comma-separated sizes in M parameters (default 1,4,16,64)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for lspo and torch")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--isa", default="auto", help="force lspo's SIMD path: auto, avx512, avx2, scalar")
    args = ap.parse_args()

    sizes = [16] if args.quick else [1, 4, 16, 64]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    reps = args.reps or (3 if args.quick else 5)
    lspo.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    lspo.set_isa(args.isa)
    load0 = os.getloadavg()

    log(f"# fused CPU Adam benchmark: {args.threads} threads, lspo ISA {lspo.active_isa()}, torch {torch.__version__}, "
        f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    ds_ok = False if args.no_deepspeed else deepspeed_available()
    log(f"# deepspeed: {'available, ' + _DS_STATUS['why'] if ds_ok else 'NOT measured: ' + (_DS_STATUS['why'] or 'disabled')}")

    tn = 1 << (25 if args.quick else 26)
    tplain, tnt, tinp = triad(tn, 3 if args.quick else 5)
    bw = max(tplain, tnt, tinp)
    log(f"# STREAM triad ({tn >> 20}M floats per array): ordinary stores {tplain / 1e9:.1f} GB/s, streaming stores "
        f"{tnt / 1e9:.1f} GB/s, in-place a += s*c {tinp / 1e9:.1f} GB/s -> roofline (the best) {bw / 1e9:.1f} GB/s = "
        f"{bw / BYTES_PER_PARAM / 1e9:.2f} Gparam/s at 28 B/param")

    rows = []
    log(f"{'workload':<10}{'n':>6}  {'peer':<15}{'ms/step':>9}{'Gparam/s':>10}{'GB/s@28B':>10}{'roofline':>10}"
        f"{'lspo x':>8}  agree")
    for workload in (("b",) if args.quick else ("a", "b")):
        for size in sizes:
            n = size << 20
            ref_final, lspo_t = None, None
            for name, make in PEERS:
                if name == "deepspeed" and not ds_ok:
                    continue
                t, final, out_ok = time_peer(make, n, workload, reps)
                if ref_final is None:
                    ref_final, lspo_t = final, t
                    agree = out_ok
                else:
                    agree = out_ok and torch.allclose(final, ref_final, rtol=1e-4, atol=1e-6)
                del final
                gps = n / t / 1e9
                row = dict(workload=workload, n=n, peer=name, seconds=t, gparam_per_s=gps,
                           gbytes_per_s=BYTES_PER_PARAM * n / t / 1e9, roofline_fraction=BYTES_PER_PARAM * n / t / bw,
                           lspo_speedup=t / lspo_t, agree=bool(agree))
                rows.append(row)
                log(f"{'(' + workload + ')':<10}{str(size) + 'M':>6}  {name:<15}{t * 1e3:>9.2f}{gps:>10.3f}"
                    f"{row['gbytes_per_s']:>10.1f}{row['roofline_fraction']:>10.2f}{row['lspo_speedup']:>8.2f}  "
                    f"{'yes' if agree else 'NO'}")
                gc.collect()
            del ref_final
            gc.collect()

    def pick(workload, size, peer):
        for r in rows:
            if r["workload"] == workload and r["n"] == size << 20 and r["peer"] == peer:
                return r
        return None

    key = 16 if 16 in sizes else sizes[-1]
    me = pick("b", key, "lspo")
    ratio = lambda peer: (round(pick("b", key, peer)["seconds"] / me["seconds"], 3) if pick("b", key, peer) else None)
    load1 = os.getloadavg()
    summary = {
        "workload": "b: bf16 grad in, fp32 master update, bf16 param out",
        "n": key << 20,
        "gparam_per_s": round(me["gparam_per_s"], 4),
        "roofline_fraction": round(me["roofline_fraction"], 3),
        "vs_torch_fused": ratio("torch fused"),
        "vs_torch_foreach": ratio("torch foreach"),
        "vs_deepspeed": ratio("deepspeed"),
        "lspo_optimizer_gparam_per_s": round(pick("b", key, "lspo.CPUAdamW")["gparam_per_s"], 4),
        "triad_gbytes_per_s": round(bw / 1e9, 2),
        "triad_plain_gbytes_per_s": round(tplain / 1e9, 2),
        "triad_streaming_gbytes_per_s": round(tnt / 1e9, 2),
        "inplace_update_gbytes_per_s": round(tinp / 1e9, 2),
        "threads": args.threads,
        "isa": lspo.active_isa(),
        "deepspeed": _DS_STATUS["why"] if not args.no_deepspeed else "disabled",
        "all_agree": all(r["agree"] for r in rows),
        "load_avg_start_end": [round(load0[0], 2), round(load1[0], 2)],
    }
    print(json.dumps(summary), flush=True)
    return 0 if summary["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
