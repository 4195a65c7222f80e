"""Build an ONNX Runtime GenAI folder from a merged decoder LLM with onnxruntime-genai's model builder.

What it does: run ``python -m onnxruntime_genai.models.builder -i MERGED -o OUT -p PRECISION -e EP``
on a merged safetensors folder, in a subprocess (the builder's command line has been stable since
its first releases; its Python API, ``parse_extra_options`` + ``create_model``, changed shape between
0.8 and 0.18, prints to stdout and keeps the model in this process's memory). The result is one
folder that the ORT GenAI runtime loads as it is:

``model.onnx`` + ``model.onnx.data``
    the decoder with its KV cache (GroupQueryAttention; inputs ``input_ids``, ``attention_mask``,
    ``past_key_values.N.key/value``; outputs ``logits``, ``present.N.key/value``): one graph, one
    copy of the weights, in ``fp32``, ``fp16``, ``bf16`` or ``int4`` (MatMulNBits, block 32).
``genai_config.json``
    what the runtime reads: the graph's input and output names, heads, context length, EOS/pad ids.
the tokenizer files and chat template, ``config.json`` and ``generation_config.json``
    copied byte for byte from the merged folder over the builder's re-saved ones (the forms of
    ``generate/`` and ``check/`` read the model's ids and limits from them).

Which models: decoder LLMs (task causal-lm) whose ``architectures[0]`` the installed builder lists
(:func:`supported_architectures` reads them from its source, so a newer builder brings its new
architectures along). Everything else goes through ``torch.onnx.export`` (``onnx_export.py``).

Precision and provider pairs are the builder's: fp32 on cpu or cuda, fp16 and bf16 on cuda, int4 on
cpu or cuda; others are refused before anything runs (:func:`check_precision`).

What it leaves out: the parity check (``check/run.py`` runs it on the folder through
``generate/genai.py``), the builder's extra options (QDQ, int4 block size, ...), multimodal models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from neuroada_tools.errors import BuilderError, OptionError
from neuroada_tools.export.onnx_export import TOKENIZER_FILES, ExportResult
from neuroada_tools.io.outputs import check_empty_output_dir, copy_file, staged_dir

BUILDER_MODULE = "onnxruntime_genai.models.builder"
PRECISIONS = ("fp32", "fp16", "bf16", "int4")
PROVIDERS = ("cpu", "cuda")
#: (precision, provider) pairs the builder accepts (its own table, "Valid precision + execution provider").
VALID_PAIRS = {("fp32", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("bf16", "cuda"), ("int4", "cpu"),
               ("int4", "cuda")}
#: Files ``generate`` and ``check`` read beside the graph, copied from the merged folder (with the tokenizer's).
COPIED_FILES = ("config.json", "generation_config.json")
INSTALL_HINT = "pip install 'neuroada-tools[genai]'"


def builder_available() -> bool:
    """True when onnxruntime-genai (with its model builder) and onnx_ir can be imported."""
    try:
        return (importlib.util.find_spec("onnxruntime_genai") is not None
                and importlib.util.find_spec("onnx_ir") is not None
                and importlib.util.find_spec(BUILDER_MODULE) is not None)
    except (ImportError, ValueError):
        return False


def require_builder() -> None:
    """Raise ``BuilderError`` naming the extra when the builder is not installed."""
    if not builder_available():
        raise BuilderError(f"onnxruntime-genai's model builder is not installed ({INSTALL_HINT}); "
                           "or export with --exporter torch")


def supported_architectures() -> frozenset[str]:
    """The ``architectures[0]`` names the installed builder dispatches on (read from its source).

    Example: with onnxruntime-genai 0.18, ``"LlamaForCausalLM" in supported_architectures()`` is True
    and ``"GPT2LMHeadModel"`` is not. Empty when the builder is missing or its source cannot be read.
    """
    try:
        spec = importlib.util.find_spec(BUILDER_MODULE)
        text = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
    except (ImportError, ValueError, OSError):
        return frozenset()
    return frozenset(re.findall(r'architectures\[0\]\s*==\s*"([A-Za-z0-9_]+)"', text))


def _config(model_dir: Path) -> dict:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def architecture_of(model_dir: Path) -> str:
    """``architectures[0]`` of a model folder's config.json ("" when it names none)."""
    archs = _config(model_dir).get("architectures")
    return str(archs[0]) if isinstance(archs, list) and archs else ""


