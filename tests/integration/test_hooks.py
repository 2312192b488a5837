"""The six OCI hooks, through the runc CLI, compared with runc on this host (docs/hooks.md).

Every hook appends one line to a log in a volume: its kind, the status and pid of the state on
its stdin, the id, bundle and whether the annotations came along. Host hooks write to the
volume's host path, startContainer (inside the container) to its path in the container, so one
file shows the order of all six. The same bundle runs under runc for comparison.

VM boots: one for the whole lifecycle, one pod for every failure a member container can show
(a failed create leaves the pod as it was), one for a failed create that owns its pod, and
one for podman passing hooks from a hooks directory.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.image import store as images
from sandbox.run.default_spec import default_spec
from tests.integration import test_podman as podman_tests
from tests.integration import test_runtime_cli as cli_tests
from tests.integration.test_runtime_cli import (
    Runtime,
    assert_nothing_left,
    pod_dir,
    wait_until,
)
from tests.processes import processes_mentioning

pytestmark = pytest.mark.vm

# The fixtures these tests share with the runtime CLI and podman tests.
runtime = cli_tests.runtime
podman = podman_tests.podman

#: argv: sh -c SCRIPT <kind> <log>. busybox runs the applet named by argv[0], so a hook whose
#: args[0] did not become argv[0] would not get a shell. Shell builtins only: host hooks have
#: no PATH (their env is given), and runc writes the state as compact JSON.
SCRIPT = r"""read -r s
st=${s#*\"status\":\"}; st=${st%%\"*}
case "$s" in *'"pid":'[0-9]*) pid=${s#*\"pid\":}; pid=${pid%%[,\}]*};; *) pid=none;; esac
id=${s#*\"id\":\"}; id=${id%%\"*}
b=${s#*\"bundle\":\"}; b=${b%%\"*}
case "$s" in *'"org.example/hooks":"yes"'*) a=annotations;; *) a=none;; esac
echo "$0 $st $pid $id $b $a ${HOOK_ENV-noenv}" >> "$1"
"""
KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
#: Where the volume is mounted in the container (it exists in the image: nothing is created).
VOLUME = "/home"
ANNOTATIONS = {"org.example/hooks": "yes"}
FAILING = "echo out; echo failing $0 >&2; exit 3"


def _hook(kind: str, script: str, log: str, **extra: Any) -> dict[str, Any]:
    return {"path": "/bin/busybox", "args": ["sh", "-c", script, kind, log], **extra}


def logging_hooks(volume: Path) -> dict[str, list[dict[str, Any]]]:
    """All six kinds, each logging to ``volume/hooks.log`` (in the container: VOLUME)."""
    return {
        kind: [
            _hook(
                kind,
                SCRIPT,
                f"{VOLUME}/hooks.log" if kind == "startContainer" else f"{volume}/hooks.log",
                env=[f"HOOK_ENV={kind}"],
            )
        ]
        for kind in KINDS
    }


def bundle_with(
    base: Path,
    name: str,
    args: list[str],
    hooks: dict[str, Any],
    volume: Path | None = None,
    annotations: dict[str, str] | None = None,
) -> Path:
    bundle = base / name
    bundle.mkdir()
    spec = default_spec(args, rootfs=str(images.ensure_default_image()))
    spec["root"]["readonly"] = True
    spec["hooks"] = hooks
    spec["annotations"] = {**ANNOTATIONS, **(annotations or {})}
    if volume is not None:
        spec["mounts"].append(
            {"destination": VOLUME, "type": "bind", "source": str(volume), "options": ["rbind"]}
        )
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def call(argv: list[str], *args: str, out: Path) -> str:
    """One runtime call that must succeed; its output goes to ``out`` and is returned (a
    created container's shim holds the caller's stdio: a pipe would not reach EOF)."""
    with open(out, "ab") as sink:
        start = sink.tell()
        done = subprocess.run(
            [*argv, *args], stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, timeout=120
        )
    text = out.read_bytes()[start:].decode(errors="replace")
    assert done.returncode == 0, f"{args}: {text}"
    return text


def lifecycle(argv: list[str], bundle: Path, cid: str, pid_file: Path) -> None:
    """create, start, wait until stopped, delete: as containerd and conmon drive a runtime."""
    out = pid_file.with_suffix(".out")
    call(argv, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid, out=out)
    call(argv, "start", cid, out=out)

    def stopped() -> bool:
        state = subprocess.run([*argv, "state", cid], capture_output=True, text=True, timeout=60)
        return bool(json.loads(state.stdout)["status"] == "stopped")

    assert wait_until(stopped, 60)
    call(argv, "delete", cid, out=out)


def read_log(volume: Path, pid_file: Path) -> list[str]:
    """The hooks' lines, with the pid of --pid-file spelt HOSTPID."""
    host_pid = pid_file.read_text().strip()
    lines = (volume / "hooks.log").read_text().splitlines()
    return [" ".join("HOSTPID" if w == host_pid else w for w in line.split()) for line in lines]


def test_six_hooks_in_the_spec_order_as_under_runc(runtime: Runtime, tmp_path: Path) -> None:
    ours_volume, runc_volume = tmp_path / "ours", tmp_path / "runc"
    ours_volume.mkdir()
    runc_volume.mkdir()
    cid = "hooked"
    ours_bundle = bundle_with(tmp_path, "b1", ["true"], logging_hooks(ours_volume), ours_volume)
    runc_bundle = bundle_with(tmp_path, "b2", ["true"], logging_hooks(runc_volume), runc_volume)

    lifecycle(runtime.argv(), ours_bundle, cid, tmp_path / "ours.pid")
    lifecycle(["runc", "--root", str(tmp_path / "runc-root")], runc_bundle, cid, tmp_path / "r.pid")
    ours = read_log(ours_volume, tmp_path / "ours.pid")
    runc = read_log(runc_volume, tmp_path / "r.pid")

    def line(kind: str, status: str, pid: str, bundle: Path) -> str:
        return f"{kind} {status} {pid} {cid} {bundle} annotations {kind}"

    # The runtime spec's order and states. Host hooks see the container's pid as clients
    # know it (--pid-file, `state`); startContainer, in the container, its own pid there (1).
    assert ours == [
        line("prestart", "creating", "HOSTPID", ours_bundle),
        line("createRuntime", "creating", "HOSTPID", ours_bundle),
        line("createContainer", "creating", "HOSTPID", ours_bundle),
        line("startContainer", "created", "1", ours_bundle),
        line("poststart", "running", "HOSTPID", ours_bundle),
        line("poststop", "stopped", "none", ours_bundle),
    ]
    # runc gives the same, but for two things (docs/hooks.md): runc 1.1 runs poststart during
    # create, as "created" (runc#1710; runtime.md puts it after the program started, as
    # here); and runc's createContainer runs in the container's pid namespace, so its pid is
    # the container's own there (1), where ours runs on the host and gets the host pid.
    assert runc[2] == line("createContainer", "creating", "1", runc_bundle)
    assert runc[3] == line("poststart", "created", "HOSTPID", runc_bundle)

    def same(entries: list[str], bundle: Path) -> list[str]:
        kept = [
            entry for entry in entries if not entry.startswith(("poststart", "createContainer"))
        ]
        return [entry.replace(str(bundle), "BUNDLE") for entry in kept]

    assert same(runc, runc_bundle) == same(ours, ours_bundle)
    assert_nothing_left(runtime, cid, pod_id=cid)


def test_failing_hooks_fail_their_operation_and_leave_nothing(
    runtime: Runtime, tmp_path: Path
) -> None:
    """One pod; each container joins it with a failing hook of one kind."""
    volume = tmp_path / "vol"
    volume.mkdir()
    sid = "hookpod"
    log = tmp_path / "runtime.log"
    logged = ("--log", str(log), "--log-format", "json")
    sandbox = bundle_with(
        tmp_path,
        "sandbox",
        ["sleep", "1000"],
        {"poststop": [_hook("poststop", FAILING, "-")]},
        annotations={
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": sid,
        },
    )
    out = tmp_path / "calls.out"
    call(runtime.argv(), "create", "--bundle", str(sandbox), sid, out=out)
    runtime.ok("start", sid)
    join = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": sid}

    def joiner(name: str, hooks: dict[str, Any], args: list[str] | None = None) -> Path:
        return bundle_with(
            tmp_path, name, args or ["sh", "-c", f"touch {VOLUME}/{name}-ran"], hooks, volume, join
        )

    # prestart, createRuntime, createContainer: create fails naming the hook, and nothing of
    # the container is left (record, shim, files in the pod share); the pod still serves.
    for kind in ("prestart", "createRuntime", "createContainer"):
        bundle = joiner(kind, {kind: [_hook(kind, FAILING, "-")]})
        message = runtime.fails(
            "create",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(tmp_path / f"{kind}.pid"),
            kind,
            match=f"{kind} hook #0 (/bin/busybox) failed: exit status 3, stdout: out, "
            f"stderr: failing {kind}",
            tmp=tmp_path,
        )
        assert message.count("\n") == 0
        assert not (tmp_path / f"{kind}.pid").exists()
        assert_nothing_left(runtime, kind)
        assert not (pod_dir(runtime.root, sid) / "shared" / kind).exists()

    # A hook past its timeout is killed (with what it started) and named.
    marker = f"59.{time.monotonic_ns() % 10**6}"  # the sleep's argument: its cmdline is unique
    sleeper = joiner(
        "timeout", {"createRuntime": [_hook("t", f"sleep {marker}; true", "-", timeout=1)]}
    )
    began = time.monotonic()
    runtime.fails(
        "create",
        "--bundle",
        str(sleeper),
        "timeout",
        match="createRuntime hook #0 (/bin/busybox) ran past its timeout of 1s and was killed",
        tmp=tmp_path,
    )
    assert time.monotonic() - began < 30
    assert processes_mentioning(marker) == []
    assert_nothing_left(runtime, "timeout")

    # startContainer: start fails naming the hook, the program never ran, the container is
    # stopped (as runtime.md asks: runc 1.1 reports success and stops it).
    for name, hook, says in (
        (
            "startfail",
            _hook("startContainer", FAILING, "-"),
            "startContainer hook #0 (/bin/busybox) failed: exit status 3, stdout: out, "
            "stderr: failing startContainer",
        ),
        (
            "startslow",
            _hook("startContainer", "sleep 60", "-", timeout=1),
            "startContainer hook #0 (/bin/busybox) ran past its timeout of 1s and was killed",
        ),
    ):
        bundle = joiner(name, {"startContainer": [hook]})
        call(runtime.argv(), "create", "--bundle", str(bundle), name, out=out)
        began = time.monotonic()
        runtime.fails("start", name, match=says, tmp=tmp_path)
        assert time.monotonic() - began < 30
        assert runtime.state(name)["status"] == "stopped"
        assert not (volume / f"{name}-ran").exists()
        runtime.ok("delete", name)
        assert_nothing_left(runtime, name)

    # poststart and poststop: warnings in the --log file, the operation succeeds and the
    # remaining hooks still run.
    warned = joiner(
        "warned",
        {
            kind: [_hook(kind, FAILING, "-"), _hook(kind, SCRIPT, f"{volume}/hooks.log")]
            for kind in ("poststart", "poststop")
        },
        args=["sleep", "1000"],
    )
    call(runtime.argv(), "create", "--bundle", str(warned), "warned", out=out)
    done = runtime(*logged, "start", "warned")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert runtime.state("warned")["status"] == "running"
    done = runtime(*logged, "delete", "--force", "warned")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert_nothing_left(runtime, "warned")
    entries = [json.loads(entry) for entry in log.read_text().splitlines()]
    assert [(e["level"], e["msg"]) for e in entries] == [
        (
            "warning",
            f"{kind} hook #0 (/bin/busybox) failed: exit status 3, stdout: out, "
            f"stderr: failing {kind}",
        )
        for kind in ("poststart", "poststop")
    ]
    ran = [entry.split()[:2] for entry in (volume / "hooks.log").read_text().splitlines()]
    assert ran == [["poststart", "running"], ["poststop", "stopped"]]

    # The pod's own container: its failing poststop is a warning; the pod goes entirely.
    runtime.ok("kill", sid, "KILL")
    assert wait_until(lambda: runtime.state(sid)["status"] == "stopped", 60)
    done = runtime("delete", sid)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "pysandbox: warning: poststop hook #0 (/bin/busybox) failed: exit status 3, "
        "stdout: out, stderr: failing poststop\n"
    )
    assert_nothing_left(runtime, sid, pod_id=sid)


