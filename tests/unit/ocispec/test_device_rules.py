"""linux.resources.devices -> the device policy, as runc 1.1 makes it (ocispec.device_rules)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ocispec.device_rules import Policy
from ocispec.errors import SpecError
from ocispec.spec import parse_resources, parse_spec

#: ``devices.list`` of a runc 1.1.5 container on this host (cgroup v1) whose spec has runc
#: spec's ``[{"allow": false, "access": "rwm"}]`` (measured; the kernel's order).
RUNC_DEVICES_LIST = """b *:* m
c *:* m
c 1:3 rwm
c 1:5 rwm
c 1:7 rwm
c 1:8 rwm
c 1:9 rwm
c 5:0 rwm
c 5:2 rwm
c 10:200 rwm
c 136:* rwm
"""

DENY_ALL = {"allow": False, "access": "rwm"}
ALLOW_ALL = {"allow": True, "access": "rwm"}


def policy_of(*rules: dict[str, Any]) -> Policy:
    spec = {
        "root": {"path": "/r"},
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "linux": {"namespaces": [{"type": "mount"}], "resources": {"devices": list(rules)}},
    }
    return parse_spec(spec).device_policy


def lines(policy: Policy) -> list[str]:
    return [f"{file} {line}" for file, line in policy.v1_writes()]


def test_runcs_default_spec_gives_runcs_devices_list() -> None:
    policy = policy_of(DENY_ALL)
    assert not policy.default_allow
    writes = policy.v1_writes()
    assert writes[0] == ("devices.deny", "a *:* rwm")
    assert {file for file, _ in writes[1:]} == {"devices.allow"}
    assert sorted(line for _, line in writes[1:]) == sorted(RUNC_DEVICES_LIST.splitlines())


def test_no_rules_at_all_is_deny_all_with_runcs_defaults() -> None:
    """runc starts from deny-all: a spec without linux.resources gets the same policy."""
    spec = {
        "root": {"path": "/r"},
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "linux": {"namespaces": [{"type": "mount"}]},
    }
    assert parse_spec(spec).device_policy == policy_of(DENY_ALL) == policy_of()


@pytest.mark.parametrize(
    "rules",
    [
        [ALLOW_ALL],
        [DENY_ALL, ALLOW_ALL],  # podman --privileged
        [DENY_ALL, {"allow": True, "type": "a", "major": 1, "access": "r"}],  # "a" is all
    ],
)
def test_allow_all_is_a_privileged_policy(rules: list[dict[str, Any]]) -> None:
    policy = policy_of(*rules)
    assert policy.allows_all
    assert lines(policy) == ["devices.allow a *:* rwm"]


def test_an_allowed_device_adds_to_runcs_defaults_and_later_rules_win() -> None:
    fuse = {"type": "c", "major": 10, "minor": 229}
    allowed = policy_of(DENY_ALL, {"allow": True, "access": "rw", **fuse})
    assert ("c", 10, 229, "rw") in allowed.exceptions
    # A later deny takes part of it back; access letters merge in rwm order.
    narrowed = policy_of(
        DENY_ALL,
        {"allow": True, "access": "r", **fuse},
        {"allow": True, "access": "mw", **fuse},
        {"allow": False, "access": "w", **fuse},
    )
    assert ("c", 10, 229, "rm") in narrowed.exceptions
    gone = policy_of(DENY_ALL, {"allow": True, "access": "rw", **fuse}, DENY_ALL)
    assert gone == policy_of(DENY_ALL)


def test_the_spec_cannot_take_runcs_defaults_away() -> None:
    """They come after the spec's rules, as in runc (its own comment calls that wrong, but
    every runc container has them)."""
    policy = policy_of(
        DENY_ALL, {"allow": False, "type": "c", "major": 1, "minor": 3, "access": "rwm"}
    )
    assert ("c", 1, 3, "rwm") in policy.exceptions


def test_allow_all_with_denied_devices() -> None:
    policy = policy_of(ALLOW_ALL, {"allow": False, "type": "b", "major": 259, "access": "rw"})
    assert policy.default_allow
    assert policy.exceptions == (("b", 259, -1, "rw"),)
    assert lines(policy) == ["devices.allow a *:* rwm", "devices.deny b 259:* rw"]


def test_a_hole_in_a_wildcard_rule_is_refused_naming_the_rule() -> None:
    with pytest.raises(SpecError) as info:
        policy_of(
            DENY_ALL,
            {"allow": True, "type": "c", "major": 4, "access": "rw"},
            {"allow": False, "type": "c", "major": 4, "minor": 1, "access": "w"},
        )
    assert info.value.message.startswith(
        "linux.resources.devices[2]: deny c 4:1 w cannot be applied after the exception "
        "c 4:* rw: cgroup device rules cannot take access away from part of a wildcard rule"
    )
    # runc's own defaults are applied the same way: an allow-all spec that denies a whole
    # major cannot then get /dev/null back.
    with pytest.raises(SpecError, match="runc's default rule: allow c 1:3 rwm"):
        policy_of(ALLOW_ALL, {"allow": False, "type": "c", "major": 1, "access": "rwm"})


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"allow": True}, "linux.resources.devices[0].access: device access cannot be empty"),
        ({"allow": True, "access": ""}, "devices[0].access: device access cannot be empty"),
        ({"allow": True, "access": "rwx"}, 'devices[0].access: unknown device access "rwx"'),
        ({"allow": True, "type": "u", "access": "r"}, 'invalid cgroup device type "u"'),
        ({"allow": True, "type": "c", "major": -2, "access": "r"}, "major: -2 is out of range"),
        ({"allow": True, "type": "c", "minor": 1 << 32, "access": "r"}, "minor: 4294967296 is"),
        ({"allow": "yes", "access": "r"}, "devices[0].allow: expected true or false"),
    ],
)
def test_invalid_rules_name_the_field(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_resources({"devices": [rule]}, "linux.resources")


def test_equal_policies_are_equal_whatever_the_rules_that_made_them() -> None:
    """The policy is what the program is made of: podman's rules for /dev/fuse, written two
    ways, give one policy (and one program)."""
    fuse = {"type": "c", "major": 10, "minor": 229}
    first = policy_of(DENY_ALL, {"allow": True, "access": "rwm", **fuse})
    second = policy_of(
        {"allow": True, "access": "m", **fuse}, {"allow": True, "access": "rw", **fuse}
    )
    assert first == second and hash(first) == hash(second)
