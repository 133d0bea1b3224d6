"""GGUF files as whole models: config and dequantized weights.

A ``.gguf`` file (llama.cpp's format) carries everything a model folder does:
the hyper-parameters as ``{arch}.*`` metadata keys, the tokenizer as
``tokenizer.ggml.*`` keys (with its chat template), and the tensors, often
block-quantized. This module reads the file and turns the hyper-parameters and
tensors into what the engine uses elsewhere: a ``config.json``-style dict and a
stream of ``(Hugging Face tensor name, float tensor)`` pairs (the tokenizer is
built from the same file by `engine.tokenizer.gguf`). The file is parsed once
and memory-mapped (`engine.model_loader.gguf_reader`); a tensor is read and
dequantized when the weights reach it (F32, F16, BF16, Q4_0, Q4_1 and Q8_0 in
torch, every other type the `gguf` package supports through it: Q5_0, Q5_1,
Q2_K to Q6_K, ...).

Llama-family architectures only (``llama``, which also covers Mistral, and
``qwen2``). llama.cpp's converter reorders the rows of the query and key
projections of ``llama`` models for its rotary layout; they are put back here.
"""

from __future__ import annotations

import functools
import mmap
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.model_loader.gguf_reader import GGUFReader, TensorInfo, dequantize

GGUF_SUFFIX = ".gguf"

# GGUF architecture -> (config.json architectures entry, model_type, q/k rows permuted)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

# {arch}.KEY -> config.json key
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

# config.json keys that must be positive integers (a head count of 0 would divide
# by zero further on)
_POSITIVE_KEYS = {"max_position_embeddings", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "vocab_size"}

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

