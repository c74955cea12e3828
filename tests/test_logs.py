"""Log lines: syslog priorities for journald (sd-daemon(3) prefixes) when stderr is the journal,
ISO timestamps in JSON, and exception details (type and message; the traceback only at DEBUG)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from daemon_harness import Project, wait_for
from tokensmith.devserver import OAuthServer

SCRIPT = textwrap.dedent("""
    import logging, sys
    from tokensmith import logs
    logs.setup(sys.argv[1], sys.argv[2])
    log = logging.getLogger("tokensmith.test")
    log.debug("debug line")
    log.info("info line", extra={"client": "api", "event": "refreshed"})
    log.warning("warning line")
    log.error("error line")
    log.critical("critical line")
    try:
        raise ValueError("the disk said no")
    except ValueError:
        log.exception("writing failed")
""")


def run_logging(tmp_path, level="INFO", fmt="plain", journal=True) -> list[str]:
    out = tmp_path / "stderr"
    with open(out, "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SCRIPT, level, fmt], stderr=stderr, env=env, check=True, timeout=60)
    return out.read_text().splitlines()


def test_journal_lines_carry_the_syslog_priority_and_no_timestamp(tmp_path):
    lines = run_logging(tmp_path)
    assert lines[0] == "<6>INFO client=api event=refreshed info line"
    assert lines[1] == "<4>WARNING warning line"
    assert lines[2] == "<3>ERROR error line"
    assert lines[3] == "<2>CRITICAL critical line"
    assert lines[4] == "<3>ERROR writing failed (ValueError: the disk said no)"
    assert len(lines) == 5  # no traceback at INFO
    assert not any(re.search(r"\d{4}-\d\d-\d\dT", line) for line in lines)


def test_another_stderr_gets_timestamps_and_no_prefix(tmp_path):
    lines = run_logging(tmp_path, journal=False)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ERROR error line", lines[2])
    assert not any(line.startswith("<") for line in lines)


def test_a_journal_stream_of_another_file_is_not_the_journal(tmp_path):
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    with open(tmp_path / "stderr", "w") as stderr:
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", SCRIPT, "INFO", "plain"], stderr=stderr, env=env, check=True, timeout=60)
    assert not (tmp_path / "stderr").read_text().startswith("<")


def test_traceback_at_debug_each_line_at_debug_priority(tmp_path):
    lines = run_logging(tmp_path, level="DEBUG")
    assert lines[0] == "<7>DEBUG debug line"
    start = lines.index("<3>ERROR writing failed (ValueError: the disk said no)")
    trace = lines[start + 1:]
    assert trace[0] == "<7>  Traceback (most recent call last):"
    assert trace[-1] == "<7>  ValueError: the disk said no"
    assert all(line.startswith("<7>") for line in trace)


def test_json_lines_have_an_iso_time_and_the_exception(tmp_path):
    records = [json.loads(line) for line in run_logging(tmp_path, fmt="json")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    failed = records[-1]
    assert failed["exception"] == "ValueError" and failed["exception_message"] == "the disk said no"
    assert "traceback" not in failed
    debug = [json.loads(line) for line in run_logging(tmp_path, level="DEBUG", fmt="json")]
    assert "Traceback (most recent call last)" in debug[-1]["traceback"]


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=60) as server:
        yield server


def test_a_daemon_under_journald_marks_a_refused_secret_as_critical(tmp_path, server):
    project = Project(tmp_path, server)
    project.add_client("good", lifetime=60)
    project.add_client("bad", lifetime=60)
    server.set_client_secret("bad", "rotated-at-the-provider")
    project.write()
    log_path = tmp_path / "journal"
    with open(log_path, "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        process = subprocess.Popen([sys.executable, "-m", "tokensmith", "run", "--config", str(project.config)],
                                   stderr=stderr, stdout=stderr, env=env)
    try:
        wait_for(lambda: "event=refresh_failed" in log_path.read_text())
    finally:
        process.terminate()
        process.wait(15)
    lines = log_path.read_text().splitlines()
    assert any(line.startswith("<2>CRITICAL client=bad event=refresh_failed") for line in lines), lines
    assert any(line.startswith("<6>INFO") for line in lines)
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
