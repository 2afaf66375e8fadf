"""Batched generation (``task.batch_size``): each row of a batch gets the answer it gets alone, for
every policy, both decode paths and both compress modes; rows stop on their own; bad batches fail
early. The model is peaked (tests/test_oracle.py), so a row that read another row's cache, or an
eviction chosen for the wrong row, changes the greedy tokens."""

import pytest
import torch
from test_oracle import peaked_llama
from test_tasks import LetterTokenizer, context

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.pyramidkv import PyramidKVPolicy
from lacache.baselines.snapkv import SnapKVPolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.baselines.tova import TOVAPolicy
from lacache.harness import records
from lacache.ladder_cache import LaCachePolicy
from lacache.tasks import generation as gen
from lacache.tasks.base import TaskConfigError
from lacache.tasks.ruler import RulerTask

POLICIES = {
    "full": lambda d: FullCachePolicy(decode=d),
    "streamingllm": lambda d: StreamingLLMPolicy(budget=20, sink=2, decode=d),
    "lacache": lambda d: LaCachePolicy(budget=20, span=2, overlap=1, sink=2, decode=d),
    "h2o": lambda d: H2OPolicy(budget=20, decode=d),
    "tova": lambda d: TOVAPolicy(budget=20, decode=d),
    "snapkv": lambda d: SnapKVPolicy(budget=20, window=4, decode=d),
    "pyramidkv": lambda d: PyramidKVPolicy(budget=20, window=4, decode=d),
}
NEW = 30


def prompts(count=3, length=40):
    generator = torch.Generator().manual_seed(9)
    return [[int(t) for t in torch.randint(3, 128, (length,), generator=generator)] for _ in range(count)]


@pytest.fixture(scope="module")
def model():
    return peaked_llama(2, seed=11)


@pytest.mark.parametrize("decode", ["exact", "fast"])
@pytest.mark.parametrize("context_tokens", [None, 30], ids=["prompt", "context"])
@pytest.mark.parametrize("name", POLICIES)
def test_each_row_of_a_batch_answers_as_it_does_alone(model, name, decode, context_tokens):
    policy, tok = POLICIES[name](decode), LetterTokenizer()
    alone = [gen.generate(model, tok, policy, p, NEW, eos_ids=(), context_tokens=context_tokens) for p in prompts()]
    together = gen.generate_batch(model, tok, policy, prompts(), NEW, eos_ids=(), context_tokens=context_tokens)
    assert len({tuple(g.token_ids) for g in alone}) == 3  # the rows differ, so equal answers are not trivially equal
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert all(g.batch_size == 3 and g.generated_tokens == NEW for g in together)
    # KV bytes are per row: the batch's cache holds three rows' worth
    assert together[0].cache_stats["kv_bytes_peak"] == pytest.approx(alone[0].cache_stats["kv_bytes_peak"], rel=0.05)


def test_a_row_that_reads_another_rows_cache_is_caught(model, monkeypatch):
    """The comparison can fail: an H2O cache that evicts every row by row 0's scores answers differently."""
    from lacache.baselines.h2o import HeavyHitterCache

    plan = HeavyHitterCache.plan

    def row0_plan(self, length):
        out = plan(self, length)
        if out is not None:
            out.index = out.index[:, :1].expand_as(out.index).contiguous()
        return out

    tok, policy = LetterTokenizer(), POLICIES["h2o"]("exact")
    alone = [gen.generate(model, tok, policy, p, NEW, eos_ids=()).token_ids for p in prompts()]
    monkeypatch.setattr(HeavyHitterCache, "plan", row0_plan)
    together = [g.token_ids for g in gen.generate_batch(model, tok, policy, prompts(), NEW, eos_ids=())]
    assert together[0] == alone[0] and together[1:] != alone[1:]


@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_rows_stop_on_their_own(model, decode):
    tok, policy = LetterTokenizer(), POLICIES["lacache"](decode)
    free = [gen.generate(model, tok, policy, p, NEW, eos_ids=()).token_ids for p in prompts()]
    eos = {free[1][4]}  # row 1 ends at its fifth token; the others may end elsewhere or run to the length
    stop = tok.decode(free[2][:7])[-1]
    options = dict(eos_ids=eos, stop_strings=[stop], min_new_tokens=2)
    alone = [gen.generate(model, tok, policy, p, NEW, **options) for p in prompts()]
    together = gen.generate_batch(model, tok, policy, prompts(), NEW, **options)
    fields = lambda g: (g.text, g.token_ids, g.stop_reason, g.generated_tokens)  # noqa: E731
    assert [fields(g) for g in together] == [fields(g) for g in alone]
    assert together[1].stop_reason == "eos" or together[1].stop_reason == "stop_string"
    assert len({g.stop_reason for g in together} | {len(g.token_ids) for g in together}) > 2


