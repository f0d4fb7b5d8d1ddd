"""The AGM callback: modulate each modality's gradient by how its Shapley-style response compares with its history.

The math is in :mod:`lightning_mmbalance.functional.agm`; this module runs the masked forwards and wires the rule
into Lightning's backward and optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_mmbalance.callbacks.base import (
    BalancingCallback,
    StepStatistics,
    in_window,
    loss_scale,
)
from lightning_mmbalance.callbacks.heldout import eval_mode
from lightning_mmbalance.contract import ForwardFn, StepRecord
from lightning_mmbalance.functional.agm import (
    _agm_score_update,
    _response_matrix,
    agm_coefficients,
    agm_masked_coalitions,
    agm_ratios,
    agm_update_running,
)
from lightning_mmbalance.masking import masked_forward
from lightning_mmbalance.utilities.checks import check_callable, check_choice, check_float, check_window
from lightning_mmbalance.utilities.distributed import global_sums, squared_norm

__all__ = ["AGM", "MASKED_GRAPHS"]

MASKED_GRAPHS = ("head", "full", "none")
"""How far the masked forwards keep their autograd graphs: through the fusion head, the whole model, or not at all."""


class AGM(BalancingCallback):
    r"""Adaptive Gradient Modulation (AGM): scale each modality's gradient by how its response compares with its past.

    Per micro-batch the callback runs the module ``2^N - 2`` more times, in eval mode, with the encoder outputs of the
    modalities outside each proper subset zeroed (:func:`~lightning_mmbalance.masked_forward`), and forms each
    modality's mono-modal response :math:`m_m`, its Shapley share of the fused logits (the responses sum to them). A
    modality's score is the mean capped cross-entropy of :math:`m_m`, summed over the step's micro-batches and DDP
    ranks. With :math:`r_m = \exp(\frac{N}{N-1}(\bar s - s_m))` and :math:`\bar r_m` the same ratio of the running
    (cumulative mean) scores, the coefficient :math:`k_m = \exp(\alpha \min(\bar r_m - r_m, cap))` scales the gradient
    of encoder ``m``: a modality that is relatively stronger than its running average is damped. The shared
    parameters (the fusion head) get :math:`\bar k` times their gradient plus the masked passes' share
    :math:`\sum_m k_m \nabla \langle g, R_m \rangle`, which is exactly the official backward for a linear head. The
    loss stays the fused loss. ``docs/agm.md`` gives the exact rule and its deviations from the official code.

    Paper: Li, Li, Hu, Lei, Li & Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation",
    ICCV 2023 (arXiv 2308.07686); official code lihongcs/AGM.

    Args:
        alpha: modulation strength, float >= 0 (0 disables modulation). Authors: CREMA-D 1.5, AV-MNIST 2.5,
            UR-Funny 4 (late fusion) or 6 (early fusion).
        modulation_starts: first modulated epoch (0-indexed, inclusive).
        modulation_ends: last modulated epoch (inclusive), or None for no end (the authors' settings).
        cap: upper bound on :math:`\bar r_m - r_m`, float > 0, or None for none (10 CREMA-D, 7 UR-Funny).
        masked_graph: ``"head"`` keeps the masked forwards' graphs through the fusion head only (encoder outputs
            detached); ``"full"`` keeps them through the whole model (the official backward, at its cost); ``"none"``
            runs them without graphs (the head's per-modality weights then get :math:`\bar k`).
        head_grad_clip: if a gradient entry of a shared parameter with ndim >= 2 exceeds this, clip the norm of all
            gradients to it (the official conditional clip: 1.0 CREMA-D and AV-MNIST, 5.0 UR-Funny); None disables it.
        modulate: ``"gradient"`` (faithful) or ``"update"`` (scale the parameter updates, for Adam-type optimizers).
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.
        forward_fn: ``(module, batch) -> MultimodalOutput`` for the masked forwards; None = ``module(batch)``.

    Raises:
        ValueError: an argument outside the ranges above.
        TypeError: an argument of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import AGM

        trainer = Trainer(max_epochs=100, callbacks=[AGM(alpha=1.5)])
        trainer.fit(model, datamodule=dm)  # model.training_step returns multimodal_loss(self, self(batch))
    """

    method = "agm"
    gradient_action = "replace"
    requires_unimodal_logits = False
    reports_step_ratio = True
    tensor_statistics = frozenset({"correction"})

    def __init__(
        self,
        alpha: float = 1.5,
        modulation_starts: int = 0,
        modulation_ends: int | None = None,
        cap: float | None = 10.0,
        masked_graph: str = "head",
        head_grad_clip: float | None = 1.0,
        modulate: str = "gradient",
        encoders: Mapping[str, str] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__(encoders=encoders, modulate=modulate)
        check_float("alpha", alpha, 0)
        check_window(modulation_starts, modulation_ends)
        if cap is not None:
            check_float("cap", cap, 0, min_open=True)
        check_choice("masked_graph", masked_graph, MASKED_GRAPHS)
        if head_grad_clip is not None:
            check_float("head_grad_clip", head_grad_clip, 0, min_open=True)
        check_callable("forward_fn", forward_fn, "(module, batch) -> MultimodalOutput")
        self.alpha = float(alpha)
        self.modulation_starts = modulation_starts
        self.modulation_ends = modulation_ends
        self.cap = None if cap is None else float(cap)
        self.masked_graph = masked_graph
        self.head_grad_clip = None if head_grad_clip is None else float(head_grad_clip)
        self.forward_fn = forward_fn
        self.running_scores: dict[str, float] = {}
        self.steps = 0
        self._coalitions: list[frozenset[str]] = []
        self._weights: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._shared: list[nn.Parameter] = []
        self._targets: list[nn.Parameter] = []
        self._batch: Any = None
        self._micro: dict[str, Tensor] = {}
        self._awaiting: tuple[StepRecord, Tensor, Any] | None = None
        self._logit_grad: Tensor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._fallback_warned = False

    @property
    def state_key(self) -> str:
        """Distinguishes several AGM instances in one Trainer."""
        return self._generate_state_key(
            alpha=self.alpha, cap=self.cap, masked_graph=self.masked_graph, encoders=self._encoder_paths
        )

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the encoders; refuse FSDP2 with graphs or the clip, and loss weights; plan the coalitions."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.sharded and (self.masked_graph != "none" or self.head_grad_clip is not None):
            raise MisconfigurationException(
                "AGM under FSDP2 (ModelParallelStrategy) needs `masked_graph='none'` and `head_grad_clip=None`: the "
                "masked passes' head gradient cannot be taken with respect to sharded parameters, and the clip test "
                f"needs whole tensors. Got masked_graph={self.masked_graph!r}, head_grad_clip={self.head_grad_clip!r}."
            )
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        weighting = [cb.name for cb in callbacks if isinstance(cb, BalancingCallback) and cb.sets_loss_weights]
        if weighting:
            raise MisconfigurationException(
                f"AGM's rule is defined for the fused loss, and {weighting} set the loss weights of `multimodal_loss`. "
                "Use AGM alone, or with ModalityMonitor or DiagnosingRelearning."
            )
        n = len(self.modalities)
        if n >= 5:
            rank_zero_warn(
                f"AGM runs 2^N - 2 = {2**n - 2} masked forwards per micro-batch for {n} modalities; expect a step "
                f"about {2**n - 1} forwards long."
            )
        self._coalitions = agm_masked_coalitions(self.modalities)
        self._weights = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the shared parameters and those that receive the masked passes' gradients."""
        super().on_train_start(trainer, pl_module)
        in_encoders = {id(p) for m in self.modalities for p in self.encoder_parameters(m)}
        optimised = {id(p): p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        trained = [p for p in optimised.values() if p.requires_grad]
        self._shared = [p for p in trained if id(p) not in in_encoders]
        self._targets = [] if self.masked_graph == "none" else trained if self.masked_graph == "full" else self._shared

    # ------------------------------------------------------------------ every micro-batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Keep the micro-batch for the masked forwards."""
        self._batch, self._awaiting, self._logit_grad = batch, None, None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Run the masked forwards and score the responses; with graphs, catch ``dL / d(fused logits)`` in backward."""
        record = self.take_record(pl_module)
        batch, self._batch = self._batch, None
        responses = self._responses(self._masked_logits(trainer, pl_module, batch), record.output.logits.detach())
        targets = record.output.targets
        self._micro = {"score": _agm_score_update(responses, targets)}
        if self.logs_this_step(trainer):  # the responses' accuracy, logged
            self._micro["correct"] = (responses.detach().argmax(2) == targets).sum(1).double()
        if not self._targets:
            self._accumulate(record)
            return
        logits = record.output.logits
        handle = logits.register_hook(self._keep_logit_gradient) if logits.requires_grad else None
        self._awaiting = (record, responses, handle)

    def _keep_logit_gradient(self, grad: Tensor) -> None:
        self._logit_grad = grad

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add the masked passes' gradients (``R_N = -(R_1 + ... + R_{N-1})``: N - 1 of them) to the step's sums."""
        if self._awaiting is None:
            return
        (record, responses, handle), self._awaiting = self._awaiting, None
        if handle is not None:
            handle.remove()
        grad, self._logit_grad = self._logit_grad, None
        self._micro["correction"] = self._masked_gradients(trainer, responses, grad)
        self._accumulate(record)

    def _masked_gradients(self, trainer: pl.Trainer, responses: Tensor, grad: Tensor | None) -> Tensor:
        """``(N - 1, P)``: row ``m`` the gradient of ``<g, R_m>`` over the flattened targets (zero without ``g``).

        ``R_m`` is the masked passes' part of response ``m``: the response's gradient, the full set's logits being
        detached. ``grad`` is the backward's ``g``, at the AMP scale (undone here) and divided by the accumulation, as
        Lightning's backward adds to ``.grad``. At least float32.
        """
        targets, rows = self._targets, len(self.modalities) - 1
        dtype = torch.promote_types(targets[0].dtype, torch.float32)
        if grad is None:  # the loss does not reach the fused logits
            return torch.zeros(rows, sum(p.numel() for p in targets), dtype=dtype, device=targets[0].device)
        grad = grad.to(responses.dtype)
        flat = []
        for i in range(rows):
            parts = torch.autograd.grad(responses[i], targets, grad, retain_graph=i < rows - 1, allow_unused=True)
            flat.append(
                torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(targets, parts, strict=True)]
                )
            )
        return torch.stack(flat).to(dtype) / loss_scale(trainer)

    def _responses(self, masked: list[Tensor], full: Tensor) -> Tensor:
        """``(M, B, C)`` mono-modal responses ``sum_T c[m][T] F(T)``, at least float32.

        ``masked`` are the masked coalitions' logits (their graphs kept), ``full`` the training forward's, detached.
        """
        stacked = torch.stack([*masked, full])
        stacked = stacked.to(torch.promote_types(stacked.dtype, torch.float32))
        key = (stacked.dtype, stacked.device)
        if key not in self._weights:
            matrix = _response_matrix(self.modalities)
            self._weights[key] = torch.tensor(matrix, dtype=stacked.dtype, device=stacked.device)
        return torch.tensordot(self._weights[key], stacked, dims=1)

    def _masked_logits(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> list[Tensor]:
        """The fused logits of every masked coalition: eval mode, flags and torch's RNG restored, training precision."""
        everything = frozenset(self.modalities)
        device = pl_module.device
        with (
            torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []),
            eval_mode(pl_module, grad=self.masked_graph != "none"),
            trainer.precision_plugin.forward_context(),
            _without_graph(self._encoders.values(), self.masked_graph == "head"),
        ):
            return [
                masked_forward(pl_module, batch, everything - kept, self._encoders, self.forward_fn).logits
                for kept in self._coalitions
            ]

    def step_statistics(self, record: StepRecord) -> dict[str, Tensor]:
        """Per modality the summed capped cross-entropy, and the masked passes' gradients.

        On logged steps also the responses' correct predictions.
        """
        micro, self._micro = self._micro, {}
        return micro

    # ------------------------------------------------------------------ the optimizer step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Keep the stepped optimizer (for the conditional clip), then do the step's work."""
        self._optimizer = optimizer
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        """Compute the coefficients, update the running scores, modulate (inside the window), clip, log."""
        scores = dict(zip(self.modalities, stats.mean("score"), strict=True))
        running = {m: self.running_scores.get(m, 0.0) for m in self.modalities}
        ratios, targets = agm_ratios(scores), agm_ratios(running)
        coefficients = agm_coefficients(scores, running, self.alpha, self.cap)
        overflow = [m for m, k in coefficients.items() if not math.isfinite(k)]
        if overflow:
            m = overflow[0]
            raise RuntimeError(
                f"AGM: the coefficient of modality {m!r} overflows at step {trainer.global_step}: "
                f"exp({self.alpha:g} * ({targets[m]:.4g} - {ratios[m]:.4g})). Pass `cap=10.0` (the official CREMA-D "
                "value) to bound it."
            )
        self.steps += 1
        self.running_scores = agm_update_running(running, scores, self.steps)
        logging = self.logs_this_step(trainer)
        before = self._encoder_squares(pl_module.device) if logging else None
        applied = dict.fromkeys(self.modalities, 1.0)
        if in_window(trainer.current_epoch, self.modulation_starts, self.modulation_ends):
            applied = coefficients
            self._modulate(trainer, coefficients, stats.tensors.get("correction"))
        clipped = self._clip()
        if logging and before is not None:
            values: dict[str, Mapping[str, float] | float] = {
                "score": scores,
                "running_score": self.running_scores,
                "ratio": ratios,
                "target_ratio": targets,
                "coefficient": applied,
                "accuracy": dict(zip(self.modalities, stats.mean("correct"), strict=True)),
                "clipped": clipped,
            }
            self.log_values(pl_module, values, cadence_checked=True)
            self.report_step_ratio(trainer, pl_module, self._step_ratios(trainer, before, applied))

    def _factors(self, coefficients: Mapping[str, float]) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, factor f_p): ``k_m`` for encoder ``m`` (not in ``"full"``), the mean ``k`` for the others."""
        mean = sum(coefficients.values()) / len(coefficients)
        if self.masked_graph == "full":
            return [([p for m in self.modalities for p in self.encoder_parameters(m)] + self._shared, mean)]
        return [(self.encoder_parameters(m), coefficients[m]) for m in self.modalities] + [(self._shared, mean)]

    def _modulate(self, trainer: pl.Trainer, coefficients: Mapping[str, float], correction: Tensor | None) -> None:
        """``.grad <- f_p grad + c_p`` (gradient mode), or ``grad + c_p / f_p`` and the update scaled by ``f_p``."""
        if correction is not None:
            last = coefficients[self.modalities[-1]]
            rows = correction.unbind()
            combined = rows[0] * ((coefficients[self.modalities[0]] - last) / trainer.world_size)
            for m, row in zip(self.modalities[1:-1], rows[1:], strict=True):
                combined.add_(row, alpha=(coefficients[m] - last) / trainer.world_size)
            correction = combined
            if not bool(correction.isfinite().all()):
                correction = None
                if not self._fallback_warned:
                    self._fallback_warned = True
                    rank_zero_warn(
                        f"AGM: the masked passes' head gradient is not finite at step {trainer.global_step} (a float16 "
                        "overflow); that step modulates as `masked_graph='none'` would. Shown once."
                    )
        scaled = [(p, f) for params, f in self._factors(coefficients) for p in params if p.grad is not None and f != 1]
        if scaled and self.modulate == "gradient":  # one pass over every gradient
            torch._foreach_mul_([p.grad for p, _ in scaled if p.grad is not None], [f for _, f in scaled])
        if scaled and self.modulate == "update":
            self.scale_update_after_step([p for p, _ in scaled], [f for _, f in scaled])
        if correction is not None:  # every target's factor is the mean k (see `_factors`)
            divisor = sum(coefficients.values()) / len(coefficients) if self.modulate == "update" else 1.0
            parts = torch.split(correction, [p.numel() for p in self._targets])
            pairs = [(g, part) for p, part in zip(self._targets, parts, strict=True) if (g := p.grad) is not None]
            if pairs:
                grads = [g for g, _ in pairs]
                torch._foreach_add_(grads, [c.view_as(g).to(g.dtype) for g, c in pairs], alpha=1.0 / divisor)

    def _clip(self) -> float:
        """The official conditional clip: 1.0 if it fired, else 0.0."""
        if self.head_grad_clip is None or self._optimizer is None:
            return 0.0
        heads = [p.grad for p in self._shared if p.grad is not None and p.ndim >= 2]
        if not heads or float(torch.stack(torch._foreach_norm(heads, math.inf)).max()) <= self.head_grad_clip:
            return 0.0
        params = [p for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.head_grad_clip)
        return 1.0

    def _encoder_squares(self, device: torch.device) -> Tensor:
        return torch.stack([squared_norm(self.encoder_gradients(m), device) for m in self.modalities])

    def _step_ratios(self, trainer: pl.Trainer, before: Tensor, applied: Mapping[str, float]) -> dict[str, float]:
        """Each encoder's effective step (its gradient, times the update factor in update mode) over the plain one."""
        values = global_sums(trainer, torch.cat([before, self._encoder_squares(before.device)]), self.sharded)
        n = len(self.modalities)
        factors = dict.fromkeys(self.modalities, 1.0)
        if self.modulate == "update":
            mean = sum(applied.values()) / n
            factors = {m: mean if self.masked_graph == "full" else applied[m] for m in self.modalities}
        return {
            m: factors[m] * math.sqrt(values[n + i] / values[i]) if values[i] > 0 else 1.0
            for i, m in enumerate(self.modalities)
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The running scores and the number of steps they average."""
        return {**super().state_dict(), "running_scores": dict(self.running_scores), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the running scores and the step count."""
        super().load_state_dict(state_dict)
        self.running_scores = {m: float(v) for m, v in state_dict.get("running_scores", {}).items()}
        self.steps = int(state_dict.get("steps", 0))


@contextmanager
def _without_graph(encoders: Any, active: bool) -> Iterator[None]:
    """Inside, the encoders run without autograd (their outputs carry no graph); the rest of the forward keeps it."""
    if not active:
        yield
        return
    modes: list[bool] = []

    def off(module: nn.Module, args: Any) -> None:
        modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def on(module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(modes.pop())

    handles = [h for e in encoders for h in (e.register_forward_pre_hook(off), e.register_forward_hook(on))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
