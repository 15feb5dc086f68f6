"""One planner for lspo's memory tiers (LoHan): given a device-memory and a host-memory budget, it
measures the model (per-layer forward time, activation and weight bytes) and the host<->device link,
and decides where each thing lives:

* optimizer state (fp32 master + Adam moments, OffloadAdamW's engine: 24 B per trained element
  with its double buffer) -- host memory up to what the host budget leaves, files in ``state_dir``
  beyond (``host_memory_limit`` for the optimizer);
* working weights -- resident on the device, or in host memory streamed layer by layer with a
  prefetch window (``TierRunner(offload_params=True, window=w)``);
* activations -- per layer keep / swap / recompute (``tiers.plan_activations``).

Device memory model: resident weights need weights + gradients (until the optimizer's hook takes
them) + activations; streamed weights need the non-layer weights and their gradients, ``window``
layers' weights, one layer's gradients, + activations. Host memory: the engine's gradient and
output buffers (2 x the trained weight bytes), streamed weights, swapped activations, the state's
share, 256 MiB slack for the I/O chunk buffers and the process. The numbers are estimates from
one profiled forward pass; they are printed with the plan.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import tiers

STATE_BYTES_PER_ELEM = 24  # engine host slot: (master + m + v) x 4 B x 2 halves
DISK_BYTES_PER_ELEM = 12   # one generation on disk
SLACK = 256 << 20


def parse_bytes(s) -> int:
    """'4GB', '512MiB', '1.5G', '8e9' or a number of bytes -> bytes (GB = GiB = 2^30: memory sizes)."""
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(s))
    if not m:
        raise ValueError(f"cannot read a memory size from {s!r} (use e.g. 4GB, 512MB, 1.5G)")
    mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class TierPlan:
    device_memory: int
    host_memory: int
    state_dir: Optional[str]
    layers: int
    params: int
    trained: int
    weight_bytes: int
    layer_weight_bytes: int
    bandwidth: float
    params_on_device: bool
    window: int
    policies: list
    activation_bytes: int
    state_bytes: int
    state_host_limit: int
    state_disk_bytes: int
    device_bytes: int
    host_bytes: int
    iteration_s: float
    feasible: bool
    notes: list = field(default_factory=list)

    def optimizer_kwargs(self) -> dict:
        """OffloadAdamW/LSPAdamW keyword arguments that realise the state tier."""
        if self.state_disk_bytes == 0:
            return {}
        return {"state_dir": self.state_dir, "host_memory_limit": self.state_host_limit}

    def runner_kwargs(self) -> dict:
        """TierRunner keyword arguments that realise the weight and activation tiers."""
        # (window 0 means "resident"; TierRunner wants >= 1 even when it streams nothing)
        return {"offload_params": not self.params_on_device, "window": max(1, self.window),
                "policies": list(self.policies)}

    def needs_runner(self) -> bool:
        return not self.params_on_device or any(p != "keep" for p in self.policies)

    def describe(self) -> str:
        pol = {k: self.policies.count(k) for k in tiers.POLICIES}
        w = ("device (resident)" if self.params_on_device else
             f"host, streamed to the device, window {self.window} of {self.layers} layers")
        lines = [
            f"lspo tier plan: device budget {fmt_bytes(self.device_memory)}, host budget {fmt_bytes(self.host_memory)}",
            f"  model: {self.params / 1e6:.1f}M params ({self.trained / 1e6:.1f}M trained), weights "
            f"{fmt_bytes(self.weight_bytes)}, {self.layers} layers of {fmt_bytes(self.layer_weight_bytes)}, "
            f"activations {fmt_bytes(self.activation_bytes)}/step; link {self.bandwidth / 1e9:.1f} GB/s",
            f"  optimizer state ({fmt_bytes(self.state_bytes)} in host memory, {STATE_BYTES_PER_ELEM} B/elem): "
            + ("host memory" if self.state_disk_bytes == 0 else
               f"host up to {fmt_bytes(self.state_host_limit)}, {fmt_bytes(self.state_disk_bytes)} in files under "
               f"{self.state_dir or '(no --state-dir given!)'}"),
            f"  working weights: {w}",
            f"  activations: keep {pol['keep']}, swap {pol['swap']}, recompute {pol['recompute']} layers",
            f"  estimated use: device {fmt_bytes(self.device_bytes)}, host {fmt_bytes(self.host_bytes)}, "
            f"modelled iteration {self.iteration_s * 1e3:.1f} ms" + ("" if self.feasible else "  [DOES NOT FIT]"),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def plan_tiers(layers: Sequence[torch.nn.Module], all_params: Sequence[torch.nn.Parameter], *,
               device_memory, host_memory, state_dir: Optional[str] = None,
               profile: Optional[list] = None, run: Optional[Callable[[], object]] = None,
               bandwidth: Optional[float] = None, device="cpu", device_flops: float = 0.0,
               tokens: int = 0, max_window: int = 4, state_elems: Optional[int] = None,
               buffer_bytes: Optional[int] = None) -> TierPlan:
    """Plans the tiers. `layers`: the repeated blocks in forward order; `all_params`: every parameter
    (the trained ones have requires_grad). Give `profile` (tiers.LayerProfile per layer) or `run`
    (one forward pass on a sample batch, profiled here). On the meta device forward times are 0:
    they are then estimated as 2 * layer elements * `tokens` / `device_flops`.
    `state_elems` / `buffer_bytes`: the elements the optimizer keeps engine state for and the bytes of
    its host gradient/output buffers, when they are not OffloadAdamW's (every trained element; 2 x the
    trained weight bytes) -- LSPAdamW keeps d x d moments per projected layer."""
    D, H = parse_bytes(device_memory), parse_bytes(host_memory)
    if profile is None:
        if run is None:
            raise ValueError("plan_tiers: give a profile or a run() callable to profile")
        profile = tiers.profile_layers(layers, run)
    notes = []
    if device_flops and tokens:
        for lp, m in zip(profile, layers):
            if lp.forward_s == 0.0:
                lp.forward_s = 2.0 * sum(p.numel() for p in m.parameters()) * tokens / device_flops
    if bandwidth is None:
        bandwidth = tiers.measure_link_bandwidth(device)
    n = len(layers)
    uniq = {id(p): p for p in all_params}.values()
    W = sum(tiers._nbytes(p) for p in uniq)
    Wt = sum(tiers._nbytes(p) for p in uniq if p.requires_grad)
    n_params = sum(p.numel() for p in uniq)
    n_trained = sum(p.numel() for p in uniq if p.requires_grad)
    in_layers = {id(p) for m in layers for p in m.parameters()}
    Wl = sum(tiers._nbytes(p) for p in uniq if id(p) in in_layers)
    Wn, Wnt = W - Wl, sum(tiers._nbytes(p) for p in uniq if id(p) not in in_layers and p.requires_grad)
    Lmax = max((lp.param_bytes for lp in profile), default=0)
    fwd = [lp.forward_s for lp in profile]
    acts = [lp.activation_bytes for lp in profile]

    def activation_plan(budget, traffic):
        if budget < 0:
            return None
        return tiers.plan_activations(fwd, acts, budget, bandwidth, traffic)

    # weights: resident if they fit together with a feasible activation plan, else streamed
    resident = activation_plan(D - W - Wt, Wt)
    if resident is not None and resident.feasible:
        on_device, window, ap = True, 0, resident
        dev_bytes = W + Wt + tiers.activation_memory(acts, ap.policies)
    else:
        on_device, ap, window = False, None, 0
        for w in range(min(max_window, n), 0, -1):
            ap = activation_plan(D - Wn - Wnt - w * Lmax - Lmax, 2 * Wl + Wt)
            if ap is not None and ap.feasible:
                window = w
                break
        if window == 0:
            window = 1
            ap = tiers.plan_activations(fwd, acts, 0, bandwidth, 2 * Wl + Wt)
            notes.append("the device budget cannot hold one layer's weights, gradients and the smallest "
                         "activation footprint: the plan does not fit")
        dev_bytes = Wn + Wnt + (window + 1) * Lmax + tiers.activation_memory(acts, ap.policies)
    # host: engine buffers, streamed weights, swapped activations, then the optimizer state
    fixed = (2 * Wt if buffer_bytes is None else buffer_bytes) + (0 if on_device else Wl) + ap.swapped_bytes + SLACK
    n_state = n_trained if state_elems is None else state_elems
    S = STATE_BYTES_PER_ELEM * n_state
    limit = max(0, H - fixed)
    if S <= limit:
        disk, state_limit = 0, S
    else:
        state_limit = limit
        disk = int(DISK_BYTES_PER_ELEM * n_state * (1 - limit / S))
        if not state_dir:
            notes.append("the optimizer state does not fit the host budget: give a state directory (--state-dir)")
    host_bytes = fixed + min(S, limit)
    feasible = ap.feasible and dev_bytes <= D and fixed <= H and (disk == 0 or bool(state_dir))
    return TierPlan(device_memory=D, host_memory=H, state_dir=state_dir, layers=n, params=n_params,
                    trained=n_trained, weight_bytes=W, layer_weight_bytes=Lmax, bandwidth=bandwidth,
                    params_on_device=on_device, window=window, policies=ap.policies,
                    activation_bytes=sum(acts), state_bytes=S, state_host_limit=state_limit,
                    state_disk_bytes=disk, device_bytes=dev_bytes, host_bytes=host_bytes,
                    iteration_s=ap.time_s, feasible=feasible, notes=notes)


def decoder_layers(model: torch.nn.Module) -> list:
    """The repeated blocks of a Hugging Face causal LM (LLaMA/Mistral/Qwen2: model.layers; GPT-2:
    transformer.h), or of any model with one ModuleList holding most of its parameters."""
    best, best_n = None, 0
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = m, n
    if best is None:
        raise ValueError("decoder_layers: the model has no ModuleList of layers")
    return list(best)
