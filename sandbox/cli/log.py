"""The ``--log`` file: runc's global flags ``--log FILE --log-format text|json``.

containerd's runc shim reads that file when a call fails, so every error goes there (one line
per message); warnings (a failed poststart or poststop hook) go there too, or to stderr when
there is no ``--log``, as runc (logrus) writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def write(args: argparse.Namespace, level: str, message: str) -> bool:
    """Append one ``level`` line with ``message`` to ``args.log``; False without a log file
    (or when it cannot be written)."""
    log: Path | None = getattr(args, "log", None)
    if log is None:
        return False
    import datetime

    now = datetime.datetime.now(datetime.UTC).isoformat()
    if getattr(args, "log_format", "text") == "json":
        line = json.dumps({"level": level, "msg": message, "time": now})
    else:
        line = f"{now} {level}: {message}"
    try:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError:
        return False
    return True


def warner(args: argparse.Namespace) -> Callable[[str], None]:
    """A ``warn`` callback for the runtime: to the --log file, else to stderr."""

    def warn(message: str) -> None:
        if not write(args, "warning", message):
            print(f"pysandbox: warning: {message}", file=sys.stderr)

    return warn
