"""The ``pysandbox`` command line: parse, delegate, report.

Every verb is a thin function that loads what it needs (imports are lazy so that quick verbs
start fast), calls into the library and prints the result. Any expected failure surfaces as
one line ``pysandbox: <message>`` on stderr (and, with ``--log-format json``, one JSON line in
the ``--log`` file) and a non-zero exit status; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, the width found as ``shutil.get_terminal_size`` finds it
    ($COLUMNS, else stdout's terminal, else 80) without importing shutil: argparse builds
    a formatter for every argument added, and shutil (with bz2, lzma, zlib) costs ~2 ms
    of every verb's start-up."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)


def _terminal_columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exits 2 (like runc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    usage_status_125 = False
    #: The --log/--log-format of this call (found before parsing): usage errors go there
    #: too, as every error does (containerd reports what its shim finds in that file).
    log_flags: argparse.Namespace | None = None

    def error(self, message: str) -> NoReturn:
        # docker's code for `run` misuse is 125; runc's for everything else is 2.
        status = 125 if self.prog.endswith(" run") or self.usage_status_125 else 2
        text = f"{message} (see '{self.prog} --help')"
        if _Parser.log_flags is not None:
            _log_error(_Parser.log_flags, text)
        self.exit(status, f"pysandbox: {text}\n")


def _global_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=None, help="state directory")
    parser.add_argument("--log", type=Path, default=None, help="log file")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument(
        "--systemd-cgroup",
        action="store_true",
        help='cgroupsPath is systemd\'s "slice:prefix:name" (docs/cgroups.md)',
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--no-jail",
        action="store_true",
        help="run QEMU unjailed, as root (same as PYSANDBOX_JAIL=off; docs/trust-boundaries.md)",
    )


#: Verbs that only talk to a running agent: they import asyncio, grpc.aio and protobuf's
#: Python message code lazily (agentapi/lazy_import.py; ~30 ms of start-up). Not the verbs
#: that boot or stop VMs: QMP loads asyncio there, and a signal turned into an exception
#: in the middle of a lazy load would leave the module half-initialised for the rest of the
#: process (an ordinary import is undone and retried).
_LAZY_IMPORT_VERBS = frozenset({"state", "kill"})

#: The verbs clients call most (and for which start-up time is most of the call's time).
#: ``exec`` installs the lazy imports itself, when it uses gRPC (a detached exec): an
#: attached one does not (sandbox/runtime/exec_attach.py).
_LIFECYCLE_VERBS = ("start", "state", "kill", "delete", "pause", "resume", "exec")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and documentation); with ``only`` one of
    :data:`_LIFECYCLE_VERBS`, a parser of that verb alone (a third of the work at start-up).
    """
    parser = _Parser(prog="pysandbox", description="VM-isolated OCI container runtime")
    _global_flags(parser)
    # prog given: argparse would otherwise build a help formatter to find it, which imports
    # shutil (and bz2, lzma...) for the terminal's width: ~2 ms of every verb's start-up.
    verbs = parser.add_subparsers(
        dest="verb", metavar="COMMAND", parser_class=_Parser, prog=parser.prog
    )
    verbs.required = True
    if only in _LIFECYCLE_VERBS:
        _lifecycle_verbs(verbs, only)
        return parser

    check = verbs.add_parser("check", help="report whether this host can run sandboxes")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.add_argument("--boot", action="store_true", help="also boot a VM and reach its agent")

    pod = verbs.add_parser("pod", help="boot, inspect and stop pod VMs directly")
    pod_verbs = pod.add_subparsers(dest="pod_verb", metavar="ACTION", parser_class=_Parser)
    pod_verbs.required = True
    boot = pod_verbs.add_parser("boot", help="boot a pod VM and wait for its agent")
    boot.add_argument("pod_id")
    boot.add_argument("--memory", type=int, default=None, help="guest memory in MiB")
    info = pod_verbs.add_parser("info", help="query a pod VM's agent")
    info.add_argument("pod_id")
    stop = pod_verbs.add_parser("stop", help="stop a pod VM and remove everything it started")
    stop.add_argument("pod_id")
    pod_verbs.add_parser("list", help="list pod VMs")
    pool = verbs.add_parser("pool", help="VMs kept ready for run (PYSANDBOX_POOL=N)")
    pool_verbs = pool.add_subparsers(dest="pool_verb", metavar="ACTION", parser_class=_Parser)
    pool_verbs.required = True
    pool_verbs.add_parser("ls", help="list the VMs waiting for a run")
    pool_verbs.add_parser("drain", help="remove every VM waiting for a run")

    from sandbox.run.options import add_arguments as add_run_arguments

    run = verbs.add_parser("run", help="run a command in a container in a fresh VM", add_help=False)
    add_run_arguments(run)
    from sandbox.run.options import add_detached_verbs

    add_detached_verbs(verbs)
    from sandbox.image.options import add_image_verbs

    add_image_verbs(verbs)
    _runtime_verbs(verbs)
    return parser


