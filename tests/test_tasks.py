"""Long-context tasks: the shared generation loop, RULER, LongBench, NIAH (tasks/{generation,ruler,longbench,niah}.py)."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_harness import run_cli

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.ladder_cache import LaCachePolicy
from lacache.tasks import generation as gen
from lacache.tasks import longbench_data as lb
from lacache.tasks import ruler_data
from lacache.tasks.base import RunContext, TaskConfigError
from lacache.tasks.longbench import LongBenchTask
from lacache.tasks.niah import NEEDLE, QUESTION, NeedleTask, recovered
from lacache.tasks.ruler import RulerTask

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "longbench"


class LetterTokenizer:
    """Token id i decodes to one letter: enough to test stop strings on a random-weight model."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def greedy_reference(model, prompt, steps):
    """Greedy tokens by full-sequence forwards without any cache: argmax of model(prompt + generated)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


PROMPT = [5, 17, 99, 3, 64, 8, 120, 42, 7, 7, 31, 90, 11, 2, 77, 56, 13, 101, 6, 88, 19, 24, 60, 45, 70]


@pytest.fixture(scope="module")
def reference(tiny_model):
    return greedy_reference(tiny_model, PROMPT, 8)


@pytest.fixture(scope="module")
def vocab_model(smollm2):
    """A random-weight Llama with SmolLM2's vocabulary (so SmolLM2's tokenizer drives it)."""
    _, tokenizer = smollm2
    return tiny_llama(layers=2, vocab=len(tokenizer), seed=1)


def context(model, tokenizer, policy=None, max_length=4096):
    return RunContext(model, tokenizer, policy or FullCachePolicy(), model.config, max_length, progress=False)


# ---------------------------------------------------------------------------------------------- generation loop
@pytest.mark.parametrize("policy", [FullCachePolicy(), FullCachePolicy(prefill="chunked", prefill_chunk=7),
                                    StreamingLLMPolicy(budget=64, sink=4)], ids=["full", "full-chunked", "sink-window-unfilled"])
def test_greedy_loop_equals_full_sequence_forwards(tiny_model, reference, policy):
    out = gen.generate(tiny_model, LetterTokenizer(), policy, PROMPT, 8, eos_ids=())
    assert out.token_ids == reference
    assert out.prompt_tokens == len(PROMPT) and out.generated_tokens == 8 and out.stop_reason == "length"
    assert out.decode_steps == 7 and out.prefill_tokens_per_s > 0 and out.decode_tokens_per_s > 0
    record = out.record()
    assert record["kv_entries_per_layer_max"] == len(PROMPT) + 7  # the cache's own stats() are kept
    assert record["peak_rss_bytes"] > 0


def test_compressing_policy_runs_and_holds_its_budget(tiny_model, reference):
    out = gen.generate(tiny_model, LetterTokenizer(), StreamingLLMPolicy(budget=12, sink=2, prefill="chunked",
                                                                         prefill_chunk=4), PROMPT, 8, eos_ids=())
    assert out.generated_tokens == 8 and len(out.token_ids) == 8
    assert out.cache_stats["kv_entries_per_layer_max"] <= 12 + 4


def test_eos_stop_tokens_and_min_new_tokens(tiny_model, reference):
    tok = LetterTokenizer()
    first = reference.index(reference[3])
    out = gen.generate(tiny_model, tok, FullCachePolicy(), PROMPT, 8, eos_ids={reference[3]})
    assert out.token_ids == reference[:first] and out.stop_reason == "eos" and out.generated_tokens == first + 1
    out = gen.generate(tiny_model, tok, FullCachePolicy(), PROMPT, 8, eos_ids=(), stop_token_ids=[reference[3]])
    assert out.token_ids == reference[:first] and out.stop_reason == "stop_token"
    # an end token as the very first token: nothing generated, unless min_new_tokens forbids it
    out = gen.generate(tiny_model, tok, FullCachePolicy(), PROMPT, 8, eos_ids={reference[0]})
    assert out.text == "" and out.token_ids == [] and out.generated_tokens == 1
    out = gen.generate(tiny_model, tok, FullCachePolicy(), PROMPT, 3, eos_ids={reference[0]}, min_new_tokens=1)
    assert out.token_ids and out.token_ids[0] != reference[0]


def test_stop_strings_cut_the_text(tiny_model, reference):
    tok = LetterTokenizer()
    text = tok.decode(reference)
    stop = text[4]
    cut = text.index(stop)
    out = gen.generate(tiny_model, tok, FullCachePolicy(), PROMPT, 8, eos_ids=(), stop_strings=["\n", stop])
    assert out.stop_reason == "stop_string" and out.text == text[:cut] and out.token_ids == reference[: cut + 1]


def test_chat_prompt_and_answer_prefix(smollm2):
    _, tok = smollm2
    ids = gen.build_prompt(tok, "Where is it?", True, "Answer:")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\nAnswer:")
    assert gen.build_prompt(tok, "Where is it?", False, " Answer:") == tok.encode("Where is it? Answer:")
    assert gen.chat_overhead(tok, True) > 10 and gen.chat_overhead(tok, False) == 0


# ---------------------------------------------------------------------------------------------- RULER
def test_ruler_end_to_end_on_a_tiny_model(vocab_model, smollm2):
    _, tok = smollm2
    task = RulerTask(tasks=["niah_single_1", "vt"], context_length=1024, num_samples=1)
    result = task.run(context(vocab_model, tok))
    assert set(result.metrics) == {"ruler/niah_single_1", "ruler/vt", "ruler/avg"}
    assert all(0 <= v <= 100 for v in result.metrics.values())
    assert [s["task"] for s in result.samples] == ["niah_single_1", "vt"]
    for sample in result.samples:
        assert {"index", "prediction", "references", "score", "length", "prompt_tokens", "generated_tokens",
                "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "kv_entries_per_layer_max"} <= set(sample)
        assert 0 <= sample["score"] <= 1 and sample["references"]
        # the chat wrapper is counted in: prompt + answer budget stay within the context length
        max_new = 128 if sample["task"] == "niah_single_1" else 30
        assert sample["length"] < sample["prompt_tokens"] <= 1024 - max_new
        assert sample["prompt_tokens"] > 1024 - max_new - 80
    assert result.stats["tokens_per_s"] > 0 and result.stats["wall_s"] > 0


def test_ruler_prompt_is_chat_wrapped_input_then_answer_prefix(smollm2):
    _, tok = smollm2
    task = RulerTask(tasks=["qa_1"], context_length=1024, num_samples=1)
    ((sample, ids),) = task.samples(tok)["qa_1"]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and sample.input.strip()[-40:] in text
    # the answer prefix verbatim after the chat template, its leading space kept (RULER's prepare.py)
    assert sample.answer_prefix.startswith(" Answer:") and text.endswith("<|im_start|>assistant\n" + sample.answer_prefix)
    plain = RulerTask(tasks=["qa_1"], context_length=1024, num_samples=1, chat_template=False)
    ((_, ids),) = plain.samples(tok)["qa_1"]
    assert tok.decode(ids) == sample.input + sample.answer_prefix


def test_ruler_chat_room_keeps_the_nominal_context_length(smollm2):
    _, tok = smollm2  # fwe's vocabulary (context_length // 50) and so its answers stay RULER's at 1024
    ((sample, ids),) = RulerTask(tasks=["fwe"], context_length=1024, num_samples=1).samples(tok)["fwe"]
    (plain,) = ruler_data.generate("fwe", tok, 1024, 1, 42)
    assert sample.outputs == plain.outputs
    assert sample.length == len(tok.encode(sample.input + sample.answer_prefix))
    assert len(ids) + sample.max_new_tokens <= 1024


def test_ruler_per_sample_score_follows_ruler_metric():
    assert ruler_data.score("niah_multivalue", ["a 1 2"], [["1", "2", "3", "4"]]) / 100 == 0.5
    assert ruler_data.score("qa_1", ["it is France"], [["France", "Spain"]]) / 100 == 1.0


def test_ruler_config_errors():
    with pytest.raises(TaskConfigError, match="niah_single_1.*qa_2"):
        RulerTask(tasks=["niah_single_1", "nope"])
    assert RulerTask(tasks="all").tasks == list(ruler_data.RULER_TASKS)
    task = RulerTask(context_length=16384)
    with pytest.raises(TaskConfigError, match="16384 exceeds the model's max length 8192.*allow_long"):
        task.check(None, FullCachePolicy(), 8192)
    with pytest.warns(UserWarning, match="exceeds"):
        RulerTask(context_length=16384, allow_long=True).check(None, FullCachePolicy(), 8192)
    with pytest.raises(TaskConfigError, match=r"task.fill='ruler' is not one of \('max', 'nvidia', 'exact'\)"):
        RulerTask(fill="ruler")
    assert RulerTask(fill="nvidia").describe()["fill"] == "nvidia"


# ---------------------------------------------------------------------------------------------- LongBench
def test_longbench_end_to_end_on_fixtures(vocab_model, smollm2):
    _, tok = smollm2
    task = LongBenchTask(datasets=["hotpotqa", "trec"], source=str(FIXTURES))
    task.check(None, FullCachePolicy(), 4096)
    result = task.run(context(vocab_model, tok))
    assert set(result.metrics) == {"longbench/hotpotqa", "longbench/trec", "longbench/avg"}
    records = {d: lb.load(d, FIXTURES) for d in ("hotpotqa", "trec")}
    for dataset, recs in records.items():
        got = [s for s in result.samples if s["dataset"] == dataset]
        assert len(got) == len(recs)
        assert result.metrics[f"longbench/{dataset}"] == pytest.approx(
            lb.score(dataset, [s["prediction"] for s in got], [r["answers"] for r in recs], [r["all_classes"] for r in recs]))
        for s, rec in zip(got, recs):
            assert 0 <= s["score"] <= 1 and s["references"] == rec["answers"] and not s["truncated"]
            assert s["generated_tokens"] <= lb.MAX_NEW_TOKENS[dataset]
            chat = gen.build_prompt(tok, lb.build_prompt(dataset, rec), dataset not in lb.NO_CHAT_TEMPLATE)
            assert s["prompt_tokens"] == len(chat)  # trec: no chat template; hotpotqa: chat template
    avg = (result.metrics["longbench/hotpotqa"] + result.metrics["longbench/trec"]) / 2
    assert result.metrics["longbench/avg"] == pytest.approx(avg)


def test_longbench_truncation_and_samsum_stops(smollm2, monkeypatch):
    _, tok = smollm2
    calls = []

    def fake_generate(model, tokenizer, policy, prompt, max_new_tokens, **kwargs):
        calls.append((list(prompt), max_new_tokens, kwargs))
        return gen.Generation("x", [], len(prompt), 1, "eos", 0.1, 0.0, None, 1)

    monkeypatch.setattr(gen, "generate", fake_generate)
    model = type("Model", (), {"generation_config": None})()
    task = LongBenchTask(datasets=["samsum", "hotpotqa"], source=str(FIXTURES), limit=1, max_length=24)
    result = task.run(RunContext(model, tok, FullCachePolicy(), None, 4096, progress=False))
    (samsum, _, samsum_kw), (hotpot, hotpot_max, _) = calls
    assert samsum_kw["stop_token_ids"] == [tok.encode("\n")[-1]] and samsum_kw["min_new_tokens"] == 1
    assert hotpot_max == 32 and all(s["truncated"] for s in result.samples)
    text = lb.build_prompt("hotpotqa", lb.load("hotpotqa", FIXTURES, limit=1)[0])
    kept = lb.truncate_middle(tok.encode(text), 24)
    middle = tok.decode(kept[:12]) + tok.decode(kept[12:])
    assert hotpot == gen.build_prompt(tok, middle, True)  # truncated first, then chat-wrapped (pred.py)
    assert tok.decode(samsum).startswith("Summarize")  # samsum: no chat template
    # default: the model's max length minus the dataset's answer budget
    assert LongBenchTask(datasets=["trec"]).truncation_length("trec", 4096) == 4096 - 64


def test_longbench_chat_template_setting(smollm2, monkeypatch):
    """chat_template=false (paper_longbench): official build_chat names neither SmolLM2 nor LaCache's
    meta-llama/Llama-2-7b-chat-hf, so every dataset gets the plain prompt; true: the chat template except
    on NO_CHAT_TEMPLATE datasets. The task's truncation length goes to the cache (budget_of=max_length)."""
    _, tok = smollm2
    calls = []

    def fake_generate(model, tokenizer, policy, prompt, max_new_tokens, **kwargs):
        calls.append((list(prompt), kwargs))
        return gen.Generation("x", [], len(prompt), 1, "eos", 0.1, 0.0, None, 1)

    monkeypatch.setattr(gen, "generate", fake_generate)
    model = type("Model", (), {"generation_config": None})()
    texts = {d: lb.build_prompt(d, lb.load(d, FIXTURES, limit=1)[0]) for d in ("hotpotqa", "trec")}
    for chat in (True, False):
        calls.clear()
        task = LongBenchTask(datasets=["hotpotqa", "trec"], source=str(FIXTURES), limit=1, max_length=7500, chat_template=chat)
        task.run(RunContext(model, tok, FullCachePolicy(), None, 8192, progress=False))
        (hotpot, hotpot_kw), (trec, _) = calls
        assert hotpot == gen.build_prompt(tok, texts["hotpotqa"], chat) and hotpot_kw["max_length"] == 7500
        assert trec == gen.build_prompt(tok, texts["trec"], False)  # never the chat template
        assert task.describe()["chat_template"] is chat
    assert tok.decode(calls[0][0]) == texts["hotpotqa"]


