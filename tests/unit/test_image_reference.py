"""Image references as docker, podman and skopeo read them; skopeo's messages and bars."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.errors import PullError
from sandbox.image import pull, skopeo
from sandbox.image.reference import Reference, ReferenceError, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.20", "docker.io/library/alpine:3.20"),
        ("library/alpine", "docker.io/library/alpine:latest"),
        ("docker.io/alpine", "docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine:edge", "docker.io/library/alpine:edge"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("localhost/x:1", "localhost/x:1"),
        ("127.0.0.1:5000/a/b/c:v1.2-rc_3", "127.0.0.1:5000/a/b/c:v1.2-rc_3"),
        ("quay.io/podman/stable", "quay.io/podman/stable:latest"),
        ("[::1]:5000/x:y", "[::1]:5000/x:y"),
        (f"alpine@{DIGEST}", f"docker.io/library/alpine@{DIGEST}"),
        (f"alpine:3.20@{DIGEST}", f"docker.io/library/alpine@{DIGEST}"),
        (f"localhost:5000/x@{DIGEST}", f"localhost:5000/x@{DIGEST}"),
        ("a__b/c-d/e.f:T", "docker.io/a__b/c-d/e.f:T"),
        ("localhost:5000", "docker.io/library/localhost:5000"),  # as docker reads it
    ],
)
def test_normalised_names(text: str, name: str) -> None:
    assert parse(text).name == name


def test_parts() -> None:
    ref = parse("localhost:5000/team/app:1")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("localhost:5000", "team/app", "1", None)
    assert ref.repository == "localhost:5000/team/app"
    pinned = ref.at(DIGEST)
    assert pinned.name == f"localhost:5000/team/app@{DIGEST}" and pinned.tag is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cannot be empty"),
        ("Alpine", "must be lowercase"),
        ("docker.io/Library/alpine", "must be lowercase"),
        ("alpine:", "invalid tag ''"),
        ("alpine:-x", "invalid tag"),
        ("alpine:" + "x" * 129, "invalid tag"),
        ("alp ine", "white space"),
        (" alpine", "white space"),
        ("a//b", "invalid repository name"),
        ("a/-b", "invalid repository name"),
        ("a/b/", "invalid repository name"),
        ("alpine@sha256:abc", "invalid digest"),
        ("alpine@sha512:" + "a" * 128, "algorithm 'sha512' is not supported"),
        ("alpine@SHA256:" + "a" * 64, "invalid digest"),
        ("-bad.io/x", "invalid registry"),
        ("localhost:5000/", "repository name is empty"),
        ("x/" + "a" * 300, "longer than 255"),
        ("a@b@" + DIGEST, "invalid digest"),
    ],
)
def test_invalid_references(text: str, message: str) -> None:
    with pytest.raises(ReferenceError, match=message):
        parse(text)


def test_pull_reports_an_invalid_reference_as_one_line() -> None:
    with pytest.raises(PullError, match=r"invalid image reference 'Alpine': .*lowercase"):
        pull.parse_reference("Alpine")
    assert pull.parse_reference("docker://alpine").name == "docker.io/library/alpine:latest"


# --- properties ----------------------------------------------------------------------------

_alnum = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--"])
_component = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=2),
)
_path = st.lists(_component, min_size=1, max_size=3).map("/".join)
_label = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
_domain = st.one_of(
    st.just("localhost"),
    st.builds(lambda a, b: f"{a}.{b}", _label, _label),
    st.builds(lambda host, port: f"{host}:{port}", _label, st.integers(1, 65535)),
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@st.composite
def _references(draw: st.DrawFn) -> tuple[str, Reference]:
    """Text of a reference and the Reference it must parse to."""
    path = draw(_path)
    domain = draw(st.none() | _domain)
    first = path.split("/")[0]
    if domain is None and "/" in path and ("." in first or first == "localhost"):
        domain = "localhost"  # such a first component *is* a registry (docker's rule)
    tag = draw(st.none() | _tag)
    digest = draw(st.none() | _digest)
    text = path if domain is None else f"{domain}/{path}"
    text += (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    if domain is None:
        domain = "docker.io"
        path = path if "/" in path else f"library/{path}"
    expected = Reference(domain, path, None if digest else (tag or "latest"), digest)
    return text, expected


@given(_references())
def test_references_parse_to_their_pieces(case: tuple[str, Reference]) -> None:
    text, expected = case
    assert parse(text) == expected


@given(_references())
def test_normalising_is_idempotent(case: tuple[str, Reference]) -> None:
    ref = parse(case[0])
    assert parse(ref.name) == ref
    assert (ref.tag is None) != (ref.digest is None)
    assert ref.name.startswith(ref.repository + ("@" if ref.digest else ":"))


@given(st.text(max_size=80))
def test_any_text_parses_or_is_refused_with_reference_error(text: str) -> None:
    try:
        ref = parse(text)
    except ReferenceError as exc:
        assert str(exc)
        return
    assert isinstance(ref, Reference) and parse(ref.name) == ref


# --- skopeo's output -----------------------------------------------------------------------


def test_skopeo_messages_are_classified_and_redacted() -> None:
    def fatal(message: str) -> bytes:
        quoted = message.replace("\\", "\\\\").replace('"', '\\"')
        return f'time="2026-01-01T00:00:00Z" level=fatal msg="{quoted}"\n'.encode()

    cases = {
        'Error parsing image name "docker://x": reading manifest v1 in h/x: manifest unknown': (
            skopeo.Failure.NOT_FOUND
        ),
        'pinging container registry h: Get "https://h/v2/": dial tcp 127.0.0.1:9: connect: '
        "connection refused": skopeo.Failure.UNREACHABLE,
        'Get "https://h/v2/": http: server gave HTTP response to HTTPS client': (
            skopeo.Failure.PLAIN_HTTP
        ),
        "x509: certificate signed by unknown authority": skopeo.Failure.TLS,
        "reading manifest v1 in h/x: unauthorized: authentication required": (
            skopeo.Failure.UNAUTHORIZED
        ),
        "writing blob: happened during read: Digest did not match, expected sha256:1, got "
        "sha256:2": skopeo.Failure.DIGEST,
        "writing blob: write /s/blobs/x: no space left on device": skopeo.Failure.NO_SPACE,
        "something else entirely": skopeo.Failure.OTHER,
    }
    for message, kind in cases.items():
        error = skopeo.classify(fatal(message))
        assert error.kind is kind, message
        assert not error.detail.startswith("Error parsing image name")
    leaked = skopeo.classify(
        fatal('Get "https://user:s3cr3t@h/v2/": Authorization: Basic dXNlcjpzM2NyM3Q= refused')
    )
    assert "s3cr3t" not in str(leaked) and "dXNlcjpzM2NyM3Q" not in str(leaked)


def test_bar_parser_reports_bytes_per_blob() -> None:
    seen: list[tuple[str, int]] = []
    parser = skopeo.BarParser(lambda hexid, count: seen.append((hexid, count)))
    parser.feed(b"Getting image source signatures\r\nCopying blob 1eb815e6ea79 [==>---] 11.7")
    parser.feed(b"MiB / 57.2MiB\r\n\x1b[3A\x1b[JCopying blob 926988e08e09 done  \r\n")
    parser.feed(b"Copying blob sha256:9a7e0d3daaeb00 [=] 336.0b / 336.0b\r\nnoise\r\n")
    assert seen == [("1eb815e6ea79", int(11.7 * 2**20)), ("9a7e0d3daaeb", 336)]


def test_platforms_the_vm_cannot_run_are_refused_before_any_network() -> None:
    host = "/".join(pull.runnable_platforms()[0])
    assert pull.parse_platform(host) == tuple(host.split("/"))
    with pytest.raises(PullError, match=r"--platform linux/s390x: a pysandbox VM .* only"):
        pull.parse_platform("linux/s390x")
    with pytest.raises(PullError, match="invalid --platform 'amd64'"):
        pull.parse_platform("amd64")
