"""``lspo.LSPAdamW``: LSP-Offload's learned sparse projectors over lspo's offload engine.

Every projected weight ``W [m, n]`` (gradient ``G``, same shape) owns a pair of
:class:`~lspo.projector.SparseProjector` (``P`` for its rows, ``Q`` for its columns, ``dP = min(d, m)``,
``dQ = min(d, n)``, ``r`` nonzeros a row). Per step and layer:

1. backward (a post-accumulate-grad hook): ``S += P^T G Q`` on G's device, then ``p.grad = None`` --
   the dense gradient lives for one layer only;
2. ``S`` (``dP x dQ`` fp32) goes to a host buffer (pinned, copy stream, for CUDA) and the engine's
   worker thread runs the fused Adam on it in the compressed space, speculatively, overlapped with
   the rest of backward (moments-only: the output is the update ``u = -lr * m_hat/(sqrt(v_hat)+eps)``);
3. ``step()`` commits (or recomputes, exactly as :class:`~lspo.OffloadAdamW` does when clipping, AMP,
   lr or accumulation change the inputs), uploads ``u`` and applies, on W's device and in W's dtype:
   ``W *= 1 - lr * weight_decay`` (if any), then ``W += P u Q^T`` (``lspo.projector.apply_``: no
   dense fp32 temporary).

Projectors: whitened (``whiten=True``, the default): each stands for an orthonormal basis U = P T
(``lspo.projector``), so ``P P^T G Q Q^T`` is a true projection, the state carry is exact and the size
of an update ``P u Q^T`` is the size of ``u``. Values start scale-correct (E[P^T P] = I).

Projector learning (``lspo.projector.refit``, C++ ``lspo::refit``): steps ``t = 1, 1 + refit_every,
1 + 2 refit_every, ...`` are refit checks. On a check step a projected layer keeps its dense gradient
summed in two halves over the step's micro-batches (even micro-batches: the fit sum; odd ones: the
held-out sum; one micro-batch: both are it), and ``step()`` runs one refit check per layer: the
held-out error of the current projectors; a fit (warm start, ``refit_iters`` Adam iterations at
``refit_lr``, proximal l2 ``refit_l2``, held-out early stopping; fresh values too when the warm start
does not help, ``refit_reinit``) when that error exceeds ``refit_threshold`` and has drifted above
``(1 + refit_drift)`` times what the last check left; the fit is kept only when it lowers the
held-out error, and then the Adam moments are carried into the new subspace. Then the step's whole
gradient (both sums) is compressed with the projectors the check left: gradient accumulation stays
exact. Extra memory on check steps only: two dense fp32 copies of each projected weight.
``refits`` records every check.

Update size (``scale``): ``W += scale * P u Q^T``; with orthonormal bases ``|P u Q^T| = |u|``.
``scale=1.0`` (default, the paper's update) runs at AdamW's lr: in benchmarks/convergence.py
``--finetune --quick`` its best lr equals AdamW's (docs/convergence.md). ``"auto"`` uses
``sqrt(m n / (dP dQ))`` per layer, the Frobenius norm of a full AdamW step at the same lr (``u`` has
dP dQ entries of size ~lr, AdamW's update m n); it measured worse at AdamW's best lr (+1.7% vs +0.8%
of AdamW's loss) because the subspace is stale between refits.

Which parameters are projected: given a module, the weights of ``nn.Linear`` (and transformers'
GPT-2 ``Conv1D``) layers whose both dimensions are ``>= min_dim`` (default: ``subspace``), except a
weight tied to an ``nn.Embedding`` and the output head (a layer named ``lm_head``/``embed_out``/
``output_layer``). Given parameters, every 2-D parameter with both dimensions
``>= min_dim``. A param group may force it with ``"project": True/False``. Every other parameter
(embeddings, norms, biases, lm_head, small matrices) gets :class:`~lspo.OffloadAdamW`'s full-offload
AdamW: fp32 master and moments in host memory, the CPU Adam on the worker thread.

Semantics to know:

* Gradient accumulation works (compression is linear: ``S`` accumulates over micro-batches).
  ``zero_grad()`` also clears the accumulated ``S``.
* ``p.grad`` of a projected weight is ``None`` after backward: clip with ``max_grad_norm`` (global
  L2 norm over the dense gradients of the other parameters and the compressed ``S`` of the projected
  ones -- the gradients Adam actually sees), not with ``torch.nn.utils.clip_grad_norm_``, which would
  not see the projected layers.
* AMP: ``scaler.step(optimizer)`` works (the kernel unscales while it reads); calling
  ``scaler.unscale_(optimizer)`` first raises an error (the compressed gradients cannot be unscaled
  behind the optimizer's back).
* A non-finite gradient (in any dense gradient or any ``S``) skips the step: weights, moments,
  projectors and step counts stay untouched.
* Updates are applied in the weight's dtype: with bf16 weights, updates smaller than half a bf16 ulp
  of the weight round away (as in any pure-bf16 training); keep projected weights fp32 where that
  matters.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from . import _C
from . import projector as lp
from .optim import OffloadAdamW, _Slot, eng_name


class _LspSlot(_Slot):
    __slots__ = ("P", "Q", "acc", "acc_count", "u_dev", "backup", "fit_sum", "held_sum", "ref_err", "checks",
                 "scale", "number")

    def __init__(self, index: int, param: torch.Tensor, group: dict, P: lp.SparseProjector, Q: lp.SparseProjector,
                 scale: float, number: int):
        super().__init__(index, param, group)
        self.P, self.Q = P, Q
        self.scale, self.number = scale, number
        self.fit_sum = self.held_sum = None  # dense gradient sums of a refit-check step
        self.ref_err = math.nan               # held-out error the last check left
        self.checks = 0
        self.acc = torch.zeros(P.d, Q.d, dtype=torch.float32, device=param.device)  # accumulated S
        self.acc_count = 0
        self.u_dev = None
        self.backup = None  # (P, Q values + whiten, M, V) before this step's refit: restored on a skip


_HEAD_NAMES = ("lm_head", "embed_out", "output_layer")


def _is_conv1d(m: torch.nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


class LSPAdamW(OffloadAdamW):
    """AdamW in learned sparse subspaces (LSP-Offload) for the big matrices, full-offload AdamW for
    the rest; a drop-in ``torch.optim.Optimizer``. See the module documentation for the semantics.

    ``subspace`` (d) and ``nnz`` (r) set the projectors, ``whiten`` their orthonormalisation,
    ``scale`` the update size; ``refit_every`` / ``refit_threshold`` / ``refit_drift`` /
    ``refit_iters`` / ``refit_lr`` / ``refit_l2`` / ``refit_reinit`` their learning; ``seed`` their
    random positions and initial values (layer i uses ``seed + 2 i`` and ``seed + 2 i + 1``).
    ``refit_diagnostics``: also record, at every check, the held-out error of fresh whitened random
    projectors of the same d, r (``refits[k]["random_heldout"]``; costs one error evaluation). ``max_grad_norm``, ``overlap``,
    ``record_timeline`` and ``pinned_limit_bytes`` are as for :class:`~lspo.OffloadAdamW`.
    """

    def __init__(self, params_or_module: Any, lr: float = 1e-4, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, subspace: int = 512, nnz: int = 8, refit_every: int = 100,
                 refit_threshold: float = 0.0, refit_iters: int = 40, refit_lr: float = 0.1,
                 refit_l2: float = 0.01, refit_drift: float = 0.1, refit_reinit: str = "on_failure",
                 whiten: bool = True, scale: Any = 1.0, refit_diagnostics: bool = False,
                 min_dim: Optional[int] = None, seed: int = 0, max_grad_norm: Optional[float] = None,
                 overlap: bool = True, record_timeline: bool = False, pinned_limit_bytes: int = 4 << 30):
        if not (isinstance(subspace, int) and subspace >= 1):
            raise ValueError(f"LSPAdamW: subspace must be an int >= 1, got {subspace!r}")
        if not (isinstance(nnz, int) and 1 <= nnz <= subspace):
            raise ValueError(f"LSPAdamW: nnz must be an int in [1, subspace={subspace}], got {nnz!r}")
        if not (isinstance(refit_every, int) and refit_every >= 0):
            raise ValueError(f"LSPAdamW: refit_every must be an int >= 0 (0: never refit), got {refit_every!r}")
        if not refit_threshold >= 0.0:
            raise ValueError(f"LSPAdamW: refit_threshold must be >= 0, got {refit_threshold}")
        if not (isinstance(refit_iters, int) and refit_iters >= 1):
            raise ValueError(f"LSPAdamW: refit_iters must be an int >= 1, got {refit_iters!r}")
        self.subspace, self.nnz = subspace, nnz
        self.min_dim = subspace if min_dim is None else int(min_dim)
        if self.min_dim < nnz:
            raise ValueError(f"LSPAdamW: min_dim ({self.min_dim}) must be >= nnz ({nnz})")
        self.refit_every, self.refit_threshold = refit_every, float(refit_threshold)
        self.refit_iters, self.refit_lr = refit_iters, float(refit_lr)
        if refit_reinit not in ("never", "on_failure", "always"):
            raise ValueError(f"LSPAdamW: refit_reinit must be never, on_failure or always, got {refit_reinit!r}")
        if not (refit_l2 >= 0.0 and refit_drift >= 0.0):
            raise ValueError("LSPAdamW: refit_l2 and refit_drift must be >= 0")
        if not (scale == "auto" or (isinstance(scale, (int, float)) and scale > 0)):
            raise ValueError(f"LSPAdamW: scale must be 'auto' or a number > 0, got {scale!r}")
        self.refit_l2, self.refit_drift, self.refit_reinit = float(refit_l2), float(refit_drift), refit_reinit
        self.whiten, self.scale, self.refit_diagnostics = bool(whiten), scale, bool(refit_diagnostics)
        self.seed = int(seed)
        self.refits: list[dict] = []
        self._n_projected = 0
        self._eligible: Optional[set] = None
        if isinstance(params_or_module, torch.nn.Module):
            mod = params_or_module
            embs = [m.weight for m in mod.modules() if isinstance(m, torch.nn.Embedding)]
            tied = {id(w) for w in embs}
            self._eligible = {
                id(m.weight) for name, m in mod.named_modules()
                if (isinstance(m, torch.nn.Linear) or _is_conv1d(m)) and id(m.weight) not in tied
                # an untied output head stays dense, like the embedding
                and name.rsplit(".", 1)[-1] not in _HEAD_NAMES}
            params = [p for p in mod.parameters()]
        else:
            params = params_or_module
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         overlap=overlap, record_timeline=record_timeline, pinned_limit_bytes=pinned_limit_bytes)

    # ---------------------------------------------------------------- registration
    def _projected(self, p: torch.Tensor, group: dict) -> bool:
        force = group.get("project")
        big = p.dim() == 2 and min(p.shape) >= self.min_dim
        if force is not None:
            if force and not (p.dim() == 2 and min(p.shape) >= self.nnz):
                raise ValueError(f"LSPAdamW: cannot project a parameter of shape {tuple(p.shape)} "
                                 f"(need 2-D with both dims >= nnz={self.nnz})")
            return bool(force)
        if self._eligible is not None and id(p) not in self._eligible:
            return False
        return big and p.requires_grad

    def _register(self, p: torch.Tensor, group: dict) -> None:
        if not self._projected(p, group):
            return super()._register(p, group)
        if p.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"LSPAdamW: a projected parameter must be float32 or bfloat16, got {p.dtype}")
        if p in self._slots:
            raise ValueError("LSPAdamW: a parameter appears in more than one group")
        m, n = p.shape
        i = self._n_projected
        self._n_projected += 1
        P = lp.SparseProjector.random(m, min(self.subspace, m), self.nnz, self.seed + 2 * i, device=p.device,
                                      whitened=self.whiten)
        Q = lp.SparseProjector.random(n, min(self.subspace, n), self.nnz, self.seed + 2 * i + 1, device=p.device,
                                      whitened=self.whiten)
        idx = self._engine.add_slot(f"lsp{i}:{tuple(p.shape)}->{P.d}x{Q.d}", None, P.d * Q.d, torch.float32,
                                    torch.float32, len(self._slots))
        scale = math.sqrt(m * n / (P.d * Q.d)) if self.scale == "auto" else float(self.scale)
        s = _LspSlot(idx, p, group, P, Q, scale, i)
        self._slots[p] = s
        s.hook = p.register_post_accumulate_grad_hook(self._on_grad)
        self._refresh_state(p)

    def _refresh_state(self, p: torch.Tensor) -> None:
        s = self._slots[p]
        if not isinstance(s, _LspSlot):
            return super()._refresh_state(p)
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
        shape = (s.P.d, s.Q.d)
        st["exp_avg"] = self._engine.exp_avg(s.index).view(shape)
        st["exp_avg_sq"] = self._engine.exp_avg_sq(s.index).view(shape)
        st["proj_P_indices"], st["proj_P_values"] = s.P.indices, s.P.values
        st["proj_Q_indices"], st["proj_Q_values"] = s.Q.indices, s.Q.values
        if s.P.whitened:
            st["proj_P_whiten"], st["proj_Q_whiten"] = s.P.whiten, s.Q.whiten
        st["proj_refit_ref"] = torch.tensor(s.ref_err, dtype=torch.float64)

    @property
    def projected_params(self) -> list:
        """The parameters LSPAdamW projects (the others get full-offload AdamW)."""
        return [s.param for s in self._slots.values() if isinstance(s, _LspSlot)]

    def projectors(self, p: torch.Tensor) -> tuple:
        """``(P, Q)`` of a projected parameter."""
        s = self._slots[p]
        if not isinstance(s, _LspSlot):
            raise KeyError("LSPAdamW.projectors: this parameter is not projected")
        return s.P, s.Q

    # ---------------------------------------------------------------- backward: compress (or keep a check's sums)
    def _refit_pending(self, p: torch.Tensor) -> bool:
        """This step is a refit check: ``p``'s gradients are kept dense (summed) until ``step()``."""
        step = int(self.state[p]["step"].item()) + 1
        return self.refit_every > 0 and (step - 1) % self.refit_every == 0

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        s = self._slots[p]
        if not isinstance(s, _LspSlot):
            return super()._on_grad(p)
        g = p.grad
        if g is None:
            return
        if g.is_sparse:
            raise RuntimeError("LSPAdamW does not support sparse gradients")
        self._accept_compressed(p, sample=g)
        p.grad = None  # the dense gradient is not needed any more

    @torch.no_grad()
    def _accept_compressed(self, p: torch.Tensor, S: Optional[torch.Tensor] = None, sample: Any = None) -> None:
        """One micro-batch's gradient of a projected parameter: its compressed form ``S``, or a sample
        (dense G, or an activation pair (X, dY) with G = X^T dY). On a refit-check step the sample is
        summed densely (fit / held-out half by micro-batch parity) for ``step()``; otherwise it is
        compressed and accumulated."""
        s = self._slots[p]
        eng = self._engine
        step = int(self.state[p]["step"].item()) + 1
        if sample is not None and self._refit_pending(p):
            G = sample if isinstance(sample, torch.Tensor) else sample[0].float().t() @ sample[1].float()
            if s.acc_count % 2 == 0:
                s.fit_sum = G.float().clone() if s.fit_sum is None else s.fit_sum.add_(G)
            else:
                s.held_sum = G.float().clone() if s.held_sum is None else s.held_sum.add_(G)
            s.acc_count += 1
            s.grad_seen = None
            return
        t0 = eng.now_us()
        if S is None:
            S = lp.compress(s.P, s.Q, sample) if isinstance(sample, torch.Tensor) else \
                lp.compress_activations(s.P, s.Q, *sample)
        if s.acc_count == 0:
            s.acc.copy_(S)
        else:
            s.acc.add_(S)
        s.acc_count += 1
        if not s.acc.is_cuda:
            eng.add_event("compress", eng_name(s), 0, t0, eng.now_us())
        s.grad_seen = None
        if eng.overlap:
            self._copy_grad(s, s.acc)
            self._submit(s, self._key(s, step, self._spec_scale))

    @torch.no_grad()
    def _run_refits(self) -> None:
        """The refit checks of this step (layers holding dense sums), then their compression."""
        eng = self._engine
        for s in self._slots.values():
            if not isinstance(s, _LspSlot) or s.fit_sum is None:
                continue
            t0 = eng.now_us()
            fit, held = s.fit_sum, s.held_sum
            total = fit if held is None else fit + held
            step = int(self.state[s.param]["step"].item()) + 1
            if bool(torch.isfinite(total).all()):  # else no check: the step will be skipped anyway
                eng.wait(s.index)
                M = eng.exp_avg(s.index).view(s.P.d, s.Q.d)
                V = eng.exp_avg_sq(s.index).view(s.P.d, s.Q.d)
                s.backup = (s.P.clone(), s.Q.clone(), M.clone(), V.clone(), s.ref_err)
                s.checks += 1
                res = lp.refit(s.P, s.Q, [fit], [held] if held is not None else [], iters=self.refit_iters,
                               lr=self.refit_lr, l2=self.refit_l2, threshold=self.refit_threshold,
                               drift=self.refit_drift, reference_error=s.ref_err, reinit=self.refit_reinit,
                               seed=(self.seed * 1000003 + s.number * 7919 + s.checks) & 0x7FFFFFFF,
                               M=M if step > 1 else None, V=V if step > 1 else None)
                s.ref_err = res["reference_error"]
                rec = {"step": step, "param": eng_name(s), "check": s.checks, **res,
                       # the names of the earlier record (examples/finetune_lm.py, benchmarks/engine.py)
                       "refit": res["kept"], "error_before": res["heldout_before"],
                       "error_after": res["heldout_after"]}
                if self.refit_diagnostics:
                    Pr = lp.SparseProjector.random(s.P.n, s.P.d, s.P.r, seed=s.checks * 65537 + 2 * s.number,
                                                   device=s.P.device, whitened=True)
                    Qr = lp.SparseProjector.random(s.Q.n, s.Q.d, s.Q.r, seed=s.checks * 65537 + 2 * s.number + 1,
                                                   device=s.Q.device, whitened=True)
                    rec["random_heldout"] = lp.relative_error(Pr, Qr, [held if held is not None else fit])
                self.refits.append(rec)
                self._refresh_state(s.param)
            s.acc.copy_(lp.compress(s.P, s.Q, total))
            s.fit_sum = s.held_sum = None
            s.grad_seen = None
            eng.add_event("refit", eng_name(s), 0, t0, eng.now_us())

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run_refits()
        super().step()
        return loss

    def wrap(self, model: torch.nn.Module) -> int:
        """The memory path: re-classes ``model``'s projected ``nn.Linear`` / ``Conv1D`` layers so their
        backward produces the compressed gradient directly (``lspo.wrap.wrap_linear``). Returns the
        number of layers wrapped."""
        from .wrap import wrap_linear
        return wrap_linear(model, self)

    # ---------------------------------------------------------------- step policy
    def _has_grad(self, s: _Slot) -> bool:
        if isinstance(s, _LspSlot):
            return s.acc_count > 0
        return super()._has_grad(s)

    def _grad_src(self, s: _Slot) -> torch.Tensor:
        return s.acc if isinstance(s, _LspSlot) else super()._grad_src(s)

    def _key(self, s: _Slot, step: int, grad_scale: float) -> tuple:
        key = super()._key(s, step, grad_scale)
        if isinstance(s, _LspSlot):  # weight decay is applied to W on its device, not in the subspace
            key = key[:5] + (0.0,) + key[6:]
        return key

    def _check_amp(self, live: list, amp_scale, found_inf) -> None:
        if amp_scale is None and found_inf is not None and any(isinstance(s, _LspSlot) for s in live):
            raise RuntimeError(
                "LSPAdamW: GradScaler.unscale_(optimizer) before step() is not supported: the projected layers' "
                "gradients are compressed during backward. Call scaler.step(optimizer) directly and clip with "
                "LSPAdamW(max_grad_norm=...)")

    def _drop(self, s: _Slot) -> None:
        if isinstance(s, _LspSlot):
            s.acc_count = 0
            s.grad_seen = None
            s.fit_sum = s.held_sum = None
            if s.backup is not None:  # undo this step's refit: projectors and moments as they were
                P0, Q0, M, V, ref = s.backup
                for cur, old in ((s.P, P0), (s.Q, Q0)):
                    cur.values.copy_(old.values)
                    if cur.whiten is not None:
                        cur.whiten.copy_(old.whiten)
                s.ref_err = ref
                self._engine.exp_avg(s.index).copy_(M.reshape(-1))
                self._engine.exp_avg_sq(s.index).copy_(V.reshape(-1))
                s.backup = None
                self._refresh_state(s.param)

    def _finish(self, s: _Slot) -> None:
        if not isinstance(s, _LspSlot):
            return super()._finish(s)
        p = s.param
        u = self._engine.out_buffer(s.index).view(s.P.d, s.Q.d)
        if p.is_cuda:
            if s.u_dev is None:
                s.u_dev = torch.empty(s.P.d, s.Q.d, dtype=torch.float32, device=p.device)
            self._upload(s, u, s.u_dev)
            u = s.u_dev
        t0 = self._engine.now_us()
        wd = float(s.group["weight_decay"])
        with torch.no_grad():
            if wd != 0.0:
                p.mul_(1.0 - float(s.group["lr"]) * wd)
            lp.apply_(p.data, s.P, s.Q, u, s.scale)
        if not p.is_cuda:
            self._engine.add_event("apply", eng_name(s), 0, t0, self._engine.now_us())
        s.acc_count = 0
        s.grad_seen = None
        s.backup = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for s in self._slots.values():
            if isinstance(s, _LspSlot) and s.acc_count:
                self._engine.wait(s.index)  # a queued speculation may still read the host buffer
                self._drop(s)  # a discarded batch: also undo a refit it triggered
                s.spec = None

    # ---------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict) -> None:
        self._engine.wait_all()
        saved = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        lsp_saved = {}
        for i, p in enumerate(params):
            s = self._slots[p]
            if not isinstance(s, _LspSlot) or i not in saved:
                continue
            st = saved[i]
            for k in ("exp_avg", "exp_avg_sq", "step", "proj_P_indices", "proj_P_values", "proj_Q_indices",
                      "proj_Q_values"):
                if k not in st:
                    raise ValueError(f"LSPAdamW.load_state_dict: state of projected parameter {i} lacks '{k}' "
                                     "(was it saved by an LSPAdamW with the same parameters?)")
            if tuple(st["exp_avg"].shape) != (s.P.d, s.Q.d) or tuple(st["exp_avg_sq"].shape) != (s.P.d, s.Q.d):
                raise ValueError(f"LSPAdamW.load_state_dict: exp_avg of parameter {i} has shape "
                                 f"{tuple(st['exp_avg'].shape)}, this optimizer's subspace is {(s.P.d, s.Q.d)}")
            if s.P.whitened != ("proj_P_whiten" in st):
                raise ValueError(f"LSPAdamW.load_state_dict: parameter {i}: saved projectors are "
                                 f"{'' if 'proj_P_whiten' in st else 'not '}whitened, this optimizer's are "
                                 f"{'' if s.P.whitened else 'not '}(whiten=...)")
            wp = st["proj_P_whiten"].to(p.device) if "proj_P_whiten" in st else None
            wq = st["proj_Q_whiten"].to(p.device) if "proj_Q_whiten" in st else None
            P = lp.SparseProjector(st["proj_P_indices"].to(p.device), st["proj_P_values"].to(p.device), s.P.d,
                                   whiten=wp)
            Q = lp.SparseProjector(st["proj_Q_indices"].to(p.device), st["proj_Q_values"].to(p.device), s.Q.d,
                                   whiten=wq)
            if P.n != s.P.n or Q.n != s.Q.n or P.r != s.P.r or Q.r != s.Q.r:
                raise ValueError(f"LSPAdamW.load_state_dict: projectors of parameter {i} do not fit its shape "
                                 f"{tuple(p.shape)} / nnz {s.P.r}")
            lsp_saved[i] = (st, P, Q)
        # dense slots: the base class validates and loads them; hide the projected ones from it
        dense_sd = dict(state_dict)
        dense_sd["state"] = {i: v for i, v in saved.items() if i not in lsp_saved}
        super().load_state_dict(dense_sd)
        for i, (st, P, Q) in lsp_saved.items():
            p = params[i]
            s = self._slots[p]
            s.P, s.Q = P, Q
            s.ref_err = float(st["proj_refit_ref"]) if "proj_refit_ref" in st else math.nan
            s.fit_sum = s.held_sum = None
            self._engine.exp_avg(s.index).copy_(st["exp_avg"].reshape(-1))
            self._engine.exp_avg_sq(s.index).copy_(st["exp_avg_sq"].reshape(-1))
            s.acc_count, s.spec, s.grad_seen = 0, None, None
            self.state[p] = {"step": st["step"].detach().to("cpu", torch.float32).clone()}
            self._refresh_state(p)
