"""PEP 440 checks of ``requires-engine`` against the engine's version.

`packaging.specifiers` is the authority, but importing it costs tens of
milliseconds (it pulls in `packaging.tags`), which would be most of the cost of
`engine plugins list`. Specifiers made only of ``>=, <=, >, <, ==, !=`` and plain
release numbers (``>=0.1,<0.3``, the usual case) are decided here by comparing
zero-padded integer tuples, which is exactly PEP 440 for a final-release engine
version; anything else goes to `packaging`. The tests check both agree.
"""

from __future__ import annotations

import functools
import re

from registry._version import __version__

_RELEASE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_CLAUSE = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*([0-9]+(?:\.[0-9]+)*)\s*")


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _compare(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    width = max(len(a), len(b))
    a = a + (0,) * (width - len(a))
    b = b + (0,) * (width - len(b))
    return (a > b) - (a < b)


def _simple_clauses(spec: str) -> list[tuple[str, tuple[int, ...]]] | None:
    """The clauses of a simple specifier, or None when `packaging` must decide."""
    clauses = []
    for part in spec.split(","):
        match = _CLAUSE.fullmatch(part)
        if match is None:
            return None
        clauses.append((match.group(1), _release(match.group(2))))
    return clauses


_HOLDS = {
    ">=": lambda c: c >= 0,
    "<=": lambda c: c <= 0,
    ">": lambda c: c > 0,
    "<": lambda c: c < 0,
    "==": lambda c: c == 0,
    "!=": lambda c: c != 0,
}


@functools.lru_cache(maxsize=256)
def check_specifier(spec: str) -> str:
    """Return `spec` if it is a valid PEP 440 specifier; raise ValueError otherwise."""
    if _simple_clauses(spec) is not None:
        return spec
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        SpecifierSet(spec)
    except InvalidSpecifier:
        raise ValueError(
            f"invalid version specifier {spec!r}: expected PEP 440, e.g. '>=0.1,<0.3'"
        ) from None
    return spec


@functools.lru_cache(maxsize=256)
def admits(spec: str, version: str = __version__) -> bool:
    """Whether `version` (default: the engine's) satisfies the specifier `spec`."""
    clauses = _simple_clauses(spec)
    if clauses is not None and _RELEASE.fullmatch(version):
        mine = _release(version)
        return all(_HOLDS[op](_compare(mine, other)) for op, other in clauses)
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)
