"""The MMPareto callback: a common direction with enhanced magnitude for the fused and unimodal gradients.

The math is in :mod:`lightning_mmbalance.functional.mmpareto`; this module wires it into Lightning's backward and
optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_mmbalance.callbacks.base import BalancingCallback, StepStatistics, add_loss_gradients, flat_buffers
from lightning_mmbalance.functional.mmpareto import _mmpareto_tensor_factors, _MMParetoProducts
from lightning_mmbalance.utilities.checks import check_float
from lightning_mmbalance.utilities.distributed import global_sums, local

__all__ = ["MMPareto"]


class MMPareto(BalancingCallback):
    r"""MMPareto: a common direction with enhanced magnitude for the multimodal and unimodal gradients.

    The loss becomes the uniform sum :math:`L_f + \sum_m L_m` (set through ``multimodal_loss``). On every encoder
    ``k`` the callback compares ``g_mm`` (the gradient of the fused loss) with ``g_u`` (that of the encoder's own
    unimodal loss); if they conflict (cosine <= 0) it weights them by the two-task min-norm solution, otherwise
    by 1/2 each, and rescales every tensor to ``gamma * max(||g_mm + g_u||, ||n||)`` along ``n = 2 w_mm g_mm +
    2 w_u g_u``. Heads and every non-encoder parameter keep their plain gradients.

    Only ``g_mm`` costs an extra autograd pass (``torch.autograd.grad`` of the fused loss, taken in
    ``on_before_backward``); ``g_u`` is the synchronised ``.grad`` minus ``g_mm``. This assumes the encoder's own
    unimodal loss is the only one reaching it, which holds for ``ConcatFusion``, ``SumFusion``, separate unimodal
    heads and ``ZeroMaskFusion``. With ``torch.compile``, AOTAutograd's donated buffers and Inductor's in-place buffers
    are switched off during the fit, so that compiled backwards accept the kept graph and keep it intact (see
    ``docs/compile.md``).

    MMPareto replaces the encoder gradients, so it cannot share a Trainer with another callback that changes them
    (OGMGE, ARL); it composes with DiagnosingRelearning and ModalityMonitor.

    Paper: Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024
    (arXiv 2405.17730); official code GeWu-Lab/MMPareto_ICML2024.

    Args:
        gamma: magnitude factor, float > 0 (1.5 in the official code).
        modulate: ``"gradient"`` (faithful) writes the final gradient; ``"update"`` writes the direction ``n`` and
            scales each tensor's update after the optimizer step, for Adam-type optimizers.
        encoders: modality -> dotted attribute path; None uses ``pl_module.encoders``.

    Raises:
        ValueError: ``gamma`` is not a finite float > 0, or ``modulate`` is unknown.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import MMPareto

        trainer = Trainer(max_epochs=50, callbacks=[MMPareto()])
        trainer.fit(model, datamodule=dm)  # model.training_step returns multimodal_loss(self, self(batch))
    """

    method = "mmpareto"
    sets_loss_weights = True
    gradient_action = "replace"
    reports_step_ratio = True

    def __init__(
        self, gamma: float = 1.5, modulate: str = "gradient", encoders: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(encoders=encoders, modulate=modulate)
        check_float("gamma", gamma, 0, min_open=True)
        self.gamma = float(gamma)
        self._buf: Tensor | None = None  # (2, N): row 0 accumulates g_mm, row 1 receives g_u at the step
        self._g_mm: dict[str, list[Tensor]] = {}
        self._g_u: dict[str, list[Tensor]] = {}
        self._slices: dict[str, slice] = {}

    @property
    def needs_retained_graph(self) -> bool:
        """True: the fused-loss gradient is taken before Lightning's backward of the whole loss."""
        return True

    @property
    def state_key(self) -> str:
        """Distinguishes several MMPareto instances in one Trainer."""
        return self._generate_state_key(gamma=self.gamma, encoders=self._encoder_paths)

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The uniform sum ``L_f + sum_m L_m``."""
        return {"fused": 1.0, **dict.fromkeys(self.modalities, 1.0)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Allocate one ``(2, N)`` buffer for ``g_mm`` and ``g_u``, viewed per encoder tensor (at least float32)."""
        super().on_train_start(trainer, pl_module)
        params = [p for m in self.modalities for p in self.encoder_parameters(m)]
        self._buf, (g_mm, g_u) = flat_buffers(params, rows=2)  # a rank's shards under FSDP2
        offset, start = 0, 0
        for m in self.modalities:
            count = len(self.encoder_parameters(m))
            self._g_mm[m], self._g_u[m] = g_mm[offset : offset + count], g_u[offset : offset + count]
            size = sum(v.numel() for v in self._g_mm[m])
            self._slices[m] = slice(start, start + size)
            offset, start = offset + count, start + size

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Add this micro-batch's fused-loss gradient on the encoders, normalised as Lightning normalises ``loss``."""
        record = self.take_record(pl_module)
        params = [p for m in self.modalities for p in self.encoder_parameters(m)]
        add_loss_gradients(trainer, record.fused_loss, params, self._all_buffers(), self.encoder_outputs())

    def _all_buffers(self) -> list[Tensor]:
        return [b for m in self.modalities for b in self._g_mm[m]]

    def discard_step(self) -> None:
        """Forget the skipped step's fused-loss gradient."""
        if self._buf is not None:
            self._buf[0].zero_()

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        """Replace each encoder's gradient by its Pareto combination (or schedule the update scaling)."""
        assert self._buf is not None
        g_mm = self._buf[0]
        if trainer.world_size > 1 and not self.sharded:
            g_mm.copy_(trainer.strategy.reduce(g_mm, reduce_op="mean"))
        products = self._encoder_products(trainer)
        dots = {m: [row.v11, row.v12, row.v22] for m, row in products.items()}
        self.check_finite(trainer, "the dot products of its fused-loss and unimodal-loss gradients", dots)
        weights = {m: row.weights() for m, row in products.items()}
        plan = self._form_directions(trainer, weights)
        logs: dict[str, dict[str, float]] = {"cos": {}, "w_mm": {}, "conflict": {}, "grad_norm_ratio": {}}
        step_ratio: dict[str, float] = {}
        for m, (params, ns, factors, plain_sq, final_sq) in plan.items():
            # the buffer holds h = n / 2, or the plain sum where guarded: one fused multiply-and-write per tensor
            if self.modulate == "update":  # .grad = n; the update is scaled by the factor after the step
                scales = [1.0 if guarded else 2.0 for _, guarded in factors]
                self.scale_update_after_step(params, [f for f, _ in factors])
            else:  # .grad = factor * n
                scales = [f if guarded else 2 * f for f, guarded in factors]
            for p, h, scale in zip(params, ns, scales, strict=True):
                torch.mul(h, scale, out=local(p.grad))  # type: ignore[arg-type]
            logs["cos"][m] = products[m].cos
            logs["w_mm"][m] = weights[m][0]
            logs["conflict"][m] = float(products[m].conflict)
            logs["grad_norm_ratio"][m] = math.sqrt(final_sq / plain_sq) if plain_sq > 0 else 1.0
            step_ratio[m] = math.sqrt(final_sq / products[m].v11) if products[m].v11 > 0 else 1.0
        g_mm.zero_()
        if self.logs_this_step(trainer):
            self.log_values(pl_module, logs, cadence_checked=True)
            self.report_step_ratio(trainer, pl_module, step_ratio)

    def _encoder_products(self, trainer: pl.Trainer) -> dict[str, _MMParetoProducts]:
        """Write ``g_u = .grad - g_mm`` into row 1, then [v11, v12, v22] per encoder (summed over shards)."""
        assert self._buf is not None
        for m in self.modalities:
            for p, n, u in zip(self.encoder_parameters(m), self._g_mm[m], self._g_u[m], strict=True):
                if p.grad is None:
                    torch.neg(n, out=u)
                else:
                    torch.sub(local(p.grad), n, out=u)
        rows = []
        for m in self.modalities:
            g_mm, g_u = self._buf[0, self._slices[m]], self._buf[1, self._slices[m]]
            rows.append(torch.stack([g_mm @ g_mm, g_mm @ g_u, g_u @ g_u]).double())
        flat = global_sums(trainer, torch.stack(rows).flatten(), self.sharded)  # the step's one device sync
        values = [flat[3 * i : 3 * i + 3] for i in range(len(self.modalities))]
        return {m: _MMParetoProducts(*row) for m, row in zip(self.modalities, values, strict=True)}

    def _form_directions(
        self, trainer: pl.Trainer, weights: Mapping[str, tuple[float, float]]
    ) -> dict[str, tuple[list[nn.Parameter], list[Tensor], list[tuple[float, bool]], float, float]]:
        """Write ``h_t = n_t / 2`` over ``g_mm`` (``n_t = 2 w_mm g_mm,t + 2 w_u g_u,t``) and compute each factor.

        Returns, per modality: the parameters, their ``h`` tensors (for guarded tensors the plain sum), the
        (factor on ``n_t``, guarded) pairs, and the squared norms of the plain and of the final encoder gradient.
        """
        per_modality: dict[str, tuple[list[nn.Parameter], list[Tensor], list[Tensor]]] = {}
        norm_lists = []
        for m in self.modalities:
            params, ns, us, grads = [], [], [], []
            for p, n, u in zip(self.encoder_parameters(m), self._g_mm[m], self._g_u[m], strict=True):
                if p.grad is not None:
                    params.append(p)
                    ns.append(n)
                    us.append(u)
                    grads.append(local(p.grad))
            # h = n / 2 = w_mm g_mm + w_u g_u = lerp(g_mm, g_u, w_u), since w_mm + w_u = 1: one pass over the buffer
            torch._foreach_lerp_(ns, us, weights[m][1])
            per_modality[m] = (params, ns, grads)
            norm_lists += [torch._foreach_norm(grads), torch._foreach_norm(ns)]
        squares = torch.stack([n.double() for lst in norm_lists for n in lst]).square()
        flat_norms = [math.sqrt(v) for v in global_sums(trainer, squares, self.sharded)]  # per tensor, over shards
        plan = {}
        offset = 0
        for m, (params, ns, grads) in per_modality.items():
            count = len(params)
            totals = flat_norms[offset : offset + count]
            n_norms = [2 * h for h in flat_norms[offset + count : offset + 2 * count]]
            offset += 2 * count
            factors = _mmpareto_tensor_factors(totals, n_norms, self.gamma)
            for h, g, (_, guarded) in zip(ns, grads, factors, strict=True):
                if guarded:  # ||n|| ~ 0: fall back to gamma * (g_mm + g_u)
                    h.copy_(g)
            final_sq = sum(
                (f * (s if g else nn_)) ** 2 for (f, g), s, nn_ in zip(factors, totals, n_norms, strict=True)
            )
            plan[m] = (params, ns, factors, float(sum(s * s for s in totals)), float(final_sq))
        return plan
