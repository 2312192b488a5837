"""Reading image layouts and archives: which layers, in which order, with which config.

Three formats, all read without unpacking anything to disk:

- **OCI image layout** directory: ``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``.
- **oci-archive**: a tar of such a layout (``skopeo copy … oci-archive:``,
  ``podman save --format oci-archive``).
- **docker-archive**: a tar with ``manifest.json`` listing ``Config`` and ``Layers`` paths
  (``docker save``, ``podman save``); a directory holding the same files is accepted too.
  A tar with both ``index.json`` and ``manifest.json`` (docker 25+) is read as OCI.

:func:`load` returns a :class:`Plan`: the cache key, the verified config blob and the layers
with the digests each must have. Every JSON document read (``index.json``, manifests,
configs, ``manifest.json``) is refused above :data:`MAX_JSON` bytes; every manifest, index and
config referenced by digest is verified against it before it is parsed. Layers are verified by
``sandbox.image.store`` as they are read. Errors are :class:`~sandbox.errors.ImageError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sandbox.errors import ImageError
from sandbox.image.unpack import mismatch, short

MAX_JSON = 4 * 2**20
MAX_INDEX_DEPTH = 4
MAX_ARCHIVE_LINKS = 8
REF_ANNOTATION = "org.opencontainers.image.ref.name"
_REF_ANNOTATIONS = (REF_ANNOTATION, "io.containerd.image.name")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX_NAME_RE = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json|\.tar)?")

INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
CONFIG_TYPES = frozenset(
    {
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    }
)
LAYER_TYPE_PREFIXES = ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def host_platform() -> tuple[str, str]:
    """(os, architecture) of the images this host runs, in OCI spelling: ``linux``, ``amd64``."""
    machine = platform.machine().lower()
    return "linux", _ARCH.get(machine, machine)


# --- sources -------------------------------------------------------------------------------


class Source:
    """Files of a layout or archive, addressed by normalised relative paths."""

    def exists(self, path: str) -> bool:
        """Whether ``path`` names a regular file."""
        raise NotImplementedError

    def size(self, path: str) -> int:
        """Size in bytes of ``path``; ImageError when it is missing."""
        raise NotImplementedError

    def open(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A binary stream of ``path``'s bytes; ImageError when it is missing."""
        raise NotImplementedError


def _normalise(name: str) -> str | None:
    """``./a//b/../c`` -> ``a/c``; None for names that are empty or climb above the top."""
    path = posixpath.normpath(name.lstrip("/"))
    if path in ("", ".") or path == ".." or path.startswith("../"):
        return None
    return path


def _check_complete(path: Path, tar: tarfile.TarFile) -> None:
    """Refuse an uncompressed tar whose members run past its end, or with data after the
    last header tarfile could read (tarfile stops quietly at a damaged or cut header)."""
    size = path.stat().st_size
    members = tar.getmembers()
    for member in members:
        if member.offset_data + member.size > size:
            raise ImageError(f"{member.name} is cut short (the file is truncated)")
    with path.open("rb") as file:
        file.seek(tar.offset)
        tail = file.read(1 << 16)
    if tail.strip(b"\0") or (not tail and not members):
        last = f" after {members[-1].name}" if members else ""
        raise ImageError(f"unreadable data{last} (the file is truncated or damaged)")


