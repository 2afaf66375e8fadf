"""Mutation testing of the core modules with mutmut, one module at a time (``make mutation``).

For each module named in ``tools/mutation.toml``, a fresh copy of the working tree is staged in
``.mutation/<module>/`` (``lacache/baselines``, ``lacache/tasks`` and ``lacache/configs`` become real
folders there, so every module is mutated under the name the tests import it by), mutmut mutates
that module only and runs, for each mutant, the module's fast tests that execute the mutated
function. The outcome is written to ``docs/data/mutation/<date>.json``: per module the mutants
tried, killed, timed out and survived, the equivalent ones with the reason their behaviour is the
same, and the score ``(killed + timeout) / (tried - equivalent)``.

    python tools/mutation.py                              # every module in tools/mutation.toml
    python tools/mutation.py lacache/ladder.py --jobs 1   # one module, one worker
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tools" / "mutation.toml"
STAGE = ROOT / ".mutation"
LINKED = ("baselines", "tasks", "configs")  # lacache/<name> -> ../<name> in the repository
KILLED = {"killed", "segfault"}  # segfault: the test process died (a crash is a caught mutant)


def load_config(path: Path = CONFIG) -> dict:
    config = tomllib.loads(path.read_text())
    for module, spec in config["modules"].items():
        if not (ROOT / module).is_file():
            raise SystemExit(f"{path}: module {module!r} does not exist")
        paths = [t for i, t in enumerate(spec["tests"]) if not t.startswith("-") and spec["tests"][i - 1] != "-k"]
        for test in paths:
            if not (ROOT / test.split("::")[0]).exists():
                raise SystemExit(f"{path}: {module}: test {test!r} does not exist")
    return config


def package_path(module: str) -> str:
    """Where ``module`` sits inside the staged ``lacache/`` (``baselines/h2o.py`` -> ``lacache/baselines/h2o.py``)."""
    return module if module.startswith("lacache/") else f"lacache/{module}"


def working_tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return sorted(p for p in out.split("\0") if p)


def stage(module: str, spec: dict, settings: dict) -> Path:
    """A fresh copy of the working tree for ``module``, with mutmut's settings in its pyproject.toml."""
    folder = STAGE / module.replace("/", "_").removesuffix(".py")
    shutil.rmtree(folder, ignore_errors=True)
    for rel in working_tree_files():
        source = ROOT / rel
        if rel.startswith(("docs/", "notebooks/")) or source.is_symlink() or not source.is_file():
            continue  # the lacache/<name> links are replaced by the folders themselves
        target = folder / (f"lacache/{rel}" if rel.split("/")[0] in LINKED else rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    for name in LINKED:  # the top-level names point at the package's folders (the reverse of the repository)
        (folder / name).symlink_to(f"lacache/{name}")
    (folder / "mutants").mkdir()
    for name in LINKED:  # inside mutants/ as well, so a top-level path reads the mutated copy
        (folder / "mutants" / name).symlink_to(f"lacache/{name}")
    write_settings(folder, module, spec, settings)
    return folder


def write_settings(folder: Path, module: str, spec: dict, settings: dict) -> None:
    """The repository's pyproject.toml with mutmut's settings for ``module`` appended."""
    mutmut = {
        "source_paths": ["lacache/"],
        "only_mutate": [package_path(module)],
        "do_not_mutate_patterns": settings["do_not_mutate_patterns"],
        "pytest_add_cli_args": settings["pytest_args"],
        "pytest_add_cli_args_test_selection": spec["tests"],
        "also_copy": sorted({p.split("/")[0] for p in working_tree_files()} - {"lacache", "docs", "notebooks", *LINKED}),
        "process_isolation": "forkserver",  # torch is not fork-safe once its thread pools started
        "timeout_multiplier": settings["timeout_multiplier"],
        "timeout_constant": settings["timeout_constant"],
        "use_git_change_detection": False,
        "use_setproctitle": False,
    }
    text = (ROOT / "pyproject.toml").read_text() + "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in mutmut.items())
    (folder / "pyproject.toml").write_text(text)
    if (folder / "mutants" / "pyproject.toml").exists():
        (folder / "mutants" / "pyproject.toml").write_text(text)


def run_mutmut(folder: Path, jobs: int, names: list[str] | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    start = time.monotonic()
    with open(folder / "mutmut.log", "a" if names else "w") as log:
        code = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *(names or [])],
                              cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = (folder / "mutmut.log").read_text()[-3000:]
        raise SystemExit(f"mutmut failed in {folder} (exit {code}); the end of {folder / 'mutmut.log'}:\n{tail}")
    return time.monotonic() - start


def retry(folder: Path, module: str, jobs: int) -> float:
    """Run the survivors of a kept run again with the working tree's tests (after writing the tests that should
    kill them): mutmut tests the named mutants only, collecting the coverage of new tests first."""
    from mutmut.mutation.data import SourceFileMutationData

    for target in (folder / "tests", folder / "mutants" / "tests"):
        shutil.rmtree(target)
        shutil.copytree(ROOT / "tests", target, ignore=shutil.ignore_patterns("__pycache__"))
    # the kept run's test selection stays: mutmut discards every result when it changes (new tests must be
    # inside it: in its files, matching its -k)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        data = SourceFileMutationData(path=package_path(module))
        data.load()
    finally:
        os.chdir(cwd)
    names = [name for name, code in data.exit_code_by_key.items() if code in (0, 5, 33, None)]
    if not names:
        return 0.0
    return run_mutmut(folder, jobs, names)


def function_lines(source: str) -> dict[str, tuple[int, int]]:
    """mutmut's mangled name of every function and method -> its (first, last) line."""
    import ast

    spans = {}

    def visit(body, cls=""):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                spans[f"x\u01c1{cls}\u01c1{node.name}" if cls else f"x_{node.name}"] = (node.lineno, node.end_lineno)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, node.name)

    visit(ast.parse(source).body)
    return spans


