"""Table mode: every column attacks every test sample (the paper's table: each cell's mean
accuracy and the per-sample worst case)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.attacks import Column
from deq_attacks.evaluation.cells import Cells
from deq_attacks.evaluation.context import RunContext


def table_cells(
    ctx: RunContext, columns: Sequence[Column], defenses: Mapping[str, Readout]
) -> Cells:
    """Each column on every sample (``RunContext.run_column``): a shared column once for every
    defense, the others once per defense."""
    everything = np.arange(len(ctx.x))
    cells = Cells(
        {d: {} for d in defenses}, order={d: [c.label for c in columns] for d in defenses}
    )
    for column in columns:
        how = "one run for" if column.shared else "against"
        ctx.say(f"test split: {column.label} ({how} {', '.join(defenses)})")
        scores = ctx.run_column(column, defenses, everything)
        for name in defenses:
            cells.survived[name][column.label] = scores.correct[name].astype(np.int8)
            cells.record(name, column.label, scores)
        if not column.shared:
            for run, extra in scores.extras.items():
                if extra:
                    cells.extras[run] = {k: v.tolist() for k, v in extra.items()}
        if column.shared and column.attack.name == "pgd" and column.estimate == ctx.ready:
            cells.ready_scores = scores
    return cells
