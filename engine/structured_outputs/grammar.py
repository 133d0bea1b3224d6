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
compile a grammar once. In the server (`set_compile_time_limit`), a grammar
not in the cache compiles in a child process that is killed when it runs past
the limit, so a compile that would run on leaves no thread or process behind.
The engine advances its own copy of the matcher with
every sampled token, so a constraint that still fails midway ends the request
with ``finish_reason "error"``, never a "stop" with text that does not match.
When the grammar is complete only end-of-sequence is allowed, so a request that
finishes with ``finish_reason == "stop"`` (by EOS) always matches its constraint.
"""

from __future__ import annotations

import collections
import functools
import json
import multiprocessing
import threading
from typing import Any

from engine.utils import first_line

__all__ = ["MAX_SOURCE_BYTES", "checked_matcher", "compile_grammar", "set_compile_time_limit"]

# JSON without free whitespace: a model cannot pad its answer forever, and the
# output is the compact form every JSON parser reads.
_JSON_OPTIONS = {"whitespace_flexible": False}

# The largest schema / regex / choice list / grammar text compiled: bounds the
# time a request's compile takes (llguidance's own limits bound what it builds).
MAX_SOURCE_BYTES = 1 << 20

# Compiled grammars kept, by (field, source text).
_CACHE_SIZE = 64

# Seconds a compile may take in its child process (`set_compile_time_limit`);
# None: compile in this process.
_time_limit: float | None = None

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


def set_compile_time_limit(seconds: float | None) -> None:
    """Compile each grammar not in the cache in a child process (start method
    ``forkserver``), killed after `seconds`: a compile that would run longer is
    a ValueError naming the field, and nothing keeps running. None (the
    default) compiles in the calling process, unbounded: the offline API, whose
    caller waits for its own request. The server sets it."""
    global _time_limit
    if seconds is not None:
        # the children fork from a server that has imported only this module
        multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    _time_limit = seconds


_cache: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _compile(field: str, source: str) -> str:
    key = (field, source)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    limit = _time_limit
    if limit is None or multiprocessing.current_process().daemon:  # may have no children
        grammar = _compile_here(field, source)
    else:
        grammar = _compile_in_child(field, source, limit)
    with _cache_lock:
        _cache[key] = grammar
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return grammar


def _compile_in_child(field: str, source: str, limit: float) -> str:
    """`_compile_here` in a child process, killed after `limit` seconds."""
    context = multiprocessing.get_context("forkserver")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_compile_and_send, args=(send, field, source),
                            name="grammar-compile", daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(limit):
            raise ValueError(f"StructuredOutputsParams.{field} did not compile within "
                             f"{limit:g} s")
        ok, value = receive.recv()
    except EOFError:
        child.join()
        raise ValueError(f"StructuredOutputsParams.{field}: the compiling process exited "
                         f"with code {child.exitcode}") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if not ok:
        raise ValueError(value)
    return value


def _compile_and_send(send: Any, field: str, source: str) -> None:
    """The child process of `_compile_in_child`: sends (True, grammar) or
    (False, the ValueError's message)."""
    try:
        send.send((True, _compile_here(field, source)))
    except ValueError as exc:
        send.send((False, str(exc)))
    finally:
        send.close()


def _compile_here(field: str, source: str) -> str:
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
