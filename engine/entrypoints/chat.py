"""Chat templates: the Jinja template of a model's tokenizer config, rendered in a
sandbox the way Hugging Face chat templates expect to be rendered."""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template rejected the messages."""


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """The prompt text for `messages` (``{"role", "content"}`` dicts).

    `special_tokens` (``bos_token``, ``eos_token``, ...) and `kwargs` are visible to
    the template. Raises `ChatTemplateError` when `template` is None, does not
    compile, or raises (``raise_exception`` in the template).
    """
    if not template:
        raise ChatTemplateError(
            "this model has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); use /v1/completions, or pass 'chat_template' in the request"
        )
    import jinja2

    try:
        compiled = _compile(template)
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **(special_tokens or {}),
            **kwargs,
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # jinja2's own tojson escapes HTML characters, which chat templates must not
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
