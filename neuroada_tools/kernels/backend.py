"""Which kernels run: ``NEUROADA_KERNELS=auto|triton|native|torch`` (default ``auto``).

=========== ==================================================================================
value       backend
=========== ==================================================================================
``auto``    Triton on CUDA tensors (where ``triton`` imports), the compiled C kernels on CPU
            tensors (where they built; ``kernels/native.py``), the pure torch path elsewhere
``triton``  the Triton kernels (``kernels/triton_kernels.py``): compiled on CUDA, and on CPU
            tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` is set (how CI tests them)
``native``  the compiled C kernels (CPU tensors only)
``torch``   the pure torch path (any device; the slowest, the reference)
=========== ==================================================================================

An explicit choice never falls back: ``triton`` without triton installed, or on CPU tensors
without ``TRITON_INTERPRET=1``, and ``native`` on a GPU tensor or without a compiled kernel, raise
``KernelsError`` naming what is missing. ``auto`` picks what works. ``NEUROADA_NATIVE=0`` (no
compiled C) still applies under ``auto``.

The value is read on every call, so a test or a benchmark can switch it with
``monkeypatch.setenv``; ``choose(device)`` is what the ops ask.

Example: with ``NEUROADA_KERNELS=auto`` a bf16 SDDMM on ``cuda:0`` runs the Triton kernel, the
same call on CPU runs ``csrc/sddmm.c``.
"""

from __future__ import annotations

import functools
import os

import torch

from neuroada_tools.errors import NeuroAdaError
from neuroada_tools.kernels import native, triton_kernels

ENV = "NEUROADA_KERNELS"
CHOICES = ("auto", "triton", "native", "torch")


class KernelsError(NeuroAdaError):
    """The kernels asked for with ``NEUROADA_KERNELS`` cannot run on these tensors."""


def requested() -> str:
    """The value of ``NEUROADA_KERNELS`` (``auto`` when unset); ``KernelsError`` if unknown."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise KernelsError(f"{ENV}={value!r} is not one of {', '.join(CHOICES)}")
    return value


@functools.cache
def _triton_importable() -> bool:
    return triton_kernels.available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose(device: torch.device) -> str:
    """The backend for tensors on ``device``: ``"triton"``, ``"native"`` or ``"torch"``."""
    value = requested()
    if value == "auto":
        if device.type == "cuda" and _triton_importable():
            return "triton"
        if device.type == "cpu" and native.kernel() is not None:
            return "native"
        return "torch"
    if value == "triton":
        if not _triton_importable():
            raise KernelsError(f"{ENV}=triton but the 'triton' package cannot be imported (pip install triton)")
        if device.type == "cpu" and not _interpreting():
            raise KernelsError(f"{ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        if device.type not in ("cpu", "cuda"):
            raise KernelsError(f"{ENV}=triton cannot run on {device.type} tensors")
        return "triton"
    if value == "native":
        if device.type != "cpu":
            raise KernelsError(f"{ENV}=native runs on CPU tensors only, found {device.type}")
        if native.kernel() is None:
            raise KernelsError(f"{ENV}=native but the compiled kernels are unavailable ({native.status()})")
        return "native"
    return "torch"

