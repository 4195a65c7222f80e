"""Shared helpers of ``tests/test_adapters_trl.py``: a chat template for the tiny fixture tokenizer,
a small conversational data set, ``NeuroAdaSFTTrainer`` runs with fixed settings, and SmolLM2-135M-
Instruct as a folder of links to the cached conversion (``tests/llmkit.py``).
"""

from __future__ import annotations

from pathlib import Path

#: ``User: ...`` / ``Assistant:`` + newline + answer; the assistant's text and end-of-turn token are marked
#: ``{% generation %}`` so that ``assistant_only_loss`` can find them. The newline before the answer
#: keeps the prompt's tokens a prefix of prompt + completion (a space would merge with the answer's
#: first word).
CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{ 'Assistant:\n' }}{% generation %}{{ m['content'] + eos_token }}"
    "{% endgeneration %}{{ '\n' }}"
    "{%- else %}{{ m['role'].capitalize() + ': ' + m['content'] + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Assistant:\n' }}{%- endif %}"
)


def conversations(n: int = 16) -> list[dict]:
    """``n`` two-turn ``messages`` examples (user question, assistant answer) of different lengths."""
    rows = []
    for i in range(n):
        a, b = i % 5, (3 * i) % 7
        rows.append({"messages": [
            {"role": "user", "content": f"What is {a} plus {b}?" + " Please answer." * (i % 3)},
            {"role": "assistant", "content": f"The answer is {a + b}."},
        ]})
    return rows


def chat_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def sft_args(out_dir: Path, steps: int, *, save_steps: int | None = None, **extra):
    """``SFTConfig`` for a deterministic CPU run: fp32 (``bf16`` off), fixed seed, no logging to files."""
    from trl import SFTConfig

    settings = dict(
        max_steps=steps, per_device_train_batch_size=4, learning_rate=2e-2, warmup_steps=0, lr_scheduler_type="linear",
        weight_decay=0.0, seed=0, bf16=False, use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, max_length=64,
        dataloader_num_workers=0,
    )
    return SFTConfig(str(out_dir), **{**settings, **extra})


def run_sft(model_dir: Path, index: Path, out_dir: Path, steps: int, *, data: list[dict] | None = None,
            resume: str | None = None, save_steps: int | None = None, stop_at: int | None = None, **extra):
    """Apply ``index`` to the model of ``model_dir`` and train ``steps`` SFT steps (the schedule's
    length; ``stop_at``: stop after that many); return the trainer."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback

    import neuroada_tools

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    model = neuroada_tools.apply(AutoModelForCausalLM.from_pretrained(str(model_dir)), index)
    trainer = neuroada_tools.NeuroAdaSFTTrainer(
        model=model, args=sft_args(out_dir, steps, save_steps=save_steps, **extra),
        train_dataset=datasets.Dataset.from_list(data if data is not None else conversations()),
        processing_class=chat_tokenizer(model_dir), callbacks=[Stop()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def smollm2_folder(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder in ``out``: links to the cached conversion
    (``tests/llmkit.py``; converted once per checkout by ``neuroada_tools.hf.gguf``)."""
    from tests.llmkit import linked_smollm2

    return linked_smollm2(out)
