"""RULER's 13 synthetic long-context tasks through any cache policy (``task=ruler``).

Samples come from :mod:`lacache.tasks.ruler_data` (NVIDIA's RULER templates, data and metrics) for the
model's own tokenizer. Each prompt is RULER's input wrapped as one user message of the model's chat
template (applied after generation: RULER's niah rewrites 'are' -> 'is' in its template, which would
mangle a chat system prompt), followed by the task's answer prefix verbatim (its leading space too, as
RULER's ``prepare.py`` appends it to a model template); ``chat_template=false`` feeds
``input + answer_prefix`` plainly (RULER's 'base' template). ``fill=max`` grows each haystack as large
as fits; ``fill=nvidia`` uses RULER's own coarse haystack size (500-word essay steps etc., see
:func:`lacache.tasks.ruler_data.generate`), so e.g. essay niah at 2K holds ~1.45K tokens as in RULER.
``fill=exact`` is ``max`` with every prompt of a task brought to one token length, that of its longest:
the shortfall (less than one haystack unit: a word, a sentence, a noise line, a document) is made up
of newline tokens at the end of the context, before the question. The question, needles and
references are untouched, so what is scored is the same; the prompts of a task then batch together
(``batch_size``), which on a GPU is most of the throughput. Under ``compress=context`` the filler
counts as context, and prompts batch together where their questions have the same length too.

The chat wrapper's tokens count against the haystack, so prompt + ``max_new_tokens`` stays within
``context_length`` (RULER's rule, where the model template is part of the generated text); the
actual lengths are recorded per sample (``length``: RULER's text without the wrapper;
``prompt_tokens``: what the model was fed).

Generation and compression: :mod:`lacache.tasks.generation` (greedy, a new cache per sample).
``compress=prompt`` (default) compresses the whole prompt as one sequence; ``compress=context``
compresses the context only, then feeds the question through the compressed cache. The context is
everything up to the end of RULER's ``{context}`` (instructions, vt's and cwe's in-context examples,
the haystack / documents / word list, and the chat template's head); the question is the rest: the
template's text after ``{context}`` (e.g. ``\nWhat is the special magic number for X mentioned in
the provided text?``), the chat template's tail and the answer prefix. A fractional budget resolves
against the prompt length, or the context length under ``compress=context``.

Metrics (RULER's scale, 0-100): ``ruler/<task>`` (string_match_all, or string_match_part for qa)
and ``ruler/avg`` (mean over the tasks run). Each sample carries its own score in [0, 1].
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from tqdm.auto import tqdm

from lacache.tasks import generation as gen
from lacache.tasks import ruler_data
from lacache.tasks.base import RunContext, Task, TaskConfigError, TaskResult, check_choices


def _task_list(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = list(ruler_data.RULER_TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    return check_choices(tasks, ruler_data.RULER_TASKS, "RULER task", "task.tasks", also="'all' or ")


def check_context_length(context_length: int, max_length: int | None, allow_long: bool, what: str = "task.context_length") -> None:
    """Refuse a context longer than the model's max length unless ``allow_long`` (then warn)."""
    if max_length is None or context_length <= max_length:
        return
    message = f"{what}={context_length} exceeds the model's max length {max_length}"
    if not allow_long:
        raise TaskConfigError(f"{message}; lower it, or set task.allow_long=true to run past it anyway")
    warnings.warn(f"{message}; running anyway (allow_long=true)", stacklevel=3)


class _CountingWrapper:
    """What ruler_data sees of the tokenizer (it only counts tokens): every text counts ``extra``
    tokens more, the chat wrapper's, so the haystack leaves room for it."""

    def __init__(self, tokenizer, extra: int):
        self.tokenizer, self.extra = tokenizer, extra

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [0] * self.extra + list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))


_DRAWN: dict = {}  # RulerTask.samples of this process: {settings key: (tokenizer, samples)}
FILL_MODES = (*ruler_data.FILL_MODES, "exact")  # exact: ruler_data's max, then one token length per task (the docstring)


