"""Needle in a haystack: pass-key retrieval over a grid of context lengths x depths (``task=niah``).

As in LaCache's ``niah/pred.py`` (after landmark attention's pass-key test): a random numeric pass
key is hidden in a long irrelevant text and the model is asked for it::

    There is important information hidden in a lot of irrelevant text. Find it and memorize it. ...
    <haystack before> The pass key is 52719. Remember it. 52719 is the pass key. <haystack after>
    What is the pass key? The pass key is

The reference's own format is a set of options (``paper_niah`` sets them all): ``haystack=repeat``
(its "The grass is green. ..." sentences; default ``essays``: Paul Graham's essays, whole sentences
from a seeded random start), ``needle=line`` (the needle on a line of its own, the prompt's parts
joined by newlines; default ``inline``: between two sentences), ``pass_key_digits=null`` (a key in
1..99999; default 5 digits), ``max_new_tokens=answer`` (as many tokens as the answer has, see
:func:`answer_tokens`; default 16) and ``scoring=substring`` (``gold in prediction``; default
``number``: the key as a whole number, so "152719" does not count for 52719). Always different: the
context length is met in tokens of the model's own tokenizer (prompt + ``max_new_tokens`` fit in it,
as close as whole sentences allow) instead of the reference's character count, and the needle goes
between whole sentences at ``depth`` (fraction of the haystack's sentences before it) instead of at
a character offset.
``chat_template=true`` puts the prompt (without the final "The pass key is") in the chat template
and appends "The pass key is" after the generation prompt; the default is the reference's plain prompt.

Sample ``i`` of every cell uses the same pass key and haystack start (seeded by ``seed`` and ``i``),
so a row or column of the grid differs only in length or depth.

Generation and compression: :mod:`lacache.tasks.generation` (a new cache per sample).
``compress=prompt`` (default, the reference's setting) compresses the whole prompt as one sequence;
``compress=context`` compresses the context = the task description and the haystack (with the
needle), up to the haystack's last sentence, then feeds the question (``\nWhat is the pass key?``,
the chat template's tail if any, ``The pass key is``) through the compressed cache. A fractional
budget resolves against the prompt length (the reference's ``int(budget * prompt_tokens)``), or the
context length under ``compress=context``.

Output: ``niah/acc`` (fraction correct over all cells, each cell weighted equally),
``curves["niah_grid"]`` (one point per cell: ``context_length``, ``depth``, ``acc``, mean prompt
tokens), per-sample records, and an accuracy heatmap PNG (depth x length) under ``artifacts_dir``
(``TaskResult.artifacts["niah_heatmap"]``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tqdm.auto import tqdm

from lacache.assets import essays_text
from lacache.tasks import generation as gen
from lacache.tasks.base import RunContext, Task, TaskConfigError, TaskResult
from lacache.tasks.ruler import check_context_length
from lacache.tasks.ruler_data import split_sentences

TASK_DESCRIPTION = (
    "There is important information hidden in a lot of irrelevant text. "
    "Find it and memorize it. You will be quizzed on this hidden information."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."  # the reference's
HAYSTACKS = ("essays", "repeat")
NEEDLE_PLACES = ("inline", "line")
SCORINGS = ("number", "substring")


@functools.lru_cache(maxsize=2)
def haystack_sentences(kind: str = "essays") -> tuple[str, ...]:
    """The haystack's sentences: Paul Graham's essays, or the reference's five repeated sentences."""
    text = essays_text() if kind == "essays" else REPEAT
    return tuple(" ".join(s.split()) for s in split_sentences(text))


