"""An independent float64 reference of a Llama-family decoder under a token-level KV-cache policy.

Test oracle only. It is written from the model's definition (embedding, RMSNorm, RoPE with the
rotate-half convention, grouped-query attention, SwiGLU MLP, output head) and reads nothing from
the repository's caches: each policy is a *rule* over token positions, written from its paper or
reference code, applied after every forward, and positions follow the policy's own convention:

- ``shift``: a held key's rotary position is its slot index in the (compacted) cache and a query's
  is its own slot index (StreamingLLM, LaCache, H2O's streaming code);
- ``original``: every key and query keeps its position in the token stream (SnapKV, TOVA, PyramidKV).

Keys are kept un-rotated (the projection's output) and rotated afresh at every forward, so no
rounding accumulates; everything is float64.

A rule is ``rule(layer, kept, weights, seen, state) -> kept'``: ``kept`` ``[kv_heads, n]`` are the
original positions held by ``layer`` after the forward's tokens were appended (each head may hold
its own), ``weights`` ``[q_heads, T, n]`` the attention weights of the forward's ``T`` queries over
them, ``seen`` the tokens seen so far, ``state`` a dict the rule may keep across forwards. A rule
with ``all_layers = True`` is called once per forward with lists over the layers instead (LaCache
compacts every layer together). Rules run after the forward: a layer's kept set only matters to its
next forward, so this equals evicting right after each layer's attention (H2O's reference).
"""

from __future__ import annotations

import torch

DOUBLE = torch.float64


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    return float(theta)


