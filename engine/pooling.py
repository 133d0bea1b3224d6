"""Sentence embeddings from an encoder: pooling and `embed`, as the model
folder's pooling config (`engine.model_loader.pooling_config`) says."""

from __future__ import annotations

import torch

from engine.model_loader.pooling_config import POOLING_MODES, PoolingConfig


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
