"""`Platform.validate_request`: a platform plugin refuses requests its device
cannot serve. Offline the refusal is a ValueError naming the prompt and nothing
is queued; over HTTP it is a 400 carrying the platform's message, and the
server goes on serving."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import openai
import pytest
from conftest import subprocess_env

REFUSED_ID = 13
MESSAGE = f"the strict platform cannot take token id {REFUSED_ID}"

PLATFORM_MODULE = f'''
"""A CPU platform that refuses prompts holding token id {REFUSED_ID} and more
than 6 requested tokens."""
from engine.platforms.cpu import CpuPlatform

SEEN = []


class StrictPlatform(CpuPlatform):
    device_name = "strict"

    @classmethod
    def validate_request(cls, prompt_token_ids, sampling_params):
        SEEN.append(list(prompt_token_ids))
        if {REFUSED_ID} in prompt_token_ids:
            raise ValueError("{MESSAGE}")
        if sampling_params.max_tokens is not None and sampling_params.max_tokens > 6:
            raise ValueError("the strict platform generates at most 6 tokens per request")


def detect():
    return "strict_platform.StrictPlatform"
'''


@pytest.fixture
def strict_config_dir(tmp_path) -> Path:
    """A config dir whose manifest adds the strict platform plugin."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "strict_platform.py").write_text(PLATFORM_MODULE)
    config_dir = tmp_path / "config"
    (config_dir / "plugins").mkdir(parents=True)
    (config_dir / "plugins" / "strict.toml").write_text(textwrap.dedent(f"""\
        schema-version = 1

        [package]
        name = "strict-platform"
        path = "{src}"

        [[plugin]]
        group = "platform"
        name = "strict"
        value = "strict_platform:detect"
    """))
    return config_dir


OFFLINE = """
import json, sys
from engine import LLM, SamplingParams
from engine.platforms import current_platform

llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory=1 << 22)
import strict_platform  # importable once the registry put the plugin's folder on sys.path
result = {"platform": current_platform.device_name}
ok = SamplingParams(temperature=0, max_tokens=4)
try:
    llm.generate([[5, 6, 7], [5, REFUSED_ID, 7]], ok)
except ValueError as exc:
    result["error"] = str(exc)
result["queued_after_refusal"] = llm.llm_engine.has_unfinished_requests()
result["tokens"] = llm.generate([[5, 6, 7]], ok)[0].outputs[0].token_ids
result["seen"] = strict_platform.SEEN
print(json.dumps(result))
""".replace("REFUSED_ID", str(REFUSED_ID))


def test_offline_refusal_is_a_value_error_and_nothing_is_queued(strict_config_dir, make_hf_model):
    model = make_hf_model("llama")
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE, str(model)],
        env=subprocess_env(ENGINE_CONFIG_DIR=str(strict_config_dir), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["platform"] == "strict"
    assert result["error"] == f"prompt 1: {MESSAGE}"
    assert result["queued_after_refusal"] is False
    assert len(result["tokens"]) == 4
    # every request was shown to the platform before being queued
    assert result["seen"] == [[5, 6, 7], [5, REFUSED_ID, 7], [5, 6, 7]]


def test_http_refusal_is_a_400_with_the_platforms_message(strict_config_dir, make_hf_model, tmp_path):
    from test_serve import Server

    server = Server(["--model", str(make_hf_model("llama")), "--dtype", "float32",
                     "--served-model-name", "tiny"], strict_config_dir, tmp_path / "server.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt=[5, REFUSED_ID, 7], max_tokens=2)
        assert MESSAGE in info.value.message
        response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": [5, 6, 7], "max_tokens": 10})
        assert response.status_code == 400
        assert "at most 6 tokens" in response.json()["error"]["message"]
        out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
    finally:
        server.stop()
