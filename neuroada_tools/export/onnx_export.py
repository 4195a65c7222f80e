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
import inspect
import io
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neuroada_tools.errors import ModelError, OutputError

OPSET = 18
MODEL_FILE = "model.onnx"
MODEL_WITH_PAST_FILE = "model_with_past.onnx"
TASKS = ("causal-lm", "classification", "multiple-choice")  # as in tasks.py
DTYPES = ("fp32", "keep")

#: Weights above this many bytes go to a ``.data`` file beside the graph. Protobuf caps a message
#: at 2 GiB (2_147_483_648 bytes); 2 GB leaves ~147 MB of headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000

#: Shapes of the example inputs given to the exporter. Parity must run on other shapes.
EXPORT_BATCH = 2
EXPORT_SEQ = 8
EXPORT_PAST = 5
EXPORT_CHOICES = 3

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


# --------------------------------------------------------------------------- helpers shared with parity


def forward_params(model: nn.Module) -> set[str]:
    """Names of the keyword arguments ``model.forward`` accepts."""
    return set(inspect.signature(model.forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """The forward keyword that takes the KV cache: ``cache`` (transformers >= 5) or ``past_key_values``."""
    params = forward_params(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ModelError(f"{type(model).__name__}: forward takes no KV cache; cannot export with past")


def output_cache(outputs):
    """The cache object of a model output (``.cache`` in transformers >= 5, ``.past_key_values`` before)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def uses_token_type_ids(model: nn.Module) -> bool:
    """BERT-like models get a ``token_type_ids`` input (GPT-2's forward takes one too, but has no
    segment vocabulary; optimum leaves it out there, and so do we)."""
    config = model.config
    return "token_type_ids" in forward_params(model) and getattr(config, "type_vocab_size", 0) >= 2


def past_names(num_layers: int) -> tuple[list[str], list[str]]:
    """``(past input names, present output names)`` in optimum's order: layer-major, key before value."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, present


def position_ids_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Position ids of the last ``query_length`` tokens, counted over attended tokens only.

    Example: mask ``[[1, 1, 1, 0, 0, 1]]`` (3 real tokens, 2 pads, one new token), query_length 1
    -> ``[[3]]``: the new token continues the real sequence. Padded slots get 1, as in transformers.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -query_length:]


def flat_cache(cache, num_layers: int) -> list[torch.Tensor]:
    """``[k0, v0, k1, v1, ...]`` from a ``DynamicCache``; refuses anything but plain full-attention layers."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise ModelError(
            f"with-past export supports only a transformers DynamicCache; this model returns {type(cache).__name__}"
        )
    layers = list(cache.layers)
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ModelError(
            f"with-past export supports only full-attention cache layers (DynamicLayer); this model uses {', '.join(odd)}"
        )
    if len(layers) != num_layers:
        raise ModelError(f"with-past export: cache has {len(layers)} layers, config says {num_layers}")
    flat: list[torch.Tensor] = []
    for layer in layers:
        flat += [layer.keys, layer.values]
    return flat


def num_hidden_layers(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ModelError(f"config has no usable num_hidden_layers (found {n!r})")
    return n


# --------------------------------------------------------------------------- wrappers


class LogitsOnly(nn.Module):
    """``model(input_ids, attention_mask) -> logits`` (no cache, no loss, no hidden states)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._no_cache = {"use_cache": False} if "use_cache" in forward_params(model) else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self._no_cache).logits


class LogitsOnlyWithTokenTypes(LogitsOnly):
    """As ``LogitsOnly``, for BERT-like models that also take ``token_type_ids``."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **self._no_cache
        ).logits


class LogitsWithPast(nn.Module):
    """One cached decoding step on flat tensors: builds a ``DynamicCache`` from
    ``past = [k0, v0, k1, v1, ...]``, runs the model and returns ``(logits, *presents)``."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self._cache_kw = cache_kwarg(model)
        self._positions = "position_ids" in forward_params(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._positions:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask, input_ids.shape[1])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return (out.logits, *flat_cache(output_cache(out), self.num_layers))


# --------------------------------------------------------------------------- loading


def detect_task(config) -> str:
    """``causal-lm``, ``classification`` or ``multiple-choice`` from ``config.architectures``."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "classification"
        if arch.endswith("ForMultipleChoice"):
            return "multiple-choice"
    raise ModelError(
        f"config.json: cannot tell the task from architectures {archs}; "
        f"expected *ForCausalLM, *ForSequenceClassification or *ForMultipleChoice, or pass task= one of {TASKS}"
    )


def load_model(model_dir: Path, task: str | None = None) -> tuple[nn.Module, str]:
    """Load ``model_dir`` with transformers (local files only, no remote code) in eval mode."""
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMultipleChoice,
        AutoModelForSequenceClassification,
    )

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    if task is not None and task not in TASKS:
        raise ModelError(f"task {task!r}: expected one of {TASKS}")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{model_dir}/config.json: cannot load: {first_line(e)}") from e
    task = task or detect_task(config)
    auto = {
        "causal-lm": AutoModelForCausalLM,
        "classification": AutoModelForSequenceClassification,
        "multiple-choice": AutoModelForMultipleChoice,
    }[task]
    try:
        with quiet():
            model, info = auto.from_pretrained(
                model_dir, dtype="auto", trust_remote_code=False, local_files_only=True, output_loading_info=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"{model_dir}: cannot load as {auto.__name__} (transformers {transformers.__version__}, "
            f"model_type {getattr(config, 'model_type', '?')!r}): {first_line(e)}"
        ) from e
    missing = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing:
        # e.g. a bare BertModel loaded for classification: the head would be random, the export garbage
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise ModelError(
            f"{model_dir}: checkpoint lacks weights {type(model).__name__} needs ({shown}); they would be random. "
            f"Export a merged model that contains them"
        )
    model.eval()
    return model, task


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
    check_out_dir(model_dir, out_dir)

    say(f"loading {model_dir}")
    model, task = load_model(model_dir, task)
    if with_past and task != "causal-lm":
        raise ModelError(f"{model_dir}: with_past needs a causal LM; this is a {task} model")
    if dtype == "fp32":
        model = model.float()
    model_dtype = next(model.parameters()).dtype
    past_args = with_past_args(model) if with_past else None
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
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
        say("copying config and tokenizer files")
        for name in (*COPIED_FILES, *TOKENIZER_FILES):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
                result.copied_files.append(name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.replace(tmp, out_dir)
        except OSError as e:
            raise OutputError(f"{out_dir}: cannot move the export into place: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    result.seconds = time.monotonic() - start
    say(f"wrote {out_dir} in {result.seconds:.1f}s")
    return result


def check_out_dir(model_dir: Path, out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputError(f"{out_dir}: output folder exists and is not empty")
    model_abs, out_abs = model_dir.resolve(), out_dir.resolve()
    if out_abs == model_abs or model_abs in out_abs.parents:
        raise OutputError(f"{out_dir}: output folder lies inside the model folder {model_dir}")


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


def example_inputs(model: nn.Module, batch: int, seq: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with the last row right-padded (sizes >= 2 so no axis is specialised to 0/1)."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    vocab = int(config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size)
    pad = getattr(config, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if vocab > 1:
        ids = torch.where(ids == pad, (ids + 1) % vocab, ids)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    ids = ids.masked_fill(mask == 0, pad)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if uses_token_type_ids(model):
        tt = torch.zeros(batch, seq, dtype=torch.long)
        tt[:, seq // 2 :] = 1
        inputs["token_type_ids"] = tt * mask
    return inputs


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


def with_past_args(model: nn.Module) -> tuple:
    """Example ``(input_ids, attention_mask, past)`` for the with-past export, from a real prefill.

    Runs before anything is exported, so a model whose cache the graph cannot mirror (sliding
    window, linear attention, encoder-decoder) fails fast with a ``ModelError``.
    """
    arch = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(f"{arch}: with-past export of encoder-decoder models is not supported")
    n_layers = num_hidden_layers(model.config)
    cache_kwarg(model)  # refuses a model whose forward takes no cache
    prefill = example_inputs(model, EXPORT_BATCH, EXPORT_PAST, seed=1)
    prefill["attention_mask"][-1, -1] = 1  # pad in the middle of the past as well as at its end
    with torch.no_grad():
        out = model(**prefill, use_cache=True)
    try:
        past = [t.detach().clone() for t in flat_cache(output_cache(out), n_layers)]
    except ModelError as e:
        raise ModelError(f"{arch}: cannot export with past: {e}") from e
    step = example_inputs(model, EXPORT_BATCH, EXPORT_SEQ - EXPORT_PAST, seed=2)
    mask = torch.cat([prefill["attention_mask"], torch.ones_like(step["input_ids"])], dim=1)
    return step["input_ids"], mask, past


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
        with quiet():
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


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]


@contextlib.contextmanager
def quiet():
    """Silence the exporter's progress lines and warnings (library code never prints)."""
    import logging

    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        hf_logging.set_verbosity(hf_level)
        if bars:
            hf_logging.enable_progress_bar()
