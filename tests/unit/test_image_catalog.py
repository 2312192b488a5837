"""The record of pulled images: names, listing, removal and blob collection (no registry)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from sandbox.errors import ConfigError, NotFoundError, StateError
from sandbox.image import catalog as catalog_module
from sandbox.image import store as images
from sandbox.image.catalog import Catalog


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(images, "IMAGE_STORE", tmp_path / "store")
    return tmp_path / "store"


def _image(store: Path, key: str, blobs: list[str], content: bytes = b"x" * 10) -> None:
    """A complete store entry plus its blobs, as a pull leaves them."""
    rootfs = store / "sha256" / key[7:] / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "sh").write_bytes(content)
    (rootfs.parent / "config.json").write_text("{}")
    for blob in blobs:
        path = store / "blobs" / "sha256" / blob[7:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(blob)


def test_record_list_and_remove_with_shared_blobs(store: Path) -> None:
    shared, only_a, only_b = _digest("base"), _digest("a"), _digest("b")
    key_a, key_b = _digest("manifest a"), _digest("manifest b")
    _image(store, key_a, [shared, only_a, key_a])
    _image(store, key_b, [shared, only_b, key_b], content=b"y" * 30)
    stray = _digest("left by a failed pull")
    (store / "blobs" / "sha256" / stray[7:]).write_text("stray")
    catalog = Catalog()
    catalog.record("r/a:1", "r/a", _digest("index a"), key_a, "linux/amd64",
                   [shared, only_a, key_a], "2024-01-01T00:00:00Z")  # fmt: skip
    catalog.record("r/b:1", "r/b", key_b, key_b, "linux/amd64", [shared, only_b, key_b], "")
    catalog.add_name("r/b@" + key_b, key_b, key_b)

    rows = {row.name: row for row in catalog.rows()}
    assert sorted(rows) == ["r/a:1", "r/b:1", "r/b@" + key_b]
    assert rows["r/a:1"].digest == _digest("index a") and rows["r/a:1"].id == key_a
    assert rows["r/a:1"].size == 10 and rows["r/b:1"].size == 30
    assert catalog.find("r/a:1", "linux/amd64") == (key_a, _digest("index a"))
    assert catalog.find("r/a:1", "linux/386") is None
    assert catalog.find_digest("r/b", key_b, "linux/amd64") == key_b

    assert catalog.remove("r/a:1", "r/a:1") == ["untagged r/a:1", f"deleted {key_a}"]
    assert not (store / "sha256" / key_a[7:]).exists()
    left = sorted(os.listdir(store / "blobs" / "sha256"))
    assert left == sorted(d[7:] for d in (shared, only_b, key_b))  # stray collected too

    # An id prefix removes every name of the image.
    assert catalog.remove(key_b[:15]) == [
        "untagged r/b:1",
        "untagged r/b@" + key_b,
        f"deleted {key_b}",
    ]
    assert catalog.rows() == [] and os.listdir(store / "blobs" / "sha256") == []
    with pytest.raises(NotFoundError, match="image r/a:1 is not in the store"):
        catalog.remove("r/a:1", "r/a:1")


def test_a_moved_name_leaves_the_old_image_listed_until_removed(store: Path) -> None:
    old, new = _digest("old"), _digest("new")
    _image(store, old, [old])
    _image(store, new, [new])
    catalog = Catalog()
    catalog.record("r/x:1", "r/x", old, old, "linux/amd64", [old], "")
    catalog.record("r/x:1", "r/x", new, new, "linux/amd64", [new], "")
    assert [(row.name, row.id) for row in catalog.rows()] == [("r/x:1", new), ("<none>", old)]
    assert catalog.remove(old) == [f"deleted {old}"]
    assert [row.name for row in catalog.rows()] == ["r/x:1"]


def test_an_ambiguous_prefix_is_refused(store: Path) -> None:
    a, b = "sha256:abcdef" + "0" * 58, "sha256:abcdef" + "1" * 58
    catalog = Catalog()
    for name, key in (("r/a:1", a), ("r/b:1", b)):
        _image(store, key, [key])
        catalog.record(name, name[:3], key, key, "linux/amd64", [key], "")
    with pytest.raises(ConfigError, match="abcdef matches 2 images; give more of the digest"):
        catalog.remove("abcdef")
    with pytest.raises(NotFoundError):
        catalog.remove("abcde")  # fewer than 6 digits is no prefix
    assert catalog.remove("abcdef0") == ["untagged r/a:1", f"deleted {a}"]


def _recorded_image(store: Path, name: str, bound_at: str) -> tuple[Catalog, str, tuple[str, str]]:
    """A catalog recording image ``r/NAME:1``, its key, and two /proc/self/mountinfo lines:
    the root filesystem holding the store, and a bind of the image's rootfs at ``bound_at``
    (as a run shares it)."""
    key = _digest(name)
    _image(store, key, [key])
    catalog = Catalog()
    catalog.record(f"r/{name}:1", f"r/{name}", key, key, "linux/amd64", [key], "")
    rootfs = os.path.realpath(store / "sha256" / key[7:] / "rootfs")
    dev = os.stat(rootfs).st_dev
    device = f"{os.major(dev)}:{os.minor(dev)}"
    root = f"27 1 {device} / / rw,relatime - ext4 /dev/vda rw\n"
    bind = f"60 93 {device} {rootfs} {bound_at} ro - ext4 /dev/vda rw\n"
    return catalog, key, (root, bind)


def test_an_image_a_running_container_mounts_is_not_removed(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog, key, (other, bind) = _recorded_image(store, "busy", "/run/p/shared/main/rootfs")
    mountinfo = other + bind
    assert catalog_module._in_use(store / "sha256" / key[7:], mountinfo)
    assert not catalog_module._in_use(store / "sha256" / key[7:], other)
    real = catalog_module._mounted_at
    monkeypatch.setattr(catalog_module, "_mounted_at", lambda entry: real(entry, mountinfo))
    with pytest.raises(StateError, match="is used by a running container; stop it first"):
        catalog.remove("r/busy:1", "r/busy:1")
    assert [row.name for row in catalog.rows()] == ["r/busy:1"]  # nothing changed
    assert (store / "sha256" / key[7:] / "rootfs").is_dir()


def test_rmi_waits_for_the_teardown_of_a_finished_run(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `run IMG; rmi IMG`: the run's VM is torn down after the command exited, its pod marked
    # stopping; rmi waits for that teardown to release the image, then removes it.
    pod = tmp_path / "root" / "p" / "0123456789abcdef"
    (pod / "shared" / "main" / "rootfs").mkdir(parents=True)
    (pod / "pod.json").write_text(json.dumps({"id": "r1", "status": "stopping"}))
    catalog, key, (base, bind) = _recorded_image(store, "done", f"{pod}/shared/main/rootfs")
    mountinfo = [base + bind]
    real = catalog_module._mounted_at
    monkeypatch.setattr(catalog_module, "_mounted_at", lambda entry: real(entry, mountinfo[0]))
    threading.Timer(0.5, lambda: mountinfo.__setitem__(0, base)).start()  # the teardown
    began = time.monotonic()
    catalog.remove("r/done:1", "r/done:1")
    assert 0.4 < time.monotonic() - began < 10
    assert not (store / "sha256" / key[7:]).exists()
    # A running pod's mount is refused at once.
    _image(store, key, [key])
    catalog.record("r/done:1", "r/done", key, key, "linux/amd64", [key], "")
    (pod / "pod.json").write_text(json.dumps({"id": "r1", "status": "running"}))
    mountinfo[0] = base + bind
    began = time.monotonic()
    with pytest.raises(StateError, match="is used by a running container"):
        catalog.remove("r/done:1", "r/done:1")
    assert time.monotonic() - began < 5


def test_an_id_of_several_tags_needs_force_and_repo_at_digest_names_the_pulled_tag(
    store: Path,
) -> None:
    """As podman and docker: ``rmi ID`` of an image with two tags is refused without -f
    (it removed both names silently); ``rmi REPO@DIGEST`` names the image pulled by a tag
    of REPO with that digest, as ``run`` finds it (it was "not in the store"; breaker5)."""
    key, digest = _digest("manifest"), _digest("index")
    _image(store, key, [key])
    catalog = Catalog()
    catalog.record("h/bb:1", "h/bb", digest, key, "linux/amd64", [key], "")
    catalog.record("h/team/bb:oci", "h/team/bb", digest, key, "linux/amd64", [key], "")
    with pytest.raises(ConfigError, match=r"has 2 names \(h/bb:1, h/team/bb:oci\).* -f"):
        catalog.remove(key[:13])
    assert sorted(row.name for row in catalog.rows()) == ["h/bb:1", "h/team/bb:oci"]
    assert catalog.remove(f"h/bb@{digest}", f"h/bb@{digest}") == ["untagged h/bb:1"]
    assert catalog.remove(key[:13], force=True) == ["untagged h/team/bb:oci", f"deleted {key}"]
