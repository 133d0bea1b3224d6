"""The OpenAI surface with the official `openai` client against a real
`engine serve` subprocess started with ``--port 0``: chat prompts equal to
transformers' apply_chat_template (ChatML and Llama-3 templates), structured
outputs (response_format, structured_outputs), /tokenize and /detokenize, echo,
n, logprobs, include_usage, seed, stop, max_completion_tokens, and 400s naming
what is unsupported."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from chat_models import VOCAB_SIZE, build_chat_model
from conftest import subprocess_env

NAME = "tiny-chat"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one, é?"}]
SCHEMA = {"type": "object",
          "properties": {"colour": {"enum": ["red", "green", "blue"]},
                         "shades": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                               "maximum": 9}, "maxItems": 3},
                         "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                  "required": ["ok"], "additionalProperties": False}},
          "required": ["colour", "meta"], "additionalProperties": False}


class Server:
    """`engine serve --port 0` in a subprocess; the port is read from its ready line."""

    def __init__(self, model: Path | str, log: Path, extra: tuple[str, ...] = (),
                 served_name: str | None = NAME) -> None:
        self.log = log
        args = [sys.executable, "-m", "engine", "serve", "--model", str(model), "--port", "0",
                "--dtype", "float32", "--kv-cache-memory", str(2**24), *extra]
        if served_name is not None:
            args += ["--served-model-name", served_name]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         env=subprocess_env(OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = re.search(r"ready on http://127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server did not report its port:\n{log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def model(request, make_hf_model, tokenizer_dir, tmp_path_factory):
    base = make_hf_model("llama", vocab_size=VOCAB_SIZE)
    return build_chat_model(request.param, base, tokenizer_dir,
                            tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = Server(model, tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def _hf_ids(model, messages, add_generation_prompt=True):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model)
    return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                   tokenize=True, return_dict=False)


def test_port_zero_serves_on_the_reported_port(server):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert not server.url.endswith(":0")


def test_chat_prompt_ids_equal_transformers(server, client, model):
    from engine import LLM, SamplingParams

    expected = _hf_ids(model, MESSAGES)
    tokenized = httpx.post(f"{server.url}/tokenize", json={"model": NAME, "messages": MESSAGES},
                           timeout=30).json()
    assert tokenized["tokens"] == expected and tokenized["count"] == len(expected)
    no_prompt = httpx.post(f"{server.url}/tokenize", json={
        "messages": MESSAGES[:3], "add_generation_prompt": False}, timeout=30).json()
    assert no_prompt["tokens"] == _hf_ids(model, MESSAGES[:3], add_generation_prompt=False)

    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0,
                                           max_completion_tokens=8)
    assert reply.usage.prompt_tokens == len(expected)
    llm = LLM(str(model), dtype="float32", kv_cache_memory=2**22)
    try:
        offline = llm.generate([expected], SamplingParams(temperature=0, max_tokens=8))[0]
    finally:
        llm.shutdown()
    assert reply.choices[0].message.content == offline.outputs[0].text
    assert reply.usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_tokenize_and_detokenize_round_trip(server):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "def f(x): return x"},
                     timeout=30).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=30).json()
    assert text["prompt"].endswith("def f(x): return x")
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**7]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_response_format_json_schema_validates(client):
    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, n=4, seed=3, max_completion_tokens=120,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "colour", "schema": SCHEMA}})
    finished = [c for c in reply.choices if c.finish_reason == "stop"]
    assert len(finished) >= 3
    for choice in finished:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_and_structured_outputs_in_the_body(client):
    obj = client.chat.completions.create(model=NAME, messages=MESSAGES, seed=1,
                                         max_completion_tokens=120,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = client.completions.create(model=NAME, prompt="id: ", max_tokens=30, seed=2,
                                      extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-\d{2}"}})
    assert re.fullmatch(r"[A-Z]{3}-\d{2}", regex.choices[0].text)
    choice = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_completion_tokens=10,
        extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert choice.choices[0].message.content in ("red", "green")
    streamed = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_completion_tokens=10, stream=True,
        extra_body={"structured_outputs": {"choice": ["crimson red", "sea green"]}})
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text in ("crimson red", "sea green")


def test_structured_output_errors_name_the_field(client):
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"extra_body": {"structured_outputs": {"regex": "(("}}}, "structured_outputs.regex"),
        ({"extra_body": {"structured_outputs": {"yaml": "a"}}}, "structured_outputs.yaml"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format.json_schema.schema"),
        ({"extra_body": {"structured_outputs": {"json": {"$ref": "#/nowhere"}}}},
         "structured_outputs.json"),
        ({"extra_body": {"structured_outputs": {"grammar": "start: undefined_rule"}}},
         "structured_outputs.grammar"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, **kwargs)
        assert exc.value.body["param"] == param, exc.value.body


def test_n_logprobs_seed_stop_and_usage_in_chat(client):
    a = client.chat.completions.create(model=NAME, messages=MESSAGES, n=2, seed=7,
                                       max_completion_tokens=6, logprobs=True, top_logprobs=3)
    b = client.chat.completions.create(model=NAME, messages=MESSAGES, n=2, seed=7,
                                       max_completion_tokens=6, logprobs=True, top_logprobs=3)
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert sum(len(c.logprobs.content) for c in a.choices) == a.usage.completion_tokens
    for c in a.choices:
        assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
    text = client.chat.completions.create(
        model=NAME, messages=MESSAGES, temperature=0, max_completion_tokens=12,
        extra_body={"ignore_eos": True}).choices[0].message.content
    if len(text) > 3:
        stop = text[2:4]
        cut = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0,
                                             max_completion_tokens=12, stop=[stop],
                                             extra_body={"ignore_eos": True})
        assert cut.choices[0].message.content == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_completion_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens > 0


def test_completion_echo(client):
    plain = client.completions.create(model=NAME, prompt="x = 1", max_tokens=4, temperature=0)
    echoed = client.completions.create(model=NAME, prompt="x = 1", max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "x = 1" + plain.choices[0].text
    streamed = client.completions.create(model=NAME, prompt="x = 1", max_tokens=4,
                                         temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text


def test_unsupported_fields_are_refused_by_name(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for kwargs, param in [({"tools": tools}, "tools"),
                          ({"tool_choice": "required"}, "tool_choice"),
                          ({"extra_body": {"echo": True}}, "echo")]:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, **kwargs)
        assert exc.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt="x", max_tokens=2, echo=True, logprobs=1)
    assert exc.value.body["param"] == "echo"


def test_logit_bias_forces_a_token_in_both_routes_and_bad_ones_are_named(server, client):
    forced = 100
    text = httpx.post(f"{server.url}/detokenize",
                      json={"tokens": [forced] * 4}).json()["prompt"]
    completion = client.completions.create(model=NAME, prompt="x = 1", max_tokens=4,
                                           temperature=0.9, seed=1,
                                           logit_bias={str(forced): 100})
    assert completion.choices[0].text == text
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4,
                                          temperature=0, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == text
    for bias in ({"abc": 1}, {"1000000": 1}, {"5": 101}):
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(model=NAME, prompt="x", max_tokens=2, logit_bias=bias)
        assert exc.value.body["param"] == "logit_bias", exc.value.body
