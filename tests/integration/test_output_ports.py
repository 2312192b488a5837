"""A process's output through the pod's output ports (docs/stream-ports.md), as users see it:
``pysandbox run``'s stdout and stderr byte for byte what runc gives for the same command, a
reader that stops reading holding the container back (and only that stream), and other
processes of the same pod streaming meanwhile, on ports or, when all are taken, on gRPC."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.image import store as images
from tests.integration.pods import PodFactory
from tests.processes import wait_until

ROOT = Path(__file__).resolve().parents[2]
#: 100 MiB of varied bytes (busybox's first MiB, 100 times) with a numbered line between
#: copies: a lost, doubled or reordered frame changes the digest.
STREAM = (
    "i=0; while [ $i -lt 100 ]; do echo block $i; head -c 1048576 /bin/busybox; i=$((i+1)); done"
)
#: stdout and stderr lines alternating, each stream's order fixed.
INTERLEAVED = "i=0; while [ $i -lt 3000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"


@pytest.fixture(scope="module")
def root(module_pods: PodFactory) -> Path:
    return module_pods.new_root("pso")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runc bundle of the default image (its rootfs is what ``pysandbox run default``
    runs)."""
    if shutil.which("runc") is None:
        pytest.fail("runc is missing: run 'make deps' (Debian's containerd package brings it)")
    path = tmp_path_factory.mktemp("runc-ports")
    shutil.copytree(images.ensure_default_image(), path / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=path, check=True, timeout=30)
    return path


def _argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sandbox", "--root", str(root), *args]


def _digests(argv: list[str], cwd: Path = ROOT) -> tuple[str, int, bytes, int]:
    """Run ``argv``: (sha256 of its stdout, stdout bytes, its stderr, exit status), stdout
    hashed as it comes (never held whole)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd
    )
    assert proc.stdout is not None and proc.stderr is not None
    digest, size, err = hashlib.sha256(), 0, bytearray()
    for data in _drain(proc.stdout.fileno(), proc.stderr.fileno(), err):
        digest.update(data)
        size += len(data)
    return digest.hexdigest(), size, bytes(err), proc.wait(300)


def _drain(out: int, err_fd: int, err: bytearray) -> Iterator[bytes]:
    """stdout's chunks until EOF, stderr collected into ``err`` meanwhile."""
    open_fds = {out, err_fd}
    deadline = time.monotonic() + 300
    while open_fds and time.monotonic() < deadline:
        for fd, _ in _poll(open_fds):
            data = os.read(fd, 1 << 20)
            if not data:
                open_fds.discard(fd)
            elif fd == out:
                yield data
            else:
                err += data


def _poll(fds: set[int]) -> list[tuple[int, int]]:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return poller.poll(1000)


def _runc(bundle: Path, script: str, name: str) -> tuple[str, int, bytes, int]:
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=["sh", "-c", script], terminal=False)
    (bundle / "config.json").write_text(json.dumps(spec))
    state = bundle.parent / f"{bundle.name}-state"
    try:
        return _digests(["runc", "--root", str(state), "run", "--bundle", str(bundle), name])
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "-f", name], capture_output=True)


def test_a_100_mib_stream_is_byte_for_byte_runcs(root: Path, bundle: Path) -> None:
    expected = _runc(bundle, STREAM, f"ports-{os.getpid()}")
    assert expected[1] > 100 * 1024 * 1024 and expected[3] == 0, expected[2]
    got = _digests(_argv(root, "run", "default", "sh", "-c", STREAM))
    assert got == expected


def test_interleaved_stdout_and_stderr_stay_apart_in_order(root: Path, bundle: Path) -> None:
    expected = _runc(bundle, INTERLEAVED, f"ports-il-{os.getpid()}")
    assert expected[2].startswith(b"err0\nerr1\n") and expected[3] == 0
    assert _digests(_argv(root, "run", "default", "sh", "-c", INTERLEAVED)) == expected


