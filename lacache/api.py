"""The library entry points beyond the policy classes: a policy or model by its config name, and
prompt -> compressed answer the way the harness's tasks run it."""

from __future__ import annotations

from typing import Sequence

import torch

from lacache import CONFIGS
from lacache.policy import CachePolicy, PolicyConfigError
from lacache.tasks import generation as gen


def _config(group: str, name: str):
    from omegaconf import OmegaConf

    path = CONFIGS / group / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
        raise ValueError(f"unknown {group} config {name!r}; valid: {valid}")
    return OmegaConf.load(path)


def make_policy(name: str, **settings) -> CachePolicy:
    """The policy that ``cache=<name>`` runs (``configs/cache/<name>.yaml``), with ``settings`` overriding it."""
    from omegaconf import OmegaConf

    from lacache.harness.runner import build

    return build(OmegaConf.merge(_config("cache", name), settings), "cache")


def load_model(name: str = "smollm2-135m", **settings):
    """``(model, tokenizer)`` of ``model=<name>`` (``configs/model/<name>.yaml``; the default is the
    embedded SmolLM2-135M-Instruct, offline). Any transformers model loaded your own way works too."""
    from omegaconf import OmegaConf

    from lacache import models

    node = OmegaConf.merge(_config("model", name), settings)
    return models.load(models.ModelSpec(**OmegaConf.to_container(node, resolve=True)))


def _ids(part) -> list[int]:
    return part.reshape(-1).tolist() if isinstance(part, torch.Tensor) else list(part)


def generate(
    model,
    tokenizer,
    policy: CachePolicy,
    context: str | Sequence[int] | torch.Tensor,
    question: str | Sequence[int] | torch.Tensor = "",
    *,
    max_new_tokens: int = 64,
    compress: str = "prompt",
    chat_template: bool | None = None,
    **options,
) -> gen.Generation:
    """Greedy answer to ``context + question`` through a fresh cache of ``policy``, as the harness's
    tasks run it (:func:`lacache.tasks.generation.generate`: prefill, then one token per forward).

    ``compress="prompt"`` compresses context and question as one sequence (the paper's setting);
    ``"context"`` compresses the context alone, then feeds the question through the compressed
    cache (kvpress's setting). Texts become one prompt (the tokenizer's chat template around it when
    ``chat_template`` is true; default: when the tokenizer has one), split where the context ends;
    token ids are used as given. ``options``: ``stop_strings``, ``stop_token_ids``, ``eos_ids``,
    ``min_new_tokens``. The result holds the text, the token ids, timings and the cache's stats."""
    if compress not in gen.COMPRESS_MODES:
        raise PolicyConfigError(f"compress={compress!r} is not one of {gen.COMPRESS_MODES}")
    if isinstance(context, str) != isinstance(question, str):
        raise TypeError("context and question must both be text or both be token ids")
    if isinstance(context, str):
        use_chat = gen.has_chat_template(tokenizer) if chat_template is None else chat_template
        prompt = gen.build_prompt(tokenizer, context + question, use_chat)
        split = gen.context_split(prompt, gen.build_prompt(tokenizer, context, use_chat)) if compress == "context" else None
    else:
        head = _ids(context)
        prompt = head + _ids(question)
        split = len(head) if compress == "context" else None
    return gen.generate(model, tokenizer, policy, prompt, max_new_tokens, context_tokens=split, **options)
