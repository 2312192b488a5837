"""The container's device cgroup: which device nodes it may open or create (docs/cgroups.md).

Without it a container holding ``CAP_MKNOD`` (docker's default capabilities have it) could
``mknod`` and open any device of the guest: its root disk (``/dev/pmem0``) or the pod's free
virtio-serial ports, which carry other containers' output to the host (docs/security.md).
runc denies such an ``open`` (EPERM) through the device cgroup; so does this module, with the
same policy (:func:`ocispec.device_rules.policy`: the spec's ``linux.resources.devices`` then
runc's default rules).

- **cgroup v2** (the default layout): a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program attached to the
  container's cgroup (``BPF_CGROUP_DEVICE``, ``BPF_F_ALLOW_MULTI``), which the kernel runs on
  every open and mknod of a device node by a process in that cgroup or below. The program is
  assembled here as eBPF bytecode (:func:`program`) and loaded with bpf(2) through ctypes
  (:meth:`~agent.oci.syscalls.Syscalls.load_device_program`): libbpf or bcc in the guest
  image would cost megabytes of image and their import or start-up on every container start,
  for a program of a few dozen instructions. A policy allowing everything (a privileged
  container) attaches nothing.
- **cgroup v1** (``org.pysandbox.cgroup=v1``): the same policy written to the ``devices``
  hierarchy's ``devices.deny`` / ``devices.allow`` files (:meth:`Policy.v1_writes
  <ocispec.device_rules.Policy.v1_writes>`), as runc writes them.

Both are applied before the runtime joins the cgroup (so the container's first instruction
runs under them), and every ``exec`` joins the same cgroup. A kernel that refuses the program
or the files fails the container start with one :class:`SetupError`; nothing is run without
the filter.

The program (``struct bpf_cgroup_dev_ctx``: ``access_type`` = access << 16 | type, ``major``,
``minor``; return 1 to allow, 0 to deny): load the type, access, major and minor into r2-r5;
then one block per exception of the policy, which goes on to the next block unless the type
matches, the access asked for is within the exception's (a 32-bit mask test, left out when
the exception has all of rwm) and the major and minor match (each left out for a wildcard),
and otherwise returns the exception's decision; the last block returns the default. All
comparisons are 32-bit (``BPF_JMP32``), so every major and minor number is compared whole.
"""

from __future__ import annotations

import errno
import fcntl
import struct

from agent.oci.errors import SetupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.cgroups import Cgroup
    from agent.oci.syscalls import Syscalls
    from ocispec.device_rules import Policy

#: The license the program is loaded under (the kernel asks for one; no GPL-only helper is
#: used).
LICENSE = "Apache-2.0"

#: BPF_DEVCG_DEV_* (the device's type) and BPF_DEVCG_ACC_* (the access asked for).
DEV_TYPE = {"b": 1, "c": 2}
ACC_BIT = {"m": 1, "r": 2, "w": 4}

# eBPF opcodes (linux/bpf_common.h, linux/bpf.h): class | operation | source.
_LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
_ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: dst32 &= imm
_ALU_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K: dst32 >>= imm
_ALU_MOV_K = 0xB4  # BPF_ALU | BPF_MOV | BPF_K: dst32 = imm
_ALU_MOV_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X: dst32 = src32
_JMP32_JNE_K = 0x56  # BPF_JMP32 | BPF_JNE | BPF_K: if dst32 != imm: pc += off
_JMP32_JNE_X = 0x5E  # BPF_JMP32 | BPF_JNE | BPF_X: if dst32 != src32: pc += off
_EXIT = 0x95  # BPF_JMP | BPF_EXIT: return r0

