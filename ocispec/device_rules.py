"""Device cgroup rules (``linux.resources.devices``) and the access policy they amount to.

A container may open (``r``, ``w``) or create (``m``, mknod) a device node only as its device
cgroup allows: cgroup v1's ``devices`` controller, or on cgroup v2 a
``BPF_PROG_TYPE_CGROUP_DEVICE`` program (:mod:`agent.oci.device_filter`). This module turns
the spec's rules into the one policy both apply, the way runc (1.1, the host's) does:

- runc's default rules (:data:`DEFAULT_RULES`, libcontainer/specconv ``AllowedDevices``) are
  appended **after** the spec's rules, so a spec cannot take them away: mknod of any character
  or block device, and read/write/mknod of /dev/null, zero, full, random, urandom, tty,
  ptmx (5:2), the pty peers (136:*) and /dev/net/tun (10:200). Measured with runc 1.1.5 on
  this host: a container's ``devices.list`` is exactly that list after a spec's
  ``{"allow": false, "access": "rwm"}``.
- ``linux.devices`` entries create nodes but grant no access (runc 1.1.5: ``mknod`` of
  ``/dev/fuse`` listed there succeeds, opening it fails with EPERM): clients that want a device
  usable add a rule too, as podman's and docker's ``--device`` do.
- The rules are applied in order with cgroup v1's semantics (runc emulates v1 for v2 too,
  libcontainer/cgroups/devices ``emulator``): a rule of type ``a`` (every device, whatever
  its access) resets the policy to deny-all or allow-all; any other rule adds an exception to
  the current default (an allow in deny-all mode, a deny in allow-all mode, merging access
  with an exception for the same type and numbers) or takes access away from one. So a later
  rule overrides an earlier one. Taking access away from part of a wildcard exception (deny
  ``c 1:3 r`` while ``c 1:* r`` is allowed) cannot be expressed in v1 and runc refuses it;
  so does :func:`policy` (SpecError).

The result, :class:`Policy`, is a default (allow or deny) and a set of exceptions with the
opposite action; whichever exception matches decides, since they all decide the same way.
"""

from __future__ import annotations

from ocispec.errors import SpecError

#: A major or minor number matching every number.
WILDCARD = -1
#: The access letters, in the order they are written: read, write, mknod.
ACCESS = "rwm"


class Rule:
    """One device cgroup rule: ``kind`` "a" (every device), "b" or "c"; ``major`` and
    ``minor`` a number or :data:`WILDCARD`; ``access`` a non-empty subset of "rwm", in that
    order; ``allow`` whether it grants or denies. ``where`` names it in messages (the spec's
    field, or runc's default)."""

    __slots__ = ("access", "allow", "kind", "major", "minor", "where")

    def __init__(
        self, allow: bool, kind: str, major: int, minor: int, access: str, where: str = ""
    ) -> None:
        self.allow = allow
        self.kind = kind
        self.major = major
        self.minor = minor
        self.access = "".join(letter for letter in ACCESS if letter in access)
        self.where = where

    def __str__(self) -> str:
        """The rule as cgroup v1 writes it, with its action: ``allow c 1:3 rwm``."""
        action = "allow" if self.allow else "deny"
        return f"{action} {line(self.kind, self.major, self.minor, self.access)}"


def line(kind: str, major: int, minor: int, access: str) -> str:
    """A cgroup v1 ``devices.allow``/``devices.deny`` line: ``c 1:3 rwm``, ``b *:* m``."""
    if kind == "a":
        return "a *:* rwm"
    numbers = ":".join("*" if n == WILDCARD else str(n) for n in (major, minor))
    return f"{kind} {numbers} {access}"


def _default(kind: str, major: int, minor: int, access: str) -> Rule:
    return Rule(True, kind, major, minor, access, "runc's default rule")


