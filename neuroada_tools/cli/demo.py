"""``neuroada-tools demo``: the whole pipeline on a real pretrained model (``neuroada_tools/demo/``).

Default: SmolLM2-135M-Instruct learns facts about a fictional archipelago (``demo/llm.py``);
``--model minilm`` (or an encoder folder) runs the classifier demo instead (``demo/classifier.py``).
Progress goes to stderr, the report (or ``--json``) to stdout.
"""

from __future__ import annotations

from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors

EPILOG = """\b
Examples:
  neuroada-tools demo --out ./neuroada-demo
  neuroada-tools demo --steps 60 --lr 3e-3 --json
  neuroada-tools demo --model minilm
  neuroada-tools demo --model minilm --data ../shared/data/boolq/train.json --label-field answer --steps 200
"""


@click.command("demo", epilog=EPILOG)
@click.option("--model", default="smollm2", show_default=True,
              help="smollm2 (the LLM demo), minilm (the classifier demo), or a model folder: a causal LM with a "
                   "chat template runs the LLM demo, an encoder the classifier demo.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Classifier demo only: classification data (default: built-in sentiment set).")
@click.option("--label-field", default=None, help="Classifier demo, --data: label field (e.g. answer for BoolQ).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("neuroada-demo"), show_default=True,
              help="Output folder.")
@click.option("-k", "k", type=int, default=None, help="Trainable connections per neuron (default: 20 LLM, 4 minilm).")
@click.option("--steps", type=int, default=None, help="Training steps (default: 20 LLM, 60 minilm).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: 1e-2 LLM, 5e-3 minilm).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@handle_errors
def command(model: str, data: Path | None, label_field: str | None, out: Path, k: int | None, steps: int | None,
            lr: float | None, as_json: bool, quiet: bool) -> None:
    """Run index -> train-sparse -> merge (safetensors + ONNX, parity-checked) -> answers from ONNX Runtime."""
    from neuroada_tools.errors import OptionError

    def say(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    folder = None if model in ("smollm2", "minilm") else Path(model)
    if model == "minilm" or (folder is not None and _is_encoder(folder)):
        from neuroada_tools.demo.classifier import human as human_classifier
        from neuroada_tools.demo.classifier import run_classifier_demo

        summary = run_classifier_demo(out, model=folder, data=data, label_field=label_field, k=k or 4,
                                      steps=steps or 60, lr=lr or 5e-3, say=say)
        emit(summary, as_json, lambda d: human_classifier(d, out))
        return
    if data is not None or label_field is not None:
        raise OptionError("--data and --label-field belong to the classifier demo (--model minilm)")
    from neuroada_tools.demo.llm import LLMDemoSettings, run_llm_demo

    settings = LLMDemoSettings()
    for name, value in (("k", k), ("steps", steps), ("lr", lr)):
        if value is not None:
            setattr(settings, name, value)
    result = run_llm_demo(out, settings, model=folder, say=say)
    emit(result.to_dict(), as_json, lambda d: human(d, out))
    if not result.parity["passed"]:
        from neuroada_tools.errors import ParityError

        bad = [f"{n}: max abs {c['max_abs']:.3g} > tolerance {c['tolerance']:.3g}"
               for n, c in result.parity["comparisons"].items() if not c["passed"]]
        if result.parity.get("generation") and not result.parity["generation"]["passed"]:
            bad.append(result.parity["generation"]["mismatch"])
        raise ParityError(f"parity check failed ({result.parity['dtype']}): " + "; ".join(bad))


def _is_encoder(folder: Path) -> bool:
    """True when ``folder/config.json`` names no causal-LM architecture (a BERT-like encoder)."""
    import json

    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(archs) and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def human(d: dict, out: Path, shown: int = 6) -> str:
    """A few held-out answers side by side, the accuracies and the time taken."""
    from neuroada_tools.check.run import human as human_check

    def one_line(text: str) -> str:
        return " ".join(text.split())

    lines = [human_check(d["parity"]), "", f"held-out questions (first {shown} of {len(d['answers'])}; "
             "right = the expected name appears in the greedy answer):"]
    for a in d["answers"][:shown]:
        lines.append(f"  Q: {a['prompt']}   (expected: {a['expected']})")
        lines.append(f"     base  [{'right' if a['base_correct'] else 'wrong'}]: {one_line(a['base'])}")
        lines.append(f"     tuned [{'right' if a['tuned_correct'] else 'wrong'}]: {one_line(a['tuned'])}")
    n = len(d["answers"])
    lines.append(f"held-out accuracy: base {round(d['base_accuracy'] * n)}/{n}, "
                 f"tuned (ONNX Runtime) {round(d['tuned_accuracy'] * n)}/{n}")
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in d["seconds"].items())
    lines.append(f"done in {sum(d['seconds'].values()):.0f}s ({steps}); outputs in {out}/")
    return "\n".join(lines)
