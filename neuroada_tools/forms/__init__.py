"""Load a form of the tuned model: the base alone, base + bypass (unmerged), a merged folder, ONNX.

One module below ``check``, ``generate`` and ``evaluate``, which all load models through it; it
imports none of them (``tests/test_layout.py`` says so). ``loading.py`` holds the torch loaders and
``Form`` (one ``logits(inputs)`` call over any form), ``onnx_runtime.py`` the ONNX Runtime sessions.
"""

from neuroada_tools.forms.loading import Form, load_complete, load_unmerged, load_unmerged_with_delta, open_form
from neuroada_tools.forms.onnx_runtime import empty_past, onnx_logits, ort_run, ort_session, with_past_session

__all__ = ["Form", "empty_past", "load_complete", "load_unmerged", "load_unmerged_with_delta", "onnx_logits",
           "open_form", "ort_run", "ort_session", "with_past_session"]
