"""`LLM.embed` with the real all-MiniLM-L6-v2 against sentence-transformers itself,
on the published folder (mean pooling, normalised) and on a copy whose files ask for
CLS pooling without normalisation: the engine reads the same files the oracle does."""

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
    return LLM(minilm_dir, dtype="float32")


def _embed(llm: LLM, texts: list[str]) -> torch.Tensor:
    outputs = llm.embed(texts)
    assert [o.prompt for o in outputs] == texts
    return torch.tensor([o.outputs.embedding for o in outputs])


def _expected(sentence_transformer, folder, texts: list[str]) -> torch.Tensor:
    return sentence_transformer(folder).encode(texts, convert_to_tensor=True).float()


def test_embeddings_match_sentence_transformers(minilm, minilm_dir, sentence_transformer):
    ours = _embed(minilm, TEXTS)
    expected = _expected(sentence_transformer, minilm_dir, TEXTS)
    assert ours.shape == expected.shape == (len(TEXTS), 384)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))


def test_cls_pooling_without_normalisation_matches_sentence_transformers(
        minilm, minilm_cls_dir, sentence_transformer):
    ours = _embed(LLM(minilm_cls_dir, dtype="float32"), TEXTS)
    expected = _expected(sentence_transformer, minilm_cls_dir, TEXTS)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    # the folder's settings took effect: not unit length, not the mean-pooled direction
    assert (ours.norm(dim=-1) - 1).abs().min().item() > 0.1, ours.norm(dim=-1)
    mean_pooled = _embed(minilm, TEXTS)
    cosine = torch.nn.functional.cosine_similarity(ours, mean_pooled, dim=-1)
    assert cosine.max().item() < 0.99, cosine


def test_one_string_is_one_embedding(minilm):
    (out,) = minilm.embed("hello")
    assert len(out.outputs.embedding) == 384


def test_an_embedding_model_does_not_generate(minilm):
    with pytest.raises(ValueError, match="does not generate"):
        minilm.generate("hello")
