"""Structured outputs: a request's tokens constrained to a JSON schema, a regular
expression, a list of choices or a grammar.

- `grammar`: `compile_grammar`, torch-free (`SamplingParams` uses it to reject a
  bad schema when the request is made);
- `processor`: `StructuredOutputsLogitsProcessor`, the token mask applied through
  the logits-processor path (imports torch; not imported here).
"""

from engine.structured_outputs.grammar import compile_grammar, set_compile_time_limit

__all__ = ["compile_grammar", "set_compile_time_limit"]
