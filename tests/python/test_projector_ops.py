"""The projector operations as PyTorch operators (torch.ops.lspo.*): torch.library.opcheck (schema,
fake implementation vs the real kernel, AOT dispatch with dynamic shapes), profiler names, a compiled
function that calls them, and the Python API calling them (with lspo.LspoError for bad input)."""
import pytest
import torch

import lspo
from lspo import projector as lp

OPS = ["right_project", "left_project", "compress", "project_input", "project_grad_output",
       "compress_activations", "decompress", "apply_"]


CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and lspo._C.with_cuda), reason="needs CUDA")


def _case(m, n, d, r, k, dtype, device="cpu"):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    P = lp.SparseProjector.random(m, min(d, m), min(r, d, m), seed=m, device=device)
    Q = lp.SparseProjector.random(n, min(d, n), min(r, d, n), seed=n + 1, device=device)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    return {
        "right_project": (rnd(k, m), *P._t()),
        "left_project": (*P._t(), rnd(m, k)),
        "compress": (*P._t(), *Q._t(), rnd(m, n)),
        "project_input": (*P._t(), rnd(k, m)),
        "project_grad_output": (*Q._t(), rnd(k, n)),
        "compress_activations": (*P._t(), *Q._t(), rnd(k, m), rnd(k, n)),
        "decompress": (*P._t(), *Q._t(), torch.randn(P.d, Q.d, generator=g).to(device)),
        "apply_": (rnd(m, n), *P._t(), *Q._t(), torch.randn(P.d, Q.d, generator=g).to(device), 0.5),
    }


SHAPES = [(1, 1, 1, 1, 1), (7, 5, 3, 2, 3), (64, 17, 16, 4, 9)]


# fp32 on every shape, bf16 on the awkward one (the fakes do not depend on the dtype; suite time)
CASES = [(s, torch.float32) for s in SHAPES] + [(SHAPES[1], torch.bfloat16)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("shape,dtype", CASES,
                         ids=lambda v: "m{}_n{}_d{}_r{}_k{}".format(*v) if isinstance(v, tuple) else str(v)[6:])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, shape, dtype, device):
    """Schema, fake vs real (shapes, dtypes, strides, devices); AOT dispatch incl. dynamic shapes on
    one shape (the slow part of opcheck; the fake implementations do not branch on sizes)."""
    args = _case(*shape, dtype, device)[op]
    utils = ["test_schema", "test_faketensor"]
    if shape == SHAPES[1]:
        utils += ["test_autograd_registration", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(getattr(torch.ops.lspo, op), args, test_utils=utils)


def test_ops_show_by_name_in_profiler():
    args = _case(33, 20, 8, 3, 5, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for op in OPS:
            getattr(torch.ops.lspo, op)(*args[op])
    names = {e.key for e in prof.key_averages()}
    assert {f"lspo::{op}" for op in OPS} <= names, names


def test_python_api_calls_the_ops_and_compiles():
    P = lp.SparseProjector.random(40, 8, 2, seed=1)
    Q = lp.SparseProjector.random(24, 8, 2, seed=2)
    X, dY = torch.randn(10, 40), torch.randn(10, 24)

    def f(X, dY):  # the Python API, traced whole (every op has a fake implementation)
        return lp.compress_activations(P, Q, X, dY) + lp.left_project(P, X.t()) @ lp.right_project(dY, Q)

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)(X, dY)
    # reference in fp64 from the dense projectors: S + (P^T X^T)(dY Q) = 2 P^T X^T dY Q
    P64, Q64 = P.dense(torch.float64), Q.dense(torch.float64)
    ref = 2 * P64.t() @ X.double().t() @ dY.double() @ Q64
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_op_errors_raise_lspo_error():
    P = lp.SparseProjector.random(40, 8, 2, seed=1)
    with pytest.raises(lspo.LspoError, match="lspo: "):
        lp.right_project(torch.randn(3, 41), P)
    with pytest.raises(RuntimeError, match="lspo: "):  # the operator itself: a RuntimeError
        torch.ops.lspo.right_project(torch.randn(3, 41), *P._t())