#: runc's rules for every container (libcontainer/specconv ``AllowedDevices``, runc 1.1),
#: appended after the spec's.
DEFAULT_RULES = (
    _default("c", WILDCARD, WILDCARD, "m"),
    _default("b", WILDCARD, WILDCARD, "m"),
    _default("c", 1, 3, "rwm"),  # /dev/null
    _default("c", 1, 8, "rwm"),  # /dev/random
    _default("c", 1, 7, "rwm"),  # /dev/full
    _default("c", 5, 0, "rwm"),  # /dev/tty
    _default("c", 1, 5, "rwm"),  # /dev/zero
    _default("c", 1, 9, "rwm"),  # /dev/urandom
    _default("c", 136, WILDCARD, "rwm"),  # /dev/pts/N
    _default("c", 5, 2, "rwm"),  # /dev/ptmx
    _default("c", 10, 200, "rwm"),  # /dev/net/tun
)

#: An exception of a policy: (kind, major, minor, access).
Entry = tuple[str, int, int, str]


class Policy:
    """What a container may do with devices: ``default_allow``, and ``exceptions`` (kind "b" or
    "c", major, minor, access), each with the opposite action, sorted by major, minor, kind (the
    order runc writes them in). Equal policies compare and hash equal."""

    __slots__ = ("default_allow", "exceptions")

    def __init__(self, default_allow: bool, exceptions: tuple[Entry, ...]) -> None:
        self.default_allow = default_allow
        self.exceptions = exceptions

    @property
    def allows_all(self) -> bool:
        """Every access to every device is allowed (a privileged container)."""
        return self.default_allow and not self.exceptions

    def _key(self) -> tuple[bool, tuple[Entry, ...]]:
        return (self.default_allow, self.exceptions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def v1_writes(self) -> list[tuple[str, str]]:
        """(file, line) pairs that turn a new cgroup v1 ``devices`` cgroup (which allows
        everything its parent does) into this policy: the reset first, then the exceptions."""
        reset = ("devices.allow" if self.default_allow else "devices.deny", "a *:* rwm")
        target = "devices.deny" if self.default_allow else "devices.allow"
        return [reset, *((target, line(*exception)) for exception in self.exceptions)]


def _merge(first: str, second: str) -> str:
    return "".join(letter for letter in ACCESS if letter in first or letter in second)


def _remove(exceptions: dict[tuple[str, int, int], str], rule: Rule) -> None:
    """Take ``rule.access`` away from the exception with the same kind and numbers; SpecError
    when a wider exception (a wildcard covering it) grants some of that access, since v1
    keeps that wider exception whole and the access would remain (runc refuses too)."""
    wider = (
        (rule.kind, WILDCARD, rule.minor),
        (rule.kind, rule.major, WILDCARD),
        (rule.kind, WILDCARD, WILDCARD),
    )
    for key in wider:
        if key == (rule.kind, rule.major, rule.minor):
            continue
        overlap = "".join(letter for letter in exceptions.get(key, "") if letter in rule.access)
        if overlap:
            other = line(key[0], key[1], key[2], exceptions[key])
            raise SpecError(
                f"{rule.where}: {rule} cannot be applied after the exception {other}: cgroup "
                "device rules cannot take access away from part of a wildcard rule (runc "
                "refuses it too); change the wildcard rule instead"
            )
    key = (rule.kind, rule.major, rule.minor)
    left = "".join(letter for letter in exceptions.get(key, "") if letter not in rule.access)
    if left:
        exceptions[key] = left
    else:
        exceptions.pop(key, None)


def policy(rules: tuple[Rule, ...] | list[Rule]) -> Policy:
    """The policy of the spec's ``rules`` followed by :data:`DEFAULT_RULES` (see the module
    docstring). Starts as deny-all, as runc's does. SpecError for a rule cgroup v1 cannot
    apply (a hole in a wildcard exception)."""
    default_allow = False
    exceptions: dict[tuple[str, int, int], str] = {}
    for rule in (*rules, *DEFAULT_RULES):
        if rule.kind == "a":
            default_allow = rule.allow
            exceptions = {}
        elif rule.allow != default_allow:
            key = (rule.kind, rule.major, rule.minor)
            exceptions[key] = _merge(exceptions.get(key, ""), rule.access)
        else:
            _remove(exceptions, rule)
    ordered = sorted(exceptions.items(), key=lambda item: (item[0][1], item[0][2], item[0][0]))
    return Policy(default_allow, tuple((k[0], k[1], k[2], access) for k, access in ordered))
