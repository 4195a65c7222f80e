"""Export a merged Hugging Face model folder to ONNX.

What it does: load an ordinary (merged) model folder with transformers -- a causal LM through
``AutoModelForCausalLM``, an encoder classifier through ``AutoModelForSequenceClassification`` or
``AutoModelForMultipleChoice``, never with ``trust_remote_code`` and never from the network -- wrap
it in a small module that returns only the logits, and export that with
``torch.onnx.export(..., dynamo=True, opset_version=18)``.

Files written into ``out_dir`` (which must not exist yet, or be empty):

``model.onnx``
    inputs ``input_ids`` [batch, sequence] int64, ``attention_mask`` [batch, sequence] int64 and,
    for BERT-like models (forward takes ``token_type_ids`` and ``config.type_vocab_size >= 2``),
    ``token_type_ids``; one output ``logits``: [batch, sequence, vocab] for a causal LM,
    [batch, num_labels] for a classifier. Multiple-choice models take [batch, num_choices, sequence]
    inputs and give [batch, num_choices] logits. Same semantics as ``model(input_ids, attention_mask)``
    (default position ids, so right padding gives the logits of the unpadded rows).
``model_with_past.onnx`` (``with_past=True``, causal LMs only)
    the KV-cache step, named as optimum names it: inputs ``input_ids`` [batch, sequence],
    ``attention_mask`` [batch, past_sequence + sequence], ``past_key_values.N.key`` and
    ``past_key_values.N.value`` [batch, kv_heads, past_sequence, head_dim] for every layer N;
    outputs ``logits`` [batch, sequence, vocab], ``present.N.key`` / ``present.N.value``
    [batch, kv_heads, past_sequence + sequence, head_dim]. Position ids are derived inside the graph
    from the mask as ``generate()`` does (``cumsum(attention_mask) - 1``, 1 at padded slots), so
    left- and right-padded batches continue at the right position. A prefill is the same graph with
    an empty past (``past_sequence = 0``). Only models whose cache is a plain ``DynamicCache`` of
    full-attention layers are supported (Llama, Mistral without sliding window, Qwen2, GPT-2, ...);
    others raise ``ModelError``.
``model.onnx.data`` / ``model_with_past.onnx.data``
    the weights, only when they exceed ``EXTERNAL_DATA_THRESHOLD`` bytes (protobuf's 2 GiB limit).
    With ``with_past``, both graphs read one ``model.onnx.data`` instead, whatever the size: one copy
    of the weights (``onnx_shared.py``).
``config.json``, ``generation_config.json`` and the tokenizer files that exist (``TOKENIZER_FILES``)
    copied unchanged next to the graphs.

Everything is written into a temporary folder beside ``out_dir`` and renamed into place at the end,
so an interrupted export leaves no half-written ``out_dir``. Each graph passes
``onnx.checker.check_model`` (path form, so it works with external data) and its input and output
names are checked against the list above.

Dtype: ``dtype="fp32"`` (default) upcasts bf16/fp16 weights to fp32 before the export, so the graph
computes exactly the fp32 upcast of the model; ``dtype="keep"`` exports in the model's own dtype
(note: ONNX Runtime's CPU provider lacks bf16 kernels for most ops).

What it leaves out: the with-past variant of encoder models, sliding-window / linear-attention /
encoder-decoder caches, quantised weights, graph optimisation beyond the exporter's own pass, and the
parity check itself (see ``parity.py``).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neuroada_tools.errors import ModelError
from neuroada_tools.export.onnx_shared import DATA_FILE as SHARED_DATA_FILE
from neuroada_tools.export.onnx_shared import share_weights
from neuroada_tools.export.onnx_wrappers import (
    EXPORT_BATCH,
    EXPORT_CHOICES,
    EXPORT_SEQ,
    LogitsOnly,
    LogitsOnlyWithTokenTypes,
    LogitsWithPast,
    example_inputs,
    with_past_args,
)
from neuroada_tools.hf import first_line, load_complete, quiet_transformers
from neuroada_tools.hf.signature import num_hidden_layers, past_names
from neuroada_tools.io.outputs import check_empty_output_dir, copy_file, staged_dir

OPSET = 18
MODEL_FILE = "model.onnx"
MODEL_WITH_PAST_FILE = "model_with_past.onnx"
DTYPES = ("fp32", "keep")

#: Weights above this many bytes go to a ``.data`` file beside the graph. Protobuf caps a message
#: at 2 GiB (2_147_483_648 bytes); 2 GB leaves ~147 MB of headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000

COPIED_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote. Paths point into the final ``out_dir``."""

    out_dir: Path
    model_path: Path
    task: str
    dtype: str  # the dtype the graph computes in, e.g. "float32"
    input_names: list[str]
    output_names: list[str]
    external_data: bool
    with_past_path: Path | None = None
    with_past_input_names: list[str] = field(default_factory=list)
    with_past_output_names: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exporter: str = "torch"  # "torch" (torch.onnx.export) or "genai" (onnxruntime-genai's model builder)


