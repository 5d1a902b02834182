"""`memo`: a function's results cached by its positional arguments on a plain dict, for what runs on
torch.compile's path (functools caches are traced through by Dynamo: every compile would re-run the cached work
and break the graph where it does something untraceable, such as a self-check or a failing import)."""

from __future__ import annotations

import functools


def memo(fn):
    """functools.cache for hashable positional arguments (None results included), readable by Dynamo as a
    constant once filled; `cache_clear()` empties it."""
    results = {}

    @functools.wraps(fn)
    def cached(*args):
        if args not in results:
            results[args] = fn(*args)
        return results[args]

    cached.cache_clear = results.clear
    return cached