def test_generate_all_batches_equal_lengths_and_keeps_the_order(model):
    tok, policy = LetterTokenizer(), POLICIES["tova"]("exact")
    requests = [gen.Request(p, 12, {"eos_ids": ()}) for p in prompts(3, 40) + prompts(2, 33)]
    requests.insert(1, requests.pop())  # lengths 40, 33, 40, 40, 33
    done = []
    got = gen.generate_all(model, tok, policy, requests, batch_size=2, on_done=done.append)
    want = [gen.generate(model, tok, policy, r.prompt_ids, 12, eos_ids=()) for r in requests]
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.batch_size for g in got] == [2, 2, 2, 1, 2] and sorted(done) == [1, 2, 2]


def test_a_batch_that_runs_out_of_memory_is_halved_until_it_fits(model, monkeypatch, capsys):
    tok, policy = LetterTokenizer(), POLICIES["h2o"]("fast")
    requests = [gen.Request(p, 12, {"eos_ids": ()}) for p in prompts(5, 40)]
    want = [gen.generate(model, tok, policy, r.prompt_ids, 12, eos_ids=()).token_ids for r in requests]
    real, tried = gen.generate_batch, []

    def small_device(model, tokenizer, policy, prompts, *args, **kwargs):
        tried.append(len(prompts))
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 36 GiB")
        return real(model, tokenizer, policy, prompts, *args, **kwargs)

    monkeypatch.setattr(gen, "generate_batch", small_device)
    got = gen.generate_all(model, tok, policy, requests, batch_size=5)
    assert [g.token_ids for g in got] == want
    assert tried == [5, 3, 2, 1, 2] and [g.batch_size for g in got] == [2, 2, 1, 2, 2]
    assert "a batch of 5 prompts of 40 tokens ran out of device memory" in capsys.readouterr().out

    def no_device(*args, **kwargs):
        tried.append(len(args[3]))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gen, "generate_batch", no_device)
    tried.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a row that does not fit alone is an error, not a loop
        gen.generate_fitting(model, tok, policy, prompts(2, 40), 12)
    assert tried == [2, 1]


def test_the_fast_decoder_lets_go_of_the_model_when_decoding_fails(model, monkeypatch):
    """A sweep keeps one model for all its points: a decode that fails (and is retried smaller) must not
    leave its ring buffers attached to the model's attention modules."""
    tok, policy = LetterTokenizer(), POLICIES["lacache"]("fast")

    def failing_decode(ids, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tok, "decode", failing_decode)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gen.generate_batch(model, tok, policy, prompts(2, 40), NEW, eos_ids=(), stop_strings=["x"])
    assert not [name for name, module in model.named_modules() if hasattr(module, "lacache_ring")]


def test_bad_batches_fail_clearly(model):
    tok, policy = LetterTokenizer(), FullCachePolicy()
    with pytest.raises(ValueError, match=r"one length.*\[33, 40\]"):
        gen.generate_batch(model, tok, policy, prompts(1, 40) + prompts(1, 33), 4)
    with pytest.raises(ValueError, match="no prompts"):
        gen.generate_batch(model, tok, policy, [], 4)
    for bad in (0, -2, 1.5, True, "8"):
        with pytest.raises(TaskConfigError, match="task.batch_size"):
            RulerTask(tasks=["niah_single_1"], batch_size=bad)


def test_batch_size_1_keeps_the_keys_of_older_records():
    base = {"model": {"name": "m"}, "cache": {"budget": 8}, "task": {"context_length": 2048}, "seed": 0}
    one = {**base, "task": {**base["task"], "batch_size": 1}}
    eight = {**base, "task": {**base["task"], "batch_size": 8}}
    assert records.config_key(records.identity(one)) == records.config_key(records.identity(base))
    assert records.config_key(records.identity(eight)) != records.config_key(records.identity(base))


def test_ruler_batched_answers_equal_one_at_a_time(smollm2):
    from conftest import tiny_llama

    _, tok = smollm2
    vocab_model = tiny_llama(layers=2, vocab=len(tok), seed=1)
    policy = StreamingLLMPolicy(budget=0.5, sink=4)
    runs = [RulerTask(tasks=["niah_single_1", "niah_single_2"], context_length=512, num_samples=3, batch_size=b)
            .run(context(vocab_model, tok, policy)) for b in (1, 4)]
    one, four = ([(s["task"], s["index"], s["prediction"]) for s in r.samples] for r in runs)
    assert one == four and len(one) == 6
    assert runs[0].metrics == runs[1].metrics
    assert max(s["batch_size"] for s in runs[1].samples) > 1
    assert "batch_size" not in RulerTask(tasks=["vt"]).describe() and RulerTask(tasks=["vt"], batch_size=4).describe()["batch_size"] == 4


