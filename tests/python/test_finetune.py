"""examples/finetune_lm.py and its loaders (lspo.hf) and data (lspo.lmdata), on tiny randomly
initialised models of the real architectures written by the tests themselves: Hugging Face
checkpoints (safetensors) and GGUF files (the gguf package's writer, llama.cpp's conventions)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("peft")

import lspo  # noqa: E402
from lspo import hf, lmdata  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "finetune_lm.py"
_spec = importlib.util.spec_from_file_location("finetune_lm", SCRIPT)
ft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ft)

OPTIMIZERS = list(ft.OPTIMIZERS)
EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------- fixtures
def _byte_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    b2u = bytes_to_unicode()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġ", "a")]
    toks = [b2u[i] for i in range(256)] + ["".join(m) for m in merges] + [EOS]
    return toks, merges


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    toks, merges = _byte_vocab()
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def _config(family, vocab, hidden=64):
    common = dict(vocab_size=vocab, tie_word_embeddings=True, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=2, n_head=4, n_positions=512, **common)
    return AutoConfig.for_model(family, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)


def write_checkpoint(path: Path, family="llama", seed=0):
    tok = _tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok)))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model, tok


def write_gguf(path: Path, model, arch="llama", qtypes=None):
    """``model`` (a transformers llama/qwen2) as a GGUF file the way llama.cpp's converter writes it:
    llama's q/k rows permuted, tensors named blk.N.*, tokenizer as gpt2 metadata. ``qtypes`` maps a
    GGUF tensor-name fragment to a quantization type (default F32 everywhere)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    toks, merges = _byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(toks)
    w.add_token_types([1] * (len(toks) - 1) + [3])
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_bos_token_id(len(toks) - 1)
    w.add_eos_token_id(len(toks) - 1)
    inv = {v: k for k, v in hf._GGUF_BLOCK_NAMES.items()}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        parts = name.split(".")
        if parts[0] == "model" and parts[1] == "layers":
            gname = f"blk.{parts[2]}.{inv['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            gname = {v: k for k, v in hf._GGUF_TOP_NAMES.items()}[".".join(parts[:-1])] + "." + parts[-1]
        a = t.detach().float().numpy()
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            a = hf.permute_rotary(a, c.num_attention_heads if ".attn_q." in gname else c.num_key_value_heads)
        qt = next((q for frag, q in (qtypes or {}).items() if frag in gname and a.ndim == 2), None)
        if qt is None:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "shakespeare_head.txt"
    p.write_bytes((ROOT / "examples" / "data" / "tinyshakespeare.txt").read_bytes()[:30000])
    return p


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    write_checkpoint(d, "llama")
    return d


def _run(tmp_path, model_dir, data, *extra):
    argv = ["--model", str(model_dir), "--data", str(data), "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
            "--warmup", "1", "--eval-windows", "8", "--sample-tokens", "4", "--eval-examples", "2", "--quiet",
            "--device", "cpu", "--amp", "off",
            "--threads", "1",  # tiny ops on a busy machine
            "--subspace", "16", "--nnz", "4", *extra]  # lsp: d=16 projects the 64x64 and 64x128 weights
    return ft.main(argv)


def _tensors(d: Path):
    return load_file(str(d / "model.safetensors"))


