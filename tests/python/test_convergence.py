"""Convergence on real text (issue: the engine): a small causal transformer (lspo.tinygpt.TinyGPT,
bytes as tokens) trained 300 steps on tinyshakespeare from the same init, data order and seed.
LSPAdamW's eval loss must be within 5% of torch AdamW's (lower is fine).

OffloadAdamW does the same math as torch's single-tensor AdamW; per step the two differ by 1-ulp
roundings in a few elements (test_optim_contract checks the step). Training amplifies such
differences chaotically (Adam divides by sqrt(v), which magnifies tiny gradient changes): measured on
this model, max |param diff| 1.3e-5 after 10 steps, 2.3e-3 after 50, 6e-2 after 300, with eval
losses 2.7776 vs 2.7703 (0.26%). A math error (bias correction, weight decay, eps placement, a stale
gradient) moves the trajectory at the first step, so the test bounds the 10-step difference at a
level 100x above one rounding per step and the 300-step eval loss at 2% (benchmarks/engine.py,
a bigger model, measured 1.1%)."""
import os

import pytest
import torch

import lspo
from lspo.tinygpt import TinyGPT, TinyGPTConfig, batches, evaluate, load_text

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data", "tinyshakespeare.txt")
STEPS = 300


def _train(kind):
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32))
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, foreach=False)
    elif kind == "offload":
        opt = lspo.OffloadAdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    else:
        opt = lspo.LSPAdamW(model, lr=3e-3, weight_decay=0.01, subspace=32, nnz=4, refit_every=100,
                            refit_iters=20)
    train, val = load_text(DATA)
    it = batches(train, 8, 32, seed=0)
    first = evaluate(model, val, batch_size=8, n_batches=8)
    early = None
    for i in range(STEPS):
        x, y = next(it)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
        if i == 9:
            early = [p.detach().clone() for p in model.parameters()]
    opt.early = early
    return first, evaluate(model, val, batch_size=8, n_batches=8), opt


def test_300_steps_lsp_within_5pct_and_offload_equals_adamw():
    a0, a, ta = _train("adamw")
    o0, o, to = _train("offload")
    l0, l, lsp = _train("lsp")
    assert a0 == o0 == l0  # same initialisation and eval windows
    assert a < 0.75 * a0  # training did something (5.5 -> ~3)
    assert l <= 1.05 * a, (l, a)
    assert len(lsp.projected_params) == 8 and sum(r["refit"] for r in lsp.refits) > 0
    early = max((x - y).abs().max().item() for x, y in zip(ta.early, to.early))
    assert early < 1e-4, early
    assert abs(o - a) <= 2e-2 * a, (o, a)
