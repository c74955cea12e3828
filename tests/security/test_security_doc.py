"""docs/security.md is generated from the @pytest.mark.security markers (scripts/security-report)
and must say exactly what they say."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from security_report import THREATS, collect, render

ROOT = Path(__file__).resolve().parents[2]


def test_docs_security_md_matches_the_markers(tmp_path):
    target = tmp_path / "security.md"
    # a collection inside a reliability-report run must not take part in that report
    without_report = {key: value for key, value in os.environ.items() if key != "RELIABILITY_REPORT"}
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=ROOT, env={**without_report, "SECURITY_REPORT": str(target)}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert target.read_text() == (ROOT / "docs" / "security.md").read_text(), \
        "docs/security.md does not match the security markers: run scripts/security-report"


def item(nodeid, **marker):
    marks = [pytest.mark.security(**marker).mark]
    return SimpleNamespace(nodeid=nodeid, location=(nodeid.split("::")[0], 1, nodeid), iter_markers=lambda name: marks,
                           get_closest_marker=lambda name: marks[0])


def test_a_marker_without_a_known_threat_or_a_claim_is_refused():
    with pytest.raises(pytest.UsageError, match="threat="):
        collect([item("tests/t.py::test_a", threat="someone", claim="x")])
    with pytest.raises(pytest.UsageError, match="claim="):
        collect([item("tests/t.py::test_a", threat="planted file")])


def test_parametrized_cases_fold_into_one_row_and_an_empty_threat_says_so():
    text = render([item("tests/t.py::test_a[1]", threat="planted file", claim="Claim | one."),
                   item("tests/t.py::test_a[2]", threat="planted file", claim="Claim | one.")])
    assert "| Claim \\| one. | `tests/t.py::test_a` (2 cases) |" in text
    assert text.count("No tested claim yet.") == len(THREATS) - 1