class DirectorySource(Source):
    """A layout (or an unpacked docker-archive) in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, path: str) -> Path:
        normal = _normalise(path)
        if normal is None:
            raise ImageError(f"invalid path {path!r} in the image")
        return self.root / normal

    def exists(self, path: str) -> bool:
        try:
            return self._path(path).is_file()
        except ImageError:
            return False

    def size(self, path: str) -> int:
        try:
            st = self._path(path).stat()
        except FileNotFoundError:
            raise ImageError(f"{path} is missing from the layout") from None
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path} is not a regular file")
        return st.st_size

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[IO[bytes]]:
        self.size(path)
        try:
            file = self._path(path).open("rb")
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror}") from None
        with file:
            yield file


class ArchiveSource(Source):
    """A tar archive (optionally gzip/bzip2/xz compressed) read in place.

    Members are indexed by normalised name (the last of duplicates wins, as in tar);
    symlinks and hardlinks between members are followed inside the archive only.
    """

    def __init__(self, path: Path) -> None:
        compressed = False
        try:
            try:
                self._tar = tarfile.open(path, "r:")  # noqa: SIM115 (closed by close())
            except tarfile.ReadError:
                compressed = True
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115
        except (tarfile.TarError, EOFError):
            raise ImageError(
                "not a docker-archive or oci-archive tarball (not a tar archive)"
            ) from None
        except OSError as exc:
            raise ImageError(f"cannot read: {exc.strerror or exc}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            for member in self._tar:
                name = _normalise(member.name)
                if name is not None:
                    self._members[name] = member
            if not compressed:
                _check_complete(path, self._tar)
        except (tarfile.TarError, EOFError, OSError, ImageError) as exc:
            self._tar.close()
            text = str(exc) or type(exc).__name__
            raise ImageError(f"corrupt tarball: {text[0].lower()}{text[1:]}") from None

    def close(self) -> None:
        """Close the archive."""
        self._tar.close()

    def __enter__(self) -> ArchiveSource:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _member(self, path: str) -> tarfile.TarInfo | None:
        name = _normalise(path)
        for _ in range(MAX_ARCHIVE_LINKS):
            member = self._members.get(name) if name is not None else None
            if member is None:
                return None
            if member.issym():
                name = _normalise(posixpath.join(posixpath.dirname(member.name), member.linkname))
            elif member.islnk():
                name = _normalise(member.linkname)
            else:
                return member if member.isreg() else None
        return None

    def exists(self, path: str) -> bool:
        return self._member(path) is not None

    def size(self, path: str) -> int:
        member = self._member(path)
        if member is None:
            raise ImageError(f"{path} is missing from the archive")
        return member.size

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[IO[bytes]]:
        member = self._member(path)
        if member is None:
            raise ImageError(f"{path} is missing from the archive")
        try:
            file = self._tar.extractfile(member)
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"corrupt tarball: cannot read {path}: {exc}") from None
        if file is None:
            raise ImageError(f"{path} is not a regular file in the archive")
        with file:
            yield file


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer blob: where it is in the source and what it must hash to."""

    path: str
    size: int
    digest: str | None  # sha256 of the blob as stored, when the format names it
    diff_id: str | None  # sha256 of the uncompressed tar, from the image config
    media_type: str = ""


