"""Map checkpoint tensor names to a model's parameter names.

A checkpoint saved from a base class (``BertModel``: ``encoder.layer.0...``) is often loaded into
a task class that wraps it (``BertForSequenceClassification``: ``bert.encoder.layer.0...``), and
the reverse (``LlamaForCausalLM`` checkpoint ``model.layers.0...`` into ``LlamaModel``:
``layers.0...``). Sidecars always use the checkpoint's names; this module finds, for each, the one
parameter of the loaded model it denotes: exact name first, else the unique parameter whose name
equals it after adding or removing whole leading dotted components.
"""

from __future__ import annotations

from collections.abc import Iterable

from neuroada_tools.errors import ModelError


def match_names(ckpt_names: Iterable[str], model_names: Iterable[str]) -> dict[str, str]:
    """Return ``{checkpoint name: model name}`` for every checkpoint name that has a match.

    Example: ``match_names(["encoder.layer.0.q.weight"], ["bert.encoder.layer.0.q.weight",
    "classifier.weight"])`` gives ``{"encoder.layer.0.q.weight": "bert.encoder.layer.0.q.weight"}``.
    Names with no match are left out; a name with two equally good matches raises ``ModelError``.
    """
    model_list = list(model_names)
    model_set = set(model_list)
    # index model names by every dotted suffix, and record the number of stripped components
    by_suffix: dict[str, list[tuple[int, str]]] = {}
    for m in model_list:
        parts = m.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append((i, m))
    out: dict[str, str] = {}
    for c in ckpt_names:
        if c in model_set:
            out[c] = c
            continue
        # model adds a prefix: the model name ends with "." + c
        cands = [(i, m) for i, m in by_suffix.get(c, []) if i > 0]
        if not cands:
            # checkpoint has a prefix the model lacks: c ends with "." + model name
            parts = c.split(".")
            for i in range(1, len(parts)):
                s = ".".join(parts[i:])
                if s in model_set:
                    cands = [(i, s)]
                    break
        if not cands:
            continue
        best = min(i for i, _ in cands)
        top = sorted({m for i, m in cands if i == best})
        if len(top) > 1:
            raise ModelError(f"checkpoint tensor {c!r} matches several model parameters: {', '.join(top)}")
        out[c] = top[0]
    return out
