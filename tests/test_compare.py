"""`mmbalance compare` on a user's own module and data module (tests/helpers/user_av.py), via the installed command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_mmbalance.cli import main
from lightning_mmbalance.compare import CompareError, compare, resolve_method, trainer_arguments
from tests.helpers.user_av import AudioVisual, AVData, FixedLr, IgnoresLr, TensorForward, TrainOnly

ROOT = Path(__file__).resolve().parents[1]
USER = "tests.helpers.user_av"


def _command() -> list[str]:
    script = Path(sys.executable).with_name("mmbalance")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_mmbalance.cli"]


def _mmbalance(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    return subprocess.run(
        [*_command(), "compare", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def _results(out: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}


def test_compare_a_users_model_resumes_and_reads_back(tmp_path):
    log = tmp_path / "callbacks.txt"
    config = tmp_path / "compare.yaml"
    config.write_text(
        f"""
model:
  class_path: {USER}.AudioVisual
  init_args: {{hidden: 6}}
data:
  class_path: {USER}.AVData
methods:
  - baseline
  - OGMGE: {{alpha: 0.5, modulation_ends: 1}}
  - UnimodalLosses
lrs: [0.05, 0.2]
seeds: 1
epochs: 1
output: {tmp_path / "runs"}
trainer:
  accelerator: cpu
  callbacks:
    - class_path: {USER}.CallbackLog
      init_args: {{path: {log}}}
