"""Engine statistics, the built-in stat loggers and stat-logger plugins.

Plugins are real: the example package is pip-installed into a folder and found
through its entry point in a child process, or found through a manifest.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import subprocess_env

from engine.config import EngineConfig, ModelConfig
from engine.metrics import (
    LoggingStatLogger,
    PrefixCacheStats,
    PrometheusStatLogger,
    RequestStatsTracker,
    SchedulerStats,
    SchedulerStatsBuilder,
    StatLoggerBase,
    build_stat_loggers,
)

ROOT = Path(__file__).resolve().parent.parent
JSONL_EXAMPLE = ROOT / "examples" / "jsonl-stat-logger"


def make_config(model: str = "tiny-model") -> EngineConfig:
    config = EngineConfig(model_config=ModelConfig(model=model))
    config.cache_config.num_blocks = 64
    return config


def two_requests_iteration_stats():
    """Request a: 5 prompt tokens, 3 generated, stops. Request b: 7 prompt tokens,
    2 generated, still running after the last step. Returns (tracker, per-step stats)."""
    tracker = RequestStatsTracker()
    tracker.on_request_added("a", 10.0, 5)
    tracker.on_request_added("b", 10.5, 7)
    steps = []
    tracker.on_tokens("a", 1, 11.0)
    steps.append(tracker.take_iteration_stats(11.0))
    tracker.on_tokens("a", 1, 11.25)
    tracker.on_tokens("b", 1, 11.25)
    steps.append(tracker.take_iteration_stats(11.25))
    tracker.on_tokens("a", 1, 11.75)
    tracker.on_tokens("b", 1, 11.75)
    tracker.on_finished("a", "stop", 11.75)
    steps.append(tracker.take_iteration_stats(11.75))
    return tracker, steps


# --------------------------------------------------------------------------
# statistics


def test_tracker_counts_prompt_tokens_at_first_token_and_times_each_request():
    tracker, (s1, s2, s3) = two_requests_iteration_stats()
    assert (s1.num_prompt_tokens, s1.num_generation_tokens) == (5, 1)
    assert s1.time_to_first_tokens_iter == [1.0]
    assert s1.inter_token_latencies_iter == []
    assert (s2.num_prompt_tokens, s2.num_generation_tokens) == (7, 2)
    assert s2.time_to_first_tokens_iter == [0.75]
    assert s2.inter_token_latencies_iter == [0.25]
    assert (s3.num_prompt_tokens, s3.num_generation_tokens) == (0, 2)
    assert s3.inter_token_latencies_iter == [0.5, 0.5]
    [done] = s3.finished_requests
    assert (done.request_id, done.finish_reason) == ("a", "stop")
    assert (done.num_prompt_tokens, done.num_generation_tokens) == (5, 3)
    assert done.e2e_latency == pytest.approx(1.75)
    assert done.time_to_first_token == pytest.approx(1.0)
    assert done.decode_time == pytest.approx(0.75)
    assert s3.iteration_timestamp == 11.75
    assert tracker.num_tracked == 1


def test_tracker_ignores_unknown_requests_and_records_aborts_without_tokens():
    tracker = RequestStatsTracker()
    tracker.on_tokens("never-added", 3, 1.0)
    tracker.on_finished("never-added", "stop", 1.0)
    tracker.on_request_added("x", 0.0, 4)
    tracker.on_finished("x", "abort", 2.0)
    stats = tracker.take_iteration_stats(2.0)
    assert stats.num_generation_tokens == 0
    [aborted] = stats.finished_requests
    assert aborted.finish_reason == "abort"
    assert aborted.time_to_first_token is None and aborted.num_generation_tokens == 0
    assert tracker.take_iteration_stats(3.0).finished_requests == []


def test_scheduler_stats_builder_reports_per_step_changes_of_totals():
    builder = SchedulerStatsBuilder()
    first = builder.build(3, 1, 0.5, total_preemptions=2, total_prefix_queries=32,
                          total_prefix_hits=16)
    second = builder.build(2, 0, 0.25, total_preemptions=2, total_prefix_queries=48,
                           total_prefix_hits=20)
    assert (first.num_preemptions, first.prefix_cache_stats.queries) == (2, 32)
    assert (second.num_running_reqs, second.num_waiting_reqs, second.kv_cache_usage) == (2, 0, 0.25)
    assert second.num_preemptions == 0
    assert (second.prefix_cache_stats.queries, second.prefix_cache_stats.hits) == (16, 4)
    assert second.prefix_cache_stats.hit_rate == 0.25


# --------------------------------------------------------------------------
# Prometheus


def exposition(registry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_prometheus_exposition_has_exact_token_counters_after_known_records():
    stat_logger = PrometheusStatLogger(make_config("tiny-model"), engine_index=0)
    _, steps = two_requests_iteration_stats()
    for i, step in enumerate(steps):
        sched = SchedulerStats(
            num_running_reqs=2 - (i == 2),
            num_waiting_reqs=0,
            kv_cache_usage=0.125,
            prefix_cache_stats=PrefixCacheStats(queries=8, hits=2 * i),
            num_preemptions=1 if i == 1 else 0,
        )
        stat_logger.record(sched, step)
    stat_logger.log_engine_initialized()
    text = exposition(stat_logger.registry)
    labels = 'engine="0",model_name="tiny-model"'
    expected = [
        f"engine_prompt_tokens_total{{{labels}}} 12.0",
        f"engine_generation_tokens_total{{{labels}}} 5.0",
        'engine_request_success_total{engine="0",finished_reason="stop",model_name="tiny-model"} 1.0',
        'engine_request_success_total{engine="0",finished_reason="length",model_name="tiny-model"} 0.0',
        f"engine_num_preemptions_total{{{labels}}} 1.0",
        f"engine_prefix_cache_queries_total{{{labels}}} 24.0",
        f"engine_prefix_cache_hits_total{{{labels}}} 6.0",
        f"engine_num_requests_running{{{labels}}} 1.0",
        f"engine_num_requests_waiting{{{labels}}} 0.0",
        f"engine_kv_cache_usage_perc{{{labels}}} 0.125",
        f"engine_time_to_first_token_seconds_count{{{labels}}} 2.0",
        f"engine_time_to_first_token_seconds_sum{{{labels}}} 1.75",
        f"engine_inter_token_latency_seconds_count{{{labels}}} 3.0",
        f"engine_e2e_request_latency_seconds_count{{{labels}}} 1.0",
        f"engine_request_prompt_tokens_sum{{{labels}}} 5.0",
        f"engine_request_generation_tokens_sum{{{labels}}} 3.0",
        # ITLs 0.25, 0.5, 0.5: one falls in le=0.3
        'engine_inter_token_latency_seconds_bucket{engine="0",le="0.3",model_name="tiny-model"} 1.0',
        'engine_cache_config_info{block_size="16",engine="0",model_name="tiny-model",'
        'num_blocks="64"} 1.0',
    ]
    lines = text.splitlines()
    for line in expected:
        assert line in lines, f"{line!r} not in exposition:\n{text}"


def test_two_engines_in_one_process_get_separate_prometheus_registries():
    first = build_stat_loggers(make_config("model-a"), engine_indices=(0, 1))
    second = build_stat_loggers(make_config("model-b"))  # same metric names: must not collide
    assert first.prometheus_registry is not second.prometheus_registry
    _, steps = two_requests_iteration_stats()
    first.record(None, steps[0], engine_idx=1)
    second.record(None, steps[1])
    text_a, text_b = exposition(first.prometheus_registry), exposition(second.prometheus_registry)
    assert 'engine_prompt_tokens_total{engine="1",model_name="model-a"} 5.0' in text_a
    assert 'engine_prompt_tokens_total{engine="0",model_name="model-a"} 0.0' in text_a
    assert 'engine_prompt_tokens_total{engine="0",model_name="model-b"} 7.0' in text_b
    assert "model-b" not in text_a


# --------------------------------------------------------------------------
# logging


def test_logging_stat_logger_writes_throughput_queues_kv_usage_and_hit_rate(caplog):
    stat_logger = LoggingStatLogger(make_config(), engine_index=2)
    _, steps = two_requests_iteration_stats()
    sched = SchedulerStats(2, 3, 0.5, PrefixCacheStats(queries=8, hits=2), num_preemptions=1)
    for step in steps:
        stat_logger.record(sched, step)
    line = stat_logger.format_line(elapsed=2.0)
    assert line.startswith("Engine 002: ")
    assert "Avg prompt throughput: 6.0 tokens/s" in line  # 12 tokens / 2 s
    assert "Avg generation throughput: 2.5 tokens/s" in line  # 5 tokens / 2 s
    assert "Running: 2 reqs, Waiting: 3 reqs" in line
    assert "KV cache usage: 50.0%" in line
    assert "Prefix cache hit rate: 25.0%" in line
    assert "Preemptions: 3" in line
    with caplog.at_level(logging.INFO, logger="engine.metrics"):
        stat_logger.log()
        stat_logger.record(SchedulerStats(), None)  # idle from here on
        stat_logger.log()
        stat_logger.log()
    lines = [r.getMessage() for r in caplog.records if r.name == "engine.metrics"]
    assert len(lines) == 2, lines  # the second idle line is not repeated
    assert "Running: 2 reqs" in lines[0] and "Running: 0 reqs" in lines[1]


class CountingLogger(StatLoggerBase):
    """Test logger: counts the calls it receives."""

    instances: list[CountingLogger] = []

    def __init__(self, config, engine_index=0):
        super().__init__(config, engine_index)
        self.calls = {"init": 0, "record": 0, "log": 0}
        self.prompt_tokens = 0
        CountingLogger.instances.append(self)

    def log_engine_initialized(self):
        self.calls["init"] += 1

    def record(self, scheduler_stats, iteration_stats, engine_idx=0):
        self.calls["record"] += 1
        self.prompt_tokens += iteration_stats.num_prompt_tokens

    def log(self):
        self.calls["log"] += 1


class RaisingLogger(CountingLogger):
    def record(self, scheduler_stats, iteration_stats, engine_idx=0):
        super().record(scheduler_stats, iteration_stats, engine_idx)
        raise RuntimeError("disk full")


def test_manager_fans_out_per_engine_index_and_logs_on_the_interval():
    CountingLogger.instances.clear()
    manager = build_stat_loggers(make_config(), (0, 1), custom=[CountingLogger],
                                 log_interval=3600)
    counting = {c.engine_index: c for c in CountingLogger.instances}
    manager.log_engine_initialized()
    _, steps = two_requests_iteration_stats()
    for step in steps:
        manager.record(None, step, engine_idx=1)
    assert counting[1].calls == {"init": 1, "record": 3, "log": 0}
    assert counting[1].prompt_tokens == 12
    assert counting[0].calls["record"] == 0
    manager.shutdown()
    assert counting[0].calls["log"] == counting[1].calls["log"] == 1

    every_step = build_stat_loggers(make_config(), custom=[CountingLogger], log_interval=1e-9)
    for step in steps:
        every_step.record(None, step)
    assert CountingLogger.instances[-1].calls["log"] >= 1


def test_raising_logger_is_logged_once_and_the_others_keep_working(caplog):
    CountingLogger.instances.clear()
    manager = build_stat_loggers(make_config(), custom=[RaisingLogger, CountingLogger],
                                 log_interval=3600)
    raising, counting = CountingLogger.instances
    _, steps = two_requests_iteration_stats()
    with caplog.at_level(logging.ERROR, logger="engine.metrics"):
        for step in steps:
            manager.record(None, step)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "RaisingLogger" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert raising.calls["record"] == counting.calls["record"] == 3
    assert counting.prompt_tokens == 12


def test_raising_logger_fails_the_step_in_strict_mode(monkeypatch):
    monkeypatch.setenv("ENGINE_STRICT_PLUGINS", "1")
    manager = build_stat_loggers(make_config(), custom=[RaisingLogger])
    _, steps = two_requests_iteration_stats()
    with pytest.raises(RuntimeError, match="disk full"):
        manager.record(None, steps[0])


def test_bad_log_interval_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ENGINE_LOG_STATS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="ENGINE_LOG_STATS_INTERVAL"):
        build_stat_loggers(make_config())


# --------------------------------------------------------------------------
# stat-logger plugins


def write_plugin_dir(folder: Path, module: str, body: str, value: str, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(body))
    (folder / "plugins.toml").write_text(textwrap.dedent(f"""\
        schema-version = 1
        [package]
        name = "{module}"
        path = "."
        [[plugin]]
        group = "stat_logger"
        name = "{name}"
        value = "{value}"
        """))
    return folder


def test_plugin_value_that_is_not_a_subclass_is_a_type_error_naming_it(tmp_path, monkeypatch):
    folder = write_plugin_dir(
        tmp_path / "bad", "t_metrics_not_a_logger",
        "def make_logger(config, engine_index=0):\n    return None\n",
        "t_metrics_not_a_logger:make_logger", "not_a_logger",
    )
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(folder))
    with pytest.raises(TypeError) as info:
        build_stat_loggers(make_config())
    message = str(info.value)
    assert "'not_a_logger'" in message and "StatLoggerBase" in message
    assert str(folder / "plugins.toml") in message


def test_empty_engine_plugins_leaves_only_the_builtin_loggers(monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(JSONL_EXAMPLE / "manifest"))
    monkeypatch.setenv("ENGINE_PLUGINS", "")
    names = [type(s).__name__ for s in build_stat_loggers(make_config()).stat_loggers]
    assert names == ["LoggingStatLogger", "PrometheusStatLogger"]


@pytest.fixture(scope="session")
def installed_jsonl_example(tmp_path_factory) -> Path:
    """The example stat-logger package, pip-installed (real entry points) into a folder."""
    target = tmp_path_factory.mktemp("jsonl-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(JSONL_EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    return target


# Runs in a child process: a real engine with stats on serves two requests with
# known lengths, then prints what the requests produced and what the registry saw.
ENGINE_SIDE = """
import json, os, sys
import registry
from engine import LLM, SamplingParams

