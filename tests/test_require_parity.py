"""--require-parity (tests/parity_gate.py) on small generated test files, each run by pytest in a
subprocess with only that plugin loaded (no torch, well under a second a run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

@pytest.mark.parity
def test_compared():
    pass

@pytest.mark.parity
@pytest.mark.skip(reason="fixture unavailable")
def test_skipped_by_marker():
    pass

@pytest.mark.parity
def test_skipped_inside():
    pytest.skip("no data here")

@pytest.mark.skip(reason="not a parity test")
def test_unrelated_skip():
    pass
'''

PASSING = '''
import pytest

@pytest.mark.parity
@pytest.mark.parametrize("n", [1, 2])
def test_compared(n):
    pass

@pytest.mark.skip(reason="not a parity test")
def test_unrelated_skip():
    pass
'''


def run_pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    parity: compares against the official fixtures\n")
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # only the gate: a faster start
    command = [sys.executable, "-m", "pytest", "-p", "parity_gate", "-p", "no:cacheprovider", "-q",
               "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_sample.py"), *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def gate_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("--require-parity:")]


def test_a_skipped_parity_test_fails_the_run(tmp_path):
    result = run_pytest(tmp_path, SAMPLE, "--require-parity")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "1 passed, 3 skipped" in result.stdout
    [line] = gate_lines(result)
    assert line.startswith("--require-parity: 2 parity test(s) skipped or not run: ")
    assert "test_sample.py::test_skipped_by_marker (skipped: fixture unavailable)" in line
    assert "test_sample.py::test_skipped_inside (skipped: no data here)" in line
    assert "test_compared" not in line and "test_unrelated_skip" not in line


def test_without_the_option_skips_pass(tmp_path):
    result = run_pytest(tmp_path, SAMPLE)
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert gate_lines(result) == []


def test_all_parity_tests_passing_exits_0(tmp_path):
    result = run_pytest(tmp_path, PASSING, "--require-parity")
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert "2 passed, 1 skipped" in result.stdout
    assert gate_lines(result) == []


def test_a_deselected_parity_test_counts_as_not_run(tmp_path):
    result = run_pytest(tmp_path, PASSING, "--require-parity", "-k", "not 2")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert gate_lines(result) == ["--require-parity: 1 parity test(s) skipped or not run: "
                                  "test_sample.py::test_compared[2] (not run)"]
