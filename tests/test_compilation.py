"""Optional torch.compile (`compilation_config`, engine/compilation.py): the
graph backend is a plugin of group ``graph_backend``; compiled greedy output
equals eager greedy output."""

from __future__ import annotations

import sys
import textwrap

import pytest

import registry
from engine import LLM, SamplingParams
from engine.cli.main import build_parser
from engine.engine_args import EngineArgs

PROMPTS = ["def add(a, b):", "class Foo:\n    def"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_builtin_graph_backends_are_plugins():
    names = {r.name for r in registry.discover("graph_backend") if r.source == "builtin"}
    assert {"inductor", "eager"} <= names
    assert registry.resolve_group("graph_backend") == registry.GRAPH_BACKEND_PLUGINS


@pytest.mark.parametrize("value, message", [
    ({"backend": "nope"}, r"unknown graph backend 'nope'.*'eager', 'inductor'"),
    ({"bakend": "eager"}, r"unknown key\(s\) bakend; valid keys are: backend"),
    ({"backend": "eager", "dynamic": "yes"}, r"compilation_config.dynamic must be true or false"),
    ("{not json", r"compilation_config is not valid JSON"),
    ("[1]", r"must be a JSON object"),
])
def test_bad_compilation_config_is_refused_naming_the_key(make_hf_model, value, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=str(make_hf_model("llama")), compilation_config=value
                   ).create_engine_config()


def test_cli_takes_compilation_config_as_json(make_hf_model):
    args = build_parser().parse_args(
        ["serve", "--model", str(make_hf_model("llama")),
         "--compilation-config", '{"backend": "eager", "dynamic": false}'])
    config = EngineArgs.from_cli_args(args).create_engine_config().compilation_config
    assert (config.backend, config.dynamic) == ("eager", False)


def test_a_graph_backend_plugin_compiles_and_output_equals_eager(make_hf_model, tmp_path):
    """A third-party backend from a plugin folder: it is called with the captured
    graphs, and greedy output is the eager engine's."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "counting_backend.py").write_text(textwrap.dedent("""
        GRAPHS = []

        def make_backend(compilation_config):
            def backend(graph_module, example_inputs):
                GRAPHS.append(len(graph_module.graph.nodes))
                return graph_module.forward
            return backend
    """))
    (plugin / "graph.toml").write_text(textwrap.dedent("""
        schema-version = 1
        [package]
        name = "counting-backend"
        path = "."
        [[plugin]]
        group = "graph_backend"
        name = "counting"
        value = "counting_backend:make_backend"
    """))
    model = make_hf_model("llama")
    with LLM(model, dtype="float32", skip_warm_up=True) as llm:
        eager = _tokens(llm)
    with LLM(model, dtype="float32", skip_warm_up=True, plugin_dirs=[str(plugin)],
             compilation_config={"backend": "counting"}) as llm:
        assert _tokens(llm) == eager
    graphs = sys.modules["counting_backend"].GRAPHS
    assert graphs and max(graphs) > 10  # the layers' projections, norms and MLPs


@pytest.mark.slow
def test_inductor_output_equals_eager_and_is_cached(make_hf_model, tmp_path, monkeypatch):
    """With the warm-up's steps (a 512-token prompt step) and a long prompt: prompt
    steps run oneDNN on prepacked weights, which inductor must leave opaque."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = make_hf_model("llama")
    prompts = [*PROMPTS, " ".join(["def f(x): return x"] * 12)]
    with LLM(model, dtype="float32") as llm:
        eager = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        assert len(llm.get_tokenizer().encode(prompts[-1])) > 32  # past the GEMV kernels
    cache = tmp_path / "compile-cache"
    with LLM(model, dtype="float32",
             compilation_config={"backend": "inductor", "cache_dir": str(cache)}) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == eager
    assert any((cache / "inductor").rglob("*.py")), "nothing in the inductor cache"
    with LLM(model, dtype="bfloat16", compilation_config={"backend": "inductor",
                                                         "cache_dir": str(cache)}) as llm:
        assert all(o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY))
