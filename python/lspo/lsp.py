"""``lspo.LSPAdamW``: LSP-Offload's subspace AdamW, the Python face of lspo's optimizer core.

Layout and basis. By default (``one_sided=True, basis="svd"``) each projected weight keeps its
larger side whole (that side's projector is the identity) and projects the smaller one to ``k``
dimensions, ``k`` the largest whose state fits in the bytes of the square ``d x d`` layout
(``lspo._C.one_sided_rank``), with a dense orthonormal basis that every kept refit check sets to the
leading singular directions of the check's gradient sum; ``S`` is then ``max(m, n) x k``. That measured
best on every job run (docs/convergence.md: on the quick fine-tuning protocol 0.8% below AdamW's test
loss at the defaults, 3.0% below and level with GaLore at ``scale=1.0`` and its best lr; +0.2% of
AdamW's validation loss on the main job, against +1.1% for the square sparse layout). ``one_sided=False, basis="sparse"`` is the paper's
layout: learned (d, r)-sparse ``P`` and ``Q`` on both sides, ``S`` ``d x d``, the least host-device
traffic on a GPU.

Every projected weight ``W [m, n]`` (gradient ``G``) owns a pair of
:class:`~lspo.projector.SparseProjector` (``P`` for its rows, ``Q`` for its columns, ``dP = min(d, m)``,
``dQ = min(d, n)``, ``r`` nonzeros a row). Per step and layer, all inside the C++ core:

1. backward (a post-accumulate-grad hook, one call into the core): ``S += P^T G Q`` on G's device,
   ``p.grad = None`` -- the dense gradient lives for one layer only;
2. ``S`` (``dP x dQ`` fp32) goes to a host buffer (pinned, copy stream, for CUDA) and the engine's
   worker thread runs the fused Adam on it in the compressed space, speculatively, overlapped with
   the rest of backward (the output is the update ``u = -lr * m_hat/(sqrt(v_hat)+eps)``);
3. ``step()`` commits (or recomputes, when clipping, AMP, lr or accumulation change the inputs),
   uploads ``u`` and applies, on W's device and in W's dtype: ``W *= 1 - lr * weight_decay`` (if any),
   then ``W += P u Q^T`` (no dense fp32 temporary).

Projectors: whitened (``whiten=True``, the default): each stands for an orthonormal basis ``U = P T``
(``T`` the ``d x d`` triangular factor of ``P^T P``, see ``lspo.projector``), so ``P P^T G Q Q^T`` is a
true projection (error <= 1), the state carry is exact and the size of an update ``P u Q^T`` is the
size of ``u``. Values start scale-correct (``E[P^T P] = I``).

Projector learning (C++ ``lspo::refit``, include/lspo/refit.h): steps ``t = 1, 1 + refit_every, ...``
are refit checks (``refit_stagger=True``: projected parameter k checks at ``1 + k % refit_every``, then
every ``refit_every`` steps, so only about ``1 / refit_every`` of the layers hold check sums at once).
On a check step a projected layer's micro-batch gradients are summed densely in two halves (even
micro-batches: the fit sum; odd ones: the held-out sum; with one micro-batch the check is in-sample)
and ``step()`` runs one check per layer: the held-out error
``e = ||U U^T G V V^T - G|| / ||G||`` of the current projectors; a fit (warm start, ``refit_iters``
Adam iterations at ``refit_lr`` relative to the values' size, proximal ``refit_l2``, held-out early
stopping; also from fresh values when the warm start does not help, ``refit_reinit``) when ``e``
exceeds ``refit_threshold`` and has drifted above ``(1 + refit_drift)`` times what the last check
left; the fit is kept only when it lowers the held-out error, and then the Adam moments are carried
into the new subspace. Then the step's whole gradient (both sums) is compressed with the projectors
the check left, so gradient accumulation gives the same result as one big batch (up to fp32
summation order), and a skipped step never refits. Extra memory on check steps: two sums (in the
gradient's dtype) of each layer that is checking -- every projected layer at once, unless
``refit_stagger`` (measured: the quick fine-tuning protocol's test loss 2.4680 staggered vs 2.4428;
use it when two gradient-sized copies of the projected weights do not fit the GPU). ``refits``
records every check.

Update size (``scale``): ``W += scale * P u Q^T``; with orthonormal bases ``|P u Q^T| = |u|``. Unset
(``None``), it is chosen per basis so that LSPAdamW runs at the lr a user gives AdamW
(``lspo._C.default_update_scale``): 1.0 with ``basis="sparse"`` (benchmarks/convergence.py
``--finetune`` picks the same best lr for both), 3.0 with ``basis="svd"`` (its best lr was about 3x
AdamW's on the quick fine-tuning protocol and on the main job, docs/convergence.md). ``scale="auto"``
uses ``sqrt(m n / (dP dQ))`` per layer (a full AdamW step's Frobenius norm at the same lr); it
measured worse at AdamW's best lr with either basis.

Which parameters are projected: given a module, the weights of ``nn.Linear`` (and transformers'
GPT-2 ``Conv1D``) layers whose both dimensions are ``>= min_dim`` (default: ``subspace``), except a
weight tied to an ``nn.Embedding`` and the output head (a layer named ``lm_head``/``embed_out``/
``output_layer``). Given parameters or param groups (e.g. from HF ``Trainer``), the same rule, with
the module found from the parameters (every ``nn.Module`` alive is searched for the smallest one
holding them all); if none holds them, every 2-D parameter with both dimensions ``>= min_dim``. A
param group may force it with ``"project": True/False``. Parameters that do not require grad are
never projected. Every other parameter gets :class:`~lspo.OffloadAdamW`'s full-offload AdamW.

Semantics to know:

* ``p.grad`` of a projected weight is ``None`` after backward: clip with ``max_grad_norm`` (global
  L2 norm over the dense gradients of the other parameters and the compressed ``S`` of the projected
  ones -- the gradients Adam actually sees), not with ``torch.nn.utils.clip_grad_norm_`` (or HF
  Trainer's ``max_grad_norm``), which cannot see the projected layers: lspo warns once when it sees
  gradients modified between backward and ``step()`` while projected layers exist.
* AMP: ``scaler.step(optimizer)`` works (the kernel unscales while it reads); calling
  ``scaler.unscale_(optimizer)`` first raises an error.
* A non-finite gradient (in any dense gradient or any ``S``) skips the step: weights, moments,
  projectors and step counts stay untouched.
* Updates are applied in the weight's dtype: with bf16 weights, updates smaller than half a bf16 ulp
  of the weight round away (as in any pure-bf16 training).
"""
from __future__ import annotations

