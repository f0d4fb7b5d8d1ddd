"""Test-session configuration."""

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests marked ``ddp`` (2-process CPU runs launched with ``ddp_fork``) first.

    A process cannot be forked once it has initialised CUDA, which any test may do on a machine with a GPU (Lightning
    saves the CUDA RNG state into checkpoints, for one). The order of the other tests is kept.
    """
    items.sort(key=lambda item: item.get_closest_marker("ddp") is None)


@pytest.fixture(autouse=True)
def _cpu_only_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the tests marked ``cuda``, CUDA looks absent, as on the CPU machines the suite is written for.

    Lightning reads the CUDA RNG state whenever CUDA is available, which initialises CUDA in the test process and makes
    the later ``ddp_fork`` tests fail on a machine with a GPU.
    """
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _fresh_main_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let every DDP launch pick a free port (Lightning keeps the first one in ``MASTER_PORT`` otherwise)."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