class Oracle:
    """Runs forwards of ``model``'s weights in float64 with per-layer, per-KV-head kept token lists."""

    def __init__(self, model, rule, position_mode: str = "shift", query_shift: int = 0):
        self.rule, self.position_mode = rule, position_mode
        self.query_shift = query_shift  # a deliberate position error, to show a test can see one
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.inv_freq = 1.0 / _rope_theta(config) ** (torch.arange(0, self.dim, 2, dtype=DOUBLE) / self.dim)
        base = model.model
        w = lambda t: t.detach().to(DOUBLE).clone()  # noqa: E731
        self.embed, self.final_norm, self.head = w(base.embed_tokens.weight), w(base.norm.weight), w(model.lm_head.weight)
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "norm1": w(layer.input_layernorm.weight), "norm2": w(layer.post_attention_layernorm.weight),
                **{name: w(getattr(attn, name).weight) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{f"{name}_bias": w(getattr(attn, name).bias) for name in ("q_proj", "k_proj", "v_proj")
                   if getattr(attn, name).bias is not None},
                **{name: w(getattr(mlp, name).weight) for name in ("gate_proj", "up_proj", "down_proj")},
            })
        self.raw_keys = [{} for _ in self.layers]  # per layer: original position -> [kv_heads, dim] un-rotated
        self.values = [{} for _ in self.layers]
        self.kept = [torch.zeros(self.kv_heads, 0, dtype=torch.long) for _ in self.layers]
        self.seen = 0
        self.state: dict = {}

    # ------------------------------------------------------------------ pieces of the model
    def _norm(self, x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)

    def _rotate(self, x, positions):
        """``x`` ``[..., m, dim]`` rotated to ``positions`` ``[m]`` or ``[..., m]`` (rotate-half convention)."""
        angles = positions.to(DOUBLE)[..., None] * self.inv_freq
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        half = self.dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def _project(self, p, name, x):
        out = x @ p[name].T
        return out + p[f"{name}_bias"] if f"{name}_bias" in p else out

    # ------------------------------------------------------------------ one forward
    def forward(self, ids) -> torch.Tensor:
        """Logits ``[T, vocab]`` (float64) of the tokens ``ids`` fed as one forward."""
        ids = torch.as_tensor(ids).reshape(-1)
        T, start = ids.shape[0], self.seen
        new = torch.arange(start, start + T)
        h = self.embed[ids]
        group = self.heads // self.kv_heads
        kept_all, weights_all = [], []
        for index, p in enumerate(self.layers):
            x = self._norm(h, p["norm1"])
            q = self._project(p, "q_proj", x).view(T, self.heads, self.dim).transpose(0, 1)  # [Hq, T, D]
            k = self._project(p, "k_proj", x).view(T, self.kv_heads, self.dim)
            v = self._project(p, "v_proj", x).view(T, self.kv_heads, self.dim)
            for t in range(T):
                self.raw_keys[index][start + t], self.values[index][start + t] = k[t], v[t]
            kept = torch.cat([self.kept[index], new.expand(self.kv_heads, T)], dim=1)  # [Hkv, n]
            n = kept.shape[1]
            weights = torch.empty(self.heads, T, n, dtype=DOUBLE)
            out = torch.empty(self.heads, T, self.dim, dtype=DOUBLE)
            for g in range(self.kv_heads):
                keys = torch.stack([self.raw_keys[index][int(pos)][g] for pos in kept[g]])  # [n, D]
                vals = torch.stack([self.values[index][int(pos)][g] for pos in kept[g]])
                if self.position_mode == "shift":
                    key_pos, query_pos = torch.arange(n), torch.arange(n - T, n)
                else:
                    key_pos, query_pos = kept[g], new
                keys = self._rotate(keys, key_pos)
                heads = slice(g * group, (g + 1) * group)
                queries = self._rotate(q[heads], query_pos + self.query_shift)  # [group, T, D]
                logits = queries @ keys.T / self.dim**0.5
                visible = kept[g][None, :] <= new[:, None]  # causal, by original position
                logits = logits.masked_fill(~visible, float("-inf"))
                weights[heads] = torch.softmax(logits, dim=-1)
                out[heads] = weights[heads] @ vals
            h = h + out.transpose(0, 1).reshape(T, -1) @ p["o_proj"].T
            x = self._norm(h, p["norm2"])
            gate = x @ p["gate_proj"].T
            h = h + (gate * torch.sigmoid(gate) * (x @ p["up_proj"].T)) @ p["down_proj"].T
            kept_all.append(kept)
            weights_all.append(weights)
        self.seen += T
        if getattr(self.rule, "all_layers", False):
            self.kept = self.rule(kept_all, weights_all, self.seen, self.state)
        else:
            self.kept = [self.rule(i, kept_all[i], weights_all[i], self.seen, self.state) for i in range(len(self.layers))]
        return self._norm(h, self.final_norm) @ self.head.T


