"""`engine embed` without --model: the default model cannot pool, so the error
says exactly what to pass; what it suggests (a cached name) then works."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import subprocess_env
from test_hf_cache import COMMIT_A, _cache_model


def test_no_model_error_says_what_to_pass():
    proc = subprocess.run([sys.executable, "-m", "engine", "embed", "hello"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--model DIR" in proc.stderr and "--model sentence-transformers/all-MiniLM-L6-v2" \
        in proc.stderr


def test_the_suggested_cached_name_works(minilm_dir, tmp_path):
    cache = tmp_path / "hub"
    _cache_model(cache, "sentence-transformers/all-MiniLM-L6-v2", minilm_dir, COMMIT_A)
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "embed", "--model",
         "sentence-transformers/all-MiniLM-L6-v2", "hello", "--json"],
        capture_output=True, text=True, timeout=120,
        env=subprocess_env(HF_HUB_CACHE=str(cache)))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows[0]["text"] == "hello" and len(rows[0]["embedding"]) == 384
