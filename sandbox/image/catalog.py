"""The record of pulled images: names, digests, blobs; listing and removal.

Pulled images live in the image store (``sandbox.image.store.IMAGE_STORE``) next to the entries
unpacked from layouts and archives::

    <store>/blobs/sha256/<hex>        every blob pulled (layers, configs, manifests), once
    <store>/blobs/.tmp-pull-<pid>-*/  the OCI layout of a pull in progress (removed after)
    <store>/sha256/<hex>/             the unpacked image (keyed by its OCI manifest digest)
    <store>/pulled.json               this record (0600, replaced atomically)
    <store>/pulled.lock               held shared by pulls, exclusively by rmi

``pulled.json``::

    {"version": 1,
     "names":  {"127.0.0.1:5000/bb:v1": {"id": "sha256:<K>", "digest": "sha256:<D>"}},
     "images": {"sha256:<K>": {"repository": "127.0.0.1:5000/bb", "digest": "sha256:<D>",
                               "platform": "linux/amd64", "size": 1234, "created": "...",
                               "pulled": "...", "blobs": ["sha256:...", ...]}}}

``D`` is the digest of what the registry served for the name (an index for a multi-arch
image: what ``REF@D`` pulls again); ``K``, the image id, is the digest of the manifest as
stored (skopeo writes OCI manifests: a docker schema 2 manifest is converted, so K and D
differ then). A name is recorded only once its image is complete in the store, so a failed
pull leaves no name behind; an image whose names were all moved to other images stays
listed as ``<none>`` until ``rmi``. ``rmi`` removes names, then every image without a name
(unless a running container uses it) and every blob no remaining image lists.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.errors import ConfigError, NotFoundError, StateError
from sandbox.image import store as images

RECORD = "pulled.json"
LOCK = "pulled.lock"
BLOBS = "blobs"
LAYOUT_PREFIX = ".tmp-pull-"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX_PREFIX = re.compile(r"(?:sha256:)?([0-9a-f]{6,64})")


@dataclass(frozen=True)
class Row:
    """One line of ``pysandbox images``."""

    name: str  # "<none>" for an image without a name
    digest: str
    id: str
    platform: str
    size: int
    created: str

    def to_json(self) -> dict[str, Any]:
        """The ``--format json`` object."""
        return {
            "name": self.name,
            "digest": self.digest,
            "id": self.id,
            "platform": self.platform,
            "size": self.size,
            "created": self.created,
        }


class Catalog:
    """The pulled images of one store (default: ``sandbox.image.store.IMAGE_STORE``)."""

    def __init__(self, store: Path | None = None) -> None:
        self.store = store if store is not None else images.IMAGE_STORE
        self.blobs = self.store / BLOBS

    # --- locking and the record ------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Hold the store lock: shared for a pull, exclusive for removal."""
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.store / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot use the image store {self.store}: {exc.strerror}; "
                "set PYSANDBOX_IMAGE_STORE to a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        """The record, for a read-modify-write under its own lock; saved atomically."""
        fd = os.open(self.store / f"{RECORD}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.load()
            yield data
            handle, temporary = tempfile.mkstemp(prefix=f".{RECORD}.", dir=self.store)
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(data, file, indent=1, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.store / RECORD)
        finally:
            os.close(fd)

    def load(self) -> dict[str, Any]:
        """The record (an empty one when there is none); ConfigError when unreadable."""
        path = self.store / RECORD
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"version": 1, "names": {}, "images": {}}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}; remove it and pull again") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("names"), dict)
            or not isinstance(data.get("images"), dict)
        ):
            raise ConfigError(f"{path} is malformed; remove it and pull again")
        return data

    # --- queries ---------------------------------------------------------------------------

    def find(self, name: str, platform: str) -> tuple[str, str] | None:
        """(image id, digest) recorded for ``name`` and ``platform`` whose image is complete
        in the store, else None."""
        data = self.load()
        entry = data["names"].get(name)
        if not isinstance(entry, dict):
            return None
        image = data["images"].get(entry.get("id"))
        if not isinstance(image, dict) or image.get("platform") != platform:
            return None
        key, digest = str(entry["id"]), str(entry.get("digest", ""))
        if not _DIGEST.fullmatch(key) or not images.is_complete(key):
            return None
        return key, digest

    def find_digest(self, repository: str, digest: str, platform: str) -> str | None:
        """The id of a complete image pulled from ``repository`` as ``digest``, else None."""
        data = self.load()
        for entry in data["names"].values():
            if not isinstance(entry, dict) or entry.get("digest") != digest:
                continue
            image = data["images"].get(entry.get("id"))
            if (
                isinstance(image, dict)
                and image.get("repository") == repository
                and image.get("platform") == platform
                and images.is_complete(str(entry["id"]))
            ):
                return str(entry["id"])
        return None

    def rows(self) -> list[Row]:
        """Every pulled image, by name (images without a name as ``<none>``)."""
        data = self.load()
        rows: list[Row] = []
        named: set[str] = set()
        for name, entry in sorted(data["names"].items()):
            image = data["images"].get(entry.get("id")) if isinstance(entry, dict) else None
            if not isinstance(image, dict):
                continue
            named.add(entry["id"])
            rows.append(_row(name, str(entry.get("digest", "")), entry["id"], image))
        for key, image in sorted(data["images"].items()):
            if key not in named and isinstance(image, dict):
                rows.append(_row("<none>", str(image.get("digest", "")), key, image))
        return rows

    # --- changes ---------------------------------------------------------------------------

    def record(
        self,
        name: str,
        repository: str,
        digest: str,
        key: str,
        platform: str,
        blobs: list[str],
        created: str,
    ) -> None:
        """Record that ``name`` (pulled as ``digest``) is the complete image ``key``."""
        size = _tree_size(images.entry_path(key) / "rootfs")
        pulled = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        with self._editing() as data:
            data["names"][name] = {"id": key, "digest": digest}
            data["images"][key] = {
                "repository": repository,
                "digest": digest,
                "platform": platform,
                "size": size,
                "created": created,
                "pulled": pulled,
                "blobs": sorted(set(blobs)),
            }

    def add_name(self, name: str, key: str, digest: str) -> None:
        """Record ``name`` (pulled as ``digest``) for the already recorded image ``key``."""
        with self._editing() as data:
            if key in data["images"]:
                data["names"][name] = {"id": key, "digest": digest}

    def remove(self, what: str, name: str | None = None, force: bool = False) -> list[str]:
        """Remove the name ``name`` (``what`` normalised by the caller, when it is a valid
        reference) if it is recorded, else the names ``REPO@DIGEST`` stands for (the names of
        REPO pulled as that digest), else the image ``what`` names by digest, id or id
        prefix of 6+ hex digits, with every name of it; then images left without a name and
        blobs no image lists. Returns lines for the user. NotFoundError when nothing
        matches, StateError when a running container uses the image, ConfigError when an id
        or digest names an image of several tags and not ``force`` (podman and docker refuse
        that too); nothing is changed then."""
        with self.locked(exclusive=True), self._editing() as data:
            names, keys = self._matches(data, what, name)
            if not names and not keys:
                raise NotFoundError(f"image {what} is not in the store (see 'pysandbox images')")
            tags = sorted(n for n in names if "@" not in n)  # digest names are not tags
            if keys and len(tags) > 1 and not force:
                raise ConfigError(
                    f"image {what} has {len(tags)} names ({', '.join(tags)}): remove them by "
                    "name, or give -f to remove the image with all of them"
                )
            remaining = {
                str(entry.get("id"))
                for name, entry in data["names"].items()
                if name not in names and isinstance(entry, dict)
            }
            doomed = (keys | {str(data["names"][n].get("id")) for n in names}) - remaining
            for key in sorted(doomed):
                if not _free_or_freed_soon(images.entry_path(key)):
                    raise StateError(
                        f"image {what} ({key[:19]}…) is used by a running container; "
                        "stop it first (pysandbox ps, pysandbox stop)"
                    )
            lines = [f"untagged {name}" for name in sorted(names)]
            for key in sorted(doomed):
                images.remove_entry(key)
                data["images"].pop(key, None)
                lines.append(f"deleted {key}")
            for name in names:
                del data["names"][name]
            self._collect(data)
        return lines

    def _matches(
        self, data: dict[str, Any], what: str, name: str | None
    ) -> tuple[set[str], set[str]]:
        """The recorded name ``name``; else image ids and registry digests ``what`` names."""
        if name is not None and name in data["names"]:
            return {name}, set()
        repo, at, digest = (name or "").partition("@")
        if at:  # REPO@DIGEST of an image pulled by tag: the names of REPO with that digest
            pulled = {
                n
                for n, entry in data["names"].items()
                if isinstance(entry, dict)
                and entry.get("digest") == digest
                and n.rpartition(":")[0] == repo
            }
            if pulled:
                return pulled, set()
        match = _HEX_PREFIX.fullmatch(what)
        if match is None:
            return set(), set()
        prefix = f"sha256:{match.group(1)}"
        full = len(match.group(1)) == 64
        keys = {
            key for key in data["images"] if (key == prefix if full else key.startswith(prefix))
        }
        names = {
            name
            for name, entry in data["names"].items()
            if isinstance(entry, dict)
            and (entry.get("id") in keys or (full and entry.get("digest") == prefix))
        }
        keys |= {str(data["names"][name]["id"]) for name in names}
        if len(keys) > 1 and not full:
            raise ConfigError(f"{what} matches {len(keys)} images; give more of the digest")
        return names, keys

    def _collect(self, data: dict[str, Any]) -> None:
        """Delete blobs that no recorded image lists (also those of failed pulls)."""
        kept: set[str] = set()
        for image in data["images"].values():
            if isinstance(image, dict) and isinstance(image.get("blobs"), list):
                kept.update(str(b).partition(":")[2] for b in image["blobs"])
        directory = self.blobs / "sha256"
        if not directory.is_dir():
            return
        for child in directory.iterdir():
            if child.name not in kept:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()


def _row(name: str, digest: str, key: str, image: dict[str, Any]) -> Row:
    size = image.get("size")
    return Row(
        name,
        digest,
        key,
        str(image.get("platform", "")),
        size if isinstance(size, int) else 0,
        str(image.get("created", "")),
    )


def _tree_size(root: Path) -> int:
    """Bytes of the files and symlinks under ``root`` (hardlinks counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size if name in filenames else 0
    return total


#: How long ``rmi`` waits for finished runs that still share the image to be torn down (s).
TEARDOWN_WAIT = 30.0


def _free_or_freed_soon(entry: Path, timeout: float = TEARDOWN_WAIT) -> bool:
    """Whether nothing mounts ``entry``, waiting up to ``timeout`` s while every mount of it
    belongs to a pod that is ``stopping`` (a finished foreground run is torn down after its
    command exited: ``run IMG; rmi IMG`` must not race it)."""
    deadline = time.monotonic() + timeout
    while points := _mounted_at(entry):
        if time.monotonic() >= deadline or not all(map(_in_stopping_pod, points)):
            return False
        time.sleep(0.1)
    return True


def _in_stopping_pod(point: str) -> bool:
    """Whether mount point ``point`` lies in the shared directory of a pod whose record
    (``<root>/p/<pod>/pod.json``) says ``stopping``."""
    for parent in Path(point).parents:
        if parent.parent.name == "p" and (parent / "pod.json").is_file():
            try:
                record = json.loads((parent / "pod.json").read_bytes()[: 1 << 20])
            except (OSError, ValueError):
                return False
            return isinstance(record, dict) and record.get("status") == "stopping"
    return False


def _in_use(entry: Path, mountinfo: str | None = None) -> bool:
    """Whether anything under ``entry`` is mounted somewhere (a run shares its rootfs with
    its VM through a bind mount)."""
    return bool(_mounted_at(entry, mountinfo))


def _mounted_at(entry: Path, mountinfo: str | None = None) -> list[str]:
    """The mount points of what is under ``entry`` (read from /proc/self/mountinfo, or
    ``mountinfo``, its text; the bind's root field is the path inside the filesystem that
    holds ``entry``)."""
    try:
        if mountinfo is None:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        real = os.path.realpath(entry)
        device = os.stat(real).st_dev
    except OSError:
        return []
    lines = mountinfo.splitlines()
    mounts = []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        root = _unescape(fields[3])
        point = _unescape(fields[4])
        mounts.append((os.makedev(int(major), int(minor)), root, point))
    # The mount that holds ``entry``: same device, longest mount point that is a prefix.
    holders = [
        (point, root)
        for dev, root, point in mounts
        if dev == device and (real == point or real.startswith(point.rstrip("/") + "/"))
    ]
    if not holders:
        return []
    point, root = max(holders, key=lambda item: len(item[0]))
    inside = os.path.normpath(os.path.join(root, os.path.relpath(real, point)))
    return [
        p for dev, r, p in mounts if dev == device and (r == inside or r.startswith(inside + "/"))
    ]


def _unescape(field: str) -> str:
    """mountinfo octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