# ----------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_checkpoint_loader_roundtrip(tmp_path, family):
    model, tok = write_checkpoint(tmp_path, family)
    m2, t2 = hf.load_causal_lm(tmp_path)
    ref = model.state_dict()
    got = m2.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert t2("to be or not").input_ids == tok("to be or not").input_ids
    x = torch.randint(0, len(tok), (2, 9))
    model.eval()
    assert torch.equal(model(x).logits, m2(x).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_loader_f32_exact(tmp_path, arch):
    """An all-F32 GGUF file gives back the model bitwise: names, the un-permuted q/k rows (llama),
    biases (qwen2), tied embeddings; the logits are identical."""
    model, tok = write_checkpoint(tmp_path / "hf", arch)
    f = tmp_path / "tiny.gguf"
    write_gguf(f, model, arch)
    m2, t2 = hf.load_causal_lm(f)
    assert type(m2).__name__ == type(model).__name__
    ref, got = model.state_dict(), m2.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    x = torch.randint(0, len(tok), (2, 11))
    model.eval()
    assert torch.equal(model(x).logits, m2(x).logits)
    assert t2("the theme").input_ids == tok("the theme").input_ids


def test_gguf_loader_quantized_matches_transformers(tmp_path):
    """Q4_1 / Q8_0 tensors (the default model's types) dequantize to exactly what gguf's reference
    quantize->dequantize gives, and lspo's loader agrees bitwise with transformers' GGUF loader."""
    model, _ = write_checkpoint(tmp_path / "hf", "llama")
    f = tmp_path / "q.gguf"
    q41, q80 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    write_gguf(f, model, "llama", {"ffn_": q41, "attn_q": q41, "attn_output": q41, "token_embd": q80})
    m2, _ = hf.load_gguf(f, with_tokenizer=False)
    ref, got = model.state_dict(), m2.state_dict()
    up = ref["model.layers.1.mlp.up_proj.weight"].numpy()
    want = gguf.quants.dequantize(gguf.quants.quantize(up, q41), q41)
    assert np.array_equal(got["model.layers.1.mlp.up_proj.weight"].numpy(), want)
    w0 = ref["model.layers.0.mlp.up_proj.weight"]
    err = (got["model.layers.0.mlp.up_proj.weight"] - w0).abs().max()
    # Q4_1: 16 levels between each 32-block's min and max, so at most half a step (+ fp16 rounding of the scale)
    assert 0 < err <= 0.55 * (w0.max() - w0.min()) / 15
    assert torch.equal(got["model.layers.0.self_attn.v_proj.weight"], ref["model.layers.0.self_attn.v_proj.weight"])
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name, dtype=torch.float32).state_dict()
    for k in got:
        assert torch.equal(got[k], theirs[k]), k


def test_gguf_bad_files(tmp_path):
    model, _ = write_checkpoint(tmp_path / "hf", "llama")
    good = tmp_path / "good.gguf"
    write_gguf(good, model)
    with pytest.raises(ValueError, match="does not exist"):
        hf.load_causal_lm(tmp_path / "missing.gguf")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="trunc.gguf"):
        hf.load_causal_lm(trunc)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        hf.load_causal_lm(junk)
    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), "bert")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'bert' is not supported"):
        hf.load_causal_lm(other)


def test_checkpoint_bad_paths(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="does not exist"):
        hf.load_causal_lm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        hf.load_causal_lm(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_llama.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = bad / "model.safetensors"
    full = st.read_bytes()
    st.write_bytes(full[: len(full) - 100])
    with pytest.raises(ValueError, match="truncated"):
        hf.load_causal_lm(bad)
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + full[100:])
    with pytest.raises(ValueError, match="corrupt"):
        hf.load_causal_lm(bad)
    st.write_bytes(full)
    (bad / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        hf.load_causal_lm(bad)
    (bad / "config.json").write_text((tiny_llama / "config.json").read_text())
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="tokenizer"):
        hf.load_causal_lm(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        hf.load_causal_lm(bad)


# ----------------------------------------------------------------------------- data
def test_pair_data_masks_the_prompt(tmp_path):
    tok = _tokenizer()
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"q{i}?", "response": f"answer {i}"}) for i in range(20)) + "\n")
    d = lmdata.load_data(f, tok, seq_len=64)
    assert (len(d.train_pairs), len(d.val_pairs)) == (18, 2)  # first 90% of lines train
    b = d.train_batch(3)
    for ids, lab, m in zip(b["input_ids"], b["labels"], b["attention_mask"]):
        n_prompt = len(tok(d.format_prompt("q0?"), add_special_tokens=False).input_ids)  # all prompts 4 tokens
        assert (lab[:n_prompt] == -100).all()
        resp = lab[lab != -100].tolist()
        assert tok.decode(resp).startswith("answer ") and resp[-1] == tok.eos_token_id
        assert (lab[m == 0] == -100).all()
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 1: needs keys"):
        lmdata.load_data(f, tok, 64)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        lmdata.load_data(f, tok, 64)


