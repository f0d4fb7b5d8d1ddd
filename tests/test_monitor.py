import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mmbalance import OGMGE, ModalityMonitor
from lightning_mmbalance.functional.diagnostics import shapley_values
from lightning_mmbalance.masking import masked_forward
from tests.helpers.tiny import SaveParams, TinyData, TinyModel, assert_states_close, load_ranks, trainer_kwargs

PER_STEP = ("acc", "loss", "score", "ratio", "entropy", "abs_logit", "grad_norm", "update_ratio")


def _fit(callbacks, model=None, data=None, **kw):
    kw = trainer_kwargs(callbacks=callbacks, **{"limit_val_batches": 1.0, **kw})
    trainer = pl.Trainer(**kw)
    model = model or TinyModel(momentum=0.9)
    trainer.fit(model, datamodule=data or TinyData())
    return trainer, model


def test_monitor_leaves_training_bit_identical():
    _, monitored = _fit([ModalityMonitor(conflict_every_n_steps=1, linear_probe=True)], max_epochs=2)
    _, plain = _fit([], max_epochs=2)
    assert_states_close(monitored.state_dict(), plain.state_dict(), atol=0)


def test_per_step_values_match_an_independent_computation():
    mon = ModalityMonitor(masked_eval=False, shapley=False)
    trainer, _ = _fit([mon], max_steps=1, data=TinyData(batch_size=8))
    batch = next(iter(TinyData(batch_size=8).train_dataloader()))
    out = TinyModel(momentum=0.9)(batch)
    y = out.targets
    metrics = trainer.callback_metrics
    accs = {}
    for m in ("a", "b"):
        z = out.unimodal_logits[m]
        p = torch.softmax(z, 1)
        accs[m] = float((z.argmax(1) == y).double().mean())
        assert float(metrics[f"mmbalance/monitor/acc/{m}"]) == pytest.approx(accs[m], abs=1e-6)
        ce = float(torch.nn.functional.cross_entropy(z, y))
        assert float(metrics[f"mmbalance/monitor/loss/{m}"]) == pytest.approx(ce, rel=1e-6)
        score = float(p.gather(1, y[:, None]).mean())
        assert float(metrics[f"mmbalance/monitor/score/{m}"]) == pytest.approx(score, rel=1e-6)
        entropy = float(-(p * torch.log(p + 1e-16)).sum(1).mean())
        assert float(metrics[f"mmbalance/monitor/entropy/{m}"]) == pytest.approx(entropy, rel=1e-6)
        assert float(metrics[f"mmbalance/monitor/abs_logit/{m}"]) == pytest.approx(
            float(z.abs().sum(1).mean()), rel=1e-6
        )
    s_a, s_b = (float(metrics[f"mmbalance/monitor/score/{m}"]) for m in "ab")
    assert float(metrics["mmbalance/monitor/ratio/a"]) == pytest.approx(s_a / s_b, rel=1e-5)
    assert float(metrics["mmbalance/monitor/imbalance_gap"]) == pytest.approx(abs(accs["a"] - accs["b"]), abs=1e-6)
    assert (
        float(metrics["mmbalance/monitor/grad_norm/a"]) > 0 and float(metrics["mmbalance/monitor/update_ratio/b"]) > 0
    )


def test_conflict_cosine():
    mon = ModalityMonitor(conflict_every_n_steps=1, masked_eval=False, shapley=False)
    trainer, _ = _fit([mon], max_steps=1, data=TinyData(batch_size=8))
    batch = next(iter(TinyData(batch_size=8).train_dataloader()))
    model = TinyModel(momentum=0.9)
    out = model(batch)
    ce = torch.nn.functional.cross_entropy
    for m in ("a", "b"):
        params = list(model.encoders[m].parameters())
        g_f = torch.cat(
            [g.flatten() for g in torch.autograd.grad(ce(out.logits, out.targets), params, retain_graph=True)]
        )
        g_u = torch.cat(
            [
                g.flatten()
                for g in torch.autograd.grad(ce(out.unimodal_logits[m], out.targets), params, retain_graph=True)
            ]
        )
        cos = float(torch.nn.functional.cosine_similarity(g_f, g_u, dim=0))
        assert float(trainer.callback_metrics[f"mmbalance/monitor/cos/{m}"]) == pytest.approx(cos, abs=1e-6)
        assert float(trainer.callback_metrics[f"mmbalance/monitor/conflict/{m}"]) == float(cos <= 0)


