"""LongBench v1 through any cache policy (``task=longbench``).

Data, prompts, truncation and metrics are LongBench's official ones (:mod:`lacache.tasks.longbench_data`):
per sample the official prompt is tokenized, middle-truncated to ``max_length`` tokens (first and
last halves, decoded and joined, as in ``pred.py``), wrapped in the model's chat template unless the
dataset is one of ``NO_CHAT_TEMPLATE`` (trec, triviaqa, samsum, lsht, lcc, repobench-p) or
``chat_template=false`` (official ``build_chat`` formats only the models it names, e.g. "llama2",
"chatglm", "longchat"; any other model, SmolLM2 or the hub id ``meta-llama/Llama-2-7b-chat-hf``
that LaCache's pred.py passes, gets the plain prompt), and answered greedily with at most ``MAX_NEW_TOKENS[dataset]`` tokens; samsum also stops at the newline
token and must produce at least one token first (``pred.py``'s ``eos_token_id=[eos, "\\n"]`` and
``min_length``). ``longbench/<dataset>`` is ``eval.py``'s score (0-100, not rounded),
``longbench/avg`` the mean over the datasets run; each sample keeps its own score in [0, 1].

``max_length`` defaults to the model's max length minus the dataset's ``MAX_NEW_TOKENS``, so the
prompt and its answer fit in the positions the model was trained on (the official per-model
``model2maxlen`` values leave this room too, e.g. 3500 for Llama-2's 4096). With the cache's
``budget_of=max_length``, a fractional budget resolves against this truncation length (LaCache's
pred.py: ``cache_size = int(budget * max_length)``, so prompts shorter than it are compressed less
or not at all) instead of the model's position count.

Generation and compression: :mod:`lacache.tasks.generation` (a new cache per sample).
``compress=prompt`` (default, the paper's setting) compresses the whole prompt = context + question
as one sequence; ``compress=context`` compresses the context only, then feeds the question through
the compressed cache. Every official prompt puts the question after the context, so the question is
what the template puts after ``{context}`` (:func:`~lacache.tasks.longbench_data.prompt_question`:
e.g. hotpotqa's ``\n\nAnswer the question based on the given passages. ... Question: {input}\nAnswer:``,
gov_report's ``\n\nNow, write a one-page summary of the report.\n\nSummary:``, lcc's ``Next line of
code:\n``) plus the chat template's tail, and the context is everything before it (the instruction
at the top, the context, the chat template's head). After middle truncation the question is the
part of it that survived (all of it unless the truncation reached into it). A fractional budget
resolves against the prompt length, or the context length under ``compress=context``.

Why not lm-eval's LongBench tasks as the engine: lm-eval's HFLM batches left-padded prompts through
``model.generate()``, and a compressing cache refuses a padded batch (one set of slots for the whole
batch, :mod:`lacache.compat`); run one prompt at a time, its ``generate`` would give this loop's tokens
but not its per-phase timings and ``compress=context`` split. So the generation runs on our own loop
and lm-eval's role is limited to cross-checking the metrics (``tests/test_longbench_data.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tqdm.auto import tqdm

from lacache.tasks import generation as gen
from lacache.tasks import longbench_data as lb
from lacache.tasks.base import RunContext, Task, TaskConfigError, TaskResult, check_choices

DATASET_GROUPS = {"english": lb.ENGLISH_DATASETS, "all": lb.LONGBENCH_DATASETS}


def _dataset_list(datasets) -> list[str]:
    if isinstance(datasets, str):
        if datasets in DATASET_GROUPS:
            return list(DATASET_GROUPS[datasets])
        datasets = [d.strip() for d in datasets.split(",") if d.strip()]
    return check_choices(datasets, lb.LONGBENCH_DATASETS, "LongBench dataset", "task.datasets", also="english, all, or ")


@dataclass
class LongBenchTask(Task):
    name: ClassVar[str] = "longbench"

    datasets: list[str] | str = "english"
    source: str | None = None  # None / "hub": THUDM/LongBench; else a directory (or data.zip)
    limit: int | None = None
    max_length: int | None = None
    compress: str = "prompt"  # prompt | context (see the module docstring)
    chat_template: bool = True  # false: no chat template for any dataset (official build_chat for a model it does not know)

    def __post_init__(self) -> None:
        self.datasets = _dataset_list(self.datasets)
        gen.check_compress(self.compress)
        if self.limit is not None and (int(self.limit) != self.limit or self.limit < 1):
            raise TaskConfigError(f"task.limit={self.limit} must be a positive integer or null")
        if self.max_length is not None and (int(self.max_length) != self.max_length or self.max_length < 2):
            raise TaskConfigError(f"task.max_length={self.max_length} must be an integer >= 2 or null")
        self._data: dict[str, list[dict]] = {}  # loaded datasets (check() may load them before run())

    @property
    def local(self) -> bool:
        return self.source not in (None, "hub")

    def check(self, model_config, policy, max_length) -> None:
        """Before the model loads: a local source must hold every dataset (files opened, not read); from the
        hub, the datasets are loaded now (and kept for ``run``), so an unreachable hub fails early too."""
        if not self.local:
            for dataset in self.datasets:
                self.load(dataset)
            return
        root = Path(self.source).expanduser()
        if not root.exists():
            raise TaskConfigError(
                f"task.source={self.source!r} does not exist; give a directory holding LongBench's "
                "<dataset>.jsonl files (the unzipped data.zip), data.zip itself, or null for the hub"
            )
        missing = []
        for dataset in self.datasets:
            try:
                lb.load(dataset, self.source, limit=0)  # opens the file / zip member, reads nothing
            except (FileNotFoundError, ValueError) as err:
                missing.append((dataset, str(err)))
        if missing:
            names = [d for d, _ in missing]
            raise TaskConfigError(
                f"task.source={self.source!r} lacks LongBench dataset(s) {names} ({missing[0][1]}); "
                f"choose task.datasets among those present, or add the files"
            )

    def load(self, dataset: str) -> list[dict]:
        if dataset in self._data:
            return self._data[dataset]
        try:
            records = lb.load(dataset, self.source, limit=self.limit)
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            hint = "" if self.local else " (for this task: task.source=/path/to/LongBench/data)"
            raise TaskConfigError(f"{err}{hint}") from None
        if not records:
            raise TaskConfigError(f"LongBench dataset {dataset!r} from {self.source or lb.HUB_REPO} has no samples")
        self._data[dataset] = records
        return records

    def truncation_length(self, dataset: str, model_max_length: int | None) -> int | None:
        if self.max_length is not None:
            return self.max_length
        if model_max_length is None:
            return None
        return max(2, model_max_length - lb.MAX_NEW_TOKENS[dataset])

    def prompt_ids(self, tokenizer, dataset: str, record: dict, max_length: int | None) -> tuple[list[int], bool, int | None]:
        """(prompt token ids, whether the prompt was truncated), as pred.py builds them, and under
        ``compress=context`` the number of leading tokens that are context (else None)."""
        text = lb.build_prompt(dataset, record)
        ids = gen.encode(tokenizer, text)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            kept = lb.truncate_middle(ids, max_length)
            half = len(kept) // 2
            text = tokenizer.decode(kept[:half], skip_special_tokens=True) + tokenizer.decode(kept[half:], skip_special_tokens=True)
        use_chat = self.chat_template and dataset not in lb.NO_CHAT_TEMPLATE
        try:
            ids = gen.build_prompt(tokenizer, text, use_chat)
        except gen.ChatTemplateError as err:
            raise TaskConfigError(f"LongBench {dataset} uses the chat template: {err}") from None
        if self.compress == "prompt":
            return ids, truncated, None
        question = lb.prompt_question(dataset, record)
        kept = len(os.path.commonprefix([text[::-1], question[::-1]]))  # the question's end that survived truncation
        return ids, truncated, gen.context_split(ids, gen.build_prompt(tokenizer, text[: len(text) - kept], use_chat))

    def run(self, ctx: RunContext) -> TaskResult:
        data = {dataset: self.load(dataset) for dataset in self.datasets}  # fail on data before generating
        eos = gen.eos_token_ids(ctx.model, ctx.tokenizer)
        metrics: dict[str, float] = {}
        samples: list[dict] = []
        generations: list[gen.Generation] = []
        bar = tqdm(total=sum(map(len, data.values())), desc=f"longbench {ctx.policy.name}", unit="sample",
                   disable=not ctx.progress)
        started = time.perf_counter()
        for dataset, records in data.items():
            max_length = self.truncation_length(dataset, ctx.max_length)
            stop_tokens = [gen.newline_token_id(ctx.tokenizer)] if dataset in lb.STOP_AT_NEWLINE else []
            preds, answers, classes = [], [], []
            for index, record in enumerate(records):
                prompt, truncated, context_tokens = self.prompt_ids(ctx.tokenizer, dataset, record, max_length)
                out = gen.generate(
                    ctx.model, ctx.tokenizer, ctx.policy, prompt, lb.MAX_NEW_TOKENS[dataset],
                    eos_ids=eos, stop_token_ids=stop_tokens, min_new_tokens=1 if stop_tokens else 0,
                    context_tokens=context_tokens, max_length=max_length,
                )
                generations.append(out)
                refs = list(record["answers"]) if not isinstance(record["answers"], str) else [record["answers"]]
                cls = record.get("all_classes")
                preds.append(out.text)
                answers.append(refs)
                classes.append(cls)
                samples.append({
                    "dataset": dataset,
                    "index": index,
                    "id": record.get("_id"),
                    "prediction": out.text,
                    "references": refs,
                    "score": lb.sample_score(dataset, out.text, refs, cls),
                    "length": record.get("length"),
                    "truncated": truncated,
                    **out.record(),
                })
                bar.update(1)
            metrics[f"longbench/{dataset}"] = lb.score(dataset, preds, answers, classes)
            bar.set_postfix({dataset: f"{metrics[f'longbench/{dataset}']:.1f}"})
        bar.close()
        metrics["longbench/avg"] = sum(metrics[f"longbench/{d}"] for d in self.datasets) / len(self.datasets)
        stats = gen.summarize(generations, time.perf_counter() - started)
        stats["truncated_samples"] = sum(s["truncated"] for s in samples)
        return TaskResult(metrics=metrics, samples=samples, stats=stats)

    def describe(self) -> dict:
        return {"task": self.name, "datasets": ",".join(self.datasets), "limit": self.limit, "max_length": self.max_length,
                "compress": self.compress, "chat_template": self.chat_template}
