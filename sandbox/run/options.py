"""Command-line options of ``pysandbox run`` (kept free of heavy imports: the CLI parser
loads it for every verb)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pysandbox run``. ``-h`` is docker's ``--hostname``: the parser is
    made with ``add_help=False`` and gets ``--help`` alone."""
    parser.add_argument("--help", action="help", help="show this help message and exit")
    parser.add_argument(
        "image",
        help="'default', a root filesystem directory, an OCI layout or archive, "
        "or an image reference (alpine, localhost:5000/x:1)",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="arguments after the image's entrypoint, replacing its Cmd (as docker run)",
    )
    parser.add_argument(
        "--entrypoint",
        default=None,
        metavar="PROGRAM",
        help="run PROGRAM (one word) instead of the image's entrypoint, with COMMAND as its "
        "arguments and without the image's Cmd; '' clears the entrypoint",
    )
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    parser.add_argument("--env-file", action="append", default=[], type=Path)
    parser.add_argument("-w", "--workdir", default=None)
    parser.add_argument("-u", "--user", default=None, metavar="UID[:GID]")
    parser.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:GUEST[:ro]")
    parser.add_argument(
        "--tmpfs",
        action="append",
        default=[],
        metavar="PATH[:OPTIONS]",
        help="a tmpfs at PATH (docker's: rw,nosuid,nodev,noexec unless OPTIONS say otherwise,"
        " e.g. /tmp:exec,size=64m,mode=1777)",
    )
    parser.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    parser.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    parser.add_argument("--memory", default=None, help="memory limit, e.g. 256m")
    parser.add_argument(
        "--ulimit",
        action="append",
        default=[],
        metavar="NAME=SOFT[:HARD]",
        help="a resource limit (docker's: nofile=1024:4096, nproc=100, core=-1 unlimited)",
    )
    parser.add_argument(
        "--memory-swap",
        default=None,
        help="memory and swap together (docker's; default twice --memory, -1 unlimited swap)",
    )
    parser.add_argument(
        "--log-max-size",
        default="64m",
        help="with -d: the most the run's log keeps (default 64m); later output is dropped",
    )
    parser.add_argument(
        "--cpus",
        type=float,
        default=None,
        help="CPU limit, e.g. 0.5 (the VM gets that many vCPUs, rounded up; at most the host's)",
    )
    parser.add_argument(
        "--pids-limit", type=int, default=1024, help="process limit (default 1024; -1: unlimited)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="kill after N seconds")
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--hostname",
        "-h",
        default=None,
        help="the container's hostname (default: --name, else the run's 12 hex digits)",
    )
    parser.add_argument("--read-only", action="store_true", help="read-only root filesystem")
    parser.add_argument(
        "--privileged-files",
        action="store_true",
        help="let the container leave device nodes, setuid/setgid files and file capabilities"
        " on its read-write volumes, usable on the host (as runc does); default: refused",
    )
    parser.add_argument(
        "--rm",
        action="store_true",
        help="with -d: remove the run once it exits (foreground runs are always removed)",
    )
    parser.add_argument(
        "--network",
        choices=["none", "user"],
        default="none",
        help="none: loopback only (default); user: outbound NAT through QEMU user networking",
    )
    parser.add_argument(
        "--bundle",
        "-b",
        type=Path,
        default=None,
        help="run an OCI bundle (runc's run): IMAGE is then the container id",
    )
    parser.add_argument(
        "--detach",
        "-d",
        action="store_true",
        help="run in the background and print its name (see ps, logs, stop, rm)",
    )
    from sandbox.image.options import add_pull_flags

    add_pull_flags(parser, for_run=True)
    parser.add_argument("--pid-file", type=Path, default=None)
    parser.add_argument("--console-socket", type=Path, default=None)


def _line_count(text: str) -> int | None:
    """``logs --tail``'s value: a count of lines, or docker's ``all``."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid --tail {text!r}: a number of lines, or all")
    return int(text)


def add_detached_verbs(verbs: Any) -> None:
    """``logs``, ``stop`` and ``rm`` for detached runs (``ps`` without an id lists them)."""
    logs = verbs.add_parser("logs", help="print a detached run's stdout and stderr")
    logs.add_argument("--follow", "-f", action="store_true", help="until the run stops")
    logs.add_argument(
        "--tail", "-n", type=_line_count, default=None, metavar="N", help="the last N lines only"
    )
    logs.add_argument("name")
    stop = verbs.add_parser("stop", help="stop detached runs: SIGTERM, SIGKILL after --time")
    stop.add_argument("--time", "-t", type=float, default=10.0, help="seconds (default 10)")
    stop.add_argument("names", nargs="+", metavar="NAME")
    rm = verbs.add_parser("rm", help="remove detached runs and everything they have")
    rm.add_argument("--force", "-f", action="store_true", help="kill a running one first")
    rm.add_argument("names", nargs="+", metavar="NAME")
