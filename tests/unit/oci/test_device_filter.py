"""The device filter: the policy as an eBPF program (run here in a small interpreter of the
instructions it uses), and where the runtime loads and attaches it (agent.oci.device_filter).

The program is loaded and attached on the real kernel by
tests/host/test_oci_host.py::test_device_cgroup_denies_opening_a_made_node_unless_a_rule_allows_it
and in the guest by tests/integration/test_security.py.
"""

from __future__ import annotations

import errno
import itertools
import json
import struct
from typing import Any

import pytest

from agent.oci import device_filter, init
from agent.oci import syscalls as sc
from ocispec.device_rules import WILDCARD, Policy, policy
from ocispec.spec import parse_resources
from tests.unit.oci.test_oci_order import CGROUP, SYNC, fake, fake_v1, typical_spec

MASK32 = 0xFFFFFFFF
#: What r1 holds in the interpreter: the context's address (no 32-bit value).
CTX = -1


def execute(code: bytes, kind: str, access: str, major: int, minor: int) -> int:
    """Run the program on one ``struct bpf_cgroup_dev_ctx``; what it returns. Knows exactly
    the instructions device_filter emits (anything else fails the test)."""
    access_bits = sum(device_filter.ACC_BIT[letter] for letter in access)
    ctx = struct.pack("<III", access_bits << 16 | device_filter.DEV_TYPE[kind], major, minor)
    regs = [0] * 11
    regs[1] = CTX  # r1 holds the context on entry
    pc = 0
    for _step in range(len(code) // 8 + 1):  # no loops: each instruction runs at most once
        op, registers, off, imm = struct.unpack_from("<BBhi", code, pc * 8)
        dst, src = registers & 0xF, registers >> 4
        pc += 1
        if op == 0x61:  # ldxw dst, [src + off]: the context is r1's
            assert regs[src] == CTX, "loads only from the context"
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif op == 0x54:
            regs[dst] = regs[dst] & imm & MASK32
        elif op == 0x74:
            regs[dst] = (regs[dst] & MASK32) >> imm
        elif op == 0xB4:
            regs[dst] = imm & MASK32
        elif op == 0xBC:
            regs[dst] = regs[src] & MASK32
        elif op == 0x56:
            if regs[dst] & MASK32 != imm & MASK32:
                pc += off
        elif op == 0x5E:
            if regs[dst] & MASK32 != regs[src] & MASK32:
                pc += off
        elif op == 0x95:
            return int(regs[0])
        else:
            raise AssertionError(f"unexpected opcode {op:#x} at {pc - 1}")
    raise AssertionError("ran off the end")


def meaning(policy: Policy, kind: str, access: str, major: int, minor: int) -> int:
    """What the policy says (docs/cgroups.md): an exception matching the type, both numbers
    (or a wildcard) and holding every letter asked for decides the opposite of the default."""
    for e_kind, e_major, e_minor, e_access in policy.exceptions:
        if (
            e_kind == kind
            and e_major in (WILDCARD, major)
            and e_minor in (WILDCARD, minor)
            and set(access) <= set(e_access)
        ):
            return int(not policy.default_allow)
    return int(policy.default_allow)


def policy_of(*rules: dict[str, Any]) -> Policy:
    resources = parse_resources({"devices": list(rules)}, "linux.resources")
    assert resources is not None
    return policy(resources.devices)


POLICIES = {
    "runc default": policy_of({"allow": False, "access": "rwm"}),
    "fuse read-only": policy_of(
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "r"},
    ),
    "allow all but a disk": policy_of(
        {"allow": True, "access": "rwm"},
        {"allow": False, "type": "b", "major": 259, "minor": 0, "access": "rw"},
    ),
    "huge numbers": policy_of(
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": MASK32, "minor": 0x80000000, "access": "w"},
    ),
}
ACCESSES = ["r", "w", "m", "rw", "rm", "wm", "rwm"]
NUMBERS = [(1, 3), (1, 4), (5, 2), (136, 7), (10, 229), (10, 200), (259, 0), (259, 1)]
NUMBERS += [(MASK32, 0x80000000), (0x7FFFFFFF, 0x80000000), (MASK32, 0)]


@pytest.mark.parametrize("name", POLICIES)
def test_the_program_decides_as_the_policy_says(name: str) -> None:
    policy = POLICIES[name]
    code = device_filter.program(policy)
    for kind, access, (major, minor) in itertools.product("bc", ACCESSES, NUMBERS):
        expected = meaning(policy, kind, access, major, minor)
        got = execute(code, kind, access, major, minor)
        assert got == expected, (name, kind, access, major, minor)


