"""The ModalityMonitor callback: the field's imbalance measurements, logged per modality; it never changes training.

Every quantity that a method also computes comes from that method's functional module (OGM-GE's score and ratio,
ARL's entropy and logit norm, MMPareto's gradient cosine), so the monitor and the methods log the same numbers; the
other diagnostics are in :mod:`lightning_mmbalance.functional.diagnostics`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_mmbalance.callbacks.base import MultimodalCallback, StepStatistics, add_loss_gradients, flat_buffers
from lightning_mmbalance.callbacks.heldout import extract_features, loader_view, train_loader, validation_loader
from lightning_mmbalance.contract import ForwardFn, StepRecord, run_forward
from lightning_mmbalance.functional.arl import _arl_update
from lightning_mmbalance.functional.diagnostics import _unimodal_update, probe_accuracy, shapley_values, utilization
from lightning_mmbalance.functional.mmpareto import _MMParetoProducts
from lightning_mmbalance.functional.ogm_ge import _ogm_ratio_compute, _ogm_score_update
from lightning_mmbalance.masking import MaskingError, masked_forward
from lightning_mmbalance.utilities.checks import check_bool, check_callable, check_int
from lightning_mmbalance.utilities.distributed import global_sums, local, squared_norm
from lightning_mmbalance.utilities.plot import plot_history

__all__ = ["ModalityMonitor"]

_HISTORY_QUANTITIES = ("/acc/", "/coefficient/", "/weight/", "/w_mm/", "/alpha/")


class ModalityMonitor(MultimodalCallback):
    r"""Per-modality diagnostics of multimodal training; changes nothing in training.

    Per optimizer step (every ``every_n_steps``, aligned to the Trainer's ``log_every_n_steps``; from tensors the
    step already has), under ``mmbalance/monitor/<quantity>/<modality>``: unimodal accuracy and loss (``acc``,
    ``loss``), OGM-GE's score and ratio (``score``: mean true-class probability, ``ratio``: score over the mean of the
    others, as OGM-GE computes it), ARL's signals (``entropy``: mean prediction entropy in nats, ``abs_logit``: mean
    L1 norm of the logits), and ``mmbalance/monitor/imbalance_gap`` = max - min of the per-modality accuracies. After
    the optimizer step: the norm of the encoder gradient the step applied (``grad_norm``: after accumulation,
    unscaling, every balancing callback and gradient clipping, so whatever the callbacks' order) and the ratio of
    update norm to weight norm (``update_ratio``, a proxy for the conditional learning speed of Wu et al., ICML 2022).

    Every ``conflict_every_n_steps`` steps (optional, two extra autograd passes): ``cos`` = the cosine between the
    fused-loss and the unimodal-loss gradient on each encoder (MMPareto's conflict test), and ``conflict`` = 1 if it
    is <= 0.

    Per validation epoch: unimodal accuracy (``val_acc``); with ``masked_eval``, the fused accuracy with each
    modality masked (``masked_acc``) and the conditional utilisation rate
    :math:`u_m = (acc_{all} - acc_{all \setminus m}) / acc_{all}` (``utilization``); with ``shapley`` (up to 4
    modalities), the Shapley value of accuracy over the masked subsets (``shapley``). A modality is masked by
    zeroing every tensor of its encoder's output, a tensor or a structure such as a Hugging Face ``ModelOutput``
    (forward hooks, whatever the batch looks like; see :mod:`lightning_mmbalance.masking`), or by the module's own
    ``masked_forward(batch, masked)`` if it defines one. If a masked encoder's output holds no tensor, the masked
    measurements are skipped with one warning.

    At the end of training, with ``linear_probe``: a logistic-regression probe of each encoder's features, fitted on the
    training set and scored on the validation set (``linear_probe``), available as :attr:`linear_probe_accuracy`.
    A summary figure (per-modality accuracy and each attached method's coefficients over steps) is written to the
    logger's folder as ``mmbalance_summary.png``. All values are reduced across DDP ranks before logging.

    A measured value that is NaN or infinite (a step statistic, a gradient norm or dot product, the encoder weights at
    the end of an epoch) gives one :class:`~lightning_mmbalance.DivergenceWarning` naming the modality and the step;
    training goes on, since the monitor never changes it (the balancing callbacks raise ``DivergenceError``).

    Args:
        every_n_steps: measure and log the per-step quantities every this many optimizer steps, int >= 1. Lightning
            writes step logs every ``log_every_n_steps`` steps only, so the monitor measures every
            ``lcm(every_n_steps, log_every_n_steps)``-th step (every written step with the default 1).
        conflict_every_n_steps: run the gradient-conflict test every this many steps, aligned the same way
            (None = never).
        masked_eval: evaluate masked accuracy and utilisation per validation epoch.
        shapley: evaluate Shapley contributions per validation epoch (up to 4 modalities).
        linear_probe: fit the linear probes at the end of training.
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.
        forward_fn: ``(module, batch) -> MultimodalOutput`` for the validation passes and the probes' feature
            passes; None = ``module(batch)``.

    Raises:
        ValueError: an argument outside the range above (in ``__init__``); Shapley values for more than 4
            modalities (in ``setup``).
        TypeError: an argument of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import OGMGE, ModalityMonitor

        trainer = Trainer(max_epochs=30, callbacks=[ModalityMonitor(linear_probe=True), OGMGE()])
        trainer.fit(model, datamodule=dm)
    """

    method = "monitor"
    supports_manual_optimization = True
    divergence = "warn"
    state_version = 2

    def __init__(
        self,
        every_n_steps: int = 1,
        conflict_every_n_steps: int | None = None,
        masked_eval: bool = True,
        shapley: bool = True,
        linear_probe: bool = False,
        encoders: Mapping[str, str] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__(encoders=encoders)
        check_int("every_n_steps", every_n_steps, 1)
        if conflict_every_n_steps is not None:
            check_int("conflict_every_n_steps", conflict_every_n_steps, 1)
        check_bool("masked_eval", masked_eval)
        check_bool("shapley", shapley)
        check_bool("linear_probe", linear_probe)
        check_callable("forward_fn", forward_fn, "(module, batch) -> MultimodalOutput")
        self.every_n_steps = every_n_steps
        self.conflict_every_n_steps = conflict_every_n_steps
        self.masked_eval = masked_eval
        self.shapley = shapley
        self.linear_probe = linear_probe
        self.forward_fn = forward_fn
        self.linear_probe_accuracy: dict[str, float] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._conflict: Tensor | None = None
        self._conflict_views: list[list[Tensor]] = []
        self._before: dict[str, list[Tensor]] | None = None
        self._subsets: list[frozenset[str]] = []
        self._masking = True
        self._val_counts: Tensor | None = None

    @property
    def state_key(self) -> str:
        """Distinguishes several ModalityMonitor instances in one Trainer."""
        return self._generate_state_key(every_n_steps=self.every_n_steps, encoders=self._encoder_paths)

    @property
    def needs_retained_graph(self) -> bool:
        """True with the conflict test, which takes two gradients of the step's forward before its backward."""
        return self.conflict_every_n_steps is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the encoders; Shapley values are exact and cheap only up to 4 modalities."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.shapley and len(self.modalities) > 4:
            raise ValueError(
                f"ModalityMonitor: Shapley values need 2^M masked evaluations; {len(self.modalities)} modalities "
                "is too many. Pass `shapley=False`."
            )
        present = list(self.modalities)
        self._subsets = [frozenset(c) for k in range(len(present) + 1) for c in itertools.combinations(present, k)]
        self._masking = self.masked_eval or self.shapley

    # ------------------------------------------------------------------ per step
    def _logging_step(self, trainer: pl.Trainer) -> bool:
        return self.logs_this_step(trainer, self.every_n_steps)

    def _conflict_step(self, trainer: pl.Trainer) -> bool:
        n = self.conflict_every_n_steps
        return n is not None and self.logs_this_step(trainer, n)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """On measured steps: add the micro-batch's statistics (and, on conflict steps, its encoder gradients)."""
        record = self.take_record(pl_module)
        if self._conflict_step(trainer):
            self._accumulate_conflict(trainer, record)
        if self._logging_step(trainer):
            self._accumulate(record)

    def step_statistics(self, record: StepRecord) -> dict[str, Tensor]:
        """Per modality: correct predictions, cross-entropy, OGM-GE's score, ARL's entropy and logit norm (sums)."""
        logits = [record.output.unimodal_logits[m] for m in self.modalities]
        targets = record.output.targets
        return {
            **_unimodal_update(logits, targets),
            "score": _ogm_score_update(logits, targets).double(),
            **_arl_update(logits),
        }

    def _accumulate_conflict(self, trainer: pl.Trainer, record: StepRecord) -> None:
        params = [p for m in self.modalities for p in self.encoder_parameters(m)]
        if self._conflict is None:
            self._conflict, self._conflict_views = flat_buffers(params, rows=2)
        unimodal = torch.stack([record.unimodal_losses[m] for m in self.modalities]).sum()
        for loss, views in zip((record.fused_loss, unimodal), self._conflict_views, strict=True):
            add_loss_gradients(trainer, loss, params, views, self.encoder_outputs())

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        """Log the step's statistics and conflict cosines; keep the weights for the update ratio."""
        values: dict[str, Any] = {}
        if stats.sums:
            values.update(self._step_values(stats))
            self._before = {m: [p.detach().clone() for p in self.encoder_parameters(m)] for m in self.modalities}
        if self._conflict is not None:
            values.update(self._conflict_values(trainer))
        if values:
            self.log_values(pl_module, values)

    def discard_step(self) -> None:
        """Forget the skipped step's conflict gradients."""
        self._conflict = None

    def _step_values(self, stats: StepStatistics) -> dict[str, Any]:
        def per_modality(values: list[float]) -> dict[str, float]:
            return dict(zip(self.modalities, values, strict=True))

        acc = per_modality(stats.mean("correct"))
        return {
            "acc": acc,
            "loss": per_modality(stats.mean("loss")),
            "score": per_modality(stats.mean("score")),
            "ratio": _ogm_ratio_compute(per_modality(stats["score"])),
            "entropy": per_modality(stats.mean("entropy")),
            "abs_logit": per_modality(stats.mean("abs_logit")),
            "imbalance_gap": max(acc.values()) - min(acc.values()),
        }

    def _conflict_values(self, trainer: pl.Trainer) -> dict[str, dict[str, float]]:
        assert self._conflict is not None
        both, self._conflict = self._conflict, None
        if trainer.world_size > 1 and not self.sharded:  # FSDP2 already averaged the shards it reduce-scattered
            both = trainer.strategy.reduce(both, reduce_op="mean")
        rows, offset = [], 0
        for m in self.modalities:
            size = sum(local(p).numel() for p in self.encoder_parameters(m))
            f, u = both[0, offset : offset + size].double(), both[1, offset : offset + size].double()
            rows.append(torch.stack([f @ f, f @ u, u @ u]))
            offset += size
        flat = global_sums(trainer, torch.stack(rows).flatten(), self.sharded)
        dots = {m: flat[3 * i : 3 * i + 3] for i, m in enumerate(self.modalities)}
        self.check_finite(trainer, "the dot products of its conflict test's gradients", dots)
        products = [_MMParetoProducts(*flat[3 * i : 3 * i + 3]) for i in range(len(self.modalities))]
        cos = {m: p.cos for m, p in zip(self.modalities, products, strict=True)}
        return {"cos": cos, "conflict": {m: float(p.conflict) for m, p in zip(self.modalities, products, strict=True)}}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After a measured optimizer step: log the applied gradient's norm and the update ratio; keep the history."""
        if self._before is not None:
            before, self._before = self._before, None
            self.log_values(pl_module, self._after_step_values(trainer, before), cadence_checked=True)
        self._record_history(trainer)

    def _after_step_values(
        self, trainer: pl.Trainer, before: Mapping[str, list[Tensor]]
    ) -> dict[str, dict[str, float]]:
        squares: list[Tensor] = []
        device = trainer.strategy.root_device
        for m in self.modalities:
            params = self.encoder_parameters(m)
            grads = [p.grad for p in params if p.grad is not None]
            after = [p.detach() for p in params]
            delta = list(torch._foreach_sub(after, before[m])) if params else []
            squares += [squared_norm(t, device) for t in (grads, delta, before[m])]
        flat = [math.sqrt(v) for v in global_sums(trainer, torch.stack(squares), self.sharded)]
        norms = {m: flat[3 * i : 3 * i + 3] for i, m in enumerate(self.modalities)}
        when = f"after step {trainer.global_step - 1} (epoch {trainer.current_epoch})"
        self.check_finite(trainer, "the norms of the applied encoder gradients, updates and weights", norms, when)
        grad_norm, update_ratio = {}, {}
        for i, m in enumerate(self.modalities):
            grad, update, weight = flat[3 * i : 3 * i + 3]
            grad_norm[m] = grad
            update_ratio[m] = update / weight if weight > 0 else 0.0
        return {"grad_norm": grad_norm, "update_ratio": update_ratio}

    def _record_history(self, trainer: pl.Trainer) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith("mmbalance/") and any(q in key for q in _HISTORY_QUANTITIES):
                series = self.history.setdefault(key, [])
                if not series or series[-1][0] != trainer.global_step:
                    series.append((trainer.global_step, float(value)))

    # ------------------------------------------------------------------ per validation epoch
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the validation counters."""
        self._val_counts = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Count correct predictions: per modality, and fused with each subset of modalities present."""
        if trainer.sanity_checking or dataloader_idx != 0:
            return
        with torch.no_grad():
            full = run_forward(self.forward_fn, pl_module, batch)
            y = full.targets
            counts = [(full.unimodal_logits[m].argmax(1) == y).sum() for m in self.modalities]
            counts.append(torch.tensor(y.shape[0], device=y.device))
            if self._masking:
                counts += self._masked_counts(pl_module, batch, full.logits, y)
        row = torch.stack([c.to(torch.float64) for c in counts])
        self._val_counts = row if self._val_counts is None else self._val_counts[: row.numel()] + row

    def _masked_counts(self, pl_module: pl.LightningModule, batch: Any, full: Tensor, y: Tensor) -> list[Tensor]:
        """Correct fused predictions with each subset present; empty (and masking off) if the module cannot mask."""
        counts = []
        try:
            for present in self._subsets:
                logits = full
                if len(present) < len(self.modalities):
                    masked = frozenset(self.modalities) - present
                    logits = masked_forward(pl_module, batch, masked, self._encoders, self.forward_fn).logits
                counts.append((logits.argmax(1) == y).sum())
        except MaskingError as err:
            self._masking = False
            rank_zero_warn(f"ModalityMonitor skips masked accuracy, utilisation and Shapley values: {err}")
            return []
        return counts

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log validation accuracy per modality, masked accuracy, utilisation and Shapley contributions."""
        if trainer.sanity_checking or self._val_counts is None:
            return
        counts = trainer.strategy.reduce(self._val_counts, reduce_op="sum").tolist()
        self._val_counts = None
        k = len(self.modalities)
        n = max(counts[k], 1.0)
        values: dict[str, dict[str, float]] = {"val_acc": {m: counts[i] / n for i, m in enumerate(self.modalities)}}
        if self._masking and len(counts) > k + 1:
            acc = {s: counts[k + 1 + j] / n for j, s in enumerate(self._subsets)}
            everything = frozenset(self.modalities)
            if self.masked_eval:
                values["masked_acc"] = {m: acc[everything - {m}] for m in self.modalities}
                values["utilization"] = utilization(acc, self.modalities)
            if self.shapley:
                values["shapley"] = shapley_values(acc, self.modalities)
        self.log_values(pl_module, values, on_step=False)

    # ------------------------------------------------------------------ end of training
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit the linear probes (optional) and write the summary figure.

        Runs in ``on_train_end``, while the module is still on its device and the process group alive
        (``on_fit_end`` comes after the strategy's teardown).
        """
        if self.linear_probe:
            self.linear_probe_accuracy = self._fit_probes(trainer, pl_module)
            if trainer.logger is not None:
                metrics = {self.tag("linear_probe", m): v for m, v in self.linear_probe_accuracy.items()}
                trainer.logger.log_metrics(metrics, step=trainer.global_step)
            rank_zero_info(
                "ModalityMonitor linear probes (val accuracy): "
                + ", ".join(f"{m} {v:.3f}" for m, v in self.linear_probe_accuracy.items())
            )
        self._write_figure(trainer)

    def _fit_probes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        train, val = (
            extract_features(
                trainer, pl_module, loader_view(loader, trainer), self.modalities, self.forward_fn, self.name
            )
            for loader in (train_loader(trainer, self.name), validation_loader(trainer, self.name))
        )
        broken = [m for m in self.modalities if not all(bool(f[0][m].isfinite().all()) for f in (train, val))]
        if broken:  # every rank holds the same gathered features: all decide alike; the probe gets NaN, not fitted
            when = f"at the end of training (after step {trainer.global_step - 1})"
            self.report_divergence(trainer, "the encoder features of its linear probes", broken, when)
        result: dict[str, float] = {}
        if trainer.is_global_zero:
            result = {
                m: math.nan if m in broken else probe_accuracy(train[0][m], train[1], val[0][m], val[1])
                for m in self.modalities
            }
        return trainer.strategy.broadcast(result, src=0)

    def _write_figure(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:  # no logger, no folder of the run's own: write nothing rather than litter the cwd
            return
        folder = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and folder is not None and self.history:
            plot_history(self.history, Path(folder) / "mmbalance_summary.png")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The history behind the summary figure (the monitor keeps no training state)."""
        return {**super().state_dict(), "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history; version-1 states carried none."""
        super().load_state_dict(state_dict)
        self.history = {
            k: [(int(s), float(v)) for s, v in points] for k, points in state_dict.get("history", {}).items()
        }
