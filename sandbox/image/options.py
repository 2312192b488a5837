"""Command-line options of ``pull``, ``images``, ``rmi`` and the pull flags of ``run``
(argparse only: the CLI parser loads this for every verb)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")


def add_pull_flags(parser: argparse.ArgumentParser, *, for_run: bool = False) -> None:
    """The registry flags shared by ``pull`` and ``run`` (podman's names)."""
    if for_run:
        parser.add_argument(
            "--pull",
            choices=["missing", "always", "never"],
            default="missing",
            help="pull IMAGE from its registry: when not stored (missing, default), "
            "always (fetch what changed), never",
        )
    parser.add_argument(
        "--platform",
        default=None,
        metavar="OS/ARCH",
        help="image platform to pick from a multi-arch image (default: this host's)",
    )
    parser.add_argument(
        "--authfile",
        type=Path,
        default=None,
        help="registry credentials file (default: skopeo's: "
        "$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json)",
    )
    parser.add_argument(
        "--tls-verify",
        type=_boolean,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="require HTTPS with a verified certificate (false: for a local registry)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no pull progress on stderr")


def add_image_verbs(verbs: Any) -> None:
    """``pull``, ``images`` and ``rmi``."""
    pull = verbs.add_parser("pull", help="pull an image from a registry into the image store")
    pull.add_argument("reference", metavar="REF", help="e.g. alpine, localhost:5000/x:1")
    add_pull_flags(pull)
    listing = verbs.add_parser("images", help="list the images pulled from registries")
    listing.add_argument("--format", "-f", choices=["table", "json"], default="table")
    listing.add_argument("--quiet", "-q", action="store_true", help="names only")
    rmi = verbs.add_parser("rmi", help="remove pulled images (by name, digest or id)")
    rmi.add_argument("targets", nargs="+", metavar="REF|DIGEST")
    rmi.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="by id or digest: remove the image with all its names (as podman rmi -f)",
    )
