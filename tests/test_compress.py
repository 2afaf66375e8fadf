"""task.compress=prompt|context: where the tasks split context from question, and what generate() feeds."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_harness import run_cli
from test_reports import _sweep_points
from test_tasks import PROMPT, LetterTokenizer
from transformers import DynamicCache

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.report import tables as report
from lacache.tasks import generation as gen
from lacache.tasks import longbench_data as lb
from lacache.tasks import ruler_data
from lacache.tasks.base import RunContext, TaskConfigError
from lacache.tasks.longbench import LongBenchTask
from lacache.tasks.niah import QUESTION, NeedleTask
from lacache.tasks.ruler import RulerTask

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "longbench"
SPLIT = 17  # PROMPT's first 17 tokens play the context, the last 8 the question


class Fed:
    """Records the token ids of every forward of ``model`` and the cache length each one starts from."""

    def __init__(self, model, policy):
        self.forwards, self.starts, self.caches = [], [], []
        make = policy.make_cache

        def make_cache(*args, **kwargs):
            self.caches.append(make(*args, **kwargs))
            return self.caches[-1]

        object.__setattr__(policy, "make_cache", make_cache)
        self.hook = model.model.embed_tokens.register_forward_hook(self.record)

    def record(self, module, args, output):
        cache = self.caches[-1]
        self.forwards.append(args[0][0].tolist())
        held = cache.entries_per_layer() if hasattr(cache, "entries_per_layer") else [cache.get_seq_length()]
        self.starts.append(max(held))

    def close(self):
        self.hook.remove()


def run(model, policy, steps, context_tokens=None):
    fed = Fed(model, policy)
    try:
        out = gen.generate(model, LetterTokenizer(), policy, PROMPT, steps, eos_ids=(), context_tokens=context_tokens)
    finally:
        fed.close()
    return out, fed


# ---------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("chunk", [None, 5], ids=["full-prefill", "chunked-prefill"])
def test_context_mode_feeds_the_prompt_tokens_in_order_split_at_the_context(tiny_model, chunk):
    make = (lambda: FullCachePolicy()) if chunk is None else (lambda: FullCachePolicy(prefill="chunked", prefill_chunk=chunk))
    prompt_out, prompt_fed = run(tiny_model, make(), 6)
    context_out, context_fed = run(tiny_model, make(), 6, context_tokens=SPLIT)
    steps = 5  # one forward per generated token but the first
    assert sum(prompt_fed.forwards[:-steps], []) == PROMPT == sum(context_fed.forwards[:-steps], [])
    assert prompt_fed.forwards[-steps:] == context_fed.forwards[-steps:]
    sizes = [len(f) for f in context_fed.forwards[:-steps]]
    expected = [SPLIT, len(PROMPT) - SPLIT] if chunk is None else [5, 5, 5, 2, 5, 3]
    assert sizes == expected  # the context, then the question: no forward mixes the two
    assert context_out.token_ids == prompt_out.token_ids  # the full cache: the same answer either way
    assert context_out.record()["context_tokens"] == SPLIT and prompt_out.record()["context_tokens"] is None


def test_the_question_goes_through_the_compressed_context_and_stays_in_the_cache(tiny_model):
    budget, sink = 10, 2  # fewer entries than the context's 17; the 8 question tokens fit in the window
    out, fed = run(tiny_model, StreamingLLMPolicy(budget=budget, sink=sink), 1, context_tokens=SPLIT)
    assert fed.forwards == [PROMPT[:SPLIT], PROMPT[SPLIT:]]
    assert fed.starts == [0, budget]  # the question's forward attends the context cut to the budget
    (cache,) = fed.caches
    kept = cache.kept_positions()[0, 0, 0].tolist()
    assert kept == list(range(sink)) + list(range(len(PROMPT) - (budget - sink), len(PROMPT)))
    assert set(range(SPLIT, len(PROMPT))) <= set(kept)  # every question token is in the cache
    _, fed = run(tiny_model, StreamingLLMPolicy(budget=budget, sink=sink), 1)
    assert fed.starts == [0]  # compress=prompt: one forward of the whole prompt


@pytest.mark.parametrize("name,settings", [("h2o", {}), ("lacache", {"span": 4, "overlap": 0, "sink": 1}),
                                           ("lacache_reference", {"span": 4, "overlap": 0, "sink": 1})])
def test_each_policy_compresses_the_context_before_the_question(tiny_model, name, settings):
    from omegaconf import OmegaConf

    from lacache.harness.runner import build

    node = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "cache" / f"{name}.yaml")
    policy = build(OmegaConf.merge(node, {"budget": 10, **settings}), "cache")
    policy.check(tiny_model.config)
    out, fed = run(tiny_model, policy, 4, context_tokens=SPLIT)
    assert fed.forwards[:2] == [PROMPT[:SPLIT], PROMPT[SPLIT:]] and out.generated_tokens == 4
    assert fed.starts[1] <= 10  # the question's forward starts from the context compressed to the budget


def test_the_question_goes_token_by_token_when_compression_left_layers_uneven():
    class Uneven:
        def entries_per_layer(self):
            return [12, 8]

    policy = FullCachePolicy(prefill="chunked", prefill_chunk=4)
    assert gen._chunks(policy, Uneven(), 6, after_compression=True) == [1] * 6  # e.g. PyramidKV's layer budgets
    assert gen._chunks(policy, Uneven(), 6, after_compression=False) == [4, 2]
    assert gen._chunks(policy, DynamicCache(), 6, after_compression=True) == [4, 2]


def test_a_fractional_budget_is_a_fraction_of_the_context(tiny_model):
    _, fed = run(tiny_model, StreamingLLMPolicy(budget=0.5, sink=2), 1, context_tokens=SPLIT)
    assert fed.caches[0].budget == int(0.5 * SPLIT) and fed.starts == [0, int(0.5 * SPLIT)]
    _, fed = run(tiny_model, StreamingLLMPolicy(budget=0.5, sink=2), 1)
    assert fed.caches[0].budget == int(0.5 * len(PROMPT))


def test_bad_split_and_setting_fail_clearly(tiny_model):
    for bad in (0, len(PROMPT)):
        with pytest.raises(ValueError, match=f"context_tokens={bad} must be in"):
            gen.generate(tiny_model, LetterTokenizer(), FullCachePolicy(), PROMPT, 1, context_tokens=bad)
    for task in (RulerTask, LongBenchTask, NeedleTask):
        with pytest.raises(TaskConfigError, match=r"task.compress='question' is not one of \('prompt', 'context'\)"):
            task(compress="question")
    assert gen.context_split([1, 2, 3, 4], [1, 2, 9]) == 2  # a token across the boundary is the question's
    with pytest.raises(ValueError, match="share 0 leading tokens"):
        gen.context_split([1, 2, 3], [7, 2])


# ---------------------------------------------------------------------------------------------- the tasks' splits
def assert_split(tok, ids, k, question: str, rest_slack: int):
    """``ids[k:]`` holds all of ``question`` and at most ``rest_slack`` characters more (wrapper tail,
    answer prefix, one boundary token)."""
    rest = tok.decode(ids[k:])
    assert question.strip() in rest
    assert len(rest) <= len(question) + rest_slack, rest
    assert question.strip() not in tok.decode(ids[:k])


class WordTokenizer:
    """One token per word: enough for ruler_data to size haystacks, fast."""

    def encode(self, text, add_special_tokens=False):
        return text.split()


QUESTION_STARTS = {"niah": "\nWhat is the special magic ", "niah_multi": "\nWhat are all the special magic ",
                   "vt": "\nQuestion: Find all variables that are assigned the value ",
                   "cwe": "\nQuestion: What are the 10 most common words in the above list?",
                   "fwe": "\nQuestion: Do not provide any explanation.",
                   "qa": "\n\nAnswer the question based on the given documents."}


@pytest.mark.parametrize("task", ruler_data.RULER_TASKS)
def test_every_ruler_task_ends_its_context_where_the_question_starts(task):
    (sample,) = ruler_data.generate(task, WordTokenizer(), 1200, 1)
    family = task.split("_")[0] if task.startswith(("qa", "vt", "cwe", "fwe")) else "niah"
    if task in ("niah_multivalue", "niah_multiquery"):
        family = "niah_multi"
    context, question = sample.input[: sample.context_end], sample.input[sample.context_end:]
    assert question.startswith(QUESTION_STARTS[family]) and question.count("\n") == (4 if family == "qa" else 1)
    if family in ("vt", "cwe"):  # their in-context example asks the same question: it is part of the context
        assert QUESTION_STARTS[family] in context


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_ruler_context_is_everything_up_to_the_question(smollm2, chat):
    _, tok = smollm2
    tasks = ["niah_single_1", "vt", "qa_2"]
    prompt_mode = RulerTask(tasks=tasks, context_length=1024, num_samples=1, chat_template=chat)
    context_mode = RulerTask(tasks=tasks, context_length=1024, num_samples=1, chat_template=chat, compress="context")
    before, after = prompt_mode.samples(tok), context_mode.samples(tok)
    for task in tasks:
        ((sample, ids),), ((_, same),) = before[task], after[task]
        assert same == ids  # the same tokens in both modes
        assert prompt_mode.context_tokens(tok, sample, ids) is None
        k = context_mode.context_tokens(tok, sample, ids)
        question = sample.input[sample.context_end:]
        assert question.startswith(("\nWhat is the special magic number", "\nQuestion: Find all variables",
                                    "\n\nAnswer the question based on the given documents"))
        assert_split(tok, ids, k, question, rest_slack=len(sample.answer_prefix) + (60 if chat else 12))


def test_longbench_context_is_everything_before_the_template_tail(smollm2):
    _, tok = smollm2
    task = LongBenchTask(datasets=["hotpotqa", "trec"], source=str(FIXTURES), compress="context")
    plain = LongBenchTask(datasets=["hotpotqa", "trec"], source=str(FIXTURES))
    for dataset in ("hotpotqa", "trec"):
        record = lb.load(dataset, FIXTURES, limit=1)[0]
        ids, truncated, k = task.prompt_ids(tok, dataset, record, None)
        assert (ids, truncated, None) == plain.prompt_ids(tok, dataset, record, None) and not truncated
        question = lb.prompt_question(dataset, record)
        assert record["input"].strip() in question and lb.build_prompt(dataset, record).endswith(question)
        assert_split(tok, ids, k, question, rest_slack=60 if dataset == "hotpotqa" else 12)
    # middle truncation keeps the question's end: the context is what is left before it
    record = lb.load("hotpotqa", FIXTURES, limit=1)[0]
    ids, truncated, k = task.prompt_ids(tok, "hotpotqa", record, 40)
    assert truncated and 0 < k < len(ids)
    survived = tok.decode(ids[k:]).split("<|im_end|>")[0]  # before the chat template's tail
    assert len(survived) > 20 and lb.prompt_question("hotpotqa", record).endswith(survived)


def test_niah_context_is_description_and_haystack(smollm2):
    _, tok = smollm2
    for chat in (False, True):
        kwargs = dict(context_lengths=[256], depths=[0.5], num_samples=1, max_new_tokens=4, chat_template=chat)
        (prompt_sample,) = NeedleTask(**kwargs).samples(tok)
        (sample,) = NeedleTask(**kwargs, compress="context").samples(tok)
        assert sample.prompt_ids == prompt_sample.prompt_ids and prompt_sample.context_tokens is None
        assert_split(tok, sample.prompt_ids, sample.context_tokens, f"\n{QUESTION}", rest_slack=60 if chat else 20)


# ---------------------------------------------------------------------------------------------- runs, records, report
def test_ruler_full_cache_answers_alike_in_both_modes(smollm2):
    _, tok = smollm2
    model = tiny_llama(layers=2, vocab=len(tok), seed=1)
    results = {}
    for mode in ("prompt", "context"):
        task = RulerTask(tasks=["niah_single_1"], context_length=512, num_samples=2, compress=mode)
        ctx = RunContext(model, tok, FullCachePolicy(), model.config, 4096, progress=False)
        results[mode] = task.run(ctx)
    prompt, context = (results[m].samples for m in ("prompt", "context"))
    assert [s["prediction"] for s in prompt] == [s["prediction"] for s in context]
    assert all(0 < s["context_tokens"] < s["prompt_tokens"] for s in context)
    assert all(s["context_tokens"] is None for s in prompt)


def test_cli_records_compress_in_the_ids(tiny_model_dir, tmp_path):
    result = run_cli("model=llama3-8b", f"model.id={tiny_model_dir}", "model.name=tiny", "model.dtype=float32",
                     "model.device=cpu", "task=ruler", "task.tasks=[niah_single_1]", "task.context_length=400",
                     "task.num_samples=1", "task.compress=context", "cache=streamingllm", "cache.budget=0.5",
                     f"runs_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (record_file,) = (tmp_path / "records").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["ids"]["compress"] == "context" and "compress=context" in result.stdout
    (sample,) = record["samples"]
    assert 0 < sample["context_tokens"] < sample["prompt_tokens"]


def test_paper_ruler_sweeps_both_modes():  # the smoke variant inherits paper_ruler's grid
    points = [(cfg.cache.get("_target_").rsplit(".", 1)[-1], cfg.task.compress) for cfg, _ in _sweep_points("paper_ruler_smoke")]
    assert {mode for _, mode in points} == {"prompt", "context"}
    assert sorted(p for p, mode in points if mode == "prompt") == sorted(p for p, mode in points if mode == "context")


def _record(key, policy, compress, scores, budget=0.5):
    ids = {"model": "m", "policy": policy, "budget": None if policy == "full" else budget, "task": "ruler",
           "context_length": 1024, "num_samples": 2, "subtasks": "vt"}
    if compress is not None:
        ids["compress"] = compress
    if policy == "lacache":
        ids.update(span=16, overlap=0)
    samples = [{"task": "vt", "index": i, "score": s} for i, s in enumerate(scores)]
    return {"schema": 1, "key": key, "status": "ok", "ids": ids, "metrics": {"ruler/vt": 100 * sum(scores) / len(scores),
            "ruler/avg": 100 * sum(scores) / len(scores)}, "samples": samples, "config": {}, "seed": 0}


def test_report_shows_compress_as_a_column_and_pairs_within_a_mode(tmp_path):
    from lacache.harness.records import write_record

    for record in (_record("a1", "streamingllm", "prompt", [1, 0]), _record("a2", "lacache", "prompt", [1, 1]),
                   _record("b1", "streamingllm", "context", [0, 0]), _record("b2", "lacache", "context", [1, 0]),
                   _record("c1", "full", None, [1, 1])):  # a record from before the setting: the whole prompt
        write_record(tmp_path, record)
    (table, diff) = report.score_tables(report.load(tmp_path), "ruler", report.RULER, "RULER")
    text = table.markdown()
    assert "| run | compress | vt | avg |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "compress" not in line]
    assert [r.split(" | ")[:2] for r in rows] == [["| full", "prompt"], ["| streamingllm (budget 0.5)", "prompt"],
                                                  ["| lacache (budget 0.5, S=16, O=0)", "prompt"],
                                                  ["| streamingllm (budget 0.5)", "context"],
                                                  ["| lacache (budget 0.5, S=16, O=0)", "context"]]
    pairs = [line.split(" | ") for line in diff.markdown().splitlines() if " − " in line]
    assert [(cells[1], cells[2].split(" [")[0]) for cells in pairs] == [("prompt", "+0.0"), ("prompt", "+50.0"),
                                                                       ("context", "+50.0")]
