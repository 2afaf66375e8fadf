"""Every command of the README's ```bash blocks, and of the docs/*.md it links that have such blocks, runs as
written: offline, on this machine's CPU, with a per-command time limit.

The convention (the README's blocks follow it):
- one command per line; a trailing ``\\`` continues it; other lines starting with ``#`` are comments;
- ``#> <text>`` under a command: ``<text>`` appears in its output (stdout + stderr) and it exits 0;
- ``#> exit 2: <text>`` under a command: it exits 2 with a one-line error holding ``<text>``, no traceback
  (commands that need a GPU, the hub or a cluster end so here);
- a command with a trailing ``# not run by tests: <why>`` is skipped (pytest -rs lists each with its why);
  every other command runs and must exit 0 unless it says ``exit 2``.

Commands run from the repository root through bash, with ``.venv/bin/`` meaning the bin folder of the
interpreter running the tests (in CI that is .venv itself), ``HF_HUB_OFFLINE=1``, and records going to a
fresh temporary folder per command through ``LACACHE_RUNS_DIR`` (read by ``configs/config.yaml`` and
``lacache.harness.bench``), so nothing lands in the user's runs/."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import queue
import re
import resource
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_LIMIT_S = 120  # an example takes at most 2 minutes on 2 CPU cores (one torch thread here) or says its time
HANG_LIMIT_S = 600  # wall clock, whatever else keeps the cores busy: past it a command is killed as hung
SKIP = re.compile(r"#\s*not run by tests:\s*(?P<why>.+)$")
EXIT = re.compile(r"^exit (?P<code>\d+):\s*(?P<text>.+)$")
TRACEBACK = "Traceback (most recent call last)"
DOC_LINK = re.compile(r"\]\((?P<path>docs/[^)#\s]+\.md)(?:#[^)]*)?\)")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\S*)\s*$")


@dataclasses.dataclass
class Command:
    doc: str
    line: int  # 1-based line of the command's first line in its document
    text: str  # continuation lines joined with their backslash-newlines, as bash reads them
    expect: list[str] = dataclasses.field(default_factory=list)
    exit_code: int = 0
    skip: str | None = None

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def parse(markdown: str, doc: str = "README.md") -> list[Command]:
    """The commands of ``markdown``'s ```bash blocks with their expectations."""
    commands: list[Command] = []
    block_indent = None
    pending: tuple[int, list[str]] | None = None  # a command still being continued
    for number, raw in enumerate(markdown.splitlines(), 1):
        fence = FENCE.match(raw)
        if block_indent is None:
            if fence and fence["lang"] == "bash":
                block_indent = len(fence["indent"])
            continue
        if fence and not fence["lang"]:
            if pending is not None:
                raise ValueError(f"{doc}:{pending[0]}: a command ends its block with a continuation backslash")
            block_indent = None
            continue
        line = raw[block_indent:] if not raw[:block_indent].strip() else raw.lstrip()
        if pending is not None:
            pending[1].append(line)
            if not line.rstrip().endswith("\\"):
                commands.append(_command(doc, *pending))
                pending = None
            continue
        stripped = line.strip()
        if stripped.startswith("#>"):
            if not commands or commands[-1].doc != doc:
                raise ValueError(f"{doc}:{number}: an expected-output line `{stripped}` with no command above it")
            _expect(commands[-1], stripped[2:].strip(), f"{doc}:{number}")
        elif stripped and not stripped.startswith("#"):
            if line.rstrip().endswith("\\"):
                pending = (number, [line])
            else:
                commands.append(_command(doc, number, [line]))
    if block_indent is not None:
        raise ValueError(f"{doc}: a ```bash block is not closed")
    return commands


def _command(doc: str, number: int, lines: list[str]) -> Command:
    text = "\n".join(lines)
    skip = SKIP.search(text)
    return Command(doc, number, text, skip=skip["why"].strip() if skip else None)


def _expect(command: Command, text: str, where: str) -> None:
    code = EXIT.match(text)
    if code:
        if command.exit_code:
            raise ValueError(f"{where}: a second exit line for one command")
        command.exit_code, text = int(code["code"]), code["text"].strip()
    if not text:
        raise ValueError(f"{where}: an empty expected-output line")
    command.expect.append(text)


def documents() -> list[Path]:
    """README.md and every docs/*.md it links that holds a ```bash block."""
    readme = ROOT / "README.md"
    linked = dict.fromkeys(ROOT / match["path"] for match in DOC_LINK.finditer(readme.read_text()))
    return [readme] + [path for path in linked if path.is_file() and "```bash" in path.read_text()]


