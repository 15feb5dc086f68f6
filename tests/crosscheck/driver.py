"""The cross-face driver: one small model, data and option set, trained through lspo's Python
optimizers (train_py) or through the C++ ones (run_cpp, the lspo_crosscheck executable built from
crosscheck.cpp). Used by tests/python/test_faces.py and benchmarks/engine.py."""
import os
import pathlib
import subprocess

import torch

import lspo

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXE = pathlib.Path(os.environ.get("LSPO_BUILD_DIR", ROOT / "build")) / "lspo_crosscheck"

LSP_OPTS = dict(lr=1e-2, weight_decay=0.01, subspace=16, nnz=4, min_dim=16, refit_every=3, refit_threshold=0.0,
                refit_iters=5, refit_lr=0.05, max_grad_norm=1.0, overlap=True, seed=3)
OFF_OPTS = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0, overlap=True)
K, M, ACCUM = 4, 3, 2


class MLP(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.l1 = torch.nn.Linear(24, 40)
        self.l2 = torch.nn.Linear(40, 33)
        self.l3 = torch.nn.Linear(33, 5)
        with torch.no_grad():
            for p, w in zip(self.parameters(), weights):
                p.copy_(w)

    def forward(self, x):
        return self.l3(torch.nn.functional.gelu(self.l2(torch.tanh(self.l1(x)))))


def _lsp_opts(kind):  # "lsp1": the one-sided layout; "lsvd": one-sided with the SVD basis
    return {"lsp": LSP_OPTS, "lsp1": dict(LSP_OPTS, one_sided=True),
            "lsvd": dict(LSP_OPTS, one_sided=True, basis="svd")}[kind]


def data():
    g = torch.Generator().manual_seed(42)
    torch.manual_seed(42)
    weights = [p.detach().clone() for p in MLP([]).parameters()]  # default init under the seed
    xs = [torch.randn(8, 24, generator=g) for _ in range((K + M) * ACCUM)]
    ys = [torch.randint(0, 5, (8,), generator=g) for _ in range((K + M) * ACCUM)]
    return weights, xs, ys


def optimizer(kind, model):
    if kind in ("lsp", "lsp1", "lsvd"):
        return lspo.LSPAdamW(model, **_lsp_opts(kind))
    return lspo.OffloadAdamW(model.parameters(), **OFF_OPTS)


def train_py(model, opt, xs, ys, start, steps):
    for s in range(start, start + steps):
        for k in range(ACCUM):
            i = s * ACCUM + k
            (torch.nn.functional.cross_entropy(model(xs[i]), ys[i]) / ACCUM).backward()
        opt.step()
        opt.zero_grad()


def run_cpp(tmp_path: pathlib.Path, kind, weights, xs, ys, start, steps, load=""):
    inp, out = tmp_path / f"in_{kind}_{start}.pt", tmp_path / f"out_{kind}_{start}.pt"
    opts = _lsp_opts(kind) if kind in ("lsp", "lsp1", "lsvd") else OFF_OPTS
    torch.save({"weights": weights, "xs": xs, "ys": ys, "steps": steps, "accum": ACCUM, "start": start, "kind": kind,
                "options": opts, "load": str(load), "save_at": -1, "save_path": ""}, inp)
    r = subprocess.run([str(EXE), str(inp), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return torch.load(out, weights_only=True)


