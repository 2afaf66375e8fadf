"""LongBench v1 (THUDM/LongBench): data loading, official prompt formats and metrics.

This module reproduces the *evaluation-side* semantics of the official LongBench
v1 code (``LongBench/pred.py``, ``eval.py``, ``metrics.py`` and
``config/dataset2{prompt,maxlen}.json`` in github.com/THUDM/LongBench). It does
not drive a model; a runner is expected to

1. ``load(dataset)`` the samples,
2. ``build_prompt(dataset, sample)``, tokenize it, ``truncate_middle`` the ids to
   the model's budget (official: before the chat template is applied),
3. wrap the prompt in the model's chat template unless ``dataset in
   NO_CHAT_TEMPLATE``, generate greedily at most ``MAX_NEW_TOKENS[dataset]``
   tokens (for ``samsum`` the official code also stops at a newline token, see
   ``STOP_AT_NEWLINE``),
4. ``score`` / ``sample_score`` the decoded generations.

Metrics are re-implemented here (no dependency on the ``rouge`` or
``fuzzywuzzy`` packages) and checked against the official / lm-eval
implementations in ``tests/test_longbench_data.py``. ``rouge_score`` also
scores 0 where the official one does: the ``rouge`` package rebuilds the LCS
recursively, so a sentence pair whose LCS backtrack takes more than
``ROUGE_MAX_STEPS`` steps (roughly: sentences of ~1000 words together, e.g. a
long output without a '.', or a Chinese ``vcsum`` summary, one "sentence" for
the package) overflows Python's recursion limit and LongBench's bare
``except`` returns 0.0. Known deliberate deviations from the official code,
all of which only concern degenerate inputs:

* The official ``retrieval_score`` crashes with ``IndexError`` when a reference
  lacks ``"Paragraph N"``; here that raises a ``ValueError``.
* ``score`` does not round (official ``eval.py`` rounds to 2 decimals); pass
  ``ndigits=2`` for the official rounding.

Chinese metrics (``multifieldqa_zh``, ``dureader``, ``vcsum``) need ``jieba``
(imported lazily, on first use).
"""

from __future__ import annotations

import difflib
import io
import json
import os
import re
import string
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = [
    "HUB_REPO",
    "LONGBENCH_DATASETS",
    "ENGLISH_DATASETS",
    "CHINESE_DATASETS",
    "CATEGORIES",
    "PROMPTS",
    "MAX_NEW_TOKENS",
    "NO_CHAT_TEMPLATE",
    "FIRST_LINE_DATASETS",
    "STOP_AT_NEWLINE",
    "DATASET_METRIC",
    "METRICS",
    "load",
    "build_prompt",
    "prompt_question",
    "truncate_middle",
    "score",
    "sample_score",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "classification_score",
    "retrieval_score",
    "retrieval_zh_score",
    "count_score",
    "code_sim_score",
]

HUB_REPO = "THUDM/LongBench"

# ---------------------------------------------------------------------------
# Dataset tables (official pred.py / eval.py / config/*.json)
# ---------------------------------------------------------------------------

LONGBENCH_DATASETS: tuple[str, ...] = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "multifieldqa_zh",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "dureader",
    "gov_report",
    "qmsum",
    "multi_news",
    "vcsum",
    "trec",
    "triviaqa",
    "samsum",
    "lsht",
    "passage_count",
    "passage_retrieval_en",
    "passage_retrieval_zh",
    "lcc",
    "repobench-p",
)

CHINESE_DATASETS: tuple[str, ...] = (
    "multifieldqa_zh",
    "dureader",
    "vcsum",
    "lsht",
    "passage_retrieval_zh",
)

# 14 English + 2 code datasets.
ENGLISH_DATASETS: tuple[str, ...] = tuple(d for d in LONGBENCH_DATASETS if d not in CHINESE_DATASETS)

# Task categories of the LongBench paper (for per-category averages).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few_shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}

# Official config/dataset2prompt.json (typos such as "asconcisely" are the
# official text and are kept on purpose).
_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other "
    "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
    "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
    'answered based on the information in the article, write "unanswerable". If the question is a yes/no '
    'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)
PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
        "\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using "
        "a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question " + _QASPER_RULES
        + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULES
        + "\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
        "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："
    ),
    "hotpotqa": _QA_PASSAGES,
    "2wikimqa": _QA_PASSAGES,
    "musique": _QA_PASSAGES,
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the "
        "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
        "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
        "\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
        'number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", '
        '"Paragraph 2", etc.\n\nThe answer is: '
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
        '下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# Official config/dataset2maxlen.json.
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

# pred.py: "chat models are better off without build prompts on these tasks".
NO_CHAT_TEMPLATE: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

# eval.py cuts the prediction to its first line on these datasets before scoring.
FIRST_LINE_DATASETS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# pred.py passes eos_token_id=[eos, id of "\n"] (and min_length=context+1) on these datasets.
STOP_AT_NEWLINE: frozenset[str] = frozenset({"samsum"})


def _check_dataset(dataset: str) -> None:
    if dataset not in PROMPTS:
        raise ValueError(
            f"unknown LongBench dataset {dataset!r}; valid datasets are: {', '.join(LONGBENCH_DATASETS)}"
        )


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

_REQUIRED_FIELDS = ("input", "context", "answers")


def _parse_jsonl(lines: Iterable[str], where: str, limit: int | None) -> list[dict]:
    records: list[dict] = []
    if limit == 0:
        return records
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{lineno}: invalid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{where}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in _REQUIRED_FIELDS if k not in rec]
        if missing:
            raise ValueError(f"{where}:{lineno}: LongBench record lacks field(s) {missing}")
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    return records


def _read_zip_member(zip_path: Path, dataset: str, limit: int | None) -> list[dict]:
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        for member in (f"data/{dataset}.jsonl", f"{dataset}.jsonl"):
            if member in names:
                with zf.open(member) as raw:
                    text = io.TextIOWrapper(raw, encoding="utf-8")
                    return _parse_jsonl(text, f"{zip_path}!{member}", limit)
    raise FileNotFoundError(
        f"LongBench dataset {dataset!r}: neither data/{dataset}.jsonl nor {dataset}.jsonl is in {zip_path}"
    )


def _load_local(dataset: str, source: str | os.PathLike, limit: int | None) -> list[dict]:
    root = Path(source).expanduser()
    if root.is_file() and root.suffix == ".zip":
        return _read_zip_member(root, dataset, limit)
    candidates = [root / f"{dataset}.jsonl", root / "data" / f"{dataset}.jsonl"]
    for path in candidates:
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return _parse_jsonl(f, str(path), limit)
    raise FileNotFoundError(
        f"LongBench dataset {dataset!r}: no file {candidates[0]} (nor {candidates[1]}); "
        f"source must be a directory holding LongBench's <dataset>.jsonl files "
        f"(the unzipped official data.zip) or the data.zip itself"
    )


def _hub_unreachable(dataset: str, err: BaseException) -> RuntimeError:
    from lacache.models import first_line, hub_offline_reason

    reason = hub_offline_reason() or f"{type(err).__name__}: {first_line(err)}"
    return RuntimeError(
        f"could not load LongBench dataset {dataset!r} from the Hugging Face hub ({HUB_REPO}): the hub is "
        f"unreachable ({reason}) and the data is not cached. Download "
        f"https://huggingface.co/datasets/{HUB_REPO}/resolve/main/data.zip elsewhere, unzip it and pass the "
        f"directory holding the <dataset>.jsonl files: load({dataset!r}, source='/path/to/LongBench/data')"
    )


