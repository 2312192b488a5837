"""A container's process table as people read it (``pysandbox ps ID``), from the guest's /proc.

Pids are given as the container sees them (the pid namespace of its init, as ``ps`` run in the
container shows them): guest pids of the agent's namespace mean nothing to anyone outside the
VM. Each entry also names the agent-side role of the process (the container's init or an exec
by id), so the host can put its stand-in process next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Longest command line reported per process, in bytes of /proc/<pid>/cmdline.
MAX_COMMAND_BYTES = 4096


@dataclass(frozen=True)
class Entry:
    """One process of the container."""

    pid: int  # in the container's pid namespace
    ppid: int  # in the same namespace; 0 when the parent is outside the container
    uid: int  # real uid, as the guest kernel numbers it
    command: str  # arguments joined by spaces, or "[comm]" when there are none
    guest_pid: int  # in the agent's (the guest's root) pid namespace
    exec_id: str = ""  # the exec this process is, "" for others
    init: bool = False  # the container's init process


@dataclass(frozen=True)
class _Status:
    ppid: int
    uid: int
    nspids: tuple[int, ...]


def _status(guest_pid: int) -> _Status | None:
    """PPid, real Uid and NSpid of /proc/<pid>/status; None when the process is gone."""
    ppid, uid = 0, 0
    nspids: tuple[int, ...] = (guest_pid,)
    try:
        with open(f"/proc/{guest_pid}/status", encoding="utf-8", errors="replace") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields = value.split()
                if key == "PPid" and fields:
                    ppid = int(fields[0])
                elif key == "Uid" and fields:
                    uid = int(fields[0])
                elif key == "NSpid" and fields:
                    nspids = tuple(int(f) for f in fields)
    except (OSError, ValueError):
        return None
    return _Status(ppid, uid, nspids)


def _command(guest_pid: int) -> str:
    try:
        with open(f"/proc/{guest_pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read(MAX_COMMAND_BYTES)
        if raw:
            return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{guest_pid}/comm", "rb") as comm:
            return "[" + comm.read(64).strip().decode(errors="replace") + "]"
    except OSError:
        return "?"


def table(guest_pids: list[int], init_pid: int, exec_pids: dict[int, str]) -> list[Entry]:
    """Entries for ``guest_pids`` (the container's cgroup members, agent namespace), in that
    order; processes gone meanwhile are left out. ``exec_pids`` maps an exec's guest pid to
    its exec id.

    The container's pid namespace is the shallowest one its processes are in (a process that
    made a namespace of its own is deeper), so each pid is taken at that depth of NSpid.
    """
    found = [(pid, st) for pid in guest_pids if (st := _status(pid)) is not None]
    if not found:
        return []
    depth = min(len(st.nspids) for _, st in found) - 1
    inner = {pid: st.nspids[depth] for pid, st in found}
    return [
        Entry(
            pid=inner[pid],
            ppid=inner.get(st.ppid, 0),
            uid=st.uid,
            command=_command(pid),
            guest_pid=pid,
            exec_id=exec_pids.get(pid, ""),
            init=pid == init_pid,
        )
        for pid, st in found
    ]
