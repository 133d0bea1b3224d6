"""The tokenizer a GGUF file carries, built as an `engine.tokenizer.Tokenizer`.

A ``.gguf`` file records its tokenizer as ``tokenizer.ggml.*`` metadata: the
vocabulary, its kind (``gpt2``: byte-level BPE; ``llama``: SentencePiece BPE
with byte fallback), merges or scores, special tokens and the chat template.
The file itself is read by `engine.model_loader.gguf.GGUFFile`.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from engine.model_loader.gguf import GGUFFile
from engine.tokenizer.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def gguf_tokenizer(file: GGUFFile) -> Tokenizer:
    """The tokenizer `file` records (``tokenizer.ggml.*``), with its chat
    template, special tokens and BOS setting. Raises ValueError naming the file
    when it has no tokenizer or one of an unsupported kind."""
    kind = file.get("tokenizer.ggml.model")
    tokens = file.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{file.path}: no tokenizer (tokenizer.ggml.tokens is missing)")
    types = file.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(file, tokens, types)
    elif kind == "llama":
        backend = _sentencepiece_bpe(file, tokens, types)
    else:
        raise ValueError(
            f"{file.path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
        )

    def text(key: str) -> str | None:
        value = file.get(f"tokenizer.ggml.{key}")
        return tokens[int(value)] if value is not None and 0 <= int(value) < len(tokens) else None

    special = {"bos": text("bos_token_id"), "eos": text("eos_token_id"),
               "pad": text("padding_token_id"), "unk": text("unknown_token_id")}
    template = file.get("tokenizer.chat_template")
    return Tokenizer(
        backend,
        special_tokens=special,
        add_bos_token=file.get("tokenizer.ggml.add_bos_token"),
        add_eos_token=file.get("tokenizer.ggml.add_eos_token"),
        chat_template=template if isinstance(template, str) else None,
        model_max_length=file.get(f"{file.architecture}.context_length"),
        name_or_path=str(file.path),
    )


def _byte_level_bpe(file: GGUFFile, tokens: list[str], types: list[int]) -> Backend:
    merges = [tuple(m.split(" ", 1)) for m in file.get("tokenizer.ggml.merges") or []]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _PRE_TOKENIZER_SPLITS.get(str(file.get("tokenizer.ggml.pre", "")))
    if split is None:  # GPT-2's own split, inside ByteLevel
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # the split the vocabulary's merges were learned with
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, types)
    return backend


def _sentencepiece_bpe(file: GGUFFile, tokens: list[str], types: list[int]) -> Backend:
    """A SentencePiece BPE vocabulary (``▁`` for spaces, ``<0xNN>`` byte
    fallback). Without merges in the file, every split of a piece into two
    pieces is a merge, ranked by the piece's score (higher first)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in file.get("tokenizer.ggml.merges") or []]
    if not merges:
        scores = file.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _merges_from_scores(tokens, scores, vocab)
    unk = file.get("tokenizer.ggml.unknown_token_id")
    backend = Backend(models.BPE(
        vocab=vocab, merges=merges, unk_token=tokens[int(unk)] if unk is not None else None,
        byte_fallback=True, fuse_unk=True,
    ))
    add_space = file.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, types)
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


def _add_special_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(types) if kind == _TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(types) if kind == _TOKEN_USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
