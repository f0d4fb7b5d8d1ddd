"""ModalityMonitor: the imbalance measurements of the field, logged per modality; it never changes training."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_mmbalance.callbacks.base import (
    BalancingCallback,
    ForwardFn,
    check_bool,
    check_forward_fn,
    check_int,
    extract_features,
    loader_view,
    train_loader,
    validation_loader,
)
from lightning_mmbalance.contract import MultimodalOutput, StepRecord

__all__ = ["ModalityMonitor"]

_HISTORY_QUANTITIES = ("/acc/", "/coefficient/", "/weight/", "/w_mm/", "/alpha/")


def masked_forward(module: nn.Module, batch: Any, masked: frozenset[str]) -> MultimodalOutput:
    """Run ``module`` on ``batch`` with the modalities in ``masked`` zeroed.

    Uses the module's ``masked_forward(batch, masked)`` if it has one (the reference model zeroes the encoder
    features there); otherwise, for batches of the form ``(inputs: dict, targets)``, zeroes the masked modalities'
    raw inputs. Zeroed inputs or features may be out of distribution for the model; the numbers are indicators.

    Raises:
        TypeError: the module has no ``masked_forward`` and the batch is not ``(dict, targets)``.
    """
    hook = getattr(module, "masked_forward", None)
    if callable(hook):
        return hook(batch, masked)
    if isinstance(batch, list | tuple) and len(batch) == 2 and isinstance(batch[0], Mapping):
        inputs, targets = batch
        zeroed = {m: torch.zeros_like(x) if m in masked else x for m, x in inputs.items()}
        return module((zeroed, targets))
    raise TypeError(
        f"ModalityMonitor cannot mask modalities of {type(module).__name__}: give it a method "
        "`masked_forward(batch, masked: frozenset[str]) -> MultimodalOutput` that zeroes the features of the "
        "modalities in `masked` (or use batches of the form `(inputs: dict, targets)`), or pass `masked_eval=False`."
    )


class ModalityMonitor(BalancingCallback):
    r"""Per-modality diagnostics of multimodal training; changes nothing in training.

    Per optimizer step (every ``every_n_steps``, aligned to the Trainer's ``log_every_n_steps``; from tensors the
    step already has), under
    ``mmbalance/monitor/<quantity>/<modality>``: unimodal accuracy and loss (``acc``, ``loss``), OGM-GE's score and
    ratio (``score``: mean true-class probability, ``ratio``: score over the mean of the others), ARL's signals
    (``entropy``: mean prediction entropy in nats, ``abs_logit``: mean L1 norm of the logits), the encoder gradient
    norm after accumulation and unscaling (``grad_norm``), the ratio of update norm to weight norm
    (``update_ratio``, a proxy for the conditional learning speed of Wu et al., ICML 2022), and
    ``mmbalance/monitor/imbalance_gap`` = max - min of the per-modality accuracies.

    Every ``conflict_every_n_steps`` steps (optional, two extra autograd passes): ``cos`` = the cosine between the
    fused-loss and the unimodal-loss gradient on each encoder (MMPareto's conflict test), and ``conflict`` = 1 if it
    is <= 0.

    Per validation epoch: unimodal accuracy (``val_acc``); with ``masked_eval``, the fused accuracy with each
    modality zeroed (``masked_acc``) and the conditional utilisation rate
    :math:`u_m = (acc_{all} - acc_{all \setminus m}) / acc_{all}` (``utilization``); with ``shapley`` (up to 4
    modalities), the Shapley value of accuracy over the masked subsets (``shapley``). Masking uses the module's
    ``masked_forward(batch, masked)`` if defined, else zeroes the raw inputs of ``(dict, targets)`` batches.

    At the end of training, with ``linear_probe``: a logistic-regression probe of each encoder's features, fitted on the
    training set and scored on the validation set (``linear_probe``), available as :attr:`linear_probe_accuracy`.
    A summary figure (per-modality accuracy and each attached method's coefficients over steps) is written to the
    logger's folder as ``mmbalance_summary.png``. All values are reduced across DDP ranks before logging.

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

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import OGMGE, ModalityMonitor

        trainer = Trainer(max_epochs=30, callbacks=[ModalityMonitor(linear_probe=True), OGMGE()])
        trainer.fit(model, datamodule=dm)
    """

    method = "monitor"
    supports_manual_optimization = True

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
        check_forward_fn(forward_fn)
        self.every_n_steps = every_n_steps
        self.conflict_every_n_steps = conflict_every_n_steps
        self.masked_eval = masked_eval
        self.shapley = shapley
        self.linear_probe = linear_probe
        self.forward_fn = forward_fn
        self.linear_probe_accuracy: dict[str, float] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._conflict: dict[str, Tensor] | None = None
        self._before: dict[str, list[Tensor]] | None = None
        self._grad_norms: dict[str, float] = {}
        self._subsets: list[frozenset[str]] = []
        self._val_counts: Tensor | None = None

    @property
    def state_key(self) -> str:
        """Distinguishes several ModalityMonitor instances in one Trainer."""
        return self._generate_state_key(every_n_steps=self.every_n_steps, encoders=self._encoder_paths)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the encoders; Shapley values are exact and cheap only up to 4 modalities."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.shapley and len(self.modalities) > 4:
            raise ValueError(
                f"ModalityMonitor: Shapley values need 2^M masked evaluations; {len(self.modalities)} modalities "
                "is too many. Pass `shapley=False`."
            )
        present = list(self.modalities)
        self._subsets = [frozenset(c) for k in range(len(present) + 1) for c in itertools.combinations(present, k)]

    # ------------------------------------------------------------------ per step
    def _logging_step(self, trainer: pl.Trainer) -> bool:
        return self._logs_this_step(trainer, self.every_n_steps)

    def _conflict_step(self, trainer: pl.Trainer) -> bool:
        n = self.conflict_every_n_steps
        return n is not None and self._logs_this_step(trainer, n)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Accumulate the step's statistics (and, on conflict steps, the per-loss encoder gradients)."""
        if self._conflict_step(trainer):
            self._accumulate_conflict(self._record, pl_module)
        if self._logging_step(trainer):
            super().on_before_backward(trainer, pl_module, loss)
        else:
            self._pop_record(pl_module)

    def _micro_batch_statistics(self, record: StepRecord) -> Tensor:
        out = record.output
        y = out.targets
        rows = []
        for m in self.modalities:
            z = out.unimodal_logits[m].detach()
            z = z if z.dtype == torch.float64 else z.float()
            p = torch.softmax(z, 1)
            rows.append(
                torch.stack(
                    [
                        (z.argmax(1) == y).sum().to(torch.float64),
                        F.cross_entropy(z, y, reduction="sum").double(),
                        p.gather(1, y.unsqueeze(1)).sum().double(),
                        -(p * torch.log(p + 1e-16)).sum().double(),
                        z.abs().sum().double(),
                    ]
                )
            )
        count = torch.tensor([float(y.shape[0])], dtype=torch.float64, device=y.device)
        return torch.cat([torch.cat(rows), count])

    def _accumulate_conflict(self, record: StepRecord | None, pl_module: pl.LightningModule) -> None:
        if record is None:
            return
        params = [p for m in self.modalities for p in self.encoder_parameters(m)]
        unimodal = sum(record.unimodal_losses[m] for m in self.modalities)
        g_f = torch.autograd.grad(record.fused_loss, params, retain_graph=True, allow_unused=True)
        g_u = torch.autograd.grad(unimodal, params, retain_graph=True, allow_unused=True)
        flat_f = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_f, params, strict=True)]
        )
        flat_u = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_u, params, strict=True)]
        )
        both = torch.stack([flat_f, flat_u]).detach()
        self._conflict = both if self._conflict is None else self._conflict + both

    def _modulate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, stats: Tensor | None
    ) -> None:
        """Log the step's statistics; never changes a gradient."""
        values: dict[str, dict[str, float]] = {}
        if stats is not None:
            values.update(self._step_values(stats.tolist()))
            norms = {m: torch._foreach_norm(self.encoder_gradients(m)) for m in self.modalities}
            flat = torch.stack([n.double() for m in self.modalities for n in norms[m]] or [torch.zeros(())]).tolist()
            offset = 0
            values["grad_norm"] = {}
            for m in self.modalities:
                count = len(norms[m])
                values["grad_norm"][m] = math.sqrt(sum(v * v for v in flat[offset : offset + count]))
                offset += count
            self._before = {m: [p.detach().clone() for p in self.encoder_parameters(m)] for m in self.modalities}
        if self._conflict is not None:
            values.update(self._conflict_values(trainer))
        if values:
            gap = values.pop("imbalance_gap", None)
            self._log_values(pl_module, values)
            if gap is not None and self._logs_this_step(trainer):
                pl_module.log("mmbalance/monitor/imbalance_gap", gap["all"], on_step=True, on_epoch=False, batch_size=1)

    def _discard_step(self) -> None:
        self._conflict = None

    def _step_values(self, stats: list[float]) -> dict[str, dict[str, float]]:
        n = max(stats[-1], 1.0)
        per = {m: stats[5 * i : 5 * i + 5] for i, m in enumerate(self.modalities)}
        scores = {m: v[2] for m, v in per.items()}
        total = sum(scores.values())
        others = len(scores) - 1
        ratio = {m: s / ((total - s) / others) if total - s > 0 else math.inf for m, s in scores.items()}
        acc = {m: v[0] / n for m, v in per.items()}
        return {
            "acc": acc,
            "loss": {m: v[1] / n for m, v in per.items()},
            "score": {m: v[2] / n for m, v in per.items()},
            "ratio": ratio,
            "entropy": {m: v[3] / n for m, v in per.items()},
            "abs_logit": {m: v[4] / n for m, v in per.items()},
            "imbalance_gap": {"all": max(acc.values()) - min(acc.values())},
        }

    def _conflict_values(self, trainer: pl.Trainer) -> dict[str, dict[str, float]]:
        assert self._conflict is not None
        both, self._conflict = self._conflict, None
        if trainer.world_size > 1:
            both = trainer.strategy.reduce(both, reduce_op="mean")
        rows, offset = [], 0
        for m in self.modalities:
            size = sum(p.numel() for p in self.encoder_parameters(m))
            f, u = both[0, offset : offset + size].double(), both[1, offset : offset + size].double()
            rows.append(torch.stack([f @ u, f @ f, u @ u]))
            offset += size
        cos = {}
        for m, (dot, ff, uu) in zip(self.modalities, torch.stack(rows).tolist(), strict=True):
            cos[m] = dot / math.sqrt(ff * uu) if ff > 0 and uu > 0 else 0.0
        return {"cos": cos, "conflict": {m: float(c <= 0) for m, c in cos.items()}}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the update-to-weight norm ratio of the step, and keep the history for the summary figure."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._before is not None:
            before, self._before = self._before, None
            ratios = {}
            with torch.no_grad():
                for m in self.modalities:
                    after = [p.detach() for p in self.encoder_parameters(m)]
                    delta = torch._foreach_sub(after, before[m])
                    num = sum(float(n) ** 2 for n in torch._foreach_norm(delta))
                    den = sum(float(n) ** 2 for n in torch._foreach_norm(before[m]))
                    ratios[m] = math.sqrt(num / den) if den > 0 else 0.0
            self._log_values(pl_module, {"update_ratio": ratios}, cadence_checked=True)
        self._record_history(trainer)

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
            full = pl_module(batch) if self.forward_fn is None else self.forward_fn(pl_module, batch)
            y = full.targets
            counts = [(full.unimodal_logits[m].argmax(1) == y).sum() for m in self.modalities]
            if self.masked_eval or self.shapley:
                for present in self._subsets:
                    if len(present) == len(self.modalities):
                        out = full
                    else:
                        out = masked_forward(pl_module, batch, frozenset(self.modalities) - present)
                    counts.append((out.logits.argmax(1) == y).sum())
            counts.append(torch.tensor(y.shape[0], device=y.device))
        row = torch.stack([c.to(torch.float64) for c in counts])
        self._val_counts = row if self._val_counts is None else self._val_counts + row

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log validation accuracy per modality, masked accuracy, utilisation and Shapley contributions."""
        if trainer.sanity_checking or self._val_counts is None:
            return
        counts = trainer.strategy.reduce(self._val_counts, reduce_op="sum").tolist()
        self._val_counts = None
        n = max(counts[-1], 1.0)
        k = len(self.modalities)
        values: dict[str, dict[str, float]] = {"val_acc": {m: counts[i] / n for i, m in enumerate(self.modalities)}}
        if self.masked_eval or self.shapley:
            acc = {s: counts[k + j] / n for j, s in enumerate(self._subsets)}
            everything = frozenset(self.modalities)
            if self.masked_eval:
                values["masked_acc"] = {m: acc[everything - {m}] for m in self.modalities}
                values["utilization"] = {
                    m: (acc[everything] - acc[everything - {m}]) / acc[everything] if acc[everything] > 0 else 0.0
                    for m in self.modalities
                }
            if self.shapley:
                values["shapley"] = shapley_values(acc, self.modalities)
        self._log_values(pl_module, values, on_step=False)

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
        result: dict[str, float] | None = None
        if trainer.is_global_zero:
            result = {m: probe_accuracy(train[0][m], train[1], val[0][m], val[1]) for m in self.modalities}
        return trainer.strategy.broadcast(result, src=0)

    def _write_figure(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:  # no logger, no folder of the run's own: write nothing rather than litter the cwd
            return
        folder = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and folder is not None and self.history:
            plot_history(self.history, Path(folder) / "mmbalance_summary.png")

    def state_dict(self) -> dict[str, Any]:
        """The monitor keeps no training state."""
        return {"version": 1}


def probe_accuracy(train_x: Tensor, train_y: Tensor, eval_x: Tensor, eval_y: Tensor) -> float:
    """Accuracy on ``eval`` of a logistic-regression probe (standardised features) fitted on ``train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_x.numpy(), train_y.numpy())
    return float(probe.score(eval_x.numpy(), eval_y.numpy()))


def _flatten(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )


def shapley_values(accuracy: Mapping[frozenset[str], float], modalities: Sequence[str]) -> dict[str, float]:
    """Exact Shapley value of each modality for the set function ``accuracy`` (subset of present modalities)."""
    k = len(modalities)
    out = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        value = 0.0
        for size in range(k):
            weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                value += weight * (accuracy[s | {m}] - accuracy[s])
        out[m] = value
    return out


def plot_history(history: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """Per-modality accuracy curves and each method's coefficients/weights over steps, in one PNG."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    acc = {k: v for k, v in history.items() if "/acc/" in k}
    coeff = {k: v for k, v in history.items() if k not in acc}
    panels = [("per-modality train accuracy", acc)] + ([("method coefficients / weights", coeff)] if coeff else [])
    fig = Figure(figsize=(5.5 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for key, points in sorted(series.items()):
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=key.removeprefix("mmbalance/"), linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