def test_failing_prestart_of_a_pod_owner_leaves_no_vm(runtime: Runtime, tmp_path: Path) -> None:
    bundle = bundle_with(
        tmp_path, "owner", ["true"], {"prestart": [_hook("prestart", FAILING, "-")]}
    )
    runtime.fails(
        "create",
        "--bundle",
        str(bundle),
        "owner",
        match="prestart hook #0 (/bin/busybox) failed: exit status 3",
        tmp=tmp_path,
    )
    assert_nothing_left(runtime, "owner", pod_id="owner")


def test_podman_hooks_dir_reaches_the_runtime(podman: list[str], tmp_path: Path) -> None:
    """podman puts the hooks of --hooks-dir (/usr/share/containers/oci/hooks.d by default)
    into config.json; each stage runs where and when the runtime spec says."""
    hooks_dir = tmp_path / "hooks.d"
    hooks_dir.mkdir()
    volume = tmp_path / "vol"
    volume.mkdir()
    for kind in KINDS:
        log = f"{VOLUME}/hooks.log" if kind == "startContainer" else f"{volume}/hooks.log"
        config = {
            "version": "1.0.0",
            "hook": {"path": "/bin/busybox", "args": ["sh", "-c", SCRIPT, kind, log]},
            "when": {"always": True},
            "stages": [kind],
        }
        (hooks_dir / f"{kind}.json").write_text(json.dumps(config))
    done = podman_tests.pm(
        podman,
        "--hooks-dir",
        str(hooks_dir),
        "run",
        "--rm",
        "-v",
        f"{volume}:{VOLUME}",
        podman_tests.IMAGE,
        "true",
    )
    assert done.returncode == 0, done.stderr
    seen = [entry.split()[:2] for entry in (volume / "hooks.log").read_text().splitlines()]
    assert seen == [
        ["prestart", "creating"],
        ["createRuntime", "creating"],
        ["createContainer", "creating"],
        ["startContainer", "created"],
        ["poststart", "running"],
        ["poststop", "stopped"],
    ]
