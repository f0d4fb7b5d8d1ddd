"""FSDP2 (Lightning's ModelParallelStrategy with ``fully_shard``) on 2 CPU processes: every callback equals one process.

2 ranks x batch 4 against 1 process x batch 8, float64: every parameter within 1e-10 (float64 rounding of sums taken
in another order), for every callback of the shared table; OGM-GE's noise included (the global per-tensor std, and
the whole tensor's draw sliced per shard). Exact resume from a distributed checkpoint; the refusals.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mmbalance import AGM, OGMGE, GradientBlending, ModalityMonitor
from tests.helpers.harness import CALLBACKS
from tests.helpers.sharded import AssertSharded, ForkModelParallel, SaveFullParams, ShardedTinyModel
from tests.helpers.tiny import TinyData, TinyModel, assert_states_close, fit, load_ranks, trainer_kwargs

SHARDABLE = [name for name in CALLBACKS if name != "gradient_blending" and not name.startswith("agm")]


def _sharded_fit(name: str, folder, callbacks=None, **overrides):
    case = CALLBACKS[name]
    callbacks = case.factory(None) if callbacks is None else callbacks
    folder.mkdir(parents=True, exist_ok=True)
    kw = trainer_kwargs(
        callbacks=[*callbacks, AssertSharded(), SaveFullParams(folder)],
        max_epochs=case.epochs,
        limit_val_batches=1.0 if case.needs_val else 0,
        strategy=ForkModelParallel(),
        devices=2,
    )
    kw.update(overrides)
    pl.Trainer(**kw).fit(ShardedTinyModel(momentum=0.9), datamodule=TinyData(batch_size=4))
    return load_ranks(folder)


def _single_fit(name: str, **overrides):
    case = CALLBACKS[name]
    kw = {"max_epochs": case.epochs, "limit_val_batches": 1.0 if case.needs_val else 0, **overrides}
    return fit(case.factory(None), model=TinyModel(momentum=0.9), data=TinyData(batch_size=8), **kw)[1]


@pytest.mark.ddp
@pytest.mark.parametrize("name", SHARDABLE)
def test_fsdp2_equals_one_process(tmp_path, name):
    rank0, rank1 = _sharded_fit(name, tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    single = _single_fit(name)
    assert_states_close(rank0, {k: v.detach() for k, v in single.state_dict().items()}, atol=1e-10)


@pytest.mark.ddp
@pytest.mark.parametrize(("noise", "modulate"), [(False, "gradient"), (True, "update")])
def test_fsdp2_ogm_ge_other_modes_equal_one_process(tmp_path, noise, modulate):
    """The two OGM-GE combinations the shared table does not hold (it has noise + gradient, no noise + update)."""
    make = lambda: [OGMGE(alpha=0.5, noise=noise, modulate=modulate)]  # noqa: E731
    rank0, _ = _sharded_fit("ogm_ge", tmp_path, callbacks=make())
    single = fit(make(), model=TinyModel(momentum=0.9), data=TinyData(batch_size=8), max_epochs=2)[1]
    assert_states_close(rank0, {k: v.detach() for k, v in single.state_dict().items()}, atol=1e-10)


@pytest.mark.ddp
def test_fsdp2_monitor_conflict_test_equals_one_process(tmp_path):
    """The conflict test's two extra gradients come from backward passes under FSDP2 (autograd.grad cannot)."""
    logged = {}

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_rank == 0:
                logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if "/cos/" in k})
                torch.save(logged, tmp_path / "cos.pt")

    monitor = ModalityMonitor(conflict_every_n_steps=2, masked_eval=False, shapley=False)
    _sharded_fit("monitor", tmp_path, callbacks=[monitor, Keep()])
    sharded = torch.load(tmp_path / "cos.pt")
    trainer, _ = fit(
        [ModalityMonitor(conflict_every_n_steps=2, masked_eval=False, shapley=False)],
        model=TinyModel(momentum=0.9),
        data=TinyData(batch_size=8),
        max_epochs=2,
    )
    assert sharded
    for key, value in sharded.items():
        assert value == pytest.approx(float(trainer.callback_metrics[key]), abs=1e-9)


@pytest.mark.ddp
@pytest.mark.parametrize("modulate", ["gradient", "update"])
def test_fsdp2_agm_without_masked_graphs_equals_one_process(tmp_path, modulate):
    """AGM's masked forwards run on the sharded module (no graphs, no conditional clip): equal to one process."""
    make = lambda: [AGM(masked_graph="none", head_grad_clip=None, modulate=modulate)]  # noqa: E731
    rank0, rank1 = _sharded_fit("agm", tmp_path, callbacks=make())
    assert_states_close(rank0, rank1, atol=0)
    single = fit(make(), model=TinyModel(momentum=0.9), data=TinyData(batch_size=8), max_epochs=2)[1]
    assert_states_close(rank0, {k: v.detach() for k, v in single.state_dict().items()}, atol=1e-10)


