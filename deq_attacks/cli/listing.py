"""``deq-attacks list [KIND]``: what the registries hold, one line each: the solvers
(``--model.forward_solver``), gradient estimates, attack columns (``--attacks``), sweep
families and their default grids (``--sweep``), models (``--model.name``) and presets
(``--preset`` of ``evaluate``, ``train`` and ``demo``). Without KIND, every list.

Solvers, estimates, attacks and models are read from the package's source
(``deq_attacks.cli.catalogue``) while their registries are not loaded, so these lists import
no torch; sweeps and presets are validated objects and import it.

    deq-attacks list solvers
    deq-attacks list presets
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence

from deq_attacks.cli.options import CommandError, fail, new_parser, parse

#: The longest description printed after a name.
WIDTH = 90


def _summary(obj: object) -> str:
    """The first paragraph of ``obj``'s docstring on one line, cut at ``WIDTH`` characters
    (``obj`` a string: that docstring)."""
    doc = obj if isinstance(obj, str) else inspect.getdoc(obj) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    if len(text) <= WIDTH:
        return text
    return text[: text.rfind(" ", 0, WIDTH - 3)] + " ..."


def _rows(rows: Iterator[tuple[str, str]]) -> list[str]:
    return [f"  {name:<26} {text}".rstrip() for name, text in rows]


#: kind -> the module whose import loads its registry
REGISTRIES = {
    "solvers": "deq_attacks.solvers.registry",
    "estimates": "deq_attacks.gradients.registry",
    "attacks": "deq_attacks.evaluation.attacks.base",
    "models": "deq_attacks.models.registry",
}


def _from_source(kind: str) -> list[str] | None:
    """The rows of ``kind`` from the package's source while its registry is not loaded."""
    if REGISTRIES[kind] in sys.modules:
        return None
    from deq_attacks.cli.catalogue import registered

    return _rows((name, _summary(doc)) for name, doc in registered(kind))


def solvers() -> list[str]:
    if (rows := _from_source("solvers")) is not None:
        return rows
    from deq_attacks.solvers import solver_class, solver_names

    return _rows((name, _summary(solver_class(name))) for name in solver_names())


def estimates() -> list[str]:
    if (rows := _from_source("estimates")) is not None:
        return rows
    from deq_attacks.gradients.registry import estimate_class, estimate_names

    return _rows((name, _summary(estimate_class(name))) for name in estimate_names())


def attacks() -> list[str]:
    """Each attack, its summary and its spec's settings with their defaults (``--attacks
    "name:setting=value"``)."""
    if REGISTRIES["attacks"] not in sys.modules:
        from deq_attacks.cli.catalogue import attack_settings, registered

        settings = attack_settings()
        docs = registered("attacks")
    else:
        from deq_attacks.cli.catalogue import settings_text
        from deq_attacks.evaluation.attacks import ATTACKS

        docs = [(name, inspect.getdoc(ATTACKS[name]) or "") for name in ATTACKS]
        settings = {
            name: settings_text(
                [(f.name, repr(f.default)) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                 if f.name in ATTACKS.settings_of(name)]
            )
            for name, cls in ATTACKS.items()
        }  # fmt: skip
    return _rows((name, f"{_summary(doc)} [{settings[name]}]") for name, doc in docs)


def sweeps() -> list[str]:
    from deq_attacks.gradients import sweep_families

    return _rows(
        (
            family.name,
            " ".join(f"{family.name}.{p}={v}" for p, v in family.defaults().items()),
        )
        for family in sweep_families()
    )


def models() -> list[str]:
    if (rows := _from_source("models")) is not None:
        return rows
    from deq_attacks.models.registry import list_models, resolve_builder

    return _rows((name, _summary(resolve_builder(name))) for name in list_models())


def presets() -> list[str]:
    from deq_attacks.evaluation.presets import PRESETS as EVALUATION
    from deq_attacks.training.presets import PRESETS as TRAINING

    lines = ["evaluation (deq-attacks evaluate --preset):"]
    lines += _rows((name, p.summary) for name, p in EVALUATION.items())
    lines += ["training (deq-attacks train --preset, deq-attacks demo --preset):"]
    lines += _rows(
        (name, f"{c.model.name}, {getattr(c.model.training_gradient, 'value', None)} gradient, "
               f"data {c.data.source}, {c.optimiser.epochs} epochs, {c.execution.device.value}")
        for name, c in TRAINING.items()
    )  # fmt: skip
    return lines


#: KIND -> the lines that list it.
KINDS: dict[str, Callable[[], list[str]]] = {
    "solvers": solvers,
    "estimates": estimates,
    "attacks": attacks,
    "sweeps": sweeps,
    "models": models,
    "presets": presets,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser("deq-attacks list", __doc__.splitlines()[0], __doc__)
    parser.add_argument("kind", nargs="?", choices=list(KINDS), help="what to list (all: none)")
    try:
        args = parse(parser, list(sys.argv[1:] if argv is None else argv))
    except CommandError as error:
        return fail("list", error)
    for kind in [args.kind] if args.kind else KINDS:
        print(f"{kind}:")
        print("\n".join(KINDS[kind]()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
