"""LoHan-style memory tiers at module level: parameter offload and activation swapping.

The optimizer-state tier (fp32 master and moments in host memory or in files) lives in the C++
engine (``OffloadAdamW(state_dir=..., host_memory_limit=...)``); this module handles what the model
keeps on the device during forward and backward, and the planner (``lspo.planner``) picks the tiers.

``TierRunner(model, layers, device, window, policies)`` wraps each layer of ``layers`` (e.g. the
transformer blocks, in forward order):

* Parameter offload (``offload_params=True``): the layer's working weights live in host memory
  (pinned when CUDA is present) and are the ``nn.Parameter`` objects the optimizer sees. Ahead of
  the layer's forward (and, in reverse order, its backward) a device copy is made on a copy stream
  (CUDA; a plain copy on the CPU) for a window of ``window`` layers; the layer runs on those copies
  through an autograd function whose backward returns the gradient to the host parameter. Saved
  tensors that are views of a device copy are stored as handles and re-fetched in backward, so no
  device copy outlives its window. A copy is refreshed when the host parameter changed (optimizer
  step: its ``_version``).
* Activation policy per layer: ``"keep"`` (plain autograd), ``"swap"`` (saved activations go to
  host memory -- pinned, copy stream -- and come back in backward, the layer below prefetched), or
  ``"recompute"`` (``torch.utils.checkpoint``: only the inputs are kept, the forward runs again).

A ``DeviceMeter`` counts the device bytes the runner holds (weight copies, swapped-in activations)
and their peak; the CPU tests use it, with weak references to released copies, to prove that at
most the window is resident. Results are bitwise those of the plain model (the same operations on
the same values: copies are exact, recomputation repeats the forward with the RNG state restored).

The cost model (``plan_activations``) chooses the policies from per-layer profiles: forward time
t_i, activation bytes a_i, link bandwidth B, the weight traffic of parameter offload L and a device
activation budget M. Iteration time

    T = 3 sum_i t_i + sum_{recompute} t_i + max(0, (L + 2 sum_{swap} a_i) / B - 3 sum_i t_i)

(backward ~ 2x forward; link traffic overlaps compute and only its excess stalls -- convex in the
swapped bytes, as in LoHan) subject to sum_{keep} a_i + 2 max_i a_i <= M (the transient of one layer
being swapped in or recomputed plus the prefetched one; no reserve when everything is kept). It is
minimised exactly by a dynamic programme over (kept, swapped) bytes in units of ``unit_bytes``
(activation sizes rounded up: the memory bound stays safe); ``brute_force_activations`` enumerates
all 3^n choices for the tests.
"""
from __future__ import annotations

import itertools
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.utils.checkpoint

POLICIES = ("keep", "swap", "recompute")


# ----------------------------------------------------------------------------- accounting
class DeviceMeter:
    """Device bytes of weight copies a TierRunner holds, their peak, and the activation bytes it
    moved to host memory (swap) and back."""

    def __init__(self):
        self.param_bytes = 0
        self.peak_param_bytes = 0
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0

    def add(self, n: int) -> None:
        self.param_bytes += int(n)
        self.peak_param_bytes = max(self.peak_param_bytes, self.param_bytes)

    def sub(self, n: int) -> None:
        self.param_bytes -= int(n)
        assert self.param_bytes >= 0, "DeviceMeter: resident bytes went negative"

    def reset_peak(self) -> None:
        self.peak_param_bytes = self.param_bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Fetch(torch.autograd.Function):
    """host parameter -> its device copy (given); backward: the gradient back to the host."""

    @staticmethod
    def forward(ctx, host: torch.Tensor, holder: list):
        ctx.host_device = host.device
        return holder[0].view_as(holder[0])  # a fresh tensor on the copy's storage

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.host_device), None


