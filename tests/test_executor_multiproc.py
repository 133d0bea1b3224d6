"""MultiprocExecutor: real worker processes (spawn), a real gloo group, real
process deaths. Worker classes live in tests/platform_fixtures/toy_workers.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import subprocess_env

from engine.config import EngineConfig, ModelConfig, ParallelConfig
from engine.executor.multiproc import MultiprocExecutor, WorkerProcessError

TOY_WORKER = "platform_fixtures.toy_workers.ToyWorker"


def toy_config(worker_cls: str = TOY_WORKER, tp: int = 2) -> EngineConfig:
    return EngineConfig(
        model_config=ModelConfig(model="unused"),
        parallel_config=ParallelConfig(
            tensor_parallel_size=tp, worker_cls=worker_cls, distributed_backend="gloo"
        ),
    )


def wait_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.05)
    return alive


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


MARKER_PLUGIN = """
import os

def register():
    os.environ["TOY_PLUGIN_MARKER"] = f"general plugin ran in {os.getpid()}"
"""
MARKER_MANIFEST = """
schema-version = 1
[package]
name = "toy-marker"
path = "src"
[[plugin]]
group = "general"
name = "toy_marker"
value = "toy_marker_plugin:register"
"""


@pytest.fixture(scope="module")
def shutdown_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("worker-shutdown")


@pytest.fixture(scope="module")
def executor(shutdown_dir, tmp_path_factory):
    """Two ToyWorker ranks shared by the tests of this module, started with a
    plugin dir holding a general plugin; the last test of the module shuts it
    down (module order is file order)."""
    plugin_dir = tmp_path_factory.mktemp("plugins")
    (plugin_dir / "src").mkdir()
    (plugin_dir / "src" / "toy_marker_plugin.py").write_text(MARKER_PLUGIN)
    (plugin_dir / "toy.toml").write_text(MARKER_MANIFEST)
    extra = {
        "TOY_WORKER_MARKER": "inherited",
        "TOY_WORKER_SHUTDOWN_DIR": str(shutdown_dir),
        "ENGINE_PLUGIN_DIRS": str(plugin_dir),
    }
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        ex = MultiprocExecutor(toy_config())
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    ex.collective_rpc("init_device")
    yield ex
    ex.shutdown()


def test_collective_rpc_runs_on_every_rank_in_its_own_process(executor):
    infos = executor.collective_rpc("describe")
    assert [i["rank"] for i in infos] == [0, 1]
    assert [i["local_rank"] for i in infos] == [0, 1]
    assert [i["tp_rank"] for i in infos] == [0, 1]
    assert {i["tp_size"] for i in infos} == {2}
    pids = {i["pid"] for i in infos}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {i["torch_threads"] for i in infos} == {1}
    assert {i["marker"] for i in infos} == {"inherited"}  # environment reaches workers
    # a general plugin found only through ENGINE_PLUGIN_DIRS ran in every worker
    assert [i["plugin_marker"] for i in infos] == [
        f"general plugin ran in {i['pid']}" for i in infos]


def test_all_reduce_runs_across_the_worker_processes(executor):
    assert executor.collective_rpc("all_reduce_rank") == [3.0, 3.0]


def test_execute_model_returns_rank_zero_output(executor):
    out = executor.execute_model({"step": 7})
    assert out == {"rank": 0, "echo": {"step": 7}}


def test_worker_exception_is_reraised_with_the_worker_traceback(executor):
    with pytest.raises(ValueError, match="bad toy input") as info:
        executor.collective_rpc("raise_value_error", ("bad toy input",))
    cause = str(info.value.__cause__)
    assert "toy_workers.py" in cause and "raise_value_error" in cause
    assert any("rank 0" in note for note in info.value.__notes__)
    # every rank failed the same way: the executor is still in step and usable
    assert executor.collective_rpc("all_reduce_rank") == [3.0, 3.0]


def test_unknown_worker_method_is_named(executor):
    with pytest.raises(NotImplementedError, match="no_such_method"):
        executor.collective_rpc("no_such_method")
    executor.check_health()


def test_killed_worker_raises_promptly_and_stops_the_others():
    ex = MultiprocExecutor(toy_config())
    ex.collective_rpc("init_device")
    pids = ex.worker_pids
    # rank 0 waits in an all_reduce for rank 1, which is killed: no hang
    with pytest.raises(WorkerProcessError, match=r"rank 1 .*SIGKILL") as info:
        ex.collective_rpc("kill_rank_during_all_reduce", (1,))
    assert info.value.rank == 1 and info.value.exit_code == -9
    assert wait_dead(pids) == []
    with pytest.raises(RuntimeError, match="workers are gone"):
        ex.collective_rpc("describe")
    ex.shutdown()  # idempotent after a failure


def test_worker_failing_at_startup_is_reported_with_its_traceback():
    with pytest.raises(WorkerProcessError, match="rank 1 failed to start") as info:
        MultiprocExecutor(toy_config("platform_fixtures.toy_workers.FailingStartWorker"))
    assert "missing its firmware" in str(info.value)
    assert "toy_workers.py" in info.value.remote_traceback
    assert info.value.rank == 1


def test_interpreter_exit_stops_the_workers():
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_executor_multiproc import toy_config
        from engine.executor.multiproc import MultiprocExecutor

        ex = MultiprocExecutor(toy_config(tp=1))
        print(json.dumps(ex.worker_pids))
        # no shutdown(): interpreter exit must stop the worker
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(pids) == 1 and wait_dead(pids) == []


TP_SCRIPT = textwrap.dedent("""
    import json, sys
    from engine import LLM, SamplingParams

    def main():
        model, plugin_dir = sys.argv[1], sys.argv[2]
        prompts = ["def main():", "import os\\nimport sys", "class Foo(object):"]
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        tokens = {}
        for tp in (1, 2):
            llm = LLM(model, tensor_parallel_size=tp, plugin_dirs=[plugin_dir], seed=0,
                      dtype="float32")
            tokens[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            llm.llm_engine.shutdown()
        print(json.dumps(tokens))

    if __name__ == "__main__":
        main()
""")


@pytest.mark.slow
def test_tensor_parallel_2_matches_1_for_a_model_from_a_plugin_dir(make_hf_model, tmp_path):
    """A Llama subclass registered by a general plugin that only --plugin-dir
    provides: two TP ranks (each loading the plugin) give TP=1's greedy tokens."""
    plugin_dir = tmp_path / "plugins"
    (plugin_dir / "src").mkdir(parents=True)
    (plugin_dir / "src" / "toy_tp_models.py").write_text(textwrap.dedent("""
        from engine.models.llama import LlamaForCausalLM


        class PluginLlamaForCausalLM(LlamaForCausalLM):
            pass


        def register():
            from engine import ModelRegistry

            ModelRegistry.register_model(
                "PluginLlamaForCausalLM", "toy_tp_models:PluginLlamaForCausalLM")
    """))
    (plugin_dir / "models.toml").write_text(textwrap.dedent("""
        schema-version = 1
        [package]
        name = "toy-tp-models"
        path = "src"
        [[plugin]]
        group = "general"
        name = "toy_tp_models"
        value = "toy_tp_models:register"
    """))
    model = tmp_path / "model"
    shutil.copytree(make_hf_model("llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["PluginLlamaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    script = tmp_path / "tp_run.py"  # spawn needs an importable main module
    script.write_text(TP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(model), str(plugin_dir)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(tokens["1"]) == 3 and all(len(t) == 12 for t in tokens["1"])
    assert tokens["2"] == tokens["1"]
