"""MEFT: large sparse adapters in host memory (arXiv 2406.04984), with a real CPU side.

``add_sparse_adapters(model, neurons=N, topk=k, experts=E, probe=p)`` puts beside every FFN block a
parallel adapter of N neurons: key rows K and value rows V (N x hidden each, V zero-initialised),

    y = FFN(x) + sum_{i in S(x)} relu(x . K_i) V_i

held on the HOST as one fp32 master matrix [K | V] (N x 2 hidden), its Adam moments, a per-row step
count and a bf16 working copy. Per token only S(x), at most k neurons, is used:

  routing   neurons are split into E contiguous "key experts" (sizes differ by at most one); each has
            a representative key, the mean of its keys (working copy). A token scores the experts
            (x . c_e), takes the top p, scores the neurons of those experts (x . K_i) and keeps the
            top k with a positive score. Ties: the lower expert / neuron index first. Fewer than k
            candidates, or fewer than k positive scores: fewer neurons; none: the adapter adds 0.
            Batched over tokens; the candidate scoring runs on the host, where K lives, for p/E of
            the cost of a dense x K^T.
            That is selection="token" (default). selection="batch": the micro-batch chooses `budget`
            rows (default k) together -- the router runs on the device over all tokens, only a
            summary crosses (the top experts by summed token weight and each one's weighted input
            sum), the host ranks those experts' neurons against it -- and each token then takes its
            top k of these rows on the device. Per-token selection moves about min(N, T k) rows for
            T tokens; batch selection at most `budget`.
  transfer  only the union U of the selected rows of [K | V] is gathered (lspo._C.gather_rows, a
            threaded memcpy into one of two pinned staging buffers when CUDA is present) and copied
            to the device (non_blocking, on a host->device copy stream, with an event the compute
            stream waits on); the adapter then computes on the device and autograd yields the
            gradient of those U rows only, which goes back to the host.
            overlap=True (default): the FFN's pre-hook sends what the routing needs to the host (on a
            device->host copy stream) and starts the host side (routing, gather, the copy's issue) on
            a fetch thread, so it runs while the FFN computes; the adapter joins it after the FFN.
  update    lspo._C.sparse_adam_step: lazy AdamW over the touched rows only (per-row step counts,
            exact bias correction; untouched rows bitwise unchanged), on the fused SIMD Adam kernel
            of lspo/cpu_adam.h. With ``MeftAdamW(overlap=True)`` each layer's update runs on a worker
            thread as soon as its gradient arrives, overlapped with the rest of the backward pass.

Bytes crossing host <-> device are counted either way (on a CPU-only run the "transfer" is the copy
into the staging buffer): ``adapter.stats``.
"""
from __future__ import annotations

import concurrent.futures
import math
import threading
import weakref
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from . import _C
from ._C import LspoError

__all__ = ["SparseAdapter", "MeftAdamW", "add_sparse_adapters", "adapters_of", "adapter_state_dict",
           "load_adapter_state_dict", "route_reference", "route_batch_reference", "SELECTIONS"]

_ATTR = "_lspo_meft_adapters"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise LspoError(msg)


SELECTIONS = ("token", "batch")

_fetch_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_copy_streams: Dict[int, tuple] = {}


def _fetch_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that runs the adapters' host side (routing, row gather, copy issue) while the
    caller's thread goes on with the FFN. One is enough: a layer's fetch is joined before the next
    layer's starts."""
    global _fetch_pool
    if _fetch_pool is None:
        _fetch_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meft-fetch")
    return _fetch_pool


def _streams(dev: torch.device) -> tuple:
    """(device->host, host->device) copy streams of a CUDA device, shared by its adapters."""
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    if i not in _copy_streams:
        _copy_streams[i] = (torch.cuda.Stream(i), torch.cuda.Stream(i))
    return _copy_streams[i]


def _in_threads(n: int, fn):
    # the fetch thread uses the caller's intra-op thread count, so that its host GEMMs split their
    # work exactly as they would inline (overlapped and serial results are then bit-identical)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return fn()


class _Fetch:
    """The host side of one forward: the rows moved (sorted neuron ids), per-token selections in
    neuron ids (token mode; None in batch mode: the tokens choose on the device), the rows on the
    device ([U, 2 hidden] bf16) and the event the compute stream waits on (CUDA)."""
    __slots__ = ("uniq", "ids", "kv", "event")

    def __init__(self, uniq, ids, kv=None, event=None):
        self.uniq, self.ids, self.kv, self.event = uniq, ids, kv, event


