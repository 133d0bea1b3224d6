"""Reading TOML with errors that say where (``path:line:col: message``).

Manifests are tiny and nearly always written in a small subset of TOML: bare
keys, ``[table]`` / ``[[array-of-tables]]`` headers, and plain strings,
integers and booleans. `parse_toml` reads that subset with one regular
expression per line (several times faster than the full parser, which matters
with hundreds of manifests) and hands everything else, errors included, to the
standard parser. The fast path either returns exactly what `tomllib` would, or
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

# one line of the subset: `key = value`, `[table]`, `[[array]]`, or blank, each with
# an optional comment. Quotes stay in the captured strings so that "" is told
# apart from "no string here"; findall() then reads a whole document in one call.
_LINE = re.compile(
    r"^[ \t]*(?:"
    r"([A-Za-z0-9_-]+)[ \t]*=[ \t]*"
    r"(\"[^\"\\\n]*\"|'[^'\n]*'|true|false|[+-]?(?:0|[1-9][0-9]*))"
    r"|(\[\[?)[ \t]*([A-Za-z0-9_-]+)[ \t]*(\]\]?)"
    r")?[ \t]*(?:#[^\n]*)?$",
    re.MULTILINE,
)
# control characters TOML forbids anywhere except as tab / newline (\r included
# here only so that CRLF files take the full parser)
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_POSITION = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)
_AT_END = re.compile(r"^(.*) \(at end of document\)$", re.DOTALL)


class TomlSyntaxError(ValueError):
    """A document that is not valid TOML; ``line`` and ``col`` count from 1."""

    def __init__(self, message: str, line: int, col: int) -> None:
        self.message = message
        self.line = line
        self.col = col
        super().__init__(f"{line}:{col}: {message}")


def parse_toml_subset(text: str) -> dict[str, Any] | None:
    """Parse `text` if it stays within the simple subset, else return None."""
    if _FORBIDDEN.search(text):
        return None
    lines = _LINE.findall(text)
    if len(lines) != text.count("\n") + 1:  # some line is outside the subset
        return None
    root: dict[str, Any] = {}
    table = root
    arrays: set[str] = set()  # keys of root created by [[name]] headers
    for key, value, opening, header, closing in lines:
        if key:
            if key in table:
                return None
            first = value[0]
            if first == '"' or first == "'":
                table[key] = value[1:-1]
            elif first == "t" or first == "f":
                table[key] = value == "true"
            else:
                table[key] = int(value)
        elif opening:
            if len(opening) != len(closing):
                return None
            if opening == "[":
                if header in root:
                    return None
                table = root[header] = {}
            else:
                if header in root and header not in arrays:
                    return None
                arrays.add(header)
                table = {}
                root.setdefault(header, []).append(table)
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
        raise TomlSyntaxError("arrays or tables nested too deeply", 1, 1) from None
