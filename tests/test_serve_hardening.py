"""No request can take the engine down or stall it: hostile input over HTTP
(the real `engine serve` in a subprocess, driven with httpx and the `openai`
client) and through the Python API.

A general plugin in a plugin dir registers `FailingLlamaForCausalLM`, the in-tree
Llama whose forward raises when the batch holds token `MAGIC`: a real exception in
a real engine step, to check that it fails that step's requests and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai  # noqa: F401 (the test extra's client: a missing one fails the run)
import psutil
import pytest
from conftest import subprocess_env
from test_serve import SIMILARITY_EXAMPLE, Server, _free_port

MAGIC = 777
API_KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL_NAME = "tiny"
VOCAB = 1024  # make_hf_model's vocab_size

FAILING_PLUGIN = f'''
import torch

from engine.models.llama import LlamaForCausalLM

MAGIC = {MAGIC}


def register():
    from engine import ModelRegistry

    ModelRegistry.register_model("FailingLlamaForCausalLM",
                                 "failing_model:FailingLlamaForCausalLM")


class FailingLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, input_ids, positions, attn_metadata):
        if bool((input_ids == MAGIC).any()):
            raise RuntimeError("the magic token {MAGIC} reached the model")
        return super().forward(input_ids, positions, attn_metadata)
'''

MANIFEST = """
schema-version = 1

[package]
name = "failing-model"
path = "."

