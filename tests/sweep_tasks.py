"""Test-only task for tests/test_sweeps.py: streaming PPL that crashes on demand (``explode=true``),
so a sweep has a point that fails at run time (not a configuration error), and that can take a
pause first (``pause_s``), so a test can kill a sweep between two points. Selected with
``task._target_=sweep_tasks.ExplodingPerplexity +task.explode=...`` and ``PYTHONPATH=tests``."""

from __future__ import annotations

import time
from dataclasses import dataclass

from lacache.tasks.ppl import PerplexityTask


@dataclass
class ExplodingPerplexity(PerplexityTask):
    explode: bool = False
    pause_s: float = 0.0

    def run(self, ctx):
        if self.pause_s:
            print(f"[sweep_tasks] pausing {self.pause_s} s", flush=True)
        time.sleep(self.pause_s)
        if self.explode:
            raise RuntimeError("exploded on purpose (test task)")
        return super().run(ctx)
