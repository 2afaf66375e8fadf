"""The fast decode path (lacache.decode.fast) against the exact caches, and the reference-method baseline.

CPU tests run the same ring code eagerly in fp32 (tight tolerance); the CUDA test captures CUDA
graphs and checks bf16 logits over 1,000 steps with compactions, wraps and rebases (run it on a
GPU machine: ``pytest -m cuda``; it is skipped without CUDA).
"""

import importlib.util
import os

import pytest
import torch
from conftest import sharpened, stream, tiny_llama

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.lacache_reference import ReferenceLaCachePolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.compat import cache_kwarg
from lacache.decode.fast import GraphDecoder
from lacache.decode.fused import fusable
from lacache.ladder import kept_positions
from lacache.ladder_cache import LaCachePolicy

POLICIES = {
    "lacache S4 O2": lambda: LaCachePolicy(budget=32, span=4, overlap=2, sink=4),
    "lacache S2 O0 (r=3)": lambda: LaCachePolicy(budget=40, span=2, overlap=0, sink=4),
    "lacache every 3": lambda: LaCachePolicy(budget=32, span=4, overlap=2, sink=4, compact_every=3),
    "streamingllm": lambda: StreamingLLMPolicy(budget=24, sink=4),
    "full": lambda: FullCachePolicy(),
}
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}


def exact_and_fast(model, make_policy, ids, prompt, rebase_every=50, graphs=None, fuse=False, triton=False):
    """Teacher-forced logits of the exact cache and of the fast path after the same prefill."""
    exact_logits, fast_logits = [], []
    with torch.inference_mode():
        exact = make_policy().make_cache(model, prompt_length=prompt)
        model(ids[:, :prompt], **cache_kwarg(model, exact))
        source = make_policy().make_cache(model, prompt_length=prompt)
        model(ids[:, :prompt], **cache_kwarg(model, source))
        decoder = GraphDecoder(model, source, ids[:, prompt : prompt + 1], max_new_tokens=ids.shape[1], graphs=graphs,
                               rebase_every=rebase_every, fuse=fuse, triton=triton)
        try:
            for t in range(prompt, ids.shape[1]):
                exact_logits.append(model(ids[:, t : t + 1], **cache_kwarg(model, exact)).logits[:, -1].float())
                decoder.ids.copy_(ids[:, t : t + 1])
                fast_logits.append(decoder.step().float().clone())
            decoder.settle()
        finally:
            decoder.close()
    return exact, decoder, torch.stack(exact_logits, 1), torch.stack(fast_logits, 1)


@pytest.mark.parametrize("name", sorted(POLICIES) + ["lacache S4 O2 yarn"])
def test_fast_path_logits_and_positions_equal_the_exact_cache(name):
    model = tiny_llama(layers=8, **({"rope_scaling": YARN} if name.endswith("yarn") else {}))
    name = name.removesuffix(" yarn")
    ids = torch.randint(0, 128, (2, 330), generator=torch.Generator().manual_seed(1))
    exact, decoder, want, got = exact_and_fast(model, POLICIES[name], ids, prompt=40)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    if name != "full":
        assert decoder.ring.compactions > 60
        assert decoder.ring.wraps >= (2 if name.startswith("lacache") else 0)
        assert torch.equal(decoder.ring.kept_positions(), exact.kept_positions()[:, 0, 0])


