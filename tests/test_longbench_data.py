"""Tests for tasks/longbench_data.py (LongBench v1 loading, prompts, metrics).

Offline only: the fixture under tests/fixtures/longbench/ is made-up data in
LongBench's JSONL layout. Where lm-eval (with its `longbench` extra: jieba,
fuzzywuzzy, rouge) is installed, our metrics are checked against lm-eval's
LongBench metric functions, which carry the official LongBench metrics.py.
"""

from __future__ import annotations

import difflib
import importlib
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from lacache.tasks import longbench_data as lb

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"
FIXTURE_DATASETS = sorted(p.stem for p in FIXTURE.glob("*.jsonl"))
ZH_METRICS = {"qa_f1_zh_score", "rouge_zh_score"}

# Made-up model outputs for the fixture records (in file order).
PREDICTIONS: dict[str, list[str]] = {
    "hotpotqa": ["Port Avery", "The novelist Mara Quill.", "No"],
    "multifieldqa_zh": ["一九二零年", "总部在杭州。"],
    "dureader": ["草莓不要清洗，直接放进冰箱冷藏。"],
    "gov_report": [
        "The agency found that bridges were overdue for inspection. It will hire inspectors.",
        "Grants for broadband rose in 2021. Gaps remain.",
    ],
    "samsum": ["Tom and Anna meet at six at the cafe.\nDialogue: Tom: ok"],
    "triviaqa": ["Harlow and Fenwick\nPassage: more"],
    "trec": ["City", "Date or Other entity"],
    "lsht": ["体育"],
    "passage_count": ["2", "There are 3 unique paragraphs out of 3"],
    "passage_retrieval_en": ["Paragraph 2", "Paragraph 1 or Paragraph 3"],
    "passage_retrieval_zh": ["段落2"],
    "lcc": ["    return math.pi * radius ** 2\n\ndef f():", "```java\n        count++;\n```"],
    "repobench-p": ["        result = add(result, item)"],
}

# Hand-computed per-sample scores for PREDICTIONS (derivations inline).
EXPECTED_SAMPLE: dict[str, list[float]] = {
    # exact; "novelist mara quill" vs "mara quill": P=2/3 R=1 -> 0.8; "no" vs "yes": 0
    "hotpotqa": [1.0, 0.8, 0.0],
    # jieba: 一九二 | 零年 both sides -> 1; [总部, 在, 杭州] vs [杭州] -> P=1/3 R=1 -> 0.5
    "multifieldqa_zh": [1.0, 0.5],
    # one "sentence" (no '.'); 9 unique hyp words all in the LCS; ref has 13 unique words
    # (the comma occurs twice): F = 2*(1*9/13)/(1+9/13+1e-8)
    "dureader": [2 * (9 / 13) / (1 + 9 / 13 + 1e-8)],
    "gov_report": [None, None],  # checked against lm-eval / the rouge package below
    # first line only, then ROUGE-L vs the reference (checked against lm-eval below)
    "samsum": [None],
    # first line "Harlow and Fenwick" equals the second answer
    "triviaqa": [1.0],
    # matched ["Other entity", "Date"]: Date is the gold -> 1/2
    "trec": [1.0, 0.5],
    "lsht": [1.0],
    # numbers [2] -> 1; numbers [3, 3] -> 1
    "passage_count": [1.0, 1.0],
    # numbers [1, 3], gold 3 -> 1/2
    "passage_retrieval_en": [1.0, 0.5],
    "passage_retrieval_zh": [1.0],
    # first line equals the reference; "```java" skipped, then "        count++;" vs "        count += 1;":
    # difflib matches "        count" (13) + "+" (1) + ";" (1) -> 2*15/(16+19) = 0.857 -> 86
    "lcc": [1.0, 0.86],
    "repobench-p": [1.0],
}


def _needs_jieba(dataset: str) -> bool:
    return lb.DATASET_METRIC[dataset] in ZH_METRICS


def _has_jieba() -> bool:
    try:
        import jieba  # noqa: F401
    except ImportError:
        return False
    return True


