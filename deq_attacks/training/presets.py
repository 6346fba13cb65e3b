"""Named training presets: the paper's (Table 7 and 10) and small CPU ones.

Paper presets (GPU, CIFAR-10): ``deq_large_exact_8_7`` ... ``deq_xl_exact_50_50`` (exact
gradient, forward/backward Broyden thresholds 8/7, 18/20, 30/30, 50/50), ``deq_large_unrolling``
and ``deq_xl_unrolling`` (phantom gradient k=5, lambda=0.5, forward threshold 8), and the Table 4
baselines ``resnet18_pgd_at`` and ``wrn34_10_pgd_at`` (same optimiser, schedule, batch and
PGD-AT; no DEQ-only steps: no pretraining of an unrolled network, no Jacobian regulariser).

CPU presets (the embedded digits, 2 cores, at most 10 minutes each): ``cpu_exact`` (8/7),
``cpu_unrolling`` and ``cpu_clean`` (the same small DEQ without adversarial training), and
``demo``, the training of ``deq-attacks demo`` (about a minute on one thread).
"""

from __future__ import annotations

import dataclasses

from deq_attacks.model_spec import DEFAULT_SOLVER, ModelSpec
from deq_attacks.registry import Registry
from deq_attacks.training.config import Device, Gradient, TrainConfig, paper_model

#: 150 epochs (Table 7; the reference config says 220), 16,000 clean steps first, batch 96,
#: Adam 1e-3 with cosine decay, Jacobian regularisation 0.4 at frequency 0.02 until epoch 90,
#: PGD-10 at 8/255 with step 2/255 and a random start.
PAPER = TrainConfig()


def exact(model: ModelSpec, forward: int = 8, backward: int = 7) -> ModelSpec:
    """``model`` trained with the exact gradient: Broyden forward/backward thresholds."""
    return dataclasses.replace(
        model,
        training_gradient=Gradient.EXACT,
        forward_threshold=forward,
        backward_solver=model.backward_solver or DEFAULT_SOLVER,
        backward_threshold=backward,
    )


def phantom(model: ModelSpec, k: int = 5, lam: float = 0.5) -> ModelSpec:
    """``model`` trained with the phantom (unrolling) gradient, k steps of damping lambda."""
    return dataclasses.replace(
        model,
        training_gradient=Gradient.PHANTOM,
        phantom_k=k,
        phantom_lam=lam,
        backward_solver=None,
        backward_threshold=None,
    )


def _paper_presets() -> dict[str, TrainConfig]:
    presets: dict[str, TrainConfig] = {}
    for name in ("deq_large", "deq_xl"):
        model = dataclasses.replace(paper_model(), name=name)
        for forward, backward in ((8, 7), (18, 20), (30, 30), (50, 50)):
            presets[f"{name}_exact_{forward}_{backward}"] = PAPER.updated(
                model=exact(model, forward, backward)
            )
        presets[f"{name}_unrolling"] = PAPER.updated(model=phantom(model))
    for name in ("resnet18", "wrn34_10"):
        presets[f"{name}_pgd_at"] = PAPER.updated(
            model=ModelSpec(name, training_gradient=Gradient.AUTOGRAD),
            pretrain_steps=0,
            jac_weight=0.0,
        )
    return presets


#: The CPU recipe (tuned here on 2 cores; see docs/training.md): a 32-channel small conv DEQ on
#: the 8x8 digits, clean pretraining of the unrolled network first, then PGD-AT at eps 0.1.
CPU = PAPER.updated(
    model=dataclasses.replace(
        paper_model(), name="small_conv_deq", args={"channels": 32, "dropout": 0.0}
    ),
    source="digits",
    dev_size=200,
    crop_padding=1,
    flip=False,
    epochs=12,
    batch_size=50,
    lr=3e-3,
    lr_min=1e-5,
    pretrain_steps=5 * 20,
    pretrain_depth=8,
    jac_weight=0.4,
    jac_frequency=0.1,
    jac_stop_epoch=9,
    eps=0.1,
    step=0.025,
    steps=10,
    eval_batch_size=200,
    spectral_samples=32,
    device=Device.CPU,
    threads=1,
    num_workers=0,
)


#: The main job's training (``deq-attacks demo``): a 16-channel small conv DEQ on the digits
#: with the unrolling (phantom) gradient, clean pretraining of the unrolled network, then PGD-AT
#: at eps 0.1; the best epoch by dev PGD-10 accuracy. Tuned for about a minute on one thread.
DEMO = CPU.updated(
    model=dataclasses.replace(
        phantom(CPU.model), args={"channels": 16, "dropout": 0.0}, solver_tol=1e-4
    ),
    dev_size=100,
    crop_padding=0,
    epochs=8,
    batch_size=64,
    lr=3e-3,
    pretrain_steps=3 * 17,  # 3 epochs of 17 steps (1,100 images), then 5 of PGD-AT
    jac_weight=0.0,
    eval_batch_size=100,
    plots=True,
)


def _cpu_presets() -> dict[str, TrainConfig]:
    return {
        "cpu_exact": CPU.updated(model=exact(CPU.model, 8, 7)),
        "cpu_unrolling": CPU.updated(model=phantom(CPU.model)),
        "cpu_clean": CPU.updated(adversarial=False),
        "demo": DEMO,
    }


#: Every training preset, by name.
PRESETS: Registry[TrainConfig] = Registry("preset")
for _name, _config in {**_paper_presets(), **_cpu_presets()}.items():
    PRESETS.add(_name, _config)


def preset(name: str) -> TrainConfig:
    """The preset ``name``; an unknown name raises listing the presets."""
    return PRESETS[name]
