"""neuroada-tools: NeuroAda sparse fine-tuning for Hugging Face models.

Pipeline: ``index`` (per-row top-k of |W| from a safetensors checkpoint) ->
``train-sparse`` (train fp32 deltas at those positions only) -> ``merge``
(``W + scatter(delta)`` into safetensors or ONNX, with a logit parity check).
"""

__version__ = "0.1.0"