def test_final_number():
    assert lmdata.final_number("so 3+4=<<3+4=7>>7\n#### 1,234") == "1234"
    assert lmdata.final_number("The answer is 18.") == "18"
    assert lmdata.final_number("it is 2.50 then 3.0") == "3"
    assert lmdata.final_number("no digits") is None


def test_text_split_is_fixed(text_file):
    d = lmdata.load_data(text_file, _tokenizer(), seq_len=32)
    raw = text_file.read_bytes()
    cut = int(len(raw) * 0.9)
    assert _tokenizer().decode(d.val.tolist()) == raw[cut:].decode()
    a = [b["input_ids"] for b in d.val_batches(4, 8)]
    assert all(torch.equal(x, y) for x, y in zip(a, [b["input_ids"] for b in d.val_batches(4, 8)]))


# ----------------------------------------------------------------------------- the script
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_finetune_smoke_loss_falls(tmp_path, tiny_llama, text_file, opt):
    lr = "3e-2" if opt == "lora" else "3e-3"
    s = _run(tmp_path, tiny_llama, text_file, "--optimizer", opt, "--steps", "20", "--lr", lr,
             "--save", str(tmp_path / "ck"))
    # from ~ln(260) = 5.56 nats: full fine-tuning reaches ~3.6 in 20 steps; LoRA, with the random
    # embeddings and head frozen, only ~5.3 (measured), so it gets a smaller bar
    drop = 0.1 if opt == "lora" else 1.0
    assert (s["projected_matrices"] > 0) == (opt == "lsp")
    if opt == "galore":  # the 64 x 64 and 64 x 128 weights of the 2 blocks at --subspace 16, rank matched
        assert s["galore_matrices"] == 14 and s["galore_rank"] >= 1
    if opt == "lsp":  # random projectors are far from the gradients: step 1 refits them
        assert s["projector_refits"] > 0
    first, last = np.mean(s["train_losses"][:3]), np.mean(s["train_losses"][-3:])
    assert last < first - drop, s["train_losses"]
    assert s["val_loss_after"] < s["val_loss_before"] - drop
    assert math.isclose(s["val_ppl_after"], math.exp(s["val_loss_after"]))
    # the checkpoint is a plain transformers model directory
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"))
    out = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_resume_is_bit_exact(tmp_path, tiny_llama, text_file, opt):
    common = ("--optimizer", opt, "--steps", "6", "--sample-tokens", "0", "--eval-windows", "4")
    _run(tmp_path, tiny_llama, text_file, *common, "--stop-after", "3", "--save", str(tmp_path / "a"))
    b = _run(tmp_path, tiny_llama, text_file, "--resume", str(tmp_path / "a"), "--sample-tokens", "0",
             "--eval-windows", "4", "--save", str(tmp_path / "b"))
    c = _run(tmp_path, tiny_llama, text_file, *common, "--save", str(tmp_path / "c"))
    assert b["step"] == c["step"] == 6
    assert b["train_losses"] == c["train_losses"][3:]
    tb, tc = _tensors(tmp_path / "b"), _tensors(tmp_path / "c")
    assert set(tb) == set(tc)
    for k in tb:
        assert torch.equal(tb[k], tc[k]), k
    sb = torch.load(tmp_path / "b" / "trainer_state.pt", weights_only=False)
    sc = torch.load(tmp_path / "c" / "trainer_state.pt", weights_only=False)
    assert sb["history"] == sc["history"]
    for i, st in sc["optimizer"]["state"].items():
        for k, v in st.items():
            w = sb["optimizer"]["state"][i][k]
            if k == "projector":  # GaLore's projector object: its basis
                v, w = v.ortho_matrix, w.ortho_matrix
            assert torch.equal(w, v) if torch.is_tensor(v) else w == v, (i, k)
    ta = _tensors(tmp_path / "a")
    assert any(not torch.equal(ta[k], tb[k]) for k in tb)  # steps 4..6 did change the model


