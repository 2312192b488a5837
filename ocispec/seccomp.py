"""Compile an OCI seccomp profile (``linux.seccomp``) into a classic BPF program.

No libseccomp: the guest needs no extra package, and the program is small and testable (the
unit tests run it in a BPF interpreter). Layout of the generated program::

    ld  arch
    jeq NATIVE_ARCH -> native
    jeq <each other listed arch> -> enosys        (no syscall table for it here)
    ret KILL_PROCESS                              (architecture not in the profile)
    enosys: ret ERRNO(ENOSYS)
    native:
    ld  nr
    jge 0x40000000 -> x32 (x86_64 only)           ENOSYS if SCMP_ARCH_X32 listed, else kill
    for each syscall with rules, by number:
        jeq nr -> ret ACTION                      (one unconditional rule)
      or
        jeq nr, else ja next                      (rules with argument conditions)
        <conds of rule 1> ret ACTION1; <conds of rule 2> ret ACTION2 ...; ld nr
    next: ...
    ret DEFAULT

Semantics: the profile is enforced for the native ABI. For one syscall, rules are tried in
profile order and the first whose conditions all hold decides (libseccomp would merge them;
real profiles never depend on the difference). Conditions compare the full 64-bit argument,
like libseccomp. Syscall names this table does not know are skipped, as runc does.
Not supported (error): SCMP_ACT_NOTIFY and listenerPath, the NEW_LISTENER filter flag.
"""

from __future__ import annotations

import os
import struct

from ocispec import syscall_table
from ocispec.errors import SpecError

RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000

ACTIONS = {
    "SCMP_ACT_KILL": RET_KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": RET_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": RET_KILL_PROCESS,
    "SCMP_ACT_TRAP": RET_TRAP,
    "SCMP_ACT_ERRNO": RET_ERRNO,
    "SCMP_ACT_TRACE": RET_TRACE,
    "SCMP_ACT_LOG": RET_LOG,
    "SCMP_ACT_ALLOW": RET_ALLOW,
}

FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7

#: SCMP_ARCH_* -> AUDIT_ARCH_* (0 for x32: it shares x86_64's and sets bit 30 of the nr).
ARCHITECTURES = {
    "SCMP_ARCH_X86": AUDIT_ARCH_I386,
    "SCMP_ARCH_X86_64": AUDIT_ARCH_X86_64,
    "SCMP_ARCH_X32": 0,
    "SCMP_ARCH_ARM": 0x40000028,
    "SCMP_ARCH_AARCH64": AUDIT_ARCH_AARCH64,
    "SCMP_ARCH_MIPS": 0x00000008,
    "SCMP_ARCH_MIPS64": 0x80000008,
    "SCMP_ARCH_MIPS64N32": 0xA0000008,
    "SCMP_ARCH_MIPSEL": 0x40000008,
    "SCMP_ARCH_MIPSEL64": 0xC0000008,
    "SCMP_ARCH_MIPSEL64N32": 0xE0000008,
    "SCMP_ARCH_PPC": 0x00000014,
    "SCMP_ARCH_PPC64": 0x80000015,
    "SCMP_ARCH_PPC64LE": 0xC0000015,
    "SCMP_ARCH_S390": 0x00000016,
    "SCMP_ARCH_S390X": 0x80000016,
    "SCMP_ARCH_PARISC": 0x0000000F,
    "SCMP_ARCH_PARISC64": 0x8000000F,
    "SCMP_ARCH_RISCV64": 0xC00000F3,
    "SCMP_ARCH_LOONGARCH64": 0xC0000102,
    "SCMP_ARCH_M68K": 0x00000004,
    "SCMP_ARCH_SH": 0x0000002A,
    "SCMP_ARCH_SHEB": 0x0000002A,
}

#: ``os.uname().machine`` -> (AUDIT_ARCH, SCMP_ARCH name).
NATIVE = {
    "x86_64": (AUDIT_ARCH_X86_64, "SCMP_ARCH_X86_64"),
    "aarch64": (AUDIT_ARCH_AARCH64, "SCMP_ARCH_AARCH64"),
}

OPERATORS = frozenset(
    {
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ",
    }
)

EPERM = 1
ENOSYS = 38
X32_SYSCALL_BIT = 0x40000000

# Classic BPF opcodes.
LD_W_ABS = 0x20
JMP_JA = 0x05
JMP_JEQ_K = 0x15
JMP_JGT_K = 0x25
JMP_JGE_K = 0x35
ALU_AND_K = 0x54
RET_K = 0x06

OFFSET_NR = 0
OFFSET_ARCH = 4
OFFSET_ARGS = 16
UINT64_MAX = (1 << 64) - 1


class Filter:
    """A compiled profile: the ``struct sock_filter`` array and the seccomp(2) flags."""

    __slots__ = ("flags", "program")

    def __init__(self, program: bytes, flags: int) -> None:
        self.program = program
        self.flags = flags

    def __len__(self) -> int:
        return len(self.program) // 8


