"""load_tokenizer: ids equal transformers' for the tiny byte-level BPE and for
MiniLM's WordPiece, special tokens and EOS ids from the side files, truncation,
chat template, and errors that name the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "def main():\n    return 42",
    "Hello, world! Ünïcödé – 中文 and emoji 🙂🚀",
    "   leading spaces and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def bpe(tokenizer_dir) -> Tokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_bpe(tokenizer_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------- byte-level BPE


def test_special_ids_of_the_tiny_tokenizer(bpe):
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id) == (0, 1, 2)
    assert bpe.eos_token_ids == {1}
    assert {0, 1, 2} <= bpe.all_special_ids
    assert bpe.vocab_size == len(bpe) == 1024
    assert bpe.chat_template is None


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(bpe, hf_bpe, text):
    ids = bpe.encode(text)
    assert ids == hf_bpe(text)["input_ids"]
    assert bpe.decode(ids) == hf_bpe.decode(ids, skip_special_tokens=True) == text


def test_decode_skips_special_tokens_unless_asked(bpe):
    ids = [0, *bpe.encode("hi"), 1]
    assert bpe.decode(ids) == "hi"
    assert bpe.decode(ids, skip_special_tokens=False) == "<s>hi</s>"


def test_encode_batch_equals_encode(bpe):
    assert bpe.encode_batch(TEXTS) == [bpe.encode(t) for t in TEXTS]


def test_eos_ids_come_from_generation_and_model_config(tokenizer_dir, tmp_path):
    folder = copy_dir(tokenizer_dir, tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 9}))
    tok = load_tokenizer(folder)
    assert tok.eos_token_id == 1
    assert tok.eos_token_ids == {1, 7, 9}
    assert {7, 9} <= tok.all_special_ids


def test_eos_from_generation_config_when_the_tokenizer_names_none(tokenizer_dir, tmp_path):
    folder = copy_dir(tokenizer_dir, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps({}))
    (folder / "special_tokens_map.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    tok = load_tokenizer(folder)
    assert tok.eos_token_id == 5 and tok.eos_token_ids == {5, 6}
    assert tok.bos_token_id is None


def test_added_token_dicts_in_tokenizer_config(tokenizer_dir, tmp_path):
    folder = copy_dir(tokenizer_dir, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<pad>", "special": True}, "bos_token": None}))
    (folder / "special_tokens_map.json").unlink()
    tok = load_tokenizer(folder)
    assert tok.eos_token_id == 2 and tok.bos_token_id is None


def test_add_bos_token_prepends_when_the_post_processor_does_not(tokenizer_dir, tmp_path):
    folder = copy_dir(tokenizer_dir, tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    tok = load_tokenizer(folder)
    plain = load_tokenizer(tokenizer_dir).encode("hello there")
    assert tok.encode("hello there") == [0, *plain]
    assert tok.encode("hello there", add_special_tokens=False) == plain
    assert tok.encode("hello there", max_length=3) == [0, *plain[:2]]


def test_chat_template_from_config_and_jinja_file(tokenizer_dir, tmp_path):
    folder = copy_dir(tokenizer_dir, tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config | {"chat_template": "{{ messages }}"}))
    assert load_tokenizer(folder).chat_template == "{{ messages }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert load_tokenizer(folder).chat_template == "D"
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}{% endfor %}")
    assert load_tokenizer(folder).chat_template.startswith("{% for m")


# -------------------------------------------------------------------- errors


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_unreadable_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot load tokenizer"):
        load_tokenizer(tmp_path)


def test_broken_side_file_names_the_file(tokenizer_dir, tmp_path):
    folder = copy_dir(tokenizer_dir, tmp_path / "m")
    (folder / "generation_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"generation_config\.json: cannot read"):
        load_tokenizer(folder)


def test_bad_max_length(bpe):
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        bpe.encode("x", max_length=0)


# ------------------------------------------------------------ MiniLM WordPiece


@pytest.fixture(scope="module")
def minilm_pair(minilm_dir):
    import transformers

    return load_tokenizer(minilm_dir), transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


def test_minilm_wordpiece_matches_transformers_without_padding(minilm_pair):
    ours, hf = minilm_pair
    for text in ["A man is eating food.", "Ünïcödé café 中文!", "word " * 200]:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"]  # tokenizer.json's fixed padding is off
        assert ids[0] == 101 and ids[-1] == 102


@pytest.mark.parametrize("max_length", [8, 256])
def test_minilm_truncation_keeps_cls_and_sep(minilm_pair, max_length):
    ours, hf = minilm_pair
    texts = ["word " * 300, "short one"]
    expected = [hf(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    assert ours.encode_batch(texts, max_length=max_length) == expected
    assert ours.encode(texts[0], max_length=max_length) == expected[0]
    assert len(expected[0]) == max_length


def test_minilm_special_tokens(minilm_pair):
    ours, _ = minilm_pair
    assert ours.pad_token_id == 0 and ours.unk_token_id == 100
    assert ours.eos_token_id is None and ours.eos_token_ids == frozenset()
    assert {0, 100, 101, 102, 103} <= ours.all_special_ids
    assert ours.model_max_length == 512
    assert ours.decode(ours.encode("Hello World")) == "hello world"