def _skip_without_jieba(dataset: str) -> None:
    if _needs_jieba(dataset):
        pytest.importorskip("jieba")


@pytest.fixture(scope="module")
def lm_metrics():
    """lm-eval's LongBench metrics module, or skip."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("lm_eval.tasks.longbench.metrics")
    except ImportError as e:  # lm-eval or its longbench extra (jieba, fuzzywuzzy, rouge) missing
        pytest.skip(f"lm-eval LongBench metrics unavailable: {e}")


def _fuzzywuzzy_is_pure_python(lm_metrics) -> bool:
    # The official requirements install fuzzywuzzy without python-Levenshtein
    # (difflib backend); with python-Levenshtein, fuzz.ratio is indel-based.
    return lm_metrics.fuzz.SequenceMatcher is difflib.SequenceMatcher


# --------------------------------------------------------------------------- tables


def test_dataset_tables():
    assert len(lb.LONGBENCH_DATASETS) == 21 == len(set(lb.LONGBENCH_DATASETS))
    assert len(lb.ENGLISH_DATASETS) == 16
    assert set(lb.ENGLISH_DATASETS) | set(lb.CHINESE_DATASETS) == set(lb.LONGBENCH_DATASETS)
    for table in (lb.PROMPTS, lb.MAX_NEW_TOKENS, lb.DATASET_METRIC):
        assert set(table) == set(lb.LONGBENCH_DATASETS)
    assert lb.NO_CHAT_TEMPLATE == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert sorted(d for ds in lb.CATEGORIES.values() for d in ds) == sorted(lb.LONGBENCH_DATASETS)
    assert lb.MAX_NEW_TOKENS["gov_report"] == 512 and lb.MAX_NEW_TOKENS["hotpotqa"] == 32
    for ds, template in lb.PROMPTS.items():
        assert "{context}" in template, ds


def test_prompts_match_lm_eval_task_configs():
    """lm-eval's doc_to_text equals the official prompt, except that its YAML lost
    some whitespace on 6 datasets (we keep the official dataset2prompt.json text)."""
    yaml = pytest.importorskip("yaml")
    lm_eval = pytest.importorskip("lm_eval")
    task_dir = Path(lm_eval.__file__).parent / "tasks" / "longbench"
    if not task_dir.is_dir():
        pytest.skip("lm-eval has no LongBench tasks")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    whitespace_only = {"triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"}
    for ds in lb.LONGBENCH_DATASETS:
        cfg = yaml.load((task_dir / f"{ds}.yaml").read_text(encoding="utf-8"), Loader=Loader)
        theirs = cfg["doc_to_text"].replace("{{context}}", "{context}").replace("{{question}}", "{input}")
        assert cfg["generation_kwargs"]["max_gen_toks"] == lb.MAX_NEW_TOKENS[ds], ds
        if ds in whitespace_only:
            assert theirs.split() == lb.PROMPTS[ds].split(), ds
        else:
            assert theirs == lb.PROMPTS[ds], ds


# --------------------------------------------------------------------------- loading


def test_fixture_covers_every_metric_family():
    assert {lb.DATASET_METRIC[d] for d in FIXTURE_DATASETS} == set(lb.METRICS)
    assert set(PREDICTIONS) == set(FIXTURE_DATASETS)


@pytest.mark.parametrize("dataset", FIXTURE_DATASETS)
def test_load_fixture(dataset):
    records = lb.load(dataset, source=str(FIXTURE))
    assert len(records) == len(PREDICTIONS[dataset]) >= 1
    for r in records:
        assert set(r) >= {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
        assert r["dataset"] == dataset
        assert isinstance(r["answers"], list) and r["answers"]
    if dataset in ("trec", "lsht"):
        assert all(isinstance(r["all_classes"], list) for r in records)
    assert lb.load(dataset, source=FIXTURE, limit=1) == records[:1]  # PathLike works too
    assert lb.load(dataset, source=FIXTURE, limit=0) == []


def test_load_data_zip_layouts(tmp_path):
    # unzipped official data.zip: <dir>/data/<dataset>.jsonl
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "trec.jsonl").write_bytes((FIXTURE / "trec.jsonl").read_bytes())
    expected = lb.load("trec", source=FIXTURE)
    assert lb.load("trec", source=tmp_path) == expected
    # the zip itself
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(FIXTURE / "trec.jsonl", "data/trec.jsonl")
    assert lb.load("trec", source=zpath) == expected
    with pytest.raises(FileNotFoundError, match="lcc"):
        lb.load("lcc", source=zpath)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        lb.load("qasper", source=tmp_path)
    msg = str(info.value)
    assert "qasper" in msg and str(tmp_path / "qasper.jsonl") in msg


def test_load_bad_records(tmp_path):
    (tmp_path / "qasper.jsonl").write_text('{"input": "q", "context": "c"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"qasper.jsonl:1.*answers"):
        lb.load("qasper", source=tmp_path)
    (tmp_path / "qmsum.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"qmsum.jsonl:1"):
        lb.load("qmsum", source=tmp_path)


def test_unknown_dataset():
    for call in (
        lambda: lb.load("nq", source=FIXTURE),
        lambda: lb.build_prompt("hotpotqa_e", {"context": "", "input": ""}),
        lambda: lb.score("squad", ["x"], [["x"]], None),
        lambda: lb.sample_score("squad", "x", ["x"], None),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert "narrativeqa" in str(info.value) and "repobench-p" in str(info.value)
    with pytest.raises(ValueError):
        lb.load("hotpotqa", source=FIXTURE, limit=-1)


def test_hub_offline_raises_clear_error(tmp_path):
    """Real datasets/huggingface_hub in offline mode, in a fresh interpreter."""
    pytest.importorskip("datasets")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from lacache.tasks import longbench_data as lb\n"
        "try:\n    lb.load('hotpotqa')\nexcept RuntimeError as e:\n    print('RUNTIMEERROR', e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert "RUNTIMEERROR" in out.stdout, out.stdout + out.stderr
    assert "'hotpotqa'" in out.stdout and "unreachable" in out.stdout and "source=" in out.stdout


def test_hub_paths_mocked(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    records = lb.load("hotpotqa", source=FIXTURE)
    calls = []

    # 1. load_dataset works (datasets<4, or a hub copy without script)
    def fake_load_dataset(path, name, split, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = lb.load("hotpotqa", limit=2)
    assert calls == [("THUDM/LongBench", "hotpotqa", "test")]
    assert [r["_id"] for r in got] == [r["_id"] for r in records[:2]]
    assert got[0]["answers"] == records[0]["answers"]
    assert lb.load("hotpotqa", source="hub") == [dict(r) for r in datasets.Dataset.from_list(records)]

    # 2. datasets>=4 refuses the loading script -> data.zip via huggingface_hub
    def script_refused(*a, **kw):
        raise RuntimeError("Dataset scripts are no longer supported, but found LongBench.py")

    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(FIXTURE / "hotpotqa.jsonl", "data/hotpotqa.jsonl")
    monkeypatch.setattr(datasets, "load_dataset", script_refused)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: str(zpath))
    assert lb.load("hotpotqa") == records

    # 3. the zip download fails for lack of network
    def no_network(**kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(RuntimeError, match=r"'hotpotqa'.*unreachable"):
        lb.load("hotpotqa")

    # 4. load_dataset itself cannot reach the hub
    def unreachable(*a, **kw):
        raise ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match=r"'musique'.*unreachable"):
        lb.load("musique")


# --------------------------------------------------------------------------- prompts / truncation


@pytest.mark.parametrize("dataset", FIXTURE_DATASETS)
def test_build_prompt_fixture(dataset):
    for sample in lb.load(dataset, source=FIXTURE):
        prompt = lb.build_prompt(dataset, sample)
        assert prompt == lb.PROMPTS[dataset].format(**sample)  # official: prompt_format.format(**json_obj)
        assert sample["context"] in prompt
        if "{input}" in lb.PROMPTS[dataset]:
            assert sample["input"] in prompt
        assert "{context}" not in prompt and "{input}" not in prompt


def test_build_prompt_exact_and_braces():
    sample = {"context": "def f(x): return {x: 1}\n", "input": "ignored", "_id": "x"}
    assert lb.build_prompt("lcc", sample) == (
        "Please complete the code given below. \ndef f(x): return {x: 1}\nNext line of code:\n"
    )
    hp = lb.build_prompt("hotpotqa", {"context": "C", "input": "Q?"})
    assert hp.endswith("The following are given passages.\nC\n\nAnswer the question based on the given passages. "
                       "Only give me the answer and do not output any other words.\n\nQuestion: Q?\nAnswer:")
    with pytest.raises(KeyError, match="input"):
        lb.build_prompt("hotpotqa", {"context": "C"})
    assert lb.build_prompt("gov_report", {"context": "R"}).endswith("Report:\nR\n\nNow, write a one-page summary "
                                                                    "of the report.\n\nSummary:")


def test_truncate_middle():
    ids = list(range(10))
    assert lb.truncate_middle(ids, 10) == ids
    assert lb.truncate_middle(ids, 20) == ids
    assert lb.truncate_middle(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert lb.truncate_middle(ids, 7) == [0, 1, 2, 7, 8, 9]  # int(7/2)=3 from each side, as pred.py
    assert lb.truncate_middle(ids, 2) == [0, 9]
    assert lb.truncate_middle(ids, 1) == []
    assert lb.truncate_middle((5, 6, 7), 2) == [5, 7]
    assert lb.truncate_middle([], 4) == []
    with pytest.raises(ValueError):
        lb.truncate_middle(ids, 0)


# --------------------------------------------------------------------------- metrics, hand-computed


def test_qa_f1_hand():
    assert lb.normalize_answer("The  Cat, a dog!") == "cat dog"
    assert lb.qa_f1_score("Port Avery", "port avery.") == 1.0
    assert lb.qa_f1_score("The city of Port Avery.", "Port Avery") == pytest.approx(2 / 3)  # P=2/4 R=1
    assert lb.qa_f1_score("Mara", "Mara Quill") == pytest.approx(2 / 3)  # P=1 R=1/2
    assert lb.qa_f1_score("a b b", "b b c d") == pytest.approx(2 / 3)  # "a" dropped: P=2/2 R=2/4
    assert lb.qa_f1_score("no", "yes") == 0.0
    assert lb.qa_f1_score("", "yes") == 0.0
    assert lb.qa_f1_score("the", "a") == 0.0  # both normalize to nothing


def test_qa_f1_zh_hand():
    pytest.importorskip("jieba")
    assert lb.normalize_zh_answer("杭州。 ABC，") == "杭州abc"
    assert lb.qa_f1_zh_score("杭州", "杭州。") == 1.0
    assert lb.qa_f1_zh_score("总部在杭州。", "杭州") == pytest.approx(0.5)  # [总部, 在, 杭州] vs [杭州]
    assert lb.qa_f1_zh_score("北京", "杭州") == 0.0


def test_rouge_l_hand():
    full = 2 / (2 + 1e-8)  # P = R = 1 with the package's +1e-8 in the denominator
    assert lb.rouge_score("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(full, abs=1e-15)
    # word *sets*: hyp {a, cat, sat}, ref {the, cat, sat, on, mat}, LCS words {cat, sat}: P=2/3 R=2/5
    assert lb.rouge_score("a cat sat", "the cat sat on the mat") == pytest.approx(
        2 * (2 / 3 * 2 / 5) / (2 / 3 + 2 / 5 + 1e-8), abs=1e-15
    )
    # summary level: sentence order does not matter
    assert lb.rouge_score("cats sleep. dogs bark", "dogs bark. cats sleep") == pytest.approx(full, abs=1e-15)
    # repeated words count once: P = 1/1, R = 1/2
    assert lb.rouge_score("the the the", "the cat") == pytest.approx(2 * 0.5 / (1.5 + 1e-8), abs=1e-15)
    # case-sensitive, no punctuation stripping other than '.'
    assert lb.rouge_score("Cat", "cat") == 0.0
    # no sentence at all -> the package raises, LongBench scores 0
    assert lb.rouge_score("", "the cat") == 0.0
    assert lb.rouge_score("...", "the cat") == 0.0
    assert lb.rouge_score("the cat", "") == 0.0


def test_rouge_zh_hand():
    pytest.importorskip("jieba")
    text = "草莓不要清洗，直接放进冰箱冷藏。"
    assert lb.rouge_zh_score(text, text) == pytest.approx(2 / (2 + 1e-8), abs=1e-15)
    assert lb.rouge_zh_score("北京", "杭州") == 0.0


def test_classification_hand():
    trec = ["Individual", "City", "Distance, linear measure", "Other location", "Date", "Other entity"]
    assert lb.classification_score("City", "City", all_classes=trec) == 1.0
    assert lb.classification_score("Other location or City", "City", all_classes=trec) == 0.5
    assert lb.classification_score("Individual", "City", all_classes=trec) == 0.0
    assert lb.classification_score("", "City", all_classes=trec) == 0.0
    # class names that are strict substrings of the gold are dropped ...
    lsht = ["财经", "科技", "体育", "体育明星"]
    assert lb.classification_score("体育明星", "体育明星", all_classes=lsht) == 1.0
    # ... but the official loop removes from the list it iterates, skipping the
    # next element: [cat, dog, cat dog] -> remove cat -> dog is never examined
    assert lb.classification_score("cat dog", "cat dog", all_classes=["cat", "dog", "cat dog"]) == 0.5
    # (so the result depends on the class order: here both "cat" and "dog" get removed)
    assert lb.classification_score("cat dog", "cat dog", all_classes=["cat", "cat dog", "dog"]) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        lb.classification_score("City", "City")


def test_retrieval_and_count_hand():
    assert lb.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert lb.retrieval_score("Paragraph 2 or Paragraph 12", "Paragraph 2") == 0.5
    assert lb.retrieval_score("2", "Paragraph 2") == 1.0
    assert lb.retrieval_score("The answer is 3", "Paragraph 2") == 0.0
    assert lb.retrieval_score("none", "Paragraph 2") == 0.0
    with pytest.raises(ValueError):
        lb.retrieval_score("1", "no paragraph here")
    assert lb.retrieval_zh_score("段落2", "段落2") == 1.0
    assert lb.retrieval_zh_score("段落1和段落2", "段落2") == 0.5
    assert lb.count_score("2", 2) == 1.0
    assert lb.count_score("There are 2 unique paragraphs out of 3", "2") == 0.5
    assert lb.count_score("22", "2") == 0.0
    assert lb.count_score("two", "2") == 0.0


def test_code_sim_hand():
    assert lb.code_sim_score("abcd", "abce") == 0.75  # matching "abc": 2*3/8
    assert lb.code_sim_score("```python\nabcd\n```", "abce") == 0.75  # fence line skipped
    assert lb.code_sim_score("\n\n# comment\nx // y\nabc", "abcdefg") == 0.6  # 2*3/10
    assert lb.code_sim_score("same", "same") == 1.0
    assert lb.code_sim_score("", "") == 1.0
    assert lb.code_sim_score("# only comments", "x") == 0.0
    # fuzz.ratio rounds with Python's round(): 100*2*1/16 = 12.5 -> 12
    assert lb.code_sim_score("axxxxxxx", "ayyyyyyy") == 0.12
    # official quirk: a blank line after the first one is taken as "the" line
    assert lb.code_sim_score("# comment\n\n    return x", "    return x") == 0.0


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("dataset", FIXTURE_DATASETS)
def test_fixture_sample_scores_hand(dataset):
    _skip_without_jieba(dataset)
    records = lb.load(dataset, source=FIXTURE)
    for rec, pred, want in zip(records, PREDICTIONS[dataset], EXPECTED_SAMPLE[dataset]):
        got = lb.sample_score(dataset, pred, rec["answers"], rec["all_classes"])
        assert 0.0 <= got <= 1.0
        if want is not None:
            assert got == pytest.approx(want, abs=1e-12), (dataset, pred)


def test_score_aggregation():
    trec = ["Individual", "City", "Date"]
    preds = ["\n\nCity\nDate", "Date", "Individual"]
    answers = [["City"], ["Date"], ["City"]]
    # first line after leading newlines is "City" -> 1; 1; 0 -> 200/3
    assert lb.score("trec", preds, answers, trec) == pytest.approx(200 / 3)
    assert lb.score("trec", preds, answers, trec, ndigits=2) == 66.67
    assert lb.score("trec", preds, answers, [trec, trec, trec]) == pytest.approx(200 / 3)  # per-sample lists
    # max over answers; first-line cut applies to triviaqa but not to hotpotqa
    assert lb.score("triviaqa", ["Fenwick\nHarlow"], [["Harlow", "Fenwick"]], None) == 100.0
    assert lb.score("hotpotqa", ["Fenwick\nHarlow"], [["Harlow"]], None) == pytest.approx(100 * 2 / 3)
    assert lb.score("hotpotqa", ["x"], [[]], None) == 0.0  # no reference -> 0 (eval.py starts at 0.)
    assert lb.sample_score("hotpotqa", "Mara Quill", "Mara Quill", None) == 1.0  # a bare string answer
    with pytest.raises(ValueError):
        lb.score("hotpotqa", ["a", "b"], [["a"]], None)
    with pytest.raises(ValueError):
        lb.score("hotpotqa", [], [], None)
    with pytest.raises(ValueError):
        lb.score("trec", ["City"], [["City"]], [trec, trec])


def test_fixture_score_is_mean_of_sample_scores():
    for dataset in FIXTURE_DATASETS:
        if _needs_jieba(dataset) and not _has_jieba():
            continue
        records = lb.load(dataset, source=FIXTURE)
        preds = PREDICTIONS[dataset]
        answers = [r["answers"] for r in records]
        classes = records[0]["all_classes"]  # eval.py passes one list for the whole file
        per = [lb.sample_score(dataset, p, r["answers"], r["all_classes"]) for p, r in zip(preds, records)]
        assert lb.score(dataset, preds, answers, classes) == pytest.approx(100 * sum(per) / len(per), abs=1e-9)


# --------------------------------------------------------------------------- agreement with lm-eval

# (prediction, reference) pairs per metric, on top of the fixture's.
EXTRA_CASES: dict[str, list[tuple[str, str]]] = {
    "qa_f1_score": [("The city of Port Avery.", "Port Avery"), ("an apple a day", "The apple"), ("", "x"),
                    ("Yes, it is.", "yes"), ("1,000 km", "1000 km")],
    "qa_f1_zh_score": [
        ("总部在杭州。", "杭州"), ("一九二零年建成", "一九二零年"), ("北京 上海", "上海，北京"), ("", "北京"),
    ],
    "rouge_score": [("the cat sat on the mat", "the cat sat on the mat"), ("a cat sat", "the cat sat on the mat"),
                    ("cats sleep. dogs bark", "dogs bark. cats sleep"), ("the the the", "the cat"),
                    ("One. Two.  Three. ", "Three. two. One"), ("x.", "x"), ("...", "x"), ("", "a"),
                    ("The agency will hire inspectors. It found many overdue bridges.",
                     "The agency found that many bridges were overdue for inspection. It plans to hire more "
                     "inspectors and update its database.")],
    "rouge_zh_score": [("草莓不要清洗，直接放进冰箱冷藏。", "草莓不要清洗，直接放进冰箱冷藏，可以保存三天左右。"),
                       ("会议讨论了预算。下一步是招聘。", "会议主要讨论预算和招聘计划。"), ("", "预算")],
    "retrieval_score": [("Paragraph 2 or Paragraph 12", "Paragraph 2"), ("none", "Paragraph 2"), ("2", "Paragraph 2")],
    "retrieval_zh_score": [("段落1和段落2", "段落2"), ("答案是段落3", "段落3"), ("无", "段落1")],
    "count_score": [("There are 2 unique paragraphs out of 3", "2"), ("22", "2"), ("two", "2")],
    "code_sim_score": [("abcd", "abce"), ("```python\nabcd\n```", "abce"), ("# c\nx // y\nabc", "abcdefg"),
                       ("axxxxxxx", "ayyyyyyy"), ("", ""), ("# only", "x"),
                       ("    for i in range(10):\n        pass", "    for i in range(n):")],
}
CLASSIFICATION_CASES = [
    ("City", "City", ["Individual", "City", "Date"]),
    ("Other location or City", "City", ["City", "Other location", "Date"]),
    ("cat dog", "cat dog", ["cat", "dog", "cat dog"]),
    ("体育明星", "体育明星", ["财经", "科技", "体育", "体育明星"]),
    ("体育", "体育明星", ["财经", "科技", "体育", "体育明星"]),
    ("", "City", ["City"]),
]


def _fixture_pairs() -> dict[str, list[tuple[str, str, list | None]]]:
    pairs: dict[str, list] = {}
    for dataset in FIXTURE_DATASETS:
        metric = lb.DATASET_METRIC[dataset]
        for rec, pred in zip(lb.load(dataset, source=FIXTURE), PREDICTIONS[dataset]):
            if dataset in lb.FIRST_LINE_DATASETS:
                pred = pred.lstrip("\n").split("\n")[0]
            for ans in rec["answers"]:
                pairs.setdefault(metric, []).append((pred, ans, rec["all_classes"]))
    for metric, cases in EXTRA_CASES.items():
        pairs.setdefault(metric, []).extend((p, g, None) for p, g in cases)
    pairs["classification_score"].extend(CLASSIFICATION_CASES)
    return pairs


@pytest.mark.parametrize("metric", sorted(lb.METRICS))
def test_metric_functions_match_lm_eval(metric, lm_metrics):
    """Per (prediction, reference) pair, our metric == lm-eval's (official) metric."""
    if metric in ZH_METRICS:
        pytest.importorskip("jieba")
    if metric == "code_sim_score" and not _fuzzywuzzy_is_pure_python(lm_metrics):
        pytest.skip("fuzzywuzzy uses python-Levenshtein here; official requirements give the difflib backend")
    theirs = getattr(lm_metrics, metric)
    ours = lb.METRICS[metric]
    pairs = _fixture_pairs()[metric]
    assert pairs
    for pred, ref, classes in pairs:
        kw = {"all_classes": classes}
        assert ours(pred, ref, **kw) == pytest.approx(theirs(pred, ref, **kw), abs=1e-9), (pred, ref)


