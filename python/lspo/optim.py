"""Drop-in offloading optimizers over lspo's OffloadEngine (``lspo._C.OffloadEngine``).

``OffloadAdamW`` -- full offload (the ``Identity`` compressor; ZeRO-Offload / LoHan "active
gradient offloading"): every parameter has an fp32 master copy and fp32 Adam moments in host
memory. As soon as a parameter's gradient is complete (a post-accumulate-grad hook), it is copied to
a host buffer (pinned, on a copy stream, when the parameter is on a GPU) and the engine's worker
thread runs the fused CPU AdamW on it *speculatively*, overlapped with the rest of backward.
``step()`` is the step boundary: it knows the global gradient norm, the AMP scale and whether the
gradient is finite, and

* commits each speculation that used exactly the right inputs (same step, learning rate, betas,
  eps, weight decay, gradient scale, and a gradient not modified since the hook ran), or
* recomputes the step from the untouched committed state with the right coefficient
  (gradient accumulation in progress, clipping active, AMP scale changed, lr changed, the gradient
  modified in place after backward, e.g. by ``clip_grad_norm_``), or
* on a non-finite gradient, drops everything: weights, moments and step counts stay untouched;
  ``last_step_skipped`` is True, ``skipped_steps`` counts, a ``RuntimeWarning`` is issued.

The committed state is therefore always exactly what the serial schedule (``overlap=False``)
computes -- bitwise, since both run the same kernel on the same inputs.

Clipping: ``max_grad_norm`` clips on the global L2 norm of all gradients of the optimizer (as
``torch.nn.utils.clip_grad_norm_`` with ``eps=1e-6``), folded into the Adam kernel's
``grad_scale`` (no extra pass over the gradients). AMP: ``torch.amp.GradScaler`` is supported
through ``_step_supports_amp_scaling``: the scaler hands us ``grad_scale``/``found_inf`` and the
kernel unscales while it reads the gradient (or ``scaler.unscale_(opt)`` first, as usual).
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Iterable, Optional

import torch

from . import _C

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _hparams_key(group: dict, step: int, grad_scale: float) -> tuple:
    b1, b2 = group["betas"]
    return (step, float(group["lr"]), float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]),
            float(grad_scale))


class _Slot:
    __slots__ = ("index", "param", "group", "spec", "hook", "grad_seen", "d2h_event", "h2d_event")

    def __init__(self, index: int, param: torch.Tensor, group: dict):
        self.index = index
        self.param = param
        self.group = group
        self.spec = None          # (hparams key, the grad_seen it read) of the queued speculation
        self.hook = None
        self.grad_seen = None     # (id(grad), grad._version) copied into the host buffer
        self.d2h_event = None
        self.h2d_event = None


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW with fp32 master weights and moments on the CPU, stepped by lspo's fused CPU Adam on a
    worker thread overlapped with backward. Same math as ``torch.optim.AdamW`` (decoupled weight
    decay, bias correction); parameters of any float dtype on CPU or CUDA.

    Options beyond AdamW's: ``max_grad_norm`` (global clipping, see module doc), ``overlap``
    (False: the serial reference schedule, everything inside ``step()``), ``record_timeline``
    (per-layer stage timestamps; ``timeline_json()`` gives a Chrome trace), ``pinned_limit_bytes``
    (budget for pinned host buffers; beyond it, or when pinning fails, buffers stay pageable and
    ``engine_stats()['pin_fallbacks']`` counts them, with one warning).

    Disk tier (LoHan): ``state_dir`` keeps the fp32 master and moments of every parameter that does
    not fit ``host_memory_limit`` (bytes of fp32 state in host memory, both halves of the engine's
    double buffer: 24 B per element; None: unlimited) in files under ``state_dir``, streamed in
    chunks through the fused Adam during backward. After every ``step()`` the directory holds that
    step wholly (an atomic commit); ``resume=True`` continues from it (step counts and weights are
    restored from the directory). For parameters on disk ``state[p]`` holds only ``step``;
    ``state_dict()`` reads their state from the files.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, max_grad_norm: Optional[float] = None, overlap: bool = True,
                 record_timeline: bool = False, pinned_limit_bytes: int = 4 << 30,
                 state_dir: Optional[str] = None, host_memory_limit: Optional[int] = None, resume: bool = False):
        if isinstance(lr, torch.Tensor):
            raise TypeError("OffloadAdamW: lr must be a Python float (the CPU kernel reads it every step)")
        if not lr >= 0.0:
            raise ValueError(f"OffloadAdamW: invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"OffloadAdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"OffloadAdamW: invalid betas {betas} (need 0 <= beta < 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"OffloadAdamW: invalid weight_decay {weight_decay}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"OffloadAdamW: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.last_grad_norm: Optional[float] = None
        if resume and not state_dir:
            raise ValueError("OffloadAdamW: resume=True needs a state_dir")
        if host_memory_limit is not None and not host_memory_limit >= 0:
            raise ValueError(f"OffloadAdamW: host_memory_limit must be >= 0 bytes or None, got {host_memory_limit}")
        self._state_dir = str(state_dir) if state_dir else None
        self._engine = _C.OffloadEngine(overlap=overlap, record_timeline=record_timeline,
                                        pinned_limit_bytes=int(pinned_limit_bytes), state_dir=self._state_dir or "",
                                        host_memory_limit_bytes=-1 if host_memory_limit is None
                                        else int(host_memory_limit), resume=bool(resume))
        self._slots: dict[torch.Tensor, _Slot] = {}
        self._spec_scale = 1.0  # gradient scale assumed by speculations (the last step's AMP unscale)
        self._d2h = self._h2d = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if resume:
            self._resume()

    @torch.no_grad()
    def _resume(self) -> None:
        """Step counts and weights from the state directory's last committed step."""
        for p, s in self._slots.items():
            self.state[p]["step"] = torch.tensor(float(self._engine.committed_step(s.index)))
            master = self._engine.load_state(s.index, "master")
            if master is not None:
                p.copy_(master.view(p.shape))

    # ---------------------------------------------------------------- registration
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._register(p, group)

    def _register(self, p: torch.Tensor, group: dict) -> None:
        if p.dtype not in _GRAD_DTYPES:
            raise TypeError(f"OffloadAdamW: parameter of dtype {p.dtype} (need float32, bfloat16 or float16)")
        if p in self._slots:
            raise ValueError("OffloadAdamW: a parameter appears in more than one group")
        idx = self._engine.add_slot(f"param{len(self._slots)}:{tuple(p.shape)}", p.detach(), p.numel(), p.dtype,
                                    p.dtype, len(self._slots))
        s = _Slot(idx, p, group)
        self._slots[p] = s
        if p.requires_grad:
            s.hook = p.register_post_accumulate_grad_hook(self._on_grad)
        self._refresh_state(p)

    def _refresh_state(self, p: torch.Tensor, materialize: bool = False) -> None:
        s = self._slots[p]
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
        for kind, key in (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("master", "master_param")):
            self._put_view(st, key, self._state_tensor(s, kind, materialize), p.shape)

    def _state_tensor(self, s: _Slot, kind: str, materialize: bool = True) -> Optional[torch.Tensor]:
        """Committed state ``kind`` of a slot, flat: the engine's host tensor (writes land there) or, for
        a slot on disk, a copy read from its files when ``materialize`` (write back with ``_store``)."""
        eng = self._engine
        if eng.on_disk(s.index):
            return eng.load_state(s.index, kind) if materialize else None
        return getattr(eng, kind)(s.index)

    def _store(self, s: _Slot, kind: str, value: torch.Tensor) -> None:
        self._engine.store_state(s.index, kind, value.reshape(-1))

    @staticmethod
    def _put_view(st: dict, key: str, t: Optional[torch.Tensor], shape) -> None:
        if t is None:
            st.pop(key, None)
        else:
            st[key] = t.view(shape)

    # ---------------------------------------------------------------- the pipeline
    def _copy_grad(self, s: _Slot, grad: torch.Tensor) -> None:
        """Gradient -> the slot's host buffer (on the D2H stream for CUDA tensors)."""
        eng = self._engine
        eng.wait(s.index)  # a queued or running (now stale) speculation may still read the buffer
        buf = eng.grad_buffer(s.index)
        t0 = eng.now_us()
        if grad.is_cuda:
            if self._d2h is None:
                self._d2h = torch.cuda.Stream(device=grad.device)
                self._h2d = torch.cuda.Stream(device=grad.device)
            if s.h2d_event is not None:
                s.h2d_event.synchronize()  # the previous upload of out_buffer is long done by now
            self._d2h.wait_stream(torch.cuda.current_stream(grad.device))
            with torch.cuda.stream(self._d2h):
                buf.copy_(grad.reshape(-1), non_blocking=True)
                grad.record_stream(self._d2h)
                s.d2h_event = torch.cuda.Event()
                s.d2h_event.record(self._d2h)
        else:
            buf.copy_(grad.reshape(-1))
            s.d2h_event = None
            eng.add_event("d2h", eng_name(s), 2, t0, eng.now_us())
        s.grad_seen = (weakref.ref(grad), grad._version)

    def _submit(self, s: _Slot, key: tuple) -> None:
        step, lr, b1, b2, eps, wd, gs = key
        ev = s.d2h_event.cuda_event if s.d2h_event is not None else 0
        self._engine.submit(s.index, step, lr, b1, b2, eps, wd, gs, ev)
        s.spec = (key, s.grad_seen)

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        s = self._slots[p]
        g = p.grad
        s.grad_seen = None  # a new or further-accumulated gradient: the host copy is stale
        if g is None or not self._engine.overlap:
            return
        if g.is_sparse:
            raise RuntimeError("OffloadAdamW does not support sparse gradients")
        self._copy_grad(s, g)
        step = int(self.state[p]["step"].item()) + 1
        self._submit(s, _hparams_key(s.group, step, self._spec_scale))

    # ---------------------------------------------------------------- step
    def _grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        by_dev: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_dev.setdefault(g.device, []).append(g)
        norms = []
        for gs in by_dev.values():
            norms.extend(n.float() for n in torch._foreach_norm(gs, 2.0))
        dev = grads[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]), 2.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        eng = self._engine
        t_step = eng.now_us()
        live = [s for s in self._slots.values() if self._has_grad(s)]
        self.last_step_skipped = False
        if not live:
            return loss
        grads = [self._grad_src(s) for s in live]
        # AMP: GradScaler sets grad_scale (None once unscale_ ran) and found_inf on us before step()
        amp_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self._check_amp(live, amp_scale, found_inf)
        inv_scale = 1.0 if amp_scale is None else 1.0 / float(amp_scale.double().item())
        total = self._grad_norm(grads)  # norm of the (possibly scaled) gradients, fp32
        total_f = float(total.item())
        nonfinite = not math.isfinite(total_f) or (found_inf is not None and float(found_inf.sum().item()) > 0)
        if nonfinite:
            eng.wait_all()  # drop every speculation: committed state is untouched
            for s in live:
                s.spec = None
                self._drop(s)
            self.last_step_skipped = True
            self.skipped_steps += 1
            self.last_grad_norm = None
            if amp_scale is None:  # with AMP a skipped step is routine (the scaler backs off)
                warnings.warn("OffloadAdamW: non-finite gradient, step skipped (weights and state unchanged)",
                              RuntimeWarning, stacklevel=2)
            return loss
        scale = inv_scale
        self.last_grad_norm = total_f * inv_scale
        if self.max_grad_norm is not None:
            coef = self.max_grad_norm / (total_f * inv_scale + 1e-6)
            if coef < 1.0:
                scale = inv_scale * float(torch.tensor(coef, dtype=torch.float32).item())
        # resubmit every slot whose speculation does not match, then commit in forward order
        for s in live:
            p = s.param
            key = self._key(s, int(self.state[p]["step"].item()) + 1, scale)
            g = self._grad_src(s)
            fresh = s.grad_seen is not None and s.grad_seen[0]() is g and s.grad_seen[1] == g._version
            ok = fresh and s.spec is not None and s.spec[0] == key and s.spec[1] is s.grad_seen
            if ok:
                eng.wait(s.index)
                ok = eng.has_result(s.index)
            if not ok:
                if not fresh:
                    self._copy_grad(s, g)
                self._submit(s, key)
        for s in live:
            eng.commit(s.index)
            s.spec = None
            p = s.param
            self._finish(s)
            self.state[p]["step"] += 1
            self._refresh_state(p)
        self._spec_scale = inv_scale
        if self._state_dir:
            eng.persist()  # this step, wholly, in the state directory
        eng.add_event("step", "engine", 0, t_step, eng.now_us())
        return loss

    # ---------------------------------------------------------------- per-slot policy (LSPAdamW overrides)
    def _has_grad(self, s: _Slot) -> bool:
        """The slot has a gradient to consume this step."""
        return s.param.grad is not None

    def _grad_src(self, s: _Slot) -> torch.Tensor:
        """The tensor that goes to the slot's host gradient buffer (and into the global norm)."""
        return s.param.grad

    def _key(self, s: _Slot, step: int, grad_scale: float) -> tuple:
        return _hparams_key(s.group, step, grad_scale)

    def _check_amp(self, live: list, amp_scale, found_inf) -> None:
        pass

    def _drop(self, s: _Slot) -> None:
        """A skipped step: forget what the slot accumulated for it (nothing to do for plain grads)."""

    def _upload(self, s: _Slot, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Host result -> device tensor on the H2D stream; the compute stream waits on an event."""
        eng = self._engine
        t0 = eng.now_us()
        if dst.is_cuda:
            self._h2d.wait_stream(torch.cuda.current_stream(dst.device))
            with torch.cuda.stream(self._h2d):
                dst.copy_(src, non_blocking=True)
                s.h2d_event = torch.cuda.Event()
                s.h2d_event.record(self._h2d)
            torch.cuda.current_stream(dst.device).wait_event(s.h2d_event)  # GPU-side wait
        else:
            dst.copy_(src)
            eng.add_event("h2d", eng_name(s), 3, t0, eng.now_us())

    def _finish(self, s: _Slot) -> None:
        """The committed result reaches the parameter: the new weights, copied in."""
        p = s.param
        self._upload(s, self._engine.out_buffer(s.index).view(p.shape), p)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        self._engine.wait_all()
        for p in self._slots:
            self._refresh_state(p, materialize=True)
        sd = super().state_dict()
        sd["state"] = {k: {n: t.clone() for n, t in v.items()} for k, v in sd["state"].items()}
        for p in self._slots:
            self._refresh_state(p)  # (drops the copies of state on disk)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self._engine.wait_all()
        saved = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if i not in saved:
                continue
            st = saved[i]
            for k in ("exp_avg", "exp_avg_sq", "master_param"):
                if k not in st:
                    raise ValueError(f"OffloadAdamW.load_state_dict: state of parameter {i} lacks '{k}'")
                if st[k].numel() != p.numel():
                    raise ValueError(f"OffloadAdamW.load_state_dict: '{k}' of parameter {i} has {st[k].numel()} "
                                     f"elements, the parameter {p.numel()}")
        super().load_state_dict(state_dict)  # groups (lr, betas, ...) and step counts
        for i, p in enumerate(params):
            s = self._slots[p]
            s.spec = None
            s.grad_seen = None
            if i in saved:
                st = saved[i]
                for kind in ("exp_avg", "exp_avg_sq", "master"):
                    self._store(s, kind, st["master_param" if kind == "master" else kind])
                self.state[p]["step"] = st["step"].detach().to("cpu", torch.float32).clone()
            self._refresh_state(p)
        # the slots' groups are the (new) group dicts
        for g in self.param_groups:
            for p in g["params"]:
                self._slots[p].group = g

    # ---------------------------------------------------------------- introspection
    def engine_stats(self) -> dict:
        return self._engine.stats()

    def slots_on_disk(self) -> int:
        """How many parameters keep their optimizer state in files (the disk tier)."""
        return sum(1 for s in self._slots.values() if self._engine.on_disk(s.index))

    def timeline_json(self) -> str:
        return self._engine.timeline_json()

    def clear_timeline(self) -> None:
        self._engine.clear_timeline()

    def set_record_timeline(self, on: bool) -> None:
        self._engine.set_record_timeline(on)


def eng_name(s: _Slot) -> str:
    return f"param{s.index}:{tuple(s.param.shape)}"
