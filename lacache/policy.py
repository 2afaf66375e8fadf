"""The cache-policy interface: every method (LaCache, baselines, your own) is one small dataclass.

A policy is configuration; :meth:`CachePolicy.make_cache` builds the per-sequence transformers
``Cache`` that does the work. The harness only talks to this interface, so adding a policy means
one Python file plus one ``configs/cache/<name>.yaml`` whose ``_target_`` names the class.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import Cache

from lacache.compat import sliding_layers, watch

PREFILL_MODES = ("full", "chunked")
DECODE_MODES = ("exact", "fast", "triton", "hf-generate")


class PolicyConfigError(ValueError):
    """A cache-policy setting that cannot work; raised before the model loads where possible."""


def check_decode(policy: "CachePolicy", model_config) -> None:
    """The fast decode paths hold every layer in one ring layout with one rotary base: hybrid models
    (sliding-window and global layers, Gemma 2/3) decode on the exact path."""
    if policy.decode != "exact" and sliding_layers(model_config) is not None:
        raise PolicyConfigError(
            f"decode={policy.decode} is not available on a model with sliding-window layers (Gemma 2/3): the fast "
            "decode paths know one layer kind and one rotary base; use cache.decode=exact"
        )


@dataclass
class CachePolicy:
    """Base class. ``budget``: KV entries kept per layer, an int (absolute) or a float in (0, 1]
    (fraction of the prompt, or of the model's max length when ``budget_of='max_length'``).
    ``None`` means unbounded. The same budget means the same number of entries per layer for
    every policy, so "50%" compares like with like."""

    name: ClassVar[str] = "base"
    #: True when feeding several tokens at once gives exactly the logits of feeding them one by one.
    exact_chunks: ClassVar[bool] = False
    #: True when the cache converts to ``lacache.decode`` (``decode=fast``).
    fast_decode: ClassVar[bool] = False
    #: True when it converts to the ring layout, whose fused step has Triton kernels (``decode=triton``).
    ring_decode: ClassVar[bool] = False
    #: False when a stream from an empty cache (``task=ppl``) compresses in a way only the exact path runs.
    fast_stream: ClassVar[bool] = True
    #: True when the policy is transformers' own cache, so ``decode=hf-generate`` (``model.generate`` over
    #: left-padded batches, the anchor evaluation scripts use) runs it as it is.
    hf_generate: ClassVar[bool] = False

    budget: int | float | None = None
    budget_of: str = "prompt"
    prefill: str = "full"
    prefill_chunk: int = 512
    decode: str = "exact"  # exact: the model's forward on this cache | fast: lacache.decode.fast (CUDA graphs on a GPU)
    #                       | triton: fast, with the fused step's Triton kernels (CUDA, Llama-family models)
    #                       | hf-generate: transformers' generate, left-padded batches (the full cache only)

    def __post_init__(self) -> None:
        if self.prefill not in PREFILL_MODES:
            raise PolicyConfigError(f"prefill={self.prefill!r} is not one of {PREFILL_MODES}")
        if self.decode not in DECODE_MODES:
            raise PolicyConfigError(f"decode={self.decode!r} is not one of {DECODE_MODES}")
        if self.decode == "fast" and not self.fast_decode:
            raise PolicyConfigError(
                f"decode=fast is not available for {self.name}; it is for full, streamingllm, lacache, h2o, tova, "
                "snapkv and pyramidkv"
            )
        if self.decode == "triton" and not self.ring_decode:
            raise PolicyConfigError(
                f"decode=triton is not available for {self.name}; it is for full, streamingllm and lacache "
                "(the ring layout); use decode=fast"
            )
        if self.decode == "hf-generate" and not self.hf_generate:
            raise PolicyConfigError(
                f"decode=hf-generate is not available for {self.name}; it runs transformers' own generate with its "
                "dynamic cache: use cache=full"
            )
        if self.budget_of not in ("prompt", "max_length"):
            raise PolicyConfigError(f"budget_of={self.budget_of!r} is not one of ('prompt', 'max_length')")
        if self.prefill_chunk < 1:
            raise PolicyConfigError(f"prefill_chunk={self.prefill_chunk} must be >= 1")
        b = self.budget
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise PolicyConfigError(f"budget={b!r} must be an int (entries) or a float in (0, 1] (fraction)")
            if isinstance(b, float) and not 0 < b <= 1:
                raise PolicyConfigError(f"budget={b} as a float is a fraction and must be in (0, 1]; use an int for entries")
            if isinstance(b, int) and b < 1:
                raise PolicyConfigError(f"budget={b} must be >= 1")

    def __init_subclass__(cls, **kwargs):
        """Every policy's ``make_cache`` has :func:`lacache.compat.guard_inputs` watch its cache, so that
        ``model.generate`` with a compressing cache gives the harness's tokens or a clear refusal."""
        super().__init_subclass__(**kwargs)
        build = cls.__dict__.get("make_cache")
        if build is not None and not getattr(build, "guarded", False):

            @functools.wraps(build)
            def make_cache(self, model, prompt_length=None):
                check_decode(self, model.config)
                return watch(model, build(self, model, prompt_length))

            make_cache.guarded = True
            cls.make_cache = make_cache

    # -------------------------------------------------------------- budget
    @property
    def is_fraction(self) -> bool:
        return isinstance(self.budget, float)

    def resolve_budget(self, prompt_length: int | None = None, max_length: int | None = None) -> int | None:
        """Entries per layer for one sequence (fractions resolve against the prompt or max length)."""
        if self.budget is None or not self.is_fraction:
            return self.budget
        base = max_length if self.budget_of == "max_length" else prompt_length
        if base is None:
            raise PolicyConfigError(
                f"budget={self.budget} is a fraction of the {self.budget_of.replace('_', ' ')}, which this task does "
                "not provide; give an absolute budget (an int)"
            )
        return max(1, int(self.budget * base))

    # -------------------------------------------------------------- hooks
    def check(self, model_config) -> None:
        """Validate against the model's config, before any weights load."""
        check_decode(self, model_config)

    def prepare_model(self, model: torch.nn.Module) -> None:
        """One-time model set-up the policy needs (e.g. an attention implementation that reports scores)."""

    def make_cache(self, model: torch.nn.Module, prompt_length: int | None = None) -> Cache:
        """A fresh cache for one sequence (never reuse one across sequences)."""
        raise NotImplementedError

    def new_cache(self, model: torch.nn.Module, prompt_length: int | None = None, max_length: int | None = None) -> Cache:
        """``make_cache`` for a task: with ``budget_of='max_length'``, a fraction resolves against the task's
        ``max_length`` when it gives one (LongBench's truncation length: the reference's
        ``int(budget * max_length)``) instead of the model's ``max_position_embeddings``."""
        if max_length is None or not self.is_fraction or self.budget_of != "max_length":
            return self.make_cache(model, prompt_length)
        return dataclasses.replace(self, budget=self.resolve_budget(max_length=max_length)).make_cache(model, prompt_length)

    def prefill_chunks(self, prompt_length: int) -> list[int]:
        """Sizes of the forwards that feed a prompt: one exact pass, or bounded chunks."""
        if self.prefill == "full" or prompt_length <= self.prefill_chunk:
            return [prompt_length]
        full, rest = divmod(prompt_length, self.prefill_chunk)
        return [self.prefill_chunk] * full + ([rest] if rest else [])

    def describe(self) -> dict:
        """Flat id fields for records and tables."""
        ids = {"policy": self.name, "budget": self.budget}
        if self.decode != "exact":
            ids["decode"] = self.decode
        return ids