llm = LLM(os.environ["TINY_MODEL"], log_stats=True, kv_cache_memory=1 << 22)
outs = llm.generate(
    ["def add(a, b):", "import os"],
    [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
     SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)],
)
loggers = [type(s).__name__ for s in llm.llm_engine.stat_loggers.stat_loggers]
llm.shutdown()
records = [r for r in registry.discover("stat_logger") if r.enabled]
print(json.dumps({
    "loggers": loggers,
    "sources": {r.name: r.source for r in records},
    "prompt_lens": [len(o.prompt_token_ids) for o in outs],
    "output_lens": [len(o.outputs[0].token_ids) for o in outs],
}))
"""


def run_engine_side(tmp_path: Path, model_dir: Path, **env: str) -> tuple[dict, list[dict]]:
    stats_file = tmp_path / "stats.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_SIDE],
        env=subprocess_env(ENGINE_STATS_JSONL=str(stats_file), TINY_MODEL=str(model_dir),
                           OMP_NUM_THREADS="1", **env),
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    lines = [json.loads(line) for line in stats_file.read_text().splitlines()]
    return report, lines


def check_jsonl_stats(report: dict, lines: list[dict], model_dir: Path) -> None:
    """The example logger saw the start and every step, with token counts equal to
    what the requests produced."""
    assert lines[0]["event"] == "engine_initialized"
    assert lines[0]["model"] == str(model_dir)
    records = [line for line in lines if line["event"] == "record"]
    assert len(records) >= max(report["output_lens"])
    iterations = [r["iteration"] for r in records]
    assert report["output_lens"] == [4, 2]
    assert sum(it["num_prompt_tokens"] for it in iterations) == sum(report["prompt_lens"])
    assert sum(it["num_generation_tokens"] for it in iterations) == sum(report["output_lens"])
    finished = sorted(
        (f["num_prompt_tokens"], f["num_generation_tokens"], f["finish_reason"])
        for it in iterations for f in it["finished_requests"]
    )
    expected = sorted(
        (p, n, "length") for p, n in zip(report["prompt_lens"], report["output_lens"], strict=True)
    )
    assert finished == expected
    assert records[0]["scheduler"]["num_running_reqs"] == 2


def test_plugin_logger_from_an_entry_point_receives_init_and_records(
    installed_jsonl_example, tmp_path, make_hf_model
):
    model_dir = make_hf_model("llama")
    report, lines = run_engine_side(tmp_path, model_dir, PYTHONPATH=str(installed_jsonl_example))
    assert report["loggers"] == ["LoggingStatLogger", "PrometheusStatLogger", "JsonlStatLogger"]
    assert report["sources"] == {"jsonl": "entry-point"}
    check_jsonl_stats(report, lines, model_dir)


def test_plugin_logger_from_a_manifest_receives_init_and_records(tmp_path, make_hf_model):
    config_dir = tmp_path / "config"
    (config_dir / "plugins").mkdir(parents=True)
    manifest = (JSONL_EXAMPLE / "manifest" / "jsonl-stat-logger.toml").read_text()
    manifest = manifest.replace('path = "../src"', f'path = "{JSONL_EXAMPLE / "src"}"')
    (config_dir / "plugins" / "jsonl.toml").write_text(manifest)
    model_dir = make_hf_model("llama")
    report, lines = run_engine_side(tmp_path, model_dir, ENGINE_CONFIG_DIR=str(config_dir))
    assert report["loggers"][-1] == "JsonlStatLogger"
    assert report["sources"] == {"jsonl": "config-dir"}
    check_jsonl_stats(report, lines, model_dir)


def test_prometheus_counters_after_a_real_workload_equal_the_request_outputs(make_hf_model):
    """An engine with stats on: the Prometheus token and request counters equal what
    the requests produced."""
    from prometheus_client import generate_latest

    from engine import LLM, SamplingParams

    llm = LLM(make_hf_model("llama"), log_stats=True, kv_cache_memory=1 << 22)
    try:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 5, 7)]
        outs = llm.generate(["a = 1", "def f(x):", "import sys\nprint("], params)
        text = generate_latest(llm.llm_engine.stat_loggers.prometheus_registry).decode()
    finally:
        llm.shutdown()

    def value(metric: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(metric + "{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    assert value("engine_prompt_tokens_total") == sum(len(o.prompt_token_ids) for o in outs)
    assert value("engine_generation_tokens_total") == 3 + 5 + 7
    assert value("engine_request_success_total") == 3
    assert value("engine_num_requests_running") == 0
