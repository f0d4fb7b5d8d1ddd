"""The Gradient Blending callback: loss weights from each head's overfitting-to-generalisation ratio.

The math is in :mod:`lightning_mmbalance.functional.gradient_blending`; this module schedules the estimation rounds,
measures the losses on held-out data (with :mod:`lightning_mmbalance.callbacks.heldout`) and hands the weights to
``multimodal_loss``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_mmbalance.callbacks.base import BalancingCallback
from lightning_mmbalance.callbacks.heldout import (
    detached_copy,
    eval_mode,
    isolated_rng,
    loader_view,
    train_loader,
    validation_loader,
)
from lightning_mmbalance.contract import ForwardFn, MultimodalOutput, run_forward
from lightning_mmbalance.functional.gradient_blending import POLICIES, _gblend_compute, _GBlendTerms
from lightning_mmbalance.utilities.checks import check_callable, check_choice, check_int

__all__ = ["GradientBlending"]

MODES = ("online", "offline")
ESTIMATORS = ("copies", "joint")
_ROUND_SEED = 0x6B1E4D  # rounds are seeded with this + the epoch: independent of history, so resume is exact
_EPS = 1e-8  # added to dO^2

Losses = dict[str, float]


class GradientBlending(BalancingCallback):
    r"""Gradient Blending: weight the fused and unimodal losses by their estimated generalisation value.

    At each estimation point, every head ``h`` (each modality and ``"fused"``) gets a weight
    :math:`w_h \propto G_h / \Delta O_h^2` (normalised to 1), where ``G`` is the drop in held-out loss over a window and
    ``dO`` the growth of the held-out minus training loss. The loss becomes :math:`\sum_h w_h \, CE_h` through
    ``multimodal_loss``.

    - ``estimator="copies"`` (the paper): for each head a copy of the current model is trained alone on that head's
      loss for ``estimation_epochs`` epochs with a fresh optimizer of the user's type and hyper-parameters; the
      losses are measured by eval passes on the training data and the validation loader at the start and the end.
      The main model, its optimizer state and the training data order are left untouched. A round costs about
      ``(M + 1) * estimation_epochs`` training epochs plus ``2 (M + 2)`` eval passes.
    - ``estimator="joint"`` (an approximation, no copies): the main model's own losses between two estimation points
      are used; the first super-epoch trains with uniform weights. Nearly free.

    An estimation round runs at the start of the first training batch of a scheduled epoch, after every callback's
    epoch-start work (so after DiagnosingRelearning's re-initialisation, whatever the callbacks' order). A weight of
    0 keeps its loss term in the graph (multiplied by 0), so DDP sees the same parameters used at every step. The
    validation loader must be a held-out split of the training data, never the test set.

    Paper: Wang, Tran & Feiszli, "What Makes Training Multi-modal Classification Networks Hard?", CVPR 2020
    (arXiv 1905.12681). The official repository (facebookresearch/VMZ) released no weight-estimation code; this
    implements the paper's Algorithms 1-3.

    Args:
        mode: ``"online"`` (re-estimate every ``super_epoch`` epochs, epoch 0 included) or ``"offline"`` (once,
            before training).
        super_epoch: epochs between re-estimations, int >= 1.
        estimation_epochs: training epochs of each copy, int >= 1, or None for ``super_epoch``.
        estimator: ``"copies"`` or ``"joint"`` (online only).
        policy: ``"clip"`` (a head that does not generalise gets weight 0) or ``"abs"`` (BalanceBenchmark's ``|G|``).
        max_batches: caps the batches of each copy-training epoch and of the training-side eval pass; None = all.
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders`` (only the names are used).
        forward_fn: ``(module, batch) -> MultimodalOutput`` for the estimation passes; None = ``module(batch)``.

    Raises:
        ValueError: an argument outside the range above, or ``estimator="joint"`` with ``mode="offline"``.
        TypeError: an argument of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import GradientBlending

        blend = GradientBlending(mode="online", super_epoch=5, max_batches=50)
        trainer = Trainer(max_epochs=30, callbacks=[blend])
        trainer.fit(model, datamodule=dm)  # the datamodule must have a held-out val_dataloader
        print(blend.weights)  # {"audio": ..., "visual": ..., "fused": ...}
    """

    method = "gradient_blending"
    sets_loss_weights = True
    requires_encoder_parameters = False
    supports_manual_optimization = True
    state_version = 2

    def __init__(
        self,
        mode: str = "online",
        super_epoch: int = 5,
        estimation_epochs: int | None = None,
        estimator: str = "copies",
        policy: str = "clip",
        max_batches: int | None = None,
        encoders: Mapping[str, str] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__(encoders=encoders)
        check_choice("mode", mode, MODES)
        check_int("super_epoch", super_epoch, 1)
        if estimation_epochs is not None:
            check_int("estimation_epochs", estimation_epochs, 1)
        check_choice("estimator", estimator, ESTIMATORS)
        if estimator == "joint" and mode == "offline":
            raise ValueError(
                "`estimator='joint'` needs `mode='online'`: it measures the main model between two estimation "
                "points, and nothing has trained before an offline estimate."
            )
        check_choice("policy", policy, POLICIES)
        if max_batches is not None:
            check_int("max_batches", max_batches, 1)
        check_callable("forward_fn", forward_fn, "(module, batch) -> MultimodalOutput")
        self.mode = mode
        self.super_epoch = super_epoch
        self.estimation_epochs = estimation_epochs if estimation_epochs is not None else super_epoch
        self.estimator = estimator
        self.policy = policy
        self.max_batches = max_batches
        self.forward_fn = forward_fn
        self._weights: dict[str, float] | None = None
        self._last: dict[str, dict[str, float]] | None = None
        self._last_round_epoch: int | None = None
        self._joint_last: dict[str, Losses] | None = None
        self._epoch_started = False

    # ------------------------------------------------------------------ public
    @property
    def heads(self) -> tuple[str, ...]:
        """Each modality, then ``"fused"``."""
        return (*self.modalities, "fused")

    @property
    def weights(self) -> dict[str, float]:
        """The loss weights in use, keyed by modality and ``"fused"`` (uniform before the first estimate)."""
        if self._weights is None:
            return dict.fromkeys(self.heads, 1.0 / len(self.heads))
        return dict(self._weights)

    @property
    def state_key(self) -> str:
        """Distinguishes several GradientBlending instances in one Trainer."""
        return self._generate_state_key(
            mode=self.mode, super_epoch=self.super_epoch, estimator=self.estimator, encoders=self._encoder_paths
        )

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The current weights, ``sum_h w_h * CE_h``."""
        return self.weights

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The checks of every callback; the copies estimator needs a module that can be copied (not sharded)."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.sharded and self.estimator == "copies":
            raise MisconfigurationException(
                "GradientBlending(estimator='copies') trains copies of the module, and a module sharded with FSDP2 "
                "cannot be copied. Use `GradientBlending(estimator='joint')`, which measures the main model itself."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check that a held-out validation loader and a single training DataLoader exist."""
        super().on_train_start(trainer, pl_module)
        validation_loader(trainer, self.name)
        train_loader(trainer, self.name)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Mark the epoch's start; a due round runs before its first batch, after every epoch-start hook."""
        self._epoch_started = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Run a scheduled estimation round: schedule, measure, update the weights, log."""
        started, self._epoch_started = self._epoch_started, False
        epoch = trainer.current_epoch
        if not started or not self._round_due(epoch):
            return
        start = time.perf_counter()
        losses = self._measure_round(trainer, pl_module)
        self._last_round_epoch = epoch
        if losses is None:  # the joint estimator's first measurement: nothing to compare with yet
            return
        terms = _gblend_compute(*losses, self.policy, _EPS)
        self._weights = _next_weights(self._weights, terms)
        self._last = {"generalization": terms.generalization, "overfitting": terms.overfitting, "ogr": terms.ogr}
        rank_zero_info(
            f"GradientBlending (epoch {epoch}, {time.perf_counter() - start:.1f} s): weights "
            + ", ".join(f"{h} {w:.3f}" for h, w in self.weights.items())
        )
        self.log_values(pl_module, {"weight": self.weights, **self._last}, on_step=False)

    def _round_due(self, epoch: int) -> bool:
        if self.mode == "offline":
            return self._last_round_epoch is None
        return epoch % self.super_epoch == 0 and self._last_round_epoch != epoch

    def _measure_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[Losses, Losses, Losses, Losses] | None:
        """(train_start, val_start, train_end, val_end) mean losses per head, or None on the first joint round.

        Raises:
            DivergenceError: a measured loss is NaN or infinite.
        """
        if self.estimator == "copies":
            losses = self._copies_round(trainer, pl_module)
            self._check_losses(trainer, "the losses of its estimation round (the model and each head's copy)", losses)
            return losses
        measured = self._joint_measure(trainer, pl_module)
        self._check_losses(trainer, "the training and held-out losses of its estimation round", measured.values())
        previous, self._joint_last = self._joint_last, measured
        if previous is None:
            return None
        return previous["train"], previous["val"], measured["train"], measured["val"]

    def _check_losses(self, trainer: pl.Trainer, what: str, losses: Iterable[Losses]) -> None:
        per_head = {h: [measured[h] for measured in losses] for h in self.heads}
        epoch, step = trainer.current_epoch, trainer.global_step
        when = f"in the estimation round at the start of epoch {epoch} (before step {step})"
        self.check_finite(trainer, what, per_head, when)

    # ------------------------------------------------------------------ estimation
    def _views(self, trainer: pl.Trainer, seed: int) -> tuple[DataLoader, DataLoader, int]:
        """The round's training view (shuffled by ``seed``), the validation view, and the agreed batch budget."""
        train_view = loader_view(train_loader(trainer, self.name), trainer, shuffle_seed=seed)
        val_view = loader_view(validation_loader(trainer, self.name), trainer)
        budget = len(train_view) if self.max_batches is None else min(len(train_view), self.max_batches)
        budget_t = torch.tensor(float(budget), device=trainer.strategy.root_device)
        budget = int(trainer.strategy.reduce(budget_t, reduce_op="min"))
        return train_view, val_view, budget

    def _head_losses(self, output: MultimodalOutput) -> dict[str, Tensor]:
        logits = {**{m: output.unimodal_logits[m] for m in self.modalities}, "fused": output.logits}
        return {h: F.cross_entropy(_at_least_float32(z), output.targets, reduction="sum") for h, z in logits.items()}

    def _mean_losses(
        self, trainer: pl.Trainer, module: pl.LightningModule, view: DataLoader, max_batches: int | None
    ) -> dict[str, float]:
        """Mean per-sample CE of every head over the view (eval mode, no grad), summed over ranks before dividing."""
        device = trainer.strategy.root_device
        sums = torch.zeros(len(self.heads) + 1, dtype=torch.float64, device=device)
        with eval_mode(module), trainer.precision_plugin.forward_context():
            for i, batch in enumerate(view):
                if max_batches is not None and i >= max_batches:
                    break
                output = run_forward(self.forward_fn, module, trainer.strategy.batch_to_device(batch))
                losses = self._head_losses(output)
                count = torch.tensor([float(output.targets.shape[0])], dtype=torch.float64, device=device)
                sums += torch.cat([torch.stack([losses[h].double() for h in self.heads]), count])
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        values = sums.tolist()
        return {h: values[i] / max(values[-1], 1.0) for i, h in enumerate(self.heads)}

    def _copies_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[Losses, Losses, Losses, Losses]:
        seed = _ROUND_SEED + trainer.current_epoch
        train_view, val_view, budget = self._views(trainer, seed)
        train_end: Losses = {}
        val_end: Losses = {}
        with isolated_rng(seed):
            train_start = self._mean_losses(trainer, pl_module, train_view, budget)
            val_start = self._mean_losses(trainer, pl_module, val_view, None)
            for i, head in enumerate(self.heads, start=1):
                rank_zero_info(
                    f"GradientBlending: training the {head!r} copy ({i}/{len(self.heads)}), "
                    f"{self.estimation_epochs} epoch(s) x {budget} batches"
                )
                copy = self._train_copy(trainer, pl_module, head, seed, budget)
                train_end[head] = self._mean_losses(trainer, copy, train_view, budget)[head]
                val_end[head] = self._mean_losses(trainer, copy, val_view, None)[head]
                del copy
        return train_start, val_start, train_end, val_end

    def _train_copy(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, head: str, seed: int, budget: int
    ) -> pl.LightningModule:
        """A copy of the module trained alone on ``head``'s loss with a fresh optimizer of the user's type."""
        copy = detached_copy(pl_module)
        copy.train()
        template = trainer.optimizers[0]
        optimizer = type(template)(copy.parameters(), **template.defaults)
        uses_scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        scaler = torch.amp.GradScaler(trainer.strategy.root_device.type) if uses_scaler else None
        for epoch in range(self.estimation_epochs):
            view = loader_view(train_loader(trainer, self.name), trainer, shuffle_seed=seed + 1 + epoch)
            for i, batch in enumerate(view):
                if i >= budget:
                    break
                optimizer.zero_grad(set_to_none=True)
                with trainer.precision_plugin.forward_context():
                    output = run_forward(self.forward_fn, copy, trainer.strategy.batch_to_device(batch))
                    logits = output.logits if head == "fused" else output.unimodal_logits[head]
                    loss = F.cross_entropy(_at_least_float32(logits), output.targets)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                self._average_gradients(trainer, copy)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
        return copy

    @staticmethod
    def _average_gradients(trainer: pl.Trainer, module: torch.nn.Module) -> None:
        """Under DDP, all-reduce (mean) the copy's gradients in one flat call, so the copies stay identical."""
        if trainer.world_size < 2:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
        pieces = torch.split(flat, [g.numel() for g in grads])
        torch._foreach_copy_(grads, [piece.view_as(g) for piece, g in zip(pieces, grads, strict=True)])

    def _joint_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Losses]:
        seed = _ROUND_SEED + trainer.current_epoch
        train_view, val_view, budget = self._views(trainer, seed)
        with isolated_rng(seed):
            return {
                "train": self._mean_losses(trainer, pl_module, train_view, budget),
                "val": self._mean_losses(trainer, pl_module, val_view, None),
            }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The weights, the last round's terms and the schedule, for an exact resume."""
        return {
            **super().state_dict(),
            "weights": self._weights,
            "last": self._last,
            "last_round_epoch": self._last_round_epoch,
            "joint_last": self._joint_last,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the weights and the schedule; nothing is re-estimated before the next scheduled epoch.

        Version-1 states (which also held the previous weights and an offline flag, both redundant) load too.
        """
        super().load_state_dict(state_dict)
        self._weights = state_dict["weights"]
        self._last = state_dict["last"]
        self._last_round_epoch = state_dict["last_round_epoch"]
        self._joint_last = state_dict["joint_last"]


def _next_weights(current: dict[str, float] | None, terms: _GBlendTerms) -> dict[str, float]:
    """The new weights; when every raw weight is 0 the current ones are kept (uniform if there are none yet)."""
    if not terms.all_zero or current is None:
        return terms.weights
    return current


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()
