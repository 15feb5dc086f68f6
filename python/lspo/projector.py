"""Learned (d, r)-sparse projectors (LSP-Offload), over the C++ core in ``lspo._C``.

A :class:`SparseProjector` for a dimension of size ``n`` is an ``n x d`` matrix with exactly ``r``
nonzeros per row: ``indices`` int32 ``[n, r]`` (fixed positions) and ``values`` float32 ``[n, r]``
(learned). A layer with weight gradient ``G [m, n]`` uses a pair ``(P, Q)``; the compressed gradient is
``S = P^T G Q`` (``[dP, dQ]``). Every function takes fp32 or bf16 inputs, accumulates in fp32 and
returns fp32; CPU and CUDA tensors (the projector's device). Errors raise ``lspo.LspoError``.
The tensor operations are PyTorch operators ``torch.ops.lspo.<name>`` (named in the profiler,
traceable by ``torch.compile``); the functions here call them.

Serialisation: ``torch.save(P.state_dict(), f)`` and
``SparseProjector.from_state_dict(torch.load(f, weights_only=True))``.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple, Union

import torch

from . import _C

Sample = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "SparseProjector",
    "apply_",
    "carry_state",
    "compress",
    "compress_activations",
    "decompress",
    "fit",
    "left_project",
    "project_grad_output",
    "project_input",
    "relative_error",
    "right_project",
    "set_backend",
    "should_refit",
]


class SparseProjector:
    """An ``n x d`` ELL matrix with ``r`` nonzeros per row (plain tensors inside)."""

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, d: int, validate: bool = True):
        self.indices = indices
        self.values = values
        self.d = int(d)
        if validate:
            _C.projector_validate(self.indices, self.values, self.d)

    @classmethod
    def random(cls, n: int, d: int, r: int, seed: int = 0, device: Union[str, torch.device] = "cpu",
               init: str = "gaussian") -> "SparseProjector":
        """Random positions (distinct in a row) from ``seed``; values N(0, 1/sqrt(r)) or +-1/sqrt(r)
        (``init="rademacher"``)."""
        idx, val = _C.projector_random(int(n), int(d), int(r), int(seed), str(torch.device(device)), init)
        return cls(idx, val, d, validate=False)

    @property
    def n(self) -> int:
        return self.indices.shape[0]

    @property
    def r(self) -> int:
        return self.indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def _t(self):
        return self.indices, self.values, self.d

    def to(self, device) -> "SparseProjector":
        return SparseProjector(self.indices.to(device), self.values.to(device), self.d, validate=False)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The projector as a dense ``[n, d]`` matrix."""
        out = torch.zeros(self.n, self.d, dtype=dtype, device=self.device)
        return out.scatter_(1, self.indices.long(), self.values.to(dtype))

    def state_dict(self) -> dict:
        return {"indices": self.indices, "values": self.values, "d": self.d}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SparseProjector":
        """Rebuilds (and fully validates) a projector saved with :meth:`state_dict`."""
        try:
            return cls(state["indices"], state["values"], int(state["d"]))
        except KeyError as e:
            raise _C.LspoError(f"SparseProjector.from_state_dict: missing key {e}") from None

    def __repr__(self) -> str:
        return f"SparseProjector(n={self.n}, d={self.d}, r={self.r}, device={self.device})"


# ---------------------------------------------------------------- the dispatcher operators
# torch.ops.lspo.* (python/src/ops_projector.cpp: CPU and CUDA kernels). Their fake implementations
# below give torch.compile / FakeTensor the output shapes (every output is fp32 and contiguous, on
# the input's device); the real kernels check the arguments.
_ops = torch.ops.lspo


def _f32(like: torch.Tensor, *shape) -> torch.Tensor:
    return like.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("lspo::right_project")
def _(X, P_indices, P_values, P_d):
    torch._check(X.dim() == 2, lambda: "lspo::right_project: X must be 2-D")
    return _f32(X, X.shape[0], P_d)


@torch.library.register_fake("lspo::left_project")
def _(P_indices, P_values, P_d, Y):
    torch._check(Y.dim() == 2, lambda: "lspo::left_project: Y must be 2-D")
    return _f32(Y, P_d, Y.shape[1])


@torch.library.register_fake("lspo::compress")
def _(P_indices, P_values, P_d, Q_indices, Q_values, Q_d, G):
    return _f32(G, P_d, Q_d)


@torch.library.register_fake("lspo::project_input")
def _(P_indices, P_values, P_d, X):
    torch._check(X.dim() == 2, lambda: "lspo::project_input: X must be 2-D")
    return _f32(X, P_d, X.shape[0])


@torch.library.register_fake("lspo::project_grad_output")
def _(Q_indices, Q_values, Q_d, dY):
    torch._check(dY.dim() == 2, lambda: "lspo::project_grad_output: dY must be 2-D")
    return _f32(dY, dY.shape[0], Q_d)


@torch.library.register_fake("lspo::compress_activations")
def _(P_indices, P_values, P_d, Q_indices, Q_values, Q_d, X, dY):
    return _f32(X, P_d, Q_d)


