"""The memory path of LSPAdamW: layers whose backward yields the compressed gradient directly.

``opt.wrap(model)`` (or ``lspo.wrap_linear(model, opt)``) re-classes every projected
``nn.Linear`` (and GPT-2 ``Conv1D``) of ``model`` in place, so that its backward computes
``S = P^T G Q`` straight from the layer's input ``X`` and output gradient ``dY`` -- as
``(P^T dY^T)(X Q)`` for ``nn.Linear`` (weight ``[out, in]``, ``G = dY^T X``) -- and hands it to the
optimizer: no dense ``m x n`` weight gradient is ever allocated, and forward keeps ``X Q``
(``tokens x dQ``) for backward instead of ``X`` (``tokens x in``). On a projector-refit step (known
at forward time) the layer is a plain Linear / Conv1D: autograd forms the dense weight gradient and
the optimizer's gradient hook consumes it (refit sample and compression).
Parameter names, ``state_dict`` and the forward math are unchanged (``weight.grad`` stays ``None``
on the compressed steps).

The interface to the optimizer -- the only one this module uses: every wrapped module gets
``module._lspo_layer = opt._layer(module.weight)``, an object with

* ``.P``, ``.Q``: the layer's current :class:`~lspo.projector.SparseProjector` pair (read at every
  forward: they may change between steps);
* ``.dense_this_step() -> bool``: True on a refit step (the layer then runs as a plain layer);
* ``.accept(S)``: one micro-batch's compressed gradient ``S = P^T G Q`` (fp32 ``[dP, dQ]``, on the
  weight's device).

torch.compile: the forward, the backward and the hand-over of ``S`` trace into graphs. The hand-over
is the operator ``lspo::accept_compressed(S, layer)``; ``layer``, a CPU int64 scalar tensor naming
the module, is a graph input (not a constant Dynamo specialises on), so layers of one shape share a
compiled graph and each still gets its own S; it calls ``module._lspo_layer.accept(S)``. One
wrapped subclass per layer class (Dynamo guards on the module's type). ``dense_this_step()`` is evaluated while tracing: Dynamo guards
on what it reads (the handle's flag), so a refit step runs another compiled variant.
Works under ``torch.autocast`` (the backward computes ``dX`` in the forward's compute dtype) and under
``torch.utils.checkpoint`` (the handle comes from the module, never from the weight tensor).
"""
from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F

_ops = torch.ops.lspo
# layer id -> the wrapped module (weakly): lspo::accept_compressed finds the layer's handle there
_MODULES: "dict[int, weakref.ref]" = {}
_next_id = itertools.count()


@torch.library.custom_op("lspo::accept_compressed", mutates_args=())
def accept_compressed(S: torch.Tensor, layer: torch.Tensor) -> None:
    """Hands one micro-batch's compressed gradient ``S`` to the wrapped layer number ``layer`` (a CPU
    int64 scalar)."""
    _accept(S, int(layer))


@torch.compiler.disable  # optimizer code: never traced (also not when a compiled caller runs backward)
def _accept(S: torch.Tensor, layer: int) -> None:  # noqa: D103
    ref = _MODULES.get(layer)
    module = ref() if ref is not None else None
    if module is None:
        raise RuntimeError(f"lspo::accept_compressed: no live wrapped layer {layer}")
    module._lspo_layer.accept(S)


@accept_compressed.register_fake
def _(S, layer):
    return None


# The operator returns nothing: tell FX's dead-code elimination that it must stay in the graph.
torch.fx.node.has_side_effect(torch.ops.lspo.accept_compressed.default)


class _CompressedLinearFn(torch.autograd.Function):
    """y = linear(x); backward: dX, db and S = P^T G Q (handed over), never the dense G."""

    @staticmethod
    def forward(ctx, x, weight, bias, P_indices, P_values, P_whiten, Q_indices, Q_values, Q_whiten, dP: int, dQ: int,
                layer, transposed: bool):
        # transposed: Conv1D (weight [in, out], y = x W + b); else nn.Linear (weight [out, in])
        if transposed:
            x2d = x.reshape(-1, x.shape[-1])
            y2d = x2d @ weight if bias is None else torch.addmm(bias, x2d, weight)
            y = y2d.view(*x.shape[:-1], weight.shape[1])
        else:
            y = F.linear(x, weight, bias)
        x2 = x.detach().reshape(-1, x.shape[-1])
        # the input side of S: nn.Linear  S = (dY P)^T (X Q);  Conv1D  S = (P^T X^T)(dY Q)
        xp = (_ops.project_input(P_indices, P_values, dP, P_whiten, x2) if transposed
              else _ops.right_project(x2, Q_indices, Q_values, dQ, Q_whiten))
        ctx.save_for_backward(weight, xp, P_indices, P_values, P_whiten, Q_indices, Q_values, Q_whiten, layer)
        ctx.dP, ctx.dQ, ctx.transposed = dP, dQ, transposed
        # under autocast y may be bf16 while x and W are fp32: dX is computed in y's dtype, as
        # autocast's own matmul would, then given x's dtype
        ctx.x_dtype, ctx.bias_dtype = x.dtype, (bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, xp, P_indices, P_values, P_whiten, Q_indices, Q_values, Q_whiten, layer = ctx.saved_tensors
        transposed = ctx.transposed
        dx = db = None
        if ctx.needs_input_grad[0]:
            w = weight.to(dy.dtype)
            dx = (dy @ w.t() if transposed else dy @ w).to(ctx.x_dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        if transposed:  # xp = P^T X^T  [dP, tokens]
            S = xp @ _ops.project_grad_output(Q_indices, Q_values, ctx.dQ, Q_whiten, dy2)
        else:  # xp = X Q  [tokens, dQ];  P^T dY^T = (dY P)^T
            S = _ops.project_grad_output(P_indices, P_values, ctx.dP, P_whiten, dy2).t() @ xp
        _ops.accept_compressed(S, layer)
        return dx, None, db, None, None, None, None, None, None, None, None, None, None


def _compressed_forward(self, x, transposed: bool):
    layer = self._lspo_layer
    if layer.dense_this_step():  # refit step: the plain layer, autograd forms the dense gradient
        return self._lspo_dense_forward(x)
    P, Q = layer.P, layer.Q
    return _CompressedLinearFn.apply(x, self.weight, self.bias, P.indices, P.values, P.whiten, Q.indices, Q.values, Q.whiten,
                                     P.d, Q.d,
                                     self._lspo_layer_key, transposed)


def _forward_linear(self, x):
    return _compressed_forward(self, x, False)


def _forward_conv1d(self, x):
    return _compressed_forward(self, x, True)


_CLASSES: dict = {}


def _compressed_class(cls: type, fwd) -> type:
    """One wrapped subclass per layer class (torch.compile guards on the module's type: layers of one
    shape then share a compiled graph)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Compressed{cls.__name__}", (cls,),
                             {"forward": fwd, "_lspo_dense_forward": cls.forward, "__module__": __name__})
    return _CLASSES[cls]


def wrap_linear(model: torch.nn.Module, opt) -> int:
    """Re-classes the projected layers of ``model`` (see the module doc); returns how many.
    Uses ``opt.projected_params`` and ``opt._layer(weight)``."""
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
        m.__class__ = _compressed_class(type(m), fwd)
        m._lspo_layer = opt._layer(w)
        i = next(_next_id)
        m._lspo_layer_key = torch.tensor(i, dtype=torch.int64)
        _MODULES[i] = weakref.ref(m, lambda _, i=i: _MODULES.pop(i, None))
        n += 1
    return n
