"""Sleep mode: `LLM.sleep(level)` frees the KV cache and the weights (resident
memory really drops, measured in a fresh child process), `wake_up()` brings them
back and the output is the same as before; every rank sleeps (TP=2); the
server's dev-mode routes."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import subprocess_env
from fastapi.testclient import TestClient
from test_serve import Server

from engine import LLM, SamplingParams
from engine.cli.main import build_parser
from engine.core.engine import EngineShutDownError, EngineSleepingError
from engine.entrypoints.api_server import ServerSettings, build_app
from engine.worker import Worker

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Foo:\n    def"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
API_KEY = "sleepy-key"


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_after_wake_up_equals_output_before(make_hf_model, dtype):
    with LLM(make_hf_model("llama"), dtype=dtype, enable_sleep_mode=True) as llm:
        before = _tokens(llm)
        for level in (1, 2, 1):
            llm.sleep(level=level)
            assert llm.is_sleeping()
            with pytest.raises(EngineSleepingError, match="wake_up"):
                llm.generate(PROMPTS[0], GREEDY)
            llm.wake_up()
            assert not llm.is_sleeping()
            assert _tokens(llm) == before, f"after sleep(level={level})"


def test_sleep_refusals(make_hf_model):
    model = make_hf_model("llama")
    with LLM(model, dtype="float32") as llm:
        with pytest.raises(ValueError, match="enable_sleep_mode=True"):
            llm.sleep()
    with LLM(model, dtype="float32", enable_sleep_mode=True) as llm:
        with pytest.raises(ValueError, match="level must be 1 or 2"):
            llm.sleep(level=3)
        request_id = llm.llm_engine.add_request("hello", GREEDY)
        with pytest.raises(ValueError, match="1 unfinished request"):
            llm.sleep()
        llm.llm_engine.abort_request(request_id)
        llm.sleep(1)
        llm.sleep(2)  # deepens: the kept weights are dropped, the checkpoint reloads
        llm.wake_up()
        llm.wake_up()  # awake: nothing to do
        assert llm.generate("hello", GREEDY)[0].outputs[0].token_ids
    # after the `with` block (shutdown) every call says so, not an AttributeError
    # from inside a stopped worker
    for call in (lambda: llm.generate("hello", GREEDY), lambda: llm.sleep(),
                 lambda: llm.wake_up(), lambda: llm.llm_engine.add_request([5, 6], GREEDY)):
        with pytest.raises(EngineShutDownError, match="shut down .*create a new LLM"):
            call()
    assert llm.llm_engine.num_unfinished_requests() == 0


class WorkerWithoutSleep(Worker):
    """A platform worker written before sleep mode: no sleep()/wake_up()."""

    sleep = None
    wake_up = None


def test_worker_without_sleep_fails_at_start_naming_the_method(make_hf_model):
    with pytest.raises(NotImplementedError, match=r"does not implement sleep\(\), wake_up\(\)"):
        LLM(make_hf_model("llama"), dtype="float32", enable_sleep_mode=True,
            worker_cls=f"{__name__}.WorkerWithoutSleep")
    # without sleep mode the same worker serves
    with LLM(make_hf_model("llama"), dtype="float32",
             worker_cls=f"{__name__}.WorkerWithoutSleep") as llm:
        assert llm.generate("hello", GREEDY)[0].outputs[0].token_ids


# what the child process reports: resident memory around each sleep, the sizes
# it should drop by, and the outputs
RSS_CHILD = """
import json, sys
from engine import LLM, SamplingParams
from engine.attention import get_attention_layers

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

llm = LLM(sys.argv[1], dtype="float32", enable_sleep_mode=True, kv_cache_memory=48 << 20,
          max_num_seqs=8)
params = SamplingParams(max_tokens=8, temperature=0.0)
prompts = ["def add(a, b):", "class Foo:"]
model = llm.llm_engine.executor.worker.model_runner.model
# the cache's pages are resident once written: write them all, so that the whole
# KV cache is the resident part that sleep must give back
for layer in get_attention_layers(model):
    layer.kv_cache.fill_(0.0)
