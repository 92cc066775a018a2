"""structlog set-up: one event per line, console or JSON, stable event names.

With JSON every line the daemon writes is JSON: warnings of libraries (stdlib `logging`,
`warnings`), exceptions escaping a thread or the main code, and the errors that stop the
start before the config was read (`peek_format` finds the format in the raw text)."""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings

import structlog

_JSON_FORMAT = re.compile(rb'^[ \t]*log_format[ \t]*=[ \t]*["\']json["\']', re.M)


def peek_format(path: str) -> str:
    """The config's log_format read without parsing it ("console" if unsure), for the
    errors that come before or instead of a parsed config."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 << 20)
    except OSError:
        return "console"
    return "json" if _JSON_FORMAT.search(head) else "console"


def setup(fmt: str = "console", stream=None) -> structlog.stdlib.BoundLogger:
    stream = stream or sys.stderr
    json_ = fmt == "json"
    renderer = (structlog.processors.JSONRenderer() if json_
                else structlog.dev.ConsoleRenderer(colors=False))
    stamp = [structlog.processors.add_log_level,
             structlog.processors.TimeStamper(fmt="iso", utc=True)]
    # a traceback becomes one "exception" field, not lines of its own
    tail = [structlog.processors.format_exc_info] if json_ else []
    structlog.configure(
        processors=[*stamp, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    log = structlog.get_logger("xdplb")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamp, *tail]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    warnings.simplefilter("default")

    def thread_crashed(args) -> None:
        log.error("thread_crashed", thread=getattr(args.thread, "name", None),
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    threading.excepthook = thread_crashed
    return log