def _is_connection_error(err: BaseException) -> bool:
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if isinstance(e, (ConnectionError, TimeoutError)) or name in {
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
            "ConnectError",
            "ConnectTimeout",
            "ReadTimeout",
        }:
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_hub(dataset: str, limit: int | None) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a project dependency
        raise RuntimeError(
            f"loading LongBench dataset {dataset!r} from the hub needs the `datasets` package; "
            f"or pass source='/path/to/LongBench/data'"
        ) from e

    from lacache.models import hub_offline_reason

    hub_offline_reason()  # offline mode at once where the hub does not answer: no retries
    kwargs = {}
    if int(datasets.__version__.split(".")[0]) < 4:
        kwargs["trust_remote_code"] = True  # THUDM/LongBench is a script-based dataset
    try:
        ds = datasets.load_dataset(HUB_REPO, dataset, split="test", **kwargs)
    except Exception as e:
        if _is_connection_error(e):
            raise _hub_unreachable(dataset, e) from e
        if "scripts are no longer supported" not in str(e):
            raise RuntimeError(
                f"could not load LongBench dataset {dataset!r} from the Hugging Face hub ({HUB_REPO}): "
                f"{type(e).__name__}: {e}. Pass a local directory instead: load({dataset!r}, source=...)"
            ) from e
        # datasets>=4 refuses THUDM/LongBench's loading script: fetch the same
        # data.zip the script would download and read the JSONL from it.
        return _load_hub_zip(dataset, limit)
    n = len(ds) if limit is None else min(limit, len(ds))
    return [dict(ds[i]) for i in range(n)]


def _load_hub_zip(dataset: str, limit: int | None) -> list[dict]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=HUB_REPO, filename="data.zip", repo_type="dataset")
    except Exception as e:
        if _is_connection_error(e):
            raise _hub_unreachable(dataset, e) from e
        raise RuntimeError(
            f"could not download data.zip of {HUB_REPO} for LongBench dataset {dataset!r}: "
            f"{type(e).__name__}: {e}. Pass a local directory instead: load({dataset!r}, source=...)"
        ) from e
    return _read_zip_member(Path(path), dataset, limit)


def load(dataset: str, source: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """Load the test split of one LongBench v1 dataset as a list of dicts.

    Records carry LongBench's fields: ``input``, ``context``, ``answers`` (list of
    str), ``length``, ``dataset``, ``language``, ``all_classes`` (list or None),
    ``_id``.

    ``source``: ``None`` or ``"hub"`` loads ``THUDM/LongBench`` from the Hugging
    Face hub (with ``datasets>=4``, which no longer runs the repo's loading
    script, the repo's ``data.zip`` is downloaded and read instead); otherwise a
    local directory holding ``<dataset>.jsonl`` (or ``data/<dataset>.jsonl``, as
    unzipped from the official data.zip), or the path of data.zip itself.
    ``limit`` keeps only the first ``limit`` records.
    """
    _check_dataset(dataset)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if source is None or (isinstance(source, str) and source == "hub"):
        return _load_hub(dataset, limit)
    return _load_local(dataset, source, limit)


# ---------------------------------------------------------------------------
# Prompting
# ---------------------------------------------------------------------------


def _prompt_fields(dataset: str, sample: dict) -> dict:
    _check_dataset(dataset)
    template = PROMPTS[dataset]
    fields = {}
    for key in ("context", "input"):
        if "{" + key + "}" in template:
            if key not in sample:
                raise KeyError(f"LongBench {dataset!r} prompt needs field {key!r}, which the sample lacks")
            fields[key] = sample[key]
    return fields


def build_prompt(dataset: str, sample: dict) -> str:
    """Official prompt (``dataset2prompt[dataset].format(**sample)``), before any chat template."""
    fields = _prompt_fields(dataset, sample)  # checks the dataset name first
    return PROMPTS[dataset].format(**fields)


def prompt_question(dataset: str, sample: dict) -> str:
    """The end of :func:`build_prompt` after the context: what every official prompt puts after
    ``{context}`` (instructions repeated, the question ``input`` where there is one, ``Answer:``).
    ``compress=context`` keeps this part uncompressed."""
    fields = _prompt_fields(dataset, sample)  # checks the dataset name first
    return PROMPTS[dataset].split("{context}")[-1].format(**fields)


def truncate_middle(token_ids: Sequence[int], max_length: int) -> list[int]:
    """Official middle truncation of a tokenized prompt.

    If the prompt is longer than ``max_length`` tokens, keep its first
    ``max_length // 2`` and last ``max_length // 2`` tokens (so an odd
    ``max_length`` yields ``max_length - 1`` tokens, as in pred.py); otherwise
    return it unchanged. (pred.py then decodes both halves and re-tokenizes the
    joined text; that step is left to the caller.)
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids = list(token_ids)
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    if half == 0:
        return []
    return ids[:half] + ids[len(ids) - half :]


# ---------------------------------------------------------------------------
# Metrics (official LongBench metrics.py semantics, re-implemented)
# ---------------------------------------------------------------------------

_EN_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
    + "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DIGITS = re.compile(r"\d+")

_jieba = None


def _jieba_cut(text: str) -> list[str]:
    global _jieba
    if _jieba is None:
        try:
            import jieba
        except ImportError as e:
            raise ImportError(
                "LongBench's Chinese metrics (multifieldqa_zh, dureader, vcsum) need jieba: pip install 'jieba>=0.42'"
            ) from e
        import logging

        jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict ..." on stderr
        _jieba = jieba
    return list(_jieba.cut(text, cut_all=False))


def normalize_answer(s: str) -> str:
    """SQuAD-style English normalization: lowercase, drop punctuation and articles, squeeze spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalization: lowercase, drop ASCII+CJK punctuation, drop all whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _ZH_PUNCT)
    return "".join(s.split())


