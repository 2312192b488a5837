"""Images for ``pysandbox run``: where a root filesystem and its defaults come from.

An image name is one of:

- ``default``: busybox, built locally from Debian's busybox-static on first use (offline);
- a plain root filesystem directory, used in place;
- an OCI image layout directory, an oci-archive or a docker-archive tarball (see
  ``sandbox.image.formats``), optionally ``PATH:NAME`` to pick one image of several.

Layouts and archives are unpacked once into the image store (:data:`IMAGE_STORE`,
``$PYSANDBOX_IMAGE_STORE``) as ``sha256/<hex>/rootfs`` plus ``sha256/<hex>/config.json`` (the
image config), keyed by the manifest digest (OCI) or the config digest (docker-archive).
An entry is built in a temporary directory next to it and renamed into place only once
complete, so an entry that exists is complete; a later run with the same image reuses it.
``sha256/`` is private to root: images may carry setuid-root files.

An image resolves to a read-only host directory plus its configuration (argv, env, cwd, user);
:func:`resolve_user` turns the user into ids using the image's own passwd and group files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor import syscalls
from hypervisor.process import pid_alive
from sandbox.errors import ConfigError, ImageError
from sandbox.image import formats as image_formats
from sandbox.image.unpack import (
    Unpacker,
    apply_blob,
    hash_blob,
    mismatch,
    read_in_root,
    remove_tree,
)

IMAGE_STORE = Path(os.environ.get("PYSANDBOX_IMAGE_STORE", "/var/lib/pysandbox/images"))
DEFAULT_IMAGE = "default"
_BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_ENV = [DEFAULT_PATH]
MAX_ID = 2**32 - 2
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Image:
    """A resolved image: its root filesystem and run defaults."""

    name: str
    rootfs: Path
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=lambda: ["sh"])
    env: list[str] = field(default_factory=lambda: list(DEFAULT_ENV))
    cwd: str = "/"
    user: str = ""
    #: The image's STOPSIGNAL as written ("" for none): what ``stop`` sends first.
    stop_signal: str = ""
    #: The image's VOLUME paths (absolute, normalised): ``run`` mounts a writable directory
    #: at each, seeded from the image, as docker's anonymous volumes.
    volumes: tuple[str, ...] = ()
    #: A store entry (unpacked by us, never changed while a run uses it: ``rmi`` refuses),
    #: not a directory of the user's used in place.
    stored: bool = False


def resolve(name: str, progress: bool = False) -> Image:
    """Resolve an image name (see the module docstring); ConfigError when unusable.

    ``progress`` allows a progress line on stderr while an image is unpacked (shown only
    when stderr is a terminal). Unpacking happens at most once per image; on failure
    nothing is left in the store.
    """
    if name == DEFAULT_IMAGE:
        return Image(DEFAULT_IMAGE, ensure_default_image(progress), stored=True)
    path, ref = _split_ref(name)
    if path is None:
        raise ConfigError(
            f"image {name} not found: give 'default', a root filesystem directory, an OCI "
            "image layout, a docker-archive/oci-archive tarball or an image reference"
        )
    if ref == "":
        raise ConfigError(f"image {name}: empty image name after ':'")
    try:
        if path.is_dir() and _is_layout(path):
            return _from_source(name, image_formats.DirectorySource(path), ref, progress)
        if path.is_dir():
            if ref is not None:
                raise ConfigError(
                    f"image {name}: {path} is a root filesystem directory; ':{ref}' only "
                    "selects an image inside an OCI layout or an archive"
                )
            if not any((path / d).exists() for d in ("bin", "usr", "sbin")):
                raise ConfigError(
                    f"image {name} does not look like a root filesystem (no bin, sbin or usr)"
                )
            return Image(str(path), path.resolve())
        if path.is_file():
            with image_formats.ArchiveSource(path) as source:
                return _from_source(name, source, ref, progress)
    except ImageError as exc:
        raise ConfigError(f"image {name}: {exc}") from None
    raise ConfigError(f"image {name}: not a directory or a regular file")


def is_local(name: str) -> bool:
    """Whether ``name`` names the default image or something on this host (a path, or
    ``PATH:NAME`` with an existing PATH) rather than an image in a registry."""
    return name == DEFAULT_IMAGE or _split_ref(name)[0] is not None


def resolve_local(name: str, quiet: bool = False) -> Image | None:
    """The image of ``pysandbox run NAME`` when NAME is local (:func:`is_local`, or written as
    a path: a missing one is "not found"): :func:`resolve`; None for a name to pull from a
    registry (:func:`sandbox.image.pull.resolve_image`)."""
    if not (is_local(name) or name.startswith(("/", "./", "../", "~"))):
        return None
    return resolve(name, progress=not quiet)


def _split_ref(name: str) -> tuple[Path | None, str | None]:
    """``name`` as a path, or ``PATH:REF`` when ``name`` itself does not exist."""
    if os.path.lexists(name):
        return Path(name), None
    for position, char in enumerate(name):
        if char == ":" and position and os.path.exists(name[:position]):
            return Path(name[:position]), name[position + 1 :]
    return None, None


def _is_layout(path: Path) -> bool:
    """Whether a directory is an OCI layout or an unpacked docker-archive (not a rootfs)."""
    if (path / "oci-layout").is_file():
        return True
    if (path / "index.json").is_file() and (path / "blobs").is_dir():
        return True
    return (path / "manifest.json").is_file() and not (path / "bin").exists()


def _from_source(name: str, source: image_formats.Source, ref: str | None, progress: bool) -> Image:
    plan = image_formats.load(source, ref)
    install(name, source, plan, progress)
    return image_from(name, entry_path(plan.key), plan.config)


def entry_path(key: str) -> Path:
    """The store entry of ``key`` (``sha256:<hex>``, validated by the caller)."""
    return IMAGE_STORE / "sha256" / key.partition(":")[2]


def is_complete(key: str) -> bool:
    """Whether the store holds a complete entry for ``key``."""
    return _complete(entry_path(key))


def install(
    name: str, source: image_formats.Source, plan: image_formats.Plan, progress: bool
) -> bool:
    """Unpack ``plan`` from ``source`` into the store unless its entry is complete already;
    return whether it was unpacked now. ImageError for bad content, ConfigError for a store
    that cannot be written; nothing is left in the store on failure."""
    entry = entry_path(plan.key)
    if _complete(entry):
        return False
    _build(name, source, plan, entry.parent, entry, progress)
    return True


def remove_entry(key: str) -> None:
    """Remove the store entry of ``key``: renamed aside first (so that no run ever sees it
    half-removed as complete), then deleted."""
    entry = entry_path(key)
    if not entry.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=_tmp_prefix(entry.name), dir=entry.parent))
    os.rename(entry, aside / "old")
    _remove_tree(aside)


def image_from(name: str, entry: Path, config: image_formats.ImageConfig) -> Image:
    """The :class:`Image` of a complete store entry with the run defaults of ``config``."""
    env = list(config.env)
    if not any(item.startswith("PATH=") for item in env):
        env.insert(0, DEFAULT_PATH)
    return Image(
        name,
        entry / "rootfs",
        entrypoint=list(config.entrypoint),
        cmd=list(config.cmd),
        env=env,
        cwd=config.cwd,
        user=config.user,
        stop_signal=config.stop_signal,
        volumes=config.volumes,
        stored=True,
    )


def _complete(entry: Path) -> bool:
    return (entry / "rootfs").is_dir() and (entry / "config.json").is_file()


def _build(
    name: str,
    source: image_formats.Source,
    plan: image_formats.Plan,
    store: Path,
    entry: Path,
    progress: bool,
) -> None:
    """Unpack ``plan`` into a temporary directory of ``store`` and rename it to ``entry``."""
    try:
        store.mkdir(parents=True, exist_ok=True)
        os.chmod(store, 0o700)
        _sweep(store)
        if entry.exists():  # incomplete: not made by this code; set it aside and rebuild
            aside = Path(tempfile.mkdtemp(prefix=_tmp_prefix(entry.name), dir=store))
            os.rename(entry, aside / "old")
            _remove_tree(aside)
        work = Path(tempfile.mkdtemp(prefix=_tmp_prefix(entry.name), dir=store))
    except OSError as exc:
        raise ConfigError(
            f"image {name}: cannot write the image store {store}: {exc.strerror}; "
            "set PYSANDBOX_IMAGE_STORE to a writable directory"
        ) from None
    shown = _Progress(progress and sys.stderr.isatty())
    try:
        rootfs = work / "rootfs"
        rootfs.mkdir()
        with Unpacker(rootfs) as unpacker:
            for position, layer in enumerate(plan.layers, 1):
                label = f"layer {position}/{len(plan.layers)}"
                _apply_layer(source, layer, unpacker, label, shown)
            unpacker.finish()
            notes = unpacker.notes
        (work / "config.json").write_bytes(plan.config_bytes)
        _sync(work)
        try:
            os.rename(work, entry)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _complete(entry):
                raise
            _remove_tree(work)  # another run unpacked the same image meanwhile
        shown.finish(f"unpacked {name} ({len(plan.layers)} layers)")
        for note in notes:
            shown.note(f"image {name}: {note}")
    except BaseException as exc:
        shown.finish("")
        _remove_tree(work)
        if isinstance(exc, ImageError):
            raise
        if isinstance(exc, OSError):
            raise ConfigError(
                f"image {name}: cannot unpack into {store}: {exc.strerror or exc}"
            ) from None
        raise


def _apply_layer(
    source: image_formats.Source,
    layer: image_formats.Layer,
    unpacker: Unpacker,
    label: str,
    shown: _Progress,
) -> None:
    """Verify one layer blob, then apply it (checking the same digests over what is applied)."""
    what = f"{label} ({layer.path})"
    size = source.size(layer.path)
    if size != layer.size:
        raise ImageError(f"{what} is {size} bytes, its descriptor says {layer.size}")
    check_plain = layer.digest is None and layer.diff_id is not None
    with source.open(layer.path) as blob:
        stored, plain = hash_blob(
            blob, what, decompress=check_plain, on_read=shown.start(f"checking {label}", size)
        )
    if layer.digest is not None and stored != layer.digest:
        raise mismatch(what, layer.digest, stored)
    if check_plain and layer.diff_id is not None and plain != layer.diff_id:
        raise mismatch(what, layer.diff_id, plain or "")
    with source.open(layer.path) as blob:
        apply_blob(
            unpacker,
            blob,
            what,
            expect_digest=stored,
            expect_diff_id=layer.diff_id,
            on_read=shown.start(f"unpacking {label}", size),
        )


def _tmp_prefix(key_hex: str) -> str:
    return f"{_TMP_PREFIX}{key_hex[:12]}-{os.getpid()}-"


def _sweep(store: Path) -> None:
    """Remove temporary directories left by runs that died (their pid is gone).

    One that cannot be removed stays and is ignored: it never stops another image (each
    build works in a directory of its own).
    """
    for child in store.iterdir():
        if not child.name.startswith(_TMP_PREFIX):
            continue
        fields = child.name.split("-")
        if len(fields) < 3 or not fields[2].isdigit() or pid_alive(int(fields[2])):
            continue
        _remove_tree(child)


def _remove_tree(path: Path) -> None:
    """Remove a tree we made, however deep and even where an image left directories without
    write permission (:func:`~sandbox.image.unpack.remove_tree`); never raises: what cannot
    be removed is left for the next sweep and blocks nothing."""
    with contextlib.suppress(OSError):
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            remove_tree(parent, path.name)
        finally:
            os.close(parent)


def _sync(path: Path) -> None:
    """Flush the filesystem holding ``path`` so that the rename never lands before the data."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syscalls.LIBC.syncfs(fd) != 0:
            os.sync()
    except (OSError, AttributeError):
        os.sync()
    finally:
        os.close(fd)