class GemmaOracle(Oracle):
    """Gemma 3's forward (a hybrid of sliding-window and global layers) in float64, written from its
    definition: embeddings times sqrt(hidden size); RMSNorms that scale by ``1 + w``, before and after
    attention and before and after the MLP; q and k RMS-normalised per head before the rotary; a
    rotary base per layer type (``rope_parameters``); attention logits scaled by
    ``query_pre_attn_scalar ** -0.5``, never soft-capped (Gemma 3 replaced Gemma 2's attention
    soft-capping with the q/k norms: the model ignores ``attn_logit_softcapping``); a gelu-tanh gated
    MLP; final logits soft-capped where ``final_logit_softcapping`` is set.

    Sliding-window layers keep what the model keeps: each query attends to the keys ``j`` with
    ``i - window < j <= i``, at their true distances (rotated at original positions; relative
    rotation makes the query's frame irrelevant there). The policy's rule runs over the global layers
    only (``layer`` counts global layers; an ``all_layers`` rule gets lists over them), with its own
    position convention there.

    Deliberate errors, to show the tests can see them: ``window`` (other than the model's),
    ``one_base`` (the global layers' rotary base in the sliding layers too), ``rule_everywhere`` (the
    policy's rule also cuts the sliding layers' keys), ``query_shift`` (the global layers' queries).
    """

    def __init__(self, model, rule, position_mode: str = "shift", query_shift: int = 0, window: int | None = None,
                 one_base: bool = False, rule_everywhere: bool = False):
        config = model.config
        self.rule, self.position_mode, self.query_shift = rule, position_mode, query_shift
        self.heads, self.kv_heads, self.dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.eps = config.rms_norm_eps
        self.window = config.sliding_window if window is None else window
        self.sliding = [kind == "sliding_attention" for kind in config.layer_types]
        self.rule_everywhere = rule_everywhere
        theta = {kind: float(config.rope_parameters[kind]["rope_theta"]) for kind in ("sliding_attention", "full_attention")}
        if one_base:
            theta["sliding_attention"] = theta["full_attention"]
        steps = torch.arange(0, self.dim, 2, dtype=DOUBLE) / self.dim
        self.inv_freqs = {kind: 1.0 / base**steps for kind, base in theta.items()}
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.final_softcap = config.final_logit_softcapping
        self.embed_scale = config.hidden_size ** 0.5
        base = model.model
        w = lambda t: t.detach().to(DOUBLE).clone()  # noqa: E731
        self.embed, self.final_norm, self.head = w(base.embed_tokens.weight), w(base.norm.weight), w(model.lm_head.weight)
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                **{name: w(getattr(layer, name).weight) for name in norms},
                "q_norm": w(attn.q_norm.weight), "k_norm": w(attn.k_norm.weight),
                **{name: w(getattr(attn, name).weight) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{name: w(getattr(mlp, name).weight) for name in ("gate_proj", "up_proj", "down_proj")},
            })
        self.raw_keys = [torch.zeros(0, self.kv_heads, self.dim, dtype=DOUBLE) for _ in self.layers]  # by position
        self.values = [torch.zeros(0, self.kv_heads, self.dim, dtype=DOUBLE) for _ in self.layers]
        self.kept = [torch.zeros(self.kv_heads, 0, dtype=torch.long) for _ in self.layers]
        self.seen = 0
        self.state: dict = {}

    def _norm(self, x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * (1.0 + weight)

    def _rotate_kind(self, x, positions, kind):
        angles = positions.to(DOUBLE)[..., None] * self.inv_freqs[kind]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        half = self.dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    @staticmethod
    def _gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))

    def forward(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids).reshape(-1)
        T, start = ids.shape[0], self.seen
        new = torch.arange(start, start + T)
        h = self.embed[ids] * self.embed_scale
        group = self.heads // self.kv_heads
        kept_all, weights_all = {}, {}
        for index, p in enumerate(self.layers):
            sliding = self.sliding[index]
            kind = "sliding_attention" if sliding else "full_attention"
            x = self._norm(h, p["input_layernorm"])
            q = self._norm((x @ p["q_proj"].T).view(T, self.heads, self.dim), p["q_norm"]).transpose(0, 1)  # [Hq, T, D]
            k = self._norm((x @ p["k_proj"].T).view(T, self.kv_heads, self.dim), p["k_norm"])
            v = (x @ p["v_proj"].T).view(T, self.kv_heads, self.dim)
            self.raw_keys[index] = torch.cat([self.raw_keys[index], k])  # row p: the token at position p
            self.values[index] = torch.cat([self.values[index], v])
            kept = torch.cat([self.kept[index], new.expand(self.kv_heads, T)], dim=1)  # [Hkv, n]
            n = kept.shape[1]
            weights = torch.empty(self.heads, T, n, dtype=DOUBLE)
            out = torch.empty(self.heads, T, self.dim, dtype=DOUBLE)
            for g in range(self.kv_heads):
                keys, vals = self.raw_keys[index][kept[g], g], self.values[index][kept[g], g]  # [n, D]
                if sliding:
                    key_pos, query_pos = kept[g], new
                elif self.position_mode == "shift":
                    key_pos, query_pos = torch.arange(n), torch.arange(n - T, n) + self.query_shift
                else:
                    key_pos, query_pos = kept[g], new + self.query_shift
                heads = slice(g * group, (g + 1) * group)
                logits = self._rotate_kind(q[heads], query_pos, kind) @ self._rotate_kind(keys, key_pos, kind).T * self.scale
                visible = kept[g][None, :] <= new[:, None]  # causal, by original position
                if sliding:
                    visible &= kept[g][None, :] > new[:, None] - self.window
                weights[heads] = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
                out[heads] = weights[heads] @ vals
            h = h + self._norm(out.transpose(0, 1).reshape(T, -1) @ p["o_proj"].T, p["post_attention_layernorm"])
            x = self._norm(h, p["pre_feedforward_layernorm"])
            mlp = (self._gelu_tanh(x @ p["gate_proj"].T) * (x @ p["up_proj"].T)) @ p["down_proj"].T
            h = h + self._norm(mlp, p["post_feedforward_layernorm"])
            kept_all[index], weights_all[index] = kept, weights
        self.seen += T
        for index, sliding in enumerate(self.sliding):  # the model's own window: the newest window - 1 tokens
            if sliding:
                kept = kept_all[index]
                self.kept[index] = kept[:, kept[0] > self.seen - self.window]
        ruled = [i for i, sliding in enumerate(self.sliding) if not sliding or self.rule_everywhere]
        if getattr(self.rule, "all_layers", False):
            globals_ = [i for i in ruled if not self.sliding[i]]
            out = self.rule([kept_all[i] for i in globals_], [weights_all[i] for i in globals_], self.seen, self.state)
            for i, kept in zip(globals_, out):
                self.kept[i] = kept
            if self.rule_everywhere:  # the first global layer's kept set, cut to each sliding layer
                for i in ruled:
                    if self.sliding[i]:
                        allowed = set(out[0][0].tolist())
                        self.kept[i] = self.kept[i][:, [p in allowed for p in self.kept[i][0].tolist()]]
        else:
            for order, i in enumerate(ruled):
                kept = self.rule(order, kept_all[i], weights_all[i], self.seen, self.state)
                self.kept[i] = kept if not self.sliding[i] else kept[:, kept[0] > self.seen - self.window]
        logits = self._norm(h, self.final_norm) @ self.head.T
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