@pytest.mark.ddp
def test_fsdp2_refuses_agm_masked_graphs_and_clip(tmp_path):
    with pytest.raises(Exception, match=r"needs `masked_graph='none'` and `head_grad_clip=None`.*masked_graph='head'"):
        _sharded_fit("agm", tmp_path)


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["relearning", "arl", "gradient_blending_joint"])
def test_fsdp2_resume_is_exact(tmp_path, name):
    """A resume on 2 ranks from a distributed checkpoint equals an uninterrupted run (D&R's gathered theta0 too)."""
    case = CALLBACKS[name]
    full0, _ = _sharded_fit(name, tmp_path / "full", max_epochs=2 * case.epochs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _sharded_fit(
        name,
        tmp_path / "part",
        callbacks=[*case.factory(None), checkpoint],
        max_epochs=case.epochs,
        enable_checkpointing=True,
    )
    (tmp_path / "resumed").mkdir()
    kw = trainer_kwargs(
        callbacks=[*case.factory(None), SaveFullParams(tmp_path / "resumed")],
        max_epochs=2 * case.epochs,
        limit_val_batches=1.0 if case.needs_val else 0,
        strategy=ForkModelParallel(),
        devices=2,
        enable_checkpointing=True,
    )
    model = ShardedTinyModel(momentum=0.9, seed=123)
    pl.Trainer(**kw).fit(model, datamodule=TinyData(batch_size=4), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    resumed0, _ = load_ranks(tmp_path / "resumed")
    assert_states_close(resumed0, full0, atol=0)


@pytest.mark.ddp
def test_fsdp2_refuses_gradient_blending_copies(tmp_path):
    with pytest.raises(Exception, match=r"estimator='copies'.*cannot be copied.*estimator='joint'"):
        _sharded_fit("gradient_blending", tmp_path, callbacks=[GradientBlending(super_epoch=1)])


def test_fsdp1_refused_with_a_pointer_to_fsdp2():
    trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy \(FSDP1\).*ModelParallelStrategy"):
        ModalityMonitor()._check_strategy(trainer)


def test_tensor_parallelism_refused():
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy.__new__(ModelParallelStrategy)
    strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2)}
    with pytest.raises(MisconfigurationException, match=r"data-parallel sharding only.*tensor-parallel size of 2"):
        ModalityMonitor()._check_strategy(SimpleNamespace(strategy=strategy))


def test_second_gradient_of_sharded_encoders_needs_their_outputs(monkeypatch):
    import lightning_mmbalance.callbacks.base as base

    monkeypatch.setattr(base, "is_sharded", lambda tensor: True)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), accumulate_grad_batches=1)
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match="encoders' outputs are needed to take a second gradient; none were seen"):
        base.add_loss_gradients(trainer, (param * 2).sum(), [param], [torch.zeros(2)])


class PooledOutputs(torch.nn.Module):
    """Returns a dict whose ``pooled`` tensor is computed from ``h``, as a ModelOutput's pooler output is."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.pool = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.linear(x)
        return {"h": h, "pooled": torch.tanh(self.pool(h)), "ids": torch.arange(2)}


def test_second_gradient_through_a_structured_output_counts_each_path_once(monkeypatch):
    """The gradient of the loss through the encoder's kept outputs equals ``autograd.grad`` on its parameters."""
    import lightning_mmbalance.callbacks.base as base

    torch.manual_seed(0)
    encoder = PooledOutputs().double()
    callback = ModalityMonitor()
    callback._encoders = {"a": encoder}
    handle = encoder.register_forward_hook(callback._keep_output("a"))
    out = encoder(torch.randn(2, 3, dtype=torch.float64))
    handle.remove()
    loss = (out["h"] ** 2).sum() + 3 * out["pooled"].sum()
    params = list(encoder.parameters())
    expected = torch.autograd.grad(loss, params, retain_graph=True)
    monkeypatch.setattr(base, "is_sharded", lambda tensor: True)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), accumulate_grad_batches=1, lightning_module=encoder)
    into = [torch.zeros_like(p) for p in params]
    assert len(callback.encoder_outputs()) == 2  # the integer tensor is not differentiable
    base.add_loss_gradients(trainer, loss, params, into, callback.encoder_outputs())
    for got, want in zip(into, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
