"""Logits processors: batch-level hooks that rewrite logits before sampling.

A `LogitsProcessor` sees the whole batch of one sampling step. The engine tells
it which requests occupy which row through `update_state(batch_update)` before
every `apply(logits)`: requests added (with their `SamplingParams`, prompt ids
and the live list of output ids), removed, or swapped between rows. Per-request
arguments travel in ``SamplingParams.extra_args``.

The engine builds one instance of each processor per driver worker (the rank
that samples), so processors run on every platform's worker and under tensor
parallelism without any platform code. See docs/extension-points.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class AddedRequest:
    """A request that now occupies row `index` of the batch.

    `output_token_ids` is the live list the engine appends each sampled token
    to: keep a reference to it instead of copying it, and it stays current.
    """

    index: int
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int]


@dataclass(frozen=True)
class BatchUpdate:
    """How the batch changed since the previous step.

    Apply it in this order: drop the rows in `removed`, then swap the rows of
    each pair in `moved` (one after the other), then set the rows in `added`.
    Afterwards the batch has `batch_size` rows, row i of the next `apply`'s
    logits being the request now at index i. A request that leaves the batch
    for a while (preempted, or a step that only computes part of its prompt)
    is removed and later added again.
    """

    batch_size: int
    removed: tuple[int, ...] = ()
    moved: tuple[tuple[int, int], ...] = ()
    added: tuple[AddedRequest, ...] = ()


class LogitsProcessor:
    """Base class of logits processors (plugin group ``logits_processor``).

    Subclasses override `apply` and usually `update_state`; the engine calls:

    - ``validate_params(params)`` (a classmethod) for every request before it is
      queued: a ValueError refuses that request alone;

    - ``__init__(config, device)`` once per engine, in the worker that samples
      (`config` is the `engine.config.EngineConfig`, `device` the logits' device);
    - ``update_state(batch_update)`` before each `apply`, with None when the
      batch did not change since the previous step;
    - ``apply(logits)`` with the float32 logits ``[batch_size, vocab]`` of the
      step; return the processed logits (in place or a new tensor of that shape).

    `is_argmax_invariant` returning True promises that `apply` would not change
    which token has the highest logit in this step's batch (for instance, no
    request in it uses the processor): the engine then skips the processor for
    all-greedy batches. It is asked every step, after `update_state`.

    An exception from any method fails the requests of that step, with an error
    that names the processor; the engine keeps serving the others.
    """

    def __init__(self, config: Any, device: torch.device) -> None:
        self.config = config
        self.device = device

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        """Refuse a request whose ``params.extra_args`` this processor cannot use:
        raise ValueError saying what is wrong. Called for every request before it
        is queued, in the process that builds the engine, so one request's bad
        arguments never fail the other requests of a step. Accepts by default."""

    def is_argmax_invariant(self) -> bool:
        """True when `apply` leaves this step's greedy choices alone; False by default."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the batch's membership; `batch_update` is None when unchanged."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the processed `logits` ``[batch_size, vocab]``."""
        raise NotImplementedError(f"{type(self).__qualname__}.apply")


class LogitsProcessorError(RuntimeError):
    """A logits processor raised; `.processor` names it. Fails the requests of
    the step it happened in."""

    def __init__(self, processor: str, message: str) -> None:
        super().__init__(f"logits processor {processor!r} failed: {message}")
        self.processor = processor

    def __reduce__(self) -> tuple:  # crosses the worker pipe intact
        return (_rebuild_error, (self.processor, str(self)))


def _rebuild_error(processor: str, text: str) -> LogitsProcessorError:
    error = LogitsProcessorError.__new__(LogitsProcessorError)
    RuntimeError.__init__(error, text)
    error.processor = processor
    return error


_Entry = TypeVar("_Entry")


