"""The host validator: every invalid config.json is refused with its field's name, before a VM.

A table of hand-picked faults (:mod:`tests.unit.ocispec.variants`) goes through what ``create``
runs before it boots or joins anything (``sandbox.runtime.bundle``); generated configs
(hypothesis; ``PYSANDBOX_HYPOTHESIS=large`` for a long run) check that whatever the JSON, the
parsers refuse with one line that starts with a field path, and never fail any other way.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocispec.document import decode
from ocispec.errors import SpecError
from ocispec.spec import parse_process, parse_resources, parse_spec
from sandbox.errors import ConfigError
from sandbox.runtime import bundle as bundles
from tests.unit.ocispec.variants import INVALID, Variant, base_config


def _bundle(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_bytes(data)
    return tmp_path


def _judge(path: Path) -> None:
    """What ``create`` does to a bundle before it boots or joins a pod."""
    loaded = bundles.load(path)
    bundles.check_on_host(loaded, owns_pod=True)


def test_the_base_config_passes(tmp_path: Path) -> None:
    _judge(_bundle(tmp_path, json.dumps(base_config()).encode()))


@pytest.mark.parametrize("variant", INVALID, ids=[v.name for v in INVALID])
def test_each_invalid_config_is_refused_naming_its_field(tmp_path: Path, variant: Variant) -> None:
    path = _bundle(tmp_path, variant.render(base_config()))
    with pytest.raises(ConfigError) as info:
        _judge(path)
    message = str(info.value)
    assert "\n" not in message
    config = path / "config.json"
    if variant.field == "config.json":
        assert message.startswith(str(config)), message
    else:
        assert message.startswith(f"{config}: {variant.field}:"), message
    assert variant.says in message, message


def test_the_table_covers_every_section_of_the_spec() -> None:
    roots = {
        v.field if v.field == "config.json" else re.split(r"[.\[]", v.field)[0] for v in INVALID
    }
    assert roots >= {"config.json", "process", "root", "mounts", "linux", "hooks", "annotations"}
    assert len(INVALID) >= 60


def test_relative_root_and_bind_sources_are_the_bundles(tmp_path: Path) -> None:
    config = base_config()
    (tmp_path / "data").mkdir()
    config["mounts"].append(
        {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind"]}
    )
    loaded = bundles.load(_bundle(tmp_path, json.dumps(config).encode()))
    bundles.check_on_host(loaded, owns_pod=True)
    assert loaded.rootfs == tmp_path / "rootfs"
    assert loaded.spec.mounts[-1].source == "data"


def test_a_joining_container_may_name_a_pod_mates_namespace(tmp_path: Path) -> None:
    config = base_config()
    config["linux"]["namespaces"].append({"type": "user", "path": "/proc/42/ns/user"})
    config["linux"]["namespaces"] = [
        ns for ns in config["linux"]["namespaces"] if ns["type"] != "ipc"
    ] + [{"type": "ipc", "path": "/proc/42/ns/ipc"}]
    loaded = bundles.load(_bundle(tmp_path, json.dumps(config).encode()))
    bundles.check_on_host(loaded, owns_pod=False)  # the pod decides, after it is loaded
    with pytest.raises(ConfigError, match=r"linux\.namespaces\[\d\]\.path: /proc/42/ns/"):
        bundles.check_on_host(loaded, owns_pod=True)


def test_memory_limit_edges(tmp_path: Path) -> None:
    def resources(limit: int) -> Any:
        return parse_resources({"memory": {"limit": limit}}, "r")

    assert resources(6 << 20).files == [("memory.max", str(6 << 20))]
    assert resources(-1).files == [("memory.max", "max")]
    assert resources(0).files == []  # runc: 0 leaves it unset
    with pytest.raises(SpecError, match=r"^r\.memory\.limit: 6291455 is below the minimum"):
        resources((6 << 20) - 1)


def test_a_config_over_the_guest_limit_is_refused_on_the_host(tmp_path: Path) -> None:
    config = base_config()
    config["annotations"] = {"big": "x" * (1 << 20)}
    # The size read is capped one byte over the limit: the message does not claim a size.
    with pytest.raises(ConfigError, match=r"config\.json is larger than the limit of 1048576 "):
        bundles.load(_bundle(tmp_path, json.dumps(config).encode()))


# -- generated input ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

#: Fields the parser reads, as paths into the base config (numbers index lists).
FIELDS = (
    ("process",),
    ("process", "args"),
    ("process", "args", 0),
    ("process", "env"),
    ("process", "cwd"),
    ("process", "user"),
    ("process", "user", "uid"),
    ("process", "user", "additionalGids"),
    ("process", "user", "umask"),
    ("process", "capabilities"),
    ("process", "capabilities", "bounding"),
    ("process", "rlimits"),
    ("process", "rlimits", 0),
    ("process", "rlimits", 0, "soft"),
    ("process", "oomScoreAdj"),
    ("process", "terminal"),
    ("root",),
    ("root", "path"),
    ("root", "readonly"),
    ("hostname",),
    ("mounts",),
    ("mounts", 0),
    ("mounts", 1, "options"),
    ("mounts", 1, "destination"),
    ("linux",),
    ("linux", "namespaces"),
    ("linux", "namespaces", 0),
    ("linux", "namespaces", 0, "path"),
    ("linux", "uidMappings"),
    ("linux", "devices"),
    ("linux", "sysctl"),
    ("linux", "maskedPaths"),
    ("linux", "rootfsPropagation"),
    ("linux", "resources"),
    ("linux", "resources", "memory"),
    ("linux", "resources", "cpu"),
    ("linux", "resources", "pids"),
    ("linux", "resources", "unified"),
    ("linux", "seccomp"),
    ("linux", "seccomp", "syscalls"),
    ("linux", "seccomp", "syscalls", 0, "args"),
    ("hooks",),
    ("annotations",),
)

#: Where every message must start: a field of config.json (or the document itself).
FIELD_PATH = re.compile(
    r"^(config|process|root|hostname|domainname|mounts|linux|hooks|annotations)[.\[:]"
)


def _put(config: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    """Set ``path`` in ``config``, unless an earlier change replaced a parent on the way."""
    target: Any = config
    for key in path[:-1]:
        if isinstance(target, dict) and isinstance(key, str):
            target = target.setdefault(key, {})
        elif isinstance(target, list) and isinstance(key, int) and key < len(target):
            target = target[key]
        else:
            return
    last = path[-1]
    in_dict = isinstance(target, dict) and isinstance(last, str)
    in_list = isinstance(target, list) and isinstance(last, int) and last < len(target)
    if in_dict or in_list:
        target[last] = value


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), JSON), min_size=1, max_size=3))
def test_generated_faults_are_refused_with_a_field_path(
    changes: list[tuple[tuple[str | int, ...], object]],
) -> None:
    config = base_config()
    config["linux"]["seccomp"]["syscalls"][0]["args"] = []
    for path, value in changes:
        _put(config, path, copy.deepcopy(value))
    try:
        parse_spec(config)
    except SpecError as exc:
        assert "\n" not in exc.message
        assert FIELD_PATH.match(exc.message), exc.message


@given(JSON)
def test_any_json_document_is_refused_cleanly(value: object) -> None:
    raw = json.dumps(value).encode()
    for parse in (
        parse_spec,
        lambda document: parse_process(document, "process"),
        lambda document: parse_resources(document, "resources"),
    ):
        try:
            parse(decode(raw))
        except SpecError as exc:  # anything else fails the test
            assert "\n" not in exc.message


@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_decode_or_are_refused_in_one_line(raw: bytes) -> None:
    try:
        decode(raw)
    except SpecError as exc:
        assert exc.message.startswith("config.json") and "\n" not in exc.message
