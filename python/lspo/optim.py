"""Drop-in offloading optimizers: the Python face of lspo's optimizer core (``lspo._C.OptimizerCore``).

``OffloadAdamW`` -- full offload (ZeRO-Offload / LoHan "active gradient offloading"): every parameter
that receives a gradient gets an fp32 master copy and fp32 Adam moments in host memory (nothing for a
parameter that never gets one). As soon as a gradient is complete (a post-accumulate-grad hook: one
call into the core), the core copies it to a host buffer (pinned, on its D2H copy stream, when the
parameter is on a GPU) and the engine's worker thread runs the fused CPU AdamW on it
*speculatively*, overlapped with the rest of backward. ``step()`` is the step boundary (one call): the
core knows the global gradient norm, the AMP scale and whether the gradient is finite, and commits
each speculation that used exactly the right inputs or recomputes it from the untouched committed
state; on a non-finite gradient everything is dropped (weights, moments and step counts untouched;
``last_step_skipped``, ``skipped_steps``, a ``RuntimeWarning`` without AMP). The committed state is
bitwise what the serial schedule (``overlap=False``) computes.

Everything that two languages would otherwise have to agree on -- the pipeline, clipping, the skip,
AMP, refits, the checkpoint content -- lives in the C++ core, shared with the C++ optimizers of
``lspo/optim.h``. This module only maps options, registers hooks and translates state.

Clipping: ``max_grad_norm`` clips on the global L2 norm of all gradients of the optimizer (as
``torch.nn.utils.clip_grad_norm_`` with ``eps=1e-6``), folded into the Adam kernel's ``grad_scale``.
AMP: ``torch.amp.GradScaler`` is supported through ``_step_supports_amp_scaling`` (the kernel unscales
while it reads the gradient), or ``scaler.unscale_(opt)`` first, as usual.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Iterable, Optional

import torch

from . import _C

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Options torch's AdamW knows that lspo accepts only with these (harmless) values.
_FIXED_OPTIONS = {
    "amsgrad": (False,),
    "maximize": (False,),
    "capturable": (False,),
    "differentiable": (False,),
    "fused": (None, False),
    "foreach": (None, False),
    "decoupled_weight_decay": (True,),
}


def _check_group(name: str, group: dict) -> None:
    for k, ok in _FIXED_OPTIONS.items():
        if k in group and group[k] not in ok:
            raise ValueError(f"{name}: {k}={group[k]!r} is not supported (lspo's CPU AdamW has no {k}); "
                             f"accepted values: {', '.join(repr(v) for v in ok)}")
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        raise TypeError(f"{name}: lr must be a Python float (the CPU kernel reads it every step)")
    if lr is not None and not lr >= 0.0:
        raise ValueError(f"{name}: invalid learning rate {lr}")
    b = group.get("betas")
    if b is not None and not (0.0 <= b[0] < 1.0 and 0.0 <= b[1] < 1.0):
        raise ValueError(f"{name}: invalid betas {b} (need 0 <= beta < 1)")
    if "eps" in group and not group["eps"] >= 0.0:
        raise ValueError(f"{name}: invalid eps {group['eps']}")
    if "weight_decay" in group and not group["weight_decay"] >= 0.0:
        raise ValueError(f"{name}: invalid weight_decay {group['weight_decay']}")


_POSITIONS = ("proj_P_indices", "proj_Q_indices")  # state entries that never change


class _CoreState(dict):
    """``optimizer.state``: filled from the core when read, so it is always the committed state
    (views of the host tensors; ``state_dict()`` copies). A parameter without a gradient yet has no
    state, as in torch's optimizers."""

    def __init__(self, opt: "OffloadAdamW"):
        super().__init__()
        self._opt = weakref.ref(opt)

    def _fill(self, p) -> None:
        opt = self._opt()
        i = opt._index.get(p) if opt is not None else None
        if i is None:
            return
        st = opt._core.state(i, False)
        if st is None:
            dict.pop(self, p, None)
        else:
            dict.__setitem__(self, p, st)

    def _fill_all(self) -> None:
        opt = self._opt()
        if opt is not None:
            for p in opt._index:
                self._fill(p)

    def __getitem__(self, p):
        self._fill(p)
        if not dict.__contains__(self, p):
            dict.__setitem__(self, p, {})
        return dict.__getitem__(self, p)

    def __contains__(self, p):
        self._fill(p)
        return dict.__contains__(self, p)

    def get(self, p, default=None):
        self._fill(p)
        return dict.get(self, p, default)

    def __iter__(self):
        self._fill_all()
        return dict.__iter__(self)

    def __len__(self):
        self._fill_all()
        return dict.__len__(self)

    def items(self):
        self._fill_all()
        return dict.items(self)

    def keys(self):
        self._fill_all()
        return dict.keys(self)

    def values(self):
        self._fill_all()
        return dict.values(self)


