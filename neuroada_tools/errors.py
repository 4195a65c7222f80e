"""One exception class per kind of user error.

Library code raises these and never prints or exits; ``cli.py`` turns them into
one line on stderr and an exit code (2 for bad input, 1 for a failed parity
check). Messages say what, where, what was expected and what was found, e.g.
``index.safetensors: 'model.layers.0.mlp.up_proj.weight' row 17: indices not increasing (40 >= 40)``.
"""

from __future__ import annotations


class NeuroAdaError(Exception):
    """Base class of every error a user can cause. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class CheckpointError(NeuroAdaError):
    """A base checkpoint (file, shard, sharded index or folder) is missing or malformed."""


class GGUFError(CheckpointError):
    """A GGUF file cannot be converted: not GGUF, truncated, an architecture transformers cannot
    read, or the ``gguf`` extra is not installed."""


class SidecarError(NeuroAdaError):
    """An index or delta sidecar breaks a MUST of its spec in formats/."""


class FingerprintError(SidecarError):
    """A sidecar was made from a different base than the one it is applied to."""


class TargetError(NeuroAdaError):
    """Target selection failed: nothing matched, or a match is not an adaptable 2-D float weight."""


class DataError(NeuroAdaError):
    """A training or evaluation data file is malformed (names file and line)."""


class OutputError(NeuroAdaError):
    """An output path exists, is an input, or lies inside the base model folder."""


class OptionError(NeuroAdaError):
    """Command-line options that do not go together (e.g. ``--data`` without ``--criterion gradient``)."""


class ModelError(NeuroAdaError):
    """A model folder cannot be loaded or does not fit the sidecars."""


class BuilderError(ModelError):
    """onnxruntime-genai's model builder cannot run (the ``genai`` extra is missing), does not know
    the architecture (``--exporter torch`` is the fallback), or failed."""


class QuantizationError(ModelError):
    """A quantized frozen base cannot be used: its library (the ``quant`` extra) is missing, the
    scheme cannot run on the device, or the model has no layer it quantizes."""


class TrainingError(NeuroAdaError):
    """Training cannot continue (e.g. the loss became NaN); the last good checkpoint is kept."""


class ParityError(NeuroAdaError):
    """Merged or exported logits differ from the unmerged model beyond tolerance."""

    exit_code = 1
