"""Models by name from the local Hugging Face cache: a cache folder in the hub's
real layout (``models--org--name/refs``, ``snapshots``), checked against
`huggingface_hub`'s own offline lookup, then loaded by the engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from engine.model_loader.hf_cache import ModelNotCachedError, hub_cache_dir, resolve_model

COMMIT_A = "a" * 8 + "1234567890abcdef1234567890abcdef"
COMMIT_B = "b" * 8 + "1234567890abcdef1234567890abcdef"


def _cache_model(cache: Path, repo_id: str, model_dir: Path, commit: str,
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `model_dir`'s files in `cache` as the hub does: blobs, snapshot links, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = f.relative_to(model_dir)
        blob = repo / "blobs" / f"{commit[:8]}-{'-'.join(rel.parts)}"
        shutil.copy(f, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(rel.parts) + 1)) / "blobs" / blob.name)
    for ref in refs:
        path = repo / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch, make_hf_model):
    root = tmp_path / "hub"
    _cache_model(root, "tiny-org/tiny-llama", make_hf_model("llama"), COMMIT_A,
                 refs=("main", "v1"))
    _cache_model(root, "tiny-org/tiny-llama", make_hf_model("llama", seed=1), COMMIT_B,
                 refs=("dev",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.delenv("HF_HOME", raising=False)
    return root


def test_cache_dir_follows_hf_hub_cache_then_hf_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    assert hub_cache_dir() == Path.home() / ".cache" / "huggingface" / "hub"


def test_revisions_resolve_as_huggingface_hub_resolves_them(cache):
    from huggingface_hub import try_to_load_from_cache

    for revision in (None, "main", "v1", "dev", COMMIT_B):
        ours = resolve_model("tiny-org/tiny-llama", revision=revision)
        theirs = try_to_load_from_cache("tiny-org/tiny-llama", "config.json",
                                        cache_dir=cache, revision=revision)
        assert ours / "config.json" == Path(theirs), revision
    assert resolve_model("tiny-org/tiny-llama").name == COMMIT_A
    assert resolve_model("tiny-org/tiny-llama", revision="dev").name == COMMIT_B
    assert resolve_model("tiny-org/tiny-llama", revision=COMMIT_B[:10]).name == COMMIT_B


def test_missing_model_or_revision_says_how_to_download(cache):
    with pytest.raises(ModelNotCachedError) as exc:
        resolve_model("nobody/missing-model")
    msg = str(exc.value)
    assert "nobody/missing-model" in msg and str(cache) in msg
    assert "hf download nobody/missing-model" in msg
    with pytest.raises(ModelNotCachedError) as exc:
        resolve_model("tiny-org/tiny-llama", revision="v9")
    msg = str(exc.value)
    assert "'v9'" in msg and "dev, main, v1" in msg and "--revision v9" in msg


def test_folder_wins_and_revision_with_folder_is_refused(make_hf_model):
    folder = make_hf_model("llama")
    assert resolve_model(str(folder)) == folder
    with pytest.raises(ValueError, match="revision"):
        resolve_model(folder, revision="main")
    with pytest.raises(ModelNotCachedError, match="not a folder"):
        resolve_model("./no/such/dir/here")


def test_llm_loads_a_model_by_name_and_revision(cache, make_hf_model):
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for revision in ("main", "dev"):
        llm = LLM("tiny-org/tiny-llama", revision=revision, dtype="float32",
                  kv_cache_memory=2**22)
        try:
            assert Path(llm.config.model_config.model).name in (COMMIT_A, COMMIT_B)
            outs[revision] = llm.generate("def f(x):", params)[0].outputs[0].token_ids
        finally:
            llm.shutdown()
    direct = LLM(make_hf_model("llama", seed=1), dtype="float32", kv_cache_memory=2**22)
    try:
        assert direct.generate("def f(x):", params)[0].outputs[0].token_ids == outs["dev"]
    finally:
        direct.shutdown()
    assert outs["main"] != outs["dev"]  # two different random models


def test_cli_generate_by_name_and_missing_name(cache):
    env = subprocess_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    ok = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", "tiny-org/tiny-llama",
         "--revision", "v1", "--prompt", "x", "--max-tokens", "3", "--json"],
        capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", "nobody/missing",
         "--prompt", "x"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1
    assert "hf download nobody/missing" in bad.stderr


def test_serve_by_name(cache, tmp_path):
    import httpx
    from test_openai_surface import Server

    server = Server("tiny-org/tiny-llama", tmp_path / "serve.log",
                    extra=("--revision", "dev"), served_name=None)
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        assert models[0]["id"] == "tiny-org/tiny-llama"
        assert models[0]["root"].endswith(COMMIT_B)
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny-org/tiny-llama", "prompt": "x", "max_tokens": 2}).json()
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
