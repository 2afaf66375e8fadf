"""lacache: KV-cache compression policies for transformers models (LaCache and its baselines) and the
harness that benchmarks them.

    from lacache import LaCache, cache_kwarg
    policy = LaCache(budget=256, span=16, overlap=0)
    cache = policy.make_cache(model, prompt_length=ids.shape[1])    # a fresh cache per sequence
    out = model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=32, do_sample=False)

The policy classes are found through ``configs/cache/*.yaml`` (each names its class in ``_target_``)
and are importable by their class name without the ``Policy`` suffix (``LaCachePolicy`` ->
``lacache.LaCache``), so a new policy needs no edit here. Everything is imported on first use:
``import lacache`` alone does not import torch.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"

_API = {
    "generate": "lacache.api", "load_model": "lacache.api", "make_policy": "lacache.api",
    "cache_kwarg": "lacache.compat", "UnsupportedInputError": "lacache.compat",
    "CachePolicy": "lacache.policy", "PolicyConfigError": "lacache.policy",
}


@functools.cache
def policy_targets() -> dict[str, str]:
    """Public policy name -> ``module.Class``, from ``configs/cache/*.yaml``."""
    import yaml

    targets = {}
    for path in sorted((CONFIGS / "cache").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if target:
            targets[target.rpartition(".")[2].removesuffix("Policy")] = target
    return targets


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name[:1].isupper() and name in policy_targets():
        module, _, cls = policy_targets()[name].rpartition(".")
        return getattr(importlib.import_module(module), cls)
    raise AttributeError(f"module 'lacache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *policy_targets()})


__all__ = [*_API, *policy_targets()]
