import json
import math

import pytest

from lightning_mmbalance import OGMGE
from lightning_mmbalance.cli import MMBalanceCLI, main
from lightning_mmbalance.data import MultimodalDataModule, SyntheticDataModule
from lightning_mmbalance.experiment import (
    DATASETS,
    METHODS,
    RunResult,
    format_table,
    make_datamodule,
    method_callbacks,
    summarize,
)
from lightning_mmbalance.models import LateFusionClassifier


def _result(method, seed, acc, lr, probe=None, warnings=()):
    return RunResult(
        method=method,
        seed=seed,
        test_acc=acc,
        modality_acc={"gray": acc / 2, "color": acc / 4},
        val_acc=acc,
        best_epoch=0,
        log_dir="",
        lr=lr,
        probe_acc=probe or {},
        warnings=list(warnings),
    )


def test_compare_smoke(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["compare", "--methods", "ogm_ge", "baseline", "--seeds", "1", "--epochs", "1", "--lrs", "0.01", "0.05"]
    assert main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/4] ogm_ge lr 0.01 seed 0" in printed and "[4/4] baseline lr 0.05 seed 0" in printed  # progress
    table = printed[printed.index("method ") :]
    assert table.index("baseline") < table.index("ogm_ge")  # table order is METHODS order
    assert "lr per seed" in table and "x " not in table  # no time ratios, only the labelled wall time
    assert "not an overhead measurement" in table
    markdown = (out / "results.md").read_text()
    assert markdown.index("| baseline |") < markdown.index("| ogm_ge |") and "lr per seed" in markdown
    assert (out / "summary.png").stat().st_size > 1000
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"baseline", "ogm_ge"}
    for r in runs:  # each learning rate was tried, and the chosen one has the best validation accuracy
        assert set(r["grid"]) == {"0.01", "0.05"} and r["lr"] in (0.01, 0.05)
        assert r["val_acc"] == max(r["grid"].values()) == r["grid"][str(r["lr"])]
    assert all(0 <= r["test_acc"] <= 1 and set(r["modality_acc"]) == {"gray", "color"} for r in runs)
    events = list((out / "cg-digits").rglob("events.out.tfevents.*"))
    assert {p.parent.parent.name for p in events} == {"baseline", "ogm_ge"}


@pytest.mark.parametrize("flag", ["--seeds", "--epochs"])
def test_compare_rejects_non_positive(flag, capsys):
    assert main(["compare", flag, "0"]) == 2
    assert "--seeds and --epochs must be >= 1" in capsys.readouterr().err


def test_compare_needs_a_learning_rate():
    from lightning_mmbalance.compare import compare

    with pytest.raises(ValueError, match="`lrs` must hold at least one learning rate"):
        compare(methods=["baseline"], lrs=[])


def test_compare_rejects_a_non_positive_learning_rate(capsys):
    assert main(["compare", "--lrs", "0.01", "0"]) == 2
    assert "every --lrs value must be > 0, got [0.01, 0.0]" in capsys.readouterr().err


def test_compare_rejects_unknown_method(capsys):
    assert main(["compare", "--methods", "nope"]) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err


def test_usage(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("compare", "fit", "validate", "test", "predict"))
    assert main(["bogus"]) == 2
    assert "usage: mmbalance" in capsys.readouterr().err


def test_every_method_and_dataset_has_a_factory():
    for dataset in DATASETS:
        assert isinstance(make_datamodule(dataset), MultimodalDataModule)
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'; available: \('cg-digits'"):
        make_datamodule("mnist")
    with pytest.raises(ValueError, match=r"Unknown method 'x'; available: \('baseline'"):
        method_callbacks("x", 3)
    for method in METHODS:
        callbacks = method_callbacks(method, max_epochs=10)
        assert (method == "baseline") == (callbacks == [])


def test_scaling_methods_scale_the_update_on_request():
    for method in ("ogm_ge", "ogm_ge_0.8", "mmpareto", "arl", "agm"):
        (callback,) = method_callbacks(method, 10, "update")
        assert callback.modulate == "update"
        assert method_callbacks(method, 10)[0].modulate == "gradient"


def test_schedules_scale_with_run_length():
    (short,) = method_callbacks("ogm_ge", max_epochs=4)
    (long,) = method_callbacks("ogm_ge", max_epochs=100)
    assert (short.modulation_ends, long.modulation_ends) == (2, 50)
    assert [method_callbacks("opm", max_epochs=e)[0].modulation_starts for e in (4, 100)] == [1, 6]  # official 0-5


def test_unknown_names():
    with pytest.raises(ValueError, match=r"Unknown method 'nope'; available: \('baseline'"):
        method_callbacks("nope", 10)
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'; available: \('cg-digits'"):
        make_datamodule("mnist")
    assert tuple(make_datamodule("synthetic3").modalities) == ("m0", "m1", "m2")


def test_summarize_mean_std_and_learning_rates():
    results = [
        _result("ogm_ge", 1, 0.6, 0.03, {"gray": 0.7, "color": 0.4}, warnings=["w"]),
        _result("baseline", 0, 0.6, 0.01, {"gray": 0.3, "color": 0.9}),
        _result("ogm_ge", 0, 0.8, 0.01, {"gray": 0.5, "color": 0.4}),
        _result("baseline", 1, 0.7, 0.01, {"gray": 0.4, "color": 0.9}),
    ]
    base, ogm = summarize(results)
    assert (base.method, ogm.method) == ("baseline", "ogm_ge")
    assert ogm.test_acc[0] == pytest.approx(0.7) and ogm.test_acc[1] == pytest.approx(math.sqrt(0.02))
    assert ogm.modality_acc["gray"][0] == pytest.approx(0.35)
    assert ogm.probe_acc["gray"] == pytest.approx((0.6, math.sqrt(0.02)))
    assert (base.lrs, ogm.lrs) == ([0.01, 0.01], [0.01, 0.03])  # in seed order
    assert (base.warnings, ogm.warnings) == (0, 1)
    table = format_table([base, ogm])
    assert "70.0 ± 14.1" in table and "0.01 (all)" in table and "0.01, 0.03" in table
    header = ["method", "fused", "acc", "gray", "acc", "color", "acc", "lr", "per", "seed", "seeds", "wall", "time*"]
    assert table.splitlines()[0].split() == header


def test_fit_with_a_callback_from_the_command_line(tmp_path):
    cli = MMBalanceCLI(
        LateFusionClassifier,
        MultimodalDataModule,
        subclass_mode_data=True,
        run=False,
        args=[
            "--data=SyntheticDataModule",
            "--data.n_train=128",
            "--trainer.callbacks+=lightning_mmbalance.OGMGE",
            "--trainer.callbacks.alpha=0.3",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert isinstance(cli.datamodule, SyntheticDataModule)
    assert cli.model.hparams.input_shapes == {"m0": [32], "m1": [32]}  # linked from the data module
    (ogm,) = [c for c in cli.trainer.callbacks if isinstance(c, OGMGE)]
    assert ogm.alpha == 0.3
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2


def test_fit_from_a_yaml_config(tmp_path, monkeypatch):
    config = tmp_path / "ogm.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_mmbalance.OGMGE
      init_args:
        alpha: 0.5
data:
  class_path: lightning_mmbalance.data.CGDigitsDataModule
  init_args:
    batch_size: 32
model:
  fusion: sum
"""
    )
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(config)]) == 0
    assert "OGMGE" in (tmp_path / "config.yaml").read_text()
