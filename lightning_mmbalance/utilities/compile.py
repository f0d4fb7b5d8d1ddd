"""Keeping ``torch.compile``d graphs usable for a second gradient of the same forward.

MMPareto (and the monitor's conflict test) take the gradient of one loss with ``torch.autograd.grad(...,
retain_graph=True)`` before Lightning's backward of the whole loss. AOTAutograd may compile a backward that *donates*
its saved activations (frees them as it runs); such a backward refuses ``retain_graph=True`` with "This backward
function was compiled with non-empty donated buffers ...". Turning ``torch._functorch.config.donated_buffer`` off
makes AOTAutograd compile the retaining variant instead (the setting is read when the backward runs, so graphs
compiled earlier are covered too). It costs memory, not time. The switch is process-wide: it is turned off while at
least one callback needs it and restored when the last one is done.
"""

from __future__ import annotations

__all__ = ["allow_retained_graphs", "release_retained_graphs"]

_holders: set[int] = set()
_saved: bool | None = None


def _config() -> object | None:
    try:
        import torch._functorch.config as functorch_config
    except ImportError:  # pragma: no cover - torch without AOTAutograd
        return None
    return functorch_config if hasattr(functorch_config, "donated_buffer") else None


def allow_retained_graphs(holder: object) -> None:
    """Turn AOTAutograd's donated buffers off until every holder has called :func:`release_retained_graphs`."""
    global _saved
    config = _config()
    if config is None or id(holder) in _holders:
        return
    if not _holders:
        _saved = bool(config.donated_buffer)  # type: ignore[attr-defined]
        config.donated_buffer = False  # type: ignore[attr-defined]
    _holders.add(id(holder))


def release_retained_graphs(holder: object) -> None:
    """Release ``holder``'s claim; the last release restores the user's setting."""
    config = _config()
    if config is None or id(holder) not in _holders:
        return
    _holders.discard(id(holder))
    if not _holders and _saved is not None:
        config.donated_buffer = _saved  # type: ignore[attr-defined]