def _runtime_verbs(verbs: Any) -> None:
    """The runc-compatible verbs (see ../shared/cli-contract.md)."""
    create = verbs.add_parser("create", help="create a container from an OCI bundle")
    create.add_argument("--bundle", "-b", type=Path, default=Path("."))
    create.add_argument("--pid-file", type=Path)
    create.add_argument("--console-socket", type=Path)
    create.add_argument("--no-pivot", action="store_true")
    create.add_argument("--no-new-keyring", action="store_true")
    create.add_argument("--preserve-fds", type=int, default=0)
    create.add_argument("id")
    _lifecycle_verbs(verbs)
    ps = verbs.add_parser("ps", help="list a container's processes (without ID: detached runs)")
    ps.add_argument("--format", "-f", choices=["table", "json"], default="table")
    ps.add_argument("--all", "-a", action="store_true", help="without ID: stopped runs too")
    ps.add_argument("--quiet", "-q", action="store_true", help="without ID: the names only")
    ps.add_argument("id", nargs="?", default=None)
    listing = verbs.add_parser("list", help="list containers")
    listing.add_argument("--format", "-f", choices=["table", "json"], default="table")
    listing.add_argument("--quiet", "-q", action="store_true")
    update = verbs.add_parser("update", help="change a container's resource limits")
    update.add_argument("--resources", "-r", help="JSON file of linux.resources, or -")
    update.add_argument("--memory", help="memory limit: bytes, or with k, m or g (100m)")
    update.add_argument("--pids-limit", type=int)
    update.add_argument("--cpu-quota", type=int)
    update.add_argument("--cpu-period", type=int)
    update.add_argument("id")
    verbs.add_parser("features", help="print the runtime's features as JSON")
    spec = verbs.add_parser("spec", help="write a default config.json")
    spec.add_argument("--bundle", "-b", type=Path, default=Path("."))


def _lifecycle_verbs(verbs: Any, only: str | None = None) -> None:
    """The verbs of :data:`_LIFECYCLE_VERBS` (only ``only``, if given)."""
    if only in (None, "start"):
        verbs.add_parser("start", help="start a created container").add_argument("id")
    if only in (None, "state"):
        verbs.add_parser("state", help="print a container's OCI state").add_argument("id")
    if only in (None, "kill"):
        kill = verbs.add_parser("kill", help="signal a container")
        kill.add_argument("--all", "-a", action="store_true")
        kill.add_argument("id")
        kill.add_argument("signal", nargs="?", default="TERM")
    if only in (None, "delete"):
        delete = verbs.add_parser("delete", help="delete a container")
        delete.add_argument("--force", "-f", action="store_true")
        delete.add_argument("id")
    if only in (None, "pause"):
        verbs.add_parser("pause", help="freeze a container").add_argument("id")
    if only in (None, "resume"):
        verbs.add_parser("resume", help="thaw a paused container").add_argument("id")
    if only in (None, "exec"):
        exec_ = verbs.add_parser("exec", help="run a process in a running container")
        exec_.add_argument("--process", "-p", type=Path)
        exec_.add_argument("--detach", "-d", action="store_true")
        exec_.add_argument("--pid-file", type=Path)
        exec_.add_argument("--tty", "-t", action="store_true")
        # docker exec's -i (keep stdin open): stdin is always relayed here, as by runc exec,
        # so it is accepted for docker's habit (exec -it) and changes nothing.
        exec_.add_argument(
            "--interactive", "-i", action="store_true", help="accepted; stdin is always open"
        )
        exec_.add_argument("--console-socket", type=Path)
        exec_.add_argument("--env", "-e", action="append", default=[])
        exec_.add_argument(
            "--cwd", "--workdir", "-w", dest="cwd", help="working directory (docker's -w)"
        )
        exec_.add_argument(
            "--user",
            "-u",
            help="UID[:GID], or USER[:GROUP] by name from the container's /etc/passwd",
        )
        exec_.add_argument("--preserve-fds", type=int, default=0)
        exec_.add_argument("id")
        exec_.add_argument("command", nargs=argparse.REMAINDER)


