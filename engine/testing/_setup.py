"""Setting up the platform under test, for every platform check: its class (found
through its detector), made this process's current platform as an engine process
does it, and the engine config the checks start from."""

from __future__ import annotations

from typing import Any

from engine.testing._core import CheckFailed, CheckSkipped, KitContext, needs

# (absolute, relative) tolerance of a custom op against its ``forward_native``, per dtype
OP_TOLERANCE = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (2e-2, 2e-2)}


def detect(ctx: KitContext, name: str) -> type:
    """Call the detector (twice: detectors must be re-entrant) and return the
    Platform subclass it names; raises CheckFailed otherwise."""

    def compute() -> type:
        import registry
        from engine.platforms import Platform

        detectors = registry.load_plugins_by_group(registry.PLATFORM_PLUGINS)
        if name not in detectors:
            raise CheckFailed(f"platform plugin {name!r} did not load (see the log above)")
        detector = detectors[name]
        if not callable(detector):
            raise CheckFailed(f"the plugin's value {detector!r} is not callable")
        answers = [detector(), detector()]
        answer = answers[0]
        if answer is None:
            raise CheckFailed("the detector returned None: its device is not available "
                              "here, so nothing else can be checked")
        if not isinstance(answer, str):
            raise CheckFailed(f"the detector returned {type(answer).__name__} {answer!r}, "
                              "not a qualified class name (str) or None")
        if answers[1] != answer:
            raise CheckFailed(f"a second call of the detector returned {answers[1]!r}, "
                              f"the first {answer!r}")
        try:
            cls = registry.resolve_qualname(answer)
        except Exception as exc:
            raise CheckFailed(f"the detector's answer {answer!r} cannot be imported: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Platform)):
            raise CheckFailed(f"the detector's answer {answer!r} is not a subclass of "
                              "engine.platforms.Platform")
        return cls

    return ctx.memo(("detect", name), compute)


def platform_cls(ctx: KitContext, name: str) -> type:
    """The plugin's Platform subclass, or CheckSkipped when the detector failed."""
    return needs("the detector check failed", detect, ctx, name)


def activate(ctx: KitContext, name: str) -> type:
    """Make the plugin's platform this process's current platform, as an engine
    process does: general plugins loaded, the platform resolved, kernels imported."""
    cls = platform_cls(ctx, name)

    def compute() -> type:
        import registry
        from engine.platforms import (
            current_platform,
            reset_current_platform,
            resolve_platform_cls,
        )

        ctx.set_env("ENGINE_PLATFORM", name)
        reset_current_platform()
        ctx.on_close(reset_current_platform)
        registry.load_general_plugins()
        current = resolve_platform_cls()
        if current is not cls:
            raise CheckFailed(f"with ENGINE_PLATFORM={name} the engine resolves "
                              f"{current.__qualname__}, not {cls.__qualname__}")
        current_platform.import_kernels()
        return cls

    try:
        return ctx.memo(("activate", name), compute)
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckSkipped(f"cannot set up the platform in this process: "
                           f"{type(exc).__name__}: {exc}") from None


def kit_engine_config(block_size: int = 16, attention_backend: str | None = None) -> Any:
    """An EngineConfig for the default model, as the engine builds before
    `check_and_update_config` (worker_cls "auto")."""
    from engine.config import CacheConfig, EngineConfig, ModelConfig
    from engine.llm import default_model_dir

    return EngineConfig(model_config=ModelConfig(model=str(default_model_dir())),
                        cache_config=CacheConfig(block_size=block_size),
                        attention_backend=attention_backend)
