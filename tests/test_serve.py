"""`engine serve` end to end: the real server in a subprocess on a free loopback
port, driven with the official `openai` client (and raw httpx for bad input),
checked against the offline `LLM` on the same weights."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
SIMILARITY_EXAMPLE = ROOT / "examples" / "similarity-io-processor"
API_KEY = "test-key-123"
MAX_REQUEST_BYTES = 32 * 1024
MODEL_NAME = "tiny"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["def parse(self, text):", "import os\nimport sys\n", "class Config:\n    "]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running `engine serve` subprocess."""

    def __init__(self, args: list[str], config_dir: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = subprocess_env(ENGINE_CONFIG_DIR=str(config_dir), OMP_NUM_THREADS="1")
        for name in ("ENGINE_PLUGINS", "ENGINE_PLUGIN_DIRS", "ENGINE_PLATFORM",
                     "ENGINE_STRICT_PLUGINS", "ENGINE_API_KEY"):
            env.pop(name, None)
        self.env = env
        self.args = [sys.executable, "-m", "engine", "serve", "--port", str(self.port), *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.args, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def llama_dir(make_hf_model) -> Path:
    # a long context, so that a long request reliably outlives a disconnecting client
    return make_hf_model("llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    config_dir = tmp_path_factory.mktemp("serve-config")
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = Server(["--model", str(llama_dir), "--dtype", "float32",
                  "--served-model-name", MODEL_NAME,
                  "--api-key", API_KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES),
                  "--shutdown-timeout", "1"], config_dir, log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def offline(llama_dir):
    import torch

    from engine.llm import LLM

    torch.set_num_threads(1)
    llm = LLM(llama_dir, dtype="float32")
    yield llm
    llm.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _greedy(llm, prompts, **settings):
    from engine.sampling_params import SamplingParams

    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 24, **settings})
    return llm.generate(prompts, params)


# --------------------------------------------------------------------------- basics


def test_health_models_and_plugins(server, client):
    health = server.health()
    assert health["status"] == "ready" and health["kv_cache_usage"] == 0.0
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]

    response = httpx.get(f"{server.url}/v1/plugins",
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert response.status_code == 200
    listed = subprocess.run([sys.executable, "-m", "engine", "plugins", "list", "--json"],
                            env=server.env, capture_output=True, text=True, check=True)
    rows = response.json()
    assert all(isinstance(row.pop("effects"), list) for row in rows)  # registrations made here
    assert rows == json.loads(listed.stdout)


def test_completions_equal_offline_greedy(client, offline):
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=24,
                                       temperature=0)
    expected = _greedy(offline, PROMPTS)
    assert [c.text for c in sorted(result.choices, key=lambda c: c.index)] == [
        out.outputs[0].text for out in expected
    ]
    assert result.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    assert result.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)


def test_streaming_concatenates_to_the_same_text(client, offline):
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=24,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    expected = _greedy(offline, PROMPTS[0])[0].outputs[0]
    assert "".join(pieces) == expected.text
    assert finish == expected.finish_reason
    assert usage.completion_tokens == len(expected.token_ids)


def test_sampling_with_seed_n_and_stop_equal_offline(client, offline):
    from engine.sampling_params import SamplingParams

    result = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=12,
                                       temperature=0.8, top_p=0.9, seed=11, n=2)
    expected = offline.generate(PROMPTS[1], SamplingParams(n=2, temperature=0.8, top_p=0.9,
                                                           seed=11, max_tokens=12))[0]
    assert [c.text for c in sorted(result.choices, key=lambda c: c.index)] == [
        o.text for o in expected.outputs
    ]
    # a stop string taken from the greedy text itself cuts there, as offline
    full = _greedy(offline, PROMPTS[2])[0].outputs[0].text
    stop = full[len(full) // 2:][:3]
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=24,
                                       temperature=0, stop=[stop])
    cut = _greedy(offline, PROMPTS[2], stop=[stop])[0].outputs[0]
    assert result.choices[0].text == cut.text
    assert result.choices[0].finish_reason == "stop"


