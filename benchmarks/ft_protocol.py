"""The CPU fine-tuning protocol of ``benchmarks/convergence.py --finetune`` (importable: other
benchmarks reuse it, e.g. the MEFT adapters).

(a) tiny: ``lspo.tinygpt.TinyGPT`` pretrained by :func:`pretrained_tinygpt` with torch AdamW on
tinyshakespeare (bytes as tokens; checkpoint cached under ``$LSPO_CACHE`` or ``~/.cache/lspo``),
then fine-tuned on GSM8K SFT as bytes (:class:`ByteSFT`): prompt ``"Question: ...\\nAnswer: "``,
response = the worked answer + ``"\\n"``; the loss is on the response bytes only (prompt and
padding labelled -100). Splits: GSM8K train.jsonl's first 90% train, its last 10% is the
validation split (lr selection); test.jsonl's first ``n_test`` problems are the held-out test set
(reported). :func:`finetune` runs one optimizer (warmup 5% then cosine to 10% of the lr, gradient
accumulation over ``micro`` micro-batches, fixed batch order per seed) and returns its curve.

Optimizer builders (:func:`build_optimizer`): ``adamw`` (torch), ``lsp`` (lspo.LSPAdamW, its
defaults except ``subspace``: one-sided, the projected side a dense basis set to the leading singular
directions at each kept refit check), ``lora_r16`` / ``lora_r64`` (peft, all block linears, alpha = 2r,
the base weights frozen, the rest trains), ``galore`` (galore-torch, rank matched to the optimizer
memory of LSPAdamW's square (d, r) layout), ``lsp_sparse`` (``one_sided=False, basis="sparse"``: the
paper's learned sparse square layout, whose state bytes are the one-sided layout's budget),
``lsp_sparse_one_sided`` (``one_sided=True, basis="sparse"``), ``lsp_scale1`` (the defaults at
``scale=1.0``: the paper's update size instead of the SVD basis's default 3.0). The same
model, data and batch order for every optimizer.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

import lspo
from lspo.lsp import PAPER_LAYOUT, matched_galore_rank, square_state_bytes
from lspo.tinygpt import TinyGPT, TinyGPTConfig, batches, evaluate, load_text

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k"
TEXT = ROOT / "examples" / "data" / "tinyshakespeare.txt"
TARGETS = ("qkv", "proj", "fc", "fc_out")


def cache_dir() -> Path:
    d = Path(os.environ.get("LSPO_CACHE", Path.home() / ".cache" / "lspo"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class TinySpec:
    """The tiny model and its pretraining (AdamW on tinyshakespeare)."""
    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    block: int = 256
    pretrain_steps: int = 1500
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-3
    seed: int = 0

    def config(self) -> TinyGPTConfig:
        return TinyGPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block)

    def tag(self) -> str:
        return (f"tinygpt_L{self.n_layer}_E{self.n_embd}_H{self.n_head}_T{self.block}_s{self.pretrain_steps}"
                f"_b{self.pretrain_batch}_lr{self.pretrain_lr:g}_seed{self.seed}")


def pretrained_tinygpt(spec: TinySpec, log: Callable[[str], None] = print) -> Tuple[dict, dict]:
    """``(state_dict, info)`` of TinyGPT pretrained with torch AdamW (warmup + cosine, wd 0.1) on
    tinyshakespeare; computed once and cached (the cache key holds every setting)."""
    path = cache_dir() / (spec.tag() + ".pt")
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        return blob["model"], json.loads(blob["info"])
    torch.manual_seed(spec.seed)
    model = TinyGPT(spec.config())
    train, val = load_text(TEXT)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(spec.pretrain_steps))
    it = batches(train, spec.pretrain_batch, spec.block, seed=spec.seed)
    t0 = time.perf_counter()
    for step in range(1, spec.pretrain_steps + 1):
        x, y = next(it)
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, spec.pretrain_steps // 10) == 0:
            log(f"pretrain {step}/{spec.pretrain_steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    info = {"val_loss": evaluate(model, val, batch_size=8, n_batches=8), "seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters())}
    torch.save({"model": model.state_dict(), "info": json.dumps(info)}, path)
    return model.state_dict(), info


def warmup_cosine(steps: int, warmup_frac: float = 0.05, floor: float = 0.1) -> Callable[[int], float]:
    w = max(1, int(steps * warmup_frac))

    def f(i: int) -> float:  # i = completed steps
        if i < w:
            return (i + 1) / w
        p = min(1.0, (i - w) / max(1, steps - w))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


class ByteSFT:
    """GSM8K as bytes for TinyGPT: fixed-length windows, loss on the response bytes only."""

    def __init__(self, block: int, n_val: int = 256, n_test: int = 256):
        self.block = block
        tr = [json.loads(x) for x in (GSM8K / "train.jsonl").read_text().splitlines() if x.strip()]
        te = [json.loads(x) for x in (GSM8K / "test.jsonl").read_text().splitlines() if x.strip()]
        cut = int(len(tr) * 0.9)
        self.train = [self._encode(r) for r in tr[:cut]]
        self.val = [self._encode(r) for r in tr[cut:cut + n_val]]
        self.test = [self._encode(r) for r in te[:n_test]]

    @staticmethod
    def _encode(rec: dict) -> Tuple[bytes, bytes]:
        return (f"Question: {rec['question']}\nAnswer: ".encode(), (rec["answer"] + "\n").encode())

    def collate(self, items: List[Tuple[bytes, bytes]]) -> Tuple[torch.Tensor, torch.Tensor]:
        T = self.block
        x = torch.zeros(len(items), T, dtype=torch.long)
        y = torch.full((len(items), T), -100, dtype=torch.long)
        for j, (p, r) in enumerate(items):
            p = p[-max(T + 1 - len(r), (T + 1) // 2):]      # a long prompt loses its start
            seq = list(p + r)[:T + 1]
            lab = [-100] * (len(p) - 1) + list(r)           # target t predicts seq[t + 1]
            n = len(seq) - 1
            x[j, :n] = torch.tensor(seq[:n])
            y[j, :n] = torch.tensor(lab[:n])
        return x, y

    def train_batches(self, batch: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            ix = torch.randint(len(self.train), (batch,), generator=g).tolist()
            yield self.collate([self.train[i] for i in ix])

    @torch.no_grad()
    def loss(self, model, split: str, batch: int = 32) -> float:
        """Mean loss per answer byte over the whole split (fixed)."""
        data = self.val if split == "val" else self.test
        was = model.training
        model.eval()
        tot, cnt = 0.0, 0
        for i in range(0, len(data), batch):
            x, y = self.collate(data[i:i + batch])
            logits = model(x)[0]
            tot += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                           y.reshape(-1), ignore_index=-100, reduction="sum"))
            cnt += int((y != -100).sum())
        model.train(was)
        return tot / max(1, cnt)


def state_bytes(opt) -> int:
    """Bytes of optimizer state tensors (not "step", not the host fp32 master copy), unique storages."""
    seen, total = set(), 0
    for st in opt.state.values():
        for k, v in st.items():
            if k in ("step", "master_param"):
                continue
            t = getattr(v, "ortho_matrix", v)  # GaLoreProjector
            if isinstance(t, torch.Tensor) and t.numel() > 1:
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                if key not in seen:
                    seen.add(key)
                    # elements held: an expanded view (a dense basis's shared positions) holds its
                    # non-broadcast dims only
                    held = 1
                    for size, stride in zip(t.shape, t.stride()):
                        held *= size if stride != 0 else 1
                    total += held * t.element_size()
    return total


def _target_shapes(model) -> list:
    return [tuple(getattr(b, name).weight.shape) for b in model.blocks for name in TARGETS]


def lsp_state_bytes(model, d: int, r: int) -> int:
    """LSPAdamW(subspace=d, nnz=r)'s state budget on the projected block linears (the square layout's
    bytes, ``lspo.lsp.square_state_bytes``)."""
    return sum(square_state_bytes(m, n, d, r) for m, n in _target_shapes(model))


def galore_rank_for(model, d: int, r: int) -> int:
    """GaLore rank k whose state (2 moments of the projected gradient + its projector) matches
    :func:`lsp_state_bytes` on the same layers."""
    return matched_galore_rank(_target_shapes(model), d, r)


@dataclass
class FtConfig:
    steps: int = 500
    batch: int = 8            # sequences a step
    micro: int = 4            # micro-batches a step (gradient accumulation)
    weight_decay: float = 0.0
    eval_every: int = 50
    lsp_subspace: int = 128   # d for the 256-wide model (d = n/2, the paper's guidance)
    lsp_kwargs: dict = field(default_factory=dict)
    threads: int = 1


# LSPAdamW runs: its defaults (one-sided, SVD basis) and the paper's learned sparse layouts
LSP_RUNS = {"lsp": {}, "lsp_scale1": {"scale": 1.0}, "lsp_sparse": dict(PAPER_LAYOUT),
            "lsp_sparse_one_sided": {"one_sided": True, "basis": "sparse"}}


def build_optimizer(name: str, model, lr: float, cfg: FtConfig, seed: int):
    kw = dict(lr=lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), foreach=False, **kw), model, {}
    if name in LSP_RUNS:
        d = cfg.lsp_subspace
        extra = LSP_RUNS[name]
        opt = lspo.LSPAdamW(model, subspace=d, min_dim=d, seed=seed, **{**cfg.lsp_kwargs, **extra}, **kw)
        return opt, model, {}
    if name.startswith("lora_r"):
        from peft import LoraConfig, inject_adapter_in_model
        rank = int(name.split("_r")[1])
        lc = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS), bias="none")
        model = inject_adapter_in_model(lc, model)
        for pname, p in model.named_parameters():
            p.requires_grad = "lora_" in pname or not pname.endswith(".base_layer.weight")
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False, **kw), model, {}
    if name == "galore":
        from galore_torch import GaLoreAdamW
        k = galore_rank_for(model, cfg.lsp_subspace, int(cfg.lsp_kwargs.get("nnz", 8)))
        gal = [getattr(b, t).weight for b in model.blocks for t in TARGETS]
        ids = {id(p) for p in gal}
        groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                  {"params": gal, "rank": k, "update_proj_gap": 100, "scale": 1.0, "proj_type": "std"}]
        return GaLoreAdamW(groups, **kw), model, {"galore_rank": k}
    raise ValueError(f"unknown optimizer {name!r}")


def finetune(name: str, lr: float, seed: int, spec: TinySpec, cfg: FtConfig, data: ByteSFT,
             log: Optional[Callable[[str], None]] = None) -> dict:
    """One fine-tuning run from the cached pretrained checkpoint; returns its record."""
    torch.set_num_threads(cfg.threads)
    lspo.set_num_threads(cfg.threads)
    sd, _ = pretrained_tinygpt(spec)
    torch.manual_seed(seed)
    model = TinyGPT(spec.config())
    model.load_state_dict(sd)
    opt, model, extra = build_optimizer(name, model, lr, cfg, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    it = data.train_batches(cfg.batch, seed)
    per = cfg.batch // cfg.micro
    curve = [{"step": 0, "wall_s": 0.0, "val_loss": data.loss(model, "val")}]
    train_s = 0.0
    for step in range(1, cfg.steps + 1):
        x, y = next(it)
        t0 = time.perf_counter()
        for j in range(cfg.micro):
            xs, ys = x[j * per:(j + 1) * per], y[j * per:(j + 1) * per]
            logits = model(xs)[0]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ys.reshape(-1),
                                                     ignore_index=-100, reduction="sum") / max(1, int((y != -100).sum()))
            loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append({"step": step, "wall_s": train_s, "val_loss": data.loss(model, "val")})
            if log:
                log(f"[{name} lr {lr:g} seed {seed}] step {step}: val {curve[-1]['val_loss']:.4f} ({train_s:.0f} s)")
    rec = {"name": name, "lr": lr, "seed": seed, "val_loss": curve[-1]["val_loss"],
           "test_loss": data.loss(model, "test"), "train_s": train_s, "curve": curve,
           "state_bytes": state_bytes(opt),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), **extra}
    if name.startswith("lsp"):
        rec.update(lsp_refit_summary(opt, train_s))
    return rec


def lsp_refit_summary(opt, train_s: float) -> dict:
    """Refit statistics of an LSPAdamW run: checks, fits kept, time, and the learned projectors'
    held-out error next to whitened random projectors of the same d, r on the same gradients."""
    recs = opt.refits
    secs = sum(r.get("seconds", 0.0) for r in recs)
    # out-of-sample: at check k >= 2, the projectors fitted at earlier checks, on this check's held-out
    # gradient sum, next to fresh whitened random projectors on the same sum
    pairs = [(r["heldout_before"], r["random_heldout"]) for r in recs
             if r.get("check", 0) >= 2 and r.get("random_heldout") and r["random_heldout"] > 0]
    ratio = sum(a for a, _ in pairs) / sum(b for _, b in pairs) if pairs else None
    return {"refit_checks": len(recs), "refits_kept": sum(1 for r in recs if r.get("kept")),
            "refits_fitted": sum(1 for r in recs if r.get("fitted")), "refit_s": secs,
            "refit_time_fraction": secs / train_s if train_s > 0 else None,
            "learned_vs_random_heldout_error": ratio,
            "heldout_error_learned_mean": (sum(a for a, _ in pairs) / len(pairs)) if pairs else None,
            "heldout_error_random_mean": (sum(b for _, b in pairs) / len(pairs)) if pairs else None}
