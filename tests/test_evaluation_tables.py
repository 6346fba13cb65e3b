"""Tables of one's own: ``markdown_rows`` (dict rows as a markdown table) and ``write_tables``
(``results.json`` as plain JSON + ``results.md``)."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import numpy as np

from deq_attacks.evaluation import markdown_rows, write_tables


class Kind(enum.Enum):
    EXACT = "exact"


def test_markdown_rows_takes_every_key_in_first_seen_order() -> None:
    rows = [{"model": "a", "clean": 81.0}, {"model": "b", "PGD": np.float64(47.125), "n": 3}]
    assert markdown_rows(rows) == "\n".join(
        [
            "| model | clean | PGD | n |",
            "| --- | --- | --- | --- |",
            "| a | 81.00 |  |  |",
            "| b |  | 47.12 | 3 |",
        ]
    )
    assert markdown_rows([]) == "(empty)"


def test_write_tables_writes_plain_json_and_the_markdown(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder"
    record = {
        "title": "T",
        "rows": [{"accuracy": np.float32(0.5), "states": np.array([1, 2])}],
        "settings": {"kind": Kind.EXACT, "root": Path("data"), "pair": (1, 2)},
    }
    text = write_tables(
        out, "T", {"measured: a": [{"x": 1.0}], "paper: a": []}, record,
        intro=["preset `tiny`"], notes=["one note"],
    )  # fmt: skip
    assert (out / "results.md").read_text() == text
    assert text == "\n".join(
        [
            "# T",
            "preset `tiny`",
            "",
            "## measured: a",
            "",
            "| x |",
            "| --- |",
            "| 1.00 |",
            "",
            "## paper: a",
            "",
            "(empty)",
            "",
            "- one note",
            "",
        ]
    )
    assert json.loads((out / "results.json").read_text()) == {
        "title": "T",
        "rows": [{"accuracy": 0.5, "states": [1, 2]}],
        "settings": {"kind": "exact", "root": "data", "pair": [1, 2]},
    }
