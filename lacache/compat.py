"""Where lacache's caches meet transformers' calling conventions, from the floor version (5.4) up.

* :func:`cache_kwarg`: the model's keyword for the cache. transformers 5.24 renamed
  ``past_key_values`` to ``cache`` (the old name warns that it will be removed in 5.40); the name
  is read from the model's ``forward`` signature, so one call works across the whole range.
* :func:`guard_inputs`: ``model.generate`` builds absolute ``position_ids`` and a 2D
  ``attention_mask`` from the prompt. A compacting cache places positions itself (a compacted
  cache holds fewer slots than tokens seen), so those inputs would be wrong, and a padded batch or
  a second ``generate`` turn cannot be expressed at all (one set of slots for the whole batch; the
  second turn re-feeds tokens the cache has already seen). The guard, a forward pre-hook that
  :meth:`CachePolicy.make_cache` installs once per model, drops the inputs that only restate what the
  cache knows (then ``generate`` computes exactly what the harness's own loop does) and refuses the
  rest with :class:`UnsupportedInputError`. It watches every cache a policy builds except
  transformers' ``DynamicCache`` (the full cache), which handles padding and positions itself.
"""

from __future__ import annotations

import inspect

import torch

CACHE_KEYWORDS = ("cache", "past_key_values")
_GUARD_FLAG = "_lacache_input_guard"
_FED = "_lacache_tokens_fed"  # on a watched cache: tokens fed through it so far


class UnsupportedInputError(ValueError):
    """Inputs a compacting cache cannot serve correctly (padding, a second turn, foreign positions)."""


_KEYWORDS: dict[type, str] = {}


def cache_keyword(model) -> str:
    """``"cache"`` (transformers >= 5.24) or ``"past_key_values"`` (earlier), as the model's forward names it."""
    cls = type(model)
    if cls not in _KEYWORDS:
        parameters = inspect.signature(model.forward).parameters
        name = next((name for name in CACHE_KEYWORDS if name in parameters), None)
        if name is None:
            raise TypeError(f"{cls.__name__}.forward takes none of {CACHE_KEYWORDS}; it cannot use a KV cache policy")
        _KEYWORDS[cls] = name
    return _KEYWORDS[cls]


def cache_kwarg(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` and ``model.generate(...)``: ``model(ids, **cache_kwarg(model, cache))``."""
    return {cache_keyword(model): cache}


def watch(model, cache):
    """Have :func:`guard_inputs` check the calls into ``cache`` (installed on ``model`` once); returns ``cache``."""
    from transformers.cache_utils import DynamicCache

    if not isinstance(cache, DynamicCache):
        setattr(cache, _FED, 0)
        if not getattr(model, _GUARD_FLAG, False):
            model.register_forward_pre_hook(guard_inputs, with_kwargs=True)
            setattr(model, _GUARD_FLAG, True)
    return cache


def _check_resumes(cache, start: int, seen: int) -> None:
    """The call's tokens start at index ``start``; the cache has been fed ``seen`` tokens."""
    if start != seen:
        raise UnsupportedInputError(
            f"this call continues from token {start}, but {type(cache).__name__} has been fed {seen} tokens and holds "
            f"{cache.get_seq_length()} after compression: a second generate() turn on a compressed cache re-feeds "
            "tokens it has already seen (generate() counts what the cache holds, not what it was fed). Build a new "
            "cache with policy.make_cache() for the whole conversation, or feed only the new tokens with "
            "model(new_ids, **cache_kwarg(model, cache)) calls"
        )


def guard_inputs(model, args: tuple, kwargs: dict):
    """Forward pre-hook: make a call into a watched cache equal to the harness's plain
    ``model(ids, cache)`` call, or refuse it. Calls with any other cache pass unchanged."""
    cache = next((kwargs[name] for name in CACHE_KEYWORDS if hasattr(kwargs.get(name), _FED)), None)
    if cache is None:
        return None
    tokens = args[0] if args else kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")[..., 0]
    count = tokens.shape[1]
    seen = getattr(cache, _FED)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise UnsupportedInputError(
                f"{type(cache).__name__} takes no custom attention mask (got {type(mask).__name__}"
                f"{' of shape ' + str(tuple(mask.shape)) if isinstance(mask, torch.Tensor) else ''}); pass none or a 2D mask of ones"
            )
        if not bool(mask.all()):
            raise UnsupportedInputError(
                f"padded batch: {type(cache).__name__} (a compressing cache) shares one set of slots and positions "
                "across the batch, so padding would be attended and mis-positioned. Generate one sequence at a time, "
                "or batch prompts of equal length (an all-ones attention mask); the full cache supports padding"
            )
        _check_resumes(cache, mask.shape[1] - count, seen)
        kwargs["attention_mask"] = None  # all ones and consistent: the same as none
    positions = kwargs.get("position_ids")
    if positions is not None:
        first = positions[..., :1]
        steps = torch.arange(count, device=positions.device)
        if positions.shape[-1] != count or not bool((positions == first.flatten()[0] + steps).all()):
            raise UnsupportedInputError(
                f"{type(cache).__name__} places positions itself; got position_ids other than consecutive token "
                "indices shared by the batch. Pass no position_ids"
            )
        _check_resumes(cache, int(first.flatten()[0]), seen)
        kwargs["position_ids"] = None  # the token indices generate() builds; the cache's own positions replace them
    setattr(cache, _FED, seen + count)
    return args, kwargs


def text_config(config):
    """The language model's config of a (possibly multimodal) model config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


SLIDING, GLOBAL = "sliding_attention", "full_attention"


def sliding_layers(config) -> list[bool] | None:
    """Which decoder layers attend through a sliding window, for a model that interleaves them with global
    layers (Gemma 2/3: ``config.layer_types``); ``None`` for every other model (all layers global)."""
    types = getattr(text_config(config), "layer_types", None)
    if not types or SLIDING not in types or GLOBAL not in types:
        return None
    unknown = sorted(set(types) - {SLIDING, GLOBAL})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported; a cache policy knows {SLIDING!r} and {GLOBAL!r} layers")
    return [kind == SLIDING for kind in types]


def compressed_layers(config) -> list[int]:
    """The decoder layers a cache policy compresses: the global layers of a hybrid model, else every layer."""
    sliding = sliding_layers(config)
    layers = text_config(config).num_hidden_layers
    return list(range(layers)) if sliding is None else [i for i in range(layers) if not sliding[i]]
