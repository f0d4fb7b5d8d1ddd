"""The table every shared test runs over: each callback of the package, how to build it and what it promises.

``CALLBACKS`` maps a case name to a :class:`Case`: a factory ``(encoders) -> list of callbacks`` (``encoders`` is the
dotted-path mapping of a module whose encoders are not in ``self.encoders``, or None) and the invariants the case
is tested for. ``PAIRS`` are the meaningful two-callback combinations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_mmbalance import ARL, OGMGE, DiagnosingRelearning, GradientBlending, MMPareto, ModalityMonitor
from lightning_mmbalance.callbacks import UnimodalLosses

Encoders = Mapping[str, str] | None
Factory = Callable[[Encoders], list[Callback]]


@dataclass(frozen=True)
class Case:
    """One callback configuration and what it promises.

    Attributes:
        factory: builds the callbacks, given the dotted encoder paths of the module (or None).
        tags: log-tag prefixes the case must produce.
        changes_gradients: which gradients the callback may change in ``on_before_optimizer_step``:
            ``"none"``, ``"encoders"`` (only encoder tensors) or ``"selected"`` (OGM-GE's filtered tensors).
        per_step: 2 ranks x batch B equal 1 process x batch 2B, and accumulation of k x B equals batch k*B.
        deterministic_ddp: the per-step equality holds (OGM-GE's noise is identical on the ranks, but a DDP run
            and a single process draw it for different gradients, so only rank identity is checked there).
        needs_val: needs a validation loader.
        scales: the gradient-mode scaling that Adam-type optimizers undo (the adaptive-optimizer warning).
        epochs: training epochs for the shared tests (epoch-level methods need a few to act).
        errors: constructor arguments that must fail, with the error class and message pattern.
    """

    factory: Factory
    tags: tuple[str, ...]
    changes_gradients: str = "none"
    per_step: bool = True
    deterministic_ddp: bool = True
    needs_val: bool = False
    scales: bool = False
    epochs: int = 2
    errors: tuple[tuple[dict[str, Any], type[Exception], str], ...] = field(default=())


CALLBACKS: dict[str, Case] = {
    "ogm_ge": Case(
        lambda enc: [OGMGE(alpha=0.5, encoders=enc)],
        ("mmbalance/ogm_ge/coefficient/", "mmbalance/ogm_ge/step_ratio/"),
        changes_gradients="selected",
        deterministic_ddp=False,
        scales=True,
        errors=(
            ({"alpha": -1}, ValueError, "`alpha` must be a finite float >= 0, got -1"),
            ({"alpha": "x"}, TypeError, "`alpha` must be a finite float >= 0, got 'x'"),
            ({"modulation_starts": -2}, ValueError, "`modulation_starts` must be an int >= 0, got -2"),
            (
                {"modulation_starts": 3, "modulation_ends": 2},
                ValueError,
                "`modulation_ends` must be an int >= 3, got 2",
            ),
            ({"noise": "yes"}, TypeError, "`noise` must be a bool, got 'yes'"),
            ({"param_filter": "linear"}, ValueError, r"`param_filter` must be one of \('conv', 'weights', 'all'\)"),
            ({"seed": 2**31}, ValueError, r"`seed` must be an int in \[0, 2147483648\), got 2147483648"),
            ({"modulate": "both"}, ValueError, r"`modulate` must be one of \('gradient', 'update'\), got 'both'"),
            ({"encoders": {"a": 1, "b": 2}}, TypeError, "mapping of modality name to dotted attribute path"),
            ({"encoders": {"a": "x"}}, ValueError, "`encoders` must name at least 2 modalities"),
        ),
    ),
    "ogm_ge_update": Case(
        lambda enc: [OGMGE(alpha=0.5, noise=False, modulate="update", encoders=enc)],
        ("mmbalance/ogm_ge/coefficient/",),
    ),
    "mmpareto": Case(
        lambda enc: [MMPareto(encoders=enc)],
        ("mmbalance/mmpareto/cos/", "mmbalance/mmpareto/grad_norm_ratio/", "mmbalance/mmpareto/step_ratio/"),
        changes_gradients="encoders",
        scales=True,
        errors=(
            ({"gamma": 0}, ValueError, "`gamma` must be a finite float > 0, got 0"),
            ({"gamma": -1.5}, ValueError, "`gamma` must be a finite float > 0, got -1.5"),
            ({"gamma": float("inf")}, ValueError, "`gamma` must be a finite float > 0, got inf"),
            ({"gamma": "1.5"}, TypeError, "`gamma` must be a finite float > 0, got '1.5'"),
            ({"modulate": "x"}, ValueError, "`modulate` must be one of"),
        ),
    ),
    "arl": Case(
        lambda enc: [ARL(warmup_epochs=1, temperature=8.0, lagged=True, encoders=enc)],
        ("mmbalance/arl/coefficient/", "mmbalance/arl/entropy/", "mmbalance/arl/step_ratio/"),
        changes_gradients="encoders",
        scales=True,
        epochs=3,
        errors=(
            ({"gamma": -1}, ValueError, "`gamma` must be a finite float >= 0, got -1"),
            ({"temperature": float("nan")}, ValueError, "`temperature` must be a finite float >= 0, got nan"),
            ({"warmup_epochs": -1}, ValueError, "`warmup_epochs` must be an int >= 0, got -1"),
            ({"warmup_epochs": 1.0}, TypeError, "`warmup_epochs` must be an int >= 0, got 1.0"),
            ({"entropy_floor": 1.5}, ValueError, r"`entropy_floor` must be a finite float in \[0, 1\), got 1.5"),
            ({"entropy_floor": 1.0}, ValueError, r"`entropy_floor` must be a finite float in \[0, 1\), got 1.0"),
            ({"lagged": "yes"}, TypeError, "`lagged` must be a bool, got 'yes'"),
            ({"modulate": "x"}, ValueError, "`modulate` must be one of"),
        ),
    ),
    "gradient_blending": Case(
        lambda enc: [GradientBlending(super_epoch=1, estimation_epochs=1, max_batches=2, encoders=enc)],
        ("mmbalance/gradient_blending/weight/",),
        per_step=False,
        needs_val=True,
        epochs=2,
        errors=(
            ({"mode": "batch"}, ValueError, r"`mode` must be one of \('online', 'offline'\), got 'batch'"),
            ({"super_epoch": 0}, ValueError, "`super_epoch` must be an int >= 1, got 0"),
            ({"estimation_epochs": 0}, ValueError, "`estimation_epochs` must be an int >= 1, got 0"),
            ({"estimator": "exact"}, ValueError, r"`estimator` must be one of \('copies', 'joint'\)"),
            ({"estimator": "joint", "mode": "offline"}, ValueError, "`estimator='joint'` needs `mode='online'`"),
            ({"policy": "x"}, ValueError, r"`policy` must be one of \('clip', 'abs'\), got 'x'"),
            ({"max_batches": 0}, ValueError, "`max_batches` must be an int >= 1, got 0"),
            ({"forward_fn": 3}, TypeError, r"`forward_fn` must be callable \(module, batch\) -> MultimodalOutput"),
        ),
    ),
    "gradient_blending_joint": Case(
        lambda enc: [GradientBlending(super_epoch=1, estimator="joint", encoders=enc)],
        ("mmbalance/gradient_blending/weight/",),
        needs_val=True,
        epochs=3,
    ),
    "relearning": Case(
        lambda enc: [DiagnosingRelearning(every_n_epochs=1, max_reinits=2, strength=10.0, encoders=enc)],
        ("mmbalance/relearning/alpha/",),
        needs_val=True,
        epochs=3,
        errors=(
            ({"strength": -1}, ValueError, "`strength` must be a finite float >= 0, got -1"),
            ({"every_n_epochs": 0}, ValueError, "`every_n_epochs` must be an int >= 1, got 0"),
            ({"max_reinits": 0}, ValueError, "`max_reinits` must be an int >= 1, got 0"),
            ({"n_clusters": 1}, ValueError, "`n_clusters` must be an int >= 2, got 1"),
            ({"max_samples": 0}, ValueError, "`max_samples` must be an int >= 1, got 0"),
            ({"reset_optimizer_state": 1}, TypeError, "`reset_optimizer_state` must be a bool, got 1"),
            ({"seed": -1}, ValueError, "`seed` must be an int >= 0, got -1"),
            ({"forward_fn": "f"}, TypeError, "`forward_fn` must be callable"),
        ),
    ),
    "monitor": Case(
        lambda enc: [ModalityMonitor(conflict_every_n_steps=2, linear_probe=True, encoders=enc)],
        (
            "mmbalance/monitor/acc/",
            "mmbalance/monitor/cos/",
            "mmbalance/monitor/grad_norm/",
            "mmbalance/monitor/masked_acc/",
        ),
        needs_val=True,
        errors=(
            ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be an int >= 1, got 0"),
            ({"conflict_every_n_steps": 0}, ValueError, "`conflict_every_n_steps` must be an int >= 1, got 0"),
            ({"masked_eval": "no"}, TypeError, "`masked_eval` must be a bool, got 'no'"),
            ({"linear_probe": "yes"}, TypeError, "`linear_probe` must be a bool"),
            (
                {"forward_fn": 1},
                TypeError,
                r"`forward_fn` must be callable \(module, batch\) -> MultimodalOutput, got 1",
            ),
        ),
    ),
    "uniform": Case(lambda enc: [UnimodalLosses(encoders=enc)], ()),
}
"""Every callback of the package, in the configurations the shared tests run."""

PAIRS: dict[str, Case] = {
    "ogm_ge+arl": Case(
        lambda enc: [OGMGE(alpha=0.5, encoders=enc), ARL(warmup_epochs=0, encoders=enc)],
        ("mmbalance/ogm_ge/coefficient/", "mmbalance/arl/coefficient/"),
        changes_gradients="encoders",
    ),
    "ogm_ge+gradient_blending": Case(
        lambda enc: [OGMGE(alpha=0.5, encoders=enc), GradientBlending(super_epoch=1, estimator="joint", encoders=enc)],
        ("mmbalance/ogm_ge/coefficient/", "mmbalance/gradient_blending/weight/"),
        changes_gradients="selected",
        needs_val=True,
        epochs=3,
    ),
    "relearning+mmpareto": Case(
        lambda enc: [DiagnosingRelearning(every_n_epochs=1, strength=10.0, encoders=enc), MMPareto(encoders=enc)],
        ("mmbalance/relearning/alpha/", "mmbalance/mmpareto/cos/"),
        changes_gradients="encoders",
        needs_val=True,
        epochs=3,
    ),
    "relearning+gradient_blending": Case(
        lambda enc: [
            GradientBlending(super_epoch=1, estimator="joint", encoders=enc),
            DiagnosingRelearning(every_n_epochs=1, strength=10.0, encoders=enc),
        ],
        ("mmbalance/relearning/alpha/", "mmbalance/gradient_blending/weight/"),
        needs_val=True,
        epochs=3,
    ),
    "monitor+arl": Case(
        lambda enc: [ModalityMonitor(encoders=enc), ARL(warmup_epochs=0, encoders=enc)],
        ("mmbalance/monitor/grad_norm/", "mmbalance/arl/coefficient/"),
        changes_gradients="encoders",
        needs_val=True,
    ),
}
"""Meaningful combinations (see the README's composition table)."""


class Logged(Callback):
    """Every key the callbacks logged during the fit."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.keys |= set(trainer.callback_metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.keys |= set(trainer.callback_metrics)

    def on_validation_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.keys |= set(trainer.callback_metrics)


class GradSpy(Callback):
    """Every parameter's gradient in ``on_before_optimizer_step`` (place one before and one after a callback)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


class EpochStartSpy(Callback):
    """Records the parameters and buffers at ``on_train_epoch_start`` (before or after another callback's)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def logged_prefixes_present(keys: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """The prefixes of ``prefixes`` that no logged key starts with."""
    return [p for p in prefixes if not any(k.startswith(p) for k in keys)]
