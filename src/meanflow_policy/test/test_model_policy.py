"""MeanFlowPolicy end to end: sample() contract, stats, timing, checkpoints (round trip, mismatches, no pickle)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from so101_common.graph import JOINT_NAMES

from meanflow_policy.model.checkpoint import CheckpointError
from meanflow_policy.model import objectives as O
from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.model.policy import InstructionFilm, MeanFlowPolicy, phrasing_contrast_loss, resize_token_grid
from meanflow_policy.testing import (
    corrupt_checkpoint,
    make_tiny_checkpoint,
    plausible_stats,
    random_batch,
    random_observation,
    torch_threads,
)
from meanflow_policy.tools.train import at_image_size, with_new_path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def policy(ckpt):
    return MeanFlowPolicy.load(ckpt)


def test_checkpoint_layout_has_no_pickle(ckpt):
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "model.safetensors", "stats.json", "tokenizer.json"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["joint_names"] == list(JOINT_NAMES) and config["objective"] == "meanflow"
    stats = json.loads((ckpt / "stats.json").read_text())
    assert len(stats["action"]["mean"]) == 6
    weights = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("backbone.") for k in weights)  # the tiny backbone is random: weights included
    assert any(k.startswith("expert.") for k in weights)


@pytest.mark.parametrize("nfe", [1, 3])
def test_sample_contract(policy, nfe):
    obs = random_observation(policy.config, seed=1, size=(48, 80))
    chunk = policy.sample(obs, nfe=nfe, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (20, 6) and chunk.dtype == np.float32 and np.all(np.isfinite(chunk))
    timing = policy.last_timing
    assert set(timing) == {"prefix_ms", "expert_ms", "post_ms", "total_ms", "nfe", "candidates", "average",
                           "cuda_graphs"}
    assert timing["nfe"] == nfe and timing["candidates"] == 1 and timing["average"] == 1
    assert timing["cuda_graphs"] is False  # a CPU policy never replays graphs
    assert 0 < timing["prefix_ms"] < timing["total_ms"] and timing["expert_ms"] > 0 and timing["post_ms"] > 0
    parts = timing["prefix_ms"] + timing["expert_ms"] + timing["post_ms"]
    assert timing["total_ms"] == pytest.approx(parts, rel=1e-6)


def test_sample_depends_on_observation_and_noise(policy):
    obs = random_observation(policy.config, seed=1)
    a = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    same = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    other_noise = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    other_state = policy.sample({**obs, "state": obs["state"] + 0.5}, generator=torch.Generator().manual_seed(0))
    other_text = policy.sample({**obs, "instruction": "open the drawer"}, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(a, same)
    for b in (other_noise, other_state, other_text):
        assert not np.allclose(a, b)


def test_stats_are_applied_in_joint_units(ckpt):
    policy = MeanFlowPolicy.load(ckpt)
    obs = random_observation(policy.config, seed=2)
    stats = plausible_stats(JOINT_NAMES)
    mean, std = np.array(stats["action"]["mean"]), np.array(stats["action"]["std"])
    base = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    normalised = (base - mean) / std
    scaled = json.loads(json.dumps(stats))
    scaled["action"] = {"mean": (mean + 1.0).tolist(), "std": (std * 2.0).tolist()}
    policy.set_stats(scaled)
    out = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(out, normalised * std * 2.0 + mean + 1.0, atol=1e-5)
    assert policy.get_stats()["action"]["std"] == pytest.approx(scaled["action"]["std"])
    scaled["state"] = {"mean": (np.array(stats["state"]["mean"]) + 0.5).tolist(), "std": stats["state"]["std"]}
    policy.set_stats(scaled)
    assert not np.allclose(policy.sample(obs, generator=torch.Generator().manual_seed(0)), out)


def test_sample_batch_matches_single_observation_path(policy):
    """The batched (offline evaluation) path and the cached single-observation path agree."""
    from meanflow_policy.images import resize_image

    obs = random_observation(policy.config, seed=4)
    chunk = policy.sample(obs, nfe=2, generator=torch.Generator().manual_seed(3))
    images = np.stack([resize_image(obs["images"][c], 64) for c in policy.config.camera_keys])
    batch = {"images": torch.from_numpy(images)[None], "state": torch.from_numpy(obs["state"])[None],
             "instruction": [obs["instruction"]]}
    batched = policy.sample_batch(batch, nfe=2, generator=torch.Generator().manual_seed(3))
    assert batched.shape == (1, 20, 6)
    np.testing.assert_allclose(batched[0].numpy(), chunk, atol=1e-4)


@pytest.mark.parametrize("stats,match", [
    ({"state": {"mean": [0] * 6, "std": [1] * 6}}, "'action'"),
    ({"state": {"mean": [0] * 5, "std": [1] * 6}, "action": {"mean": [0] * 6, "std": [1] * 6}}, r"\(6,\)"),
    ({"state": {"mean": [0] * 6, "std": [1] * 6}, "action": {"mean": [0] * 6, "std": [-1] * 6}}, "negative"),
    ({"state": {"mean": [float("nan")] * 6, "std": [1] * 6}, "action": {"mean": [0] * 6, "std": [1] * 6}}, "NaN"),
])
def test_bad_stats_are_named(policy, stats, match):
    with pytest.raises(ValueError, match=match):
        policy.set_stats(stats)


def test_bad_observations_are_named(policy):
    obs = random_observation(policy.config)
    with pytest.raises(ValueError, match="top"):
        policy.sample({**obs, "images": {"wrist": obs["images"]["wrist"]}})
    with pytest.raises(ValueError, match="wrist.*uint8"):
        policy.sample({**obs, "images": {**obs["images"], "wrist": obs["images"]["wrist"].astype(np.float32)}})
    with pytest.raises(ValueError, match="state"):
        policy.sample({**obs, "state": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        policy.sample({**obs, "state": np.full(6, np.nan, np.float32)})
    with pytest.raises(ValueError, match="instruction"):
        policy.sample({k: v for k, v in obs.items() if k != "instruction"})
    with pytest.raises(ValueError, match="nfe"):
        policy.sample(obs, nfe=0)
    policy.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            policy.sample(obs)
    finally:
        policy.eval()


def test_round_trip_reproduces_samples_bit_for_bit(policy, tmp_path):
    obs = random_observation(policy.config, seed=3)
    before = policy.sample(obs, nfe=2, generator=torch.Generator().manual_seed(7))
    policy.save(tmp_path / "again")
    reloaded = MeanFlowPolicy.load(tmp_path / "again")
    after = reloaded.sample(obs, nfe=2, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(before, after)
    assert reloaded.config == policy.config


@pytest.mark.parametrize("objective", ["flow_matching", "ddpm"])
def test_baseline_checkpoints_sample(tmp_path, objective):
    path = make_tiny_checkpoint(tmp_path / objective, seed=1, objective=objective)
    policy = MeanFlowPolicy.load(path, expect={"objective": objective})
    assert policy.config.default_nfe == (10 if objective == "flow_matching" else 100)
    obs = random_observation(policy.config)
    chunk = policy.sample(obs, nfe=5, generator=torch.Generator().manual_seed(0))
    again = MeanFlowPolicy.load(path).sample(obs, nfe=5, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (20, 6) and np.array_equal(chunk, again)


@pytest.mark.parametrize("expect,match", [
    ({"objective": "ddpm"}, "objective='meanflow'"),
    ({"camera_keys": ["wrist"]}, "camera_keys"),
    ({"joint_names": JOINT_NAMES[:5] + ("wrist_flex",)}, "joint_names"),
    ({"chunk_size": 50}, "chunk_size=20"),
    ({"colour": 1}, "unknown config field 'colour'"),
])
def test_load_expectation_mismatch_is_a_clear_error(ckpt, expect, match):
    with pytest.raises(ValueError, match=match):
        MeanFlowPolicy.load(ckpt, expect=expect)


def _copy(ckpt, dst):
    dst.mkdir()
    for p in ckpt.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_corrupt_checkpoints_are_clear_errors(ckpt, tmp_path):
    wrong_dims = _copy(ckpt, tmp_path / "dims")
    config = json.loads((wrong_dims / "config.json").read_text())
    config["expert_width"] = 64
    (wrong_dims / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expert.*shape"):
        MeanFlowPolicy.load(wrong_dims)

    missing = _copy(ckpt, tmp_path / "missing")
    weights = load_file(str(missing / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("state_proj")}, str(missing / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*state_proj"):
        MeanFlowPolicy.load(missing)

    bad_stats = _copy(ckpt, tmp_path / "stats")
    (bad_stats / "stats.json").write_text(json.dumps({"state": {"mean": [0.0], "std": [1.0]}}))
    with pytest.raises(ValueError, match="stats.json"):
        MeanFlowPolicy.load(bad_stats)

    bad_config = _copy(ckpt, tmp_path / "config")
    config = json.loads((bad_config / "config.json").read_text())
    config["objective"] = "consistency"
    (bad_config / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json.*consistency"):
        MeanFlowPolicy.load(bad_config)

    no_weights = _copy(ckpt, tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks model.safetensors"):
        MeanFlowPolicy.load(no_weights)


@pytest.mark.parametrize("kind,message", [
    ("truncated_weights", "model.safetensors: not a readable safetensors file"),
    ("empty_weights", "model.safetensors: not a readable safetensors file"),
    ("nan_weights", r"model.safetensors: \d+ tensors contain NaN or inf \(backbone"),
    ("bad_tokenizer", "tokenizer.json: not a valid tokenizer file"),
    ("chunk_size_string", "config.json: field chunk_size must be an integer, got str '20'"),
    ("zero_std", r"stats.json: field action.std is below 0.001 for \['shoulder_pan 0'\]"),
])
def test_unusable_files_are_one_checkpoint_error(ckpt, tmp_path, kind, message):
    """Every file problem is one CheckpointError naming the file (and field), whatever the caller asks for."""
    bad = corrupt_checkpoint(ckpt, tmp_path / kind, kind)
    with pytest.raises(CheckpointError, match=message):
        MeanFlowPolicy.load(bad)


@pytest.mark.parametrize("kind,message", [
    ("flipped_bytes", "model.safetensors: the model gives NaN or inf on a neutral observation"),
    ("saturated_weights", r"model.safetensors: on a neutral observation 100 % of the model's joint targets are "
                          r"outside the joint limits \(joints \['shoulder_pan', .*'gripper'\]"),
])
def test_implausible_outputs_are_refused_when_outputs_are_checked(ckpt, tmp_path, kind, message):
    """Finite but corrupt weights: caught by the warm-up chunk of a load for an arm (training may still load)."""
    bad = corrupt_checkpoint(ckpt, tmp_path / kind, kind)
    with pytest.raises(CheckpointError, match=message):
        MeanFlowPolicy.load(bad, check_outputs=True)
    assert MeanFlowPolicy.load(bad).config.chunk_size == 20


def test_plausible_checkpoints_pass_the_output_check(ckpt, tmp_path):
    """A sixth of the targets past a limit (the gripper) is left to the node's clamp report, not refused."""
    assert MeanFlowPolicy.load(ckpt, check_outputs=True).config.chunk_size == 20
    bad = corrupt_checkpoint(ckpt, tmp_path / "gripper", "gripper_beyond_limit")
    policy = MeanFlowPolicy.load(bad, check_outputs=True)
    chunk = policy.sample(random_observation(policy.config), generator=torch.Generator().manual_seed(0))
    assert np.all(chunk[:, 5] > 1.75)


