"""Hostile requests against the real `engine serve` (a subprocess), as a table:
request -> expected status and the error's ``param``. The next probe starts
from these rows; each one was a 200, a hang or a 500 once.

Also: a constraint that fails midway ends "error" with an error object (never
"stop" with text that does not match), `/health` answers while a large
constraint compiles, and a 500's body is one line.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from test_serve import Server

MODEL_NAME = "tiny"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"

# a rule of 2,001 alternatives: more items in one parser row than llguidance allows
WIDE_RULE = " | ".join(f'"o{i}"' for i in range(2001))
SELF_CONTAINING = {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}
REF_CYCLE = {"$ref": "#/$defs/a",
             "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}

# (id, route, body (merged into a minimal request; a str is sent as raw JSON),
#  expected status, expected error param)
HOSTILE = [
    ("logprobs-million", "completions", {"logprobs": 1_000_000}, 400, "logprobs"),
    ("logprobs-past-max", "completions", {"logprobs": 21}, 400, "logprobs"),
    ("logprobs-at-max", "completions", {"logprobs": 20}, 200, None),
    ("chat-top-logprobs-21", "chat", {"logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("chat-top-logprobs-million", "chat", {"logprobs": True, "top_logprobs": 1_000_000}, 400,
     "top_logprobs"),
    ("n-100000", "completions", {"n": 100_000}, 400, "n"),
    ("max-tokens-2**63", "completions", {"max_tokens": 2**63}, 400, "max_tokens"),
    # the context is 1024 tokens: a prompt of 2 and 1023 new ones do not fit (once
    # silently cut to what fits); omitted, generation stops at the context's end
    ("max-tokens-past-context", "completions", {"prompt": [5, 6], "max_tokens": 1023}, 400,
     "max_tokens"),
    ("max-tokens-fills-context", "completions", {"prompt": [5, 6], "max_tokens": 1022}, 200,
     None),
    ("max-tokens-past-context-2-prompts", "completions",
     {"prompt": [[5], [5, 6, 7]], "max_tokens": 1022}, 400, "max_tokens"),
    ("chat-max-completion-tokens-past-context", "chat", {"max_completion_tokens": 1024}, 400,
     "max_completion_tokens"),
    ("stop-token-ids-10**30", "completions", {"stop_token_ids": [10**30]}, 400,
     "stop_token_ids"),
    ("stop-token-id-past-vocab", "completions", {"stop_token_ids": [1024]}, 400,
     "stop_token_ids"),
    ("temperature-1e309", "completions",
     '{"prompt": "Hello", "max_tokens": 2, "temperature": 1e309}', 400, "temperature"),
    ("choice-2001", "completions",
     {"structured_outputs": {"choice": [f"option{i}" for i in range(2001)]}}, 200, None),
    ("choice-70000", "completions",
     {"structured_outputs": {"choice": [f"option{i}" for i in range(70_000)]}}, 200, None),
    ("regex-2MB", "completions", {"structured_outputs": {"regex": "a" * 2_000_000}}, 400,
     "structured_outputs.regex"),
    ("regex-lexer-limit", "completions", {"structured_outputs": {"regex": "a" * 900_000}},
     400, "structured_outputs.regex"),
    ("json-ref-cycle", "completions", {"structured_outputs": {"json": REF_CYCLE}}, 400,
     "structured_outputs.json"),
    ("json-self-containing", "completions",
     {"structured_outputs": {"json": SELF_CONTAINING}}, 400, "structured_outputs.json"),
    ("response-format-self-containing", "chat",
     {"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": SELF_CONTAINING}}},
     400, "response_format.json_schema.schema"),
    ("grammar-wide-rule", "completions",
     {"structured_outputs": {"grammar": f'start: "b" x\nx: {WIDE_RULE}'}}, 400,
     "structured_outputs.grammar"),
]


@pytest.fixture(scope="module")
def server(make_hf_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile-log") / "server.log"
    srv = Server(["--model", str(make_hf_model("llama")), "--dtype", "float32",
                  "--served-model-name", MODEL_NAME],
                 tmp_path_factory.mktemp("hostile-config"), log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _post(server: Server, route: str, body: dict | str, timeout: float = 120) -> httpx.Response:
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}[route]
    if isinstance(body, str):
        return httpx.post(server.url + path, content=body, timeout=timeout,
                          headers={"Content-Type": "application/json"})
    base = ({"prompt": "Hello", "max_tokens": 2} if route == "completions" else
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2,
             "chat_template": CHAT_TEMPLATE})
    return httpx.post(server.url + path, json={"model": MODEL_NAME, **base, **body},
                      timeout=timeout)


@pytest.mark.parametrize("route,body,status,param",
                         [row[1:] for row in HOSTILE], ids=[row[0] for row in HOSTILE])
def test_hostile_request(server, route, body, status, param):
    response = _post(server, route, body)
    assert response.status_code == status, response.text[:500]
    if status == 200:
        for choice in response.json()["choices"]:
            assert choice["finish_reason"] in ("stop", "length"), choice
    else:
        error = response.json()["error"]
        assert error["param"] == param, error
        assert "\n" not in error["message"] and len(error["message"]) <= 500, error
        assert "backtrace" not in error["message"]
    # whatever it was, the server still serves the next request
    assert _post(server, "completions", {}).status_code == 200


def test_choice_output_is_one_of_the_choices(server):
    choices = [f"option{i}" for i in range(2001)]
    response = _post(server, "completions", {"structured_outputs": {"choice": choices},
                                             "max_tokens": 20, "n": 4, "seed": 1})
    assert response.status_code == 200, response.text[:500]
    for choice in response.json()["choices"]:
        if choice["finish_reason"] == "stop":
            assert choice["text"] in choices


def test_constraint_that_fails_midway_ends_with_error_not_stop(server):
    # "a"* passes the engine's check before queueing; the first "b" opens a
    # parser row llguidance refuses, mid-generation
    grammar = f'start: "a"* "b" x\nx: {WIDE_RULE}'
    response = _post(server, "completions", {
        "structured_outputs": {"grammar": grammar}, "n": 8, "max_tokens": 12,
        "temperature": 1.5, "seed": 0})
    assert response.status_code == 200, response.text[:500]
    reasons = [c["finish_reason"] for c in response.json()["choices"]]
    assert "stop" not in reasons, reasons
    failed = [c for c in response.json()["choices"] if c["finish_reason"] == "error"]
    assert failed, reasons
    for choice in failed:
        assert "could not be enforced" in choice["error"]["message"]
        assert "\n" not in choice["error"]["message"]


def test_health_answers_while_a_large_constraint_compiles(server):
    done: list[str] = []

    def constrained() -> None:
        _post(server, "completions", {"structured_outputs": {"regex": "b" * 1_000_000}})
        done.append("constrained")

    thread = threading.Thread(target=constrained)
    thread.start()
    try:
        # the body is in (1 MB over loopback: milliseconds) and its compile under
        # way: it runs until the regex compiler gives up at its expression limit,
        # about a second on a fast quiet machine (a 400 then), longer on a loaded
        # one; /health must answer before the constrained request does
        time.sleep(0.25)
        response = httpx.get(server.url + "/health", timeout=120)
        done.append("health")
        assert response.status_code == 200
    finally:
        thread.join(timeout=120)
    assert done == ["health", "constrained"], done


def test_server_errors_reach_the_client_as_one_line():
    from engine.entrypoints.errors import APIError

    panic = "panic: assertion failed\n<backtrace>\n   0: <unknown>\n   1: <unknown>"
    error = APIError(500, panic)
    assert error.payload()["error"]["message"] == "panic: assertion failed"
    assert APIError(400, "a\nb").message == "a\nb"  # a client's own error is kept whole


def test_raw_json_rows_are_valid_json():
    for row in HOSTILE:
        if isinstance(row[2], str):
            assert isinstance(json.loads(row[2]), dict)