def tiny_qwen2(layers=8):
    """A random Qwen2 (q/k/v biases, made non-zero so that the fused bias is exercised)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model


@pytest.mark.parametrize("name", ["lacache S4 O2", "streamingllm", "full", "lacache S4 O2 qwen2"])
def test_fused_step_equals_the_exact_cache(name):
    """The fused decode step (one q/k/v and one gate/up product per layer, run uncompiled on the CPU)
    gives the stock forward's logits; the model's own weights become views of the fused ones."""
    model = tiny_qwen2() if name.endswith("qwen2") else tiny_llama(layers=8)
    ids = torch.randint(0, 128, (2, 140), generator=torch.Generator().manual_seed(1))
    _, decoder, want, got = exact_and_fast(model, POLICIES[name.removesuffix(" qwen2")], ids, prompt=40, fuse=True)
    assert decoder.ring.kernels.step is not None
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    attn, mlp = model.model.layers[3].self_attn, model.model.layers[3].mlp
    for first, second in ((attn.q_proj, attn.k_proj), (attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        assert second.weight.untyped_storage().data_ptr() == first.weight.untyped_storage().data_ptr()  # one tensor
        assert second.weight.data_ptr() == first.weight.data_ptr() + first.weight.numel() * 4


def test_fusing_weights_that_only_happen_to_be_adjacent_makes_one_tensor():
    """Separate allocations can lie back to back (the CUDA caching allocator places them so): that is
    not one tensor, so the weights are stacked anew (two storages over one numpy buffer stand in for it)."""
    from lacache.decode.fused import fuse_linears

    buffer = torch.randn(12, 4).numpy()
    first, second = torch.nn.Linear(4, 6, bias=False), torch.nn.Linear(4, 6, bias=False)
    first.weight.data, second.weight.data = torch.from_numpy(buffer[:6]), torch.from_numpy(buffer[6:])
    assert second.weight.data_ptr() == first.weight.data_ptr() + 6 * 4 * 4  # adjacent, separate storages
    fused, _ = fuse_linears([first, second])
    assert torch.equal(fused, torch.from_numpy(buffer))
    assert second.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_fusable_names_what_it_cannot_fuse():
    assert fusable(tiny_llama(layers=2)) is None
    assert "o_proj or the MLP has a bias" in fusable(tiny_llama(layers=2, attention_bias=True))
    assert "hidden_act" in fusable(tiny_llama(layers=2, hidden_act="gelu"))


def test_fast_path_keeps_the_ladder_positions_from_an_empty_cache():
    model = tiny_llama(layers=8)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2))
    policy = LaCachePolicy(budget=32, span=4, overlap=2, sink=4)
    with torch.inference_mode():
        source = policy.make_cache(model)
        model(ids[:, :1], **cache_kwarg(model, source))
        decoder = GraphDecoder(model, source, ids[:, 1:2], graphs=False, rebase_every=37)
        for t in range(1, ids.shape[1]):
            decoder.ids.copy_(ids[:, t : t + 1])
            decoder.step()
        decoder.settle()
        decoder.close()
    want = torch.tensor(kept_positions(8, 4, 2, 32, 4, ids.shape[1]))
    assert torch.equal(decoder.ring.kept_positions(), want)


@pytest.mark.parametrize("prompt", [1, 3])
@pytest.mark.parametrize("name", ["lacache S4 O2", "streamingllm"])
def test_a_prompt_shorter_than_the_sinks_decodes_like_the_exact_cache(name, prompt):
    """Tokens decoded into sink slots stay at their positions once merges start (a 1-token prefill, as
    task=ppl streams; peaked attention, so a sink read at a shifted position shows)."""
    model = sharpened(tiny_llama(layers=8))
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(3))
    _, _, want, got = exact_and_fast(model, POLICIES[name], ids, prompt=prompt)
    assert (got - want).abs().max() < 1e-4 and want.std() > 1


def test_fast_path_refuses_what_it_cannot_do():
    model = tiny_llama(layers=8)
    ids = torch.randint(0, 128, (1, 20))
    with torch.inference_mode():
        cache = FullCachePolicy().make_cache(model)
        model(ids, **cache_kwarg(model, cache))
        decoder = GraphDecoder(model, cache, ids[:, -1:], max_new_tokens=2, graphs=False)
        assert decoder.ring.capacity >= 20 + 2
        for _ in range(decoder.ring.capacity - 20):
            decoder.step()
        with pytest.raises(RuntimeError, match="max_new_tokens"):
            decoder.step()
        decoder.close()


def test_reference_method_keeps_the_same_positions_as_lacache():
    model = tiny_llama(layers=8)
    ids = torch.randint(0, 128, (1, 260), generator=torch.Generator().manual_seed(3))
    for settings in (dict(budget=32, span=4, overlap=2, sink=4), dict(budget=40, span=2, overlap=0, sink=4)):
        fast = stream(model, LaCachePolicy(**settings).make_cache(model, 260), ids)
        reference = stream(model, ReferenceLaCachePolicy(**settings).make_cache(model, 260), ids)
        assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-4)
        bulk = [LaCachePolicy(**settings).make_cache(model, 200), ReferenceLaCachePolicy(**settings).make_cache(model, 200)]
        with torch.inference_mode():
            outs = [model(ids[:, :200], **cache_kwarg(model, c)) for c in bulk]
        after = [stream(model, c, ids[:, 200:]) for c in bulk]
        assert torch.allclose(after[0], after[1], atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("name, fuse, triton, prompt", [("lacache S4 O2", False, False, 128), ("streamingllm", False, False, 128),
                                                       ("lacache S4 O2", True, False, 128), ("lacache S4 O2", True, True, 128),
                                                       ("streamingllm", True, True, 128), ("streamingllm", False, False, 1),
                                                       ("lacache S4 O2", True, True, 1)])
def test_cuda_graph_path_matches_exact_bf16_over_1000_steps(name, fuse, triton, prompt):
    """bf16 tolerance, measured: the fast path may differ from the exact bf16 path by no more than
    the exact bf16 path itself differs from fp32 (its own rounding noise), with a small floor. A
    1-token prompt (task=ppl's stream) decodes its sink tokens too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model32 = LlamaForCausalLM(config).eval()
    model16 = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model32.state_dict().items()})
    big = {"lacache S4 O2": lambda: LaCachePolicy(budget=96, span=4, overlap=2, sink=4),
           "streamingllm": lambda: StreamingLLMPolicy(budget=96, sink=4)}[name]
    ids = torch.randint(0, 1024, (2, prompt + 1000), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    exact, decoder, want, got = exact_and_fast(model16, big, ids, prompt=prompt, rebase_every=300, graphs=True, fuse=fuse,
                                               triton=triton)
    _, _, want32, _ = exact_and_fast(model32, big, ids, prompt=prompt, rebase_every=300, graphs=False)
    noise = (want - want32).abs().max().item()
    error = (got - want).abs().max().item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{name}{' fused' if fuse else ''}{' triton' if triton else ''}: max|fast-exact| {error:.4f}, max|exact bf16 - fp32| {noise:.4f}, argmax agreement {agree:.4f}, "
          f"compactions {decoder.ring.compactions}")
    assert decoder.ring.compactions >= 900 and decoder.ring.wraps >= (5 if name.startswith("lacache") else 0)
    assert error <= max(noise, 0.02)
    assert torch.equal(decoder.ring.kept_positions(), exact.kept_positions()[:, 0, 0])


