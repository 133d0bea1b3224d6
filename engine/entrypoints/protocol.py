"""Request bodies of the OpenAI-compatible API, as pydantic models.

Unknown fields are ignored, as OpenAI's own server does; a field of the wrong
type or shape is a 400 naming it. Besides OpenAI's fields the completion and
chat requests take the engine's other sampling settings (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from engine.utils import short_repr

Prompt = str | list[int]  # text, or token ids


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def prompt_list(value: Any, field: str) -> list[Prompt]:
    """A string, a list of strings, a list of token ids or a list of token-id
    lists -> a non-empty list of prompts. Raises ValueError describing the shape."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(_is_token(t) for t in value):
            return [list(value)]
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in value):
            return [list(p) for p in value]
    raise ValueError(
        f"{field} must be a string, a list of strings, a list of token ids or a list of "
        f"token-id lists (none empty), got {short_repr(value)}"
    )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0



def _stop_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError(f"must be a string, a list of strings or null, got {short_repr(value)}")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by completion and chat requests."""

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    stop: Any = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None  # token id (as a string) -> bias
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # the engine's own settings
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # per-request arguments for logits processors (SamplingParams.extra_args)
    extra_args: dict[str, Any] | None = None
    # structured outputs (engine.entrypoints.structured)
    response_format: Any = None
    structured_outputs: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> list[str] | None:
        return _stop_list(value)


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> list[Prompt]:
        return prompt_list(value, "prompt")


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str | None:
        """The content as one string (text parts joined); ValueError for other parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise ValueError(
                    f"messages[{index}].content[{j}]: only text parts are supported, "
                    f"got type {part.type!r}"
                )
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: until the context is full
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins when given
    logprobs: bool = False
    top_logprobs: int | None = None
    # the template: the model's unless given here
    chat_template: str | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class EmbeddingRequest(_Body):
    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> list[Prompt]:
        return prompt_list(value, "input")


class PoolingRequest(_Body):
    """The IO-processor route: ``data`` goes to the plugin's ``parse_data``."""

    data: Any
    model: str | None = None
    dimensions: int | None = None
    normalize: bool | None = None
