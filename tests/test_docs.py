"""The code in the documentation runs: every ``python`` block of the site's pages (``docs/``) and of the README, and
the ``Example::`` block of every object in the API reference (``>>>`` examples run as doctests).

The blocks of one page run in order in one namespace, as a reader would paste them; a docstring example runs among
its module's names. Names that a page leaves to the reader (``model``, ``dm``, ``make_audio_net``, ``my_datamodule``,
...) get small stand-ins, and the ``Trainer`` is capped at two training batches, so a page's ``trainer.fit`` runs as
written in about a second. A block that cannot run as it stands (eight GPUs, a fragment of a class) carries
``<!-- skip -->`` on the line before its fence. The shell blocks are checked without running them: every
``mmbalance compare`` command parses, every ``pip install`` names extras that exist.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import re
import shlex
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mmbalance.cli import _compare_parser
from lightning_mmbalance.data import MultimodalDataModule
from lightning_mmbalance.data.base import MultimodalTensorDataset
from lightning_mmbalance.models import LateFusionClassifier

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
_FENCE = re.compile(r"(?P<skip><!-- skip -->\n)?```(?P<lang>[\w-]*)\n(?P<code>.*?)```", flags=re.DOTALL)


def _blocks(page: str, lang: str) -> list[tuple[str, bool]]:
    """``(code, skipped)`` for every fenced block of ``lang`` in ``page``, in order."""
    text = (ROOT / page).read_text()
    return [(m["code"], bool(m["skip"])) for m in _FENCE.finditer(text) if m["lang"] == lang]


def _commands(page: str) -> list[list[str]]:
    """The commands of the page's ``bash`` blocks, continuation lines joined, comments dropped."""
    commands = []
    for code, _ in _blocks(page, "bash"):
        for line in code.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                if words:
                    commands.append(words)
    return commands


class _CappedTrainer(pl.Trainer):
    """A Trainer that runs two training batches and one validation batch, without logger or checkpoints."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
        kwargs.update(num_sanity_val_steps=0)
        kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        super().__init__(*args, **kwargs)


class _AudioVisual(MultimodalDataModule):
    """Random ``({"audio": (B, 1, 8, 8), "visual": (B, 3, 8, 8)}, targets)`` batches, 32/16/16 samples, 4 classes.

    Images, so that the reference model's encoders are small CNNs (OGM-GE's ``param_filter="conv"`` selects them).
    """

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return {"audio": [1, 8, 8], "visual": [3, 8, 8]}

    @property
    def num_classes(self) -> int:
        return 4

    def _build(self) -> tuple[MultimodalTensorDataset, MultimodalTensorDataset, MultimodalTensorDataset]:
        generator = torch.Generator().manual_seed(self.seed)

        def split(n: int) -> MultimodalTensorDataset:
            inputs = {m: torch.randn(n, *shape, generator=generator) for m, shape in self.input_shapes.items()}
            return MultimodalTensorDataset(inputs, torch.randint(0, self.num_classes, (n,), generator=generator))

        return split(32), split(16), split(16)


def _encoder(channels: int) -> nn.Module:
    """``(B, channels, 8, 8) -> (B, 512)``, the width the pages' fusion heads expect."""
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, 512))


@pytest.fixture
def _one_thread():
    """The stand-ins are tiny: one intra-op thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stand_ins() -> dict:
    dm = _AudioVisual(batch_size=32)
    return {
        "dm": dm,
        "model": LateFusionClassifier(dm.input_shapes, dm.num_classes),
        "audio_net": _encoder(1),
        "visual_net": _encoder(3),
        "make_audio_net": lambda: _encoder(1),
        "make_visual_net": lambda: _encoder(3),
        "my_datamodule": _AudioVisual(batch_size=32),
    }


def _check_extending(namespace: dict) -> None:
    metrics = namespace["trainer"].callback_metrics
    scores = [float(metrics[f"mmbalance/confidence/score/{m}"]) for m in ("m0", "m1")]
    factors = [float(metrics[f"mmbalance/confidence/factor/{m}"]) for m in ("m0", "m1")]
    assert factors == pytest.approx([(sum(scores) / 2 / s) ** 0.5 for s in scores], rel=1e-5)
    assert namespace["confidence_factors"]({"a": 0.5, "b": 0.0}, 1.0) == {"a": 0.5, "b": 1.0}


CHECKS = {"docs/extending.md": _check_extending}
"""Assertions on what a page's code computed, beyond running without an error."""


@pytest.mark.parametrize("page", [p for p in PAGES if any(not skip for _, skip in _blocks(p, "python"))])
@pytest.mark.usefixtures("_one_thread")
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl, "Trainer", _CappedTrainer)
    monkeypatch.setattr(lightning, "Trainer", _CappedTrainer)
    namespace = _stand_ins()
    for code, skipped in _blocks(page, "python"):
        if not skipped:
            exec(compile(code, page, "exec"), namespace)
    CHECKS.get(page, lambda namespace: None)(namespace)


