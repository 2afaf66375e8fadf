"""task=ppl with cache.decode=fast: the text streamed token by token through the fast decoder (teacher
forcing), scored against the oracle's per-token logits (tests/oracle.py) on a peaked tiny Llama."""

import math

import oracle as ref
import oracle_rules as rules
import pytest
import torch
from test_harness import ByteTokenizer
from test_oracle import LAYERS, peaked_llama

from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.ladder_cache import LaCachePolicy
from lacache.tasks.base import RunContext
from lacache.tasks.ppl import PerplexityTask

TOKENS, WINDOW = 90, 16
CASES = {  # name: (policy keywords, oracle rule, position mode)
    "streamingllm": (lambda **kw: StreamingLLMPolicy(budget=20, sink=4, **kw), ref.sink_window(20, 4), "shift"),
    "lacache": (lambda **kw: LaCachePolicy(budget=24, span=2, overlap=0, sink=4, **kw), ref.spec_ladder(LAYERS, 2, 0, 24, 4), "shift"),
    "h2o": (lambda **kw: H2OPolicy(budget=16, **kw), rules.h2o(16, 8), "shift"),
}


def windowed_ppl(logits: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Per-window perplexity from each position's logits (position t scores token t + 1)."""
    nll = -torch.log_softmax(logits[:-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
    return [math.exp(nll[s : s + WINDOW].mean().item()) for s in range(0, len(nll), WINDOW)]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    generator = torch.Generator().manual_seed(7)
    path.write_bytes(bytes(int(b) for b in torch.randint(32, 127, (TOKENS,), generator=generator)))
    return path


@pytest.mark.parametrize("name", CASES)
def test_fast_streaming_ppl_matches_the_oracle_token_by_token(name, text):
    make, rule, mode = CASES[name]
    model, tokenizer = peaked_llama(), ByteTokenizer(128)
    ids = tokenizer(text.read_text()).input_ids
    task = PerplexityTask(dataset="text_file", path=str(text), num_tokens=TOKENS, window=WINDOW)
    fast = task.run(RunContext(model, tokenizer, make(decode="fast"), model.config, 4096, progress=False))
    exact = task.run(RunContext(model, tokenizer, make(), model.config, 4096, progress=False))
    want = windowed_ppl(ref.run(ref.Oracle(model, rule, position_mode=mode), ids[0], [1] * TOKENS), ids)
    got = [window["ppl"] for window in fast.curves["ppl_window"]]
    assert got == pytest.approx(want, rel=1e-4) and max(want) / min(want) > 1.5  # windows that differ, matched each
    assert fast.metrics["ppl"] == pytest.approx(exact.metrics["ppl"], rel=1e-4)
    assert fast.stats["kv_entries_per_layer_max"] <= exact.stats["kv_entries_per_layer_max"]
    assert 0 < fast.stats["kv_bytes_decode"] and fast.stats["kv_entries_per_layer_mean"] > 0


def test_fast_streaming_ppl_is_teacher_forced(text, monkeypatch):
    """The check above can fail: a decoder left to its own greedy tokens scores another text."""
    from lacache.decode import fast as fast_decode

    class Greedy(fast_decode.GraphDecoder):
        def step(self):
            if hasattr(self, "greedy"):
                self.ids.copy_(self.greedy)  # undo the text's token the task copied in
            logits = super().step()
            self.greedy = self.ids.clone()  # the argmax the step left there
            return logits

    make, rule, mode = CASES["streamingllm"]
    model, tokenizer = peaked_llama(), ByteTokenizer(128)
    ids = tokenizer(text.read_text()).input_ids
    want = windowed_ppl(ref.run(ref.Oracle(model, rule, position_mode=mode), ids[0], [1] * TOKENS), ids)
    monkeypatch.setattr(fast_decode, "GraphDecoder", Greedy)
    task = PerplexityTask(dataset="text_file", path=str(text), num_tokens=TOKENS, window=WINDOW)
    broken = task.run(RunContext(model, tokenizer, make(decode="fast"), model.config, 4096, progress=False))
    assert [window["ppl"] for window in broken.curves["ppl_window"]] != pytest.approx(want, rel=1e-2)


def test_a_stream_only_the_exact_path_runs_is_refused_before_the_model_loads(text):
    from lacache.baselines.pyramidkv import PyramidKVPolicy
    from lacache.baselines.snapkv import SnapKVPolicy
    from lacache.tasks.base import TaskConfigError

    task = PerplexityTask(dataset="text_file", path=str(text), num_tokens=TOKENS, window=WINDOW)
    for policy in (SnapKVPolicy(budget=64, decode="fast"), PyramidKVPolicy(budget=64, decode="fast")):
        with pytest.raises(TaskConfigError, match=f"empty {policy.name} cache.*cache.decode='fast' cannot: use cache.decode=exact"):
            task.check(None, policy, 4096)
    task.check(None, SnapKVPolicy(budget=64), 4096)
    assert task.describe() == {"task": "ppl", "dataset": "text_file", "num_tokens": TOKENS}  # what keys its records
    task.check(None, H2OPolicy(budget=16, decode="fast"), 4096)
