"""Streaming merge of an index + delta into a base checkpoint, written as a Hugging Face folder.

Per base tensor, one at a time: an adapted tensor becomes ``cast(fp32(W) + scatter(delta))``
(the scatter in logical (out, in) orientation, also for transposed Conv1D storage); every other
tensor is copied (cast only if ``dtype`` asks). The base's sharding is kept (or re-cut by
``max_shard_size``), ``model.safetensors.index.json`` written where sharded, config and tokenizer
files copied. The folder always carries what downstream tools read: ``architectures`` in
config.json (derived from the task's model class if the base lacks it), generation_config.json
for causal LMs (derived from the config if the base lacks it) and the chat templates.
Dense task-head tensors from the delta are added, and when the task model's names differ from the
base checkpoint's (all-MiniLM-L6-v2 stores ``encoder.layer...``, a
``BertForSequenceClassification`` expects ``bert.encoder.layer...``) every tensor is written under
the task model's name, so ``AutoModelFor...from_pretrained(out)`` loads with no missing or
unexpected keys.

Everything is written into a temporary folder beside the output and renamed into place at the end.

Worked example of the arithmetic (one row, k=2, bf16 base): ``W[0] = [1.0, -2.0, 0.5]``,
``idx[0] = [0, 1]``, ``delta[0] = [0.25, 0.001]`` -> fp32 ``[1.25, -1.999, 0.5]`` -> bf16
``[1.25, -2.0, 0.5]`` (the small update rounds away in bf16, exactly as it would in the bypass).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from neuroada_tools import hf
from neuroada_tools.check.binding import check_shapes
from neuroada_tools.errors import ModelError, SidecarError
from neuroada_tools.io.checkpoint import INDEX_JSON, Checkpoint, open_checkpoint
from neuroada_tools.io.names import match_names
from neuroada_tools.io.outputs import check_output_dir, copy_file, remove_stale_temporaries, staged_dir, write_text
from neuroada_tools.io.safetensors_file import DTYPES, FLOAT_DTYPES, TORCH_TO_ST, StreamingWriter
from neuroada_tools.io.sidecar import (
    DENSE_PREFIX,
    DeltaSidecar,
    IndexSidecar,
    read_delta,
    read_index,
    verify_fingerprint,
)

SIDE_FILES_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
NOT_COPIED = {INDEX_JSON, "config.json"}
CHAT_TEMPLATES_DIR = "chat_templates"  # transformers' folder of named templates (tool_use.jinja, ...)


@dataclass
class MergeSummary:
    output: str
    files: list[str]
    tensors_merged: int
    tensors_copied: int
    dense_tensors: int
    bytes_written: int
    dtype: str
    task: str

    def to_dict(self) -> dict:
        return asdict(self)


def merge_tensor(stored: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, transposed: bool,
                 out_dtype: torch.dtype, *, inplace: bool = False, name: str = "tensor") -> torch.Tensor:
    """``cast(fp32(W) + scatter(delta))`` for one weight, in its stored orientation.

    Only the ``d_out * k`` selected entries change: they are gathered, added in fp32 and cast once;
    every other entry is ``cast(fp32(W)) = W`` (exact when the dtype is kept). So no fp32 copy of
    the whole weight is made, and with ``inplace`` and the same dtype the stored tensor is updated
    where it lies.

    Example: ``stored = [[1., 2.], [3., 4.]]`` as an nn.Linear weight, ``idx = [[1], [0]]``,
    ``delta = [[0.5], [-1.]]`` -> ``[[1., 2.5], [2., 4.]]``. For a Conv1D (``transposed``) the
    same idx/delta address logical rows, i.e. columns of the stored tensor: -> ``[[1., 1.], [3.5, 4.]]``.

    A sum that is finite in fp32 but not after the cast (``1e38`` added to an fp16 weight), or a
    finite base value that the cast makes infinite, raises ``SidecarError`` naming ``name``.
    """
    d_out, k = idx.shape
    rows = torch.arange(d_out, dtype=torch.int64, device=stored.device).unsqueeze(1)
    cols = idx.to(device=stored.device, dtype=torch.int64)
    # flat offsets into the stored (contiguous) tensor: [out, in] -> r*d_in + c; [in, out] -> c*d_out + r
    flat = (cols * d_out + rows) if transposed else (rows * stored.shape[1] + cols)
    flat = flat.view(-1)
    src = stored.contiguous().view(-1)
    base = src[flat]
    values = (base.to(torch.float32) + delta.to(device=stored.device, dtype=torch.float32).reshape(-1)).to(out_dtype)
    if out_dtype.is_floating_point:
        bad = ~torch.isfinite(values) & torch.isfinite(base)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            r, c = j // k, int(cols.view(-1)[j])
            raise SidecarError(
                f"{name!r}: merged value W[{r}, {c}] = {float(base[j]):.6g} + {float(delta.reshape(-1)[j]):.6g} "
                f"overflows {str(out_dtype).removeprefix('torch.')}; the delta is unusable with this base/dtype"
            )
    if out_dtype == stored.dtype and inplace and stored.is_contiguous():
        out = stored
    else:
        out = checked_cast(stored, out_dtype, name).contiguous()
    out.view(-1)[flat] = values
    return out


def checked_cast(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``t.to(dtype)`` (a copy), refusing finite values that the cast turns into Inf.

    Example: an fp32 weight holding ``1e5`` cast to fp16 (max 65504) raises ``SidecarError``.
    """
    out = t.to(dtype, copy=True)
    if dtype.is_floating_point and t.dtype != dtype and t.is_floating_point():
        bad = ~torch.isfinite(out) & torch.isfinite(t)
        if bool(bad.any()):
            j = int(bad.reshape(-1).nonzero()[0])
            raise SidecarError(
                f"{name!r}: value {float(t.reshape(-1)[j]):.6g} overflows {str(dtype).removeprefix('torch.')} "
                "(choose another --dtype)"
            )
    return out




