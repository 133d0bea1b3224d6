"""Registry discovery cost against a bare entry-point scan, measured in the same run.

For 0, 10, 100 and 1000 manifests in one plugin dir (plus the built-in manifest,
the installed distributions' entry points, and the `engine-test-plugins` fixture
package installed with pip --target so that entry points of our groups exist):

- in-process: `registry` discovery with an empty cache (median of --repeats),
  next to `importlib.metadata.entry_points(group=...)` timed in the same loop;
- CLI: wall time of `python -m engine plugins list` (median of --cli-repeats,
  sizes interleaved so that machine noise hits them alike).

Goals (issue 2): 1000 manifests add at most 100 ms to `engine plugins list`;
with no manifests, in-process discovery costs at most 1.5x the bare scan.

    python benchmarks/bench_registry.py [--repeats 21] [--cli-repeats 7] [--markdown]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path
from time import perf_counter

REPO = Path(__file__).resolve().parent.parent
SIZES = (0, 10, 100, 1000)
GROUPS = ("general", "platform", "io_processor", "stat_logger")

MANIFEST = """\
schema-version = 1

[package]
name = "bench-plugin-{i}"
version = "1.0.{i}"
requires-engine = ">=0.1"
path = "src"

[[plugin]]
group = "{group}"
name = "bench_{i}"
value = "bench_pkg_{i}.plugin:register"
description = "benchmark plugin number {i}"
"""


def make_plugin_dir(root: Path, count: int) -> Path:
    folder = root / f"plugins-{count}"
    folder.mkdir(mode=0o700)
    for i in range(count):
        text = MANIFEST.format(i=i, group=GROUPS[i % len(GROUPS)])
        (folder / f"bench-{i:04d}.toml").write_text(text)
    return folder


def install_fixture_plugins(root: Path) -> Path | None:
    """pip-install the test suite's tiny entry-point package; None if that fails."""
    source = REPO / "tests" / "plugin_fixtures" / "ep_pkg"
    target = root / "site"
    copy = root / "ep_pkg"
    shutil.copytree(source, copy)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(target), str(copy)],
        capture_output=True, text=True,
    )
    return target if proc.returncode == 0 else None


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(func) -> float:
    gc.collect()  # garbage of the previous run must not be collected inside this one
    start = perf_counter()
    func()
    return perf_counter() - start


def bench_in_process(dirs: dict[int, Path], repeats: int) -> dict[str, float]:
    """Median ms per size, and of the bare scan timed right next to each of them."""
    from registry import _discovery

    def discover_fresh() -> None:
        _discovery.clear_cache()
        _discovery.current_discovery()

    results: dict[str, list[float]] = {"bare": []} | {str(n): [] for n in dirs}
    discover_fresh()  # imports (pydantic, packaging) outside the timing
    for _ in range(repeats):
        for count, folder in dirs.items():
            os.environ["ENGINE_PLUGIN_DIRS"] = str(folder)
            results["bare"].append(timed(lambda: entry_points(group="engine.general_plugins")))
            results[str(count)].append(timed(discover_fresh))
    discovery = _discovery.current_discovery()
    assert sum(r.source == "plugin-dir" for r in discovery.records) == max(dirs)
    os.environ.pop("ENGINE_PLUGIN_DIRS", None)
    return {key: median_ms(samples) for key, samples in results.items()}


def bench_cli(dirs: dict[int, Path], repeats: int,
              env: dict[str, str]) -> dict[str, tuple[float, float]]:
    bare_cmd = [sys.executable, "-c",
                "from importlib.metadata import entry_points as e; e(group='engine.general_plugins')"]
    results: dict[str, list[float]] = {"python + bare scan": []} | {str(n): [] for n in dirs}
    for _ in range(repeats):
        start = perf_counter()
        subprocess.run(bare_cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        results["python + bare scan"].append(perf_counter() - start)
        for count, folder in dirs.items():
            run_env = dict(env, ENGINE_PLUGIN_DIRS=str(folder))
            start = perf_counter()
            subprocess.run([sys.executable, "-m", "engine", "plugins", "list"], env=run_env,
                           check=True, stdout=subprocess.DEVNULL)
            results[str(count)].append(perf_counter() - start)
    return {key: (median_ms(samples), min(samples) * 1000) for key, samples in results.items()}


def report(in_process: dict[str, float], cli: dict[str, tuple[float, float]],
           markdown: bool) -> str:
    bare = in_process["bare"]
    base_median, base_min = cli["0"]
    lines = [
        "| manifests | in-process discovery (ms) | vs bare entry_points scan | "
        "`engine plugins list` wall, median / min (ms) | added vs 0 manifests, "
        "median / min (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for count in SIZES:
        key = str(count)
        median, fastest = cli[key]
        lines.append(
            f"| {count} | {in_process[key]:.2f} | {in_process[key] / bare:.2f}x | "
            f"{median:.0f} / {fastest:.0f} | {median - base_median:+.0f} / "
            f"{fastest - base_min:+.0f} |"
        )
    lines.append("")
    lines.append(f"bare `importlib.metadata.entry_points(group=...)` in-process: {bare:.2f} ms; "
                 f"`python -c` doing only that scan: {cli['python + bare scan'][0]:.0f} ms wall")
    goal_ratio = in_process["0"] / bare
    goal_added = cli["1000"][0] - base_median
    lines.append(
        f"goals: 0 manifests in-process {goal_ratio:.2f}x bare (goal <= 1.5x: "
        f"{'met' if goal_ratio <= 1.5 else 'MISSED'}); 1000 manifests add {goal_added:.0f} ms "
        f"to `engine plugins list` (median; goal <= 100 ms: {'met' if goal_added <= 100 else 'MISSED'})"
    )
    text = "\n".join(lines)
    return text if markdown else text.replace("`", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="in-process repeats")
    parser.add_argument("--cli-repeats", type=int, default=7, help="CLI repeats per size")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    try:
        site = install_fixture_plugins(root)
        if site is not None:
            sys.path.insert(0, str(site))
        config = root / "config"
        config.mkdir(mode=0o700)
        os.environ["ENGINE_CONFIG_DIR"] = str(config)
        os.environ.pop("ENGINE_PLUGINS", None)
        sys.path.insert(0, str(REPO))
        dirs = {count: make_plugin_dir(root, count) for count in SIZES}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(site) if site else "", str(REPO), env.get("PYTHONPATH", "")) if p)
        in_process = bench_in_process(dirs, args.repeats)
        cli = bench_cli(dirs, args.cli_repeats, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; entry-point fixture "
          f"package {'installed' if site else 'NOT installed (pip failed)'}")
    print(report(in_process, cli, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
