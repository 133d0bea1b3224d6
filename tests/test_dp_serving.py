"""`engine serve --data-parallel-size 2`: two engine replicas behind one server,
driven with the official `openai` client; requests spread over the replicas
(per-replica counters on /metrics, every series labelled engine="i") and outputs
equal one engine's. A replica dying is tested with the Ray backend, where a
replica's worker is an actor the test can kill (tests/test_ray_executor.py)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import subprocess_env
from test_serve import Server

PROMPTS = ["def parse(self, text):", "import os\nimport sys\n", "class Config:\n    ",
           "for i in range(10):", "return self.value", "with open(path) as f:"]


@pytest.fixture(scope="module")
def llama_dir(make_hf_model):
    return make_hf_model("llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def dp_server(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-serve")
    srv = Server(["--model", str(llama_dir), "--dtype", "float32", "--served-model-name", "tiny",
                  "--data-parallel-size", "2", "--kv-cache-memory", str(16 * 2**20)],
                 root / "config", root / "server.log")
    try:
        srv.wait_ready(timeout=240)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def dp1_texts(llama_dir) -> list[str]:
    from engine import LLM, SamplingParams

    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=16 * 2**20)
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16,
                                                       ignore_eos=True))
        return [o.outputs[0].text for o in outputs]
    finally:
        llm.shutdown()


async def stream_events(url: str, body: dict, started: asyncio.Event) -> list[str]:
    """The SSE lines of one streaming completion; `started` is set at the first."""
    events: list[str] = []
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line:
                    events.append(line)
                    started.set()
    return events


def metric_values(server: Server, name: str) -> dict[str, float]:
    """{engine label: value} of the series `name` on /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            engine = re.search(r'engine="(\d+)"', line).group(1)
            values[engine] = values.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_requests_spread_over_both_replicas_and_equal_one_engine(dp_server, dp1_texts):
    routed = "engine_server_data_parallel_requests_routed_total"
    before = metric_values(dp_server, routed)
    client = openai.AsyncOpenAI(base_url=f"{dp_server.url}/v1", api_key="unused",
                                max_retries=0, timeout=120)

    async def complete(prompt: str) -> str:
        response = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=16, temperature=0.0,
            extra_body={"ignore_eos": True})
        return response.choices[0].text

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(complete(p) for p in PROMPTS))
        finally:
            await client.close()

    texts = asyncio.run(main())
    assert texts == dp1_texts
    after = metric_values(dp_server, routed)
    spread = {e: after[e] - before.get(e, 0.0) for e in after}
    assert sorted(spread) == ["0", "1"]
    assert spread["0"] >= 1 and spread["1"] >= 1 and sum(spread.values()) == len(PROMPTS)
    # the engines' own series carry the replica too
    generated = metric_values(dp_server, "engine_generation_tokens_total")
    assert sorted(generated) == ["0", "1"] and all(v > 0 for v in generated.values())
    assert dp_server.health()["status"] == "ready"


def test_sequential_requests_alternate_between_replicas(dp_server, dp1_texts):
    routed = "engine_server_data_parallel_requests_routed_total"
    before = metric_values(dp_server, routed)
    client = openai.OpenAI(base_url=f"{dp_server.url}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    for prompt, expected in zip(PROMPTS[:4], dp1_texts[:4], strict=True):
        response = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                              temperature=0.0, extra_body={"ignore_eos": True})
        assert response.choices[0].text == expected
    after = metric_values(dp_server, routed)
    assert {e: after[e] - before.get(e, 0.0) for e in after} == {"0": 2.0, "1": 2.0}


def test_data_parallel_with_a_launcher_backend_is_refused_before_binding(llama_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", str(llama_dir), "--port", "0",
         "--data-parallel-size", "2", "--distributed-executor-backend", "external_launcher"],
        env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--data-parallel-backend mp or ray" in proc.stderr, proc.stderr
