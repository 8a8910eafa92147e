"""Backbone inference precisions: int8 really quantises the SmolVLM's Linear layers, every fast precision keeps the
one-step chunk of a trained checkpoint within its stated parity tolerance of float32, and misuse is refused."""
import pytest
import torch
from ament_index_python.packages import get_package_share_directory
from torch import nn

from meanflow_policy.model.configuration import BACKBONE_PRECISIONS, PRECISION_PARITY_RAD, fastest_precision
from meanflow_policy.tools.bench import build_policy, parity, parity_observations, parity_outputs

SHIPPED = get_package_share_directory("meanflow_policy") + "/checkpoints/sim_pick_place"


@pytest.fixture(scope="module")
def reference():
    policy = build_policy("tiny", "cpu", None, "float32", SHIPPED)
    observations = parity_observations(policy.config, 480, 640)
    return observations, parity_outputs(policy, observations)


@pytest.mark.parametrize("precision", [p for p in BACKBONE_PRECISIONS if p != "float32"])
def test_fast_precisions_keep_the_chunk_within_their_tolerance(reference, precision):
    observations, outputs = reference
    policy = build_policy("tiny", "cpu", None, precision, SHIPPED)
    result = parity(outputs, parity_outputs(policy, observations), PRECISION_PARITY_RAD[precision])
    assert result["ok"], result
    # The fast path did change the numbers (it is not float32 under another name).
    assert result["prefix_max_rel"] > 1e-5, result


def test_int8_quantises_every_linear_of_the_smolvlm_and_only_there():
    policy = build_policy("tiny", "cpu", None, "int8", SHIPPED)
    vlm_linears = [m for m in policy.backbone.vlm.modules() if type(m) is nn.Linear]
    quantised = [m for m in policy.backbone.vlm.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert not vlm_linears and len(quantised) > 10
    assert any(type(m) is nn.Linear for m in policy.expert.modules())  # the expert stays float32


def test_misuse_is_refused_with_a_clear_error():
    policy = build_policy("tiny", "cpu", None, "float32", SHIPPED)
    with pytest.raises(ValueError, match="backbone precision must be one of .*'int4'"):
        policy.backbone.set_precision("int4")
    policy.train()
    policy.backbone.config.train_backbone = True  # a backbone being trained
    policy.backbone.train()
    with pytest.raises(ValueError, match="int8 is for inference"):
        policy.backbone.set_precision("int8")


@pytest.mark.parametrize("device, capabilities, cuda_bf16, expected", [
    ("cpu", {"amx_bf16": True, "avx512_bf16": True, "avx512_vnni": True}, False, "bfloat16"),  # AMX: bf16 3.4x
    ("cpu", {"amx_bf16": False, "avx512_bf16": True, "avx512_vnni": True}, False, "int8"),  # bf16 3.1x, int8 3.3x
    ("cpu", {"avx2": True}, False, "int8"),  # bf16 slower than float32 there
    ("cuda", {}, True, "bfloat16"),
    ("cuda", {}, False, "float16"),
])
def test_auto_is_the_fastest_measured_precision_of_the_hardware(device, capabilities, cuda_bf16, expected):
    assert fastest_precision(device, capabilities, cuda_bf16) == expected


def test_auto_applies_the_fastest_precision_of_this_cpu_and_says_which():
    policy = build_policy("tiny", "cpu", None, "float32", SHIPPED)
    applied = policy.backbone.set_precision("auto")
    assert applied == fastest_precision("cpu", torch.cpu.get_capabilities())
    if applied == "int8":
        assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in policy.backbone.vlm.modules())
    else:
        assert {p.dtype for p in policy.backbone.vlm.parameters()} == {getattr(torch, applied)}