@pytest.mark.parametrize("opt", ["lsp", "adamw"])
def test_grad_accum_and_bf16_autocast(tmp_path, tiny_llama, text_file, opt):
    """The demo's path: bf16 autocast (fp32 weights); with accumulation over 2 micro-batches (LSPAdamW
    accumulates the compressed gradients), and resuming stays bit-exact under both."""
    common = ("--optimizer", opt, "--steps", "10", "--grad-accum", "2", "--batch-size", "2", "--amp", "bf16",
              "--sample-tokens", "0")
    s = _run(tmp_path, tiny_llama, text_file, *common, "--save", str(tmp_path / "c"))
    assert s["val_loss_after"] < s["val_loss_before"] - 0.5
    assert all(p.dtype == torch.float32 for p in load_file(str(tmp_path / "c" / "model.safetensors")).values())
    _run(tmp_path, tiny_llama, text_file, *common, "--stop-after", "4", "--save", str(tmp_path / "a"))
    b = _run(tmp_path, tiny_llama, text_file, *common, "--resume", str(tmp_path / "a"), "--save", str(tmp_path / "b"))
    assert b["train_losses"] == s["train_losses"][4:]
    tb, tc = _tensors(tmp_path / "b"), _tensors(tmp_path / "c")
    assert all(torch.equal(tb[k], tc[k]) for k in tc)


def test_gsm8k_style_pairs_and_trace(tmp_path, tiny_llama):
    d = tmp_path / "gsm"
    d.mkdir()
    src = ROOT / "examples" / "data" / "gsm8k"
    for name in ("train.jsonl", "test.jsonl"):
        (d / name).write_text("".join((src / name).read_text().splitlines(True)[:16]))
    trace = tmp_path / "t.json"
    s = _run(tmp_path, tiny_llama, d, "--optimizer", "offload", "--steps", "3", "--seq-len", "64", "--answer-tokens", "16",
             "--trace", str(trace), "--json", str(tmp_path / "s.json"))
    assert 0.0 <= s["gsm8k_acc_before"] <= 1.0 and "gsm8k_acc_after" in s
    assert math.isfinite(s["val_loss_after"])
    events = json.loads(trace.read_text())
    assert len(events["traceEvents"] if isinstance(events, dict) else events) > 0
    assert json.loads((tmp_path / "s.json").read_text())["step"] == 3


def test_cli_errors(tmp_path, tiny_llama, text_file):
    with pytest.raises(ValueError, match="--data .*does not exist"):
        _run(tmp_path, tiny_llama, tmp_path / "none.txt", "--steps", "1")
    with pytest.raises(ValueError, match="--trace .*needs --optimizer offload or lsp"):
        _run(tmp_path, tiny_llama, text_file, "--optimizer", "adamw", "--trace", "x.json")
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        _run(tmp_path, tiny_llama, text_file, "--steps", "0")
    with pytest.raises(ValueError, match="no trainer_state.pt"):
        _run(tmp_path, tiny_llama, text_file, "--resume", str(tiny_llama))
    _run(tmp_path, tiny_llama, text_file, "--optimizer", "adamw", "--steps", "1", "--sample-tokens", "0",
         "--eval-windows", "1", "--save", str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="--optimizer offload differs from the checkpoint's adamw"):
        _run(tmp_path, tiny_llama, text_file, "--resume", str(tmp_path / "ck"), "--optimizer", "offload")
    # as a program: a clear message and exit status 2
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "missing"), "--data", str(text_file)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "error: model path" in r.stderr and "missing does not exist" in r.stderr