def test_validation_masked_accuracy_utilisation_and_shapley():
    mon = ModalityMonitor()
    trainer, model = _fit([mon], max_epochs=1)
    val = TinyData().val_dataloader()
    model.eval()
    correct = {}
    with torch.no_grad():
        for masked in (frozenset(), frozenset("a"), frozenset("b"), frozenset("ab")):
            hits = n = 0
            for batch in val:
                out = masked_forward(model, batch, masked, model.encoders)
                hits += int((out.logits.argmax(1) == out.targets).sum())
                n += len(out.targets)
            correct[masked] = hits / n
    metrics = trainer.callback_metrics
    assert float(metrics["mmbalance/monitor/masked_acc/a"]) == pytest.approx(correct[frozenset("a")], abs=1e-6)
    full = correct[frozenset()]
    assert float(metrics["mmbalance/monitor/utilization/b"]) == pytest.approx(
        (full - correct[frozenset("b")]) / full, abs=1e-6
    )
    acc = {frozenset("ab") - k: v for k, v in correct.items()}
    phi = shapley_values(acc, ["a", "b"])
    assert float(metrics["mmbalance/monitor/shapley/a"]) == pytest.approx(phi["a"], abs=1e-6)
    assert phi["a"] + phi["b"] == pytest.approx(full - correct[frozenset("ab")], abs=1e-12)  # efficiency
    assert "mmbalance/monitor/val_acc/a" in metrics


def test_shapley_three_players():
    acc = {
        frozenset(): 0.1, frozenset("a"): 0.5, frozenset("b"): 0.3, frozenset("c"): 0.2,
        frozenset("ab"): 0.7, frozenset("ac"): 0.6, frozenset("bc"): 0.4, frozenset("abc"): 0.8,
    }  # fmt: skip
    phi = shapley_values(acc, ["a", "b", "c"])
    assert sum(phi.values()) == pytest.approx(0.7)
    expected_a = (1 / 3) * (0.5 - 0.1) + (1 / 6) * (0.7 - 0.3) + (1 / 6) * (0.6 - 0.2) + (1 / 3) * (0.8 - 0.4)
    assert phi["a"] == pytest.approx(expected_a, abs=1e-12)


