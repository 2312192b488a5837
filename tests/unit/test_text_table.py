"""The listing verbs' tables: columns never run together, as docker's and runc's."""

from __future__ import annotations

import pytest

from sandbox import text_table


def test_columns_are_as_wide_as_their_longest_cell_and_three_spaces_apart() -> None:
    image = "localhost:5000/a-rather-long/repository-name:with-a-tag"
    rows = [["NAME", "IMAGE", "COMMAND"], ["web", image, "sleep 1"], ["x", "default", "sh"]]
    assert text_table.render(rows) == [
        f"NAME   {'IMAGE':<{len(image)}}   COMMAND",
        f"web    {image}   sleep 1",
        f"x      {'default':<{len(image)}}   sh",
    ]


def test_right_aligned_sizes_and_no_trailing_blanks() -> None:
    rows = [["NAME", "SIZE"], ["a", "4.2 MB"], ["bb", "12 B"]]
    assert text_table.render(rows, right={1}) == ["NAME     SIZE", "a      4.2 MB", "bb       12 B"]
    assert text_table.render([["A", "B"], ["x", ""]]) == ["A   B", "x"]
    assert text_table.render([]) == []


def test_rows_of_another_width_are_refused() -> None:
    with pytest.raises(ValueError, match="same number of cells"):
        text_table.render([["A", "B"], ["only one"]])
