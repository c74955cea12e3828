"""One line per event, plain or JSON. Records carry `client` and `event` extras; tokens appear
only as fingerprints because no caller ever passes a token to a logger.

Under systemd, when stderr is the journal ($JOURNAL_STREAM names it), plain lines start with the
syslog priority as sd-daemon(3) describes ("<3>" for an error), so `journalctl -p err` finds
them, and carry no timestamp of their own (the journal has one). An exception is logged with its
type and message; the traceback follows only at DEBUG."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback

# sd-daemon(3) / syslog(3) priorities
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


def is_journal(stream) -> bool:
    """True when `stream` is the journal's stream socket, as systemd's $JOURNAL_STREAM ("dev:inode") says."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def iso_time(created: float, millis: bool = True) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{stamp}.{int(created % 1 * 1000):03d}Z" if millis else f"{stamp}Z"


def exception_text(exc_info) -> str:
    kind, value = exc_info[0], exc_info[1]
    detail = " ".join(str(value).split()) if value is not None else ""
    return f"{kind.__name__}: {detail}" if detail else kind.__name__


def wants_traceback() -> bool:
    return logging.getLogger().isEnabledFor(logging.DEBUG)


class PlainFormatter(logging.Formatter):
    def __init__(self, journal: bool = False):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        client = getattr(record, "client", None)
        event = getattr(record, "event", None)
        parts = [f"<{priority(record.levelno)}>{record.levelname}"] if self.journal else \
            [iso_time(record.created, millis=False), record.levelname]
        if client:
            parts.append(f"client={client}")
        if event:
            parts.append(f"event={event}")
        message = record.getMessage()
        if record.exc_info:
            message += f" ({exception_text(record.exc_info)})"
        parts.append(" ".join(message.split()))
        line = " ".join(parts)
        if record.exc_info and wants_traceback():
            prefix = f"<{PRIORITIES[logging.DEBUG]}>" if self.journal else ""
            lines = "".join(traceback.format_exception(*record.exc_info)).rstrip().splitlines()
            line += "".join(f"\n{prefix}  {text}" for text in lines)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"time": iso_time(record.created), "level": record.levelname, "logger": record.name,
                "message": " ".join(record.getMessage().split())}
        for key in ("client", "event", "reason"):
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_info:
            data["exception"] = record.exc_info[0].__name__
            data["exception_message"] = " ".join(str(record.exc_info[1]).split())
            if wants_traceback():
                data["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(data)


def setup(level: str = "INFO", fmt: str = "plain", stream=None) -> None:
    # The logging HOWTO's "Optimization" switches: no formatter here shows the caller's source
    # line, thread or process, and gathering them costs a stack walk and a syscall per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter(journal=is_journal(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("apscheduler", "urllib3", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def error_line(text: str, stream=None) -> None:
    """A CLI failure on stderr: "tokensmith: ..." (with the error priority when that is the journal)."""
    stream = stream or sys.stderr
    print(("<3>" if is_journal(stream) else "") + f"tokensmith: {text}", file=stream)