def test_code_sim_blank_line_divergence(lm_metrics):
    """lm-eval's code_sim_score skips blank lines; the official one (and ours) does
    not skip a blank line that follows the first line."""
    if not _fuzzywuzzy_is_pure_python(lm_metrics):
        pytest.skip("fuzzywuzzy uses python-Levenshtein here")
    pred, ref = "# comment\n\n    return x", "    return x"
    assert lb.code_sim_score(pred, ref) == 0.0
    assert lm_metrics.code_sim_score(pred, ref) == 1.0


_LM_DOC_FUNCS = {
    "qa_f1_score": "get_qa_f1_score",
    "qa_f1_zh_score": "get_qa_f1_zh_score",
    "rouge_score": "get_rouge_score",
    "rouge_zh_score": "get_rouge_zh_score",
    "classification_score": "get_classification_score",
    "retrieval_score": "get_retrieval_score",
    "retrieval_zh_score": "get_retrieval_zh_score",
    "count_score": "get_count_score",
    "code_sim_score": "get_code_sim_score",
}


@pytest.mark.parametrize("dataset", FIXTURE_DATASETS)
def test_fixture_sample_scores_match_lm_eval(dataset, lm_metrics):
    """lm-eval's per-document process_results on the fixture == our sample_score.

    lm-eval strips the prediction and does not cut it at the first newline (its
    generation stops at '\\n' instead), so it is given the first line here for
    FIRST_LINE_DATASETS, exactly what eval.py scores."""
    _skip_without_jieba(dataset)
    metric = lb.DATASET_METRIC[dataset]
    if metric == "code_sim_score" and not _fuzzywuzzy_is_pure_python(lm_metrics):
        pytest.skip("fuzzywuzzy uses python-Levenshtein here")
    func = getattr(lm_metrics, _LM_DOC_FUNCS[metric])
    for rec, pred in zip(lb.load(dataset, source=FIXTURE), PREDICTIONS[dataset]):
        lm_pred = pred.lstrip("\n").split("\n")[0] if dataset in lb.FIRST_LINE_DATASETS else pred
        theirs = func(rec, [lm_pred])[metric]
        ours = lb.sample_score(dataset, pred, rec["answers"], rec["all_classes"])
        assert ours == pytest.approx(theirs, abs=1e-9), (dataset, pred)


