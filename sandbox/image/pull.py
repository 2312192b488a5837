"""``pysandbox pull REF`` and ``run REF``: images from registries into the image store.

A pull, step by step:

1. REF is parsed and normalised (``sandbox.image.reference``); ``--platform`` is checked
   against what the VM can run (:func:`runnable_platforms`) before any network access.
2. ``skopeo inspect --raw`` fetches what REF names. Its sha256 is the digest ``D`` the name
   stands for (checked against REF's own digest when REF has one). An index is resolved to
   the platform's manifest ``P`` here, by pysandbox (so the error for a missing platform
   lists the platforms there are); a single manifest's config is fetched first to refuse an
   image for another architecture before any layer is downloaded.
3. When the store already has REF as ``D`` (complete), the pull stops: nothing is fetched or
   unpacked again. For ``REF@DIGEST`` and ``run --pull=missing`` that check comes before
   step 2, without contacting the registry at all.
4. ``skopeo copy docker://REPO@P`` writes blobs into the store's shared blob directory (a
   blob already there is not fetched: layers are shared between images) and a temporary
   OCI layout; skopeo verifies each blob's digest as it arrives.
5. The layout is read by ``sandbox.image.formats`` and unpacked by ``sandbox.image.store``
   exactly like a local OCI layout (``sandbox.image.fetch``): manifest and config verified
   against their digests, each layer hashed before and while it is applied, with the
   hostile-tar defences of ``sandbox.image.unpack``. A blob of the store that fails its
   digest (a damaged disk, a tampered file) is deleted and fetched once more; if it fails
   again the pull fails.
6. Only then is the name recorded (``sandbox.image.catalog``): a failed pull leaves no name,
   no store entry and no temporary directory; blobs it completed stay and are reused by the
   next pull (a restarted pull resumes), and ``rmi`` collects them if no image uses them.

Every failure is a :class:`~sandbox.errors.PullError`: one line naming the reference, what
failed and what to do; no credential appears in it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.errors import ImageError, PullError
from sandbox.image import formats as image_formats
from sandbox.image import skopeo
from sandbox.image import store as images
from sandbox.image.catalog import Catalog
from sandbox.image.explain import explain
from sandbox.image.fetch import fetch
from sandbox.image.progress import PullDisplay
from sandbox.image.reference import Reference, ReferenceError, is_digest, parse
from sandbox.image.skopeo import RegistryOptions, SkopeoError
from sandbox.image.unpack import short

PULL_POLICIES = ("missing", "always", "never")
TRANSPORT_PREFIX = "docker://"
#: Platforms a guest kernel of this host's architecture executes (the x86-64 Debian kernel
#: runs i386 binaries, and the default seccomp profile lists SCMP_ARCH_X86).
_RUNNABLE = {"amd64": ("amd64", "386"), "arm64": ("arm64",)}


@dataclass(frozen=True)
class PullOptions:
    """Options of ``pull`` and of ``run`` for its image."""

    registry: RegistryOptions = field(default_factory=RegistryOptions)
    platform: str | None = None  # "os/arch"; None: this host's
    quiet: bool = False


@dataclass(frozen=True)
class Pulled:
    """The outcome of a pull: the name, the registry digest, the image id in the store."""

    reference: Reference
    digest: str
    key: str
    platform: tuple[str, str]
    fetched: bool

    @property
    def pinned(self) -> str:
        """``repository@digest``: pulls exactly this image again."""
        return self.reference.at(self.digest).name


def runnable_platforms() -> list[tuple[str, str]]:
    """(os, architecture) pairs whose images a VM of this host can run, preferred first."""
    os_name, arch = image_formats.host_platform()
    return [(os_name, a) for a in _RUNNABLE.get(arch, (arch,))]


def parse_platform(text: str | None) -> tuple[str, str]:
    """``os/arch`` (a ``/variant`` is accepted for arm only) → (os, arch); PullError when the
    VM cannot run it."""
    if text is None:
        return image_formats.host_platform()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PullError(f"invalid --platform {text!r}: give OS/ARCH, e.g. linux/amd64")
    wanted = (parts[0], parts[1])
    runnable = runnable_platforms()
    if wanted not in runnable or len(parts) == 3:
        names = ", ".join(f"{o}/{a}" for o, a in runnable)
        raise PullError(f"--platform {text}: a pysandbox VM on this host runs {names} images only")
    return wanted


def parse_reference(text: str) -> Reference:
    """A registry reference (``docker://`` prefix allowed); PullError when invalid."""
    try:
        return parse(text.removeprefix(TRANSPORT_PREFIX))
    except ReferenceError as exc:
        raise PullError(f"invalid image reference {text!r}: {exc}") from None


# --- run -----------------------------------------------------------------------------------


def options_from(args: argparse.Namespace) -> PullOptions:
    """PullOptions from the ``pull``/``run`` flags (``--authfile``, ``--tls-verify``,
    ``--platform``, ``--quiet``)."""
    authfile = getattr(args, "authfile", None)
    if authfile is not None and not Path(authfile).is_file():
        raise PullError(f"--authfile {authfile}: no such file")
    return PullOptions(
        RegistryOptions(authfile, getattr(args, "tls_verify", None)),
        getattr(args, "platform", None),
        bool(getattr(args, "quiet", False)),
    )


def resolve_image(args: argparse.Namespace) -> images.Image:
    """The image of ``pysandbox run``: local names (and anything written as a path) through
    ``sandbox.image.store.resolve``, anything else pulled according to ``--pull`` (missing:
    only when the store lacks it; always: check the registry; never: the store only)."""
    name: str = args.image
    local = images.resolve_local(name, bool(getattr(args, "quiet", False)))
    if local is not None:
        return local
    options = options_from(args)
    pulled = pull(name, options, getattr(args, "pull", None) or "missing")
    return stored_image(pulled)


def stored_image(pulled: Pulled) -> images.Image:
    """The runnable :class:`~sandbox.image.store.Image` of a pulled image."""
    entry = images.entry_path(pulled.key)
    try:
        data = (entry / "config.json").read_bytes()
        config = image_formats.parse_config(json.loads(data), pulled.platform)
    except (OSError, ValueError, ImageError) as exc:
        raise PullError(
            f"image {pulled.reference}: its config in {entry} is unreadable ({exc}); "
            f"pysandbox rmi {pulled.reference} and pull it again"
        ) from None
    return images.image_from(pulled.reference.name, entry, config)


# --- pull ----------------------------------------------------------------------------------


def pull(text: str, options: PullOptions, policy: str = "always") -> Pulled:
    """Make the image ``text`` names available in the store (see the module docstring).

    ``policy``: ``always`` asks the registry what the name stands for now (and fetches only
    what changed); ``missing`` uses a stored copy without asking; ``never`` fails when there
    is none. PullError on any failure; nothing partial is recorded.
    """
    if policy not in PULL_POLICIES:
        raise PullError(f"invalid --pull {policy!r}: use {', '.join(PULL_POLICIES)}")
    ref = parse_reference(text)
    platform = parse_platform(options.platform)
    catalog = Catalog()
    display = PullDisplay(options.quiet)
    with catalog.locked(exclusive=False):
        found = _stored(catalog, ref, platform, policy)
        if found is not None:
            return found
        if policy == "never":
            raise PullError(
                f"image {ref} is not in the image store and --pull=never was given; "
                f"pull it first (pysandbox pull {ref}) or use --pull=missing"
            )
        if not skopeo.available():
            raise PullError(
                f"pull {ref}: skopeo, the registry client, is not installed; "
                "apt-get install skopeo (or run scripts/install-host-packages.sh)"
            )
        return _pull(ref, platform, options, catalog, display)


def _platform_name(platform: tuple[str, str]) -> str:
    return f"{platform[0]}/{platform[1]}"


def _stored(
    catalog: Catalog, ref: Reference, platform: tuple[str, str], policy: str
) -> Pulled | None:
    """The stored image for ``ref`` when it can be used without asking the registry."""
    name = _platform_name(platform)
    if ref.digest is None and policy == "always":
        return None
    found = catalog.find(ref.name, name)
    if found is not None:
        return Pulled(ref, found[1], found[0], platform, fetched=False)
    if ref.digest is not None:
        key = catalog.find_digest(ref.repository, ref.digest, name)
        if key is not None:
            catalog.add_name(ref.name, key, ref.digest)
            return Pulled(ref, ref.digest, key, platform, fetched=False)
    return None


def _pull(
    ref: Reference,
    platform: tuple[str, str],
    options: PullOptions,
    catalog: Catalog,
    display: PullDisplay,
) -> Pulled:
    started = time.monotonic()
    top = _inspect(ref, ref, options)
    digest = _sha256(top)
    if ref.digest is not None and digest != ref.digest:
        raise PullError(
            f"pull {ref}: the registry sent a manifest whose digest is {short(digest)}; "
            "the registry or something between is not trustworthy"
        )
    manifest_digest, manifest = _platform_manifest(ref, top, digest, platform, options)
    found = catalog.find(ref.name, _platform_name(platform))
    if found is not None and found[1] == digest:
        display.step(f"{ref} is up to date ({digest})")
        return Pulled(ref, digest, found[0], platform, fetched=False)
    if manifest_digest != digest:
        display.step(f"{ref}: {_platform_name(platform)} image {short(manifest_digest)}")
    layers = _layers(ref, manifest)
    key, created, blobs, unpacked = fetch(
        ref, manifest_digest, layers, platform, options.registry, catalog, display
    )
    catalog.record(ref.name, ref.repository, digest, key, _platform_name(platform), blobs, created)
    elapsed = time.monotonic() - started
    if unpacked and not display.live:
        display.step(f"unpacked {ref} ({len(layers)} layers)")
    display.step(f"pulled {ref} ({digest}) in {elapsed:.1f}s")
    return Pulled(ref, digest, key, platform, fetched=True)


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _inspect(
    ref: Reference, target: Reference, options: PullOptions, config: bool = False
) -> bytes:
    try:
        return skopeo.inspect_raw(target, options.registry, config=config)
    except SkopeoError as exc:
        raise explain(ref, exc, options.registry) from None


def _json(ref: Reference, data: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise PullError(f"pull {ref}: the registry sent a {what} that is not a JSON object")
    return parsed


def _platform_manifest(
    ref: Reference, top: bytes, digest: str, platform: tuple[str, str], options: PullOptions
) -> tuple[str, dict[str, Any]]:
    """(digest, parsed manifest) of the image for ``platform``; PullError when there is none."""
    document = _json(ref, top, "manifest")
    media_type = document.get("mediaType", "")
    if media_type in image_formats.INDEX_TYPES or (
        "manifests" in document and "layers" not in document
    ):
        chosen = _choose(ref, document, platform)
        data = _inspect(ref, ref.at(chosen), options)
        if _sha256(data) != chosen:
            raise PullError(
                f"pull {ref}: the registry sent a manifest that does not match {short(chosen)}"
            )
        manifest = _json(ref, data, "manifest")
        return chosen, manifest
    if media_type and media_type not in image_formats.MANIFEST_TYPES:
        raise PullError(
            f"pull {ref}: unsupported manifest type {media_type!r} "
            "(only OCI and docker schema 2 images are supported)"
        )
    config = document.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        data = _inspect(ref, ref.at(digest), options, config=True)
        if _sha256(data) != config["digest"]:
            raise PullError(
                f"pull {ref}: the registry sent a config that does not match "
                f"{short(config['digest'])}"
            )
        image_config = _json(ref, data, "config")
        found = (image_config.get("os"), image_config.get("architecture"))
        if isinstance(found[0], str) and isinstance(found[1], str) and found != platform:
            raise PullError(
                f"pull {ref}: the image is built for {found[0]}/{found[1]}, not "
                f"{_platform_name(platform)}; a pysandbox VM here cannot run it "
                "(use an image for this platform)"
            )
    return digest, document


def _choose(ref: Reference, index: dict[str, Any], platform: tuple[str, str]) -> str:
    """The manifest digest of the index entry for ``platform``."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise PullError(f"pull {ref}: the registry sent an index without a manifests list")
    offered: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        spec = entry.get("platform") or {}
        pair = (spec.get("os"), spec.get("architecture")) if isinstance(spec, dict) else None
        if pair is None or pair == ("unknown", "unknown"):
            continue  # attestations and other non-images
        offered.append(f"{pair[0]}/{pair[1]}")
        digest = entry.get("digest")
        if pair == platform and isinstance(digest, str) and is_digest(digest):
            if entry.get("mediaType", "") in image_formats.INDEX_TYPES:
                raise PullError(f"pull {ref}: nested indexes are not supported")
            return digest
    raise PullError(
        f"pull {ref}: no image for {_platform_name(platform)} in it "
        f"(only {', '.join(sorted(set(offered))) or 'none'}); "
        "a pysandbox VM here runs "
        f"{', '.join(_platform_name(p) for p in runnable_platforms())} images"
    )


def _layers(ref: Reference, manifest: dict[str, Any]) -> list[tuple[str, int]]:
    """(digest, size) of each layer of the manifest, validated."""
    raw = manifest.get("layers")
    if not isinstance(raw, list):
        raise PullError(f"pull {ref}: the manifest has no layers list")
    layers = []
    for item in raw:
        digest = item.get("digest") if isinstance(item, dict) else None
        size = item.get("size") if isinstance(item, dict) else None
        if (
            not isinstance(digest, str)
            or not is_digest(digest)
            or not isinstance(size, int)
            or size < 0
        ):
            raise PullError(f"pull {ref}: the manifest lists a malformed or non-sha256 layer")
        layers.append((digest, size))
    return layers