# Registers: r1 holds the context on entry; r2-r5 the fields below; r0 the result.
_R0, _R1, _TYPE, _ACCESS, _MAJOR, _MINOR = 0, 1, 2, 3, 4, 5


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn``: code, dst/src registers (4 bits each), s16 off, s32 imm."""
    if imm > 0x7FFFFFFF:
        imm -= 1 << 32  # the same 32 bits; a JMP32 compares them unsigned
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def _block(kind: str, major: int, minor: int, access: str, decision: int) -> list[tuple[int, ...]]:
    """One exception's block as (code, dst, src, skip?, imm) rows: ``skip`` 1 marks a jump to
    the next block (its offset is known once the block's length is)."""
    rows: list[tuple[int, ...]] = [(_JMP32_JNE_K, _TYPE, 0, 1, DEV_TYPE[kind])]
    if access != "rwm":
        mask = sum(ACC_BIT[letter] for letter in access)
        rows += [
            (_ALU_MOV_X, _R1, _ACCESS, 0, 0),
            (_ALU_AND_K, _R1, 0, 0, mask),
            (_JMP32_JNE_X, _R1, _ACCESS, 1, 0),  # asked for more than the exception has
        ]
    if major >= 0:
        rows.append((_JMP32_JNE_K, _MAJOR, 0, 1, major))
    if minor >= 0:
        rows.append((_JMP32_JNE_K, _MINOR, 0, 1, minor))
    rows += [(_ALU_MOV_K, _R0, 0, 0, decision), (_EXIT, 0, 0, 0, 0)]
    return rows


def program(policy: Policy) -> bytes:
    """The policy as eBPF instructions (8 bytes each; see the module docstring)."""
    code = [
        _insn(_LDX_MEM_W, _TYPE, _R1, 0),
        _insn(_ALU_AND_K, _TYPE, imm=0xFFFF),
        _insn(_LDX_MEM_W, _ACCESS, _R1, 0),
        _insn(_ALU_RSH_K, _ACCESS, imm=16),
        _insn(_LDX_MEM_W, _MAJOR, _R1, 4),
        _insn(_LDX_MEM_W, _MINOR, _R1, 8),
    ]
    decision = 0 if policy.default_allow else 1
    for kind, major, minor, access in policy.exceptions:
        rows = _block(kind, major, minor, access, decision)
        for i, (op, dst, src, skip, imm) in enumerate(rows):
            # A jump's offset counts from the next instruction: to the end of this block.
            code.append(_insn(op, dst, src, len(rows) - i - 1 if skip else 0, imm))
    code += [_insn(_ALU_MOV_K, _R0, imm=int(policy.default_allow)), _insn(_EXIT)]
    return b"".join(code)


def apply(sys: Syscalls, cgroup: Cgroup, policy: Policy) -> None:
    """Put ``cgroup`` (not yet joined) under ``policy``, in the guest's layout (see above).

    SetupError naming the cause: the kernel refused the program (the verifier's reason), has
    no bpf(2) or no cgroup device programs (ENOSYS, EINVAL on attach), or the v1 ``devices``
    hierarchy is missing or refused a line.
    """
    if cgroup.v1:
        directory = cgroup.v1_dir("devices")
        if directory is None:
            raise SetupError(
                'device cgroup: controller "devices" is not mounted in the guest\'s cgroup v1 '
                "layout"
            )
        for name, line in policy.v1_writes():
            try:
                sys.write_file(f"{directory}/{name}", line)
            except OSError as exc:
                raise SetupError.from_os(f"device cgroup: writing {line!r} to {name}", exc) from exc
        return
    if policy.allows_all:
        return  # nothing to deny: no program (the guest's own cgroups have none either)
    program_fd = _loaded.get(policy)
    own = program_fd is None
    if program_fd is None:
        try:
            program_fd = sys.load_device_program(program(policy), LICENSE)
        except OSError as exc:
            raise SetupError(_load_failure(exc, policy)) from exc
    try:
        sys.attach_device_program(cgroup.path, program_fd)
    except OSError as exc:
        raise SetupError.from_os(
            f"device cgroup: attaching the device filter to {cgroup.path}", exc
        ) from exc
    finally:
        if own:
            sys.close(program_fd)


#: Programs loaded ahead of any container: policy -> descriptor (see :func:`preload`).
_loaded: dict[Policy, int] = {}
#: The lowest descriptor number a preloaded program is kept at.
PRELOAD_FD_MIN = 64


def preload(sys: Syscalls, policy: Policy) -> None:
    """Load ``policy``'s program now and keep its descriptor, which :func:`apply` then
    attaches instead of loading the same program again.

    The zygote (:mod:`agent.oci.zygote`) preloads the policy of runc's defaults (what
    docker's, podman's, containerd's and ``pysandbox run``'s specs give), once, in the
    template VM: every runtime it forks inherits the descriptor, and a restored VM never runs
    the verifier and JIT for it (measured under TCG: 20-35 ms for the first load in a
    restored VM, 3 ms for later ones, docs/performance.md). One program attached to many
    cgroups is sound: it has no maps or other state, only its instructions, which the kernel
    keeps read-only. A load that fails is forgotten: :func:`apply` loads the program itself
    and reports the kernel's reason then.
    """
    if policy in _loaded or policy.allows_all:
        return
    try:
        fd = sys.load_device_program(program(policy), LICENSE)
    except OSError:
        return
    if fd < PRELOAD_FD_MIN:
        # Out of the way of the low descriptors a forked runtime is handed (the zygote's
        # runtime puts its request's onto 0-4).
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, PRELOAD_FD_MIN)
        sys.close(fd)
        fd = high
    _loaded[policy] = fd


def preloaded_fds() -> list[int]:
    """The descriptors :func:`preload` keeps (a forked runtime must not close them)."""
    return sorted(_loaded.values())


def _load_failure(exc: OSError, policy: Policy) -> str:
    """The one line naming why the kernel refused the program (ENOSYS: no bpf(2); EINVAL:
    a kernel without cgroup device programs, or the verifier's reason, which the wrapper
    appends; E2BIG: too many rules)."""
    if exc.errno == errno.ENOSYS:
        return (
            "device cgroup: the guest kernel has no bpf(2) (CONFIG_BPF_SYSCALL), which the "
            "device filter of cgroup v2 needs; use a kernel with it, or the cgroup v1 layout "
            "(org.pysandbox.cgroup=v1)"
        )
    hint = ""
    if exc.errno == errno.EINVAL:
        hint = " (a kernel without CONFIG_CGROUP_BPF does not know device programs)"
    elif exc.errno == errno.E2BIG:
        hint = f" ({len(policy.exceptions)} device rules are too many for one program)"
    return (
        f"device cgroup: the guest kernel refused the device filter program: "
        f"{exc.strerror or exc}{hint}"
    )