@dataclass(frozen=True)
class ImageConfig:
    """The run defaults of an image config (``config`` object of the OCI image config)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    user: str = ""
    #: ``StopSignal`` as written ("SIGINT", "QUIT", "3"), "" for none (docker's STOPSIGNAL).
    stop_signal: str = ""
    #: ``Volumes``' paths (docker's VOLUME), absolute and normalised, sorted.
    volumes: tuple[str, ...] = ()


#: More VOLUME paths than this in one image config is refused (each is a mount in the guest).
MAX_VOLUMES = 128


@dataclass(frozen=True)
class Plan:
    """What to unpack: ``key`` (``sha256:<hex>``) names the cache entry; ``config_bytes`` is
    the verified image config blob, ``config`` its parsed run defaults."""

    format: str
    key: str
    config_bytes: bytes
    config: ImageConfig
    layers: tuple[Layer, ...]


def load(source: Source, ref: str | None = None, platform: tuple[str, str] | None = None) -> Plan:
    """Parse the layout or archive in ``source``; pick the image ``ref`` names, if given.

    OCI: ``ref`` matches the ``org.opencontainers.image.ref.name`` annotation of an
    ``index.json`` entry; without it the single image, or the one for this host's platform,
    is taken. docker-archive: ``ref`` matches one of the ``RepoTags``. The key is the
    manifest digest (OCI) or the config digest (docker-archive). ``platform`` (os, arch) is
    the platform the image config must name (default :func:`host_platform`); the caller has
    checked that the VM runs it.
    """
    if source.exists("index.json") and (
        source.exists("oci-layout") or not source.exists("manifest.json")
    ):
        return _load_oci(source, ref, platform)
    if source.exists("manifest.json"):
        return _load_docker(source, ref)
    raise ImageError(
        "not a docker-archive or oci-archive tarball (no manifest.json or index.json); "
        "a plain filesystem tarball must be unpacked into a directory first"
    )


def read_json(source: Source, path: str, what: str) -> tuple[bytes, Any]:
    """Bytes and parsed JSON of ``path`` (at most :data:`MAX_JSON` bytes)."""
    size = source.size(path)
    if size > MAX_JSON:
        raise ImageError(f"{what} {path} is {size} bytes; refusing JSON over 4 MiB")
    with source.open(path) as file:
        try:
            data = file.read(MAX_JSON + 1)
        except (OSError, tarfile.TarError) as exc:
            raise ImageError(f"cannot read {what} {path}: {exc}") from None
    if len(data) > MAX_JSON:
        raise ImageError(f"{what} {path} is over 4 MiB; refusing it")
    try:
        return data, json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{what} {path} is not valid JSON: {exc}") from None


def blob_path(digest: str) -> str:
    """``blobs/sha256/<hex>`` for a validated digest."""
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str]
    platform: dict[str, Any] | None

    @property
    def ref(self) -> str | None:
        for key in _REF_ANNOTATIONS:
            if key in self.annotations:
                return self.annotations[key]
        return None


def _descriptor(value: Any, where: str) -> _Descriptor:
    if not isinstance(value, dict):
        raise ImageError(f"{where}: a descriptor is not a JSON object")
    digest = value.get("digest")
    if not isinstance(digest, str):
        raise ImageError(f"{where}: a descriptor has no digest")
    if not _DIGEST_RE.fullmatch(digest):
        algo = digest.partition(":")[0]
        if algo and algo != "sha256" and ":" in digest:
            raise ImageError(f"{where}: digest algorithm {algo!r} is not supported (only sha256)")
        raise ImageError(f"{where}: invalid digest {digest[:80]!r}")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{where}: descriptor {short(digest)} has no valid size")
    media_type = value.get("mediaType", "")
    annotations = value.get("annotations") or {}
    platform_ = value.get("platform")
    if (
        not isinstance(media_type, str)
        or not isinstance(annotations, dict)
        or not all(isinstance(v, str) for v in annotations.values())
        or not (platform_ is None or isinstance(platform_, dict))
    ):
        raise ImageError(f"{where}: descriptor {short(digest)} is malformed")
    return _Descriptor(media_type, digest, size, annotations, platform_)


def _read_blob_json(source: Source, desc: _Descriptor, what: str) -> tuple[bytes, Any]:
    path = blob_path(desc.digest)
    if desc.size > MAX_JSON:
        raise ImageError(f"{what} {path} is {desc.size} bytes; refusing JSON over 4 MiB")
    data, parsed = read_json(source, path, what)
    actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
    if actual != desc.digest:
        raise mismatch(f"{what} {path}", desc.digest, actual)
    if len(data) != desc.size:
        raise ImageError(f"{what} {path} is {len(data)} bytes, its descriptor says {desc.size}")
    if not isinstance(parsed, dict):
        raise ImageError(f"{what} {path} is not a JSON object")
    return data, parsed


# --- OCI -----------------------------------------------------------------------------------


def _load_oci(source: Source, ref: str | None, platform: tuple[str, str] | None) -> Plan:
    if source.exists("oci-layout"):
        _, layout = read_json(source, "oci-layout", "layout file")
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageError(f"oci-layout: unsupported imageLayoutVersion {version!r}")
    _, index = read_json(source, "index.json", "index")
    desc, manifest = _pick_manifest(source, index, "index.json", ref, 0)
    config_desc = _descriptor(manifest.get("config"), f"manifest {short(desc.digest)}")
    if config_desc.media_type and config_desc.media_type not in CONFIG_TYPES:
        raise ImageError(
            f"manifest {short(desc.digest)} is not a container image "
            f"(config media type {config_desc.media_type})"
        )
    config_bytes, config = _read_blob_json(source, config_desc, "config")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"manifest {short(desc.digest)} has no layers list")
    diff_ids = _diff_ids(config, len(raw_layers))
    layers = []
    for position, raw in enumerate(raw_layers):
        layer = _descriptor(raw, f"manifest {short(desc.digest)}")
        if layer.media_type and not layer.media_type.startswith(LAYER_TYPE_PREFIXES):
            raise ImageError(
                f"layer {blob_path(layer.digest)} has media type {layer.media_type}, "
                "not a filesystem layer"
            )
        layers.append(
            Layer(
                blob_path(layer.digest),
                layer.size,
                layer.digest,
                diff_ids[position] if diff_ids else None,
                layer.media_type,
            )
        )
    return Plan("oci", desc.digest, config_bytes, parse_config(config, platform), tuple(layers))


def _pick_manifest(
    source: Source, index: Any, where: str, ref: str | None, depth: int
) -> tuple[_Descriptor, dict[str, Any]]:
    """Walk (nested) indexes down to one image manifest."""
    if depth > MAX_INDEX_DEPTH:
        raise ImageError(f"{where}: indexes nested too deep")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError(f"{where} is not an image index (no manifests list)")
    entries = [_descriptor(item, where) for item in index["manifests"]]
    if not entries:
        raise ImageError(f"{where} lists no images")
    chosen = _choose(entries, where, ref)
    _, document = _read_blob_json(source, chosen, "manifest")
    media_type = chosen.media_type or str(document.get("mediaType", ""))
    if media_type in INDEX_TYPES or ("manifests" in document and "layers" not in document):
        return _pick_manifest(source, document, f"index {short(chosen.digest)}", None, depth + 1)
    if media_type and media_type not in MANIFEST_TYPES:
        raise ImageError(f"{where}: {short(chosen.digest)} has unsupported media type {media_type}")
    return chosen, document


def _choose(entries: list[_Descriptor], where: str, ref: str | None) -> _Descriptor:
    refs = sorted({e.ref for e in entries if e.ref is not None})
    if ref is not None:
        matches = [e for e in entries if e.ref == ref]
        if not matches:
            matches = [e for e in entries if e.ref and _same_name(e.ref, ref)]
        if not matches:
            available = ", ".join(refs) if refs else "none"
            raise ImageError(f"{where} has no image named {ref!r} (names: {available})")
        entries = matches
    os_name, arch = host_platform()
    with_platform = [e for e in entries if e.platform is not None]
    if with_platform:
        fitting = [
            e
            for e in entries
            if e.platform is None
            or (e.platform.get("os") == os_name and e.platform.get("architecture") == arch)
        ]
        if not fitting:
            offered = sorted(
                f"{e.platform.get('os')}/{e.platform.get('architecture')}"
                for e in with_platform
                if e.platform is not None
            )
            raise ImageError(
                f"{where} has no image for {os_name}/{arch} (only {', '.join(offered)})"
            )
        entries = fitting
    if len(entries) > 1 and len({e.digest for e in entries}) > 1:
        names = sorted({e.ref for e in entries if e.ref is not None})
        if len(names) > 1 or len(names) != len(entries):
            hint = f" (names: {', '.join(names)})" if names else ""
            raise ImageError(f"{where} holds {len(entries)} images{hint}; pick one with PATH:NAME")
    return entries[0]


def _same_name(candidate: str, wanted: str) -> bool:
    """Whether two image names agree once registry defaults are dropped."""
    return _short_name(candidate) == _short_name(wanted)


def _short_name(name: str) -> str:
    for prefix in ("docker.io/library/", "docker.io/", "localhost/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name if ":" in name.rpartition("/")[2] or "@" in name else f"{name}:latest"


def _diff_ids(config: dict[str, Any], count: int) -> list[str] | None:
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or "diff_ids" not in rootfs:
        return None
    diff_ids = rootfs["diff_ids"]
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and _DIGEST_RE.fullmatch(d) for d in diff_ids
    ):
        raise ImageError("config: rootfs.diff_ids is malformed")
    if len(diff_ids) != count:
        raise ImageError(f"config lists {len(diff_ids)} layer diff_ids for {count} layers")
    return list(diff_ids)


# --- docker-archive ------------------------------------------------------------------------


def _load_docker(source: Source, ref: str | None) -> Plan:
    _, manifest = read_json(source, "manifest.json", "manifest")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError("manifest.json is not a non-empty list of images")
    entry = _choose_docker(manifest, ref)
    config_path = entry.get("Config")
    layer_paths = entry.get("Layers")
    if not isinstance(config_path, str) or not (
        isinstance(layer_paths, list) and all(isinstance(p, str) for p in layer_paths)
    ):
        raise ImageError("manifest.json: an entry lacks Config or Layers")
    config_bytes, config = read_json(source, config_path, "config")
    if not isinstance(config, dict):
        raise ImageError(f"config {config_path} is not a JSON object")
    key = f"sha256:{hashlib.sha256(config_bytes).hexdigest()}"
    named = _HEX_NAME_RE.fullmatch(_normalise(config_path) or "")
    if named and f"sha256:{named.group(1)}" != key:
        raise mismatch(f"config {config_path}", f"sha256:{named.group(1)}", key)
    diff_ids = _diff_ids(config, len(layer_paths))
    if diff_ids is None:
        raise ImageError(f"config {config_path} has no rootfs.diff_ids to verify layers with")
    layers = []
    for path, diff_id in zip(layer_paths, diff_ids, strict=True):
        normal = _normalise(path) or ""
        stored = None
        if normal.startswith("blobs/sha256/") and _HEX_NAME_RE.fullmatch(normal):
            stored = f"sha256:{normal.rsplit('/', 1)[1]}"
        layers.append(Layer(path, source.size(path), stored, diff_id))
    return Plan("docker", key, config_bytes, parse_config(config), tuple(layers))


def _choose_docker(manifest: list[Any], ref: str | None) -> dict[str, Any]:
    entries = [e for e in manifest if isinstance(e, dict)]
    if len(entries) != len(manifest):
        raise ImageError("manifest.json: an entry is not a JSON object")
    tags: list[str] = []
    for entry in entries:
        repo_tags = entry.get("RepoTags") or []
        if isinstance(repo_tags, list):
            tags += [t for t in repo_tags if isinstance(t, str)]
    if ref is not None:
        for match in (str.__eq__, _same_name):
            for entry in entries:
                repo_tags = entry.get("RepoTags") or []
                if isinstance(repo_tags, list) and any(
                    isinstance(t, str) and match(t, ref) for t in repo_tags
                ):
                    return entry
        available = ", ".join(tags) if tags else "none"
        raise ImageError(f"manifest.json has no image tagged {ref!r} (tags: {available})")
    if len(entries) > 1:
        hint = f" (tags: {', '.join(tags)})" if tags else ""
        raise ImageError(f"manifest.json holds {len(entries)} images{hint}; pick one with PATH:TAG")
    return entries[0]


# --- image config --------------------------------------------------------------------------


def parse_config(config: dict[str, Any], platform: tuple[str, str] | None = None) -> ImageConfig:
    """Run defaults from an image config; refuses an image for another OS or architecture
    than ``platform`` (default: :func:`host_platform`)."""
    os_name, arch = platform or host_platform()
    image_os, image_arch = config.get("os"), config.get("architecture")
    if (isinstance(image_os, str) and image_os != os_name) or (
        isinstance(image_arch, str) and image_arch != arch
    ):
        raise ImageError(
            f"the image is built for {image_os}/{image_arch}; this host runs {os_name}/{arch}"
        )
    section = config.get("config") or {}
    if not isinstance(section, dict):
        raise ImageError("config: 'config' is not a JSON object")

    def strings(key: str) -> list[str]:
        value = section.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ImageError(f"config: {key} is not a list of strings")
        return list(value)

    cwd = section.get("WorkingDir") or "/"
    user = section.get("User") or ""
    stop_signal = section.get("StopSignal") or ""
    if not all(isinstance(value, str) for value in (cwd, user, stop_signal)):
        raise ImageError("config: WorkingDir, User and StopSignal must be strings")
    volumes = section.get("Volumes") or {}
    if not isinstance(volumes, dict):
        raise ImageError("config: Volumes is not a JSON object")
    if len(volumes) > MAX_VOLUMES:
        raise ImageError(f"config: {len(volumes)} Volumes, more than {MAX_VOLUMES}")
    return ImageConfig(
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        env=strings("Env"),
        cwd=cwd if cwd.startswith("/") else "/" + cwd,
        user=user,
        stop_signal=stop_signal,
        volumes=tuple(sorted({posixpath.normpath("/" + path.lstrip("/")) for path in volumes})),
    )
