"""The conformance kit (`engine plugins test`, `pytest -p engine.testing`) on the
example plugins, pip-installed into temporary folders, and on a deliberately broken
copy of the example platform whose failures must be caught and named."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from test_example_platform import pip_install_example

from engine.testing import keyword_matcher

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def engine_cli(*args: str, target: Path | None = None, timeout: int = 300,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(**({"PYTHONPATH": str(target)} if target else {}))
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def kit_json(name: str, target: Path, *extra: str) -> tuple[int, list[dict]]:
    proc = engine_cli("plugins", "test", name, "--json", *extra, target=target)
    assert proc.stdout.strip().startswith("["), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def break_acme(tmp: Path) -> Path:
    """A copy of examples/acme-platform with three classic bugs: attention that
    ignores the layer's softmax scale, an RMSNorm kernel called with the wrong
    epsilon, and an all-reduce that averages instead of summing."""
    source = tmp / "acme-broken"
    shutil.copytree(EXAMPLES / "acme-platform", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    edits = {
        "attention.py": ("        acme_platform.STATS[\"attention_calls\"] += 1\n",
                         "        acme_platform.STATS[\"attention_calls\"] += 1\n"
                         "        self.scale = self.head_size ** -0.5  # BUG: not the model's\n"),
        "ops.py": ("self.weight, self.variance_epsilon)", "self.weight, 1e-2)  # BUG"),
        "communicator.py": ("return super().all_reduce(input_)",
                            "return super().all_reduce(input_) / 2  # BUG: a mean"),
    }
    for file, (old, new) in edits.items():
        path = source / "src" / "acme_platform" / file
        text = path.read_text()
        assert old in text, f"{file} changed: update break_acme"
        path.write_text(text.replace(old, new))
    return source


@pytest.fixture(scope="module")
def acme_target(tmp_path_factory) -> Path:
    return pip_install_example(EXAMPLES / "acme-platform", tmp_path_factory.mktemp("acme"))


@pytest.fixture(scope="module")
def broken_target(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("acme-broken")
    return pip_install_example(break_acme(tmp), tmp)


@pytest.fixture(scope="module")
def broken_run(broken_target) -> subprocess.CompletedProcess:
    """One kit run on the broken platform (all but the end-to-end engine runs, which
    the passing example covers), shared by the assertions below."""
    return engine_cli("plugins", "test", "acme", "--group", "platform", "-k",
                      "not greedy and not lora",
                      target=broken_target)


# ---------------------------------------------------------------------------
# the examples pass


@pytest.mark.slow
def test_example_platform_passes_every_check(acme_target):
    code, results = kit_json("acme", acme_target)
    failed = [r for r in results if r["outcome"] in ("failed", "error")]
    assert code == 0 and not failed, failed
    checks = {r["check"]: r["outcome"] for r in results}
    # every part of the platform contract was checked, and passed
    for name in ("detector", "class_attributes", "classmethods", "check_and_update_config",
                 "import_kernels", "attn_backend_cls", "device_communicator_cls",
                 "attention[float32-bs8-gqa-prefill]", "attention[float32-bs16-gqa-chunked_prefill]",
                 "attention[bfloat16-bs16-mha-decode]", "custom_op[rms_norm-float32]",
                 "communicator[all_reduce]", "communicator[reduce_scatter]",
                 "communicator[send_recv]", "greedy_vs_cpu", "lora_vs_cpu"):
        assert checks[f"platform/acme::{name}"] == "passed", name
    assert checks["general/acme::reentrant"] == "passed"


def example_plugins() -> list[tuple[str, str]]:
    """(example folder, plugin name) of every entry point of every example but the
    platform (checked installed, above), so a new example is checked too."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    found = []
    for project in sorted(EXAMPLES.glob("*/pyproject.toml")):
        if project.parent.name == "acme-platform":
            continue
        tables = tomllib.loads(project.read_text())["project"].get("entry-points", {})
        names = {name for group, table in tables.items() if group.startswith("engine.")
                 for name in table}
        found += [(project.parent.name, name) for name in sorted(names)]
    return found


@pytest.mark.parametrize("example, name", example_plugins())
def test_every_example_plugin_passes_the_kit(example, name):
    proc = engine_cli("--plugin-dir", str(EXAMPLES / example), "plugins", "test", name, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)
    assert results and all(r["outcome"] in ("passed", "skipped") for r in results), results
    assert any(r["outcome"] == "passed" for r in results)
    if name == "my_model":  # the architecture it registers was found and checked
        outcomes = {r["check"]: r["outcome"] for r in results}
        assert outcomes["general/my_model::model_architectures"] == "passed", results


# ---------------------------------------------------------------------------
# a broken platform is caught, by name


@pytest.mark.slow
def test_broken_platform_fails_and_names_each_broken_part(broken_run):
    assert broken_run.returncode == 1, broken_run.stdout + broken_run.stderr
    lines = broken_run.stdout.strip().splitlines()
    failed = {m.group(1): m.group(2) for line in lines
              if (m := re.match(r"FAILED platform/acme::(\S+): (.+)", line))}
    # the wrong softmax scale: attention differs from NAIVE, in every scenario
    for step in ("prefill", "chunked_prefill", "prefix_hit", "decode"):
        assert f"attention[float32-bs16-gqa-{step}]" in failed, lines
    assert "vs NAIVE" in failed["attention[float32-bs8-mha-prefill]"]
    assert "max |diff|" in failed["attention[float32-bs8-mha-prefill]"]
    # the RMSNorm kernel with the wrong epsilon
    assert "forward_native" in failed["custom_op[rms_norm-float32]"]
    # the averaging all-reduce (the default reduce_scatter on gloo reduces through it)
    assert "vs gloo" in failed["communicator[all_reduce]"]
    assert "communicator[all_gather]" not in failed and "communicator[send_recv]" not in failed
    # what is not broken is not blamed
    allowed = re.compile(r"attention\[|custom_op\[rms_norm-|communicator\[(all_reduce|reduce_scatter)\]")
    assert all(allowed.match(c) for c in failed), failed
    assert re.search(r"acme: \d+ passed, \d+ failed", lines[-1]), lines[-1]


