"""The ``neuroada-tools`` command line: parse options, call the library, map errors to exit codes.

Exit codes: 0 success, 1 parity check failed, 2 bad input (one line on stderr, no traceback),
130 interrupted.
"""

from __future__ import annotations

from neuroada_tools.kernels.native import shorten_openmp_spin

shorten_openmp_spin()  # before anything imports torch (see native.py)

import click  # noqa: E402

from neuroada_tools import __version__  # noqa: E402
from neuroada_tools.cli import check, convert_gguf, demo, evaluate, generate, index, merge, train_sparse  # noqa: E402


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="\b\nExample:\n  neuroada-tools index ./my-model -k 20 -o my-model.index.safetensors\n  neuroada-tools "
        "<command> --help",
)
@click.version_option(__version__, prog_name="neuroada-tools")
def main() -> None:
    """NeuroAda sparse fine-tuning: index -> train-sparse -> merge (safetensors / ONNX)."""


for _module in (convert_gguf, index, train_sparse, merge, check, generate, evaluate, demo):
    main.add_command(_module.command)


if __name__ == "__main__":
    main()
