"""Checks of general, IO-processor and stat-logger plugins against their
contracts (docs/reference.md): what the value must be, what the engine calls and
with what, and that a plugin survives being called the way the engine calls it."""

from __future__ import annotations

import inspect
from typing import Any

from engine.testing._core import Check, CheckFailed, CheckSkipped, KitContext, needs


def _load(ctx: KitContext, group: str, name: str) -> Any:
    """The plugin's loaded value (imported by the registry, as the engine does)."""

    def compute() -> Any:
        import registry

        loaded = registry.load_plugins_by_group(group)
        if name not in loaded:
            raise CheckFailed(f"{group} plugin {name!r} did not import (see the log above)")
        return loaded[name]

    return ctx.memo(("load", group, name), compute)


def _loaded(ctx: KitContext, group: str, name: str) -> Any:
    return needs("the plugin did not load", _load, ctx, group, name)


# ---------------------------------------------------------------------------
# general plugins


def general_checks(ctx: KitContext, name: str) -> list[Check]:
    """The checks of general plugin `name`."""
    prefix = f"general/{name}::"
    return [
        Check(prefix + "loads", lambda: _check_general_loads(ctx, name),
              "the value imports and is callable with no arguments"),
        Check(prefix + "runs", lambda: _general_calls(ctx, name)[0] and None,
              "calling it succeeds"),
        Check(prefix + "reentrant", lambda: _general_calls(ctx, name)[1] and None,
              "calling it again succeeds (every engine process calls it)"),
        Check(prefix + "model_architectures", lambda: _check_model_archs(ctx, name),
              "the architectures it registers resolve to model classes"),
    ]


def _check_general_loads(ctx: KitContext, name: str) -> None:
    value = _load(ctx, "general", name)
    if not callable(value):
        raise CheckFailed(f"the value {value!r} is not callable")
    try:
        inspect.signature(value).bind()
    except TypeError:
        raise CheckFailed(f"{getattr(value, '__qualname__', value)!r} cannot be called without "
                          "arguments") from None
    except ValueError:  # no signature (a builtin): calling it will tell
        pass


def _general_calls(ctx: KitContext, name: str) -> tuple[bool, bool]:
    """Call the plugin twice, noting the model architectures it registered."""
    func = _loaded(ctx, "general", name)
    if not callable(func):
        raise CheckSkipped("the value is not callable")

    def first() -> bool:
        from engine import ModelRegistry

        before = ModelRegistry.registrations_for_workers()
        func()
        after = ModelRegistry.registrations_for_workers()
        ctx.memo(("archs", name), lambda: [a for a, v in after.items() if before.get(a) != v])
        return True

    ctx.memo(("general-call-1", name), first)
    try:
        return True, ctx.memo(("general-call-2", name), lambda: func() or True)
    except Exception as exc:
        raise CheckFailed(f"a second call raised {type(exc).__name__}: {exc}; plugins run in "
                          "every engine process and must be re-entrant") from None