class _Layer:
    __slots__ = ("index", "module", "params", "host", "dev", "versions", "events", "policy", "forward", "swapped")

    def __init__(self, index: int, module: torch.nn.Module, policy: str):
        self.index = index
        self.module = module
        self.params = list(module.named_parameters(recurse=True))
        self.host = [p.data for _, p in self.params]
        self.dev: Optional[list] = None
        self.versions: Optional[list] = None
        self.events = None
        self.policy = policy
        self.forward = module.forward
        self.swapped: list = []  # records [host copy, event, device copy or None] of this forward


def _set_param(module: torch.nn.Module, dotted: str, value) -> None:
    mod = module
    *path, leaf = dotted.split(".")
    for p in path:
        mod = getattr(mod, p)
    mod._parameters[leaf] = value


class TierRunner:
    """Parameter offload and per-layer activation policies for `layers` of `model` (see the module
    doc). ``device``: where the layers compute. ``window``: layers whose weights may be resident at
    once (>= 1). ``policies``: one of POLICIES per layer (default all "keep"). Use as a context
    manager, or call ``remove()`` to restore the model."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[torch.nn.Module], device, *,
                 offload_params: bool = True, window: int = 2, policies: Optional[Sequence[str]] = None,
                 meter: Optional[DeviceMeter] = None):
        if window < 1:
            raise ValueError(f"TierRunner: window must be >= 1, got {window}")
        policies = list(policies) if policies is not None else ["keep"] * len(layers)
        if len(policies) != len(layers) or any(p not in POLICIES for p in policies):
            raise ValueError(f"TierRunner: need one of {POLICIES} per layer ({len(layers)}), got {policies}")
        self.model = model
        self.device = torch.device(device)
        self.offload_params = offload_params
        self.window = window
        self.meter = meter or DeviceMeter()
        self.cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.layers = [_Layer(i, m, pol) for i, (m, pol) in enumerate(zip(layers, policies))]
        self._by_storage: dict[int, tuple[_Layer, int]] = {}
        self._current: list[_Layer] = []  # layers whose forward is running (innermost last)
        self.released: list = []  # weak references to released device copies (tests check they died)
        if offload_params:
            pin = torch.cuda.is_available()
            for L in self.layers:
                for j, (_, p) in enumerate(L.params):
                    h = p.data.detach().to("cpu")
                    if pin:
                        h = h.pin_memory()
                    elif h.data_ptr() == p.data.data_ptr():
                        h = h.clone()
                    p.data = h
                    L.host[j] = h
        for L in self.layers:
            L.module.forward = self._wrapped(L)
        self._removed = False

    # ------------------------------------------------------------------ parameter window
    def _resident(self, L: _Layer) -> bool:
        return L.dev is not None and L.versions == [p._version for _, p in L.params]

    def _fetch(self, L: _Layer) -> None:
        """Start the device copy of L's weights (copy stream on CUDA)."""
        if not self.offload_params or self._resident(L):
            return
        if L.dev is not None:
            self._release(L)
        if self.cuda:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                L.dev = [h.to(self.device, non_blocking=True) for h in L.host]
                L.events = torch.cuda.Event()
                L.events.record(self._copy_stream)
        else:
            L.dev = [h.clone() for h in L.host]
        L.versions = [p._version for _, p in L.params]
        for j, d in enumerate(L.dev):
            self.meter.add(_nbytes(d))
            self._by_storage[d.untyped_storage().data_ptr()] = (L, j)

    def _release(self, L: _Layer) -> None:
        if L.dev is None:
            return
        for d in L.dev:
            self.meter.sub(_nbytes(d))
            self._by_storage.pop(d.untyped_storage().data_ptr(), None)
            self.released.append(weakref.ref(d))
        L.dev, L.versions, L.events = None, None, None

    def _ensure(self, i: int, direction: int) -> _Layer:
        """Layer i resident; the window ahead in `direction` prefetched; every other layer released."""
        L = self.layers[i]
        if not self.offload_params:
            return L
        want = {i + direction * k for k in range(self.window)} & set(range(len(self.layers)))
        for M in self.layers:
            if M.index not in want:
                self._release(M)
        self._fetch(L)
        if self.cuda and L.events is not None:
            torch.cuda.current_stream(self.device).wait_event(L.events)
            for d in L.dev:
                d.record_stream(torch.cuda.current_stream(self.device))
        for k in sorted(want - {i}, key=lambda j: abs(j - i)):
            self._fetch(self.layers[k])
        return L

    # ------------------------------------------------------------------ forward wrapper
    def _wrapped(self, L: _Layer) -> Callable:
        def run(*args, **kwargs):
            backward = torch._C._current_graph_task_id() >= 0  # recomputation inside backward
            self._ensure(L.index, -1 if backward else +1)
            if not backward:
                L.swapped = []
            self._current.append(L)
            try:
                if self.offload_params:
                    for (name, p), d in zip(L.params, L.dev):
                        _set_param(L.module, name, _Fetch.apply(p, [d]) if p.requires_grad else d)
                try:
                    if L.policy == "recompute":  # checkpoint's own hooks decide what is saved
                        return L.forward(*args, **kwargs)
                    # only tensors saved inside this layer's forward are ours to pack
                    with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                        return L.forward(*args, **kwargs)
                finally:
                    if self.offload_params:
                        for name, p in L.params:
                            _set_param(L.module, name, p)
            finally:
                self._current.pop()

        def call(*args, **kwargs):
            if L.policy == "recompute" and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        return call

    # ------------------------------------------------------------------ saved tensors
    def _pack(self, t: torch.Tensor):
        strided = t.layout == torch.strided
        if self.offload_params and strided:
            hit = self._by_storage.get(t.untyped_storage().data_ptr())
            if hit is not None:  # a view of a weight copy: a handle, re-fetched in backward
                return ("param", hit[0].index, hit[1], t.size(), t.stride(), t.storage_offset())
        L = self._current[-1] if self._current else None
        if L is not None and L.policy == "swap" and strided and t.numel() > 0:
            rec = self._to_host(t)
            L.swapped.append(rec)
            return ("swap", L.index, rec)
        return ("keep", t)

    def _to_host(self, t: torch.Tensor) -> list:
        """[host copy, copy-done event, device copy (after a prefetch)]."""
        self.meter.swapped_out_bytes += _nbytes(t)
        if self.cuda and t.is_cuda:
            h = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                h.copy_(t, non_blocking=True)
                t.record_stream(self._copy_stream)
                ev = torch.cuda.Event()
                ev.record(self._copy_stream)
            return [h, ev, None]
        return [t.detach().clone(memory_format=torch.preserve_format), None, None]

    def _swap_in(self, rec: list) -> None:
        if rec[2] is not None:
            return
        h, ev, _ = rec
        if self.cuda and h.device.type == "cpu":
            with torch.cuda.stream(self._copy_stream):
                ev.wait(self._copy_stream)
                rec[2] = h.to(self.device, non_blocking=True)
                rec[1] = torch.cuda.Event()
                rec[1].record(self._copy_stream)
        else:
            rec[2] = h
        self.meter.swapped_in_bytes += _nbytes(h)

    def _unpack(self, packed):
        kind = packed[0]
        if kind == "keep":
            return packed[1]
        if kind == "param":
            _, i, j, size, stride, offset = packed
            L = self._ensure(i, -1)
            return L.dev[j].as_strided(size, stride, offset)
        _, i, rec = packed
        self._swap_in(rec)
        if i > 0:  # the layer below is next in backward: its activations start coming back now
            for r in self.layers[i - 1].swapped:
                self._swap_in(r)
        d = rec[2]
        if self.cuda and d.is_cuda:
            torch.cuda.current_stream(self.device).wait_event(rec[1])
            d.record_stream(torch.cuda.current_stream(self.device))
        rec[2] = None  # autograd holds it until the node ran
        return d

    # ------------------------------------------------------------------ lifecycle
    def release_all(self) -> None:
        for L in self.layers:
            self._release(L)

    def remove(self) -> None:
        """Restores the model: weights back in their parameters (on `device`), forwards unwrapped."""
        if self._removed:
            return
        self._removed = True
        self.release_all()
        for L in self.layers:
            L.module.forward = L.forward
            if self.offload_params:
                for _, p in L.params:
                    p.data = p.data.to(self.device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# ----------------------------------------------------------------------------- profiling
@dataclass
class LayerProfile:
    forward_s: float        # forward time of the layer
    activation_bytes: int   # bytes autograd saves inside the layer (weights excluded)
    param_bytes: int        # working weights of the layer


def profile_layers(layers: Sequence[torch.nn.Module], run: Callable[[], object]) -> list[LayerProfile]:
    """Runs `run()` (one forward pass) under saved-tensor hooks and per-layer timers; returns each
    layer's forward time, saved activation bytes (distinct tensors, its own parameters excluded)
    and parameter bytes. Works on the meta device (times are then 0)."""
    n = len(layers)
    times = [0.0] * n
    acts = [0] * n
    current: list[int] = []
    seen: list[set] = [set() for _ in range(n)]
    pids = [{id(p) for p in m.parameters()} for m in layers]
    pstore = [{p.untyped_storage().data_ptr() for p in m.parameters() if not p.is_meta} for m in layers]
    t_start: dict[int, float] = {}

    def pre(i):
        def f(mod, args):
            current.append(i)
            t_start[i] = time.perf_counter()
        return f

    def post(i):
        def f(mod, args, out):
            times[i] += time.perf_counter() - t_start[i]
            current.pop()
        return f

    def pack(t):
        if current and t.layout == torch.strided:
            i = current[-1]
            meta = t.is_meta
            key = id(t) if meta else (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if id(t) not in pids[i] and (meta or key[0] not in pstore[i]) and key not in seen[i]:
                seen[i].add(key)
                acts[i] += _nbytes(t)
        return t

    hs = [m.register_forward_pre_hook(pre(i)) for i, m in enumerate(layers)]
    hs += [m.register_forward_hook(post(i)) for i, m in enumerate(layers)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        del out
    finally:
        for h in hs:
            h.remove()
    meta = any(_is_meta(m) for m in layers)
    return [LayerProfile(0.0 if meta else times[i], acts[i], sum(_nbytes(p) for p in layers[i].parameters()))
            for i in range(n)]


def _is_meta(m: torch.nn.Module) -> bool:
    return any(p.is_meta for p in m.parameters())


def measure_link_bandwidth(device, nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Host -> device copy bandwidth (bytes/s) of a pinned buffer; on the CPU a host memcpy."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8)
    if device.type == "cuda":
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


# ----------------------------------------------------------------------------- cost model
@dataclass
class ActivationPlan:
    policies: list
    time_s: float           # modelled iteration time
    kept_bytes: int
    swapped_bytes: int
    recompute_s: float
    feasible: bool
    notes: list = field(default_factory=list)


def iteration_time(forward_s: Sequence[float], act_bytes: Sequence[int], policies: Sequence[str], bandwidth: float,
                   param_traffic: float = 0.0) -> float:
    """The cost model's iteration time of `policies` (module doc)."""
    compute = 3.0 * sum(forward_s)
    rec = sum(t for t, p in zip(forward_s, policies) if p == "recompute")
    swapped = sum(a for a, p in zip(act_bytes, policies) if p == "swap")
    link = (param_traffic + 2.0 * swapped) / bandwidth
    return compute + rec + max(0.0, link - compute)


def activation_memory(act_bytes: Sequence[int], policies: Sequence[str]) -> int:
    """Device bytes the policies need at the activation peak (module doc)."""
    kept = sum(a for a, p in zip(act_bytes, policies) if p == "keep")
    evicted = [a for a, p in zip(act_bytes, policies) if p != "keep"]
    return kept + (2 * max(act_bytes) if evicted else 0)


def brute_force_activations(forward_s, act_bytes, budget: int, bandwidth: float, param_traffic: float = 0.0):
    """All 3^n policies; the cheapest feasible one (None if none fits) and its time."""
    best = (math.inf, None)
    for pol in itertools.product(POLICIES, repeat=len(forward_s)):
        if activation_memory(act_bytes, pol) > budget:
            continue
        t = iteration_time(forward_s, act_bytes, pol, bandwidth, param_traffic)
        if t < best[0]:
            best = (t, list(pol))
    return best


def plan_activations(forward_s: Sequence[float], act_bytes: Sequence[int], budget: int, bandwidth: float,
                     param_traffic: float = 0.0, unit_bytes: Optional[int] = None) -> ActivationPlan:
    """The cost model's optimum by dynamic programming (module doc)."""
    n = len(forward_s)
    if n == 0:
        return ActivationPlan([], 0.0, 0, 0, 0.0, True)
    total = sum(act_bytes)
    if total <= budget:
        pol = ["keep"] * n
        return ActivationPlan(pol, iteration_time(forward_s, act_bytes, pol, bandwidth, param_traffic), total, 0,
                              0.0, True)
    reserve = 2 * max(act_bytes)
    room = budget - reserve
    if room < 0:
        pol = ["recompute"] * n
        return ActivationPlan(pol, iteration_time(forward_s, act_bytes, pol, bandwidth, param_traffic), 0, 0,
                              sum(forward_s), False, [f"budget {budget} B is below the transient of one layer "
                                                      f"being restored ({reserve} B)"])
    unit = unit_bytes or max(1, -(-total // 256))
    u = [-(-a // unit) for a in act_bytes]  # rounded up: kept memory is never underestimated
    kmax = room // unit
    smax = sum(u)
    INF = math.inf
    dp = torch.full((kmax + 1, smax + 1), INF, dtype=torch.float64)
    dp[0, 0] = 0.0
    choice = torch.zeros((n, kmax + 1, smax + 1), dtype=torch.int8)
    for i in range(n):
        keep = torch.full_like(dp, INF)
        if u[i] <= kmax:
            keep[u[i]:, :] = dp[:kmax + 1 - u[i], :]
        swap = torch.full_like(dp, INF)
        swap[:, u[i]:] = dp[:, :smax + 1 - u[i]]
        rec = dp + forward_s[i]
        new = keep
        c = torch.zeros_like(choice[i])
        better = swap < new
        new = torch.where(better, swap, new)
        c[better] = 1
        better = rec < new
        new = torch.where(better, rec, new)
        c[better] = 2
        choice[i] = c
        dp = new
    compute = 3.0 * sum(forward_s)
    s_bytes = torch.arange(smax + 1, dtype=torch.float64) * unit
    link = (param_traffic + 2.0 * s_bytes) / bandwidth
    cost = dp + compute + torch.clamp(link - compute, min=0.0)[None, :]
    best = float(cost.min())
    if not math.isfinite(best):
        raise AssertionError("plan_activations: no policy found (all-recompute is always feasible)")
    # among the optima: the least swap traffic, then the most kept
    ks, ss = torch.nonzero(cost <= best + 1e-12 * abs(best), as_tuple=True)
    j = min(range(len(ks)), key=lambda q: (int(ss[q]), -int(ks[q])))
    k, s = int(ks[j]), int(ss[j])
    pol = [None] * n
    for i in range(n - 1, -1, -1):
        c = int(choice[i, k, s])
        pol[i] = POLICIES[c]
        if c == 0:
            k -= u[i]
        elif c == 1:
            s -= u[i]
    return ActivationPlan(pol, iteration_time(forward_s, act_bytes, pol, bandwidth, param_traffic),
                          sum(a for a, p in zip(act_bytes, pol) if p == "keep"),
                          sum(a for a, p in zip(act_bytes, pol) if p == "swap"),
                          sum(t for t, p in zip(forward_s, pol) if p == "recompute"), True)
