"""Fine-tuning data for pretrained causal LMs (Hugging Face tokenizers), with fixed splits and
reproducible batches. Used by ``examples/finetune_lm.py``.

* ``TextData`` -- a plain text file for language modelling. Split fixed as everywhere in lspo
  (``lspo.tinygpt.load_text``): the first 90% of the file's *bytes* train, the last 10% validate.
  Training batches are random windows of ``seq_len`` tokens; validation uses fixed, evenly spaced
  windows of the validation text.
* ``PairData`` -- instruction tuning on ``{"prompt", "response"}`` pairs (or GSM8K's
  ``{"question", "answer"}``): the loss is on the response tokens only (prompt and padding are
  labelled -100). A JSONL file splits into its first 90% of lines (train) and last 10% (validation);
  a directory holding ``train.jsonl`` and ``test.jsonl`` (``examples/data/gsm8k``) uses those.
  Chat models (a tokenizer with a chat template) see the prompt as a user turn and answer as the
  assistant; others see ``prompt + "\\n"``.
* ``gsm8k_accuracy`` -- exact match of the final number (``#### N``) of greedy answers on a fixed
  subset (the first N test problems).

Batches are drawn from a ``torch.Generator`` whose state a checkpoint saves (``state_dict``), so a
resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

VAL_FRACTION = 0.1


def load_pairs(path: Path) -> List[Tuple[str, str]]:
    """``[(prompt, response)]`` from a JSONL file of ``prompt``/``response`` (or ``question``/``answer``)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {i}: expected a JSON object")
            if "prompt" in rec and "response" in rec:
                p, r = rec["prompt"], rec["response"]
            elif "question" in rec and "answer" in rec:
                p, r = rec["question"], rec["answer"]
            else:
                raise ValueError(f"{path}, line {i}: needs keys 'prompt' and 'response' "
                                 f"(or 'question' and 'answer'), has {sorted(rec)}")
            if not isinstance(p, str) or not isinstance(r, str):
                raise ValueError(f"{path}, line {i}: prompt and response must be strings")
            pairs.append((p, r))
    if not pairs:
        raise ValueError(f"{path} holds no records")
    return pairs


class _Base:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self) -> Dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.gen.set_state(sd["gen"])


