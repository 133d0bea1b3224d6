"""`engine generate` / `engine embed` as a user runs them: real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import subprocess_env


def _engine(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True, text=True, timeout=120, env=subprocess_env(**env),
    )


def test_generate_json_is_pure_json_on_stdout(make_hf_model):
    model = make_hf_model("llama")
    proc = _engine("generate", "--model", str(model), "--prompt", "def f(x):",
                   "--prompt", "import", "--max-tokens", "5", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["prompt"] for r in rows] == ["def f(x):", "import"]
    for row in rows:
        assert set(row) == {"prompt", "text", "token_ids", "finish_reason"}
        assert len(row["token_ids"]) == 5 and row["finish_reason"] == "length"


def test_generate_human_format_and_bad_parameter(make_hf_model):
    model = str(make_hf_model("llama"))
    proc = _engine("generate", "--model", model, "--prompt", "x = 1", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("x = 1")
    bad = _engine("generate", "--model", model, "--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 1 and "temperature" in bad.stderr and bad.stdout == ""


def test_embed_json_is_pure_json_on_stdout(minilm_dir):
    proc = _engine("embed", "--model", str(minilm_dir), "first text", "second", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["text"] for r in rows] == ["first text", "second"]
    assert all(len(r["embedding"]) == 384 for r in rows)
