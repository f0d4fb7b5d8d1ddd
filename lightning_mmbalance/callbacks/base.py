"""The two base classes of the package's callbacks.

:class:`MultimodalCallback` is what every callback of the package shares: the encoders of the user's module, the
per-micro-batch record that :func:`~lightning_mmbalance.multimodal_loss` hands over, named per-step statistics
(summed over the micro-batches of an optimizer step, reduced across ranks in one collective), skipping the steps a
GradScaler skips, and logging under ``mmbalance/<method>/<quantity>/<modality>``. The monitor is one.

:class:`BalancingCallback` adds what a balancing method needs: loss weights for ``multimodal_loss``, scaling the
parameter update instead of the gradient (``modulate="update"``, for Adam-type optimizers), and the rules for
combining several methods on one Trainer (refused in ``setup`` when the result would depend on callback order).

A sixth method is a subclass of :class:`BalancingCallback`; ``docs/extending.md`` walks through one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_mmbalance.contract import MultimodalOutput, StepRecord, resolve_encoders
from lightning_mmbalance.utilities.checks import check_choice
from lightning_mmbalance.utilities.compile import allow_retained_graphs, release_retained_graphs
from lightning_mmbalance.utilities.distributed import global_sums, is_sharded, local, squared_norm
from lightning_mmbalance.utilities.tree import map_tensors

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "MODULATE_MODES",
    "BalancingCallback",
    "DivergenceError",
    "DivergenceWarning",
    "MultimodalCallback",
    "StepSizeWarning",
    "StepStatistics",
]

ADAPTIVE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.SparseAdam,
)
"""Optimizers that normalise gradient magnitudes, so that scaling a gradient by a constant has little effect."""

MODULATE_MODES = ("gradient", "update")
DIVERGENCE_GROWTH = 4.0
"""The step-size warning fires when an encoder's weight norm exceeds this multiple of its norm at the start."""


class StepSizeWarning(UserWarning):
    """A balancing callback enlarges an encoder's steps and that encoder's weights run away (see ``report_step_ratio``).

    Filter it like any warning: ``warnings.filterwarnings("ignore", category=StepSizeWarning)``.
    """


class DivergenceError(RuntimeError):
    """A balancing callback's statistics, the gradients it reads or the encoder weights became NaN or infinite.

    Raised at the step where the callback sees it, on every rank at once (the values it checks are identical across
    ranks), with a message naming the callback, the modality, the step, the last ``step_ratio`` and the remedy: a lower
    learning rate, or gradient clipping (``Trainer(gradient_clip_val=...)``). Steps that a GradScaler skips (an AMP
    overflow under 16-mixed) are skipped as before and raise nothing.

    Example::

        from lightning.pytorch import Trainer

        from lightning_mmbalance import ARL
        from lightning_mmbalance.models import LateFusionClassifier

        diverged = {}
        for lr in (1e30, 0.01):  # the first rate makes the weights overflow at the first steps
            model = LateFusionClassifier(dm.input_shapes, dm.num_classes, lr=lr)
            try:
                Trainer(max_epochs=1, callbacks=[ARL()], logger=False).fit(model, datamodule=dm)
            except DivergenceError as err:  # a learning-rate sweep moves on to the next rate
                diverged[lr] = str(err)
    """


class DivergenceWarning(UserWarning):
    """The monitor's :class:`DivergenceError`: the same message, once per fit, and training goes on.

    :class:`~lightning_mmbalance.ModalityMonitor` never changes training, so it warns where a balancing callback raises.

    Example::

        import warnings

        warnings.simplefilter("error", DivergenceWarning)  # stop the fit when the monitor sees a divergence
    """


@dataclass(frozen=True)
class StepStatistics:
    """A method's named per-step statistics: summed over the micro-batches of one optimizer step and over all ranks.

    Attributes:
        sums: name -> the summed values, flattened, as Python floats.
        count: the number of samples they were summed over (0 when the method declares no statistics).
        tensors: name -> the summed values of the statistics the callback lists in ``tensor_statistics`` (sums of
            gradient-sized buffers), float64 tensors of their original shape, left on the device.

    Example::

        stats = StepStatistics(sums={"score": [12.0, 6.0], "entropy": [3.2, 4.8]}, count=16)
        stats["score"]          # [S_audio, S_visual], sums over the step's 16 samples
        stats.mean("entropy")   # the same divided by stats.count: [0.2, 0.3]
    """

    sums: dict[str, list[float]]
    count: float
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list[float]:
        return self.sums[name]

    def mean(self, name: str) -> list[float]:
        """The values of ``name`` divided by the sample count."""
        return [v / max(self.count, 1.0) for v in self.sums[name]]


