from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mmbalance import BalancingCallback, MultimodalCallback
from lightning_mmbalance.callbacks.base import StepStatistics
from tests.helpers.tiny import (
    SaveParams,
    ShareCallback,
    TinyData,
    TinyModel,
    assert_states_close,
    load_ranks,
)
from tests.helpers.tiny import fit as _fit
from tests.helpers.tiny import params_of as _params


def test_statistics_and_gradients_applied():
    """The factors change training, and the statistics are the sums of the step's samples."""
    cb = ShareCallback()
    _, model = _fit([cb], max_steps=1, data=TinyData(batch_size=8))
    _, plain = _fit([], max_steps=1, data=TinyData(batch_size=8))
    assert len(cb.seen) == 1
    out = TinyModel()(next(iter(TinyData(batch_size=8).train_dataloader())))
    y = out.targets.unsqueeze(1)
    expected = [float(torch.softmax(out.unimodal_logits[m], 1).gather(1, y).sum()) for m in ("a", "b")]
    assert cb.seen[0] == pytest.approx(expected, rel=1e-12)
    assert not torch.equal(model.encoders["a"][0].weight, plain.encoders["a"][0].weight)
    torch.testing.assert_close(model.head.weight, plain.head.weight, rtol=0, atol=0)


def test_accumulation_equals_big_batch():
    a_cb, b_cb = ShareCallback(), ShareCallback()
    _, acc = _fit([a_cb], data=TinyData(batch_size=4), accumulate_grad_batches=2)
    _, big = _fit([b_cb], data=TinyData(batch_size=8))
    assert len(a_cb.seen) == len(b_cb.seen) == 8
    for s1, s2 in zip(a_cb.seen, b_cb.seen, strict=True):
        assert s1 == pytest.approx(s2, rel=1e-12)
    assert_states_close(_params(acc), _params(big), atol=1e-12)


def test_update_mode_scales_the_sgd_update():
    """For plain SGD (no momentum, no weight decay) update mode equals gradient mode."""
    _, grad_mode = _fit([ShareCallback("gradient")], max_steps=3)
    _, update_mode = _fit([ShareCallback("update")], max_steps=3)
    assert_states_close(_params(grad_mode), _params(update_mode), atol=1e-12)


def test_update_mode_with_adam():
    """The encoder update is factor x the plain Adam update of the same gradient."""
    cb = ShareCallback("update")
    model = TinyModel(optimizer="adam", lr=0.01)
    before = _params(model)
    _fit([cb], model=model, max_steps=1)
    plain = TinyModel(optimizer="adam", lr=0.01)
    _fit([], model=plain, max_steps=1)
    a, b = cb.seen[0]
    factor_a = 2 * a / (a + b)
    key = "encoders.a.0.weight"
    torch.testing.assert_close(
        model.state_dict()[key] - before[key], factor_a * (plain.state_dict()[key] - before[key])
    )
    torch.testing.assert_close(model.head.weight, plain.head.weight, rtol=0, atol=0)


def test_adaptive_optimizer_warns_in_gradient_mode():
    with pytest.warns(UserWarning, match=r"Adam normalises gradient magnitudes.*modulate='update'"):
        _fit([ShareCallback("gradient")], model=TinyModel(optimizer="adam"), max_steps=1)


def test_step_statistics_are_named_summed_and_counted():
    """Named statistics of any shape come back summed over the step's micro-batches, with the sample count."""
    seen = []

    class Shapes(MultimodalCallback):
        method = "shapes"

        def step_statistics(self, record):
            y = record.output.targets.double()
            return {"total": y.sum(), "per_class": torch.stack([(y == c).sum() for c in range(3)]).double()}

        def on_step(self, trainer, pl_module, stats):
            seen.append(stats)

    _fit([Shapes()], data=TinyData(batch_size=4), accumulate_grad_batches=2, max_steps=2)
    first = next(iter(TinyData(batch_size=8).train_dataloader()))[1].double()
    assert isinstance(seen[0], StepStatistics) and seen[0].count == 8.0
    assert seen[0]["total"] == [float(first.sum())]
    assert seen[0]["per_class"] == [float((first == c).sum()) for c in range(3)]
    assert seen[0].mean("total") == [float(first.mean())]


def test_statistics_without_count_when_a_method_declares_none():
    seen = []

    class Nothing(MultimodalCallback):
        def on_step(self, trainer, pl_module, stats):
            seen.append(stats)

    _fit([Nothing()], max_steps=1)
    assert seen == [StepStatistics({}, 0.0)]