# An instruction: (code, jt, jf, k); jt/jf (conditional) and k (ja) may be a label name.
_Insn = tuple[int, "int | str", "int | str", "int | str"]


class _Assembler:
    def __init__(self) -> None:
        self.items: list[_Insn | str] = []
        self._labels = 0

    def label(self) -> str:
        self._labels += 1
        return f"L{self._labels}"

    def place(self, label: str) -> None:
        self.items.append(label)

    def emit(self, code: int, jt: int | str = 0, jf: int | str = 0, k: int | str = 0) -> None:
        self.items.append((code, jt, jf, k))

    def assemble(self, profile: str) -> bytes:
        """The program; ``profile`` (the profile's field path) prefixes the errors."""
        where: dict[str, int] = {}
        count = 0
        for item in self.items:
            if isinstance(item, str):
                where[item] = count
            else:
                count += 1
        out = []
        pc = 0
        for item in self.items:
            if isinstance(item, str):
                continue
            code, jt, jf, k = item
            jt_off = where[jt] - pc - 1 if isinstance(jt, str) else jt
            jf_off = where[jf] - pc - 1 if isinstance(jf, str) else jf
            k_val = where[k] - pc - 1 if isinstance(k, str) else k
            if not (0 <= jt_off <= 255 and 0 <= jf_off <= 255):
                raise SpecError(f"{profile}.syscalls: a rule has too many argument conditions")
            out.append(struct.pack("=HBBI", code, jt_off, jf_off, k_val & 0xFFFFFFFF))
            pc += 1
        if pc > 4096:
            raise SpecError(f"{profile}: profile compiles to {pc} instructions, more than 4096")
        return b"".join(out)


def _action(name: object, errno_ret: object, at: str, errno_at: str, default_errno: int) -> int:
    """The SECCOMP_RET value of action ``name`` (field ``at``) with its errno (``errno_at``)."""
    if not isinstance(name, str) or name not in ACTIONS:
        if name == "SCMP_ACT_NOTIFY":
            raise SpecError(f"{at}: SCMP_ACT_NOTIFY is not supported")
        raise SpecError(f'{at}: unknown action "{name}"')
    base = ACTIONS[name]
    if base in (RET_ERRNO, RET_TRACE):
        errno = default_errno if errno_ret is None else errno_ret
        if isinstance(errno, bool) or not isinstance(errno, int) or not 0 <= errno <= 0xFFFF:
            raise SpecError(f"{errno_at}: {errno!r} is not an errno value")
        return base | errno
    return base