class MultimodalCallback(Callback):
    """What every callback of the package shares; a subclass overrides the extension points it needs.

    Extension points (all optional):

    - :meth:`step_statistics`: named per-micro-batch sums (tensors of any shape); the base class adds them up over the
      micro-batches of an optimizer step, adds the sample count, reduces everything across ranks in one collective
      and passes a :class:`StepStatistics` to :meth:`on_step`.
    - :meth:`on_step`: once per optimizer step, in ``on_before_optimizer_step`` (gradients accumulated, synchronised
      across ranks, unscaled by AMP, not yet clipped), under ``torch.no_grad()``. Not called on a step that a
      GradScaler skips (non-finite gradients); :meth:`discard_step` is called instead.
    - :meth:`take_record` in an overridden ``on_before_backward``: the micro-batch's :class:`StepRecord`.
    - :meth:`check_finite`: the base class checks the reduced step statistics at every step and the encoder weights
      at the end of every training epoch; a method passes any other value it reads (gradient norms, dot products,
      held-out losses) to it. A NaN or infinite value raises :class:`DivergenceError` at that step
      (``divergence = "raise"``), or warns once with :class:`DivergenceWarning` (``"warn"``, for a callback that
      never changes training).

    Args:
        encoders: modality -> dotted attribute path of its encoder. None uses ``pl_module.encoders``
            (an ``nn.ModuleDict``).

    Example::

        class GradNormPrinter(MultimodalCallback):
            method = "gradnorm"

            def on_step(self, trainer, pl_module, stats):
                norms = {m: float(torch.stack([g.norm() for g in self.encoder_gradients(m)]).norm())
                         for m in self.modalities}
                self.log_values(pl_module, {"norm": norms})
    """

    method: ClassVar[str] = "multimodal"
    """Name used in the log tags ``mmbalance/<method>/...``."""
    requires_unimodal_logits: ClassVar[bool] = True
    requires_features: ClassVar[bool] = False
    requires_encoder_parameters: ClassVar[bool] = True
    supports_manual_optimization: ClassVar[bool] = False
    state_version: ClassVar[int] = 1
    """Version of :meth:`state_dict`; checkpoints of any version from 1 to this one load."""
    tensor_statistics: ClassVar[frozenset[str]] = frozenset()
    """Statistics reduced in the same collective but kept as tensors on the device (``StepStatistics.tensors``)."""
    divergence: ClassVar[str] = "raise"
    """What a non-finite value does (:meth:`check_finite`): ``"raise"`` a DivergenceError or ``"warn"`` once."""

    def __init__(self, encoders: Mapping[str, str] | None = None) -> None:
        if encoders is not None:
            if not isinstance(encoders, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in encoders.items()
            ):
                raise TypeError(
                    "`encoders` must be a mapping of modality name to dotted attribute path (str -> str), "
                    f"got {encoders!r}."
                )
            if len(encoders) < 2:
                raise ValueError(f"`encoders` must name at least 2 modalities, got {dict(encoders)!r}.")
        self._encoder_paths = dict(encoders) if encoders is not None else None
        self._encoders: dict[str, nn.Module] = {}
        self._params: dict[str, list[nn.Parameter]] = {}
        self._record: StepRecord | None = None
        self._sums: dict[str, Tensor] = {}
        self._count = 0.0
        self._output_checked = False
        self.sharded = False
        self._encoder_outputs: dict[str, list[Tensor]] = {}
        self._output_hooks: list[RemovableHandle] = []
        self._divergence_warned = False

    # ------------------------------------------------------------------ read-only views
    @property
    def name(self) -> str:
        """The class name, used in messages."""
        return type(self).__name__

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names in encoder order (empty before ``setup``)."""
        return tuple(self._encoders)

    @property
    def encoders(self) -> Mapping[str, nn.Module]:
        """Modality -> the resolved encoder module (empty before ``setup``)."""
        return dict(self._encoders)

    @property
    def needs_retained_graph(self) -> bool:
        """Whether the callback takes a second gradient of the step's forward (``autograd.grad`` with a kept graph).

        If so, ``setup`` makes compiled backwards safe to run twice for the whole fit (``utilities/compile.py``), even
        when the second gradient is taken on logging steps only: which graphs a logging step meets is not known when
        they are compiled.
        """
        return False

    @property
    def output_checked(self) -> bool:
        """Whether :meth:`check_output` has accepted an output in this fit."""
        return self._output_checked

    def encoder_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameters of ``modality``'s encoder that the optimizer trains (available from ``on_train_start``)."""
        return self._params[modality]

    def encoder_gradients(self, modality: str) -> list[Tensor]:
        """The current ``.grad`` of ``modality``'s optimised encoder parameters (those that have one)."""
        return [p.grad for p in self._params[modality] if p.grad is not None]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy and the optimisation mode, and resolve the encoders."""
        if stage != "fit":
            return
        self._check_strategy(trainer)
        from lightning.pytorch.strategies import ModelParallelStrategy

        self.sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        if not pl_module.automatic_optimization and not self.supports_manual_optimization:
            raise MisconfigurationException(
                f"{self.name} does not support manual optimization (`automatic_optimization = False` in "
                f"{type(pl_module).__name__}): it acts inside Lightning's automatic optimizer step."
            )
        try:
            self._encoders = resolve_encoders(
                pl_module, self._encoder_paths, require_parameters=self.requires_encoder_parameters
            )
        except (AttributeError, TypeError, ValueError) as err:
            raise type(err)(f"{self.name}: {err}") from err
        self._output_checked = False
        if self.needs_retained_graph:
            allow_retained_graphs(self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give back the process-wide compile setting taken in ``setup``; remove the encoder-output hooks."""
        release_retained_graphs(self)
        remove_hooks(self._output_hooks)
        self._encoder_outputs = {}

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                f"{self.name} does not support DeepSpeed: DeepSpeed partitions and owns the gradients. Use "
                "`strategy='ddp'`, or `ModelParallelStrategy` (FSDP2) for sharded training."
            )
        if isinstance(strategy, FSDPStrategy):
            raise MisconfigurationException(
                f"{self.name} does not support FSDPStrategy (FSDP1): its gradients are flat pieces of parameters. For "
                "sharded training use `ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` and shard "
                "each encoder, then the module, with `fully_shard` in `configure_model` (FSDP2; see docs/sharded.md)."
            )
        if isinstance(strategy, ModelParallelStrategy):
            mesh = getattr(strategy, "_device_mesh", None)
            tensor_parallel = mesh["tensor_parallel"].size() if mesh is not None else 1
            if tensor_parallel > 1:
                raise MisconfigurationException(
                    f"{self.name} supports ModelParallelStrategy for data-parallel sharding only "
                    f"(`tensor_parallel_size=1`), got a tensor-parallel size of {tensor_parallel}."
                )

    def check_output(self, output: MultimodalOutput) -> None:
        """Check that the module's output carries what this callback needs (``multimodal_loss`` calls it once).

        Raises:
            ValueError: the unimodal logits or the features this callback needs are missing.
        """
        missing = [m for m in self.modalities if m not in output.unimodal_logits]
        if self.requires_unimodal_logits and missing:
            raise ValueError(
                f"{self.name} needs per-modality logits, but `MultimodalOutput.unimodal_logits` lacks {missing}. "
                "Use a head from `lightning_mmbalance.fusion` (ConcatFusion, SumFusion or ZeroMaskFusion) or "
                "separate unimodal heads."
            )
        missing = [m for m in self.modalities if m not in output.features]
        if self.requires_features and missing:
            raise ValueError(
                f"{self.name} needs the encoder features, but `MultimodalOutput.features` lacks {missing}. "
                "Return them as `features={modality: (B, D) tensor}`."
            )
        self._output_checked = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect each encoder's optimised parameters (and, under FSDP2, watch the encoders' outputs if needed)."""
        self._divergence_warned = False
        optimised = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        self._params = {
            m: [p for p in enc.parameters() if p.requires_grad and id(p) in optimised]
            for m, enc in self._encoders.items()
        }
        if self.sharded and self.needs_retained_graph and not self._output_hooks:
            self._output_hooks = [enc.register_forward_hook(self._keep_output(m)) for m, enc in self._encoders.items()]

    def _keep_output(self, modality: str) -> Any:
        """A forward hook that keeps the output's differentiable tensors, each passed on as a view of itself.

        The views are what the rest of the forward reads, so the gradient with respect to one of them is the loss's
        partial derivative through that tensor alone, also when another kept tensor is computed from it inside the
        encoder (a ``ModelOutput``'s ``pooler_output`` from its ``last_hidden_state``); a backward of the views with
        those gradients then sums each path once. A view changes no value.
        """

        def keep(module: nn.Module, args: Any, output: Any) -> Any:
            if not torch.is_grad_enabled():
                return None
            kept: list[Tensor] = []

            def boundary(tensor: Tensor) -> Tensor:
                if tensor.requires_grad:
                    tensor = tensor.view_as(tensor)
                    kept.append(tensor)
                return tensor

            output = map_tensors(boundary, output)
            self._encoder_outputs[modality] = kept
            return output

        return keep

    def encoder_outputs(self) -> list[Tensor]:
        """The differentiable tensors in the encoders' outputs of the current training forward (FSDP2 only).

        They are kept for second gradients; an encoder may return a tensor or any structure of tensors.
        """
        return [t for m in self.modalities for t in self._encoder_outputs.get(m, [])]

    # ------------------------------------------------------------------ the micro-batch record
    def receive_record(self, record: StepRecord) -> None:
        """Keep the record of the current micro-batch (called by ``multimodal_loss``)."""
        self._record = record

    def take_record(self, pl_module: pl.LightningModule) -> StepRecord:
        """The current micro-batch's record, which is then forgotten.

        Raises:
            RuntimeError: the module's ``training_step`` did not return ``multimodal_loss(...)``.
        """
        record, self._record = self._record, None
        if record is None:
            raise RuntimeError(
                f"{self.name} did not receive the training step's outputs: "
                f"`{type(pl_module).__name__}.training_step` must end with `return multimodal_loss(self, output)`, "
                "where `output` is the MultimodalOutput of `self(batch)` "
                "(`from lightning_mmbalance import multimodal_loss`)."
            )
        return record

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Add this micro-batch's statistics to the step's sums."""
        self._accumulate(self.take_record(pl_module))

    def _accumulate(self, record: StepRecord) -> None:
        with torch.no_grad():
            values = self.step_statistics(record)
        if values is None:
            return
        for key, value in values.items():
            value = value.detach().to(torch.float64)
            self._sums[key] = value if key not in self._sums else self._sums[key] + value
        self._count += float(record.output.targets.shape[0])

    def step_statistics(self, record: StepRecord) -> Mapping[str, Tensor] | None:
        """Named sums over the samples of one micro-batch (tensors of any shape), or None if there are none."""
        return None

    # ------------------------------------------------------------------ the optimizer step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Reduce the step's statistics across ranks and call :meth:`on_step`, unless the GradScaler skips the step."""
        sums, count = self._sums, self._count
        self._sums, self._count = {}, 0.0
        if not _step_is_finite(trainer, optimizer, self.sharded):
            self.discard_step()
            return
        stats = _reduce(trainer, sums, count, self.tensor_statistics)
        self._check_statistics(trainer, stats)
        with torch.no_grad():
            self.on_step(trainer, pl_module, stats)

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        """Once per optimizer step with finite gradients, with the step's reduced statistics."""

    def discard_step(self) -> None:
        """Forget what was accumulated for a step that the GradScaler skips (non-finite gradients)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check that the encoder weights are finite (one norm per encoder: the weights a last step may have broken)."""
        norms = self._encoder_norms(trainer, pl_module)
        when = f"at the end of epoch {trainer.current_epoch} (after step {trainer.global_step - 1})"
        self.check_finite(trainer, "the encoder weights", dict(zip(self.modalities, norms, strict=True)), when)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give back what ``setup`` took when the fit fails (Lightning calls no ``teardown`` then)."""
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------ divergence
    def check_finite(
        self,
        trainer: pl.Trainer,
        what: str,
        values: Mapping[str, float | Sequence[float]],
        when: str | None = None,
    ) -> None:
        """Report a divergence (:meth:`report_divergence`) if one of ``values`` is NaN or infinite.

        ``values`` maps each modality (or another name, such as ``"fused"``) to the floats the callback read for it,
        already on the host and identical on every rank (reduced, or computed from synchronised gradients or
        replicated weights), so that checking them is free and every rank decides alike. ``what`` names them in the
        message ("the norms of its encoder gradients"); ``when`` defaults to the current optimizer step.
        """
        bad = [
            key
            for key, value in values.items()
            if not all(math.isfinite(v) for v in (value if isinstance(value, Sequence) else (value,)))
        ]
        if bad:
            self.report_divergence(trainer, what, bad, when)

    def report_divergence(self, trainer: pl.Trainer, what: str, keys: Sequence[str], when: str | None = None) -> None:
        """Raise :class:`DivergenceError` (or warn once, with ``divergence = "warn"``): ``what`` is not finite.

        The message names the callback, the modalities (``keys``), the step (``when``), the last ``step_ratio`` and
        the remedy.

        Raises:
            DivergenceError: with ``divergence = "raise"`` (every balancing method).
        """
        modalities = [repr(k) for k in keys if k in self.modalities]
        others = [repr(k) for k in keys if k not in self.modalities]
        subject = ", ".join(
            ([("modality " if len(modalities) == 1 else "modalities ") + ", ".join(modalities)] if modalities else [])
            + others
        )
        when = when or f"at step {trainer.global_step} (epoch {trainer.current_epoch})"
        message = (
            f"{self.name}: {what} for {subject} became non-finite (NaN or inf) {when}: training has diverged. "
            f"{self._step_ratio_note()}. Lower the learning rate (the method's page under docs/ has a rule of thumb), "
            "or clip the gradients with `Trainer(gradient_clip_val=...)`."
        )
        if self.divergence == "raise":
            raise DivergenceError(message)
        if not self._divergence_warned:
            self._divergence_warned = True
            rank_zero_warn(message, category=DivergenceWarning)

    def _step_ratio_note(self) -> str:
        return f"step_ratio: not measured by {self.name}"

    def _check_statistics(self, trainer: pl.Trainer, stats: StepStatistics) -> None:
        """Check the reduced step statistics; a statistic with one entry per modality names the modality."""
        if all(math.isfinite(v) for values in stats.sums.values() for v in values):
            return
        n = len(self.modalities)
        per_modality = {m: [v[i] for v in stats.sums.values() if len(v) == n] for i, m in enumerate(self.modalities)}
        others = {name: v for name, v in stats.sums.items() if len(v) != n}
        what = f"its step statistics ({', '.join(stats.sums)})"
        self.check_finite(trainer, what, {**per_modality, **others})

    def _encoder_norms(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[float]:
        """Each encoder's weight norm (its trained parameters), global under sharding: one collective at most."""
        squares = torch.stack([squared_norm(self.encoder_parameters(m), pl_module.device) for m in self.modalities])
        return [math.sqrt(v) for v in global_sums(trainer, squares, self.sharded)]

    # ------------------------------------------------------------------ logging
    def tag(self, quantity: str, modality: str | None = None) -> str:
        """The log tag ``mmbalance/<method>/<quantity>/<modality>`` (without the modality for a global quantity)."""
        return f"mmbalance/{self.method}/{quantity}" + (f"/{modality}" if modality is not None else "")

    @staticmethod
    def logs_this_step(trainer: pl.Trainer, every_n_steps: int = 1) -> bool:
        """Whether this optimizer step is one of every ``every_n_steps`` steps whose logs the Trainer writes.

        Lightning writes step-level logs every ``log_every_n_steps`` steps only, so this is every
        ``lcm(every_n_steps, log_every_n_steps)``-th step. Valid until the step's ``on_train_batch_end``;
        ``self.log`` costs about a millisecond per value, so per-step values are only logged on such steps.
        """
        if getattr(trainer, "fast_dev_run", False):
            return True
        every: int = getattr(trainer, "log_every_n_steps", 50)
        return every > 0 and (trainer.global_step + 1) % math.lcm(every_n_steps, every) == 0

    def log_values(
        self,
        pl_module: pl.LightningModule,
        values: Mapping[str, Mapping[str, float | Tensor] | float],
        on_step: bool = True,
        cadence_checked: bool = False,
    ) -> None:
        """Log ``{quantity: {modality: value}}`` (or ``{quantity: value}``); values must be identical on every rank.

        Step-level values are logged at the Trainer's ``log_every_n_steps`` cadence only (``cadence_checked``: the
        caller already decided, earlier in the step).
        """
        if on_step and not cadence_checked and not self.logs_this_step(pl_module.trainer):
            return
        metrics: dict[str, float | Tensor] = {}
        for quantity, per_modality in values.items():
            if isinstance(per_modality, Mapping):
                metrics.update({self.tag(quantity, m): v for m, v in per_modality.items()})
            else:
                metrics[self.tag(quantity)] = per_modality
        # The values are identical on every rank. Step-level ones skip the sync; epoch-level ones (a few per epoch)
        # take it, which leaves them unchanged and avoids Lightning's warning about unsynced epoch-level metrics.
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, batch_size=1)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; subclasses extend it."""
        return {"version": self.state_version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the state's version; subclasses restore their fields.

        Raises:
            ValueError: the version is not one this class can load.
        """
        version = state_dict.get("version")
        if not isinstance(version, int) or not 1 <= version <= self.state_version:
            raise ValueError(
                f"{self.name}: unsupported checkpoint state version {version!r} (expected 1 to {self.state_version})."
            )