def test_pretrained_backbone_is_stored_by_reference(tmp_path):
    """A local SmolVLM directory: weights by reference, config hash checked on load."""
    from transformers import SmolVLMModel

    from meanflow_policy.model.backbone import build_tiny_tokenizer, tiny_vlm_config

    cfg = MeanFlowConfig.tiny()
    tokenizer = build_tiny_tokenizer()
    vlm_dir = tmp_path / "smolvlm"
    SmolVLMModel(tiny_vlm_config(cfg, len(tokenizer))).save_pretrained(vlm_dir)
    tokenizer.save_pretrained(vlm_dir)
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    SmolVLMImageProcessorPil(do_image_splitting=False).save_pretrained(vlm_dir)

    policy = MeanFlowPolicy(MeanFlowConfig.tiny(backbone=str(vlm_dir), num_vlm_layers=2))
    assert len(policy.backbone.vlm.text_model.layers) == 2 and policy.config.backbone_config_hash
    policy.set_stats(plausible_stats(JOINT_NAMES))
    out = policy.save(tmp_path / "ckpt")
    assert not any(k.startswith("backbone.") for k in load_file(str(out / "model.safetensors")))
    obs = random_observation(policy.config)
    a = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    b = MeanFlowPolicy.load(out).sample(obs, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(a, b)

    config = json.loads((out / "config.json").read_text())
    config["backbone_config_hash"] = "0123456789abcdef"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different backbone"):
        MeanFlowPolicy.load(out)
    with pytest.raises(ValueError, match="num_vlm_layers 16 > the 4"):
        MeanFlowPolicy(MeanFlowConfig.tiny(backbone=str(vlm_dir), num_vlm_layers=16))


def test_instruction_film_starts_as_the_policy_it_is_added_to(ckpt, tmp_path):
    """Added to a trained policy, the zero-initialised FiLM path changes no chunk; it is saved and loaded."""
    source = MeanFlowPolicy.load(ckpt)
    policy = with_new_path(source, "instruction_film", True).eval()
    assert policy.config.instruction_film and not source.config.instruction_film
    for instruction in ("grasp the red block", "grasp the green block"):
        obs = random_observation(source.config, seed=3, instruction=instruction)
        expected = source.sample(obs, generator=torch.Generator().manual_seed(0))
        assert np.array_equal(policy.sample(obs, generator=torch.Generator().manual_seed(0)), expected)
    assert with_new_path(policy, "instruction_film", True) is policy
    policy.save(tmp_path / "film")
    assert MeanFlowPolicy.load(tmp_path / "film").config.instruction_film


def test_committed_rows_start_as_the_policy_they_are_added_to(ckpt, tmp_path):
    """Added to a trained policy, the zero-initialised committed-rows input changes no chunk drawn without committed
    rows; a guide is read as committed rows (their noise replaced by the rows), and the setting is saved, changed and
    never silently dropped."""
    source = MeanFlowPolicy.load(ckpt)
    policy = with_new_path(source, "action_prefix_rows", 8).eval()
    assert policy.config.action_prefix_rows == 8 and not source.config.action_prefix_rows
    obs = random_observation(source.config, seed=4)
    expected = source.sample(obs, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(policy.sample(obs, generator=torch.Generator().manual_seed(0)), expected)
    guide = (expected[:5] + 0.3, np.ones((5, 6), np.float32))
    assert not np.allclose(policy.sample(obs, generator=torch.Generator().manual_seed(0), guide=guide), expected)
    policy.save(tmp_path / "prefix")
    loaded = MeanFlowPolicy.load(tmp_path / "prefix")
    assert loaded.config.action_prefix_rows == 8
    assert with_new_path(loaded, "action_prefix_rows", 4).config.action_prefix_rows == 4
    with pytest.raises(ValueError, match="cannot be removed"):
        with_new_path(loaded, "action_prefix_rows", 0)
    with pytest.raises(ValueError, match="action_prefix_rows must be in"):
        MeanFlowConfig.tiny(action_prefix_rows=20)


def test_a_guide_gives_the_policy_exactly_its_committed_rows(ckpt):
    """Once the input is trained (here: random weights), a chunk depends on the rows weighted 1 (at most
    action_prefix_rows of them) and on nothing past them: the softly weighted rows are for guidance only."""
    policy = with_new_path(MeanFlowPolicy.load(ckpt), "action_prefix_rows", 3).eval()
    with torch.no_grad():
        torch.nn.init.normal_(policy.expert.known_in.weight, std=0.5)
        torch.nn.init.normal_(policy.expert.known_flag, std=0.5)
    obs = random_observation(policy.config, seed=5)

    def chunk(target: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return policy.sample(obs, generator=torch.Generator().manual_seed(0), guide=(target, weights))

    target = np.tile(np.linspace(-0.5, 0.5, 6, dtype=np.float32), (6, 1))
    weights = np.ones((6, 6), np.float32)
    weights[2:] = 0.5  # two committed rows, then soft ones
    base = chunk(target, weights)
    free = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    assert not np.allclose(base, free)
    moved = target.copy()
    moved[2:] += 0.4  # past the committed rows
    assert np.array_equal(chunk(moved, weights), base)
    moved = target.copy()
    moved[1] += 0.4  # a committed row
    assert not np.allclose(chunk(moved, weights), base)
    # The committed rows come back as given (they are what the arm executes), the rest as the expert drew it.
    np.testing.assert_allclose(base[:2], target[:2], atol=1e-5)
    assert not np.allclose(base[2:6], target[2:], atol=1e-3)
    # More committed rows than the policy reads: the ones past action_prefix_rows are ignored.
    weights[:] = 1.0
    moved = target.copy()
    moved[3:] += 0.4
    assert np.array_equal(chunk(moved, weights), chunk(target, weights))


@pytest.mark.slow
def test_trained_with_committed_rows_the_expert_continues_them(ckpt):
    """Trained on chunks whose future follows from their first rows (random walks: the observation does not predict
    them), the expert reproduces its committed rows and continues from them: shifting them shifts the next rows."""
    policy = with_new_path(MeanFlowPolicy.load(ckpt), "action_prefix_rows", 8)
    policy.backbone.requires_grad_(False)
    opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=1e-3)
    policy.train()

    def walks(seed: int, n: int) -> dict:
        batch = random_batch(policy.config, batch_size=n, seed=seed)
        walk = torch.cumsum(0.05 * torch.randn(n, 20, 6, generator=torch.Generator().manual_seed(seed)), dim=1)
        batch["actions"] = batch["actions"][:, :1] + walk
        batch["action_is_pad"][:] = False
        return batch

    for step in range(300):
        loss, _ = policy.compute_loss(walks(step, 32), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    obs = random_observation(policy.config, seed=3)
    target = walks(999, 1)["actions"][0].numpy()
    weights = np.zeros((20, 6), np.float32)
    weights[:6] = 1.0

    def chunk(rows: np.ndarray) -> np.ndarray:
        return policy.sample(obs, generator=torch.Generator().manual_seed(0), guide=(rows, weights))

    base = chunk(target)
    assert np.abs(base[:6] - target[:6]).mean() < 0.05
    shifted = target.copy()
    shifted[:6] += 0.1
    moved = chunk(shifted)[6:9] - base[6:9]
    assert np.abs(moved.mean() - 0.1) < 0.04


def test_shipped_rtc_checkpoint_continues_its_committed_rows():
    """sim_pick_place_rtc is given committed rows: it returns them as given, and what follows starts from them."""
    from ament_index_python.packages import get_package_share_directory
    policy = MeanFlowPolicy.load(get_package_share_directory("meanflow_policy") + "/checkpoints/sim_pick_place_rtc")
    assert policy.config.action_prefix_rows == 8
    obs = random_observation(policy.config, seed=2)
    free = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    weights = np.zeros((20, 6), np.float32)
    weights[:6] = 1.0

    def chunk(rows: np.ndarray) -> np.ndarray:
        return policy.sample(obs, generator=torch.Generator().manual_seed(0), guide=(rows, weights))

    base = chunk(free)
    np.testing.assert_allclose(base[:6], free[:6], atol=1e-5)
    shifted = free.copy()
    shifted[:6, :5] += 0.1
    moved = chunk(shifted)
    np.testing.assert_allclose(moved[:6], shifted[:6], atol=1e-5)
    # The rows after them move with them, if little (0.003 rad: this fine-tune reads them barely,
    # docs/notes/realtime_experiments.md; that an expert can learn to continue them is
    # test_trained_with_committed_rows_the_expert_continues_them).
    assert np.abs(moved[6:9, :5] - base[6:9, :5]).mean() > 0.001


def test_instruction_film_learns_and_then_gates_by_the_instruction(ckpt):
    """The FiLM weights get gradients; once trained, the image-token gate differs between two instructions."""
    policy = with_new_path(MeanFlowPolicy.load(ckpt), "instruction_film", True).train()
    film = policy.instruction_film
    loss, _ = policy.compute_loss(random_batch(policy.config), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert film.image.weight.grad.abs().sum() > 0 and film.expert.weight.grad.abs().sum() > 0
    torch.optim.SGD(film.parameters(), lr=1.0).step()
    policy.eval()
    with torch.no_grad():
        gates = []
        for instruction in ("grasp the red block", "grasp the green block"):
            text, mask = policy.backbone.text_embeddings([instruction])
            features = policy.backbone.vlm.text_model(inputs_embeds=text, attention_mask=mask.long()).last_hidden_state
            gates.append(film(features, mask)[0])
    assert not torch.allclose(gates[0], gates[1])


def test_film_hidden_layer_starts_as_the_policy_it_is_added_to(ckpt, tmp_path):
    """Added to a policy with a FiLM, the zero-initialised hidden layer changes no chunk; it is saved and loaded, and
    a hidden layer without a FiLM is refused."""
    source = with_new_path(MeanFlowPolicy.load(ckpt), "instruction_film", True).eval()
    with torch.no_grad():  # a FiLM that already does something
        torch.nn.init.normal_(source.instruction_film.image.weight, std=0.05)
    policy = with_new_path(source, "instruction_film_hidden", 16).eval()
    assert policy.config.instruction_film_hidden == 16 and policy.instruction_film.mlp_in is not None
    for instruction in ("grasp the red block", "grasp the green block"):
        obs = random_observation(source.config, seed=3, instruction=instruction)
        expected = source.sample(obs, generator=torch.Generator().manual_seed(0))
        assert np.array_equal(policy.sample(obs, generator=torch.Generator().manual_seed(0)), expected)
    policy.save(tmp_path / "hidden")
    assert MeanFlowPolicy.load(tmp_path / "hidden").config.instruction_film_hidden == 16
    with pytest.raises(ValueError, match="instruction_film_hidden must be >= 0, and > 0 only with instruction_film"):
        MeanFlowConfig.tiny(instruction_film_hidden=16)


def test_phrasing_contrast_loss_pulls_one_tasks_phrasings_together():
    """Low when each recorded sentence's phrasings share a direction, high when mixed; 0 with no pair; its gradient
    makes two phrasings of one task more alike than phrasings of different tasks."""
    tasks = ["sort", "sort", "swap", "swap", "red", "red"]
    axes = torch.eye(3)[[0, 0, 1, 1, 2, 2]]
    mixed = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    assert phrasing_contrast_loss(axes, tasks) < 0.1 < 2.0 < phrasing_contrast_loss(mixed, tasks)
    assert float(phrasing_contrast_loss(torch.randn(3, 4), ["a", "b", "c"])) == 0.0
    hidden = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    opt = torch.optim.SGD([hidden], lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        phrasing_contrast_loss(hidden, tasks).backward()
        opt.step()
    z = torch.nn.functional.normalize(hidden.detach(), dim=-1)
    same = min(float(z[i] @ z[i + 1]) for i in (0, 2, 4))
    other = max(float(z[i] @ z[j]) for i in range(6) for j in range(6) if tasks[i] != tasks[j])
    assert same > other


def test_compute_loss_adds_the_contrast_on_the_film_hidden_layer(ckpt):
    """With a weight, compute_loss reports the contrastive term and its gradient reaches the hidden layer; without a
    hidden layer or the recorded sentences it is one clear error."""
    film = with_new_path(MeanFlowPolicy.load(ckpt), "instruction_film", True)
    policy = with_new_path(film, "instruction_film_hidden", 8).train()
    batch = random_batch(policy.config, batch_size=4)
    batch["recorded_instruction"] = ["sort", "sort", "swap", "swap"]
    loss, info = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0), instruction_contrast=0.5)
    plain, _ = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert info["contrast"] > 0
    assert float(loss.detach()) == pytest.approx(float(plain.detach()) + 0.5 * info["contrast"], rel=1e-4)
    loss.backward()
    assert policy.instruction_film.mlp_in[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs a policy with language_sentence_tokens > 0 or instruction_film_hidden"):
        film.compute_loss(batch, instruction_contrast=0.5)
    del batch["recorded_instruction"]
    with pytest.raises(ValueError, match="and a batch with 'instruction' and 'recorded_instruction'"):
        policy.compute_loss(batch, instruction_contrast=0.5)


def test_instruction_film_sees_a_word_that_a_shared_component_drowns():
    """Text features = a large component every instruction shares + a 1 % part that differs: after the FiLM's
    per-channel standardisation over the batch the instructions differ by O(1), not by 1 %."""
    film = InstructionFilm(feature_dim=16, width=8).train()
    g = torch.Generator().manual_seed(0)
    shared = 10 * torch.randn(1, 5, 16, generator=g)
    text = shared + 0.1 * torch.randn(6, 5, 16, generator=g)  # six instructions, five tokens each
    mask = torch.ones(6, 5, dtype=torch.bool)
    pooled = film.pool(text, mask)
    raw = text.mean(1)
    assert (raw[0] - raw[1]).norm() / raw[0].norm() < 0.02
    assert (pooled[0] - pooled[1]).norm() / pooled[0].norm() > 0.5


def test_instruction_film_pooling_tells_word_order():
    """The two sorting orders have the same words: with context-free word features (what a from-scratch LM gives
    at first) a plain mean cannot tell them apart; the FiLM's pooling moves by the words' distance times their
    difference, and padding (on either side) does not change an instruction's pooled features."""
    film = InstructionFilm(feature_dim=16, width=8).eval()  # fresh running statistics: standardising is identity
    g = torch.Generator().manual_seed(0)
    put, red, left, green, right = (torch.randn(16, generator=g) for _ in range(5))
    text = torch.stack([torch.stack([put, red, left, green, right]), torch.stack([put, green, left, red, right])])
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.allclose(text[0].mean(0), text[1].mean(0))
    pooled = film.pool(text, mask)
    # weights 1..5 (sum 15): red at 2 and green at 4 in the first order, the other way round in the second
    assert torch.allclose(pooled[0] - pooled[1], 2 * (green - red) / 15, atol=1e-5)
    padded = torch.cat([torch.randn(2, 2, 16, generator=g), text, torch.randn(2, 1, 16, generator=g)], dim=1)
    padded_mask = torch.cat([torch.zeros(2, 2, dtype=torch.bool), mask, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    assert torch.allclose(film.pool(padded, padded_mask), pooled, atol=1e-5)


def test_guided_chunk_follows_the_committed_rows(policy):
    """Real-time chunking: a guide asking for rows of another chunk brings the sampled chunk closer to them there."""
    obs = random_observation(policy.config, seed=3)
    plain = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    other = policy.sample({**obs, "state": obs["state"] + 0.3}, generator=torch.Generator().manual_seed(5))
    weights = np.repeat(np.array([1.0] * 6 + [0.5, 0.25])[:, None], 6, axis=1)
    guided = policy.sample(obs, generator=torch.Generator().manual_seed(0), guide=(other[:8], weights))
    assert np.abs(guided[:6] - other[:6]).mean() < 0.7 * np.abs(plain[:6] - other[:6]).mean()
    assert policy.last_timing["expert_ms"] > 0
    # Without a guide the sampler is unchanged (bit for bit), and a bad guide is named.
    assert np.array_equal(policy.sample(obs, generator=torch.Generator().manual_seed(0)), plain)
    with pytest.raises(ValueError, match="guide target must have shape"):
        policy.sample(obs, guide=(other[:, :3], weights))
    with pytest.raises(ValueError, match="guide weights must have the target's shape"):
        policy.sample(obs, guide=(other[:8], weights[:3]))
    with pytest.raises(ValueError, match="finite"):
        policy.sample(obs, guide=(other[:8], -weights))


def test_a_flow_matching_policy_is_guided_step_by_step(policy):
    """A flow-matching policy at NFE 10 takes the RTC paper's guided Euler steps: its chunk follows the guide's
    weighted rows, with ``steer`` so does each of several candidates before the closest are kept, and the weights
    stay without gradients (the sampler runs under inference mode otherwise)."""
    saved = policy.objective
    policy.objective = O.make_objective(replace(policy.config, objective="flow_matching"))
    try:
        obs = random_observation(policy.config, seed=3)
        plain = policy.sample(obs, nfe=10, generator=torch.Generator().manual_seed(0))
        other = policy.sample({**obs, "state": obs["state"] + 0.3}, nfe=10, generator=torch.Generator().manual_seed(5))
        weights = np.repeat(np.array([1.0] * 6 + [0.5, 0.25])[:, None], 6, axis=1)
        guided = policy.sample(obs, nfe=10, generator=torch.Generator().manual_seed(0), guide=(other[:8], weights))
        picked, steered = (policy.sample(obs, nfe=10, generator=torch.Generator().manual_seed(0),
                                         guide=(other[:8], weights), candidates=4, steer=steer)
                           for steer in (False, True))
    finally:
        policy.objective = saved
    assert np.abs(guided[:6] - other[:6]).mean() < 0.5 * np.abs(plain[:6] - other[:6]).mean()
    assert np.abs(steered[:6] - other[:6]).mean() < 0.5 * np.abs(picked[:6] - other[:6]).mean()
    assert all(p.grad is None for p in policy.parameters())


def test_candidates_keep_the_draw_that_continues_the_guide(policy):
    """Coherent sampling: of K chunks drawn in one batched pass, the one closest to the guide is returned. The first
    candidate is the single draw of the same seed (so K >= 1 candidates can only come closer), over seeds the
    chosen chunk is closer than a single draw, and without a guide (or with all weights 0) nothing changes."""
    obs = random_observation(policy.config, seed=4)
    other = policy.sample(obs, generator=torch.Generator().manual_seed(99))  # another draw: a plan to continue
    weights = np.repeat(np.linspace(1.0, 0.1, 10)[:, None], 6, axis=1)
    guide = (other[:10], weights)

    def error(chunk: np.ndarray) -> float:
        scale = policy.action_std.clamp(min=1e-6).numpy()  # the selection compares normalised actions
        return float((weights * ((chunk[:10] - other[:10]) / scale) ** 2).sum())

    single, chosen = [], []
    for seed in range(6):
        plain = policy.sample(obs, generator=torch.Generator().manual_seed(seed))
        best = policy.sample(obs, generator=torch.Generator().manual_seed(seed), guide=guide, candidates=16)
        assert error(best) <= error(plain) + 1e-6
        single.append(error(plain))
        chosen.append(error(best))
    assert np.mean(chosen) < 0.8 * np.mean(single)
    assert policy.last_timing["candidates"] == 16
    zero = (other[:10], np.zeros_like(weights))
    plain = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(policy.sample(obs, generator=torch.Generator().manual_seed(0), guide=zero,
                                             candidates=8), plain, atol=1e-5)
    assert np.array_equal(policy.sample(obs, generator=torch.Generator().manual_seed(0), candidates=8), plain)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        policy.sample(obs, guide=guide, candidates=0)
    with pytest.raises(ValueError, match="average within 1..candidates"):
        policy.sample(obs, guide=guide, candidates=4, average=5)


def test_average_is_the_mean_of_the_closest_candidates(policy):
    """With ``average`` = K every candidate is averaged: the chunk is the mean of the K single draws the same
    generator gives one after another (candidate k is the k-th draw); with 2 of 6, the mean of two of them."""
    obs = random_observation(policy.config, seed=5)
    plan = policy.sample(obs, generator=torch.Generator().manual_seed(7))
    guide = (plan[:10], np.ones((10, 6), np.float32))
    g = torch.Generator().manual_seed(1)
    draws = np.stack([policy.sample(obs, generator=g) for _ in range(6)])
    every = policy.sample(obs, generator=torch.Generator().manual_seed(1), guide=guide, candidates=6, average=6)
    np.testing.assert_allclose(every, draws.mean(axis=0), atol=1e-5)
    two = policy.sample(obs, generator=torch.Generator().manual_seed(1), guide=guide, candidates=6, average=2)
    assert policy.last_timing["average"] == 2
    error = ((draws[:, :10] - plan[:10]) / policy.action_std.clamp(min=1e-6).numpy()) ** 2
    closest = np.argsort(error.sum(axis=(1, 2)))[:2]
    np.testing.assert_allclose(two, draws[closest].mean(axis=0), atol=1e-5)


def test_reading_smaller_cameras_uses_fewer_tokens_and_the_trained_size_comes_back_exactly(ckpt):
    """set_image_size (node parameter image_size, so101-eval --policy-image-size): 32 px cameras on a 64 px policy
    give a quarter of the image tokens and another chunk; 0 restores the trained size bit for bit; sizes the
    backbone cannot read, and training at a size not trained, are one clear error each."""
    policy = MeanFlowPolicy.load(ckpt).eval()
    obs = random_observation(policy.config, seed=7, size=(480, 640))
    full = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    tokens = policy.n_image_tokens
    assert policy.set_image_size(32) == 32 and policy.image_size == 32 and policy.n_image_tokens == tokens // 4
    small = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    assert np.all(np.isfinite(small)) and np.abs(small - full).max() > 1e-4
    assert policy.set_image_size(0) == policy.config.image_size == 64 and policy.n_image_tokens == tokens
    np.testing.assert_array_equal(policy.sample(obs, generator=torch.Generator().manual_seed(0)), full)
    for size in (40, 128):
        with pytest.raises(ValueError, match=rf"image size {size} px cannot be read by this backbone \(trained at 64 "
                           r"px\): use one of \[16, 32, 48, 64\]"):
            policy.set_image_size(size)
    policy.set_image_size(32)
    policy.train()
    with pytest.raises(ValueError, match="reads 32 px cameras .* training needs the checkpoint's 64 px"):
        policy.compute_loss(random_batch(policy.config))
    with pytest.raises(ValueError, match="set_image_size is for inference"):
        policy.set_image_size(0)


def test_token_grid_statistics_are_resized_per_camera_as_the_image_is():
    """resize_token_grid: each camera's grid is resized on its own (a constant camera stays that constant, a left-to-
    right ramp stays one), the same for flattened statistics and (tokens, D) tables."""
    side, new, d = 4, 3, 2
    ramp = torch.arange(side, dtype=torch.float32).repeat(side, 1)[..., None].expand(side, side, d)
    values = torch.stack([ramp, torch.full((side, side, d), 5.0)]).reshape(-1)
    out = resize_token_grid(values, 2, side, new).view(2, new, new, d)
    torch.testing.assert_close(out[1], torch.full((new, new, d), 5.0))
    assert torch.all(out[0][:, 1:] > out[0][:, :-1]) and torch.allclose(out[0][0], out[0][-1])
    assert torch.equal(resize_token_grid(values.view(-1, d), 2, side, new).reshape(-1), out.reshape(-1))


def test_a_policy_moved_to_a_smaller_image_size_trains_and_round_trips_there(ckpt, tmp_path):
    """at_image_size to a smaller size (meanflow-train --init-from --image-size 32): the same patches, a 4 x 4
    position grid interpolated from 8 x 8 and a quarter of the image-token statistics; it trains and saves at 32
    px; a size the checkpoint cannot be moved to names the option and the sizes it can."""
    source = MeanFlowPolicy.load(ckpt).eval()
    policy = at_image_size(source, 32)
    assert policy.config.image_size == 32 and policy.n_image_tokens == source.n_image_tokens // 4
    assert policy.backbone.vlm.vision_model.embeddings.position_embedding.weight.shape[0] == 16
    assert policy.image_norm.running_mean.numel() == source.image_norm.running_mean.numel() // 4
    loss, _ = policy.train().compute_loss(random_batch(policy.config), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    policy.eval()
    obs = random_observation(policy.config, seed=3, size=(480, 640))
    chunk = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    again = MeanFlowPolicy.load(policy.save(tmp_path / "at32")).sample(obs, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(again, chunk)
    with pytest.raises(ValueError, match=r"--image-size 40 with --init-from: .*\[16, 32, 48, 64\] px"):
        at_image_size(source, 40)


def test_a_policy_moved_to_twice_the_image_size_acts_as_on_the_downscaled_views(ckpt):
    """at_image_size: on 128 px cameras the converted policy gives the chunk the source gives on the same views at
    64 px (here exactly: each 64 px pixel repeated 2 x 2), so a fine-tune at the higher resolution starts from the
    policy it was; sizes that are no whole multiple are refused, naming the option."""
    source = MeanFlowPolicy.load(ckpt).eval()
    policy = at_image_size(source, 2 * source.config.image_size).eval()
    assert policy.config.tiny_patch_size == 2 * source.config.tiny_patch_size
    small = random_observation(source.config, seed=6, size=(source.config.image_size,) * 2)
    large = {**small, "images": {cam: image.repeat(2, 0).repeat(2, 1) for cam, image in small["images"].items()}}
    expected = source.sample(small, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(policy.sample(large, generator=torch.Generator().manual_seed(0)), expected, atol=1e-4)
    assert at_image_size(source, source.config.image_size) is source
    with pytest.raises(ValueError, match="--image-size 96 .*whole multiple"):
        at_image_size(source, 96)