def _closed_after_two_lines(argv: list[str], cwd: Path = ROOT) -> tuple[int, bytes]:
    """Run ``argv`` as ``argv | head -2`` would: read two lines of its stdout, close it;
    (exit status, stderr)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        proc.stdout.close()  # the reader goes: the writer's next write fails (pipe(7))
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines == [b"y\n", b"y\n"], lines
    return proc.returncode, err


def test_a_closed_stdout_pipe_stops_the_writer_as_under_runc(root: Path, bundle: Path) -> None:
    """``run IMAGE yes | head -2``: under runc ``yes`` writes to the closed pipe itself and
    fails with EPIPE (its SIGPIPE is ignored: it is its pid namespace's init); here the host
    relay meets EPIPE and the agent drops its end of the container's pipe. The run ended
    only on SIGKILL before (the writer blocked on a pipe nobody read)."""
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=["yes"], terminal=False)
    (bundle / "config.json").write_text(json.dumps(spec))
    name = f"ports-pipe-{os.getpid()}"
    state = bundle.parent / f"{bundle.name}-state"
    try:
        expected = _closed_after_two_lines(
            ["runc", "--root", str(state), "run", "--bundle", str(bundle), name]
        )
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "-f", name], capture_output=True)
    assert expected == (1, b"yes: (null): Broken pipe\n"), expected
    assert _closed_after_two_lines(_argv(root, "run", "default", "yes")) == expected


def _nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def _read_ready(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_a_reader_that_stops_holds_the_writer_back_and_only_its_stream(root: Path) -> None:
    """The container writes 64 MiB to stdout in 64 KiB pieces and counts them on stderr.
    While nobody reads stdout, the count stops within a few MiB (nothing in the guest or on
    the host buffers the rest) while stderr still arrives; once stdout is read, everything
    comes, byte-exact, and the run exits 0."""
    script = "i=0; while [ $i -lt 1024 ]; do head -c 65536 /dev/zero; echo $i >&2; i=$((i+1)); done"
    proc = subprocess.Popen(
        _argv(root, "run", "default", "sh", "-c", script),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    _nonblocking(err)
    progress = bytearray()

    def count() -> int:
        progress.extend(_read_ready(err))
        lines = bytes(progress).split(b"\n")[:-1]
        return int(lines[-1]) if lines else -1

    try:
        assert wait_until(lambda: count() >= 0, 120, interval=0.1), progress[-200:]
        # Not reading stdout: the count must settle, far below 1023.
        settled = -2
        while count() != settled:
            settled = count()
            time.sleep(3)
        assert 0 <= settled < 256, settled  # < 16 MiB taken while nobody read
        got = bytearray()
        while data := os.read(out, 1 << 20):
            got += data
            count()
        assert proc.wait(120) == 0
        progress.extend(proc.stderr.read())
        assert len(got) == 64 << 20 and got.count(0) == len(got)
        assert progress == b"".join(b"%d\n" % i for i in range(1024))
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def detached(root: Path) -> Iterator[str]:
    """A detached run whose pod the exec tests share."""
    started = subprocess.run(
        _argv(root, "run", "-d", "--name", "multi", "default", "sleep", "1000"),
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )
    assert started.returncode == 0, started.stderr
    yield "multi"
    subprocess.run(_argv(root, "rm", "-f", "multi"), capture_output=True, timeout=120, cwd=ROOT)


def _exec(root: Path, name: str, script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        _argv(root, "exec", name, "sh", "-c", script),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


#: 16 MiB of varied bytes, and its digest.
BUSYBOX_16M = "cat " + " ".join(["/bin/busybox"] * 9) + " | head -c 16777216"


def _busybox_16m() -> tuple[str, int, bytes, int]:
    data = (images.ensure_default_image() / "bin" / "busybox").read_bytes()
    return hashlib.sha256((data * 9)[: 16 << 20]).hexdigest(), 16 << 20, b"", 0


def test_other_processes_stream_while_one_reader_is_stuck(root: Path, detached: str) -> None:
    """In one run's pod, two execs whose stdout nobody reads hold four output ports (their
    stdout and stderr); a third exec, on gRPC now, still gets its 16 MiB in full, and so do
    the first two once read."""
    stuck = [_exec(root, detached, "head -c 33554432 /dev/zero; echo done >&2") for _ in range(2)]
    try:
        for proc in stuck:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            assert wait_until(lambda fd=fd: _poll({fd}) != [], 120)  # they hold their ports
        time.sleep(2)
        third = _digests(_argv(root, "exec", detached, "sh", "-c", BUSYBOX_16M))
        assert third == _busybox_16m()
        for proc in stuck:
            assert proc.returncode is None  # still held back
            out, err = proc.communicate(timeout=180)
            assert (proc.returncode, len(out), out.count(0), err) == (
                0,
                32 << 20,
                32 << 20,
                b"done\n",
            )
    finally:
        for proc in stuck:
            proc.kill()
            proc.wait()


def test_a_reader_gone_mid_stream_leaves_its_ports_to_the_next(root: Path, detached: str) -> None:
    """An exec whose caller is killed mid-stream (and whose output pipe then closes): the
    next execs, which take the same ports first, get their output whole and nothing of the
    old stream's leftovers."""
    victim = _exec(root, detached, "head -c 67108864 /dev/zero")
    assert victim.stdout is not None
    assert os.read(victim.stdout.fileno(), 65536)  # streaming, then blocked on us
    victim.kill()
    victim.wait()
    victim.stdout.close()
    assert victim.stderr is not None
    victim.stderr.close()
    for _ in range(2):
        assert _digests(_argv(root, "exec", detached, "sh", "-c", BUSYBOX_16M)) == _busybox_16m()
