"""One-off correctness check of the bypass on CUDA (run where a GPU exists).

Gradients of the fused bypass (in-place forward + SDDMM backward) against the naive
``linear(x, W + scatter(delta))`` on the GPU, fp32 and bf16 bases, Linear and Conv1D, k=1 and 20;
then a few AdamW steps of a tiny Llama on CUDA, detach restoring the base bit for bit.

    python bench/cuda_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neuroada_tools.index.criteria import select  # noqa: E402
from neuroada_tools.io.sidecar import IndexSidecar, TensorEntry  # noqa: E402
from neuroada_tools.train import bypass  # noqa: E402


def check_layer(dtype, d_out, d_in, T, k) -> float:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out, device=dev, dtype=dtype)
    holder = nn.Module()
    holder.lin = lin
    idx = select(lin.weight.detach().float().cpu(), k)
    index = IndexSidecar(k, "magnitude", {"lin.weight": idx},
                         {"lin.weight": TensorEntry((d_out, d_in), "out_in", "F32", "0" * 64)})
    w0 = lin.weight.detach().clone()
    b0 = lin.bias.detach().clone()
    params = bypass.attach(holder, index)
    delta = params["lin.weight"]
    with torch.no_grad():
        delta.normal_(0, 0.01)
    x = torch.randn(2, T, d_in, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(2, T, d_out, device=dev, dtype=dtype)
    holder.lin(x).backward(g)
    gd, gx = delta.grad.clone(), x.grad.clone()
    # naive reference in fp32
    x2 = x.detach().float().requires_grad_(True)
    d2 = delta.detach().clone().requires_grad_(True)
    w = w0.float().scatter_add(1, idx.to(dev).long(), d2)
    F.linear(x2, w, b0.float()).backward(g.float())
    err_d = ((gd - d2.grad).abs().max() / d2.grad.abs().max()).item()
    err_x = ((gx.float() - x2.grad).abs().max() / x2.grad.abs().max()).item()
    bypass.detach(holder)
    assert torch.equal(lin.weight, w0), "detach must restore the base"
    return max(err_d, err_x)


def main() -> None:
    assert torch.cuda.is_available(), "needs CUDA"
    for dtype in (torch.float32, torch.bfloat16):
        for k in (1, 20):
            err = check_layer(dtype, 512, 256, 64, k)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            print(f"cuda {dtype} k={k}: max rel grad error {err:.2e} (tol {tol}) {'ok' if err <= tol else 'FAIL'}")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256)).cuda().to(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in m.state_dict().items()}
    named = {n: p for n, p in m.named_parameters() if n.endswith("proj.weight")}
    index = IndexSidecar(4, "magnitude", {n: select(p.detach().float().cpu(), 4) for n, p in named.items()},
                         {n: TensorEntry(tuple(p.shape), "out_in", "BF16", "0" * 64) for n, p in named.items()})
    bypass.attach(m, index)
    opt = torch.optim.AdamW([p for _, p in bypass.trainable_parameters(m)], lr=1e-2)
    ids = torch.randint(0, 256, (4, 32), device="cuda")
    losses = []
    for _ in range(10):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"tiny llama bf16 on cuda: loss {losses[0]:.3f} -> {losses[-1]:.3f}; deltas fp32: "
          f"{all(p.dtype == torch.float32 for _, p in bypass.trainable_parameters(m))}")
    bypass.detach(m)
    same = all(torch.equal(base[n], p) for n, p in m.state_dict().items())
    print(f"detach restores the bf16 base bit for bit on cuda: {same}")


if __name__ == "__main__":
    main()