def mutant_changes(folder: Path, module: str) -> dict[str, dict]:
    """Every mutant of ``module``: its status, the changed line (number, before, after)."""
    from mutmut.configuration import reset_config
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    rel = package_path(module)
    source = (folder / rel).read_text().splitlines()
    spans = function_lines("\n".join(source))
    cwd = os.getcwd()
    os.chdir(folder)
    reset_config()  # mutmut reads its settings from the current folder's pyproject.toml
    try:
        data = SourceFileMutationData(path=rel)
        data.load()
        mutants = {}
        for name, code in sorted(data.exit_code_by_key.items()):
            mangled = name.rpartition(".")[2].partition("__mutmut_")[0]
            plain = mangled.rpartition("\u01c1")[2].removeprefix("x_") if "\u01c1" in mangled else mangled.removeprefix("x_")
            # the diff compares the renamed copies (<mangled>__mutmut_orig, <mangled>__mutmut_<n>): name them as in the source
            diff = re.sub(re.escape(mangled) + r"__mutmut_\w+", plain, get_diff_for_mutant(name, path=rel)).splitlines()[2:]
            before = [line[1:].strip() for line in diff if line.startswith("-")]
            after = [line[1:].strip() for line in diff if line.startswith("+")]
            first, last = spans[mangled]
            number = next((n for n in range(first, last + 1) if before and source[n - 1].strip() == before[0]), first)
            mutants[name] = {
                "status": status_by_exit_code[code],
                "line": number,
                "function": mangled.replace("\u01c1", ".").removeprefix("x.").removeprefix("x_"),
                "before": " ".join(before),
                "after": " ".join(after),
            }
        return mutants
    finally:
        os.chdir(cwd)


def summarise(module: str, mutants: dict[str, dict], equivalents: list[dict], seconds: float, spec: dict) -> dict:
    known = {(e["function"], e["before"], e["after"]): e for e in equivalents if e["module"] == module}
    entry = {"tests": spec["tests"], "seconds": round(seconds), "tried": len(mutants), "killed": 0, "timeout": 0,
             "survived": 0, "equivalent": [], "survivors": [], "timeouts": [], "stale_equivalents": []}
    used = set()
    unchecked = [m for m in mutants.values() if m["status"] == "not checked"]  # an interrupted run
    if unchecked:
        entry["not_checked"] = len(unchecked)
        entry["tried"] -= len(unchecked)
    for mutant in mutants.values():
        if mutant["status"] == "not checked":
            continue
        where = {"at": f"{module}:{mutant['line']}", "function": mutant["function"],
                 "change": f"{mutant['before']}  ->  {mutant['after']}"}
        key = (mutant["function"], mutant["before"], mutant["after"])
        if mutant["status"] in KILLED:
            entry["killed"] += 1
            if key in known:
                entry["stale_equivalents"].append({**where, "why": "listed as equivalent but a test kills it"})
        elif key in known:  # an equivalent mutant that timed out only met a slow machine: not a catch
            entry["equivalent"].append({**where, "why": known[key]["why"]}
                                       | ({"note": "timed out in this run"} if mutant["status"] == "timeout" else {}))
            used.add(key)
        elif mutant["status"] == "timeout":
            entry["timeout"] += 1
            entry["timeouts"].append(where)
        else:
            entry["survived"] += 1
            entry["survivors"].append({**where, "status": mutant["status"]})
    for key in known.keys() - used:
        if not any((m["function"], m["before"], m["after"]) == key and m["status"] in KILLED for m in mutants.values()):
            entry["stale_equivalents"].append({"function": key[0], "change": f"{key[1]}  ->  {key[2]}",
                                               "why": "listed as equivalent but no longer generated"})
    counted = entry["tried"] - len(entry["equivalent"])
    entry["score"] = round((entry["killed"] + entry["timeout"]) / counted, 4) if counted else None
    return entry


