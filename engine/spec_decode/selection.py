"""Finding the proposer a `SpeculativeConfig` names among the ``spec_proposer``
plugins (the built-in ``ngram`` and ``draft_model`` are plugins too)."""

from __future__ import annotations

from typing import Any

import registry
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.proposer import Proposer


def proposer_class(spec_config: SpeculativeConfig) -> type[Proposer]:
    """The `Proposer` subclass of the plugin ``spec_config.method``.

    Raises ValueError when no enabled plugin has that name (listing those that
    do), TypeError when the plugin's value is not a `Proposer` subclass."""
    name = spec_config.method
    plugins = registry.load_plugins_by_group(registry.SPEC_PROPOSER_PLUGINS)
    if name not in plugins:
        available = ", ".join(repr(n) for n in sorted(plugins)) or "none"
        message = f"speculative_config.method {name!r} is not an available spec_proposer plugin"
        for record in registry.discover(registry.SPEC_PROPOSER_PLUGINS):
            if record.name == name:
                why = "is disabled" if not record.enabled else "failed to load (see the log)"
                message += f" (discovered from {record.origin} but it {why})"
        raise ValueError(f"{message}; available: {available}")
    cls: Any = plugins[name]
    if isinstance(cls, str):
        cls = registry.resolve_qualname(cls)
    if not (isinstance(cls, type) and issubclass(cls, Proposer)):
        raise TypeError(f"spec_proposer plugin {name!r} is {cls!r}, not a subclass of "
                        "engine.spec_decode.Proposer")
    registry.record_effect("spec_proposer", f"{cls.__module__}.{cls.__qualname__}",
                           plugin=name, group=registry.SPEC_PROPOSER_PLUGINS)
    return cls


def check_speculative_support(config: Any) -> None:
    """Fail the engine's start when speculative decoding cannot run: the proposer
    plugin is missing, or the platform's worker class has no
    `WorkerBase.take_draft_token_ids` (the engine's only way to get proposals).
    Call after the platform filled in ``parallel_config.worker_cls``."""
    from engine.worker.worker_base import WorkerBase

    spec = config.speculative_config
    cls = proposer_class(spec)
    worker_cls = config.parallel_config.worker_cls
    if isinstance(worker_cls, str):
        worker_cls = registry.resolve_qualname(worker_cls)
    method = getattr(worker_cls, "take_draft_token_ids", None)
    if method is None or method is WorkerBase.take_draft_token_ids:
        raise ValueError(
            f"speculative decoding (method {spec.method!r}) needs the worker to implement "
            f"take_draft_token_ids(); the platform's worker class "
            f"{worker_cls.__module__}.{worker_cls.__qualname__} does not"
        )
    check = getattr(cls, "check_config", None)
    if check is not None:
        check(spec, config)
