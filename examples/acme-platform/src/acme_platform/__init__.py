"""Acme NPU: an example out-of-tree platform plugin for `engine`.

A hardware vendor ships one package like this one and the engine runs on their
device without a line of the engine changed. The Acme NPU is imaginary: every
piece here computes on the CPU, but each goes through the vendor's own class
(platform, worker, attention backend, custom op backed by a `torch.library`
operator), exactly where a real device's code would go.

Plugins (see pyproject.toml):
- platform ``acme`` -> `detect`: says whether the device is present;
- general ``acme`` -> `register`: registers the attention backend and the op
  replacement in every engine process.

Nothing here imports torch at module level: `engine plugins list` stays cheap.
"""

from __future__ import annotations

import os

# Calls of the vendor's code paths in this process, for tests and curious users.
STATS = {"attention_calls": 0, "rms_norm_kernel_calls": 0, "kernels_loaded": 0,
         "all_reduce_calls": 0}


def detect() -> str | None:
    """The platform plugin: the Acme platform's qualified name when an Acme device
    is present, else None. The example has no real device, so it is 'present'
    unless ``ACME_VISIBLE_DEVICES`` is set to an empty string."""
    if os.environ.get("ACME_VISIBLE_DEVICES", "0") == "":
        return None
    return "acme_platform.platform.AcmePlatform"


def register() -> None:
    """The general plugin (runs once in every engine process): make the Acme
    attention backend selectable and replace RMSNorm with Acme's kernel."""
    from acme_platform import ops  # noqa: F401  (registers AcmeRMSNorm on import)
    from engine.attention import register_backend

    register_backend("ACME", "acme_platform.attention.AcmeAttentionBackend")
