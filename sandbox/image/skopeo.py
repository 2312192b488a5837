"""The registry client: skopeo (Debian package ``skopeo``), run as a subprocess.

skopeo speaks the registry protocol and everything around it the way podman does, because
both are built on the same library (containers/image): auth files
(``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.docker/config.json``, ``--authfile``,
``$REGISTRY_AUTH_FILE``), ``registries.conf`` mirrors and insecure registries
(``$CONTAINERS_REGISTRIES_CONF``, ``~/.config/containers/registries.conf``,
``/etc/containers/registries.conf``), ``certs.d`` CA directories, proxies from the environment,
token and basic auth. Its environment is passed on unchanged. pysandbox never reads an auth
file and never puts a credential on a command line; skopeo's error text is redacted
(:func:`redact`) before it is shown.

Calls:

- :func:`inspect_raw`: one manifest or index (``skopeo inspect --raw``), or with
  ``config=True`` the image config blob (``--config --raw``), as bytes (bounded by
  ``image_formats.MAX_JSON``); the caller verifies the digest.
- :func:`list_tags`: the tags of a repository, for error messages.
- :func:`copy`: ``skopeo copy docker://REF oci:LAYOUT:pulled`` with
  ``--dest-shared-blob-dir``: blobs land in one shared directory, once per digest (a blob
  already there is not fetched again), each verified by skopeo against its digest as it
  arrives; ``LAYOUT`` gets ``oci-layout`` and ``index.json`` only. skopeo's stdout is a
  pseudo-terminal so that it reports per-blob byte counts (``Copying blob 1eb815e6ea79
  [==>--] 11.7MiB / 57.2MiB``), which :class:`BarParser` turns into calls of ``on_bytes``.

Failures raise :class:`SkopeoError` with a :class:`Failure` kind and skopeo's message.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import pty
import re
import selectors
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypervisor import syscalls
from sandbox.image.formats import MAX_JSON
from sandbox.image.reference import Reference

SKOPEO = "skopeo"
#: Seconds for one ``inspect`` (a manifest or config: small documents).
INSPECT_TIMEOUT = 120.0
#: Bytes of skopeo's stderr kept for the error message (the end of it).
STDERR_TAIL = 1 << 16
_PR_SET_PDEATHSIG = 1
#: The destination image name inside the temporary layout.
LAYOUT_NAME = "pulled"


class Failure(enum.Enum):
    """What went wrong, as far as skopeo's message tells."""

    MISSING_TOOL = "skopeo is not installed"
    NOT_FOUND = "no such image or tag"
    UNAUTHORIZED = "the registry refused access"
    PLAIN_HTTP = "the registry speaks plain HTTP"
    TLS = "TLS verification failed"
    UNREACHABLE = "the registry cannot be reached"
    DIGEST = "a blob does not match its digest"
    TRUNCATED = "a download was cut short"
    NO_SPACE = "no space left on device"
    TIMEOUT = "the registry did not answer in time"
    TOO_LARGE = "a document is too large"
    OTHER = "skopeo failed"


