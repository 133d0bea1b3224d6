"""Registry discovery cost against a bare entry-point scan, measured in the same run.

For 0, 10, 100 and 1000 manifests in one plugin dir (plus the built-in manifest,
the installed distributions' entry points, and the `engine-test-plugins` fixture
package installed with pip --target so that entry points of our groups exist):

- in-process: `registry` discovery with an empty cache (median of --repeats),
  next to `importlib.metadata.entry_points(group=...)` timed in the same loop;
- CLI: wall time and CPU time (user+sys, robust when others load the machine) of
  `python -m engine plugins list` (medians of --cli-repeats, sizes interleaved so
  that machine noise hits them alike).

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


def bench_in_process(dirs: dict[int, Path], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, best) ms per size, and of the bare scan timed right next to each."""
    from registry import _discovery, _toml

    def discover_fresh() -> None:  # as in a new process: no cached discovery, no cached lines
        _toml._line_cache.clear()
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
    return {key: (median_ms(samples), min(samples) * 1000) for key, samples in results.items()}


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run `cmd`; return (wall seconds, CPU seconds user+sys of the child). CPU time
    barely moves when other jobs share the machine, wall time does."""
    start = perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def bench_cli(dirs: dict[int, Path], repeats: int,
              env: dict[str, str]) -> dict[str, tuple[float, float, float]]:
    """(median wall, best wall, median CPU) ms of `engine plugins list` per size, and
    of a bare `python -c` entry-point scan, sizes interleaved."""
    bare_cmd = [sys.executable, "-c",
                "from importlib.metadata import entry_points as e; e(group='engine.general_plugins')"]
    list_cmd = [sys.executable, "-m", "engine", "plugins", "list"]
    walls: dict[str, list[float]] = {"bare": []} | {str(n): [] for n in dirs}
    cpus: dict[str, list[float]] = {key: [] for key in walls}
    for _ in range(repeats):
        for key, cmd, run_env in [("bare", bare_cmd, env)] + [
            (str(n), list_cmd, dict(env, ENGINE_PLUGIN_DIRS=str(folder)))
            for n, folder in dirs.items()
        ]:
            wall, cpu = run_timed(cmd, run_env)
            walls[key].append(wall)
            cpus[key].append(cpu)
    return {key: (median_ms(walls[key]), min(walls[key]) * 1000, median_ms(cpus[key]))
            for key in walls}


def report(in_process: dict[str, tuple[float, float]],
           cli: dict[str, tuple[float, float, float]], markdown: bool) -> str:
    bare, bare_best = in_process["bare"]
    base = cli["0"]
    lines = [
        "| manifests | in-process discovery, median / best (ms) | vs bare scan, median / best "
        "| `engine plugins list` wall median / best, CPU median (ms) "
        "| added vs 0 manifests, same three (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for count in SIZES:
        median, best = in_process[str(count)]
        wall, wall_best, cpu = cli[str(count)]
        lines.append(
            f"| {count} | {median:.1f} / {best:.1f} | {median / bare:.2f}x / "
            f"{best / bare_best:.2f}x | {wall:.0f} / {wall_best:.0f} / {cpu:.0f} | "
            f"{wall - base[0]:+.0f} / {wall_best - base[1]:+.0f} / {cpu - base[2]:+.0f} |"
        )
    lines.append("")
    lines.append(
        f"bare `importlib.metadata.entry_points(group=...)` in-process: {bare:.1f} ms median, "
        f"{bare_best:.1f} ms best; `python -c` doing only that scan: {cli['bare'][0]:.0f} ms "
        f"wall median, {cli['bare'][2]:.0f} ms CPU"
    )
    ratio = in_process["0"][0] / bare
    added = [cli["1000"][i] - base[i] for i in range(3)]
    verdicts = ", ".join(
        f"{label} {value:.0f} ms ({'met' if value <= 100 else 'MISSED'})"
        for label, value in zip(("wall median", "wall best", "CPU median"), added, strict=True)
    )
    lines.append(
        f"goals: 0 manifests in-process {ratio:.2f}x bare (goal <= 1.5x: "
        f"{'met' if ratio <= 1.5 else 'MISSED'}); 1000 manifests add to `engine plugins list` "
        f"(goal <= 100 ms): {verdicts}"
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
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}; "
          f"entry-point fixture package {'installed' if site else 'NOT installed (pip failed)'}; "
          f"{args.repeats} in-process and {args.cli_repeats} CLI runs per size")
    print(report(in_process, cli, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
