"""`SamplingParams`: how one request's tokens are chosen and when it stops.

Plain data, validated on construction: every bad value raises `ValueError`
naming the field and the allowed range. No torch import here, so building
params (in the CLI, in an HTTP handler) stays cheap.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

# Below this a temperature is treated as 0: dividing logits by it would overflow.
_GREEDY_TEMPERATURE = 1e-5
# Token counts past this are no context any model has; a larger max_tokens is a
# mistake (or a probe), answered as one rather than silently cut to the context.
_MAX_TOKENS = 2**31 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (``SamplingParams(structured_outputs=...)``);
    give exactly one of:

    - `json`: a JSON schema (a dict, or its JSON text): the output is one JSON
      value that validates against it (compact: no whitespace between tokens);
    - `json_object`: True: the output is a JSON object (any keys);
    - `regex`: the output matches this regular expression (whole text);
    - `choice`: the output is exactly one of these strings;
    - `grammar`: a context-free grammar in Lark syntax (as llguidance reads it)
      or GBNF (llama.cpp's format, rules written ``name ::= ...``).

    A request that finishes with ``finish_reason "stop"`` always satisfies the
    constraint; one cut by ``max_tokens`` ("length") may not. Raises ValueError
    naming the field when none or several are given, or one does not compile.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None]
        if self.json_object is True:
            given.append("json_object")
        elif self.json_object is not False:
            raise ValueError(
                f"StructuredOutputsParams.json_object must be a bool, got {self.json_object!r}")
        if len(given) != 1:
            raise ValueError(
                "StructuredOutputsParams needs exactly one of json, json_object, regex, choice, "
                f"grammar; got {', '.join(given) or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("StructuredOutputsParams.json must be a JSON schema (a dict or "
                             f"its JSON text), got {type(self.json).__name__}")
        if isinstance(self.json, str):
            import json

            try:
                json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"StructuredOutputsParams.json is not JSON: {exc}") from None
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string, "
                                 f"got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("StructuredOutputsParams.choice must be a non-empty list of "
                                 f"non-empty strings, got {self.choice!r}")
            self.choice = list(self.choice)
        from engine.structured_outputs import compile_grammar

        compile_grammar(self)  # a schema or pattern that cannot compile fails here


@dataclass
class SamplingParams:
    """Sampling and stopping settings for one request.

    Sampling (applied in this order): `repetition_penalty` (> 1 discourages any
    token already in the prompt or output), `presence_penalty` /
    `frequency_penalty` (subtracted once / per occurrence for tokens already in
    the output), `temperature` (0 means greedy), `top_k` (0 or -1: off), `top_p`
    (nucleus mass in (0, 1]), `min_p` (drop tokens below `min_p` times the top
    token's probability). `seed` makes the request's draws reproducible whatever
    else is in the batch.

    Stopping: `max_tokens` (None: until the model's context is full),
    `min_tokens` (EOS and `stop_token_ids` are blocked until this many tokens
    exist), `stop` strings (a string or a list, stored as a list; the output
    text ends right before the first one found, unless
    `include_stop_str_in_output`), `stop_token_ids`, EOS (unless `ignore_eos`).

    Output: `n` sequences per prompt, `logprobs` (that many top log-probabilities
    per token, plus the chosen token's; None: off), `skip_special_tokens` in the
    text.

    `extra_args`: a dict of per-request arguments that logits processors read
    (each processor documents its keys); the engine itself ignores it.

    `structured_outputs`: a `StructuredOutputsParams` constraining the output to
    a JSON schema, regex, choice or grammar (None: unconstrained).

    `logit_bias`: ``{token_id: bias}``, each bias in [-100, 100] added to that
    token's logit before sampling (after penalties; -100 all but bans a token,
    100 all but forces it), as OpenAI's ``logit_bias``.

    Raises:
        ValueError: a field has a bad type or value; the message names the field
            and what is allowed.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # a list after construction
    stop_token_ids: list[int] | None = None  # a list after construction
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # per-request arguments for logits processors (docs/extension-points.md)
    extra_args: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # token id -> a number in [-100, 100] added to its logit (OpenAI's logit_bias)
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_stops()
        self._check_flags()
        self._check_extra_args()
        self._check_logit_bias()
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise ValueError(
                "SamplingParams.structured_outputs must be a StructuredOutputsParams or None, "
                f"got {type(self.structured_outputs).__name__}"
            )
        if self.structured_outputs is not None:
            # each would let a request end "stop" before its constraint is complete
            # (or, for min_tokens, forbid the end-of-sequence the grammar requires)
            for name, value in (("stop", self.stop), ("stop_token_ids", self.stop_token_ids),
                                ("min_tokens", self.min_tokens)):
                if value:
                    raise ValueError(f"SamplingParams.{name} cannot be combined with "
                                     f"structured_outputs, got {value!r}")

    # ------------------------------------------------------------------ checks

    def _check_numbers(self) -> None:
        _require_int("n", self.n, minimum=1)
        _require_number("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _require_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _require_int("top_k", self.top_k, minimum=-1, note=" (0 or -1 turns it off)")
        _require_number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _require_number("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        _require_number("presence_penalty", self.presence_penalty, "in [-2, 2]",
                        lambda v: -2 <= v <= 2)
        _require_number("frequency_penalty", self.frequency_penalty, "in [-2, 2]",
                        lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _require_int("seed", self.seed, minimum=None, note=" or None")
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens, minimum=1, note=" or None",
                         maximum=_MAX_TOKENS)
        _require_int("min_tokens", self.min_tokens, minimum=0, maximum=_MAX_TOKENS)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens must be <= max_tokens ({self.max_tokens}), "
                f"got {self.min_tokens}"
            )
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs, minimum=0, note=" or None")

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise ValueError(
                "SamplingParams.stop must be a string, a list of strings or None, "
                f"got {stop!r}"
            )
        if any(s == "" for s in stops):
            raise ValueError("SamplingParams.stop must not contain an empty string")
        self.stop = stops

        ids = self.stop_token_ids
        if ids is None:
            self.stop_token_ids = []
        elif isinstance(ids, (list, tuple, set, frozenset)) and all(
            _is_int(i) and i >= 0 for i in ids
        ):
            self.stop_token_ids = [int(i) for i in ids]
        else:
            raise ValueError(
                "SamplingParams.stop_token_ids must be a list of non-negative integers "
                f"or None, got {ids!r}"
            )

    def _check_flags(self) -> None:
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"SamplingParams.{name} must be a bool, got {value!r}")

    def _check_extra_args(self) -> None:
        extra = self.extra_args
        if extra is None:
            return
        if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
            raise ValueError(
                "SamplingParams.extra_args must be a dict with string keys or None, "
                f"got {extra!r}"
            )

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError("SamplingParams.logit_bias must be a dict of token id -> bias "
                             f"or None, got {_short(bias)}")
        checked: dict[int, float] = {}
        for token_id, value in bias.items():
            if not (_is_int(token_id) and token_id >= 0):
                raise ValueError("SamplingParams.logit_bias keys must be token ids (integers "
                                 f">= 0), got {_short(token_id)}")
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not -100 <= value <= 100):
                raise ValueError(f"SamplingParams.logit_bias[{token_id}] must be a number in "
                                 f"[-100, 100], got {_short(value)}")
            checked[int(token_id)] = float(value)
        self.logit_bias = checked or None

    # -------------------------------------------------------------- accessors

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken (temperature 0)."""
        return self.temperature < _GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """True when any repetition/presence/frequency penalty changes logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _require_int(name: str, value: object, minimum: int | None, note: str = "",
                 maximum: int | None = None) -> None:
    if not _is_int(value):
        raise ValueError(f"SamplingParams.{name} must be an integer{note}, got {value!r}")
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise ValueError(f"SamplingParams.{name} must be >= {minimum}{note}, got {value!r}")
    if maximum is not None and value > maximum:  # type: ignore[operator]
        raise ValueError(f"SamplingParams.{name} must be <= {maximum}{note}, got {value!r}")


def _require_number(name: str, value: object, allowed: str, ok) -> None:
    # NaN fails every range; infinity (JSON's 1e309) is no setting either
    if not _is_number(value) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"SamplingParams.{name} must be a number {allowed}, got {value!r}")
    if not ok(value):
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
