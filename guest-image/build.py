"""Build the pysandbox guest image: kernel, initramfs, read-only erofs root and manifest.

Run with the project venv's python from the repository root (``make guest-image``)::

    .venv/bin/python guest-image/build.py --out /var/lib/pysandbox/guest

Contract:

* Inputs (package and module lists, the build scripts, the kernel ABI package that
  ``linux-image-<flavour>`` currently resolves to, the agent sources, the host venv's h2 and
  protobuf versions) are hashed; if ``<out>/manifest.json`` records the same hash and every file
  it lists exists, nothing is done (exit 0). ``--force`` rebuilds anyway.
* Everything is built in a temporary directory next to ``<out>`` and renamed into place at the
  end, so ``<out>`` is either the previous complete image, absent for an instant, or the new
  complete image; never half-built.
* Downloads (Debian .debs via ``apt-get download``, PyPI wheels via ``pip download``) are cached
  in ``--cache`` (default ``/var/cache/pysandbox``). Nothing is installed on the host.
* Output is reproducible: the same inputs and downloads give byte-identical files
  (fixed SOURCE_DATE_EPOCH, erofs UUID, uid/gid 0, sorted cpio entries).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from hypervisor.pvh import has_pvh_note  # noqa: E402

FORMAT = 1
#: Default build timestamp (overridable with SOURCE_DATE_EPOCH): 2024-01-01T00:00:00Z.
DEFAULT_EPOCH = 1704067200
#: Fixed erofs filesystem UUID so the root image is reproducible.
EROFS_UUID = "5c4f0b1e-7e57-4d1a-9a1e-0123456789ab"
#: root.erofs is padded with zeros to a multiple of this (bytes): it is the guest's
#: virtio-pmem root (hypervisor.qemu_args.PMEM_ALIGN, which must be the same).
ROOT_ALIGN = 2 << 20
#: How the root image is attached, recorded in the manifest (hypervisor.guest_image).
ROOT_DEVICE = "virtio-pmem"
#: The agent's gRPC server is h2 (pure Python, with hpack and hyperframe) and protobuf's
#: messages (agent/grpc_server.py): no grpcio in the guest.
PYTHON_PACKAGES = ("h2", "protobuf")
PY_VERSION = "3.11"
#: Stdlib parts never used by the agent (saves ~25 MB and compile time).
STDLIB_TRIM = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "venv",
    "config-3.11-x86_64-linux-gnu",
    "unittest/test",
    "ctypes/test",
    "sqlite3/test",
    "idlelib",
    "site-packages",
    "dist-packages",
    "sitecustomize.py",  # Debian's apport hook (symlink into /etc/python3.11)
)
#: Paths (relative to the root) removed after extracting the .debs.
ROOT_TRIM = (
    "usr/share",
    "usr/lib/x86_64-linux-gnu/gconv",
    "etc/python3.11/sitecustomize.py",
    "usr/lib/x86_64-linux-gnu/audit",
    "usr/lib/gcc",
    "usr/libexec",
    "usr/lib/valgrind",
    "etc/ld.so.conf.d",
    "usr/bin/busybox",
    "bin/busybox",
    "usr/bin/pydoc3.11",
    "usr/bin/pygettext3.11",
    "usr/lib/mime",
    "usr/lib/tmpfiles.d",
    "usr/lib/binfmt.d",
    "sbin",
    "usr/sbin",
)
BUSYBOX_INITRAMFS_APPLETS = (
    "sh",
    "mount",
    "insmod",
    "switch_root",
    "poweroff",
    "env",
    "usleep",
    "sleep",
    "cat",
    "echo",
    "mkdir",
)
#: What the floor's network mode adds (floor-net-initramfs.cpio; bench/network.py): the
#: virtio-net driver with the PCI transport, and the applets the pod side of the network
#: benchmark runs (the same busybox as the containers' default image).
FLOOR_NET_MODULES = ("virtio_pci", "virtio_net")
FLOOR_NET_APPLETS = ("ip", "nc", "dd", "wc")
#: Kernel command line the image is tuned and tested for (recorded in the manifest).
#: ``acpi=noirq``: no ACPI PCI interrupt routing. Evaluating the PCI link devices' AML costs
#: ~0.1 s per virtio-pci device under TCG (in virtio_pci's probe) and ~0.1 s for the built-in
#: devices; virtio devices use MSI-X, legacy ones the BIOS PIRQ table. ACPI power-off still
#: works. ``tracer_init_tracefs``: no tracefs files (their ~10k pinned dentries and inodes
#: are ~9 MiB of slab that every pod restored from a template holds).
KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 cryptomgr.notests tsc=reliable no_timer_check noreplace-smp "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 mitigations=off audit=0 "
    "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,load_system_certificate_list,"
    "tracer_init_tracefs "
    "acpi=noirq"
)
#: How ``/init`` starts the agent (PID 1): see agent_launcher.py for why not ``-m agent``.
AGENT_ARGV = (
    "/usr/bin/python3.11",
    "-u",
    "-S",
    "-c",
    "import agent_launcher; agent_launcher.main()",
)
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")


def log(message: str) -> None:
    print(f"guest-image: {message}", file=sys.stderr, flush=True)


class BuildError(Exception):
    """A build step failed; the message says what and how to fix it."""


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; raise BuildError with its stderr on failure."""
    proc = subprocess.run(cmd, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ModuleLists:
    """modules.txt split by when each module is loaded (names as written there)."""

    boot: list[str]  # always, by /init
    device: dict[str, list[str]]  # by /init when a virtio device with that id (0x....) exists
    on_demand: list[str]  # never by /init: in the root for the agent to load when needed

    @property
    def all(self) -> list[str]:
        return [*self.boot, *(m for mods in self.device.values() for m in mods), *self.on_demand]


def read_modules(path: Path) -> ModuleLists:
    """Parse modules.txt: ``NAME boot``, ``NAME virtio:0xID`` or ``NAME root`` per line."""
    boot: list[str] = []
    device: dict[str, list[str]] = {}
    on_demand: list[str] = []
    for row in read_list(path):
        if len(row) != 2:
            raise BuildError(f"{path.name}: expected 'NAME WHEN', got {' '.join(row)!r}")
        name, when = row
        if when == "boot":
            boot.append(name)
        elif when == "root":
            on_demand.append(name)
        elif when.startswith("virtio:"):
            ident = when.removeprefix("virtio:").lower()
            try:
                ident = f"0x{int(ident, 16):04x}"
            except ValueError:
                raise BuildError(f"{path.name}: bad virtio device id in {when!r}") from None
            device.setdefault(ident, []).append(name)
        else:
            raise BuildError(f"{path.name}: {name}: unknown class {when!r}")
    return ModuleLists(boot, device, on_demand)


def read_list(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append(line.split())
    return rows


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# apt


def apt_candidates(packages: Iterable[str]) -> dict[str, str]:
    """Candidate version of each package from the configured apt sources."""
    names = sorted(set(packages))
    out = run(["apt-cache", "policy", *names]).stdout
    versions: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                versions[current] = version
    missing = [n for n in names if n not in versions]
    if missing:
        raise BuildError(
            f"no apt candidate for {' '.join(missing)}: run 'apt-get update' (Debian 12 sources)"
        )
    return versions


def kernel_abi_package(flavour: str) -> str:
    """Name of the versioned kernel package that ``linux-image-<flavour>`` depends on."""
    meta = f"linux-image-{flavour}"
    out = run(["apt-cache", "depends", meta]).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip()
            if name.startswith("linux-image-"):
                return name
    raise BuildError(f"cannot resolve {meta}: run 'apt-get update' (Debian 12 sources)")


def deb_filename(name: str, version: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_amd64.deb"


def fetch_debs(versions: dict[str, str], cache: Path) -> dict[str, Path]:
    """Download (once) each ``name=version`` .deb into ``cache``; return their paths."""
    cache.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    wanted = []
    for name, version in versions.items():
        path = cache / deb_filename(name, version)
        if not path.exists():
            alt = cache / path.name.replace("_amd64.deb", "_all.deb")
            if alt.exists():
                path = alt
        paths[name] = path
        if not path.exists():
            wanted.append(f"{name}={version}")
    if wanted:
        log(f"downloading {len(wanted)} .deb(s) into {cache}")
        opts = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        run(["apt-get", *opts, "download", *wanted], cwd=str(cache))
    for name, path in list(paths.items()):
        if not path.exists():
            alt = cache / path.name.replace("_amd64.deb", "_all.deb")
            if not alt.exists():
                raise BuildError(f"apt-get download did not produce {path.name}")
            paths[name] = alt
    return paths


def extract_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)])


