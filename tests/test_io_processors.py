"""IO-processor plugins: selection by name, errors, the request pipeline, and the
example similarity processor on real all-MiniLM-L6-v2 embeddings (computed with
`transformers`, the oracle)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import subprocess_env

from engine.config import EngineConfig, ModelConfig
from engine.io_processors import (
    IOProcessor,
    IOProcessorError,
    get_io_processor,
    process_request,
    process_request_async,
)
from engine.pooling_params import PoolingParams

ROOT = Path(__file__).resolve().parent.parent
SIMILARITY_EXAMPLE = ROOT / "examples" / "similarity-io-processor"


def make_config(model: str = "some-model", hf_config: dict | None = None,
                io_processor_plugin: str | None = None) -> EngineConfig:
    return EngineConfig(model_config=ModelConfig(
        model=model, hf_config=hf_config or {}, io_processor_plugin=io_processor_plugin,
    ))


@pytest.fixture
def similarity_plugin_dir(monkeypatch) -> Path:
    """The example as a plugin dir: its pyproject's entry-point table declares it."""
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(SIMILARITY_EXAMPLE))
    return SIMILARITY_EXAMPLE


TEST_PLUGINS = '''
from engine.io_processors import IOProcessor


class EchoProcessor(IOProcessor):
    """Pools the text it is given; fails on demand at each stage."""

    def parse_data(self, data):
        if data == "bad-parse":
            raise ValueError("data must not be 'bad-parse'")
        return data

    def pre_process(self, prompt, request_id=None, **kw):
        if prompt == "bad-pre":
            raise KeyError("no such prompt")
        return prompt

    def post_process(self, model_output, request_id=None, **kw):
        if model_output[0].prompt == "bad-post":
            raise RuntimeError("post_process exploded")
        return [o.outputs.embedding for o in model_output]


class NotAProcessor:
    pass


def echo():
    return "t_io_plugins.EchoProcessor"

def absent():
    return None

def wrong_class():
    return "t_io_plugins.NotAProcessor"

def raises():
    raise OSError("device file missing")
'''


@pytest.fixture
def test_plugin_dir(tmp_path, monkeypatch) -> Path:
    """A manifest plugin dir with io_processor plugins that behave well and badly,
    beside the example's plugin dir."""
    folder = tmp_path / "io-plugins"
    folder.mkdir()
    (folder / "t_io_plugins.py").write_text(TEST_PLUGINS)
    plugins = "".join(
        f'[[plugin]]\ngroup = "io_processor"\nname = "{name}"\nvalue = "t_io_plugins:{name}"\n'
        for name in ("echo", "absent", "wrong_class", "raises")
    )
    (folder / "test-plugins.toml").write_text(
        f'schema-version = 1\n[package]\nname = "t-io-plugins"\npath = "."\n{plugins}'
    )
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", f"{folder}:{SIMILARITY_EXAMPLE}")
    return folder


# --------------------------------------------------------------------------
# selection


def test_no_plugin_named_anywhere_means_no_processor(similarity_plugin_dir):
    assert get_io_processor(make_config()) is None


@pytest.mark.parametrize("route", ["argument", "llm-option", "config.json"])
def test_processor_is_selected_by_each_route(similarity_plugin_dir, route, tmp_path, minilm_dir):
    if route == "argument":
        processor = get_io_processor(make_config(), "similarity")
    elif route == "llm-option":  # LLM(io_processor_plugin=...) / --io-processor-plugin
        processor = get_io_processor(make_config(io_processor_plugin="similarity"))
    else:
        model = tmp_path / "minilm"  # its config.json, naming the plugin
        model.mkdir()
        hf_config = json.loads((minilm_dir / "config.json").read_text())
        hf_config["io_processor_plugin"] = "similarity"
        (model / "config.json").write_text(json.dumps(hf_config))
        config = make_config(str(model), json.loads((model / "config.json").read_text()))
        processor = get_io_processor(config)
    assert type(processor).__name__ == "SimilarityIOProcessor"
    assert isinstance(processor, IOProcessor)
    assert processor.plugin_name == "similarity"


def test_explicit_choice_beats_config_json(test_plugin_dir):
    config = make_config(hf_config={"io_processor_plugin": "similarity"},
                         io_processor_plugin="echo")
    assert type(get_io_processor(config)).__name__ == "EchoProcessor"
    assert type(get_io_processor(config, "similarity")).__name__ == "SimilarityIOProcessor"


