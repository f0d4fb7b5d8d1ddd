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

from lightning_mmbalance import (
    AGM,
    ARL,
    OGMGE,
    OPM,
    DiagnosingRelearning,
    GradientBlending,
    InfoReg,
    MMPareto,
    ModalityMonitor,
)
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
            ``"none"``, ``"encoders"`` (only encoder tensors), ``"selected"`` (OGM-GE's filtered tensors) or ``"all"``
            (AGM: the fusion head's too).
        per_step: 2 ranks x batch B equal 1 process x batch 2B, and accumulation of k x B equals batch k*B.
        accumulates: with ``per_step``, whether accumulation of k x B equals batch k*B (OPM decides and draws per
            micro-batch, like the official code per batch, so it does not; its own tests check it against a loop).
        deterministic_ddp: the per-step equality holds (OGM-GE's noise is identical on the ranks, but a DDP run
            and a single process draw it for different gradients, so only rank identity is checked there).
        needs_val: needs a validation loader.
        scales: the gradient-mode scaling that Adam-type optimizers undo (the adaptive-optimizer warning).
        epochs: training epochs for the shared tests (epoch-level methods need a few to act).
        divergence: when a run whose encoder weights turn non-finite is reported: ``"step"`` (a DivergenceError at
            the first step whose forward sees them, from the per-step statistics or gradients the callback reads),
            ``"epoch"`` (a DivergenceError at the end of that epoch: the callback reads nothing per step) or
            ``"warning"`` (one DivergenceWarning at that step; training goes on).
        errors: constructor arguments that must fail, with the error class and message pattern.
    """

    factory: Factory
    tags: tuple[str, ...]
    changes_gradients: str = "none"
    per_step: bool = True
    accumulates: bool = True
    deterministic_ddp: bool = True
    needs_val: bool = False
    scales: bool = False
    epochs: int = 2
    divergence: str = "step"
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
        divergence="epoch",
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
        divergence="epoch",
    ),
    "relearning": Case(
        lambda enc: [DiagnosingRelearning(every_n_epochs=1, max_reinits=2, strength=10.0, encoders=enc)],
        ("mmbalance/relearning/alpha/",),
        needs_val=True,
        epochs=3,
        divergence="epoch",
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
        divergence="warning",
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
    "opm": Case(
        lambda enc: [OPM(modulation_starts=1, encoders=enc)],
        ("mmbalance/opm/drop_probability/", "mmbalance/opm/dropped/", "mmbalance/opm/feature_scale"),
        accumulates=False,
        errors=(
            ({"q_base": 1.5}, ValueError, r"`q_base` must be a finite float in \[0, 1\], got 1.5"),
            ({"lam": -0.5}, ValueError, "`lam` must be a finite float >= 0, got -0.5"),
            ({"p_exe": "0.7"}, TypeError, r"`p_exe` must be a finite float in \[0, 1\], got '0.7'"),
            ({"modulation_starts": -1}, ValueError, "`modulation_starts` must be an int >= 0, got -1"),
            (
                {"modulation_starts": 6, "modulation_ends": 5},
                ValueError,
                "`modulation_ends` must be an int >= 6, got 5",
            ),
            ({"lagged": 1}, TypeError, "`lagged` must be a bool, got 1"),
            ({"feature_dims": [512, 512]}, TypeError, "`feature_dims` must be a mapping of modality to an int >= 1"),
            ({"feature_dims": {"a": 0, "b": 4}}, ValueError, r"`feature_dims\['a'\]` must be an int >= 1, got 0"),
            ({"seed": -1}, ValueError, r"`seed` must be an int in \[0, 2147483648\), got -1"),
            ({"forward_fn": 2}, TypeError, r"`forward_fn` must be callable \(module, batch\) -> MultimodalOutput"),
        ),
    ),
    "opm_lagged": Case(
        lambda enc: [OPM(modulation_starts=0, lagged=True, q_base=0.8, encoders=enc)],
        ("mmbalance/opm/drop_probability/", "mmbalance/opm/executed"),
        accumulates=False,
    ),
    "inforeg": Case(
        lambda enc: [InfoReg(window_size=1, encoders=enc)],
        (
            "mmbalance/inforeg/coefficient/",
            "mmbalance/inforeg/growth/",
            "mmbalance/inforeg/trace/",
            "mmbalance/inforeg/window/",
        ),
        changes_gradients="encoders",
        errors=(
            ({"scale": -0.5}, ValueError, "`scale` must be a finite float >= 0, got -0.5"),
            ({"scale": (0.95, -1)}, ValueError, r"`scale\[1\]` must be a finite float >= 0, got -1"),
            ({"scale": ()}, ValueError, "`scale` must hold at least one value, got an empty sequence"),
            ({"scale": {"a": "x"}}, TypeError, r"`scale\['a'\]` must be a finite float >= 0, got 'x'"),
            ({"scale": {1: 0.5}}, TypeError, "`scale` keys must be modality names"),
            ({"sensitivity": -1}, ValueError, "`sensitivity` must be a finite float >= 0, got -1"),
            ({"threshold": 1.0}, ValueError, "`threshold` must be a finite float < 1, got 1.0"),
            ({"window_size": 0}, ValueError, "`window_size` must be an int >= 1, got 0"),
            ({"pad_history": 1}, TypeError, "`pad_history` must be a bool, got 1"),
            ({"window_trace": 0}, TypeError, "`window_trace` must be 'first', 'own' or a modality name, got 0"),
            ({"score_reduction": "max"}, ValueError, r"`score_reduction` must be one of \('sum', 'mean'\)"),
            ({"trace_filter": "conv"}, ValueError, r"`trace_filter` must be one of \('weights', 'all'\)"),
            ({"trace_reduction": "mean"}, ValueError, r"`trace_reduction` must be one of \('layer_mean', 'sum'\)"),
            ({"trace_includes_regulation": "y"}, TypeError, "`trace_includes_regulation` must be a bool, got 'y'"),
            ({"unimodal_loss_weight": -1.0}, ValueError, "`unimodal_loss_weight` must be a finite float >= 0"),
            ({"modulate": "x"}, ValueError, "`modulate` must be one of"),
        ),
    ),
    "inforeg_paper": Case(  # the paper's formulas, the fused loss only, the pull applied to the update
        lambda enc: [
            InfoReg(
                scale=1.0,
                sensitivity=0.9,
                window_trace="own",
                score_reduction="mean",
                trace_reduction="sum",
                trace_includes_regulation=False,
                unimodal_loss_weight=0.0,
                modulate="update",
                encoders=enc,
            )
        ],
        ("mmbalance/inforeg/coefficient/", "mmbalance/inforeg/window/"),
    ),
    "agm": Case(
        lambda enc: [AGM(encoders=enc)],
        ("mmbalance/agm/coefficient/", "mmbalance/agm/score/", "mmbalance/agm/step_ratio/"),
        changes_gradients="all",
        scales=True,
        errors=(
            ({"alpha": -1}, ValueError, "`alpha` must be a finite float >= 0, got -1"),
            ({"modulation_starts": 2, "modulation_ends": 1}, ValueError, "`modulation_ends` must be an int >= 2"),
            ({"cap": 0}, ValueError, "`cap` must be a finite float > 0, got 0"),
            ({"masked_graph": "all"}, ValueError, r"`masked_graph` must be one of \('head', 'full', 'none'\)"),
            ({"head_grad_clip": -1.0}, ValueError, "`head_grad_clip` must be a finite float > 0, got -1.0"),
            ({"modulate": "x"}, ValueError, "`modulate` must be one of"),
            ({"forward_fn": 3}, TypeError, r"`forward_fn` must be callable \(module, batch\) -> MultimodalOutput"),
        ),
    ),
    "agm_update": Case(
        lambda enc: [AGM(masked_graph="full", modulate="update", encoders=enc)],
        ("mmbalance/agm/coefficient/", "mmbalance/agm/clipped"),
        changes_gradients="all",
    ),
    "uniform": Case(lambda enc: [UnimodalLosses(encoders=enc)], (), divergence="epoch"),
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
    "monitor+agm": Case(
        lambda enc: [ModalityMonitor(encoders=enc), AGM(encoders=enc)],
        ("mmbalance/monitor/grad_norm/", "mmbalance/monitor/shapley/", "mmbalance/agm/coefficient/"),
        changes_gradients="all",
        needs_val=True,
    ),
    "relearning+agm": Case(
        lambda enc: [DiagnosingRelearning(every_n_epochs=1, strength=10.0, encoders=enc), AGM(encoders=enc)],
        ("mmbalance/relearning/alpha/", "mmbalance/agm/coefficient/"),
        changes_gradients="all",
        needs_val=True,
        epochs=3,
    ),
    "monitor+arl": Case(
        lambda enc: [ModalityMonitor(encoders=enc), ARL(warmup_epochs=0, encoders=enc)],
        ("mmbalance/monitor/grad_norm/", "mmbalance/arl/coefficient/"),
        changes_gradients="encoders",
        needs_val=True,
    ),
    "opm+arl": Case(
        lambda enc: [OPM(modulation_starts=0, encoders=enc), ARL(warmup_epochs=0, encoders=enc)],
        ("mmbalance/opm/dropped/", "mmbalance/arl/coefficient/"),
        changes_gradients="encoders",
        accumulates=False,
    ),
}
"""Meaningful combinations (see the composition table, docs/composition.md)."""


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
