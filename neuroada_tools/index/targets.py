"""Which checkpoint tensors NeuroAda adapts, and in which orientation they are stored.

Default targets come from the architecture, not from a list of names: the model class named by
``config.json`` is built on the ``meta`` device (no memory, no weights), and the targets are the
weights of its ``nn.Linear`` and GPT-2 ``Conv1D`` modules that live inside a repeated block (a
module path with a numeric component such as ``layers.3`` or ``h.0``). That covers q/k/v/o,
gate/up/down, fc1/fc2, c_attn/c_proj/c_fc, BERT query/key/value/dense for any architecture
transformers knows, and leaves out embeddings, norms (not Linear), the LM head, poolers and
classifier heads (outside the blocks). Importing the architecture's modeling code and building the
meta model costs ~2 s and ~150 MB, so the answer is cached (``architecture_linears_cached``: a JSON
file per config and transformers version under ``native.cache_dir()``); a second ``index`` of the
same architecture does not import transformers at all. Without a config.json the fallback is every 2-D float
``*.weight`` under a numbered block whose name does not look like a norm or an embedding.

``--target``/``--exclude`` use PEFT ``target_modules`` semantics on the module name (the tensor
name without ``.weight``): a pattern matches if it is a regex that matches the whole name, or if
the name equals it or ends with ``.`` + pattern.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from neuroada_tools.errors import TargetError
from neuroada_tools.io.checkpoint import Checkpoint
from neuroada_tools.io.names import match_names
from neuroada_tools.io.outputs import atomic_file
from neuroada_tools.io.safetensors_file import FLOAT_DTYPES
from neuroada_tools.kernels.native import cache_dir

_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")
_NOT_A_PROJECTION = re.compile(r"(norm|ln_|layernorm|embed|wte|wpe|rotary|bias$)", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """An adapted tensor: checkpoint name, logical (d_out, d_in), and storage orientation."""

    name: str
    d_out: int
    d_in: int
    transposed: bool  # stored [d_in, d_out] (GPT-2 Conv1D)

    @property
    def layout(self) -> str:
        return "in_out" if self.transposed else "out_in"


def module_name(tensor_name: str) -> str:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def pattern_matches(pattern: str, name: str) -> bool:
    """PEFT ``target_modules`` semantics: regex full match, exact name, or dotted-name suffix.

    Example: ``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``; ``r".*\\.0\\..*proj"``
    matches it as a regex; ``"proj"`` does not (not a whole dotted component).
    """
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def architecture_linears(config: dict) -> dict[str, bool] | None:
    """``{parameter name: transposed}`` for every Linear/Conv1D weight of the config's model class.

    Builds the model on the meta device; returns None when transformers cannot build it.
    """
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    from neuroada_tools.hf import quiet_transformers

    try:
        with quiet_transformers():
            cfg = transformers.AutoConfig.for_model(**config)
    except Exception:
        return None
    cls = None
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is not None:
            break
    try:
        with quiet_transformers(), torch.device("meta"):
            model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    except Exception:
        return None
    out: dict[str, bool] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[f"{mname}.weight"] = False
        elif isinstance(mod, Conv1D):
            out[f"{mname}.weight"] = True
    return out


_CACHE_VERSION = "neuroada-targets-1"


def _cache_path(config: dict) -> Path | None:
    try:
        version = metadata.version("transformers")
        blob = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except (metadata.PackageNotFoundError, TypeError, ValueError):
        return None
    tag = hashlib.sha256(f"{_CACHE_VERSION}\0{version}\0{blob}".encode()).hexdigest()
    return cache_dir() / "targets" / f"{tag}.json"


def architecture_linears_cached(config: dict) -> dict[str, bool] | None:
    """``architecture_linears(config)``, remembered on disk per (config, transformers version).

    The cache holds only derived facts (parameter names and a flag); an unreadable or malformed
    entry is ignored and rebuilt, and a cache that can't be written (read-only home) is skipped.
    ``NEUROADA_CACHE_DIR=`` a fresh folder, or deleting it, forces a rebuild.
    """
    path = _cache_path(config)
    if path is not None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            linears = data.get("linears") if isinstance(data, dict) else None
            items = linears.items() if isinstance(linears, dict) else ()
            ok = isinstance(linears, dict) and all(isinstance(k, str) and isinstance(v, bool) for k, v in items)
            if ok:
                return linears
        except (OSError, ValueError, UnicodeDecodeError):
            pass
    linears = architecture_linears(config)
    if linears is not None and path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps({"linears": linears}), encoding="utf-8")
        except OSError:
            pass
    return linears


def resolve_targets(
    ckpt: Checkpoint,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
) -> list[Target]:
    """The sorted list of tensors to adapt; raises ``TargetError`` naming any unusable match."""
    linears = architecture_linears_cached(ckpt.config) if ckpt.config else None
    transposed_of: dict[str, bool] = {}
    if linears is not None:
        mapping = match_names(list(ckpt.tensors), list(linears))
        transposed_of = {c: linears[m] for c, m in mapping.items()}
    if include:
        chosen = [n for n in ckpt.tensors if any(pattern_matches(p, module_name(n)) for p in include)]
    elif linears is not None:
        chosen = [n for n in transposed_of if _BLOCK.search(module_name(n))]
    else:
        chosen = [
            n
            for n in ckpt.tensors
            if n.endswith(".weight")
            and _BLOCK.search(module_name(n))
            and not _NOT_A_PROJECTION.search(module_name(n).rsplit(".", 1)[-1])
            and _is_2d_float(ckpt, n)
        ]
    if exclude:
        chosen = [n for n in chosen if not any(pattern_matches(p, module_name(n)) for p in exclude)]
    if not chosen:
        how = f"--target {' '.join(include)}" if include else "the default targets"
        raise TargetError(
            f"{ckpt.root}: no tensor matched {how}" + (f" after --exclude {' '.join(exclude)}" if exclude else "")
        )
    out = []
    for n in sorted(chosen):
        ref = ckpt.tensors[n]
        if ref.dtype not in FLOAT_DTYPES:
            raise TargetError(f"{n!r}: dtype {ref.dtype} is not a float weight and cannot be adapted")
        if len(ref.shape) != 2:
            raise TargetError(f"{n!r}: shape {list(ref.shape)} is not a 2-D weight and cannot be adapted")
        t = transposed_of.get(n, False)
        rows, cols = ref.shape
        d_out, d_in = (cols, rows) if t else (rows, cols)
        if d_out == 0 or d_in == 0:
            raise TargetError(f"{n!r}: empty weight {list(ref.shape)}")
        out.append(Target(n, d_out, d_in, t))
    return out


def _is_2d_float(ckpt: Checkpoint, name: str) -> bool:
    ref = ckpt.tensors[name]
    return len(ref.shape) == 2 and ref.dtype in FLOAT_DTYPES
