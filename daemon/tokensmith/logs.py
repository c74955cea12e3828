"""One line per event, plain or JSON. Records carry `client` and `event` extras; tokens appear
only as fingerprints because no caller ever passes a token to a logger."""

from __future__ import annotations

import json
import logging
import sys
import time


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        client = getattr(record, "client", None)
        event = getattr(record, "event", None)
        parts = [f"{stamp}Z", record.levelname]
        if client:
            parts.append(f"client={client}")
        if event:
            parts.append(f"event={event}")
        message = record.getMessage()
        if record.exc_info:
            message += f" ({record.exc_info[0].__name__})"
        parts.append(" ".join(message.split()))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "message": " ".join(record.getMessage().split())}
        for key in ("client", "event", "reason"):
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_info:
            data["exception"] = record.exc_info[0].__name__
        return json.dumps(data)


def setup(level: str = "INFO", fmt: str = "plain", stream=None) -> None:
    # The logging HOWTO's "Optimization" switches: no formatter here shows the caller's source
    # line, thread or process, and gathering them costs a stack walk and a syscall per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("apscheduler", "urllib3", "botocore", "boto3", "hvac"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
