"""pysandbox boot and memory benchmark: a pod VM against the floor.

Run from the repository root with the project venv (``make bench`` does)::

    .venv/bin/python bench/run.py [--runs N] [--root DIR] [--out DIR]

Boot (interleaved floor, pod, floor, pod, ... so that host noise hits both alike):

* floor: the same QEMU binary, kernel, machine options and kernel command line as a pod
  (``hypervisor.qemu_args.build_argv`` of a ``VMConfig`` without disk, agent port or share),
  booting ``floor-initramfs.cpio`` whose busybox ``/init`` prints ``PYSANDBOX-FLOOR-READY``
  on the serial console. Time: QEMU spawn -> marker in the console log.
* pod: ``sandbox.pod.lifecycle.Pod.boot`` (virtiofsd, QEMU paused, agent proxy, cont, agent Health,
  MountShare). Times: the whole ``Pod.boot`` call (wall), QEMU spawn -> Health answered,
  QMP ``cont`` -> Health answered, and spawn -> the agent's ``ready`` line on the console.
  The intermediate points come from wrapping ``QemuVM.start``, ``QemuVM.resume`` and
  ``AgentClient.wait_healthy`` in this process (measurement only, behaviour unchanged).

Kernel command line: ``--cmdline pod`` (default) boots floor and pod with
``sandbox.pod.lifecycle.kernel_cmdline()``, what pods use today; ``--cmdline manifest`` boots both
with the image's ``manifest.json`` ``kernel.cmdline`` (the command line the image is tuned for),
substituting it for ``sandbox.pod.lifecycle.kernel_cmdline`` in this process only.

Memory: PSS (``/proc/PID/smaps_rollup``, summed over each process tree) of QEMU, virtiofsd
and the host agent proxy of one idle pod, ``--settle`` seconds after it booted.

Pods: ``--boot restored`` (default) restores each pod from the template VM
(sandbox/pod/template.py; built before timing starts), ``--boot cold`` boots each from scratch.

Prints a table and writes ``<out>/<YYYY-MM-DD>-boot-<restored|cold>.json``. Every VM is
time-boxed and torn down in ``finally``; the private ``--root`` is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hypervisor import accel as accel_mod  # noqa: E402
from hypervisor.guest_image import GuestImage, find_image, floor_initrd  # noqa: E402
from hypervisor.process import ProcessHandle, start_time  # noqa: E402
from hypervisor.qemu import QemuVM, find_qemu  # noqa: E402
from hypervisor.qemu_args import VMConfig, build_argv  # noqa: E402
from sandbox.pod import hostfs, template  # noqa: E402
from sandbox.pod import lifecycle as pod_module  # noqa: E402
from sandbox.pod.agent_client import AgentClient  # noqa: E402
from sandbox.pod.lifecycle import (  # noqa: E402
    DEFAULT_MEMORY_MIB,
    Pod,
    kernel_cmdline,
)

FLOOR_MARKER = b"PYSANDBOX-FLOOR-READY"
AGENT_MARKER = b"pysandbox-agent: ready"
POLL = 0.002


# -- helpers ---------------------------------------------------------------------------------


def _now() -> float:
    return time.monotonic()


class ConsoleWatch:
    """Polls a console log file in a thread; records when ``marker`` first appears."""

    def __init__(self, path: Path, marker: bytes) -> None:
        self.path = path
        self.marker = marker
        self.seen_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ConsoleWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        offset = 0
        tail = b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except OSError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                data = tail + chunk
                if self.marker in data:
                    self.seen_at = _now()
                    return
                tail = data[-len(self.marker) :]
            time.sleep(POLL)

    def wait(self, deadline: float) -> float | None:
        while self.seen_at is None and _now() < deadline and self._thread.is_alive():
            time.sleep(POLL)
        return self.seen_at

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found += [int(p) for p in text.split()]
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += _children(current)
    return tree


def pss_kib(pid: int) -> int:
    """PSS of one process in KiB (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def tree_pss_kib(pid: int) -> tuple[int, list[int]]:
    pids = process_tree(pid)
    return sum(pss_kib(p) for p in pids), pids


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def qemu_version(binary: Path) -> str:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


# -- floor -----------------------------------------------------------------------------------


def floor_config(
    image: GuestImage, workdir: Path, accel: Any, memory_mib: int, cmdline: str
) -> VMConfig:
    """A pod's machine (same kernel, cmdline, accel, CPU, memory) minus disk/agent/share."""
    return VMConfig(
        name="pysandbox-bench-floor",
        kernel=image.kernel,
        initrd=floor_initrd(image),
        cmdline=cmdline,
        memory_mib=memory_mib,
        accel=accel,
        qmp_socket=workdir / "floor-qmp.sock",
        console_log=workdir / "floor-console.log",
    )


@contextlib.contextmanager
def floor_vm(
    config: VMConfig, qemu: Path, timeout: float, marker: bytes = FLOOR_MARKER
) -> Iterator[tuple[subprocess.Popen[bytes], float, float]]:
    """Spawn a floor VM (running, not paused; it inherits ``config.pass_fds()``, e.g. taps);
    yield ``(process, spawn time, time marker seen)`` (``time.monotonic``) once ``marker`` is
    on its console. The VM is killed on leaving if it still runs. RuntimeError if the marker
    does not show within ``timeout`` seconds."""
    argv = build_argv(config, qemu, paused=False)
    config.console_log.write_bytes(b"")
    watch = ConsoleWatch(config.console_log, marker)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(config.stderr_log, "wb") as log:
            t0 = _now()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",
                pass_fds=config.pass_fds(),
            )
        watch.start()
        seen = watch.wait(t0 + timeout)
        if seen is None:
            raise RuntimeError(
                f"floor marker not seen within {timeout:g}s (console {config.console_log})"
            )
        yield proc, t0, seen
    finally:
        watch.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for sock in config.sockets():
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()