class BalancingCallback(MultimodalCallback):
    """Base class of the balancing methods: a :class:`MultimodalCallback` that changes training.

    A method implements the extension points of :class:`MultimodalCallback` (its :meth:`on_step` changes the step's
    encoder gradients in place, or calls :meth:`scale_update_after_step`) and declares what it changes, which
    ``setup`` uses to refuse combinations whose result would depend on callback order:

    - ``sets_loss_weights``: it returns weights from :meth:`loss_weights`; at most one such callback per Trainer. A
      class attribute, or an instance attribute set in ``__init__`` when it depends on the arguments.
    - ``gradient_action``: ``"scale"`` if it multiplies encoder gradients by per-modality factors (any number of
      these compose: factors multiply, in any order), ``"replace"`` if it rewrites them from other quantities,
      ``"add"`` if it adds a term to them (neither of these two can share a Trainer with another callback that acts
      on gradients: the result would depend on the order), None if it leaves gradients alone.

    Args:
        encoders: modality -> dotted attribute path of its encoder. None uses ``pl_module.encoders``.
        modulate: ``"gradient"`` or ``"update"`` for methods that scale, None for methods that do not. In update mode
            :meth:`scale_update_after_step` rescales the optimizer's update of the given parameters, which survives
            Adam-type optimizers.

    Example::

        class HalveFirstEncoder(BalancingCallback):
            method = "halve"
            gradient_action = "scale"

            def on_step(self, trainer, pl_module, stats):
                torch._foreach_mul_(self.encoder_gradients(self.modalities[0]), 0.5)
    """

    sets_loss_weights: bool = False
    gradient_action: ClassVar[str | None] = None
    reports_step_ratio: ClassVar[bool] = False
    """Whether the method calls :meth:`report_step_ratio` (its unimodal losses are then kept on logging steps)."""

    def __init__(self, encoders: Mapping[str, str] | None = None, modulate: str | None = None) -> None:
        super().__init__(encoders=encoders)
        if modulate is not None:
            check_choice("modulate", modulate, MODULATE_MODES)
        self.modulate = modulate
        self._pending: list[tuple[Tensor, Tensor, float]] = []
        self._step_hooks: list[RemovableHandle] = []
        self._initial_norms: dict[str, float] = {}
        self._warned: set[str] = set()
        self._loss_sums: Tensor | None = None
        self._classes = 0
        self._last_step_ratio: tuple[int, dict[str, float]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The checks of :class:`MultimodalCallback`, then the composition rules."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            _check_composition(trainer)

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """The loss weights this method asks ``multimodal_loss`` for: ``{"fused": w_f, modality: w_m}``, or None."""
        return None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect the encoder parameters and their norms; hook the optimizers (update mode) or warn about Adam."""
        super().on_train_start(trainer, pl_module)
        self._initial_norms = dict(zip(self.modalities, self._encoder_norms(trainer, pl_module), strict=True))
        self._warned = set()
        self._last_step_ratio = None
        remove_hooks(self._step_hooks)
        if self.modulate == "update":
            self._step_hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]
        if self.modulate == "gradient":
            adaptive = [type(opt).__name__ for opt in trainer.optimizers if isinstance(opt, ADAPTIVE_OPTIMIZERS)]
            if adaptive:
                rank_zero_warn(self.adaptive_optimizer_message(adaptive[0]), category=UserWarning)

    def adaptive_optimizer_message(self, optimizer: str) -> str:
        """The warning given once in gradient mode with an adaptive ``optimizer`` (a method that adds says so)."""
        return (
            f"{self.name} scales gradients, but {optimizer} normalises gradient magnitudes, which largely undoes the "
            f"scaling. Pass `modulate='update'` to {self.name} to scale the parameter updates instead."
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Forget update scalings of a step the optimizer did not take, then do the step's work."""
        self._pending = []
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._loss_sums = None  # used by report_step_ratio during this step, or not at all (a skipped step)

    def scale_update_after_step(self, params: Sequence[nn.Parameter], factors: Sequence[float]) -> None:
        """Schedule ``theta <- theta_before + factor * (theta_after - theta_before)`` for the coming optimizer step.

        Call it from :meth:`on_step` (update mode only). It keeps a copy of ``params`` as they are now; right after
        the optimizer step (an optimizer step post-hook) it rescales their update, momentum and weight decay
        included. Scalings scheduled by several callbacks multiply, in any order.
        """
        self._pending.extend((p, p.detach().clone(), float(f)) for p, f in zip(params, factors, strict=True) if f != 1)

    def report_step_ratio(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ratios: Mapping[str, float]
    ) -> None:
        """Log ``step_ratio/<m>`` and warn once per modality if its encoder looks like it is diverging.

        ``ratios[m]`` is the norm of encoder ``m``'s gradient as this callback leaves it (the update it scales, in
        update mode) over the norm a plain step would have had. Call it on logging steps (:meth:`logs_this_step`).
        The divergence test, all three at once: the encoder's weight norm exceeds ``DIVERGENCE_GROWTH`` (4) times its
        norm at the start of the fit; the modality's own prediction is no better than chance (its unimodal loss, over
        the step, is above ``ln C``, C classes: a running-away or dead encoder, not one that grows while it learns);
        and the callback enlarges its steps (``ratios[m] > 1``). The warning (:class:`StepSizeWarning`) names the
        callback, the modality and the remedy, at the step it happens. A NaN or infinite ratio, weight norm or
        unimodal loss is not compared with anything: it raises :class:`DivergenceError` (:meth:`check_finite`), and
        the last finite ratios are what its message reports.
        """
        self.check_finite(trainer, "its step_ratio (from the encoder gradients)", ratios)
        self._last_step_ratio = (trainer.global_step, dict(ratios))
        self.log_values(pl_module, {"step_ratio": dict(ratios)}, cadence_checked=True)
        losses, self._loss_sums = self._loss_sums, None
        if losses is None:
            return
        if trainer.world_size > 1:
            losses = trainer.strategy.reduce(losses, reduce_op="sum")
        *loss_sums, count = losses.tolist()
        norms = self._encoder_norms(trainer, pl_module)
        what = "the encoder weights or the unimodal losses"
        self.check_finite(trainer, what, {m: [n, v] for m, n, v in zip(self.modalities, norms, loss_sums, strict=True)})
        for m, norm, loss_sum in zip(self.modalities, norms, loss_sums, strict=True):
            start, loss = self._initial_norms.get(m, 0.0), loss_sum / max(count, 1.0)
            growing = start > 0 and norm > DIVERGENCE_GROWTH * start
            if m not in self._warned and growing and loss > math.log(self._classes) and ratios[m] > 1:
                self._warned.add(m)
                rank_zero_warn(
                    f"{self.name}: the weight norm of the {m!r} encoder grew {norm / start:.1f}x since the start of "
                    f"training ({start:.3g} -> {norm:.3g}, step {trainer.global_step}) while its unimodal loss is "
                    f"{loss:.3g}, no better than chance, and {self.name} makes its steps {ratios[m]:.2g}x those of a "
                    "plain step: the encoder may be diverging. Lower the learning rate (a rule of thumb is in the "
                    "method's page under docs/), or the method's strength.",
                    category=StepSizeWarning,
                )

    def _step_ratio_note(self) -> str:
        if not self.reports_step_ratio:
            return super()._step_ratio_note()
        if self._last_step_ratio is None:
            return "step_ratio: not measured yet (it is measured on the steps the Trainer logs)"
        step, ratios = self._last_step_ratio
        return f"Last step_ratio (step {step}): " + ", ".join(f"{m!r} {r:.3g}" for m, r in ratios.items())

    def take_record(self, pl_module: pl.LightningModule) -> StepRecord:
        """The micro-batch's record; on logging steps its unimodal losses are kept for the divergence test."""
        record = super().take_record(pl_module)
        if self.reports_step_ratio and record.unimodal_losses and self.logs_this_step(pl_module.trainer):
            self._classes = record.output.logits.shape[1]
            losses = [record.unimodal_losses[m].detach().double() for m in self.modalities]
            one = torch.ones(1, dtype=torch.float64, device=losses[0].device)
            row = torch.cat([torch.stack(losses), one])  # the micro-batch's mean losses, and one micro-batch
            self._loss_sums = row if self._loss_sums is None else self._loss_sums + row
        return record

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        with torch.no_grad():
            # theta <- after + (1 - f) * (before - after) == before + f * (after - before)
            after = [p.detach() for p, _, _ in pending]
            before = [b for _, b, _ in pending]
            torch._foreach_sub_(before, after)
            torch._foreach_mul_(before, [1.0 - f for _, _, f in pending])
            torch._foreach_add_(after, before)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the optimizer hooks and give back the compile setting."""
        remove_hooks(self._step_hooks)
        self._pending = []
        super().teardown(trainer, pl_module, stage)


def in_window(epoch: int, modulation_starts: int, modulation_ends: int | None) -> bool:
    """Whether ``epoch`` lies in the modulation window ``[modulation_starts, modulation_ends]`` (None: no end)."""
    return modulation_starts <= epoch and (modulation_ends is None or epoch <= modulation_ends)


def remove_hooks(handles: list[RemovableHandle]) -> None:
    """Remove every hook in ``handles`` (forward, optimizer step, ...) and empty the list."""
    for handle in handles:
        handle.remove()
    handles.clear()


def _check_composition(trainer: pl.Trainer) -> None:
    """Refuse balancing callbacks whose combination is undefined or would depend on their order."""
    methods = [cb for cb in trainer.callbacks if isinstance(cb, BalancingCallback)]  # type: ignore[attr-defined]
    names = [cb.name for cb in methods]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MisconfigurationException(
            f"The Trainer has more than one {twice[0]} callback. A method's second instance would act on the same "
            "encoders again; use one."
        )
    setters = [cb.name for cb in methods if cb.sets_loss_weights]
    if len(setters) > 1:
        raise MisconfigurationException(
            f"Callbacks {setters} all set the loss weights of `multimodal_loss`; use at most one of them."
        )
    actors = [cb for cb in methods if cb.gradient_action is not None]
    exclusive = [cb for cb in actors if cb.gradient_action in _EXCLUSIVE_ACTIONS]
    if exclusive and len(actors) > 1:
        first = exclusive[0]
        others = [cb.name for cb in actors if cb is not first]
        action = _EXCLUSIVE_ACTIONS[str(first.gradient_action)]
        raise MisconfigurationException(
            f"{first.name} {action}, and {others} also change encoder gradients: "
            f"the result would depend on the callbacks' order. Use {first.name} alone, or a gradient scaler such as "
            "OGMGE together with a loss-weighting method other than it (see the composition table in "
            "docs/composition.md)."
        )


_EXCLUSIVE_ACTIONS = {"replace": "replaces each encoder's gradient", "add": "adds a term to each encoder's gradient"}
"""Gradient actions that compose with no other one, and how the refusal describes them."""


def loss_scale(trainer: pl.Trainer) -> Tensor | float:
    """The GradScaler's current scale under 16-mixed (a tensor, no device sync), else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = getattr(scaler, "_scale", None)
    return scale if scale is not None else 1.0


def add_loss_gradients(
    trainer: pl.Trainer,
    loss: Tensor,
    params: Sequence[Tensor],
    into: Sequence[Tensor],
    encoder_outputs: Sequence[Tensor] = (),
) -> None:
    """Add the gradient of ``loss`` on ``params`` (encoder parameters), as Lightning's backward adds it to ``.grad``.

    ``into`` holds one buffer per parameter, of the shape of the rank's part of it (the whole parameter, or its local
    shard under FSDP2). Call it in ``on_before_backward``, while the graph is alive. The gradient is divided by
    ``accumulate_grad_batches`` as Lightning divides the loss, with the AMP scale undone; parameters the loss does not
    reach get nothing.

    - Replicated parameters (one device, DDP): ``torch.autograd.grad(..., retain_graph=True)``, the rank's own
      gradient (the caller averages it over ranks).
    - Sharded parameters (FSDP2): ``autograd.grad`` cannot differentiate with respect to them. The gradient of
      ``loss`` with respect to ``encoder_outputs`` (the encoders' output tensors of this forward) is taken first, then
      a backward of the encoders alone with it, with every ``.grad`` set aside and put back afterwards. FSDP2
      reduce-scatters that backward, so the result is each rank's shard of the gradient averaged over ranks, like
      ``.grad`` itself. Going through the encoders only keeps the backward away from the parameters of the root
      module (the heads), whose gradient FSDP2 would otherwise fold into the step's own backward.
    """
    scale = loss_scale(trainer)
    if any(is_sharded(p) for p in params):
        grads = _encoder_gradients_by_backward(trainer, loss * scale, params, encoder_outputs)
    else:
        grads = list(torch.autograd.grad(loss * scale, list(params), retain_graph=True, allow_unused=True))
    present = [(b, local(g)) for b, g in zip(into, grads, strict=True) if g is not None]
    if not present:
        return
    buffers, gradients = [b for b, _ in present], [g for _, g in present]
    inverse = 1.0 / (scale * trainer.accumulate_grad_batches)
    if isinstance(inverse, Tensor):
        torch._foreach_add_(buffers, torch._foreach_mul(gradients, inverse))
    else:
        torch._foreach_add_(buffers, gradients, alpha=inverse)


def flat_buffers(params: Sequence[Tensor], rows: int) -> tuple[Tensor, list[list[Tensor]]]:
    """A zero ``(rows, N)`` buffer over the rank's part of ``params``, and per row a view shaped like each part.

    ``N`` is the total number of elements the rank holds (its shards under FSDP2); the dtype is float64 if a parameter
    is, else float32.
    """
    shards = [local(p) for p in params]
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in shards) else torch.float32
    buffer = torch.zeros(rows, sum(s.numel() for s in shards), dtype=dtype, device=shards[0].device)
    views = [list(torch.split(row, [s.numel() for s in shards])) for row in buffer]
    return buffer, [[v.view_as(s) for v, s in zip(row, shards, strict=True)] for row in views]


