"""``NeuroAdaSFTTrainer``: TRL's ``SFTTrainer`` for a model with NeuroAda adapters (``apply``).

It is ``NeuroAdaTrainerMixin`` (``adapters/trainer.py``) over ``trl.SFTTrainer``: SFTTrainer
prepares the data as it always does (plain ``text``, ``prompt``/``completion`` pairs, conversational
``messages`` through the tokenizer's chat template; ``completion_only_loss``,
``assistant_only_loss`` with a template that marks ``{% generation %}``; packing), computes its
loss, and logs its metrics; the mixin makes every checkpoint and ``save_model`` the delta sidecar
(``neuroada.delta.safetensors``, holding the index's SHA-256) instead of the model, and resumes
from it. Only the deltas (and a head trained with ``apply(..., head=True)``) require grad, so
they are all the optimizer holds.

What SFTTrainer would do to a model, and what happens here instead:

- ``peft_config`` wraps the model with PEFT: refused (the NeuroAda deltas are the adapter).
- ``gradient_checkpointing`` (on by default in ``SFTConfig``) runs as under Trainer: transformers
  enables checkpointing and ``enable_input_require_grads`` (an embedding hook, so the recomputed
  blocks see an input that requires grad); the bypass recomputes the same deltas. Left on.
- SFTTrainer computes the loss with a fused LM head that multiplies by ``lm_head.weight`` itself,
  not through the module: a delta on the LM head would never train, so an index that adapts the
  output embeddings is refused (the default targets leave it out).
- A quantized base (``is_loaded_in_4bit`` / ``8bit``): SFTTrainer casts every trainable parameter
  to bf16, and the deltas must stay fp32: refused.
- ``chat_template_path`` naming a tokenizer clones its template and resizes the embeddings (a
  model that is no longer the indexed base): refused; a ``.jinja`` file, or setting
  ``tokenizer.chat_template`` first, is fine.

Left out: everything SFTTrainer leaves to ``model`` being a name (``model_init_kwargs``); FSDP and
DeepSpeed (as ``NeuroAdaTrainer``). Importing this module needs TRL
(``pip install 'neuroada-tools[trl]'``).
"""

from __future__ import annotations

from torch import nn

from neuroada_tools.adapters import registry as reg_mod
from neuroada_tools.adapters.trainer import NeuroAdaTrainerMixin
from neuroada_tools.errors import ModelError

try:
    from trl import SFTTrainer
except ModuleNotFoundError as e:
    if e.name != "trl":
        raise
    raise ModelError("NeuroAdaSFTTrainer needs TRL: pip install 'neuroada-tools[trl]'") from None

__all__ = ["NeuroAdaSFTTrainer"]


class NeuroAdaSFTTrainer(NeuroAdaTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose checkpoints are the NeuroAda delta sidecar, not the model.

    ``model``: a model that ``neuroada_tools.apply()`` adapted. ``adapter``: the adapter to save and
    resume (default: the one active at each save). Every other argument is SFTTrainer's, except
    ``peft_config`` (refused; see the module docstring for the other refusals).

    >>> import datasets, neuroada_tools, os
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from trl import SFTConfig
    >>> model = neuroada_tools.apply(AutoModelForCausalLM.from_pretrained("base"), "base.k4.index.safetensors")
    >>> data = datasets.Dataset.from_list([{"prompt": "the quick brown", "completion": " fox"}] * 8)
    >>> args = SFTConfig("sft", max_steps=2, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
    ...                  bf16=False, report_to=[], disable_tqdm=True, use_cpu=True)
    >>> trainer = NeuroAdaSFTTrainer(model=model, args=args, train_dataset=data,
    ...                              processing_class=AutoTokenizer.from_pretrained("base"))
    >>> _ = trainer.train()
    {'train_runtime': ...}
    >>> trainer.save_model("sft/final")  # the sidecar and the tokenizer: no model.safetensors
    >>> sorted(os.listdir("sft/final"))
    ['neuroada.delta.safetensors', 'tokenizer.json', 'tokenizer_config.json']
    """

    def __init__(self, model=None, args=None, *rest, adapter: str | None = None, peft_config=None,
                 **kwargs) -> None:
        who = type(self).__name__
        if peft_config is not None:
            raise ModelError(f"{who}: peft_config would wrap the model with PEFT; the NeuroAda deltas are the "
                             "adapter (pass no peft_config)")
        if isinstance(model, nn.Module):
            _refuse(who, reg_mod.unwrap(model), args)
        super().__init__(model, args, *rest, adapter=adapter, **kwargs)


def _refuse(who: str, model: nn.Module, args) -> None:
    """What SFTTrainer would do to a NeuroAda model that breaks it (module docstring)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ModelError(f"{who}: a quantized base: SFTTrainer casts its trainable parameters to bf16, and the "
                         "NeuroAda deltas must stay fp32")
    template = getattr(args, "chat_template_path", None)
    if template is not None and not str(template).endswith((".jinja", ".j2")):
        raise ModelError(f"{who}: chat_template_path {str(template)!r} clones a tokenizer's template and resizes "
                         "the embeddings (no longer the indexed base); pass a .jinja file or set "
                         "tokenizer.chat_template")
    reg = reg_mod.registry(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if reg is None or head is None:
        return  # NeuroAdaTrainerMixin names a model without adapters
    names = {id(m): n for n, m in model.named_modules()}
    weight = f"{names.get(id(head), 'lm_head')}.weight"
    adapted = [a.name for a in reg.adapters.values() if weight in a.index.indices and a.merged is None]
    if adapted:
        raise ModelError(f"{who}: adapter {adapted[0]!r} adapts {weight!r}, but SFTTrainer's fused LM head reads "
                         "that weight directly, so its delta would never train; index without it "
                         "(--exclude lm_head)")
