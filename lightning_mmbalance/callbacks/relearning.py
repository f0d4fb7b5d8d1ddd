"""The Diagnosing & Re-learning callback: purity-gap diagnosis and soft re-initialisation of the encoders.

The math is in :mod:`lightning_mmbalance.functional.relearning`; this module schedules the diagnoses, extracts the
features (with :mod:`lightning_mmbalance.callbacks.heldout`) and moves the encoders.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_mmbalance.callbacks.base import BalancingCallback
from lightning_mmbalance.callbacks.heldout import (
    extract_features,
    isolated_rng,
    loader_view,
    train_loader,
    validation_loader,
)
from lightning_mmbalance.contract import ForwardFn
from lightning_mmbalance.functional.relearning import _relearning_interpolate_, clustering_purity, relearning_alpha
from lightning_mmbalance.utilities.checks import check_bool, check_callable, check_float, check_int
from lightning_mmbalance.utilities.distributed import distribute_like, full, is_sharded

__all__ = ["DiagnosingRelearning"]


class DiagnosingRelearning(BalancingCallback):
    r"""Diagnosing & Re-learning: pull over-fitted encoders back toward their initial weights.

    After epoch ``e`` (``e > 0``, ``e % every_n_epochs == 0``, at most ``max_reinits`` times) the callback extracts
    every encoder's features (``MultimodalOutput.features``, eval mode, no grad) on the training data and on the
    held-out validation loader, clusters each (modality, split) with k-means (k = number of classes), and measures
    the purity. Each encoder is then moved toward its weights at the start of training,
    :math:`\theta \leftarrow \alpha\theta_0 + (1-\alpha)\theta` with
    :math:`\alpha = \tanh(\lambda |P_{train} - P_{val}|)`. Only trained parameters move: frozen parts, buffers,
    heads and the optimizer state are untouched (unless ``reset_optimizer_state``).

    It runs at the start of epoch ``e + 1``, so after epoch ``e``'s validation and checkpoint: a run resumed from that
    checkpoint repeats the diagnosis exactly. The initial weights are kept in the callback's state (checkpoints grow by
    one copy of the encoder weights). The validation loader must be a held-out split, never the test set; for the
    training features a non-augmenting view of the training set is recommended.

    It composes with every other callback: its work happens between epochs, before Gradient Blending's estimation
    round of the same epoch.

    Paper: Wei, Li, Feng & Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024
    (arXiv 2407.09705); official code GeWu-Lab/Diagnosing_Relearning_ECCV2024.

    Args:
        strength: ``lambda``, float >= 0 (3 in the official scripts).
        every_n_epochs: diagnose after every ``every_n_epochs``-th epoch, int >= 1 (official 20).
        max_reinits: at most this many diagnoses, int >= 1 (official 3).
        n_clusters: k-means clusters, int >= 2, or None for the number of classes.
        max_samples: diagnose on a fixed random subset of at most this many samples per split (None = all).
        reset_optimizer_state: also drop the optimizer state (momentum, Adam moments) of the encoder parameters.
        seed: the k-means ``random_state`` and the subset's seed, int >= 0.
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.
        forward_fn: ``(module, batch) -> MultimodalOutput`` for the feature passes; None = ``module(batch)``.

    Raises:
        ValueError: an argument outside the range above.
        TypeError: an argument of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import DiagnosingRelearning

        trainer = Trainer(max_epochs=90, callbacks=[DiagnosingRelearning(strength=3.0, every_n_epochs=20)])
        trainer.fit(model, datamodule=dm)  # forward returns MultimodalOutput(..., features={m: (B, D)})
    """

    method = "relearning"
    requires_unimodal_logits = False
    requires_features = True
    supports_manual_optimization = True

    def __init__(
        self,
        strength: float = 3.0,
        every_n_epochs: int = 20,
        max_reinits: int = 3,
        n_clusters: int | None = None,
        max_samples: int | None = None,
        reset_optimizer_state: bool = False,
        seed: int = 0,
        encoders: Mapping[str, str] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__(encoders=encoders)
        check_float("strength", strength, 0)
        check_int("every_n_epochs", every_n_epochs, 1)
        check_int("max_reinits", max_reinits, 1)
        if n_clusters is not None:
            check_int("n_clusters", n_clusters, 2)
        if max_samples is not None:
            check_int("max_samples", max_samples, 1)
        check_bool("reset_optimizer_state", reset_optimizer_state)
        check_int("seed", seed, 0)
        check_callable("forward_fn", forward_fn, "(module, batch) -> MultimodalOutput")
        self.strength = float(strength)
        self.every_n_epochs = every_n_epochs
        self.max_reinits = max_reinits
        self.n_clusters = n_clusters
        self.max_samples = max_samples
        self.reset_optimizer_state = reset_optimizer_state
        self.seed = seed
        self.forward_fn = forward_fn
        self._theta0: dict[str, dict[str, Tensor]] | None = None
        self._n_reinits = 0
        self._last_diagnosed: int | None = None
        self._last: dict[str, dict[str, float]] = {}

    @property
    def state_key(self) -> str:
        """Distinguishes several DiagnosingRelearning instances in one Trainer."""
        return self._generate_state_key(
            strength=self.strength, every_n_epochs=self.every_n_epochs, encoders=self._encoder_paths
        )

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the validation loader and record the initial encoder weights (unless restored from a checkpoint)."""
        super().on_train_start(trainer, pl_module)
        validation_loader(trainer, self.name)
        if self._theta0 is None:
            # Replicated parameters are kept on the CPU; sharded ones (FSDP2) stay shards, gathered only to be saved.
            self._theta0 = {
                m: {n: p.detach().clone() if is_sharded(p) else p.detach().cpu().clone() for n, p in self._trained(m)}
                for m in self.modalities
            }

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Diagnose and re-initialise after a scheduled epoch."""
        epoch = trainer.current_epoch - 1
        if (
            epoch <= 0
            or epoch % self.every_n_epochs != 0
            or self._n_reinits >= self.max_reinits
            or self._last_diagnosed == epoch
        ):
            return
        start = time.perf_counter()
        purities = self._diagnose(trainer, pl_module)
        self._last = {}
        for m, (p_train, p_val) in purities.items():
            alpha = relearning_alpha(p_train, p_val, self.strength)
            self._last[m] = {"train_purity": p_train, "val_purity": p_val, "gap": abs(p_train - p_val), "alpha": alpha}
            self._relearn(trainer, m, alpha)
        self._n_reinits += 1
        self._last_diagnosed = epoch
        rank_zero_info(
            f"DiagnosingRelearning after epoch {epoch} ({time.perf_counter() - start:.1f} s): "
            + ", ".join(f"{m} alpha {v['alpha']:.3f}" for m, v in self._last.items())
        )
        quantities = ("train_purity", "val_purity", "gap", "alpha")
        self.log_values(pl_module, {q: {m: v[q] for m, v in self._last.items()} for q in quantities}, on_step=False)

    # ------------------------------------------------------------------ diagnosis
    def _diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, tuple[float, float]]:
        """(train purity, val purity) per modality; computed on rank 0 and broadcast.

        Raises:
            DivergenceError: an encoder's features are NaN or infinite (checked on every rank: all hold the same
                gathered features), instead of an obscure error from k-means.
        """
        with isolated_rng(self.seed):
            train = self._features(trainer, pl_module, train_loader(trainer, self.name))
            val = self._features(trainer, pl_module, validation_loader(trainer, self.name))
        broken = [m for m in self.modalities if not all(bool(f[m].isfinite().all()) for f in (train[0], val[0]))]
        if broken:
            when = f"in the diagnosis after epoch {trainer.current_epoch - 1} (before step {trainer.global_step})"
            self.report_divergence(trainer, "the encoder features it clusters", broken, when)
        result: dict[str, tuple[float, float]] = {}
        if trainer.is_global_zero:
            (train_feats, train_y, k), (val_feats, val_y, _) = train, val
            k = self.n_clusters or k
            result = {
                m: (
                    clustering_purity(train_feats[m], train_y, k, self.seed),
                    clustering_purity(val_feats[m], val_y, k, self.seed),
                )
                for m in self.modalities
            }
        return trainer.strategy.broadcast(result, src=0)

    def _subset(self, dataset: object) -> list[int] | None:
        if self.max_samples is None:
            return None
        if not hasattr(dataset, "__len__"):
            raise MisconfigurationException(
                f"{self.name}(max_samples={self.max_samples}) needs map-style datasets (with `__len__`), got "
                f"{type(dataset).__name__}; use max_samples=None to diagnose on everything the loader yields."
            )
        n = len(dataset)
        if self.max_samples >= n:
            return None
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return sorted(perm[: self.max_samples].tolist())

    def _features(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader
    ) -> tuple[dict[str, Tensor], Tensor, int]:
        indices = self._subset(loader.dataset)
        view = loader_view(loader, trainer, indices=indices)
        return extract_features(trainer, pl_module, view, self.modalities, self.forward_fn, self.name)

    def _trained(self, modality: str) -> list[tuple[str, nn.Parameter]]:
        """The encoder's (name, parameter) pairs that the optimizer trains; frozen parts are never moved."""
        trained = {id(p) for p in self.encoder_parameters(modality)}
        return [(n, p) for n, p in self._encoders[modality].named_parameters() if id(p) in trained]

    def _relearn(self, trainer: pl.Trainer, modality: str, alpha: float) -> None:
        assert self._theta0 is not None
        named = dict(self._trained(modality))
        initial = self._theta0[modality]
        params = [named[n] for n in initial]
        _relearning_interpolate_(
            params, [distribute_like(initial[n], p) for n, p in zip(initial, params, strict=True)], alpha
        )
        if self.reset_optimizer_state:
            for optimizer in trainer.optimizers:
                for p in params:
                    optimizer.state.pop(p, None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The initial weights, the re-init count, the last diagnosed epoch and its measurements."""
        theta0 = None
        if self._theta0 is not None:  # gathered, so that rank 0's checkpoint holds every shard (a collective)
            theta0 = {m: {n: full(t).detach().cpu() for n, t in tensors.items()} for m, tensors in self._theta0.items()}
        return {
            **super().state_dict(),
            "theta0": theta0,
            "n_reinits": self._n_reinits,
            "last_diagnosed_epoch": self._last_diagnosed,
            "last": self._last,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the initial weights and the schedule, so a resumed run re-initialises toward the same weights."""
        super().load_state_dict(state_dict)
        self._theta0 = state_dict["theta0"]
        self._n_reinits = state_dict["n_reinits"]
        self._last_diagnosed = state_dict["last_diagnosed_epoch"]
        self._last = state_dict["last"]
