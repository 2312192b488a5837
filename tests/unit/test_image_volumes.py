"""An image config's Volumes (docker's VOLUME): read into absolute, normalised paths; a config
with too many or a malformed one refused in one line (sandbox.image.formats.parse_config)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.image.formats import MAX_VOLUMES, ImageError, parse_config

PLATFORM = ("linux", "amd64")


def config(volumes: Any) -> dict[str, Any]:
    return {"os": "linux", "architecture": "amd64", "config": {"Volumes": volumes}}


def test_volume_paths_are_absolute_normalised_and_sorted() -> None:
    parsed = parse_config(config({"/data/": {}, "var//lib/db": {}, "/data": {}}), PLATFORM)
    assert parsed.volumes == ("/data", "/var/lib/db")
    assert parse_config(config(None), PLATFORM).volumes == ()


@pytest.mark.parametrize(
    ("volumes", "says"),
    [
        (["/data"], "Volumes is not a JSON object"),
        ({f"/v{i}": {} for i in range(MAX_VOLUMES + 1)}, f"more than {MAX_VOLUMES}"),
    ],
)
def test_a_bad_volumes_entry_is_one_line(volumes: Any, says: str) -> None:
    with pytest.raises(ImageError, match=says):
        parse_config(config(volumes), PLATFORM)


def test_run_mounts_a_seeded_tmpfs_at_each_volume_no_option_takes() -> None:
    from pathlib import Path

    from sandbox.errors import RunError
    from sandbox.image.store import Image
    from sandbox.run.spec import _image_volumes

    image = Image("img", Path("/r"), volumes=("/data", "/var/lib/db"))
    taken = [{"destination": "/var/lib/db/", "type": "bind", "source": "/host"}]
    assert _image_volumes(image, taken) == [
        {"destination": "/data", "type": "tmpfs", "source": "tmpfs", "options": ["rw", "tmpcopyup"]}
    ]
    for bad in ("/", "/proc/sys"):
        with pytest.raises(RunError, match=f"its VOLUME {bad} cannot be mounted"):
            _image_volumes(Image("img", Path("/r"), volumes=(bad,)), [])
