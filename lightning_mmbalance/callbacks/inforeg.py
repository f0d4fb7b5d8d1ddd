"""The InfoReg callback: a proximal pull on the leading modality's encoder during its prime learning window.

The math is in :mod:`lightning_mmbalance.functional.inforeg`; this module keeps the per-epoch state (the trace
history and the window, the epoch-start anchors, the running trace) and wires the pull into Lightning's optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_mmbalance.callbacks.base import BalancingCallback, StepStatistics
from lightning_mmbalance.contract import StepRecord
from lightning_mmbalance.functional.inforeg import (
    TRACE_REDUCTIONS,
    _inforeg_coefficient_compute,
    _inforeg_gap_compute,
    _inforeg_growth_compute,
    _inforeg_trace_update,
    _resolve_scale,
)
from lightning_mmbalance.functional.ogm_ge import _ogm_score_update
from lightning_mmbalance.utilities.checks import check_bool, check_choice, check_float, check_int
from lightning_mmbalance.utilities.distributed import distribute_like, full, local

__all__ = ["InfoReg"]

ParamFilter = str | Callable[[str, nn.Parameter], bool]

_FILTERS: dict[str, Callable[[str, nn.Parameter], bool]] = {
    "weights": lambda name, p: p.ndim >= 2,
    "all": lambda name, p: True,
}


class InfoReg(BalancingCallback):
    r"""InfoReg: slow the leading modality down during its prime learning window with a proximal pull.

    Once per optimizer step every modality is scored by the summed softmax probability its unimodal logits give to the
    true class (over the micro-batches of the step and the DDP ranks). A modality that scores higher than others
    (gap :math:`\Delta_m > 0`) and whose window is open gets :math:`\lambda_m (\theta - \theta_0)` added to its
    encoder's gradient, with :math:`\lambda_m = s_m e^{\beta \tanh \Delta_m}` and :math:`\theta_0` the encoder's
    weights at the start of the epoch. The window of an epoch is open when the relative growth of a moving average of
    the per-epoch Fisher-information traces (summed squared encoder gradients) exceeds ``threshold``. The loss is
    :math:`L_f + w \sum_m L_m`. ``docs/inforeg.md`` gives the rule, its N-modality form and the official settings.

    Paper: Huang, Wei, Yang & Hu, "Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition",
    CVPR 2025 (arXiv 2503.18595); official code GeWu-Lab/InfoReg_CVPR2025.

    Args:
        scale: :math:`s_m`: a float >= 0 for every modality, a sequence in modality order (extended with its last
            value), or a mapping modality -> float. The default is the official (0.95 first, 0.1 the others).
        sensitivity: :math:`\beta` of Eq. 16, float >= 0 (official 1, paper 0.9).
        threshold: the window opens when the trace growth ``k`` exceeds it, float < 1 (official 0.05, paper 0.04).
        window_size: epochs in the moving average of the traces, int >= 1 (official 10, paper 1).
        pad_history: precede the trace history with ``window_size`` zeros, which opens the window at the first epochs
            (official); False leaves the window closed until ``window_size + 1`` traces exist (paper).
        window_trace: whose trace decides the windows: ``"first"`` (the first modality's, official), ``"own"`` (each
            modality its own, paper) or a modality name.
        score_reduction: ``"sum"`` (scores summed over the effective batch, official) or ``"mean"``.
        trace_filter: which encoder tensors enter the trace: ``"weights"`` (ndim >= 2: the official conv and linear
            weights), ``"all"``, or a callable ``(name, parameter) -> bool``, ``name`` relative to the encoder.
        trace_reduction: ``"layer_mean"`` (each tensor's squared norm over its size, official) or ``"sum"``.
        trace_includes_regulation: the trace measures the gradient with the pull (official) or without it.
        unimodal_loss_weight: :math:`w`, float >= 0 (official 1; 0 is the paper's fused-loss-only setting).
        modulate: ``"gradient"`` adds the pull to the gradient (faithful); ``"update"`` subtracts
            ``lr * lambda * (theta - theta_0)`` from the parameters after the optimizer step, for Adam-type optimizers.
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.

    Raises:
        ValueError: an argument outside the range above (in ``__init__``); in ``setup``, a ``scale`` that does not fit
            the modalities, an unknown ``window_trace`` modality or a ``trace_filter`` that selects nothing.
        TypeError: an argument of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import InfoReg

        trainer = Trainer(max_epochs=50, callbacks=[InfoReg()])  # SGD(lr=2e-3, momentum=0.9, weight_decay=1e-4)
        trainer.fit(model, datamodule=dm)  # model.training_step returns multimodal_loss(self, self(batch))
    """

    method = "inforeg"
    gradient_action = "add"

    def __init__(
        self,
        scale: float | Sequence[float] | Mapping[str, float] = (0.95, 0.1),
        sensitivity: float = 1.0,
        threshold: float = 0.05,
        window_size: int = 10,
        pad_history: bool = True,
        window_trace: str = "first",
        score_reduction: str = "sum",
        trace_filter: ParamFilter = "weights",
        trace_reduction: str = "layer_mean",
        trace_includes_regulation: bool = True,
        unimodal_loss_weight: float = 1.0,
        modulate: str = "gradient",
        encoders: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(encoders=encoders, modulate=modulate)
        self.scale = _checked_scale(scale)
        check_float("sensitivity", sensitivity, 0)
        check_float("threshold", threshold, maximum=1, max_open=True)
        check_int("window_size", window_size, 1)
        check_bool("pad_history", pad_history)
        if not isinstance(window_trace, str):
            raise TypeError(f"`window_trace` must be 'first', 'own' or a modality name, got {window_trace!r}.")
        check_choice("score_reduction", score_reduction, ("sum", "mean"))
        if not callable(trace_filter):
            check_choice("trace_filter", trace_filter, tuple(_FILTERS))
        check_choice("trace_reduction", trace_reduction, TRACE_REDUCTIONS)
        check_bool("trace_includes_regulation", trace_includes_regulation)
        check_float("unimodal_loss_weight", unimodal_loss_weight, 0)
        self.sensitivity = float(sensitivity)
        self.threshold = float(threshold)
        self.window_size = window_size
        self.pad_history = pad_history
        self.window_trace = window_trace
        self.score_reduction = score_reduction
        self.trace_filter = trace_filter
        self.trace_reduction = trace_reduction
        self.trace_includes_regulation = trace_includes_regulation
        self.unimodal_loss_weight = float(unimodal_loss_weight)
        self.sets_loss_weights = self.unimodal_loss_weight > 0
        self._filter = _FILTERS[trace_filter] if isinstance(trace_filter, str) else trace_filter
        self._scales: dict[str, float] = {}
        self._traced_names: dict[str, set[str]] = {}
        self._named: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._traced: dict[str, list[nn.Parameter]] = {}
        self._groups: dict[int, dict[str, Any]] = {}
        self._strategy: Any = None
        self._history: dict[str, list[float]] = {}
        self._window_cache: tuple[int, dict[str, float | None], dict[str, bool]] | None = None
        self._trace_epoch: int | None = None
        self._trace_base: dict[str, float] = {}
        self._running: Tensor | None = None
        self._anchor_epoch: int | None = None
        self._anchors: dict[str, list[Tensor]] = {}
        self._saved_anchors: dict[str, dict[str, Tensor]] | None = None
        self._pulls: list[tuple[list[Tensor], list[Tensor]]] = []
        self._deltas: dict[str, list[Tensor]] = {}

    @property
    def state_key(self) -> str:
        """Distinguishes several InfoReg instances in one Trainer."""
        return self._generate_state_key(
            scale=self.scale,
            sensitivity=self.sensitivity,
            threshold=self.threshold,
            window_size=self.window_size,
            encoders=self._encoder_paths,
        )

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the encoders, the per-modality scales, the window's trace and the traced tensors."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        try:
            self._scales = _resolve_scale(self.scale, self.modalities)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from err
        if self.window_trace not in ("first", "own", *self.modalities):
            raise ValueError(
                f"{self.name}: `window_trace` must be 'first', 'own' or one of the modalities {list(self.modalities)}, "
                f"got {self.window_trace!r}."
            )
        for modality, encoder in self._encoders.items():
            names = {name for name, p in encoder.named_parameters() if self._filter(name, p)}
            if not names:
                raise ValueError(
                    f"{self.name}: `trace_filter={self.trace_filter!r}` selects no tensor of the {modality!r} encoder "
                    f"({type(encoder).__name__}). Use `trace_filter='all'`."
                )
            self._traced_names[modality] = names
        self._strategy = trainer.strategy if self.sharded and trainer.world_size > 1 else None
        self._history = {m: self._history.get(m, []) for m in self.modalities}
        rank_zero_info(f"{self.name} scales: " + ", ".join(f"{m} {s:g}" for m, s in self._scales.items()))

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """``L_f + w * sum_m L_m`` (None when ``w = 0``: the loss is left to another callback)."""
        if not self.sets_loss_weights:
            return None
        return {"fused": 1.0, **dict.fromkeys(self.modalities, self.unimodal_loss_weight)}

    def adaptive_optimizer_message(self, optimizer: str) -> str:
        """The gradient-mode warning for an adaptive optimizer: it rescales the pull."""
        return (
            f"{self.name} adds its proximal pull to the gradients, but {optimizer} normalises gradient magnitudes, so "
            f"the pull's strength is no longer lambda * lr. Pass `modulate='update'` to {self.name} to apply the pull "
            "to the parameters after the optimizer step instead."
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect each encoder's trained parameters (named, for the anchors) and the traced ones."""
        super().on_train_start(trainer, pl_module)
        self._groups = {id(p): g for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        for m, encoder in self._encoders.items():
            trained = {id(p) for p in self.encoder_parameters(m)}
            self._named[m] = [(n, p) for n, p in encoder.named_parameters() if id(p) in trained]
            self._traced[m] = [p for n, p in self._named[m] if n in self._traced_names[m]]

    # ------------------------------------------------------------------ epochs: window, anchors, traces
    def _window(self, epoch: int) -> tuple[dict[str, float | None], dict[str, bool]]:
        """The growth ``k`` deciding each modality's window this epoch and whether it is open (cached per epoch)."""
        if self._window_cache is None or self._window_cache[0] != epoch:
            growth = {
                m: _inforeg_growth_compute(h, self.window_size, self.pad_history) for m, h in self._history.items()
            }
            deciding = self.modalities[0] if self.window_trace == "first" else self.window_trace
            k = {m: growth[m if deciding == "own" else deciding] for m in self.modalities}
            is_open = {m: v is not None and v > self.threshold for m, v in k.items()}
            self._window_cache = (epoch, k, is_open)
        return self._window_cache[1], self._window_cache[2]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finish a trace left from an earlier epoch, drop old anchors, decide and log this epoch's windows."""
        epoch = trainer.current_epoch
        if self._trace_epoch is not None and self._trace_epoch < epoch:
            self._finish_trace()
        if self._anchor_epoch is not None and self._anchor_epoch != epoch:
            self._drop_anchors()
        if self._trace_epoch is None:
            self._trace_epoch = epoch
        growth, is_open = self._window(epoch)
        values: dict[str, Mapping[str, float]] = {"window": {m: float(v) for m, v in is_open.items()}}
        defined = {m: v for m, v in growth.items() if v is not None}
        if defined:
            values["growth"] = defined
        self.log_values(pl_module, values, on_step=False)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Take the epoch-start weights of the encoders that may be regulated (restored ones after a resume)."""
        epoch = trainer.current_epoch
        if self._anchor_epoch == epoch and self._saved_anchors is None:
            return
        if self._anchor_epoch == epoch and self._saved_anchors is not None:
            saved = self._saved_anchors
            self._anchors = {m: [distribute_like(saved[m][n], p) for n, p in self._named[m]] for m in saved}
        else:
            _, is_open = self._window(epoch)
            wanted = [m for m in self.modalities if is_open[m] and self._scales[m] > 0]
            self._anchors = {m: [p.detach().clone() for _, p in self._named[m]] for m in wanted}
        self._saved_anchors = None
        self._anchor_epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Append the epoch's traces to the history, log them, and free the anchors."""
        if self._trace_epoch == trainer.current_epoch:
            traces = self._finish_trace()
            self.check_finite(trainer, "its Fisher-information traces", traces, f"in epoch {trainer.current_epoch}")
            self.log_values(pl_module, {"trace": traces}, on_step=False)
        self._drop_anchors()
        super().on_train_epoch_end(trainer, pl_module)

    def _drop_anchors(self) -> None:
        self._anchors, self._saved_anchors, self._anchor_epoch, self._deltas = {}, None, None, {}

    def _epoch_trace(self) -> dict[str, float]:
        """The running epoch's traces, global (one collective under FSDP2, one device-to-host copy)."""
        running = self._running
        if running is None:
            return {m: self._trace_base.get(m, 0.0) for m in self.modalities}
        if self._strategy is not None:
            running = self._strategy.reduce(running, reduce_op="sum")
        return {m: self._trace_base.get(m, 0.0) + v for m, v in zip(self.modalities, running.tolist(), strict=True)}

    def _finish_trace(self) -> dict[str, float]:
        traces = self._epoch_trace()
        for m, value in traces.items():
            self._history[m].append(value)
        self._trace_epoch, self._trace_base, self._running = None, {}, None
        return traces

    # ------------------------------------------------------------------ the optimizer step
    def step_statistics(self, record: StepRecord) -> dict[str, Tensor]:
        """The summed true-class probability of each modality."""
        logits = [record.output.unimodal_logits[m] for m in self.modalities]
        return {"score": _ogm_score_update(logits, record.output.targets)}

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        """Compute the coefficients, add the pull (or schedule it), and add the step's trace terms."""
        self._pulls = []
        sums = dict(zip(self.modalities, stats["score"], strict=True))
        divisor = max(stats.count, 1.0) if self.score_reduction == "mean" else 1.0
        gaps = _inforeg_gap_compute({m: s / divisor for m, s in sums.items()})
        coefficients = _inforeg_coefficient_compute(
            gaps, self._window(trainer.current_epoch)[1], self._scales, self.sensitivity
        )
        traced = {m: [p for p in self._traced[m] if p.grad is not None] for m in self.modalities}
        grads: dict[str, list[Tensor]] = {
            m: [local(p.grad) for p in ps if p.grad is not None] for m, ps in traced.items()
        }
        device = trainer.strategy.root_device
        if not self.trace_includes_regulation:
            terms = self._trace_terms(traced, grads, device)
        for m, coefficient in coefficients.items():
            if coefficient > 0:
                grads[m] = self._pull(m, coefficient, traced[m], grads[m])
        if self.trace_includes_regulation:
            terms = self._trace_terms(traced, grads, device)
        self._running = terms if self._running is None else self._running + terms
        if self.logs_this_step(trainer):
            means = {m: s / max(stats.count, 1.0) for m, s in sums.items()}
            values = {"score": means, "gap": gaps, "coefficient": coefficients}
            self.log_values(pl_module, values, cadence_checked=True)

    def _trace_terms(
        self, traced: Mapping[str, list[nn.Parameter]], grads: Mapping[str, list[Tensor]], device: torch.device
    ) -> Tensor:
        """``(M,)`` float64 trace terms of the step (a rank's partial sums under FSDP2)."""
        terms = [
            _inforeg_trace_update(grads[m], [p.numel() for p in traced[m]], self.trace_reduction, device)
            for m in self.modalities
        ]
        return torch.stack(terms)

    def _pull(
        self, modality: str, coefficient: float, traced: list[nn.Parameter], traced_grads: list[Tensor]
    ) -> list[Tensor]:
        """Add ``coefficient * (theta - theta_0)`` to the gradients (or schedule ``lr`` times it: update mode).

        Returns the traced gradients as the trace sees them.
        """
        named, anchors = self._named[modality], self._anchors[modality]
        index = [i for i, (_, p) in enumerate(named) if p.grad is not None]
        if not index:
            return traced_grads
        params = [local(named[i][1].detach()) for i in index]
        origins = [local(anchors[i]) for i in index]
        if self.modulate == "gradient":  # g + lambda * theta - lambda * theta_0: two passes, no temporary tensors
            grads = [local(g) for i in index if (g := named[i][1].grad) is not None]
            torch._foreach_add_(grads, params, alpha=coefficient)
            torch._foreach_add_(grads, origins, alpha=-coefficient)
            return traced_grads
        if modality not in self._deltas:  # reused at every step of the epoch
            self._deltas[modality] = [torch.empty_like(local(a)) for a in anchors]
        deltas = [self._deltas[modality][i] for i in index]
        torch._foreach_copy_(deltas, params)
        torch._foreach_sub_(deltas, origins)
        if self.trace_includes_regulation:
            position = {id(named[i][1]): k for k, i in enumerate(index)}
            traced_grads = list(
                torch._foreach_add(traced_grads, [deltas[position[id(p)]] for p in traced], alpha=coefficient)
            )
        torch._foreach_mul_(deltas, [coefficient * float(self._groups[id(named[i][1])]["lr"]) for i in index])
        self._pulls.append((params, deltas))
        return traced_grads

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Update mode: apply the pulls scheduled at this step, after the optimizer step."""
        pulls, self._pulls = self._pulls, []
        with torch.no_grad():
            for params, deltas in pulls:
                torch._foreach_sub_(params, deltas)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The trace history, the running epoch trace and the epoch-start anchors (gathered: a collective)."""
        anchors = self._saved_anchors
        if self._anchors:
            anchors = {
                m: {n: full(a).detach().cpu() for (n, _), a in zip(self._named[m], tensors, strict=True)}
                for m, tensors in self._anchors.items()
            }
        return {
            **super().state_dict(),
            "history": {m: list(h) for m, h in self._history.items()},
            "trace_epoch": self._trace_epoch,
            "epoch_trace": self._epoch_trace() if self._trace_epoch is not None else {},
            "anchor_epoch": self._anchor_epoch,
            "anchors": anchors,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history, the running trace and the anchors, so a resumed run continues exactly."""
        super().load_state_dict(state_dict)
        self._history = {m: list(h) for m, h in state_dict["history"].items()}
        self._trace_epoch = state_dict["trace_epoch"]
        self._trace_base, self._running = dict(state_dict["epoch_trace"]), None
        self._anchor_epoch = state_dict["anchor_epoch"]
        self._anchors, self._saved_anchors = {}, state_dict["anchors"]
        self._window_cache = None


def _checked_scale(scale: Any) -> float | tuple[float, ...] | dict[str, float]:
    """``scale`` validated (values finite and >= 0) and copied: a float, a tuple or a dict."""
    if isinstance(scale, Mapping):
        for key, value in scale.items():
            if not isinstance(key, str):
                raise TypeError(f"`scale` keys must be modality names (str), got {key!r}.")
            check_float(f"scale[{key!r}]", value, 0)
        return {k: float(v) for k, v in scale.items()}
    if isinstance(scale, Sequence) and not isinstance(scale, str):
        if not scale:
            raise ValueError("`scale` must hold at least one value, got an empty sequence.")
        for i, value in enumerate(scale):
            check_float(f"scale[{i}]", value, 0)
        return tuple(float(v) for v in scale)
    check_float("scale", scale, 0)
    return float(scale)
