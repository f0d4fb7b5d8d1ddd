"""The OPM callback: drop the dominant modality's encoder features during training, with a discrepancy-set probability.

The math is in :mod:`lightning_mmbalance.functional.opm`; this module decides, at the start of each training
micro-batch, what to drop, and applies it with a forward hook on every encoder. Gradients are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_mmbalance.callbacks.base import BalancingCallback, StepStatistics, in_window, remove_hooks
from lightning_mmbalance.callbacks.ogm_ge import OGMGE
from lightning_mmbalance.contract import ForwardFn, MultimodalOutput, StepRecord, run_forward
from lightning_mmbalance.functional.ogm_ge import _ogm_ratio_compute, _ogm_score_update
from lightning_mmbalance.functional.opm import (
    _opm_gate,
    _opm_masks,
    _opm_probability_compute,
    _opm_scale,
    opm_generator,
    opm_theta,
)
from lightning_mmbalance.masking import MaskingError
from lightning_mmbalance.utilities.checks import check_bool, check_callable, check_float, check_int, check_window
from lightning_mmbalance.utilities.tree import map_tensors, tensor_leaves

__all__ = ["OPM"]


class OPM(BalancingCallback):
    r"""On-the-fly Prediction Modulation (OPM): drop the dominant modality's features in the feed-forward stage.

    At each training micro-batch inside the window the callback scores every modality by the summed softmax
    probability its unimodal logits give to the true class (the OGM-GE score, from a gradient-free pre-pass of the
    same micro-batch, summed over DDP ranks), sets a drop probability
    :math:`q_m = q_{base}(1 + \lambda \tanh(\rho_m - 1))` for every modality whose ratio to the mean of the others
    exceeds 1, and, with probability ``p_exe``, zeroes the encoder output of modality ``m`` for each sample with
    probability :math:`q_m`, scaling every encoder output by :math:`1 / (1 - \theta)`. The user's batch, the loss,
    the gradients and every evaluation forward are left alone. ``docs/opm.md`` gives the exact rule.

    Paper: Wei, Hu, Du & Wen, "On-the-fly Modulation for Balanced Multimodal Learning", T-PAMI 2024
    (arXiv 2410.11582); official code GeWu-Lab/BML_TPAMI2024.

    Args:
        q_base: base drop probability, float in ``[0, 1]``. Official 0.5.
        lam: growth of the drop probability with the discrepancy, float >= 0. Official 0.5.
        p_exe: probability that a micro-batch's drop is executed, float in ``[0, 1]``. Official 0.7.
        modulation_starts: first epoch with drops (0-indexed, inclusive). 6 is the official warm-up (epochs 0-5).
        modulation_ends: last epoch with drops (inclusive), or None for no end (official).
        lagged: False scores the current micro-batch with a pre-pass (the official code); True uses the previous
            optimizer step's scores (the paper's figure), without a pre-pass.
        feature_dims: modality -> feature width ``D_m`` weighing ``theta``; None takes the per-sample size of
            ``MultimodalOutput.features`` (or equal weights without features).
        seed: seed of the gate and mask draws, int in ``[0, 2**31)``; the draws are a function of (seed, global step,
            micro-batch), identical on every rank and exact on resume.
        forward_fn: ``(module, batch) -> MultimodalOutput`` for the pre-pass; None = ``module(batch)``.
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.

    Raises:
        ValueError: an argument outside the range above.
        TypeError: an argument of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import OPM

        trainer = Trainer(max_epochs=100, callbacks=[OPM(q_base=0.5, lam=0.5, p_exe=0.7)])
        trainer.fit(model, datamodule=dm)  # model.training_step returns multimodal_loss(self, self(batch))
    """

    method = "opm"

    def __init__(
        self,
        q_base: float = 0.5,
        lam: float = 0.5,
        p_exe: float = 0.7,
        modulation_starts: int = 6,
        modulation_ends: int | None = None,
        lagged: bool = False,
        feature_dims: Mapping[str, int] | None = None,
        seed: int = 0,
        forward_fn: ForwardFn | None = None,
        encoders: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(encoders=encoders)
        check_float("q_base", q_base, 0, 1)
        check_float("lam", lam, 0)
        check_float("p_exe", p_exe, 0, 1)
        check_window(modulation_starts, modulation_ends)
        check_bool("lagged", lagged)
        if feature_dims is not None:
            if not isinstance(feature_dims, Mapping):
                raise TypeError(f"`feature_dims` must be a mapping of modality to an int >= 1, got {feature_dims!r}.")
            for m, d in feature_dims.items():
                check_int(f"feature_dims[{m!r}]", d, 1)
        check_int("seed", seed, 0, 2**31)
        check_callable("forward_fn", forward_fn, "(module, batch) -> MultimodalOutput")
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.modulation_starts = modulation_starts
        self.modulation_ends = modulation_ends
        self.lagged = lagged
        self.feature_dims = dict(feature_dims) if feature_dims is not None else None
        self.seed = seed
        self.forward_fn = forward_fn
        self._hooks: list[RemovableHandle] = []
        self._norm_layers: list[nn.Module] = []
        self._stored: dict[str, float] | None = None  # lagged mode: q for the next step
        self._seen_dims: dict[str, int] | None = None  # lagged mode: feature widths of the last recorded output
        self._announced = False
        self._world = (1, 0)  # (world size, rank) of the draws
        self._reset_micro_batch()
        self._reset_step()

    @property
    def state_key(self) -> str:
        """Distinguishes several OPM instances in one Trainer."""
        return self._generate_state_key(
            q_base=self.q_base, lam=self.lam, p_exe=self.p_exe, encoders=self._encoder_paths
        )

    def _reset_micro_batch(self) -> None:
        self._armed = False
        self._q: dict[str, float] = {}
        self._theta = 0.0
        self._rng: numpy.random.Generator | None = None
        self._batch_size: int | None = None
        self._keep: dict[str, Tensor] | None = None
        self._fired: set[str] = set()
        self._clean_scores: Tensor | None = None
        self._wants_statistics = False

    def _reset_step(self) -> None:
        self._step_q: list[dict[str, float]] = []
        self._step_executed: list[bool] = []
        self._step_scale: list[float] = []

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the encoders, check ``feature_dims``, refuse ``OGMGE`` alongside, and hook every encoder."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if any(isinstance(cb, OGMGE) for cb in trainer.callbacks):  # type: ignore[attr-defined]
            raise MisconfigurationException(
                "OPM and OGMGE on one Trainer are not supported: the journal code's OGM reads the clean scores of the "
                "forward before OPM's drop, while OGMGE would read the dropped forward's. Use one of them."
            )
        if self.feature_dims is not None and set(self.feature_dims) != set(self.modalities):
            raise ValueError(
                f"OPM: the keys of `feature_dims` {sorted(self.feature_dims)} differ from the encoders' modalities "
                f"{sorted(self.modalities)}."
            )
        remove_hooks(self._hooks)
        # Registered before any compiled call of this fit: Dynamo does not see hooks added after it traced a module.
        self._hooks = [enc.register_forward_hook(self._hook(m)) for m, enc in self._encoders.items()]
        if getattr(pl_module, "_compiled_call_impl", None) is not None or getattr(pl_module, "_compiler_ctx", None):
            # A module compiled as a whole reuses code traced for another instance of its class (an earlier fit),
            # and Dynamo does not guard on forward hooks: drop that code so that this fit traces the hooks.
            rank_zero_info("OPM: resetting torch.compile's caches, so that the compiled module traces OPM's hooks.")
            torch._dynamo.reset()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the norm layers whose running statistics the pre-pass must leave as they are."""
        super().on_train_start(trainer, pl_module)
        self._norm_layers = [
            layer
            for layer in pl_module.modules()
            if isinstance(layer, nn.modules.batchnorm._NormBase) and layer.track_running_stats
        ]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Disarm and remove the encoder hooks."""
        self._reset_micro_batch()
        remove_hooks(self._hooks)
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ the drop
    def _hook(self, modality: str) -> Any:
        def drop(module: nn.Module, args: Any, output: Any) -> Any:
            return self._drop(modality, module, output) if self._armed else None

        return drop

    @torch.compiler.disable
    def _drop(self, modality: str, module: nn.Module, output: Any) -> Any:
        """Encoder ``modality``'s output with dropped samples zeroed and every sample scaled by ``1 / (1 - theta)``."""
        leaves = [t for t in tensor_leaves(output) if t.is_floating_point()]
        if not leaves:
            raise MaskingError(
                f"OPM cannot drop modality {modality!r}: its encoder ({type(module).__name__}) returns a "
                f"{type(output).__name__} with no floating-point tensor in it."
            )
        if self._keep is None:  # the first encoder of the micro-batch draws every modality's masks
            assert self._rng is not None
            batch = self._batch_size if self._batch_size is not None else leaves[0].shape[0]
            world, rank = self._world
            self._batch_size = batch
            self._keep = _opm_masks(self._q, batch, self._rng, world, rank)
        wrong = [tuple(t.shape) for t in leaves if t.ndim == 0 or t.shape[0] != self._batch_size]
        if wrong:
            raise ValueError(
                f"OPM: the {modality!r} encoder's output has shape {wrong[0]}, whose dimension 0 is not the batch size "
                f"{self._batch_size}. OPM drops samples along dimension 0 (an encoder that folds frames into the batch "
                "cannot be masked per sample); pass `encoders=` a submodule that returns per-sample features."
            )
        self._fired.add(modality)
        keep = self._keep[modality]
        return map_tensors(lambda t: t * _opm_scale(keep, self._theta, t) if t.is_floating_point() else t, output)

    # ------------------------------------------------------------------ per micro-batch
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Inside the window: score the micro-batch, draw the gate, and arm the encoder hooks if it drops."""
        self._reset_micro_batch()
        self._wants_statistics = self.lagged or self.logs_this_step(trainer)
        if not in_window(trainer.current_epoch, self.modulation_starts, self.modulation_ends):
            self._record_micro_batch(dict.fromkeys(self.modalities, 0.0), False, 1.0)
            return
        if self.lagged:
            q = dict(self._stored) if self._stored is not None else dict.fromkeys(self.modalities, 0.0)
            dims = self._seen_dims
        else:
            output, scores = self._pre_pass(trainer, pl_module, batch)
            q = _opm_probability_compute(scores, self.q_base, self.lam)
            dims = _feature_widths(output, self.modalities)
        theta = opm_theta(q, self.feature_dims or dims)
        self._announce(trainer, self.feature_dims or dims)
        micro_index = batch_idx % trainer.accumulate_grad_batches
        self._rng = opm_generator(self.seed, trainer.global_step, micro_index)
        self._world = (trainer.world_size, trainer.global_rank)
        executed = _opm_gate(self._rng, self.p_exe)
        self._q, self._theta = q, theta
        self._armed = executed and theta > 0
        self._record_micro_batch(q, executed, 1.0 / (1.0 - theta) if self._armed else 1.0)

    def _record_micro_batch(self, q: dict[str, float], executed: bool, scale: float) -> None:
        self._step_q.append(q)
        self._step_executed.append(executed)
        self._step_scale.append(scale)

    def _pre_pass(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any
    ) -> tuple[MultimodalOutput, dict[str, float]]:
        """The micro-batch's clean forward without gradients; its scores summed over ranks (one collective)."""
        device = pl_module.device
        with (
            torch.no_grad(),
            trainer.precision_plugin.train_step_context(),
            torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []),
            _norm_statistics_kept(self._norm_layers),
        ):
            output = run_forward(self.forward_fn, pl_module, batch)
        logits = [output.unimodal_logits[m] for m in self.modalities]
        local = _ogm_score_update(logits, output.targets).to(torch.float64)
        self._clean_scores = local
        self._batch_size = int(output.targets.shape[0])
        if trainer.world_size == 1:
            return output, dict(zip(self.modalities, local.tolist(), strict=True))
        row = torch.cat([local, torch.tensor([self._batch_size], dtype=torch.float64, device=local.device)])
        row = trainer.strategy.reduce(row, reduce_op="sum")
        return output, dict(zip(self.modalities, row[:-1].tolist(), strict=True))

    def _announce(self, trainer: pl.Trainer, dims: Mapping[str, int] | None) -> None:
        if self._announced:
            return
        self._announced = True
        mode = (
            "lagged (the previous step's scores)"
            if self.lagged
            else "current micro-batch's scores, from one forward without gradients per micro-batch"
        )
        rank_zero_info(
            f"OPM drops features from epoch {trainer.current_epoch}: q_base={self.q_base}, lam={self.lam}, "
            f"p_exe={self.p_exe}, feature widths {dict(dims) if dims else 'equal'} for theta, {mode}."
        )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Check that every armed hook fired; then add the micro-batch's statistics to the step's."""
        missing = [m for m in self.modalities if self._armed and m not in self._fired]
        if missing:
            raise RuntimeError(
                f"OPM: the encoders of {missing} did not run through their `__call__` in the training forward, so "
                "their features were not dropped (a direct `.forward(...)` call skips forward hooks, and so does a "
                "module compiled before OPM's `setup` registered its hooks). Call the encoders as `encoder(x)`, and "
                "compile inside the fit (`configure_model`) or compile the encoders themselves."
            )
        super().on_before_backward(trainer, pl_module, loss)

    def step_statistics(self, record: StepRecord) -> dict[str, Tensor] | None:
        """``score`` (the clean pre-pass scores in the window, else the recorded ones) and ``dropped`` counts."""
        if self.lagged:
            self._seen_dims = _feature_widths(record.output, self.modalities)
        if not self._wants_statistics:
            return None
        scores = self._clean_scores
        if scores is None:
            scores = _ogm_score_update(
                [record.output.unimodal_logits[m] for m in self.modalities], record.output.targets
            )
        device = record.output.targets.device
        dropped = torch.zeros(len(self.modalities), dtype=torch.float64, device=device)
        if self._armed and self._keep is not None:
            dropped += torch.stack([(~self._keep[m]).sum() for m in self.modalities]).to(dropped)
        return {"score": scores.to(device), "dropped": dropped}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Disarm the hooks."""
        self._reset_micro_batch()

    # ------------------------------------------------------------------ per optimizer step
    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        """Lagged mode: store the next step's drop probabilities. Log on logging steps."""
        step_q, executed, scales = self._step_q, self._step_executed, self._step_scale
        self._reset_step()
        if not stats.sums:
            return
        scores = dict(zip(self.modalities, stats["score"], strict=True))
        if self.lagged:
            self._stored = _opm_probability_compute(scores, self.q_base, self.lam)
        if not self.logs_this_step(trainer):
            return
        n = max(len(step_q), 1)
        values: dict[str, Mapping[str, float] | float] = {
            "score": dict(zip(self.modalities, stats.mean("score"), strict=True)),
            "ratio": _ogm_ratio_compute(scores),
            "drop_probability": {m: sum(q.get(m, 0.0) for q in step_q) / n for m in self.modalities},
            "dropped": dict(zip(self.modalities, stats.mean("dropped"), strict=True)),
            "executed": sum(executed) / n,
            "feature_scale": sum(scales) / n if scales else 1.0,
        }
        self.log_values(pl_module, values, cadence_checked=True)

    def discard_step(self) -> None:
        """A step the GradScaler skips: nothing stored (lagged mode keeps the previous drop probabilities)."""
        self._reset_step()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The lagged mode's stored drop probabilities and feature widths (the draws need nothing else)."""
        return {
            **super().state_dict(),
            "stored_drop_probabilities": None if self._stored is None else dict(self._stored),
            "feature_dims": None if self._seen_dims is None else dict(self._seen_dims),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stored drop probabilities and feature widths."""
        super().load_state_dict(state_dict)
        stored, dims = state_dict.get("stored_drop_probabilities"), state_dict.get("feature_dims")
        self._stored = None if stored is None else {m: float(q) for m, q in stored.items()}
        self._seen_dims = None if dims is None else {m: int(d) for m, d in dims.items()}


def _feature_widths(output: MultimodalOutput, modalities: tuple[str, ...]) -> dict[str, int] | None:
    """Per-sample size of each modality's ``features``, or None unless every modality has some."""
    if not all(m in output.features and output.features[m].ndim >= 1 for m in modalities):
        return None
    return {m: max(int(output.features[m][0].numel()), 1) for m in modalities}


@contextlib.contextmanager
def _norm_statistics_kept(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Restore the running statistics of the norm ``layers`` on exit (a pre-pass must not update them)."""
    saved = [
        (buffer, buffer.clone())
        for layer in layers
        for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        if isinstance(buffer, Tensor)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
