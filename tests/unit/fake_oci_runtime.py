"""Stands in for ``agent.oci.init`` / ``agent.oci.exec`` in unit tests of the agent.

Spawned by the agent as the real runtime is (payload JSON on fd 3, sync socket on fd 4), it
writes the payload's ``sync_line`` member to the socket, as the real runtime reports, and exits
with the payload's ``exit`` member (default 1).
"""

from __future__ import annotations

import json
import os


def main() -> int:
    chunks = []
    while chunk := os.read(3, 65536):
        chunks.append(chunk)
    payload = json.loads(b"".join(chunks))
    os.write(4, str(payload["sync_line"]).encode() + b"\n")
    return int(payload.get("exit", 1))


if __name__ == "__main__":
    os._exit(main())
