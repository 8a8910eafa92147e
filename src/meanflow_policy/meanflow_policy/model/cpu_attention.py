"""Vision-encoder attention with its two matrix products in bfloat16, for CPUs that multiply bf16 natively.

Under the int8 backbone the vision encoder's attention (1024 patches per camera at 512 px) stays in float32 and is
the largest remaining cost of a CPU chunk; torch's CPU flash kernel takes as long in bfloat16 as in float32 (it
does not use the bf16 dot-product instructions). Computing each head's scores and weighted sum as two plain matrix
products in bfloat16 sends them to oneDNN's bf16 kernels (AVX512-BF16 or AMX): on a 2-core AMD EPYC with
AVX512-BF16 one vision layer's attention took 15 ms instead of 33 (docs/method.md, "Backbone precision").

Registered with transformers' ``AttentionInterface`` under ``BF16_PRODUCTS_ATTENTION``; the backbone selects it for
its vision encoder only for inference on such a CPU (``VLMBackbone.set_precision``). Anything it is not made for (a
mask, gradients, a GPU) goes to transformers' SDPA path unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

BF16_PRODUCTS_ATTENTION = "so101_bf16_products"
SDPA_ATTENTION = "sdpa"


def cpu_multiplies_bf16(capabilities: Mapping[str, Any]) -> bool:
    """Whether a CPU (``torch.cpu.get_capabilities()``) has bf16 dot-product instructions: AVX512-BF16 or AMX."""
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def bf16_products_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Unmasked inference attention, (B, H, N, D) in -> (B, N, H, D) out as transformers expects: per head
    softmax(q k^T * scaling) v with both products and the softmax's output in bfloat16 (it normalises in float32
    internally), the result in the query's dtype."""
    if attention_mask is not None or torch.is_grad_enabled() or query.device.type != "cpu" or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    q = (query * scaling).to(torch.bfloat16)
    k, v = key.to(torch.bfloat16), value.to(torch.bfloat16)
    b, h, n, d = q.shape
    out = torch.empty((b, n, h, d), dtype=torch.bfloat16)
    for i in range(b):
        for j in range(h):
            # F.linear(x, w) = x @ w^T: the product form oneDNN runs in bf16 (batched matmul does not)
            weights = torch.softmax(F.linear(q[i, j], k[i, j]), dim=-1)
            out[i, :, j] = F.linear(weights, v[i, j].transpose(0, 1))
    return out.to(query.dtype), None


AttentionInterface.register(BF16_PRODUCTS_ATTENTION, bf16_products_attention)
