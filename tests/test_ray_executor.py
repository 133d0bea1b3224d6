"""distributed_executor_backend="ray" on a real two-node Ray cluster on loopback
(ray.cluster_utils.Cluster: two raylets of one CPU each, started and stopped by
this module): one rank per node, a model architecture and a plugin setting that
only a plugin dir provides, a killed actor, and nothing left behind."""

from __future__ import annotations

import os

# every Ray address on 127.0.0.1: by default Ray swaps loopback for the machine's
# outward address; this switch (read when ray is imported) keeps it local
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import asyncio  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from conftest import subprocess_env  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from test_dp_serving import stream_events  # noqa: E402
from test_executor_multiproc import wait_dead  # noqa: E402
from test_serve import Server  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.executor.ray_executor import RayExecutor, RayWorkerError  # noqa: E402

pytestmark = pytest.mark.slow

TESTS_DIR = str(Path(__file__).resolve().parent)
PROMPTS = ["def main():", "import os\nimport sys", "class Foo(object):"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

PLUGIN_MODULE = textwrap.dedent("""
    import pydantic

    from engine.models.llama import LlamaForCausalLM


    class DistSettings(pydantic.BaseModel):
        tag: str = "unset"


    class DistLlamaForCausalLM(LlamaForCausalLM):
        pass


    def register():
        from engine import ModelRegistry

        ModelRegistry.register_model("DistLlamaForCausalLM", "dist_models:DistLlamaForCausalLM")


    register.engine_config_model = DistSettings
""")
PLUGIN_MANIFEST = textwrap.dedent("""
    schema-version = 1
    [package]
    name = "dist-models"
    path = "src"
    [[plugin]]
    group = "general"
    name = "dist_models"
    value = "dist_models:register"
""")


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes of one CPU each on 127.0.0.1, this process connected as the
    driver; stopped after the module."""
    node = dict(num_cpus=1, object_store_memory=80 * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args=dict(node, include_dashboard=False))
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def plugin_model(tmp_path_factory, make_hf_model) -> tuple[Path, Path]:
    """(a plugin dir registering DistLlamaForCausalLM, a tiny Llama under that name)."""
    root = tmp_path_factory.mktemp("ray-plugins")
    plugin_dir = root / "plugins"
    (plugin_dir / "src").mkdir(parents=True)
    (plugin_dir / "src" / "dist_models.py").write_text(PLUGIN_MODULE)
    (plugin_dir / "dist-models.toml").write_text(PLUGIN_MANIFEST)
    model = root / "model"
    shutil.copytree(make_hf_model("llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["DistLlamaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    return plugin_dir, model


@pytest.fixture(scope="module")
def tp1_outputs(make_hf_model) -> list:
    llm = LLM(str(make_hf_model("llama")), dtype="float32", kv_cache_memory=8 * 2**20)
    try:
        return [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.shutdown()


def where_and_settings(worker) -> dict:
    """Run in each rank's actor: where it is and what plugin setting it sees."""
    import registry

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "pid": os.getpid(),
            "tag": registry.get_plugin_config("dist_models").tag,
            "model_class": type(worker.model_runner.model).__name__}


def test_tp2_one_rank_per_node_matches_tp1_with_plugin_model_and_setting(
        ray_cluster, plugin_model, tp1_outputs, monkeypatch):
    plugin_dir, model = plugin_model
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)  # the actors import this module's functions
    # LLM(plugin_dirs=, plugin_config=) write these into os.environ; set them here too
    # so that they are removed again after this test (later module fixtures see them)
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(plugin_dir))
    monkeypatch.setenv("ENGINE_PLUGIN_CONFIG", json.dumps({"dist_models": {"tag": "from-driver"}}))
    llm = LLM(str(model), tensor_parallel_size=2, distributed_executor_backend="ray",
              plugin_dirs=[plugin_dir], plugin_config={"dist_models": {"tag": "from-driver"}},
              dtype="float32", kv_cache_memory=8 * 2**20)
    executor = llm.llm_engine.executor
    try:
        assert isinstance(executor, RayExecutor)
        ranks = executor.collective_rpc(where_and_settings)
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.shutdown()
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert {r["node_id"] for r in ranks} == nodes  # one rank on each node
    assert [r["tag"] for r in ranks] == ["from-driver", "from-driver"]
    assert [r["model_class"] for r in ranks] == ["DistLlamaForCausalLM"] * 2
    assert tokens == [o.token_ids for o in tp1_outputs]
    # shutdown leaves no actor and no placement group behind
    assert wait_dead([r["pid"] for r in ranks]) == []
    assert {pg["state"] for pg in ray.util.placement_group_table().values()} <= {"REMOVED"}
    # a removed group's CPUs reach the available total a moment later
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < 2.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2.0


SCRIPT_MODEL = textwrap.dedent("""
    import json, sys
    from engine import LLM, ModelRegistry, SamplingParams
    from engine.model_loader import SafetensorsLoader, register_model_loader
    from engine.models.llama import LlamaForCausalLM


    class ScriptLlamaForCausalLM(LlamaForCausalLM):
        \"\"\"Defined in the script's __main__: the actors get it by value.\"\"\"


    class ScriptSafetensors(SafetensorsLoader):
        \"\"\"A load format defined in the script: the actors get it by value too.\"\"\"


    if __name__ == "__main__":
        ModelRegistry.register_model("ScriptLlamaForCausalLM", ScriptLlamaForCausalLM)
        register_model_loader("script-safetensors", ScriptSafetensors)
        llm = LLM(sys.argv[1], tensor_parallel_size=2, distributed_executor_backend="ray",
                  dtype="float32", kv_cache_memory=8 * 2**20, load_format="script-safetensors")
        outs = llm.generate(json.loads(sys.argv[2]),
                            SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
        names = llm.llm_engine.executor.collective_rpc(
            lambda worker: type(worker.model_runner.model).__qualname__)
        print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs], "classes": names}))
        llm.shutdown()
""")