def test_niah_batched_answers_equal_one_at_a_time(smollm2, tmp_path):
    from conftest import tiny_llama

    from lacache.tasks.niah import NeedleTask

    _, tok = smollm2
    vocab_model = tiny_llama(layers=2, vocab=len(tok), seed=1)
    policy = H2OPolicy(budget=0.5)
    runs = [NeedleTask(context_lengths=[256], depths=[0.0, 0.5, 1.0], num_samples=2, haystack="repeat", needle="line",
                       pass_key_digits=None, max_new_tokens=8, batch_size=b, artifacts_dir=str(tmp_path / str(b)))
            .run(context(vocab_model, tok, policy)) for b in (1, 6)]
    one, six = ([(s["depth"], s["index"], s["prediction"]) for s in r.samples] for r in runs)
    assert one == six and len(one) == 6
    assert max(s["batch_size"] for s in runs[1].samples) > 1


def test_hf_generate_pads_unequal_prompts_and_answers_as_the_harness_does(model):
    """``cache.decode=hf-generate`` (the throughput anchor): transformers' generate over left-padded batches
    gives each prompt the tokens the harness's full cache gives it alone; attending to the pads would not."""
    tok = LetterTokenizer()
    requests = [gen.Request(p, NEW, {"eos_ids": ()}) for p in prompts(2, 40) + prompts(1, 33)]
    alone = [gen.generate(model, tok, FullCachePolicy(), r.prompt_ids, NEW, eos_ids=()).token_ids for r in requests]
    padded = gen.generate_all(model, tok, FullCachePolicy(decode="hf-generate"), requests, batch_size=3)
    assert len({tuple(t) for t in alone}) == 3
    assert [g.token_ids for g in padded] == alone
    assert [g.batch_size for g in padded] == [3, 3, 3] and all(g.generated_tokens == NEW for g in padded)
    assert [g.prompt_tokens for g in padded] == [40, 40, 33]
    short = torch.tensor([[0] * 7 + requests[2].prompt_ids])  # the comparison can fail: pads attended
    with torch.inference_mode():
        attended = model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)[0, 40:].tolist()
    assert attended != alone[2]


def test_hf_generate_stops_rows_as_the_harness_does(model):
    tok = LetterTokenizer()
    free = [gen.generate(model, tok, FullCachePolicy(), p, NEW, eos_ids=()).token_ids for p in prompts()]
    options = dict(eos_ids={free[1][4]}, min_new_tokens=2)
    alone = [gen.generate(model, tok, FullCachePolicy(), p, NEW, **options) for p in prompts()]
    together = gen.generate_batch(model, tok, FullCachePolicy(decode="hf-generate"), prompts(), NEW, **options)
    fields = lambda g: (g.text, g.token_ids, g.stop_reason, g.generated_tokens)  # noqa: E731
    assert [fields(g) for g in together] == [fields(g) for g in alone]
    assert together[1].stop_reason == "eos"


def test_hf_generate_is_the_full_caches_alone():
    from lacache.policy import PolicyConfigError

    for name in ("streamingllm", "lacache", "h2o"):
        with pytest.raises(PolicyConfigError, match="decode=hf-generate is not available .* use cache=full"):
            POLICIES[name]("hf-generate")


def test_exact_fill_gives_a_task_one_prompt_length_without_touching_what_is_scored(smollm2):
    from conftest import tiny_llama

    _, tok = smollm2
    tasks = ["niah_single_1", "qa_1"]
    kwargs = dict(tasks=tasks, context_length=1024, num_samples=3)
    plain, exact = RulerTask(**kwargs).samples(tok), RulerTask(**kwargs, fill="exact").samples(tok)
    context_mode = RulerTask(**kwargs, fill="exact", compress="context")
    newline = gen.newline_token_id(tok)
    for task in tasks:
        lengths = {len(ids) for _, ids in exact[task]}
        assert lengths == {max(len(ids) for _, ids in plain[task])}
        assert len({len(ids) for _, ids in plain[task]}) > 1  # fill=max alone leaves them unequal
        for (before, ids), (after, filled) in zip(plain[task], exact[task]):
            at, n = after.filler_at, after.filler
            assert (after.input, after.outputs, after.answer_prefix) == (before.input, before.outputs, before.answer_prefix)
            assert filled[:at] + filled[at + n:] == ids and filled[at : at + n] == [newline] * n
            assert at == RulerTask(**kwargs, compress="context").context_tokens(tok, before, ids)  # the context's end
            assert context_mode.context_tokens(tok, after, filled) == at + n
    assert sum(s.filler for pairs in exact.values() for s, _ in pairs) > 0
    with pytest.raises(TaskConfigError, match=r"task.fill='same' is not one of \('max', 'nvidia', 'exact'\)"):
        RulerTask(tasks=["vt"], fill="same")
    vocab_model = tiny_llama(layers=2, vocab=len(tok), seed=1)
    run = RulerTask(**kwargs, fill="exact", batch_size=3).run(context(vocab_model, tok, StreamingLLMPolicy(budget=0.5, sink=4)))
    assert run.stats["batch_rows_mean"] == 3 and run.stats["batches"] == 2 and run.stats["samples_per_min"] > 0
    assert [s["filler_tokens"] for s in run.samples] == [s.filler for pairs in exact.values() for s, _ in pairs]
