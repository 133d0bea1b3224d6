"""Plugins the operator disabled with ``engine plugins disable``, persisted in the
config dir (``plugin-state.json``) so that every later engine process honours it.

The file is small JSON: ``{"disabled": [{"group": "engine.general_plugins" | null,
"name": "..."}]}`` (a null group disables the name in every group).
"""

from __future__ import annotations

import os

from registry._env import config_dir

STATE_FILE = "plugin-state.json"


def state_path() -> str:
    """``<config dir>/plugin-state.json``."""
    return os.path.join(config_dir(), STATE_FILE)


def state_stamp() -> tuple[int, int] | None:
    """(mtime_ns, size) of the state file, or None when there is none: part of the
    discovery cache key, so `disable` in another process is seen by the next scan."""
    try:
        st = os.stat(state_path())
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def read_disabled() -> frozenset[tuple[str | None, str]]:
    """The persisted (group or None, name) pairs. An unreadable or malformed file
    raises ValueError naming it."""
    path = state_path()
    try:
        with open(path, encoding="utf-8") as f:
            import json  # only when there is a state file: discovery stays lean without one

            document = json.load(f)
    except FileNotFoundError:
        return frozenset()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the plugin state: {exc}") from None
    entries = document.get("disabled", []) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected {{\"disabled\": [...]}}")
    pairs = set()
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("group"), (str, type(None)))):
            raise ValueError(f"{path}: disabled[{i}]: expected {{\"group\": ..., \"name\": ...}}")
        pairs.add((entry["group"], entry["name"]))
    return frozenset(pairs)


def write_disabled(pairs: set[tuple[str | None, str]]) -> str:
    """Replace the persisted set atomically; returns the file's path."""
    import json
    import tempfile

    path = state_path()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    rows = [{"group": g, "name": n} for g, n in sorted(pairs, key=lambda p: (p[1], p[0] or ""))]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".plugin-state-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"disabled": rows}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
