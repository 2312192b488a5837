"""Host hooks (sandbox/runtime/hooks.py): validation, and real hook processes on this host.

The VM tests (tests/integration/test_hooks.py) check the whole lifecycle against runc; these
check what the host runner does with one hook: its stdin, argv, env, cwd, failures, timeout.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from ocispec import spec
from ocispec.errors import SpecError
from sandbox.errors import AgentError, FailureReason, HookError
from sandbox.pod.lifecycle import Pod
from sandbox.runtime import hooks
from sandbox.runtime.create import create
from sandbox.runtime.delete import delete
from sandbox.runtime.record import ContainerRecord
from sandbox.runtime.start import start
from tests.processes import alive, wait_until
from tests.unit.fake_drivers import FakeDrivers

SH = "/bin/sh"


def _hook(script: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {"path": SH, "args": ["sh", "-c", script, *args], "env": [], "timeout": None, **extra}


def _parsed(raw: object) -> hooks.Hooks:
    """config.json ``hooks`` as create reads them: ocispec validates, the runtime keeps."""
    return hooks.parse_hooks(spec.parse_hooks(raw, "hooks"))


def test_parse_normalises_and_keeps_only_hook_kinds() -> None:
    raw = {
        "prestart": [{"path": "/bin/a"}],
        "poststop": [{"path": "/bin/b", "args": ["b", "1"], "env": ["X=1"], "timeout": 3}],
        "createRuntime": [],
        "notAHook": [{"path": "relative"}],
    }
    assert _parsed(raw) == {
        "prestart": [{"path": "/bin/a", "args": ["/bin/a"], "env": [], "timeout": None}],
        "poststop": [{"path": "/bin/b", "args": ["b", "1"], "env": ["X=1"], "timeout": 3}],
    }
    assert _parsed(None) == {}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([], "hooks"),
        ({"prestart": {}}, "hooks.prestart"),
        ({"prestart": ["x"]}, "hooks.prestart[0]"),
        ({"poststart": [{"path": "bin/x"}]}, "hooks.poststart[0].path"),
        ({"prestart": [{"path": "/x", "args": "x"}]}, "hooks.prestart[0].args"),
        ({"prestart": [{"path": "/x", "env": ["X"]}]}, "hooks.prestart[0].env[0]"),
        ({"prestart": [{"path": "/x", "timeout": 0}]}, "hooks.prestart[0].timeout"),
        ({"prestart": [{"path": "/x", "timeout": "5"}]}, "hooks.prestart[0].timeout"),
        ({"prestart": [{"path": "/x", "timeout": True}]}, "hooks.prestart[0].timeout"),
    ],
)
def test_parse_names_the_bad_field(raw: object, field: str) -> None:
    with pytest.raises(SpecError, match="^" + re.escape(field) + ":"):
        _parsed(raw)


def test_a_hook_gets_the_state_argv_env_and_cwd(tmp_path: Path) -> None:
    out = tmp_path / "out"
    doc = {"ociVersion": "1.0.2", "id": "c", "status": "creating", "pid": 7}
    script = 'cat > "$1.state"; echo "$0 ${FOO-unset} ${HOME-unset} $(pwd)" > "$1"'
    parsed = {
        "prestart": [
            _hook(script, "zero", str(out), env=["FOO=1"]),
            _hook(script, "inherits", f"{out}2", env=[]),
        ]
    }
    hooks.run_hooks(parsed, "prestart", doc, cwd=str(tmp_path), inherited_env=["HOME=/h"])
    state = (tmp_path / "out.state").read_text()
    assert state == '{"ociVersion":"1.0.2","id":"c","status":"creating","pid":7}'  # as runc
    assert json.loads(state) == doc
    assert out.read_text() == f"zero 1 unset {tmp_path}\n"
    assert (tmp_path / "out2").read_text() == f"inherits unset /h {tmp_path}\n"


def test_without_env_or_inherited_env_a_hook_gets_this_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FROM_RUNTIME", "yes")
    hook = _hook('echo "$FROM_RUNTIME" > "$1"', "sh", str(tmp_path / "o"), env=[])
    hooks.run_hooks({"poststart": [hook]}, "poststart", {}, cwd="/nonexistent-bundle")
    assert (tmp_path / "o").read_text() == "yes\n"


def test_the_first_failure_raises_naming_the_hook_and_stops_the_rest(tmp_path: Path) -> None:
    parsed = {
        "createRuntime": [
            _hook("true"),
            _hook("echo some output; echo it broke >&2; exit 4"),
            _hook(f"touch {tmp_path}/third"),
        ]
    }
    with pytest.raises(HookError) as info:
        hooks.run_hooks(parsed, "createRuntime", {}, cwd="/")
    assert str(info.value) == (
        "createRuntime hook #1 (/bin/sh) failed: exit status 4, stdout: some output, "
        "stderr: it broke"
    )
    assert (info.value.hook, info.value.index, info.value.path) == ("createRuntime", 1, SH)
    assert not (tmp_path / "third").exists()


def test_with_warn_every_failure_is_reported_and_the_rest_run(tmp_path: Path) -> None:
    warnings: list[str] = []
    parsed = {
        "poststop": [
            _hook("exit 1"),
            {**_hook(""), "path": "/nope"},
            _hook("touch $1", "sh", f"{tmp_path}/ran"),
        ]
    }
    hooks.run_hooks(parsed, "poststop", {}, cwd="/", warn=warnings.append)
    assert warnings == [
        "poststop hook #0 (/bin/sh) failed: exit status 1",
        "poststop hook #1 (/nope) could not be run: No such file or directory",
    ]
    assert (tmp_path / "ran").exists()


def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    parsed = {"prestart": [_hook(f"sleep 30 & echo $! > {pids}; wait", timeout=1)]}
    began = time.monotonic()
    with pytest.raises(
        HookError,
        match=r"^prestart hook #0 \(/bin/sh\) ran past its timeout "
        r"of 1s and was killed$",
    ):
        hooks.run_hooks(parsed, "prestart", {}, cwd="/")
    assert time.monotonic() - began < 5
    child = int(pids.read_text())
    assert wait_until(lambda: not alive(child), 5), f"the hook's child {child} lives on"


def test_for_guest_keeps_only_start_container_hooks_with_explicit_timeouts() -> None:
    parsed = _parsed(
        {
            "prestart": [{"path": "/host/x"}],
            "startContainer": [{"path": "/bin/a"}, {"path": "/bin/b", "timeout": 3}],
        }
    )
    guest: dict[str, Any] = {"hooks": {"prestart": [{"path": "/host/x"}]}}
    doc = {"ociVersion": "1.0.2", "id": "c", "status": "created", "bundle": "/b", "annotations": {}}
    hooks.for_guest(guest, parsed, doc)
    assert guest == {
        "hooks": {
            "startContainer": [
                {"path": "/bin/a", "args": ["/bin/a"], "env": [], "timeout": hooks.DEFAULT_TIMEOUT},
                {"path": "/bin/b", "args": ["/bin/b"], "env": [], "timeout": 3},
            ]
        },
        hooks.GUEST_STATE_KEY: {
            "ociVersion": "1.0.2",
            "id": "c",
            "bundle": "/b",
            "annotations": {},
        },
    }
    assert hooks.guest_seconds(parsed) == hooks.DEFAULT_TIMEOUT + 3
    without: dict[str, Any] = {"hooks": {"poststop": []}}
    hooks.for_guest(without, {}, doc)
    assert without == {}


# -- the verbs, against fake drivers (tests/unit/fake_drivers.py) ------------------------------

SANDBOX = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod"}
MEMBER = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod"}
#: A hook that logs "<kind> <status> <whether the pid in the state is a live process>".
LOGGER = (
    'read -r s; st=${s#*\\"status\\":\\"}; st=${st%%\\"*}; pid=${s#*\\"pid\\":}; pid=${pid%%,*}; '
    'if kill -0 "$pid" 2>/dev/null; then live=live; else live=none; fi; echo "$0 $st $live" >> "$1"'
)


def hooked_bundle(
    tmp_path: Path, name: str, hooks_: dict[str, Any], annotations: dict[str, str] | None = None
) -> Path:
    directory = tmp_path / "bundles" / name
    (directory / "rootfs").mkdir(parents=True)
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sleep", "1000"], "cwd": "/"},
        "root": {"path": "rootfs"},
        # runc spec's set: a missing one would be the node's (refused, sandbox/runtime/vm_limits)
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
        "annotations": annotations or {},
        "hooks": hooks_,
    }
    (directory / "config.json").write_text(json.dumps(spec))
    return directory


def logger(kind: str, log: Path, fail: bool = False) -> dict[str, Any]:
    return _hook(LOGGER + ("; exit 2" if fail else ""), kind, str(log))


def test_create_hooks_run_in_order_with_a_live_pid_and_a_failure_undoes_the_pod(
    fake: FakeDrivers, root: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    kinds = ("prestart", "createRuntime", "createContainer")
    ok = hooked_bundle(tmp_path, "ok", {k: [logger(k, log)] for k in kinds})
    create(root, "ok", ok)
    assert log.read_text().splitlines() == [f"{k} creating live" for k in kinds]
    assert ("shim", "spawn", "ok") in fake.events  # the pid they got is the shim's
    delete(root, "ok")

    log.unlink()
    failing = {**{k: [logger(k, log)] for k in kinds}, "createContainer": [logger("cc", log, True)]}
    with pytest.raises(
        HookError, match=r"^createContainer hook #0 \(/bin/sh\) failed: exit status 2"
    ):
        create(root, "bad", hooked_bundle(tmp_path, "bad", failing))
    assert log.read_text().splitlines() == [
        "prestart creating live",
        "createRuntime creating live",
        "cc creating live",
    ]
    assert not (root / "bad").exists()
    assert Pod.list(root) == [] and fake.alive() == [] and fake.mounts.points == set()


def test_a_failing_create_hook_of_a_member_leaves_the_pod_as_it_was(
    fake: FakeDrivers, root: Path, tmp_path: Path
) -> None:
    create(root, "sandbox", hooked_bundle(tmp_path, "sandbox", {}, SANDBOX))
    before = sorted(fake.alive())
    joined = len(fake.events)
    member = hooked_bundle(tmp_path, "member", {"prestart": [_hook("exit 1")]}, MEMBER)
    with pytest.raises(HookError, match="prestart hook #0"):
        create(root, "member", member)
    assert ("agent", "RemoveContainer") in fake.events[joined:]
    assert not (root / "member").exists()
    pod = Pod.load(root, "pod")
    assert pod.record.containers == ["sandbox"] and not (pod.shared_dir / "member").exists()
    assert sorted(fake.alive()) == before
    delete(root, "sandbox", force=True)


def test_a_failed_start_container_hook_fails_start_and_leaves_it_stopped(
    fake: FakeDrivers, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox.pod.agent_client import ContainerClient

    log = tmp_path / "log"
    bundle = hooked_bundle(
        tmp_path,
        "c1",
        {"startContainer": [{"path": "/bin/h", "timeout": 5}], "poststart": [logger("ps", log)]},
    )
    create(root, "c1", bundle)
    asked: list[float] = []

    def failing_start(self: ContainerClient, container_id: str, extra_seconds: float) -> None:
        asked.append(extra_seconds)
        fake.shims[container_id].kill()  # the guest process exits after the failed hook
        raise AgentError(
            "agent StartContainer failed: x",
            reason=FailureReason.HOOK_FAILED,
            detail="startContainer hook #0 (/bin/h) failed: exit status 1",
        )

    monkeypatch.setattr(ContainerClient, "start_container", failing_start)
    with pytest.raises(HookError) as info:
        start(root, "c1")
    assert str(info.value) == "startContainer hook #0 (/bin/h) failed: exit status 1"
    assert asked == [5.0]  # the StartContainer deadline covers the hooks' timeouts
    assert ContainerRecord.load(root, "c1").oci_state()["status"] == "stopped"
    assert not log.exists()  # no poststart for a container that did not start
    delete(root, "c1")
    assert fake.alive() == []


def test_poststart_and_poststop_failures_are_warnings(
    fake: FakeDrivers, root: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    hooks_ = {
        kind: [logger(kind, log, fail=True), logger(kind, log)]
        for kind in ("poststart", "poststop")
    }
    create(root, "c1", hooked_bundle(tmp_path, "c1", hooks_))
    warnings: list[str] = []
    start(root, "c1", warn=warnings.append)
    assert ContainerRecord.load(root, "c1").oci_state()["status"] == "running"
    delete(root, "c1", force=True, warn=warnings.append)
    assert warnings == [
        f"{kind} hook #0 (/bin/sh) failed: exit status 2" for kind in ("poststart", "poststop")
    ]
    # Both hooks of each kind ran; the shim (pid) is alive at poststart, poststop has none.
    assert log.read_text().splitlines() == [
        "poststart running live",
        "poststart running live",
        "poststop stopped none",
        "poststop stopped none",
    ]
    assert not (root / "c1").exists() and fake.alive() == []
