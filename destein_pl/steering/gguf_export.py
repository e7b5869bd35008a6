"""GGUF export for a GGUF base model: a copy of the base file with every original tensor and metadata value
unchanged, plus one float32 `blk.N.attn_output.bias` per layer (the folded steering, which llama.cpp's `llama`
graph loads as an optional tensor) and `destein.*` metadata keys; checked tensor by tensor after writing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from destein_pl.steering.architectures import ARCHITECTURES
from destein_pl.steering.folding import fold, folded_biases, has_steering
from destein_pl.steering.loading import BUILTIN_MODELS
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.model_card import METHOD, ExportError, ExportReport, results_of


def base_gguf_file(metadata: dict[str, Any]) -> Path:
    """The GGUF file of the checkpoint's base model, or an `ExportError` when the base is not one."""
    name = metadata["base_model"]["name_or_path"]
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].gguf_path()
    if str(name).endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"the checkpoint's base GGUF file is missing: {path}")
        return path
    raise ExportError(f"format='gguf' needs a GGUF base model; this checkpoint's base is {name!r} "
                      "(export format='hf' instead)")


def bias_tensor_name(layer: int) -> str:
    """The GGUF name of a layer's attention output bias (`blk.N.attn_output.bias`)."""
    return f"{TENSOR_NAMES[MODEL_TENSOR.ATTN_OUT].format(bid=layer)}.bias"


def gguf_metadata(report: ExportReport) -> dict[str, Any]:
    """The `destein.*` keys added to the GGUF: what steering the biases carry and where it came from."""
    pairs = report.metadata.get("pairs") or {}
    values: dict[str, Any] = {
        "destein.method": METHOD,
        "destein.alpha": float(report.alpha),
        "destein.source": Path(report.ckpt).name,
        "destein.base_model": str(report.metadata["base_model"]["name_or_path"]),
        "destein.folded_into": "blk.N.attn_output.bias" if report.folded else "nothing (zero steering)",
    }
    for key in ("source", "sha256", "m", "seed"):
        if pairs.get(key) is not None:
            values[f"destein.pairs.{key}"] = pairs[key]
    return values


def exported_names(reader: GGUFReader, report: ExportReport) -> dict[str, str]:
    """`general.name` naming the steered model, not the base model (when the base file has a name)."""
    field = reader.get_field("general.name")
    if field is None or not report.folded:
        return {}
    return {"general.name": f"{field.contents()} (DeStein, alpha {report.alpha:g})"}


def export_gguf(ckpt: Path, folder: Path, metadata: dict[str, Any], results: dict[str, Any] | None = None
                ) -> ExportReport:
    """Copy the base GGUF into `folder` with the folded biases added, and check the copy tensor by tensor;
    `results` (`read_results`) go into the model card if they were made with this steering."""
    source = base_gguf_file(metadata)
    reader = GGUFReader(source)
    check_gguf_base(reader, source, metadata)
    steered = SteeredCausalLM.from_checkpoint(ckpt, dtype="float32")  # biases from the dequantized weights
    architecture = steered.architecture
    report = ExportReport(str(ckpt), metadata, round(steered.alpha, 6), "gguf", architecture.family,
                          steered.config.model_type, dtype="float32 biases; base tensors as stored",
                          results=results_of(steered, results))
    report.folded = has_steering(steered)
    folded = fold(steered, inplace=True)
    biases = folded_biases(folded, architecture) if report.folded else []
    added = {bias_tensor_name(i): b.numpy().astype(np.float32) for i, b in enumerate(biases)}
    target = folder / f"{source.stem}-destein.gguf"
    renamed = exported_names(reader, report)
    write_gguf_copy(reader, target, added, gguf_metadata(report), renamed)
    check_gguf_copy(source, target, added, renamed)
    report.gguf_added = sorted(added)
    return report