# --------------------------------------------------------------------------- export


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    *,
    task: str | None = None,
    with_past: bool = False,
    dtype: str = "fp32",
    external_data: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the model folder ``model_dir`` to ``out_dir/model.onnx`` (and ``model_with_past.onnx``).

    ``task``: "causal-lm" | "classification" | "multiple-choice", default from ``config.architectures``.
    ``dtype``: "fp32" (upcast bf16/fp16 weights) or "keep". ``external_data``: None decides by size
    (``EXTERNAL_DATA_THRESHOLD``); True/False forces it. ``progress`` receives one short line per stage.
    """
    start = time.monotonic()
    say = progress or (lambda _msg: None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: expected one of {DTYPES}")
    check_empty_output_dir(model_dir, out_dir)

    say(f"loading {model_dir}")
    model, task = load_complete(model_dir, task)
    if with_past and task != "causal-lm":
        raise ModelError(f"{model_dir}: with_past needs a causal LM; this is a {task} model")
    if dtype == "fp32":
        model = model.float()
    model_dtype = next(model.parameters()).dtype
    past_args = with_past_args(model) if with_past else None
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir) as tmp:
        say(f"exporting {MODEL_FILE} ({task}, {str(model_dtype).removeprefix('torch.')}, opset {OPSET})")
        in_names, out_names = export_plain(model, tmp / MODEL_FILE, external_data, task)
        result = ExportResult(
            out_dir=out_dir,
            model_path=out_dir / MODEL_FILE,
            task=task,
            dtype=str(model_dtype).removeprefix("torch."),
            input_names=in_names,
            output_names=out_names,
            external_data=external_data,
        )
        if with_past:
            say(f"exporting {MODEL_WITH_PAST_FILE}")
            result.with_past_input_names, result.with_past_output_names = export_with_past(
                model, tmp / MODEL_WITH_PAST_FILE, external_data, past_args
            )
            result.with_past_path = out_dir / MODEL_WITH_PAST_FILE
            say(f"sharing the weights of both graphs ({SHARED_DATA_FILE})")
            share_weights([tmp / MODEL_FILE, tmp / MODEL_WITH_PAST_FILE], SHARED_DATA_FILE)
            check_graph(tmp / MODEL_FILE, in_names, out_names)
            check_graph(tmp / MODEL_WITH_PAST_FILE, result.with_past_input_names, result.with_past_output_names)
            result.external_data = True
        say("copying config and tokenizer files")
        for name in (*COPIED_FILES, *TOKENIZER_FILES):
            if (model_dir / name).is_file():
                copy_file(model_dir / name, tmp / name)
                result.copied_files.append(name)
    result.seconds = time.monotonic() - start
    say(f"wrote {out_dir} in {result.seconds:.1f}s")
    return result




def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total




def export_plain(model: nn.Module, path: Path, external_data: bool, task: str) -> tuple[list[str], list[str]]:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if task == "multiple-choice":  # inputs [batch, num_choices, sequence]
        inputs = example_inputs(model, EXPORT_BATCH * EXPORT_CHOICES, EXPORT_SEQ)
        inputs = {k: v.view(EXPORT_BATCH, EXPORT_CHOICES, EXPORT_SEQ) for k, v in inputs.items()}
        axes = {0: batch, 1: torch.export.Dim("num_choices"), 2: seq}
    else:
        inputs = example_inputs(model, EXPORT_BATCH, EXPORT_SEQ)
        axes = {0: batch, 1: seq}
    wrapper = (LogitsOnlyWithTokenTypes if "token_type_ids" in inputs else LogitsOnly)(model).eval()
    names = list(inputs)
    dynamic = {name: axes for name in names}
    run_exporter(wrapper, tuple(inputs.values()), path, names, ["logits"], dynamic, external_data)
    return check_graph(path, names, ["logits"])




def export_with_past(model: nn.Module, path: Path, external_data: bool, args: tuple) -> tuple[list[str], list[str]]:
    n_layers = num_hidden_layers(model.config)
    past_in, present_out = past_names(n_layers)
    in_names = ["input_ids", "attention_mask", *past_in]
    out_names = ["logits", *present_out]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past_seq, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, [{0: batch, 2: past_seq} for _ in args[2]])
    wrapper = LogitsWithPast(model, n_layers).eval()
    try:
        run_exporter(wrapper, args, path, in_names, out_names, dynamic, external_data)
    except ModelError as e:
        raise ModelError(f"with-past export failed; this architecture may not support it: {e}") from e
    return check_graph(path, in_names, out_names)


def run_exporter(wrapper, args, path: Path, in_names, out_names, dynamic, external_data: bool) -> None:
    try:
        with quiet_export():
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes=dynamic,
                external_data=external_data,
                verbose=False,
            )
            program.save(path, external_data=external_data)
    except ModelError:
        raise
    except Exception as e:  # the exporter raises many kinds; name the model and the first line
        raise ModelError(
            f"torch.onnx.export (dynamo, opset {OPSET}) failed for {type(wrapper.model).__name__}: {first_line(e)}"
        ) from e


def check_graph(path: Path, in_names: list[str], out_names: list[str]) -> tuple[list[str], list[str]]:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ModelError(f"{path.name}: onnx.checker rejected the exported graph: {first_line(e)}") from e
    graph = onnx.load(str(path), load_external_data=False).graph
    got_in = [i.name for i in graph.input]
    got_out = [o.name for o in graph.output]
    if got_in != in_names or got_out != out_names:
        raise ModelError(
            f"{path.name}: exported names differ: expected inputs {in_names} outputs {out_names}, "
            f"found inputs {got_in} outputs {got_out}"
        )
    return got_in, got_out


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the exporter's progress lines and warnings (library code never prints)."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with quiet_transformers(), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
