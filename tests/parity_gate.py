"""The --require-parity option: a run fails when a test marked `parity` was skipped or did not run.

A pytest plugin on its own (tests/conftest.py re-exports its hooks) so that a test can load it into a
small pytest run in a subprocess with `-p parity_gate`. Tests that compare against the official
fixtures carry the `parity` marker; a skip of one of them would hide a lost comparison behind a green
run, which CI (.ci/run) refuses with this option.
"""

from __future__ import annotations

import pytest

MARKER = "parity"


def pytest_addoption(parser):
    parser.addoption("--require-parity", action="store_true",
                     help=f"fail the run if any test marked '{MARKER}' was skipped or did not run")


def pytest_configure(config):
    if config.getoption("--require-parity") and not config.getoption("collectonly"):
        config.pluginmanager.register(ParityGate(), "parity-gate")


class ParityGate:
    """Collects the parity tests and their outcomes; at the end, names those that did not pass or fail."""

    def __init__(self):
        self.expected: set[str] = set()  # node ids of the collected parity tests, deselected ones included
        self.ran: set[str] = set()  # passed or failed: a failure already fails the run on its own
        self.skipped: dict[str, str] = {}  # node id -> reason
        self.message: str | None = None

    def _note(self, items):
        self.expected.update(item.nodeid for item in items if item.get_closest_marker(MARKER))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        self._note(items)

    def pytest_deselected(self, items):
        self._note(items)

    def pytest_runtest_logreport(self, report):
        if MARKER not in report.keywords:
            return
        if report.skipped:  # in setup (skip markers) or in the call (pytest.skip, xfail)
            if hasattr(report, "wasxfail"):
                reason = f"xfail {report.wasxfail}".strip()
            else:
                reason = report.longrepr[2].removeprefix("Skipped: ") if isinstance(report.longrepr, tuple) else ""
            self.skipped[report.nodeid] = reason
        elif report.when == "call" or report.failed:
            self.ran.add(report.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session):
        not_run = sorted(self.expected - self.ran - set(self.skipped))
        missing = [f"{node} (skipped: {reason})" for node, reason in sorted(self.skipped.items())]
        missing += [f"{node} (not run)" for node in not_run]
        if missing:
            self.message = (f"--require-parity: {len(missing)} parity test(s) skipped or not run: "
                            + "; ".join(missing))
            if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
                session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.message:
            terminalreporter.write_line(self.message, red=True, bold=True)
