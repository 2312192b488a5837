"""Fetching a pulled image's blobs with skopeo and unpacking them into the store.

``skopeo copy docker://REPO@DIGEST`` writes into a temporary OCI layout whose blobs live in
the store's shared blob directory (``<store>/blobs``); the layout is then read by
``sandbox.image.formats`` and unpacked by ``sandbox.image.store`` exactly like a local OCI
layout. A blob of the store that fails its digest is deleted and fetched once more.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypervisor.process import pid_alive
from sandbox.errors import ConfigError, ImageError, PullError
from sandbox.image import formats as image_formats
from sandbox.image import skopeo
from sandbox.image import store as images
from sandbox.image.catalog import LAYOUT_PREFIX, Catalog
from sandbox.image.explain import explain
from sandbox.image.progress import PullDisplay
from sandbox.image.reference import Reference, is_digest
from sandbox.image.skopeo import RegistryOptions, SkopeoError
from sandbox.image.unpack import short


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


class _LayoutSource(image_formats.DirectorySource):
    """The temporary layout skopeo wrote, whose ``blobs/`` are the store's shared blobs."""

    def __init__(self, layout: Path, blobs: Path) -> None:
        super().__init__(layout)
        self.blobs = blobs

    def _path(self, path: str) -> Path:
        resolved = super()._path(path)
        relative = resolved.relative_to(self.root)
        if relative.parts[:1] == ("blobs",):
            return self.blobs.joinpath(*relative.parts[1:])
        return resolved


@contextmanager
def _layout_dir(catalog: Catalog) -> Iterator[Path]:
    """A temporary OCI layout directory in the store, removed afterwards; those of pulls
    whose process died are removed first."""
    try:
        catalog.blobs.mkdir(parents=True, exist_ok=True)
        os.chmod(catalog.blobs, 0o700)
        for child in catalog.blobs.iterdir():
            fields = child.name.removeprefix(LAYOUT_PREFIX).split("-")
            stale = fields[0].isdigit() and not pid_alive(int(fields[0]))
            if child.name.startswith(LAYOUT_PREFIX) and stale:
                shutil.rmtree(child, ignore_errors=True)
        path = Path(tempfile.mkdtemp(prefix=f"{LAYOUT_PREFIX}{os.getpid()}-", dir=catalog.blobs))
    except OSError as exc:
        raise PullError(
            f"cannot write the image store {catalog.store}: {exc.strerror}; "
            "set PYSANDBOX_IMAGE_STORE to a writable directory"
        ) from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fetch(
    ref: Reference,
    manifest_digest: str,
    layers: list[tuple[str, int]],
    platform: tuple[str, str],
    registry: RegistryOptions,
    catalog: Catalog,
    display: PullDisplay,
) -> tuple[str, str, list[str], bool]:
    """Copy and unpack; (image id, created, blobs, whether it was unpacked now)."""
    if ":" in str(catalog.store):
        raise PullError(
            f"the image store path {catalog.store} contains ':', which skopeo cannot take; "
            "set PYSANDBOX_IMAGE_STORE to another directory"
        )
    source_ref = ref.at(manifest_digest)
    with _layout_dir(catalog) as layout:
        for attempt in (1, 2):
            _copy(ref, source_ref, layout, layers, registry, catalog, display)
            source = _LayoutSource(layout, catalog.blobs)
            try:
                plan = image_formats.load(source, None, platform)
                unpacked = images.install(ref.name, source, plan, progress=display.enabled)
            except ImageError as exc:
                if "no space left on device" in str(exc).lower():
                    raise PullError(_store_message(ref, str(exc), catalog.store)) from None
                bad = _corrupt_blobs(source)
                if not bad or attempt == 2:
                    raise PullError(_corrupt_message(ref, str(exc), bad)) from None
                for digest in bad:
                    (catalog.blobs / "sha256" / digest.partition(":")[2]).unlink(missing_ok=True)
                display.step(
                    f"{ref}: {len(bad)} blob(s) in the store did not match their digest "
                    f"({', '.join(short(d) for d in bad)}); fetching them again"
                )
                continue
            except ConfigError as exc:
                raise PullError(_store_message(ref, str(exc), catalog.store)) from None
            blobs = [plan.key, _sha256(plan.config_bytes), *(d for d, _ in layers)]
            created = _created(plan.config_bytes)
            return plan.key, created, blobs, unpacked
    raise AssertionError("unreachable")


def _copy(
    ref: Reference,
    source_ref: Reference,
    layout: Path,
    layers: list[tuple[str, int]],
    registry: RegistryOptions,
    catalog: Catalog,
    display: PullDisplay,
) -> None:
    shared = catalog.blobs / "sha256"

    def exists(digest: str) -> bool:
        return (shared / digest.partition(":")[2]).is_file()

    display.start_layers(layers, exists)
    try:
        skopeo.copy(source_ref, layout, catalog.blobs, registry, display.on_bytes, display.tick)
    except SkopeoError as exc:
        display.abandon()
        raise explain(ref, exc, registry) from None
    except BaseException:
        display.abandon()
        raise
    display.end_layers()


def _corrupt_blobs(source: _LayoutSource) -> list[str]:
    """Blobs of the layout's image whose content does not hash to their digest."""
    bad: list[str] = []
    try:
        _, index = image_formats.read_json(source, "index.json", "index")
        digests = [m["digest"] for m in index.get("manifests", []) if isinstance(m, dict)]
    except (ImageError, AttributeError, KeyError, TypeError):
        return bad
    for manifest_digest in digests:
        if not isinstance(manifest_digest, str) or not is_digest(manifest_digest):
            continue
        if not _blob_ok(source, manifest_digest):
            bad.append(manifest_digest)
            continue
        try:
            _, manifest = image_formats.read_json(
                source, image_formats.blob_path(manifest_digest), "manifest"
            )
            named = [manifest["config"], *manifest["layers"]]
        except (ImageError, KeyError, TypeError):
            continue
        for descriptor in named:
            digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
            if isinstance(digest, str) and is_digest(digest) and not _blob_ok(source, digest):
                bad.append(digest)
    return bad


def _blob_ok(source: _LayoutSource, digest: str) -> bool:
    sha = hashlib.sha256()
    try:
        with source.open(image_formats.blob_path(digest)) as file:
            while chunk := file.read(1 << 20):
                sha.update(chunk)
    except (ImageError, OSError):
        return False
    return f"sha256:{sha.hexdigest()}" == digest


def _corrupt_message(ref: Reference, detail: str, bad: list[str]) -> str:
    if bad:
        return (
            f"pull {ref}: blob {short(bad[0])} still does not match its digest after fetching "
            "it again; the registry serves bad data or the store's disk is failing"
        )
    return f"pull {ref}: the image is unusable: {detail}"


def _store_message(ref: Reference, detail: str, store: Path) -> str:
    if "no space left" in detail.lower():
        return (
            f"pull {ref}: the image store {store} is full (no space left on device); "
            "free space there or set PYSANDBOX_IMAGE_STORE to a larger filesystem"
        )
    return f"pull {ref}: {detail}"


def _created(config: bytes) -> str:
    try:
        value = json.loads(config).get("created")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
