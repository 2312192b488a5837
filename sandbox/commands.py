"""CLI verb handlers: each loads, delegates to the library, prints, returns an exit status."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from sandbox import state


def _root(args: argparse.Namespace) -> Path:
    root: Path = args.root or state.DEFAULT_ROOT
    return state.ensure_dir(root)


def cmd_check(args: argparse.Namespace) -> int:
    from sandbox.check import run_checks

    report = run_checks(boot=args.boot, root=_root(args) if args.boot else None)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.render())
    return 0 if report.ok else 1


def cmd_pod(args: argparse.Namespace) -> int:
    from sandbox.pod import DEFAULT_MEMORY_MIB, Pod

    root = _root(args)
    if args.pod_verb == "boot":
        pod = Pod.boot(root, args.pod_id, memory_mib=args.memory or DEFAULT_MEMORY_MIB)
        with pod.client() as agent:
            uptime = agent.health()
        print(f"pod {pod.id} running (guest up {uptime:.2f}s, accel {pod.record['accel']})")
    elif args.pod_verb == "info":
        pod = Pod.load(root, args.pod_id)
        with pod.client() as agent:
            info = agent.info()
            uptime = agent.health()
        print(
            json.dumps(
                {
                    "id": pod.id,
                    "status": pod.status,
                    "accel": pod.record.get("accel"),
                    "agent_version": info.agent_version,
                    "protocol_version": info.protocol_version,
                    "kernel": info.kernel_release,
                    "memory_bytes": info.mem_total_bytes,
                    "cpus": info.cpus,
                    "transport": info.transport,
                    "shares": [{"tag": t, "path": p} for t, p in info.shares],
                    "python": info.python_version,
                    "uptime_seconds": round(uptime, 3),
                },
                indent=2,
            )
        )
    elif args.pod_verb == "stop":
        Pod.load(root, args.pod_id).stop()
    elif args.pod_verb == "list":
        for pod in Pod.list(root):
            print(f"{pod.id}\t{pod.status}\t{pod.record.get('accel', '?')}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``run`` reports its own failures with docker's 125 (126/127 for the command)."""
    from sandbox.errors import describe
    from sandbox.run import EXIT_RUNTIME, RunError, run

    try:
        return run(args, _root(args))
    except RunError:
        raise
    except Exception as exc:
        message, _ = describe(exc)
        raise RunError(message, EXIT_RUNTIME) from exc


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "pod": cmd_pod,
    "run": cmd_run,
}
