"""Chat templates: the Jinja template of a model's tokenizer config, rendered in a
sandbox the way Hugging Face chat templates expect to be rendered."""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import re
from collections import abc
from typing import Any, NoReturn


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template rejected the messages."""


# the rendered prompt's size when the caller gives no `max_chars`
DEFAULT_MAX_CHARS = 4 * 2**20


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str | None] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    **kwargs: Any,
) -> str:
    """The prompt text for `messages` (``{"role", "content"}`` dicts).

    `special_tokens` (``bos_token``, ``eos_token``, ...) and `kwargs` are visible to
    the template. The sandbox bounds what a template can build: no string, list
    or output longer than `max_chars` (servers pass what fits in the context).
    Raises `ChatTemplateError` when `template` is None, does not compile, raises
    anything (``raise_exception``, ``OverflowError``, ...), or goes over the bound.
    """
    if not template:
        raise ChatTemplateError(
            "this model has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); use /v1/completions, or pass 'chat_template' in the request"
        )
    import jinja2

    try:
        compiled = _compile(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
    token = _LIMIT.set(max_chars)
    loops = _LOOP_BUDGET.set([MAX_RANGE_ITERATIONS])
    try:
        pieces: list[str] = []
        size = 0
        for piece in compiled.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **(special_tokens or {}),
            **kwargs,
        ):
            size += len(piece)
            if size > max_chars:
                raise _TooLarge(f"the rendered prompt is longer than {max_chars} characters")
            pieces.append(piece)
        return "".join(pieces)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from exc
    except _TooLarge as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from None
    except RecursionError:
        raise ChatTemplateError("the chat template failed: it recursed too deeply") from None
    except Exception as exc:  # the template is request data: anything it raises is a 400
        raise ChatTemplateError(
            f"the chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        _LIMIT.reset(token)
        _LOOP_BUDGET.reset(loops)


class _TooLarge(Exception):
    pass


# the size bound of the render running in this thread (templates are cached and shared)
_LIMIT: contextvars.ContextVar[int] = contextvars.ContextVar("chat_template_limit",
                                                             default=DEFAULT_MAX_CHARS)


# iterations over range() one render may make in all (nested loops multiply)
MAX_RANGE_ITERATIONS = 1_000_000
# the iterations left to the render running in this thread, as a one-item list
_LOOP_BUDGET: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "chat_template_loop_budget", default=None)


class _CountedRange(abc.Sequence):
    """The template's ``range``: a range whose iterations draw on the render's
    budget, so nested loops cannot keep a thread busy for hours."""

    def __init__(self, inner: range) -> None:
        self._inner = inner

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, index: Any) -> Any:
        return self._inner[index]

    def __iter__(self) -> Any:
        budget = _LOOP_BUDGET.get() or [MAX_RANGE_ITERATIONS]
        for item in self._inner:
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooLarge(f"the template loops more than {MAX_RANGE_ITERATIONS} times")
            yield item


def _counted_range(*args: int) -> _CountedRange:
    from jinja2.sandbox import safe_range

    return _CountedRange(safe_range(*args))


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > _LIMIT.get():
        raise _TooLarge(f"the template built a value longer than {_LIMIT.get()} characters")
    return value


_WIDTH = re.compile(r"\d{4,}")


def _check_before(name: str, target: Any, args: tuple, kwargs: dict) -> None:
    """Refuse, before running it, a string operation whose result would be over
    the bound (``'a'.center(10**9)``, ``s|replace('a', long)``, ``'%999999999s'``)."""
    limit = _LIMIT.get()

    def too_large() -> _TooLarge:
        return _TooLarge(f"the template built a value longer than {limit} characters")

    values = [*args, *kwargs.values()]
    if name in ("center", "ljust", "rjust", "zfill", "indent", "wordwrap", "truncate"):
        if any(isinstance(v, int) and v > limit for v in values):
            raise too_large()
    elif name == "replace" and isinstance(target, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        grows = len(new) - len(old)
        if grows > 0 and len(target) + grows * (target.count(old) if old else len(target) + 1) > limit:
            raise too_large()
    elif name == "join":
        items = target if isinstance(target, (list, tuple)) else (args[0] if args else ())
        if isinstance(items, (list, tuple)) and sum(len(str(i)) for i in items) > limit:
            raise too_large()
    elif name in ("format", "format_map", "%") and isinstance(target, str):
        if any(int(w) > limit for w in _WIDTH.findall(target)):
            raise too_large()


def _bounded_environment_class() -> type:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, plus a size bound on what ``*``, ``**`` and ``+`` build
        (``'a' * 10**8``, ``10 ** 10**8``) and on filter and method results."""

        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            limit = _LIMIT.get()
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise _TooLarge(f"the template raised a number to the power {right}")
            if operator == "%":
                _check_before("%", left, (), {})
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if (isinstance(seq, (str, list, tuple)) and isinstance(times, int)
                            and len(seq) * times > limit):
                        raise _TooLarge(f"the template built a value longer than {limit} "
                                        "characters")
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            name = getattr(__obj, "__name__", "")
            # str.format comes wrapped by the sandbox: its string is on __wrapped__
            bound = getattr(__obj, "__wrapped__", __obj)
            _check_before(name, getattr(bound, "__self__", None), args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    return BoundedEnvironment


def _bounded_filter(name: str, fn: Any) -> Any:
    import jinja2

    def bounded(*args: Any, **kwargs: Any) -> Any:
        values = [a for a in args if not isinstance(a, (jinja2.Environment,
                                                         jinja2.runtime.Context,
                                                         jinja2.nodes.EvalContext))]
        target, rest = (values[0], tuple(values[1:])) if values else (None, ())
        _check_before(name, target, rest, kwargs)
        return _check_size(fn(*args, **kwargs))

    # keep jinja's pass_context / pass_eval_context / pass_environment marker
    bounded.jinja_pass_arg = getattr(fn, "jinja_pass_arg", None)  # type: ignore[attr-defined]
    if bounded.jinja_pass_arg is None:  # type: ignore[attr-defined]
        del bounded.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError

    _BoundedEnvironment = _bounded_environment_class()  # noqa: N806

    def raise_exception(message: str) -> NoReturn:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # jinja2's own tojson escapes HTML characters, which chat templates must not
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    for name in ("center", "indent", "wordwrap", "truncate", "replace", "join", "format"):
        env.filters[name] = _bounded_filter(name, env.filters[name])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["range"] = _counted_range
    return env.from_string(template)
