"""The BERT encoder + pooling on the real all-MiniLM-L6-v2 against sentence-transformers."""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.model_loader import load_model
from engine.model_loader.pooling_config import PoolingConfig, load_pooling_config
from engine.models import register_builtin_models
from engine.pooling import pool, truncate

TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks so memory is not wasted "
    "on padding, and prefix caching reuses blocks of repeated prompt prefixes.",
    "héllo wörld — ünïcode ✓",
    "ok",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    torch.set_num_threads(1)
    register_builtin_models()
    return load_model(EngineConfig(ModelConfig(model=str(minilm_dir), dtype="float32")))


@pytest.fixture(scope="module")
def reference(minilm_dir, sentence_transformer):
    """Token ids from the model's own tokenizer and sentence-transformers' embeddings."""
    st = sentence_transformer(minilm_dir)
    ids = [st.tokenizer(text, truncation=True, max_length=256)["input_ids"] for text in TEXTS]
    return ids, st.encode(TEXTS, convert_to_tensor=True).float()


def test_minilm_embeddings_match_sentence_transformers(minilm, reference):
    from engine.pooling import embed

    ids, expected = reference
    got = embed(minilm, ids)
    assert got.shape == (len(TEXTS), 384)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))


def test_embedding_does_not_depend_on_batch_company(minilm, reference):
    from engine.pooling import embed

    ids, _ = reference
    together = embed(minilm, ids)
    alone = torch.cat([embed(minilm, [t]) for t in ids])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_pooling_config_comes_from_the_sentence_transformers_files(minilm_dir, minilm):
    assert load_pooling_config(minilm_dir) == PoolingConfig(
        mode="mean", normalize=True, max_seq_length=256, do_lower_case=False)
    assert minilm.pooling_config.max_seq_length == 256


def test_plain_encoder_folder_gets_mean_pooling_without_normalisation(tmp_path):
    assert load_pooling_config(tmp_path) == PoolingConfig()


def test_cls_pooling_and_a_bad_pooling_config(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert load_pooling_config(tmp_path).mode == "cls"
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({
        "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: exactly one supported pooling mode"):
        load_pooling_config(tmp_path)


def test_pool_modes_ignore_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert pool(hidden, mask, "mean").item() == 2.0
    assert pool(hidden, mask, "max").item() == 3.0
    assert pool(hidden, mask, "cls").item() == 1.0
    assert pool(hidden, mask, "lasttoken").item() == 3.0


def test_truncation_keeps_the_closing_special_token():
    assert truncate([101, 5, 6, 7, 102], 4) == [101, 5, 6, 102]
    assert truncate([101, 5, 102], 4) == [101, 5, 102]


def test_long_text_is_truncated_to_max_seq_length(minilm):
    from engine.pooling import embed

    long_ids = [101] + [2000] * 600 + [102]
    cut = [101] + [2000] * 254 + [102]
    torch.testing.assert_close(embed(minilm, [long_ids]), embed(minilm, [cut]))
