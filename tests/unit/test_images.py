"""Images from OCI layouts, oci-archives and docker-archives; hostile layer tarballs.

Every fixture is built here with tarfile/json/hashlib: no container tool, no network, no VM.
Hostile tars point at a real directory of the test (``outside``) and must leave it untouched.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import ConfigError
from sandbox.image import formats as image_formats
from sandbox.image import store as images
from sandbox.image import unpack as image_unpack

OS, ARCH = image_formats.host_platform()
AS_ROOT = os.geteuid() == 0

# --- building tars -------------------------------------------------------------------------


def _info(name: str, kind: bytes, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_700_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def reg(name: str, data: bytes = b"", mode: int = 0o644, **fields: Any) -> Any:
    return (_info(name, tarfile.REGTYPE, size=len(data), mode=mode, **fields), data)


def dirent(name: str, mode: int = 0o755, **fields: Any) -> Any:
    return (_info(name, tarfile.DIRTYPE, mode=mode, **fields), None)


def sym(name: str, target: str) -> Any:
    return (_info(name, tarfile.SYMTYPE, linkname=target, mode=0o777), None)


def hard(name: str, target: str) -> Any:
    return (_info(name, tarfile.LNKTYPE, linkname=target, mode=0o644), None)


def dev(name: str, kind: bytes = tarfile.CHRTYPE) -> Any:
    return (_info(name, kind, devmajor=1, devminor=3, mode=0o666), None)


def fifo(name: str) -> Any:
    return (_info(name, tarfile.FIFOTYPE, mode=0o640), None)


def tar_of(*members: Any) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


@dataclass
class Blob:
    """A layer as stored (``stored``) and as the tar it decompresses to (``plain``)."""

    stored: bytes
    plain: bytes
    media_type: str


def layer(*members: Any, compress: bool = False) -> Blob:
    plain = tar_of(*members)
    if compress:
        stored = gzip.compress(plain, mtime=0)
        return Blob(stored, plain, "application/vnd.oci.image.layer.v1.tar+gzip")
    return Blob(plain, plain, "application/vnd.oci.image.layer.v1.tar")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(layers: list[Blob], **run: Any) -> bytes:
    document = {
        "architecture": ARCH,
        "os": OS,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [sha(b.plain) for b in layers]},
    }
    return json.dumps(document).encode()


def _put(root: Path, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / sha(data)[7:]).write_bytes(data)
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


def manifest_for(root: Path, layers: list[Blob], config: bytes | None = None) -> bytes:
    config_desc = _put(
        root, config or config_for(layers), "application/vnd.oci.image.config.v1+json"
    )
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [_put(root, b.stored, b.media_type) for b in layers],
        }
    ).encode()


def oci_layout(
    root: Path, layers: list[Blob], config: bytes | None = None, ref: str | None = None
) -> Path:
    """An OCI layout with one image; returns ``root``."""
    manifest = manifest_for(root, layers, config)
    annotations = {"annotations": {image_formats.REF_ANNOTATION: ref}} if ref else {}
    entry = _put(root, manifest, "application/vnd.oci.image.manifest.v1+json", **annotations)
    write_index(root, [entry])
    return root


def write_index(root: Path, entries: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))


def tar_directory(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, str(path.relative_to(directory)), recursive=False)
    return archive


def docker_archive(
    path: Path, layers: list[Blob], config: bytes | None = None, legacy: bool = False
) -> Path:
    """A docker-archive: ``<hex>.json`` config; ``<hex>.tar`` or legacy ``<id>/layer.tar``."""
    config = config or config_for(layers)
    members = [reg(f"{sha(config)[7:]}.json", config)]
    paths = []
    seen: dict[bytes, str] = {}
    for position, blob in enumerate(layers):
        if legacy:
            name = f"{position:064x}/layer.tar"
            if blob.stored in seen:  # docker save links duplicate layers
                members.append(sym(name, f"../{seen[blob.stored]}"))
            else:
                members.append(reg(name, blob.stored))
                seen[blob.stored] = name
        else:
            name = f"{sha(blob.stored)[7:]}.tar"
            members.append(reg(name, blob.stored))
        paths.append(name)
    manifest = [{"Config": f"{sha(config)[7:]}.json", "RepoTags": ["t:1"], "Layers": paths}]
    members.append(reg("manifest.json", json.dumps(manifest).encode()))
    path.write_bytes(tar_of(*members))
    return path


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "store"
    monkeypatch.setattr(images, "IMAGE_STORE", path)
    return path


@pytest.fixture()
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory hostile layers aim at; it must be exactly the same afterwards."""
    path = tmp_path / "outside"
    (path / "dir").mkdir(parents=True)
    (path / "secret").write_text("host secret\n")
    (path / "dir" / "victim").write_text("keep me\n")
    before = _snapshot(path)
    passwd_links = os.stat("/etc/passwd").st_nlink
    yield path
    assert _snapshot(path) == before
    assert os.stat("/etc/passwd").st_nlink == passwd_links


