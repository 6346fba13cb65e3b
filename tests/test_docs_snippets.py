"""Every fenced ``python`` and ``bash`` block of README.md and docs/ runs here, so the docs say
what the code does.

The python blocks of one page share one namespace, in page order (a page reads like one
session). An HTML comment right above a fence (invisible on the rendered page) says how a block
runs:

- ``<!-- snippet: skip: REASON -->``: not run (a GPU, data that is not here, a run of minutes,
  a package that is not installed); the test is skipped with REASON, never silently.
- ``<!-- snippet: setup NAME -->``: run after the setup NAME of ``SETUPS`` (the objects the
  page assumes, e.g. a tiny ``deq`` and digits for a page that starts from "your model").
- ``<!-- snippet: tiny OLD => NEW; OLD => NEW -->``: run with these replacements (smaller
  data, fewer epochs or steps); each OLD must occur in the block, so a marker cannot go stale;
  ``\n`` in NEW starts a new line.

A marker may join ``setup`` and ``tiny`` with `` | ``.

A bash block runs (``bash -e`` in the repository root) only when marked
``<!-- snippet: run -->``; every other bash block must carry a skip with its reason (most
install packages or run for minutes), so that no command runs by accident.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deq_attacks.evaluation.attacks import scoped_attacks
from deq_attacks.gradients.sweep_family import scoped_registry
from deq_attacks.solvers import scoped_solvers

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- snippet: (?P<marker>.*?) -->\n)?^```(?P<lang>python|bash)\n(?P<body>.*?)^```",
    re.S | re.M,
)

#: Objects a page assumes without building them (tiny, on the embedded digits).
SETUPS = {
    "digits": """
import numpy as np
import torch
from deq_attacks import Broyden, DEQEstimator
from deq_attacks.data import load_digits
from deq_attacks.models import small_conv_deq

torch.manual_seed(0)
_data = load_digits()
deq = small_conv_deq(in_channels=1, num_classes=10, channels=4, image_size=8,
                     solver=Broyden(threshold=4))
estimator = DEQEstimator(deq, input_shape=(1, 8, 8), nb_classes=10,
                         optimizer=torch.optim.Adam(deq.parameters(), lr=3e-3))
estimator.fit(_data.x[:300], _data.y[:300], batch_size=50, nb_epochs=2)  # a trained model
x, y = _data.x[1500:1506], _data.y[1500:1506]
x_test, y_test = x, y
x_dev, y_dev = _data.x[1600:1606], _data.y[1600:1606]
""",
    "torchdeq_parts": """
from torch import nn
from own_deq_builder import CHANNELS, Layer

layer = Layer()                                  # the parts of a torchdeq model of your own
encoder = nn.Conv2d(1, CHANNELS, 3, padding=1)
head = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 64, 10))
""",
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    body: str
    marker: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def skipped(self) -> bool:
        return self.marker.startswith("skip")

    def directives(self) -> dict[str, str]:
        """kind -> argument of each directive of the marker (``skip`` alone)."""
        if self.skipped:
            return {"skip": self.marker.partition(":")[2].strip()}
        found = {}
        for part in filter(None, (p.strip() for p in self.marker.split(" | "))):
            kind, _, argument = part.partition(" ")
            found[kind] = argument.strip()
        return found

    def source(self) -> str:
        """The block as it runs: the setup first, the replacements applied."""
        body, directives = self.body, self.directives()
        for pair in filter(None, directives.get("tiny", "").split(";")):
            old, new = (part.strip().replace("\\n", "\n") for part in pair.split("=>"))
            assert old in body, f"{self.id}: tiny marker's {old!r} is not in the block"
            body = body.replace(old, new)
        if "setup" in directives:
            body = SETUPS[directives["setup"]] + body
        return body


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text[: m.start("lang")].count("\n") + 1
            found.append(Block(page, line, m["lang"], m["body"], (m["marker"] or "").strip()))
    return found


BLOCKS = blocks()
#: page -> (its namespace, the blocks already run in it)
_SESSIONS: dict[Path, tuple[dict[str, Any], set[int]]] = {}


def run_python(block: Block) -> None:
    """Run the page's python blocks up to ``block`` that have not run yet, in page order."""
    if block.page not in _SESSIONS:  # a real module: dataclasses look their module up
        module = types.ModuleType(f"docs_page_{len(_SESSIONS)}")
        sys.modules[module.__name__] = module
        _SESSIONS[block.page] = (module.__dict__, set())
    namespace, done = _SESSIONS[block.page]
    for earlier in (b for b in BLOCKS if b.page == block.page and b.lang == "python"):
        if earlier.line > block.line:
            break
        if earlier.line in done or earlier.skipped:
            continue
        done.add(earlier.line)
        # what a block registers (a solver, an attack, a sweep family) or sets up (logging)
        # stays in the block
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            with warnings.catch_warnings(), scoped_solvers(), scoped_attacks(), scoped_registry():
                warnings.simplefilter("ignore")
                exec(compile(earlier.source(), earlier.id, "exec"), namespace)
        finally:
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
                    handler.close()
            root.setLevel(level)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_docs_block_runs(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if block.skipped:
        pytest.skip(f"{block.id}: {block.directives()['skip']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if block.lang == "bash":
        assert "run" in block.directives(), f"{block.id}: mark a bash block run or skip"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(["bash", "-e", "-c", block.source()], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        return
    monkeypatch.chdir(tmp_path)  # files a block writes land here
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    run_python(block)


def test_every_marker_is_known_and_skips_give_a_reason() -> None:
    for block in BLOCKS:
        directives = block.directives()
        assert set(directives) <= {"skip", "setup", "tiny", "run"}, f"{block.id}: {block.marker!r}"
        if block.lang == "bash":
            assert {"skip", "run"} & set(directives), f"{block.id}: mark a bash block"
        if "skip" in directives:
            assert len(directives["skip"]) > 10, f"{block.id}: a skip needs its reason"
        if "setup" in directives:
            assert directives["setup"] in SETUPS, f"{block.id}: unknown setup"
        block.source()  # every tiny replacement still matches
    assert sum(b.lang == "python" for b in BLOCKS) > 20
    assert sys.version_info >= (3, 10)


def test_the_numbers_the_quickstart_states_are_what_its_block_computes() -> None:
    """docs/quickstart.md prints no accuracies (they depend on the CPU); the one count it
    states, 20 backward calls, is what the block's run makes."""
    block = next(b for b in BLOCKS if b.page.name == "quickstart.md" and "foolbox" in b.body)
    assert "`20`" in (ROOT / "docs" / "quickstart.md").read_text()
    run_python(block)
    assert _SESSIONS[block.page][0]["fmodel"].white_box.backward_calls == 20
