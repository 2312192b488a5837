"""Who a jailed VMM runs as: the jail settings and the per-VM uid/gid leases.

Settings come from the environment (docs/trust-boundaries.md):

``PYSANDBOX_JAIL``
    ``on`` (default) or ``off``. Off, QEMU runs as root in the host's namespaces, as before
    the jail existed; only an explicit ``off`` (or the CLI's ``--no-jail``) does that, and
    ``pysandbox check`` warns about it.
``PYSANDBOX_JAIL_IDS``
    ``FIRST-LAST``: the ids (used as uid *and* gid) handed out, one per running VM (default
    :data:`DEFAULT_RANGE`). Each must be in 1000..4294967294 and name no account of
    ``/etc/passwd``/``/etc/group`` (an id that does is skipped when allocating).
``PYSANDBOX_JAIL_USER``
    A user name or number: every VM runs as that user (and its primary group) instead of
    an id of its own. Pods are then not isolated from each other by uid (only by their
    namespaces); root is refused.

A lease is a file ``<LEASE_DIR>/<id>`` holding JSON ``{"owner": dir, "pid": p, "start": s}``:
``owner`` is the VM's directory (its QMP socket's), ``pid``/``start`` the jailed QEMU once
started. A lease is stale, and its id free again, when its owner directory is gone, when its
process has exited, or when no process was recorded within :data:`LAUNCH_GRACE` seconds.
Leases are taken under an exclusive ``flock`` of ``<LEASE_DIR>/.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hypervisor.errors import JailError
from hypervisor.process import start_time

ENV_JAIL = "PYSANDBOX_JAIL"
ENV_IDS = "PYSANDBOX_JAIL_IDS"
ENV_USER = "PYSANDBOX_JAIL_USER"
#: Default id range: 65536 ids far above the accounts and /etc/subuid ranges of a
#: usual host (those start at 100000 and grow by 65536 per user).
DEFAULT_RANGE = (2_130_706_432, 2_130_771_967)
#: Lowest and highest id a range may hold (below 1000: system accounts; 2**32-1 is -1).
MIN_ID, MAX_ID = 1000, 4_294_967_294
LEASE_DIR = Path("/run/pysandbox/jail/ids")
#: Seconds a lease without a recorded process stays taken (spawning QEMU is far quicker).
LAUNCH_GRACE = 120.0
_FIX = f"set {ENV_IDS}=FIRST-LAST (e.g. {DEFAULT_RANGE[0]}-{DEFAULT_RANGE[1]}) or {ENV_USER}=NAME"


@dataclass(frozen=True)
class Identity:
    """The credentials of one jailed process: uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Settings:
    """The jail configuration: off, one shared ``user``, or a per-VM id ``ids`` range."""

    enabled: bool
    ids: tuple[int, int] = DEFAULT_RANGE
    user: Identity | None = None

    def describe(self) -> str:
        """One line for ``pysandbox check`` (no trailing period)."""
        if not self.enabled:
            return f"OFF ({ENV_JAIL}=off or --no-jail): QEMU runs as root with every capability"
        if self.user is not None:
            return f"one user for every VM (uid {self.user.uid}, gid {self.user.gid})"
        first, last = self.ids
        return f"a uid/gid per VM from {first}-{last} ({in_use(self)} in use)"


def enabled_from_env() -> bool:
    """False only for an explicit ``PYSANDBOX_JAIL=off`` (``0``/``no``/``false``).

    JailError for a value that is neither on nor off."""
    raw = os.environ.get(ENV_JAIL, "on").strip().lower()
    if raw in ("on", "1", "yes", "true", ""):
        return True
    if raw in ("off", "0", "no", "false"):
        return False
    raise JailError(f"{ENV_JAIL}={raw!r}: expected 'on' or 'off'")


def settings() -> Settings:
    """The jail settings of the environment (module docstring). JailError, naming the
    variable and the fix, for a misconfigured one."""
    if not enabled_from_env():
        return Settings(enabled=False)
    user = os.environ.get(ENV_USER, "").strip()
    if user:
        return Settings(enabled=True, user=_user(user))
    raw = os.environ.get(ENV_IDS, "").strip()
    return Settings(enabled=True, ids=parse_range(raw) if raw else DEFAULT_RANGE)


