"""A small GPT-style causal transformer and character-level data, in plain PyTorch.

Used by lspo's tests, benchmarks and examples whenever they need a *real* small language model
trained on real text (tinyshakespeare, bytes as tokens) without downloading anything. Not a
production model: pre-norm blocks, learned positions, GELU MLP, causal self-attention through
``torch.nn.functional.scaled_dot_product_attention``, lm_head tied to the token embedding.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class TinyGPTConfig:
    vocab_size: int = 256      # bytes as tokens
    block_size: int = 128      # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.0


class _Block(nn.Module):
    def __init__(self, c: TinyGPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln1 = nn.LayerNorm(c.n_embd)
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        self.ln2 = nn.LayerNorm(c.n_embd)
        self.fc = nn.Linear(c.n_embd, c.mlp_ratio * c.n_embd)
        self.fc_out = nn.Linear(c.mlp_ratio * c.n_embd, c.n_embd)
        self.dropout = c.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(e, dim=2)
        q, k, v = (z.view(b, t, self.n_head, e // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, e))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """``TinyGPT(TinyGPTConfig(...))``; ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, config: TinyGPTConfig = TinyGPTConfig()):
        super().__init__()
        self.config = c = config
        self.tok = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok.weight  # tied
        self.apply(self._init)
        for b in self.blocks:  # GPT-2's scaled init of the residual projections
            for lin in (b.proj, b.fc_out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"TinyGPT: sequence length {t} exceeds block_size {self.config.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, loss


def load_text(path: str | Path, val_fraction: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bytes of a text file as uint8 tokens, split into (train, val): the first ``1 - val_fraction``
    of the file trains, the rest validates (a fixed, documented split)."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    if data.numel() < 1000:
        raise ValueError(f"load_text: {path} has only {data.numel()} bytes")
    cut = int(data.numel() * (1.0 - val_fraction))
    return data[:cut].clone(), data[cut:].clone()


def batches(data: torch.Tensor, batch_size: int, block_size: int, seed: int = 0,
            device: str | torch.device = "cpu") -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless random (input, target) windows of ``block_size`` tokens, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    hi = data.numel() - block_size - 1
    while True:
        ix = torch.randint(hi, (batch_size,), generator=g)
        x = torch.stack([data[i:i + block_size] for i in ix.tolist()]).long()
        y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix.tolist()]).long()
        yield x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, batch_size: int = 16, n_batches: int = 8,
             seed: int = 1234) -> float:
    """Mean loss over ``n_batches`` fixed random windows of ``data`` (same windows every call)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    it = batches(data, batch_size, model.config.block_size, seed=seed, device=dev)
    tot = 0.0
    for _ in range(n_batches):
        x, y = next(it)
        tot += float(model(x, y)[1])
    model.train(was)
    return tot / n_batches
