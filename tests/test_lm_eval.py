"""lm-eval tasks under any cache policy (tasks/lm_eval.py, tasks/lm_eval_model.py) on the local tasks in
tests/fixtures/lm_eval: generate_until (lacache_qa), multiple choice (lacache_mc), rolling loglikelihood (lacache_ppl)."""

import json
import math

import pytest
from conftest import ROOT, tiny_llama
from test_harness import run_cli

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.report import tables as report
from lacache.tasks.base import TaskConfigError
from lacache.tasks.lm_eval import LmEvalTask, metric_name

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402

from lacache.tasks.lm_eval_model import PolicyLM  # noqa: E402

FIXTURES = "tests/fixtures/lm_eval"  # the YAMLs' data_files are relative to the repository root
TASKS = ["lacache_qa", "lacache_mc", "lacache_ppl"]


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(ROOT / FIXTURES), include_defaults=False)


@pytest.fixture(scope="module")
def random_model(smollm2):
    """A random-weight Llama with SmolLM2's vocabulary, driven by SmolLM2's tokenizer."""
    _, tokenizer = smollm2
    return tiny_llama(layers=4, vocab=len(tokenizer), seed=1), tokenizer


def evaluate(lm, manager, limit=None, tasks=TASKS):
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=True, task_manager=manager)


def responses(out, task):
    return [sample["filtered_resps"] for sample in out["samples"][task]]


def assert_same_scores(ours, plain):
    """Generations equal; loglikelihoods and the metrics built on them equal up to float rounding."""
    assert responses(ours, "lacache_qa") == responses(plain, "lacache_qa")
    for a, b in zip(responses(ours, "lacache_mc"), responses(plain, "lacache_mc"), strict=True):
        assert [greedy for _, greedy in a] == [greedy for _, greedy in b]
        assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], rel=1e-4, abs=1e-4)
    assert [ll for (ll,) in responses(ours, "lacache_ppl")] == pytest.approx([ll for (ll,) in responses(plain, "lacache_ppl")], rel=1e-4)
    for task, values in plain["results"].items():
        for key, value in values.items():
            if isinstance(value, float):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)


def test_full_cache_scores_equal_plain_lm_eval(random_model, manager):
    model, tokenizer = random_model
    # max_length=24: the texts span several rolling windows and the contexts are left-truncated
    plain = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, max_length=24), manager, limit=2)
    lm = PolicyLM(model, tokenizer, FullCachePolicy(), max_length=24, progress=False)
    ours = evaluate(lm, manager, limit=2)
    assert_same_scores(ours, plain)
    kinds = [r["kind"] for r in lm.requests]
    assert kinds.count("generate_until") == 2 and kinds.count("loglikelihood") == 8
    assert kinds.count("loglikelihood_rolling") > 2  # several windows per text


def test_compressing_policy_changes_scores_and_holds_its_budget(random_model, manager):
    model, tokenizer = random_model
    full = PolicyLM(model, tokenizer, FullCachePolicy(), progress=False)
    budget = 12
    policy = StreamingLLMPolicy(budget=budget, sink=2, prefill="chunked", prefill_chunk=8)
    lm = PolicyLM(model, tokenizer, policy, progress=False)
    ours, reference = evaluate(lm, manager, limit=2), evaluate(full, manager, limit=2)
    for task in TASKS:
        assert responses(ours, task) != responses(reference, task), task
    scored = [r for r in lm.requests if r["kind"] != "generate_until"]
    assert all(r["context_tokens"] + r["continuation_tokens"] > budget for r in scored)  # compression had work to do
    assert max(r["kv_entries_read_max"] for r in scored) == budget
    generated = [r for r in lm.requests if r["kind"] == "generate_until"]
    assert all(r["prompt_tokens"] > budget >= r["kv_entries_per_layer_max"] - 8 for r in generated)


def test_task_names_and_data_are_checked_before_the_model_loads(tmp_path):
    with pytest.raises(TaskConfigError, match=r"unknown lm-eval task.*lacache_mc"):
        LmEvalTask(tasks=["lacache_mcq"], include_path=FIXTURES, include_defaults=False).check(None, None, None)
    (tmp_path / "offline.yaml").write_text(
        "task: lacache_offline\ndataset_path: lacache-nobody/no-such-dataset\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
    )
    with pytest.raises(TaskConfigError, match=r"could not load lm-eval task.*lacache_offline.*the hub is unreachable"):
        LmEvalTask(tasks=["lacache_offline"], include_path=str(tmp_path), include_defaults=False).check(None, None, None)
    LmEvalTask(tasks=TASKS, include_path=FIXTURES, include_defaults=False).check(None, None, None)
    for bad, match in [({"tasks": []}, "task.tasks is empty"), ({"limit": 0}, "task.limit=0"),
                       ({"include_path": "no/such/dir"}, "not a directory"), ({"include_path": None}, "needs task.include_path"),
                       ({"tasks": ["lacache_qa", "lacache_qa"]}, "twice"), ({"batch_size": 0}, "task.batch_size=0")]:
        with pytest.raises(TaskConfigError, match=match):
            LmEvalTask(**{"tasks": ["lacache_qa"], "include_path": FIXTURES, "include_defaults": False, **bad})


