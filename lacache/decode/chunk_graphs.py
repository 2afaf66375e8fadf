"""CUDA graphs of a chunked prefill's middle decoder layers, bit-equal to running them eagerly.

Once a compressing cache is full, a chunked prefill (``cache.prefill=chunked``) runs the same forward
over and over: the same shapes, the same buffers, new numbers. On a GPU a 512-token chunk of an 8B
model is ~0.75 ms of work per layer, and launching its ~50 kernels through transformers' modules
takes about as long, so the prefill is bound by the host (``docs/PERFORMANCE.md``).
:class:`ChunkGraphs` captures decoder layers ``1 .. L-2`` of such a forward as one CUDA graph the
second time a chunk's signature (shapes, buffers, cache length) is seen, and replays it while the
signature repeats. A replay runs the kernels the eager layers would launch, in the same order on
the same buffers, so logits and cache are bit-for-bit those of the eager forward
(``tests/test_chunk_graphs.py``). The first and last layers stay eager: the cache does its
per-forward work there (the pending compaction, the counters), which a replay would skip.

Only caches whose per-layer work is kernels alone qualify (:func:`why_not_graphed`): the base
:class:`~lacache.kvcache.CompactingCache` append, as StreamingLLM and LaCache use it. Scoring
policies keep Python state per layer and run eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.nn.attention.bias import CausalBias

from lacache.kvcache import CompactingCache

#: The cache's per-layer methods; a policy that overrides one does work a replay would not repeat.
PER_LAYER_METHODS = ("_append", "rotated_keys", "on_append")


class NotGraphable(Exception):
    """A forward whose middle layers cannot be captured (the reason is the message)."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def why_not_graphed(model: torch.nn.Module, cache) -> str | None:
    """Why a chunked prefill of ``model`` into ``cache`` cannot replay graphs, or None if it can."""
    if not isinstance(cache, CompactingCache):
        return f"{type(cache).__name__} is not a compacting cache"
    overridden = [m for m in PER_LAYER_METHODS if getattr(type(cache), m) is not getattr(CompactingCache, m)]
    if overridden:
        return f"{type(cache).__name__} overrides {overridden}: per-layer work in Python that a replay would skip"
    layers = decoder_layers(model)
    if layers is None or len(layers) < 3:
        return f"{type(model).__name__} has no list of 3 or more decoder layers"
    devices = {p.device for p in layers.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"the decoder layers are on {sorted(str(d) for d in devices)}, not on one CUDA device"
    if any(m._forward_hooks or m._forward_pre_hooks for m in layers.modules()):
        return "a decoder layer has forward hooks, whose Python a replay would skip"
    if len({getattr(layer, "attention_type", None) for layer in layers}) > 1:
        return "the decoder layers have different attention types (each gets its own mask)"
    return None


def graphed_prefill(model: torch.nn.Module, cache, enabled: bool = True):
    """A context for a chunked prefill: :class:`ChunkGraphs` where :func:`why_not_graphed` allows, else none."""
    if not enabled or why_not_graphed(model, cache) is not None:
        return contextlib.nullcontext()
    return ChunkGraphs(model, cache)


def _leaves(value, tensors: list, shape: list) -> None:
    """Flatten a layer call's arguments: tensors into ``tensors``, a hashable description into ``shape``."""
    if isinstance(value, CausalBias):  # a mask given by its lengths (lacache.decode.grouped_attention): nothing to copy
        shape.append(("causal_bias", str(value.variant), value.seq_len_q, value.seq_len_kv))
    elif isinstance(value, torch.Tensor):
        tensors.append(value)
        shape.append(("tensor", tuple(value.shape), value.stride(), value.dtype, value.device))
    elif isinstance(value, (tuple, list)):
        shape.append((type(value).__name__, len(value)))
        for item in value:
            _leaves(item, tensors, shape)
    elif isinstance(value, dict):
        for key in sorted(value):
            shape.append(("key", key))
            _leaves(value[key], tensors, shape)
    elif isinstance(value, CompactingCache):
        shape.append(("cache", id(value)))
    elif value is None or isinstance(value, (bool, int, float, str)):
        shape.append(value)
    else:
        raise NotGraphable(f"a layer argument of type {type(value).__name__}")


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """The elements of ``tensor`` that have memory of their own: a broadcast dimension (stride 0, e.g.
    the mask expanded over the batch) is taken at index 0, so that a copy into it is well defined."""
    return tensor[tuple(0 if stride == 0 else slice(None) for stride in tensor.stride())]


@dataclass
class Captured:
    """One signature's graph: the tensors it reads its inputs from and the one it writes its output to."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor

    def replay(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        for new, static in zip(tensors, self.inputs):  # same shapes and strides: both are in the signature
            if new.data_ptr() != static.data_ptr():
                _stored(static).copy_(_stored(new))
        self.graph.replay()
        return self.output


class ChunkGraphs:
    """Inside ``with ChunkGraphs(model, cache):`` the model's middle decoder layers replay CUDA graphs
    for multi-token forwards whose signature repeats (captured at its second sighting; at most
    ``keep`` graphs are held, least recently used dropped). ``replays``/``captures`` count them."""

    def __init__(self, model: torch.nn.Module, cache: CompactingCache, keep: int = 2):
        reason = why_not_graphed(model, cache)
        if reason is not None:
            raise ValueError(f"cannot graph this prefill: {reason}")
        self.cache, self.keep = cache, keep
        self.layers = decoder_layers(model)
        self.eager: list = []
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.sighted: set[tuple] = set()
        self.ran: tuple | None = None  # this forward's block output and arguments, while its other layers pass it on
        self.stream: torch.cuda.Stream | None = None
        self.disabled: str | None = None
        self.replays = self.captures = 0

    def __enter__(self) -> "ChunkGraphs":
        self.eager = [layer.forward for layer in self.layers]
        for i in range(1, len(self.layers) - 1):
            self.layers[i].forward = functools.partial(self._forward, i)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers[1:-1]:
            layer.__dict__.pop("forward", None)
        self.graphs.clear()
        self.ran = None

    # ------------------------------------------------------------------ the layers' forward
    def _forward(self, i: int, hidden: torch.Tensor, *args, **kwargs):
        if i > 1:
            return self._pass_on(i, hidden, args, kwargs)
        try:
            signature, tensors = self._signature(hidden, args, kwargs)
        except NotGraphable:
            return self.eager[i](hidden, *args, **kwargs)
        if signature in self.graphs:
            self.graphs.move_to_end(signature)
            output = self.graphs[signature].replay(tensors)
            self.replays += 1
        elif signature in self.sighted:
            output = self._capture(signature, tensors, hidden, args, kwargs)
        else:
            self.sighted.add(signature)
            output = self.eager[i](hidden, *args, **kwargs)
            if not isinstance(output, torch.Tensor):  # the block hands tensors from layer to layer
                self.disabled = f"decoder layers return {type(output).__name__}, not a tensor"
            return output
        self.ran = (output, args, kwargs)
        return output

    def _pass_on(self, i: int, hidden, args, kwargs):
        """Layers 2 .. L-2: eager, or (when layer 1 ran them all) hand the block's output on."""
        if self.ran is None:
            return self.eager[i](hidden, *args, **kwargs)
        output, block_args, block_kwargs = self.ran
        same = hidden is output and len(args) == len(block_args) and all(a is b for a, b in zip(args, block_args)) \
            and kwargs.keys() == block_kwargs.keys() and all(kwargs[k] is block_kwargs[k] for k in kwargs)
        if not same:
            raise RuntimeError(f"decoder layer {i} was called with other arguments than layer 1; ChunkGraphs ran it with "
                               "layer 1's (a model whose layers take different masks must not be graphed)")
        if i == len(self.layers) - 2:
            self.ran = None
        return hidden

    def _signature(self, hidden, args, kwargs) -> tuple[tuple, list[torch.Tensor]]:
        cache = self.cache
        if self.disabled:
            raise NotGraphable(self.disabled)
        if hidden.dim() != 3 or hidden.shape[1] < 2:
            raise NotGraphable("one-token forward")  # decode steps have their own graphs (lacache.decode.fast)
        if torch.is_grad_enabled():
            raise NotGraphable("autograd is recording")  # a replay would give outputs without their graph
        if cache.layer_lengths is not None or cache.raw_keys is None or cache.pending is not None:
            raise NotGraphable("the cache's layers differ or a compaction is pending")
        tensors, shape = [], []
        _leaves((hidden, args, kwargs), tensors, shape)
        rope = [t for t in vars(cache.rope).values() if isinstance(t, torch.Tensor)]
        buffers = list(cache.slot_buffers().values()) + rope
        state = (cache.length, cache.capacity, tuple((b.data_ptr(), tuple(b.shape)) for b in buffers))
        return (tuple(shape), state), tensors

    def _run_block(self, hidden, args, kwargs) -> torch.Tensor:
        for i in range(1, len(self.layers) - 1):
            hidden = self.eager[i](hidden, *args, **kwargs)
        return hidden

    def _capture(self, signature, tensors, hidden, args, kwargs) -> torch.Tensor:
        """Capture the block on a side stream (its kernels recorded, not run; the eager forward at the
        signature's first sighting was the warm-up), this call's tensors as the graph's inputs; then
        replay it for this forward."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(hidden.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin()
                try:
                    static = self._run_block(hidden, args, kwargs)
                finally:
                    graph.capture_end()
        except Exception as error:  # an op that cannot be captured: this context stays eager, and says so
            self.disabled = f"capture failed: {error}"
            warnings.warn(f"chunked prefill without CUDA graphs: {self.disabled}", stacklevel=2)
            return self._run_block(hidden, args, kwargs)  # nothing ran while capturing
        self.graphs[signature] = captured = Captured(graph, tensors, static)
        self.captures += 1
        while len(self.graphs) > self.keep:
            self.graphs.popitem(last=False)
        self.replays += 1
        return captured.replay(tensors)