def apply_batch_update(
    rows: dict[int, _Entry],
    batch_update: BatchUpdate | None,
    make_entry: Callable[[AddedRequest], _Entry | None],
) -> None:
    """Keep a ``{row index: per-request entry}`` dict in step with the batch.

    The usual bookkeeping of a processor with per-request state: removed rows
    are dropped, moved rows swapped, and for each added request
    ``make_entry(added)`` is stored (or nothing, when it returns None: that
    request needs no processing).
    """
    if batch_update is None:
        return
    for index in batch_update.removed:
        rows.pop(index, None)
    for a, b in batch_update.moved:
        entry_a, entry_b = rows.pop(a, None), rows.pop(b, None)
        if entry_a is not None:
            rows[b] = entry_a
        if entry_b is not None:
            rows[a] = entry_b
    for added in batch_update.added:
        entry = make_entry(added)
        if entry is None:
            rows.pop(added.index, None)
        else:
            rows[added.index] = entry


def processor_name(entry: type | str) -> str:
    """How errors name a processor given as a class or a qualified name."""
    if isinstance(entry, str):
        return entry
    return f"{entry.__module__}.{entry.__qualname__}"


def resolve_logits_processor(entry: type | str, what: str) -> type[LogitsProcessor]:
    """The `LogitsProcessor` subclass `entry` names (a class, ``"pkg.mod:Cls"`` or
    ``"pkg.mod.Cls"``). Raises ValueError naming `what` when it cannot be imported
    or is not a subclass."""
    import registry

    cls: Any = entry
    if isinstance(entry, str):
        try:
            cls = registry.resolve_qualname(entry)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"{what}: cannot import {entry!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, LogitsProcessor)):
        raise ValueError(
            f"{what}: {processor_name(entry)!r} is not a subclass of "
            "engine.sample.LogitsProcessor"
        )
    return cls


def logits_processor_classes(config: Any) -> list[tuple[str, type[LogitsProcessor]]]:
    """Every logits processor class of an engine, by the name errors use: the
    built-in structured-outputs mask, the enabled ``logits_processor`` plugins (by
    plugin name), then ``config.logits_processors`` (by qualified name). Raises
    ValueError naming an entry that is not a `LogitsProcessor` subclass."""
    import registry

    # built in: structured outputs' token mask (idle unless a request asks for it)
    entries: list[tuple[str, Any]] = [
        ("structured_outputs", "engine.structured_outputs.processor:StructuredOutputsLogitsProcessor")
    ]
    plugins = registry.load_plugins_by_group(registry.LOGITS_PROCESSOR_PLUGINS)
    for name in plugins:  # who runs in every batch: recorded as an effect
        registry.record_effect("logits_processor", name, plugin=name,
                               group=registry.LOGITS_PROCESSOR_PLUGINS)
    entries += list(plugins.items())
    entries += [(processor_name(e), e) for e in getattr(config, "logits_processors", None) or ()]
    return [(name, resolve_logits_processor(entry, f"logits processor {name!r}"))
            for name, entry in entries]


def build_logits_processors(config: Any, device: torch.device) -> list[tuple[str, LogitsProcessor]]:
    """One instance of every logits processor of an engine (see
    `logits_processor_classes`). Raises ValueError naming the one that is not a
    `LogitsProcessor` or whose constructor raised."""
    built = []
    for name, cls in logits_processor_classes(config):
        try:
            built.append((name, cls(config, device)))
        except Exception as exc:
            raise ValueError(
                f"logits processor {name!r} could not be built: {type(exc).__name__}: {exc}"
            ) from exc
    return built


def validate_params_for_processors(
    classes: Sequence[tuple[str, type[LogitsProcessor]]], params: SamplingParams
) -> None:
    """Run every processor's `LogitsProcessor.validate_params` on one request's
    params; raise ValueError naming the processor that refuses them."""
    for name, cls in classes:
        try:
            cls.validate_params(params)
        except ValueError as exc:
            raise ValueError(f"logits processor {name!r}: {exc}") from None
        except Exception as exc:
            raise ValueError(
                f"logits processor {name!r}: validate_params raised {type(exc).__name__}: {exc}"
            ) from None
