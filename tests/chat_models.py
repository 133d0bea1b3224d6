"""Tiny chat models for tests: the session's random Llama with a tokenizer that
knows a real-world template's control tokens, and that template.

- ``chatml``: Qwen2.5-style ChatML (``<|im_start|>``/``<|im_end|>``, a default
  system prompt), template in ``tokenizer_config.json``, EOS ``<|im_end|>``.
- ``llama3``: Llama-3-style headers (``<|begin_of_text|>``, ``<|eot_id|>``),
  template in ``chat_template.jinja``, and a tokenizer whose post-processor adds
  BOS (so a renderer that adds special tokens twice is caught).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_CONTROL = {
    "chatml": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"],
}
VOCAB_SIZE = 1032  # the 1024-token test tokenizer plus room for the control tokens


def build_chat_model(style: str, base_model: Path, tokenizer_dir: Path, out: Path) -> Path:
    """A copy of `base_model` (built with ``vocab_size=VOCAB_SIZE``) whose tokenizer
    has `style`'s control tokens and chat template. Returns `out`."""
    from tokenizers import Tokenizer, processors

    shutil.copytree(base_model, out, dirs_exist_ok=True)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens(_CONTROL[style])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
              "clean_up_tokenization_spaces": False}
    if style == "chatml":
        eos = "<|im_end|>"
        config |= {"bos_token": None, "eos_token": eos, "chat_template": CHATML_TEMPLATE}
    elif style == "llama3":
        bos, eos = "<|begin_of_text|>", "<|eot_id|>"
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        config |= {"bos_token": bos, "eos_token": eos}
        (out / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    else:
        raise ValueError(style)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in config.items() if k.endswith("_token") and v}))
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = tok.token_to_id(eos)
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out