def test_missing_plugin_lists_the_available_ones(test_plugin_dir):
    config = make_config("models/m", hf_config={"io_processor_plugin": "nope"})
    with pytest.raises(ValueError) as info:
        get_io_processor(config)
    message = str(info.value)
    assert "'nope'" in message and "models/m/config.json" in message
    for name in ("echo", "similarity", "absent"):
        assert repr(name) in message


def test_disabled_plugin_says_so(similarity_plugin_dir, monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGINS", "")
    with pytest.raises(ValueError, match=r"'similarity'.*disabled.*Available io_processor plugins: none"):
        get_io_processor(make_config(), "similarity")


def test_bad_config_json_value_names_the_key():
    with pytest.raises(ValueError, match="'io_processor_plugin' key of m/config.json"):
        get_io_processor(make_config("m", hf_config={"io_processor_plugin": 3}))


@pytest.mark.parametrize("name, error, text", [
    ("absent", ValueError, "its function returned None"),
    ("wrong_class", TypeError, "not a subclass of engine.io_processors.IOProcessor"),
    ("raises", RuntimeError, "device file missing"),
])
def test_plugin_that_cannot_give_a_processor_is_a_clear_error(test_plugin_dir, name, error, text):
    with pytest.raises(error) as info:
        get_io_processor(make_config(), name)
    assert f"io_processor plugin {name!r}" in str(info.value)
    assert str(test_plugin_dir / "test-plugins.toml") in str(info.value)
    assert text in str(info.value)


@pytest.fixture(scope="session")
def installed_similarity_example(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("similarity-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(SIMILARITY_EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    return target


def test_processor_from_an_installed_entry_point(installed_similarity_example):
    script = textwrap.dedent("""
        import json, sys, registry
        from engine.config import EngineConfig, ModelConfig
        from engine.io_processors import get_io_processor
        config = EngineConfig(model_config=ModelConfig(model="m", io_processor_plugin="similarity"))
        processor = get_io_processor(config)
        [record] = [r for r in registry.discover("io_processor") if r.name == "similarity"]
        print(json.dumps({"cls": type(processor).__module__, "source": record.source,
                          "parsed": processor.parse_data("hi"),
                          "torch_imported": "torch" in sys.modules}))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(PYTHONPATH=str(installed_similarity_example)),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cls"] == "similarity_io_processor.processor"
    assert report["source"] == "entry-point"
    assert report["parsed"] == {"query": "hi", "top_k": 3}
    assert report["torch_imported"] is False


# --------------------------------------------------------------------------
# the request pipeline


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class PoolingOutput:
    """The shape of the engine's pooling results: ``.prompt``, ``.outputs.embedding``."""

    prompt: str
    outputs: EmbeddingOutput


def length_pool(prompts, params):
    """A pooler for pipeline tests: one-dimensional 'embedding' = the text length."""
    return [PoolingOutput(p, EmbeddingOutput([float(len(p))])) for p in prompts]


def test_a_raising_plugin_fails_only_its_own_request(test_plugin_dir):
    processor = get_io_processor(make_config(), "echo")
    for data, stage, message in [
        ("bad-parse", "parse_data", "data must not be 'bad-parse'"),
        ("bad-pre", "pre_process", "no such prompt"),
        ("bad-post", "post_process", "post_process exploded"),
    ]:
        with pytest.raises(IOProcessorError) as info:
            process_request(processor, data, length_pool)
        assert (info.value.plugin, info.value.stage) == ("echo", stage)
        assert message in str(info.value) and "'echo'" in str(info.value)
        # the same processor still serves the next request
        assert process_request(processor, "fine", length_pool) == [[4.0]]


def test_async_pipeline_uses_the_async_variants(test_plugin_dir):
    processor = get_io_processor(make_config(), "echo")

    async def pool(prompts, params):
        return length_pool(prompts, params)

    async def run():
        good = await process_request_async(processor, ["ab", "abc"], pool)
        with pytest.raises(IOProcessorError, match="post_process exploded"):
            await process_request_async(processor, "bad-post", pool)
        return good

    assert asyncio.run(run()) == [[2.0], [3.0]]


def test_pooling_params_validate_and_apply():
    with pytest.raises(ValueError, match="PoolingParams.task"):
        PoolingParams(task="classify")
    with pytest.raises(ValueError, match="PoolingParams.dimensions"):
        PoolingParams(dimensions=0)
    with pytest.raises(ValueError, match="PoolingParams.normalize"):
        PoolingParams(normalize="yes")
    assert PoolingParams(dimensions=2, normalize=True).apply_to([3.0, 4.0, 12.0]) == [0.6, 0.8]
    assert PoolingParams().apply_to([3.0, 4.0]) == [3.0, 4.0]


# --------------------------------------------------------------------------
# the example processor on real MiniLM embeddings


@pytest.fixture(scope="module")
def minilm_pool(minilm_dir):
    """Embeds texts as sentence-transformers does for all-MiniLM-L6-v2 (mean pooling,
    L2 normalization), with `transformers`."""
    import torch
    import transformers

    torch.set_num_threads(1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def pool(prompts, params):
        assert params.normalize is True  # the processor asked for unit vectors
        vectors = embed(prompts)
        return [PoolingOutput(p, EmbeddingOutput(v.tolist())) for p, v in zip(prompts, vectors,
                                                                                 strict=True)]

    pool.embed = embed
    return pool


def test_similarity_example_ranks_the_corpus_by_minilm_cosine(similarity_plugin_dir, minilm_pool):
    processor = get_io_processor(make_config(), "similarity")
    result = process_request(processor, {"query": "My kitten naps in the sun", "top_k": 3},
                             minilm_pool)
    assert result["query"] == "My kitten naps in the sun"
    texts = [r["text"] for r in result["results"]]
    assert texts[0] == "A cat is sleeping on the warm windowsill."

    # the oracle: cosine similarities computed with torch from the same embeddings
    import torch

    corpus = list(processor.corpus)
    vectors = minilm_pool.embed(["My kitten naps in the sun", *corpus])
    scores = vectors[1:] @ vectors[0]
    top = torch.topk(scores, 3)
    assert texts == [corpus[i] for i in top.indices.tolist()]
    for got, want in zip(result["results"], top.values.tolist(), strict=True):
        assert got["score"] == pytest.approx(want, abs=1e-5)

    # post_process also takes the embeddings as one tensor
    processor.pre_process(processor.parse_data("markets and interest rates"), request_id="r2")
    ranked = processor.post_process(minilm_pool.embed(["markets and interest rates", *corpus]),
                                    request_id="r2")
    assert {r["text"] for r in ranked["results"][:2]} == {
        "Stock markets fell sharply after the announcement.",
        "The central bank raised interest rates again.",
    }


def test_similarity_example_rejects_bad_requests_by_field(similarity_plugin_dir, minilm_pool):
    processor = get_io_processor(make_config(), "similarity")
    with pytest.raises(IOProcessorError, match="'top_k' must be an int in 1..12"):
        process_request(processor, {"query": "x", "top_k": 99}, minilm_pool)
    with pytest.raises(IOProcessorError, match="'query' must be a non-empty string"):
        process_request(processor, {"query": ""}, minilm_pool)
    assert len(process_request(processor, "a rainy day", minilm_pool)["results"]) == 3


# --------------------------------------------------------------------------
# through the engine: LLM.encode


@pytest.fixture(scope="module")
def minilm_llm(minilm_dir):
    """One engine on the real MiniLM for the LLM.encode tests (no IO processor yet:
    each test attaches the one it selects)."""
    from engine import LLM

    llm = LLM(minilm_dir, dtype="float32")
    yield llm
    llm.shutdown()


def test_llm_encode_runs_the_plugin_over_real_embeddings(
    similarity_plugin_dir, minilm_llm, minilm_pool
):
    minilm_llm.io_processor = get_io_processor(minilm_llm.config, "similarity")
    result = minilm_llm.encode({"query": "My kitten naps in the sun", "top_k": 2})
    oracle = process_request(minilm_llm.io_processor,
                             {"query": "My kitten naps in the sun", "top_k": 2}, minilm_pool)
    assert [r["text"] for r in result["results"]] == [r["text"] for r in oracle["results"]]
    for got, want in zip(result["results"], oracle["results"], strict=True):
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)


def test_llm_encode_failure_in_the_plugin_fails_only_that_request(test_plugin_dir, minilm_llm):
    minilm_llm.io_processor = get_io_processor(minilm_llm.config, "echo")
    with pytest.raises(IOProcessorError, match="post_process exploded"):
        minilm_llm.encode("bad-post")
    vectors = minilm_llm.encode(["first text", "second text"])
    assert len(vectors) == 2 and len(vectors[0]) == 384


def test_llm_with_a_missing_io_processor_fails_at_start_listing_the_available(
    test_plugin_dir, minilm_dir
):
    from engine import LLM

    with pytest.raises(ValueError, match="similarity"):
        LLM(minilm_dir, io_processor_plugin="no-such-processor")


def test_llm_encode_without_a_processor_says_how_to_configure_one(minilm_llm):
    minilm_llm.io_processor = None
    with pytest.raises(ValueError, match="io_processor_plugin"):
        minilm_llm.encode("text")
