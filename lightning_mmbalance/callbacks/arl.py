"""The ARL callback: reinforce each encoder toward its inverse-variance share, plus unimodal losses.

The math is in :mod:`lightning_mmbalance.functional.arl`; this module wires it into Lightning's optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_mmbalance.callbacks.base import BalancingCallback, StepStatistics, add_loss_gradients
from lightning_mmbalance.contract import StepRecord
from lightning_mmbalance.functional.arl import _arl_compute, _arl_update
from lightning_mmbalance.utilities.checks import check_bool, check_float, check_int
from lightning_mmbalance.utilities.distributed import global_sums, local, squared_norm

__all__ = ["ARL"]


class ARL(BalancingCallback):
    r"""ARL: scale each encoder's gradient by :math:`1 + a_m`, plus :math:`\gamma`-weighted unimodal losses.

    The coefficients ``a`` (summing to 1) come from each modality's contribution (the batch-mean L1 norm of its
    unimodal logits) and its ideal inverse-variance share (entropy as the variance proxy, normalised and floored),
    through a temperature softmax; see :func:`~lightning_mmbalance.functional.arl_coefficients`. The loss is
    :math:`L_f + \gamma \sum_m L_m` after warm-up and :math:`L_f + \sum_m L_m` during it, without scaling. The
    statistics are summed over the micro-batches of the step and over DDP ranks. The fusion head is never scaled.

    To reproduce the official unimodal logits use ``ConcatFusion(bias="whole")`` (the full bias in each unimodal
    logit). Official settings: CREMA-D ``gamma=4, temperature=8``; Kinetics-Sounds ``gamma=3, temperature=4``;
    AVE ``gamma=5, temperature=4``; all with ``warmup_epochs=6`` and global gradient clipping at 40
    (``Trainer(gradient_clip_val=40)``).

    Paper: Wei, Luo & Luo, "Improving Multimodal Learning via Imbalanced Learning", ICCV 2025 (arXiv 2507.10203);
    official code shicaiwei123/ICCV2025-ARL. Not the AAAI 2025 "Asymmetric Reinforcing against Multi-modal
    Representation Bias", a different method sometimes also called ARL.

    Args:
        gamma: weight of the unimodal losses after warm-up, float >= 0.
        temperature: softmax temperature ``T``, float >= 0.
        warmup_epochs: epochs ``0 .. warmup_epochs - 1`` are warm-up (unimodal weight 1, no scaling); 6 reproduces
            the official ``start=5``.
        entropy_floor: floor on the normalised entropy, in ``[0, 1)``.
        lagged: False uses the current step's coefficients (the paper); True reproduces the official code's
            one-step lag (the first post-warm-up step applies ``1/N`` each).
        modulate: ``"gradient"`` (faithful) or ``"update"`` (scale the encoder updates, for Adam-type optimizers).
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.

    Raises:
        ValueError: an argument outside the range above.
        TypeError: an argument of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import ARL

        trainer = Trainer(max_epochs=100, gradient_clip_val=40, callbacks=[ARL(gamma=4.0, temperature=8.0)])
        trainer.fit(model, datamodule=dm)  # model.training_step returns multimodal_loss(self, self(batch))
    """

    method = "arl"
    sets_loss_weights = True
    gradient_action = "scale"
    reports_step_ratio = True

    def __init__(
        self,
        gamma: float = 4.0,
        temperature: float = 4.0,
        warmup_epochs: int = 6,
        entropy_floor: float = 0.3,
        lagged: bool = False,
        modulate: str = "gradient",
        encoders: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(encoders=encoders, modulate=modulate)
        check_float("gamma", gamma, 0)
        check_float("temperature", temperature, 0)
        check_int("warmup_epochs", warmup_epochs, 0)
        check_float("entropy_floor", entropy_floor, 0, 1, max_open=True)
        check_bool("lagged", lagged)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.warmup_epochs = warmup_epochs
        self.entropy_floor = float(entropy_floor)
        self.lagged = lagged
        self._stored: dict[str, float] | None = None
        self._plain: list[Tensor] | None = None

    @property
    def state_key(self) -> str:
        """Distinguishes several ARL instances in one Trainer."""
        return self._generate_state_key(gamma=self.gamma, temperature=self.temperature, encoders=self._encoder_paths)

    def _in_warmup(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch < self.warmup_epochs

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """``L_f + gamma_eff * sum_m L_m`` with ``gamma_eff`` 1 during warm-up."""
        gamma = 1.0 if self._in_warmup(trainer) else self.gamma
        return {"fused": 1.0, **dict.fromkeys(self.modalities, gamma)}

    @property
    def needs_retained_graph(self) -> bool:
        """True: on logging steps the plain (fused-loss) gradient is taken before the backward, for ``step_ratio``."""
        return True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Add the micro-batch's statistics; on logging steps, also its fused-loss gradient on the encoders."""
        record = self.take_record(pl_module)
        self._accumulate(record)
        if self.logs_this_step(trainer):
            params = [p for m in self.modalities for p in self.encoder_parameters(m)]
            if self._plain is None:
                self._plain = [torch.zeros_like(local(p)) for p in params]  # a rank's shards under FSDP2
            add_loss_gradients(trainer, record.fused_loss, params, self._plain, self.encoder_outputs())

    def step_statistics(self, record: StepRecord) -> dict[str, Tensor]:
        """Each modality's summed L1 norm of the unimodal logits and summed prediction entropy."""
        return _arl_update([record.output.unimodal_logits[m] for m in self.modalities])

    def discard_step(self) -> None:
        """Forget the skipped step's plain gradient."""
        self._plain = None

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        """Compute the step's coefficients and scale each encoder's gradient (or update) by ``1 + a_m``."""
        plain, self._plain = self._plain, None
        ratios = self._step_ratios(trainer, plain) if plain is not None else None
        n = len(self.modalities)
        state = _arl_compute(stats["abs_logit"], stats["entropy"], stats.count, self.temperature, self.entropy_floor)
        current = dict(zip(self.modalities, state.coefficient, strict=True))
        applied = dict.fromkeys(self.modalities, 0.0)
        if not self._in_warmup(trainer):
            if self.lagged:
                applied = self._stored if self._stored is not None else dict.fromkeys(self.modalities, 1.0 / n)
                self._stored = current
            else:
                applied = current
            self._scale_encoders(applied)
        self.log_values(
            pl_module,
            {
                "contribution": dict(zip(self.modalities, state.contribution, strict=True)),
                "entropy": dict(zip(self.modalities, state.entropy, strict=True)),
                "ideal_share": dict(zip(self.modalities, state.ideal_share, strict=True)),
                "coefficient": applied,
            },
        )
        if ratios is not None:
            self.report_step_ratio(trainer, pl_module, {m: (1.0 + applied[m]) * r for m, r in ratios.items()})

    def _step_ratios(self, trainer: pl.Trainer, plain: list[Tensor]) -> dict[str, float]:
        """``||grad of ARL's loss|| / ||grad of L_f||`` per encoder, before ARL's ``1 + a_m`` (synchronised)."""
        if trainer.world_size > 1 and not self.sharded:  # DDP averages .grad over the ranks: do the same here
            flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in plain]), reduce_op="mean")
            plain = list(torch.split(flat, [g.numel() for g in plain]))
        device = trainer.strategy.root_device
        norms, offset = [], 0
        for m in self.modalities:
            params = self.encoder_parameters(m)
            grads = [p.grad for p in params if p.grad is not None]
            norms += [squared_norm(grads, device), squared_norm(plain[offset : offset + len(params)], device)]
            offset += len(params)
        values = global_sums(trainer, torch.stack(norms), self.sharded)
        squares = {m: values[2 * i : 2 * i + 2] for i, m in enumerate(self.modalities)}
        self.check_finite(trainer, "the norms of its encoder gradients (with and without the unimodal losses)", squares)
        return {
            m: math.sqrt(values[2 * i] / values[2 * i + 1]) if values[2 * i + 1] > 0 else 1.0
            for i, m in enumerate(self.modalities)
        }

    def _scale_encoders(self, coefficients: Mapping[str, float]) -> None:
        for m in self.modalities:
            factor = 1.0 + coefficients[m]
            if self.modulate == "update":
                params = [p for p in self.encoder_parameters(m) if p.grad is not None]
                self.scale_update_after_step(params, [factor] * len(params))
            else:
                grads = self.encoder_gradients(m)
                if grads:
                    torch._foreach_mul_(grads, factor)

    def state_dict(self) -> dict[str, Any]:
        """The stored (lagged) coefficients; None before the first post-warm-up step."""
        return {**super().state_dict(), "stored_coefficients": None if self._stored is None else dict(self._stored)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stored coefficients."""
        super().load_state_dict(state_dict)
        stored = state_dict.get("stored_coefficients")
        self._stored = None if stored is None else dict(stored)