def test_rouge_matches_rouge_package_on_long_text():
    """Multi-sentence summaries of realistic length vs the `rouge` package that
    LongBench uses (skipped if it is not installed)."""
    rouge = pytest.importorskip("rouge")
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)] + ["the", "a", "of"]

    def doc():
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(rng.randint(1, 12))]
        return ". ".join(sents) + rng.choice(["", ".", ". ", "\n"])

    scorer = rouge.Rouge()
    for _ in range(40):
        hyp, ref = doc(), doc()
        want = scorer.get_scores([hyp], [ref], avg=True)["rouge-l"]["f"]
        assert lb.rouge_score(hyp, ref) == pytest.approx(want, abs=1e-12)


# LongBench's metrics.py rouge_score and eval.py's scorer loop, as the official call stack runs them
# (the depth at which the `rouge` package's recursion overflows depends on the frames above it)
EVAL_PY_STACK = r'''
import json, sys
from rouge import Rouge

def rouge_score(prediction, ground_truth, **kwargs):
    rouge = Rouge()
    try:
        scores = rouge.get_scores([prediction], [ground_truth], avg=True)
    except:
        return 0.0
    return scores["rouge-l"]["f"]

def scorer(dataset, predictions, answers, all_classes):
    scores = []
    for (prediction, ground_truths) in zip(predictions, answers):
        score = 0.
        for ground_truth in ground_truths:
            score = max(score, rouge_score(prediction, ground_truth, all_classes=all_classes))
        scores.append(score)
    return scores

predictions, answers = json.load(open(sys.argv[1]))
print(json.dumps(scorer("gov_report", predictions, answers, None)))
'''


