"""FSDP2 on CPU for the tests: Lightning's ModelParallelStrategy launched with fork, and a module that shards itself.

``ModelParallelStrategy`` only has a launcher that re-runs the command line, which would re-run pytest; the tests fork
the two processes instead, as the ``ddp_fork`` tests do. The parent process cannot load rank 0's weights (a state dict
of ``DTensor`` s), so the launcher does not send them back; the tests save every rank's gathered parameters with
:class:`SaveFullParams` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch.distributed.fsdp import fully_shard

from lightning_mmbalance.utilities.distributed import is_sharded
from tests.helpers.tiny import TinyModel


class _ForkLauncher(_MultiProcessingLauncher):
    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> Any:
        output = super()._collect_rank_zero_results(trainer, results)
        if output is None or output.weights_path is None:
            return output
        os.remove(output.weights_path)
        return output._replace(weights_path=None)


class ForkModelParallel(ModelParallelStrategy):
    """FSDP2 over 2 CPU processes (gloo), forked; each rank keeps a shard of every parameter."""

    def __init__(self) -> None:
        super().__init__(data_parallel_size=2, tensor_parallel_size=1)

    def _configure_launcher(self) -> None:
        self._launcher = _ForkLauncher(self, start_method="fork")


class ShardedTinyModel(TinyModel):
    """``TinyModel`` (float64) that shards each encoder, then itself, in ``configure_model``."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for encoder in self.encoders.values():
            fully_shard(encoder, mesh=mesh)
        fully_shard(self, mesh=mesh)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state with sharded tensors gathered (a collective: every rank must call it)."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu().clone() for k, v in module.state_dict().items()}


class AssertSharded(pl.Callback):
    """Fails the fit unless every parameter is a DTensor shard when training starts."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        unsharded = [n for n, p in pl_module.named_parameters() if not is_sharded(p)]
        assert not unsharded, unsharded


class SaveFullParams(pl.Callback):
    """Saves the gathered parameters at the end of training to ``<folder>/rank<r>.pt`` on every rank."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(full_state(pl_module), self.folder / f"rank{trainer.global_rank}.pt")