def rotate_half_reference(x, cos, sin):
    """RoFormer's rotation in the rotate_half layout, written out: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]), dim=-1)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                    reason="needs a CUDA GPU (run on the device machine), or Triton's interpreter: TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("heads, kv_heads, dim, capacity, empty", [(9, 3, 64, 384, 1), (32, 8, 128, 4224, 1),
                                                                   (4, 1, 64, 128 * 70, 1), (4, 1, 64, 128 * 70, 64)])
def test_triton_kernels_equal_a_written_out_reference(heads, kv_heads, dim, capacity, empty):
    """The Triton ring attention and rotary + cache write against float64 arithmetic written per slot:
    compacted slots see the query rotated by the shift, tail slots the query as it is, free slots nothing.
    SmolLM2's head layout (3 query heads per KV head, dim 64) and Llama-3-8B's (4, 128); ``empty`` leading
    128-slot splits hold no valid slot (70 splits: the merge takes two passes; with 64 empty, its first sees none). Without a GPU, under
    Triton's interpreter, in fp32 (its bf16 matrix product is broken)."""
    from lacache.decode import triton_kernels as triton_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    batch, dtype = 2, torch.bfloat16 if device == "cuda" else torch.float32
    tolerance = 0.03 if dtype == torch.bfloat16 else 1e-4  # bf16: the probabilities meet the values rounded
    randn = lambda *shape: torch.randn(*shape, device=device, generator=gen).to(dtype)  # noqa: E731
    keys, values = randn(batch, kv_heads, capacity, dim), randn(batch, kv_heads, capacity, dim)
    query = randn(batch, heads, dim) * 4  # peaked scores: a slot scored with the wrong rotation shows
    valid = torch.rand(capacity, device=device, generator=gen) < 0.7
    valid[: empty * 128] = False  # whole splits free: their partials must not poison the merge
    valid[empty * 128 + 72] = True
    is_tail = torch.rand(capacity, device=device, generator=gen) < 0.5
    angle = torch.rand(dim // 2, device=device, generator=gen) * 6
    shift_cos, shift_sin = torch.cat((angle, angle)).cos().to(dtype), torch.cat((angle, angle)).sin().to(dtype)
    scaling = dim**-0.5
    got = triton_decode.ring_attention(query, keys, values, is_tail, valid, shift_cos, shift_sin, scaling)

    q = query.double().view(batch, kv_heads, heads // kv_heads, dim)
    q_compact = rotate_half_reference(q, shift_cos.double(), shift_sin.double())
    scores = torch.where(is_tail, q @ keys.double().transpose(-1, -2), q_compact @ keys.double().transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    want = (probs @ values.double()).reshape(batch, 1, heads * dim)
    assert (got.double() - want).abs().max().item() < tolerance and torch.isfinite(got).all()

    qkv = randn(batch, 1, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(batch, 1, dim // 2, device=device, generator=gen) * 6
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    raw = torch.zeros_like(keys)
    slot = torch.tensor([77], device=device)
    before = keys.clone(), values.clone()
    rotated_query = triton_decode.rope_write(qkv, cos, sin, slot, keys, raw, values, heads, kv_heads)
    q, k, v = qkv.view(batch, heads + 2 * kv_heads, dim).double().split((heads, kv_heads, kv_heads), dim=1)
    assert (rotated_query.double() - rotate_half_reference(q, cos.double(), sin.double())).abs().max().item() < 2 * tolerance
    assert (keys[:, :, 77].double() - rotate_half_reference(k, cos.double(), sin.double())).abs().max().item() < 2 * tolerance
    assert torch.equal(raw[:, :, 77], k.to(dtype)) and torch.equal(values[:, :, 77], v.to(dtype))
    others = torch.arange(capacity, device=device) != 77
    assert torch.equal(keys[:, :, others], before[0][:, :, others]) and torch.equal(values[:, :, others], before[1][:, :, others])


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                    reason="needs a CUDA GPU (run on the device machine), or Triton's interpreter: TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("rows, width", [(960, 576), (200, 1536)])  # SmolLM2's q/k/v; a ragged last block
def test_triton_products_equal_a_written_out_reference(rows, width):
    """The fused step's Triton products against float64 arithmetic: plain, with a bias, after
    SiLU(gate) x up, and after the skip connection's sum and its RMSNorm (whose sum each batch row
    gets back once, in a new tensor: the input residual is left as it was)."""
    from lacache.decode import triton_kernels as triton_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    randn = lambda *shape: torch.randn(*shape, device=device, generator=gen).to(dtype)  # noqa: E731
    weight, bias = randn(rows, width) * 0.05, randn(rows)
    x, gate_up, residual = randn(3, 1, width), randn(3, 1, 2 * width), randn(3, 1, width) * 3
    norm_weight = (torch.rand(width, device=device, generator=gen) + 0.5).to(dtype)
    before = residual.clone()

    def product(vector):
        return vector @ weight.double().T

    def close(got, want):
        return (got.double() - want.double()).abs().max().item() < tolerance

    assert close(triton_decode.matvec(x, weight), product(x.double()))
    assert close(triton_decode.matvec(x, weight, bias), product(x.double()) + bias.double())
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert close(triton_decode.matvec(gate_up, weight, None, triton_decode.SILU), product(gate / (1 + (-gate).exp()) * up))
    total = residual.double() + x.double()
    normed = total / (total.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm_weight.double()
    got, new_residual = triton_decode.matvec(x, weight, None, triton_decode.NORM, residual, norm_weight, 1e-5, add=True)
    assert close(got, product(normed)) and close(new_residual, total) and torch.equal(residual, before)
    alone = residual.double() / (residual.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm_weight.double()
    assert close(triton_decode.matvec(residual, weight, None, triton_decode.NORM, residual, norm_weight, 1e-5), product(alone))


def test_triton_decode_is_refused_off_cuda(tmp_path):
    from lacache.harness import bench

    model, ids = tiny_llama(layers=8), torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = LaCachePolicy(budget=16, span=4, overlap=2, sink=2).make_cache(model, prompt_length=19)
        model(ids[:, :19], **cache_kwarg(model, cache))
        with pytest.raises(ValueError, match="triton=True is a variant of the fused step on CUDA"):
            GraphDecoder(model, cache, ids[:, 19:], graphs=False, fuse=True, triton=True)
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny-shape", "--decode", "triton", "--plot", "", "--runs-dir", str(tmp_path)])


@pytest.mark.parametrize("make", [lambda d: LaCachePolicy(budget=16, span=4, overlap=2, sink=2, decode=d),
                                  lambda d: StreamingLLMPolicy(budget=12, sink=2, decode=d),
                                  lambda d: FullCachePolicy(decode=d)], ids=["lacache", "streamingllm", "full"])
def test_generation_with_decode_fast_equals_exact(make):
    from test_tasks import LetterTokenizer

    from lacache.tasks import generation

    model = tiny_llama(layers=8, seed=4)
    prompt = [int(t) for t in torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(5))]
    exact = generation.generate(model, LetterTokenizer(), make("exact"), prompt, 60, eos_ids=())
    fast = generation.generate(model, LetterTokenizer(), make("fast"), prompt, 60, eos_ids=())
    assert fast.token_ids == exact.token_ids and len(fast.token_ids) == 60
    banned = {exact.token_ids[0]}  # min_new_tokens masks an end token on the fast path too
    fast = generation.generate(model, LetterTokenizer(), make("fast"), prompt, 5, eos_ids=banned, min_new_tokens=3)
    assert fast.token_ids[0] != exact.token_ids[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("make", [lambda d: LaCachePolicy(budget=16, span=4, overlap=2, sink=2, decode=d),
                                  lambda d: FullCachePolicy(decode=d)], ids=["lacache", "full"])
def test_generation_with_decode_triton_equals_decode_fast(make):
    """``cache.decode=triton`` reaches the Triton step through a task's generation loop (fp32 on the
    GPU: the same greedy tokens as ``decode=fast``, also for two rows decoded together)."""
    from test_tasks import LetterTokenizer

    from lacache.tasks import generation

    model = tiny_llama(layers=8, seed=4).cuda()
    with torch.no_grad():  # peaked attention: a slot scored at the wrong position changes the tokens
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    prompt = [int(t) for t in torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(5))]
    fast = generation.generate(model, LetterTokenizer(), make("fast"), prompt, 60, eos_ids=())
    fused = generation.generate(model, LetterTokenizer(), make("triton"), prompt, 60, eos_ids=())
    assert fused.token_ids == fast.token_ids and len(fused.token_ids) == 60
    rows = generation.generate_batch(model, LetterTokenizer(), make("triton"), [prompt, prompt[::-1]], 30, eos_ids=())
    assert rows[0].token_ids == fast.token_ids[:30]


def test_decode_fast_is_refused_where_there_is_no_fast_path():
    from transformers import GPT2Config, LlamaConfig

    from lacache.harness.runner import ConfigError, check_triton_decode
    from lacache.models import ModelSpec
    from lacache.policy import PolicyConfigError

    with pytest.raises(PolicyConfigError, match="decode=fast is not available for lacache_reference"):
        ReferenceLaCachePolicy(budget=64, decode="fast")
    with pytest.raises(PolicyConfigError, match=r"decode='graph' is not one of \('exact', 'fast', 'triton', 'hf-generate'\)"):
        LaCachePolicy(decode="graph")
    with pytest.raises(PolicyConfigError, match="decode=triton is not available for h2o; it is for full, streamingllm and lacache"):
        H2OPolicy(budget=64, decode="triton")
    with pytest.raises(ConfigError, match="set model.device=cuda \\(not device='cpu'"):
        check_triton_decode(ModelSpec(name="m", id="m", device="cpu"), LlamaConfig())
    with pytest.raises(ConfigError, match="cannot run model 'm': model_type 'gpt2' is not one of"):
        check_triton_decode(ModelSpec(name="m", id="m", device="cuda"), GPT2Config())
    check_triton_decode(ModelSpec(name="m", id="m", device="cuda"), LlamaConfig())


def test_bench_rows_carry_the_bound_and_the_hf_static_anchor(tmp_path):
    """One bench process: the weight-streaming bound on every row, transformers' generate + StaticCache
    as the hf-static row, and one record per chunk size of a chunked prefill."""
    from lacache.harness import bench
    from lacache.harness.records import load_records

    common = ["--model", "tiny-shape", "--contexts", "96", "--budgets", "32", "--span", "4", "--overlap", "2",
              "--steps", "3", "--plot", "", "--runs-dir", str(tmp_path)]
    bench.main(common + ["--policies", "full", "--decode", "fused", "hf-static"])
    for chunk in ("16", "32"):
        bench.main(common + ["--policies", "lacache", "--decode", "graph", "--prefill", "chunked", "--chunk", chunk])
    frame = load_records(tmp_path)
    assert sorted(frame["decode"]) == ["fused", "graph", "graph", "hf-static"]
    assert sorted(frame["prefill_chunk"].dropna()) == [16, 32]
    from transformers import LlamaConfig, LlamaForCausalLM

    weights = sum(p.numel() * 4 for p in LlamaForCausalLM(LlamaConfig(**bench.SHAPES["tiny-shape"])).parameters())
    for _, row in frame.iterrows():
        assert row["stats.weight_bytes"] == weights and row["stats.decode_ms_per_token"] > 0
        assert row["stats.bound_ratio"] == pytest.approx(row["stats.decode_ms_per_token"] / row["stats.bound_ms_per_token"])


# ---------------------------------------------------------------------------------------------- ring sizing (CPU)
RING_SIZING = {  # policy, the most slots a decode step holds (worked out from the policy's rule)
    # 6 layers, S=1 O=0: b = 6, a = 1, r = 5; the compensated budget C + r//2, and one token more before a merge
    "lacache S1 O0": (lambda: LaCachePolicy(budget=20, span=1, overlap=0, sink=2), 20 + 5 // 2 + 1),
    # S=3 O=0: b = 2, a = 1, r = 1; compact_every=3: the cache grows 3 slots past the budget before merging
    "lacache S3 O0 every 3": (lambda: LaCachePolicy(budget=20, span=3, overlap=0, sink=2, compact_every=3), 20 + 1 // 2 + 3),
    "streamingllm": (lambda: StreamingLLMPolicy(budget=12, sink=2), 12 + 1),
}


@pytest.mark.parametrize("name", RING_SIZING)
def test_the_ring_holds_what_a_decode_step_holds_rounded_to_whole_splits(name):
    """The decode ring is sized from the policy's ring rule: the most slots a step holds (the exact cache's
    peak when it is fed token by token) plus 8 spare slots, rounded up to the attention's 128-slot splits;
    its decode keeps the exact cache's positions."""
    make, most = RING_SIZING[name]
    model = tiny_llama(layers=6)
    ids = torch.randint(0, 128, (1, 36), generator=torch.Generator().manual_seed(4))
    exact = make().make_cache(model)
    stream(model, exact, ids)
    assert exact.peak_slots == most and exact.ring_rule().max_length == most
    source = make().make_cache(model)
    with torch.inference_mode():
        model(ids[:, :1], **cache_kwarg(model, source))
        decoder = GraphDecoder(model, source, ids[:, 1:2], graphs=False)
        try:
            assert decoder.ring.capacity == 128 and decoder.ring.keys.shape[3] == 128
            for t in range(1, ids.shape[1]):
                decoder.ids.copy_(ids[:, t : t + 1])
                decoder.step()
            decoder.settle()
        finally:
            decoder.close()
    assert torch.equal(decoder.ring.kept_positions(), exact.kept_positions()[:, 0, 0])


def test_ring_capacity_rounds_up_to_whole_splits():
    """A full cache's ring holds the prompt, the tokens still to decode and 8 spare slots, in 128-slot splits."""
    from lacache.decode.fast import RingCache

    model = tiny_llama(layers=4)
    for prompt, room, capacity in [(10, 0, 128), (120, 0, 128), (121, 0, 256), (100, 20, 128), (100, 21, 256)]:
        cache = FullCachePolicy().make_cache(model)
        with torch.inference_mode():
            model(torch.zeros(1, prompt, dtype=torch.long), **cache_kwarg(model, cache))
        ring = RingCache(model, cache, room=room)
        assert ring.capacity == capacity and ring.kv.shape[4] == capacity and ring.host_n == prompt
    source = LaCachePolicy(budget=118, span=2, overlap=0, sink=2).make_cache(model)  # 4 layers, r = 1: at most 118 + 0 + 1 = 119 slots
    assert source.ring_rule().max_length == 119
    with torch.inference_mode():
        model(torch.zeros(1, 5, dtype=torch.long), **cache_kwarg(model, source))
    assert RingCache(model, source).capacity == 128  # 119 + 8 = 127
    source = LaCachePolicy(budget=120, span=2, overlap=0, sink=2).make_cache(model)  # 121 + 8 = 129: two splits
    with torch.inference_mode():
        model(torch.zeros(1, 5, dtype=torch.long), **cache_kwarg(model, source))
    assert RingCache(model, source).capacity == 256
