"""Running containers in a test pod and collecting what they print."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sandbox.errors import AgentError
from sandbox.image import store as images
from sandbox.pod.agent_client import ContainerClient
from sandbox.pod.lifecycle import Pod
from sandbox.pod.sharing import share_container_files, unshare_container_files
from sandbox.pod.stdio import StdioRelay
from sandbox.run.default_spec import default_spec

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
    cid: str | None = None,
    rootfs_readonly: bool = True,
) -> Result:
    """Create, start and wait for a container in ``pod`` (id ``cid`` or a fresh one); remove
    it afterwards.

    The rootfs is shared read-only (under a guest overlay) unless ``rootfs_readonly`` is
    False: then, with ``overlay=False``, the container writes to the host directory itself,
    as a runc bundle's container does."""
    cid = cid or f"t{next(_ids)}"
    spec = copy.deepcopy(spec)
    rootfs, guest_spec = share_container_files(
        pod, cid, spec, images.ensure_default_image().parent, rootfs_readonly=rootfs_readonly
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


class Stream:
    """What one output stream of a process produced so far, readable while the process runs."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._cond = threading.Condition()
        self.closed = False

    def feed(self, data: bytes) -> None:
        with self._cond:
            self._data += data
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def data(self) -> bytes:
        with self._cond:
            return bytes(self._data)

    def wait_closed(self, timeout: float = 30.0) -> bytes:
        """Everything the stream carried, once it reached EOF; AssertionError on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.closed, timeout=timeout):
                raise AssertionError(f"no EOF within {timeout}s; got {bytes(self._data)!r}")
            return bytes(self._data)

    def wait_for(self, marker: bytes, timeout: float = 60.0) -> bytes:
        """Everything read so far, once it contains ``marker``; AssertionError on timeout/EOF."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: marker in self._data or self.closed, timeout=timeout
            ):
                raise AssertionError(f"no {marker!r} within {timeout}s; got {bytes(self._data)!r}")
            if marker not in self._data:
                raise AssertionError(f"EOF before {marker!r}; got {bytes(self._data)!r}")
            return bytes(self._data)


@dataclass
class LiveContainer:
    """A started container of a test pod, and helpers to drive it through the agent API."""

    client: ContainerClient
    cid: str
    pid: int
    spec: dict[str, Any]
    stdout: Stream
    stderr: Stream
    threads: list[threading.Thread]

    def follow(self, exec_id: str) -> tuple[Stream, Stream]:
        """Start copying the process's stdout and stderr into two new :class:`Stream`s."""
        streams = (Stream(), Stream())

        def copy(which: str, stream: Stream) -> None:
            try:
                for data in self.client.read_stream(self.cid, exec_id, which):
                    stream.feed(data)
            finally:
                stream.close()

        for which, stream in zip(("stdout", "stderr"), streams, strict=True):
            thread = threading.Thread(target=copy, args=(which, stream), daemon=True)
            thread.start()
            self.threads.append(thread)
        return streams

    def start_exec(
        self, exec_id: str, *args: str, stdin: bool = False, **process: Any
    ) -> tuple[int, Stream, Stream]:
        """ExecProcess ``args`` (the container's process settings, overridden by ``process``);
        its pid and output streams. Its stdin is closed unless ``stdin``."""
        spec_process = copy.deepcopy(self.spec["process"])
        spec_process.update({"args": list(args), "terminal": False})
        spec_process.update(process)
        pid = self.client.exec_process(self.cid, exec_id, json.dumps(spec_process).encode())
        out, err = self.follow(exec_id)
        if not stdin:
            self.client.close_stdin(self.cid, exec_id)
        return pid, out, err

    def exec(
        self, exec_id: str, *args: str, timeout: float = 60.0, stdin: bool = False, **process: Any
    ) -> Result:
        """Run ``args`` in the container to completion; its status and output. Its stdin is
        closed first unless ``stdin`` (then it stays open, as with no ``-i``)."""
        _pid, out, err = self.start_exec(exec_id, *args, stdin=stdin, **process)
        status, sig, oom = self.client.wait_process(self.cid, exec_id, timeout)
        return Result(status, sig, oom, out.wait_closed(), err.wait_closed())


@contextlib.contextmanager
def live_container(
    pod: Pod,
    spec: dict[str, Any],
    overlay: bool = True,
    stdin: bool = False,
    rootfs_readonly: bool = True,
) -> Iterator[LiveContainer]:
    """Create and start a container in ``pod``; kill and remove it when the block ends.

    Its stdout/stderr are followed from the start; its stdin is closed unless ``stdin``.
    ``rootfs_readonly`` as for :func:`run_container`.
    """
    cid = f"t{next(_ids)}"
    spec = copy.deepcopy(spec)
    rootfs, guest_spec = share_container_files(
        pod, cid, spec, images.ensure_default_image().parent, rootfs_readonly=rootfs_readonly
    )
    try:
        with pod.client() as client:
            live = LiveContainer(client, cid, 0, spec, Stream(), Stream(), [])
            try:
                live.pid = client.create_container(
                    cid, json.dumps(guest_spec).encode(), rootfs, overlay=overlay
                )
                live.stdout, live.stderr = live.follow("")
                client.start_container(cid)
                if not stdin:
                    client.close_stdin(cid)
                yield live
            finally:
                with contextlib.suppress(AgentError):
                    client.remove_container(cid)
                for thread in live.threads:
                    thread.join(30)
    finally:
        unshare_container_files(pod, cid)
