"""Source of tiny out-of-tree platform plugin packages, pip-installed by the tests.

Each package declares one entry point in `engine.platform_plugins`. Its detector
reads `TOYPLAT_<NAME>` ("on": return the platform class name, "raise": raise,
"bogus": return a class that is not a Platform, anything else: None) and appends
its name to the file named by `TOYPLAT_DETECT_LOG`, so a test can tell whether
and when detection ran.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "toyplat-{name}"
version = "0.1.0"

[project.entry-points."engine.platform_plugins"]
{name} = "toyplat_{name}:detect"

[tool.setuptools]
packages = ["toyplat_{name}"]
"""

DETECTOR = '''\
"""Detector of the toy {name!r} platform: cheap, imports neither torch nor engine."""
import os


def detect():
    log = os.environ.get("TOYPLAT_DETECT_LOG")
    if log:
        with open(log, "a") as f:
            f.write("{name}\\n")
    mode = os.environ.get("TOYPLAT_{upper}", "off")
    if mode == "raise":
        raise RuntimeError("the {name} driver crashed while probing")
    if mode == "bogus":
        return "collections.OrderedDict"
    if mode == "on":
        return "toyplat_{name}.platform.{cls}"
    return None
'''

PLATFORM = '''\
import os

from engine.platforms import CpuPlatform, PlatformEnum


class {cls}(CpuPlatform):
    """A CPU in disguise: enough to tell which platform won."""

    _enum = PlatformEnum.OOT
    device_name = "{name}"

    @classmethod
    def import_kernels(cls):
        with open(os.environ["TOYPLAT_DETECT_LOG"], "a") as f:
            f.write("kernels:{name}\\n")
'''


def write_package(root: Path, name: str) -> Path:
    """Write the source tree of package `toyplat-<name>` under `root`."""
    cls = name.capitalize() + "Platform"
    fields = {"name": name, "upper": name.upper(), "cls": cls}
    pkg = root / f"toyplat-{name}"
    src = pkg / f"toyplat_{name}"
    src.mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PYPROJECT.format(**fields))
    (src / "__init__.py").write_text(DETECTOR.format(**fields))
    (src / "platform.py").write_text(PLATFORM.format(**fields))
    return pkg


def pip_install_target(packages: list[Path], target: Path) -> None:
    """`pip install --no-deps --target` the packages (offline, no build isolation)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
         *map(str, packages)],
        check=True, capture_output=True, text=True,
    )


RESOLVE_SCRIPT = textwrap.dedent("""
    # Runs resolution scenarios one after another in this fresh interpreter and
    # prints {scenario name: outcome} as JSON. argv[1]: JSON list of
    # {"name", "env", "dry_run"}. Detectors and the registry read the environment
    # on every resolution, so one process serves every scenario.
    import json, logging, os, sys

    class Capture(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []

        def emit(self, record):
            self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    capture = Capture()
    logging.getLogger().addHandler(capture)

    def detect_log():
        path = os.environ["TOYPLAT_DETECT_LOG"]
        return open(path).read().split() if os.path.exists(path) else []

    import engine
    import engine.platforms
    from engine.platforms import current_platform
    results = {"import": {"resolved": engine.platforms.is_platform_resolved(),
                          "detected": detect_log(),
                          "torch_imported": "torch" in sys.modules}}
    base_env = dict(os.environ)
    for scenario in json.loads(sys.argv[1]):
        os.environ.clear()
        os.environ.update(base_env, **scenario["env"])
        if os.path.exists(os.environ["TOYPLAT_DETECT_LOG"]):
            os.remove(os.environ["TOYPLAT_DETECT_LOG"])
        capture.lines.clear()
        engine.platforms.reset_current_platform()
        out = {}
        if scenario.get("dry_run"):
            r = engine.platforms.dry_run_resolution()
            out.update(chosen=r.chosen, platform_cls=r.platform_cls, reason=r.reason,
                       problems=r.problems, detectors=r.detectors,
                       resolved=engine.platforms.is_platform_resolved())
        else:
            try:
                out["device_name"] = current_platform.device_name
                out["is_out_of_tree"] = current_platform.is_out_of_tree()
                current_platform.import_kernels()
                current_platform.import_kernels()
            except RuntimeError as exc:
                out["error"] = str(exc)
        out["detected"] = detect_log()
        out["log"] = "\\n".join(capture.lines)
        results[scenario["name"]] = out
    print(json.dumps(results))
""")
