"""Logits processors end to end: the example plugin package (banned token ids,
no repeated n-grams) given to `LLM(logits_processors=...)`, found as an installed
entry point (tensor parallel too) and reached over HTTP through `extra_args`;
greedy output equals transformers' `suppress_tokens` / `no_repeat_ngram_size`.
A processor that raises fails only its step's requests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
import transformers
from conftest import subprocess_env

from engine import LLM, SamplingParams
from engine.sample import BatchUpdate, LogitsProcessor, SamplingState, apply_batch_update
from engine.sample._sampler import _batch_update

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "token-rules-logits-processor"
PROMPTS = [[5, 17, 300, 42, 99, 7], [64, 65, 66, 9], [200, 201, 13, 13, 13, 40, 41]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llama_dir(make_hf_model) -> Path:
    return make_hf_model("llama")


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(llama_dir), dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_tokens: int = MAX_TOKENS, **processing) -> list[int]:
    """transformers' greedy continuation (stopping at EOS, which it keeps, as the
    engine does), with its own logits processing settings."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=1,
                             pad_token_id=1, **processing)
    return out[0, len(prompt):].tolist()


def mixed_params(banned: list[int]) -> list[SamplingParams]:
    """One request per example processor, and one untouched."""
    return [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args={"banned_token_ids": banned}),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args={"no_repeat_ngram_size": 2}),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
    ]


def expected_outputs(hf_model, banned: list[int]) -> list[list[int]]:
    return [
        hf_greedy(hf_model, PROMPTS[0], suppress_tokens=banned),
        hf_greedy(hf_model, PROMPTS[1], no_repeat_ngram_size=2),
        hf_greedy(hf_model, PROMPTS[2]),
    ]


@pytest.fixture(scope="module")
def banned(hf_model) -> list[int]:
    """The first three tokens transformers would produce for prompt 0: banning
    them must change the output."""
    return hf_greedy(hf_model, PROMPTS[0])[:3]


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """The example package pip-installed (real entry points) into a folder."""
    target = tmp_path_factory.mktemp("token-rules-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    return target


# ------------------------------------------------------------------ batch updates


def _state(i: int) -> SamplingState:
    return SamplingState.create(SamplingParams(extra_args={"i": i}), [i])


def test_batch_updates_keep_a_processors_rows_in_step_with_the_batch():
    rng = random.Random(0)
    pool = [_state(i) for i in range(12)]
    rows: dict[int, int] = {}
    previous: list[SamplingState] = []
    for _ in range(300):
        batch = rng.sample(pool, rng.randint(0, len(pool)))
        update = _batch_update(previous, batch)
        if update is None:
            assert batch == previous
        else:
            assert isinstance(update, BatchUpdate) and update.batch_size == len(batch)
        apply_batch_update(rows, update, lambda added: added.params.extra_args["i"])
        assert rows == {row: state.params.extra_args["i"] for row, state in enumerate(batch)}
        previous = batch


# ------------------------------------------------------------------ offline


def test_llm_logits_processors_equal_transformers_per_request(
    llama_dir, hf_model, banned, monkeypatch
):
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    from token_rules import BanTokensLogitsProcessor

    expected = expected_outputs(hf_model, banned)
    assert expected[0][:3] != banned
    with LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22, logits_processors=[
        BanTokensLogitsProcessor, "token_rules:NoRepeatNgramLogitsProcessor",
    ]) as llm:
        outs = llm.generate(PROMPTS, mixed_params(banned))
        assert [o.outputs[0].token_ids for o in outs] == expected
        # the same requests one at a time (other batch rows) give the same tokens
        alone = [llm.generate([p], [s])[0].outputs[0].token_ids
                 for p, s in zip(PROMPTS, mixed_params(banned), strict=True)]
    assert alone == expected


def test_bad_extra_args_refuse_only_that_request_before_it_is_queued(llama_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    with LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22, logits_processors=[
        "token_rules:BanTokensLogitsProcessor", "token_rules:NoRepeatNgramLogitsProcessor",
    ]) as llm:
        good = SamplingParams(temperature=0, max_tokens=4)
        with pytest.raises(ValueError, match=r"prompt 1: logits processor "
                                             r"'token_rules:BanTokensLogitsProcessor': "
                                             r"extra_args\['banned_token_ids'\] must be a list"):
            llm.generate(PROMPTS[:2], [good, SamplingParams(extra_args={"banned_token_ids": "7"})])
        with pytest.raises(ValueError, match=r"no_repeat_ngram_size'\] must be an integer >= 1"):
            llm.generate(PROMPTS[0], SamplingParams(extra_args={"no_repeat_ngram_size": 0}))
        assert not llm.llm_engine.has_unfinished_requests()
        assert len(llm.generate(PROMPTS[0], good)[0].outputs[0].token_ids) == 4


def test_a_bad_logits_processor_entry_is_named(llama_dir):
    with pytest.raises(ValueError, match=r"'os:getcwd' is not a subclass of engine.sample.LogitsProcessor"):
        LLM(str(llama_dir), logits_processors=["os:getcwd"])
    with pytest.raises(ValueError, match=r"cannot import 'no_such_module_xyz:Proc'"):
        LLM(str(llama_dir), logits_processors=["no_such_module_xyz:Proc"])