def _u64(value: object, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT64_MAX:
        raise SpecError(f"{where}: expected an unsigned 64-bit integer, got {value!r}")
    return value


def _condition(asm: _Assembler, arg: object, where: str, fail: str) -> None:
    """Emit code that falls through when the condition holds and jumps to ``fail`` otherwise."""
    if not isinstance(arg, dict):
        raise SpecError(f"{where}: expected an object")
    index = arg.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 5:
        raise SpecError(f"{where}.index: {index!r} is out of range [0, 5]")
    op = arg.get("op")
    if op not in OPERATORS:
        raise SpecError(f'{where}.op: unknown operator "{op}"')
    value = _u64(arg.get("value"), f"{where}.value")
    value_two = _u64(arg.get("valueTwo"), f"{where}.valueTwo")
    lo_at = OFFSET_ARGS + 8 * index  # little-endian halves of the 64-bit argument
    hi_at = lo_at + 4
    hi, lo = value >> 32, value & 0xFFFFFFFF
    ok = asm.label()
    if op == "SCMP_CMP_EQ":
        asm.emit(LD_W_ABS, k=hi_at)
        asm.emit(JMP_JEQ_K, 0, fail, hi)
        asm.emit(LD_W_ABS, k=lo_at)
        asm.emit(JMP_JEQ_K, ok, fail, lo)
    elif op == "SCMP_CMP_NE":
        asm.emit(LD_W_ABS, k=hi_at)
        asm.emit(JMP_JEQ_K, 0, ok, hi)
        asm.emit(LD_W_ABS, k=lo_at)
        asm.emit(JMP_JEQ_K, fail, ok, lo)
    elif op in ("SCMP_CMP_GT", "SCMP_CMP_GE"):
        asm.emit(LD_W_ABS, k=hi_at)
        asm.emit(JMP_JGT_K, ok, 0, hi)
        asm.emit(JMP_JEQ_K, 0, fail, hi)
        asm.emit(LD_W_ABS, k=lo_at)
        asm.emit(JMP_JGT_K if op == "SCMP_CMP_GT" else JMP_JGE_K, ok, fail, lo)
    elif op in ("SCMP_CMP_LT", "SCMP_CMP_LE"):
        asm.emit(LD_W_ABS, k=hi_at)
        asm.emit(JMP_JGT_K, fail, 0, hi)
        asm.emit(JMP_JEQ_K, 0, ok, hi)
        asm.emit(LD_W_ABS, k=lo_at)
        # LT fails when lo >= value.lo, LE when lo > value.lo.
        asm.emit(JMP_JGE_K if op == "SCMP_CMP_LT" else JMP_JGT_K, fail, ok, lo)
    else:  # SCMP_CMP_MASKED_EQ: (arg & value) == valueTwo
        asm.emit(LD_W_ABS, k=hi_at)
        asm.emit(ALU_AND_K, k=hi)
        asm.emit(JMP_JEQ_K, 0, fail, value_two >> 32)
        asm.emit(LD_W_ABS, k=lo_at)
        asm.emit(ALU_AND_K, k=lo)
        asm.emit(JMP_JEQ_K, ok, fail, value_two & 0xFFFFFFFF)
    asm.place(ok)


def compile(profile: dict[str, object], machine: str | None = None, at: str = "seccomp") -> Filter:
    """Validate and compile ``profile`` for ``machine`` (default: this one).

    ``at`` is the profile's field path (``linux.seccomp``): every SpecError names the field
    below it (``linux.seccomp.syscalls[3].action: unknown action "X"``).
    """
    machine = machine or os.uname().machine
    native = NATIVE.get(machine)
    table = syscall_table.table(machine)
    if native is None or table is None:
        raise SpecError(f"{at}: no syscall table for architecture {machine}")
    native_arch, native_name = native
    if profile.get("listenerPath"):
        raise SpecError(f"{at}.listenerPath: SCMP_ACT_NOTIFY is not supported")
    default = _action(
        profile.get("defaultAction"),
        profile.get("defaultErrnoRet"),
        f"{at}.defaultAction",
        f"{at}.defaultErrnoRet",
        EPERM,
    )

    flags = 0
    for j, flag in enumerate(_as_list(profile.get("flags"), f"{at}.flags")):
        if not isinstance(flag, str) or flag not in FLAGS:
            raise SpecError(f'{at}.flags[{j}]: unknown flag "{flag}"')
        flags |= FLAGS[flag]

    arch_names = _as_list(profile.get("architectures"), f"{at}.architectures")
    others: list[int] = []
    x32 = False
    for j, arch in enumerate(arch_names):
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise SpecError(f'{at}.architectures[{j}]: unknown architecture "{arch}"')
        if arch == "SCMP_ARCH_X32":
            x32 = True
        elif arch != native_name and ARCHITECTURES[arch] not in others:
            others.append(ARCHITECTURES[arch])

    # Rules per syscall number, in profile order.
    rules: dict[int, list[tuple[list[object], int, str]]] = {}
    for i, raw in enumerate(_as_list(profile.get("syscalls"), f"{at}.syscalls")):
        where = f"{at}.syscalls[{i}]"
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: expected an object")
        names = _as_list(raw.get("names"), f"{where}.names")
        if not names:
            raise SpecError(f"{where}.names: must not be empty")
        action = _action(
            raw.get("action"), raw.get("errnoRet"), f"{where}.action", f"{where}.errnoRet", EPERM
        )
        args = _as_list(raw.get("args"), f"{where}.args")
        for name in names:
            if not isinstance(name, str):
                raise SpecError(f"{where}.names: expected strings")
            nr = table.get(name)
            if nr is not None:
                rules.setdefault(nr, []).append((args, action, f"{where}.args"))

    asm = _Assembler()
    native_label = asm.label()
    asm.emit(LD_W_ABS, k=OFFSET_ARCH)
    asm.emit(JMP_JEQ_K, native_label, 0, native_arch)
    if others:
        enosys = asm.label()
        for arch_value in others:
            asm.emit(JMP_JEQ_K, enosys, 0, arch_value)
        asm.emit(RET_K, k=RET_KILL_PROCESS)
        asm.place(enosys)
        asm.emit(RET_K, k=RET_ERRNO | ENOSYS)
    else:
        asm.emit(RET_K, k=RET_KILL_PROCESS)
    asm.place(native_label)
    asm.emit(LD_W_ABS, k=OFFSET_NR)
    if native_arch == AUDIT_ARCH_X86_64:
        asm.emit(JMP_JGE_K, 0, 1, X32_SYSCALL_BIT)
        asm.emit(RET_K, k=(RET_ERRNO | ENOSYS) if x32 else RET_KILL_PROCESS)
    for nr in sorted(rules):
        entries = rules[nr]
        if not entries[0][0]:  # first rule unconditional: it always decides
            if entries[0][1] != default:
                asm.emit(JMP_JEQ_K, 0, 1, nr)
                asm.emit(RET_K, k=entries[0][1])
            continue
        after = asm.label()
        asm.emit(JMP_JEQ_K, 1, 0, nr)
        asm.emit(JMP_JA, k=after)
        for args, action, where in entries:
            fail = asm.label()
            for j, arg in enumerate(args):
                _condition(asm, arg, f"{where}[{j}]", fail)
            asm.emit(RET_K, k=action)
            asm.place(fail)
            if not args:
                break  # later rules for this syscall are unreachable
        asm.emit(LD_W_ABS, k=OFFSET_NR)
        asm.place(after)
    asm.emit(RET_K, k=default)
    return Filter(asm.assemble(at), flags)


def _as_list(value: object, where: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected an array")
    return value
