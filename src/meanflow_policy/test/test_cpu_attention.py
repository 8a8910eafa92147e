"""The vision encoder's bf16-product attention (model/cpu_attention.py): it computes attention (within bf16
rounding), hands anything else to SDPA unchanged, is chosen only for a reduced backbone on a CPU that multiplies
bf16, and keeps a trained checkpoint's chunk within the precision's tolerance."""
import pytest
import torch
import torch.nn.functional as F
from ament_index_python.packages import get_package_share_directory
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from meanflow_policy.model.configuration import PRECISION_PARITY_RAD
from meanflow_policy.model.cpu_attention import (BF16_PRODUCTS_ATTENTION, SDPA_ATTENTION, bf16_products_attention,
                                                 cpu_multiplies_bf16)
from meanflow_policy.tools.bench import build_policy, parity, parity_observations, parity_outputs

SHIPPED = get_package_share_directory("meanflow_policy") + "/checkpoints/sim_pick_place"
MODULE = nn.Module().eval()  # what transformers passes: the attention module (read for .training / .is_causal)


def _qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((2, 3, 40, 16), generator=g) for _ in range(3))  # type: ignore[return-value]


def test_it_is_attention_within_bf16_rounding_in_transformers_layout():
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2)
    with torch.inference_mode():
        out, weights = bf16_products_attention(MODULE, q, k, v, None, scaling=0.25)
    assert weights is None and out.dtype == torch.float32 and out.shape == (2, 40, 3, 16)
    assert (out - expected).abs().max() < 0.03  # bf16 keeps ~3 significant digits; values are O(1)
    # every head of every sample is its own: permuting heads permutes the output the same way
    with torch.inference_mode():
        swapped, _ = bf16_products_attention(MODULE, q.flip(1), k.flip(1), v.flip(1), None, scaling=0.25)
    assert torch.equal(swapped, out.flip(2))


def test_masks_and_gradients_go_to_sdpa_unchanged():
    q, k, v = _qkv(1)
    mask = torch.ones((2, 1, 40, 40), dtype=torch.bool)
    mask[..., 30:] = False
    with torch.inference_mode():
        masked, _ = bf16_products_attention(MODULE, q, k, v, mask, scaling=0.25)
        reference, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=0.25)
    assert torch.equal(masked, reference)
    q.requires_grad_(True)
    out, _ = bf16_products_attention(MODULE, q, k, v, None, scaling=0.25)
    reference, _ = sdpa_attention_forward(MODULE, q, k, v, None, scaling=0.25)
    assert torch.equal(out, reference)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("capabilities, expected", [
    ({"avx512_bf16": True, "amx_bf16": False}, True), ({"amx_bf16": True}, True), ({"avx2": True}, False), ({}, False)])
def test_bf16_multiplying_cpus_are_recognised(capabilities, expected):
    assert cpu_multiplies_bf16(capabilities) is expected


@pytest.mark.parametrize("precision, multiplies_bf16, expected", [
    ("int8", True, BF16_PRODUCTS_ATTENTION), ("bfloat16", True, BF16_PRODUCTS_ATTENTION),
    ("float32", True, SDPA_ATTENTION), ("int8", False, SDPA_ATTENTION)])
def test_chosen_only_for_a_reduced_backbone_on_a_cpu_that_multiplies_bf16(monkeypatch, precision, multiplies_bf16,
                                                                          expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": multiplies_bf16})
    policy = build_policy("tiny", "cpu", None, precision, SHIPPED)
    vision = policy.backbone.vlm.vision_model
    assert vision.config._attn_implementation == expected
    assert policy.backbone.vlm.config.text_config._attn_implementation == SDPA_ATTENTION  # LM layers: masked, SDPA
    assert all(layer.self_attn.config is vision.config for layer in vision.encoder.layers)  # what the layers read


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_a_trained_chunk_stays_within_the_precision_tolerance(monkeypatch, precision):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    reference = build_policy("tiny", "cpu", None, "float32", SHIPPED)
    observations = parity_observations(reference.config, 480, 640)
    fast = build_policy("tiny", "cpu", None, precision, SHIPPED)
    assert fast.backbone.vlm.vision_model.config._attn_implementation == BF16_PRODUCTS_ATTENTION
    result = parity(parity_outputs(reference, observations), parity_outputs(fast, observations),
                    PRECISION_PARITY_RAD[precision])
    assert result["ok"], result
