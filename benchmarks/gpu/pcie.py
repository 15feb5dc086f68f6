"""Pinned-memory PCIe bandwidth (H2D, D2H, both at once) measured with CUDA events.

Prints one JSON line. Used by run_all.sh as the physical limit the engine's copies are compared to.
"""
import argparse
import json

import torch


def bench_copy(dst, src, stream, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        for _ in range(2):
            dst.copy_(src, non_blocking=True)
        start.record(stream)
        for _ in range(iters):
            dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    return src.numel() * src.element_size() * iters / (start.elapsed_time(end) / 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    n = a.mib * 2**20
    host_a = torch.empty(n, dtype=torch.uint8).pin_memory()
    host_b = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev_a = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev_b = torch.empty(n, dtype=torch.uint8, device="cuda")
    host_a.random_(0, 255)
    dev_b.random_(0, 255)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    h2d = bench_copy(dev_a, host_a, s1, a.iters)
    d2h = bench_copy(host_b, dev_b, s2, a.iters)
    # full duplex: both directions on two streams at once
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    s1.wait_event(t0)
    s2.wait_event(t0)
    with torch.cuda.stream(s1):
        for _ in range(a.iters):
            dev_a.copy_(host_a, non_blocking=True)
    with torch.cuda.stream(s2):
        for _ in range(a.iters):
            host_b.copy_(dev_b, non_blocking=True)
    e1, e2 = torch.cuda.Event(), torch.cuda.Event()
    e1.record(s1)
    e2.record(s2)
    torch.cuda.current_stream().wait_event(e1)
    torch.cuda.current_stream().wait_event(e2)
    t1.record()
    t1.synchronize()
    duplex = 2 * n * a.iters / (t0.elapsed_time(t1) / 1e3)
    print(json.dumps({"device": torch.cuda.get_device_name(), "h2d_gb_s": h2d / 1e9, "d2h_gb_s": d2h / 1e9,
                      "duplex_total_gb_s": duplex / 1e9, "bytes_per_copy": n}))


if __name__ == "__main__":
    main()