def load_sidecars(index_path: Path, delta_path: Path) -> tuple[IndexSidecar, DeltaSidecar]:
    index = read_index(index_path)
    delta = read_delta(delta_path, index)
    return index, delta


def task_names(ckpt: Checkpoint, delta: DeltaSidecar, task: str, config) -> dict[str, str]:
    """Checkpoint name -> output name. Identity unless a dense head needs the task model's names."""
    names = {n: n for n in ckpt.tensors}
    if not delta.dense:
        return names
    from neuroada_tools.hf import meta_parameter_names

    model_names = meta_parameter_names(config, task)
    mapping = match_names(list(ckpt.tensors), model_names)
    for dense_name in delta.dense:
        if dense_name not in model_names:
            raise SidecarError(f"delta: dense tensor {dense_name!r} is not a parameter of the {task} model")
    for n in ckpt.tensors:
        if n in mapping:
            names[n] = mapping[n]
    return names


def plan_shards(ckpt: Checkpoint, max_shard_size: int | None, out_bytes: dict[str, int]) -> list[list[str]]:
    """Lists of checkpoint names per output file: the base's own sharding, or a greedy re-cut."""
    if max_shard_size is None:
        by_file: dict[Path, list[str]] = {f: [] for f in ckpt.files}
        for n, ref in ckpt.tensors.items():
            by_file[ref.file].append(n)
        return [by_file[f] for f in ckpt.files if by_file[f]]
    shards: list[list[str]] = [[]]
    size = 0
    for n in ckpt.tensors:
        if shards[-1] and size + out_bytes[n] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += out_bytes[n]
    return shards


