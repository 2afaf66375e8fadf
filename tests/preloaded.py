"""A Python interpreter that imports torch, transformers, Hydra and lacache once, then runs each ``python
run.py ...`` or ``python -m <module> ...`` it is sent in a forked child, as ``python`` would run it: the
README commands' test spends ~5 s of CPU per command on imports otherwise.

It runs no torch operation itself, so no thread pool exists when it forks. Protocol over stdin/stdout, one
JSON object a line: a request ``{"argv", "env", "cwd", "output"}`` (argv without the interpreter), or
``{"shell", "env", "cwd", "output"}`` for a line bash runs, is answered with ``{"pid"}`` at once (the child leads
its own process group, to be killed as one), then ``{"code", "cpu_s"}`` once the child ends (code: the exit
status, or -signal; cpu_s: its CPU time and that of the processes it waited for)."""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import typing

PRELOAD = ("torch", "transformers", "transformers.models.llama.modeling_llama", "hydra", "omegaconf", "lacache",
           "lacache.harness.cli", "lacache.harness.runner", "lacache.harness.bench", "lacache.tasks.ppl",
           "lacache.tasks.ruler", "lacache.tasks.niah", "lacache.baselines.h2o", "lacache.baselines.snapkv")


def run_child(request: dict) -> typing.NoReturn:
    """In the forked child: become the command, then leave the interpreter as python would after it (threads
    joined, exit handlers run) with its status. Never returns to the request loop."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    argv = request["argv"]
    if request.get("shell"):
        os.execvp("bash", ["bash", "-c", request["shell"]])
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)  # SystemExit and exceptions leave through serve() and the interpreter, as in ``python``


def serve() -> None:
    for name in PRELOAD:
        __import__(name)
    assert threading.active_count() == 1, f"a thread was started by the imports: {threading.enumerate()}"
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status, usage = os.wait4(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"code": code, "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


if __name__ == "__main__":
    serve()
