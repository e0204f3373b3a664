"""Attach the containers' journals to every failing packaging test's report."""

from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    pair = getattr(item, "funcargs", {}).get("tunnel")
    if pair is None:
        return
    try:
        text = pair.diagnostics()
    except Exception as exc:  # diagnostics must never hide the real failure
        text = f"(could not collect the journals: {exc})"
    report.sections.append(("container journals", text))