def _hook(opt_ref: "weakref.ref", slot: int):
    def on_grad(_p: torch.Tensor) -> None:
        opt = opt_ref()
        if opt is not None:
            opt._core.on_grad(slot)
    # a gradient hook: never traced (the backward of a torch.compile'd training step runs it)
    return torch.compiler.disable(on_grad)


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
    restored from the directory). ``state[p]`` of a parameter on disk holds copies read from the files.
    """

    _step_supports_amp_scaling = True
    _kind = "OffloadAdamW"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, max_grad_norm: Optional[float] = None, overlap: bool = True,
                 record_timeline: bool = False, pinned_limit_bytes: int = 4 << 30, seed: int = 0,
                 state_dir: Optional[str] = None, host_memory_limit: Optional[int] = None, resume: bool = False):
        name = self._kind
        if resume and not state_dir:
            raise ValueError(f"{name}: resume=True needs a state_dir")
        if host_memory_limit is not None and not host_memory_limit >= 0:
            raise ValueError(f"{name}: host_memory_limit must be >= 0 bytes or None, got {host_memory_limit}")
        self._state_dir = str(state_dir) if state_dir else None
        _check_group(name, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"{name}: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.max_grad_norm = self._core_max_norm = max_grad_norm
        self._core = _C.OptimizerCore(name, overlap=overlap, record_timeline=record_timeline,
                                      pinned_limit_bytes=int(pinned_limit_bytes),
                                      max_grad_norm=float(max_grad_norm or 0.0), seed=int(seed),
                                      state_dir=self._state_dir or "",
                                      host_memory_limit_bytes=-1 if host_memory_limit is None else int(host_memory_limit),
                                      resume=bool(resume), **self._core_options())
        self._index: dict = {}    # parameter -> core slot
        self._hooks: list = []
        self._grads_modified = 0
        self._warned_clip = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.state = _CoreState(self)
        if resume:
            with torch.no_grad():
                self._core.resume()  # step counts and weights from the directory's last committed step

    def _core_options(self) -> dict:
        """Extra keyword arguments of the core (LSPAdamW: its projector options)."""
        return {}

    # ---------------------------------------------------------------- registration
    def add_param_group(self, param_group: dict) -> None:
        _check_group(self._kind, param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        for p in group["params"]:
            self._register(p, gi, group)
        self._sync_groups()
        if self._state_dir:
            self._core.allocate_all()  # the disk tier places state in registration order

    def _projection(self, p: torch.Tensor, group: dict) -> tuple:
        """(projected, subspace, nnz) of a parameter (LSPAdamW overrides)."""
        return False, 0, 0

    def _register(self, p: torch.Tensor, gi: int, group: dict) -> None:
        if p.dtype not in _GRAD_DTYPES:
            raise TypeError(f"{self._kind}: parameter of dtype {p.dtype} (need float32, bfloat16 or float16)")
        if p in self._index:
            raise ValueError(f"{self._kind}: a parameter appears in more than one group")
        projected, d, r = self._projection(p, group)
        i = self._core.add_param(p, gi, projected, d, r)
        self._index[p] = i
        if p.requires_grad:
            self._hooks.append(p.register_post_accumulate_grad_hook(_hook(weakref.ref(self), i)))

    def __del__(self):
        for h in getattr(self, "_hooks", ()):
            h.remove()

    def __deepcopy__(self, memo):
        raise TypeError(f"{self._kind} cannot be deep-copied: it owns native state (a worker thread, host buffers, "
                        "gradient hooks on its parameters). Save opt.state_dict() and load it into a new optimizer "
                        "built over the copied parameters.")

    def __getstate__(self):
        raise TypeError(f"{self._kind} cannot be pickled (it owns native state); pickle opt.state_dict() instead")

    # ---------------------------------------------------------------- step
    def _group_tuple(self, g: dict) -> tuple:
        b1, b2 = g["betas"]
        # (refit options: unused by OffloadAdamW, which projects nothing)
        return (float(g["lr"]), float(b1), float(b2), float(g["eps"]), float(g["weight_decay"]), 0, 0.0, 1, 0.1,
                0.0, 0.0, "on_failure")

    def _sync_groups(self) -> None:
        for g in self.param_groups:
            _check_group(self._kind, g)
        self._core.set_groups([self._group_tuple(g) for g in self.param_groups])
        if self.max_grad_norm != self._core_max_norm:
            if self.max_grad_norm is not None and not self.max_grad_norm > 0:
                raise ValueError(f"{self._kind}: max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
            self._core.set_max_grad_norm(float(self.max_grad_norm or 0.0))
            self._core_max_norm = self.max_grad_norm

    @torch.compiler.disable  # host engine and Python state: torch.compile runs the step eagerly
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_groups()
        # AMP: GradScaler sets grad_scale (None once unscale_ ran) and found_inf on us before step()
        amp_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        scale = None if amp_scale is None else float(amp_scale.double().item())
        inf = found_inf is not None and float(found_inf.sum().item()) > 0
        ran, skipped, norm, modified, dense_next, n_refits = self._core.step(scale, inf,
                                                                             amp_scale is None and found_inf is not None)
        self._after_step(dense_next, n_refits)
        self.last_step_skipped = skipped
        if skipped:
            self.last_grad_norm = None
            if amp_scale is None:  # with AMP a skipped step is routine (the scaler backs off)
                warnings.warn(f"{self._kind}: non-finite gradient, step skipped (weights and state unchanged)",
                              RuntimeWarning, stacklevel=2)
        elif ran:
            self.last_grad_norm = norm
        if modified > self._grads_modified:
            self._grads_modified = modified
            self._on_grads_modified()
        return loss

    def _after_step(self, dense_next: list, n_refits: int) -> None:
        """What the Python side keeps of a step (LSPAdamW: its wrap handles)."""

    def _on_grads_modified(self) -> None:
        """Dense gradients changed between backward and step() (clip_grad_norm_, ...)."""

    @torch.compiler.disable  # as step(): never traced
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._core.zero_grad()
        self._sync_groups()  # an LR scheduler stepped since step(): speculations use the new lr

    @property
    def skipped_steps(self) -> int:
        return self._core.skipped_steps

    @property
    def last_step_skipped(self) -> bool:
        return getattr(self, "_last_skipped", False)

    @last_step_skipped.setter
    def last_step_skipped(self, v: bool) -> None:
        self._last_skipped = bool(v)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        self._core.wait_all()
        sd = super().state_dict()
        # a snapshot; projector positions never change, so they are shared (a clone would also expand a
        # dense basis's one row of shared positions to [n, d])
        sd["state"] = {k: {n: (t.clone() if isinstance(t, torch.Tensor) and n not in _POSITIONS else t)
                           for n, t in v.items()}
                       for k, v in sd["state"].items() if v}
        sd["lspo_optimizer"] = self._kind  # the C++ face's checkpoints carry the same keys
        sd["lspo_format"] = 2
        if getattr(self, "_dist", None) is not None:  # data parallel: a collective, the full dict on rank 0
            from .distributed import _gather_state
            return _gather_state(self, sd)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint of this optimizer kind (from Python's ``state_dict()`` or the C++ face's
        ``save_checkpoint``). The state stays on the host in fp32 (torch's loader would cast it to the
        parameters' device and dtype)."""
        self._core.wait_all()
        if state_dict.get("lspo_partial"):
            raise ValueError(f"{self._kind}.load_state_dict: this is a data-parallel state_dict() of a rank other "
                             "than 0 (no state); load rank 0's (the full checkpoint) on every rank")
        saved = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        for i in saved:
            if not (isinstance(i, int) and 0 <= i < len(params)):
                raise ValueError(f"{self._kind}.load_state_dict: state for parameter {i!r}, but the optimizer has "
                                 f"{len(params)} parameters")
        if state_dict.get("lspo_optimizer", self._kind) != self._kind:
            raise ValueError(f"{self._kind}.load_state_dict: the checkpoint holds the state of a "
                             f"{state_dict['lspo_optimizer']}, not of a {self._kind}")
        if getattr(self, "_dist", None) is not None:  # data parallel: a split parameter keeps its range
            from .distributed import _local_state
            saved = _local_state(self, saved, params)
        for i, p in enumerate(params):  # validate every slot first: a bad checkpoint changes nothing
            if i in saved and saved[i]:
                try:
                    self._core.load_state(self._index[p], dict(saved[i]), True)
                except _C.LspoError as e:
                    raise ValueError(str(e)) from None
        rest = dict(state_dict)
        rest["state"] = {}
        super().load_state_dict(rest)  # groups (lr, betas, ...), checked against ours
        self.state = _CoreState(self)
        for g in self.param_groups:
            _check_group(self._kind, g)
        for i, p in enumerate(params):
            if i in saved and saved[i]:
                self._core.load_state(self._index[p], dict(saved[i]))
        self._after_load()

    def _after_load(self) -> None:
        pass

    # ---------------------------------------------------------------- introspection
    def slots_on_disk(self) -> int:
        """How many parameters keep their optimizer state in files (the disk tier)."""
        return self._core.slots_on_disk()

    def engine_stats(self) -> dict:
        return self._core.stats()

    def timeline_json(self) -> str:
        return self._core.timeline_json()

    def clear_timeline(self) -> None:
        self._core.clear_timeline()

    def set_record_timeline(self, on: bool) -> None:
        self._core.set_record_timeline(on)
