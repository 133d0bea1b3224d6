"""Speculative decoding: a proposer guesses the next tokens of each sequence, the
target model checks them all in one forward pass, and every guess it agrees with
is a token gained (docs/speculative-decoding.md).

`SpeculativeConfig` is what ``LLM(speculative_config={...})`` asks for;
`Proposer` is the base of the ``spec_proposer`` plugin group (built in:
``ngram``, ``draft_model``); `engine.spec_decode.verify` checks a step's drafts;
`DraftTokenIds` (from `engine.step`) is what `WorkerBase.take_draft_token_ids`
returns.
"""

from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.proposer import Proposer, TokenView
from engine.step import DraftTokenIds

__all__ = ["DraftTokenIds", "Proposer", "SpeculativeConfig", "TokenView"]
