"""What limits LSPAdamW against GaLore and LoRA on the quick fine-tuning protocol: subspace *shape* and
*basis*, measured side by side (issue 12, item 4).

Every row fine-tunes the same pretrained TinyGPT (2 x 128) on GSM8K bytes with the quick protocol of
``benchmarks/ft_protocol.py`` (150 steps x 8 sequences, 4 micro-batches, warmup + cosine) at one lr
(0.01: the best of GaLore's grid and the top of every grid) and reports validation and test loss:

* ``adamw``, ``adamw_split``: torch AdamW; ``_split`` runs the block linears at ``lr * 0.25`` and the
  rest (embeddings, norms, head) at ``lr`` -- what a subspace optimizer whose projected update is
  smaller than AdamW's effectively does;
* ``galore``: galore-torch at LSPAdamW's optimizer memory (the protocol's builder);
* ``lsp*``: lspo.LSPAdamW (the optimizer core: learned sparse projectors, d = 64, r = 8): ``_fixed``
  never refits (whitened random projectors), ``_one_sided`` the one-sided layout, ``_once_itN`` one
  check at step 1 with N fit iterations, then fixed;
* ``sub_*``: a plain (unoptimised, torch-only) reference of Adam in a subspace, for the same block
  linears, so that shape and basis can be varied without touching the core:
  ``S = U^T G V`` (a side with no basis: identity), Adam on S, ``W -= lr * scale * U u V^T``; bases
  refreshed every ``gap`` steps from the step's accumulated gradient, moments kept across a refresh.
  Basis ``svd``: top singular vectors of the gradient; ``rand``: a random orthonormal basis (what
  whitened random sparse projectors span); ``hybK``: the top K singular vectors plus random
  directions, orthonormalised. Shape ``DxD`` (two-sided) or ``1sideK`` (the input side projected to
  K, the output side kept whole).

    python benchmarks/subspace_study.py [--rows a,b,...] [--lr 0.01]

Progress on stderr; the last stdout line is JSON ({row: {val, test, state_bytes, seconds}}).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ft_protocol as ftp  # noqa: E402


class SubspaceAdam(torch.optim.Optimizer):
    """Reference: Adam in a (dP, dQ) subspace of each projected weight (None: that side whole); the
    other parameters get plain Adam. No weight decay (the protocol uses none)."""

    def __init__(self, projected, rest, lr, dP, dQ, basis="svd", gap=10, scale=1.0, betas=(0.9, 0.999), eps=1e-8,
                 seed=0):
        super().__init__([{"params": rest, "proj": False}, {"params": projected, "proj": True}], dict(lr=lr))
        self.dP, self.dQ, self.basis, self.gap, self.scale = dP, dQ, basis, gap, scale
        self.betas, self.eps, self.seed = betas, eps, seed

    def _side(self, G: torch.Tensor, d, left: bool, gen: torch.Generator):
        n = G.shape[0] if left else G.shape[1]
        if isinstance(d, str):  # "keep_small:K" / "keep_large:K": the smaller (larger) side whole, the other
            keep, k = d.split(":")  # projected to K (a side of equal sizes: the rows whole)
            m_, n_ = G.shape
            whole_rows = (m_ <= n_) if keep == "keep_small" else (m_ > n_) or (m_ == n_)
            d = None if whole_rows == left else int(k)
        if d is None or d >= n:
            return None
        k = 0 if self.basis == "rand" else d if self.basis == "svd" else int(self.basis[3:])
        cols = []
        if k:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            cols.append(U[:, :k] if left else Vh[:k].T)
        if d > k:
            cols.append(torch.randn(n, d - k, generator=gen))
        return torch.linalg.qr(torch.cat(cols, 1))[0]

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                G, st = p.grad.float(), self.state[p]
                st["t"] = t = st.get("t", 0) + 1
                if g["proj"] and (t - 1) % self.gap == 0:
                    gen = torch.Generator().manual_seed(self.seed * 1000003 + t * 7919 + p.numel())
                    st["U"], st["V"] = self._side(G, self.dP, True, gen), self._side(G, self.dQ, False, gen)
                x = G
                if g["proj"]:
                    if st["U"] is not None:
                        x = st["U"].T @ x
                    if st["V"] is not None:
                        x = x @ st["V"]
                if "m" not in st:
                    st["m"], st["v"] = torch.zeros_like(x), torch.zeros_like(x)
                st["m"].mul_(b1).add_(x, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(x, x, value=1 - b2)
                u = (st["m"] / (1 - b1 ** t)) / ((st["v"] / (1 - b2 ** t)).sqrt() + self.eps)
                if g["proj"]:
                    if st["U"] is not None:
                        u = st["U"] @ u
                    if st["V"] is not None:
                        u = u @ st["V"].T
                    p.add_(u.to(p.dtype), alpha=-g["lr"] * self.scale)
                else:
                    p.add_(u.to(p.dtype), alpha=-g["lr"])


def _split(model):
    lin = [getattr(b, t).weight for b in model.blocks for t in ftp.TARGETS]
    ids = {id(p) for p in lin}
    return lin, [p for p in model.parameters() if id(p) not in ids]


def adamw_split(mult):
    def build(model, lr, cfg, seed):
        lin, rest = _split(model)
        return torch.optim.AdamW([{"params": rest}, {"params": lin, "lr": lr * mult}], lr=lr, weight_decay=0.0,
                                 foreach=False), model, {}
    return build


def sub(dP, dQ, basis, gap, scale):
    def build(model, lr, cfg, seed):
        lin, rest = _split(model)
        return SubspaceAdam(lin, rest, lr, dP, dQ, basis, gap, scale, seed=seed), model, {}
    return build


# row -> (protocol optimizer name or None, builder or None, LSPAdamW kwargs)
ROWS = {
    "adamw": ("adamw", None, {}),
    "adamw_split": (None, adamw_split(0.25), {}),
    "galore": ("galore", None, {}),
    "lsp": ("lsp", None, {}),
    "lsp_scale0.5": ("lsp", None, {"scale": 0.5}),
    "lsp_fixed": ("lsp", None, {"refit_every": 0}),
    "lsp_one_sided": ("lsp", None, {"one_sided": True}),
    "lsp_one_sided_fixed": ("lsp", None, {"one_sided": True, "refit_every": 0}),
    "lsp_one_sided_once_it1": ("lsp", None, {"one_sided": True, "refit_every": 10**6, "refit_iters": 1}),
    "lsp_one_sided_once_it10": ("lsp", None, {"one_sided": True, "refit_every": 10**6, "refit_iters": 10}),
    "lsp_one_sided_once_it50": ("lsp", None, {"one_sided": True, "refit_every": 10**6, "refit_iters": 50}),
    "sub_rand_64x64": (None, sub(64, 64, "rand", 100, 0.5), {}),
    "sub_svd_64x64": (None, sub(64, 64, "svd", 100, 0.5), {}),
    "sub_hyb16_64x64": (None, sub(64, 64, "hyb16", 100, 0.5), {}),
    "sub_svd_96x96": (None, sub(96, 96, "svd", 100, 0.5), {}),
    "sub_svd_1side10": (None, sub(None, 10, "svd", 100, 1.0), {}),
    "sub_rand_1side27": (None, sub(None, 27, "rand", 100, 1.0), {}),
    "sub_svd_1side27": (None, sub(None, 27, "svd", 100, 1.0), {}),
    "sub_hyb8_1side27": (None, sub(None, 27, "hyb8", 100, 1.0), {}),
    "sub_rand_keepsmall32": (None, sub("keep_small:32", "keep_small:32", "rand", 100, 1.0), {}),
    "sub_rand_keeplarge32": (None, sub("keep_large:32", "keep_large:32", "rand", 100, 1.0), {}),
    "sub_hyb8_keepsmall32": (None, sub("keep_small:32", "keep_small:32", "hyb8", 100, 1.0), {}),
    "sub_hyb8_keeplarge32": (None, sub("keep_large:32", "keep_large:32", "hyb8", 100, 1.0), {}),
    "sub_hyb8_keeplarge32_gap10": (None, sub("keep_large:32", "keep_large:32", "hyb8", 10, 1.0), {}),
    "sub_hyb8_keeplarge32_once": (None, sub("keep_large:32", "keep_large:32", "hyb8", 10**9, 1.0), {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    spec = ftp.TinySpec(n_layer=2, n_embd=128, block=128, pretrain_steps=300, pretrain_batch=16)
    data = ftp.ByteSFT(spec.block, n_val=64, n_test=64)
    rows = a.rows.split(",") if a.rows else list(ROWS)
    out = {}
    original = ftp.build_optimizer
    for row in rows:
        name, builder, kw = ROWS[row]
        cfg = ftp.FtConfig(steps=150, batch=8, micro=4, eval_every=50, lsp_subspace=64, threads=1)
        cfg.lsp_kwargs = {**ftp.PAPER_LAYOUT, **kw}  # the learned sparse layout studied
        t0 = time.perf_counter()
        if builder is not None:
            ftp.build_optimizer = lambda n, model, lr, c, s, b=builder: b(model, lr, c, s)
        try:
            rec = ftp.finetune(name or row, a.lr, a.seed, spec, cfg, data)
        finally:
            ftp.build_optimizer = original
        out[row] = {"val": rec["val_loss"], "test": rec["test_loss"], "state_bytes": rec["state_bytes"],
                    "seconds": time.perf_counter() - t0}
        print(f"{row:20s} val {rec['val_loss']:.4f} test {rec['test_loss']:.4f} state {rec['state_bytes']} B",
              file=sys.stderr, flush=True)
    print(json.dumps({"lr": a.lr, "seed": a.seed, "rows": out}))


if __name__ == "__main__":
    main()
