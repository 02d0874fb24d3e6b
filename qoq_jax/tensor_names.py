"""Dotted tensor names of pytree leaves (`layers.0.self_attn.q_proj.kernel.packed`): the names checkpoints store
arrays under and the sharding rules match on."""

from __future__ import annotations

from typing import Any

import jax


def named_leaves(state) -> dict[str, Any]:
    """{dotted name: leaf} in the state's flatten order (which `tree_unflatten` relies on)."""
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def leaf_name(path) -> str:
    """`layers/0/.../kernel/.value/.packed` → `layers.0....kernel.packed`: the NNX Variable's `.value` (the
    first attribute key on the path) says nothing about the tensor and is dropped."""
    keys = list(path)
    first_attr = next((i for i, key in enumerate(keys) if isinstance(key, jax.tree_util.GetAttrKey)), None)
    if first_attr is not None and keys[first_attr].name == "value":
        del keys[first_attr]
    return ".".join(_key_name(key) for key in keys)


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    return str(key.key)  # DictKey, FlattenedIndexKey
