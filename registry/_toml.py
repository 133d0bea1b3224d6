"""Reading TOML with errors that say where (``path:line:col: message``).

Manifests are tiny and nearly always written in a small subset of TOML: bare
keys, ``[table]`` / ``[[array-of-tables]]`` headers, and plain strings,
integers and booleans. `parse_toml` reads that subset with one regular
expression per line (faster than the full parser, which matters with hundreds of
manifests: docs/benchmarks.md, "Registry discovery") and hands everything else,
errors included, to the standard parser. The fast path either returns exactly what `tomllib` would, or
declines; the test suite checks that property on generated documents.
"""

from __future__ import annotations

import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["TomlSyntaxError", "parse_toml", "parse_toml_subset"]

# One line of the subset: `key = value`, `[table]`, `[[array]]` or blank, each with
# an optional comment. The character classes leave out the control characters
# TOML forbids (and \r, so that CRLF files take the full parser).
_LINE = re.compile(
    r"[ \t]*(?:"
    r"([A-Za-z0-9_-]+)[ \t]*=[ \t]*"
    r"(\"[^\"\\\x00-\x08\x0a-\x1f\x7f]*\"|'[^'\x00-\x08\x0a-\x1f\x7f]*'"
    r"|true|false|[+-]?(?:0|[1-9][0-9]*))"
    r"|(\[\[?)[ \t]*([A-Za-z0-9_-]+)[ \t]*(\]\]?)"
    r")?[ \t]*(?:#[^\x00-\x08\x0a-\x1f\x7f]*)?"
)
_POSITION = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)
_AT_END = re.compile(r"^(.*) \(at end of document\)$", re.DOTALL)

# Manifests repeat most of their lines (`schema-version = 1`, `[[plugin]]`,
# `group = "general"`...), so each distinct line is matched once per process.
_BLANK = ("",)
_MISS = ("miss",)
_line_cache: dict[str, tuple | None] = {}


def _read_line(line: str) -> tuple | None:
    """("=", key, value) | ("[", name) | ("[[", name) | ("",), or None outside the subset."""
    match = _LINE.fullmatch(line)
    if match is None:
        return None
    key, value, opening, name, closing = match.groups()
    if key:
        if value[0] in "\"'":
            return ("=", key, value[1:-1])
        if value in ("true", "false"):
            return ("=", key, value == "true")
        return ("=", key, int(value))
    if opening:
        return (opening, name) if len(opening) == len(closing) else None
    return _BLANK


class TomlSyntaxError(ValueError):
    """A document that is not valid TOML; ``line`` and ``col`` count from 1."""

    def __init__(self, message: str, line: int, col: int) -> None:
        self.message = message
        self.line = line
        self.col = col
        super().__init__(f"{line}:{col}: {message}")


def parse_toml_subset(text: str) -> dict[str, Any] | None:
    """Parse `text` if it stays within the simple subset, else return None."""
    if len(_line_cache) > 8192:
        _line_cache.clear()
    root: dict[str, Any] = {}
    table = root
    arrays: set[str] = set()  # keys of root created by [[name]] headers
    cache = _line_cache
    for line in text.split("\n"):
        parsed = cache.get(line, _MISS)
        if parsed is _MISS:
            parsed = cache[line] = _read_line(line)
        if parsed is None:
            return None
        kind = parsed[0]
        if kind == "=":
            if parsed[1] in table:
                return None
            table[parsed[1]] = parsed[2]
        elif kind == "[":
            if parsed[1] in root:
                return None
            table = root[parsed[1]] = {}
        elif kind == "[[":
            name = parsed[1]
            if name in root and name not in arrays:
                return None
            arrays.add(name)
            table = {}
            root.setdefault(name, []).append(table)
    return root


def _end_position(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1


def _position_of_offset(data: bytes, offset: int) -> tuple[int, int]:
    before = data[:offset]
    line = before.count(b"\n") + 1
    col = offset - (before.rfind(b"\n") + 1) + 1
    return line, col


def parse_toml(data: bytes) -> dict[str, Any]:
    """Parse a UTF-8 TOML document. Raises TomlSyntaxError with a 1-based position."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _position_of_offset(data, exc.start)
        raise TomlSyntaxError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", line, col) from None
    fast = parse_toml_subset(text)
    if fast is not None:
        return fast
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _POSITION.match(message)
        if match:
            raise TomlSyntaxError(match.group(1), int(match.group(2)), int(match.group(3))) from None
        match = _AT_END.match(message)
        line, col = _end_position(text)
        raise TomlSyntaxError(match.group(1) if match else message, line, col) from None
    except RecursionError:
        line, col = _deepest_position(text)
        raise TomlSyntaxError("arrays or tables nested too deeply", line, col) from None


def _deepest_position(text: str) -> tuple[int, int]:
    """1-based line and column where the most deeply nested array or inline table
    of `text` starts (its outermost bracket; strings and comments skipped): where
    a document too deeply nested for the parser goes wrong."""
    openers: list[int] = []  # offsets of the open brackets enclosing the current point
    best = 0
    best_offset = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            i += len(quote)
            while i < n and not text.startswith(quote, i):
                if ch == '"' and text[i] == "\\":
                    i += 1
                elif len(quote) == 1 and text[i] == "\n":
                    break
                i += 1
            i += len(quote)
            continue
        if ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in "[{":
            openers.append(i)
            if len(openers) > best:
                best, best_offset = len(openers), openers[0]
        elif ch in "]}" and openers:
            openers.pop()
        i += 1
    line = text.count("\n", 0, best_offset) + 1
    col = best_offset - (text.rfind("\n", 0, best_offset) + 1) + 1
    return line, col
