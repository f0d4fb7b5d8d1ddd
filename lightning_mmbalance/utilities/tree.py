"""The tensors inside an encoder's output, whatever its structure.

An encoder returns a tensor or a nested structure of tensors: a Hugging Face ``ModelOutput`` (an ``OrderedDict``
subclass and a dataclass, with ``None`` for the fields it did not compute), a dict, tuple, named tuple, list, or a
dataclass of the user's own. The containers that ``torch.utils._pytree`` knows (``transformers`` registers every
``ModelOutput`` class with it) are rebuilt by it; other dataclass instances are copied field by field. Anything else
(None, numbers, strings) is a leaf that is kept as it is.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["map_tensors", "tensor_leaves"]


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _field_values(value: Any) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if hasattr(value, f.name)}


def map_tensors(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """``tree`` with every tensor leaf ``t`` replaced by ``fn(t)``, the structure and every other leaf kept.

    Containers come back as new objects of the same class (a ``ModelOutput`` keeps its class, keys, attribute and
    index access); a dataclass that ``torch.utils._pytree`` does not know is shallow-copied and its fields set (through
    its own ``__setattr__``, or ``object.__setattr__`` if it is frozen), so fields with ``init=False`` work and
    ``__post_init__`` does not run again.

    Example::

        zeroed = map_tensors(torch.zeros_like, bert(input_ids))  # a BaseModelOutputWithPooling of zeros
    """

    def leaf(value: Any) -> Any:
        if isinstance(value, Tensor):
            return fn(value)
        if not _is_dataclass_instance(value):
            return value
        result = copy.copy(value)
        frozen = type(value).__dataclass_params__.frozen
        assign = object.__setattr__ if frozen else setattr
        for name, field_value in _field_values(value).items():
            assign(result, name, map_tensors(fn, field_value))
        return result

    return pytree.tree_map(leaf, tree)


def tensor_leaves(tree: Any) -> list[Tensor]:
    """The tensors in ``tree``, in the order :func:`map_tensors` visits them.

    Example::

        tensor_leaves({"h": h, "extra": (None, attention)})  # [h, attention]
    """
    found: list[Tensor] = []
    for value in pytree.tree_leaves(tree):
        if isinstance(value, Tensor):
            found.append(value)
        elif _is_dataclass_instance(value):
            found += tensor_leaves(list(_field_values(value).values()))
    return found
