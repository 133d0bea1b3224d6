"""`MyLlamaForCausalLM`: the in-tree Llama with scaled logits."""

from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class MyLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config, prefix: str = "") -> None:
        super().__init__(config=config, prefix=prefix)
        self.logit_scale = float(config.model_config.hf_config.get("logit_scale", 1.0))

    def compute_logits(self, hidden_states):
        return super().compute_logits(hidden_states) * self.logit_scale
