"""One rank of the data-parallel tests (tests/python/test_distributed.py), launched by torchrun (or
plainly, with --no-dist, for the one-process references).

A small model (two projectable Linear layers, a LayerNorm, biases) trained on fixed random data: the
global batch of each micro-batch is 2 * b samples; rank r of a world w takes its 2 * b / w of them, so
every world size sees the same global batch. Rank 0 writes the final weights, the optimizer's
state_dict and per-rank host-state bytes to --out (torch.save).

Several cases in one launch (one process group, one interpreter start: torch and lspo import once):
  dist_worker.py [--no-dist] CASE_ARGS [--then CASE_ARGS ...]
each case builds its own model, optimizer and data (seeded) and writes its own --out, in order (a later
case may resume from an earlier one's checkpoint)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist

import lspo
import lspo.distributed as ld


def build(args):
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.LayerNorm(40), torch.nn.GELU(),
                                torch.nn.Linear(40, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    common = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=args.clip)
    if args.opt == "lsp":
        opt = lspo.LSPAdamW(model, subspace=12, nnz=3, min_dim=12, refit_every=args.refit_every, refit_threshold=0.0,
                            refit_iters=5, seed=7, basis=args.basis, one_sided=args.basis == "svd", **common)
    else:
        opt = lspo.OffloadAdamW(model.parameters(), **common)
    return model, opt


def data(args):
    g = torch.Generator().manual_seed(99)
    n = 2 * args.b
    X = torch.randn(args.steps, args.accum, n, 24, generator=g)
    Y = torch.randn(args.steps, args.accum, n, 8, generator=g)
    return X, Y


def parse(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--opt", choices=("lsp", "offload"), default="lsp")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--clip", type=float, default=None)
    ap.add_argument("--refit-every", type=int, default=2)
    ap.add_argument("--basis", choices=("sparse", "svd"), default="sparse", help="svd: one_sided=True, basis='svd'")
    ap.add_argument("--skip-backward-rank", type=int, default=-1, help="this rank runs no backward at step 1")
    ap.add_argument("--amp", action="store_true", help="torch.amp.GradScaler (CPU) loss scaling")
    ap.add_argument("--inf-step", type=int, default=-1, help="the last rank's loss is inf at this step (0-based)")
    ap.add_argument("--wrap", action="store_true", help="LSPAdamW.wrap(model): layers hand S to the core")
    ap.add_argument("--no-sync", action="store_true", help="accumulation micro-batches inside ld.no_sync(opt)")
    ap.add_argument("--no-overlap", action="store_true", help="reduce only at step() (no launches from hooks)")
    ap.add_argument("--split", type=int, default=200, help="split dense parameters of >= this many elements")
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--resume", default="")
    ap.add_argument("--die", choices=("", "step", "save"), default="")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def run_case(args, rank, world):
    """One case: train, then rank 0 writes --out."""
    model, opt = build(args)
    if args.wrap:
        assert opt.wrap(model) == 2
    if world > 1:
        ld.data_parallel(opt, split_min_numel=args.split, overlap=not args.no_overlap)
    X, Y = data(args)
    per = 2 * args.b // world
    start = 0
    if args.resume:
        ck = ld.load_checkpoint(args.resume)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = ck["step"]
    err = ""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if args.amp else None
    try:
        for t in range(start, args.steps):
            for k in range(args.accum):
                x = X[t, k, rank * per:(rank + 1) * per]
                y = Y[t, k, rank * per:(rank + 1) * per]
                quiet = args.no_sync and k < args.accum - 1  # accumulation micro-batches launch nothing
                if t == 1 and rank == args.skip_backward_rank:
                    continue  # a bug in the user's loop: this rank has no gradients at step()
                with ld.no_sync(opt) if quiet else contextlib.nullcontext():
                    loss = torch.nn.functional.mse_loss(model(x), y) / args.accum
                    if t == args.inf_step and rank == world - 1:
                        loss = loss * float("inf")  # a non-finite gradient on one rank only
                    (scaler.scale(loss) if scaler else loss).backward()
            if args.die == "step" and rank == 1 and t == 1:
                os._exit(3)  # dies mid-step: after backward, before the collectives
            if scaler:
                scaler.step(opt)
                scaler.update()
                if world > 1:
                    ld.sync_grad_scaler(scaler)
            else:
                opt.step()
            opt.zero_grad()
            if args.save_at and t + 1 == args.save_at:
                if args.die == "save" and rank == 1:
                    os._exit(3)
                if world == 1:
                    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=t + 1), args.ckpt)
                else:
                    ld.save_checkpoint(args.ckpt, optimizer=opt, model=model, step=t + 1)
    except lspo.LspoError as e:
        err = str(e)
    st = opt.engine_stats()
    host = int(st["host_state_bytes"] + st["pinned_bytes"] + st["pageable_bytes"])
    hosts = [host]
    identical = True
    if world > 1 and not err:
        hosts = [None] * world
        dist.all_gather_object(hosts, host)
        # every rank's weights and projectors (values, whitening), to compare bitwise across ranks
        mine = [p.detach().reshape(-1) for p in model.parameters()]
        for p in getattr(opt, "projected_params", []):
            for P in opt.projectors(p):
                mine += [P.values.reshape(-1)] + ([P.whiten.reshape(-1)] if P.whiten is not None else [])
        flat = [None] * world
        dist.all_gather_object(flat, torch.cat(mine))
        identical = all(torch.equal(flat[0], f) for f in flat)
    sd = opt.state_dict() if not err else None
    if rank == 0:
        out = dict(params={n: p.detach().clone() for n, p in model.named_parameters()}, state=sd, host=hosts,
                   error=err, refits=[(r["step"], r["param"], r["refit"]) for r in getattr(opt, "refits", [])],
                   norm=opt.last_grad_norm if hasattr(opt, "last_grad_norm") else None,
                   skipped=opt.skipped_steps, ranks_identical=identical, scale=scaler.get_scale() if scaler else None)
        if world > 1 and not err:
            out["comm"] = dict(opt._dist.stats)
            out["owners"] = [opt._core.owner(i) for i in range(opt._core.num_slots)]
        torch.save(out, args.out)
    if args.die and rank == 0:
        os._exit(0)  # the group is broken: skip the destroy handshake


def main():
    argv = sys.argv[1:]
    no_dist = "--no-dist" in argv
    argv = [a for a in argv if a != "--no-dist"]
    cases, cur = [], []
    for a in argv + ["--then"]:
        if a == "--then":
            cases.append(parse(cur))
            cur = []
        else:
            cur.append(a)
    assert not any(c.die for c in cases[:-1]), "--die ends the process group: only the last case may use it"
    torch.set_num_threads(1)
    lspo.set_num_threads(1)
    if no_dist:
        rank, world = 0, 1
    else:
        from datetime import timedelta
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank, world = dist.get_rank(), dist.get_world_size()
    for args in cases:
        run_case(args, rank, world)
    if not no_dist:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
