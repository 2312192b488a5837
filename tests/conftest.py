"""Shared pytest configuration: make the repository importable and generated stubs present."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not (ROOT / "agentapi" / "proto" / "agent_pb2.py").exists():
    raise SystemExit("generated agent stubs missing: run 'make proto'")