class SparseAdapter:
    """One MEFT adapter (host state + routing + the device compute). Not an nn.Module on purpose:
    its tensors stay on the host whatever ``model.to(device)`` does.

    selection="token": each token routes on its own (top p experts, top k neurons); the rows moved
    are the union over the micro-batch. selection="batch": the micro-batch chooses `budget` rows
    (default k) together and each token takes its top k among them (see _batch_summary).
    overlap=True: the host side (routing, gather, the copy's issue) starts in the FFN's pre-hook on a
    fetch thread and runs while the FFN computes; overlap=False runs the same code inline."""

    def __init__(self, hidden: int, neurons: int, topk: int, experts: Optional[int] = None, probe: int = 1,
                 scale: float = 1.0, seed: int = 0, name: str = "adapter", selection: str = "token",
                 budget: Optional[int] = None, overlap: bool = True):
        _check(isinstance(hidden, int) and hidden >= 1, f"SparseAdapter: hidden must be >= 1, got {hidden}")
        _check(isinstance(neurons, int) and neurons >= 1, f"SparseAdapter: neurons must be >= 1, got {neurons}")
        if experts is None:
            experts = max(1, round(math.sqrt(neurons)))
        _check(isinstance(experts, int) and experts >= 1,
               f"SparseAdapter: experts must be >= 1 (the number of key experts), got {experts}")
        _check(experts <= neurons, f"SparseAdapter: experts ({experts}) > neurons ({neurons}): an expert would be empty")
        _check(isinstance(topk, int) and 1 <= topk <= neurons,
               f"SparseAdapter: topk must be in [1, neurons={neurons}], got {topk}")
        _check(isinstance(probe, int) and 1 <= probe <= experts,
               f"SparseAdapter: probe must be in [1, experts={experts}], got {probe}")
        _check(selection in SELECTIONS, f"SparseAdapter: selection must be one of {SELECTIONS}, got {selection!r}")
        if budget is None:
            budget = topk
        _check(isinstance(budget, int) and 1 <= budget <= neurons,
               f"SparseAdapter: budget (rows per step, selection='batch') must be in [1, neurons={neurons}], got {budget}")
        self.hidden, self.neurons, self.topk, self.experts, self.probe = hidden, neurons, topk, experts, probe
        self.selection, self.budget, self.overlap = selection, budget, bool(overlap)
        self.scale, self.name = float(scale), name
        self.compute = "auto"  # device compute: "masked" ([T, U] mask, GEMMs), "gather" (per slot), "auto"
        pin = torch.cuda.is_available()
        g = torch.Generator().manual_seed(seed)
        # fp32 master [K | V]: keys ~ N(0, 1/hidden) (so x . K_i ~ N(0, 1) for a normalised x), V = 0
        self.master = torch.zeros(neurons, 2 * hidden)
        self.master[:, :hidden] = torch.randn(neurons, hidden, generator=g) / math.sqrt(hidden)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.row_steps = torch.zeros(neurons, dtype=torch.long)
        self.work = self.master.to(torch.bfloat16)  # the working copy the device computes with
        if pin:
            self.work = self.work.pin_memory()
        self.bounds = torch.tensor([e * neurons // experts for e in range(experts + 1)], dtype=torch.long)
        self.sizes = self.bounds[1:] - self.bounds[:-1]
        self.gmax = int(self.sizes.max())
        # experts the batch probes: `probe`, or enough to hold `budget` candidates
        self.batch_probe = min(experts, max(probe, -(-budget // int(self.sizes.min()))))
        self.centroids = torch.empty(experts, hidden)
        self._cent_dirty = set(range(experts))  # batch mode: experts whose device copy is stale
        self._cent_dev = None
        self._refresh_centroids(torch.arange(experts))
        self._staging = [None, None]        # double-buffered (pinned when CUDA is present) staging
        self._staging_done = [None, None]   # CUDA: the event after which a staging buffer may be refilled
        self._slot = 0
        self._job = None                    # the fetch started by begin()
        self._selected_dev = None           # CUDA: slots filled, summed on the device until take_gradient
        self.pending: List[tuple] = []  # (idx, grad rows on the host) since the last step
        self.optimizer = None           # weakref to the MeftAdamW that owns this adapter
        self.lock = threading.Lock()
        self.stats = dict(forwards=0, rows_moved=0, bytes_h2d=0, bytes_d2h=0, dense_bytes=0, tokens=0,
                          selected=0, peak_rows=0)

    # ------------------------------------------------------------------ host state
    def _refresh_centroids(self, experts: torch.Tensor) -> None:
        """Representative key of each listed expert: the mean of its keys in the working copy
        (computed one expert at a time, so a value never depends on which others are refreshed)."""
        h = self.hidden
        for e in experts.tolist():
            b0, b1 = int(self.bounds[e]), int(self.bounds[e + 1])
            self.centroids[e] = self.work[b0:b1, :h].float().mean(0)
            self._cent_dirty.add(e)

    def rows_updated(self, idx: torch.Tensor) -> None:
        """After an update of rows `idx` (sorted): refresh the experts they belong to."""
        if idx.numel():
            ex = torch.unique(torch.searchsorted(self.bounds, idx, right=True) - 1)
            self._refresh_centroids(ex)

    def reset_working_copy(self) -> None:
        self.work.copy_(self.master)
        self._refresh_centroids(torch.arange(self.experts))

    # ------------------------------------------------------------------ routing, selection="token"
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Selected neurons of each token of the host fp32 matrix x [T, hidden]: [T, k'] int64
        (k' = min(k, p * largest expert)), -1 where a slot holds no neuron. Runs in fp32 whatever
        autocast says (routing is a host computation on fp32 copies)."""
        with torch.autocast("cpu", enabled=False):
            return self._route(x.float())

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        T, h = x.shape
        es = x @ self.centroids.t()                                          # [T, E]
        top_e = torch.sort(es, dim=1, descending=True, stable=True).indices[:, :self.probe]
        top_e = torch.sort(top_e, dim=1).values                             # candidates in neuron order
        ar = torch.arange(self.gmax)
        cand = self.bounds[top_e].unsqueeze(-1) + ar                          # [T, p, gmax]
        valid = ar < self.sizes[top_e].unsqueeze(-1)
        # candidate scores, grouped by expert: the (token, expert) pairs sorted by expert and padded to
        # the busiest expert's count, then one batched matmul against the experts' padded keys
        p, E = self.probe, self.experts
        flat_e = top_e.reshape(-1)
        order = torch.sort(flat_e, stable=True).indices
        se = flat_e[order]
        counts = torch.bincount(flat_e, minlength=E)
        rank = torch.arange(se.numel()) - (torch.cumsum(counts, 0) - counts)[se]
        xg = torch.zeros(E, int(counts.max()), h)
        xg[se, rank] = x[order // p]
        kpad = self.work[cand_rows(self.bounds, self.sizes, self.gmax), :h].float()   # [E, gmax, h]
        sc = torch.bmm(xg, kpad.transpose(1, 2))                                     # [E, cmax, gmax]
        cs = torch.empty(T * p, self.gmax)
        cs[order] = sc[se, rank]
        cs = cs.reshape(T, p, self.gmax)
        cs = cs.masked_fill(~valid, -math.inf).reshape(T, -1)
        kk = min(self.topk, cs.shape[1])
        order = torch.sort(cs, dim=1, descending=True, stable=True)
        val, pos = order.values[:, :kk], order.indices[:, :kk]
        ids = cand.reshape(T, -1).gather(1, pos)
        return ids.masked_fill(~(val > 0), -1)

    # ------------------------------------------------------------------ routing, selection="batch"
    def _centroids_on(self, dev: torch.device) -> torch.Tensor:
        """The representative keys on the compute device (the router of batch mode runs there); only
        the experts refreshed since the last call cross (their bytes are counted)."""
        stale = sorted(self._cent_dirty)
        self._cent_dirty.clear()
        self.stats["bytes_h2d"] += len(stale) * self.hidden * 4
        if dev.type != "cuda":
            return self.centroids  # on the host the device copy is the host tensor itself
        if self._cent_dev is None or self._cent_dev.device != dev:
            self._cent_dev = self.centroids.to(dev)
        elif stale:
            i = torch.tensor(stale)
            self._cent_dev[i.to(dev)] = self.centroids[i].to(dev)
        return self._cent_dev

    def _batch_summary(self, x2: torch.Tensor, cent: torch.Tensor):
        """Device side of batch routing, over the micro-batch's tokens x2 [T, hidden]: each token
        scores the experts and weighs its top p by relu(score); an expert's batch weight is the sum
        of its tokens' weights. The top q = batch_probe experts by weight (ties: lower index; weight
        0: not chosen, -1) and, per chosen expert, the weighted sum of its tokens' inputs M_e [q, h]:
        only these cross to the host (q ids + q x hidden floats, not the T x hidden input)."""
        with torch.autocast(x2.device.type, enabled=False):
            xf = x2.float()
            es = xf @ cent.t()                                                        # [T, E]
            top_e = torch.sort(es, dim=1, descending=True, stable=True).indices[:, :self.probe]
            a = torch.zeros_like(es).scatter_(1, top_e, torch.relu(es.gather(1, top_e)))
            agg = a.sum(0)
            order = torch.sort(agg, descending=True, stable=True).indices[:self.batch_probe]
            chosen = torch.where(agg[order] > 0, order, torch.full_like(order, -1))
            m = a[:, order].t() @ xf                                                   # [q, h]
        return chosen, m

    def _batch_rows(self, chosen: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Host side of batch routing: the neurons of the chosen experts are scored against their
        expert's M_e (the weighted sum of x . K_i over the tokens that probed it) and the top
        `budget` with a positive score are the step's rows (ties: lower neuron index). Sorted."""
        ok = chosen >= 0
        ch, mv = chosen[ok], m[ok].float()
        if ch.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        o = torch.sort(ch).indices
        ch, mv = ch[o], mv[o]                                   # candidates in neuron order
        n = self.sizes[ch]
        rows = torch.repeat_interleave(self.bounds[ch], n) + (
            torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n))
        owner = torch.repeat_interleave(torch.arange(ch.numel()), n)
        s = torch.einsum("rh,rh->r", self.work[rows, :self.hidden].float(), mv[owner])
        srt = torch.sort(s, descending=True, stable=True)
        keep = srt.indices[:self.budget][srt.values[:self.budget] > 0]
        return torch.sort(rows[keep]).values

    def _token_select(self, x2: torch.Tensor, keys: torch.Tensor):
        """Each token's top k of the U rows moved, by x . K_i > 0 (ties: the lower neuron index, as
        the rows are sorted); [T, min(k, U)] positions and a mask of the slots that hold a neuron."""
        with torch.autocast(x2.device.type, enabled=False):
            s = x2.float() @ keys.float().t()
        kk = min(self.topk, keys.shape[0])
        o = torch.sort(s, dim=1, descending=True, stable=True)
        return o.indices[:, :kk], o.values[:, :kk] > 0

    def route_batch(self, x: torch.Tensor):
        """Batch routing of the host matrix x [T, hidden] as the forward runs it: (rows moved, sorted;
        [T, min(k, U)] neuron ids per token, -1 for an empty slot)."""
        chosen, m = self._batch_summary(x, self.centroids)
        uniq = self._batch_rows(chosen, m)
        if uniq.numel() == 0:
            return uniq, torch.full((x.shape[0], 0), -1, dtype=torch.long)
        local, w = self._token_select(x, self.work[uniq, :self.hidden])
        return uniq, uniq[local].masked_fill(~w, -1)

    # ------------------------------------------------------------------ transfer
    def begin(self, x: torch.Tensor) -> None:
        """FFN pre-hook: with overlap, start the host side of this layer's fetch on the fetch thread."""
        self._job = self._start(x, inline=False) if self.overlap else None

    def _start(self, x: torch.Tensor, inline: bool):
        """What must reach the host (token: the input; batch: the summary), sent on the D2H copy
        stream after the compute stream's work so far, then the host side (inline or on the fetch
        thread)."""
        x2 = x.detach().reshape(-1, self.hidden)
        dev = x.device
        if self.selection == "token":
            # a private copy: the host side may read it while the caller's thread runs the FFN
            send = [x2 if dev.type == "cuda" else x2.to(torch.float32, copy=True)]
            d2h = x2.numel() * x.element_size()
        else:
            send = list(self._batch_summary(x2, self._centroids_on(dev)))
            d2h = send[0].numel() * 8 + send[1].numel() * 4
        host, ev = self._to_host(send, dev)
        fn = (lambda: self._host_side(host, ev, dev))
        if inline:
            return fn(), d2h, x
        return _fetch_executor().submit(_in_threads, torch.get_num_threads(), fn), d2h, x

    @staticmethod
    def _to_host(ts: List[torch.Tensor], dev: torch.device):
        if dev.type != "cuda":
            return ts, None
        cur, (d2h, _) = torch.cuda.current_stream(dev), _streams(dev)
        ready = torch.cuda.Event()
        ready.record(cur)
        out = []
        with torch.cuda.stream(d2h):
            d2h.wait_event(ready)
            for t in ts:
                b = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                b.copy_(t, non_blocking=True)
                t.record_stream(d2h)
                out.append(b)
            done = torch.cuda.Event()
            done.record(d2h)
        return out, done

    def _host_side(self, host: List[torch.Tensor], ev, dev: torch.device) -> _Fetch:
        """Routing on the host, the gather of the rows into a staging buffer, and the copy's issue on
        the H2D copy stream (CUDA; on the host the "copy" is a clone out of the staging buffer)."""
        if ev is not None:
            ev.synchronize()
        if self.selection == "token":
            ids = self.route(host[0])
            present = torch.zeros(self.neurons, dtype=torch.bool)
            present[ids[ids >= 0]] = True
            uniq = present.nonzero().squeeze(1)            # sorted
        else:
            ids, uniq = None, self._batch_rows(host[0], host[1])
        U = uniq.numel()
        if U == 0:
            return _Fetch(uniq, ids)
        slot = self._slot
        self._slot ^= 1
        if self._staging_done[slot] is not None:
            self._staging_done[slot].synchronize()         # its previous copy has left the buffer
        buf = self._staging[slot]
        if buf is None or buf.shape[0] < U:
            cap = min(self.neurons, max(U, 2 * (buf.shape[0] if buf is not None else 0)))
            buf = torch.empty(cap, 2 * self.hidden, dtype=torch.bfloat16, pin_memory=torch.cuda.is_available())
            self._staging[slot] = buf
        _C.gather_rows(self.work, uniq, buf)
        if dev.type != "cuda":
            return _Fetch(uniq, ids, buf[:U].clone())
        _, h2d = _streams(dev)
        with torch.cuda.device(dev), torch.cuda.stream(h2d):
            kv = buf[:U].to(dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record(h2d)
        self._staging_done[slot] = done
        return _Fetch(uniq, ids, kv, done)

    # ------------------------------------------------------------------ device side
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check(x.shape[-1] == self.hidden,
               f"SparseAdapter {self.name}: input has {x.shape[-1]} features, the adapter {self.hidden}")
        job, self._job = self._job, None
        if job is not None and isinstance(job[0], concurrent.futures.Future):
            job = (job[0].result(),) + job[1:]           # joined even when stale: it uses the staging buffers
        if job is None or job[2] is not x:               # no fetch started for this input (or a stale one)
            job = self._start(x, inline=True)
        f, d2h, _ = job
        shape, h = x.shape, self.hidden
        x2 = x.reshape(-1, h)
        T, U = x2.shape[0], f.uniq.numel()
        st = self.stats
        esz = x.element_size()
        st["forwards"] += 1
        st["tokens"] += T
        st["rows_moved"] += U
        st["peak_rows"] = max(st["peak_rows"], U)
        st["bytes_d2h"] += d2h                           # the input or the batch summary, for the routing
        st["dense_bytes"] += self.neurons * 2 * h * 2    # a dense adapter sends every bf16 row...
        if U == 0:
            return torch.zeros_like(x)
        st["bytes_h2d"] += U * 2 * h * 2
        if f.event is not None:
            cur = torch.cuda.current_stream(x.device)
            cur.wait_event(f.event)                      # GPU-side: the rows have landed
            f.kv.record_stream(cur)
        kv = f.kv.to(x.dtype)
        if f.ids is not None:                            # token: each token's slots, chosen on the host
            mask = f.ids >= 0
            pos = torch.zeros(self.neurons, dtype=torch.long)
            pos[f.uniq] = torch.arange(U)
            local = pos[f.ids.clamp(min=0)].to(x.device)  # an empty slot points at row 0 with weight 0
            w = mask.to(x.device)
            used = None
        else:                                            # batch: each token's top k of the U rows, here
            local, w = self._token_select(x2.detach(), f.kv[:, :h])
            used = torch.zeros(U, dtype=torch.bool, device=x.device).index_fill_(0, local[w], True)
        if w.is_cuda:  # no device sync per layer: folded into stats at take_gradient (after backward)
            self._selected_dev = w.sum() if self._selected_dev is None else self._selected_dev + w.sum()
        else:
            st["selected"] += int(w.sum())
        if torch.is_grad_enabled():
            kv.requires_grad_(True)
            st["dense_bytes"] += self.neurons * 2 * h * esz  # ...and receives every row's gradient
            idx = f.uniq
            kv.register_post_accumulate_grad_hook(lambda t: self._grad_arrived(idx, t, used))
        y = self._compute(x2, kv, local, w)
        return (y * self.scale).reshape(shape)

    def _compute(self, x2: torch.Tensor, kv: torch.Tensor, local: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum over each token's slots of relu(x . K_j) V_j, the slots indexing the rows moved (kv)."""
        T, h, U = x2.shape[0], self.hidden, kv.shape[0]
        k_u, v_u = kv[:, :h], kv[:, h:]
        wt = w.to(x2.dtype)
        if self.compute == "masked" or (self.compute == "auto" and U <= 256 * local.shape[1]):
            # [T, U] selection mask: dense GEMMs, on CPU cheaper than the gathers' index_add backward up to U ~ 256 k (measured)
            sel = torch.zeros(T, U, dtype=x2.dtype, device=x2.device).scatter_add_(1, local, wt)
            return (torch.relu(x2 @ k_u.t()) * sel) @ v_u
        # per-slot gathers: O(T k hidden) memory and work whatever U is
        flat = local.reshape(-1)
        ks = k_u.index_select(0, flat).reshape(T, -1, h)
        vs = v_u.index_select(0, flat).reshape(T, -1, h)
        act = torch.relu(torch.einsum("th,tkh->tk", x2, ks)) * wt
        return torch.einsum("tk,tkh->th", act, vs)

    def _grad_arrived(self, idx: torch.Tensor, t: torch.Tensor, used: Optional[torch.Tensor]) -> None:
        g = t.grad
        t.grad = None
        if used is not None:  # batch: only the rows some token used have a gradient (the mask crosses too)
            self.stats["bytes_d2h"] += used.numel()
            g = g[used]
            idx = idx[used.cpu()]
            if idx.numel() == 0:
                return
        if g.dtype not in (torch.float32, torch.bfloat16):
            g = g.float()
        g = g.detach().to("cpu").contiguous()
        self.stats["bytes_d2h"] += g.numel() * g.element_size()
        with self.lock:
            self.pending.append((idx, g))
        opt = self.optimizer() if self.optimizer is not None else None
        if opt is not None:
            opt._grad_ready(self)

    def take_gradient(self):
        """The accumulated (idx, grad rows) since the last step, merged over backward passes
        (rows selected in several passes are summed); None when there is none."""
        if self._selected_dev is not None:
            self.stats["selected"] += int(self._selected_dev)
            self._selected_dev = None
        with self.lock:
            items, self.pending = self.pending, []
        if not items:
            return None
        if len(items) == 1:
            return items[0]
        idx = torch.cat([i for i, _ in items])
        grad = torch.cat([g.float() for _, g in items])
        uniq, inv = torch.unique(idx, return_inverse=True)
        out = torch.zeros(uniq.numel(), grad.shape[1])
        out.index_add_(0, inv, grad)
        return uniq, out

    def device_bytes(self, elem_size: int = 4) -> int:
        """Adapter bytes the device held at the peak of one training step: the gathered rows and their
        gradient in the compute dtype; in batch mode also the representative keys (its router runs on
        the device; token mode routes on the host)."""
        rows = self.stats["peak_rows"] * 2 * self.hidden * elem_size * 2
        # batch mode routes on the device: its representative keys live there (fp32)
        return rows + (self.experts * self.hidden * 4 if self.selection == "batch" else 0)


def cand_rows(bounds: torch.Tensor, sizes: torch.Tensor, gmax: int) -> torch.Tensor:
    """[E, gmax] neuron index of each expert's slots (slots past an expert's size repeat its last
    neuron; their scores are masked)."""
    ar = torch.arange(gmax)
    return bounds[:-1].unsqueeze(1) + torch.minimum(ar, (sizes - 1).unsqueeze(1))


def route_reference(adapter: SparseAdapter, x: torch.Tensor) -> torch.Tensor:
    """Brute-force routing, one token at a time in plain Python (the test reference of route())."""
    h, out = adapter.hidden, []
    keys = adapter.work[:, :h].float()
    for t in range(x.shape[0]):
        xs = x[t]
        es = [(float(xs @ adapter.centroids[e]), e) for e in range(adapter.experts)]
        es.sort(key=lambda s: (-s[0], s[1]))
        cands = []
        for _, e in es[:adapter.probe]:
            for i in range(int(adapter.bounds[e]), int(adapter.bounds[e + 1])):
                cands.append((float(xs @ keys[i]), i))
        cands.sort(key=lambda s: (-s[0], s[1]))
        kk = min(adapter.topk, adapter.probe * adapter.gmax)
        row = [i if s > 0 else -1 for s, i in cands[:kk]]
        out.append(row + [-1] * (kk - len(row)))
    return torch.tensor(out, dtype=torch.long).reshape(x.shape[0], -1)


def route_batch_reference(adapter: SparseAdapter, x: torch.Tensor):
    """Brute-force batch routing in plain Python (the test reference of route_batch()): (rows moved,
    sorted; [T, min(k, U)] neuron ids per token, -1 for an empty slot)."""
    h, E, T = adapter.hidden, adapter.experts, x.shape[0]
    keys = adapter.work[:, :h].float()
    weight = [0.0] * E
    msum = [torch.zeros(h, dtype=torch.float64) for _ in range(E)]
    for t in range(T):
        es = sorted(((float(x[t] @ adapter.centroids[e]), e) for e in range(E)), key=lambda s: (-s[0], s[1]))
        for s, e in es[:adapter.probe]:
            weight[e] += max(s, 0.0)
            msum[e] += max(s, 0.0) * x[t].double()
    top = sorted(range(E), key=lambda e: (-weight[e], e))[:adapter.batch_probe]
    cands = [(float(keys[i].double() @ msum[e]), i) for e in top if weight[e] > 0
             for i in range(int(adapter.bounds[e]), int(adapter.bounds[e + 1]))]
    cands.sort(key=lambda s: (-s[0], s[1]))
    rows = sorted(i for s, i in cands[:adapter.budget] if s > 0)
    kk = min(adapter.topk, len(rows))
    ids = []
    for t in range(T):
        sc = sorted(((float(x[t] @ keys[i]), i) for i in rows), key=lambda s: (-s[0], s[1]))
        ids.append([i if s > 0 else -1 for s, i in sc[:kk]])
    return torch.tensor(rows, dtype=torch.long), torch.tensor(ids, dtype=torch.long).reshape(T, kk)


# ---------------------------------------------------------------------- the optimizer
class MeftAdamW:
    """Lazy AdamW of the adapters' touched rows on the host (lspo._C.sparse_adam_step).

    overlap=True: each adapter's update is queued on a worker thread the moment its gradient
    arrives during backward (the GIL is released inside the kernel), so it overlaps the rest of the
    backward pass; step() waits for them. That allows one backward per step() (an error otherwise:
    use overlap=False for gradient accumulation, whose gradients are summed per row and applied
    in step()). The learning rate is read from param_groups when the update is queued.
    Adapters are not subject to a global gradient-norm clip."""

    def __init__(self, adapters, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, overlap: bool = True):
        if isinstance(adapters, nn.Module):
            adapters = adapters_of(adapters)
        self.adapters: List[SparseAdapter] = list(adapters)
        _check(len(self.adapters) > 0, "MeftAdamW: no adapters (call lspo.meft.add_sparse_adapters first)")
        _check(lr >= 0, f"MeftAdamW: invalid lr {lr}")
        self.param_groups = [dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)]
        self.overlap = overlap
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meft-adam") if overlap else None
        self._futures: Dict[int, concurrent.futures.Future] = {}
        for a in self.adapters:
            a.optimizer = weakref.ref(self)

    def _hp(self) -> dict:
        g = self.param_groups[0]
        return dict(lr=float(g["lr"]), beta1=float(g["betas"][0]), beta2=float(g["betas"][1]), eps=float(g["eps"]),
                    weight_decay=float(g["weight_decay"]))

    @staticmethod
    def _update(a: SparseAdapter, hp: dict):
        item = a.take_gradient()
        if item is None:
            return None
        idx, grad = item
        _C.sparse_adam_step(a.master, a.exp_avg, a.exp_avg_sq, a.row_steps, idx, grad, param_out=a.work, **hp)
        return idx

    def _grad_ready(self, a: SparseAdapter) -> None:
        if not self.overlap:
            return
        key = id(a)
        _check(key not in self._futures, f"MeftAdamW(overlap=True): a second backward reached adapter {a.name} "
               "before step(); gradient accumulation needs MeftAdamW(..., overlap=False)")
        self._futures[key] = self._pool.submit(self._update, a, self._hp())

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        hp = self._hp()
        for a in self.adapters:
            fut = self._futures.pop(id(a), None)
            idx = fut.result() if fut is not None else self._update(a, hp)
            if idx is not None:
                a.rows_updated(idx)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for a in self.adapters:
            a.take_gradient()

    def state_dict(self) -> dict:
        _check(not self._futures, "MeftAdamW.state_dict: updates are in flight; call step() first")
        return {"param_groups": [dict(g) for g in self.param_groups],
                "state": [{"exp_avg": a.exp_avg.clone(), "exp_avg_sq": a.exp_avg_sq.clone(),
                           "row_steps": a.row_steps.clone()} for a in self.adapters]}

    def load_state_dict(self, sd: dict) -> None:
        _check(len(sd["state"]) == len(self.adapters),
               f"MeftAdamW.load_state_dict: {len(sd['state'])} adapters saved, {len(self.adapters)} present")
        for a, s in zip(self.adapters, sd["state"]):
            _check(s["exp_avg"].shape == a.exp_avg.shape,
                   f"MeftAdamW.load_state_dict: adapter {a.name} has shape {tuple(a.exp_avg.shape)}, "
                   f"the checkpoint {tuple(s['exp_avg'].shape)}")
            a.exp_avg.copy_(s["exp_avg"])
            a.exp_avg_sq.copy_(s["exp_avg_sq"])
            a.row_steps.copy_(s["row_steps"])
        self.param_groups = [dict(g) for g in sd["param_groups"]]


# ---------------------------------------------------------------------- model surgery
def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for k in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and isinstance(getattr(cfg, k, None), int):
            return getattr(cfg, k)
    raise LspoError("add_sparse_adapters: cannot tell the model's hidden size (no config.hidden_size / n_embd)")


def _ffn_sites(model: nn.Module):
    """(name, module whose input is the FFN input, module whose output is the FFN output)."""
    sites = []
    for name, m in model.named_modules():
        mlp = getattr(m, "mlp", None)
        if isinstance(mlp, nn.Module):
            sites.append((f"{name}.mlp", mlp, mlp))
        elif isinstance(getattr(m, "fc", None), nn.Module) and isinstance(getattr(m, "fc_out", None), nn.Module):
            sites.append((name, m.fc, m.fc_out))  # lspo.tinygpt blocks
    return sites


def add_sparse_adapters(model: nn.Module, neurons: int, topk: int, experts: Optional[int] = None, probe: int = 1,
                        scale: float = 1.0, seed: int = 0, freeze: bool = True, selection: str = "token",
                        budget: Optional[int] = None, overlap: bool = True) -> List[SparseAdapter]:
    """Adds a MEFT adapter beside every FFN block of `model` (Hugging Face decoder layers with an
    ``mlp`` module, lspo.tinygpt blocks) through forward hooks; freezes the model's own parameters
    unless freeze=False. selection / budget / overlap: see SparseAdapter. Returns the adapters (also
    reachable as adapters_of(model))."""
    _check(not hasattr(model, _ATTR), "add_sparse_adapters: the model already has MEFT adapters")
    sites = _ffn_sites(model)
    _check(len(sites) > 0, "add_sparse_adapters: found no FFN block (a module with .mlp, or .fc and .fc_out)")
    hidden = _hidden_size(model)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    adapters = []
    for i, (name, first, last) in enumerate(sites):
        a = SparseAdapter(hidden, neurons, topk, experts, probe, scale=scale, seed=seed + i, name=name,
                          selection=selection, budget=budget, overlap=overlap)
        holder = {}

        def pre(mod, args, a=a, holder=holder):
            holder["x"] = args[0]
            a.begin(args[0])

        def post(mod, args, out, a=a, holder=holder):
            x = holder.pop("x")
            return out + a(x).to(out.dtype)

        first.register_forward_pre_hook(pre)
        last.register_forward_hook(post)
        adapters.append(a)
    object.__setattr__(model, _ATTR, adapters)
    return adapters


def adapters_of(model: nn.Module) -> List[SparseAdapter]:
    _check(hasattr(model, _ATTR), "adapters_of: the model has no MEFT adapters")
    return getattr(model, _ATTR)


def adapter_state_dict(model_or_adapters) -> dict:
    """The adapters' fp32 masters and shapes (moments and step counts: MeftAdamW.state_dict())."""
    ads = adapters_of(model_or_adapters) if isinstance(model_or_adapters, nn.Module) else list(model_or_adapters)
    return {"format": 1, "adapters": [dict(name=a.name, hidden=a.hidden, neurons=a.neurons, topk=a.topk,
                                           experts=a.experts, probe=a.probe, scale=a.scale,
                                           selection=a.selection, budget=a.budget,
                                           master=a.master.clone()) for a in ads]}


def load_adapter_state_dict(model_or_adapters, sd: dict) -> None:
    ads = adapters_of(model_or_adapters) if isinstance(model_or_adapters, nn.Module) else list(model_or_adapters)
    _check(sd.get("format") == 1 and len(sd["adapters"]) == len(ads),
           f"load_adapter_state_dict: checkpoint has {len(sd.get('adapters', []))} adapters, model {len(ads)}")
    for a, s in zip(ads, sd["adapters"]):
        for k in ("hidden", "neurons", "topk", "experts", "probe", "selection", "budget"):
            if k not in s:
                continue  # checkpoints written before batch selection existed: per-token routing
            _check(s[k] == getattr(a, k), f"load_adapter_state_dict: adapter {a.name}: {k} {getattr(a, k)} "
                   f"differs from the checkpoint's {s[k]}")
        a.master.copy_(s["master"])
        a.reset_working_copy()