def check_gguf_base(reader: GGUFReader, source: Path, metadata: dict[str, Any]) -> None:
    """Refuse a GGUF whose llama.cpp architecture ignores an output bias, or that already has one."""
    arch_name = reader.get_field("general.architecture").contents()
    model_type = metadata["architecture"]["model_type"]
    family = next(a for a in ARCHITECTURES if model_type in a.model_types)
    slot = family.bias_slot(model_type)
    if slot.gguf_arch is None or slot.gguf_arch != arch_name:
        reason = slot.gguf_note or ("no llama.cpp architecture known here reads an optional "
                                    "blk.N.attn_output.bias for it")
        raise ExportError(f"cannot export a {model_type} model (family {family.family}, GGUF architecture "
                          f"{arch_name!r}) as GGUF: {reason}; export format='hf' instead")
    existing = [t.name for t in reader.tensors if t.name.endswith("attn_output.bias")]
    if existing:
        raise ExportError(f"{source} already has output biases ({existing[0]}, ...); folding into them would change "
                          "original tensors, which this export never does")


def write_gguf_copy(reader: GGUFReader, path: Path, added: dict[str, np.ndarray], metadata: dict[str, Any],
                    renamed: dict[str, str], dequantized: bool = False) -> None:
    """Write the reader's file to `path` with every metadata value and tensor (raw bytes and types) unchanged but
    the `renamed` string values, plus the `added` float32 tensors and `metadata` keys. `dequantized`: every tensor
    as float32 instead (a full-precision base, to tell an engine's quantization noise from its steering)."""
    if dequantized:
        added = {**{t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}, **added}
    arch = reader.get_field("general.architecture").contents()
    writer = GGUFWriter(path, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for item in reader.fields.values():
        if item.name == "general.architecture" or item.name.startswith("GGUF."):
            continue  # the writer adds the first; the others are the reader's view of the header
        if item.name in metadata:
            raise ExportError(f"the base GGUF already has a {item.name} key: is it an export already?")
        if item.name in renamed:
            writer.add_key_value(item.name, renamed[item.name], GGUFValueType.STRING)
            continue
        value_type = item.types[0]
        sub_type = item.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(item.name, item.contents(), value_type, sub_type=sub_type)
    for key, value in metadata.items():
        writer.add_key_value(key, value, gguf_value_type(value))
    kept = [] if dequantized else reader.tensors
    for tensor in kept:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    for name, array in added.items():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    for array in added.values():
        writer.write_tensor_data(array)
    writer.close()


def gguf_value_type(value: Any) -> GGUFValueType:
    """The GGUF type of a metadata value written by this module."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.STRING


def check_gguf_copy(original: Path, exported: Path, added: dict[str, np.ndarray], renamed: dict[str, str]) -> None:
    """Read both files back: every original tensor byte-identical (type, shape, bytes), every original metadata
    value equal but the `renamed` ones (which hold their new values), and exactly the `added` tensors more, with
    their values."""
    before, after = GGUFReader(original), GGUFReader(exported)
    new_tensors = {t.name: t for t in after.tensors}
    for tensor in before.tensors:
        copy = new_tensors.pop(tensor.name, None)
        if copy is None or copy.tensor_type != tensor.tensor_type or list(copy.shape) != list(tensor.shape) \
                or np.asarray(copy.data).tobytes() != np.asarray(tensor.data).tobytes():
            raise ExportError(f"GGUF copy check failed: tensor {tensor.name} differs from the original")
    if set(new_tensors) != set(added):
        raise ExportError(f"GGUF copy check failed: added tensors {sorted(new_tensors)}, expected {sorted(added)}")
    for name, array in added.items():
        tensor = new_tensors[name]
        if tensor.tensor_type != GGMLQuantizationType.F32 or not np.array_equal(np.asarray(tensor.data), array):
            raise ExportError(f"GGUF copy check failed: {name} does not hold the folded bias")
    for item in before.fields.values():
        if item.name.startswith("GGUF."):
            continue
        copy = after.get_field(item.name)
        expected = renamed.get(item.name, item.contents())
        if copy is None or copy.types != item.types or copy.contents() != expected:
            raise ExportError(f"GGUF copy check failed: metadata {item.name} differs from the original")

