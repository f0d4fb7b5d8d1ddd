"""``benchmarks/overhead.py`` runs every configuration, and its limits do the work they stand for."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def overhead():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import overhead as module
    finally:
        sys.path.pop(0)
    return module


def test_every_configuration_runs_and_chains_to_its_plain_step(tmp_path):
    out = tmp_path / "overhead.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--rounds", "1", "--steps", "1"]
    command += ["--warmup", "1", "--batch", "8", "--output", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    for name, row in result.items():
        assert row["median_ms"] > 0 and math.isfinite(row["relative"]), name
        reference = result[row["reference"]]
        assert row["relative"] == pytest.approx(row["median_ms"] / reference["median_ms"])
        assert row["relative_to_plain"] == pytest.approx(row["median_ms"] / result[row["plain"]]["median_ms"])
        assert result[row["plain"]]["reference"] == row["plain"]  # the chain ends at a plain step


def _steps(overhead, callbacks):
    """Each parameter's change over two steps of the benchmark model (batch 8) with ``callbacks``."""
    import torch

    args = type("Args", (), {"accelerator": "cpu", "precision": "32-true"})()
    torch.manual_seed(0)
    model = overhead.make_model(lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = overhead._trainer(args, callbacks, max_steps=2, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=overhead.make_loader(8, 2))
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_the_limits_act_on_the_gradients(overhead):
    """A limit that skipped its gradient work would flatter the method measured against it."""
    import torch

    masked = _steps(overhead, [overhead.MaskedForwards()])
    for head_gradient in (False, True):
        limit = _steps(overhead, [overhead.AGMWork(head_gradient=head_gradient)])
        assert all(not torch.equal(limit[n], masked[n]) for n in masked)  # every gradient scaled
    trace = _steps(overhead, [overhead.InfoRegTrace()])
    pull = _steps(overhead, [overhead.InfoRegTraceAndPull()])
    assert [m for m in ("a", "b") if not torch.equal(pull[f"encoders.{m}.0.weight"], trace[f"encoders.{m}.0.weight"])]
