"""The memory path of LSPAdamW: layers whose backward yields the compressed gradient directly.

``opt.wrap(model)`` (or ``lspo.wrap_linear(model, opt)``) re-classes every projected
``nn.Linear`` (and GPT-2 ``Conv1D``) of ``model`` in place, so that its backward computes
``S = P^T G Q`` straight from the layer's input ``X`` and output gradient ``dY`` -- as
``(P^T dY^T)(X Q)`` for ``nn.Linear`` (weight ``[out, in]``, ``G = dY^T X``) -- and hands it to the
optimizer: no dense ``m x n`` weight gradient is ever allocated, and forward keeps ``X Q``
(``tokens x dQ``) for backward instead of ``X`` (``tokens x in``). On a refit step (known at forward
time) the layer runs as a plain layer, so the refit in ``step()`` sees the dense gradient.
Parameter names, ``state_dict`` and the forward math are unchanged (``weight.grad`` stays ``None``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import projector as lp


class _CompressedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, transposed: bool):
        # transposed: Conv1D (weight [in, out], y = x W + b); else nn.Linear (weight [out, in])
        if transposed:
            y = x @ weight if bias is None else torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(
                *x.shape[:-1], weight.shape[1])
        else:
            y = F.linear(x, weight, bias)
        x2 = x.detach().reshape(-1, x.shape[-1])
        # the input side of S: nn.Linear  S = (P^T dY^T)(X Q);  Conv1D  S = (P^T X^T)(dY Q)
        xp = lp.right_project(x2, layer.Q) if not transposed else lp.project_input(layer.P, x2)
        ctx.layer, ctx.transposed, ctx.has_bias = layer, transposed, bias is not None
        ctx.P, ctx.Q = layer.P, layer.Q  # the pair of this forward (a refit in step() replaces the layer's)
        ctx.save_for_backward(weight, xp)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, saved = ctx.saved_tensors
        transposed = ctx.transposed
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight.t() if transposed else dy @ weight
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if transposed:  # saved = P^T X^T  [dP, tokens]
            S = saved @ lp.project_grad_output(ctx.Q, dy2)
        else:  # saved = X Q  [tokens, dQ];  P^T dY^T = (dY P)^T
            S = lp.project_grad_output(ctx.P, dy2).t() @ saved
        ctx.layer.accept(S)
        return dx, None, db, None, None


def _forward(self, x, transposed: bool):
    layer = self._lspo_layer
    if layer.dense_this_step():  # a refit step: autograd produces the dense weight gradient
        return super(type(self), self).forward(x)
    return _CompressedLinearFn.apply(x, self.weight, self.bias, layer, transposed)


def _forward_linear(self, x):
    return _forward(self, x, False)


def _forward_conv1d(self, x):
    return _forward(self, x, True)


def wrap_linear(model: torch.nn.Module, opt) -> int:
    """Re-classes the projected layers of ``model`` (see the module doc); returns how many."""
    projected = {id(p) for p in opt.projected_params}
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None or id(w) not in projected or getattr(m, "_lspo_layer", None) is not None:
            continue
        if isinstance(m, torch.nn.Linear):
            fwd = _forward_linear
        elif type(m).__name__ == "Conv1D":
            fwd = _forward_conv1d
        else:
            continue
        cls = type(m)
        m.__class__ = type(f"Compressed{cls.__name__}", (cls,), {"forward": fwd, "__module__": __name__})
        m._lspo_layer = opt._layer(w)
        n += 1
    return n
