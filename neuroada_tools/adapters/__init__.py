"""The adapter API: NeuroAda deltas on a loaded Hugging Face model, by name, as PEFT does for LoRA.

| PEFT | neuroada-tools |
|---|---|
| ``get_peft_model(model, config)`` | ``apply(model, index)`` (zeros, to train) |
| ``PeftModel.from_pretrained`` / ``load_adapter`` | ``apply(model, index, delta, name=...)`` |
| ``set_adapter(name)`` | ``set_active(model, name)`` |
| ``delete_adapter(name)`` / ``unload()`` | ``remove(model, name)`` / ``remove(model)`` |
| ``merge_and_unload()`` | ``apply(model, index, delta, merge=True)`` |
| ``add_weighted_adapter`` | ``combine(deltas, weights)`` |
| ``save_pretrained`` | ``save_delta(model, path)`` |
| ``Trainer`` with a ``PeftModel`` | ``NeuroAdaTrainer`` |
| TRL ``SFTTrainer(peft_config=...)`` | ``NeuroAdaSFTTrainer`` |

Files: ``api.py`` (apply, set_active, remove, list_adapters, save_delta), ``registry.py`` (several named
adapters on one model over the one-attachment bypass of ``train/bypass/``), ``arithmetic.py`` (``combine``: task
arithmetic), ``trainer.py`` (``transformers.Trainer`` checkpoints that hold the delta sidecar
instead of the model: ``NeuroAdaTrainerMixin``, ``NeuroAdaTrainer``), ``sft.py`` (the same for TRL's
``SFTTrainer``). Left out: several adapters active at once (their deltas can be summed into
one with ``combine``), FSDP / DeepSpeed under Trainer, adapters on a model already merged.
"""

from __future__ import annotations

from neuroada_tools.adapters.api import apply, list_adapters, remove, save_delta, set_active
from neuroada_tools.adapters.arithmetic import combine

# NeuroAdaSFTTrainer (below) needs the trl extra: left out of __all__, so `import *` works without it
__all__ = ["NeuroAdaTrainer", "NeuroAdaTrainerMixin", "apply", "combine", "list_adapters", "remove", "save_delta",
           "set_active"]


def __getattr__(name: str):
    if name in ("NeuroAdaTrainer", "NeuroAdaTrainerMixin"):  # imports transformers.Trainer (and accelerate)
        from neuroada_tools.adapters import trainer

        return getattr(trainer, name)
    if name == "NeuroAdaSFTTrainer":  # imports trl: ModelError naming the extra where it is missing
        from neuroada_tools.adapters.sft import NeuroAdaSFTTrainer

        return NeuroAdaSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
