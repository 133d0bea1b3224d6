"""`LLM.embed` with the real all-MiniLM-L6-v2 against transformers + mean pooling."""

from __future__ import annotations

import pytest
import torch

from engine import LLM

TEXTS = [
    "A man is eating food.",
    "The new movie is awesome!",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "ünïcödé text, emoji 🙂 and CJK 漢字 too",
    "word " * 400,  # longer than max_seq_length: truncated the same way
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return LLM(minilm_dir)


def _reference(model_dir, texts: list[str]) -> torch.Tensor:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_embeddings_match_transformers_mean_pooling(minilm, minilm_dir):
    outputs = minilm.embed(TEXTS)
    assert [o.prompt for o in outputs] == TEXTS
    ours = torch.tensor([o.outputs.embedding for o in outputs])
    assert ours.shape == (len(TEXTS), 384)
    cosine = torch.nn.functional.cosine_similarity(ours, _reference(minilm_dir, TEXTS), dim=-1)
    assert cosine.min().item() >= 0.9999, cosine.tolist()
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_one_string_is_one_embedding(minilm):
    (out,) = minilm.embed("hello")
    assert len(out.outputs.embedding) == 384


def test_an_embedding_model_does_not_generate(minilm):
    with pytest.raises(ValueError, match="does not generate"):
        minilm.generate("hello")
