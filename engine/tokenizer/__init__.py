"""Text in and out of token ids: the tokenizer of a model folder or GGUF file,
incremental detokenization with the finish rules, and chat-template rendering.

- `tokenizer`: `Tokenizer` and `hf_tokenizer` (a Hugging Face ``tokenizer.json`` folder);
- `gguf`: the tokenizer a GGUF file records;
- `loader`: `load_tokenizer`, whichever of the two a model is;
- `detokenizer`: `IncrementalDetokenizer` and the stop checks;
- `chat_template`: `render_chat`, a model's Jinja chat template in a sandbox.
"""

from engine.tokenizer.chat_template import ChatTemplateError, render_chat
from engine.tokenizer.detokenizer import (
    DetokenizerUpdate,
    IncrementalDetokenizer,
    StopDecision,
    check_stop,
)
from engine.tokenizer.loader import load_tokenizer
from engine.tokenizer.tokenizer import Tokenizer, hf_tokenizer

__all__ = [
    "ChatTemplateError",
    "DetokenizerUpdate",
    "IncrementalDetokenizer",
    "StopDecision",
    "Tokenizer",
    "check_stop",
    "hf_tokenizer",
    "load_tokenizer",
    "render_chat",
]