def table(record: dict) -> str:
    """The record as a Markdown table (docs)."""
    rows = ["| module | tried | killed | timeout | survived | equivalent | score | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for module, m in record["modules"].items():
        score = "n/a" if m["score"] is None else f"{100 * m['score']:.1f}%"
        tried = f"{m['tried']} of {m['tried'] + m['not_checked']}" if m.get("not_checked") else m["tried"]
        rows.append(f"| {module} | {tried} | {m['killed']} | {m['timeout']} | {m['survived']} | "
                    f"{len(m['equivalent'])} | {score} | {m['seconds']} |")
    return "\n".join(rows)


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: every module in tools/mutation.toml)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--out", type=Path, help="the record (default docs/data/mutation/<date>.json; merged with "
                        "an existing record of that name, so per-module runs add up)")
    parser.add_argument("--retry", action="store_true", help="test the survivors of the kept .mutation/<module>/ "
                        "again with the current tests (after adding tests for them), then summarise")
    parser.add_argument("--collect", action="store_true", help="only summarise the kept .mutation/<module>/ of an "
                        "earlier run (--keep) whose mutmut finished")
    parser.add_argument("--table", type=Path, metavar="RECORD", help="print a record's scores as a Markdown table and exit")
    parser.add_argument("--keep", action="store_true", help="keep .mutation/<module>/ (mutmut's results browser: "
                        "cd there and run `mutmut browse`)")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    config = load_config()
    settings = config["settings"]
    modules = args.modules or list(config["modules"])
    unknown = [m for m in modules if m not in config["modules"]]
    if unknown:
        raise SystemExit(f"not in {CONFIG.relative_to(ROOT)}: {unknown}; modules: {list(config['modules'])}")
    out = args.out or ROOT / "docs" / "data" / "mutation" / f"{dt.date.today().isoformat()}.json"
    record = json.loads(out.read_text()) if out.exists() else {"modules": {}}
    record.update({
        "tool": "mutmut",
        "tool_version": metadata.version("mutmut"),
        "command": "make mutation MODULES='...'  (python tools/mutation.py ...)",
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "packages": {p: metadata.version(p) for p in ("torch", "transformers")},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "jobs": args.jobs,
        "pytest_args": settings["pytest_args"],
        "not_mutated": settings["not_mutated"],
        "do_not_mutate_patterns": settings["do_not_mutate_patterns"],
        "timeout_s": f"(the covering tests' time + {settings['timeout_constant']}) x {settings['timeout_multiplier']}",
        "score": "(killed + timeout) / (tried - equivalent)",
    })
    for module in modules:
        spec = config["modules"][module]
        what = "the kept run" if args.collect else "its survivors again" if args.retry else "a fresh copy"
        print(f"[mutation] {module}: mutmut on {what}, {len(spec['tests'])} test selections", flush=True)
        commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=all"))
        if args.collect or args.retry:
            folder = STAGE / module.replace("/", "_").removesuffix(".py")
            seconds = (folder / "mutmut.log").stat().st_mtime - (folder / "pyproject.toml").stat().st_mtime
            if args.retry:
                seconds += retry(folder, module, args.jobs)
            commit, dirty = None, None  # the mutants are those of an earlier staging
        else:
            folder = stage(module, spec, settings)
            seconds = run_mutmut(folder, args.jobs)
        mutants = mutant_changes(folder, module)
        entry = summarise(module, mutants, config.get("equivalent", []), seconds, spec)
        record["modules"][module] = {**entry, "date": dt.datetime.now().isoformat(timespec="seconds"),
                                     "git_commit": commit, "git_dirty": dirty}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"[mutation] {module}: {entry['tried']} tried, {entry['killed']} killed, {entry['timeout']} timeout, "
              f"{entry['survived']} survived, {len(entry['equivalent'])} equivalent: score {entry['score']} "
              f"({entry['seconds']} s)", flush=True)
        for s in entry["survivors"]:
            print(f"    survived {s['at']} ({s['function']}): {s['change']}", flush=True)
        for s in entry["stale_equivalents"]:
            print(f"    stale equivalent ({s['function']}): {s['change']}: {s['why']}", flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"[mutation] record: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
