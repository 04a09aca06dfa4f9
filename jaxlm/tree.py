"""Generic parameter-tree helpers: "a/b/c" names, and splitting a tree in two parts and back."""

import flax


def names(tree) -> list[str]:
    """The "a/b/c" name of every leaf, in flattening order."""
    return ["/".join(k) for k in flax.traverse_util.flatten_dict(_plain(tree))]


def split(tree, predicate) -> tuple[dict, dict]:
    """(leaves whose name satisfies `predicate`, the rest) of a parameter tree (or of its
    shardings or shapes)."""
    flat = flax.traverse_util.flatten_dict(_plain(tree))
    parts = ({}, {})
    for key, leaf in flat.items():
        parts[0 if predicate("/".join(key)) else 1][key] = leaf
    return tuple(flax.traverse_util.unflatten_dict(part) for part in parts)


def join(first: dict, second: dict) -> dict:
    """One tree of `split`'s two parts (`first` wins where both hold a leaf)."""
    flat = flax.traverse_util.flatten_dict(_plain(second))
    flat.update(flax.traverse_util.flatten_dict(_plain(first)))
    return flax.traverse_util.unflatten_dict(flat)


def _plain(tree):
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
