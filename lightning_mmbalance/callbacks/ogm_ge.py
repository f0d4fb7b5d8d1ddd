"""The OGM-GE callback: damp the dominant modality's encoder gradient on the fly, plus generalisation noise.

The math is in :mod:`lightning_mmbalance.functional.ogm_ge`; this module wires it into Lightning's optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_mmbalance.callbacks.base import BalancingCallback, StepStatistics, in_window
from lightning_mmbalance.contract import StepRecord
from lightning_mmbalance.functional.ogm_ge import (
    TIE_RULES,
    _ogm_coefficient_compute,
    _ogm_noise_seed,
    _ogm_ratio_compute,
    _ogm_score_update,
)
from lightning_mmbalance.utilities.checks import check_bool, check_choice, check_float, check_int, check_window
from lightning_mmbalance.utilities.distributed import distribute_like, global_sums, local, squared_norm

__all__ = ["OGMGE"]

ParamFilter = str | Callable[[str, nn.Parameter], bool]

_FILTERS: dict[str, Callable[[str, nn.Parameter], bool]] = {
    "conv": lambda name, p: p.ndim == 4,
    "weights": lambda name, p: p.ndim >= 2,
    "all": lambda name, p: True,
}


class OGMGE(BalancingCallback):
    r"""On-the-fly Gradient Modulation with Generalisation Enhancement (OGM-GE).

    Once per optimizer step the callback scores every modality by the summed softmax probability its unimodal logits
    give to the true class (summed over the micro-batches of the step and over DDP ranks), damps the encoder
    gradient of the dominant modality by :math:`k = 1 - \tanh(\alpha\rho)`, and, with ``noise=True``, adds Gaussian
    noise with the standard deviation of each unmodulated gradient tensor to the selected tensors of every modality.
    The loss is left as the fused loss. ``docs/ogm_ge.md`` gives the exact rule and how it extends to more than two
    modalities.

    Paper: Peng, Wei, Deng, Wang & Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022
    (arXiv 2203.15332); official code GeWu-Lab/OGM-GE_CVPR2022.

    Args:
        alpha: modulation strength, float >= 0. The official README uses 0.1; 0.8 is recommended for CREMA-D.
        modulation_starts: first modulated epoch (0-indexed, inclusive).
        modulation_ends: last modulated epoch (inclusive), or None for no end. The official run modulates
            epochs 0-50 of 100.
        noise: True for OGM-GE (the GE noise), False for plain OGM.
        param_filter: which encoder tensors are modulated: ``"conv"`` (4-D kernels, the official choice),
            ``"weights"`` (every tensor with ndim >= 2, for MLP/Transformer encoders), ``"all"``, or a callable
            ``(name, parameter) -> bool`` with ``name`` relative to the encoder.
        modulate: ``"gradient"`` scales the gradient (faithful); ``"update"`` scales the parameter update after the
            optimizer step, which survives Adam-type optimizers.
        seed: seed of the noise generator, int in ``[0, 2**31)``; the stream is a function of (seed, global step),
            identical on every rank and exact on resume.
        tie: which modality a tie (all scores equal) damps: ``"first"`` (the CVPR code) or ``"last"`` (the T-PAMI
            2024 journal code, whose OGM configuration is ``OGMGE(alpha=0.8, modulation_starts=6,
            modulation_ends=60, tie="last", param_filter="conv")``).
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.

    Raises:
        ValueError: an argument outside the range above (in ``__init__``), or a ``param_filter`` that selects no
            tensor of an encoder (in ``setup``).
        TypeError: an argument of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import OGMGE

        trainer = Trainer(max_epochs=100, callbacks=[OGMGE(alpha=0.8, modulation_ends=50, param_filter="conv")])
        trainer.fit(model, datamodule=dm)  # model.training_step returns multimodal_loss(self, self(batch))
    """

    method = "ogm_ge"
    gradient_action = "scale"
    reports_step_ratio = True

    def __init__(
        self,
        alpha: float = 0.1,
        modulation_starts: int = 0,
        modulation_ends: int | None = None,
        noise: bool = True,
        param_filter: ParamFilter = "weights",
        modulate: str = "gradient",
        seed: int = 0,
        tie: str = "first",
        encoders: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(encoders=encoders, modulate=modulate)
        check_float("alpha", alpha, 0)
        check_window(modulation_starts, modulation_ends)
        check_bool("noise", noise)
        if not callable(param_filter):
            check_choice("param_filter", param_filter, tuple(_FILTERS))
        check_int("seed", seed, 0, 2**31)
        check_choice("tie", tie, TIE_RULES)
        self.alpha = float(alpha)
        self.modulation_starts = modulation_starts
        self.modulation_ends = modulation_ends
        self.noise = noise
        self.param_filter = param_filter
        self.seed = seed
        self.tie = tie
        self._filter = _FILTERS[param_filter] if isinstance(param_filter, str) else param_filter
        self._selected_names: dict[str, list[str]] = {}
        self._selected: dict[str, list[nn.Parameter]] = {}
        self._unselected: dict[str, list[nn.Parameter]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def state_key(self) -> str:
        """Distinguishes several OGMGE instances in one Trainer."""
        filt = (
            self.param_filter if isinstance(self.param_filter, str) else getattr(self.param_filter, "__qualname__", "")
        )
        tie = {"tie": self.tie} if self.tie != "first" else {}  # the default keeps the keys of older checkpoints
        return self._generate_state_key(alpha=self.alpha, param_filter=filt, encoders=self._encoder_paths, **tie)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the encoders and select the modulated tensors of each (an error if one selects nothing)."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._selected_names = {}
        for modality, encoder in self._encoders.items():
            names = [name for name, p in encoder.named_parameters() if self._filter(name, p)]
            if not names:
                raise ValueError(
                    f"OGMGE: `param_filter={self.param_filter!r}` selects no tensor of the {modality!r} encoder "
                    f"({type(encoder).__name__}). Use `param_filter='weights'` (every tensor with ndim >= 2) or 'all'."
                )
            self._selected_names[modality] = names
        summary = ", ".join(
            f"{m}: {len(names)} tensors, "
            f"{sum(p.numel() for n, p in self._encoders[m].named_parameters() if n in set(names)):,} elements"
            for m, names in self._selected_names.items()
        )
        rank_zero_info(f"OGMGE modulates {summary}.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect the selected tensors that the optimizer trains."""
        super().on_train_start(trainer, pl_module)
        for modality, encoder in self._encoders.items():
            optimised = {id(p) for p in self.encoder_parameters(modality)}
            wanted = set(self._selected_names[modality])
            self._selected[modality] = [p for n, p in encoder.named_parameters() if n in wanted and id(p) in optimised]
            chosen = {id(p) for p in self._selected[modality]}
            self._unselected[modality] = [p for p in self.encoder_parameters(modality) if id(p) not in chosen]

    def step_statistics(self, record: StepRecord) -> dict[str, Tensor]:
        """The summed true-class probability of each modality."""
        logits = [record.output.unimodal_logits[m] for m in self.modalities]
        return {"score": _ogm_score_update(logits, record.output.targets)}

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        """Damp the dominant encoder's gradient (inside the modulation window) and add the noise."""
        scores = dict(zip(self.modalities, stats["score"], strict=True))
        ratios = _ogm_ratio_compute(scores)
        coefficients = _ogm_coefficient_compute(ratios, self.alpha, self.tie)
        applied = dict.fromkeys(self.modalities, 1.0)
        logging = self.logs_this_step(trainer)
        before = self._squared_norms(pl_module.device) if logging else None
        if in_window(trainer.current_epoch, self.modulation_starts, self.modulation_ends):
            applied = coefficients
            self._apply(trainer, pl_module, coefficients)
        if logging and before is not None:
            score_means = dict(zip(self.modalities, stats.mean("score"), strict=True))
            values = {"score": score_means, "ratio": ratios, "coefficient": applied}
            self.log_values(pl_module, values, cadence_checked=True)
            self.report_step_ratio(trainer, pl_module, self._step_ratios(trainer, before, applied))

    def _squared_norms(self, device: torch.device) -> Tensor:
        """Per modality, the local squared norms of the selected and of the other encoder gradients: ``(M, 2)``."""
        rows = []
        for m in self.modalities:
            pair = [
                squared_norm([p.grad for p in params if p.grad is not None], device)
                for params in (self._selected[m], self._unselected[m])
            ]
            rows.append(torch.stack(pair))
        return torch.stack(rows)

    def _step_ratios(self, trainer: pl.Trainer, before: Tensor, coefficients: Mapping[str, float]) -> dict[str, float]:
        """Norm of each encoder's gradient after the callback (its effective update, in update mode) over before."""
        after = self._squared_norms(before.device)[:, 0]
        values = global_sums(trainer, torch.cat([before.flatten(), after]), self.sharded)
        n = len(self.modalities)
        norms = {m: [values[2 * i], values[2 * i + 1], values[2 * n + i]] for i, m in enumerate(self.modalities)}
        self.check_finite(trainer, "the norms of its encoder gradients", norms)
        ratios = {}
        for i, m in enumerate(self.modalities):
            selected, others, selected_after = values[2 * i], values[2 * i + 1], values[2 * n + i]
            if self.modulate == "update":  # the update of the selected tensors is scaled by k after the step
                selected_after *= coefficients[m] ** 2
            total = selected + others
            ratios[m] = math.sqrt((selected_after + others) / total) if total > 0 else 1.0
        return ratios

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, coefficients: Mapping[str, float]) -> None:
        generator = self._generator(pl_module.device, trainer.global_step) if self.noise else None
        for modality in self.modalities:
            params = [p for p in self._selected[modality] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params if p.grad is not None]
            k = coefficients[modality]
            stds = [_unbiased_std(g) for g in grads] if generator is not None else None
            if self.modulate == "gradient" and k != 1.0:
                torch._foreach_mul_(grads, k)
            if stds is not None:
                for g, std in zip(grads, stds, strict=True):
                    # The whole tensor's draw, then this rank's shard of it: the same noise with any number of ranks.
                    noise = torch.randn(g.shape, generator=generator, device=local(g).device, dtype=g.dtype)
                    local(g).add_(local(distribute_like(noise, g)).mul_(local(std).to(g.dtype)))
            if self.modulate == "update":
                self.scale_update_after_step(params, [k] * len(params))

    def _generator(self, device: torch.device, global_step: int) -> torch.Generator:
        """A generator on ``device`` seeded from ``(seed, global_step)``: the same stream on every rank, and on resume.

        The seed is a 63-bit hash whose low 32 bits differ for every ``(seed, global_step)``: torch's CPU generator
        keeps only those bits, so ``seed * 2**32 + global_step`` would draw the same noise for every ``seed``.
        """
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(_ogm_noise_seed(self.seed, global_step))


def _unbiased_std(grad: Tensor) -> Tensor:
    """The GE noise scale: unbiased std of the unmodulated gradient + 1e-8 (1e-8 for one element).

    Computed in at least float32: half-precision gradients are upcast, float64 ones keep their precision. For a
    sharded gradient it is the std of the whole tensor (a replicated ``DTensor``).
    """
    if grad.numel() < 2:
        return torch.full((), 1e-8, dtype=torch.float32, device=local(grad).device)
    return (grad if grad.dtype == torch.float64 else grad.float()).std() + 1e-8
