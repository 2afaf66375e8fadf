"""The task interface: a task turns (model, tokenizer, cache policy) into metrics and curves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lacache.policy import CachePolicy


class TaskConfigError(ValueError):
    """A task setting or dataset that cannot work; raised before the model loads where possible."""


def check_choices(chosen: list[str], valid, kind: str, field: str, also: str = "") -> list[str]:
    """A non-empty, duplicate-free list of ``kind`` names from ``valid``; otherwise an error naming the valid ones."""
    chosen = list(chosen)
    choices = f"{also}{', '.join(valid)}"
    if not chosen:
        raise TaskConfigError(f"{field} is empty; valid: {choices}")
    unknown = [name for name in chosen if name not in valid]
    if unknown:
        raise TaskConfigError(f"unknown {kind}(s) {unknown}; valid: {choices}")
    if len(set(chosen)) != len(chosen):
        raise TaskConfigError(f"{field} lists a {kind} twice: {chosen}")
    return chosen


@dataclass
class RunContext:
    model: Any
    tokenizer: Any
    policy: CachePolicy
    model_config: Any
    max_length: int | None
    seed: int = 0
    progress: bool = True


@dataclass
class TaskResult:
    metrics: dict[str, float]
    curves: dict[str, list[dict]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # speed and memory
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> file path (figures)


@dataclass
class Task:
    name: ClassVar[str] = "base"

    def check(self, model_config, policy: CachePolicy, max_length: int | None) -> None:
        """Validate settings and data availability before the model loads."""

    def prompt_length(self, tokenizer) -> int | None:
        """Optional: the prompt length in tokens, where the tokenizer alone can tell (the runner then checks a
        fractional budget's ladder before the weights load); raise ``TaskConfigError`` for unusable data."""
        return None

    def run(self, ctx: RunContext) -> TaskResult:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"task": self.name}
