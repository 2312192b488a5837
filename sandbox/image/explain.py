"""One-line messages for failed registry calls: what failed, for which reference, what to do."""

from __future__ import annotations

from sandbox.errors import PullError
from sandbox.image import skopeo
from sandbox.image import store as images
from sandbox.image.reference import Reference
from sandbox.image.skopeo import Failure, RegistryOptions, SkopeoError
from sandbox.image.unpack import short


def explain(ref: Reference, error: SkopeoError, registry: RegistryOptions) -> PullError:
    """The one-line PullError for a failed skopeo call about ``ref``."""
    host = ref.domain
    kind = error.kind
    if kind is Failure.NOT_FOUND:
        return PullError(_not_found(ref, registry))
    advice = {
        Failure.MISSING_TOOL: "apt-get install skopeo (or run scripts/install-host-packages.sh)",
        Failure.UNAUTHORIZED: (
            f"the image does not exist or needs credentials: check the name, or log in "
            f"(skopeo login {host}) or give --authfile FILE"
        ),
        Failure.PLAIN_HTTP: (
            f"use --tls-verify=false for a local registry, or mark {host} insecure in "
            "registries.conf"
        ),
        Failure.TLS: (
            f"put {host}'s CA certificate in /etc/containers/certs.d/{host}/ca.crt, or use "
            "--tls-verify=false for a local test registry"
        ),
        Failure.UNREACHABLE: f"check that {host} is up and reachable from this host",
        Failure.DIGEST: (
            "the registry's copy is corrupt or was tampered with; nothing was kept — "
            "push the image again or use another registry"
        ),
        Failure.TRUNCATED: "the download was cut short; pull again",
        Failure.NO_SPACE: (
            f"the image store {images.IMAGE_STORE} is full: free space there or set "
            "PYSANDBOX_IMAGE_STORE to a larger filesystem"
        ),
        Failure.TIMEOUT: f"check that {host} is up and reachable from this host",
        Failure.TOO_LARGE: "the registry is not a container registry or is misbehaving",
        Failure.OTHER: f"check the reference and the registry ({host})",
    }[kind]
    return PullError(f"pull {ref}: {kind.value} ({error.detail}); {advice}")


def _not_found(ref: Reference, registry: RegistryOptions) -> str:
    if ref.digest is not None:
        return f"pull {ref}: {ref.repository} has no manifest {short(ref.digest)}; check the digest"
    tags = skopeo.list_tags(ref, registry)
    if tags:
        listed = ", ".join(sorted(tags)[:10]) + (", …" if len(tags) > 10 else "")
        return (
            f"pull {ref}: {ref.repository} has no tag {ref.tag!r} (tags: {listed}); check the tag"
        )
    return f"pull {ref}: no image {ref.repository} in {ref.domain}; check the name"
