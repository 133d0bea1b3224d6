"""Platforms: the base class contract, the built-in CPU/CUDA platforms, and
resolution (docs/reference.md, "Platform interface") with real platform plugin
packages pip-installed into a temporary target and run in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import subprocess_env
from platform_fixtures.toy_platforms import RESOLVE_SCRIPT, pip_install_target, write_package

from engine.config import EngineConfig, ModelConfig, ParallelConfig
from engine.platforms import (
    CpuPlatform,
    CudaPlatform,
    Platform,
    PlatformEnum,
    cpu_platform_plugin,
    cuda_platform_plugin,
)

# --------------------------------------------------------------------------
# the classes themselves


def make_config(**parallel) -> EngineConfig:
    return EngineConfig(model_config=ModelConfig(model="unused"),
                        parallel_config=ParallelConfig(**parallel))


def test_platform_enum_has_the_four_members():
    assert {m.name for m in PlatformEnum} == {"CPU", "CUDA", "OOT", "UNSPECIFIED"}


def test_cpu_platform_fills_in_worker_device_and_backend():
    config = make_config()
    CpuPlatform.check_and_update_config(config)
    assert config.parallel_config.worker_cls == "engine.worker.Worker"
    assert config.parallel_config.distributed_backend == "gloo"
    assert config.device_config.device == "cpu"
    assert CpuPlatform.is_cpu() and not CpuPlatform.is_cuda() and not CpuPlatform.is_out_of_tree()
    assert CpuPlatform.get_device_communicator_cls() == "engine.distributed.DeviceCommunicatorBase"


def test_check_and_update_config_keeps_a_chosen_worker_and_backend():
    config = make_config(worker_cls="acme.AcmeWorker", distributed_backend="mpi")
    CpuPlatform.check_and_update_config(config)
    assert config.parallel_config.worker_cls == "acme.AcmeWorker"
    assert config.parallel_config.distributed_backend == "mpi"


def test_cpu_platform_reports_memory():
    free, total = CpuPlatform.mem_get_info()
    assert 0 < free <= total == CpuPlatform.get_device_total_memory()


def test_base_platform_names_the_method_it_cannot_serve():
    with pytest.raises(NotImplementedError, match="get_device_total_memory"):
        Platform.get_device_total_memory()
    with pytest.raises(NotImplementedError, match="device_count"):
        Platform.device_count()


def test_cuda_platform_imports_and_its_plugin_answers_without_a_gpu():
    import torch

    assert CudaPlatform.is_cuda() and CudaPlatform.device_type == "cuda"
    assert CudaPlatform.get_default_dist_backend() == "nccl"
    expected = "engine.platforms.cuda.CudaPlatform" if torch.cuda.is_available() else None
    assert cuda_platform_plugin() == expected
    assert cpu_platform_plugin() == "engine.platforms.cpu.CpuPlatform"


def test_attention_backend_follows_choice_then_env_then_default(monkeypatch):
    from engine.attention import AttentionBackendEnum

    naive, sdpa = AttentionBackendEnum.NAIVE.get_path(), AttentionBackendEnum.TORCH_SDPA.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, None) == sdpa
    assert CpuPlatform.get_attn_backend_cls("naive", None) == naive
    monkeypatch.setenv("ENGINE_ATTENTION_BACKEND", "NAIVE")
    assert CpuPlatform.get_attn_backend_cls(None, None) == naive
    assert CpuPlatform.get_attn_backend_cls("TORCH_SDPA", None) == sdpa
    with pytest.raises(ValueError, match="Valid options are: .*TORCH_SDPA"):
        CpuPlatform.get_attn_backend_cls("FLASH_NOPE", None)


# --------------------------------------------------------------------------
# resolution with real plugin packages


SCENARIOS = {
    "default": {},
    "alpha": {"TOYPLAT_ALPHA": "on"},
    "alpha+beta": {"TOYPLAT_ALPHA": "on", "TOYPLAT_BETA": "on"},
    "alpha+beta, ENGINE_PLATFORM=beta": {"TOYPLAT_ALPHA": "on", "TOYPLAT_BETA": "on",
                                         "ENGINE_PLATFORM": "beta"},
    "ENGINE_PLATFORM=absent alpha": {"ENGINE_PLATFORM": "alpha"},
    "ENGINE_PLATFORM=unknown": {"ENGINE_PLATFORM": "gamma"},
    "alpha raises": {"TOYPLAT_ALPHA": "raise", "TOYPLAT_BETA": "on"},
    "alpha raises, strict": {"TOYPLAT_ALPHA": "raise", "ENGINE_STRICT_PLUGINS": "1"},
    "alpha bogus": {"TOYPLAT_ALPHA": "bogus"},
}
DRY_RUN_SCENARIOS = {
    "dry: alpha": {"TOYPLAT_ALPHA": "on"},
    "dry: alpha, beta raises": {"TOYPLAT_ALPHA": "on", "TOYPLAT_BETA": "raise"},
    "dry: alpha+beta": {"TOYPLAT_ALPHA": "on", "TOYPLAT_BETA": "on"},
}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, dict]:
    """Install toyplat-alpha and toyplat-beta into a pip --target, then run every
    scenario in one fresh interpreter that has the target on PYTHONPATH."""
    root = tmp_path_factory.mktemp("toyplat-src")
    target = tmp_path_factory.mktemp("toyplat-target")
    pip_install_target([write_package(root, "alpha"), write_package(root, "beta")], target)
    scenarios = [{"name": n, "env": env} for n, env in SCENARIOS.items()]
    scenarios += [{"name": n, "env": env, "dry_run": True} for n, env in DRY_RUN_SCENARIOS.items()]
    proc = subprocess.run(
        [sys.executable, "-c", RESOLVE_SCRIPT, json.dumps(scenarios)],
        env=subprocess_env(PYTHONPATH=str(target),
                           TOYPLAT_DETECT_LOG=str(root / "detect.log")),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_engine_resolves_no_platform(resolved):
    assert resolved["import"] == {"resolved": False, "detected": [], "torch_imported": False}


def test_cpu_wins_when_no_out_of_tree_platform_is_active(resolved):
    out = resolved["default"]
    assert sorted(out["detected"]) == ["alpha", "beta"]  # the first access asked them
    assert out["device_name"] == "cpu" and out["is_out_of_tree"] is False


def test_one_active_out_of_tree_platform_wins(resolved):
    out = resolved["alpha"]
    assert out["device_name"] == "alpha" and out["is_out_of_tree"] is True
    # current_platform.import_kernels() ran the platform's hook once for two calls
    assert sorted(out["detected"]) == ["alpha", "beta", "kernels:alpha"]


def test_two_active_out_of_tree_platforms_raise_naming_both(resolved):
    error = resolved["alpha+beta"]["error"]
    assert "'alpha'" in error and "'beta'" in error and "ENGINE_PLATFORM" in error


def test_engine_platform_resolves_the_conflict(resolved):
    out = resolved["alpha+beta, ENGINE_PLATFORM=beta"]
    assert out["device_name"] == "beta"
    assert out["detected"] == ["beta", "kernels:beta"]  # only the requested plugin is asked


def test_engine_platform_fails_clearly_for_an_absent_platform(resolved):
    error = resolved["ENGINE_PLATFORM=absent alpha"]["error"]
    assert "'alpha'" in error and "returned None" in error


def test_engine_platform_fails_clearly_for_an_unknown_platform(resolved):
    error = resolved["ENGINE_PLATFORM=unknown"]["error"]
    assert "'gamma'" in error and "alpha, beta, cpu, cuda" in error  # the known ones


def test_raising_detector_is_a_warning_naming_the_plugin(resolved):
    out = resolved["alpha raises"]
    assert out["device_name"] == "beta"
    assert out["log"].startswith("WARNING engine.platforms: platform plugin 'alpha'")
    assert "Traceback" in out["log"] and "the alpha driver crashed" in out["log"]


def test_raising_detector_is_an_error_in_strict_mode(resolved):
    error = resolved["alpha raises, strict"]["error"]
    assert "'alpha'" in error and "the alpha driver crashed" in error


def test_plugin_returning_a_non_platform_class_is_rejected(resolved):
    error = resolved["alpha bogus"]["error"]
    assert "'alpha'" in error and "not a subclass of engine.platforms.Platform" in error


def test_dry_run_reports_the_choice_and_why(resolved):
    out = resolved["dry: alpha"]
    assert out["chosen"] == "alpha"
    assert out["platform_cls"] == "toyplat_alpha.platform.AlphaPlatform"
    assert "only active out-of-tree" in out["reason"] and out["problems"] == []
    assert out["resolved"] is False  # a dry run caches nothing


def test_dry_run_lists_a_raising_detector_as_a_problem(resolved):
    out = resolved["dry: alpha, beta raises"]
    assert out["chosen"] == "alpha"
    assert len(out["problems"]) == 1 and "'beta'" in out["problems"][0]
    assert out["log"] == ""  # reported, not logged


def test_dry_run_reports_a_conflict_without_raising(resolved):
    out = resolved["dry: alpha+beta"]
    assert out["chosen"] is None and out["platform_cls"] is None
    assert "'alpha'" in out["reason"] and "'beta'" in out["reason"]
    assert out["detectors"]["alpha"] == "toyplat_alpha.platform.AlphaPlatform"


def test_dry_run_without_plugins_explains_the_cpu_choice():
    from engine.platforms import dry_run_resolution, is_platform_resolved

    before = is_platform_resolved()
    result = dry_run_resolution()
    assert result.chosen in ("cpu", "cuda") and result.problems == []
    assert "out-of-tree" in result.reason
    assert is_platform_resolved() == before  # a dry run caches nothing
