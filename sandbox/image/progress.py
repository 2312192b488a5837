"""What a pull shows on stderr while it runs.

- ``quiet``: nothing.
- stderr is a terminal: one line per layer, redrawn at most ten times a second, with the
  bytes received and the rate while a layer downloads::

      pysandbox:   layer 1/3 1eb815e6ea79  23.2 MB / 60.0 MB  12.1 MB/s
      pysandbox:   layer 2/3 926988e08e09  60.0 MB fetched
      pysandbox:   layer 3/3 9a7e0d3daaeb  already present

  Steps (resolved, unpacked, pulled) are lines of their own above the block.
- otherwise (a pipe, a log file): one line per finished step, nothing rewritten::

      pysandbox: layer 1/3 sha256:1eb815e6ea79… fetched (60.0 MB)

Byte counts come from skopeo's own per-blob counters (``skopeo.BarParser``); whether a
layer is complete comes from the blob store itself (its file appears only once skopeo has
verified it), so a skopeo that draws differently loses the counts, never the steps.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from sandbox.image.store import human_size

REDRAW_SECONDS = 0.1
RATE_WINDOW_SECONDS = 2.0


@dataclass
class _Layer:
    digest: str
    size: int
    state: str = "waiting"  # waiting, fetching, fetched, present
    received: int = 0
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    @property
    def hex12(self) -> str:
        return self.digest.partition(":")[2][:12]

    def rate(self) -> float | None:
        """Bytes per second over the last couple of seconds, once there are two samples."""
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None


class PullDisplay:
    """Progress of one pull (see the module docstring)."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet
        self.live = self.enabled and self.stream.isatty()
        self._layers: list[_Layer] = []
        self._exists: Callable[[str], bool] = lambda _digest: False
        self._drawn = 0
        self._last_draw = 0.0

    def step(self, text: str) -> None:
        """A finished step: one line (above the layer block on a terminal)."""
        if not self.enabled:
            return
        self._clear()
        self.stream.write(f"pysandbox: {text}\n")
        self._draw()

    def start_layers(
        self, layers: Sequence[tuple[str, int]], exists: Callable[[str], bool]
    ) -> None:
        """Begin showing ``layers`` (digest, size); ``exists(digest)`` says whether a blob
        is in the store already (those are shown as already present)."""
        self._exists = exists
        self._layers = [_Layer(digest, size) for digest, size in layers]
        for layer in self._layers:
            if exists(layer.digest):
                layer.state = "present"
                self._finished(layer)
        self._draw()

    def on_bytes(self, hex12: str, received: int) -> None:
        """skopeo reported ``received`` bytes of the blob whose digest starts with hex12."""
        now = time.monotonic()
        for layer in self._layers:
            if layer.hex12 == hex12 and layer.state in ("waiting", "fetching"):
                layer.state = "fetching"
                layer.received = min(received, layer.size)
                layer.samples.append((now, layer.received))
                while layer.samples and now - layer.samples[0][0] > RATE_WINDOW_SECONDS:
                    layer.samples.popleft()
                    if len(layer.samples) < 2:
                        break

    def tick(self) -> None:
        """Look for layers that have arrived; redraw (rate-limited)."""
        for layer in self._layers:
            if layer.state in ("waiting", "fetching") and self._exists(layer.digest):
                layer.state = "fetched"
                layer.received = layer.size
                self._finished(layer)
        if time.monotonic() - self._last_draw >= REDRAW_SECONDS:
            self._draw()

    def end_layers(self) -> None:
        """The copy is over: final state of every layer; the block stays on the screen."""
        self.tick()
        self._draw()
        self._drawn = 0
        self._layers = []

    def abandon(self) -> None:
        """The copy failed: remove the block (the error says what happened)."""
        self._clear()
        self._layers = []

    # --- drawing ---------------------------------------------------------------------------

    def _label(self, layer: _Layer) -> str:
        position = self._layers.index(layer) + 1
        return f"layer {position}/{len(self._layers)}"

    def _finished(self, layer: _Layer) -> None:
        if self.live or not self.enabled:
            return
        label = self._label(layer)
        what = "already present" if layer.state == "present" else "fetched"
        digest = f"{layer.digest[:19]}…"
        self.stream.write(f"pysandbox: {label} {digest} {what} ({human_size(layer.size)})\n")
        self.stream.flush()

    def _line(self, layer: _Layer) -> str:
        head = f"pysandbox:   {self._label(layer)} {layer.hex12}  "
        if layer.state == "present":
            return head + "already present"
        if layer.state == "fetched":
            return head + f"{human_size(layer.size)} fetched"
        if layer.state == "waiting":
            return head + f"{human_size(layer.size)} waiting"
        rate = layer.rate()
        speed = f"  {human_size(int(rate))}/s" if rate is not None else ""
        return head + f"{human_size(layer.received)} / {human_size(layer.size)}{speed}"

    def _clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if not self.live:
            return
        self._last_draw = time.monotonic()
        width = max(20, _columns(self.stream) - 1)
        text = "".join(f"{self._line(layer)[:width]}\x1b[K\n" for layer in self._layers)
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.stream.write(up + text)
        self.stream.flush()
        self._drawn = len(self._layers)


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return columns if columns > 0 else 100
