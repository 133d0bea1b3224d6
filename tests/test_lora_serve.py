"""LoRA over HTTP: `engine serve --enable-lora --lora-modules ...` driven with the
official `openai` client. Two adapters and the base model stream concurrently,
each equal to the offline engine's output; `/v1/models` lists the adapters with
their parent; adapters load and unload at run time (behind the API key); a bad
adapter is a 400 naming it while the other requests keep streaming."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from test_lora import ADAPTERS, KIB, make_adapter
from test_serve import Server

from engine import LLM, LoRARequest, SamplingParams

API_KEY = "lora-key"
PROMPT = "def parse(self, text):"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def llama_dir(make_hf_model):
    return make_hf_model("llama")


@pytest.fixture(scope="module")
def adapter_dirs(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    return {name: make_adapter(llama_dir, root / name, i, **args)
            for i, (name, args) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def server(llama_dir, adapter_dirs, tmp_path_factory):
    srv = Server(["--model", str(llama_dir), "--dtype", "float32", "--served-model-name",
                  "base", "--api-key", API_KEY, "--kv-cache-memory", str(2048 * KIB),
                  "--enable-lora", "--max-loras", "3", "--max-lora-rank", "16",
                  "--lora-modules", f"attn={adapter_dirs['attn']}",
                  f'{{"name": "mlp", "path": "{adapter_dirs["mlp"]}"}}',
                  "--allow-runtime-lora-updating",
                  # the built-in resolver serves the other sub-folders by name
                  "--plugin-config", f"lora_folder.dir={adapter_dirs['all'].parent}"],
                 tmp_path_factory.mktemp("cfg"), tmp_path_factory.mktemp("log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def offline(llama_dir, adapter_dirs):
    """The offline engine's text for PROMPT, per adapter name (None: base)."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(llama_dir, dtype="float32", kv_cache_memory=1024 * KIB, enable_lora=True,
             max_loras=3, max_lora_rank=16) as llm:
        return {name: llm.generate(PROMPT, params, lora_request=None if name is None else
                                   LoRARequest(name, i + 1, str(adapter_dirs[name])))[0]
                .outputs[0].text
                for i, name in enumerate([None, "attn", "mlp", "all"])}


def _client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


async def _stream(client, model: str) -> str:
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                             temperature=0.0, stream=True,
                                             extra_body={"ignore_eos": True})
    parts = []
    async for chunk in stream:
        assert chunk.model == model
        parts.append(chunk.choices[0].text)
    return "".join(parts)


def test_two_adapters_and_base_stream_concurrently(server, offline):
    async def run():
        client = _client(server)
        return await asyncio.gather(*(_stream(client, m) for m in ("attn", "base", "mlp")))

    attn, base, mlp = asyncio.run(run())
    assert (attn, base, mlp) == (offline["attn"], offline[None], offline["mlp"])
    assert len({attn, base, mlp}) == 3


def test_models_lists_adapters_with_parent(server, adapter_dirs):
    async def run():
        return await _client(server).models.list()

    cards = {m.id: m for m in asyncio.run(run()).data}
    assert set(cards) == {"base", "attn", "mlp"}
    assert cards["attn"].parent == "base" and cards["attn"].root == str(adapter_dirs["attn"])


def test_resolver_plugin_finds_an_unknown_adapter_by_folder_name(server, offline):
    async def run():
        client = _client(server)
        text = await _stream(client, "all")  # not in --lora-modules: lora_folder finds it
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nothing-here", prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.NotFoundError):  # never a path outside the folder
            await client.completions.create(model="../attn", prompt=PROMPT, max_tokens=2)
        return text, [m.id for m in (await client.models.list()).data]

    text, models = asyncio.run(run())
    assert text == offline["all"]
    assert "all" in models


def test_load_and_unload_at_run_time(server, adapter_dirs, offline, tmp_path):
    url, auth = server.url, {"Authorization": f"Bearer {API_KEY}"}
    body = {"lora_name": "all-2", "lora_path": str(adapter_dirs["all"])}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 401
    response = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=auth)
    assert response.status_code == 200, response.text
    again = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=auth)
    assert again.status_code == 400 and "'all-2'" in again.json()["error"]["message"]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"r": 64, "lora_alpha": 8}')

    async def run():
        client = _client(server)
        running = asyncio.ensure_future(_stream(client, "all-2"))
        response = await asyncio.to_thread(
            httpx.post, f"{url}/v1/load_lora_adapter", headers=auth,
            json={"lora_name": "bad", "lora_path": str(bad)})
        return await running, response

    text, response = asyncio.run(run())
    assert text == offline["all"]  # the running stream did not notice
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'bad'" in error["message"] and "max_lora_rank=16" in error["message"]
    assert error["param"] == "lora_path"

    response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "all-2"},
                          headers=auth)
    assert response.status_code == 200, response.text

    async def gone():
        with pytest.raises(openai.NotFoundError):
            await _client(server).completions.create(model="all-2", prompt=PROMPT,
                                                     max_tokens=2)

    asyncio.run(gone())
    missing = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "all-2"},
                         headers=auth)
    assert missing.status_code == 404


def test_a_broken_resolver_never_stops_the_others(adapter_dirs, caplog):
    from engine.lora.resolver import LoRAFolderResolver, LoRAResolvers

    def broken(base: str, name: str) -> str:
        raise RuntimeError("resolver bug")

    resolvers = LoRAResolvers([("a_broken", broken),
                               ("folder", LoRAFolderResolver(adapter_dirs["mlp"].parent).resolve)])
    assert resolvers.resolve("base", "mlp") == str(adapter_dirs["mlp"])
    assert "a_broken" in caplog.text and "resolver bug" in caplog.text
    assert resolvers.resolve("base", "nope") is None
