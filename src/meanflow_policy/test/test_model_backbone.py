"""The SmolVLM prefix encoder: tiny preset, image preprocessing, instruction cache, frozen weights."""
import numpy as np
import pytest
import torch
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from meanflow_policy.images import resize_image
from meanflow_policy.model.backbone import VLMBackbone, build_tiny_tokenizer, random_shift
from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.testing import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def backbone():
    return VLMBackbone(MeanFlowConfig.tiny()).eval()


def test_tiny_preset_is_deterministic_and_small(backbone):
    other = VLMBackbone(MeanFlowConfig.tiny())
    for (name, a), (_, b) in zip(backbone.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    n_params = sum(p.numel() for p in backbone.parameters())
    assert 100_000 < n_params < 1_000_000
    assert backbone.tokens_per_image == (64 // 8 // 2) ** 2
    different = VLMBackbone(MeanFlowConfig.tiny(backbone_seed=1))
    assert not torch.equal(different.vlm.connector.modality_projection.proj.weight,
                           backbone.vlm.connector.modality_projection.proj.weight)


def test_tokenizer_is_trained_deterministically():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    text = "pick the red cube and place it in the bowl"
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert ids == b(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 11  # merges learned: whole words, not bytes
    assert a.decode(ids).strip() == text


def test_pixel_normalisation_matches_smolvlm_image_processor(backbone):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    processor = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": 64},
                                         max_image_size={"longest_edge": 64})
    reference = processor(images=[[img]], return_tensors="pt")["pixel_values"][0, 0]
    ours = backbone.pixel_values(torch.from_numpy(img)[None, None])[0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_resize_image_any_size_and_errors():
    img = np.zeros((48, 80, 3), dtype=np.uint8)
    assert resize_image(img, 64).shape == (64, 64, 3)
    assert resize_image(np.zeros((64, 64, 3), np.uint8), 64).dtype == np.uint8
    with pytest.raises(ValueError, match="uint8"):
        resize_image(img.astype(np.float32), 64)
    with pytest.raises(ValueError, match="shape"):
        resize_image(np.zeros((64, 64), np.uint8), 64)


def test_cached_single_path_equals_batch_path(backbone):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 2, 64, 64, 3), generator=g, dtype=torch.uint8)
    with torch.inference_mode():
        batch_feats, batch_mask = backbone(images, ["pick the red cube"])
        one, _ = backbone.encode_one(images, "pick the red cube")
        cache = backbone._text_cache
        again, _ = backbone.encode_one(images, "pick the red cube")
        assert backbone._text_cache is cache  # unchanged instruction: text features reused
        other, _ = backbone.encode_one(images, "push the block")
        assert backbone._text_cache is not cache
    assert batch_mask.all() and one.shape == batch_feats.shape
    n_img = 2 * backbone.tokens_per_image
    assert one.shape[1] == cache.n_tokens + n_img
    torch.testing.assert_close(one, batch_feats, atol=1e-5, rtol=1e-5)
    assert torch.equal(one, again)
    assert not torch.allclose(other[:, -n_img:], one[:, -n_img:])  # image tokens attend to the instruction


def test_padding_does_not_change_features(backbone):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 2, 64, 64, 3), generator=g, dtype=torch.uint8)
    with torch.inference_mode():
        feats, mask = backbone(images, ["pick", "pick the red cube and place it in the bowl"])
        alone, _ = backbone(images[:1], ["pick"])
    assert not mask[0].all() and mask[1].all()
    torch.testing.assert_close(feats[0][mask[0]], alone[0], atol=1e-5, rtol=1e-5)


def test_both_cameras_in_one_vision_batch(backbone):
    calls = []
    encoder = backbone.vlm.vision_model.encoder
    handle = encoder.register_forward_hook(lambda m, i, o: calls.append(o.last_hidden_state.shape))
    try:
        with torch.inference_mode():
            backbone.encode_one(torch.zeros((1, 2, 64, 64, 3), dtype=torch.uint8), "go")
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0][0] == 2


def test_frozen_unless_train_backbone():
    frozen = VLMBackbone(MeanFlowConfig.tiny())
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training  # dropout etc. stay off for a frozen backbone
    trainable = VLMBackbone(MeanFlowConfig.tiny(train_backbone=True))
    assert all(p.requires_grad for p in trainable.parameters())
    feats, _ = trainable(torch.zeros((1, 2, 64, 64, 3), dtype=torch.uint8), ["go"])
    feats.sum().backward()
    assert trainable.vlm.vision_model.embeddings.patch_embedding.weight.grad is not None


def test_bad_inputs_are_named(backbone):
    with pytest.raises(ValueError, match="uint8"):
        backbone(torch.zeros((1, 2, 64, 64, 3)), ["go"])
    with pytest.raises(ValueError, match="64x64"):
        backbone(torch.zeros((1, 2, 32, 32, 3), dtype=torch.uint8), ["go"])
    with pytest.raises(ValueError, match="instructions"):
        backbone(torch.zeros((2, 2, 64, 64, 3), dtype=torch.uint8), ["go"])
    with pytest.raises(ValueError, match="neither a preset"):
        VLMBackbone(MeanFlowConfig.tiny(backbone="/nonexistent/smolvlm"))


def test_empty_instruction_still_has_a_text_token(backbone):
    ids, mask = backbone.tokenize(["", "go left"])
    assert ids[0, 0] == backbone.lead_id and mask[0].tolist() == [True] + [False] * (ids.shape[1] - 1)
    with torch.inference_mode():
        feats, _ = backbone.encode_one(torch.zeros((1, 2, 64, 64, 3), dtype=torch.uint8), "")
    assert feats.shape[1] == 1 + 2 * backbone.tokens_per_image


def test_tiny_patch_size_sets_the_image_token_count():
    fine = VLMBackbone(MeanFlowConfig.tiny(tiny_patch_size=4)).eval()
    assert fine.tokens_per_image == (64 // 4 // 2) ** 2 == 64
    images = torch.zeros((2, 2, 64, 64, 3), dtype=torch.uint8)
    features, mask = fine(images, ["a", "b"])
    assert features.shape[1] == mask.shape[1] and mask[:, -2 * 64:].all()
    with pytest.raises(ValueError, match="multiple of patch size 12"):
        VLMBackbone(MeanFlowConfig.tiny(tiny_patch_size=12))


def test_random_shift_moves_each_image_by_its_own_offset_with_edge_fill():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8))
    assert random_shift(images, 0) is images
    shifted = random_shift(images, 3, torch.Generator().manual_seed(5))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    offsets = torch.randint(-3, 4, (2, 3, 2), generator=torch.Generator().manual_seed(5))
    for b in range(3):
        for n in range(2):
            dy, dx = int(offsets[0, b, n]), int(offsets[1, b, n])
            rows = np.clip(np.arange(16) + dy, 0, 15)
            cols = np.clip(np.arange(16) + dx, 0, 15)
            expected = images[b, n].numpy()[rows][:, cols]
            np.testing.assert_array_equal(shifted[b, n].numpy(), expected)
    assert len({tuple(offsets[:, b, n].tolist()) for b in range(3) for n in range(2)}) > 1
