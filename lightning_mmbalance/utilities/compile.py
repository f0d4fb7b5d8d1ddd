"""Keeping ``torch.compile``d graphs exact for a second gradient of the same forward.

MMPareto, ARL's ``step_ratio`` and the monitor's conflict test take the gradient of one loss with
``torch.autograd.grad(..., retain_graph=True)`` before Lightning's backward of the whole loss, so a compiled backward
runs twice on one graph. AOTAutograd compiles the backward lazily, at its first call: when that call keeps the graph
the backward keeps its saved activations; otherwise it *donates* them, and Inductor may then write a kernel's output
into a saved activation's buffer in place. Such a backward refuses a later ``retain_graph=True`` ("This backward
function was compiled with non-empty donated buffers ..."), unless ``torch._functorch.config.donated_buffer`` is off
at that moment: the setting is read twice, when the forward is compiled (which activations may be donated) and when
the backward runs (the refusal). Turned off after the backward was compiled, it only silences the refusal, and the
second gradient is computed from an overwritten activation (torch 2.13, CPU; see ``docs/compile.md``). Inductor's
on-disk FX graph cache can hand out such a backward too: its key ignores which inputs were donated.

:func:`allow_retained_graphs` therefore, while at least one callback holds it (from ``setup`` to ``teardown``):

- turns ``donated_buffer`` off, so that graphs compiled during the fit donate nothing;
- turns ``torch._inductor.config.inplace_buffers`` off, so that no kernel writes into an input's buffer (read when
  Inductor compiles a graph, the backward included; it is part of the FX graph cache key, so cached graphs compiled
  with in-place buffers are not reused);
- clears Dynamo's compiled graphs (``torch._dynamo.reset()``) if any were compiled since the last fit that held the
  switch, so that a backward compiled earlier with donated buffers (a forward and backward run before ``fit``, or a
  plain fit of the same architecture) is compiled again under these settings.

The last release restores the user's settings.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["allow_retained_graphs", "release_retained_graphs"]

_holders: set[int] = set()
_saved: dict[str, bool] = {}
_graphs_at_release = 0
"""Dynamo's count of compiled graphs when the switch was last released (graphs compiled under it are safe)."""

_SETTINGS = (("torch._functorch.config", "donated_buffer"), ("torch._inductor.config", "inplace_buffers"))


def _config(path: str) -> ModuleType | None:
    import importlib

    try:
        return importlib.import_module(path)
    except ImportError:  # pragma: no cover - a torch without AOTAutograd or Inductor
        return None


def _compiled_graphs() -> int:
    """How many graphs Dynamo has compiled in this process (the counter survives ``torch._dynamo.reset()``)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def allow_retained_graphs(holder: object) -> None:
    """Make compiled backwards safe to run twice until every holder has called :func:`release_retained_graphs`."""
    if id(holder) in _holders:
        return
    if not _holders:
        for path, name in _SETTINGS:
            config = _config(path)
            if config is not None and hasattr(config, name):
                _saved[f"{path}.{name}"] = bool(getattr(config, name))
                setattr(config, name, False)
        if _compiled_graphs() != _graphs_at_release:
            import torch._dynamo

            torch._dynamo.reset()  # graphs compiled earlier may have a backward with donated buffers
    _holders.add(id(holder))


def release_retained_graphs(holder: object) -> None:
    """Release ``holder``'s claim; the last release restores the user's settings."""
    global _graphs_at_release
    if id(holder) not in _holders:
        return
    _holders.discard(id(holder))
    if _holders:
        return
    for path, name in _SETTINGS:
        key = f"{path}.{name}"
        config = _config(path)
        if config is not None and key in _saved:
            setattr(config, name, _saved.pop(key))
    _graphs_at_release = _compiled_graphs()
