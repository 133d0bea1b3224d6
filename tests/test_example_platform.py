"""The example platform plugin (examples/acme-platform), pip-installed into a temp
target as a vendor's user would install it: chosen over the CPU, its worker runs
in every worker process, its attention backend and torch.library kernel run, and
greedy tokens equal the built-in CPU platform's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
ACME = ROOT / "examples" / "acme-platform"

SCRIPT = """
import json, os, sys
from engine import LLM, SamplingParams
from engine.platforms import current_platform

def main():
    llm = LLM(sys.argv[1], tensor_parallel_size=int(sys.argv[2]), dtype="float32",
              kv_cache_memory=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(["def add(a, b):", "import os", "class Stack:\\n    def"], params)
    report = {
        "platform": current_platform.device_name,
        "worker_cls": llm.config.parallel_config.worker_cls,
        "tokens": [o.outputs[0].token_ids for o in outs],
        "pid": os.getpid(),
    }
    if "acme_platform" in sys.modules:
        import acme_platform
        report["stats"] = acme_platform.STATS
    llm.shutdown()
    print(json.dumps(report))

if __name__ == "__main__":
    main()
"""


def pip_install_example(example: Path, tmp: Path) -> Path:
    """pip-install a copy of an example package (setuptools writes build/ and
    *.egg-info next to the sources) into a fresh target folder; returns it."""
    source = tmp / "src"
    shutil.copytree(example, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    return target


@pytest.fixture(scope="module")
def acme_target(tmp_path_factory) -> Path:
    return pip_install_example(ACME, tmp_path_factory.mktemp("acme"))


def run_engine(tmp_path: Path, model: Path, tp: int = 1, **env: str) -> dict:
    script = tmp_path / "run_engine.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(model), str(tp)],
        capture_output=True, text=True, timeout=240,
        env=subprocess_env(OMP_NUM_THREADS="1", **env),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cpu_tokens(tmp_path_factory, make_hf_model) -> list[list[int]]:
    """The built-in CPU platform's greedy tokens (no plugin installed)."""
    tmp = tmp_path_factory.mktemp("cpu-run")
    report = run_engine(tmp, make_hf_model("llama"))
    assert report["platform"] == "cpu"
    return report["tokens"]


def test_installed_acme_platform_is_chosen_and_runs_its_own_parts(
    acme_target, tmp_path, make_hf_model, cpu_tokens
):
    trace = tmp_path / "trace"
    trace.mkdir()
    report = run_engine(tmp_path, make_hf_model("llama"),
                        PYTHONPATH=str(acme_target), ACME_TRACE_DIR=str(trace))
    assert report["platform"] == "acme-npu"
    assert report["worker_cls"] == "acme_platform.worker.AcmeWorker"
    stats = report["stats"]
    assert stats["kernels_loaded"] == 1
    assert stats["attention_calls"] > 0  # Acme's attention impl served every layer
    assert stats["rms_norm_kernel_calls"] > 0  # the torch.library kernel ran
    assert stats["all_reduce_calls"] == 0  # one rank: no collectives
    (worker,) = [json.loads(p.read_text()) for p in trace.iterdir()]
    assert (worker["rank"], worker["pid"], worker["worker"]) == (0, report["pid"], "AcmeWorker")
    assert report["tokens"] == cpu_tokens


def test_acme_worker_runs_in_every_tensor_parallel_process(
    acme_target, tmp_path, make_hf_model, cpu_tokens
):
    trace = tmp_path / "trace"
    trace.mkdir()
    report = run_engine(tmp_path, make_hf_model("llama"), tp=2,
                        PYTHONPATH=str(acme_target), ACME_TRACE_DIR=str(trace))
    workers = sorted((json.loads(p.read_text()) for p in trace.iterdir()),
                     key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert all(w["worker"] == "AcmeWorker" for w in workers)
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and report["pid"] not in pids  # one spawned process per rank
    for w in workers:  # in every rank: Acme's kernels, attention and communicator ran
        assert w["stats"]["kernels_loaded"] == 1, w
        assert w["stats"]["attention_calls"] > 0, w
        assert w["stats"]["rms_norm_kernel_calls"] > 0, w
        assert w["stats"]["all_reduce_calls"] > 0, w
    assert report["tokens"] == cpu_tokens


def test_engine_platform_cpu_overrides_the_installed_plugin(
    acme_target, tmp_path, make_hf_model, cpu_tokens
):
    report = run_engine(tmp_path, make_hf_model("llama"),
                        PYTHONPATH=str(acme_target), ENGINE_PLATFORM="cpu")
    assert report["platform"] == "cpu"
    assert report["worker_cls"] == "engine.worker.Worker"
    assert report["tokens"] == cpu_tokens


def test_doctor_says_acme_would_be_chosen(acme_target):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "plugins", "doctor"],
        capture_output=True, text=True, timeout=120,
        env=subprocess_env(PYTHONPATH=str(acme_target)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "general/acme = acme_platform:register (entry-point acme-platform 0.1.0)" in proc.stdout
    assert "would choose 'acme' (acme_platform.platform.AcmePlatform)" in proc.stdout, proc.stdout
    assert "only active out-of-tree platform" in proc.stdout


def test_doctor_with_the_device_absent_falls_back_to_cpu(acme_target):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "plugins", "doctor"],
        capture_output=True, text=True, timeout=120,
        env=subprocess_env(PYTHONPATH=str(acme_target), ACME_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "would choose 'cpu'" in proc.stdout, proc.stdout


def test_acme_manifest_in_a_plugin_dir_works_without_installing(tmp_path, make_hf_model,
                                                                 cpu_tokens):
    report = run_engine(tmp_path, make_hf_model("llama"),
                        ENGINE_PLUGIN_DIRS=str(ACME / "manifest"))
    assert report["platform"] == "acme-npu"
    assert report["stats"]["rms_norm_kernel_calls"] > 0
    assert report["tokens"] == cpu_tokens