# ---------------------------------------------------------------------------------------------
# kernel

_COMPRESSORS = (  # (magic, command) for the bzImage payload
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
    (b"\x1f\x8b", ["gzip", "-dc"]),
)


def elf_complete(data: bytes) -> bool:
    """True if ``data`` is a 64-bit ELF whose headers, segments and sections all fit in it."""
    if len(data) < 64 or data[:5] != b"\x7fELF\x02":
        return False
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    for i in range(phnum):
        _, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        end = max(end, offset + filesz)
    return bool(end <= len(data))


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the ELF vmlinux embedded in a bzImage (payload_offset from the setup header).

    The decompressor may complain about trailing bytes (the payload carries the decompressed
    size after the stream); that is accepted as long as the ELF is complete.
    """
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        raise BuildError(f"{bzimage} is not a bzImage")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    for magic, command in _COMPRESSORS:
        if payload.startswith(magic):
            proc = subprocess.run(command, input=payload, capture_output=True)
            if not elf_complete(proc.stdout):
                raise BuildError(
                    f"{' '.join(command)} on {bzimage.name} gave no complete ELF: "
                    f"{proc.stderr.decode(errors='replace').strip()}"
                )
            out.write_bytes(proc.stdout)
            return
    raise BuildError(f"unknown compression in {bzimage.name} (magic {payload[:6].hex()})")


@dataclass
class Module:
    name: str  # canonical, underscores
    relpath: str  # relative to /lib/modules/<ver>
    depends: list[str]
    aliases: list[str] = field(default_factory=list)  # modinfo alias= (e.g. rtnl-link-bridge)


def modinfo(path: Path) -> dict[str, list[str]]:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as handle:
        section = ELFFile(handle).get_section_by_name(".modinfo")
        raw = section.data() if section is not None else b""
    info: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, value = item.decode(errors="replace").split("=", 1)
            info.setdefault(key, []).append(value)
    return info


def builtin_modules(moddir: Path) -> set[str]:
    """Names and aliases of modules built into the kernel (modules.builtin{,.modinfo})."""
    names: set[str] = set()
    builtin = moddir / "modules.builtin"
    if builtin.exists():
        for line in builtin.read_text().splitlines():
            names.add(Path(line).name.removesuffix(".ko").replace("-", "_"))
    info = moddir / "modules.builtin.modinfo"
    if info.exists():
        for item in info.read_bytes().split(b"\0"):
            key, _, value = item.decode(errors="replace").partition("=")
            if key.endswith(".alias"):
                names.add(value.replace("-", "_"))
    return names


def index_modules(moddir: Path, builtin: set[str]) -> dict[str, Module]:
    """Every module of the kernel package with its hard deps and resolved ``softdep pre:`` deps.

    A soft dependency (e.g. libcrc32c's ``pre: crc32c``) names a module or an alias; it is
    skipped when built in, else resolved to the first module (by name) carrying the alias.
    """
    modules: dict[str, Module] = {}
    aliases: dict[str, list[str]] = {}
    softdeps: dict[str, list[str]] = {}
    for path in sorted(moddir.rglob("*.ko")):
        name = path.name[:-3].replace("-", "_")
        info = modinfo(path)
        deps = [d.replace("-", "_") for d in info.get("depends", [""])[0].split(",") if d]
        modules[name] = Module(name, str(path.relative_to(moddir)), deps, info.get("alias", []))
        for alias in info.get("alias", []):
            aliases.setdefault(alias.replace("-", "_"), []).append(name)
        for softdep in info.get("softdep", []):
            words = softdep.split()
            if words and words[0] == "pre:":
                pre = []
                for word in words[1:]:
                    if word.endswith(":"):
                        break
                    pre.append(word.replace("-", "_"))
                softdeps[name] = pre
    for name, pre in softdeps.items():
        for dep in pre:
            if dep in modules:
                modules[name].depends.insert(0, dep)
            elif dep not in builtin and dep in aliases:
                modules[name].depends.insert(0, sorted(aliases[dep])[0])
    return modules


def module_closure(wanted: list[str], index: dict[str, Module], builtin: set[str]) -> list[Module]:
    """Modules of ``wanted`` plus dependencies, each after everything it depends on."""
    order: list[Module] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in index:
            if name in builtin:
                return
            raise BuildError(f"kernel module {name} not found in the kernel package")
        for dep in index[name].depends:
            visit(dep, (*chain, name))
        seen.add(name)
        order.append(index[name])

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def write_modules_dep(
    moddir: Path, modules: list[Module], index: dict[str, Module], builtin: set[str]
) -> None:
    """Write modules.dep (kmod format) for the shipped modules, transitive deps listed first."""
    lines = []
    for mod in sorted(modules, key=lambda m: m.relpath):
        closure = module_closure([mod.name], index, builtin)[:-1]
        deps = " ".join(m.relpath for m in reversed(closure))
        lines.append(f"{mod.relpath}:{(' ' + deps) if deps else ''}")
    (moddir / "modules.dep").write_text("\n".join(lines) + "\n")


def write_modules_alias(moddir: Path, modules: list[Module]) -> None:
    """Write modules.alias (``alias PATTERN MODULE``) for the shipped modules, so that the
    kernel's requests (``request_module("rtnl-link-bridge")``, ``net-pf-N``...) find them
    through the guest's modprobe (busybox, see :data:`MODPROBE_HELPER`)."""
    lines = [
        f"alias {alias} {mod.name}"
        for mod in sorted(modules, key=lambda m: m.name)
        for alias in sorted(set(mod.aliases))
    ]
    (moddir / "modules.alias").write_text("\n".join(lines) + "\n")


#: The guest's modprobe (a busybox applet link), which the agent makes the kernel's
#: usermode helper (/proc/sys/kernel/modprobe): privileged containers get on-demand modules.
MODPROBE_HELPER = "usr/lib/pysandbox/bin/modprobe"


# ---------------------------------------------------------------------------------------------
# cpio (newc), written directly so device nodes need no root and output is reproducible


@dataclass
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_bytes(entries: list[CpioEntry], mtime: int) -> bytes:
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(encoded)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate(sorted(entries, key=lambda e: e.name), start=1):
        add(entry.name, entry.mode, entry.data, ino, entry.rdev)
    add("TRAILER!!!", 0, b"", 0, (0, 0))
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def busybox_entries(busybox: bytes, applets: Iterable[str]) -> list[CpioEntry]:
    entries = [
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        CpioEntry("proc", stat.S_IFDIR | 0o755),
        CpioEntry("sys", stat.S_IFDIR | 0o755),
        CpioEntry("sbin", stat.S_IFLNK | 0o777, b"bin"),
    ]
    entries += [CpioEntry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in applets]
    return entries


# ---------------------------------------------------------------------------------------------
# root filesystem


def iter_elves(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    yield path


def needed_libs(path: Path) -> list[str]:
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as handle:
        elf = ELFFile(handle)
        needed: list[str] = []
        for section in elf.iter_sections():
            if isinstance(section, DynamicSection):
                needed += [
                    str(t.needed)  # type: ignore[attr-defined]
                    for t in section.iter_tags()
                    if t.entry.d_tag == "DT_NEEDED"
                ]
        return needed


def check_and_prune_libs(root: Path) -> list[str]:
    """Remove stdlib extension modules whose libraries are not shipped; fail for other ELFs."""
    available: set[str] = set()
    for libdir in LIB_DIRS:
        directory = root / libdir
        if directory.is_dir():
            available.update(p.name for p in directory.iterdir())
    removed: list[str] = []
    for path in iter_elves(root):
        rel = path.relative_to(root)
        if rel.parts[:2] == ("lib", "modules"):
            continue
        local = {p.name for p in path.parent.iterdir()}
        missing = [n for n in needed_libs(path) if n not in available and n not in local]
        if not missing:
            continue
        if "lib-dynload" in rel.parts:
            path.unlink()
            removed.append(rel.name.split(".")[0])
        else:
            raise BuildError(f"/{rel} needs {', '.join(missing)} which the image does not ship")
    return removed


def install_wheel(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            dest = target / info.filename
            if ".." in Path(info.filename).parts:
                raise BuildError(f"unsafe path {info.filename} in {wheel.name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(archive.read(info))
            executable = (info.external_attr >> 16) & 0o111 or dest.suffix == ".so"
            dest.chmod(0o755 if executable else 0o644)


def fetch_wheels(versions: dict[str, str], cache: Path) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)

    def find() -> list[Path]:
        found = []
        for name, version in versions.items():
            stem = name.replace("-", "_")
            matches = sorted(cache.glob(f"{stem}-{version}-*.whl"))
            if matches:
                found.append(matches[0])
        return found

    if len(find()) != len(versions):
        log(f"downloading wheels into {cache}")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                PY_VERSION,
                "--implementation",
                "cp",
                "--platform",
                "manylinux2014_x86_64",
                "-d",
                str(cache),
                *(f"{n}=={v}" for n, v in versions.items()),
            ]
        )
    wheels = find()
    if len(wheels) != len(versions):
        raise BuildError(f"pip download did not produce wheels for {versions}")
    return wheels


#: The Python packages that run in the guest: the agent, the host<->guest contract, the OCI
#: spec parser (shared with the host).
GUEST_PACKAGES = ("agent", "agentapi", "ocispec")


def copy_agent(dest: Path) -> None:
    """Copy the guest packages (:data:`GUEST_PACKAGES`) into ``dest``/<package>."""
    if not (REPO / "agentapi/proto/agent_pb2.py").exists():
        raise BuildError("agentapi/proto/agent_pb2.py missing: run 'make proto'")
    for package in GUEST_PACKAGES:
        _copy_package(REPO / package, dest / package)


#: Host-only files of the guest packages: grpcio's stubs (the guest has no grpcio).
HOST_ONLY = frozenset({"agent_pb2_grpc.py", "agent_pb2_grpc.pyi"})


def _copy_package(src: Path, dest: Path) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo"):
            continue
        if path.name in HOST_ONLY:
            continue
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix in (".py", ".proto", ".typed", ".pyi"):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def trim_stdlib(root: Path) -> None:
    stdlib = root / "usr/lib/python3.11"
    for name in STDLIB_TRIM:
        path = stdlib / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for rel in ROOT_TRIM:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for cache in list(root.rglob("__pycache__")):
        shutil.rmtree(cache)


def compile_python(root: Path) -> None:
    """Byte-compile every .py with the image's own python3.11 (unchecked-hash .pyc).

    The image's interpreter runs directly from the staging tree (same Debian 12 userland as the
    host); its bytecode magic is checked against the host venv's so tools on either side agree.
    """
    python = root / "usr/bin/python3.11"
    env = {
        "PATH": "/usr/bin:/bin",
        "LC_ALL": "C",
        "SOURCE_DATE_EPOCH": os.environ["SOURCE_DATE_EPOCH"],
    }
    magic = run(
        [str(python), "-I", "-S", "-c", "import importlib.util as u;print(u.MAGIC_NUMBER.hex())"],
        env=env,
    ).stdout.strip()
    if magic != importlib.util.MAGIC_NUMBER.hex():
        raise BuildError(
            f"bytecode magic of the image's python ({magic}) differs from the host venv's "
            f"({importlib.util.MAGIC_NUMBER.hex()}): the host venv must be python {PY_VERSION}"
        )
    dirs = [root / "usr/lib/python3.11", root / "usr/lib/pysandbox"]
    run(
        [
            str(python),
            "-I",
            "-S",
            "-m",
            "compileall",
            "-q",
            "-f",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(root),
            "-p",
            "/",
            "-x",
            r"(/test/|/tests/|lib2to3|bad_coding|badsyntax)",
            *map(str, dirs),
        ],
        env=env,
    )


def populate_etc(root: Path) -> None:
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "hostname").write_text("pysandbox\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    (etc / "os-release").write_text(
        'ID=pysandbox-guest\nNAME="pysandbox guest (Debian 12 userland)"\n'
    )
    for name in ("resolv.conf", "mtab"):
        (etc / name).unlink(missing_ok=True)
    (etc / "mtab").symlink_to("../proc/self/mounts")