def _rng(*parts) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, ("lacache-niah", *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def recovered(pass_key: str, text: str, scoring: str = "number") -> bool:
    """The pass key occurs in ``text`` as a whole number (not inside a longer one), or with
    ``scoring="substring"`` anywhere in it (the reference's ``gold in prediction``)."""
    if scoring == "substring":
        return pass_key in text
    return re.search(rf"(?<!\d){re.escape(pass_key)}(?!\d)", text) is not None


def answer_tokens(tokenizer, pass_key: str) -> int:
    """Tokens to generate for ``max_new_tokens=answer``: the reference's count of the answer
    (``tokenizer(answer).input_ids``, special tokens included), or, where that is fewer, the count of
    the key as it continues the prompt (" " + key): SmolLM2 writes the space as a token of its own,
    so the reference's 5 tokens for a 5-digit key would end one digit short."""
    return max(len(tokenizer(pass_key).input_ids), len(gen.encode(tokenizer, " " + pass_key)))


@dataclass
class NeedleSample:
    context_length: int
    depth: float
    index: int
    pass_key: str
    prompt_ids: list[int]
    haystack_sentences: int
    needle_sentence: int  # haystack sentences before the needle
    max_new_tokens: int
    context_tokens: int | None = None  # leading prompt tokens compressed alone (compress=context)


@dataclass
class NeedleTask(Task):
    name: ClassVar[str] = "niah"

    context_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    num_samples: int = 5
    seed: int = 42
    pass_key_digits: int | None = 5  # null: the reference's key, 1..99999
    max_new_tokens: int | str = 16  # or "answer": the answer's token count (answer_tokens), as the reference
    haystack: str = "essays"  # essays | repeat (the reference's "The grass is green. ..." sentences)
    needle: str = "inline"  # inline: the needle between two sentences | line: on a line of its own (the reference)
    scoring: str = "number"  # number: the key as a whole number | substring: the reference's `gold in prediction`
    chat_template: bool = False
    allow_long: bool = False
    artifacts_dir: str = "runs/artifacts"
    compress: str = "prompt"  # prompt | context (see the module docstring)
    batch_size: int = 1  # prompts of equal length decoded together (gen.generate_all)

    def __post_init__(self) -> None:
        self.batch_size = gen.check_batch_size(self.batch_size)
        if isinstance(self.context_lengths, int):
            self.context_lengths = [self.context_lengths]
        if isinstance(self.depths, (int, float)):
            self.depths = [self.depths]
        self.context_lengths = list(self.context_lengths)
        self.depths = [float(d) for d in self.depths]
        if not self.context_lengths or any(int(n) != n or n < 1 for n in self.context_lengths):
            raise TaskConfigError(f"task.context_lengths={self.context_lengths} must be a non-empty list of positive integers")
        if len(set(self.context_lengths)) != len(self.context_lengths):
            raise TaskConfigError(f"task.context_lengths={self.context_lengths} repeats a length")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise TaskConfigError(f"task.depths={self.depths} must be a non-empty list of fractions in [0, 1]")
        if len(set(self.depths)) != len(self.depths):
            raise TaskConfigError(f"task.depths={self.depths} repeats a depth")
        if int(self.num_samples) != self.num_samples or self.num_samples < 1:
            raise TaskConfigError(f"task.num_samples={self.num_samples} must be a positive integer")
        if self.pass_key_digits is not None and not 1 <= self.pass_key_digits <= 30:
            raise TaskConfigError(f"task.pass_key_digits={self.pass_key_digits} must be in [1, 30], or null (1..99999)")
        if self.max_new_tokens != "answer" and (isinstance(self.max_new_tokens, str) or self.max_new_tokens < 1):
            raise TaskConfigError(f"task.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1 or 'answer'")
        for name, valid in (("haystack", HAYSTACKS), ("needle", NEEDLE_PLACES), ("scoring", SCORINGS)):
            if getattr(self, name) not in valid:
                raise TaskConfigError(f"task.{name}={getattr(self, name)!r} is not one of {valid}")
        gen.check_compress(self.compress)

    def check(self, model_config, policy, max_length) -> None:
        check_context_length(max(self.context_lengths), max_length, self.allow_long, "max(task.context_lengths)")

    # ------------------------------------------------------------------ data
    def pass_key(self, index: int) -> str:
        rng = _rng(self.seed, index, "key")
        if self.pass_key_digits is None:
            return str(rng.randint(1, 99999))
        return str(rng.randint(10 ** (self.pass_key_digits - 1), 10**self.pass_key_digits - 1))

    def prompt_ids(self, tokenizer, before: list[str], after: list[str], key: str, context_only: bool = False) -> list[int]:
        """The prompt's token ids; ``context_only``: the same prompt cut after the haystack."""
        needle = NEEDLE.format(key=key)
        if self.needle == "line":  # the reference's "\n".join([description, before, needle, after, question])
            body = "\n".join([TASK_DESCRIPTION, " ".join(before), needle, " ".join(after)])
        else:
            body = TASK_DESCRIPTION + "\n" + " ".join([*before, needle, *after])
        if context_only:
            return gen.build_prompt(tokenizer, body, self.chat_template)
        if self.chat_template:
            return gen.build_prompt(tokenizer, f"{body}\n{QUESTION}", True, ANSWER_PREFIX)
        return gen.build_prompt(tokenizer, f"{body}\n{QUESTION} {ANSWER_PREFIX}", False)

    def build(self, tokenizer, context_length: int, depth: float, index: int, counts: dict) -> NeedleSample:
        """The sample whose prompt, with ``max_new_tokens``, fills ``context_length`` as closely as whole sentences allow."""
        sentences = haystack_sentences(self.haystack)
        total = len(sentences)
        start = _rng(self.seed, index, "start").randrange(total) if self.haystack == "essays" else 0
        key = self.pass_key(index)
        max_new = answer_tokens(tokenizer, key) if self.max_new_tokens == "answer" else self.max_new_tokens
        budget = context_length - max_new
        limit = total if self.haystack == "essays" else budget  # repeated sentences never run out

        def sentence(i: int) -> str:
            return sentences[(start + i) % total]

        def count(i: int) -> int:  # tokens of one sentence (with its joining space), cached per run
            j = (start + i) % total
            if j not in counts:
                batch = [(j + k) % total for k in range(64) if (j + k) % total not in counts]
                for b, ids in zip(batch, tokenizer([" " + sentences[b] for b in batch], add_special_tokens=False).input_ids):
                    counts[b] = len(ids)
            return counts[j]

        def make(k: int, context_only: bool = False) -> list[int]:
            cut = round(depth * k)
            resume = cut if self.haystack == "essays" else 0  # the reference's text starts over after the needle
            return self.prompt_ids(tokenizer, [sentence(i) for i in range(cut)], [sentence(resume + i) for i in range(k - cut)],
                                   key, context_only)

        fixed = len(make(0))
        if fixed > budget:
            raise TaskConfigError(
                f"niah: context_length={context_length} leaves no room for a haystack (the prompt without one "
                f"has {fixed} tokens, plus max_new_tokens={max_new})"
            )
        k, used = 0, fixed
        while k < limit and used + count(k) <= budget:  # estimate from per-sentence counts
            used += count(k)
            k += 1
        ids = make(k)
        while len(ids) > budget and k > 0:  # joined text tokenizes a little differently: fix exactly
            k -= 1
            ids = make(k)
        while k < limit:
            longer = make(k + 1)
            if len(longer) > budget:
                break
            k, ids = k + 1, longer
        split = gen.context_split(ids, make(k, context_only=True)) if self.compress == "context" else None
        return NeedleSample(context_length, depth, index, key, ids, k, round(depth * k), max_new, split)

    def samples(self, tokenizer) -> list[NeedleSample]:
        if self.chat_template and not gen.has_chat_template(tokenizer):
            raise TaskConfigError("task.chat_template=true but the tokenizer has no chat template; set it to false")
        counts: dict[int, int] = {}
        return [
            self.build(tokenizer, length, depth, index, counts)
            for length in self.context_lengths
            for depth in self.depths
            for index in range(self.num_samples)
        ]

    # ------------------------------------------------------------------ run
    def run(self, ctx: RunContext) -> TaskResult:
        check_context_length(max(self.context_lengths), ctx.max_length, self.allow_long, "max(task.context_lengths)")
        drawn = self.samples(ctx.tokenizer)
        records = []
        started = time.perf_counter()
        bar = tqdm(total=len(drawn), desc=f"niah {ctx.policy.name}", unit="sample", disable=not ctx.progress)
        requests = [gen.Request(s.prompt_ids, s.max_new_tokens, {"context_tokens": s.context_tokens}) for s in drawn]
        generations = gen.generate_all(ctx.model, ctx.tokenizer, ctx.policy, requests, self.batch_size, bar.update)
        bar.close()
        for sample, out in zip(drawn, generations):
            records.append({
                "context_length": sample.context_length,
                "depth": sample.depth,
                "index": sample.index,
                "pass_key": sample.pass_key,
                "prediction": out.text,
                "score": float(recovered(sample.pass_key, out.text, self.scoring)),
                "haystack_sentences": sample.haystack_sentences,
                **out.record(),
            })
        wall = time.perf_counter() - started
        grid = []
        for length in self.context_lengths:
            for depth in self.depths:
                cell = [r for r in records if r["context_length"] == length and r["depth"] == depth]
                grid.append({
                    "context_length": length,
                    "depth": depth,
                    "acc": sum(r["score"] for r in cell) / len(cell),
                    "prompt_tokens_mean": sum(r["prompt_tokens"] for r in cell) / len(cell),
                })
        metrics = {"niah/acc": sum(p["acc"] for p in grid) / len(grid)}
        path = self.heatmap(grid, ctx, metrics["niah/acc"])
        return TaskResult(
            metrics=metrics,
            curves={"niah_grid": grid},
            samples=records,
            stats=gen.summarize(generations, wall),
            artifacts={"niah_heatmap": str(path)},
        )

    # ------------------------------------------------------------------ figure
    def artifact_path(self, ctx: RunContext) -> Path:
        """A file name that is stable for one configuration and distinct across configurations."""
        model = getattr(getattr(ctx.model, "config", None), "_name_or_path", "") or type(ctx.model).__name__
        identity = {"model": str(model), "policy": ctx.policy.describe(), "task": self.describe(), "seed": ctx.seed,
                    "depths": self.depths, "max_new_tokens": self.max_new_tokens, "chat": self.chat_template,
                    "digits": self.pass_key_digits}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
        budget = ctx.policy.budget
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{ctx.policy.name}-{'full' if budget is None else budget}")
        return Path(self.artifacts_dir) / f"niah_{slug}_{digest}.png"

    def heatmap(self, grid: list[dict], ctx: RunContext, acc: float) -> Path:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global backend switch

        values = np.array([[next(p["acc"] for p in grid if p["context_length"] == n and p["depth"] == d)
                            for n in self.context_lengths] for d in self.depths])
        fig = Figure(figsize=(1.4 * len(self.context_lengths) + 2.5, 0.6 * len(self.depths) + 1.8), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(100 * values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(self.context_lengths)), [f"{n}" for n in self.context_lengths])
        ax.set_yticks(range(len(self.depths)), [f"{100 * d:.0f}%" for d in self.depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth of the pass key")
        for i in range(len(self.depths)):
            for j in range(len(self.context_lengths)):
                ax.text(j, i, f"{100 * values[i, j]:.0f}", ha="center", va="center", fontsize=9)
        describe = " ".join(f"{k}={v}" for k, v in ctx.policy.describe().items() if v is not None)
        ax.set_title(f"NIAH pass key ({describe}, compress={self.compress})\naccuracy {100 * acc:.1f}%, "
                     f"{self.num_samples}/cell", fontsize=9)
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        path = self.artifact_path(ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path

    def describe(self) -> dict:
        return {
            "task": self.name,
            "context_lengths": ",".join(map(str, self.context_lengths)),
            "num_samples": self.num_samples,
            "compress": self.compress,
            "format": f"{self.haystack},{self.needle},{self.scoring}",
            **({"batch_size": self.batch_size} if self.batch_size > 1 else {}),
        }