def test_run_flags_of_a_checkpoint_from_before_the_layout_flags():
    # a new run gets LSPAdamW's default layout; a checkpoint saved before --lsp-basis/--one-sided
    # existed resumes with the layout it trained with (sparse, two-sided); a newer one with its own
    new = ft.resolve(ft.parse_args([]), None)
    assert (new.lsp_basis, new.one_sided) == ("svd", True)
    old = {k: v for k, v in vars(new).items() if k in ft.RUN_FLAGS and k not in ("lsp_basis", "one_sided")}
    legacy = ft.resolve(ft.parse_args([]), old)
    assert (legacy.lsp_basis, legacy.one_sided) == ("sparse", False)
    kept = ft.resolve(ft.parse_args([]), dict(old, lsp_basis="svd", one_sided=False))
    assert (kept.lsp_basis, kept.one_sided) == ("svd", False)
    with pytest.raises(ValueError, match="--one-sided True differs from the checkpoint's False"):
        ft.resolve(ft.parse_args(["--one-sided"]), old)
    assert ft.resolve(ft.parse_args(["--two-sided", "--lsp-basis", "sparse"]), old).one_sided is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_finetune_cuda(tmp_path, tiny_llama, text_file, opt):
    s = ft.main(["--model", str(tiny_llama), "--data", str(text_file), "--device", "cuda", "--optimizer", opt,
                 "--batch-size", "4", "--seq-len", "32", "--lr", "3e-2" if opt == "lora" else "3e-3",
                 "--warmup", "1", "--quiet", "--sample-tokens", "4", "--eval-windows", "8", "--steps", "20"])
    assert s["val_loss_after"] < s["val_loss_before"] - (0.1 if opt == "lora" else 1.0)


# ----------------------------------------------------------------------------- tiers (LoHan)
@pytest.mark.parametrize("opt", ["offload", "lsp"])
def test_tier_flags_keep_the_run(tmp_path, tiny_llama, text_file, opt):
    """--host-memory below the optimizer state puts it in --state-dir; --device-memory below weights +
    gradients streams the layers' weights (and lets the planner swap/recompute activations): the
    losses and the final weights are those of the plain run."""
    from lspo import planner, tiers
    common = ("--optimizer", opt, "--steps", "3", "--sample-tokens", "0", "--eval-windows", "2",
              "--eval-examples", "0")
    a = _run(tmp_path, tiny_llama, text_file, *common, "--save", str(tmp_path / "a"))
    n = a["params"]
    W = 4 * n  # fp32 weights
    b = _run(tmp_path, tiny_llama, text_file, *common, "--host-memory", str(2 * W + planner.SLACK + 6 * n),
             "--state-dir", str(tmp_path / "st"), "--save", str(tmp_path / "b"))
    assert b["tier_plan"]["state_disk_bytes"] > 0 and b["engine_stats"]["disk_slots"] > 0
    assert (tmp_path / "st" / "MANIFEST").exists()
    # just below weights + gradients + all activations: the planner streams the weights
    model, _ = hf.load_causal_lm(tiny_llama)
    ids = torch.zeros((4, 32), dtype=torch.long)
    A = sum(p.activation_bytes for p in tiers.profile_layers(planner.decoder_layers(model),
                                                              lambda: model(input_ids=ids, use_cache=False).logits))
    c = _run(tmp_path, tiny_llama, text_file, *common, "--device-memory", str(2 * W + A - 1),
             "--save", str(tmp_path / "c"))
    assert not c["tier_plan"]["params_on_device"]
    assert c["tier_runner"]["peak_param_bytes"] < W
    for s in (b, c):
        assert s["train_losses"] == a["train_losses"]
    ta = _tensors(tmp_path / "a")
    for d in ("b", "c"):
        t = _tensors(tmp_path / d)
        assert all(torch.equal(ta[k], t[k]) for k in ta), d
    with pytest.raises(ValueError, match="does not fit"):
        _run(tmp_path, tiny_llama, text_file, *common, "--host-memory", str(2 * W))