import gc
import math
import types
import warnings
from typing import Any, Optional

import torch

from . import _C
from . import projector as lp
from .optim import OffloadAdamW

_HEAD_NAMES = ("lm_head", "embed_out", "output_layer")


def _is_conv1d(m: torch.nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


def _eligible_weights(mod: torch.nn.Module) -> set:
    """ids of the weights the module rule projects (size permitting)."""
    tied = {id(m.weight) for m in mod.modules() if isinstance(m, torch.nn.Embedding)}
    return {id(m.weight) for name, m in mod.named_modules()
            if (isinstance(m, torch.nn.Linear) or _is_conv1d(m)) and id(m.weight) not in tied
            and name.rsplit(".", 1)[-1] not in _HEAD_NAMES}


# The paper's layout, LSPAdamW's default before issue 12's measurements: learned (d, r)-sparse P and
# Q on both sides, S d x d. ``LSPAdamW(model, **PAPER_LAYOUT)``.
PAPER_LAYOUT = types.MappingProxyType({"one_sided": False, "basis": "sparse"})


def square_state_bytes(m: int, n: int, d: int, r: int) -> int:
    """Optimizer-state bytes of one ``[m, n]`` weight in the paper's square layout at subspace ``d`` and
    ``nnz`` ``r``: two fp32 moments ``dP x dQ``, ELL projectors (a 4-byte index and a 4-byte value per
    nonzero) and the two whitening factors. It is the budget the one-sided layout fills
    (``lspo._C.one_sided_rank``), and the one peers are matched to in the benchmarks."""
    return _C.square_state_bytes(m, n, d, r, True)


def matched_galore_rank(shapes: list, d: int, r: int) -> int:
    """The GaLore rank whose state on ``shapes`` (per weight and rank: two fp32 moments of the longer
    side and the projector of the shorter one) is closest to :func:`square_state_bytes`'s total."""
    per_rank = sum(4 * (2 * max(m, n) + min(m, n)) for m, n in shapes)
    return max(1, round(sum(square_state_bytes(m, n, d, r) for m, n in shapes) / per_rank)) if shapes else 1


def projectable_weights(model: torch.nn.Module, min_dim: int) -> list:
    """The weights ``LSPAdamW(model, min_dim=min_dim)`` projects by the module rule (trainable 2-D
    weights of linear layers, both dims ``>= min_dim``, not the embedding or the output head)."""
    ids = _eligible_weights(model)
    return [p for p in model.parameters() if id(p) in ids and p.requires_grad and p.dim() == 2
            and min(p.shape) >= min_dim]


def _owning_module(params: list) -> Optional[torch.nn.Module]:
    """The smallest live ``nn.Module`` whose parameters include all of ``params`` (None if none)."""
    want = {id(p) for p in params}
    best, best_n = None, None
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.nn.Module) or not obj._parameters and not obj._modules:
            continue
        try:
            ids = {id(p) for p in obj.parameters()}
        except Exception:  # a half-built module
            continue
        if want <= ids and (best_n is None or len(ids) < best_n):
            best, best_n = obj, len(ids)
    return best