@pytest.mark.slow
def test_pytest_plugin_runs_the_same_checks(broken_target, acme_target, tmp_path):
    def run(target: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "engine.testing", "--engine-plugin", "acme",
             "-k", "detector or custom_op", "-p", "no:cacheprovider", "-q"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env=subprocess_env(PYTHONPATH=str(target)))

    broken = run(broken_target)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "FAILED platform/acme::custom_op[rms_norm-float32]" in broken.stdout, broken.stdout
    assert "vs forward_native" in broken.stdout
    good = run(acme_target)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"\b4 passed\b", good.stdout), good.stdout  # detector + rms_norm x 3 dtypes


# ---------------------------------------------------------------------------
# IO-processor and stat-logger contracts, on plugins that break them

BAD_PLUGINS = '''
from engine.io_processors import IOProcessor
from engine.sample import LogitsProcessor


class LenientProcessor(IOProcessor):
    def parse_data(self, data):
        return data  # BUG: accepts anything

    def pre_process(self, prompt, request_id=None, **kw):
        return [str(prompt)]

    def post_process(self, model_output, request_id=None, **kw):
        return model_output

    def pre_process_async(self, prompt, request_id=None, **kw):  # BUG: not async
        return self.pre_process(prompt, request_id)


def lenient():
    return "bad_plugins.LenientProcessor"


class WrongShape(LogitsProcessor):
    def apply(self, logits):
        return logits[:, :-1]  # BUG: drops a token


class NotAStatLogger:
    def __init__(self, config, engine_index=0):
        pass
'''

BAD_MANIFEST = '''
schema-version = 1
[package]
path = "."
[[plugin]]
group = "io_processor"
name = "lenient"
value = "bad_plugins:lenient"
[[plugin]]
group = "stat_logger"
name = "notalogger"
value = "bad_plugins:NotAStatLogger"
[[plugin]]
group = "logits_processor"
name = "wrongshape"
value = "bad_plugins:WrongShape"
'''


def test_io_processor_stat_logger_and_logits_processor_violations_are_named(tmp_path):
    (tmp_path / "bad_plugins.py").write_text(BAD_PLUGINS)
    (tmp_path / "bad.toml").write_text(BAD_MANIFEST)
    proc = engine_cli("--plugin-dir", str(tmp_path), "plugins", "test", "lenient")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED io_processor/lenient::parse_data_rejects_bad_input: " in proc.stdout
    assert "FAILED io_processor/lenient::async_variants: " in proc.stdout
    assert "pre_process_async" in proc.stdout
    proc = engine_cli("--plugin-dir", str(tmp_path), "plugins", "test", "notalogger")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"FAILED stat_logger/notalogger::is_subclass: .*StatLoggerBase", proc.stdout)
    proc = engine_cli("--plugin-dir", str(tmp_path), "plugins", "test", "wrongshape",
                      "-k", "not engine_run")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"FAILED logits_processor/wrongshape::batch_steps: after 3 requests added: "
                     r"apply returned \(3, 63\), expected \(3, 64\)", proc.stdout), proc.stdout


def test_unknown_plugin_is_a_usage_error_listing_what_exists():
    proc = engine_cli("plugins", "test", "no-such-plugin")
    assert proc.returncode == 2
    assert "no plugin named 'no-such-plugin'" in proc.stderr
    assert "platform/cpu" in proc.stderr


def test_importing_the_kit_imports_neither_torch_nor_pytest():
    code = ("import sys, engine.testing; "
            "print(sorted(m for m in ('torch', 'pytest') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=subprocess_env())
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize("expr, selected", [
    ("attention", ["p::attention[float32-bs8-gqa-decode]", "p::attention[bfloat16-bs16-mha-prefill]"]),
    ("attention and float32", ["p::attention[float32-bs8-gqa-decode]"]),
    ("not attention", ["p::detector", "p::custom_op[rms_norm-float32]"]),
    ("detector or (custom_op and not bfloat16)", ["p::detector", "p::custom_op[rms_norm-float32]"]),
    ("DECODE", ["p::attention[float32-bs8-gqa-decode]"]),
])
def test_keyword_expression_selects_checks_like_pytest_k(expr, selected):
    ids = ["p::detector", "p::attention[float32-bs8-gqa-decode]",
           "p::attention[bfloat16-bs16-mha-prefill]", "p::custom_op[rms_norm-float32]"]
    matches = keyword_matcher(expr)
    assert [i for i in ids if matches(i)] == [i for i in ids if i in selected]


@pytest.mark.parametrize("expr", ["", "a and", "(a", "a b", "or a"])
def test_malformed_keyword_expression_is_refused(expr):
    with pytest.raises(ValueError, match="-k"):
        keyword_matcher(expr)
