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
    # the CLI's defaults are seeded sampling (temperature 0.7, top-p 0.95, seed 0):
    # the same request offline gives the same tokens and text
    from engine import LLM, SamplingParams

    llm = LLM(model, kv_cache_memory=1 << 22)
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=0, max_tokens=5, ignore_eos=True)
    offline = llm.generate(["def f(x):", "import"], params)
    llm.shutdown()
    assert [r["token_ids"] for r in rows] == [o.outputs[0].token_ids for o in offline]
    assert [r["text"] for r in rows] == [o.outputs[0].text for o in offline]


def test_generate_human_format_and_bad_parameter(make_hf_model):
    model = str(make_hf_model("llama"))
    proc = _engine("generate", "--model", model, "--prompt", "x = 1", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("x = 1")
    bad = _engine("generate", "--model", model, "--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 1 and "temperature" in bad.stderr and bad.stdout == ""


def test_embed_json_is_pure_json_on_stdout(minilm_dir, sentence_transformer):
    import torch

    proc = _engine("embed", "--model", str(minilm_dir), "--dtype", "float32", "first text",
                   "second", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["text"] for r in rows] == ["first text", "second"]
    got = torch.tensor([r["embedding"] for r in rows])
    expected = sentence_transformer(minilm_dir).encode(["first text", "second"],
                                                       convert_to_tensor=True).float()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
