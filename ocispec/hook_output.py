"""How a failed OCI hook is described, on the host and in the guest alike.

runc's error for a failed hook shows both of its outputs; here the error is one line:
``exit status N`` (or ``killed by signal N``), then the start of stdout and of stderr, each
with its whitespace runs folded to one space and cut at :data:`QUOTED_OUTPUT` characters.
"""

from __future__ import annotations

#: Characters of a failed hook's stdout and of its stderr quoted in the error.
QUOTED_OUTPUT = 200


def failure_line(how: str, stdout: bytes, stderr: bytes) -> str:
    """``how`` (how the hook ended), then what stdout and stderr began with, as one line."""
    parts = [how]
    for label, data in (("stdout", stdout), ("stderr", stderr)):
        text = " ".join(data.decode(errors="replace").split())
        if text:
            if len(text) > QUOTED_OUTPUT:
                text = text[:QUOTED_OUTPUT] + "…"
            parts.append(f"{label}: {text}")
    return ", ".join(parts)
