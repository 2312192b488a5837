"""Seccomp profiles compiled to classic BPF, run in a small BPF interpreter."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from ocispec import seccomp
from ocispec.errors import SpecError
from ocispec.syscall_table import table

NR = table("x86_64") or {}
X86_64 = seccomp.AUDIT_ARCH_X86_64
I386 = seccomp.AUDIT_ARCH_I386


def run_bpf(program: bytes, nr: int, arch: int = X86_64, args: tuple[int, ...] = ()) -> int:
    """Interpret ``program`` on a ``struct seccomp_data``; return the filter's verdict."""
    padded = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0x1000, *padded)
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    acc = 0
    pc = 0
    steps = 0
    while True:
        steps += 1
        assert steps < 10000, "runaway program"
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == seccomp.LD_W_ABS:
            assert k % 4 == 0 and k + 4 <= len(data)
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == seccomp.ALU_AND_K:
            acc &= k
        elif code == seccomp.JMP_JA:
            pc += k
        elif code in (seccomp.JMP_JEQ_K, seccomp.JMP_JGT_K, seccomp.JMP_JGE_K):
            taken = {
                seccomp.JMP_JEQ_K: acc == k,
                seccomp.JMP_JGT_K: acc > k,
                seccomp.JMP_JGE_K: acc >= k,
            }[code]
            pc += jt if taken else jf
        elif code == seccomp.RET_K:
            return int(k)
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert 0 <= pc < len(insns), "jump out of the program"


def compile_profile(**profile: Any) -> bytes:
    profile.setdefault("defaultAction", "SCMP_ACT_ALLOW")
    return seccomp.compile(profile, "x86_64").program


ALLOW = seccomp.RET_ALLOW
EPERM = seccomp.RET_ERRNO | 1


def test_unconditional_rules_and_default() -> None:
    program = compile_profile(
        defaultAction="SCMP_ACT_ERRNO",
        syscalls=[
            {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        ],
    )
    assert run_bpf(program, NR["read"]) == ALLOW
    assert run_bpf(program, NR["exit_group"]) == ALLOW
    assert run_bpf(program, NR["ptrace"]) == seccomp.RET_KILL_PROCESS
    assert run_bpf(program, NR["mkdir"]) == seccomp.RET_ERRNO | 13
    assert run_bpf(program, NR["open"]) == EPERM  # default errno is EPERM


def test_default_errno_ret() -> None:
    program = compile_profile(defaultAction="SCMP_ACT_ERRNO", defaultErrnoRet=38)
    assert run_bpf(program, NR["open"]) == seccomp.RET_ERRNO | 38


def test_architectures() -> None:
    program = compile_profile(
        architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        syscalls=[{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}],
    )
    # Listed but without a table here: ENOSYS rather than bypassing the rules.
    assert run_bpf(program, 39, arch=I386) == seccomp.RET_ERRNO | 38
    # Not listed at all: killed, as libseccomp does.
    assert run_bpf(program, 1, arch=seccomp.AUDIT_ARCH_AARCH64) == seccomp.RET_KILL_PROCESS
    # x32 syscall numbers on x86_64: killed unless SCMP_ARCH_X32 is listed.
    assert run_bpf(program, NR["mkdir"] | 0x40000000) == seccomp.RET_KILL_PROCESS
    with_x32 = compile_profile(architectures=["SCMP_ARCH_X32"])
    assert run_bpf(with_x32, NR["mkdir"] | 0x40000000) == seccomp.RET_ERRNO | 38


U64 = (1 << 64) - 1
CASES = [0, 1, 14, 15, 16, 0xFFFFFFFF, 1 << 32, (1 << 32) + 15, U64 - 1, U64]


@pytest.mark.parametrize(
    ("op", "value", "check"),
    [
        ("SCMP_CMP_EQ", 15, lambda a: a == 15),
        ("SCMP_CMP_EQ", (1 << 32) + 15, lambda a: a == (1 << 32) + 15),
        ("SCMP_CMP_NE", 15, lambda a: a != 15),
        ("SCMP_CMP_LT", 15, lambda a: a < 15),
        ("SCMP_CMP_LE", 15, lambda a: a <= 15),
        ("SCMP_CMP_GT", 15, lambda a: a > 15),
        ("SCMP_CMP_GE", 15, lambda a: a >= 15),
        ("SCMP_CMP_GT", 1 << 32, lambda a: a > 1 << 32),
        ("SCMP_CMP_LT", (1 << 32) + 15, lambda a: a < (1 << 32) + 15),
        ("SCMP_CMP_LE", U64 - 1, lambda a: a <= U64 - 1),
        ("SCMP_CMP_GE", 0xFFFFFFFF, lambda a: a >= 0xFFFFFFFF),
    ],
)
def test_64_bit_comparisons(op: str, value: int, check: Any) -> None:
    program = compile_profile(
        syscalls=[
            {
                "names": ["kill"],
                "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 1, "value": value, "op": op}],
            }
        ]
    )
    for arg in CASES:
        expected = EPERM if check(arg) else ALLOW
        assert run_bpf(program, NR["kill"], args=(0, arg)) == expected, (op, value, arg)


def test_masked_eq_and_several_args_and_rules_in_order() -> None:
    clone_newuser = 0x10000000
    program = compile_profile(
        defaultAction="SCMP_ACT_ERRNO",
        syscalls=[
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": 0, "value": clone_newuser, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
                ],
            },
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 97,
                "args": [
                    {"index": 0, "value": 16, "op": "SCMP_CMP_EQ"},
                    {"index": 2, "value": 9, "op": "SCMP_CMP_EQ"},
                ],
            },
            {"names": ["socket"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["socket"], "action": "SCMP_ACT_KILL"},  # unreachable
        ],
    )
    assert run_bpf(program, NR["clone"], args=(0x11,)) == ALLOW
    assert run_bpf(program, NR["clone"], args=(clone_newuser | 0x11,)) == EPERM
    assert run_bpf(program, NR["socket"], args=(16, 3, 9)) == seccomp.RET_ERRNO | 97
    assert run_bpf(program, NR["socket"], args=(16, 3, 0)) == ALLOW
    assert run_bpf(program, NR["socket"], args=(2, 1, 9)) == ALLOW


