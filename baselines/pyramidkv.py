"""PyramidKV (Cai et al., 2024; Zefan-Cai/KVCache-Factory; ``cache=pyramidkv``).

SnapKV's selection (:mod:`lacache.baselines.snapkv`) with per-layer budgets that shrink from the
first layer to the last, KVCache-Factory's ``PyramidKVCluster`` schedule. With ``B = budget -
window`` selected entries per layer on average, ``L`` layers and ``n`` tokens seen:

- ``n <= budget``: nothing to compress; ``n < 2B``: every layer keeps ``budget`` (the reference's
  uniform branch);
- otherwise the selected counts fall linearly from ``top = 2B - B/beta`` (layer 0) to
  ``B/beta`` (last layer); when ``top > n - window`` it is clipped to ``n - window`` and the bottom
  raised to ``2B - top``. Each layer also keeps the ``window``.

The total is the uniform one, ``L * budget`` entries, exactly: the reference rounds ``B/beta`` and
the step ``(top - bottom)/(L - 1)`` down, which keeps more (e.g. budget 256, window 32, beta 20,
32 layers: 7536 selected instead of 7168, +5%); here the counts are exact and rounded to integers
that add up to ``L * B`` (largest remainders).

Layers then hold different numbers of entries, which one causal mask cannot serve in a multi-token
forward (nor eager attention, whose one materialised mask is sized for the longest layer; sdpa and
flash attention need no mask for a single new token): compressions inside a chunked prefill (multi-token forwards before the prompt's end) use
the uniform budget; the pyramid applies from the forward that ends the prompt (a full prefill, the
last chunk) and in a token-by-token stream. ``decode_budget`` works as for SnapKV, per layer.

Positions: as in the reference, original positions (``position_mode = "original"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lacache.baselines.snapkv import SnapKVCache, SnapKVPolicy
from lacache.policy import PolicyConfigError


def pyramid_budgets(budget: int, window: int, layers: int, seen: int, beta: float) -> list[int]:
    """Entries each layer keeps (its window included) at a compression after ``seen`` tokens; they add up to ``layers * budget``."""
    selected = budget - window
    if layers == 1 or seen < 2 * selected:
        return [budget] * layers
    bottom = selected / beta
    top = 2 * selected - bottom
    if top > seen - window:
        top = seen - window
        bottom = 2 * selected - top
    exact = [top - (top - bottom) * layer / (layers - 1) for layer in range(layers)]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(layers), key=lambda layer: counts[layer] - exact[layer])  # largest remainders first
    for layer in order[: layers * selected - sum(counts)]:
        counts[layer] += 1
    return [window + c for c in counts]


class PyramidKVCache(SnapKVCache):
    def __init__(self, model, budget, window, kernel, pooling, prompt_length=None, decode_budget=None, beta: float = 20):
        self.beta = beta
        super().__init__(model, budget, window, kernel, pooling, prompt_length, decode_budget)

    def targets(self, seen: int, count: int) -> list[int]:
        if count > 1 and self.prompt_length is not None and seen < self.prompt_length:
            return [self.budget] * self.num_layers  # inside a chunked prefill: the next forward needs equal layers
        return pyramid_budgets(self.budget, self.window, self.num_layers, seen, self.beta)


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    name: ClassVar[str] = "pyramidkv"

    beta: float = 20  # the last layer selects (budget - window) / beta entries

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 1:
            raise PolicyConfigError(f"beta={self.beta} must be > 1 (the first layer keeps the most)")

    def make_cache(self, model, prompt_length=None) -> PyramidKVCache:
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation == "eager":
            raise PolicyConfigError(
                "pyramidkv needs attn_implementation sdpa or flash_attention_2, not eager: its layers hold different "
                "numbers of entries, and eager attention applies one mask sized for the longest layer to every layer"
            )
        return PyramidKVCache(model, self.resolved(model, prompt_length), self.window, self.kernel, self.pooling,
                              prompt_length, self.decode_budget, self.beta)

    def describe(self) -> dict:
        return {**super().describe(), "beta": self.beta}