def test_sampling_tasks_are_refused(random_model):
    from lm_eval.api.instance import Instance

    model, tokenizer = random_model
    lm = PolicyLM(model, tokenizer, FullCachePolicy(), progress=False)
    request = Instance("generate_until", doc={}, arguments=("Q: 1+1?\nA:", {"do_sample": True, "temperature": 0.7}), idx=0)
    with pytest.raises(ValueError, match="asks for sampling"):
        lm.generate_until([request])
    assert lm.generate_until([Instance("generate_until", doc={}, arguments=("Q: 1+1?\nA:", {"max_gen_toks": 2}), idx=0)])


def test_metric_names():
    assert metric_name("arc", "acc,none") == "lm_eval/arc/acc"
    assert metric_name("gsm8k", "exact_match_stderr,strict-match") == "lm_eval/gsm8k/exact_match_stderr,strict-match"


def test_cli_writes_a_record_with_lm_evals_metrics(tiny_model_dir, tmp_path):
    result = run_cli("model=llama3-8b", f"model.id={tiny_model_dir}", "model.name=tiny", "model.dtype=float32",
                     "model.device=cpu", "task=lm_eval", f"task.include_path={FIXTURES}", "task.include_defaults=false",
                     "task.tasks=[lacache_qa,lacache_mc]", "task.limit=2", "cache=lacache", "cache.budget=0.5",
                     "cache.span=2", f"runs_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (record_file,) = (tmp_path / "records").glob("*.json")
    record = json.loads(record_file.read_text())
    metrics = record["metrics"]
    assert {"lm_eval/lacache_qa/exact_match", "lm_eval/lacache_qa/exact_match_stderr", "lm_eval/lacache_mc/acc",
            "lm_eval/lacache_mc/acc_norm_stderr"} <= set(metrics)
    assert all(0 <= v <= 1 and math.isfinite(v) for v in metrics.values())
    table = {row["task"]: row for row in record["curves"]["lm_eval_tasks"]}
    assert table["lacache_mc"]["version"] == 1.0 and table["lacache_mc"]["samples_effective"] == 2
    assert table["lacache_qa"]["output_type"] == "generate_until" and len(table["lacache_qa"]["config_sha256"]) == 16
    assert len(record["samples"]) == 4 and {"task", "doc_id", "prompt_hash", "filtered_resps", "score"} <= set(record["samples"][0])
    mc = [s for s in record["samples"] if s["task"] == "lacache_mc"]
    assert all(len(s["requests"]) == 4 for s in mc)  # one loglikelihood request per choice, each measured
    assert record["stats"]["kv_entries_read_max"] <= max(r["context_tokens"] for s in mc for r in s["requests"]) // 2
    assert record["ids"]["tasks"] == "lacache_qa,lacache_mc" and "lm_eval/lacache_mc/acc=" in result.stdout

    # the report: a table per lm-eval task, lm-eval's values ± stderrs, a skipped run as a noted row
    skipped = {k: record[k] for k in ("schema", "config", "identity", "seed")}
    skipped["identity"]["cache"]["budget"] = 0.25
    skipped.update(key="0" * 64, status="skipped", reason="TaskConfigError: could not load lm-eval task(s)")
    (tmp_path / "records" / f"{skipped['key']}.json").write_text(json.dumps(skipped))
    report.render(tmp_path, tmp_path / "reports")
    text = (tmp_path / "reports" / "lm_eval.md").read_text()
    mc = record["metrics"]
    assert "**lm-eval lacache_mc: tiny · tasks lacache_qa,lacache_mc · limit 2**" in text
    assert f"| {mc['lm_eval/lacache_mc/acc']:.4g} ± {mc['lm_eval/lacache_mc/acc_stderr']:.2g} |" in text
    assert "| lacache (budget 0.25, S=2, O=0) | —¹ | —¹ |" in text and "skipped: TaskConfigError: could not load" in text


@pytest.mark.slow
def test_smollm2_full_cache_equals_plain_lm_eval(smollm2, manager):
    model, tokenizer = smollm2
    plain = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, max_length=64), manager, limit=2)
    ours = evaluate(PolicyLM(model, tokenizer, FullCachePolicy(), max_length=64, progress=False), manager, limit=2)
    assert_same_scores(ours, plain)
    assert plain["results"]["lacache_mc"]["acc,none"] > 0  # a real model: the scores carry information