def _api_entries() -> list[str]:
    """The identifiers of the API reference's ``::: name`` entries, in page order."""
    return [
        line.removeprefix("::: ").strip()
        for page in sorted((ROOT / "docs" / "api").glob("*.md"))
        for line in page.read_text().splitlines()
        if line.startswith("::: ")
    ]


def _literal_example(identifier: str) -> tuple[str, dict] | None:
    """The ``Example::`` block of a documented object that is not a doctest, with its module's names, or None."""
    module, _, name = identifier.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    match = _LITERAL.search(inspect.getdoc(obj) or "")
    if match is None or match[1].lstrip().startswith(">>>"):
        return None  # doctests run with --doctest-modules
    return textwrap.dedent(match[1]), dict(vars(sys.modules[obj.__module__]))


_LITERAL = re.compile(r"^Example::\n\n((?:(?:    .*)?\n?)*)", flags=re.MULTILINE)


@pytest.mark.parametrize("identifier", [i for i in _api_entries() if _literal_example(i)])
@pytest.mark.usefixtures("_one_thread")
def test_api_examples_run(identifier, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl, "Trainer", _CappedTrainer)
    monkeypatch.setattr(lightning, "Trainer", _CappedTrainer)
    code, namespace = _literal_example(identifier)
    namespace.update(_stand_ins(), h_a=torch.randn(4, 512), h_v=torch.randn(4, 512))
    exec(compile(code, identifier, "exec"), namespace)


def test_pages_with_checks_have_code():
    assert set(CHECKS) <= set(PAGES)
    assert all(_blocks(page, "python") for page in CHECKS)


def _user_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``my_pkg`` of the pages' commands: a LightningModule and a LightningDataModule at the paths they name."""

    class AudioVisual(pl.LightningModule):
        def __init__(self, num_classes: int = 6, lr: float = 1e-3) -> None:
            super().__init__()

    class CremaD(pl.LightningDataModule):
        def __init__(self, root: str = "data", batch_size: int = 64) -> None:
            super().__init__()

    for name, cls in (("my_pkg.models", AudioVisual), ("my_pkg.data", CremaD)):
        module = types.ModuleType(name)
        cls.__module__ = name
        setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "my_pkg", types.ModuleType("my_pkg"))


@pytest.mark.parametrize("page", [p for p in PAGES if any(w[:2] == ["mmbalance", "compare"] for w in _commands(p))])
def test_compare_commands_parse(page, monkeypatch):
    _user_package(monkeypatch)
    for words in _commands(page):
        if words[:2] == ["mmbalance", "compare"]:
            _compare_parser().parse_args(words[2:])  # exits (SystemExit) on an unknown option or class path


def test_api_reference_covers_every_public_name():
    import lightning_mmbalance
    import lightning_mmbalance.functional

    entries = _api_entries()
    documented = set(entries)
    assert len(entries) == len(documented), "an object is documented twice in docs/api"
    assert {f"lightning_mmbalance.{name}" for name in lightning_mmbalance.__all__} <= documented
    assert "lightning_mmbalance.functional" in documented  # the page renders every name of its __all__
    assert lightning_mmbalance.functional.__all__


def test_lists_start_after_a_blank_line():
    """The site's Markdown, unlike GitHub's, runs a list into the paragraph above it without a blank line between."""
    glued = []
    for page in PAGES:
        lines = _FENCE.sub("", (ROOT / page).read_text()).splitlines()
        for above, line in itertools.pairwise(lines):
            if re.match(r"(- |\d+\. )", line) and above.strip() and not re.match(r"(- |\d+\. |\s)", above):
                glued.append(f"{page}: {line[:40]}")
    assert not glued


def test_install_commands_name_existing_extras():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = [
        extra
        for page in PAGES
        for words in _commands(page)
        if words[:2] == ["pip", "install"]
        for word in words
        for extra in re.findall(r"\[([\w,-]+)\]", word)
    ]
    assert named, "no `pip install -e .[extra]` command found"
    assert {e for group in named for e in group.split(",")} <= extras


def test_readme_links_resolve():
    """The README is read on GitHub and PyPI, outside the site's strict build: its relative links must exist."""
    targets = re.findall(r"\]\((?!https?://)([^)#\s]+)", (ROOT / "README.md").read_text())
    assert targets
    assert [t for t in targets if not (ROOT / t).exists()] == []


def test_readme_names_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
    assert "python -m pytest -q" in [" ".join(words) for words in _commands("README.md")]