def test_budget_of_max_length_resolves_against_the_tasks_max_length(tiny_model):
    """pred.py: cache_size = int(budget * max_length), start_size = min(128, T-(L+1), C-(L+1))."""
    lacache = LaCachePolicy(budget=0.5, budget_of="max_length", span=4, overlap=0, sink="auto")
    cache = lacache.new_cache(tiny_model, prompt_length=3000, max_length=3500)
    assert cache.state.budget == 1750 and cache.state.sink == 128
    short = lacache.new_cache(tiny_model, prompt_length=60, max_length=3500)
    assert short.state.budget == 1750 and short.state.sink == 60 - 9  # T-(L+1) for a short prompt, L=8
    assert lacache.new_cache(tiny_model, prompt_length=3000).state.budget == 2048  # no task length: the model's 4096
    assert StreamingLLMPolicy(budget=0.25, budget_of="max_length").new_cache(tiny_model, 300, 1000).budget == 250
    assert StreamingLLMPolicy(budget=0.25).new_cache(tiny_model, 300, 1000).budget == 75  # budget_of=prompt


def test_longbench_config_errors(tmp_path):
    with pytest.raises(TaskConfigError, match="unknown LongBench dataset.*narrativeqa.*repobench-p"):
        LongBenchTask(datasets=["hotpotqa", "nope"])
    assert LongBenchTask(datasets="all").datasets == list(lb.LONGBENCH_DATASETS)
    assert "vcsum" not in LongBenchTask(datasets="english").datasets
    with pytest.raises(TaskConfigError, match=r"lacks LongBench dataset\(s\) \['narrativeqa', 'qasper'\]"):
        LongBenchTask(datasets=["hotpotqa", "narrativeqa", "qasper"], source=str(FIXTURES)).check(None, None, 4096)
    with pytest.raises(TaskConfigError, match="does not exist"):
        LongBenchTask(datasets=["trec"], source=str(tmp_path / "missing")).check(None, None, 4096)


