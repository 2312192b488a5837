"""The ``pysandbox`` command line as the integration tests call it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def pysandbox(root: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``pysandbox --root ROOT ARGS`` from the checkout, its output captured as text (5 min
    at most); ``kwargs`` go to :func:`subprocess.run` (``env``, ``input``...)."""
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        **kwargs,
    )
