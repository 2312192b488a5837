"""Per-stage timing of one ``pysandbox`` command, from process spawn to exit.

Used by bench/cli.py (``--stages``); also runnable by hand, as root from the repository root::

    PYSANDBOX_BENCH_T0=$(python3 -c 'import time; print(time.monotonic())') \\
        .venv/bin/python bench/stages.py OUT.json run ROOTFS true

It runs the CLI in this process (``sandbox.cli.main.main``) with timing wrappers around the
functions of the run path (:data:`PROBES`); behaviour is unchanged. ``OUT.json`` gets
``{"t0": spawn, "main": ..., "calls": [[name, start, end], ...], "end": ...}``, all
CLOCK_MONOTONIC seconds (shared by every process of the host, so the parent's spawn time
``PYSANDBOX_BENCH_T0`` and the parent's exit time compare with them). :func:`breakdown`
turns that into consecutive stages.
"""

from __future__ import annotations

import time

_MAIN = time.monotonic()  # before any import of ours: interpreter start-up ends here

import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: (module, attribute path, stage name). Module-level functions are patched in the module
#: that *calls* them (``from x import f`` binds a name there); methods on their class.
PROBES: tuple[tuple[str, str, str], ...] = (
    ("sandbox.run.foreground", "run", "run"),
    ("sandbox.run.foreground", "_resolve_image", "resolve image"),
    ("sandbox.run.foreground", "build_spec", "build spec"),
    ("sandbox.run.foreground", "boot_watched", "boot pod"),
    ("sandbox.run.launch", "claim_watched", "boot: warm pool claim"),
    ("sandbox.run.launch", "watch_owner", "boot: owner watcher start"),
    ("sandbox.pod.template", "ensure", "boot: find template"),
    ("sandbox.pod.template", "acquire", "boot: template acquire"),
    ("sandbox.pod.lifecycle", "Pod._make_host_cgroup", "boot: host cgroup"),
    ("sandbox.pod.lifecycle", "hostfs.make_shared_mountpoint", "boot: shared mount"),
    ("hypervisor.virtiofsd", "Virtiofsd.start", "boot: virtiofsd start"),
    ("hypervisor.qemu", "QemuVM.start", "boot: QEMU spawn"),
    ("sandbox.pod.drivers", "HostDrivers.start_proxy", "boot: proxy start"),
    ("sandbox.pod.drivers", "HostDrivers.begin_proxy", "boot: proxy spawn"),
    ("sandbox.pod.agent_proxy", "Starting.wait", "boot: proxy ready"),
    ("hypervisor.qemu", "QemuVM.wait_incoming", "boot: state loaded"),
    ("hypervisor.qemu", "QemuVM.release_zero_pages", "boot: zero pages released"),
    ("hypervisor.qemu", "QemuVM.hotplug_share", "boot: share hot-plug"),
    ("hypervisor.qemu", "QemuVM.resume", "boot: cont"),
    ("sandbox.pod.agent_client", "AgentClient.wait_healthy", "boot: agent healthy"),
    ("sandbox.pod.agent_client", "AgentClient.restored", "boot: Restored"),
    ("sandbox.pod.agent_client", "AgentClient.mount_share", "boot: MountShare"),
    ("sandbox.pod.lifecycle", "Pod.client", "agent client"),
    ("sandbox.run.launch", "share_container_files", "share container files"),
    ("sandbox.run.launch", "etc_files.write", "container /etc files"),
    ("sandbox.pod.agent_client", "ContainerClient.create_container", "CreateContainer"),
    (
        "sandbox.pod.agent_client",
        "ContainerClient.create_and_start",
        "CreateContainer+start+EOF",
    ),
    ("sandbox.pod.stdio", "StdioRelay.start", "stdio relay start"),
    ("sandbox.pod.agent_client", "ContainerClient.start_container", "StartContainer"),
    ("sandbox.pod.agent_client", "ContainerClient.close_stdin", "CloseStdin"),
    ("sandbox.pod.agent_client", "ContainerClient.wait_process", "WaitProcess"),
    ("sandbox.pod.stdio", "StdioRelay.join", "stdio drained"),
    ("sandbox.pod.agent_client", "ContainerClient.remove_container", "RemoveContainer"),
    ("sandbox.run.foreground", "unshare_container_files", "unshare files"),
    ("sandbox.run.foreground", "_teardown_in_background", "teardown hand-off"),
    ("sandbox.pod.lifecycle", "Pod.begin_stop", "teardown: Shutdown"),
    ("sandbox.pod.lifecycle", "Pod.mark_stopping", "teardown: marked stopping"),
    ("sandbox.pod.lifecycle", "Pod.stop", "teardown"),
    ("sandbox.pod.lifecycle", "Pod.destroy", "teardown: destroy"),
    ("sandbox.pod.agent_client", "ContainerClient.exec_process", "ExecProcess"),
)

