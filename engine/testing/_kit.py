"""Finding the plugin under test and assembling its checks."""

from __future__ import annotations

from collections.abc import Callable

import registry
from engine.testing._core import Check, CheckFailed, CheckResult, KitContext, run_check, select
from registry import group_alias

# group alias -> builder of its checks; the order is the order groups run in (general
# plugins first: the kit calls them itself before the platform checks load them all)
_BUILDERS: dict[str, Callable[[KitContext, str], list[Check]]] = {}


def _builders() -> dict[str, Callable[[KitContext, str], list[Check]]]:
    if not _BUILDERS:
        from engine.testing import _contracts, _platform, _quantization

        _BUILDERS.update({
            "general": _contracts.general_checks,
            "io_processor": _contracts.io_processor_checks,
            "stat_logger": _contracts.stat_logger_checks,
            "logits_processor": _contracts.logits_processor_checks,
            "quantization": _quantization.quantization_checks,
            "platform": _platform.platform_checks,
        })
    return _BUILDERS


def plugin_groups(name: str, group: str | None = None) -> list[str]:
    """The group aliases under which an enabled plugin called `name` is found
    (only `group` when given). Raises LookupError saying what exists instead."""
    full = registry.resolve_group(group) if group else None
    records = [r for r in registry.discover(full) if r.name == name]
    enabled = [r for r in records if r.enabled]
    if enabled:
        found = {group_alias(r.group) for r in enabled}
        return [g for g in registry.GROUP_ALIASES if g in found]
    where = f" in group {group_alias(full)!r}" if full else ""
    if records:
        reasons = "; ".join(f"{group_alias(r.group)}: {r.disabled_reason}" for r in records)
        raise LookupError(f"plugin {name!r}{where} is disabled ({reasons})")
    known = sorted({f"{group_alias(r.group)}/{r.name}" for r in registry.discover(full)})
    raise LookupError(f"no plugin named {name!r}{where}; discovered: "
                      f"{', '.join(known) or 'none'} (see `engine plugins list`)")


def _generic_checks(ctx: KitContext, alias: str, name: str) -> list[Check]:
    def loads() -> None:
        if name not in registry.load_plugins_by_group(alias):
            raise CheckFailed(f"{alias} plugin {name!r} did not import (see the log above)")

    return [Check(f"{alias}/{name}::loads", loads, "the value imports")]


def collect_checks(ctx: KitContext, name: str, group: str | None = None,
                   keyword: str | None = None) -> list[Check]:
    """The checks for plugin `name` (in every group it is found in, or `group`),
    filtered by the ``-k`` expression `keyword`. Raises LookupError when there is
    no such enabled plugin, ValueError for a bad group or expression."""
    groups = plugin_groups(name, group)
    builders = _builders()
    checks: list[Check] = []
    for alias in [g for g in builders if g in groups] + [g for g in groups if g not in builders]:
        build = builders.get(alias)
        checks += build(ctx, name) if build else _generic_checks(ctx, alias, name)
    return select(checks, keyword)


def run_plugin_checks(name: str, group: str | None = None, keyword: str | None = None,
                      on_result: Callable[[CheckResult], None] | None = None
                      ) -> list[CheckResult]:
    """Run the conformance checks of plugin `name` and return their results (also
    passed one by one to `on_result` as they finish). Raises LookupError /
    ValueError as `collect_checks` does."""
    ctx = KitContext()
    try:
        results = []
        for check in collect_checks(ctx, name, group, keyword):
            result = run_check(check)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results
    finally:
        ctx.close()
