"""Python stubs of tests/integration/cri/cri_subset.proto (our subset of the k8s.io/cri-api
runtime/v1 messages), generated into a directory at run time and never committed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

PROTO_DIR = Path(__file__).resolve().parent / "cri"


def generate(out: Path) -> tuple[ModuleType, ModuleType]:
    """(messages module, gRPC stubs module) generated into ``out``; RuntimeError if protoc
    fails."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_DIR / "cri_subset.proto"),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed on cri_subset.proto ({status})")
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("cri_subset_pb2"), importlib.import_module(
            "cri_subset_pb2_grpc"
        )
    finally:
        sys.path.remove(str(out))