def test_logprobs_equal_offline(client, offline):
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6,
                                       temperature=0, logprobs=3)
    expected = _greedy(offline, PROMPTS[0], max_tokens=6, logprobs=3)[0].outputs[0]
    got = result.choices[0].logprobs
    want = [entry[t] for t, entry in zip(expected.token_ids, expected.logprobs, strict=True)]
    assert got.token_logprobs == pytest.approx(want, abs=1e-4)
    for chosen, top in zip(got.token_logprobs, got.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen)  # greedy


def test_chat_equals_offline_greedy_with_the_template(client, offline, llama_dir):
    import transformers

    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Parse a config file."}]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    ids = hf_tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE,
                                           add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    expected = _greedy(offline, [ids], max_tokens=20)[0].outputs[0].text

    extra = {"chat_template": CHAT_TEMPLATE}
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20,
                                           temperature=0, extra_body=extra)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(ids)

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20,
                                            temperature=0, extra_body=extra, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected


def test_chat_without_a_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in info.value.message


# --------------------------------------------------------------------------- concurrency


def test_64_concurrent_streams_all_complete_with_correct_text(server, offline):
    prompts = [f"def function_{i}(value):\n    return " for i in range(64)]
    expected = [out.outputs[0].text for out in _greedy(offline, prompts, max_tokens=12)]

    async def one(aclient, prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL_NAME, prompt=prompt,
                                                  max_tokens=12, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY,
                                      max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(main()) == expected
    assert server.health()["num_unfinished_requests"] == 0


def _wait_idle(server, aborted_before: int) -> dict:
    deadline = time.monotonic() + 30
    while True:
        health = server.health()
        if health["num_unfinished_requests"] == 0 and health["num_aborted_requests"] > aborted_before:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.1)


def test_client_disconnect_aborts_and_frees_kv_blocks(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 4000, "ignore_eos": True,
            "temperature": 0}
    before = server.health()["num_aborted_requests"]
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", headers=headers,
                         json={**body, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            events = [line for line, _ in zip(lines, range(6), strict=False) if line]
            assert events and events[0].startswith("data: {")
            usage = server.health()["kv_cache_usage"]
            assert usage > 0  # the request holds blocks while it runs
    health = _wait_idle(server, before)
    assert health["kv_cache_usage"] == 0.0
    assert health["num_aborted_requests"] == before + 1

    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers=headers, json=body, timeout=1.0)
    health = _wait_idle(server, before + 1)
    assert health["kv_cache_usage"] == 0.0

    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "engine_server_kv_cache_usage_perc 0.0" in metrics
    assert "engine_server_requests_aborted_total 2.0" in metrics


# --------------------------------------------------------------------------- bad input

GOOD = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

