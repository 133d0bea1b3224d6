"""The platform hooks the engine calls for any worker class: `import_kernels` runs
(once per process) and the global generators are seeded before a worker that
does not inherit the default `Worker` is built; an explicit dtype the platform
does not list in `supported_dtypes` is refused at configuration time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import write_manifest

PLATFORM = '''
import os

from engine.platforms import CpuPlatform, PlatformEnum
from engine.worker import WorkerBase


def detect():
    return "hookplat.HookPlatform"


class HookPlatform(CpuPlatform):
    _enum = PlatformEnum.OOT
    device_name = "hookplat"
    supported_dtypes = ("float32",)

    @classmethod
    def import_kernels(cls):
        with open(os.environ["HOOK_LOG"], "a") as f:
            f.write("kernels\\n")

    @classmethod
    def check_and_update_config(cls, config):
        super().check_and_update_config(config)
        config.parallel_config.worker_cls = "hookplat.BareWorker"


class BareWorker(WorkerBase):
    """A worker written from the base class, not from engine.worker.Worker."""

    def __init__(self, **kwargs):
        import torch

        super().__init__(**kwargs)
        with open(os.environ["HOOK_LOG"], "a") as f:
            f.write(f"worker seed={torch.initial_seed()}\\n")
'''

SCRIPT = """
import sys
from engine.config import EngineConfig, ModelConfig
from engine.executor import build_worker
from engine.platforms import current_platform

config = EngineConfig(ModelConfig(model="unused", seed=1234, dtype=sys.argv[1]))
try:
    current_platform.check_and_update_config(config)
except ValueError as exc:
    print("ValueError:", exc)
    raise SystemExit(0)
build_worker(config, rank=0)
build_worker(config, rank=0)
"""


@pytest.fixture
def hookplat(tmp_path):
    code = tmp_path / "plugin"
    code.mkdir()
    (code / "hookplat.py").write_text(textwrap.dedent(PLATFORM))
    write_manifest(code, "hookplat.toml",
                   [{"group": "platform", "name": "hookplat", "value": "hookplat:detect"}],
                   package='path = "."')
    return code


def run(hookplat, tmp_path, dtype: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "hook.log"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, dtype], capture_output=True, text=True, timeout=120,
        env=subprocess_env(ENGINE_PLUGIN_DIRS=str(hookplat), HOOK_LOG=str(log)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, log.read_text().splitlines() if log.exists() else []


def test_any_worker_class_gets_the_platform_kernels_and_the_seed(hookplat, tmp_path):
    _, lines = run(hookplat, tmp_path, "auto")
    # kernels once for the process, before the first worker; every worker seeded
    assert lines == ["kernels", "worker seed=1234", "worker seed=1234"]


def test_a_dtype_the_platform_does_not_list_is_refused(hookplat, tmp_path):
    proc, lines = run(hookplat, tmp_path, "float16")
    assert proc.stdout.strip() == (
        "ValueError: dtype 'float16' is not supported on platform 'hookplat' (HookPlatform). "
        "Valid options are: auto, float32")
    assert lines == []  # refused before any worker was built


def test_cpu_platform_accepts_each_dtype_it_lists():
    from engine.config import EngineConfig, ModelConfig
    from engine.platforms import CpuPlatform

    for dtype in ("auto", *CpuPlatform.supported_dtypes):
        config = EngineConfig(ModelConfig(model="unused", dtype=dtype))
        CpuPlatform.check_and_update_config(config)
        assert config.device_config.device == "cpu"
