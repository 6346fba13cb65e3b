"""Every registry of the package is one ``deq_attacks.registry.Registry`` (timm style): each
registered name round-trips through its spec text (and, for a registered dataclass, through its
JSON spec), a wrong name's error lists every choice, a dash reads as an underscore, and
``scoped()`` undoes what was registered inside it."""

from __future__ import annotations

import dataclasses
import json

import pytest

import deq_attacks.evaluation.attacks  # noqa: F401 (registers the attacks)
import deq_attacks.gradients  # noqa: F401 (registers the estimates and sweep families)
import deq_attacks.models  # noqa: F401 (registers the models)
from deq_attacks import registry
from deq_attacks.evaluation.attacks import ATTACKS
from deq_attacks.evaluation.presets import PRESETS as EVALUATION_PRESETS
from deq_attacks.gradients.registry import ESTIMATES
from deq_attacks.gradients.sweep_family import FAMILIES
from deq_attacks.models.registry import MODELS
from deq_attacks.registry import Registry, format_spec, parse_spec, split_specs
from deq_attacks.solvers.registry import SOLVERS
from deq_attacks.training.presets import PRESETS as TRAINING_PRESETS

REGISTRIES = {
    "solvers": SOLVERS,
    "estimates": ESTIMATES,
    "sweep families": FAMILIES,
    "attacks": ATTACKS,
    "models": MODELS,
    "evaluation presets": EVALUATION_PRESETS,
    "training presets": TRAINING_PRESETS,
}
#: Spec texts with settings away from the defaults (and for entries with a required setting).
EXAMPLES = [
    "anderson:threshold=12,tol=1e-05,stop_mode=abs,memory=3",
    "broyden:return_best=false,alpha=0.5",
    "ensemble:of=(adjoint:beta=1.0,inverse=negative_identity)",
    "exact:backward_solver=(anderson:threshold=20,tol=1e-06)",
    "unrolled:n=1,k=5,lam=0.5",
    "autoattack:iterations=5,queries=50,target_classes=2",
    "transfer:surrogate=(package.module:attribute),iterations=7",
    "pgd:steps=20",
]


def cases() -> list[tuple[str, str]]:
    return [(kind, name) for kind, found in REGISTRIES.items() for name in found]


def test_these_are_all_the_registries_of_the_package() -> None:
    made = sorted(r.kind for r in registry._REGISTRIES)
    assert made == sorted(r.kind for r in REGISTRIES.values())


@pytest.mark.parametrize(("kind", "name"), cases())
def test_every_name_round_trips_through_its_spec_text(kind: str, name: str) -> None:
    found = REGISTRIES[kind]
    assert parse_spec(format_spec(name, {})) == (name, {})
    assert found[name.replace("_", "-")] is found[name] and name.replace("_", "-") in found
    if found.base is None:
        return
    fields = dataclasses.fields(found[name])  # type: ignore[arg-type]
    if any(f.default is f.default_factory is dataclasses.MISSING for f in fields):
        return  # a required setting: in EXAMPLES
    instance = found.make(name)
    assert found.text(instance) == name  # every setting at its default
    assert found.create(found.text(instance)) == instance
    assert found.from_json(json.loads(json.dumps(found.to_json(instance)))) == instance


@pytest.mark.parametrize("text", EXAMPLES)
def test_specs_with_settings_round_trip_as_text_and_json(text: str) -> None:
    found = next(r for r in REGISTRIES.values() if parse_spec(text)[0] in r and r.base)
    instance = found.create(text)
    assert found.text(instance) == text
    assert found.create(found.text(instance)) == instance
    assert found.from_json(json.loads(json.dumps(found.to_json(instance)))) == instance


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_a_wrong_name_lists_every_choice(kind: str) -> None:
    found = REGISTRIES[kind]
    with pytest.raises(ValueError, match=f"unknown {found.kind} 'no_such_thing'") as error:
        found["no_such_thing"]
    assert all(name in str(error.value) for name in found)
    assert "no_such_thing" not in found
    with pytest.raises(ValueError, match="did you mean 'no_such'"):
        found["No Such"]


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_scoped_undoes_what_was_registered_inside(kind: str) -> None:
    found = REGISTRIES[kind]
    before = found.names()
    first = found[before[0]]
    if found.base is not None:
        entry = dataclasses.dataclass(frozen=True)(type("Another", (first,), {}))
    else:
        entry = first
    with found.scoped():
        found.add("another_one", entry)
        assert found["another-one"] is entry and found.names() == [*before, "another_one"]
        with pytest.raises(ValueError, match="already registered"):
            found.add(before[0], object() if found.base is None else entry)
    assert found.names() == before and "another_one" not in found


def test_spec_text_is_split_and_checked_in_one_place() -> None:
    assert parse_spec(" anderson : threshold = 8 , stop-mode=abs ") == (
        "anderson", {"threshold": "8", "stop_mode": "abs"}
    )  # fmt: skip
    assert parse_spec("ensemble:of=(adjoint:beta=1.0,n=2)") == (
        "ensemble", {"of": "adjoint:beta=1.0,n=2"}
    )  # fmt: skip
    assert split_specs("pgd, autoattack:iterations=5,queries=50, square:queries=100") == [
        "pgd", "autoattack:iterations=5,queries=50", "square:queries=100"
    ]  # fmt: skip
    assert split_specs("pgd,transfer:surrogate=my.module:attr,iterations=3") == [
        "pgd", "transfer:surrogate=my.module:attr,iterations=3"
    ]  # fmt: skip
    for bad, message in [
        ("anderson:threshold", "expected NAME:KEY=VALUE"),
        ("anderson:threshold=1,threshold=2", "threshold is given twice"),
        ("ensemble:of=(adjoint", r"unbalanced '\('"),
        ("Anderson", "lower-case letters"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)


def test_a_registry_of_classes_takes_only_dataclass_subclasses_of_its_base() -> None:
    class Base:
        pass

    shapes: Registry[type[Base]] = Registry("shape", Base)
    with pytest.raises(TypeError, match="a shape is a Base subclass"):
        shapes.add("circle", int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a dataclass"):
        shapes.add("circle", type("Circle", (Base,), {}))
    registry._REGISTRIES.remove(shapes)
