"""neuroada-tools: NeuroAda sparse fine-tuning for Hugging Face models.

Pipeline: ``index`` (per-row top-k of |W| from a safetensors checkpoint) ->
``train-sparse`` (train fp32 deltas at those positions only) -> ``merge``
(``W + scatter(delta)`` into safetensors or ONNX, with a logit parity check).

In Python, on a loaded transformers model (``neuroada_tools/adapters/``): ``apply``,
``set_active``, ``remove``, ``combine``, ``save_delta``, ``list_adapters``, ``NeuroAdaTrainer`` and
``NeuroAdaSFTTrainer`` (TRL).
They are imported on first use, so ``import neuroada_tools`` (and the CLI) stays light.
"""

__version__ = "0.1.0"

__all__ = ["NeuroAdaTrainer", "NeuroAdaTrainerMixin", "apply", "combine", "list_adapters", "remove", "save_delta",
           "set_active"]
_EXTRAS = ("NeuroAdaSFTTrainer",)  # needs the trl extra: left out of __all__, so `import *` works without it


def __getattr__(name: str):
    if name in __all__ or name in _EXTRAS:
        from neuroada_tools import adapters as _adapters

        return getattr(_adapters, name)
    raise AttributeError(f"module 'neuroada_tools' has no attribute {name!r}")