def unsupported_reason(model_dir: Path, *, required: bool = False) -> str | None:
    """Why the builder's folder would not run this model (None when it would): an architecture the
    installed builder does not list, or a head size that is not a multiple of 8 (the runtime's
    GroupQueryAttention refuses it at the first token; the builder itself does not check). A config
    without ``architectures`` passes unless ``required`` (a base may lack it; the merged folder
    fills it in and is checked again).

    Example: a Qwen2 of hidden size 48 with 4 heads -> ``"head size 12 (GroupQueryAttention needs a
    multiple of 8)"``.
    """
    cfg = _config(model_dir)
    arch = architecture_of(model_dir)
    known = supported_architectures()
    if (arch or required) and known and arch not in known:
        return f"the model builder does not support {arch or 'a config without architectures'}"
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads
                                   else None)
    if isinstance(head, int) and head % 8:
        return f"head size {head} (GroupQueryAttention needs a multiple of 8)"
    return None


def check_architecture(model_dir: Path, *, required: bool = False) -> str:
    """``architectures[0]`` of ``model_dir``; ``BuilderError`` naming the fallback when
    :func:`unsupported_reason` finds one."""
    why = unsupported_reason(model_dir, required=required)
    if why is not None:
        raise BuilderError(f"{model_dir}: onnxruntime-genai cannot build or run this model: {why}; "
                           "export with --exporter torch")
    return architecture_of(model_dir)


def check_precision(precision: str, provider: str) -> None:
    """Refuse a precision or pair the builder does not build, e.g. fp16 on cpu."""
    if precision not in PRECISIONS:
        raise OptionError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if provider not in PROVIDERS:
        raise OptionError(f"provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if (precision, provider) not in VALID_PAIRS:
        ok = ", ".join(p for p, e in sorted(VALID_PAIRS) if e == provider)
        raise OptionError(f"--precision {precision} is not built for --provider {provider}; on {provider}: {ok}")


def build_genai(merged_dir: Path, out_dir: Path, *, precision: str = "fp32", provider: str = "cpu",
                timeout: float | None = None) -> ExportResult:
    """Build ``out_dir`` (an ORT GenAI folder) from the merged folder ``merged_dir``.

    Written into a temporary folder beside ``out_dir`` and renamed into place when complete. Raises
    ``BuilderError`` when the builder is missing, does not know the architecture, or fails (one line,
    the builder's last message).
    """
    require_builder()
    check_precision(precision, provider)
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    arch = check_architecture(merged_dir, required=True)
    check_empty_output_dir(merged_dir, out_dir)
    start = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir) as tmp:
        cache = tmp / ".builder-cache"
        cmd = [sys.executable, "-m", BUILDER_MODULE, "-i", str(merged_dir), "-o", str(tmp), "-p", precision,
               "-e", provider, "-c", str(cache)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        except subprocess.TimeoutExpired as e:
            raise BuilderError(f"{merged_dir}: the model builder ran past {timeout:g}s") from e
        if done.returncode != 0:
            raise BuilderError(f"{merged_dir}: the model builder failed ({arch}, {precision}, {provider}): "
                               f"{_last_message(done.stderr or done.stdout)}")
        _remove_tree(cache)
        for name in (*COPIED_FILES, *TOKENIZER_FILES):  # the merged folder's own, byte for byte
            if (merged_dir / name).is_file():
                copy_file(merged_dir / name, tmp / name)
        if not (tmp / "genai_config.json").is_file() or not (tmp / "model.onnx").is_file():
            raise BuilderError(f"{merged_dir}: the model builder wrote no genai_config.json / model.onnx")
        in_names, out_names = _graph_names(tmp / "model.onnx")
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(out_dir=out_dir, model_path=out_dir / "model.onnx", task="causal-lm", dtype=precision,
                        input_names=in_names, output_names=out_names,
                        external_data=any(f.endswith(".data") for f in files), copied_files=files,
                        seconds=time.monotonic() - start, exporter="genai")


def _graph_names(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def _last_message(text: str) -> str:
    """The builder's error in one line: its last non-empty line (a traceback ends with the exception)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    if "is not currently supported" in last:
        last += "; export with --exporter torch"
    return last[:400]


def _die_with_parent() -> None:
    """In the builder's process (Linux): SIGKILL it when merge dies, so a killed merge leaves no builder
    writing into a temporary folder the next run deletes."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