def _projectors(core, slot: int) -> tuple:
    """``(P, Q)`` of a core slot (sharing the core's tensors)."""
    pi, pv, pd, pw, qi, qv, qd, qw = core.projectors(slot)
    return (lp.SparseProjector(pi, pv, pd, validate=False, whiten=pw),
            lp.SparseProjector(qi, qv, qd, validate=False, whiten=qw))


class _LayerHandle:
    """What a wrapped layer (``lspo.wrap``) talks to: ``P``, ``Q``, ``dense_this_step()``, ``accept(S)``.
    Refreshed by the optimizer after each step, so a forward costs no call into the core."""

    __slots__ = ("_core", "slot", "P", "Q", "_dense")

    def __init__(self, core, slot: int):
        self._core, self.slot = core, slot
        self._dense = bool(core.dense_this_step(slot))
        self.refresh()

    def refresh(self) -> None:
        self.P, self.Q = _projectors(self._core, self.slot)

    def dense_this_step(self) -> bool:
        return self._dense

    def accept(self, S: torch.Tensor) -> None:
        self._core.on_compressed(self.slot, S)


class LSPAdamW(OffloadAdamW):
    """AdamW in low-dimensional subspaces (LSP-Offload) for the big matrices, full-offload AdamW for
    the rest; a drop-in ``torch.optim.Optimizer``. See the module documentation for the semantics.

    ``subspace`` (d) and ``nnz`` (r) set the projectors, ``whiten`` their orthonormalisation, ``scale``
    the update size; ``refit_every`` / ``refit_threshold`` / ``refit_drift`` / ``refit_iters`` /
    ``refit_lr`` / ``refit_l2`` / ``refit_reinit`` their learning (per group too); ``seed`` their
    random positions and initial values (projected parameter k uses ``seed + 2 k`` and
    ``seed + 2 k + 1``). ``refit_stagger`` (default False): projected parameter k checks at steps
    ``t`` with ``(t - 1 - k % refit_every) % refit_every == 0``, so about ``1/refit_every`` of the layers
    hold their dense check sums at once (False: every layer at ``1, 1 + refit_every, ...``).
    ``one_sided`` (default True): the larger dimension of each projected weight is kept whole and only
    the smaller one is projected, to the largest ``k`` whose optimizer state fits in the bytes of the
    square ``d x d`` layout (``lspo._C.one_sided_rank``); ``S`` is then ``max(m, n) x k`` (more
    host-device traffic on a GPU than ``d x d``; False: the square layout).
    ``basis`` (default ``"svd"``): ``"sparse"`` learns (d, r)-sparse projector values at each refit
    check; ``"svd"`` makes the projected sides dense (r = d, a random orthonormal basis until the first
    check) and sets them at each kept check to the leading singular directions of the check's summed
    gradient (no fit iterations). The dense sides are orthonormal bases with shared positions
    (``indices`` is one row ``0..d-1`` expanded, so they cost 4 bytes an entry) and carry no whitening
    factor, whatever ``whiten`` says. With ``one_sided`` the dense side is counted in the state budget
    (``lspo._C.one_sided_rank(..., dense=True)``); two-sided, dense projectors cost ``4 (m dP + n dQ)``
    bytes per weight instead of ``8 r (m + n)`` and the whitening factors.
    ``refit_diagnostics``: every check also records the held-out error of fresh
    whitened random projectors of the same d, r (``refits[k]["random_heldout"]``).
    ``max_grad_norm``, ``overlap``, ``record_timeline`` and ``pinned_limit_bytes`` are as for
    :class:`~lspo.OffloadAdamW`.
    """

    _kind = "LSPAdamW"

    def __init__(self, params_or_module: Any, lr: float = 1e-4, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, subspace: int = 512, nnz: int = 8, refit_every: int = 10,
                 refit_threshold: float = 0.0, refit_iters: int = 10, refit_lr: float = 0.1,
                 refit_l2: float = 0.01, refit_drift: float = 0.1, refit_reinit: str = "on_failure",
                 whiten: bool = True, scale: Any = None, refit_diagnostics: bool = False, refit_stagger: bool = False,
                 one_sided: bool = True, basis: str = "svd", min_dim: Optional[int] = None, seed: int = 0,
                 max_grad_norm: Optional[float] = None,
                 overlap: bool = True, record_timeline: bool = False, pinned_limit_bytes: int = 4 << 30,
                 state_dir: Optional[str] = None, host_memory_limit: Optional[int] = None, resume: bool = False):
        if not (isinstance(subspace, int) and subspace >= 1):
            raise ValueError(f"LSPAdamW: subspace must be an int >= 1, got {subspace!r}")
        if not (isinstance(nnz, int) and 1 <= nnz <= subspace):
            raise ValueError(f"LSPAdamW: nnz must be an int in [1, subspace={subspace}], got {nnz!r}")
        refit = dict(refit_every=refit_every, refit_threshold=float(refit_threshold), refit_iters=refit_iters,
                     refit_lr=float(refit_lr), refit_l2=float(refit_l2), refit_drift=float(refit_drift),
                     refit_reinit=refit_reinit)
        self._check_refit(refit)
        if not (scale is None or scale == "auto" or (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                                     and math.isfinite(scale) and scale > 0)):
            raise ValueError(f"LSPAdamW: scale must be None, 'auto' or a finite number > 0, got {scale!r}")
        self.whiten, self.scale, self.refit_diagnostics = bool(whiten), scale, bool(refit_diagnostics)
        self.refit_stagger, self.one_sided = bool(refit_stagger), bool(one_sided)
        if basis not in ("sparse", "svd"):
            raise ValueError(f"LSPAdamW: basis must be 'sparse' or 'svd', got {basis!r}")
        self.basis = basis
        self.subspace, self.nnz = subspace, nnz
        self.min_dim = subspace if min_dim is None else int(min_dim)
        if self.min_dim < nnz:
            raise ValueError(f"LSPAdamW: min_dim ({self.min_dim}) must be >= nnz ({nnz})")
        self._refit_defaults = refit
        self.seed = int(seed)
        self._handles: dict = {}
        self._refits: list = []
        if isinstance(params_or_module, torch.nn.Module):
            mod = params_or_module
            params = list(mod.parameters())
        else:
            params = list(params_or_module)
            flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
            flat = [p for p in flat if isinstance(p, torch.Tensor)]
            mod = _owning_module(flat) if flat else None
        self._eligible = _eligible_weights(mod) if mod is not None else None
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         overlap=overlap, record_timeline=record_timeline, pinned_limit_bytes=pinned_limit_bytes,
                         seed=seed, state_dir=state_dir, host_memory_limit=host_memory_limit, resume=resume)
        self.defaults.update(refit)

    @staticmethod
    def _check_refit(g: dict) -> None:
        k = g.get("refit_every", 0)
        if not (isinstance(k, int) and k >= 0):
            raise ValueError(f"LSPAdamW: refit_every must be an int >= 0 (0: never refit), got {k!r}")
        if not g.get("refit_threshold", 0.0) >= 0.0:
            raise ValueError(f"LSPAdamW: refit_threshold must be >= 0, got {g['refit_threshold']}")
        it = g.get("refit_iters", 1)
        if not (isinstance(it, int) and it >= 1):
            raise ValueError(f"LSPAdamW: refit_iters must be an int >= 1, got {it!r}")
        if not g.get("refit_lr", 1.0) > 0.0:
            raise ValueError(f"LSPAdamW: refit_lr must be > 0, got {g['refit_lr']}")
        for k in ("refit_l2", "refit_drift"):
            if not g.get(k, 0.0) >= 0.0:
                raise ValueError(f"LSPAdamW: {k} must be >= 0, got {g[k]}")
        if g.get("refit_reinit", "on_failure") not in ("never", "on_failure", "always"):
            raise ValueError(f"LSPAdamW: refit_reinit must be 'never', 'on_failure' or 'always', "
                             f"got {g['refit_reinit']!r}")

    def _core_options(self) -> dict:
        auto = self.scale == "auto"
        return dict(whiten=self.whiten, scale=None if auto or self.scale is None else float(self.scale), scale_auto=auto,
                    refit_diagnostics=self.refit_diagnostics, refit_stagger=self.refit_stagger,
                    one_sided=self.one_sided, basis=self.basis)

    # ---------------------------------------------------------------- registration
    def _projection(self, p: torch.Tensor, group: dict) -> tuple:
        force = group.get("project")
        if force is not None:
            if force and not (p.dim() == 2 and min(p.shape) >= self.nnz):
                raise ValueError(f"LSPAdamW: cannot project a parameter of shape {tuple(p.shape)} "
                                 f"(need 2-D with both dims >= nnz={self.nnz})")
            on = bool(force)
        else:
            big = p.dim() == 2 and min(p.shape) >= self.min_dim
            on = big and p.requires_grad and (self._eligible is None or id(p) in self._eligible)
        if on and p.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"LSPAdamW: a projected parameter must be float32 or bfloat16, got {p.dtype}")
        return on, self.subspace, self.nnz

    def _group_tuple(self, g: dict) -> tuple:
        self._check_refit(g)
        t = super()._group_tuple(g)
        d = self._refit_defaults
        v = {k: g.get(k, d[k]) for k in d}
        return t[:5] + (int(v["refit_every"]), float(v["refit_threshold"]), int(v["refit_iters"]),
                        float(v["refit_lr"]), float(v["refit_l2"]), float(v["refit_drift"]), str(v["refit_reinit"]))

    @property
    def projected_params(self) -> list:
        """The parameters LSPAdamW projects (the others get full-offload AdamW)."""
        return [p for p, i in self._index.items() if self._core.is_projected(i)]

    def projectors(self, p: torch.Tensor) -> tuple:
        """``(P, Q)`` of a projected parameter (the current values)."""
        i = self._index.get(p)
        if i is None or not self._core.is_projected(i):
            raise KeyError("LSPAdamW.projectors: this parameter is not projected")
        return _projectors(self._core, i)

    @property
    def refits(self) -> list:
        """Every refit check: ``{"step", "param", "check", "heldout_before", "heldout_after", "fit_before",
        "fit_after", "fitted", "kept", "reinit", "iters", "seconds", "reference_error"}`` (lspo/refit.h's
        RefitResult), plus ``"refit"`` (= kept), ``"error_before"`` / ``"error_after"`` (the held-out
        errors) and, with ``refit_diagnostics``, ``"random_heldout"``."""
        self._refits.extend(self._core.refits(len(self._refits)))
        return self._refits

    # ---------------------------------------------------------------- the wrap path
    def _layer(self, p: torch.Tensor) -> _LayerHandle:
        """The handle a wrapped layer of weight ``p`` uses (see ``lspo.wrap``)."""
        i = self._index.get(p)
        if i is None or not self._core.is_projected(i):
            raise KeyError("LSPAdamW: this weight is not projected")
        h = self._handles.get(i)
        if h is None:
            self._sync_groups()  # dense_this_step needs the groups' refit options
            h = self._handles[i] = _LayerHandle(self._core, i)
        return h

    def wrap(self, model: torch.nn.Module) -> int:
        """The memory path: re-classes ``model``'s projected ``nn.Linear`` / ``Conv1D`` layers so their
        backward produces the compressed gradient directly (``lspo.wrap.wrap_linear``). Returns the
        number of layers wrapped."""
        from .wrap import wrap_linear
        return wrap_linear(model, self)

    def _after_step(self, dense_next: list, n_refits: int) -> None:
        if not self._handles:
            return
        dense = set(dense_next)
        changed = n_refits != getattr(self, "_seen_refits", 0)
        self._seen_refits = n_refits
        for i, h in self._handles.items():
            h._dense = i in dense
            if changed:
                h.refresh()

    def _after_load(self) -> None:
        self._sync_groups()
        for i, h in self._handles.items():
            h._dense = bool(self._core.dense_this_step(i))
            h.refresh()

    def _on_grads_modified(self) -> None:
        if self._warned_clip or self.max_grad_norm is not None or not self.projected_params:
            return
        self._warned_clip = True
        warnings.warn(
            "LSPAdamW: gradients were modified between backward and step() (torch.nn.utils.clip_grad_norm_, HF "
            "Trainer's max_grad_norm, ...). The projected layers' gradients are compressed during backward and "
            "are invisible to such clipping, so it clips (and reports the norm of) the other parameters only. "
            "Clip with LSPAdamW(max_grad_norm=...) instead (with HF Trainer: max_grad_norm=0 in TrainingArguments "
            "and max_grad_norm in the optimizer's kwargs).", RuntimeWarning, stacklevel=3)