[[plugin]]
group = "general"
name = "failing_model"
value = "failing_model:register"
"""


@pytest.fixture(scope="module")
def failing_plugin_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("failing-plugin")
    (folder / "failing_model.py").write_text(FAILING_PLUGIN)
    (folder / "failing-model.toml").write_text(MANIFEST)
    return folder


@pytest.fixture(scope="module")
def failing_model_dir(make_hf_model, tmp_path_factory) -> Path:
    source = make_hf_model("llama")
    folder = tmp_path_factory.mktemp("failing-llama")
    for item in source.iterdir():
        shutil.copy(item, folder / item.name)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FailingLlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(failing_model_dir, failing_plugin_dir, tmp_path_factory):
    srv = Server(["--plugin-dir", str(failing_plugin_dir), "--model", str(failing_model_dir),
                  "--served-model-name", MODEL_NAME, "--api-key", API_KEY],
                 tmp_path_factory.mktemp("config"),
                 tmp_path_factory.mktemp("log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _post(server, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    # json.dumps keeps lone surrogates as \ud800 escapes: valid JSON, invalid UTF-8
    return httpx.post(f"{server.url}{path}", content=json.dumps(body),
                      headers={**AUTH, "Content-Type": "application/json"}, timeout=timeout)


def _assert_400(response: httpx.Response, param: str, *words: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


def _assert_serving(server) -> None:
    assert server.proc.poll() is None, server.output()
    good = _post(server, "/v1/completions", {"prompt": "def f(x):", "max_tokens": 3})
    assert good.status_code == 200, good.text
    assert server.health()["status"] == "ready"


# --------------------------------------------------------------------------- 400, not death


@pytest.mark.parametrize("stream", [False, True])
def test_out_of_vocabulary_prompt_ids_are_a_400_and_the_server_keeps_serving(server, stream):
    response = _post(server, "/v1/completions",
                     {"prompt": [5, 6, VOCAB], "max_tokens": 4, "stream": stream})
    _assert_400(response, "prompt", str(VOCAB), "vocabulary")
    _assert_serving(server)


@pytest.mark.parametrize("token_id", [2**62, 2**63, 2**64 + 5])
def test_huge_token_ids_are_a_400(server, token_id):
    response = _post(server, "/v1/completions", {"prompt": [5, token_id], "max_tokens": 2})
    _assert_400(response, "prompt", "vocabulary")
    _assert_serving(server)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_outside_64_bits_is_a_400_naming_seed(server, seed):
    response = _post(server, "/v1/completions",
                     {"prompt": "def f(x):", "max_tokens": 2, "temperature": 1.0, "seed": seed})
    _assert_400(response, "seed", "seed")
    _assert_serving(server)


def test_lone_surrogate_in_a_completion_prompt_is_a_400(server):
    response = _post(server, "/v1/completions", {"prompt": "abc\ud800", "max_tokens": 2})
    _assert_400(response, "prompt", "Unicode")
    _assert_serving(server)


def test_chat_template_that_raises_overflow_error_is_a_400(server):
    template = "{{ (10 ** 400) * 1.0 }}{{ messages[0]['content'] }}"
    response = _post(server, "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                      "chat_template": template})
    _assert_400(response, "messages", "OverflowError")
    _assert_serving(server)


def test_a_template_that_builds_a_huge_string_is_refused_without_the_memory(server):
    response = _post(server, "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                      "chat_template": "{{ 'a' * 10**8 }}"})
    _assert_400(response, "messages", "longer than")
    assert psutil.Process(server.proc.pid).memory_info().rss < 2 * 2**30
    _assert_serving(server)


def test_a_template_that_loops_for_hours_is_stopped(server):
    template = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                "{% endfor %}{{ messages[0]['content'] }}")
    response = _post(server, "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                      "chat_template": template})
    _assert_400(response, "messages", "loops more than")
    _assert_serving(server)


def test_a_prompt_far_past_the_context_is_refused_without_tokenizing_it(server):
    # 15 MB: under the body limit, far over what 1024 tokens can hold
    response = _post(server, "/v1/completions", {"prompt": "word " * 3_000_000,
                                                  "max_tokens": 2})
    _assert_400(response, "prompt", "characters", "max_model_len")
    _assert_serving(server)


# --------------------------------------------------------------------------- a failing step


def test_a_step_that_raises_fails_its_requests_and_the_engine_keeps_serving(server):
    async def main() -> tuple[httpx.Response, list[str]]:
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            bad = http.post(f"{server.url}/v1/completions",
                            json={"prompt": [5, MAGIC, 6], "max_tokens": 4})
            streamed: list[str] = []

            async def stream_bad() -> None:
                async with http.stream("POST", f"{server.url}/v1/completions",
                                       json={"prompt": [7, MAGIC], "max_tokens": 4,
                                             "stream": True}) as response:
                    streamed.extend([line async for line in response.aiter_lines() if line])

            response, _ = await asyncio.gather(bad, stream_bad())
            return response, streamed

    response, streamed = asyncio.run(main())
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "request_failed" and "magic token" in error["message"], error
    assert streamed[-1] == "data: [DONE]"
    assert "magic token" in json.loads(streamed[-2].removeprefix("data: "))["error"]["message"]
    _assert_serving(server)
    health = server.health()
    assert health["num_unfinished_requests"] == 0 and health["kv_cache_usage"] == 0.0


# --------------------------------------------------------------------------- gauges


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_gauges_return_to_zero_after_clients_disconnect(server):
    body = {"prompt": "def f(x):", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=AUTH) as http:
        for _ in range(2):
            with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert any(line.startswith("data: {") for line, _ in zip(lines, range(4),
                                                                            strict=False))
    deadline = time.monotonic() + 30
    while server.health()["num_unfinished_requests"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert _metric(metrics, "engine_num_requests_running") == 0.0
    assert _metric(metrics, "engine_num_requests_waiting") == 0.0
    assert _metric(metrics, "engine_kv_cache_usage_perc") == 0.0


# --------------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def offline(failing_model_dir, failing_plugin_dir):
    from engine import ModelRegistry
    from engine.llm import LLM

    # general plugins run once per process (another test may have run them already),
    # so register the architecture as a user's script would
    sys.path.insert(0, str(failing_plugin_dir))
    before = ModelRegistry._models.get("FailingLlamaForCausalLM")
    try:
        ModelRegistry.register_model("FailingLlamaForCausalLM",
                                     "failing_model:FailingLlamaForCausalLM")
        llm = LLM(failing_model_dir)
        yield llm
        llm.shutdown()
    finally:
        sys.path.remove(str(failing_plugin_dir))
        # the registry is process-wide: later test files in this process must not see it
        if before is None:
            ModelRegistry._models.pop("FailingLlamaForCausalLM", None)
        else:
            ModelRegistry._models["FailingLlamaForCausalLM"] = before


def test_offline_bad_ids_and_seeds_raise_value_errors_naming_the_prompt(offline):
    from engine.sampling_params import SamplingParams

    with pytest.raises(ValueError, match=r"prompt 1: token id 1024 at position 0 .*vocabulary"):
        offline.generate([[5, 6], [VOCAB]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"prompt 0: SamplingParams\.seed"):
        offline.generate(["def f"], SamplingParams(max_tokens=2, seed=2**64))
    with pytest.raises(ValueError, match=r"prompt 0: .*not valid Unicode"):
        offline.generate(["ab\ud800"], SamplingParams(max_tokens=2))
    assert len(offline.generate("def f", SamplingParams(max_tokens=3))[0].outputs[0].token_ids) == 3


def test_offline_step_failure_names_the_cause_and_the_engine_goes_on(offline):
    from engine.core.engine import RequestFailedError
    from engine.sampling_params import SamplingParams

    with pytest.raises(RequestFailedError, match="magic token") as info:
        offline.generate([[5, MAGIC, 6]], SamplingParams(max_tokens=2))
    assert isinstance(info.value.__cause__, RuntimeError)
    engine = offline.llm_engine
    assert engine.num_unfinished_requests() == 0 and engine.kv_cache_usage() == 0.0
    out = offline.generate(["def f", [5, 6, 7]], SamplingParams(max_tokens=3))
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]


def test_io_processor_default_async_methods_run_in_a_worker_thread():
    from engine.io_processors import IOProcessor

    seen: list[str] = []

    class Probe(IOProcessor):
        def parse_data(self, data):
            return data

        def pre_process(self, prompt, request_id=None, **kwargs):
            seen.append(threading.current_thread().name)
            return [prompt]

        def post_process(self, model_output, request_id=None, **kwargs):
            seen.append(threading.current_thread().name)
            return model_output

    async def main() -> None:
        probe = Probe(None)
        assert await probe.pre_process_async("x") == ["x"]
        assert await probe.post_process_async([1]) == [1]

    asyncio.run(main())
    assert len(seen) == 2 and threading.main_thread().name not in seen


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embed_server(minilm_dir, tmp_path_factory):
    srv = Server(["--plugin-dir", str(SIMILARITY_EXAMPLE), "--model", str(minilm_dir),
                  "--served-model-name", "minilm", "--io-processor-plugin", "similarity",
                  "--api-key", API_KEY],
                 tmp_path_factory.mktemp("config"), tmp_path_factory.mktemp("log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _assert_embedding_serving(server) -> None:
    assert server.proc.poll() is None, server.output()
    good = _post(server, "/v1/embeddings", {"input": "hello"})
    assert good.status_code == 200, good.text


@pytest.mark.parametrize("case,body,param,word", [
    ("lone surrogate", {"input": ["fine", "bad\ud800"]}, "input", "input 1"),
    ("out-of-vocabulary id", {"input": [[101, 10**6, 102]]}, "input", "vocabulary"),
    ("id over 2**62", {"input": [[101, 2**62]]}, "input", "vocabulary"),
    ("dimensions too large", {"input": "x", "dimensions": 100_000}, "dimensions", "dimensions"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_embedding_input_is_a_400(embed_server, case, body, param, word):
    _assert_400(_post(embed_server, "/v1/embeddings", body), param, word)
    _assert_embedding_serving(embed_server)


@pytest.mark.parametrize("case,body,param,word", [
    ("lone surrogate", {"data": {"query": "bad\ud800"}}, "data", "Unicode"),
    ("dimensions too large", {"data": {"query": "a cat"}, "dimensions": 100_000}, "dimensions",
     "dimensions"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_pooling_input_is_a_400(embed_server, case, body, param, word):
    _assert_400(_post(embed_server, "/pooling", body), param, word)
    _assert_embedding_serving(embed_server)


# --------------------------------------------------------------------------- auth at startup


@pytest.mark.parametrize("flag,env_key,message", [
    (["--api-key", ""], None, "--api-key is empty"),
    (["--api-key", "   "], None, "--api-key is empty"),
    ([], "", "ENGINE_API_KEY is empty"),
    ([], " \t", "ENGINE_API_KEY is empty"),
])
def test_blank_api_key_is_refused_at_startup(make_hf_model, flag, env_key, message):
    env = subprocess_env()
    env.pop("ENGINE_API_KEY", None)
    if env_key is not None:
        env["ENGINE_API_KEY"] = env_key
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", str(make_hf_model("llama")),
         "--port", str(_free_port()), *flag],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr


# --------------------------------------------------------------------------- health


@pytest.mark.slow
def test_health_reports_a_dead_tensor_parallel_worker_while_idle(make_hf_model, tmp_path):
    srv = Server(["--model", str(make_hf_model("llama")), "--tensor-parallel-size", "2"],
                 tmp_path / "config", tmp_path / "server.log")
    try:
        srv.wait_ready(timeout=240)
        workers = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        workers[1].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # idle: nothing but /health itself asks the workers
            try:
                response = httpx.get(f"{srv.url}/health", timeout=10)
            except httpx.TransportError:
                break  # already gone: the exit code and log say why
            if response.status_code == 503:
                assert "rank" in response.json()["error"], response.text
                break
            assert time.monotonic() < deadline, response.text
            time.sleep(0.2)
        assert srv.proc.wait(timeout=60) == 1
        output = srv.output()
        assert "while idle" in output and "died" in output, output
        assert "failed to start" not in output
    finally:
        srv.stop()
