"""The task interface: a task turns (model, tokenizer, cache policy) into metrics and curves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lacache.policy import CachePolicy


class TaskConfigError(ValueError):
    """A task setting or dataset that cannot work; raised before the model loads where possible."""


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

    def run(self, ctx: RunContext) -> TaskResult:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"task": self.name}