class TextData(_Base):
    kind = "text"

    def __init__(self, path: Path, tokenizer, seq_len: int, seed: int = 0):
        super().__init__(seed)
        raw = Path(path).read_bytes()
        cut = int(len(raw) * (1.0 - VAL_FRACTION))
        self.train = self._encode(tokenizer, raw[:cut])
        self.val = self._encode(tokenizer, raw[cut:])
        self.seq_len = seq_len
        for name, toks in (("training", self.train), ("validation", self.val)):
            if toks.numel() < seq_len + 1:
                raise ValueError(f"--data {path}: its {name} part has {toks.numel()} tokens, fewer than "
                                 f"--seq-len + 1 = {seq_len + 1}")
        self.prompt = raw[cut:].decode("utf-8", errors="replace")[:200].rsplit("\n", 1)[0] + "\n"

    @staticmethod
    def _encode(tok, b: bytes) -> torch.Tensor:
        ids = tok(b.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def train_batch(self, batch_size: int) -> Dict[str, torch.Tensor]:
        hi = self.train.numel() - self.seq_len
        ix = torch.randint(hi, (batch_size,), generator=self.gen)
        x = torch.stack([self.train[i:i + self.seq_len] for i in ix.tolist()])
        return {"input_ids": x, "labels": x.clone()}  # the model shifts labels by one

    def val_batches(self, batch_size: int, n_windows: int):
        n = max(1, min(n_windows, self.val.numel() // self.seq_len))
        starts = torch.linspace(0, self.val.numel() - self.seq_len, n).long().tolist()
        for i in range(0, n, batch_size):
            x = torch.stack([self.val[s:s + self.seq_len] for s in starts[i:i + batch_size]])
            yield {"input_ids": x, "labels": x.clone()}


class PairData(_Base):
    kind = "pairs"

    def __init__(self, path: Path, tokenizer, seq_len: int, seed: int = 0):
        super().__init__(seed)
        path = Path(path)
        if path.is_dir():
            tr, te = path / "train.jsonl", path / "test.jsonl"
            if not (tr.is_file() and te.is_file()):
                raise ValueError(f"--data {path}: a data directory needs train.jsonl and test.jsonl")
            self.train_pairs, self.val_pairs = load_pairs(tr), load_pairs(te)
        else:
            pairs = load_pairs(path)
            if len(pairs) < 2:
                raise ValueError(f"--data {path}: needs at least 2 records (train and validation)")
            cut = min(len(pairs) - 1, max(1, int(len(pairs) * (1.0 - VAL_FRACTION))))
            self.train_pairs, self.val_pairs = pairs[:cut], pairs[cut:]
        self.tok = tokenizer
        self.seq_len = seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.is_gsm8k = all("####" in r for _, r in self.val_pairs[:20])
        self.prompt = self.format_prompt(self.val_pairs[0][0])
        self._cache: Dict[Tuple[int, int], Tuple[List[int], List[int]]] = {}

    def format_prompt(self, prompt: str) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        return prompt + "\n"

    def _encode(self, split: int, i: int) -> Tuple[List[int], List[int]]:
        key = (split, i)
        if key not in self._cache:
            p, r = (self.train_pairs if split == 0 else self.val_pairs)[i]
            pi = self.tok(self.format_prompt(p), add_special_tokens=False)["input_ids"]
            ri = self.tok(r, add_special_tokens=False)["input_ids"]
            if self.tok.eos_token_id is not None:
                ri = ri + [self.tok.eos_token_id]
            self._cache[key] = (pi, ri)
        return self._cache[key]

    def _collate(self, items: List[Tuple[List[int], List[int]]]) -> Dict[str, torch.Tensor]:
        seqs, labs = [], []
        for pi, ri in items:
            # too long: cut the prompt's start so that at least half the window is response
            pi = pi[-max(self.seq_len - len(ri), self.seq_len // 2):]
            ids = (pi + ri)[:self.seq_len]
            lab = ([-100] * len(pi) + ri)[:self.seq_len]
            seqs.append(ids)
            labs.append(lab)
        t = max(len(s) for s in seqs)
        x = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        y = torch.full((len(seqs), t), -100, dtype=torch.long)
        m = torch.zeros((len(seqs), t), dtype=torch.long)
        for j, (s, lab) in enumerate(zip(seqs, labs)):
            x[j, :len(s)] = torch.tensor(s)
            y[j, :len(lab)] = torch.tensor(lab)
            m[j, :len(s)] = 1
        return {"input_ids": x, "labels": y, "attention_mask": m}

    def train_batch(self, batch_size: int) -> Dict[str, torch.Tensor]:
        ix = torch.randint(len(self.train_pairs), (batch_size,), generator=self.gen).tolist()
        return self._collate([self._encode(0, i) for i in ix])

    def val_batches(self, batch_size: int, n_examples: int):
        n = min(n_examples, len(self.val_pairs))
        for i in range(0, n, batch_size):
            yield self._collate([self._encode(1, j) for j in range(i, min(n, i + batch_size))])


def load_data(path: Path, tokenizer, seq_len: int, seed: int = 0):
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--data {path} does not exist")
    if path.is_dir() or path.suffix in (".jsonl", ".json"):
        return PairData(path, tokenizer, seq_len, seed)
    return TextData(path, tokenizer, seq_len, seed)


def _move(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, data, batch_size: int, n: int, device, autocast=None) -> Tuple[float, int]:
    """``(mean loss per predicted token, number of tokens)`` on the fixed validation batches."""
    was = model.training
    model.eval()
    tot, cnt = 0.0, 0
    for b in data.val_batches(batch_size, n):
        b = _move(b, device)
        with autocast() if autocast else _null():
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False).logits
        lab = b["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               lab.reshape(-1), ignore_index=-100, reduction="sum")
        tot += float(lp)
        cnt += int((lab != -100).sum())
    model.train(was)
    return tot / max(cnt, 1), cnt


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> Optional[str]:
    """The answer of a GSM8K-style solution: the number after ``####``, else the last number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    nums = _NUM.findall(tail)
    if not nums:
        return None
    n = (nums[0] if "####" in text else nums[-1]).replace(",", "")
    try:
        v = float(n)
    except ValueError:
        return None
    return str(int(v)) if math.isfinite(v) and v == int(v) else str(v)


@torch.no_grad()
def gsm8k_accuracy(model, data: PairData, n: int, device, max_new_tokens: int = 256, batch_size: int = 8):
    """``(exact-match accuracy, n, first generated answer)`` on the first ``n`` validation problems,
    greedy decoding with left padding."""
    tok = data.tok
    was = model.training
    model.eval()
    pairs = data.val_pairs[:n]
    correct, first = 0, None
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            enc = tok([data.format_prompt(p) for p, _ in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            enc = _move(dict(enc), device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=data.pad_id)
            for (p, r), o in zip(chunk, out):
                text = tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True)
                if first is None:
                    first = text
                got, want = final_number(text), final_number(r)
                correct += int(got is not None and got == want)
    finally:
        tok.padding_side = old_side
        model.train(was)
    return correct / max(len(pairs), 1), len(pairs), first