def _encoder_gradients_by_backward(
    trainer: pl.Trainer, loss: Tensor, params: Sequence[Tensor], outputs: Sequence[Tensor]
) -> list[Tensor | None]:
    if not outputs:
        raise RuntimeError("Under FSDP2 the encoders' outputs are needed to take a second gradient; none were seen.")
    upstream = torch.autograd.grad(loss, list(outputs), retain_graph=True, allow_unused=True)
    reached = [(o, g) for o, g in zip(outputs, upstream, strict=True) if g is not None]
    everything = [p for p in trainer.lightning_module.parameters() if p.requires_grad]
    kept = [p.grad for p in everything]
    for p in everything:
        p.grad = None
    try:
        if reached:
            torch.autograd.backward([o for o, _ in reached], [g for _, g in reached], retain_graph=True)
        return [None if p.grad is None else p.grad.detach() for p in params]
    finally:
        for p, grad in zip(everything, kept, strict=True):
            p.grad = grad


def _step_is_finite(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, sharded: bool) -> bool:
    """False on a step that the precision plugin's GradScaler will skip; True without a GradScaler.

    The scaler has already unscaled the gradients and recorded whether it found an inf or NaN (identical on every
    rank after DDP's all-reduce); that finding is read instead of another pass over the gradients. Under sharding each
    rank checked its shards only, so the ranks' findings are combined (one collective).
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None:
        return True
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = state.get("found_inf_per_device") if isinstance(state, dict) else None
    if found:
        flag = torch.stack([v.float().reshape(()) for v in found.values()]).max()
    else:
        grads = [local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = torch._foreach_norm([g for g in grads if g.numel()])
        flag = (~torch.stack([n.float() for n in norms]).isfinite()).any().float() if norms else torch.zeros(())
    if sharded and trainer.world_size > 1:
        flag = trainer.strategy.reduce(flag, reduce_op="max")
    return not bool(flag)


def _reduce(
    trainer: pl.Trainer, sums: Mapping[str, Tensor], count: float, kept: frozenset[str] = frozenset()
) -> StepStatistics:
    """Sum every named statistic and the count across ranks in one collective; one device-to-host copy.

    The statistics named in ``kept`` come back as tensors (not copied to the host); they follow the count.
    """
    if not sums:
        return StepStatistics({}, 0.0)
    host = {key: v.reshape(-1) for key, v in sums.items() if key not in kept}
    device = next(iter(sums.values())).device
    counted = trainer.world_size > 1  # the count joins the collective; one process knows it already
    rows = [*host.values(), *([torch.tensor([count], dtype=torch.float64, device=device)] if counted else [])]
    stacked = torch.cat([*rows, *(v.reshape(-1) for key, v in sums.items() if key in kept)])
    if counted:
        stacked = trainer.strategy.reduce(stacked, reduce_op="sum")
    size = sum(v.numel() for v in host.values())
    values = stacked[: size + counted].tolist()
    if counted:
        count = values.pop()
    out: dict[str, list[float]] = {}
    offset = 0
    for key, v in host.items():
        out[key] = values[offset : offset + v.numel()]
        offset += v.numel()
    tensors: dict[str, Tensor] = {}
    offset += counted
    for key in (key for key in sums if key in kept):
        tensors[key] = stacked[offset : offset + sums[key].numel()].view_as(sums[key])
        offset += sums[key].numel()
    return StepStatistics(out, count, tensors)