def normalise_tree(root: Path, epoch: int) -> None:
    """Fix permissions and timestamps so the erofs image is reproducible."""
    for path in sorted(root.rglob("*"), reverse=True):
        if not path.is_symlink():
            mode = path.stat().st_mode
            if stat.S_ISREG(mode):
                path.chmod(0o755 if mode & 0o111 else 0o644)
            elif stat.S_ISDIR(mode):
                path.chmod(0o1777 if path.name == "tmp" and path.parent == root else 0o755)
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


# ---------------------------------------------------------------------------------------------
# inputs hash


def venv_versions() -> dict[str, str]:
    """Versions in the host venv of PYTHON_PACKAGES and their run-time requirements (no extras).

    The guest gets exactly these versions so both ends of the gRPC channel match.
    """
    import re

    versions: dict[str, str] = {}
    pending = list(PYTHON_PACKAGES)
    while pending:
        name = re.sub(r"[-_.]+", "-", pending.pop()).lower()
        if name in versions:
            continue
        try:
            versions[name] = importlib.metadata.version(name)
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError as exc:
            raise BuildError(f"{name} is not installed in the host venv: run 'make venv'") from exc
        for req in requires:
            if "extra ==" not in req:
                pending.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    return dict(sorted(versions.items()))


def inputs_hash(
    flavour: str, kernel_pkg: str, kernel_version: str, pyversions: dict[str, str]
) -> str:
    digest = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    for name in (
        "build.py",
        "packages.txt",
        "modules.txt",
        "init.sh",
        "floor-init.sh",
        "guest-image.mk",
        "agent_launcher.py",
    ):
        feed(name, (HERE / name).read_bytes())
    feed("hypervisor/pvh.py", (REPO / "hypervisor/pvh.py").read_bytes())
    sources = [p for pkg in GUEST_PACKAGES for p in (REPO / pkg).rglob("*.py")]
    for path in sorted([*sources, REPO / "agentapi/proto/agent.proto"]):
        if "__pycache__" not in path.parts:
            feed(str(path.relative_to(REPO)), path.read_bytes())
    feed("kernel", f"{flavour} {kernel_pkg} {kernel_version}".encode())
    feed("python", json.dumps(pyversions, sort_keys=True).encode())
    feed("epoch", os.environ.get("SOURCE_DATE_EPOCH", str(DEFAULT_EPOCH)).encode())
    return digest.hexdigest()