def test_a_processor_workers_cannot_import_is_named_with_the_fix(llama_dir):
    class LocalProcessor(LogitsProcessor):
        def apply(self, logits):
            return logits

    with pytest.raises(ValueError, match=r"LocalProcessor is defined inside a function.*move"):
        LLM(str(llama_dir), tensor_parallel_size=2, logits_processors=[LocalProcessor])


class ExplodingProcessor(LogitsProcessor):
    """Raises in apply() whenever a request asks it to."""

    def __init__(self, config, device):
        super().__init__(config, device)
        self.rows: dict[int, bool] = {}

    def update_state(self, batch_update):
        apply_batch_update(self.rows, batch_update,
                           lambda added: (added.params.extra_args or {}).get("explode"))

    def apply(self, logits):
        if any(self.rows.values()):
            raise RuntimeError("asked to explode")
        return logits


def test_a_raising_processor_fails_its_step_and_the_engine_keeps_serving(llama_dir, hf_model):
    from engine.core.engine import RequestFailedError

    with LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 22,
             logits_processors=[ExplodingProcessor]) as llm:
        engine = llm.llm_engine
        bad = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4,
                                                            extra_args={"explode": True}))
        with pytest.raises(RequestFailedError, match=r"logits processor '.*ExplodingProcessor' failed: "
                                                     r"RuntimeError: asked to explode") as info:
            while engine.has_unfinished_requests():
                engine.step()
        assert info.value.request_ids == [bad]
        assert not engine.has_unfinished_requests()
        out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model, PROMPTS[2])


# ------------------------------------------------------------------ plugins


ENGINE_SIDE = """
import json, sys
import registry
from engine import LLM, SamplingParams

prompts, banned, tp = json.loads(sys.argv[1])
params = [
    SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args={"banned_token_ids": banned}),
    SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args={"no_repeat_ngram_size": 2}),
    SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
]
if __name__ == "__main__":
    with LLM(sys.argv[2], dtype="float32", kv_cache_memory=1 << 22, tensor_parallel_size=tp) as llm:
        outs = llm.generate(prompts, params)
    sources = {r.name: r.source for r in registry.discover("logits_processor") if r.enabled}
    print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs], "sources": sources}))
""".replace("MAX_TOKENS", str(MAX_TOKENS))


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_entry_point_plugins_apply_in_every_worker(
    installed_example, llama_dir, hf_model, banned, tmp_path, tp
):
    script = tmp_path / "engine_side.py"
    script.write_text(ENGINE_SIDE)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps([PROMPTS, banned, tp]), str(llama_dir)],
        env=subprocess_env(PYTHONPATH=str(installed_example), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["sources"] == {"ban_tokens": "entry-point", "no_repeat_ngram": "entry-point"}
    assert report["tokens"] == expected_outputs(hf_model, banned)


# ------------------------------------------------------------------ HTTP

EXPLODING_MODULE = """
from engine.sample import LogitsProcessor, apply_batch_update


class Exploding(LogitsProcessor):
    def __init__(self, config, device):
        super().__init__(config, device)
        self.rows = {}

    def is_argmax_invariant(self):
        return not any(self.rows.values())

    def update_state(self, batch_update):
        apply_batch_update(self.rows, batch_update,
                           lambda added: (added.params.extra_args or {}).get("explode"))

    def apply(self, logits):
        if any(self.rows.values()):
            raise RuntimeError("asked to explode")
        return logits
"""


def test_http_extra_args_reach_the_plugins(
    installed_example, llama_dir, hf_model, banned, tmp_path, monkeypatch
):
    from test_serve import Server

    (tmp_path / "exploding_lp.py").write_text(EXPLODING_MODULE)
    monkeypatch.setenv("PYTHONPATH", f"{installed_example}{os.pathsep}{tmp_path}")
    server = Server(["--model", str(llama_dir), "--dtype", "float32", "--served-model-name", "tiny",
                     "--logits-processors", "exploding_lp:Exploding"],
                    tmp_path / "config", tmp_path / "server.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(llama_dir / "tokenizer.json"))
        for prompt, extra, expected in [
            (PROMPTS[0], {"banned_token_ids": banned}, hf_greedy(hf_model, PROMPTS[0], suppress_tokens=banned)),
            (PROMPTS[1], {"no_repeat_ngram_size": 2}, hf_greedy(hf_model, PROMPTS[1], no_repeat_ngram_size=2)),
        ]:
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0, extra_body={"extra_args": extra})
            assert out.choices[0].text == tokenizer.decode(
                [t for t in expected if t != 1], skip_special_tokens=True)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", max_tokens=2,
                                      extra_body={"extra_args": [1, 2]})
        with pytest.raises(openai.BadRequestError, match=r"logits processor 'ban_tokens': "
                                                         r"extra_args\['banned_token_ids'\]"):
            client.completions.create(model="tiny", prompt="x", max_tokens=2,
                                      extra_body={"extra_args": {"banned_token_ids": [-1]}})
        # a processor that raises fails that request (500 naming it); the server goes on
        with pytest.raises(openai.InternalServerError, match=r"logits processor 'exploding_lp:Exploding' "
                                                              r"failed: RuntimeError: asked to explode"):
            client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4,
                                      extra_body={"extra_args": {"explode": True}})
        out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=MAX_TOKENS,
                                        temperature=0)
        assert out.choices[0].text == tokenizer.decode(
            [t for t in hf_greedy(hf_model, PROMPTS[2]) if t != 1], skip_special_tokens=True)
    finally:
        server.stop()