def run_floor(config: VMConfig, qemu: Path, timeout: float) -> dict[str, float]:
    """Boot the floor VM; seconds from spawn to the marker and to QEMU's exit."""
    with floor_vm(config, qemu, timeout) as (proc, t0, seen):
        try:
            proc.wait(max(0.1, t0 + timeout - _now()))
            exited = _now()
        except subprocess.TimeoutExpired:
            exited = float("nan")
        return {"ready": seen - t0, "exit": exited - t0}


# -- pod -------------------------------------------------------------------------------------


@dataclass
class Marks:
    """Time points of one pod boot, recorded by the wrappers below."""

    spawn: float | None = None
    qmp_ready: float | None = None
    cont: float | None = None
    healthy: float | None = None
    guest_uptime: float | None = None
    console: Path | None = None
    watch: ConsoleWatch | None = None
    extra: dict[str, float] = field(default_factory=dict)


_MARKS: Marks | None = None


def _wrap(
    cls: type,
    name: str,
    before: Callable[[Marks, Any], None] | None,
    after: Callable[[Marks, Any, Any], None] | None,
) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks = _MARKS
        if marks is not None and before is not None:
            before(marks, self)
        result = original(self, *args, **kwargs)
        if marks is not None and after is not None:
            after(marks, self, result)
        return result

    setattr(cls, name, wrapper)


def _on_spawn(marks: Marks, vm: Any) -> None:
    marks.spawn = _now()
    log: Path = vm.config.console_log
    marks.console = log
    marks.watch = ConsoleWatch(log, AGENT_MARKER).start()


def _on_qmp(marks: Marks, vm: Any, result: Any) -> None:
    marks.qmp_ready = _now()


def _on_cont(marks: Marks, vm: Any, result: Any) -> None:
    marks.cont = _now()


def _on_healthy(marks: Marks, client: Any, result: Any) -> None:
    marks.healthy = _now()
    marks.guest_uptime = float(result)


def install_probes() -> None:
    _wrap(QemuVM, "start", _on_spawn, _on_qmp)
    _wrap(QemuVM, "resume", None, _on_cont)
    _wrap(AgentClient, "wait_healthy", None, _on_healthy)


@contextlib.contextmanager
def booted_pod(root: Path, pod_id: str, memory_mib: int, timeout: float) -> Iterator[Pod]:
    pod: Pod | None = None
    try:
        pod = Pod.boot(root, pod_id, memory_mib=memory_mib, timeout=timeout)
        yield pod
    finally:
        if pod is not None:
            try:
                pod.stop(timeout=10.0)
            except Exception:
                pod.destroy()
        else:
            with contextlib.suppress(Exception):
                Pod.load(root, pod_id).destroy()


