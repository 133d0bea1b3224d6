"""GGUF files as whole models: config, tokenizer and dequantized weights.

A ``.gguf`` file (llama.cpp's format) carries everything a model folder does:
the hyper-parameters as ``{arch}.*`` metadata keys, the tokenizer as
``tokenizer.ggml.*`` keys (with its chat template), and the tensors, often
block-quantized. This module turns each into what the engine uses elsewhere:
a ``config.json``-style dict, an `engine.tokenizer.Tokenizer`, and a stream of
``(Hugging Face tensor name, float tensor)`` pairs. Dequantization is the
`gguf` package's (every type it supports: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q2_K to Q6_K, ...).

Llama-family architectures only (``llama``, which also covers Mistral, and
``qwen2``). llama.cpp's converter reorders the rows of the query and key
projections of ``llama`` models for its rotary layout; they are put back here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


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
        try:
            from gguf import GGUFReader
        except ImportError as exc:  # a dependency, but say so plainly if it is missing
            raise ImportError(
                f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)"
            ) from exc
        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as exc:
            raise ValueError(f"{self.path}: not a readable GGUF file: {exc}") from None
        self.architecture = str(self.get("general.architecture", ""))
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(sorted(_ARCHITECTURES))}"
            )

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key` (str, number, bool, or a list of them)."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

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

    def _tensor(self, name: str) -> Any:
        for t in self.reader.tensors:
            if t.name == name:
                return t
        raise ValueError(f"{self.path}: no tensor {name!r}")

    def weights(self, config: dict[str, Any] | None = None,
                keep_quantized: Callable[[str], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """``(Hugging Face name, float32 torch tensor)`` for every tensor,
        dequantized; raises ValueError naming a tensor of an unknown name or a
        type that cannot be dequantized.

        `keep_quantized(type name)` may return a quantization method
        (`engine.quantization.QuantizationMethod`) for a tensor type: 2-D
        tensors of that type then come as the method's `QuantizedTensor`, their
        blocks copied out of the file as they are (rows in Hugging Face order)."""
        import numpy as np
        import torch
        from gguf import dequantize

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
            # GGUF lists dimensions fastest first: reverse them for row-major
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            method = keep_quantized(tensor.tensor_type.name) if keep_quantized else None
            if method is not None and len(shape) == 2 and method.supports(shape):
                blocks = np.array(tensor.data, dtype=np.uint8).reshape(shape[0], -1)  # a copy
                if permuted and ".attn_q." in tensor.name:
                    blocks = _unpermute_rows(blocks, heads)
                elif permuted and ".attn_k." in tensor.name:
                    blocks = _unpermute_rows(blocks, kv_heads)
                yield hf_name, method.from_gguf(torch.from_numpy(np.ascontiguousarray(blocks)), shape)
                continue
            try:
                values = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError:
                raise ValueError(
                    f"{self.path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                    "which the gguf package cannot dequantize"
                ) from None
            values = np.array(values, dtype=np.float32).reshape(shape)  # a writable copy
            if permuted and ".attn_q." in tensor.name:
                values = _unpermute_rows(values, heads)
            elif permuted and ".attn_k." in tensor.name:
                values = _unpermute_rows(values, kv_heads)
            yield hf_name, torch.from_numpy(values)

    # ------------------------------------------------------------------ tokenizer

    def tokenizer(self) -> Any:
        """The file's tokenizer as an `engine.tokenizer.Tokenizer`, with the chat
        template, special tokens and BOS setting the file records."""
        from engine.tokenizer import Tokenizer

        kind = self.get("tokenizer.ggml.model")
        tokens = self.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError(f"{self.path}: no tokenizer (tokenizer.ggml.tokens is missing)")
        types = self.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = self._byte_level_bpe(tokens, types)
        elif kind == "llama":
            backend = self._sentencepiece_bpe(tokens, types)
        else:
            raise ValueError(
                f"{self.path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
            )

        def text(key: str) -> str | None:
            value = self.get(f"tokenizer.ggml.{key}")
            return tokens[int(value)] if value is not None and 0 <= int(value) < len(tokens) else None

        special = {"bos": text("bos_token_id"), "eos": text("eos_token_id"),
                   "pad": text("padding_token_id"), "unk": text("unknown_token_id")}
        template = self.get("tokenizer.chat_template")
        return Tokenizer(
            backend,
            special_tokens=special,
            add_bos_token=self.get("tokenizer.ggml.add_bos_token"),
            add_eos_token=self.get("tokenizer.ggml.add_eos_token"),
            chat_template=template if isinstance(template, str) else None,
            model_max_length=self.get(f"{self.architecture}.context_length"),
            name_or_path=str(self.path),
        )

    def _byte_level_bpe(self, tokens: list[str], types: list[int]) -> Any:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        merges = [tuple(m.split(" ", 1)) for m in self.get("tokenizer.ggml.merges") or []]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        split = _PRE_TOKENIZER_SPLITS.get(str(self.get("tokenizer.ggml.pre", "")))
        if split is None:  # GPT-2's own split, inside ByteLevel
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:  # the split the vocabulary's merges were learned with
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        backend.decoder = decoders.ByteLevel()
        _add_special_tokens(backend, tokens, types, AddedToken)
        return backend

    def _sentencepiece_bpe(self, tokens: list[str], types: list[int]) -> Any:
        """A SentencePiece BPE vocabulary (``▁`` for spaces, ``<0xNN>`` byte
        fallback). Without merges in the file, every split of a piece into two
        pieces is a merge, ranked by the piece's score (higher first)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self.get("tokenizer.ggml.merges") or []]
        if not merges:
            scores = self.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            merges = _merges_from_scores(tokens, scores, vocab)
        unk = self.get("tokenizer.ggml.unknown_token_id")
        backend = Tokenizer(models.BPE(
            vocab=vocab, merges=merges, unk_token=tokens[int(unk)] if unk is not None else None,
            byte_fallback=True, fuse_unk=True,
        ))
        add_space = self.get("tokenizer.ggml.add_space_prefix", True)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_space else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space:
            steps.append(decoders.Strip(" ", 1, 0))
        backend.decoder = decoders.Sequence(steps)
        _add_special_tokens(backend, tokens, types, AddedToken)
        return backend


# tokenizer.ggml.pre -> the regex a byte-level vocabulary splits text with before
# its merges apply (the patterns of the original models' tokenizer.json files)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: each piece's two-piece splits,
    best score first; ties go to the longer left, then longer right part, then
    the order of the pieces and their parts' ids."""
    candidates = []
    for piece, score in zip(tokens, scores, strict=False):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(left, right, score) for left, right in splits]
    candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable
    return [(left, right) for left, right, _ in candidates]


def _add_special_tokens(backend: Any, tokens: list[str], types: list[int], added_token: Any) -> None:
    special = [added_token(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(types) if kind == _TOKEN_CONTROL]
    user = [added_token(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(types) if kind == _TOKEN_USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


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
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _key_of(config_key: str) -> str:
    return next(k for k, v in _CONFIG_KEYS.items() if v == config_key)