def all_commands() -> list[Command]:
    return [command for path in documents() for command in parse(path.read_text(), str(path.relative_to(ROOT)))]


def shell_line(command: Command) -> str:
    """The command as bash runs it here: ``.venv/bin/`` is the running interpreter's bin folder, and ``make``
    outside CI uses that interpreter's environment instead of setting up a .venv in this checkout."""
    bin_dir = Path(sys.executable).parent
    text = re.sub(r"(?<![\w/.-])\.venv/bin/", f"{bin_dir}/", command.text)
    if (ROOT / ".venv" / "bin").resolve() != bin_dir.resolve():
        prefix = bin_dir.parent
        text = re.sub(r"(?<![\w/.-])make(?= )", f"make VENV={prefix} -o {prefix}/.setup-done", text)
    return text


def environment(scratch: Path) -> dict:
    """Offline, records in ``scratch``, and one torch thread unless OMP_NUM_THREADS says otherwise (two threads on
    cores that other jobs keep busy run several times slower, and the time limit is per command)."""
    bin_dir = str(Path(sys.executable).parent)
    return {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true",
            "MPLBACKEND": "Agg", "LACACHE_RUNS_DIR": str(scratch / "runs"),
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


SHELL_ONLY = re.compile(r"[$`*?~]")  # expansions that only bash performs as bash would


def python_argv(command: Command) -> tuple[dict, list[str]] | None:
    """``(env assignments, argv after the interpreter)`` of a plain ``[VAR=value ...] .venv/bin/python run.py|-m
    module ...`` line; None for anything else (pipes, expansions, other programs, interpreter options)."""
    text = command.text.replace("\\\n", " ")
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return None
    if SHELL_ONLY.search(" ".join(words)) or any(set(word) <= set("();<>|&") for word in words):
        return None
    assignments = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        assignments[key] = value
    if any(key.startswith("PYTHON") for key in assignments):
        return None  # read when an interpreter starts
    if len(words) < 2 or words[0] != ".venv/bin/python" or not (words[1] == "run.py" or words[1] == "-m" and len(words) > 2):
        return None
    return assignments, words[1:]


class Preloaded:
    """The client of tests/preloaded.py: one interpreter with the heavy imports done, forking per command."""

    def __init__(self, scratch: Path):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "preloaded.py")], cwd=ROOT,
                                        env=environment(scratch), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert "ready" in self.answer(None), "tests/preloaded.py did not start"

    def answer(self, limit_s: float | None) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], limit_s)
        if not ready:
            raise TimeoutError
        line = self.process.stdout.readline()
        assert line, f"tests/preloaded.py stopped (exit {self.process.poll()})"
        return json.loads(line)

    def run(self, scratch: Path, limit_s: float, assignments: dict | None = None, argv: list[str] | None = None,
            shell: str | None = None) -> tuple[int, str, float]:
        """(exit code, output, CPU seconds) of ``python <argv>`` in a child of the preloaded interpreter, or of the
        ``shell`` line in bash started from one."""
        output = scratch / "output.txt"
        request = {"argv": argv, "shell": shell, "env": {**environment(scratch), **(assignments or {})}, "cwd": str(ROOT),
                   "output": str(output)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self.answer(60)["pid"]
        killed = ""
        try:
            done = self.answer(limit_s)
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            done, killed = self.answer(60), f"\n[killed after {limit_s:.0f} s]"
        return done["code"], output.read_text(errors="replace") + killed, done["cpu_s"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@dataclasses.dataclass
class Outcome:
    code: int
    output: str  # stdout and stderr
    seconds: float
    cpu_s: float  # the command's processes' CPU time: what it costs on cores other jobs share


def run(command: Command, scratch: Path, limit_s: float = HANG_LIMIT_S, preloaded: Preloaded | None = None) -> Outcome:
    """One command, killed with its process group at ``limit_s``. With ``preloaded``, a plain ``.venv/bin/python
    run.py|-m ...`` line runs in a child of it and anything else in bash started from one (its CPU time is then
    its own, whatever else runs at the same time); without, in bash started from here."""
    started = time.perf_counter()
    if preloaded is not None:
        plain = python_argv(command)
        if plain is not None:
            code, output, cpu_s = preloaded.run(scratch, limit_s, *plain)
        else:
            code, output, cpu_s = preloaded.run(scratch, limit_s, shell=shell_line(command))
        return Outcome(code, output, time.perf_counter() - started, cpu_s)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with subprocess.Popen(["bash", "-c", shell_line(command)], cwd=ROOT, env=environment(scratch), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0] + f"\n[killed after {limit_s:.0f} s]"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Outcome(process.returncode, output, time.perf_counter() - started, cpu_s)


def check(command: Command, outcome: Outcome, cpu_limit_s: float = CPU_LIMIT_S) -> None:
    """``command``'s outcome against its expectations; an AssertionError naming what differs."""
    head = f"{command.name}: `{command.text}` exited {outcome.code} after {outcome.seconds:.0f} s ({outcome.cpu_s:.0f} s of CPU)"
    tail = outcome.output[-3000:]
    assert outcome.code == command.exit_code, f"{head}, expected {command.exit_code}:\n{tail}"
    assert outcome.cpu_s <= cpu_limit_s, f"{head}: over {cpu_limit_s} s of CPU; make it smaller or mark it with its time"
    for text in command.expect:
        assert text in outcome.output, f"{head}: its output lacks `{text}`:\n{tail}"
    if command.exit_code:
        assert TRACEBACK not in outcome.output, f"{head}: a traceback, not a one-line error:\n{tail}"


COMMANDS = all_commands()


WORKERS = 2  # commands run at a time: each uses one torch thread, and CI has 2 cores


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Preloaded interpreters, one per worker, handed out through a queue."""
    started = [Preloaded(tmp_path_factory.mktemp("preloaded")) for _ in range(WORKERS)]
    pool = queue.Queue()
    for server in started:
        pool.put(server)
    yield pool
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def preloaded(servers):
    server = servers.get()
    yield server
    servers.put(server)


@dataclasses.dataclass
class Run:
    outcome: Outcome
    window: tuple[float, float]  # wall-clock start and end
    touched: list[str] = dataclasses.field(default_factory=list)  # checkout files written while it ran


@pytest.fixture(scope="module")
def runs(request, servers, tmp_path_factory) -> dict[str, Run]:
    """Every selected documented command, run ``WORKERS`` at a time in document order, with the checkout's files
    each may have written (a file written while two ran is named for both)."""
    selected = [item.callspec.params["command"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_the_documented_command_runs_as_written"
                and not item.callspec.params["command"].skip]
    before, runs = changed_files(), {}

    def one(command: Command) -> None:
        server = servers.get()
        try:
            started = time.time()
            outcome = run(command, tmp_path_factory.mktemp("command"), preloaded=server)
            runs[command.name] = Run(outcome, (started, time.time()))
        finally:
            servers.put(server)

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(one, selected))
    for name, mtime in changed_files().items():
        if before.get(name) != mtime:
            for done in runs.values():
                if done.window[0] - 1 <= mtime <= done.window[1] + 1:
                    done.touched.append(name)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("command", [pytest.param(c, id=c.name, marks=[pytest.mark.skip(reason=f"{c.name}: {c.skip}")] if c.skip else [])
                                     for c in COMMANDS])
def test_the_documented_command_runs_as_written(command, runs):
    done = runs[command.name]
    print(f"{command.name}: {done.outcome.seconds:.1f} s, {done.outcome.cpu_s:.1f} s of CPU")
    check(command, done.outcome)
    assert not done.touched, f"{command.name} wrote files of the checkout (outputs belong under reports/ or runs/): {done.touched}"


def changed_files() -> dict[str, float]:
    """Files that differ from git's index (changed, added or untracked, outside git-ignored folders), with their
    modification times; none outside a git checkout."""
    try:
        listed = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = [entry[3:] for entry in listed.stdout.split("\0") if len(entry) > 3] if listed.returncode == 0 else []
    return {name: (ROOT / name).stat().st_mtime for name in names if (ROOT / name).exists()}


def test_the_documents_hold_commands_and_every_skip_says_why():
    assert len(COMMANDS) >= 10, [c.name for c in COMMANDS]
    for command in COMMANDS:
        assert command.skip is None or len(command.skip) > 3, f"{command.name}: say why it is not run"
        assert not (command.skip and command.expect) or command.exit_code == 0, command.name


# The checker itself, on made-up documents: each expectation it enforces fails on a command that breaks it.

DOC = """
text
```bash
python -c "print('ppl=22.15')"   # a comment
#> ppl=22.15
# a comment line
python -c "import sys; sys.exit(0)" \\
    --flag   # continued

python -c "import sys; print('error: no CUDA GPU'); sys.exit(2)"
#> exit 2: no CUDA GPU
sleep 100   # not run by tests: takes long
```

```python
print("not bash")
```

- a list item:

  ```bash
  echo indented
  #> indented
  ```
"""


def test_parse_reads_commands_continuations_expectations_and_skips():
    commands = parse(DOC, "doc.md")
    assert [(c.line, c.exit_code, c.expect, c.skip) for c in commands] == [
        (4, 0, ["ppl=22.15"], None), (7, 0, [], None), (10, 2, ["no CUDA GPU"], None), (12, 0, [], "takes long"),
        (22, 0, ["indented"], None)]
    assert commands[1].text == 'python -c "import sys; sys.exit(0)" \\\n    --flag   # continued'


@pytest.mark.parametrize("bad", ["```bash\n#> x\n```", "```bash\necho a \\\n```", "```bash\necho a\n"])
def test_parse_refuses_a_malformed_block(bad):
    with pytest.raises(ValueError):
        parse(bad)


@pytest.mark.parametrize("text, expect, ok", [
    ("python -c \"print('ppl=22.15')\"", "#> ppl=22.15", True),
    ("python -c \"print('ppl=22.16')\"", "#> ppl=22.15", False),  # another result
    ("python -c \"import sys; print('ppl=22.15'); sys.exit(1)\"", "#> ppl=22.15", False),  # the right text, a failure
    ("python -c \"import sys; print('error: no CUDA GPU here'); sys.exit(2)\"", "#> exit 2: no CUDA GPU", True),
    ("python -c \"import sys; print('error: no CUDA GPU'); sys.exit(1)\"", "#> exit 2: no CUDA GPU", False),  # exit 1
    ("python -c \"raise SystemExit('no CUDA GPU')\"", "#> exit 2: no CUDA GPU", False),  # exit 1, and a message only
    ("python -c \"import sys, traceback; traceback.print_stack(); print('no CUDA GPU'); sys.exit(2)\"",
     "#> exit 2: no CUDA GPU", True),  # a stack print is not an exception's traceback
    ("python -c \"import sys; sys.stderr.write('Traceback (most recent call last):\\nno CUDA GPU\\n'); sys.exit(2)\"",
     "#> exit 2: no CUDA GPU", False),  # a traceback
    ("python -c \"print('no CUDA'); print('GPU')\"; exit 2", "#> exit 2: no CUDA GPU", False),  # the text split
    ("sleep 5", "", False),  # hung: killed at the wall-clock limit
])
def test_check_fails_a_command_that_does_not_do_what_its_lines_say(text, expect, ok, tmp_path):
    (command,) = parse(f"```bash\n{text}\n{expect}\n```")
    outcome = run(command, tmp_path, limit_s=2)
    if ok:
        check(command, outcome)
    else:
        with pytest.raises(AssertionError):
            check(command, outcome)


def test_check_fails_a_command_over_its_cpu_time(tmp_path):
    busy = "import time; end = time.process_time() + 1; all(iter(lambda: time.process_time() < end, False))"
    (command,) = parse(f"```bash\npython -c \"{busy}\"\n```")
    outcome = run(command, tmp_path)
    check(command, outcome, cpu_limit_s=10)
    with pytest.raises(AssertionError, match="of CPU"):
        check(command, outcome, cpu_limit_s=0.5)


def test_venv_python_is_the_interpreter_running_the_tests(tmp_path):
    (command,) = parse("```bash\n.venv/bin/python -c \"import sys; print(sys.executable)\"\n```")
    outcome = run(command, tmp_path)
    assert outcome.code == 0 and outcome.output.strip() == str(Path(sys.executable).parent / "python")


@pytest.mark.slow
@pytest.mark.parametrize("line", [
    ".venv/bin/python -m calendar 2024 1",
    ".venv/bin/python -m json.tool /nonexistent",  # argparse's error, exit 2
    ".venv/bin/python -m timeit -s \"raise ValueError('x')\"",  # a traceback, exit 1
    ".venv/bin/python run.py cache=nonexistent",  # Hydra's refusal, exit 2
])
def test_the_preloaded_interpreter_runs_a_command_as_python_does(line, tmp_path, preloaded):
    (command,) = parse(f"```bash\n{line}\n```")
    assert python_argv(command) is not None
    forked, plain = run(command, tmp_path, preloaded=preloaded), run(command, tmp_path)
    assert (forked.code, forked.output.splitlines()[-1:]) == (plain.code, plain.output.splitlines()[-1:]), (forked, plain)
