"""The kit's machinery: checks, their outcomes, selection by keyword expression,
and the shared context one run of checks works in.

A check is a named function that returns None when the plugin conforms and raises
`CheckFailed` (one line: what differed) when it does not. Checks that need an
expensive computation (two ranks of torch.distributed, two engine runs) share it
through `KitContext`, so running one check or all of them costs the same work.
"""

from __future__ import annotations

import os
import re
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


class CheckFailed(AssertionError):
    """A check found a difference; the message (one line) says what differed."""


class CheckSkipped(Exception):
    """A check could not run because something it depends on failed or is absent;
    the message says what."""


@dataclass(frozen=True)
class Check:
    """One conformance check of one plugin.

    `id` is ``"<group alias>/<plugin>::<check>"`` (e.g.
    ``"platform/acme::attention[float32-bs16-gqa-decode]"``); `func` raises
    `CheckFailed` or `CheckSkipped`, or returns None when the plugin conforms."""

    id: str
    func: Callable[[], None] = field(repr=False, compare=False)
    description: str = ""

    @property
    def name(self) -> str:
        """The part after ``::`` (the check without the plugin)."""
        return self.id.split("::", 1)[-1]


@dataclass
class CheckResult:
    """What happened when a check ran: `outcome` is ``passed``, ``failed`` (the
    plugin differs from the contract), ``error`` (the check raised something
    unexpected: the plugin crashed) or ``skipped``; `message` says why."""

    id: str
    outcome: str
    message: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The result as one object of `engine plugins test --json`."""
        return {"check": self.id, "outcome": self.outcome, "message": self.message,
                "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        """One line: ``FAILED <check>: <what differed>``."""
        text = f"{self.outcome.upper()} {self.id}"
        return f"{text}: {self.message}" if self.message else text


def one_line(text: str, limit: int = 400) -> str:
    """Collapse `text` to one line of at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_check(check: Check) -> CheckResult:
    """Run one check and classify its outcome (never raises, except on Ctrl-C)."""
    start = time.perf_counter()
    try:
        check.func()
    except CheckFailed as exc:
        outcome, message = "failed", one_line(str(exc))
    except CheckSkipped as exc:
        outcome, message = "skipped", one_line(str(exc))
    except Exception as exc:  # the plugin raised where it must not
        where = traceback.extract_tb(exc.__traceback__)[-1]
        message = one_line(f"raised {type(exc).__name__}: {exc} "
                           f"(at {os.path.basename(where.filename)}:{where.lineno})")
        outcome = "error"
    else:
        outcome, message = "passed", ""
    return CheckResult(check.id, outcome, message, time.perf_counter() - start)


def needs(missing: str, func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)``, the thing a check depends on; when it raises, the check is
    skipped: CheckSkipped ``"<missing> (<the error>)"`` (the check that owns
    `func` reports the failure itself)."""
    try:
        return func(*args)
    except Exception as exc:
        raise CheckSkipped(f"{missing} ({exc})") from None


# ---------------------------------------------------------------------------
# -k EXPR: the keyword expressions pytest users know


_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


def keyword_matcher(expr: str) -> Callable[[str], bool]:
    """A predicate over check ids from a pytest-style ``-k`` expression: words
    (case-insensitive substrings of the id) combined with ``and``, ``or``, ``not``
    and parentheses. Raises ValueError naming the problem for a malformed one."""
    tokens = _TOKEN.findall(expr)
    if not tokens:
        raise ValueError("-k: empty expression")
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"-k {expr!r}: unexpected end of expression")
        pos += 1
        return tokens[pos - 1]

    def parse_or() -> Callable[[str], bool]:
        left = parse_and()
        while peek() == "or":
            take()
            right, prev = parse_and(), left
            left = lambda s, a=prev, b=right: a(s) or b(s)  # noqa: E731
        return left

    def parse_and() -> Callable[[str], bool]:
        left = parse_not()
        while peek() == "and":
            take()
            right, prev = parse_not(), left
            left = lambda s, a=prev, b=right: a(s) and b(s)  # noqa: E731
        return left

    def parse_not() -> Callable[[str], bool]:
        if peek() == "not":
            take()
            inner = parse_not()
            return lambda s: not inner(s)
        token = take()
        if token == "(":
            inner = parse_or()
            if take() != ")":
                raise ValueError(f"-k {expr!r}: missing ')'")
            return inner
        if token in (")", "and", "or"):
            raise ValueError(f"-k {expr!r}: unexpected {token!r}")
        word = token.lower()
        return lambda s: word in s.lower()

    matcher = parse_or()
    if pos != len(tokens):
        raise ValueError(f"-k {expr!r}: unexpected {tokens[pos]!r}")
    return matcher


def select(checks: Iterable[Check], expr: str | None) -> list[Check]:
    """The checks whose id matches the ``-k`` expression (all when None)."""
    checks = list(checks)
    if not expr:
        return checks
    matches = keyword_matcher(expr)
    return [c for c in checks if matches(c.id)]


# ---------------------------------------------------------------------------
# shared state of one run


class KitContext:
    """State shared by the checks of one run: memoized expensive results and the
    environment changes to undo at the end (`close`)."""

    def __init__(self) -> None:
        self._memo: dict[Any, tuple[bool, Any]] = {}
        self._restore_env: dict[str, str | None] = {}
        self._closers: list[Callable[[], None]] = []

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` once per key; a raised exception is remembered and re-raised
        for every later caller (the same failure is reported once per check)."""
        if key not in self._memo:
            try:
                self._memo[key] = (True, compute())
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    raise
                self._memo[key] = (False, exc)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    def set_env(self, name: str, value: str) -> None:
        """Set an environment variable for the rest of the run (undone by `close`)."""
        if name not in self._restore_env:
            self._restore_env[name] = os.environ.get(name)
        os.environ[name] = value

    def on_close(self, func: Callable[[], None]) -> None:
        """Call `func` at `close` (before the environment is restored)."""
        self._closers.append(func)

    def close(self) -> None:
        """Undo the run's environment changes."""
        for func in reversed(self._closers):
            func()
        self._closers.clear()
        for name, value in self._restore_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._restore_env.clear()
