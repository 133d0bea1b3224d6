"""Loading trusts no size: crafted GGUF files whose metadata claims more than the
file holds, or a head count of 0, fail fast with one line naming the file and
the key (the `gguf` package's reader alone would loop over a 2**62-entry array
until memory ran out)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from test_gguf import write_gguf


@pytest.fixture(scope="module")
def gguf_file(make_hf_model, tmp_path_factory) -> Path:
    return write_gguf(make_hf_model("llama"), tmp_path_factory.mktemp("gguf") / "m.gguf")


def _patched(source: Path, out: Path, key: str, offset_after_key: int, value: bytes) -> Path:
    """A copy of `source` with `value` written `offset_after_key` bytes after the
    metadata key `key` (its length prefix and name)."""
    data = bytearray(source.read_bytes())
    name = key.encode()
    at = data.find(struct.pack("<Q", len(name)) + name)
    assert at >= 0, key
    start = at + 8 + len(name) + offset_after_key
    data[start:start + len(value)] = value
    out.write_bytes(bytes(data))
    return out


def _load_in_child(path: Path) -> subprocess.CompletedProcess:
    # a child with a memory cap and a time limit: before the check the reader
    # ran until memory was gone, which must not take the test session with it
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "from engine.model_loader.gguf import GGUFFile\n"
            "try:\n"
            f"    GGUFFile({str(path)!r}).hf_config()\n"
            "except ValueError as exc:\n"
            "    print(exc); sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_an_array_claiming_2_62_entries_fails_fast_naming_the_key(gguf_file, tmp_path):
    # after the key: value type ARRAY (4 bytes), element type (4), then the count
    bad = _patched(gguf_file, tmp_path / "bad.gguf", "tokenizer.ggml.token_type", 8,
                   struct.pack("<Q", 2**62))
    proc = _load_in_child(bad)
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = proc.stdout.strip()
    assert str(bad) in message and "'tokenizer.ggml.token_type'" in message, message
    assert "\n" not in message


def test_a_string_claiming_more_bytes_than_the_file_fails_naming_the_key(gguf_file,
                                                                         tmp_path):
    bad = _patched(gguf_file, tmp_path / "bad.gguf", "general.name", 4,
                   struct.pack("<Q", 2**40))
    proc = _load_in_child(bad)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "'general.name'" in proc.stdout, proc.stdout


def test_a_head_count_of_zero_is_one_line_naming_the_key(gguf_file, tmp_path):
    from engine.model_loader.gguf import GGUFFile

    bad = _patched(gguf_file, tmp_path / "bad.gguf", "llama.attention.head_count", 4,
                   struct.pack("<I", 0))
    with pytest.raises(ValueError, match=r"'llama\.attention\.head_count' must be an "
                                         r"integer >= 1, got 0") as info:
        GGUFFile(bad).hf_config()
    assert str(bad) in str(info.value)


def test_an_intact_file_still_loads(gguf_file):
    from engine.model_loader.gguf import GGUFFile

    assert GGUFFile(gguf_file).hf_config()["num_attention_heads"] >= 1


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", 100_000),
    ("vocab_size", 10**12),
    ("hidden_size", 10**6),
    ("max_position_embeddings", 2**40),
])
def test_a_config_that_does_not_match_its_checkpoint_or_memory_fails_naming_the_field(
        make_hf_model, tmp_path, field, value):
    from engine import LLM

    folder = tmp_path / "model"
    shutil.copytree(make_hf_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field) as info:
        LLM(str(folder), dtype="float32", kv_cache_memory=2**22)
    message = str(info.value)
    assert "config.json" in message and "\n" not in message, message


def test_a_tokenizer_with_more_tokens_than_the_model_is_named_not_a_failed_step(
        make_hf_model, caplog):
    """A folder whose tokenizer files come from another model than its weights:
    the load warns, a text that tokenizes past the embedding is refused naming the
    id (it used to reach the embedding lookup and fail the whole step), and the
    engine goes on serving texts and ids that fit."""
    from engine import LLM, SamplingParams

    model = make_hf_model("llama", vocab_size=300)  # the tests' tokenizer has more
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with caplog.at_level("WARNING", logger="engine.core.engine"):
        llm = LLM(str(model), dtype="float32", kv_cache_memory=2**22)
    with llm:
        assert any("the model's vocabulary 300" in r.getMessage() for r in caplog.records)
        tokenizer = llm.get_tokenizer()
        text = "def hello_world(): return hello_world"
        assert max(tokenizer.encode(text)) >= 300
        with pytest.raises(ValueError, match=r"prompt 0: the tokenizer made token id \d+ "
                                             r"\(position \d+\), outside the model's "
                                             r"vocabulary \(0\.\.299"):
            llm.generate([text], greedy)
        with pytest.raises(ValueError, match="input 0: the tokenizer made token id"):
            llm.llm_engine.embedding_token_ids([text])
        fits = next(c for c in "abcdefgh" if max(tokenizer.encode(c)) < 300)
        assert len(llm.generate([fits], greedy)[0].outputs[0].token_ids) == 3
        assert len(llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("kernels", ["compiled", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_request_whose_logits_turn_nan_ends_with_an_error_the_others_go_on(
        make_hf_model, tmp_path, dtype, kernels, monkeypatch):
    """A NaN in the weights (here: the embedding row of token 7) makes the logits of
    every prompt that reads it NaN, and any sampler then picks a meaningless token:
    such a sequence ends at once with finish_reason "error" and an error naming the
    cause, without its token; the batch's other prompts, and later ones that reuse
    its cache blocks, are as without the NaN, with the compiled kernels and on the
    reference path (whose decode attention reads whole blocks: the slots past a
    sequence's length, weighted 0, held the broken request's NaN, and 0 * NaN is
    NaN)."""
    from safetensors.torch import load_file, save_file

    import engine.kernels as engine_kernels
    from engine import LLM, SamplingParams

    if kernels == "compiled":
        if not engine_kernels.library_path().exists():
            engine_kernels.build()
        monkeypatch.setenv(engine_kernels.MODE_ENV, "build")
    else:
        monkeypatch.setenv(engine_kernels.MODE_ENV, "0")
    monkeypatch.setattr(engine_kernels, "_loaded", None)

    clean = make_hf_model("llama")
    folder = tmp_path / "nan-model"
    shutil.copytree(clean, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][7] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    # six rows in the first step (one read of the sampled logits for all), three
    # in the later ones (a read per row): both of the check's forms
    broken_prompts, fine_prompts = [[5, 6, 7, 8], [7, 9], [4, 7]], [[5, 6, 8, 9], [9, 8], [4, 5]]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    with LLM(str(clean), dtype=dtype, kv_cache_memory=2**22) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(fine_prompts, greedy)]
    assert not any(7 in ids for ids in expected)  # the fine prompts never read the NaN row
    with LLM(str(folder), dtype=dtype, kv_cache_memory=2**22) as llm:
        for params in (greedy, sampled):
            outputs = [o.outputs[0] for o in llm.generate(broken_prompts + fine_prompts, params)]
            for broken in outputs[:3]:
                assert broken.finish_reason == "error" and broken.token_ids == [], broken
                assert broken.text == ""
                assert "logits are not finite" in broken.error
                assert f"dtype={dtype!r}" in broken.error
            assert all(o.error is None and o.finish_reason == "length" for o in outputs[3:])
            if params is greedy:
                assert [o.token_ids for o in outputs[3:]] == expected
        assert [o.outputs[0].token_ids for o in llm.generate(fine_prompts, greedy)] == expected
        assert engine_kernels.kernels_available() is (kernels == "compiled")


def test_a_long_context_model_holds_rotary_tables_only_for_the_positions_used(
        make_hf_model, tmp_path):
    from engine import LLM, SamplingParams
    from engine.ops.rotary_embedding import INITIAL_TABLE_POSITIONS

    folder = tmp_path / "model"
    shutil.copytree(make_hf_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 300_000
    (folder / "config.json").write_text(json.dumps(config))
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=2**22)
    try:
        assert llm.llm_engine.config.model_config.max_model_len == 300_000
        model = llm.llm_engine.executor.worker.model_runner.model
        tables = [m.cos_sin_cache for m in model.modules() if hasattr(m, "cos_sin_cache")]
        assert tables and all(t.shape[0] == INITIAL_TABLE_POSITIONS for t in tables)
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0))
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kind", ["not-json", "folder", "symlink-to-text"])
def test_plugins_disable_with_a_broken_state_file_says_what_is_wrong(tmp_path, kind):
    state = tmp_path / "plugin-state.json"
    if kind == "not-json":
        state.write_text("{not json")
    elif kind == "folder":
        state.mkdir()
    else:
        (tmp_path / "notes.txt").write_text("hello")
        state.symlink_to(tmp_path / "notes.txt")
    proc = subprocess.run([sys.executable, "-m", "engine", "plugins", "disable", "foo"],
                          env=subprocess_env(ENGINE_CONFIG_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("engine plugins disable:")]
    assert len(line) == 1 and str(state) in line[0], proc.stderr
    expected = {"not-json": "cannot read", "folder": "a folder",
                "symlink-to-text": "a symbolic link to"}[kind]
    assert expected in line[0], line[0]


def test_an_environment_too_large_for_a_worker_is_named_not_blamed_on_main(make_hf_model):
    # plugin settings travel to spawned workers in one environment variable;
    # past Linux's 128 KiB per variable the worker cannot even start
    code = ("import os, sys\n"
            "os.environ['ENGINE_PLUGIN_CONFIG_PROBE'] = 'x' * 140_000\n"
            "from engine import LLM\n"
            "try:\n"
            f"    LLM({str(make_hf_model('llama'))!r}, tensor_parallel_size=2, "
            "dtype='float32', kv_cache_memory=2**22)\n"
            "except Exception as exc:\n"
            "    print(exc); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "ENGINE_PLUGIN_CONFIG_PROBE" in proc.stdout and "131072" in proc.stdout, proc.stdout
    assert "__main__" not in proc.stdout, proc.stdout
