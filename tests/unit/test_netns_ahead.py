"""The network namespace the agent makes ahead of a restored VM's first container
(agent/netns_ahead.py): which specs get it, that it is a new namespace with loopback up, and
that it is given once."""

from __future__ import annotations

import copy
import os
import subprocess
from typing import Any

import pytest

from agent.netns_ahead import NetnsAhead

ROOT = os.geteuid() == 0


def _spec(*namespaces: dict[str, str]) -> dict[str, Any]:
    return {"linux": {"namespaces": [{"type": "pid"}, *namespaces, {"type": "mount"}]}}


def _started() -> NetnsAhead:
    ahead = NetnsAhead()
    ahead.start()
    return ahead


@pytest.mark.parametrize(
    "spec",
    [
        _spec(),  # the guest's own network namespace: nothing to give
        _spec({"type": "network", "path": "/run/netns/x"}),  # one to join: kept
        _spec({"type": "network"}, {"type": "user"}),  # owned by a new user namespace
        _spec({"type": "network"}, {"type": "user", "path": "/proc/9/ns/user"}),
        {"linux": {"namespaces": "network"}},  # malformed: the runtime says what is wrong
        {"linux": {"namespaces": [{"type": "network"}, "user"]}},
        {"process": {}},
    ],
)
def test_specs_that_do_not_take_it_are_left_as_they_are(spec: dict[str, Any]) -> None:
    ahead = NetnsAhead()  # never started: take_for must not wait for it either
    before = copy.deepcopy(spec)
    assert ahead.take_for(spec) is None
    assert spec == before


def test_nothing_is_given_before_start() -> None:
    """Not started (a cold-booted pod, or the template VM): the runtime makes its own."""
    spec = _spec({"type": "network"})
    assert NetnsAhead().take_for(spec) is None
    assert spec == _spec({"type": "network"})


@pytest.mark.skipif(not ROOT, reason="unshare(CLONE_NEWNET) needs root")
def test_a_new_namespace_with_loopback_up_is_given_once() -> None:
    ahead = _started()
    spec = _spec({"type": "network"})
    fd = ahead.take_for(spec)
    assert fd is not None
    try:
        path = spec["linux"]["namespaces"][1]["path"]
        assert path == f"/proc/{os.getpid()}/fd/{fd}"
        ours = os.readlink(f"/proc/{os.getpid()}/ns/net")
        theirs = os.readlink(path)
        assert theirs.startswith("net:[") and theirs != ours
        # What a process that joins it sees: loopback only, up (``ip -o link`` in it).
        shown = subprocess.run(
            ["nsenter", f"--net={path}", "ip", "-o", "link"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.splitlines()
        assert len(shown) == 1 and shown[0].startswith("1: lo: <LOOPBACK,UP,LOWER_UP>"), shown
    finally:
        os.close(fd)
    # Given once: the next container makes its own.
    again = _spec({"type": "network"})
    assert ahead.take_for(again) is None
    assert again == _spec({"type": "network"})
    # This process (every other thread of the agent) stayed where it was.
    assert os.readlink("/proc/thread-self/ns/net") == ours
