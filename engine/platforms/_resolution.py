"""Choosing this process's platform from the platform plugins (docs/reference.md,
"Platform interface").

Order: `ENGINE_PLATFORM=NAME` picks that plugin; otherwise exactly one active
out-of-tree plugin wins; two or more is an error; with none, `cuda` when its
detector answers, else `cpu`. Detectors are the plugins' callables: each returns a
`Platform` subclass's qualified name, or None when its device is absent.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("engine.platforms")

PLATFORM_ENV = "ENGINE_PLATFORM"
BUILTIN_PLATFORMS = ("cpu", "cuda")


class PlatformResolutionError(RuntimeError):
    """No platform could be chosen; the message says why and what to do."""


@dataclass
class PlatformResolution:
    """The outcome of resolving the platform, real or dry-run.

    `chosen` is the winning plugin's name and `platform_cls` the qualified name
    of its `Platform` subclass (both None when resolution fails); `reason` is a
    sentence saying why; `problems` lists everything that went wrong (empty on a
    clean resolution); `detectors` maps each plugin that was asked to its answer.
    """

    chosen: str | None = None
    platform_cls: str | None = None
    reason: str = ""
    problems: list[str] = field(default_factory=list)
    detectors: dict[str, str | None] = field(default_factory=dict)


def _plugin_origins(group: str) -> dict[str, str]:
    """name -> "origin (source)" of each enabled platform plugin, for messages."""
    import registry

    origins = {}
    for record in registry.discover(group):
        if record.enabled:
            origins[record.name] = f"{record.origin} ({record.source})"
    return origins


class _Resolver:
    """One resolution attempt. In a dry run every problem is recorded; in a real
    one the first fatal problem raises and a raising detector is a WARNING."""

    def __init__(self, dry_run: bool) -> None:
        import registry

        self.dry_run = dry_run
        self.strict = registry.strict_mode()
        self.result = PlatformResolution()
        group = registry.PLATFORM_PLUGINS
        self.detectors: dict[str, Any] = registry.load_plugins_by_group(group)
        self.origins = _plugin_origins(group)

    def describe(self, name: str) -> str:
        origin = self.origins.get(name)
        return f"{name!r} ({origin})" if origin else repr(name)

    def fail(self, message: str) -> None:
        self.result.problems.append(message)
        if not self.dry_run:
            raise PlatformResolutionError(message)

    def ask(self, name: str, required: bool) -> str | None:
        """Call plugin `name`'s detector. A raising detector is logged at WARNING
        (fatal in strict mode, or when the user asked for this very platform)."""
        detector = self.detectors[name]
        try:
            if not callable(detector):
                raise TypeError(f"the plugin's value {detector!r} is not callable")
            import registry

            answer = registry.call_plugin(registry.PLATFORM_PLUGINS, name, detector)
            if answer is not None and not isinstance(answer, str):
                raise TypeError(
                    "a platform plugin must return a Platform subclass's qualified "
                    f"name or None, not {type(answer).__name__} {answer!r}"
                )
        except Exception as exc:
            message = f"platform plugin {self.describe(name)} raised while detecting its device: {exc!r}"
            self.result.detectors[name] = None
            if self.dry_run:
                self.result.problems.append(message)
            elif required or self.strict:
                raise PlatformResolutionError(message) from exc
            else:
                logger.warning("%s; ignoring it\n%s", message, traceback.format_exc())
            return None
        self.result.detectors[name] = answer
        return answer

    def run(self) -> PlatformResolution:
        requested = os.environ.get(PLATFORM_ENV, "").strip()
        chosen = self.by_request(requested) if requested else self.by_detection()
        if chosen is not None:
            self.check_class(*chosen)
        return self.result

    def by_request(self, name: str) -> tuple[str, str] | None:
        if name not in self.detectors:
            known = ", ".join(sorted(self.detectors)) or "none"
            self.fail(
                f"{PLATFORM_ENV}={name!r} names no platform plugin. "
                f"Known platform plugins: {known}"
            )
            return None
        answer = self.ask(name, required=True)
        if answer is None:
            if not self.result.problems:
                self.fail(
                    f"{PLATFORM_ENV}={name!r} was requested, but platform plugin "
                    f"{self.describe(name)} returned None: its device is not available here"
                )
            return None
        self.result.reason = f"{PLATFORM_ENV}={name} (or --platform {name}) selects it"
        return name, answer

    def by_detection(self) -> tuple[str, str] | None:
        asked = {name: self.ask(name, required=False) for name in self.detectors}
        answers = {name: answer for name, answer in asked.items() if answer is not None}
        oot = [n for n in answers if n not in BUILTIN_PLATFORMS]
        if len(oot) > 1:
            names = ", ".join(self.describe(n) for n in oot)
            self.fail(
                f"Several out-of-tree platforms are active: {names}. Choose one with "
                f"{PLATFORM_ENV}=NAME or --platform NAME (one of: {', '.join(oot)})."
            )
            return None
        if oot:
            name = oot[0]
            self.result.reason = (
                f"platform plugin {self.describe(name)} is the only active out-of-tree "
                "platform, and an out-of-tree platform wins over the built-in ones"
            )
            return name, answers[name]
        if answers.get("cuda"):
            self.result.reason = "no out-of-tree platform is active and CUDA is available"
            return "cuda", answers["cuda"]
        if answers.get("cpu"):
            self.result.reason = (
                "no out-of-tree platform is active and CUDA is not available, "
                "so the built-in CPU platform is used"
            )
            return "cpu", answers["cpu"]
        self.fail("no platform plugin is active (not even 'cpu'); see `engine plugins doctor`")
        return None

    def check_class(self, name: str, qualname: str) -> None:
        """Import the winner's class and make sure it is a Platform subclass."""
        import registry
        from engine.platforms.interface import Platform

        try:
            cls = registry.resolve_qualname(qualname)
        except Exception as exc:
            self.fail(f"platform plugin {self.describe(name)} returned {qualname!r}, "
                      f"which cannot be imported: {exc!r}")
            return
        if not (isinstance(cls, type) and issubclass(cls, Platform)):
            self.fail(f"platform plugin {self.describe(name)} returned {qualname!r}, "
                      "which is not a subclass of engine.platforms.Platform")
            return
        self.result.chosen = name
        self.result.platform_cls = qualname
        self.platform_class = cls


def resolve_platform_cls() -> type:
    """Resolve the platform for this process and return its class.

    Raises `PlatformResolutionError` (a `RuntimeError`) when no platform can be
    chosen: unknown or unavailable `ENGINE_PLATFORM`, several active out-of-tree
    platforms, a plugin returning something that is not a Platform subclass.
    """
    import registry

    resolver = _Resolver(dry_run=False)
    result = resolver.run()
    registry.record_effect("platform", str(result.platform_cls), plugin=result.chosen,
                           group=registry.PLATFORM_PLUGINS)
    logger.info("platform %r (%s): %s", result.chosen, result.platform_cls, result.reason)
    return resolver.platform_class


def dry_run_resolution() -> PlatformResolution:
    """Resolve the platform without raising: every detector is asked and every
    problem is recorded in the returned `PlatformResolution` (used by
    `engine plugins doctor`). Nothing is cached."""
    resolver = _Resolver(dry_run=True)
    resolver.run()
    if resolver.result.problems and resolver.result.chosen is None and not resolver.result.reason:
        resolver.result.reason = "no platform can be chosen: " + resolver.result.problems[-1]
    return resolver.result
