"""``lspo.CPUAdamW``: a ``torch.optim.Optimizer`` running lspo's fused SIMD Adam on CPU parameters.

One pass over memory per parameter per step (``lspo._C.adam_step``, AVX-512/AVX2/scalar by runtime
dispatch, threaded on lspo's persistent pool; see ``include/lspo/cpu_adam.h`` for the exact math).

* State per parameter, in ``self.state[p]``: ``step`` (0-dim fp32 tensor, as torch's AdamW),
  ``exp_avg`` and ``exp_avg_sq`` (fp32, shaped like ``p``) and, for bf16/fp16 parameters only,
  ``master_param``: the fp32 master copy the update runs on. The bf16/fp16 parameter is rewritten
  from the master (round to nearest even) in the same pass, so it never accumulates rounding error.
* ``state_dict()`` holds plain tensors (``torch.load(..., weights_only=True)`` works);
  ``load_state_dict`` keeps the fp32 state fp32 (torch's default would cast it to a bf16 param's
  dtype) and checks shapes.
* Non-finite gradients: with ``skip_nonfinite=True`` (default) every step first scans all gradients
  (vectorised, threaded ``lspo._C.all_finite``; costs one extra read of the gradients). If any holds
  inf/NaN, the whole step is skipped -- no parameter, moment or step count changes -- and it is
  reported: ``step()`` issues a ``RuntimeWarning``, ``self.last_step_skipped`` becomes True and
  ``self.skipped_steps`` counts such steps. A caller that already knows (AMP ``found_inf``) can pass
  ``step(found_inf=...)`` and ``skip_nonfinite=False``.
* ``grad_scale`` (per step): gradients are multiplied by it first (e.g. ``1 / loss_scale``).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch

from . import _C

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _as_float(x: Union[float, torch.Tensor], name: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"CPUAdamW: {name} must be a number or a one-element tensor")
        return float(x.item())
    return float(x)


class CPUAdamW(torch.optim.Optimizer):
    """AdamW (``adamw_mode=True``, decoupled weight decay) or Adam with L2 penalty
    (``adamw_mode=False``) for parameters that live on the CPU.

    Parameters must be contiguous CPU tensors of dtype float32, bfloat16 or float16; gradients
    float32, bfloat16 or float16 of the parameter's shape. Anything else raises ``ValueError`` /
    ``TypeError`` naming the parameter.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        adamw_mode: bool = True,
        *,
        bias_correction: bool = True,
        maximize: bool = False,
        skip_nonfinite: bool = True,
    ):
        if not 0.0 <= _as_float(lr, "lr"):
            raise ValueError(f"CPUAdamW: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"CPUAdamW: invalid eps {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"CPUAdamW: invalid beta1 {betas[0]} (need 0 <= beta1 < 1)")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"CPUAdamW: invalid beta2 {betas[1]} (need 0 <= beta2 < 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"CPUAdamW: invalid weight_decay {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adamw_mode=adamw_mode,
                        bias_correction=bias_correction, maximize=maximize)
        super().__init__(params, defaults)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.last_step_skipped = False
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                self._check_param(p, f"param_groups[{gi}]['params'][{pi}]")

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_param(p: torch.Tensor, where: str) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"CPUAdamW: {where} is a {type(p).__name__}, not a tensor")
        if p.device.type != "cpu":
            raise ValueError(f"CPUAdamW: {where} is on device {p.device}; CPUAdamW updates CPU parameters only")
        if p.dtype not in _GRAD_DTYPES:
            raise TypeError(f"CPUAdamW: {where} has dtype {p.dtype}; expected torch.float32, torch.bfloat16 "
                            "or torch.float16")
        if p.layout != torch.strided or not p.is_contiguous():
            raise ValueError(f"CPUAdamW: {where} must be a contiguous dense tensor (sizes {tuple(p.shape)}, "
                             f"strides {p.stride() if p.layout == torch.strided else p.layout})")

    @staticmethod
    def _check_grad(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(f"CPUAdamW: gradient of {where} is sparse; CPUAdamW needs dense gradients")
        if g.device.type != "cpu":
            raise ValueError(f"CPUAdamW: gradient of {where} is on device {g.device}; expected cpu")
        if g.dtype not in _GRAD_DTYPES:
            raise TypeError(f"CPUAdamW: gradient of {where} has dtype {g.dtype}; expected torch.float32, "
                            "torch.bfloat16 or torch.float16")
        if g.shape != p.shape:
            raise ValueError(f"CPUAdamW: gradient of {where} has shape {tuple(g.shape)} but the parameter has "
                             f"{tuple(p.shape)}")
        if not g.is_contiguous():
            raise ValueError(f"CPUAdamW: gradient of {where} is not contiguous (strides {g.stride()})")

    # ------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            if p.dtype != torch.float32:
                state["master_param"] = p.detach().to(torch.float32, copy=True).contiguous()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer casts floating-point state to the parameter's dtype; lspo's state is
        # fp32 whatever the parameter dtype, so keep the saved tensors and re-attach them after.
        # A checkpoint of torch.optim.AdamW / Adam (same math) is converted: its groups have no
        # adamw_mode / bias_correction; decoupled_weight_decay tells AdamW from Adam.
        saved_state = state_dict.get("state", {})
        saved_groups = state_dict.get("param_groups", [])
        groups = []
        for gi, g in enumerate(saved_groups):
            g = dict(g)
            if g.get("amsgrad", False):
                raise ValueError(f"CPUAdamW.load_state_dict: group {gi} was saved with amsgrad=True; CPUAdamW has no "
                                 "AMSGrad (its max_exp_avg_sq state would be dropped)")
            for k in ("capturable", "differentiable"):
                if g.get(k, False):
                    raise ValueError(f"CPUAdamW.load_state_dict: group {gi} was saved with {k}=True (not supported)")
            if "adamw_mode" not in g:
                if "decoupled_weight_decay" not in g:
                    raise ValueError(f"CPUAdamW.load_state_dict: group {gi} has neither 'adamw_mode' (lspo) nor "
                                     "'decoupled_weight_decay' (torch.optim.Adam/AdamW): cannot tell decoupled weight "
                                     "decay from an L2 penalty")
                g["adamw_mode"] = bool(g["decoupled_weight_decay"])
            g.setdefault("bias_correction", True)
            g.setdefault("maximize", False)
            groups.append(g)
        state_dict = dict(state_dict, param_groups=groups)
        super().load_state_dict(state_dict)
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved_state:
                continue
            src = saved_state[pid]
            dst = self.state[p]
            for key in ("exp_avg", "exp_avg_sq", "master_param"):
                if key not in src:
                    if key == "master_param" and p.dtype != torch.float32:
                        raise ValueError(f"CPUAdamW.load_state_dict: state of parameter {pid} lacks 'master_param' "
                                         f"needed for a {p.dtype} parameter")
                    if key != "master_param":
                        raise ValueError(f"CPUAdamW.load_state_dict: state of parameter {pid} lacks '{key}'")
                    continue
                t = src[key]
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    raise ValueError(f"CPUAdamW.load_state_dict: '{key}' of parameter {pid} has shape "
                                     f"{tuple(getattr(t, 'shape', ()))}, parameter has {tuple(p.shape)}")
                dst[key] = t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
            if "step" not in src:
                raise ValueError(f"CPUAdamW.load_state_dict: state of parameter {pid} lacks 'step'")
            dst["step"] = torch.as_tensor(src["step"], dtype=torch.float32).detach().clone().cpu()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *, grad_scale: float = 1.0,
             found_inf: Optional[Union[bool, torch.Tensor]] = None):
        """One optimizer step. ``grad_scale`` multiplies every gradient first; ``found_inf`` (bool or
        tensor, e.g. from AMP) skips the step when true. Returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param_groups[{gi}]['params'][{pi}]"
                self._check_param(p, where)
                self._check_grad(p, p.grad, where)
                work.append((group, p))

        skip = bool(found_inf.item() if isinstance(found_inf, torch.Tensor) else found_inf) if found_inf is not None else False
        if not skip and self.skip_nonfinite:
            skip = not all(_C.all_finite(p.grad) for _, p in work)
        self.last_step_skipped = skip
        if skip:
            self.skipped_steps += 1
            warnings.warn("CPUAdamW: non-finite gradient (inf/NaN): step skipped, parameters and state unchanged",
                          RuntimeWarning, stacklevel=2)
            return loss

        for group, p in work:
            state = self._init_state(p)
            state["step"] += 1
            step = int(state["step"].item())
            beta1, beta2 = group["betas"]
            master = state.get("master_param")
            _C.adam_step(
                master if master is not None else p.data,
                state["exp_avg"],
                state["exp_avg_sq"],
                p.grad,
                param_out=p.data if master is not None else None,
                step=step,
                lr=_as_float(group["lr"], "lr"),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                adamw_mode=bool(group["adamw_mode"]),
                bias_correction=bool(group["bias_correction"]),
                maximize=bool(group["maximize"]),
                grad_scale=float(grad_scale),
            )
            # The kernel wrote p through a raw pointer: tell autograd p changed in place.
            torch.autograd.graph.increment_version(p)
        return loss