def find_gguf_file(path: str | Path) -> Path | None:
    """The GGUF file `path` stands for: `path` itself when it is a ``.gguf``
    file, the one ``*.gguf`` in a folder, else None. Raises ValueError naming
    the files when a folder holds several (which one is the model is unclear)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(files) > 1:
        raise ValueError(
            f"{path}: holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); "
            "pass the path of the one to load"
        )
    return files[0] if files else None


class GGUFFile:
    """One opened GGUF file: metadata by key, tensors by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_gguf_header(self.path)  # before the gguf package trusts its lengths
        try:
            self.reader = GGUFReader(self.path)
        except OSError:
            raise
        except ValueError as exc:
            raise ValueError(f"{self.path}: not a readable GGUF file: {exc}") from None
        self.architecture = str(self.get("general.architecture", ""))
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(sorted(_ARCHITECTURES))}"
            )

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """The file at `path`, parsed once: the engine asks for its config, its
        tokenizer and its weights at different moments, and they all share the
        parse (until the file changes)."""
        stat = Path(path).stat()
        return _open_cached(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)

    @staticmethod
    def release_cached() -> None:
        """Drop the parse `open` keeps. Its metadata holds the whole vocabulary
        as Python strings and its memory map the header pages read (together
        ~15 MiB for a 49k-token vocabulary), which nothing needs once the
        tokenizer is built and the weights are read; a later `open` parses again."""
        _open_cached.cache_clear()

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key` (str, number, bool, or a list of them)."""
        return self.reader.fields.get(key, default)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file."""
        return sum(t.nbytes for t in self.reader.tensors)

    # ------------------------------------------------------------------ config

    def hf_config(self) -> dict[str, Any]:
        """The model's hyper-parameters as a ``config.json`` dict."""
        arch = self.architecture
        hf_arch, model_type, _ = _ARCHITECTURES[arch]
        config: dict[str, Any] = {"architectures": [hf_arch], "model_type": model_type}
        for key, name in _CONFIG_KEYS.items():
            value = self.get(f"{arch}.{key}")
            if value is not None:
                config[name] = value
        for needed in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size"):
            if needed not in config:
                raise ValueError(f"{self.path}: metadata key '{arch}.{_key_of(needed)}' is missing")
        for name, value in config.items():
            if name in _POSITIVE_KEYS and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{self.path}: metadata key '{arch}.{_key_of(name)}' must be "
                                 f"an integer >= 1, got {value!r}")
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
        config.setdefault("rms_norm_eps", 1e-5)
        config.setdefault("max_position_embeddings", 2048)
        if "vocab_size" not in config:
            tokens = self.get("tokenizer.ggml.tokens")
            embed = self._tensor("token_embd.weight")
            config["vocab_size"] = len(tokens) if tokens else int(embed.shape[-1])
        if config.get("head_dim") == config["hidden_size"] // config["num_attention_heads"]:
            config.pop("head_dim")
        config["tie_word_embeddings"] = "output.weight" not in self._tensor_names()
        for gguf_key, name in (("bos_token_id", "bos_token_id"),
                               ("eos_token_id", "eos_token_id"),
                               ("padding_token_id", "pad_token_id")):
            value = self.get(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                config[name] = int(value)
        config["gguf_file"] = str(self.path)
        return config

    # ------------------------------------------------------------------ weights

    def _tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}

    def _tensor(self, name: str) -> TensorInfo:
        for t in self.reader.tensors:
            if t.name == name:
                return t
        raise ValueError(f"{self.path}: no tensor {name!r}")

    def weights(self, config: dict[str, Any] | None = None,
                progress: Callable[[int], None] | None = None,
                keep_quantized: Callable[[str], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """``(Hugging Face name, float32 torch tensor)`` for every tensor,
        dequantized as it is reached (nothing is read before); `progress` gets each
        tensor's size in the file. Raises ValueError naming a tensor of an unknown
        name or a type that cannot be dequantized.

        `keep_quantized(type name)` may return a quantization method
        (`engine.quantization.QuantizationMethod`) for a tensor type: 2-D
        tensors of that type then come as the method's `QuantizedTensor`, their
        blocks read from the file as they are (rows in Hugging Face order)."""
        config = config or self.hf_config()
        _, _, permuted = _ARCHITECTURES[self.architecture]
        heads = config["num_attention_heads"]
        kv_heads = config["num_key_value_heads"]
        for tensor in self.reader.tensors:
            hf_name = hf_tensor_name(tensor.name)
            if hf_name is None:
                if tensor.name.startswith("rope_freqs"):
                    continue  # llama.cpp's precomputed rope factors: the engine computes its own
                raise ValueError(f"{self.path}: tensor {tensor.name!r} has no Hugging Face name")
            method = keep_quantized(tensor.type_name) if keep_quantized else None
            shape = tuple(int(d) for d in reversed(tensor.shape))
            if method is not None and len(shape) == 2 and method.supports(shape):
                yield hf_name, method.from_gguf(self._blocks(tensor, shape, heads, kv_heads), shape)
                if progress is not None:
                    progress(tensor.nbytes)
                continue
            try:
                values = dequantize(self.reader, tensor)
            except NotImplementedError:
                raise ValueError(
                    f"{self.path}: tensor {tensor.name!r} has type {tensor.type_name}, "
                    "which cannot be dequantized"
                ) from None
            if permuted and ".attn_q." in tensor.name:
                values = _unpermute_rows(values, heads)
            elif permuted and ".attn_k." in tensor.name:
                values = _unpermute_rows(values, kv_heads)
            if progress is not None:
                progress(tensor.nbytes)
            yield hf_name, values


    def _blocks(self, tensor: Any, shape: tuple[int, ...], heads: int, kv_heads: int) -> Any:
        """A quantized tensor's bytes as uint8 [rows, row bytes], rows unpermuted.
        Read from the file, not copied out of the reader's memory map: mapped
        pages would count in the process's resident memory next to the copy."""
        import torch  # lazy: reading a GGUF file's config stays torch-free

        blocks = torch.from_numpy(np.fromfile(self.path, dtype=np.uint8, count=int(tensor.nbytes),
                                              offset=int(tensor.offset))).reshape(shape[0], -1)
        _, _, permuted = _ARCHITECTURES[self.architecture]
        if permuted and ".attn_q." in tensor.name:
            blocks = _unpermute_rows(blocks, heads).contiguous()
        elif permuted and ".attn_k." in tensor.name:
            blocks = _unpermute_rows(blocks, kv_heads).contiguous()
        return blocks


@functools.lru_cache(maxsize=1)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


# GGUF metadata value types -> size in bytes (8: string, 9: array, sized apart)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_gguf_header(path: Path) -> None:
    """Walk the metadata of a GGUF file and check every length it claims (key
    and string lengths, array counts, the key and tensor counts) against the
    bytes the file has. The gguf package's reader loops over an array's claimed
    count before checking it (a ``token_type`` array claiming 2**62 entries
    would run until memory is gone); this fails at once instead.

    Raises ValueError naming the file and the metadata key."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            return  # too short to hold a header: the reader says so
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                return  # not GGUF: the reader says so
            order = "<" if struct.unpack_from("<I", data, 4)[0] < 65536 else ">"
            _walk_metadata(data, order, size, path)


def _walk_metadata(data: Any, order: str, size: int, path: Path) -> None:
    n_tensors, n_kv = struct.unpack_from(order + "QQ", data, 8)
    offset = 24
    what = "the header"

    def need(count: int, unit: int, claim: str) -> None:
        if count * unit > size - offset:
            raise ValueError(f"{path}: {what} claims {claim} {count}, more than the file's "
                             f"{size} bytes can hold (a corrupt or truncated GGUF file)")

    need(n_kv, 12, "a metadata key count of")  # a key: its length (8) and type (4)
    need(n_tensors, 24, "a tensor count of")
    for _ in range(n_kv):
        need(1, 8, "a key")
        (length,) = struct.unpack_from(order + "Q", data, offset)
        offset += 8
        need(length, 1, "a key length of")
        what = f"metadata key {bytes(data[offset:offset + length]).decode(errors='replace')!r}"
        offset += length
        need(1, 4, "a value type")
        (kind,) = struct.unpack_from(order + "I", data, offset)
        offset += 4
        count = 1
        if kind == _ARRAY:
            need(1, 12, "an array header")
            kind, count = struct.unpack_from(order + "IQ", data, offset)
            offset += 12
        if kind in _SCALAR_SIZES:
            need(count, _SCALAR_SIZES[kind], "an array length of")
            offset += count * _SCALAR_SIZES[kind]
        elif kind == _STRING:
            need(count, 8, "an array length of")
            for _ in range(count):
                (length,) = struct.unpack_from(order + "Q", data, offset)
                offset += 8
                need(length, 1, "a string length of")
                offset += length
        else:
            return  # nested arrays or an unknown type: the reader says what is wrong


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None when unknown."""
    base, dot, kind = gguf_name.rpartition(".")
    if not dot:
        return None
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        hf = _LAYER_TENSORS.get(part)
        return f"model.layers.{layer}.{hf}.{kind}" if hf is not None and layer.isdigit() else None
    hf = _GLOBAL_TENSORS.get(base)
    return f"{hf}.{kind}" if hf is not None else None


def _unpermute_rows(weight: Any, heads: int) -> Any:
    """Undo llama.cpp's per-head row interleaving of a query/key projection."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _key_of(config_key: str) -> str:
    return next(k for k, v in _CONFIG_KEYS.items() if v == config_key)
