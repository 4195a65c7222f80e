"""``run_generate``: prompts through a ``Source`` in batches, with text and a summary for the CLI.

Prompts are decoded in batches of ``batch_size`` in their given order (each batch left-padded by its
session), so results come back in order and a long file shows progress batch by batch. A prompt
whose length plus ``max_new_tokens`` exceeds the model's positions is refused before anything runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from neuroada_tools.errors import ModelError
from neuroada_tools.generate.decode import Sampling, generate_ids
from neuroada_tools.generate.prompts import completion_text, encode_prompts
from neuroada_tools.generate.sources import Source


@dataclass
class GenerateResult:
    source: dict
    sampling: dict
    max_new_tokens: int
    results: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompts"] = [r["prompt"] for r in self.results]
        d["new_tokens"] = sum(len(r["token_ids"]) for r in self.results)
        d["seconds"] = round(self.seconds, 3)
        return d


def check_lengths(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, limit: int | None) -> None:
    """Refuse a prompt that would run past the model's position limit."""
    if limit is None:
        return
    for n, ids in enumerate(prompt_ids, start=1):
        if len(ids) + max_new_tokens > limit:
            raise ModelError(f"prompt {n}: {len(ids)} tokens + {max_new_tokens} new tokens exceed the model's "
                             f"{limit} positions; lower --max-new-tokens or shorten the prompt")


def run_generate(
    source: Source,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    template: str = "plain",
) -> GenerateResult:
    """Generate for every prompt; ``progress(n)`` after each batch of ``n`` prompts. ``template``:
    ``plain`` (the prompt as it is), ``alpaca`` or ``chat`` (``generate.prompts``)."""
    if batch_size < 1:
        raise ModelError(f"batch size {batch_size}: expected at least 1")
    start = time.perf_counter()
    prompt_ids = encode_prompts(tokenizer, prompts, source.vocab, template)
    check_lengths(prompt_ids, max_new_tokens, source.max_positions)
    results: list[dict] = []
    for first in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[first : first + batch_size]
        generated = generate_ids(source.new_session(), batch, max_new_tokens, eos_ids=source.eos_ids,
                                 vocab=source.vocab, sampling=sampling, first_number=first)
        for n, g in enumerate(generated, start=first):
            results.append({"prompt": prompts[n], "prompt_ids": g.prompt_ids, "token_ids": g.token_ids,
                            "text": completion_text(tokenizer, g.prompt_ids, g.token_ids), "stop": g.stop})
        if progress is not None:
            progress(len(batch))
    return GenerateResult(source.describe(), sampling.to_dict(), max_new_tokens, results,
                          time.perf_counter() - start)


def human(summary: dict) -> str:
    """The prompts with what was generated after them; a header per prompt when there are several."""
    results = summary["results"]
    if len(results) == 1:
        return results[0]["prompt"] + results[0]["text"]
    blocks = []
    for n, r in enumerate(results, start=1):
        blocks.append(f"--- prompt {n} ({len(r['token_ids'])} tokens, stop: {r['stop']})\n{r['prompt']}{r['text']}")
    return "\n".join(blocks)