@dataclass
class RulerTask(Task):
    name: ClassVar[str] = "ruler"

    tasks: list[str] | str = field(default_factory=lambda: list(ruler_data.RULER_TASKS))
    context_length: int = 4096
    num_samples: int = 5
    seed: int = 42
    chat_template: bool = True
    allow_long: bool = False
    compress: str = "prompt"  # prompt | context (see the module docstring)
    fill: str = "max"  # max: haystack as large as fits | nvidia: RULER's coarse size | exact: max, one length per task
    batch_size: int = 1  # prompts of equal length decoded together (gen.generate_all)

    def __post_init__(self) -> None:
        self.tasks = _task_list(self.tasks)
        gen.check_compress(self.compress)
        self.batch_size = gen.check_batch_size(self.batch_size)
        if self.fill not in FILL_MODES:
            raise TaskConfigError(f"task.fill={self.fill!r} is not one of {FILL_MODES}")
        if int(self.context_length) != self.context_length or self.context_length < 1:
            raise TaskConfigError(f"task.context_length={self.context_length} must be a positive integer")
        if int(self.num_samples) != self.num_samples or self.num_samples < 1:
            raise TaskConfigError(f"task.num_samples={self.num_samples} must be a positive integer")

    def check(self, model_config, policy, max_length) -> None:
        check_context_length(self.context_length, max_length, self.allow_long)

    # ------------------------------------------------------------------ data
    def samples(self, tokenizer) -> dict[str, list[tuple[ruler_data.RulerSample, list[int]]]]:
        """Per task: (RULER sample, prompt token ids), the prompt fitting ``context_length`` with its answer.

        Drawn once per process for the same tokenizer and data settings: a sweep's points (policies,
        budgets, compress modes) reuse them, as they are the same samples (~10-20 s per 300 at 2K)."""
        key = (id(tokenizer), tuple(self.tasks), self.context_length, self.num_samples, self.seed, self.fill, self.chat_template)
        if key not in _DRAWN:
            _DRAWN.clear()  # one set of samples at a time: a sweep runs its points for one data setting together
            _DRAWN[key] = (tokenizer, self._draw(tokenizer))  # the tokenizer is held so that its id stays its own
        return _DRAWN[key][1]

    def _draw(self, tokenizer) -> dict[str, list[tuple[ruler_data.RulerSample, list[int]]]]:
        """:meth:`samples`, computed.

        The chat wrapper's tokens count against the length: RULER sizes the haystack with a token
        counter that adds them, while ``context_length`` itself (which also picks cwe's repetitions and
        fwe's vocabulary) stays the nominal one. ``length`` of the returned samples is RULER's text alone."""
        try:
            overhead = max(0, gen.chat_overhead(tokenizer, self.chat_template))
        except gen.ChatTemplateError as err:
            raise TaskConfigError(str(err)) from None
        counter = _CountingWrapper(tokenizer, overhead)
        out = {}
        fill = "max" if self.fill == "exact" else self.fill
        for task in self.tasks:
            try:
                drawn = ruler_data.generate(task, counter, self.context_length, self.num_samples, self.seed, fill)
            except ValueError as err:
                raise TaskConfigError(f"RULER {task} at context_length={self.context_length}: {err}") from None
            for sample in drawn:
                sample.length -= overhead
            pairs = [(s, self.prompt_ids(tokenizer, s)) for s in drawn]
            out[task] = self._one_length(tokenizer, pairs) if self.fill == "exact" else pairs
        return out

    def _one_length(self, tokenizer, pairs):
        """``fill=exact``: each prompt brought to the longest one's length by newline tokens inserted where
        its context's tokens end (the split ``compress=context`` uses), recorded on the sample."""
        newline = gen.newline_token_id(tokenizer)
        target = max(len(prompt) for _, prompt in pairs)
        out = []
        for sample, prompt in pairs:
            at = self._context_split(tokenizer, sample, prompt)
            missing = target - len(prompt)
            filled = dataclasses.replace(sample, filler=missing, filler_at=at)
            out.append((filled, prompt[:at] + [newline] * missing + prompt[at:]))
        return out

    def prompt_ids(self, tokenizer, sample: ruler_data.RulerSample) -> list[int]:
        # the answer prefix verbatim, leading space included, as RULER's prepare.py appends it to the model template
        if self.chat_template:
            return gen.encode(tokenizer, gen.apply_chat(tokenizer, sample.input) + sample.answer_prefix)
        return gen.build_prompt(tokenizer, sample.input, False, sample.answer_prefix)

    def context_tokens(self, tokenizer, sample: ruler_data.RulerSample, prompt: list[int]) -> int | None:
        """Under ``compress=context``, the prompt's leading tokens up to the end of RULER's context (the
        filler of ``fill=exact`` included)."""
        if self.compress == "prompt":
            return None
        if sample.filler_at is not None:
            return sample.filler_at + sample.filler
        return self._context_split(tokenizer, sample, prompt)

    def _context_split(self, tokenizer, sample: ruler_data.RulerSample, prompt: list[int]) -> int:
        head = dataclasses.replace(sample, input=sample.input[: sample.context_end], answer_prefix="")
        return gen.context_split(prompt, self.prompt_ids(tokenizer, head))

    # ------------------------------------------------------------------ run
    def run(self, ctx: RunContext) -> TaskResult:
        check_context_length(self.context_length, ctx.max_length, self.allow_long)
        drawn = self.samples(ctx.tokenizer)
        metrics: dict[str, float] = {}
        samples: list[dict] = []
        total = sum(len(v) for v in drawn.values())
        bar = tqdm(total=total, desc=f"ruler {ctx.policy.name}", unit="sample", disable=not ctx.progress)
        started = time.perf_counter()
        items = [(task, sample, prompt) for task, pairs in drawn.items() for sample, prompt in pairs]
        requests = [gen.Request(prompt, sample.max_new_tokens,
                                {"context_tokens": self.context_tokens(ctx.tokenizer, sample, prompt)})
                    for _, sample, prompt in items]
        generations = gen.generate_all(ctx.model, ctx.tokenizer, ctx.policy, requests, self.batch_size, bar.update)
        for (task, sample, _), out in zip(items, generations):
            samples.append({
                "task": task,
                "index": sample.index,
                "prediction": out.text,
                "references": list(sample.outputs),
                "score": ruler_data.score(task, [out.text], [list(sample.outputs)]) / 100,
                "length": sample.length,
                **({"filler_tokens": sample.filler} if self.fill == "exact" else {}),
                **out.record(),
            })
        for task in drawn:
            done = [s for s in samples if s["task"] == task]
            metrics[f"ruler/{task}"] = ruler_data.score(task, [s["prediction"] for s in done], [s["references"] for s in done])
        bar.close()
        wall = time.perf_counter() - started
        metrics["ruler/avg"] = sum(metrics[f"ruler/{t}"] for t in self.tasks) / len(self.tasks)
        stats = gen.summarize(generations, wall)
        stats["length_mean"] = sum(s["length"] for s in samples) / len(samples)
        return TaskResult(metrics=metrics, samples=samples, stats=stats)

    def describe(self) -> dict:
        return {
            "task": self.name,
            "context_length": self.context_length,
            "num_samples": self.num_samples,
            "subtasks": ",".join(self.tasks),
            "compress": self.compress,
            "fill": self.fill,
            **({"batch_size": self.batch_size} if self.batch_size > 1 else {}),
        }