@torch.library.register_fake("lspo::decompress")
def _(P_indices, P_values, P_d, Q_indices, Q_values, Q_d, Delta):
    return _f32(Delta, P_indices.shape[0], Q_indices.shape[0])


@torch.library.register_fake("lspo::apply_")
def _(W, P_indices, P_values, P_d, Q_indices, Q_values, Q_d, Delta, alpha):
    return None


def _call(op, *args):
    """Runs a dispatcher operator; an lspo check that failed inside it raises ``lspo.LspoError``
    (the dispatcher reports C++ exceptions as RuntimeError)."""
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        return op(*args)
    except RuntimeError as e:
        msg = str(e)
        if isinstance(e, _C.LspoError) or not msg.startswith("lspo: "):
            raise
        raise _C.LspoError(msg) from None


def right_project(X: torch.Tensor, P: SparseProjector) -> torch.Tensor:
    """``X [k, n] @ P -> [k, d]``."""
    return _call(_ops.right_project, X, *P._t())


def left_project(P: SparseProjector, Y: torch.Tensor) -> torch.Tensor:
    """``P^T @ Y [n, k] -> [d, k]``."""
    return _call(_ops.left_project, *P._t(), Y)


def compress(P: SparseProjector, Q: SparseProjector, G: torch.Tensor) -> torch.Tensor:
    """``S = P^T G Q`` for ``G [m, n]``."""
    return _call(_ops.compress, *P._t(), *Q._t(), G)


def project_input(P: SparseProjector, X: torch.Tensor) -> torch.Tensor:
    """``A = P^T X^T`` (``[dP, tokens]``) for ``X [tokens, m]``; can be kept from forward instead of X."""
    return _call(_ops.project_input, *P._t(), X)


def project_grad_output(Q: SparseProjector, dY: torch.Tensor) -> torch.Tensor:
    """``B = dY Q`` (``[tokens, dQ]``) for ``dY [tokens, n]``."""
    return _call(_ops.project_grad_output, *Q._t(), dY)


def compress_activations(P: SparseProjector, Q: SparseProjector, X: torch.Tensor, dY: torch.Tensor) -> torch.Tensor:
    """``S = (P^T X^T)(dY Q)``: the compressed gradient of ``G = X^T dY`` without forming G.
    (For ``torch.nn.Linear``, weight ``[out, in]`` and ``G = dY^T X``: pass ``(dY, X)`` as ``(X, dY)``.)"""
    return _call(_ops.compress_activations, *P._t(), *Q._t(), X, dY)


def decompress(P: SparseProjector, Q: SparseProjector, Delta: torch.Tensor) -> torch.Tensor:
    """``P Delta Q^T -> [m, n]`` fp32."""
    return _call(_ops.decompress, *P._t(), *Q._t(), Delta)


def apply_(W: torch.Tensor, P: SparseProjector, Q: SparseProjector, Delta: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``W += alpha * P Delta Q^T`` in place, in W's dtype (fp32 or bf16), without an fp32 m x n temporary."""
    _call(_ops.apply_, W, *P._t(), *Q._t(), Delta, float(alpha))
    return W


def _samples(samples: Union[Sample, Iterable[Sample]]) -> list:
    if isinstance(samples, torch.Tensor):
        return [samples]
    return [tuple(s) if isinstance(s, (tuple, list)) else s for s in samples]


def relative_error(P: SparseProjector, Q: SparseProjector, samples: Sequence[Sample]) -> float:
    """Mean of ``||P P^T G Q Q^T - G||_F / ||G||_F`` over samples (tensors G or pairs (X, dY))."""
    return _C.projector_relative_error(*P._t(), *Q._t(), _samples(samples))


def should_refit(P: SparseProjector, Q: SparseProjector, samples: Sequence[Sample], alpha: float) -> bool:
    """True when the relative error on these samples exceeds ``alpha``."""
    return _C.projector_should_refit(*P._t(), *Q._t(), _samples(samples), float(alpha))


def fit(P: SparseProjector, Q: SparseProjector, samples: Sequence[Sample], lr: float = 0.05, max_iters: int = 100,
        target_error: float = 0.0, l2: float = 0.0) -> dict:
    """Learns P's and Q's values in place (Adam, positions fixed) to minimise the mean relative error
    over samples (dense G or (X, dY) pairs). Returns ``{"error_before", "error_after", "iters"}``."""
    return _C.projector_fit(*P._t(), *Q._t(), _samples(samples), float(lr), int(max_iters), float(target_error),
                            float(l2))


def carry_state(P_old: SparseProjector, Q_old: SparseProjector, P_new: SparseProjector, Q_new: SparseProjector,
                M: torch.Tensor, V: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adam moments into the new subspace: ``M <- P_new^T P_old M Q_old^T Q_new``, V with the
    elementwise-squared maps. In place when the sizes agree; returns ``(M, V)``."""
    return _C.projector_carry_state(*P_old._t(), *Q_old._t(), *P_new._t(), *Q_new._t(), M, V)


def set_backend(name: str) -> None:
    """CUDA kernel family of the projector operations: "auto", "gather" or "cusparse"."""
    _C.set_projector_backend(name)
