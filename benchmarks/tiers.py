#!/usr/bin/env python3
"""lspo's memory tiers (LoHan): the optimizer state on disk, and the planner.

1. Adam with every parameter's fp32 state in files (OffloadAdamW(state_dir=..., host_memory_limit=0):
   each step streams master + moments through the fused CPU Adam in chunks, read-ahead and
   write-behind on I/O threads, O_DIRECT) against, in the same run,
     * the physical limit: the disk's sequential O_DIRECT write and read bandwidth measured here on
       a file of the same size (disk_bound_s = bytes / write_bw + bytes / read_bw: one step reads and
       writes the whole state once), and the same Adam with the state in host memory (compute bound);
     * a plain peer (no disk-offload optimizer is installed here -- no DeepSpeed): read the state
       files whole with numpy, torch.optim.AdamW (foreach) on them, write them back, fsync.
   disk_bound_fraction = disk_bound_s / step_s (1.0: the step runs at disk speed).
   disk_matches_ram: the weights and state after N steps are bitwise those of the in-memory run.
2. The planner's choice for 4 GB and 24 GB device budgets on SmolLM2-135M and on a 7B LLaMA config,
   built on the meta device (sizes and activation bytes from a meta forward pass; forward times
   estimated from FLOPs at an ASSUMED device throughput and link bandwidth -- no GPU here).

  python benchmarks/tiers.py --quick        # ~1-2 min; last line: JSON
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import torch

import lspo
from lspo import planner


def disk_bandwidth(d: str, nbytes: int, chunk: int = 8 << 20) -> tuple[float, float]:
    """Sequential O_DIRECT write (+ fsync) then read of `nbytes`: (write B/s, read B/s)."""
    path = os.path.join(d, "bw.bin")
    buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT needs
    buf.write(os.urandom(4096) * (chunk // 4096))
    flags = getattr(os, "O_DIRECT", 0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    t0 = time.perf_counter()
    for off in range(0, nbytes, chunk):
        os.pwrite(fd, buf, off)
    os.fsync(fd)
    tw = time.perf_counter() - t0
    os.close(fd)
    fd = os.open(path, os.O_RDONLY | flags)
    t0 = time.perf_counter()
    for off in range(0, nbytes, chunk):
        os.preadv(fd, [buf], off)
    tr = time.perf_counter() - t0
    os.close(fd)
    os.unlink(path)
    n = (nbytes + chunk - 1) // chunk * chunk
    return n / tw, n / tr


def make_params(numels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in numels]


def set_grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def run_lspo(numels, steps, **kw):
    params = make_params(numels)
    opt = lspo.OffloadAdamW(params, lr=1e-3, weight_decay=0.01, **kw)
    times = []
    for s in range(1, steps + 1):
        set_grads(params, s)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return params, opt, times


def run_peer(numels, steps, d):
    """numpy files + torch AdamW: read all, step, write all, fsync."""
    params = make_params(numels)
    names = [os.path.join(d, f"peer{i}_{k}.npy") for i in range(len(params)) for k in ("p", "m", "v")]
    for i, p in enumerate(params):
        for k, t in zip("pmv", (p.detach(), torch.zeros_like(p), torch.zeros_like(p))):
            np.save(os.path.join(d, f"peer{i}_{k}.npy"), t.numpy())
    times = []
    for s in range(1, steps + 1):
        set_grads(params, s)
        t0 = time.perf_counter()
        state = [torch.from_numpy(np.load(n)) for n in names]
        ps = [torch.nn.Parameter(state[3 * i]) for i in range(len(params))]
        for q, p in zip(ps, params):
            q.grad = p.grad
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True)
        for i, q in enumerate(ps):
            opt.state[q] = {"step": torch.tensor(float(s - 1)), "exp_avg": state[3 * i + 1],
                            "exp_avg_sq": state[3 * i + 2]}
        opt.step()
        for n, t in zip(names, state):
            with open(n, "wb") as f:
                np.save(f, t.numpy())
                f.flush()
                os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
    return times


def planner_cases(host_small: str, host_big: str, device_flops: float, link: float) -> dict:
    import transformers.masking_utils as mu
    from transformers import LlamaConfig, LlamaForCausalLM
    # meta tensors have no values: transformers' packed-sequence probe (an .item()) cannot run; the
    # sample batch is one plain sequence per row anyway
    mu.find_packed_sequence_indices = lambda position_ids: None
    cfgs = {
        # SmolLM2-135M's architecture (config of HuggingFaceTB/SmolLM2-135M)
        "smollm2_135m": (LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                     max_position_embeddings=2048), host_small, 4, 512),
        # LLaMA-7B (LLaMA-1/2 7B shapes)
        "llama_7b": (LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
                     host_big, 1, 2048),
    }
    out = {}
    for name, (cfg, host, bs, seq) in cfgs.items():
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        layers = planner.decoder_layers(model)
        ids = torch.zeros((bs, seq), dtype=torch.long, device="meta")
        for dev in ("4GB", "24GB"):
            plan = planner.plan_tiers(layers, list(model.parameters()), device_memory=dev, host_memory=host,
                                      state_dir="STATE_DIR", run=lambda: model(input_ids=ids, use_cache=False).logits,
                                      bandwidth=link, device_flops=device_flops, tokens=bs * seq)
            print(f"--- {name}, batch {bs}x{seq}, bf16 weights ---\n{plan.describe()}", flush=True)
            out[f"{name}_{dev}"] = {
                "params_on_device": plan.params_on_device, "window": plan.window,
                "policies": {k: plan.policies.count(k) for k in ("keep", "swap", "recompute")},
                "state_host_gb": round(plan.state_host_limit / 2**30, 2),
                "state_disk_gb": round(plan.state_disk_bytes / 2**30, 2),
                "device_gb": round(plan.device_bytes / 2**30, 2), "host_gb": round(plan.host_bytes / 2**30, 2),
                "iteration_s": round(plan.iteration_s, 4), "feasible": plan.feasible, "host_budget": host}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized (16M elements: 192 MiB of fp32 state on disk)")
    ap.add_argument("--elements", type=int, default=None, help="trained elements (default 64M, quick 16M)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5, quick 3)")
    ap.add_argument("--dir", default=None, help="where the state files go (default: a temp dir under /tmp)")
    ap.add_argument("--device-flops", type=float, default=82e12,
                    help="ASSUMED device bf16 throughput for meta-device forward times (default 82e12: half "
                         "an RTX 4090's dense peak)")
    ap.add_argument("--link", type=float, default=25e9, help="ASSUMED host<->device bandwidth, B/s (PCIe 4 x16)")
    args = ap.parse_args()
    n = args.elements or ((16 << 20) if args.quick else (64 << 20))
    steps = args.steps or (3 if args.quick else 5)
    numels = [n // 4 + 1, n // 4 - 1, n // 4 + 7, n // 4 - 7]  # odd sizes
    base = tempfile.mkdtemp(prefix="lspo_tiers_", dir=args.dir)
    try:
        state_bytes = 12 * sum(numels)
        wbw, rbw = disk_bandwidth(base, state_bytes)
        disk_bound = state_bytes / wbw + state_bytes / rbw
        ram_p, ram_opt, ram_t = run_lspo(numels, steps)
        disk_p, disk_opt, disk_t = run_lspo(numels, steps, state_dir=os.path.join(base, "st"), host_memory_limit=0)
        st = disk_opt.engine_stats()
        matches = all(torch.equal(a, b) for a, b in zip(ram_p, disk_p))
        rs, ds = ram_opt.state_dict()["state"], disk_opt.state_dict()["state"]
        matches = matches and all(torch.equal(rs[i][k], ds[i][k]) for i in rs for k in ("exp_avg", "exp_avg_sq",
                                                                                            "master_param"))
        del ram_opt, disk_opt
        peer_dir = os.path.join(base, "peer")
        os.makedirs(peer_dir)
        peer_t = run_peer(numels, steps, peer_dir)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    step_s = min(disk_t[1:] or disk_t)  # the first step also creates the files' second generation
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "isa": lspo.active_isa(), "elements": sum(numels), "state_bytes": state_bytes, "steps": steps,
        "disk_write_gbs": round(wbw / 1e9, 3), "disk_read_gbs": round(rbw / 1e9, 3),
        "disk_bound_s": round(disk_bound, 4), "disk_step_s": round(step_s, 4),
        "disk_bound_fraction": round(disk_bound / step_s, 3),
        "ram_step_s": round(min(ram_t[1:] or ram_t), 4), "peer_step_s": round(min(peer_t[1:] or peer_t), 4),
        "disk_adam_melem_s": round(sum(numels) / step_s / 1e6, 2),
        "io_bytes_per_step": (st["io_bytes_read"] + st["io_bytes_written"]) // steps,
        "disk_matches_ram": bool(matches),
    }
    print(json.dumps(summary, indent=1), flush=True)
    summary["planner"] = planner_cases("16GB", "64GB", args.device_flops, args.link)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
