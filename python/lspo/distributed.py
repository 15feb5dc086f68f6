"""``lspo.distributed``: data parallel for :class:`~lspo.LSPAdamW` and :class:`~lspo.OffloadAdamW` on
``torch.distributed`` (gloo on CPU, NCCL on GPU), launched with ``torchrun``. See docs/distributed.md.

Usage (every rank)::

    dist.init_process_group("gloo")            # torchrun sets RANK / WORLD_SIZE / MASTER_ADDR
    model = build_model()                      # no DistributedDataParallel wrapper
    opt = lspo.LSPAdamW(model, ...)
    lspo.distributed.data_parallel(opt)        # before the first backward
    for batch in my_shard_of_the_data: loss(batch).backward(); opt.step(); opt.zero_grad()

What happens (the optimizer core does it at ``step()``, lspo/dist.h):

* the parameters are broadcast from rank 0 once (as DDP does at construction);
* every parameter (optimizer slot) has an owner rank, balanced by host-state bytes: only the owner
  allocates its CPU state (fp32 moments, the master of a dense parameter) and runs its Adam, so host
  memory per rank falls with the world size (ZeRO-1/2 style);
* the gradients are *reduced onto their owners*: a projected layer sends its compressed gradient
  ``S`` (``dP x dQ``), not the dense ``m x n`` one; a dense parameter its gradient (as DDP);
* the per-slot norms are all-reduced (clipping and the non-finite skip use the global norm, the same
  on every rank); refits run on the owner, on the reduced gradient, and the new projector values are
  broadcast, so every rank holds the same projectors;
* each owner broadcasts its result -- the ``dP x dQ`` update of a projected layer, the new weights of
  a dense parameter -- and the other ranks apply it.

The reduction happens at the step boundary (bucketed, all buckets in flight at once), not during
backward. ``state_dict()`` is a collective: rank 0 gets the full checkpoint (the format of one
process, so it loads into any world size), the other ranks a dict marked ``lspo_partial``.
:func:`save_checkpoint` writes it atomically (temporary file + rename, after every rank delivered).
A collective that fails (a dead rank, a timeout) raises :class:`lspo.LspoError` naming the rank and
the collective.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import _C
from ._C import LspoError

__all__ = ["TorchCommunicator", "data_parallel", "no_sync", "sync_grad_scaler", "save_checkpoint", "load_checkpoint",
           "is_partial"]

_BUCKET_BYTES = 25 << 20


class TorchCommunicator(_C.Communicator):
    """The core's collectives (lspo/dist.h) on a ``torch.distributed`` process group. Tensors are
    bucketed per (peer rank, dtype) up to ``bucket_bytes``; all buckets are launched asynchronously,
    then waited for. With NCCL, host tensors travel through the current CUDA device. ``stats`` counts
    the payload bytes this rank handed to each kind of collective."""

    def __init__(self, group: Optional[Any] = None, bucket_bytes: int = _BUCKET_BYTES, overlap: bool = True):
        super().__init__()
        self.overlap = bool(overlap)  # reduces launched from the gradient hooks (prelaunch)
        self.sync = True              # False inside no_sync(): accumulation micro-batches launch nothing
        self._pending: Dict[tuple, List[torch.Tensor]] = {}
        self._pending_bytes: Dict[tuple, int] = {}
        self._launched: List[tuple] = []
        if not dist.is_available() or not dist.is_initialized():
            raise LspoError("lspo.distributed: torch.distributed is not initialized (call "
                            "torch.distributed.init_process_group first, e.g. under torchrun)")
        self.group = group
        self._rank = dist.get_rank(group)
        self._world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.bucket_bytes = int(bucket_bytes)
        self.stats: Dict[str, int] = {"reduce_bytes": 0, "broadcast_bytes": 0, "all_reduce_bytes": 0, "steps": 0,
                                      "early_bytes": 0}  # early: launched during backward and used

    def rank(self) -> int:
        return self._rank

    def world_size(self) -> int:
        return self._world

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _fail(self, what: str, e: BaseException) -> LspoError:
        return LspoError(f"lspo.distributed: rank {self._rank} of {self._world}: the collective '{what}' failed "
                         f"({type(e).__name__}: {e}). A peer rank probably died or timed out; restart the job from "
                         "the last checkpoint (this rank's weights may be partly updated).")

    def _buckets(self, tensors: List[torch.Tensor], owners: List[int]) -> List[tuple]:
        groups: Dict[tuple, List[int]] = {}
        for i, (t, o) in enumerate(zip(tensors, owners)):
            groups.setdefault((int(o), t.dtype), []).append(i)
        out = []
        for (o, dt), idx in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            cur: List[int] = []
            size = 0
            for i in idx:
                nb = tensors[i].numel() * tensors[i].element_size()
                if cur and size + nb > self.bucket_bytes:
                    out.append((o, cur))
                    cur, size = [], 0
                cur.append(i)
                size += nb
            if cur:
                out.append((o, cur))
        return out

    def _run(self, tensors: List[torch.Tensor], owners: List[int], what: str, op: str) -> None:
        if not tensors:
            return
        pending = []
        try:
            for o, idx in self._buckets(tensors, owners):
                flat = torch.cat([tensors[i].reshape(-1).to(self.device) for i in idx])
                if op == "reduce":
                    work = dist.reduce(flat, self._global(o), op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                else:
                    work = dist.broadcast(flat, self._global(o), group=self.group, async_op=True)
                self.stats[op + "_bytes"] += flat.numel() * flat.element_size()
                pending.append((o, idx, flat, work))
            for o, idx, flat, work in pending:
                work.wait()
        except Exception as e:  # noqa: BLE001 -- any transport error becomes one clear lspo error
            raise self._fail(what, e) from e
        for o, idx, flat, _ in pending:
            if (o != self._rank) if op == "reduce" else (o == self._rank):
                continue  # reduce: only the owner takes the sum; broadcast: the owner has it already
            off = 0
            for i in idx:
                t = tensors[i]
                n = t.numel()
                t.copy_(flat[off:off + n].view(t.shape))
                off += n

    # ------------------------------------------------------------ reduces launched during backward
    def prelaunch(self, tensors: List[torch.Tensor], owners: List[int]) -> None:
        """From a gradient hook: queue the pieces of one slot (``OptimizerCore.reduce_pieces``) into
        their (owner, dtype) bucket; a full bucket is launched (asynchronously) at once. The data is
        snapshotted at launch; ``reduce_sum`` at the step uses a launched piece only if the tensor
        is unchanged since (same storage and version) on every rank, and reduces it again otherwise."""
        for t, o in zip(tensors, owners):
            key = (int(o), t.dtype)
            self._pending.setdefault(key, []).append(t)
            self._pending_bytes[key] = self._pending_bytes.get(key, 0) + t.numel() * t.element_size()
            if self._pending_bytes[key] >= self.bucket_bytes:
                self._launch(key)

    def _launch(self, key: tuple) -> None:
        ts = self._pending.pop(key)
        self._pending_bytes.pop(key)
        try:
            flat = torch.cat([t.reshape(-1).to(self.device) for t in ts])
            work = dist.reduce(flat, self._global(key[0]), op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        except Exception as e:  # noqa: BLE001
            raise self._fail("gradient reduce (launched during backward)", e) from e
        self.stats["reduce_bytes"] += flat.numel() * flat.element_size()
        self._launched.append((key[0], [(t, t._version) for t in ts], flat, work))

    def reduce_sum(self, tensors, owners, what):
        tensors, owners = list(tensors), list(owners)
        if not self.overlap:
            self._run(tensors, owners, what, "reduce")
            return
        for key in sorted(self._pending, key=lambda k: (k[0], str(k[1]))):  # the same order on every rank
            self._launch(key)
        index = {}
        for li, (o, items, flat, _) in enumerate(self._launched):
            off = 0
            for t, ver in items:  # a later launch of the same tensor replaces an earlier one
                index[(t.data_ptr(), t.numel(), t.dtype, o)] = (li, off, ver)
                off += t.numel()
        hits = []
        flags = torch.zeros(len(tensors), dtype=torch.float64)
        for i, (t, o) in enumerate(zip(tensors, owners)):
            h = index.get((t.data_ptr(), t.numel(), t.dtype, int(o)))
            ok = h is not None and h[2] == t._version
            flags[i] = 1.0 if ok else 0.0
            hits.append(h if ok else None)
        launched, self._launched = self._launched, []
        try:
            if len(tensors):  # usable on every rank? (NCCL: through the device)
                buf = flags.to(self.device)
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
                flags = buf.cpu()
            for _, _, _, work in launched:
                work.wait()
        except Exception as e:  # noqa: BLE001
            raise self._fail(what, e) from e
        self.stats["all_reduce_bytes"] += flags.numel() * flags.element_size()
        todo = []
        for i, (t, o) in enumerate(zip(tensors, owners)):
            if flags[i].item() != self._world:
                todo.append(i)
                continue
            self.stats["early_bytes"] += t.numel() * t.element_size()
            if int(o) == self._rank:
                li, off, _ = hits[i]
                t.copy_(launched[li][2][off:off + t.numel()].view(t.shape))
        self._run([tensors[i] for i in todo], [owners[i] for i in todo], what, "reduce")

    def broadcast(self, tensors, owners, what):
        self._run(list(tensors), list(owners), what, "broadcast")

    def all_reduce_sum(self, t, what):
        if what == "gradient presence check":
            self.stats["steps"] += 1
        buf = t.to(self.device)
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        except Exception as e:  # noqa: BLE001
            raise self._fail(what, e) from e
        self.stats["all_reduce_bytes"] += buf.numel() * buf.element_size()
        t.copy_(buf)


def data_parallel(opt, group: Optional[Any] = None, *, broadcast_parameters: bool = True,
                  bucket_bytes: int = _BUCKET_BYTES, split_min_numel: int = 1 << 20, overlap: bool = True):
    """Makes ``opt`` (an :class:`~lspo.OffloadAdamW` or :class:`~lspo.LSPAdamW`, built the same way on
    every rank) data parallel over ``group`` (default: the world). Call it on every rank before the
    first backward. Returns ``opt``.

    Every parameter gets one owner rank (balanced by host-state bytes, largest first), except dense
    parameters of at least ``split_min_numel`` elements (0: none), which are split into one
    contiguous range per rank (their gradient is reduce-scattered, each rank runs Adam on its range,
    the ranges are all-gathered): one big embedding would otherwise bound the state per rank.

    ``overlap``: each parameter's reduce is queued from its gradient hook and launched, bucketed and
    asynchronously, while backward goes on; wrap the accumulation micro-batches (all but the last of
    a step) in :func:`no_sync` -- as with DDP -- or their launches are wasted (the step reduces the
    final sums again; results stay right)."""
    if getattr(opt, "_dist", None) is not None:
        raise LspoError(f"{opt._kind}: data_parallel() was already called on this optimizer")
    comm = TorchCommunicator(group, bucket_bytes, overlap)
    params = [p for g in opt.param_groups for p in g["params"]]
    if broadcast_parameters:
        try:
            with torch.no_grad():
                for p in params:
                    buf = p.detach().to(comm.device)
                    dist.broadcast(buf, comm._global(0), group=group)
                    if buf.data_ptr() != p.data_ptr():
                        p.copy_(buf)
        except Exception as e:  # noqa: BLE001
            raise comm._fail("parameter broadcast", e) from e
    opt._core.set_communicator(comm, int(split_min_numel))
    opt._dist = comm
    if overlap:
        ref = weakref.ref(opt)
        for p, i in opt._index.items():
            if p.requires_grad:  # after the optimizer's own hook: the core has consumed the gradient
                opt._hooks.append(p.register_post_accumulate_grad_hook(_prelaunch_hook(ref, i)))
    return opt


def _prelaunch_hook(opt_ref, slot: int):
    def hook(_p: torch.Tensor) -> None:
        opt = opt_ref()
        if opt is not None and opt._dist.sync:
            ts, owners = opt._core.reduce_pieces(slot)
            opt._dist.prelaunch(ts, owners)
    return torch.compiler.disable(hook)


@contextlib.contextmanager
def no_sync(opt):
    """Backward passes inside launch no reduce (gradient accumulation: every micro-batch of a step
    but the last), as ``DistributedDataParallel.no_sync``. The step's reduce covers them anyway."""
    comm = getattr(opt, "_dist", None)
    if comm is None:
        yield
        return
    prev, comm.sync = comm.sync, False
    try:
        yield
    finally:
        comm.sync = prev