def image_is_current(out: Path, wanted_hash: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != FORMAT or manifest.get("inputs_hash") != wanted_hash:
        return False
    return all((out / name).is_file() for name in manifest.get("files", {}))


# ---------------------------------------------------------------------------------------------
# main build


def build(out: Path, cache: Path, flavour: str, force: bool) -> int:
    epoch = int(os.environ.setdefault("SOURCE_DATE_EPOCH", str(DEFAULT_EPOCH)))
    kernel_pkg = kernel_abi_package(flavour)
    package_names = [row[0] for row in read_list(HERE / "packages.txt")]
    versions = apt_candidates([*package_names, kernel_pkg])
    pyversions = venv_versions()
    wanted = inputs_hash(flavour, kernel_pkg, versions[kernel_pkg], pyversions)
    if not force and image_is_current(out, wanted):
        log(f"{out} is up to date ({wanted[:12]})")
        return 0

    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    debs = fetch_debs(versions, cache / "debs")
    wheels = fetch_wheels(pyversions, cache / "wheels")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        work = tmp / ".work"
        image = tmp / "image"
        image.mkdir(parents=True)
        manifest = build_into(image, work, debs, wheels, versions, kernel_pkg, pyversions, epoch)
        manifest["inputs_hash"] = wanted
        shutil.rmtree(work)
        (image / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        old = tmp / "old"
        if out.exists():
            out.rename(old)
        image.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {out} in {time.monotonic() - started:.1f}s")
    return 0


def pad_to(path: Path, align: int) -> None:
    """Extend ``path`` with zeros to the next multiple of ``align`` bytes (erofs ignores
    what follows its last block)."""
    size = path.stat().st_size
    os.truncate(path, -(-size // align) * align)


def build_into(
    image: Path,
    work: Path,
    debs: dict[str, Path],
    wheels: list[Path],
    versions: dict[str, str],
    kernel_pkg: str,
    pyversions: dict[str, str],
    epoch: int,
) -> dict[str, object]:
    # --- kernel ---------------------------------------------------------------------------
    kdir = work / "kernel"
    extract_deb(debs[kernel_pkg], kdir)
    vmlinuz = next((kdir / "boot").glob("vmlinuz-*"))
    kver = vmlinuz.name.removeprefix("vmlinuz-")
    moddir_src = kdir / "lib/modules" / kver
    extract_vmlinux(vmlinuz, work / "vmlinux")
    if has_pvh_note(work / "vmlinux"):
        kernel_file, boot = "vmlinux", "pvh"
        shutil.move(str(work / "vmlinux"), image / "vmlinux")
    else:
        log("vmlinux has no PVH note: falling back to booting the bzImage")
        kernel_file, boot = "vmlinuz", "bzimage"
        shutil.copyfile(vmlinuz, image / "vmlinuz")

    builtin = builtin_modules(moddir_src)
    index = index_modules(moddir_src, builtin)
    lists = read_modules(HERE / "modules.txt")
    boot_mods = module_closure(lists.boot, index, builtin)
    loaded = {m.name for m in boot_mods}
    device_mods: dict[str, list[Module]] = {}
    for ident, names in sorted(lists.device.items()):
        device_mods[ident] = [
            m for m in module_closure(names, index, builtin) if m.name not in loaded
        ]
    initramfs_mods = [*boot_mods, *(m for mods in device_mods.values() for m in mods)]
    all_mods = module_closure(lists.all, index, builtin)
    at_boot = {m.name for m in initramfs_mods}
    on_demand = [m for m in all_mods if m.name not in at_boot]

    # --- root filesystem ------------------------------------------------------------------
    root = work / "root"
    for name in sorted(debs):
        if name != kernel_pkg:
            extract_deb(debs[name], root)
    busybox = (root / "bin/busybox").read_bytes()
    trim_stdlib(root)
    for directory in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "bin", "sbin", "usr/sbin"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/python3").unlink(missing_ok=True)
    (root / "usr/bin/python3").symlink_to("python3.11")
    pysandbox = root / "usr/lib/pysandbox"
    (pysandbox / "bin").mkdir(parents=True)
    (pysandbox / "bin/busybox").write_bytes(busybox)
    (pysandbox / "bin/busybox").chmod(0o755)
    site = pysandbox / "site"
    site.mkdir()
    for wheel in wheels:
        install_wheel(wheel, site)
    copy_agent(pysandbox)
    shutil.copyfile(HERE / "agent_launcher.py", pysandbox / "agent_launcher.py")
    moddir = root / "lib/modules" / kver
    for mod in all_mods:
        target = moddir / mod.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(moddir_src / mod.relpath, target)
    for name in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        if (moddir_src / name).exists():
            shutil.copyfile(moddir_src / name, moddir / name)
    write_modules_dep(moddir, all_mods, index, builtin)
    write_modules_alias(moddir, all_mods)
    (root / MODPROBE_HELPER).symlink_to("busybox")
    removed = check_and_prune_libs(root)
    if removed:
        log(f"removed extension modules without shipped libraries: {', '.join(sorted(removed))}")
    populate_etc(root)
    compile_python(root)
    normalise_tree(root, epoch)
    run(
        [
            "mkfs.erofs",
            "--quiet",
            f"-T{epoch}",
            "-U",
            EROFS_UUID,
            "--all-root",
            # No inline tails: erofs gives DAX (pages mapped from the virtio-pmem device,
            # not copied into the guest's page cache) only to files without one.
            "-Enoinline_data",
            str(image / "root.erofs"),
            str(root),
        ],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
    )
    pad_to(image / "root.erofs", ROOT_ALIGN)

    # --- initramfs ------------------------------------------------------------------------
    init = (HERE / "init.sh").read_text()
    device_lines = "\n".join(
        f"{ident} {' '.join(m.relpath for m in mods)}"
        for ident, mods in device_mods.items()
        if mods
    )
    init = (
        init.replace("@KVER@", kver)
        .replace("@MODULES@", " ".join(m.relpath for m in boot_mods))
        .replace("@DEVICE_MODULES@", device_lines)
        .replace("@AGENT_ARGV@", " ".join(shlex.quote(arg) for arg in AGENT_ARGV))
    )
    entries = busybox_entries(busybox, BUSYBOX_INITRAMFS_APPLETS)
    entries += [
        CpioEntry("init", stat.S_IFREG | 0o755, init.encode()),
        CpioEntry("newroot", stat.S_IFDIR | 0o755),
        CpioEntry("lib", stat.S_IFDIR | 0o755),
    ]
    dirs = {"lib/modules", f"lib/modules/{kver}"}
    for mod in initramfs_mods:
        parts = Path(mod.relpath).parts
        dirs.update(f"lib/modules/{kver}/" + "/".join(parts[:i]) for i in range(1, len(parts)))
        entries.append(
            CpioEntry(
                f"lib/modules/{kver}/{mod.relpath}",
                stat.S_IFREG | 0o644,
                (moddir_src / mod.relpath).read_bytes(),
            )
        )
    entries += [CpioEntry(d, stat.S_IFDIR | 0o755) for d in sorted(dirs)]
    (image / "initramfs.cpio").write_bytes(cpio_bytes(entries, epoch))

    floor = busybox_entries(busybox, BUSYBOX_INITRAMFS_APPLETS)
    floor.append(CpioEntry("init", stat.S_IFREG | 0o755, (HERE / "floor-init.sh").read_bytes()))
    (image / "floor-initramfs.cpio").write_bytes(cpio_bytes(floor, epoch))
    floor_net = busybox_entries(busybox, (*BUSYBOX_INITRAMFS_APPLETS, *FLOOR_NET_APPLETS))
    floor_net.append(floor[-1])  # the same /init
    floor_net.append(CpioEntry("floor-net", stat.S_IFDIR | 0o755))
    for number, mod in enumerate(module_closure(list(FLOOR_NET_MODULES), index, builtin)):
        floor_net.append(
            CpioEntry(
                f"floor-net/{number:02d}-{mod.name}.ko",
                stat.S_IFREG | 0o644,
                (moddir_src / mod.relpath).read_bytes(),
            )
        )
    (image / "floor-net-initramfs.cpio").write_bytes(cpio_bytes(floor_net, epoch))

    files = {
        name: sha256_file(image / name)
        for name in (
            kernel_file,
            "initramfs.cpio",
            "root.erofs",
            "floor-initramfs.cpio",
            "floor-net-initramfs.cpio",
        )
    }
    return {
        "format": FORMAT,
        "kernel": {
            "package": kernel_pkg,
            "version": versions[kernel_pkg],
            "release": kver,
            "file": kernel_file,
            "boot": boot,
            "cmdline": KERNEL_CMDLINE,
        },
        "files": files,
        "root_device": ROOT_DEVICE,
        "sizes": {name: (image / name).stat().st_size for name in files},
        "packages": {name: versions[name] for name in sorted(versions)},
        "python_packages": pyversions,
        "python": PY_VERSION,
        "modules": {
            # loaded by /init, in this order
            "boot": [m.name for m in boot_mods],
            # loaded by /init only when a virtio device with that id is present
            "device": {ident: [m.name for m in mods] for ident, mods in device_mods.items()},
            # not loaded at boot; in the root (modules.dep) for the agent to load when needed
            "on_demand": [m.name for m in on_demand],
            "root": [m.name for m in all_mods],
        },
        "removed_extension_modules": sorted(removed),
        "agent": {
            "path": "/usr/lib/pysandbox/agent",
            "argv": list(AGENT_ARGV),
        },
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
        "source_date_epoch": epoch,
    }


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("/var/lib/pysandbox/guest"))
    parser.add_argument("--cache", type=Path, default=Path("/var/cache/pysandbox"))
    parser.add_argument("--kernel-flavour", default="cloud-amd64", help="linux-image-<flavour>")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    out = args.out.absolute()
    try:
        with build_lock(out):
            return build(out, args.cache.absolute(), args.kernel_flavour, args.force)
    except (BuildError, OSError) as exc:
        print(f"guest-image: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
