"""Image references (``alpine``, ``localhost:5000/x:1``, ``quay.io/a/b@sha256:…``), normalised.

The grammar is the one docker, podman, containerd and skopeo share (the distribution
project's ``reference`` grammar):

- ``[DOMAIN/]PATH[:TAG][@DIGEST]``; the first ``/``-separated component is a DOMAIN when it
  contains a ``.`` or a ``:`` or is ``localhost``; otherwise the domain is ``docker.io``.
- ``docker.io`` (and its old spelling ``index.docker.io``) puts one-component paths under
  ``library/``: ``alpine`` → ``docker.io/library/alpine``.
- Without TAG and DIGEST the tag is ``latest``. With a DIGEST, a TAG is accepted and
  ignored, as docker does: the digest names the image.
- PATH components are lowercase ``[a-z0-9]`` runs joined by ``.``, ``_``, ``__`` or dashes;
  TAG is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; DIGEST must be ``sha256:`` + 64 lowercase hex
  digits (the only algorithm the image store supports); the repository name is at most 255
  characters.

:func:`parse` returns a :class:`Reference` or raises :class:`ReferenceError` (one clause saying
what is wrong). Nothing here touches the network or the disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
OFFICIAL_PREFIX = "library/"
MAX_NAME = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


class ReferenceError(ValueError):
    """The text is not a valid image reference; the message says why."""


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``domain`` (``docker.io``, ``localhost:5000``), ``path``
    (``library/alpine``) and a ``tag`` or a ``digest`` (exactly one of them is set)."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``domain/path``: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def name(self) -> str:
        """The full normalised name: ``repository:tag`` or ``repository@digest``."""
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"

    def at(self, digest: str) -> Reference:
        """The same repository, pinned to ``digest``."""
        return Reference(self.domain, self.path, None, digest)

    def __str__(self) -> str:
        return self.name


def is_digest(text: str) -> bool:
    """Whether ``text`` is a digest the image store accepts (``sha256:`` + 64 hex digits)."""
    return _DIGEST.fullmatch(text) is not None


def parse(text: str) -> Reference:
    """Parse and normalise ``text`` (see the module docstring); ReferenceError when invalid."""
    if not text:
        raise ReferenceError("an image reference cannot be empty")
    if text != text.strip() or any(ch.isspace() for ch in text):
        raise ReferenceError("an image reference cannot contain white space")
    remainder, at, digest = text.partition("@")
    if at:
        _check_digest(digest)
    last_slash = remainder.rfind("/")
    name, colon, tag = remainder, "", ""
    tag_colon = remainder.rfind(":")
    if tag_colon > last_slash:
        name, colon, tag = remainder[:tag_colon], ":", remainder[tag_colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ReferenceError(
                f"invalid tag {tag!r}: use letters, digits, '_', '.' and '-' "
                "(at most 128, not starting with '.' or '-')"
            )
    domain, path = _split_domain(name)
    _check_path(path, name)
    if len(f"{domain}/{path}") > MAX_NAME:
        raise ReferenceError(f"the repository name is longer than {MAX_NAME} characters")
    if at:
        return Reference(domain, path, None, digest)
    return Reference(domain, path, tag if colon else DEFAULT_TAG, None)


def _check_digest(digest: str) -> None:
    if _DIGEST.fullmatch(digest):
        return
    algorithm = digest.partition(":")[0]
    if _ANY_DIGEST.fullmatch(digest) and algorithm != "sha256":
        raise ReferenceError(f"digest algorithm {algorithm!r} is not supported (only sha256)")
    raise ReferenceError(
        f"invalid digest {digest[:80]!r}: expected sha256: followed by 64 lowercase hex digits"
    )


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN.fullmatch(first):
            raise ReferenceError(f"invalid registry {first!r}")
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == "index.docker.io":
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    return domain, path


def _check_path(path: str, name: str) -> None:
    if not path:
        raise ReferenceError("the repository name is empty")
    for component in path.split("/"):
        if _COMPONENT.fullmatch(component):
            continue
        if _COMPONENT.fullmatch(component.lower()):
            raise ReferenceError(f"repository name {name!r} must be lowercase")
        raise ReferenceError(
            f"invalid repository name {name!r}: components are lowercase letters and digits "
            "joined by '.', '_', '__' or '-'"
        )