def sync_grad_scaler(scaler, group: Optional[Any] = None) -> None:
    """Call after ``scaler.update()`` on every rank (fp16 loss scaling with ``torch.amp.GradScaler``).
    The optimizer skips a step on every rank when any rank's gradient is non-finite, but each rank's
    scaler saw only its own ``found_inf``: the ranks that saw none did not back off. Every rank takes
    the smallest scale and growth tracker -- what one process (or DDP, whose gradients are reduced
    before the scaler looks) would hold."""
    if not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
        return
    backend = dist.get_backend(group)
    for t in (scaler._scale, scaler._growth_tracker):
        buf = t.to(torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu")
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=group)
        except Exception as e:  # noqa: BLE001
            raise LspoError(f"lspo.distributed: rank {dist.get_rank(group)}: the collective 'grad scaler sync' "
                            f"failed ({type(e).__name__}: {e})") from e
        t.copy_(buf)


def is_partial(state_dict: dict) -> bool:
    """True for the dict a rank other than 0 gets from a data-parallel ``state_dict()``."""
    return bool(state_dict.get("lspo_partial", False))


def _gather_state(opt, sd: dict) -> dict:
    """The data-parallel ``state_dict()``: every rank's owned slots, merged on rank 0."""
    comm: TorchCommunicator = opt._dist
    shards: Optional[List[Any]] = [None] * comm.world_size() if comm.rank() == 0 else None
    try:
        dist.gather_object(sd["state"], shards, dst=comm._global(0), group=comm.group)
    except Exception as e:  # noqa: BLE001
        raise comm._fail("state_dict gather", e) from e
    if comm.rank() != 0:
        return dict(sd, state={}, lspo_partial=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict = {}
    for sh in shards:  # rank order: a split parameter's ranges come in order
        for i, st in sh.items():
            if i not in state:
                state[i] = dict(st)
                continue
            for k, t in st.items():  # another range of a split parameter
                if isinstance(t, torch.Tensor) and k != "step":
                    state[i][k] = torch.cat([state[i][k].reshape(-1), t.reshape(-1)])
    for i, st in state.items():
        if opt._core.owner(opt._index[params[i]]) < 0:
            for k, t in st.items():
                if isinstance(t, torch.Tensor) and k != "step":
                    st[k] = t.view(params[i].shape)
    return dict(sd, state=dict(sorted(state.items())))


def _local_state(opt, saved: dict, params: list) -> dict:
    """The data-parallel ``load_state_dict()``: a split parameter's state narrowed to this rank's range."""
    out = dict(saved)
    for i, st in saved.items():
        lo, n = opt._core.shard_range(opt._index[params[i]])
        if n < 0 or not st:
            continue
        loc = dict(st)
        for k, t in st.items():
            if isinstance(t, torch.Tensor) and k != "step" and t.numel() == params[i].numel():
                loc[k] = t.reshape(-1)[lo:lo + n].clone()
        out[i] = loc
    return out


def save_checkpoint(path: str, obj_fn=None, *, optimizer=None, model=None, group: Optional[Any] = None,
                    **extra) -> None:
    """Collective: writes ``{"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}``
    (or ``obj_fn()``'s result, called on every rank) to ``path`` from rank 0, atomically: into a
    temporary file renamed over ``path`` only after every rank delivered its shard; a final barrier
    makes every rank return after the file exists. If a rank dies first, the others raise
    :class:`lspo.LspoError` and ``path`` is untouched."""
    if obj_fn is None:
        def obj_fn():
            out = dict(extra)
            if model is not None:
                out["model"] = model.state_dict()
            if optimizer is not None:
                out["optimizer"] = optimizer.state_dict()
            return out
    obj = obj_fn()  # the optimizer's state_dict() gathers (a collective)
    rank = dist.get_rank(group)
    if rank == 0:
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    try:
        dist.barrier(group=group)
    except Exception as e:  # noqa: BLE001
        raise LspoError(f"lspo.distributed: rank {rank}: the barrier after saving '{path}' failed "
                        f"({type(e).__name__}: {e})") from e


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """Every rank reads the full checkpoint (it loads into any world size)."""
    return torch.load(path, map_location=map_location, weights_only=False)