def test_linear_probe_and_summary_figure(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    mon = ModalityMonitor(linear_probe=True)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit([mon, OGMGE(alpha=0.5)], max_epochs=3, logger=logger, log_every_n_steps=1)
    assert set(mon.linear_probe_accuracy) == {"a", "b"}
    assert all(0 <= v <= 1 for v in mon.linear_probe_accuracy.values())
    assert mon.linear_probe_accuracy["a"] > mon.linear_probe_accuracy["b"]  # "a" carries the stronger signal
    assert (tmp_path / "tb" / "version_0" / "mmbalance_summary.png").stat().st_size > 1000
    assert any("coefficient" in k for k in mon.history)


def test_event_file_round_trip(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit([ModalityMonitor()], max_epochs=2, logger=logger, log_every_n_steps=1)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for q in PER_STEP:
        assert {f"mmbalance/monitor/{q}/a", f"mmbalance/monitor/{q}/b"} <= tags, q
    for q in ("val_acc", "masked_acc", "utilization", "shapley"):
        assert f"mmbalance/monitor/{q}/b" in tags
    assert len(acc.Scalars("mmbalance/monitor/masked_acc/a")) == 2  # one per validation epoch


@pytest.mark.parametrize(
    ("log_every", "every", "conflict_every", "acc_steps", "cos_steps"),
    [
        (1, 3, 2, [2, 5, 8, 11], [1, 3, 5, 7, 9, 11]),
        (4, 2, 3, [3, 7, 11], [11]),  # aligned to the Trainer's cadence: lcm(2, 4) = 4, lcm(3, 4) = 12
        (4, 1, None, [3, 7, 11], []),
    ],
)
def test_cadence_is_aligned_to_log_every_n_steps(tmp_path, log_every, every, conflict_every, acc_steps, cos_steps):
    mon = ModalityMonitor(every_n_steps=every, conflict_every_n_steps=conflict_every, masked_eval=False, shapley=False)
    measured, conflicts = [], []
    logging_step, conflict_values = mon._logging_step, mon._conflict_values
    mon._logging_step = lambda t, f=logging_step: f(t) and (measured.append(t.global_step) or True)
    mon._conflict_values = lambda t: conflicts.append(t.global_step) or conflict_values(t)
    kw = dict(max_epochs=2, max_steps=12, log_every_n_steps=log_every)
    _fit([mon], logger=CSVLogger(tmp_path, name="", version=""), **kw)
    assert measured == acc_steps and conflicts == cos_steps  # no work on the other steps
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    written = [int(r["step"]) for r in rows if r.get("mmbalance/monitor/acc/a")]
    assert written[0] == acc_steps[0]
    if log_every > 1:  # every written step is a measured one
        assert written == acc_steps


@pytest.mark.ddp
def test_ddp_reduced_and_identical(tmp_path):
    mon = ModalityMonitor(conflict_every_n_steps=2, linear_probe=True)
    kw = dict(max_epochs=2, strategy="ddp_fork", devices=2, limit_val_batches=1.0)
    _fit([mon, SaveParams(tmp_path)], data=TinyData(batch_size=4), **kw)
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    plain = TinyModel(momentum=0.9)
    _fit([], model=plain, data=TinyData(batch_size=8), max_epochs=2)
    assert_states_close(rank0, plain.state_dict(), atol=1e-10)


def test_errors():
    class NoUni(TinyModel):
        def forward(self, batch):
            out = super().forward(batch)
            out.unimodal_logits = {}
            return out

    with pytest.raises(ValueError, match="ModalityMonitor needs per-modality logits"):
        _fit([ModalityMonitor()], model=NoUni())
    dims = {m: 2 for m in "abcde"}
    with pytest.raises(ValueError, match="5 modalities is too many. Pass `shapley=False`"):
        _fit([ModalityMonitor()], model=TinyModel(dims=dims), data=TinyData(dims=dims))


def test_no_logger_no_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit([ModalityMonitor(linear_probe=True)], max_epochs=1, default_root_dir=tmp_path)
    assert not list(tmp_path.rglob("mmbalance_summary.png"))  # no logger folder: nothing written anywhere


def test_training_data_must_be_one_loader():
    class DictBatches(TinyModel):
        def forward(self, batch):
            return super().forward(batch["x"] if isinstance(batch, dict) else batch)

    class Data(TinyData):
        def train_dataloader(self):
            return {"x": super().train_dataloader()}

    with pytest.raises(
        MisconfigurationException, match="ModalityMonitor needs the training data as one DataLoader, got"
    ):
        _fit([ModalityMonitor(linear_probe=True)], model=DictBatches(), data=Data(), max_epochs=1)


def test_state_keeps_the_figure_history_and_loads_version_1():
    mon = ModalityMonitor(masked_eval=False, shapley=False)
    _fit([mon], max_steps=3, log_every_n_steps=1)
    assert mon.history and all(len(points) == 3 for points in mon.history.values())
    other = ModalityMonitor()
    other.load_state_dict(mon.state_dict())
    assert other.history == mon.history
    other.load_state_dict({"version": 1})  # version-1 states carried no history
    assert other.history == {}