def shard_file_names(ckpt: Checkpoint, shards: list[list[str]], resharded: bool) -> list[str]:
    if len(shards) == 1:
        return ["model.safetensors"]
    if not resharded and len(ckpt.files) == len(shards):
        return [f.name for f in ckpt.files]
    n = len(shards)
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def merge_to_folder(
    model: Path | str,
    index_path: Path | str,
    delta_path: Path | str,
    out: Path | str,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    force: bool = False,
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> MergeSummary:
    """Merge and write an ordinary Hugging Face model folder at ``out`` (atomically)."""
    out = Path(out)
    ckpt = open_checkpoint(model)
    check_output_dir(ckpt.root, out, force)
    index, delta = load_sidecars(Path(index_path), Path(delta_path))
    check_shapes(index, ckpt)
    task = delta.task or "causal-lm"
    config = _task_config(ckpt, delta, task)
    names = task_names(ckpt, delta, task, config)
    out_dtype = hf.DTYPES[dtype] if dtype else None

    def target_dtype(st_dtype: str) -> str:
        if out_dtype is None or st_dtype not in FLOAT_DTYPES:
            return st_dtype
        return TORCH_TO_ST[out_dtype]

    # a trained head replaces any head the base already had (e.g. another label count)
    replaced = [n for n in ckpt.tensors if names[n] in delta.dense]
    out_bytes = {n: ref.raw.numel * DTYPES[target_dtype(ref.dtype)][1] for n, ref in ckpt.tensors.items()}
    shards = [[n for n in s if n not in replaced] for s in plan_shards(ckpt, max_shard_size, out_bytes)]
    shards = [s for s in shards if s]
    files = shard_file_names(ckpt, shards, max_shard_size is not None)
    head_dtype = out_dtype or _dominant_float(ckpt)
    dense = {n: checked_cast(t, head_dtype, DENSE_PREFIX + n) for n, t in sorted(delta.dense.items())}
    meta = {"format": "pt", "neuroada.index_sha256": index.digest, "neuroada.delta_sha256": delta.digest}
    if progress_total:
        progress_total(ckpt.total_bytes)

    remove_stale_temporaries(out)
    with staged_dir(out) as tmp:
        weight_map: dict[str, str] = {}
        buffer = ckpt.buffer_for(list(ckpt.tensors))
        merged = written = 0
        for i, (shard, fname) in enumerate(zip(shards, files)):
            entries = [(names[n], target_dtype(ckpt.tensors[n].dtype), ckpt.tensors[n].shape) for n in shard]
            extra = list(dense.items()) if i == len(shards) - 1 else []
            entries += [(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in extra]
            w = StreamingWriter(tmp / fname, entries, meta)
            try:
                for n in shard:
                    stored = ckpt.read(n, buffer)
                    dt = DTYPES[target_dtype(ckpt.tensors[n].dtype)][0]
                    if n in index.indices:
                        entry = index.entries[n]
                        logical = stored.t() if entry.transposed else stored
                        verify_fingerprint(index, n, logical, str(ckpt.root))
                        t = merge_tensor(stored, index.indices[n], delta.deltas[n], entry.transposed, dt,
                                         inplace=True, name=n)
                        merged += 1
                    else:
                        t = stored if stored.dtype == dt else checked_cast(stored, dt, n)
                    w.write(names[n], t)
                    weight_map[names[n]] = fname
                    written += t.numel() * t.element_size()
                    if progress:
                        progress(ckpt.tensors[n].raw.nbytes)
                for n, t in extra:
                    w.write(n, t)
                    weight_map[n] = fname
                    written += t.numel() * t.element_size()
                w.close()
            except BaseException:
                w.abort()
                raise
        if len(files) > 1:
            doc = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
            write_text(tmp / INDEX_JSON, json.dumps(doc, indent=2) + "\n")
        _write_config(ckpt, tmp, config, out_dtype, delta, task)
        _copy_side_files(ckpt.root, tmp)
        _write_generation_config(ckpt, tmp, config, task)
    return MergeSummary(
        output=str(out), files=files, tensors_merged=merged, tensors_copied=len(ckpt.tensors) - merged - len(replaced),
        dense_tensors=len(dense), bytes_written=written,
        dtype=str(out_dtype or "base").removeprefix("torch."), task=task,
    )


def _dominant_float(ckpt: Checkpoint) -> torch.dtype:
    sizes: dict[str, int] = {}
    for ref in ckpt.tensors.values():
        if ref.dtype in FLOAT_DTYPES:
            sizes[ref.dtype] = sizes.get(ref.dtype, 0) + ref.raw.nbytes
    return DTYPES[max(sizes, key=sizes.get)][0] if sizes else torch.float32


def _task_config(ckpt: Checkpoint, delta: DeltaSidecar, task: str):
    if not delta.dense:
        return None
    from neuroada_tools.hf import task_config

    labels = delta.info.get("label_names") or None
    return task_config(ckpt.root, task, num_labels=delta.info.get("num_labels"), label_names=labels)


def _write_config(ckpt: Checkpoint, tmp: Path, config, out_dtype: torch.dtype | None, delta: DeltaSidecar,
                  task: str) -> None:
    """config.json of the merged folder: the base's (byte for byte when nothing changes), with
    ``dtype`` if ``--dtype`` changed it and ``architectures`` if the base lacks it (a GGUF
    conversion or a hand-written config; onnxruntime-genai's builder reads ``architectures[0]``)."""
    if config is not None:  # task model: the config transformers needs to rebuild the head
        config.architectures = [_task_arch(config, delta.task)]
        if out_dtype is not None:
            config.dtype = out_dtype
        config.save_pretrained(str(tmp))
        return
    src = ckpt.root / "config.json"
    if not src.is_file():
        return
    doc = json.loads(src.read_text(encoding="utf-8"))
    arch = None if doc.get("architectures") else _base_arch(ckpt.root, task)
    if out_dtype is None and arch is None:
        copy_file(src, tmp / "config.json")
        return
    if arch is not None:
        doc["architectures"] = [arch]
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        doc["dtype"] = name
        if "torch_dtype" in doc:
            doc["torch_dtype"] = name
    write_text(tmp / "config.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _task_arch(config, task: str) -> str:
    from neuroada_tools.hf import auto_class

    cls = auto_class(task)
    return cls._model_mapping[type(config)].__name__


def _base_arch(root: Path, task: str) -> str | None:
    """The class name transformers loads ``root`` with for ``task`` (``LlamaForCausalLM``), or None
    where it has no such class (the config is then left without ``architectures``)."""
    from neuroada_tools.hf import task_config

    try:
        return _task_arch(task_config(root, task), task)
    except (KeyError, ValueError, ModelError):  # a model_type transformers does not know: leave it
        return None


def _write_generation_config(ckpt: Checkpoint, tmp: Path, config, task: str) -> None:
    """A causal LM's merged folder always has generation_config.json: the base's (copied with the
    side files), else the one transformers derives from the config (bos/eos/pad ids), unless
    transformers cannot read the config."""
    if task != "causal-lm" or (tmp / "generation_config.json").exists() or not (tmp / "config.json").is_file():
        return
    from transformers import GenerationConfig

    from neuroada_tools.hf import quiet_transformers, task_config

    try:
        config = config or task_config(ckpt.root, task)
    except ModelError:  # a model_type transformers does not know: nothing to derive from
        return
    with quiet_transformers():
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))


def _copy_side_files(root: Path, tmp: Path) -> None:
    """Tokenizer files, generation_config.json, chat_template.jinja / .json, and the named
    templates transformers keeps in ``chat_templates/*.jinja``."""
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix in SIDE_FILES_SUFFIXES and f.name not in NOT_COPIED and not (tmp / f.name).exists():
            copy_file(f, tmp / f.name)
    templates = root / CHAT_TEMPLATES_DIR
    if templates.is_dir():
        for f in sorted(templates.glob("*.jinja")):
            if f.is_file():
                (tmp / CHAT_TEMPLATES_DIR).mkdir(exist_ok=True)
                copy_file(f, tmp / CHAT_TEMPLATES_DIR / f.name)



