"""Guards for test suites that must really run: the outcomes of this process's tests, recorded by conftest.py."""

from __future__ import annotations

import pytest

OUTCOMES = pytest.StashKey[dict[str, str]]()
"""nodeid → "passed" / "failed" / "skipped" of every test this process has run so far."""


def assert_every_test_ran_and_passed(request: pytest.FixtureRequest, suite: type) -> None:
    """Every collected test of the class `suite` ran in this process, before the caller, and passed: a skip (a
    misplaced skip mark, a flag that turns the suite off, a skip inside a test) fails the guard."""
    items = [item for item in request.session.items if getattr(item, "cls", None) is suite]
    assert items, f"no test of {suite.__name__} was collected"
    outcomes = request.config.stash.get(OUTCOMES, {})
    not_run = [item.nodeid for item in items if item.nodeid not in outcomes]
    if not_run:
        pytest.fail(
            f"{len(not_run)} test(s) of {suite.__name__} did not run before this guard in this process, e.g. "
            f"{not_run[0]}: run the whole file (with xdist, --dist loadfile)"
        )
    bad = {nodeid: outcomes[nodeid] for nodeid in (item.nodeid for item in items) if outcomes[nodeid] != "passed"}
    assert not bad, f"{len(bad)} of {len(items)} tests of {suite.__name__} did not pass: {bad}"
