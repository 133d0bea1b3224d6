"""Models by name: find ``org/name`` in the local Hugging Face hub cache.

The hub cache keeps one folder per repository, ``models--org--name``, holding
``refs/<branch or tag>`` (a text file with a commit hash) and
``snapshots/<commit>/`` (the files of that commit). `resolve_model` maps a model
argument to a folder: an existing folder is used as is; anything else that looks
like a repository id is looked up in the cache. The network is never touched.
No torch import here: the CLI resolves names before it loads the engine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["hub_cache_dir", "resolve_model", "ModelNotCachedError"]

# A hub repository id: "name" or "org/name" (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelNotCachedError(FileNotFoundError):
    """The model is neither a folder nor in the local Hugging Face cache."""


def hub_cache_dir() -> Path:
    """The hub cache folder: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``
    (the order `huggingface_hub` uses)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_model(model: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The folder holding `model`'s files.

    Args:
        model: a model folder or file (``.gguf``), or a hub repository id (``org/name``) present in
            the local cache (see `hub_cache_dir`).
        revision: for a repository id, a branch or tag name (a file under
            ``refs/``) or a commit hash (full, or a unique prefix of at least 7
            characters); default ``main``. Must be None for a folder.

    Raises:
        ModelNotCachedError: `model` is not a folder and the cache has no such
            repository or revision; the message says how to download it.
        ValueError: `revision` was given with a folder.
    """
    path = Path(os.fspath(model)).expanduser()
    if path.is_dir() or path.is_file():  # a file: a single-file model (.gguf)
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to a model name from the Hugging Face cache, "
                f"but {str(model)!r} is a folder; drop revision or pass the model's name"
            )
        return path
    name = os.fspath(model)
    if not _REPO_ID.match(name):
        raise ModelNotCachedError(
            f"model {name!r} is not a folder (no such directory) and not a Hugging Face "
            "model name ('org/name')"
        )
    return _snapshot(name, revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    download = (
        f"download it first (this engine never uses the network): "
        f"`hf download {repo_id}{'' if revision is None else ' --revision ' + revision}` "
        f"(huggingface_hub; older versions: `huggingface-cli download`), "
        "or pass a local model folder"
    )
    if not repo_dir.is_dir():
        raise ModelNotCachedError(
            f"model {repo_id!r} is not a local folder and is not in the Hugging Face cache "
            f"({cache}; set HF_HUB_CACHE or HF_HOME to use another); {download}"
        )
    commit = _commit_of(repo_dir, rev)
    if commit is None:
        refs = sorted(p.name for p in (repo_dir / "refs").glob("*") if p.is_file())
        snaps = sorted(p.name for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
        raise ModelNotCachedError(
            f"model {repo_id!r} is in the Hugging Face cache ({repo_dir}) but revision "
            f"{rev!r} is not (cached refs: {', '.join(refs) or 'none'}; snapshots: "
            f"{', '.join(s[:12] for s in snaps) or 'none'}); {download}"
        )
    folder = repo_dir / "snapshots" / commit
    if not (folder / "config.json").is_file():
        raise ModelNotCachedError(
            f"model {repo_id!r} revision {rev!r}: the cached snapshot {folder} has no "
            f"config.json (an incomplete download?); {download}"
        )
    return folder


def _commit_of(repo_dir: Path, revision: str) -> str | None:
    """The snapshot folder name for `revision`: a ref's commit, or a commit hash
    (or unique prefix) that has a snapshot."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / revision
    if ref.is_file():  # a branch, a tag, or "pr/N"
        commit = ref.read_text(encoding="utf-8").strip()
        return commit if (snapshots / commit).is_dir() else None
    if _COMMIT.match(revision) and (snapshots / revision).is_dir():
        return revision
    if len(revision) >= 7 and re.fullmatch(r"[0-9a-f]+", revision):
        matches = [p.name for p in snapshots.glob(revision + "*") if p.is_dir()]
        if len(matches) == 1:
            return matches[0]
    return None
