"""The kit's checks as pytest items (imported only under pytest)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.testing._core import Check, CheckFailed, CheckSkipped, KitContext
from engine.testing._kit import collect_checks

#: the run's shared state, kept on the pytest config until the session ends
CONTEXT_KEY = pytest.StashKey[KitContext]()


class KitCheckItem(pytest.Item):
    """One conformance check as a test item."""

    def __init__(self, *, check: Check, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check

    def runtest(self) -> None:
        """Run the check; a skipped check is a pytest skip."""
        try:
            self.check.func()
        except CheckSkipped as exc:
            pytest.skip(str(exc))

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        """A check's failure is its one line, not a traceback."""
        if isinstance(excinfo.value, CheckFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[str, int | None, str]:
        """Where the item comes from, for reports."""
        return "engine-conformance", None, self.check.id


class KitCollector(pytest.Collector):
    """The checks of one plugin."""

    def collect(self) -> list[pytest.Item]:
        """Nothing: its items are made by `collect_session`."""
        return []


def collect_session(session: Any, names: list[str], group: str | None) -> None:
    """Fill ``session.items`` with the checks of the named plugins, then let the
    usual hooks (-k, -m, deselection) see them."""
    config = session.config
    ctx = KitContext()
    config.stash[CONTEXT_KEY] = ctx
    hook = config.hook
    items: list[pytest.Item] = []
    for name in names:
        collector = KitCollector.from_parent(session, name=f"engine-plugin:{name}",
                                             nodeid=f"engine-plugin:{name}")
        try:
            checks = collect_checks(ctx, name, group)
        except (LookupError, ValueError) as exc:
            raise pytest.UsageError(f"--engine-plugin {name}: {exc}") from None
        # the node id is the check's id, as `engine plugins test` prints it
        collected = [KitCheckItem.from_parent(collector, name=check.id, nodeid=check.id,
                                              check=check) for check in checks]
        # reported like any collector, so the terminal counts the items
        hook.pytest_collectstart(collector=collector)
        hook.pytest_collectreport(report=pytest.CollectReport(
            collector.nodeid, "passed", None, collected))
        items += collected
    hook.pytest_collection_modifyitems(session=session, config=config, items=items)
    hook.pytest_collection_finish(session=session)
    session.items = items
    session.testscollected = len(items)
