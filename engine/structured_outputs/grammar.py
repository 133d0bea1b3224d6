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

When the grammar is complete only end-of-sequence is allowed, so a request that
finishes with ``finish_reason == "stop"`` (by EOS) always matches its constraint.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["compile_grammar"]

# JSON without free whitespace: a model cannot pad its answer forever, and the
# output is the compact form every JSON parser reads.
_JSON_OPTIONS = {"whitespace_flexible": False}


def compile_grammar(params: Any) -> str:
    """The llguidance grammar (a string) of a `StructuredOutputsParams`.

    Raises ValueError naming the field when the schema, regex or grammar does
    not compile.
    """
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    field, grammar = _grammar_source(params)
    if field == "grammar":
        try:
            grammar = LLMatcher.grammar_from_lark(any_to_lark(grammar))
        except Exception as exc:  # the GBNF converter raises plain exceptions
            raise ValueError(f"StructuredOutputsParams.grammar: {exc}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"StructuredOutputsParams.{field} does not compile: {messages[0]}")
    return grammar


def _grammar_source(params: Any) -> tuple[str, str]:
    from llguidance import LLMatcher

    if params.json is not None:
        schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
        try:
            return "json", LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise ValueError(f"StructuredOutputsParams.json: {exc}") from None
    if params.json_object:
        return "json_object", LLMatcher.grammar_from_json_schema(
            '{"type": "object"}', defaults=_JSON_OPTIONS)
    if params.regex is not None:
        return "regex", LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        lark = "start: " + " | ".join(json.dumps(c) for c in params.choice)
        return "choice", LLMatcher.grammar_from_lark(lark)
    return "grammar", params.grammar