def test_a_model_class_and_load_format_registered_in_the_script_reach_every_actor(
        ray_cluster, make_hf_model, tp1_outputs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(make_hf_model("llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["ScriptLlamaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    script = tmp_path / "script_model.py"
    script.write_text(SCRIPT_MODEL)
    proc = subprocess.run([sys.executable, str(script), str(model), json.dumps(PROMPTS)],
                          env=subprocess_env(RAY_ADDRESS=ray_cluster.address),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["classes"] == ["ScriptLlamaForCausalLM"] * 2
    assert result["tokens"] == [o.token_ids for o in tp1_outputs]


def test_killed_actor_mid_generation_fails_naming_rank_and_node(ray_cluster, make_hf_model):
    llm = LLM(str(make_hf_model("llama")), tensor_parallel_size=2,
              distributed_executor_backend="ray", dtype="float32", kv_cache_memory=8 * 2**20)
    executor = llm.llm_engine.executor
    pids = executor.actor_pids
    stream = llm.generate_stream(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=500,
                                                            ignore_eos=True))
    seen = 0
    with pytest.raises(RayWorkerError, match=r"rank 1 \(Ray actor on node 127\.0\.0\.1") as info:
        for _ in stream:
            seen += 1
            if seen == 3:
                os.kill(pids[1], signal.SIGKILL)
    assert 3 <= seen < 500
    assert info.value.rank == 1 and info.value.node == "127.0.0.1"
    assert wait_dead(pids) == []  # rank 0, stuck in a collective, was killed too
    with pytest.raises(RuntimeError, match="Ray workers are gone"):
        executor.collective_rpc("check_health")
    llm.shutdown()  # idempotent after a failure


def test_without_ray_installed_asking_for_it_says_what_to_install(make_hf_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'engine\[ray\]'"):
        LLM(str(make_hf_model("llama")), distributed_executor_backend="ray")


def test_data_parallel_serving_over_ray_spreads_and_survives_a_dead_replica(
        ray_cluster, make_hf_model, tp1_outputs, tmp_path, monkeypatch):
    """engine serve --data-parallel-size 2 --data-parallel-backend ray joins the
    cluster (RAY_ADDRESS): each replica's worker is an actor, one per node, and
    outputs equal one engine's. Killing one replica's actor ends the request it
    runs with an error naming that replica; the other replica's request completes;
    /health answers 200 "degraded" naming the replica; new requests are still served."""
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    srv = Server(["--model", str(make_hf_model("llama")), "--dtype", "float32",
                  "--served-model-name", "tiny", "--kv-cache-memory", str(8 * 2**20),
                  "--data-parallel-size", "2", "--data-parallel-backend", "ray"],
                 tmp_path / "config", tmp_path / "server.log")
    try:
        srv.wait_ready(timeout=300)
        assert ray.available_resources().get("CPU", 0.0) == 0.0  # one actor per node
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused",
                                    max_retries=0, timeout=120)

        async def complete_all() -> list[str]:
            try:
                responses = await asyncio.gather(*(client.completions.create(
                    model="tiny", prompt=p, max_tokens=10, temperature=0.0,
                    extra_body={"ignore_eos": True}) for p in PROMPTS))
            finally:
                await client.close()
            return [r.choices[0].text for r in responses]

        assert asyncio.run(complete_all()) == [o.text for o in tp1_outputs]
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
        assert 'engine_server_data_parallel_requests_routed_total{engine="0"}' in metrics
        assert 'engine_server_data_parallel_requests_routed_total{engine="1"}' in metrics

        actors = [p for p in psutil.Process().children(recursive=True)
                  if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::RayWorkerWrapper")]
        assert len(actors) == 2, actors
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 800, "ignore_eos": True,
                "temperature": 0, "stream": True}

        async def two_streams_one_killed() -> list[list[str]]:
            started = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.ensure_future(stream_events(srv.url, body, e)) for e in started]
            await asyncio.gather(*(e.wait() for e in started))  # one on each replica
            actors[0].send_signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

        streams = asyncio.run(two_streams_one_killed())
        assert all(events[-1] == "data: [DONE]" for events in streams)
        finals = [json.loads(events[-2].removeprefix("data: ")) for events in streams]
        failed = [f["error"]["message"] for f in finals if "error" in f]
        assert len(failed) == 1, finals
        named = re.search(r"data-parallel replica (\d)", failed[0])
        assert named and "rank 0" in failed[0], failed[0]
        assert [f["choices"][0]["finish_reason"] for f in finals if "error" not in f] == ["length"]
        # still serving from the other replica: 200 "degraded", naming the dead one
        response = httpx.get(f"{srv.url}/health", timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "degraded", response.text
        assert [r["replica"] for r in response.json()["failed_replicas"]] == [
            int(named.group(1))], response.text
        again = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0,
                              timeout=120).completions.create(model="tiny", prompt="import",
                                                              max_tokens=4)
        assert again.choices[0].text
    finally:
        assert srv.stop() == 0, srv.output()
    # the server's replicas left the cluster as they found it
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < 2.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2.0
