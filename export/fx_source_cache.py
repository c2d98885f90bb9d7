"""Keep torch.fx from hoarding generated source code during long lowerings.

torch.fx stores the Python source of every `GraphModule.recompile()` in a process-global cache
(`torch.fx.graph_module._loader.eval_cache`, plus a `linecache` entry holding a copy of the
module globals) so tracebacks can show it, and never frees it. ExecuTorch's backend lowering
recompiles the whole remaining graph for every delegate partition. The joint forward/backward
graph of a 30-layer model has about a thousand XNNPACK partitions, so the cache grows with
partitions x graph size: exporting SmolLM2's training program was OOM-killed at 21 GB RSS on a
24 GB machine. Inside `source_cache_disabled()` sources are dropped right after compilation
(tracebacks from generated graph code then show no source lines). torch is pinned (2.13.0);
if the private hook is missing the block does nothing.
"""

from __future__ import annotations

import contextlib
import linecache
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def source_cache_disabled() -> Iterator[None]:
    from torch.fx import graph_module

    loader = getattr(graph_module, "_loader", None)
    original = getattr(loader, "cache", None)
    if loader is None or original is None or not hasattr(loader, "eval_cache"):
        yield
        return

    def cache(src: str, globals: dict[str, Any], co_fields: dict[str, Any] | None = None) -> str:
        key = original(src, globals, co_fields)
        loader.eval_cache.pop(key, None)
        linecache.cache.pop(key, None)
        return key

    loader.cache = cache
    try:
        yield
    finally:
        loader.cache = original