def _snapshot(path: Path) -> dict[str, tuple[int, int, bytes]]:
    result = {}
    for item in sorted(path.rglob("*")):
        st = item.lstat()
        data = item.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        result[str(item.relative_to(path))] = (st.st_mode, st.st_nlink, data)
    return result


def _leftovers(store: Path) -> list[str]:
    base = store / "sha256"
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


def _run_layers(tmp_path: Path, *layers: Blob) -> images.Image:
    return images.resolve(str(docker_archive(tmp_path / "image.tar", list(layers))))


# --- formats -------------------------------------------------------------------------------


def test_oci_layout_directory_unpacks_with_its_config(tmp_path: Path, store: Path) -> None:
    base = layer(
        dirent("bin"),
        reg("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o4755),
        sym("bin/sh", "/bin/tool"),
        dirent("etc"),
        reg("etc/hostname", b"box\n"),
        hard("etc/name", "etc/hostname"),
        fifo("run.fifo"),
    )
    config = config_for(
        [base],
        Entrypoint=["/bin/tool"],
        Cmd=["--flag"],
        Env=["A=1"],
        WorkingDir="/work",
        User="nobody",
        StopSignal="SIGQUIT",
    )
    layout = oci_layout(tmp_path / "layout", [base], config)

    image = images.resolve(str(layout))

    manifest_hex = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"][7:]
    assert image.rootfs == store / "sha256" / manifest_hex / "rootfs"  # keyed by manifest
    assert image.stored  # a store entry: nothing changes it while a run uses it
    assert (image.rootfs.parent / "config.json").read_bytes() == config
    assert image.entrypoint == ["/bin/tool"]
    assert image.cmd == ["--flag"]
    assert image.env == [images.DEFAULT_PATH, "A=1"]
    assert (image.cwd, image.user, image.stop_signal) == ("/work", "nobody", "SIGQUIT")
    rootfs = image.rootfs
    assert (rootfs / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((rootfs / "bin" / "tool").stat().st_mode) == 0o4755  # setuid kept
    assert os.readlink(rootfs / "bin" / "sh") == "/bin/tool"
    assert (rootfs / "etc" / "name").stat().st_ino == (rootfs / "etc" / "hostname").stat().st_ino
    assert stat.S_ISFIFO((rootfs / "run.fifo").lstat().st_mode)
    assert stat.S_IMODE(rootfs.stat().st_mode) == 0o755
    assert stat.S_IMODE((store / "sha256").stat().st_mode) == 0o700
    assert _leftovers(store) == [manifest_hex]


def test_oci_archive_with_gzip_layers_applies_in_order(tmp_path: Path, store: Path) -> None:
    first = layer(dirent("etc"), reg("etc/a", b"one"), reg("etc/b", b"b"), compress=True)
    second = layer(reg("etc/a", b"two"), compress=True)
    layout = oci_layout(tmp_path / "layout", [first, second])
    archive = tar_directory(layout, tmp_path / "image.tar")

    image = images.resolve(str(archive))

    assert (image.rootfs / "etc" / "a").read_bytes() == b"two"
    assert (image.rootfs / "etc" / "b").read_bytes() == b"b"
    assert image.cmd == [] and image.entrypoint == []


def test_docker_archive_legacy_layout_with_linked_duplicate_layer(
    tmp_path: Path, store: Path
) -> None:
    shared = layer(reg("shared", b"same"))
    middle = layer(reg("middle", b"m"), compress=True)
    archive = docker_archive(tmp_path / "d.tar", [shared, middle, shared], legacy=True)

    image = images.resolve(str(archive))

    config = config_for([shared, middle, shared])
    assert image.rootfs == store / "sha256" / sha(config)[7:] / "rootfs"
    assert (image.rootfs / "shared").read_bytes() == b"same"
    assert (image.rootfs / "middle").read_bytes() == b"m"
    assert images.resolve(f"{archive}:t:1").rootfs == image.rootfs


def test_docker_archive_diff_id_mismatch_is_refused(tmp_path: Path, store: Path) -> None:
    real = layer(reg("file", b"x"))
    config = config_for([layer(reg("file", b"y"))])
    archive = docker_archive(tmp_path / "d.tar", [real], config)

    with pytest.raises(ConfigError, match=r"layer 1/1 \(.*\.tar\) digest mismatch"):
        images.resolve(str(archive))
    assert _leftovers(store) == []


def test_layer_digest_mismatch_names_the_blob_and_leaves_nothing(
    tmp_path: Path, store: Path
) -> None:
    good = layer(reg("a", b"content"))
    layout = oci_layout(tmp_path / "layout", [good])
    blob = layout / "blobs" / "sha256" / sha(good.stored)[7:]
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF  # same size, different bytes
    blob.write_bytes(bytes(data))

    with pytest.raises(ConfigError) as caught:
        images.resolve(str(layout))

    message = str(caught.value)
    assert message.startswith(f"image {layout}: layer 1/1 (blobs/sha256/{sha(good.stored)[7:]})")
    assert "digest mismatch" in message and "\n" not in message
    assert _leftovers(store) == []


def test_corrupt_gzip_layer_is_reported_and_cleaned_up(tmp_path: Path, store: Path) -> None:
    first = layer(reg("ok", b"1"))
    good = layer(reg("a", os.urandom(100_000)), compress=True)
    broken = Blob(good.stored[: len(good.stored) // 2], good.plain, good.media_type)
    layout = oci_layout(tmp_path / "layout", [first, broken], config_for([first, good]))

    with pytest.raises(ConfigError, match=r"layer 2/2 .* corrupt"):
        images.resolve(str(layout))
    assert _leftovers(store) == []


def test_cache_is_reused(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = docker_archive(tmp_path / "d.tar", [layer(reg("a", b"1"))])
    first = images.resolve(str(archive))
    (first.rootfs / "marker").write_text("still here")

    def no_unpacking(*_args: Any) -> None:
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(images, "_build", no_unpacking)
    second = images.resolve(str(archive))

    assert second == first
    assert (second.rootfs / "marker").exists()


def test_losing_the_race_to_another_run_keeps_its_entry(tmp_path: Path, store: Path) -> None:
    archive = docker_archive(tmp_path / "d.tar", [layer(reg("a", b"1"))])
    image = images.resolve(str(archive))
    with image_formats.ArchiveSource(archive) as source:
        plan = image_formats.load(source)
        images._build("again", source, plan, store / "sha256", image.rootfs.parent, False)
    assert _leftovers(store) == [image.rootfs.parent.name]
    assert (image.rootfs / "a").read_bytes() == b"1"


def test_interrupted_unpack_leaves_nothing(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(image_unpack.Unpacker, "apply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        images.resolve(str(docker_archive(tmp_path / "d.tar", [layer(reg("a"))])))
    assert _leftovers(store) == []


def test_dead_runs_temporary_directories_are_swept(tmp_path: Path, store: Path) -> None:
    base = store / "sha256"
    dead = base / ".tmp-0123456789ab-999999999-x"
    live = base / f".tmp-0123456789ab-{os.getpid()}-y"
    for path in (dead, live):
        (path / "rootfs").mkdir(parents=True)
    half = base / ("f" * 64)  # a directory without config.json is not a complete entry
    (half / "rootfs").mkdir(parents=True)

    images.resolve(str(docker_archive(tmp_path / "d.tar", [layer(reg("a"))])))

    assert not dead.exists()
    assert live.exists()
    assert half.exists()  # another image: untouched


def test_incomplete_entry_is_rebuilt(tmp_path: Path, store: Path) -> None:
    blobs = [layer(reg("a", b"1"))]
    archive = docker_archive(tmp_path / "d.tar", blobs)
    entry = store / "sha256" / sha(config_for(blobs))[7:]
    (entry / "rootfs").mkdir(parents=True)  # as if written by something else, no config.json

    image = images.resolve(str(archive))

    assert (image.rootfs / "a").read_bytes() == b"1"
    assert (entry / "config.json").exists()


def test_platform_is_picked_from_a_nested_index(tmp_path: Path, store: Path) -> None:
    root = tmp_path / "layout"
    ours = layer(reg("ours"))
    other_config = json.loads(config_for([layer(reg("theirs"))]))
    other_config["architecture"] = "s390x"
    entries = []
    for arch, blobs, config in (
        ("s390x", [layer(reg("theirs"))], json.dumps(other_config).encode()),
        (ARCH, [ours], None),
    ):
        manifest = manifest_for(root, blobs, config)
        platform = {"platform": {"os": OS, "architecture": arch}}
        entries.append(
            _put(root, manifest, "application/vnd.oci.image.manifest.v1+json", **platform)
        )
    nested = json.dumps({"schemaVersion": 2, "manifests": entries}).encode()
    write_index(root, [_put(root, nested, "application/vnd.oci.image.index.v1+json")])

    image = images.resolve(str(root))

    assert (image.rootfs / "ours").exists()
    assert not (image.rootfs / "theirs").exists()


def test_only_foreign_platforms_is_an_error(tmp_path: Path, store: Path) -> None:
    root = tmp_path / "layout"
    manifest = manifest_for(root, [layer(reg("x"))])
    entry = _put(
        root,
        manifest,
        "application/vnd.oci.image.manifest.v1+json",
        platform={"os": "linux", "architecture": "s390x"},
    )
    write_index(root, [entry])
    with pytest.raises(ConfigError, match=rf"no image for {OS}/{ARCH} \(only linux/s390x\)"):
        images.resolve(str(root))


def test_refs_select_among_several_images(tmp_path: Path, store: Path) -> None:
    root = tmp_path / "layout"
    entries = []
    for name in ("alpha", "beta"):
        manifest = manifest_for(root, [layer(reg(name))])
        annotations = {"annotations": {image_formats.REF_ANNOTATION: name}}
        entries.append(
            _put(root, manifest, "application/vnd.oci.image.manifest.v1+json", **annotations)
        )
    write_index(root, entries)

    with pytest.raises(ConfigError, match=r"holds 2 images \(names: alpha, beta\); pick one"):
        images.resolve(str(root))
    assert (images.resolve(f"{root}:beta").rootfs / "beta").exists()
    with pytest.raises(ConfigError, match=r"no image named 'gamma' \(names: alpha, beta\)"):
        images.resolve(f"{root}:gamma")


def test_plain_directories_keep_working_and_reject_refs(tmp_path: Path, store: Path) -> None:
    rootfs = tmp_path / "root:fs"
    (rootfs / "bin").mkdir(parents=True)
    assert images.resolve(str(rootfs)).rootfs == rootfs.resolve()  # ':' in an existing path
    plain = tmp_path / "plain"
    (plain / "bin").mkdir(parents=True)
    with pytest.raises(ConfigError, match="is a root filesystem directory"):
        images.resolve(f"{plain}:latest")
    # Not a path: a registry reference, which `run` hands to sandbox.image.pull instead.
    assert not images.is_local("docker.io/library/busybox:latest")
    assert images.is_local(str(rootfs)) and images.is_local(images.DEFAULT_IMAGE)
    with pytest.raises(ConfigError, match="not found: give 'default', a root filesystem"):
        images.resolve("docker.io/library/busybox:latest")


def test_same_image_under_two_names_is_not_ambiguous(tmp_path: Path, store: Path) -> None:
    root = tmp_path / "layout"
    manifest = manifest_for(root, [layer(reg("only"))])
    entries = [
        _put(
            root,
            manifest,
            "application/vnd.oci.image.manifest.v1+json",
            annotations={image_formats.REF_ANNOTATION: name},
        )
        for name in ("latest", "1.0")
    ]
    write_index(root, entries)
    assert (images.resolve(str(root)).rootfs / "only").exists()


def test_docker_directory_paths_cannot_leave_the_directory(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    blobs = [layer(reg("a"))]
    config = config_for(blobs)
    directory = tmp_path / "unpacked-docker-archive"
    directory.mkdir()
    (directory / "config.json").write_bytes(config)
    for path in ("../outside/secret", "/../outside/secret", "a/../../outside/secret"):
        manifest = [{"Config": "config.json", "Layers": [path]}]
        (directory / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ConfigError, match=r"invalid path '.*secret' in the image"):
            images.resolve(str(directory))
    (directory / "layer.tar").write_bytes(blobs[0].stored)
    manifest = [{"Config": "config.json", "Layers": ["layer.tar"]}]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert (images.resolve(str(directory)).rootfs / "a").exists()


def test_not_an_image_archive(tmp_path: Path, store: Path) -> None:
    junk = tmp_path / "x.tar"
    junk.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ConfigError, match=rf"^image {junk}: not a docker-archive or oci-archive"):
        images.resolve(str(junk))
    rootfs_tar = tmp_path / "fs.tar"
    rootfs_tar.write_bytes(tar_of(dirent("bin"), reg("bin/sh")))
    with pytest.raises(ConfigError, match=r"\(no manifest.json or index.json\)"):
        images.resolve(str(rootfs_tar))


def test_truncated_archive_is_a_corrupt_tarball(tmp_path: Path, store: Path) -> None:
    archive = docker_archive(tmp_path / "d.tar", [layer(reg("a", b"z" * 50_000))])
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"^image {archive}: "):
        images.resolve(str(archive))
    assert _leftovers(store) == []


def test_json_over_4_mib_is_refused(tmp_path: Path, store: Path) -> None:
    root = tmp_path / "layout"
    write_index(root, [])
    (root / "index.json").write_bytes(b" " * (4 * 2**20 + 1))
    with pytest.raises(
        ConfigError, match=r"index index\.json is 4194305 bytes; refusing JSON over"
    ):
        images.resolve(str(root))


def test_zstd_layer_without_zstd_support_is_a_clear_error(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether or not this python has a zstd module: as one that has none.
    real_import = image_unpack.importlib.import_module

    def no_zstd(name: str, package: str | None = None) -> Any:
        if name in ("compression.zstd", "zstandard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, package)

    monkeypatch.setattr(image_unpack.importlib, "import_module", no_zstd)
    fake = Blob(
        b"\x28\xb5\x2f\xfd" + b"\0" * 64, b"", "application/vnd.oci.image.layer.v1.tar+zstd"
    )
    layout = oci_layout(tmp_path / "layout", [fake], config_for([Blob(b"", b"", "")]))
    with pytest.raises(ConfigError, match="is zstd-compressed and this python has no zstd"):
        images.resolve(str(layout))
    assert _leftovers(store) == []


def test_image_for_another_architecture_is_refused(tmp_path: Path, store: Path) -> None:
    blobs = [layer(reg("a"))]
    config = json.loads(config_for(blobs))
    config["architecture"] = "s390x"
    archive = docker_archive(tmp_path / "d.tar", blobs, json.dumps(config).encode())
    with pytest.raises(ConfigError, match=rf"built for linux/s390x; this host runs {OS}/{ARCH}"):
        images.resolve(str(archive))


def test_progress_only_on_a_terminal(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images.resolve(str(docker_archive(tmp_path / "a.tar", [layer(reg("a"))])), progress=True)
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    images.resolve(
        str(docker_archive(tmp_path / "b.tar", [layer(reg("b")), layer(dev("dev/null"))])),
        progress=True,
    )
    shown = terminal.getvalue()
    assert "unpacking layer 2/2 (" in shown
    assert "unpacked " in shown
    assert "skipped 1 device node(s) (dev/null)" in shown


# --- layers: whiteouts and replacement -----------------------------------------------------


def test_whiteouts_and_opaque_directories(tmp_path: Path, store: Path) -> None:
    lower = layer(
        dirent("d"),
        reg("d/a"),
        reg("d/b"),
        dirent("d/sub"),
        reg("d/sub/deep"),
        reg("x"),
        dirent("e"),
        reg("e/f"),
        reg("e/g"),
        dirent("gone", mode=0o700),
        dirent("gone/sub"),
        reg("gone/sub/deep"),
    )
    upper = layer(
        reg("d/new"),  # before the opaque marker, same layer: survives
        reg("d/.wh..wh..opq"),
        reg("d/later"),
        reg(".wh.x"),
        reg("e/.wh.f"),
        reg(".wh.missing"),  # whiting out nothing is fine
        reg("y"),
        reg(".wh.y"),  # a whiteout never removes what its own layer added
        reg(".wh.gone"),  # a whole tree
        reg("gone/new"),  # recreated implicitly: a fresh 0755 directory
    )
    rootfs = _run_layers(tmp_path, lower, upper).rootfs
    assert sorted(p.name for p in (rootfs / "gone").iterdir()) == ["new"]
    assert stat.S_IMODE((rootfs / "gone").stat().st_mode) == 0o755

    assert sorted(p.name for p in (rootfs / "d").iterdir()) == ["later", "new"]
    assert not (rootfs / "x").exists()
    assert sorted(p.name for p in (rootfs / "e").iterdir()) == ["g"]
    assert (rootfs / "y").exists()
    assert not any(p.name.startswith(".wh.") for p in rootfs.rglob("*"))


def test_entries_of_other_types_are_replaced_not_written_through(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    lower = layer(
        reg("file-then-dir"),
        dirent("dir-then-file"),
        reg("dir-then-file/inner"),
        sym("link-then-file", str(outside / "secret")),
        hard("hardlink-then-file", "file-then-dir"),
    )
    upper = layer(
        dirent("file-then-dir"),
        reg("file-then-dir/x", b"x"),
        reg("dir-then-file", b"now a file"),
        reg("link-then-file", b"replaced"),
        reg("hardlink-then-file", b"not shared"),
    )
    rootfs = _run_layers(tmp_path, lower, upper).rootfs

    assert (rootfs / "file-then-dir" / "x").read_bytes() == b"x"
    assert (rootfs / "dir-then-file").read_bytes() == b"now a file"
    assert not (rootfs / "link-then-file").is_symlink()
    assert (rootfs / "link-then-file").read_bytes() == b"replaced"
    assert (rootfs / "hardlink-then-file").stat().st_nlink == 1


def test_usrmerge_symlinked_directories_are_followed_inside_the_root(
    tmp_path: Path, store: Path
) -> None:
    lower = layer(dirent("usr"), dirent("usr/lib"), sym("lib", "usr/lib"))
    upper = layer(reg("lib/libc.so", b"libc"))
    rootfs = _run_layers(tmp_path, lower, upper).rootfs
    assert (rootfs / "usr" / "lib" / "libc.so").read_bytes() == b"libc"
    assert (rootfs / "lib").is_symlink()


def test_read_only_directories_of_lower_layers_still_take_files(
    tmp_path: Path, store: Path
) -> None:
    lower = layer(dirent("ro", mode=0o555), reg("ro/a"))
    upper = layer(reg("ro/b", b"b"))
    rootfs = _run_layers(tmp_path, lower, upper).rootfs
    assert (rootfs / "ro" / "b").read_bytes() == b"b"
    assert stat.S_IMODE((rootfs / "ro").stat().st_mode) == 0o555


@pytest.mark.skipif(not AS_ROOT, reason="keeping owners needs root")
def test_numeric_owners_are_kept_and_names_ignored(tmp_path: Path, store: Path) -> None:
    blob = layer(
        dirent("home", uid=1000, gid=1000),
        reg("home/f", uid=4321, gid=99, uname="root", gname="root"),
        sym("home/l", "f"),
        reg("huge-id", pax_headers={"uid": str(2**40), "gid": "0"}),
    )
    image = _run_layers(tmp_path, blob)
    rootfs = image.rootfs
    st = (rootfs / "home" / "f").stat()
    assert (st.st_uid, st.st_gid) == (4321, 99)
    assert ((rootfs / "home").stat().st_uid, (rootfs / "home").stat().st_gid) == (1000, 1000)
    assert (rootfs / "huge-id").stat().st_uid == 0  # unrepresentable: stays root-owned


# --- hostile layers ------------------------------------------------------------------------


def test_dotdot_member_is_refused(tmp_path: Path, store: Path, outside: Path) -> None:
    escape = "../" * 12 + str(outside / "escape").lstrip("/")
    with pytest.raises(ConfigError, match=r"unsafe member '.*escape': '\.\.' would leave the root"):
        _run_layers(tmp_path, layer(reg(escape, b"pwned")))
    assert not (outside / "escape").exists()
    assert _leftovers(store) == []


def test_absolute_member_lands_inside_the_root(tmp_path: Path, store: Path, outside: Path) -> None:
    rootfs = _run_layers(tmp_path, layer(reg(str(outside / "abs"), b"inside"))).rootfs
    assert (rootfs / str(outside / "abs").lstrip("/")).read_bytes() == b"inside"
    assert not (outside / "abs").exists()


def test_write_through_absolute_symlink_stays_inside(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    blob = layer(sym("a", str(outside / "dir")), reg("a/victim", b"pwned"), reg("a/new", b"n"))
    rootfs = _run_layers(tmp_path, blob).rootfs
    inside = rootfs / str(outside / "dir").lstrip("/")
    assert (inside / "victim").read_bytes() == b"pwned"
    assert (inside / "new").exists()
    assert (rootfs / "a").is_symlink()


def test_write_through_climbing_relative_symlink_is_clamped(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    climb = "../" * 12 + str(outside).lstrip("/")
    blob = layer(dirent("x"), sym("x/up", climb), reg("x/up/secret", b"pwned"))
    rootfs = _run_layers(tmp_path, blob).rootfs
    assert (rootfs / str(outside).lstrip("/") / "secret").read_bytes() == b"pwned"


def test_symlink_planted_in_a_lower_layer_is_not_followed_out(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    lower = layer(sym("etc", str(outside)))
    upper = layer(reg("etc/secret", b"pwned"), reg("etc/.wh.dir"), reg("etc/dir/.wh..wh..opq"))
    rootfs = _run_layers(tmp_path, lower, upper).rootfs
    assert (rootfs / str(outside).lstrip("/") / "secret").read_bytes() == b"pwned"


def test_whiteouts_through_symlinks_do_not_delete_host_files(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    lower = layer(sym("s", str(outside / "dir")), sym("t", "../" * 12 + str(outside).lstrip("/")))
    upper = layer(reg("s/.wh.victim"), reg("t/.wh.secret"), reg("t/dir/.wh..wh..opq"))
    _run_layers(tmp_path, lower, upper)
    # (the ``outside`` fixture also compares the whole tree after the test)
    assert (outside / "dir" / "victim").read_text() == "keep me\n"
    assert (outside / "secret").read_text() == "host secret\n"


def test_hardlink_to_host_passwd_is_refused(tmp_path: Path, store: Path, outside: Path) -> None:
    with pytest.raises(ConfigError, match=r"hardlink 'p' points to '/etc/passwd', which is not"):
        _run_layers(tmp_path, layer(hard("p", "/etc/passwd")))
    with pytest.raises(ConfigError, match=r"unsafe member '.*secret': '\.\.' would leave"):
        _run_layers(tmp_path, layer(hard("q", "../" * 12 + str(outside / "secret").lstrip("/"))))
    assert _leftovers(store) == []


def test_hardlink_to_absolute_path_means_the_images_own_file(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    blob = layer(
        dirent("etc"), reg("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), hard("p", "/etc/passwd")
    )
    rootfs = _run_layers(tmp_path, blob).rootfs
    assert (rootfs / "p").stat().st_ino == (rootfs / "etc" / "passwd").stat().st_ino
    assert (rootfs / "p").stat().st_ino != os.stat("/etc/passwd").st_ino


def test_hardlink_through_symlink_cannot_reach_the_host(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    blob = layer(sym("s", str(outside)), hard("h", "s/secret"))
    with pytest.raises(ConfigError, match=r"hardlink 'h' points to 's/secret', which is not"):
        _run_layers(tmp_path, blob)
    assert (outside / "secret").stat().st_nlink == 1


def test_hardlink_to_a_symlink_links_the_symlink_itself(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    blob = layer(sym("s", str(outside / "secret")), hard("h", "s"))
    rootfs = _run_layers(tmp_path, blob).rootfs
    assert (rootfs / "h").is_symlink()
    assert os.readlink(rootfs / "h") == str(outside / "secret")


def test_device_nodes_are_skipped_fifos_kept(tmp_path: Path, store: Path, outside: Path) -> None:
    blob = layer(
        dirent("dev"),
        dev("dev/null"),
        dev("dev/sda", tarfile.BLKTYPE),
        hard("dev/null2", "dev/null"),
        fifo("dev/pipe"),
    )
    rootfs = _run_layers(tmp_path, blob).rootfs
    assert sorted(p.name for p in (rootfs / "dev").iterdir()) == ["pipe"]


def test_device_nodes_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with image_unpack.Unpacker(root) as unpacker:
        data = tar_of(dev("dev/null"), dev("dev/zero"))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            unpacker.apply(tar, "layer 1/1")
        unpacker.finish()
        assert unpacker.notes == [
            "skipped 2 device node(s) (dev/null, dev/zero); the guest provides /dev"
        ]


#: security.capability for cap_net_raw+ep (VFS_CAP_REVISION_2, effective; 20 bytes), as
#: ``setcap cap_net_raw+ep`` writes it (Debian's ping carries it).
NET_RAW_EP = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + b"\x00" * 12


def _pax(xattrs: dict[str, bytes]) -> dict[str, str]:
    return {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}


@pytest.mark.skipif(os.geteuid() != 0, reason="file capabilities need root (CAP_SETFCAP)")
def test_file_capabilities_and_user_xattrs_are_kept_others_reported(tmp_path: Path) -> None:
    """An image's ``ping`` with cap_net_raw+ep keeps it (as podman/containerd unpack it) even
    though its owner is set after; trusted.* and xattrs on a symlink are only reported."""
    root = tmp_path / "root"
    root.mkdir()
    ping = _pax({"security.capability": NET_RAW_EP, "user.note": b"\xffbinary"})
    other = _pax({"trusted.overlay.opaque": b"y", "user.on-dir": b"d"})
    with image_unpack.Unpacker(root) as unpacker:
        data = tar_of(
            reg("bin/ping", b"elf", 0o755, pax_headers=ping, uid=1000, gid=1000),
            dirent("etc", pax_headers=other),
            (
                _info(
                    "p", tarfile.SYMTYPE, linkname="bin/ping", pax_headers=_pax({"user.x": b"1"})
                ),
                None,
            ),
        )
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            unpacker.apply(tar, "layer 1/1")
        unpacker.finish()
        assert unpacker.notes == [
            "2 extended attribute(s) not kept (only user.*, file capabilities and POSIX ACLs "
            "are, on files and directories)"
        ]
    assert os.getxattr(root / "bin/ping", "security.capability") == NET_RAW_EP
    assert os.getxattr(root / "bin/ping", "user.note") == b"\xffbinary"
    assert os.listxattr(root / "etc") == ["user.on-dir"]


def test_symlink_loops_and_files_as_directories_are_errors(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    with pytest.raises(ConfigError, match="too many levels of symbolic links"):
        _run_layers(tmp_path, layer(sym("a", "b"), sym("b", "a"), reg("a/x")))
    with pytest.raises(ConfigError, match=r"'f' is not a directory"):
        _run_layers(tmp_path, layer(reg("f"), reg("f/x")))
    with pytest.raises(ConfigError, match="would replace the root directory"):
        _run_layers(tmp_path, layer(reg("./")))
    assert _leftovers(store) == []


def test_directory_symlink_cannot_redirect_the_store(
    tmp_path: Path, store: Path, outside: Path
) -> None:
    # a symlink with the name a later directory member uses: the symlink is replaced
    blob = layer(sym("d", str(outside / "dir")), dirent("d"), reg("d/victim", b"pwned"))
    rootfs = _run_layers(tmp_path, blob).rootfs
    assert not (rootfs / "d").is_symlink()
    assert (rootfs / "d" / "victim").read_bytes() == b"pwned"


# --- users ---------------------------------------------------------------------------------


@pytest.fixture()
def user_root(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\nbad\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1001:\nstaff:x:50:app\n")
    return root


@pytest.mark.parametrize(
    ("spec", "ids"),
    [
        ("", (0, 0)),
        ("app", (1000, 1001)),
        ("1000", (1000, 1001)),
        ("4242", (4242, 0)),
        ("app:staff", (1000, 50)),
        ("app:7", (1000, 7)),
        ("4242:staff", (4242, 50)),
        ("root", (0, 0)),
    ],
)
def test_resolve_user(user_root: Path, spec: str, ids: tuple[int, int]) -> None:
    assert images.resolve_user(user_root, spec) == ids


@pytest.mark.parametrize(
    ("spec", "gids"),
    [
        ("", [10]),  # root, a member of wheel
        ("root", [10]),
        ("app", [10, 50]),  # in file order, each once
        ("1000", [10, 50]),  # the name of uid 1000 in passwd
        ("4242", []),  # a uid the image does not list has no name
        ("app:staff", []),  # an explicit group: no supplementary ones (docker's rule)
        ("app:7", []),
    ],
)
def test_supplementary_groups_as_docker_gives_them(
    user_root: Path, spec: str, gids: list[int]
) -> None:
    (user_root / "etc" / "group").write_text(
        "root:x:0:\nwheel:x:10:root,app\napp:x:1001:\nstaff:x:50:app\nstaff2:x:50:app\n"
    )
    assert images.supplementary_gids(user_root, spec) == gids


def test_resolve_user_errors(user_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown user 'nobody': not in .*/etc/passwd"):
        images.resolve_user(user_root, "nobody")
    with pytest.raises(ConfigError, match=r"unknown group 'wheel': not in .*/etc/group"):
        images.resolve_user(user_root, "app:wheel")
    with pytest.raises(ConfigError, match="out of range"):
        images.resolve_user(user_root, str(2**32))
    with pytest.raises(ConfigError, match="invalid user"):
        images.resolve_user(user_root, "app:")


def test_resolve_user_never_reads_outside_the_rootfs(tmp_path: Path, outside: Path) -> None:
    host_passwd = outside / "passwd"
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to(str(outside / "passwd"))
    try:
        host_passwd.write_text("evil:x:4242:4242::/:/bin/sh\n")
        with pytest.raises(ConfigError, match="unknown user 'evil'"):
            images.resolve_user(root, "evil")
        # the same link resolved inside the root finds the image's file
        inside = root / str(outside).lstrip("/")
        inside.mkdir(parents=True)
        (inside / "passwd").write_text("good:x:7:8::/:/bin/sh\n")
        assert images.resolve_user(root, "good") == (7, 8)
    finally:
        host_passwd.unlink()


# --- deep trees: nothing may recurse on the archive's depth --------------------------------

#: Deeper than Python's default recursion limit (1000), within PATH_MAX (4096 bytes).
DEEP = "a/" * 2000


@pytest.fixture(autouse=True)
def _remove_deep_trees(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """pytest's own clean-up of tmp_path recurses: take deep trees away first."""
    yield
    if "deep" in request.node.name or "depth" in request.node.name:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(fd):
                image_unpack.remove_tree(fd, name)
        finally:
            os.close(fd)


def test_a_path_deeper_than_the_recursion_limit_unpacks(tmp_path: Path, store: Path) -> None:
    image = _run_layers(tmp_path, layer(reg(f"{DEEP}f", b"deep")))
    # (read one component at a time: the whole path is longer than the kernel takes)
    assert image_unpack.read_in_root(image.rootfs, f"{DEEP}f", 100) == b"deep"
    root_fd = os.open(image.rootfs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = image_unpack.resolve_dir(root_fd, DEEP.split("/")[:-1], create=False)
    finally:
        os.close(root_fd)
    assert found is not None
    assert stat.S_IMODE(os.fstat(found[0]).st_mode) == 0o755  # finish() reached the bottom
    os.close(found[0])
    assert _leftovers(store) == [image.rootfs.parent.name]


def test_a_failed_deep_unpack_leaves_nothing_and_blocks_no_other_image(
    tmp_path: Path, store: Path
) -> None:
    bad = layer(reg(f"{DEEP}f", b"deep"), reg("../escape"))
    with pytest.raises(ConfigError, match=r"unsafe member '\.\./escape'"):
        _run_layers(tmp_path, bad)
    assert _leftovers(store) == []
    image = images.resolve(str(docker_archive(tmp_path / "next.tar", [layer(reg("a", b"1"))])))
    assert (image.rootfs / "a").read_bytes() == b"1"


def test_a_deep_tree_of_a_lower_layer_is_replaced_and_whited_out(
    tmp_path: Path, store: Path
) -> None:
    lower = layer(reg(f"d/{DEEP}f"), reg(f"e/{DEEP}f"))
    upper = layer(reg("d", b"now a file"), reg(".wh.e"))
    image = _run_layers(tmp_path, lower, upper)
    assert (image.rootfs / "d").read_bytes() == b"now a file"
    assert not (image.rootfs / "e").exists()


def _deep_dirs_at(base: Path, parts: list[str], mode: int = 0o755) -> None:
    """mkdir ``base``/``parts``... one component at a time (the whole path is too long)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, mode, dir_fd=fd)
            fd = _swap_fd(fd, os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
    finally:
        os.close(fd)


def _swap_fd(old: int, new: int) -> int:
    os.close(old)
    return new


def test_a_dead_runs_deep_temporary_directory_is_swept(tmp_path: Path, store: Path) -> None:
    dead = store / "sha256" / ".tmp-0123456789ab-999999999-x"
    dead.mkdir(parents=True)
    _deep_dirs_at(dead, ["rootfs", *DEEP.split("/")[:-1]], mode=0o500)  # read-only, as images do
    image = images.resolve(str(docker_archive(tmp_path / "d.tar", [layer(reg("a", b"1"))])))
    assert not dead.exists()
    assert _leftovers(store) == [image.rootfs.parent.name]


def test_remove_tree_holds_few_descriptors_at_any_depth(tmp_path: Path) -> None:
    _deep_dirs_at(tmp_path, ["top", *("d/" * 3000).split("/")[:-1]])
    (tmp_path / "top" / "file").write_text("x")
    (tmp_path / "top" / "link").symlink_to(tmp_path / "outside-target")
    (tmp_path / "outside-target").mkdir()
    (tmp_path / "outside-target" / "keep").write_text("keep")
    before = len(os.listdir("/proc/self/fd"))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        image_unpack.remove_tree(fd, "top")
    finally:
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == before
    assert sorted(os.listdir(tmp_path)) == ["outside-target"]
    assert (tmp_path / "outside-target" / "keep").read_text() == "keep"  # never followed


def test_a_member_name_longer_than_path_max_is_refused(tmp_path: Path, store: Path) -> None:
    with pytest.raises(ConfigError, match="longer than PATH_MAX"):
        _run_layers(tmp_path, layer(reg("a/" * 2048 + "f")))
    assert _leftovers(store) == []


def test_a_root_filesystem_directory_is_used_in_place_not_stored(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    image = images.resolve(str(rootfs))
    assert image.rootfs == rootfs.resolve() and not image.stored  # the user may change it