def _token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    return [t for t in (normalize_zh_answer(tok) for tok in _jieba_cut(text)) if t]


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _token_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


def _rouge_sentences(text: str) -> list[list[str]]:
    """Sentence/word split of the ``rouge`` package: split on '.', keep non-empty
    pieces, squeeze whitespace, then split words on a single space (an all-blank
    piece therefore becomes the one word '')."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


# Most backtracking steps the ``rouge`` package's recursive ``_recon`` survives when LongBench's
# eval.py calls it (Python's 1000-frame limit less eval.py's and the package's frames above it;
# measured with Python 3.11, tests/test_longbench_data.py checks it against the package).
ROUGE_MAX_STEPS = 990


def _lcs_words(ref: Sequence[str], hyp: Sequence[str]) -> tuple[set[str], int]:
    """Words of one longest common subsequence of ``ref`` and ``hyp``, picked with
    the same backtracking tie-break as the ``rouge`` package (iteratively), and
    the number of steps that backtrack takes (the package's recursion depth)."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        word = ref[i - 1]
        prev, row = table[i - 1], table[i]
        for j in range(1, m + 1):
            if word == hyp[j - 1]:
                row[j] = prev[j - 1] + 1
            else:
                up, left = prev[j], row[j - 1]
                row[j] = up if up > left else left
    words: set[str] = set()
    i, j, steps = n, m, 0
    while i > 0 and j > 0:
        steps += 1
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i -= 1
            j -= 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words, steps


def _rouge_l_f(hypothesis: str, reference: str) -> float:
    """ROUGE-L F of ``rouge==1.0.1`` (``Rouge().get_scores(...)["rouge-l"]["f"]``):
    summary-level union-LCS over '.'-separated sentences, counted on *sets* of
    words, F = 2PR/(P+R+1e-8). Inputs with no sentence, or with a sentence pair
    too long for the package's recursion, score 0 (the package raises, LongBench
    catches)."""
    hyp = _rouge_sentences(hypothesis)
    ref = _rouge_sentences(reference)
    if not hyp or not ref:
        return 0.0
    hyp_vocab = {w for s in hyp for w in s}
    ref_vocab = {w for s in ref for w in s}
    hyp_sets = [set(s) for s in hyp]
    union: set[str] = set()
    for r in ref:
        r_set = set(r)
        for h, h_set in zip(hyp, hyp_sets):
            deep = len(r) + len(h) > ROUGE_MAX_STEPS  # a backtrack takes at most len(r) + len(h) steps
            if not deep and (r_set.isdisjoint(h_set) or (r_set & h_set) <= union):
                continue  # the LCS of this pair can add no new word to the union
            words, steps = _lcs_words(r, h)
            if steps > ROUGE_MAX_STEPS:
                return 0.0
            union |= words
    lcs = len(union)
    recall = lcs / len(ref_vocab)
    precision = lcs / len(hyp_vocab)
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _rouge_l_f(prediction, ground_truth)


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _rouge_l_f(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    all_classes = kwargs.get("all_classes")
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the dataset's list of class names)")
    matched = [c for c in all_classes if c in prediction]
    # Drop matched class names that are strict substrings of the ground truth.
    # The official code does `for t in lst: ... lst.remove(t)`, which skips the
    # element after each removal; the index walk below keeps that behaviour.
    i = 0
    while i < len(matched):
        term = matched[i]
        if term in ground_truth and term != ground_truth:
            matched.remove(term)
        i += 1
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = _DIGITS.findall(prediction)
    if not numbers:
        return 0.0
    return float(sum(1 for x in numbers if x == target) / len(numbers))


def _paragraph_id(ground_truth: str, pattern: str) -> str:
    m = re.search(pattern, ground_truth)
    if m is None:
        raise ValueError(f"retrieval reference {ground_truth!r} does not match {pattern!r}")
    return m.group(1)


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _fraction_equal(prediction, _paragraph_id(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _fraction_equal(prediction, _paragraph_id(ground_truth, r"段落(\d+)"))


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _fraction_equal(prediction, str(ground_truth))


def _fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` with its pure-Python backend (the official
    requirements install fuzzywuzzy without python-Levenshtein)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Similarity of the first generated line that has no '`', '#' or '//'
    (after stripping leading newlines; a blank line counts) to the reference line."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return _fuzz_ratio(line, ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": qa_f1_score,
    "qa_f1_zh_score": qa_f1_zh_score,
    "rouge_score": rouge_score,
    "rouge_zh_score": rouge_zh_score,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "retrieval_zh_score": retrieval_zh_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
}

# Official eval.py dataset2metric.
DATASET_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1_score",
    "qasper": "qa_f1_score",
    "multifieldqa_en": "qa_f1_score",
    "multifieldqa_zh": "qa_f1_zh_score",
    "hotpotqa": "qa_f1_score",
    "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score",
    "dureader": "rouge_zh_score",
    "gov_report": "rouge_score",
    "qmsum": "rouge_score",
    "multi_news": "rouge_score",
    "vcsum": "rouge_zh_score",
    "trec": "classification_score",
    "triviaqa": "qa_f1_score",
    "samsum": "rouge_score",
    "lsht": "classification_score",
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
    "passage_retrieval_zh": "retrieval_zh_score",
    "lcc": "code_sim_score",
    "repobench-p": "code_sim_score",
}


def sample_score(
    dataset: str, prediction: str, answers: Sequence[str] | str, all_classes: Sequence[str] | None = None
) -> float:
    """Score of one prediction in [0, 1]: max of the dataset's metric over the
    reference answers (0 if there are none), after cutting the prediction to its
    first line on ``FIRST_LINE_DATASETS``. This is one term of eval.py's mean."""
    _check_dataset(dataset)
    metric = METRICS[DATASET_METRIC[dataset]]
    if isinstance(answers, str):
        answers = [answers]
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes))
    return best


def _per_sample_classes(all_classes, n: int) -> list:
    if all_classes is None:
        return [None] * n
    if any(isinstance(c, str) for c in all_classes):
        return [all_classes] * n  # one class list shared by every sample (eval.py)
    if len(all_classes) != n:
        raise ValueError(
            f"all_classes must be one list of class names or one list (or None) per prediction; "
            f"got {len(all_classes)} entries for {n} predictions"
        )
    return list(all_classes)


def score(
    dataset: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    all_classes: Sequence | None = None,
    *,
    ndigits: int | None = None,
) -> float:
    """Official eval.py ``scorer``: mean of ``sample_score`` over samples, x100.

    ``all_classes`` is the dataset's class list (trec, lsht), or one list per
    sample, or None. Not rounded unless ``ndigits`` is given (eval.py uses 2).
    """
    _check_dataset(dataset)
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("score() needs at least one prediction")
    classes = _per_sample_classes(all_classes, len(predictions))
    total = 0.0
    for pred, gold, cls in zip(predictions, answers, classes):
        total += sample_score(dataset, pred, gold, cls)
    result = 100 * total / len(predictions)
    return round(result, ndigits) if ndigits is not None else result