def test_rouge_scores_zero_where_the_rouge_package_overflows(tmp_path):
    """A sentence pair whose LCS backtrack is deeper than the package's recursion allows: official
    LongBench catches the RecursionError and scores 0.0, and so does rouge_score."""
    pytest.importorskip("rouge")
    import json

    def long_output(words):  # one short sentence shared with the reference, then a long one without '.'
        return "x y. " + " ".join(f"w{i}" for i in range(words))

    steps = lb.ROUGE_MAX_STEPS
    predictions = [long_output(steps), long_output(steps + 1), "x y"]
    answers = [["x y"]] * 3
    (tmp_path / "case.json").write_text(json.dumps([predictions, answers]))
    (tmp_path / "eval_stack.py").write_text(EVAL_PY_STACK)
    proc = subprocess.run([sys.executable, str(tmp_path / "eval_stack.py"), str(tmp_path / "case.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    official = json.loads(proc.stdout)
    ours = [lb.rouge_score(p, a[0]) for p, a in zip(predictions, answers)]
    assert official[0] > 0 and official[1] == 0.0 and official[2] > 0.99  # the case is on the boundary
    assert ours == pytest.approx(official, abs=1e-12)
    assert lb.sample_score("gov_report", long_output(steps + 1), ["x y", "x y z"]) == 0.0