report = {"weights": sum(p.numel() * p.element_size() for p in model.parameters()),
          "kv": llm.config.cache_config.num_blocks
                * llm.llm_engine.executor.collective_rpc("get_kv_cache_spec")[0].page_size_bytes,
          "outputs": [[o.outputs[0].token_ids for o in llm.generate(prompts, params)]]}
for level in (1, 2):
    before = rss()
    llm.sleep(level)
    report[f"drop_{level}"] = before - rss()
    llm.wake_up()
    report["outputs"].append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
print(json.dumps(report))
"""


def test_resident_memory_drops_by_the_weights_and_the_kv_cache(make_hf_model):
    # float32, about 110 MB of weights: far above the allocator's noise
    model = make_hf_model("llama", hidden_size=768, intermediate_size=2048,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(model)], capture_output=True,
                          text=True, env=subprocess_env(OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    first, *after = report["outputs"]
    assert after == [first, first]
    assert report["weights"] > 100 << 20 and report["kv"] >= 40 << 20
    # level 1: the (fully written) KV cache is freed and the weights go to a file
    assert report["drop_1"] >= report["kv"] + 0.95 * report["weights"], report
    # level 2: at least the weights' size (and the KV cache's resident part: after
    # the wake-up its pages are untouched again, but for the few the requests wrote)
    assert report["drop_2"] >= report["weights"], report


@pytest.mark.slow
def test_every_rank_sleeps_with_tensor_parallel_2(make_hf_model):
    with LLM(make_hf_model("llama"), dtype="float32", tensor_parallel_size=2,
             enable_sleep_mode=True) as llm:
        before = _tokens(llm)
        for level in (1, 2):
            llm.sleep(level)
            llm.wake_up()
            assert _tokens(llm) == before, f"after sleep(level={level})"


def test_dev_mode_routes_behind_the_api_key_and_503_while_asleep(make_hf_model, tmp_path):
    model = make_hf_model("llama")
    srv = Server(["--model", str(model), "--dtype", "float32", "--served-model-name", "tiny",
                  "--api-key", API_KEY, "--enable-sleep-mode", "--enable-dev-mode"],
                 tmp_path / "config", tmp_path / "server.log")
    try:
        srv.wait_ready()
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.post(f"{srv.url}/sleep", timeout=30).status_code == 401
        assert httpx.get(f"{srv.url}/is_sleeping", timeout=30).status_code == 401
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0,
                               timeout=60)

        def complete() -> list[int]:
            out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8,
                                            temperature=0.0, logprobs=1)
            return out.choices[0].logprobs.tokens

        before = complete()
        for level in (1, 2):
            r = httpx.post(f"{srv.url}/sleep", params={"level": level}, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            assert httpx.get(f"{srv.url}/is_sleeping", headers=auth,
                             timeout=30).json() == {"is_sleeping": True}
            with pytest.raises(openai.APIStatusError) as info:
                complete()
            assert info.value.status_code == 503
            assert "sleeping" in info.value.message and "wake_up" in info.value.message
            r = httpx.post(f"{srv.url}/wake_up", headers=auth, timeout=120)
            assert r.status_code == 200, r.text
            assert httpx.get(f"{srv.url}/is_sleeping", headers=auth,
                             timeout=30).json() == {"is_sleeping": False}
            assert complete() == before
        r = httpx.post(f"{srv.url}/sleep", params={"level": 5}, headers=auth, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "level"
    finally:
        srv.stop()


def test_the_sleep_routes_exist_only_in_dev_mode(monkeypatch):

    def statuses(dev_mode: bool) -> list[int]:
        # no lifespan: the engine is never started, so a mounted route answers 503
        client = TestClient(build_app(ServerSettings(model_name="m", dev_mode=dev_mode)))
        return [client.post("/sleep").status_code, client.post("/wake_up").status_code,
                client.get("/is_sleeping").status_code]

    assert statuses(False) == [404, 404, 404]
    assert statuses(True) == [503, 503, 503]
    assert build_parser().parse_args(["serve"]).enable_dev_mode is False
    monkeypatch.setenv("ENGINE_SERVER_DEV_MODE", "1")
    assert build_parser().parse_args(["serve"]).enable_dev_mode is True
