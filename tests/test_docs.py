"""The code in the documentation runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)


def test_extending_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _python_blocks("extending.md"):
        exec(compile(block, "docs/extending.md", "exec"), namespace)
    metrics = namespace["trainer"].callback_metrics
    scores = [float(metrics[f"mmbalance/confidence/score/{m}"]) for m in ("m0", "m1")]
    factors = [float(metrics[f"mmbalance/confidence/factor/{m}"]) for m in ("m0", "m1")]
    assert factors == pytest.approx([(sum(scores) / 2 / s) ** 0.5 for s in scores], rel=1e-5)
    assert namespace["confidence_factors"]({"a": 0.5, "b": 0.0}, 1.0) == {"a": 0.5, "b": 1.0}
