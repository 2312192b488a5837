"""The error of :mod:`ocispec`.

:class:`SpecError` is raised for an invalid config.json (or ``process`` / ``linux.resources``
object) before anything was changed anywhere. Its message is one lowercase line that names the
field and what is wrong with it (``process.user.uid: expected an integer, got "x"``), or repeats
runc's wording where runc has one (``unknown namespace type "bogus"``). The guest's runtime
reports it with exit code :attr:`SpecError.exit_code`; the host turns it into a
``ConfigError``.
"""

from __future__ import annotations


class SpecError(Exception):
    """The spec is invalid; ``message`` says where and why (one line)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))

    @property
    def message(self) -> str:
        return str(self.args[0])
