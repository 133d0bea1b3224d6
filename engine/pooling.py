"""Sentence embeddings from an encoder: pooling config, pooling and `embed`.

A sentence-transformers folder's own files decide, as sentence-transformers does:
``modules.json`` lists the modules (a ``Normalize`` module means L2-normalise),
the Pooling module's ``config.json`` picks the pooling mode, and
``sentence_bert_config.json`` the maximum sequence length. A plain encoder folder
gets mean pooling without normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")
# sentence-transformers' Pooling config keys -> our mode names
_MODE_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON: {e}") from None


def load_pooling_config(model_dir: str | Path) -> PoolingConfig:
    """The pooling settings of `model_dir`. Raises ValueError naming the file when
    one of the sentence-transformers files is unreadable or asks for something
    unsupported."""
    model_dir = Path(model_dir)
    config = PoolingConfig()
    pooling_dir = model_dir / "1_Pooling"
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise ValueError(f"{modules_file}: expected a JSON list of modules")
        for module in modules:
            kind = str(module.get("type", ""))
            if kind.endswith(".Pooling"):
                pooling_dir = model_dir / module.get("path", "")
            elif kind.endswith(".Normalize"):
                config.normalize = True
    pooling_file = pooling_dir / "config.json"
    if pooling_dir != model_dir and pooling_file.is_file():
        config.mode = _pooling_mode(pooling_file, _read_json(pooling_file))
    st_file = model_dir / "sentence_bert_config.json"
    if st_file.is_file():
        st = _read_json(st_file)
        if st.get("max_seq_length") is not None:
            config.max_seq_length = int(st["max_seq_length"])
        config.do_lower_case = bool(st.get("do_lower_case", False))
    return config


def _pooling_mode(path: Path, pooling: dict[str, Any]) -> str:
    if "pooling_mode" in pooling:  # newer single-key form
        mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max",
                "mean_sqrt_len_tokens": "mean_sqrt_len"}.get(pooling["pooling_mode"],
                                                              pooling["pooling_mode"])
        modes = [mode]
    else:
        modes = [mode for key, mode in _MODE_KEYS.items() if pooling.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{path}: exactly one supported pooling mode must be on, found {modes or 'none'}. "
            f"Valid options are: {', '.join(POOLING_MODES)}"
        )
    return modes[0]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, L, H] hidden states and [B, L] bool mask of real tokens -> [B, H]."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return summed / counts
    if mode == "mean_sqrt_len":
        return summed / counts.sqrt()
    raise ValueError(f"pooling mode {mode!r} is not supported. "
                     f"Valid options are: {', '.join(POOLING_MODES)}")


def truncate(token_ids: list[int], max_len: int | None) -> list[int]:
    """Cut to `max_len` tokens keeping the last one (the tokenizer's closing
    special token, e.g. [SEP]), as a tokenizer truncating before adding its
    special tokens would."""
    if max_len is None or len(token_ids) <= max_len:
        return list(token_ids)
    return list(token_ids[: max_len - 1]) + [token_ids[-1]]


def embed(model: torch.nn.Module, token_id_lists: list[list[int]],
          max_batch_tokens: int = 8192, max_batch_size: int = 64) -> torch.Tensor:
    """Embed tokenised texts with an encoder model (``model(input_ids [B, L],
    attention_mask [B, L]) -> [B, L, H]`` and a ``pooling_config``) -> [n, H] in
    input order, pooled and normalised as the model folder says. Texts are sorted
    by length and batched so padding stays small. Raises ValueError for an empty
    text."""
    config: PoolingConfig = getattr(model, "pooling_config", None) or PoolingConfig()
    max_len = config.max_seq_length or getattr(model, "max_position_embeddings", None)
    ids = [truncate(t, max_len) for t in token_id_lists]
    for i, t in enumerate(ids):
        if not t:
            raise ValueError(f"text {i} has no tokens to embed")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad_id = getattr(model, "pad_token_id", 0) or 0
    device = next(model.parameters()).device
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for batch in _batches(order, ids, max_batch_tokens, max_batch_size):
            width = len(ids[batch[0]])  # longest first
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.int64)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = True
            input_ids, mask = input_ids.to(device), mask.to(device)
            pooled = pool(model(input_ids, mask), mask, config.mode).float()
            if config.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            if out is None:
                out = torch.empty(len(ids), pooled.shape[-1], dtype=torch.float32)
            out[torch.tensor(batch)] = pooled.cpu()
    return out if out is not None else torch.empty(0, 0)


def _batches(order: list[int], ids: list[list[int]], max_tokens: int,
             max_size: int) -> list[list[int]]:
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            width = len(ids[current[0]])
            if len(current) < max_size and width * (len(current) + 1) <= max_tokens:
                current.append(i)
                continue
        batches.append([i])
    return batches