# ---------------------------------------------------------------------------------------------- rules
def keep_all(layer, kept, weights, seen, state):
    """The full cache."""
    return kept


def sink_window(budget: int, sink: int):
    """StreamingLLM (Xiao et al. 2024): the first ``sink`` tokens and the most recent ``budget - sink``."""

    def rule(layer, kept, weights, seen, state):
        if kept.shape[1] <= budget:
            return kept
        return torch.cat([kept[:, :sink], kept[:, kept.shape[1] - (budget - sink):]], dim=1)

    return rule


def spec_ladder(layers: int, span: int, overlap: int, budget: int, sink: int):
    """LaCache through the literal transcription of the reference's ``compact()`` (tests/spec_reference.py),
    once per forward over every layer's list, as the reference compacts all layers together."""
    from spec_reference import SpecLaCache

    spec = SpecLaCache(layers, span, overlap, budget, sink)

    def rule(kept, weights, seen, state):
        cursor = spec.cursor
        lists = spec.compact([k[0].tolist() for k in kept])
        state["wraps"] = state.get("wraps", 0) + (spec.cursor < cursor)  # a new sweep started
        return [torch.tensor(rows, dtype=torch.long).expand(k.shape[0], -1) for rows, k in zip(lists, kept)]

    rule.all_layers = True
    return rule


def run(oracle: Oracle, ids, chunks) -> torch.Tensor:
    """Feed ``ids`` in forwards of the given sizes; the logits of every position, ``[T, vocab]``."""
    out, start = [], 0
    for size in chunks:
        out.append(oracle.forward(ids[start : start + size]))
        start += size
    return torch.cat(out)
