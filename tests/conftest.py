"""Shared pytest configuration: make the repository importable and generated stubs present;
hypothesis profiles (``PYSANDBOX_HYPOTHESIS=large`` for a long generated-input run, ``small``
by default, what ``make test`` runs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

settings.register_profile("small", max_examples=200, deadline=None)
settings.register_profile("large", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("PYSANDBOX_HYPOTHESIS", "small"))

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not (ROOT / "agentapi" / "proto" / "agent_pb2.py").exists():
    raise SystemExit("generated agent stubs missing: run 'make proto'")