def test_two_loss_weight_setters_is_an_error():
    class Other(ShareCallback):
        pass

    with pytest.raises(MisconfigurationException, match=r"\['ShareCallback', 'Other'\] all set the loss weights"):
        _fit([ShareCallback(weights=True), Other(weights=True)])
    _fit([ShareCallback(weights=True), Other()], max_steps=1)  # only one sets weights: fine


def test_manual_optimization_refused():
    class Manual(TinyModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(MisconfigurationException, match="does not support manual optimization"):
        _fit([ShareCallback()], model=Manual())


@pytest.mark.parametrize(
    ("cls", "match"),
    [(DeepSpeedStrategy, "does not support DeepSpeed"), (FSDPStrategy, "does not support FSDPStrategy")],
)
def test_sharded_strategies_refused(cls, match):
    trainer = SimpleNamespace(strategy=cls.__new__(cls))
    with pytest.raises(MisconfigurationException, match=match):
        ShareCallback()._check_strategy(trainer)


def test_init_validation():
    with pytest.raises(ValueError, match=r"`modulate` must be one of \('gradient', 'update'\), got 'grad'"):
        ShareCallback("grad")
    with pytest.raises(TypeError, match="mapping of modality name to dotted attribute path"):
        ShareCallback(encoders={"a": 1, "b": 2})
    with pytest.raises(ValueError, match="at least 2 modalities"):
        ShareCallback(encoders={"a": "x"})


def test_state_version_checked():
    cb = ShareCallback()
    cb.load_state_dict(cb.state_dict())
    with pytest.raises(ValueError, match=r"unsupported checkpoint state version 7 \(expected 1 to 1\)"):
        cb.load_state_dict({"version": 7})


def test_missing_unimodal_logits_error():
    class NoUni(TinyModel):
        def forward(self, batch):
            out = super().forward(batch)
            out.unimodal_logits = {}
            return out

    with pytest.raises(ValueError, match=r"ShareCallback needs per-modality logits.*lacks \['a', 'b'\]"):
        _fit([ShareCallback()], model=NoUni())


def test_tensorboard_event_round_trip(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = ShareCallback()
    _fit([cb], logger=logger, log_every_n_steps=1, max_steps=4)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"mmbalance/share/factor/a", "mmbalance/share/factor/b"} <= set(tags)
    events = acc.Scalars("mmbalance/share/factor/a")
    a, b = cb.seen[-1]
    assert len(events) == 4 and events[-1].value == pytest.approx(2 * a / (a + b), rel=1e-6)


@pytest.mark.ddp
def test_ddp_ranks_identical_and_equal_to_one_process(tmp_path):
    """2 ranks x B equals 1 process x 2B, and the ranks end identical."""
    _fit(
        [ShareCallback(), SaveParams(tmp_path)],
        data=TinyData(batch_size=4),
        strategy="ddp_fork",
        devices=2,
        max_epochs=2,
    )
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    _, single = _fit([ShareCallback()], data=TinyData(batch_size=8), max_epochs=2)
    assert_states_close(rank0, {k: v.cpu() for k, v in single.state_dict().items()}, atol=1e-10)


def test_base_is_abstract_enough_to_subclass():
    assert issubclass(ShareCallback, BalancingCallback) and issubclass(BalancingCallback, MultimodalCallback)
    assert ShareCallback().tag("factor", "a") == "mmbalance/share/factor/a"
    assert ShareCallback().tag("gap") == "mmbalance/share/gap"


def test_step_values_follow_the_trainer_logging_cadence(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = ShareCallback()
    _fit([cb], logger=logger, log_every_n_steps=3, max_steps=7)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("mmbalance/share/factor/a")] == [2, 5]  # steps 3 and 6 (0-indexed 2, 5)
    assert len(cb.seen) == 7  # the method itself ran at every step


def test_tensor_statistics_stay_tensors_after_the_reduction():
    """Statistics named in ``tensor_statistics`` come back as device tensors of their shape, the others as floats."""
    from types import SimpleNamespace

    from lightning_mmbalance.callbacks.base import _reduce

    sums = {"g": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64), "s": torch.tensor([0.5, 1.5])}
    stats = _reduce(SimpleNamespace(world_size=1), sums, 4.0, frozenset({"g"}))
    assert stats.sums == {"s": [0.5, 1.5]} and stats.count == 4.0
    assert torch.equal(stats.tensors["g"], sums["g"])