BAD_INPUT = [
    # (case, path, headers, body, status, param)
    ("malformed json", "/v1/completions", AUTH, b'{"prompt": "x",', 400, None),
    ("not an object", "/v1/completions", AUTH, b"[1, 2]", 400, None),
    ("max_tokens wrong type", "/v1/completions", AUTH, {**GOOD, "max_tokens": "many"}, 400,
     "max_tokens"),
    ("temperature wrong type", "/v1/completions", AUTH, {**GOOD, "temperature": "hot"}, 400,
     "temperature"),
    ("prompt wrong shape", "/v1/completions", AUTH, {**GOOD, "prompt": {"a": 1}}, 400, "prompt"),
    ("prompt missing", "/v1/completions", AUTH, {"model": MODEL_NAME}, 400, "prompt"),
    ("negative max_tokens", "/v1/completions", AUTH, {**GOOD, "max_tokens": -5}, 400,
     "max_tokens"),
    ("top_p out of range", "/v1/completions", AUTH, {**GOOD, "top_p": 2}, 400, "top_p"),
    ("prompt longer than the context", "/v1/completions", AUTH,
     {**GOOD, "prompt": list(range(3, 1003)) * 5}, 400, "prompt"),
    ("messages wrong type", "/v1/chat/completions", AUTH,
     {"model": MODEL_NAME, "messages": "hi"}, 400, "messages"),
    ("message role missing", "/v1/chat/completions", AUTH,
     {"model": MODEL_NAME, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("unknown model", "/v1/completions", AUTH, {**GOOD, "model": "gpt-7"}, 404, "model"),
    ("missing key", "/v1/completions", {"Content-Type": "application/json"}, GOOD, 401, None),
    ("wrong key", "/v1/completions", {**AUTH, "Authorization": "Bearer nope"}, GOOD, 401, None),
    ("oversized body", "/v1/completions", AUTH,
     {**GOOD, "prompt": "x" * (MAX_REQUEST_BYTES + 10)}, 413, None),
    ("unknown route", "/v1/nothing-here", AUTH, GOOD, 404, None),
    ("embeddings on a generative model", "/v1/embeddings", AUTH,
     {"model": MODEL_NAME, "input": "x"}, 400, "model"),
    ("pooling without an IO processor", "/pooling", AUTH, {"data": "x"}, 400, None),
]


@pytest.mark.parametrize("case,path,headers,body,status,param", BAD_INPUT,
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_the_right_status_and_the_server_keeps_serving(
    server, case, path, headers, body, status, param
):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", headers=headers, content=content, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[0].split("[")[0] in error["message"]
    # still serving
    good = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=GOOD, timeout=30)
    assert good.status_code == 200, good.text


def test_json_body_without_json_content_type_names_the_header(server):
    # what `curl -d '{...}'` sends: a JSON body labelled as a form
    response = httpx.post(f"{server.url}/v1/completions", content=json.dumps(GOOD).encode(),
                          headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                          timeout=30)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "Content-Type: application/json" in message
    assert "application/x-www-form-urlencoded" in message


def test_options_on_a_protected_route_needs_the_key(server):
    # without the key a client learns nothing of the route, not even its methods
    response = httpx.request("OPTIONS", f"{server.url}/v1/completions", timeout=30)
    assert response.status_code == 401, response.text
    assert "allow" not in response.headers


def test_openai_client_maps_the_error_statuses(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong",
                      max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        good.completions.create(model="gpt-7", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    # health and metrics need no key
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert "engine_generation_tokens_total" in httpx.get(f"{server.url}/metrics", timeout=10).text


# --------------------------------------------------------------------------- shutdown (last)


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_zero(server):
    """Runs last in this module: it stops the module's server."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    short = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 64, "ignore_eos": True,
             "temperature": 0, "stream": True}
    long = {**short, "max_tokens": 4000}
    results: dict[str, list[str]] = {}

    async def consume(name: str, body: dict, started: asyncio.Event) -> None:
        events: list[str] = []
        results[name] = events
        async with httpx.AsyncClient(timeout=60) as http:
            try:
                async with http.stream("POST", f"{server.url}/v1/completions", headers=headers,
                                       json=body) as response:
                    async for line in response.aiter_lines():
                        if line:
                            events.append(line)
                            started.set()
            except httpx.HTTPError as exc:  # the server cut the stream
                events.append(f"cut: {type(exc).__name__}")

    async def main() -> None:
        long_started, short_started = asyncio.Event(), asyncio.Event()
        long_task = asyncio.ensure_future(consume("long", long, long_started))
        await long_started.wait()
        short_task = asyncio.ensure_future(consume("short", short, short_started))
        await short_started.wait()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(long_task, short_task)

    asyncio.run(main())
    assert server.proc.wait(timeout=30) == 0, server.output()
    short_events = results["short"]
    assert short_events[-1] == "data: [DONE]"
    last = json.loads(short_events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    # the long one is aborted when the grace period ends: an error event, then [DONE]
    long_events = results["long"]
    assert long_events[-1] == "data: [DONE]", long_events[-3:]
    error = json.loads(long_events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_stopped" and "aborted" in error["message"]
    with pytest.raises(httpx.TransportError):  # no longer listening
        httpx.get(f"{server.url}/health", timeout=2)


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embed_server(minilm_dir, tmp_path_factory):
    config_dir = tmp_path_factory.mktemp("serve-config")
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = Server(["--plugin-dir", str(SIMILARITY_EXAMPLE), "--model", str(minilm_dir),
                  "--served-model-name", "minilm", "--io-processor-plugin", "similarity",
                  "--dtype", "float32"],
                 config_dir, log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def offline_minilm(minilm_dir):
    import torch

    from engine.llm import LLM

    torch.set_num_threads(1)
    llm = LLM(minilm_dir, dtype="float32")
    yield llm
    llm.shutdown()


SENTENCES = ["A cat sleeps on the windowsill.", "Interest rates rose again.", "Hello world"]


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_embeddings_equal_offline_embed(embed_server, offline_minilm, encoding_format):
    import base64
    import struct

    client = openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key="unused", max_retries=0)
    # without encoding_format the client asks for base64 and decodes it itself
    extra = {} if encoding_format is None else {"encoding_format": encoding_format}
    result = client.embeddings.create(model="minilm", input=SENTENCES, **extra)
    expected = [out.outputs.embedding for out in offline_minilm.embed(SENTENCES)]
    got = [item.embedding for item in sorted(result.data, key=lambda d: d.index)]
    if encoding_format == "base64":
        got = [list(struct.unpack(f"<{len(v) * 3 // 4 // 4}f", base64.b64decode(v)))
               for v in got]
    assert len(got) == 3 and all(len(v) == 384 for v in got)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-6)
    assert result.usage.prompt_tokens == sum(
        len(out.prompt_token_ids) for out in offline_minilm.embed(SENTENCES))


def test_pooling_runs_the_io_processor_plugin(embed_server, offline_minilm, monkeypatch):
    query = "My kitten naps in the sun"
    response = httpx.post(f"{embed_server.url}/pooling",
                          json={"data": {"query": query, "top_k": 3}}, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()["data"]
    assert result["query"] == query

    # the oracle: cosine ranking from the offline engine's own embeddings
    monkeypatch.syspath_prepend(str(SIMILARITY_EXAMPLE / "src"))
    from similarity_io_processor.processor import CORPUS

    vectors = [out.outputs.embedding for out in offline_minilm.embed([query, *CORPUS])]
    scores = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    best = sorted(range(len(CORPUS)), key=lambda i: scores[i], reverse=True)[:3]
    assert [r["text"] for r in result["results"]] == [CORPUS[i] for i in best]
    assert [r["score"] for r in result["results"]] == pytest.approx([scores[i] for i in best],
                                                                    abs=1e-5)

    bad = httpx.post(f"{embed_server.url}/pooling", json={"data": {"query": ""}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "data"
    assert "similarity" in bad.json()["error"]["message"]

    plugins = httpx.get(f"{embed_server.url}/v1/plugins", timeout=10).json()
    assert any(p["name"] == "similarity" and p["source"] == "plugin-dir" and p["enabled"]
               for p in plugins)


def test_generation_on_an_embedding_model_is_a_400(embed_server):
    response = httpx.post(f"{embed_server.url}/v1/completions",
                          json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert response.status_code == 400
    assert "does not generate" in response.json()["error"]["message"]


# --------------------------------------------------------------------------- startup


def test_bad_model_folder_fails_before_binding(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", str(tmp_path / "nope"),
         "--port", str(_free_port())],
        env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nope" in result.stderr and "folder" in result.stderr


def test_missing_io_processor_plugin_fails_before_binding(make_hf_model):
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", str(make_hf_model("llama")),
         "--io-processor-plugin", "nope", "--port", str(_free_port())],
        env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "'nope'" in result.stderr and "not available" in result.stderr


def test_serve_admits_short_prompts_first_and_offline_keeps_arrival_order(make_hf_model):
    """Many clients sending at once is the server's case: its engine orders each
    group of arrivals shortest prompt first (engine.core.scheduler); offline `LLM`
    and `engine generate` keep arrival order unless asked."""
    from engine.cli.main import build_parser
    from engine.cli.serve import _setting_values
    from engine.engine_args import EngineArgs

    model = str(make_hf_model("llama"))
    serve = _setting_values(build_parser().parse_args(["serve", "--model", model]))
    assert serve["engine_args"].scheduling_policy == "short-prompt-first"
    config = serve["engine_args"].create_engine_config()
    assert config.scheduler_config.scheduling_policy == "short-prompt-first"
    fcfs = _setting_values(build_parser().parse_args(
        ["serve", "--model", model, "--scheduling-policy", "fcfs"]))
    assert fcfs["engine_args"].scheduling_policy == "fcfs"
    generate = build_parser().parse_args(["generate", "--model", model, "--prompt", "hi"])
    assert EngineArgs.from_cli_args(generate).scheduling_policy == "fcfs"
    assert EngineArgs(model=model).create_engine_config(
        ).scheduler_config.scheduling_policy == "fcfs"


def test_serve_pages_its_whole_kv_cache_in_and_offline_keeps_the_window(make_hf_model):
    """A server pages its whole cache in while idle (`kv_prefault="all"`): a burst
    of prompts then takes no first-touch faults; offline engines keep the window
    past the blocks used, and a bad value names the setting."""
    from engine.cli.main import build_parser
    from engine.cli.serve import _setting_values
    from engine.engine_args import EngineArgs

    model = str(make_hf_model("llama"))
    serve = _setting_values(build_parser().parse_args(["serve", "--model", model]))
    assert serve["engine_args"].create_engine_config().cache_config.kv_prefault == "all"
    ahead = _setting_values(build_parser().parse_args(
        ["serve", "--model", model, "--kv-prefault", "ahead"]))
    assert ahead["engine_args"].kv_prefault == "ahead"
    generate = build_parser().parse_args(["generate", "--model", model, "--prompt", "hi"])
    offline = EngineArgs.from_cli_args(generate)
    assert offline.kv_prefault == "auto"
    # auto: the window when the engine sized the cache, the whole cache when the user did
    assert offline.create_engine_config().cache_config.kv_prefault == "ahead"
    sized = EngineArgs(model=model, kv_cache_memory="64MiB").create_engine_config()
    assert sized.cache_config.kv_prefault == "all"
    with pytest.raises(ValueError, match="kv_prefault must be one of auto, ahead, all"):
        EngineArgs(model=model, kv_prefault="eager").create_engine_config()
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, "
                                         "short-prompt-first, got 'lifo'"):
        EngineArgs(model=model, scheduling_policy="lifo").create_engine_config()


def test_serve_module_imports_no_torch():
    code = ("import sys, engine.cli.serve, engine.entrypoints; "
            "print('torch' in sys.modules, 'fastapi' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_server_puts_weights_in_huge_pages_unless_told_otherwise(monkeypatch):
    """`engine serve` sets ENGINE_WEIGHT_HUGE_PAGES=1 before loading (the variable
    `engine.ops.weight_memory` reads), and keeps a value the user set."""
    from engine.cli import serve
    from engine.ops import weight_memory

    assert serve.WEIGHT_HUGE_PAGES_ENV == weight_memory.ENV
    monkeypatch.delenv(weight_memory.ENV, raising=False)
    serve.server_environment()
    assert weight_memory.huge_pages_enabled() == (weight_memory._ADVICE is not None)
    monkeypatch.setenv(weight_memory.ENV, "0")
    serve.server_environment()
    assert os.environ[weight_memory.ENV] == "0" and not weight_memory.huge_pages_enabled()