class _Progress:
    """One rewritten line on stderr (``unpacking layer 2/5 (12.3 MB) 40%``), when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._label = ""
        self._total = 0
        self._last = 0.0
        self._dirty = False

    def start(self, label: str, total: int) -> Callable[[int], None] | None:
        """Show ``label`` and return the callback to report bytes done (None when disabled)."""
        if not self.enabled:
            return None
        self._label, self._total = label, total
        self._show(0)
        return self._update

    def _update(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._show(done)

    def _show(self, done: int) -> None:
        percent = f" {min(100, done * 100 // self._total)}%" if self._total else ""
        size = human_size(self._total)
        sys.stderr.write(f"\rpysandbox: {self._label} ({size}){percent}\x1b[K")
        sys.stderr.flush()
        self._dirty = True

    def finish(self, text: str) -> None:
        """Replace the line with ``text`` (or clear it when empty)."""
        if not self.enabled or not (self._dirty or text):
            return
        sys.stderr.write("\r\x1b[K" + (f"pysandbox: {text}\n" if text else ""))
        sys.stderr.flush()
        self._dirty = False

    def note(self, text: str) -> None:
        """A line worth knowing about the unpacked image."""
        if self.enabled:
            print(f"pysandbox: {text}", file=sys.stderr)


def human_size(size: int) -> str:
    """``12.3 MB``, ``4.0 kB``, ``512 B`` (decimal units)."""
    if size >= 1_000_000:
        return f"{size / 1e6:.1f} MB"
    if size >= 1_000:
        return f"{size / 1e3:.1f} kB"
    return f"{size} B"


def resolve_user(rootfs: Path, user: str, where: str | None = None) -> tuple[int, int]:
    """(uid, gid) for a ``USER[:GROUP]`` spec (image ``User`` or ``--user``), docker-style.

    USER and GROUP are numbers or names. Names are looked up in the image's ``/etc/passwd``
    and ``/etc/group``, read with symlinks resolved inside ``rootfs`` only (nothing outside
    it is opened). Without GROUP the gid is the user's passwd entry's, or 0 for a numeric
    uid the image does not list (as runc does). ``""`` is (0, 0). ConfigError for an unknown
    name, a malformed spec or an id outside 0..2**32-2; its message names the files as
    ``{where}/etc/passwd`` (default: ``rootfs``'s path; ``"IMAGE:"`` for a stored image,
    whose path in the store means nothing to its user).
    """

    def read(path: str) -> bytes | None:
        return read_in_root(rootfs, path, image_formats.MAX_JSON)

    return resolve_user_with(read, user, str(rootfs) if where is None else where)


def supplementary_gids(rootfs: Path, user: str, where: str | None = None) -> list[int]:
    """The supplementary groups of a ``USER[:GROUP]`` spec in the image (``""``: root), as
    docker gives them (moby/sys/user ``GetExecUser``): without GROUP, the gid of every
    ``/etc/group`` entry that lists the user's name among its members, in file order, each
    once; with GROUP none ("only in the implicit form"). The name is the passwd entry's for a
    numeric uid (none, so no groups, for a uid the image does not list). Files read as
    :func:`resolve_user` reads them; ConfigError as it raises (``where`` as its)."""

    def read(path: str) -> bytes | None:
        return read_in_root(rootfs, path, image_formats.MAX_JSON)

    return supplementary_gids_with(read, user, str(rootfs) if where is None else where)


def supplementary_gids_with(
    read: Callable[[str], bytes | None], user: str, where: str
) -> list[int]:
    """:func:`supplementary_gids` with the files read by ``read`` (as
    :func:`resolve_user_with`'s)."""
    user_part, has_group, _ = user.partition(":")
    if has_group:
        return []
    user_part = user_part or "0"
    passwd = _id_file(read, where, "etc/passwd", user)
    if user_part.isdigit():
        name = next((f[0] for f in passwd if len(f) >= 3 and f[2] == user_part), None)
    else:
        name = user_part if any(f and f[0] == user_part for f in passwd) else None
    if not name:
        return []
    gids: list[int] = []
    for fields in _id_file(read, where, "etc/group", user):
        if len(fields) >= 4 and fields[2].isdigit() and name in fields[3].split(","):
            gid = _id(fields[2], user)
            if gid not in gids:
                gids.append(gid)
    return gids


def resolve_user_with(
    read: Callable[[str], bytes | None], user: str, where: str, owner: str = "the image"
) -> tuple[int, int]:
    """:func:`resolve_user` with the passwd and group files read by ``read`` (a path relative
    to the root, ``etc/passwd``: its bytes, None when there is none; ImageError or OSError
    when it cannot be read). ``where`` prefixes those paths in messages (``ROOTFS/etc/passwd``,
    ``NAME:/etc/passwd``), ``owner`` names what defines the users ("the image")."""
    if not user:
        return 0, 0
    user_part, has_group, group_part = user.partition(":")
    if not user_part or (has_group and not group_part):
        raise ConfigError(f"invalid user {user!r}: use USER, USER:GROUP, UID or UID:GID")
    passwd = _id_file(read, where, "etc/passwd", user)
    uid: int | None = None
    gid = 0
    if user_part.isdigit():
        uid = _id(user_part, user)
        for fields in passwd:
            if len(fields) >= 4 and fields[2] == user_part and fields[3].isdigit():
                gid = _id(fields[3], user)
                break
    else:
        for fields in passwd:
            if len(fields) >= 4 and fields[0] == user_part:
                if not (fields[2].isdigit() and fields[3].isdigit()):
                    raise ConfigError(f"{where}/etc/passwd: malformed entry for {user_part!r}")
                uid, gid = _id(fields[2], user), _id(fields[3], user)
                break
        if uid is None:
            raise ConfigError(
                f"unknown user {user_part!r}: not in {where}/etc/passwd; "
                f"use a numeric UID[:GID] or a user {owner} defines"
            )
    if has_group:
        if group_part.isdigit():
            gid = _id(group_part, user)
        else:
            for fields in _id_file(read, where, "etc/group", user):
                if len(fields) >= 3 and fields[0] == group_part and fields[2].isdigit():
                    gid = _id(fields[2], user)
                    break
            else:
                raise ConfigError(
                    f"unknown group {group_part!r}: not in {where}/etc/group; "
                    f"use a numeric GID or a group {owner} defines"
                )
    return uid, gid


def _id(text: str, spec: str) -> int:
    value = int(text)
    if value > MAX_ID:
        raise ConfigError(f"invalid user {spec!r}: id {value} is out of range (0..{MAX_ID})")
    return value


def _id_file(
    read: Callable[[str], bytes | None], where: str, path: str, spec: str
) -> list[list[str]]:
    """Lines of a passwd/group file, split on ':'; [] when there is none."""
    try:
        data = read(path)
    except ImageError as exc:
        raise ConfigError(f"user {spec!r}: cannot read {where}/{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"user {spec!r}: cannot read {where}/{path}: {exc.strerror}") from None
    if data is None:
        return []
    return [line.split(":") for line in data.decode("utf-8", "replace").splitlines()]


def ensure_default_image(progress: bool = False) -> Path:
    """Build the busybox default image once; return its root filesystem directory."""
    rootfs = IMAGE_STORE / DEFAULT_IMAGE / "rootfs"
    if (rootfs / "bin" / "busybox").exists():
        return rootfs
    busybox = next((p for p in _BUSYBOX_CANDIDATES if p.exists()), None)
    if busybox is None:
        raise ConfigError("the default image needs busybox: apt-get install busybox-static")
    if progress and sys.stderr.isatty():
        print("pysandbox: building the default image (busybox)...", file=sys.stderr)
    IMAGE_STORE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".default-", dir=IMAGE_STORE))
    try:
        tree = work / "rootfs"
        for sub in (
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "etc",
            "tmp",
            "root",
            "home",
            "proc",
            "sys",
            "dev",
            "run",
            "var/tmp",
        ):
            (tree / sub).mkdir(parents=True, exist_ok=True)
        (tree / "tmp").chmod(0o1777)
        shutil.copy2(busybox, tree / "bin" / "busybox")
        applets = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            link = tree / applet
            if not link.exists() and applet != "bin/busybox":
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/bin/busybox")
        (tree / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        )
        (tree / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (tree / "etc" / "hostname").write_text("pysandbox\n")
        target = IMAGE_STORE / DEFAULT_IMAGE
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return rootfs
