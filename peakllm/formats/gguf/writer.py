"""Write a llama-family model as one .gguf file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Metadata keys (``general.*``, ``llama.*``), tensor names (``token_embd.weight``, ``blk.N.attn_q.weight``,
... from gguf's own ``TensorNameMap``) and the tokenizer (``tokenizer.ggml.*``: the BPE vocabulary with
llama.cpp's token types, the pre-tokenizer named by llama.cpp's hash of a fixed text, merges and special
tokens through gguf's ``SpecialVocab``) follow the converter. Weights given as ``GGMLWeight`` are stored in
their block type; every other 2-D weight in ``float_type``, 1-D tensors (norms) in F32. llama.cpp keeps
q/k rows in its own order for RoPE (the converter's ``LlamaModel.permute``); quantized rows are permuted
as packed bytes, which is exact because ggml blocks never straddle rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np

from peakllm.errors import PeakError
from peakllm.formats.gguf.blocks import GGMLWeight, check_width

FLOAT_TYPES = {"F32": (np.float32, gguf.GGMLQuantizationType.F32), "F16": (np.float16, gguf.GGMLQuantizationType.F16)}
# general.file_type llama-quantize records for a file mostly in a type (its presets' names; *_M for K-quants)
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "IQ4_NL": "MOSTLY_IQ4_NL",
              "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
              "Q6_K": "MOSTLY_Q6_K"}
FILE_TYPES.update({p: f"MOSTLY_{p}" for p in ("Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")})
HEADER_BYTES = 1 << 20  # room for the header beside the vocabulary, for the disk check

# llama.cpp's get_vocab_base_pre: the sha256 of str(tokenizer.encode(CHKTXT)) names the pre-tokenizer.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {  # the families peakllm runs; a tokenizer not listed gets llama.cpp's "default"
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
}


@dataclass
class WrittenTensor:
    """One tensor as the file stores it: its GGUF name, type and bytes."""

    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int


def pre_tokenizer(tokenizer) -> str:
    return PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest(), "default")


def check_model(model) -> None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise PeakError(f"GGUF output is written for llama-family models so far, not {getattr(cfg, 'model_type', cfg)!r}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise PeakError(f"GGUF output does not write RoPE scaling {rope.get('rope_type')!r} yet")


def rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def add_llama_metadata(w: gguf.GGUFWriter, cfg, name: str | None, file_type: str) -> None:
    """The keys LlamaModel.set_gguf_parameters writes (TextModel's, then vocab size and RoPE dimensions)."""
    w.add_type(gguf.GGUFType.MODEL)
    if name:
        w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType[FILE_TYPES[file_type]])
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:  # llama.cpp's default is hidden / heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)


def add_bpe_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """The converter's _set_vocab_gpt2: tokens with their types, the pre-tokenizer, then SpecialVocab
    (merges, special token ids, add_bos/add_eos, chat template) read from the tokenizer's saved files."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        raise PeakError("GGUF output writes byte-level BPE tokenizers so far (SentencePiece ones are not done)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise PeakError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's {vocab_size} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    if isinstance(getattr(tokenizer, "add_prefix_space", None), bool):  # LlamaModel.set_vocab, from its config
        w.add_add_space_prefix(tokenizer.add_prefix_space)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="peakllm-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    if vocab_size == 49152:  # the converter turns BOS off for this vocabulary (granite small, SmolLM)
        w.add_add_bos_token(False)


def llamacpp_row_order(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (the converter's LlamaModel.permute) of a [rows, ...] array."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass
class PlannedTensor:
    """A tensor the file will hold: where it comes from, its GGUF name, type, shape, bytes and row order."""

    hf_name: str
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int
    heads: int = 0  # > 0: q/k rows, stored in llama.cpp's order for this many heads


def plan_tensors(model, types: dict[str, str], float_type: str) -> list[PlannedTensor]:
    """Every tensor of ``model`` the file stores, in the model's parameter order: those named in ``types``
    (HF name -> block type) in that type, other 2-D ones in ``float_type``, 1-D ones in F32. ``model`` may be a
    meta skeleton: only shapes are read."""
    cfg = model.config
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    params = dict(model.named_parameters())
    unknown = sorted(set(types) - set(params))
    if unknown:
        raise PeakError(f"block types given for tensors the model does not have: {', '.join(unknown[:3])}")
    plan = []
    for hf_name, p in params.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reads a missing output.weight as the token embedding
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PeakError(f"no GGUF name for tensor {hf_name!r}")
        shape = tuple(p.shape)
        if hf_name in types:
            if len(shape) != 2:
                raise PeakError(f"{hf_name}: only 2-D weights take a block type, it is {list(shape)}")
            t = check_width(types[hf_name], shape[1])
            type_name, nbytes = t.name, shape[0] * t.row_bytes(shape[1])
        else:
            type_name = "F32" if len(shape) == 1 else float_type
            nbytes = p.numel() * np.dtype(FLOAT_TYPES[type_name][0]).itemsize
        heads = cfg.num_attention_heads if name.startswith("blk.") and ".attn_q." in name else \
            cfg.num_key_value_heads if name.startswith("blk.") and ".attn_k." in name else 0
        plan.append(PlannedTensor(hf_name, name, type_name, shape, nbytes, heads))
    return plan


def stored_array(t: PlannedTensor, value) -> np.ndarray:
    """The bytes (or floats) the file stores for ``value``: a GGMLWeight of ``t``'s type, or a float tensor."""
    if t.type in FLOAT_TYPES:
        if isinstance(value, GGMLWeight) or not hasattr(value, "detach") or tuple(value.shape) != t.shape:
            raise PeakError(f"{t.hf_name}: expected a float tensor {list(t.shape)}, got {type(value).__name__}")
        data = value.detach().float().cpu().numpy().astype(FLOAT_TYPES[t.type][0])
    else:
        if not isinstance(value, GGMLWeight) or value.type != t.type or tuple(value.codes.shape) != t.shape:
            got = f"{value.type} {list(value.codes.shape)}" if isinstance(value, GGMLWeight) else type(value).__name__
            raise PeakError(f"{t.hf_name}: expected {t.type} {list(t.shape)}, got {got}")
        data = value.pack()
    if t.heads:
        data = llamacpp_row_order(data, t.heads)
    return np.ascontiguousarray(data)


