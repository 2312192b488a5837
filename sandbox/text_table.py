"""Aligned text tables for the listing verbs (``ps``, ``list``, ``images``).

Columns are as wide as their longest cell and separated by three spaces, as docker's and
runc's listings are (Go's ``text/tabwriter`` with padding 3); the last column is not padded,
so no line ends in blanks. A cell never runs into the next, whatever its length.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

PADDING = 3


def render(rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """One line per row (the header is a row like the others); the columns whose indexes are
    in ``right`` are right-aligned (sizes). Every row has the header's number of cells;
    ValueError otherwise."""
    if not rows:
        return []
    count = len(rows[0])
    if any(len(row) != count for row in rows):
        raise ValueError("every row of a table needs the same number of cells")
    widths = [max(len(row[i]) for row in rows) for i in range(count)]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        if count - 1 not in right:
            cells[-1] = row[-1]
        lines.append((" " * PADDING).join(cells).rstrip())
    return lines
