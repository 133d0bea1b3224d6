"""Structured outputs: constrain a request's tokens to a JSON schema, a regular
expression, a list of choices or a grammar.

Built on llguidance (see docs/structured-outputs.md for why): each constrained
request gets an ``LLMatcher`` compiled from its `StructuredOutputsParams`; before
every sampling step the matcher is advanced by the tokens sampled since the
previous step and writes the bitmask of allowed next tokens, and every other
token's logit becomes -inf. The mask is applied by
`engine.structured_outputs.processor.StructuredOutputsLogitsProcessor`, an
ordinary `engine.sample.LogitsProcessor`, so it runs wherever the sampler runs,
on every platform.

This module stays torch-free (`SamplingParams` compiles the grammar with it
to reject a bad schema when the request is made).

A constraint is checked twice before a request is queued: `compile_grammar`
(the text compiles, within `MAX_SOURCE_BYTES`) when the params are built, and
`checked_matcher` (a matcher over the model's tokenizer builds and survives its
first tokens: llguidance's internal limits, a schema no value satisfies) when
the engine takes the request. Both are cached, so the worker and the engine
compile a grammar once. The engine advances its own copy of the matcher with
every sampled token, so a constraint that still fails midway ends the request
with ``finish_reason "error"``, never a "stop" with text that does not match.
When the grammar is complete only end-of-sequence is allowed, so a request that
finishes with ``finish_reason == "stop"`` (by EOS) always matches its constraint.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from engine.utils import first_line

__all__ = ["MAX_SOURCE_BYTES", "checked_matcher", "compile_grammar"]

# JSON without free whitespace: a model cannot pad its answer forever, and the
# output is the compact form every JSON parser reads.
_JSON_OPTIONS = {"whitespace_flexible": False}

# The largest schema / regex / choice list / grammar text compiled: bounds the
# time a request's compile takes (llguidance's own limits bound what it builds).
MAX_SOURCE_BYTES = 1 << 20

# Tokens `checked_matcher` feeds a new matcher: llguidance meets most of its
# limits (items per row, lexer states) within the first few tokens.
_PROBE_TOKENS = 4


def compile_grammar(params: Any) -> str:
    """The llguidance grammar (a string) of a `StructuredOutputsParams`.

    Raises ValueError naming the field when the schema, regex or grammar does
    not compile or its text is larger than `MAX_SOURCE_BYTES`.
    """
    field, source = _source(params)
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise ValueError(f"StructuredOutputsParams.{field} is {len(source.encode())} bytes; "
                         f"at most {MAX_SOURCE_BYTES} are compiled")
    return _compile(field, source)


def _source(params: Any) -> tuple[str, str]:
    """(field, text) of the one constraint `params` holds."""
    if params.json is not None:
        return "json", params.json if isinstance(params.json, str) else json.dumps(params.json)
    if params.json_object:
        return "json_object", '{"type": "object"}'
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        return "choice", json.dumps(params.choice)
    return "grammar", params.grammar


@functools.lru_cache(maxsize=64)
def _compile(field: str, source: str) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        if field in ("json", "json_object"):
            grammar = LLMatcher.grammar_from_json_schema(source, defaults=_JSON_OPTIONS)
        elif field == "regex":
            grammar = LLMatcher.grammar_from_regex(source)
        elif field == "choice":
            # one lexeme of alternatives: the lexer matches them as one regex, so a
            # long list stays under the parser's limit of items per row
            alternatives = " | ".join(json.dumps(c) for c in json.loads(source))
            grammar = LLMatcher.grammar_from_lark(f"start: CHOICE\nCHOICE: {alternatives}")
        else:
            grammar = LLMatcher.grammar_from_lark(any_to_lark(source))
    except Exception as exc:  # the converters raise ValueError or plain exceptions
        raise ValueError(f"StructuredOutputsParams.{field}: {first_line(str(exc))}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"StructuredOutputsParams.{field} does not compile: "
                         f"{first_line(messages[0])}")
    return grammar


def checked_matcher(params: Any, tokenizer: Any) -> Any:
    """A fresh ``LLMatcher`` for `params` over `tokenizer` (an `engine.structured_outputs.processor.ll_tokenizer`),
    after checking that one can enforce the constraint: it builds, and it
    allows a token (not only end-of-sequence before the constraint is met) for
    each of its first tokens, following the lowest allowed token id.

    Raises ValueError naming the field and llguidance's reason (one line).
    """
    field, _ = _source(params)
    return _template(field, compile_grammar(params), tokenizer).deep_copy()


@functools.lru_cache(maxsize=64)
def _template(field: str, grammar: str, tokenizer: Any) -> Any:
    from llguidance import LLMatcher

    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    probe = matcher.deep_copy()
    eos = set(tokenizer.eos_tokens)
    for _ in range(_PROBE_TOKENS):
        if probe.is_error() or probe.is_stopped():
            break
        allowed = _allowed(probe.compute_bitmask())
        if probe.is_error():
            break
        choices = [t for t in allowed if t not in eos]
        if not choices:
            if not probe.is_accepting():
                raise ValueError(f"StructuredOutputsParams.{field} cannot be enforced: no "
                                 "token can continue it")
            break
        probe.consume_token(choices[0])
    for m in (matcher, probe):
        if m.is_error():
            raise ValueError(f"StructuredOutputsParams.{field} cannot be enforced: "
                             f"{first_line(m.get_error())}")
    return matcher


def _allowed(bitmask: bytes) -> list[int]:
    """Token ids set in a little-endian bitmask, in order (stops at the first 64:
    the probe only needs the smallest)."""
    out: list[int] = []
    for i, byte in enumerate(bitmask):
        while byte:
            low = byte & -byte
            out.append(i * 8 + low.bit_length() - 1)
            byte ^= low
            if len(out) == 64:
                return out
    return out