def _log_error(args: argparse.Namespace, message: str) -> None:
    from sandbox.cli import log

    log.write(args, "error", message)


def _dispatch(args: argparse.Namespace) -> int:
    from sandbox.cli import commands

    handler: Callable[[argparse.Namespace], int] = commands.HANDLERS[args.verb]
    return handler(args)


def _verb_of(argv: list[str]) -> str | None:
    """The subcommand in ``argv``, skipping global flags and their values."""
    takes_value = {"--root", "--log", "--log-format"}
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in takes_value:
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def _log_flags(argv: list[str]) -> argparse.Namespace:
    """``--log`` and ``--log-format`` among the global flags of ``argv`` (before the verb)."""
    found = argparse.Namespace(log=None, log_format="text")
    tokens = iter(argv)
    for token in tokens:
        name, equals, value = token.partition("=")
        if name in ("--root", "--log", "--log-format"):
            value = value if equals else next(tokens, "")
            if name == "--log" and value:
                found.log = Path(value)
            elif name == "--log-format":
                found.log_format = value
        elif not token.startswith("-"):
            break
    return found


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``pysandbox`` console script (``argv`` None: ``sys.argv``, and
    this process is the command: ``run`` and an attached ``exec`` end it with
    :func:`_exit_now`; a caller passing ``argv`` gets SystemExit as from every verb)."""
    as_program = argv is None
    if as_program:
        _reopen_closed_stdio()
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.log_flags = _log_flags(argv)
    verb = _verb_of(argv)
    if verb in _LAZY_IMPORT_VERBS:
        from agentapi import lazy_import

        lazy_import.install()  # asyncio, grpc.aio, ...: loaded only if the verb uses them
    parser = build_parser(only=verb)
    if isinstance(parser, _Parser):
        parser.usage_status_125 = verb == "run"
    args = parser.parse_args(argv)
    if not _log_opens(args):
        sys.exit(125 if verb == "run" else 1)
    if args.no_jail:  # the environment reaches every process that may start a VM
        os.environ["PYSANDBOX_JAIL"] = "off"
    try:
        code = _dispatch(args)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        if args.debug:
            raise
        from sandbox.errors import describe

        message, code = describe(exc)
        _log_error(args, message)
        print(f"pysandbox: {message}", file=sys.stderr)
    if as_program and (verb == "run" or (verb == "exec" and not args.detach)):
        _exit_now(code)
    sys.exit(code)


def _log_opens(args: argparse.Namespace) -> bool:
    """Whether the ``--log`` file (if any) can be opened for appending, created if missing;
    if not, say so in one line on stderr. runc refuses to run then too (``open FILE: no such
    file or directory``, exit 1): errors that go nowhere are not to be lost silently."""
    log: Path | None = getattr(args, "log", None)
    if log is None:
        return True
    try:
        with open(log, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        print(
            f"pysandbox: cannot open the --log file {log}: {reason}; give a file in an "
            "existing, writable directory",
            file=sys.stderr,
        )
        return False
    return True


def _reopen_closed_stdio() -> None:
    """A standard descriptor this process was started without (``cmd <&-``, ``>&-``) becomes
    /dev/null, and Python's stream for it (None then) is made again: the command runs, as
    docker's does, its output to that stream dropped; and no file we open later takes fd 0-2
    by accident (a pipe or socket of ours read or written as if it were stdio)."""
    streams = (("stdin", "r"), ("stdout", "w"), ("stderr", "w"))
    for fd, (name, mode) in enumerate(streams):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        stream = open(fd, mode, buffering=1 if fd == 2 else -1, closefd=False)  # noqa: SIM115
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _exit_now(code: int) -> None:
    """Exit with ``code`` once stdout and stderr are flushed, skipping the interpreter's
    clean-up (~30 ms with grpc loaded, 15-20 ms for an attached ``exec`` without it; it
    frees memory the exit frees anyway): ``run``'s and ``exec``'s status is what their
    caller waits for. Neither needs that clean-up: their files are closed, ``run``'s VM is
    torn down by a process of its own, an exec's process was waited for by the pod's agent
    proxy, and neither leaves an atexit handler or non-daemon thread. A stream that cannot
    be flushed (a closed pipe) is dropped."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