def test_runcs_default_in_examples() -> None:
    code = device_filter.program(POLICIES["runc default"])
    allowed = [("c", "rw", 1, 3), ("c", "rw", 5, 2), ("c", "r", 136, 0), ("c", "rw", 10, 200)]
    allowed += [("b", "m", 259, 0), ("c", "m", 4, 1)]  # mknod of anything
    denied = [("b", "r", 259, 0), ("c", "w", 4, 1), ("c", "rm", 10, 229), ("c", "r", 1, 4)]
    assert [execute(code, *case) for case in allowed] == [1] * len(allowed)
    assert [execute(code, *case) for case in denied] == [0] * len(denied)


def test_program_size_is_a_few_instructions_per_exception() -> None:
    code = device_filter.program(POLICIES["runc default"])
    assert len(code) % 8 == 0 and len(code) // 8 == 64
    assert device_filter.program(policy_of({"allow": True, "access": "rwm"})) == bytes.fromhex(
        "611200000000000054020000ffff0000"  # the loads are always there
        "6113000000000000740300001000000061140400000000006115080000000000"
        "b400000001000000" + "9500000000000000"  # return 1: allow
    )


# -- where the runtime applies it -----------------------------------------------------------


def error_line(system: sc.RecordingSyscalls) -> bytes:
    line = [c for c in system.calls if c[0] == "write" and c[1] == SYNC][-1][2]
    assert isinstance(line, bytes)
    return line


def test_a_privileged_container_gets_no_program() -> None:
    spec = typical_spec()
    spec["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    system = fake()
    with pytest.raises(sc.FakeExec):
        init.run(system, json.dumps(spec).encode(), SYNC, CGROUP)
    assert "load_device_program" not in system.names()
    assert ("write_file", f"{CGROUP}/cgroup.procs", "0") in system.calls


def test_the_programs_rules_are_the_specs() -> None:
    spec = typical_spec()
    spec["linux"]["resources"]["devices"] = [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "r"},
    ]
    system = fake()
    with pytest.raises(sc.FakeExec):
        init.run(system, json.dumps(spec).encode(), SYNC, CGROUP)
    assert system.device_programs == [device_filter.program(POLICIES["fuse read-only"])]


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        (
            "load_device_program",
            b"error SETUP_FAILED device cgroup: the guest kernel refused the device filter "
            b"program: load_device_program: Invalid argument (a kernel without "
            b"CONFIG_CGROUP_BPF does not know device programs)\n",
        ),
        (
            "attach_device_program",
            b"error SETUP_FAILED device cgroup: attaching the device filter to "
            b"/sys/fs/cgroup/pysandbox/c1: attach_device_program: Invalid argument\n",
        ),
    ],
)
def test_a_refused_program_is_one_error_and_the_container_never_joins(
    fail: str, message: bytes
) -> None:
    system = fake()
    system.fail[fail] = errno.EINVAL
    assert init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP) == 1
    assert error_line(system) == message
    names = system.names()
    assert "fork" not in names and "execve" not in names
    assert ("write_file", f"{CGROUP}/cgroup.procs", "0") not in system.calls


def test_no_bpf_syscall_says_so() -> None:
    system = fake()
    system.fail["load_device_program"] = errno.ENOSYS
    assert init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP) == 1
    assert b"the guest kernel has no bpf(2) (CONFIG_BPF_SYSCALL)" in error_line(system)


def test_v1_layout_without_the_devices_hierarchy_is_refused() -> None:
    system = fake_v1()
    del system.fs["/run/cgroup-v1/devices"]
    del system.fs["/run/cgroup-v1/devices/pysandbox"]
    code = init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP, "/run/cgroup-v1")
    assert code == 1
    assert error_line(system) == (
        b'error SETUP_FAILED device cgroup: controller "devices" is not mounted in the '
        b"guest's cgroup v1 layout\n"
    )


def test_a_preloaded_program_is_attached_not_loaded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zygote preloads runc's default policy: a container with that policy attaches
    the preloaded program (and keeps it open for the next); another policy loads its own."""
    monkeypatch.setattr(device_filter, "_loaded", {})
    loader = sc.RecordingSyscalls()
    device_filter.preload(loader, POLICIES["runc default"])
    assert loader.names() == ["load_device_program"]
    assert device_filter.preloaded_fds() == [sc.DEVICE_PROGRAM_FD]
    system = fake()
    with pytest.raises(sc.FakeExec):
        init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP)
    assert "load_device_program" not in system.names()
    assert ("attach_device_program", CGROUP, sc.DEVICE_PROGRAM_FD) in system.calls
    assert ("close", sc.DEVICE_PROGRAM_FD) not in system.calls
    spec = typical_spec()
    spec["linux"]["resources"]["devices"] = [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "r"},
    ]
    other = fake()
    with pytest.raises(sc.FakeExec):
        init.run(other, json.dumps(spec).encode(), SYNC, CGROUP)
    assert other.device_programs == [device_filter.program(POLICIES["fuse read-only"])]
