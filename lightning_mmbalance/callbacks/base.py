"""``BalancingCallback``: the plumbing every balancing method shares.

Subclasses implement the method; this class gives them, following the package's design rules:

- encoder resolution and the model / strategy checks in ``setup``;
- loss-weight negotiation with :func:`~lightning_mmbalance.multimodal_loss` (two callbacks that both set loss weights
  is a configuration error);
- the per-micro-batch record, with a clear error when the module never calls ``multimodal_loss``;
- per-step statistics summed over the micro-batches of one optimizer step and reduced across ranks in one call;
- non-finite-gradient skipping (AMP overflow steps);
- a noise generator seeded identically on every rank;
- ``modulate="update"``: scaling an encoder's parameter update after the optimizer step, and the warning for
  adaptive optimizers in gradient mode;
- logging under ``mmbalance/<method>/<quantity>/<modality>``.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_mmbalance.contract import MultimodalOutput, StepRecord, resolve_encoders

ForwardFn = Callable[[pl.LightningModule, Any], MultimodalOutput]

__all__ = ["ADAPTIVE_OPTIMIZERS", "MODULATE_MODES", "BalancingCallback"]

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
MODULATE_MODES = ("gradient", "update")


class BalancingCallback(Callback):
    """Base class of the balancing callbacks.

    A subclass sets the class attributes below and overrides the hooks it needs:

    - :meth:`_micro_batch_statistics`: a 1-D float64 tensor of per-micro-batch sums; the base class adds them up over
      the micro-batches of an optimizer step and sums them across ranks with one ``strategy.reduce`` call.
    - :meth:`_modulate`: called once per optimizer step, in ``on_before_optimizer_step``, with those reduced
      statistics, when the encoder gradients are finite. It edits gradients in place (it already runs under
      ``torch.no_grad()``) or calls :meth:`_scale_update_after_step`.
    - :meth:`loss_weights`: the weights ``multimodal_loss`` uses, if the method sets them.

    Args:
        encoders: modality -> dotted attribute path of its encoder. None uses ``pl_module.encoders``
            (an ``nn.ModuleDict``).
        modulate: ``"gradient"`` or ``"update"`` for methods that scale, None for methods that do not.

    Example::

        class HalveFirstEncoder(BalancingCallback):
            method = "halve"

            def _modulate(self, trainer, pl_module, optimizer, stats):
                for p in self.encoder_parameters(self.modalities[0]):
                    p.grad.mul_(0.5)
    """

    method: ClassVar[str] = "balancing"
    """Name used in the log tags ``mmbalance/<method>/...`` and in messages."""
    sets_loss_weights: ClassVar[bool] = False
    requires_unimodal_logits: ClassVar[bool] = True
    requires_features: ClassVar[bool] = False
    requires_encoder_parameters: ClassVar[bool] = True
    supports_fsdp: ClassVar[bool] = False
    supports_manual_optimization: ClassVar[bool] = False

    def __init__(self, encoders: Mapping[str, str] | None = None, modulate: str | None = None) -> None:
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
        if modulate is not None and modulate not in MODULATE_MODES:
            raise ValueError(f"`modulate` must be one of {MODULATE_MODES}, got {modulate!r}.")
        self._encoder_paths = dict(encoders) if encoders is not None else None
        self.modulate = modulate
        self._encoders: dict[str, nn.Module] = {}
        self._params: dict[str, list[nn.Parameter]] = {}
        self._record: StepRecord | None = None
        self._stats: Tensor | None = None
        self._pending_update: tuple[int, list[nn.Parameter], list[Tensor], list[float]] | None = None
        self._generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------ public read-only views
    @property
    def name(self) -> str:
        """The class name, used in messages."""
        return type(self).__name__

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names in encoder order (empty before ``setup``)."""
        return tuple(self._encoders)

    def encoder_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameters of ``modality``'s encoder that the optimizer trains (available from ``on_train_start``)."""
        return self._params[modality]

    # ------------------------------------------------------------------ setup-time checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy and the module, and resolve the encoders."""
        if stage != "fit":
            return
        self._check_strategy(trainer)
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
        if self.sets_loss_weights:
            setters = [
                cb.name for cb in trainer.callbacks if isinstance(cb, BalancingCallback) and cb.sets_loss_weights
            ]
            if len(setters) > 1:
                raise MisconfigurationException(
                    f"Callbacks {setters} all set the loss weights of `multimodal_loss`; use at most one of them."
                )

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                f"{self.name} does not support DeepSpeed: DeepSpeed partitions and owns the gradients. Use "
                "`strategy='ddp'` (or 'ddp_spawn' / 'ddp_fork') instead."
            )
        if isinstance(strategy, FSDPStrategy | ModelParallelStrategy) and not self.supports_fsdp:
            raise MisconfigurationException(
                f"{self.name} does not support {type(strategy).__name__}: it needs whole (unsharded) encoder "
                "gradients. Use `strategy='ddp'` instead."
            )

    def _check_output(self, output: MultimodalOutput) -> None:
        """Check that the module's output carries what this method needs (called once per fit)."""
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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect each encoder's optimised parameters and warn about adaptive optimizers in gradient mode."""
        optimised = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        self._params = {
            m: [p for p in enc.parameters() if p.requires_grad and id(p) in optimised]
            for m, enc in self._encoders.items()
        }
        if self.modulate == "gradient":
            adaptive = [type(opt).__name__ for opt in trainer.optimizers if isinstance(opt, ADAPTIVE_OPTIMIZERS)]
            if adaptive:
                rank_zero_warn(
                    f"{self.name} scales gradients, but {adaptive[0]} normalises gradient magnitudes, which largely "
                    f"undoes the scaling. Pass `modulate='update'` to {self.name} to scale the parameter updates "
                    "instead.",
                    category=UserWarning,
                )

    # ------------------------------------------------------------------ the step record and loss weights
    def _receive_record(self, record: StepRecord) -> None:
        self._record = record

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """The loss weights this method asks ``multimodal_loss`` for: ``{"fused": w_f, modality: w_m}``, or None."""
        return None

    def _pop_record(self, pl_module: pl.LightningModule) -> StepRecord:
        record, self._record = self._record, None
        if record is None:
            raise RuntimeError(
                f"{self.name} did not receive the training step's outputs: "
                f"`{type(pl_module).__name__}.training_step` must end with `return multimodal_loss(self, output)`, "
                "where `output` is the MultimodalOutput of `self(batch)` "
                "(`from lightning_mmbalance import multimodal_loss`)."
            )
        return record

    # ------------------------------------------------------------------ per micro-batch
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Accumulate this micro-batch's statistics over the optimizer step."""
        record = self._pop_record(pl_module)
        with torch.no_grad():
            stats = self._micro_batch_statistics(record)
        if stats is not None:
            self._stats = stats if self._stats is None else self._stats + stats

    def _micro_batch_statistics(self, record: StepRecord) -> Tensor | None:
        """Per-micro-batch sums (1-D float64) to add up over the step and across ranks; None if the method has none."""
        return None

    # ------------------------------------------------------------------ per optimizer step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Reduce the step's statistics across ranks and let the method modulate, unless gradients are non-finite."""
        stats, self._stats = self._stats, None
        if not _gradients_finite(optimizer):
            self._discard_step()
            return
        if stats is not None:
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
        with torch.no_grad():
            self._modulate(trainer, pl_module, optimizer, stats)

    def _modulate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, stats: Tensor | None
    ) -> None:
        """Change this step's gradients (or schedule an update scaling); ``stats`` are summed over the step."""

    def _discard_step(self) -> None:
        """Forget what was accumulated for a step that is skipped (non-finite gradients)."""

    def encoder_gradients(self, modality: str) -> list[Tensor]:
        """The current ``.grad`` of ``modality``'s optimised encoder parameters (those that have one)."""
        return [p.grad for p in self._params[modality] if p.grad is not None]

    # ------------------------------------------------------------------ modulate="update"
    def _scale_update_after_step(
        self, trainer: pl.Trainer, params: Sequence[nn.Parameter], factors: Sequence[float]
    ) -> None:
        """Schedule ``theta <- theta_before + factor * (theta_after - theta_before)`` for the coming optimizer step.

        Call it from :meth:`_modulate`; it keeps a copy of ``params`` as they are now, and after the optimizer step
        (in ``on_train_batch_end``) rescales their update, momentum and weight decay included.
        """
        keep = [(p, float(f)) for p, f in zip(params, factors, strict=True) if float(f) != 1.0]
        if not keep:
            return
        if self._pending_update is None or self._pending_update[0] != trainer.global_step:
            self._pending_update = (trainer.global_step, [], [], [])
        _, kept, before, kept_factors = self._pending_update
        kept.extend(p for p, _ in keep)
        before.extend(p.detach().clone() for p, _ in keep)
        kept_factors.extend(f for _, f in keep)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Apply a scheduled update scaling once the optimizer step has happened."""
        if self._pending_update is None:
            return
        step, params, before, factors = self._pending_update
        if trainer.global_step == step:  # the step has not run yet (it is still accumulating)
            return
        self._pending_update = None
        with torch.no_grad():
            # theta <- after + (1 - f) * (before - after) == before + f * (after - before)
            after = [p.detach() for p in params]
            torch._foreach_sub_(before, after)
            torch._foreach_mul_(before, [1.0 - f for f in factors])
            torch._foreach_add_(after, before)

    # ------------------------------------------------------------------ randomness
    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        """A generator on ``device`` seeded with ``seed``: the same stream on every rank given the same seed."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    # ------------------------------------------------------------------ logging
    def tag(self, quantity: str, modality: str) -> str:
        """The log tag ``mmbalance/<method>/<quantity>/<modality>``."""
        return f"mmbalance/{self.method}/{quantity}/{modality}"

    @staticmethod
    def _logs_this_step(trainer: pl.Trainer, every_n_steps: int = 1) -> bool:
        """Whether this optimizer step is one of every ``every_n_steps`` steps whose logs the Trainer writes.

        Lightning writes step-level logs every ``log_every_n_steps`` steps only, so this is every
        ``lcm(every_n_steps, log_every_n_steps)``-th step. Valid until the step's ``on_train_batch_end``;
        ``self.log`` costs about a millisecond per value, so per-step values are only logged on such steps.
        """
        if trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and (trainer.global_step + 1) % math.lcm(every_n_steps, every) == 0

    def _log_values(
        self,
        pl_module: pl.LightningModule,
        values: Mapping[str, Mapping[str, float | Tensor]],
        on_step: bool = True,
        cadence_checked: bool = False,
    ) -> None:
        """Log ``{quantity: {modality: value}}``; the values must already be identical on every rank.

        Step-level values are logged at the Trainer's ``log_every_n_steps`` cadence only (``cadence_checked``: the
        caller already decided, earlier in the step).
        """
        if on_step and not cadence_checked and not self._logs_this_step(pl_module.trainer):
            return
        metrics = {self.tag(q, m): v for q, per_m in values.items() for m, v in per_m.items()}
        # The values are identical on every rank. Step-level ones skip the sync; epoch-level ones (a few per epoch)
        # take it, which leaves them unchanged and avoids Lightning's warning about unsynced epoch-level metrics.
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, batch_size=1)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; subclasses extend it."""
        return {"version": 1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        version = state_dict.get("version")
        if version != 1:
            raise ValueError(f"{self.name}: unsupported checkpoint state version {version!r} (expected 1).")


def _gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer holds is finite (False on an AMP overflow step; identical on all ranks)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.stack([n.float() for n in norms]).isfinite().all())


# ---------------------------------------------------------------------------------------- argument checks
def check_int(name: str, value: Any, minimum: int) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def check_float(name: str, value: Any, minimum: float, *, strict: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a finite number >= ``minimum`` (> with ``strict``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ValueError(f"`{name}` must be a finite float {'>' if strict else '>='} {minimum:g}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")


def check_forward_fn(forward_fn: Any) -> None:
    """``TypeError`` unless ``forward_fn`` is None or callable ``(module, batch) -> MultimodalOutput``."""
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"`forward_fn` must be callable (module, batch) -> MultimodalOutput, got {forward_fn!r}.")


# ---------------------------------------------------------------------------------------- held-out data and copies
def train_loader(trainer: pl.Trainer, method: str) -> DataLoader:
    """The fit's training DataLoader.

    Raises:
        MisconfigurationException: the training data is not one DataLoader (e.g. a dict of loaders).
    """
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise MisconfigurationException(
            f"{method} needs the training data as one DataLoader, got {type(loader).__name__}."
        )
    return loader


def validation_loader(trainer: pl.Trainer, method: str) -> DataLoader:
    """The first validation DataLoader of the fit, set up if Lightning has not built it yet.

    Raises:
        MisconfigurationException: there is none (no ``val_dataloader`` / ``validation_step``, or
            ``limit_val_batches=0``).
    """
    message = (
        f"{method} needs a held-out validation loader (val_dataloader) to measure generalisation; never pass the "
        "test set. Give the module a `validation_step` and the Trainer a `val_dataloaders` (or the datamodule a "
        "`val_dataloader`), with `limit_val_batches` > 0."
    )
    if trainer.limit_val_batches == 0:
        raise MisconfigurationException(message)
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    if val_loop._combined_loader is None:
        val_loop.setup_data()
    combined = val_loop._combined_loader
    loaders = list(combined.flattened) if combined is not None else []
    if not loaders or not isinstance(loaders[0], DataLoader):
        raise MisconfigurationException(message)
    return loaders[0]


class _ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``order`` (no padding, so sums over ranks count each sample once)."""

    def __init__(self, order: Sequence[int], rank: int, world: int) -> None:
        self.indices = list(order)[rank::world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader_view(
    loader: DataLoader, trainer: pl.Trainer, *, shuffle_seed: int | None = None, indices: Sequence[int] | None = None
) -> DataLoader:
    """A new DataLoader over ``loader.dataset`` with the same batch size, collate function and workers.

    The order is sequential, or a permutation drawn from ``shuffle_seed``; ``indices`` restricts it to a subset.
    Under DDP each rank takes every ``world_size``-th sample of that order. ``drop_last`` is off, and iterating the
    view never touches the original loader's sampler or generator. An ``IterableDataset`` is returned as is.
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return loader
    order = list(range(len(dataset))) if indices is None else list(indices)
    if shuffle_seed is not None:
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        order = [order[i] for i in perm]
    return DataLoader(
        dataset,
        batch_size=loader.batch_size or 1,
        sampler=_ShardSampler(order, trainer.global_rank, trainer.world_size),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU and CUDA), numpy and ``random`` with ``seed`` inside, and restore their states on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` and ``torch.no_grad()`` inside; every submodule's ``training`` flag restored on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def detached_copy(pl_module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy of the module without its trainer reference (for training estimation copies)."""
    trainer = pl_module._trainer
    pl_module._trainer = None
    try:
        return copy.deepcopy(pl_module)
    finally:
        pl_module._trainer = trainer


def run_forward(forward_fn: ForwardFn | None, module: pl.LightningModule, batch: Any) -> MultimodalOutput:
    """``forward_fn(module, batch)``, or ``module(batch)``."""
    return forward_fn(module, batch) if forward_fn is not None else module(batch)


def extract_features(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    view: DataLoader,
    modalities: Sequence[str],
    forward_fn: ForwardFn | None,
    method: str,
) -> tuple[dict[str, Tensor], Tensor, int]:
    """Encoder features (``MultimodalOutput.features``), labels and class count over a view, in dataset order.

    Eval mode, no grad, the trainer's precision context; half precision is upcast to float32. Under DDP every rank
    passes its shard of ``view`` (see :func:`loader_view`) and the shards are all-gathered back into the view's order,
    so every rank returns the same CPU tensors.

    Raises:
        ValueError: a modality's features are missing or not ``(B, D)``.
    """
    feats: dict[str, list[Tensor]] = {m: [] for m in modalities}
    labels: list[Tensor] = []
    classes = 0
    with eval_mode(module), trainer.precision_plugin.forward_context():
        for batch in view:
            output = run_forward(forward_fn, module, trainer.strategy.batch_to_device(batch))
            classes = output.logits.shape[1]
            for m in modalities:
                f = output.features.get(m)
                if f is None or f.ndim != 2:
                    shape = None if f is None else tuple(f.shape)
                    raise ValueError(
                        f"{method} needs `MultimodalOutput.features[{m!r}]` as a (B, D) tensor, got {shape}."
                    )
                feats[m].append(f.detach() if f.dtype == torch.float64 else f.detach().float())
            labels.append(output.targets.detach())
    local = {m: torch.cat(v) for m, v in feats.items()}
    local_y = torch.cat(labels)
    if trainer.world_size > 1:
        local = {m: _gather_in_order(trainer, f) for m, f in local.items()}
        local_y = _gather_in_order(trainer, local_y)
    return {m: v.cpu() for m, v in local.items()}, local_y.cpu(), classes


def _gather_in_order(trainer: pl.Trainer, local: Tensor) -> Tensor:
    """All-gather per-rank shards (rank r holds positions r, r + W, ...) and restore the global order."""
    world = trainer.world_size
    counts = trainer.strategy.all_gather(torch.tensor([local.shape[0]], device=local.device)).flatten().tolist()
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    stacked = trainer.strategy.all_gather(padded)  # (world, longest, ...)
    interleaved = stacked.transpose(0, 1).reshape(world * longest, *local.shape[1:])
    return interleaved[[k * world + r for k in range(longest) for r in range(world) if k < counts[r]]]
