"""The spec's JSON documents as bytes: config.json, ``exec``'s process, ``update``'s resources.

Both sides bound and decode them the same way, so the host never accepts a document the guest
would refuse for its size or its syntax.
"""

from __future__ import annotations

import json

from ocispec.errors import SpecError

#: Largest document accepted, in bytes: the host refuses a bigger config.json, the guest a
#: bigger spec in CreateContainer.
MAX_DOCUMENT_BYTES = 1024 * 1024


def decode(raw: bytes, what: str = "config.json") -> dict[str, object]:
    """The JSON object in ``raw``; SpecError naming ``what`` when it is not one.

    Over :data:`MAX_DOCUMENT_BYTES`, malformed JSON, nesting too deep for the parser, invalid
    UTF-8, integers too long to convert and any value other than an object are refused.
    """
    if len(raw) > MAX_DOCUMENT_BYTES:
        # (Readers stop at one byte over the limit: the size read is not the document's.)
        raise SpecError(
            f"{what} is larger than the limit of {MAX_DOCUMENT_BYTES} bytes (1 MiB); "
            "keep it smaller (large data belongs in files, not the spec)"
        )
    try:
        value = json.loads(raw)
    except RecursionError:
        raise SpecError(f"{what} is not valid JSON: nested too deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise SpecError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        kinds = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
        raise SpecError(f"{what}: expected a JSON object, got {kinds.get(type(value), 'a number')}")
    return value
