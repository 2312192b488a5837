"""Host footprint of idle detached runs: memory per process, and density.

``footprint`` mode (default): ``--runs`` times, start ``pysandbox run -d NAME IMAGE sleep 300``,
wait ``--settle`` seconds, read ``Pss:`` of every host process that belongs to the run from
``/proc/PID/smaps_rollup`` (QEMU, virtiofsd, the agent proxy, the shim and its watcher —
a ``/bin/sh`` named ``sandbox.runtime.shim_watch``, or the monitor it became —, the detached
monitor if any), remove the run. The processes are found from the pod and container records (pids in
``<root>/p/*/pod.json`` and ``<root>/<name>/state.json``), their descendants, and any
``sandbox.run.detached`` monitor naming the run. Prints the median per role and of the total
(MiB), the same for the process's own pages only (``own:ROLE``: ``Pss_Anon`` +
``Pss_Shmem``, i.e. without the shared file pages of binaries and libraries), QEMU's by
mapping (``qemu:ram``, ``qemu:erofs``..., :func:`qemu_maps_kib`), and ``exec
true`` latency.

``density`` mode (``--density N``): start up to N runs one after another (stops at the first
that fails to start), then time ``pysandbox exec NAME true`` in every one of them and report
how many answered within ``--exec-limit`` seconds, total PSS, and the host's MemAvailable
before and after. Every run this script started is removed in a ``finally``.

Run as root from the repository root; use a private ``--root`` (default
``/run/pysandbox-footprint``) so other users of the host are not counted or disturbed.
Results go to stdout as a table and, with ``--json FILE``, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PYSANDBOX = [str(Path(sys.executable).with_name("pysandbox"))]
#: Environment changes of the variant being measured (``--baseline``'s image and templates).
ENV: dict[str, str] = {}


def pss_kib(pid: int) -> int:
    """``Pss:`` of ``pid`` in KiB (0 if it is gone)."""
    return pss_parts_kib(pid).get("Pss", 0)


#: The parts of ``Pss:`` that ``smaps_rollup`` splits out (Linux >= 5.13).
PSS_PARTS = ("Pss_Anon", "Pss_File", "Pss_Shmem")


def pss_parts_kib(pid: int) -> dict[str, int]:
    """``Pss`` and its :data:`PSS_PARTS` of ``pid`` in KiB (empty if it is gone).

    Anon and shmem pages (heaps, QEMU's guest RAM memfd) are the process's own; file pages
    (binaries, libpython, cygrpc) are shared by every process that maps the same file, so
    their share falls as more runs (or other users of the same files) are added."""
    parts: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key == "Pss" or key in PSS_PARTS:
                parts[key] = int(line.split()[1])
    except OSError:
        pass
    return parts


def qemu_maps_kib(pid: int) -> dict[str, int]:
    """QEMU's ``Pss`` in KiB by mapping: ``ram`` (the guest's RAM: a memfd), ``erofs`` (the
    guest image's root, mapped by DAX: every page the guest touches of it), ``bin`` (the
    qemu binary), ``heap``, ``anon`` (other anonymous mappings: the TCG buffer, threads'
    stacks), ``lib`` (shared libraries), ``other``."""
    parts: dict[str, int] = {}
    kind = "other"
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return parts
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            name = " ".join(fields[5:])
            if name.startswith("/memfd:"):
                kind = "ram"
            elif name.endswith("root.erofs"):
                kind = "erofs"
            elif "qemu-system" in name:
                kind = "bin"
            elif name == "[heap]":
                kind = "heap"
            elif not name or name.startswith("[stack"):
                kind = "anon"
            elif ".so" in name:
                kind = "lib"
            else:
                kind = "other"
        elif fields and fields[0] == "Pss:":
            parts[kind] = parts.get(kind, 0) + int(fields[1])
    return parts


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def role(pid: int, parent_role: str | None) -> str:
    """A short name for what ``pid`` is, from its argv."""
    argv = _cmdline(pid)
    text = " ".join(argv)
    if "qemu-system" in text:
        return "qemu"
    if "virtiofsd" in text:
        return "virtiofsd"
    if "sandbox.pod.agent_proxy" in text:
        return "proxy"
    if "sandbox.run.detached" in text:
        return "monitor"
    if "sandbox.runtime.shim_watch" in text or "sandbox.run.monitor" in text:
        return "shim-watcher"  # the /bin/sh watcher (or the monitor it became)
    if "sandbox.runtime.shim" in text:
        return "shim-watcher" if parent_role == "shim" else "shim"
    return f"other:{os.path.basename(argv[0]) if argv else pid}"


def run_processes(root: Path, name: str) -> dict[int, str]:
    """Every host process of detached run ``name`` -> its role."""
    roots: list[int] = []
    state = json.loads((root / name / "state.json").read_text())
    if isinstance(state.get("shim"), dict):
        roots.append(int(state["shim"]["pid"]))
    for pod_json in (root / "p").glob("*/pod.json"):
        pod = json.loads(pod_json.read_text())
        if pod.get("id") == name:
            roots += [int(p["pid"]) for p in pod.get("processes", {}).values()]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _cmdline(int(entry.name))
            if "sandbox.run.detached" in argv and name in argv and str(root) in argv:
                roots.append(int(entry.name))
            # A detached run's watcher (not the shim's child): its $0 names shim_watch.
            watcher = "sandbox.runtime.shim_watch" in argv or "sandbox.run.monitor" in argv
            if watcher and name in argv and str(root) in argv:
                roots.append(int(entry.name))
    tree = _children()
    found: dict[int, str] = {}

    def walk(pid: int, parent: str | None) -> None:
        if pid in found or not Path(f"/proc/{pid}").exists():
            return
        found[pid] = role(pid, parent)
        for child in tree.get(pid, []):
            walk(child, found[pid])

    for pid in roots:
        walk(pid, None)
    return found


def cli(root: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYSANDBOX, "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ENV},
    )


def start_run(root: Path, name: str, image: str) -> float:
    """Start an idle detached run; seconds it took. RuntimeError if it failed."""
    began = time.monotonic()
    done = cli(root, "run", "-d", "--name", name, image, "sleep", "3000")
    if done.returncode != 0:
        raise RuntimeError(f"run -d {name} failed: {done.stderr.strip()}")
    return time.monotonic() - began


def exec_seconds(root: Path, name: str, limit: float) -> tuple[float | None, str]:
    """(seconds ``exec NAME true`` took, "" or why it failed); gives up after 20 times limit."""
    began = time.monotonic()
    try:
        done = cli(root, "exec", name, "true", timeout=limit * 20)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {limit * 20:.0f} s"
    if done.returncode != 0:
        return None, done.stderr.strip()[-200:]
    return time.monotonic() - began, ""


def remove(root: Path, name: str) -> None:
    cli(root, "rm", "-f", name)


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_sample(args: argparse.Namespace, name: str) -> dict[str, float]:
    """Start run ``name``, let it settle, measure its processes and one exec; remove it."""
    try:
        started = start_run(args.root, name, args.image)
        time.sleep(args.settle)
        sample: dict[str, float] = {"start_s": started}
        for pid, what in run_processes(args.root, name).items():
            parts = pss_parts_kib(pid)
            sample[what] = sample.get(what, 0.0) + parts.get("Pss", 0) / 1024
            sample[f"n:{what}"] = sample.get(f"n:{what}", 0) + 1
            if what == "qemu":
                for kind, kib in qemu_maps_kib(pid).items():
                    sample[f"qemu:{kind}"] = sample.get(f"qemu:{kind}", 0.0) + kib / 1024
            own = (parts.get("Pss_Anon", 0) + parts.get("Pss_Shmem", 0)) / 1024
            sample[f"own:{what}"] = sample.get(f"own:{what}", 0.0) + own
            sample["own:total"] = sample.get("own:total", 0.0) + own
        sample["total"] = sum(v for k, v in sample.items() if ":" not in k and k != "start_s")
        sample["processes"] = float(sum(v for k, v in sample.items() if k.startswith("n:")))
        seconds, _why = exec_seconds(args.root, name, args.exec_limit)
        sample["exec_true_s"] = -1.0 if seconds is None else seconds
        print(json.dumps({k: round(v, 2) for k, v in sample.items()}), flush=True)
        return sample
    finally:
        remove(args.root, name)


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    """Median of every key over ``samples`` (a key missing from a sample counts as 0)."""
    keys = sorted({k for s in samples for k in s})
    return {k: round(statistics.median(s.get(k, 0.0) for s in samples), 2) for k in keys}


def footprint(args: argparse.Namespace) -> dict[str, Any]:
    samples = [one_sample(args, f"fp-{os.getpid()}-{index}") for index in range(args.runs)]
    return {"mode": "footprint", "runs": samples, "median": medians(samples)}


def footprint_ab(args: argparse.Namespace) -> dict[str, Any]:
    """``--baseline PYTHON[,GUEST_IMAGE,TEMPLATE_DIR]``: each round one run with that
    interpreter's ``pysandbox`` (another checkout's venv; with that guest image and template
    directory when given, else the environment's), then one with this one, so that host
    noise hits both alike."""
    python, *dirs = args.baseline.split(",")
    kinds = {"baseline": Path(python), "this": Path(sys.executable)}
    envs: dict[str, dict[str, str]] = {"baseline": {}, "this": {}}
    if dirs:
        image, templates = (*dirs, "")[:2]
        envs["baseline"]["PYSANDBOX_GUEST_IMAGE"] = image
        if templates:
            envs["baseline"]["PYSANDBOX_TEMPLATE_DIR"] = templates
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    loads = []
    for index in range(args.runs):
        loads.append(Path("/proc/loadavg").read_text().split()[0])
        for kind, python in kinds.items():
            PYSANDBOX[:] = [str(python.with_name("pysandbox"))]
            ENV.clear()
            ENV.update(envs[kind])
            print(f"round {index + 1} {kind}", flush=True)
            samples[kind].append(one_sample(args, f"fp-{os.getpid()}-{kind[0]}{index}"))
    result: dict[str, Any] = {"mode": "footprint-ab", "loadavg_1m": loads}
    for kind, python in kinds.items():
        result[kind] = {"python": str(python), "env": envs[kind], "runs": samples[kind]}
        result[kind]["median"] = medians(samples[kind])
    result["median"] = {kind: result[kind]["median"] for kind in kinds}
    return result


def density(args: argparse.Namespace) -> dict[str, Any]:
    names: list[str] = []
    before = mem_available_mib()
    starts: list[float] = []
    result: dict[str, Any] = {"mode": "density", "target": args.density, "mem_before": before}
    try:
        for index in range(args.density):
            name = f"dn-{os.getpid()}-{index}"
            try:
                starts.append(start_run(args.root, name, args.image))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result["start_failure"] = str(exc)
                remove(args.root, name)
                break
            names.append(name)
            print(f"started {len(names)} ({starts[-1]:.1f} s)", flush=True)
        time.sleep(args.settle)
        total = 0.0
        for name in names:
            total += sum(pss_kib(pid) for pid in run_processes(args.root, name)) / 1024
        uptime = Path("/proc/loadavg").read_text().split()[:3]
        answers = [exec_seconds(args.root, name, args.exec_limit) for name in names]
        execs = [seconds for seconds, _ in answers]
        ok = [s for s in execs if s is not None and s <= args.exec_limit]
        result["exec_failures"] = sorted({why for _, why in answers if why})
        result.update(
            {
                "started": len(names),
                "start_s_median": round(statistics.median(starts), 2) if starts else None,
                "answered_within_limit": len(ok),
                "exec_limit_s": args.exec_limit,
                "exec_s": [None if s is None else round(s, 2) for s in execs],
                "exec_s_max": round(max((s for s in execs if s is not None), default=0), 2),
                "pss_total_mib": round(total, 1),
                "pss_per_run_mib": round(total / len(names), 1) if names else None,
                "mem_after": mem_available_mib(),
                "loadavg_idle": uptime,
            }
        )
        return result
    finally:
        for name in names:
            remove(args.root, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/run/pysandbox-footprint"))
    parser.add_argument("--image", default="default")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--exec-limit", type=float, default=3.0)
    parser.add_argument("--density", type=int, default=0, help="start up to N runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--baseline",
        help="another checkout's .venv/bin/python[,GUEST_IMAGE,TEMPLATE_DIR]: A/B rounds",
    )
    args = parser.parse_args()
    if args.density:
        result = density(args)
    else:
        result = footprint_ab(args) if args.baseline else footprint(args)
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(result, indent=1)
    print(json.dumps(result.get("median", result), indent=1))
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
