"""Running containers in a test pod and collecting what they print."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any

from sandbox import images
from sandbox.container import StdioRelay, share_container_files, unshare_container_files
from sandbox.pod import Pod
from sandbox.spec import default_spec

_ids = itertools.count()


@dataclass
class Result:
    status: int
    signal: int
    oom: bool
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")


def busybox_spec(*args: str, **process: Any) -> dict[str, Any]:
    """A default spec running ``args`` in the default busybox image."""
    spec = default_spec(list(args), rootfs=str(images.ensure_default_image()))
    spec["process"].update(process)
    return spec


def run_container(
    pod: Pod,
    spec: dict[str, Any],
    stdin: bytes | None = None,
    overlay: bool = True,
    timeout: float = 120.0,
) -> Result:
    """Create, start and wait for a container in ``pod``; remove it afterwards."""
    cid = f"t{next(_ids)}"
    spec = copy.deepcopy(spec)
    rootfs, guest_spec = share_container_files(
        pod, cid, spec, images.ensure_default_image().parent, rootfs_readonly=True
    )
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r = None
    if stdin is not None:
        in_r, in_w = os.pipe()
        os.write(in_w, stdin)
        os.close(in_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    try:
        with pod.client() as client:
            client.create_container(cid, json.dumps(guest_spec).encode(), rootfs, overlay=overlay)
            relay = StdioRelay(client, cid, "", in_r, out_w, err_w, spec["process"]["terminal"])
            relay.start()
            import threading

            def drain(fd: int) -> None:
                while data := os.read(fd, 65536):
                    chunks[fd].append(data)

            drains = [threading.Thread(target=drain, args=(fd,)) for fd in (out_r, err_r)]
            for thread in drains:
                thread.start()
            client.start_container(cid)
            if stdin is None:
                client.close_stdin(cid)
            status, sig, oom = client.wait_process(cid, "", timeout)
            relay.join(60)
            os.close(out_w)
            os.close(err_w)
            for thread in drains:
                thread.join(10)
            client.remove_container(cid)
    finally:
        unshare_container_files(pod, cid)
        for fd in (out_r, err_r, in_r):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return Result(status, sig, oom, b"".join(chunks[out_r]), b"".join(chunks[err_r]))