def parse_range(raw: str) -> tuple[int, int]:
    """``FIRST-LAST`` as two ints; JailError naming what is wrong and the fix."""
    first_text, dash, last_text = raw.partition("-")
    try:
        first, last = int(first_text), int(last_text)
    except ValueError:
        first = last = -1
    if not dash or first < 0:
        raise JailError(f"{ENV_IDS}={raw!r} is not FIRST-LAST; {_FIX}")
    if not MIN_ID <= first <= last <= MAX_ID:
        raise JailError(
            f"{ENV_IDS}={raw!r}: ids must satisfy {MIN_ID} <= FIRST <= LAST <= {MAX_ID}; {_FIX}"
        )
    return first, last


def _user(name: str) -> Identity:
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise JailError(
            f"{ENV_USER}={name!r}: no such user; create it (useradd --system {name}) "
            f"or unset {ENV_USER}"
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise JailError(f"{ENV_USER}={name!r} is root; name an unprivileged user")
    return Identity(entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    LEASE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(LEASE_DIR / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _stale(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
        owner, pid, start = Path(data["owner"]), data.get("pid"), data.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if not owner.is_dir():
        return True
    if isinstance(pid, int) and isinstance(start, int):
        return start_time(pid) != start
    try:
        return time.time() - path.stat().st_mtime > LAUNCH_GRACE
    except OSError:
        return True


def _taken() -> set[int]:
    """Ids of the live leases (stale ones are removed on the way); call under the lock."""
    taken = set()
    for path in LEASE_DIR.iterdir() if LEASE_DIR.is_dir() else ():
        if not path.name.isdigit():
            continue
        if _stale(path):
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            taken.add(int(path.name))
    return taken


def in_use(config: Settings) -> int:
    """How many ids of the range are leased (0 with a shared user or without leases)."""
    if config.user is not None or not LEASE_DIR.is_dir():
        return 0
    with _locked():
        first, last = config.ids
        return sum(1 for uid in _taken() if first <= uid <= last)


def _is_account(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
        except KeyError:
            continue
        return True
    return False


def allocate(config: Settings, owner: Path) -> Identity:
    """A free id of ``config``'s range, leased to ``owner`` (the VM's directory); the
    shared user's identity when one is configured. JailError when every id is taken."""
    if config.user is not None:
        return config.user
    first, last = config.ids
    with _locked():
        taken = _taken()
        for uid in range(first, last + 1):
            if uid in taken or _is_account(uid):
                continue
            lease = LEASE_DIR / str(uid)
            lease.write_text(json.dumps({"owner": str(owner)}))
            return Identity(uid, uid)
    raise JailError(
        f"no free VM id: all {last - first + 1} ids of the jail range {first}-{last} "
        f"are used by running VMs (or are accounts); widen {ENV_IDS} or stop some pods"
    )


def record(identity: Identity, owner: Path, pid: int, start: int) -> None:
    """Note in ``identity``'s lease the process that now holds it."""
    lease = LEASE_DIR / str(identity.uid)
    with _locked(), contextlib.suppress(OSError):
        lease.write_text(json.dumps({"owner": str(owner), "pid": pid, "start": start}))


def release(identity: Identity, owner: Path) -> None:
    """Give ``identity``'s id back if ``owner`` still holds its lease (idempotent)."""
    lease = LEASE_DIR / str(identity.uid)
    with _locked(), contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if json.loads(lease.read_text())["owner"] == str(owner):
            lease.unlink()


def release_process(pid: int, start: int) -> None:
    """Give back the id leased to the jailed process ``pid`` started at ``start`` (for a
    process stopped by another process than the one that started it). Idempotent."""
    if not LEASE_DIR.is_dir():
        return
    with _locked():
        for path in LEASE_DIR.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                data = json.loads(path.read_text())
                if data.get("pid") == pid and data.get("start") == start:
                    path.unlink()