def test_unreachable_hub_fails_in_check_and_names_task_source(monkeypatch):
    def offline(dataset, limit):
        raise RuntimeError(f"could not load LongBench dataset {dataset!r} from the Hugging Face hub: offline")

    monkeypatch.setattr(lb, "_load_hub", offline)
    with pytest.raises(TaskConfigError, match="'trec' from the Hugging Face hub.*task.source="):
        LongBenchTask(datasets=["trec"]).check(None, None, 4096)


def test_missing_longbench_dataset_fails_before_the_model_loads(tmp_path):
    result = run_cli("task=longbench", f"task.source={FIXTURES}", "task.datasets=[trec,narrativeqa]",
                     f"runs_dir={tmp_path}", env={"LACACHE_CACHE": str(tmp_path / "empty-cache")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "narrativeqa" in result.stderr and "lacks LongBench dataset" in result.stderr
    assert not (tmp_path / "empty-cache" / "models").exists()


# ---------------------------------------------------------------------------------------------- NIAH
def test_niah_grid_prompts_and_heatmap(vocab_model, smollm2, tmp_path):
    _, tok = smollm2
    task = NeedleTask(context_lengths=[256, 512], depths=[0.0, 1.0], num_samples=1, max_new_tokens=4,
                      artifacts_dir=str(tmp_path / "artifacts"))
    samples = task.samples(tok)
    for s in samples:
        assert s.context_length - 4 - 40 < len(s.prompt_ids) <= s.context_length - 4
        text = tok.decode(s.prompt_ids)
        needle = NEEDLE.format(key=s.pass_key)
        before, after = text.split(needle)
        if s.depth == 0:
            assert before.endswith("quizzed on this hidden information.\n")
        else:
            assert after == f"\n{QUESTION} The pass key is"
    assert samples[0].pass_key == samples[1].pass_key and len(samples[0].pass_key) == 5
    result = task.run(context(vocab_model, tok))
    assert set(result.metrics) == {"niah/acc"} and 0 <= result.metrics["niah/acc"] <= 1
    grid = result.curves["niah_grid"]
    assert [(p["context_length"], p["depth"]) for p in grid] == [(256, 0.0), (256, 1.0), (512, 0.0), (512, 1.0)]
    path = Path(result.artifacts["niah_heatmap"])
    assert path.parent == tmp_path / "artifacts" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result.samples) == 4 and all(s["generated_tokens"] <= 4 for s in result.samples)


def test_niah_reference_format(smollm2):
    """paper_niah's sample: the reference's repeated sentences, the needle on a line of its own, a key in
    1..99999, as many new tokens as the key (+ SmolLM2's space token), a prompt of exactly that room."""
    _, tok = smollm2
    task = NeedleTask(context_lengths=[300], depths=[0.0, 0.5], num_samples=3, pass_key_digits=None,
                      max_new_tokens="answer", haystack="repeat", needle="line", scoring="substring")
    samples = task.samples(tok)
    for s in samples:
        lines = tok.decode(s.prompt_ids).split("\n")
        assert lines[0].startswith("There is important information hidden")
        assert lines[2] == NEEDLE.format(key=s.pass_key) and lines[-1] == f"{QUESTION} The pass key is"
        repeat = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
        assert lines[3].startswith(repeat)  # after the needle the text starts over, as the reference's garbage_suffix
        assert lines[1] == "" if s.depth == 0 else lines[1].startswith(repeat)
        assert 1 <= int(s.pass_key) <= 99999
        # SmolLM2 writes " 52719" as " ", "5", "2", "7", "1", "9": the reference's count (5) would stop one digit short
        assert s.max_new_tokens == len(tok.encode(" " + s.pass_key)) == len(s.pass_key) + 1 > len(tok(s.pass_key).input_ids)
        assert 300 - 10 < len(s.prompt_ids) + s.max_new_tokens <= 300
    assert {s.pass_key for s in samples} != {samples[0].pass_key}
    assert task.describe()["format"] == "repeat,line,substring"


def test_niah_scoring_and_errors():
    assert recovered("52719", "The pass key is 52719.") and not recovered("52719", "152719") and not recovered("52719", "5271")
    assert recovered("52719", "152719", "substring") and not recovered("52719", "5271", "substring")
    for setting, value in (("haystack", "grass"), ("needle", "lines"), ("scoring", "exact"), ("max_new_tokens", "key")):
        with pytest.raises(TaskConfigError, match=f"task.{setting}='{value}'"):
            NeedleTask(**{setting: value})
    with pytest.raises(TaskConfigError, match="depths"):
        NeedleTask(depths=[0.5, 1.5])
    with pytest.raises(TaskConfigError, match="exceeds the model's max length"):
        NeedleTask(context_lengths=[1024, 16384]).check(None, None, 8192)


def test_niah_through_the_cli_writes_the_heatmap_under_runs_dir(tiny_model_dir, tmp_path):
    result = run_cli("model=llama3-8b", f"model.id={tiny_model_dir}", "model.name=tiny", "model.dtype=float32",
                     "model.device=cpu", "task=niah", "task.context_lengths=[200]", "task.depths=[0.5]",
                     "task.num_samples=1", "task.max_new_tokens=2", "cache=streamingllm", "cache.budget=0.5",
                     f"runs_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (record_file,) = (tmp_path / "records").glob("*.json")
    record = json.loads(record_file.read_text())
    path = Path(record["artifacts"]["niah_heatmap"])
    assert path.parent == tmp_path / "artifacts" and path.exists()
    assert record["curves"]["niah_grid"][0]["context_length"] == 200 and "niah/acc=" in result.stdout
    assert record["samples"][0]["kv_entries_per_layer_mean"] > 0


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_full_cache_finds_the_ruler_needle(smollm2):
    model, tok = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decode is overhead-bound: one thread is faster on 2 shared cores
    try:
        result = RulerTask(tasks=["niah_single_1"], context_length=1024, num_samples=2).run(context(model, tok, max_length=8192))
    finally:
        torch.set_num_threads(threads)
    assert result.metrics["ruler/niah_single_1"] == 100.0
    for sample in result.samples:
        assert sample["stop_reason"] == "eos" and re.fullmatch(r"\s*\d{7}\.?", sample["prediction"])
