"""StdioRelay when the reader of an output fd goes away (``pysandbox run … | head``).

What a user relies on: the run ends as under runc, whose container writes to the closed pipe
itself and gets EPIPE. The relay tells the agent (CloseOutput) and drains what was on the way;
with an agent older than that call it sends the process SIGPIPE instead.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from sandbox.pod.agent_client import ContainerClient
from sandbox.pod.stdio import StdioRelay


class _Agent:
    """Stands in for ContainerClient: stdout yields chunks until CloseOutput (or a bound)."""

    def __init__(self, knows_close_output: bool) -> None:
        self.knows_close_output = knows_close_output
        self.calls: list[tuple[Any, ...]] = []
        self.closed = threading.Event()

    def read_stream(self, container_id: str, exec_id: str, which: str) -> Iterator[bytes]:
        if which == "stderr":
            return
        for _ in range(10_000):  # the writer never stops by itself
            if self.closed.is_set():
                return
            yield b"y\n" * 4096

    def close_output(self, container_id: str, exec_id: str, which: str) -> bool:
        self.calls.append(("close_output", container_id, exec_id, which))
        if self.knows_close_output:
            self.closed.set()
        return self.knows_close_output

    def signal(self, container_id: str, exec_id: str, signum: int, all: bool = False) -> None:
        self.calls.append(("signal", container_id, exec_id, signum))
        self.closed.set()  # the process died of it


@pytest.mark.parametrize("knows_close_output", [True, False])
def test_a_reader_gone_stops_the_writer_and_the_relay_ends(knows_close_output: bool) -> None:
    agent = _Agent(knows_close_output)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    relay = StdioRelay(cast(ContainerClient, agent), "c", "e", None, out_w, err_w, False)
    relay.start()
    os.read(out_r, 4)
    os.close(out_r)  # `head` exits: the next write gets EPIPE
    relay.join(30)
    expected: list[tuple[Any, ...]] = [("close_output", "c", "e", "stdout")]
    if not knows_close_output:
        expected.append(("signal", "c", "e", signal.SIGPIPE))
    assert agent.calls == expected
    assert relay.errors == []
    for fd in (out_w, err_r, err_w):
        os.close(fd)