def test_docker_sized_profile_fits_and_allows_everything_listed() -> None:
    names = sorted(NR)
    program = compile_profile(
        defaultAction="SCMP_ACT_ERRNO",
        architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        syscalls=[
            {"names": names, "action": "SCMP_ACT_ALLOW"},
            {"names": ["not_a_syscall_we_know"], "action": "SCMP_ACT_ALLOW"},
        ],
    )
    assert len(program) // 8 < 4096
    for name, nr in NR.items():
        assert run_bpf(program, nr) == ALLOW, name
    assert run_bpf(program, 1000) == EPERM


def test_flags() -> None:
    compiled = seccomp.compile(
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        },
        "x86_64",
    )
    assert compiled.flags == 2 | 4


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (
            {"defaultAction": "SCMP_ACT_BOGUS"},
            'seccomp.defaultAction: unknown action "SCMP_ACT_BOGUS"',
        ),
        ({"defaultAction": None}, 'seccomp.defaultAction: unknown action "None"'),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]},
            'seccomp.architectures[0]: unknown architecture "SCMP_ARCH_Z80"',
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]},
            'seccomp.flags[0]: unknown flag "SECCOMP_FILTER_FLAG_NEW_LISTENER"',
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["kill"], "action": "SCMP_ACT_NOTIFY"}],
            },
            "seccomp.syscalls[0].action: SCMP_ACT_NOTIFY is not supported",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["kill"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 1, "value": 1, "op": "SCMP_CMP_SOMETIMES"}],
                    }
                ],
            },
            'seccomp.syscalls[0].args[0].op: unknown operator "SCMP_CMP_SOMETIMES"',
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["kill"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}],
                    }
                ],
            },
            "seccomp.syscalls[0].args[0].index: 6 is out of range [0, 5]",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}],
            },
            "seccomp.syscalls[0].names: must not be empty",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": -1}],
            },
            "seccomp.syscalls[0].errnoRet: -1 is not an errno value",
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/notify.sock"},
            "seccomp.listenerPath: SCMP_ACT_NOTIFY is not supported",
        ),
    ],
)
def test_profile_errors(profile: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        seccomp.compile(profile, "x86_64")
    assert info.value.message == message


def test_unknown_machine() -> None:
    with pytest.raises(SpecError, match="no syscall table for architecture riscv64"):
        seccomp.compile({"defaultAction": "SCMP_ACT_ALLOW"}, "riscv64")


def test_the_run_profile_allows_what_docker_and_podman_allow() -> None:
    """``pysandbox run``'s default profile against the decisions of podman's default profile
    (containers-common's seccomp.json, docker's rules) for syscalls a workload uses:
    debuggers (ptrace, process_vm_readv), ``linux32`` (personality 8), NUMA policy; while
    kernel administration stays refused and other personalities too."""
    from sandbox.run.default_spec import default_seccomp

    program = seccomp.compile(default_seccomp(), "x86_64").program
    for name in (
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "get_mempolicy",
        "mbind",
        "set_mempolicy",
        "name_to_handle_at",
    ):
        assert run_bpf(program, NR[name]) == ALLOW, name
    for persona in (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert run_bpf(program, NR["personality"], args=(persona,)) == ALLOW, hex(persona)
    for persona in (0x0400000, 0x1, 0x8 | 0x0400000):  # READ_IMPLIES_EXEC, PER_SVR4...
        assert run_bpf(program, NR["personality"], args=(persona,)) == EPERM, hex(persona)
    for name in ("mount", "kexec_load", "init_module", "bpf", "move_pages", "userfaultfd"):
        assert run_bpf(program, NR[name]) == EPERM, name