def run_pod(
    root: Path, pod_id: str, memory_mib: int, timeout: float, settle: float | None = None
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Boot one pod; the boot times, and (with ``settle``) its memory after settling."""
    global _MARKS
    marks = Marks()
    _MARKS = marks
    memory: dict[str, Any] | None = None
    try:
        t0 = _now()
        with booted_pod(root, pod_id, memory_mib, timeout) as pod:
            t_end = _now()
            _MARKS = None
            if marks.watch is not None:
                marks.watch.wait(_now() + 1.0)
            if settle is not None:
                time.sleep(settle)
                memory = measure_memory(pod)
    finally:
        _MARKS = None
        if marks.watch is not None:
            marks.watch.stop()
    if marks.spawn is None or marks.cont is None or marks.healthy is None:
        raise RuntimeError("boot probes did not fire (did Pod.boot change?)")
    times = {
        "boot_wall": t_end - t0,
        "pre_spawn": marks.spawn - t0,
        "spawn_to_health": marks.healthy - marks.spawn,
        "spawn_to_qmp": (marks.qmp_ready or marks.spawn) - marks.spawn,
        "spawn_to_cont": marks.cont - marks.spawn,
        "cont_to_health": marks.healthy - marks.cont,
        "health_to_end": t_end - marks.healthy,
    }
    if marks.watch is not None and marks.watch.seen_at is not None:
        times["spawn_to_agent_ready"] = marks.watch.seen_at - marks.spawn
        times["agent_ready_to_health"] = marks.healthy - marks.watch.seen_at
    if marks.guest_uptime is not None:
        times["guest_uptime_at_health"] = marks.guest_uptime
    return times, memory


def measure_memory(pod: Pod) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in ("qemu", "virtiofsd", "proxy"):
        handle: ProcessHandle | None = pod.process(name)
        if handle is None or start_time(handle.pid) != handle.start:
            result[name] = {"pss_kib": None, "pids": []}
            continue
        total, pids = tree_pss_kib(handle.pid)
        result[name] = {"pss_kib": total, "pids": pids}
    return result


# -- main ------------------------------------------------------------------------------------


def _fmt(stats: dict[str, float]) -> str:
    return f"{stats['median']:7.3f} {stats['min']:7.3f} {stats['max']:7.3f}"


def _mib(kib: int | None) -> str:
    return "   n/a" if kib is None else f"{kib / 1024:6.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="boots of each kind (default 5)")
    parser.add_argument("--root", type=Path, help="pysandbox --root (default: a new /tmp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default=None, help="JSON file name (default <date>-boot.json)")
    parser.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB)
    parser.add_argument("--timeout", type=float, default=60.0, help="per boot, seconds")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before PSS")
    parser.add_argument("--no-memory", action="store_true", help="skip the PSS measurement")
    parser.add_argument("--no-json", action="store_true", help="only print the table")
    parser.add_argument(
        "--boot",
        choices=("restored", "cold"),
        default="restored",
        help="pods restored from a template VM (default; built before timing) or cold booted",
    )
    parser.add_argument(
        "--cmdline",
        choices=("pod", "manifest"),
        default="pod",
        help="kernel command line of floor and pod: the pod's (default) or the image's",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    image = find_image()
    qemu = find_qemu()
    accel = accel_mod.detect().chosen
    install_probes()
    cmdline = kernel_cmdline(accel)
    if args.cmdline == "manifest":
        cmdline = str(image.manifest.get("kernel", {}).get("cmdline") or cmdline)
        pod_module.kernel_cmdline = lambda accel="tcg", cpus=1: cmdline
    os.environ["PYSANDBOX_TEMPLATES"] = "1" if args.boot == "restored" else "0"
    if args.boot == "restored":  # build (or find) the template before anything is timed
        template.ensure(image, accel, args.memory_mib, cmdline, args.timeout)
    root = args.root or Path(tempfile.mkdtemp(prefix="psb-bench-", dir="/tmp"))
    own_root = args.root is None
    workdir = Path(tempfile.mkdtemp(prefix="psb-floor-", dir="/tmp"))
    floor_cfg = floor_config(image, workdir, accel, args.memory_mib, cmdline)
    floor: list[dict[str, float]] = []
    pods: list[dict[str, float]] = []
    memory: dict[str, Any] | None = None
    started = time.time()
    try:
        for i in range(args.runs):
            floor.append(run_floor(floor_cfg, qemu, args.timeout))
            print(f"run {i + 1}/{args.runs}: floor {floor[-1]['ready']:.3f}s", end="", flush=True)
            last = i == args.runs - 1 and not args.no_memory
            times, mem = run_pod(
                root,
                f"bench-{os.getpid()}-{i}",
                args.memory_mib,
                args.timeout,
                settle=args.settle if last else None,
            )
            pods.append(times)
            memory = mem or memory
            print(
                f", pod {times['boot_wall']:.3f}s (spawn->health {times['spawn_to_health']:.3f}s)",
                flush=True,
            )
    finally:
        for pod in Pod.list(root):
            with contextlib.suppress(Exception):
                pod.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        if own_root and not hostfs.mounts_below(root):
            shutil.rmtree(root, ignore_errors=True)

    floor_ready = summary([f["ready"] for f in floor])
    keys = [k for k in pods[0] if all(k in p for p in pods)]
    pod_stats = {k: summary([p[k] for p in pods]) for k in keys}
    ratio_wall = pod_stats["boot_wall"]["median"] / floor_ready["median"]
    ratio_spawn = pod_stats["spawn_to_health"]["median"] / floor_ready["median"]

    print()
    print(
        f"pods: {args.boot}; kernel command line: {args.cmdline} ({accel}, {args.memory_mib} MiB)"
    )
    print(
        f"{'boot (seconds, ' + str(args.runs) + ' runs each)':<44} {'median':>7} "
        f"{'min':>7} {'max':>7}"
    )
    print(f"{'floor: spawn -> PYSANDBOX-FLOOR-READY':<44} {_fmt(floor_ready)}")
    labels = {
        "boot_wall": "pod: Pod.boot() wall",
        "spawn_to_health": "pod: QEMU spawn -> agent Health",
        "spawn_to_agent_ready": "pod:   spawn -> agent 'ready' on console",
        "spawn_to_cont": "pod:   spawn -> QMP cont (incl. proxy start)",
        "cont_to_health": "pod:   QMP cont -> agent Health",
        "agent_ready_to_health": "pod:   agent 'ready' -> Health answered",
        "pre_spawn": "pod:   Pod.boot() -> QEMU spawn",
        "health_to_end": "pod:   Health -> Pod.boot() returns",
        "guest_uptime_at_health": "pod:   guest /proc/uptime at Health",
    }
    for key, label in labels.items():
        if key in pod_stats:
            print(f"{label:<44} {_fmt(pod_stats[key])}")
    print(f"{'ratio of medians, Pod.boot wall / floor':<44} {ratio_wall:7.2f}x")
    print(f"{'ratio of medians, spawn->Health / floor':<44} {ratio_spawn:7.2f}x")
    if memory is not None:
        print()
        print(f"memory of one idle pod, {args.settle:g}s after boot (PSS, MiB)")
        vmm = sum((memory[n]["pss_kib"] or 0) for n in ("qemu", "virtiofsd"))
        print(f"  qemu                 {_mib(memory['qemu']['pss_kib'])}")
        print(f"  virtiofsd (tree)     {_mib(memory['virtiofsd']['pss_kib'])}")
        print(f"  qemu + virtiofsd     {_mib(vmm)}")
        print(f"  host agent proxy     {_mib(memory['proxy']['pss_kib'])}")

    result: dict[str, Any] = {
        "date": datetime.datetime.fromtimestamp(started, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "qemu": qemu_version(qemu),
        "accel": accel,
        "memory_mib": args.memory_mib,
        "image": {
            "dir": str(image.dir),
            "inputs_hash": image.manifest.get("inputs_hash"),
            "kernel": image.manifest.get("kernel", {}).get("release"),
            "sizes": image.manifest.get("sizes"),
        },
        "boot": args.boot,
        "cmdline_source": args.cmdline,
        "kernel_cmdline": cmdline,
        "floor_argv": build_argv(floor_cfg, qemu, paused=False)[1:],
        "runs": args.runs,
        "boot_seconds": {
            "floor_ready": floor_ready,
            **{f"pod_{k}": v for k, v in pod_stats.items()},
            "ratio_pod_wall_to_floor": round(ratio_wall, 2),
            "ratio_pod_spawn_to_health_to_floor": round(ratio_spawn, 2),
        },
        "raw": {
            "floor": [{k: round(v, 3) for k, v in f.items()} for f in floor],
            "pod": [{k: round(v, 3) for k, v in p.items()} for p in pods],
        },
    }
    if memory is not None:
        result["memory_pss_kib"] = {
            "settle_seconds": args.settle,
            "qemu": memory["qemu"]["pss_kib"],
            "virtiofsd": memory["virtiofsd"]["pss_kib"],
            "qemu_plus_virtiofsd": sum((memory[n]["pss_kib"] or 0) for n in ("qemu", "virtiofsd")),
            "proxy": memory["proxy"]["pss_kib"],
        }
    if not args.no_json:
        args.out.mkdir(parents=True, exist_ok=True)
        day = time.strftime("%Y-%m-%d", time.gmtime(started))
        name = args.name or f"{day}-boot-{args.boot}.json"
        path = args.out / name
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