"""
    )
    out = tmp_path / "runs"
    first = _mmbalance("--config", str(config), "--max-runs", "2", cwd=tmp_path)  # an interrupted grid
    assert first.returncode == 0, first.stderr
    assert "0 read back" in first.stdout and "[2/6] baseline lr 0.2 seed 0" in first.stdout
    assert "Stopped after 2 run(s): 4 left" in first.stdout and not (out / "results.md").exists()
    assert len(_results(out)) == 2

    second = _mmbalance("--config", str(config), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert (
        "2 read back" in second.stdout
        and "4 to train" in second.stdout
        and "[3/6] OGMGE lr 0.05 seed 0" in second.stdout
    )
    table = second.stdout[second.stdout.index("method ") :]
    for method in ("baseline", "OGMGE", "UnimodalLosses"):
        assert f"\n{method} " in table and f"| {method} |" in (out / "results.md").read_text()
    assert "audio acc" in table and "visual acc" in table and "wall time*" in table
    fits = log.read_text().splitlines()
    assert len(fits) == 6 and all(line.startswith("CallbackLog ") for line in fits)  # the user's callback is kept
    assert sum("OGMGE" in line for line in fits) == 2 and sum("UnimodalLosses" in line for line in fits) == 2
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["baseline", "OGMGE", "UnimodalLosses"]
    for r in runs:  # the chosen learning rate has the best validation accuracy
        assert r["val_acc"] == max(r["grid"].values()) == r["grid"][str(r["lr"])]
        assert set(r["modality_acc"]) == {"audio", "visual"}
    assert (out / "results.csv").read_text().startswith("method,fused_acc_mean,fused_acc_std,audio_acc_mean")
    events = {p.parent.relative_to(out).as_posix() for p in out.rglob("events.out.tfevents.*")}
    assert len(events) == 6 and "AVData/OGMGE/lr0.2-seed0" in events  # one TensorBoard run per (method, lr, seed)

    stored = _results(out)
    third = _mmbalance("--config", str(config), cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "6 read back" in third.stdout and "0 to train" in third.stdout and "[1/6]" not in third.stdout
    assert _results(out) == stored and len(log.read_text().splitlines()) == 6  # nothing trained again
    assert third.stdout[third.stdout.index("method ") :] == table


def test_compare_a_model_without_a_learning_rate_argument(tmp_path):
    result = _mmbalance("--model", f"{USER}.FixedLr", "--data", f"{USER}.AVData", cwd=tmp_path)
    assert result.returncode == 2
    assert "`FixedLr.__init__` has no `lr` or `learning_rate` argument" in result.stderr
    assert "`--lr-arg NAME`" in result.stderr and not list(tmp_path.rglob("result.json"))
    with pytest.raises(CompareError, match=r"`FixedLr.__init__` has no `lr` or `learning_rate` argument"):
        compare(FixedLr, AVData, output=tmp_path)
    with pytest.raises(CompareError, match=r"`FixedLr` has no init argument 'rate' \(`lr_arg`\)"):
        compare(FixedLr, AVData, lr_arg="rate", output=tmp_path)


def test_compare_under_ddp_with_two_processes(tmp_path):
    out = tmp_path / "runs"
    args = ["--model", f"{USER}.AudioVisual", "--data", f"{USER}.AVData", "--methods", "OGMGE", "--lrs", "0.1"]
    args += ["--seeds", "1", "--epochs", "1", "--output", str(out)]
    result = _mmbalance(
        *args, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("fused acc") == 1  # rank 0 reports, rank 1 only trains
    (stored,) = [json.loads(p.read_text()) for p in out.rglob("result.json")]
    assert str(stored["config"]["trainer"]["devices"]) == "2" and stored["config"]["trainer"]["strategy"] == "ddp"
    assert 0 <= stored["result"]["test_acc"] <= 1


def test_python_entry_point_reads_back_and_reports_fused_accuracy_only_without_unimodal_logits(tmp_path, capsys):
    kwargs = dict(methods=["baseline"], lrs=[0.1], seeds=1, epochs=1, output=tmp_path, model_args={"unimodal": False})
    result = compare(AudioVisual, AVData, **kwargs, trainer_args={"accelerator": "cpu", "logger": False})
    assert "per-modality accuracy is not reported" in capsys.readouterr().out
    (row,) = result.rows
    assert row.modality_acc == {} and str(result).splitlines()[0].split()[:3] == ["method", "fused", "acc"]
    again = compare(AudioVisual, AVData, **kwargs, trainer_args={"accelerator": "cpu", "logger": False}, verbose=False)
    read_back = [(r.method, r.lr, r.test_acc, r.val_acc, r.fit_time) for r in again.all_runs]
    assert read_back == [(r.method, r.lr, r.test_acc, r.val_acc, r.fit_time) for r in result.all_runs]  # not retrained
    assert again.rows[0].test_acc == row.test_acc
    with pytest.raises(CompareError, match=r"another configuration \(model.init_args.hidden: 8 -> 4"):
        compare(AudioVisual, AVData, **{**kwargs, "model_args": {"unimodal": False, "hidden": 4}}, verbose=False)
    argv = ["--model", f"{USER}.AudioVisual", "--data", f"{USER}.AVData", "--methods", "baseline", "--lrs", "0.1"]
    assert main(["compare", *argv, "--seeds", "1", "--epochs", "2", "--output", str(tmp_path)]) == 2
    assert "holds a run made with another configuration" in capsys.readouterr().err


def test_a_learning_rate_the_optimizer_ignores_is_reported(tmp_path):
    with pytest.warns(
        UserWarning, match=r"No parameter group of the optimizers starts at the run's learning rate 0.1 "
    ):
        compare(IgnoresLr, AVData, methods=["baseline"], lrs=[0.1], seeds=1, epochs=1, output=tmp_path, verbose=False)


@pytest.mark.parametrize(
    ("model", "trainer_args", "error", "match"),
    [
        (TensorForward, {}, TypeError, r"`TensorForward\(batch\)` returned a Tensor; .* must return `MultimodalOutput"),
        (AudioVisual, {"limit_val_batches": 0}, RuntimeError, r"never validated, so no checkpoint can be chosen"),
    ],
)
def test_a_run_without_validation_accuracy_stops(model, trainer_args, error, match, tmp_path):
    with pytest.raises(error, match=match):
        compare(
            model,
            AVData,
            methods=["baseline"],
            lrs=[0.1],
            seeds=1,
            epochs=1,
            output=tmp_path,
            verbose=False,
            trainer_args={"accelerator": "cpu", "logger": False, **trainer_args},
        )


def test_a_data_module_needs_validation_and_test_loaders(tmp_path):
    with pytest.raises(CompareError, match=r"`TrainOnly` does not define val_dataloader, test_dataloader"):
        compare(AudioVisual, TrainOnly, methods=["baseline"], lrs=[0.1], seeds=1, epochs=1, output=tmp_path)


def test_a_strategy_that_fits_in_processes_it_starts_is_refused(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    trainer_args = {"accelerator": "cpu", "devices": 2, "strategy": DDPStrategy(start_method="spawn")}
    with pytest.raises(CompareError, match=r"Strategy 'DDPStrategy' fits in processes it starts .* strategy='ddp'"):
        compare(
            AudioVisual,
            AVData,
            methods=["baseline"],
            lrs=[0.1],
            seeds=1,
            epochs=1,
            output=tmp_path,
            trainer_args=trainer_args,
            verbose=False,
        )


def test_a_method_with_arguments_is_one_mapping(capsys):
    assert main(["compare", "--methods", "baseline", "{OGMGE: {alpha: 0.8}, ARL: {}}"]) == 2
    assert "A method with arguments is one `NAME: {args}` mapping" in capsys.readouterr().err


def test_methods_resolve_by_class_name_with_their_arguments():
    (ogm,) = resolve_method("OGMGE", {"alpha": 0.8, "modulation_ends": 50}).callbacks(10)
    assert (type(ogm).__name__, ogm.alpha, ogm.modulation_ends) == ("OGMGE", 0.8, 50)
    (strong,) = resolve_method("strong", {"class_path": "OGMGE", "init_args": {"alpha": 2.0}}).callbacks(10)
    assert strong.alpha == 2.0
    assert resolve_method("baseline").callbacks(10) == []
    (preset,) = resolve_method("ogm_ge").callbacks(20)
    assert preset.modulation_ends == 10  # the presets scale their schedule with the run length
    with pytest.raises(CompareError, match=r"Unknown method 'Nope': expected 'baseline', a callback class .*OGMGE"):
        resolve_method("Nope")
    with pytest.raises(CompareError, match=r"Method 'ogm_ge' is a built-in preset and takes no arguments"):
        resolve_method("ogm_ge", {"alpha": 0.8})
    with pytest.raises(CompareError, match=r"Method 'OGMGE': `alpha` must be"):
        resolve_method("OGMGE", {"alpha": -1.0})
    with pytest.raises(CompareError, match=r"Method 'x': besides `class_path` only `init_args` is accepted"):
        resolve_method("x", {"class_path": "OGMGE", "alpha": 1.0})


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"max_epochs": 3}, r"Set the run length with `epochs`"),
        ({"enable_checkpointing": False}, r"`enable_checkpointing` must stay on"),
        ({"logger": "wandb"}, r"`logger` must be True .* or False, got 'wandb'"),
        ({"strategy": "ddp_spawn_find_unused_parameters_true"}, r"Strategy 'ddp_spawn.*' fits in processes it starts"),
    ],
)
def test_trainer_arguments_the_comparison_sets_itself(args, match):
    with pytest.raises(CompareError, match=match):
        trainer_arguments(args, epochs=2, reference=False)
    assert trainer_arguments({"max_epochs": 2, "devices": 2}, epochs=2, reference=False) == {"devices": 2}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": []}, r"`methods` must name at least one method"),
        ({"methods": ["baseline", "baseline"]}, r"`methods` must not repeat a name"),
        ({"lrs": [0.1, -1.0]}, r"Every learning rate must be > 0, got \[0.1, -1.0\]"),
        ({"seeds": 0}, r"`seeds` must be an int >= 1, got 0"),
        ({"epochs": 1.5}, r"`epochs` must be an int >= 1, got 1.5"),
        ({"max_runs": 0}, r"`max_runs` must be None or an int >= 1, got 0"),
        ({"data": "mnist"}, r"Unknown dataset 'mnist'"),
    ],
)
def test_compare_checks_its_grid(kwargs, match, tmp_path):
    with pytest.raises(CompareError, match=match):
        compare(**{"output": tmp_path, **kwargs})


def test_a_diverging_learning_rate_is_recorded_and_the_grid_goes_on(tmp_path, capsys):
    kwargs = dict(methods=["ARL"], seeds=1, epochs=1, trainer_args={"accelerator": "cpu", "logger": False})
    result = compare(AudioVisual, AVData, lrs=[1e30, 0.1], output=tmp_path / "some", **kwargs)
    printed = capsys.readouterr().out
    assert "ARL lr 1e+30 seed 0: diverged (" in printed and "\n    DivergenceError: ARL: " in printed
    diverged, sane = result.all_runs
    assert diverged.diverged.startswith("ARL: ") and math.isnan(diverged.val_acc) and not sane.diverged
    (row,) = result.rows
    assert row.lrs == [0.1] and row.test_acc[0] == sane.test_acc and row.diverged == (1, 2)
    assert "1 of 2" in str(result) and "** diverged" in str(result)
    stored = json.loads((tmp_path / "some" / "results.json").read_text())
    assert [r["diverged"] != "" for r in stored["all_runs"]] == [True, False] and stored["runs"][0]["lr"] == 0.1
    assert (tmp_path / "some" / "results.csv").read_text().splitlines()[1].endswith(",1")
    again = compare(AudioVisual, AVData, lrs=[1e30, 0.1], output=tmp_path / "some", verbose=False, **kwargs)
    assert [(r.diverged, r.fit_time) for r in again.all_runs] == [(r.diverged, r.fit_time) for r in result.all_runs]

    every = compare(AudioVisual, AVData, lrs=[1e30], output=tmp_path / "all", verbose=False, **kwargs)
    assert math.isnan(every.rows[0].lrs[0]) and every.rows[0].diverged == (1, 1)
    line = str(every).splitlines()[2]  # the accuracy and the learning rate say so instead of a number
    assert line.startswith("ARL     all diverged  diverged ") and line.rstrip().endswith("1 of 1")