def _check_model_archs(ctx: KitContext, name: str) -> None:
    import torch

    from engine import ModelRegistry

    needs("the plugin did not run", _general_calls, ctx, name)
    archs = ctx.memo(("archs", name), list)
    if not archs:
        raise CheckSkipped("it registers no model architecture (or they were registered "
                           "before the kit ran it)")
    for arch in archs:
        try:
            cls = ModelRegistry.resolve(arch)
        except Exception as exc:
            raise CheckFailed(f"architecture {arch!r} does not resolve: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise CheckFailed(f"architecture {arch!r} is {cls!r}, not a torch.nn.Module subclass")
        missing = [m for m in ("forward", "load_weights") if not callable(getattr(cls, m, None))]
        if missing:
            raise CheckFailed(f"architecture {arch!r} ({cls.__qualname__}) lacks "
                              f"{', '.join(missing)}")
        try:
            inspect.signature(cls).bind(config=None, prefix="")
        except TypeError as exc:
            raise CheckFailed(f"architecture {arch!r}: {cls.__qualname__}(config=..., prefix='') "
                              f"cannot be called: {exc}") from None


# ---------------------------------------------------------------------------
# IO processors


def io_processor_checks(ctx: KitContext, name: str) -> list[Check]:
    """The checks of IO-processor plugin `name`."""
    prefix = f"io_processor/{name}::"
    return [
        Check(prefix + "builds", lambda: _processor(ctx, name) and None,
              "the value names an IOProcessor subclass, built as Cls(config)"),
        Check(prefix + "merge_pooling_params", lambda: _check_merge(ctx, name),
              "returns PoolingParams, with and without the caller's"),
        Check(prefix + "parse_data_rejects_bad_input", lambda: _check_parse_rejects(ctx, name),
              "parse_data raises ValueError for data it cannot take"),
        Check(prefix + "async_variants", lambda: _check_async(ctx, name),
              "pre_process_async and post_process_async are coroutine functions"),
        Check(prefix + "methods", lambda: _check_io_signatures(ctx, name),
              "the methods accept the engine's arguments"),
    ]


def _processor(ctx: KitContext, name: str) -> Any:
    def compute() -> Any:
        from engine.io_processors import IOProcessor, get_io_processor
        from engine.testing._setup import kit_engine_config

        try:
            processor = get_io_processor(kit_engine_config(), name)
        except (TypeError, ValueError, RuntimeError, ImportError) as exc:
            raise CheckFailed(str(exc)) from None
        if not isinstance(processor, IOProcessor):
            raise CheckFailed(f"built {processor!r}, not an IOProcessor")
        return processor

    return ctx.memo(("io_processor", name), compute)


def _built(ctx: KitContext, name: str) -> Any:
    return needs("the processor was not built", _processor, ctx, name)


def _check_merge(ctx: KitContext, name: str) -> None:
    from engine.pooling_params import PoolingParams

    processor = _built(ctx, name)
    for given in (None, PoolingParams()):
        merged = processor.merge_pooling_params(given)
        if not isinstance(merged, PoolingParams):
            raise CheckFailed(f"merge_pooling_params({given!r}) returned {merged!r}, "
                              "not a PoolingParams")


class _Unparseable:
    """Request data no plugin can take."""

    def __repr__(self) -> str:
        return "<unparseable object>"


def _check_parse_rejects(ctx: KitContext, name: str) -> None:
    processor = _built(ctx, name)
    try:
        processor.parse_data(_Unparseable())
    except ValueError:
        return
    except Exception as exc:
        raise CheckFailed(f"parse_data(<unparseable object>) raised {type(exc).__name__}: {exc}; "
                          "bad request data must raise ValueError naming the field") from None
    raise CheckFailed("parse_data(<unparseable object>) accepted it; bad request data must "
                      "raise ValueError naming the field")


def _check_async(ctx: KitContext, name: str) -> None:
    processor = _built(ctx, name)
    plain = [m for m in ("pre_process_async", "post_process_async")
             if not inspect.iscoroutinefunction(getattr(processor, m))]
    if plain:
        raise CheckFailed(f"not coroutine functions (async def): {', '.join(plain)}")


def _check_io_signatures(ctx: KitContext, name: str) -> None:
    processor = _built(ctx, name)
    calls = {"parse_data": ((None,), {}),
             "merge_pooling_params": ((), {}),
             "pre_process": ((None,), {"request_id": "r"}),
             "post_process": (([],), {"request_id": "r"}),
             "pre_process_async": ((None,), {"request_id": "r"}),
             "post_process_async": (([],), {"request_id": "r"})}
    for method, (args, kwargs) in calls.items():
        try:
            inspect.signature(getattr(processor, method)).bind(*args, **kwargs)
        except TypeError as exc:
            raise CheckFailed(f"{method} does not accept the engine's arguments: {exc}") from None


# ---------------------------------------------------------------------------
# stat loggers


def stat_logger_checks(ctx: KitContext, name: str) -> list[Check]:
    """The checks of stat-logger plugin `name`."""
    prefix = f"stat_logger/{name}::"
    return [
        Check(prefix + "is_subclass", lambda: _logger_cls(ctx, name) and None,
              "the value is a StatLoggerBase subclass"),
        Check(prefix + "builds", lambda: _check_logger_builds(ctx, name),
              "Cls(config, engine_index) for engine indices 0 and 1"),
        Check(prefix + "calls", lambda: _check_logger_calls(ctx, name),
              "log_engine_initialized, record (with and without scheduler stats), log"),
        Check(prefix + "engine_run", lambda: _check_logger_engine_run(ctx, name),
              "an engine with statistics on runs it without an error (strict mode)"),
    ]


def _logger_cls(ctx: KitContext, name: str) -> type:
    from engine.metrics import StatLoggerBase

    value = _load(ctx, "stat_logger", name)
    if not (isinstance(value, type) and issubclass(value, StatLoggerBase)):
        raise CheckFailed(f"the value {value!r} is not a subclass of "
                          "engine.metrics.StatLoggerBase (the class itself, not an instance "
                          "or a factory)")
    return value


def _logger_instance(ctx: KitContext, name: str, engine_index: int = 0) -> Any:
    from engine.testing._setup import kit_engine_config

    cls = needs("the value is not a stat logger class", _logger_cls, ctx, name)
    return ctx.memo(("stat_logger", name, engine_index),
                    lambda: cls(kit_engine_config(), engine_index))


def _check_logger_builds(ctx: KitContext, name: str) -> None:
    for index in (0, 1):
        instance = _logger_instance(ctx, name, index)
        if getattr(instance, "engine_index", None) != index:
            raise CheckFailed(f"after Cls(config, {index}) .engine_index is "
                              f"{getattr(instance, 'engine_index', None)!r} (call super().__init__)")
        if getattr(instance, "config", None) is None:
            raise CheckFailed("after Cls(config, ...) .config is not set (call super().__init__)")


def _check_logger_calls(ctx: KitContext, name: str) -> None:
    from engine.metrics.stats import (
        FinishedRequestStats,
        IterationStats,
        PrefixCacheStats,
        SchedulerStats,
    )

    instance = _logger_instance(ctx, name)
    finished = FinishedRequestStats(request_id="kit-0", finish_reason="length", e2e_latency=0.5,
                                    num_prompt_tokens=5, num_generation_tokens=3,
                                    time_to_first_token=0.1, decode_time=0.4)
    steps = [
        (SchedulerStats(num_running_reqs=1, kv_cache_usage=0.25,
                        prefix_cache_stats=PrefixCacheStats(queries=5, hits=2)),
         IterationStats(iteration_timestamp=1.0, num_prompt_tokens=5, num_generation_tokens=1,
                        time_to_first_tokens_iter=[0.1])),
        (SchedulerStats(), IterationStats(iteration_timestamp=1.2, num_generation_tokens=2,
                                          inter_token_latencies_iter=[0.2, 0.2],
                                          finished_requests=[finished])),
        (None, IterationStats(iteration_timestamp=1.3)),
        (SchedulerStats(), None),
    ]
    calls = [("log_engine_initialized", ())]
    calls += [("record", (s, i, 0)) for s, i in steps]
    calls += [("log", ()), ("log", ())]
    for method, args in calls:
        try:
            getattr(instance, method)(*args)
        except Exception as exc:
            shown = ", ".join("None" if a is None else type(a).__name__ for a in args)
            raise CheckFailed(f"{method}({shown}) raised {type(exc).__name__}: {exc}") from None


def _check_logger_engine_run(ctx: KitContext, name: str) -> None:
    needs("the value is not a stat logger class", _logger_cls, ctx, name)
    _check_engine_run(ctx, name, "stat_logger")


# ---------------------------------------------------------------------------
# logits processors


def logits_processor_checks(ctx: KitContext, name: str) -> list[Check]:
    """The checks of logits-processor plugin `name`."""
    prefix = f"logits_processor/{name}::"
    return [
        Check(prefix + "is_subclass", lambda: _processor_cls(ctx, name) and None,
              "the value is an engine.sample.LogitsProcessor subclass"),
        Check(prefix + "batch_steps", lambda: _check_logits_steps(ctx, name),
              "update_state/apply over a batch that grows, stays and shrinks"),
        Check(prefix + "engine_run", lambda: _check_engine_run(ctx, name, "logits_processor"),
              "an engine with the plugin installed runs without an error (strict mode)"),
    ]


def _processor_cls(ctx: KitContext, name: str) -> type:
    from engine.sample import LogitsProcessor

    value = _load(ctx, "logits_processor", name)
    if not (isinstance(value, type) and issubclass(value, LogitsProcessor)):
        raise CheckFailed(f"the value {value!r} is not a subclass of "
                          "engine.sample.LogitsProcessor")
    return value


def _check_logits_steps(ctx: KitContext, name: str) -> None:
    import torch

    from engine.sample import AddedRequest, BatchUpdate
    from engine.sampling_params import SamplingParams
    from engine.testing._setup import kit_engine_config

    cls = needs("the value is not a logits processor class", _processor_cls, ctx, name)
    processor = cls(kit_engine_config(), torch.device("cpu"))
    vocab = 64
    gen = torch.Generator().manual_seed(7)
    outputs = [[], [5], [9, 9]]
    added = tuple(AddedRequest(i, SamplingParams(), [3, 4, 5 + i], outputs[i]) for i in range(3))
    steps = [("3 requests added", BatchUpdate(3, added=added)),
             ("no change", None),
             ("row 1 removed, row 2 moved to 1", BatchUpdate(2, removed=(1,), moved=((2, 1),)))]
    invariant = bool(processor.is_argmax_invariant())
    for label, update in steps:
        rows = update.batch_size if update is not None else 3
        logits = torch.randn(rows, vocab, generator=gen)
        before = logits.argmax(-1)
        processor.update_state(update)
        out = processor.apply(logits)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, vocab):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise CheckFailed(f"after {label}: apply returned {shape}, expected ({rows}, {vocab})")
        if bool(torch.isnan(out).any()):
            raise CheckFailed(f"after {label}: apply returned NaN logits")
        if invariant and not torch.equal(out.argmax(-1), before):
            raise CheckFailed(f"after {label}: is_argmax_invariant() is True but apply "
                              "changed the greedy token")
        for row in outputs:
            row.append(11)  # the engine appends each sampled token to the live lists


def _check_engine_run(ctx: KitContext, name: str, group: str) -> None:
    from engine.testing._e2e import run_engine

    _loaded(ctx, group, name)
    ctx.memo(("engine_run", "cpu", "stats"),
             lambda: run_engine("cpu", log_stats=True, strict=True))