CALLS: list[tuple[str, float, float]] = []
#: The status the CLI ended with through ``sandbox.cli.main._exit_now`` (None: sys.exit).
FAST_EXIT: list[int] = []


def _wrap(name: str, original: Any) -> Any:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            CALLS.append((name, start, time.monotonic()))

    return wrapper


def _record_fast_exit(code: int) -> None:
    """In place of ``_exit_now``: the record is written first, then the exit is as fast."""
    FAST_EXIT.append(code)
    raise SystemExit(code)


def install() -> None:
    from sandbox.cli import main as cli_main

    if hasattr(cli_main, "_exit_now"):
        cli_main._exit_now = _record_fast_exit
    for module_name, path, name in PROBES:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, attr = path.split(".")
        for part in parents:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, attr):
            continue
        original = owner.__dict__.get(attr, getattr(owner, attr))
        if isinstance(original, classmethod | staticmethod):
            continue
        setattr(owner, attr, _wrap(name, original))


def breakdown(record: dict[str, Any], exited: float) -> list[tuple[str, float]]:
    """Consecutive stages (name, seconds) from spawn to ``exited``: the top-level calls in
    order, the gaps between them named after what precedes them; nested calls (``boot: …``)
    are listed after their parent, not counted twice."""
    t0 = record["t0"]
    stages = [("interpreter start-up", record["main"] - t0)]
    top = [c for c in record["calls"] if not c[0].startswith(("boot: ", "teardown: "))]
    top = [c for c in top if c[0] != "run"]
    runs = [c for c in record["calls"] if c[0] == "run"]
    cursor = runs[0][1] if runs else record["main"]
    stages.append(("CLI imports + argument parsing", cursor - record["main"]))
    for name, start, end in sorted(top, key=lambda c: c[1]):
        if start < cursor - 1e-6:
            continue  # nested in a previous top-level call
        if start - cursor > 0.002:
            stages.append(("(between)", start - cursor))
        stages.append((name, end - start))
        if name in ("boot pod", "teardown", "teardown hand-off"):
            prefix = "boot: " if name == "boot pod" else "teardown: "
            for sub, s, e in sorted(record["calls"], key=lambda c: c[1]):
                if sub.startswith(prefix) and start <= s <= end:
                    stages.append(("  " + sub, e - s))
        cursor = end
    stages.append(("exit (after the last stage)", exited - cursor))
    return stages


def main() -> None:
    out = Path(sys.argv[1])
    t0 = float(os.environ.get("PYSANDBOX_BENCH_T0", _MAIN))
    install()
    from sandbox.cli.main import main as cli_main

    status = 0
    try:
        sys.argv = [sys.argv[0], *sys.argv[2:]]
        cli_main()  # as the command runs: its own exit path (sandbox.cli.main._exit_now)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    finally:
        out.write_text(
            json.dumps({"t0": t0, "main": _MAIN, "calls": CALLS, "end": time.monotonic()})
        )
    if FAST_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    main()
