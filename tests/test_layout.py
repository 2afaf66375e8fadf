"""The package's shape: the public API stays importable, `lacache/` keeps few flat modules, and no
module imports another that (directly or through others) imports it back."""

from __future__ import annotations

import ast
import importlib
from importlib import metadata
from pathlib import Path

import pytest

import lacache

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lacache"
LINKED = {"baselines": ROOT / "baselines", "tasks": ROOT / "tasks"}  # shipped as lacache.baselines, lacache.tasks


def module_files(package: Path, linked: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for the package, its real subpackages and the linked folders."""
    files = {}
    roots = [(package, package.name)] + [(path, f"{package.name}.{name}") for name, path in linked.items()]
    for root, prefix in roots:
        for path in sorted(root.rglob("*.py")):
            if any(part in linked or part.startswith(".") for part in path.relative_to(root).parts[:-1]):
                continue  # the links inside lacache/ are walked as their own roots
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((prefix, *parts))
            files[name.removesuffix(".__init__")] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it (lazy imports inside functions included)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def import_cycles(package: Path, linked: dict[str, Path]) -> list[list[str]]:
    """Every strongly connected group of two or more modules in the import graph (Tarjan)."""
    files = module_files(package, linked)
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_module_of_the_package_imports_itself_back():
    assert import_cycles(PACKAGE, LINKED) == []


def test_the_cycle_check_sees_a_cycle_through_a_lazy_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from pkg.sub.c import g\n")
    (package / "sub" / "c.py").write_text("from ..a import x\n")
    (package / "d.py").write_text("import pkg.a\n")
    assert import_cycles(package, {}) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


def test_lacache_keeps_at_most_ten_flat_modules():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= 10, flat


def test_every_public_name_imports():
    names = lacache.__all__
    assert {"LaCache", "StreamingLLM", "H2O", "SnapKV", "TOVA", "PyramidKV", "FullCache", "generate", "load_model",
            "make_policy", "cache_kwarg", "CachePolicy", "PolicyConfigError", "UnsupportedInputError"} <= set(names)
    for name in names:
        assert getattr(lacache, name) is not None, name
    assert lacache.LaCache(budget=64).make_cache is not None


def test_every_module_of_the_package_imports():
    for name in module_files(PACKAGE, LINKED):
        if name.endswith("__main__") or name.endswith("triton_kernels") or name.endswith("lm_eval_model"):
            continue  # __main__ runs a report; Triton and lm-eval are optional imports
        importlib.import_module(name)


def test_the_console_script_and_the_packaged_configs_are_where_users_find_them():
    (script,) = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "lacache"]
    assert script.load() is importlib.import_module("lacache.harness.cli").main
    configs = importlib.import_module("lacache.configs")  # hydra's pkg://lacache.configs
    folder = Path(configs.__file__).parent
    assert (folder / "config.yaml").is_file() and sorted(p.stem for p in (folder / "cache").glob("*.yaml"))


@pytest.mark.parametrize("module", ["lacache.report", "lacache.harness.bench", "lacache.harness.records",
                                    "lacache.report.ladder_plot"])
def test_the_documented_command_line_modules_exist(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None
    if spec.submodule_search_locations:  # a package runs as its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None
