"""The uniform baseline: the fused loss plus every unimodal loss, with weight 1 each."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_mmbalance.callbacks.base import BalancingCallback

__all__ = ["UnimodalLosses"]


class UnimodalLosses(BalancingCallback):
    """Train on ``L_f + sum_m L_m``, and change nothing else: the uniform baseline of MMPareto's paper.

    It is the reference the loss-weighting methods should beat: MMPareto's ``uniform_baseline.py`` (Wei & Hu,
    ICML 2024) and the "naive" multi-task baseline of Gradient Blending (Wang, Tran & Feiszli, CVPR 2020).

    Args:
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance.callbacks import UnimodalLosses

        Trainer(max_epochs=30, callbacks=[UnimodalLosses()]).fit(model, datamodule=dm)
    """

    method = "uniform"
    sets_loss_weights = True

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Weight 1 for the fused and every unimodal loss."""
        return {"fused": 1.0, **dict.fromkeys(self.modalities, 1.0)}
