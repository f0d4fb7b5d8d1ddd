"""Griffe extension for the API reference: renders the package's reStructuredText habits as Markdown.

- Roles such as ``:class:`~lightning_mmbalance.contract.MultimodalOutput``` become inline code (``~`` keeps only the
  last component, as in Sphinx); Markdown would show them verbatim.
- ``Example::`` followed by an indented block becomes a Google ``Examples:`` section; a block that is not a doctest
  (``>>>``) is fenced as Python, so that it is highlighted.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|math|ref):`(~?)([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL_EXAMPLE = re.compile(r"^Example::\n\n((?:(?:    .*)?\n)*(?:    .*))", flags=re.MULTILINE)


def _code(match: re.Match[str]) -> str:
    short, name = match.groups()
    return f"`{name.rsplit('.', 1)[-1] if short else name}`"


def _example(match: re.Match[str]) -> str:
    block = match.group(1).rstrip("\n")
    if block.lstrip().startswith(">>>"):
        return f"Examples:\n{block}"
    return f"Examples:\n    ```python\n{block}\n    ```"


class SphinxRoles(Extension):
    """Rewrite every docstring's roles and literal examples as Markdown."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite the object's docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = _LITERAL_EXAMPLE.sub(_example, _ROLE.sub(_code, obj.docstring.value))