class GGUFStreamWriter:
    """A .gguf file written tensor by tensor, in any order, for runs that never hold the whole model.

    The header (metadata, tokenizer, every tensor's name, type and offset) is written on opening, from the
    plan, and the temporary file is sized to the whole file; ``write(hf_name, value)`` then stores each planned
    tensor at its offset, once, in any order (a streamed run has the decoder's layers before the embedding,
    which the file, as llama.cpp's converter writes it, holds first); alignment padding stays zero. ``close()``
    renames the temporary file to ``path``. Used as a context manager, an exception removes the temporary file
    and leaves ``path`` as it was.

    ``tmp``: where the temporary file lives (default: a new name beside ``path``). ``written``: the names a
    killed run already stored in ``tmp``; the file is reopened after checking that its header is the one this
    plan writes, and the run goes on with the tensors left.
    """

    def __init__(self, model, tokenizer, path, types: dict[str, str] | None = None, *, float_type: str = "F16",
                 name: str | None = None, file_type: str | None = None, tmp=None, written=None):
        check_model(model)
        if float_type not in FLOAT_TYPES:
            raise PeakError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
        self.path = Path(path)
        if self.path.suffix != ".gguf":
            raise PeakError(f"a GGUF output path must end in .gguf, got {self.path}")
        self.plan = plan_tensors(model, types or {}, float_type)
        self.by_name = {t.hf_name: t for t in self.plan}
        if file_type is None:
            weights: dict[str, int] = {}
            for t in self.plan:
                if len(t.shape) == 2:
                    weights[t.type] = weights.get(t.type, 0) + t.shape[0] * t.shape[1]
            file_type = max(weights, key=weights.get) if weights else float_type
        if file_type not in FILE_TYPES:
            raise PeakError(f"file_type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")
        size = sum(t.nbytes for t in self.plan) + HEADER_BYTES
        where = Path(tmp).parent if tmp is not None else self.path.parent
        where.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(where).free
        if free < size and written is None:
            raise PeakError(f"{where} has {free / 1e6:.1f} MB free; the GGUF file needs about "
                            f"{size / 1e6:.1f} MB")
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=where)
        os.close(fd)
        self.fd, self.done = None, set()
        try:
            self.w = gguf.GGUFWriter(self.tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
            add_llama_metadata(self.w, model.config, name, file_type)
            add_bpe_tokenizer(self.w, tokenizer, model.config.vocab_size)
            self.w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for t in self.plan:
                raw = FLOAT_TYPES[t.type][1] if t.type in FLOAT_TYPES else gguf.GGMLQuantizationType[t.type]
                dtype = np.dtype(FLOAT_TYPES[t.type][0]) if t.type in FLOAT_TYPES else np.dtype(np.uint8)
                byte_shape = t.shape if t.type in FLOAT_TYPES else (t.shape[0], t.nbytes // t.shape[0])
                self.w.add_tensor_info(t.name, byte_shape, dtype, t.nbytes, raw_dtype=raw)
            self.w.write_header_to_file()
            self.w.write_kv_data_to_file()
            self.w.write_ti_data_to_file()
            self.w.close()
            self._open_data(tmp, written)
        except BaseException:
            self.abort()
            raise

    def _open_data(self, tmp, written) -> None:
        """Each tensor's offset (as gguf's writer lays them out: data aligned after the header, each tensor
        padded to the alignment), then the file sized to hold them all, or a killed run's file taken back."""
        align = self.w.data_alignment
        header_bytes = os.path.getsize(self.tmp)
        self.offsets, offset = {}, gguf.GGUFWriter.ggml_pad(header_bytes, align)
        for t in self.plan:
            self.offsets[t.hf_name] = offset
            offset += gguf.GGUFWriter.ggml_pad(t.nbytes, align)
        self.size = offset
        if written is not None:
            kept = Path(tmp)
            with open(self.tmp, "rb") as a, open(kept, "rb") as b:
                same = a.read() == b.read(header_bytes) and kept.stat().st_size == self.size
            if not same:
                raise PeakError(f"{kept} is not the unfinished GGUF file this run would write (its header or "
                                "size differs); start again with --overwrite")
            unknown = sorted(set(written) - set(self.by_name))
            if unknown:
                raise PeakError(f"{kept}: the checkpoint names tensors this file does not plan: {unknown[0]}")
            os.unlink(self.tmp)
            self.tmp, self.done = str(kept), set(written)
        elif tmp is not None:
            os.replace(self.tmp, tmp)
            self.tmp = str(tmp)
        self.fd = os.open(self.tmp, os.O_RDWR)
        os.ftruncate(self.fd, self.size)

    def write(self, hf_name: str, value) -> WrittenTensor:
        """Store a planned tensor: a ``GGMLWeight`` (block types) or a float tensor, in HF row order."""
        t = self.by_name.get(hf_name)
        if t is None:
            raise PeakError(f"{hf_name}: not a tensor this GGUF file plans")
        if hf_name in self.done:
            raise PeakError(f"{hf_name}: already written")
        buf, pos = memoryview(stored_array(t, value)).cast("B"), self.offsets[hf_name]
        while buf:  # pwrite may store less than asked (2 GiB at most on Linux)
            n = os.pwrite(self.fd, buf, pos)
            buf, pos = buf[n:], pos + n
        self.done.add(hf_name)
        return WrittenTensor(t.name, t.type, t.shape, t.nbytes)

    @property
    def written(self) -> list[WrittenTensor]:
        """The tensors stored so far, in the file's order."""
        return [WrittenTensor(t.name, t.type, t.shape, t.nbytes) for t in self.plan if t.hf_name in self.done]

    def close(self) -> list[WrittenTensor]:
        missing = [t.hf_name for t in self.plan if t.hf_name not in self.done]
        if missing:
            self.abort()
            raise PeakError(f"GGUF file left unfinished: {missing[0]} and {len(missing) - 1} more tensors were "
                            "never written")
        os.close(self.fd)
        self.fd = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # as a file opened for writing gets, not mkstemp's 0600
        os.replace(self.tmp, self.path)
        return self.written

    def abort(self, remove: bool = True) -> None:
        """Close the file; ``remove``: and delete it (a streamed run keeps it for --resume)."""
        w = getattr(self, "w", None)
        if w is not None:
            w.close()
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None
        if remove and os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> "GGUFStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_gguf(model, tokenizer, path, quantized: dict[str, GGMLWeight] | None = None, *, float_type: str = "F16",
               name: str | None = None, file_type: str | None = None) -> list[WrittenTensor]:
    """Write ``model`` (a transformers LlamaForCausalLM) and its ``tokenizer`` to the .gguf file ``path``.

    ``quantized``: HF parameter name (``model.layers.0.self_attn.q_proj.weight``) -> its ``GGMLWeight`` in the
    model's own row order; those tensors are stored in their block types, all other 2-D weights in
    ``float_type`` ("F16" or "F32"), 1-D ones in F32. ``file_type``: the ``general.file_type`` to record (a
    block type name, e.g. "Q4_K"; default: the type holding the most weights). Written to a temporary file
    beside ``path`` and renamed. Returns what was written, tensor by tensor.
    """
    quantized = quantized or {}
    for hf_name, q in quantized.items():
        if not isinstance(q, GGMLWeight):
            raise PeakError(f"{hf_name}: quantized weights must be GGMLWeight, got {type(q).__name__}")
    params = dict(model.named_parameters())
    for hf_name, q in quantized.items():
        if hf_name in params and tuple(q.codes.shape) != tuple(params[hf_name].shape):
            raise PeakError(f"{hf_name}: quantized shape {list(q.codes.shape)} is not the model's "
                            f"{list(params[hf_name].shape)}")
    with GGUFStreamWriter(model, tokenizer, path, {k: q.type for k, q in quantized.items()},
                          float_type=float_type, name=name, file_type=file_type) as out:
        for t in out.plan:
            out.write(t.hf_name, quantized.get(t.hf_name, params[t.hf_name]))
    return out.written