class SkopeoError(Exception):
    """A skopeo call failed: ``kind`` classifies it, ``detail`` is skopeo's (redacted) text."""

    def __init__(self, kind: Failure, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries: ``authfile`` (else skopeo's default lookup) and
    ``tls_verify`` (None: HTTPS with verification unless ``registries.conf`` marks the
    registry insecure; False: plain HTTP or unverified TLS allowed)."""

    authfile: Path | None = None
    tls_verify: bool | None = None

    def flags(self, prefix: str = "") -> list[str]:
        """skopeo flags; ``prefix`` is ``src-`` for ``copy``. ``$CONTAINERS_REGISTRIES_CONF``
        (podman's variable for another registries.conf) is passed on as
        ``--registries-conf``, which skopeo 1.9 takes but does not read from the
        environment itself."""
        flags: list[str] = []
        conf = os.environ.get("CONTAINERS_REGISTRIES_CONF")
        if conf:
            flags.append(f"--registries-conf={conf}")
        if self.authfile is not None:
            flags.append(f"--{prefix}authfile={self.authfile}")
        if self.tls_verify is not None:
            flags.append(f"--{prefix}tls-verify={'true' if self.tls_verify else 'false'}")
        return flags


def _die_with_parent() -> None:
    """In the child: SIGKILL when pysandbox dies, however it dies (no orphan copy)."""
    syscalls.LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def available() -> bool:
    """Whether skopeo is installed."""
    return shutil.which(SKOPEO) is not None


def _transport(ref: Reference) -> str:
    return f"docker://{ref.name}"


def inspect_raw(ref: Reference, options: RegistryOptions, *, config: bool = False) -> bytes:
    """The manifest (or index) ``ref`` names, byte for byte; with ``config``, its config."""
    argv = [SKOPEO, "inspect", "--raw", *(["--config"] if config else []), *options.flags()]
    argv.append(_transport(ref))
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        raise SkopeoError(Failure.MISSING_TOOL, "apt-get install skopeo") from None
    try:
        out, err = _communicate(proc, INSPECT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SkopeoError(
            Failure.TIMEOUT, f"no answer within {INSPECT_TIMEOUT:g}s from {ref.domain}"
        ) from None
    if proc.returncode != 0:
        raise classify(err)
    if len(out) > MAX_JSON:
        raise SkopeoError(Failure.TOO_LARGE, f"the registry sent over {MAX_JSON} bytes")
    return out


def _communicate(proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bytes]:
    """stdout (at most MAX_JSON + 1 bytes are kept) and the tail of stderr; kills on timeout."""
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        try:
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(proc.args, timeout)
                for key, _ in selector.select(remaining):
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(key.fileobj)
                        continue
                    buffer: bytearray = key.data
                    buffer += data
                    if buffer is out and len(out) > MAX_JSON:
                        del out[MAX_JSON + 1 :]
                    elif buffer is err and len(err) > STDERR_TAIL:
                        del err[:-STDERR_TAIL]
            proc.wait(max(0.1, deadline - time.monotonic()))
        except BaseException:
            _kill(proc)
            raise
        finally:
            proc.stdout.close()
            proc.stderr.close()
    return bytes(out), bytes(err)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def list_tags(ref: Reference, options: RegistryOptions) -> list[str] | None:
    """The repository's tags, or None when they cannot be listed (any failure)."""
    argv = [SKOPEO, "list-tags", *options.flags(), f"docker://{ref.repository}"]
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, _ = _communicate(proc, INSPECT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        tags = json.loads(out).get("Tags")
    except (ValueError, AttributeError):
        return None
    if not isinstance(tags, list):
        return None
    return [t for t in tags if isinstance(t, str)]


def copy(
    ref: Reference,
    layout: Path,
    blobs: Path,
    options: RegistryOptions,
    on_bytes: Callable[[str, int], None],
    tick: Callable[[], None],
) -> None:
    """Copy the image ``ref`` names into the OCI layout ``layout``, its blobs into ``blobs``
    (``blobs/sha256/<hex>``). ``on_bytes(hex_prefix, count)`` reports bytes of a blob
    received so far (hex_prefix: the first 12 hex digits of its digest); ``tick()`` is called
    about ten times a second. Blobs are kept as the registry serves them (no
    recompression); signatures are not copied (skopeo checks them against
    ``policy.json`` while reading). SkopeoError on failure; KeyboardInterrupt stops skopeo.
    """
    argv = [
        SKOPEO,
        "copy",
        "--remove-signatures",
        "--dest-oci-accept-uncompressed-layers",
        f"--dest-shared-blob-dir={blobs}",
        *options.flags("src-"),
        _transport(ref),
        f"oci:{layout}:{LAYOUT_NAME}",
    ]
    master, slave = pty.openpty()
    try:
        # Wide and tall: every blob's bar fits on one line, so each line names its blob.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 1000, 300, 0, 0))
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError:
            raise SkopeoError(Failure.MISSING_TOOL, "apt-get install skopeo") from None
    finally:
        os.close(slave)
    parser = BarParser(on_bytes)
    err = bytearray()
    assert proc.stderr is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(master, selectors.EVENT_READ, "pty")
            selector.register(proc.stderr, selectors.EVENT_READ, "err")
            while selector.get_map():
                for key, _ in selector.select(0.1):
                    try:
                        data = os.read(key.fd, 65536)
                    except OSError:  # EIO: the pty's other side is closed
                        data = b""
                    if not data:
                        selector.unregister(key.fileobj)
                    elif key.data == "pty":
                        parser.feed(data)
                    else:
                        err += data
                        del err[:-STDERR_TAIL]
                tick()
        proc.wait()
    except BaseException:
        _kill(proc)
        raise
    finally:
        os.close(master)
        proc.stderr.close()
    if proc.returncode != 0:
        raise classify(bytes(err))


_CSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
_BAR = re.compile(
    r"Copying blob (?:sha256:)?(?P<hex>[0-9a-f]{12})[0-9a-f]*\s.*?"
    r"(?P<done>[0-9.]+)\s*(?P<unit>[KMGT]?i?B|b)\s*/\s*[0-9.]+\s*(?:[KMGT]?i?B|b)"
)
_UNITS = {"b": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_UNITS.update({"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12})


class BarParser:
    """Turns skopeo's terminal progress bars into ``on_bytes(hex_prefix, bytes)`` calls.

    Lines that do not look like a blob's bar are ignored, so a skopeo that draws its bars
    differently only costs the byte counts, never the pull.
    """

    def __init__(self, on_bytes: Callable[[str, int], None]) -> None:
        self._on_bytes = on_bytes
        self._pending = b""

    def feed(self, data: bytes) -> None:
        """Take more terminal output."""
        pieces = re.split(rb"[\r\n]", _CSI.sub(b"", self._pending + data))
        self._pending = pieces.pop()[-4096:]
        for piece in pieces:
            match = _BAR.search(piece.decode("utf-8", "replace"))
            if match is None:
                continue
            unit = _UNITS.get(match["unit"])
            with contextlib.suppress(ValueError):
                if unit is not None:
                    self._on_bytes(match["hex"], int(float(match["done"]) * unit))


# --- errors --------------------------------------------------------------------------------

_FATAL = re.compile(r'level=(?:fatal|error) msg="((?:[^"\\]|\\.)*)"')
_NAME_PREFIX = re.compile(r'^Error parsing image name "[^"]*": ')
_USERINFO = re.compile(r"(//)[^/@\s:]+:[^/@\s]+@")
_AUTH_HEADER = re.compile(r"\b(Basic|Bearer)\s+[A-Za-z0-9+/=._~-]+", re.IGNORECASE)
_PATTERNS: tuple[tuple[Failure, tuple[str, ...]], ...] = (
    (Failure.NO_SPACE, ("no space left on device",)),
    (Failure.DIGEST, ("digest did not match", "digest mismatch", "does not match digest")),
    (
        Failure.UNAUTHORIZED,
        (
            "unauthorized",
            "authentication required",
            "invalid username/password",
            "requested access to the resource is denied",
            "access denied",
        ),
    ),
    (Failure.PLAIN_HTTP, ("server gave http response to https client",)),
    (Failure.TLS, ("x509:", "tls:", "certificate")),
    (Failure.NOT_FOUND, ("manifest unknown", "name unknown", "repository name not known")),
    (
        Failure.UNREACHABLE,
        (
            "connection refused",
            "no such host",
            "network is unreachable",
            "no route to host",
            "connection reset",
            "i/o timeout",
            "dial tcp",
            "context deadline exceeded",
            "server misbehaving",
        ),
    ),
    (Failure.TRUNCATED, ("unexpected eof",)),
)


def redact(text: str) -> str:
    """``text`` without credentials: URL user info and Authorization header values."""
    return _AUTH_HEADER.sub(r"\1 <redacted>", _USERINFO.sub(r"\1<redacted>@", text))


def message_of(stderr: bytes) -> str:
    """skopeo's error message from its stderr (the last fatal log line, unquoted)."""
    text = stderr.decode("utf-8", "replace")
    matches = _FATAL.findall(text)
    if matches:
        raw = matches[-1]
        try:
            message = str(json.loads(f'"{raw}"'))
        except ValueError:
            message = raw.replace('\\"', '"')
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        message = lines[-1] if lines else "no error message"
    return redact(_NAME_PREFIX.sub("", message))[:1000]


def classify(stderr: bytes) -> SkopeoError:
    """The :class:`SkopeoError` for a failed call's stderr."""
    message = message_of(stderr)
    lowered = message.lower()
    for kind, needles in _PATTERNS:
        if any(needle in lowered for needle in needles):
            return SkopeoError(kind, message)
    return SkopeoError(Failure.OTHER, message)
