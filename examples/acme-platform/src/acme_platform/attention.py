"""Acme's attention backend. The example reuses the engine's SDPA math through its
own `AttentionImpl` subclass; a real device would call its attention kernel in
`forward` and could choose its own KV-cache layout in `get_kv_cache_shape`."""

from __future__ import annotations

import acme_platform
from engine.attention.backends.torch_sdpa import TorchSDPABackend, TorchSDPAImpl


class AcmeAttentionImpl(TorchSDPAImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata):
        acme_platform.STATS["attention_calls"] += 1
        return super().forward(layer, query, key, value, kv_cache, attn_metadata)


class AcmeAttentionBackend(TorchSDPABackend):
    @staticmethod
    def get_name() -> str:
        return "ACME"

    @staticmethod
    def get_impl_cls() -> type[AcmeAttentionImpl]:
        return AcmeAttentionImpl
