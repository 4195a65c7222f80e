"""Per-row top-k of ``|W|`` on the raw bit patterns: the compiled kernel (``csrc/select.c``) on
CPU, a pure torch path elsewhere (and without a compiler). ``kernels/ops.py`` registers
``select_magnitude`` as the torch op ``neuroada::select_rows``."""

from __future__ import annotations

import sys

import torch

from neuroada_tools.kernels import native

_ROW_CHUNK = 256  # rows per step: keeps the int32/int64 key buffer in cache-sized pieces

_MAG_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def magnitude_bits(weight: torch.Tensor) -> torch.Tensor:
    """Integer tensor ordered exactly like ``fp32(|weight|)`` (sign bit cleared).

    Example: bf16 ``[-1.0, 0.5]`` has bits ``[0xBF80, 0x3F00]`` -> ``[0x3F80, 0x3F00]``, and
    ``0x3F80 > 0x3F00`` as ``1.0 > 0.5``. Other float dtypes are converted to fp32 first.
    """
    if weight.dtype not in _MAG_BITS:
        weight = weight.to(torch.float32)
    int_dtype, mask = _MAG_BITS[weight.dtype]
    return weight.view(int_dtype) & mask


def select_magnitude(weight: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The ``k`` columns of largest (or smallest) ``|W[i, j]|`` per row, ties to the lower column;
    int32 ``[d_out, k]``, rows ascending. ``weight`` is 2-D, any float dtype, any strides."""
    d_out, d_in = weight.shape
    if weight.dtype not in _MAG_BITS:
        weight = weight.to(torch.float32)
    int_dtype, mask = _MAG_BITS[weight.dtype]
    bits = weight.view(int_dtype)  # same item size: valid for any strides (transposed views too)
    lib = native.kernel()
    if lib is not None and d_in < (1 << 31):
        return _select_native(lib, bits, k, largest)
    half = 16 if int_dtype == torch.int16 else 32
    if d_in > (1 << half) or sys.byteorder != "little":  # the column must fit in the low half
        return _select_wide(bits, mask, k, largest)
    key_dtype = torch.int32 if half == 16 else torch.int64
    # A key is two halves in one integer (little-endian): high = magnitude bits, low = the column
    # (reversed for "largest", so ties go to the lower column). The low halves depend only on the
    # column, so they are written once; each chunk then costs one masked copy into the high halves.
    cols = torch.arange(d_in, dtype=torch.int64)
    low = ((1 << half) - 1 - cols) if largest else cols
    low = low.to(torch.int32 if half == 16 else torch.int64)
    low = (low - (1 << half) * (low >= (1 << (half - 1)))).to(int_dtype)  # the same bits, signed
    rows = min(_ROW_CHUNK, d_out)
    keys_buf = torch.empty(rows * d_in, dtype=key_dtype)
    halves = keys_buf.view(int_dtype).view(rows, d_in, 2)
    halves[:, :, 0] = low
    vals_buf = torch.empty((rows, k), dtype=key_dtype)
    idx_buf = torch.empty((rows, k), dtype=torch.int64)
    out = torch.empty((d_out, k), dtype=torch.int32)
    for s in range(0, d_out, _ROW_CHUNK):
        chunk = bits[s : s + _ROW_CHUNK]
        n = chunk.shape[0]
        torch.bitwise_and(chunk, mask, out=halves[:n, :, 1])
        keys = keys_buf[: n * d_in].view(n, d_in)
        torch.topk(keys, k, dim=1, largest=largest, sorted=False, out=(vals_buf[:n], idx_buf[:n]))
        out[s : s + n] = idx_buf[:n].sort(dim=1).values
    return out


def _select_native(lib, bits: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Run the C kernel on row ranges, one per thread (``native.parallel``; ctypes drops the GIL)."""
    d_out, d_in = bits.shape
    fn = lib.neuroada_select_u16 if bits.dtype == torch.int16 else lib.neuroada_select_u32
    out = torch.empty((d_out, k), dtype=torch.int32)
    if d_out == 0:
        return out
    threads = max(1, min(torch.get_num_threads(), d_out // 64))
    bounds = [d_out * i // threads for i in range(threads + 1)]
    contiguous_rows = bits.stride(1) == 1

    def work(part: int) -> None:
        lo, hi = bounds[part], bounds[part + 1]
        cols = torch.empty(d_in, dtype=torch.int32)
        keys = torch.empty(d_in, dtype=torch.int32)
        step = (hi - lo) if contiguous_rows else _ROW_CHUNK  # Conv1D views: copy 256 rows at a time
        for s in range(lo, hi, step):
            n = min(step, hi - s)
            block = bits[s : s + n] if contiguous_rows else bits[s : s + n].contiguous()
            fn(block.data_ptr(), n, d_in, block.stride(0), k, 0 if largest else 1,
               out[s].data_ptr(), cols.data_ptr(), keys.data_ptr())

    native.parallel(work, threads)
    return out


def _select_wide(bits: torch.Tensor, mask: int, k: int, largest: bool) -> torch.Tensor:
    """Keys with the column in 17+ bits (rows longer than 65536 / 2**32 entries): int64 keys."""
    d_out, d_in = bits.shape
    col_bits = (d_in - 1).bit_length()
    cols = torch.arange(d_in, dtype=torch.int64)
    low = ((1 << col_bits) - 1) - cols if largest else cols
    out = torch.empty((d_out, k), dtype=torch.int32)
    for s in range(0, d_out, _ROW_CHUNK):
        keys = (bits[s : s + _ROW_CHUNK] & mask).to(torch.int64)
        keys.bitwise_left_shift_(col_bits).bitwise_or_(low)
        out[s : s + _ROW_CHUNK] = keys.topk(k, dim=1, largest=largest, sorted=False).indices.sort(dim=1).values
    return out
