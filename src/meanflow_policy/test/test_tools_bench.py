"""meanflow-bench: the JSON last line names every timed variant, coherent sampling's candidate counts and the
rtc-guided draws included;
meanflow-bench-peers: its inputs and errors (timing LeRobot itself needs LeRobot, which CI does not install)."""
import importlib.util
import json

import pytest

from meanflow_policy.tools import bench, bench_peers


def test_bench_times_each_candidate_count_beside_the_single_draw_variants(capsys):
    assert bench.main(["--preset", "tiny", "--runs", "2", "--warmup", "0", "--precisions", "float32",
                       "--threads", "1", "--candidates", "4,8", "--rtc-guided"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    chunk = summary["chunk_ms"]
    assert {"meanflow_1", "meanflow_1_candidates_4", "meanflow_1_candidates_8", "flow_matching_10",
            "meanflow_1_rtc_guided", "flow_matching_10_rtc_guided"} <= set(chunk)
    assert all(ms > 0 for ms in chunk.values())
    # A guided Euler step is a forward and a backward pass: ten of them cost more than ten plain steps.
    assert summary["expert_ms"]["flow_matching_10_rtc_guided"] > summary["expert_ms"]["flow_matching_10"]


def test_bench_reads_the_cameras_at_a_smaller_size_and_refuses_one_it_cannot(capsys):
    assert bench.main(["--preset", "tiny", "--runs", "2", "--warmup", "0", "--precisions", "float32", "--threads", "1",
                       "--candidates", "", "--read-size", "32"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["image_size"] == 64 and summary["read_size"] == 32
    assert "image 64px read at 32px x 2 cameras" in out and "prefix tokens 8 image" in out
    with pytest.raises(SystemExit, match=r"--read-size 40: image size 40 px cannot be read .*\[16, 32, 48, 64\]"):
        bench.main(["--preset", "tiny", "--runs", "1", "--precisions", "float32", "--read-size", "40"])


def test_bench_refuses_a_candidate_count_below_two(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--candidates", "1"])
    assert exc.value.code == 2 and "each count must be >= 2" in capsys.readouterr().err


def test_bench_refuses_cuda_graphs_on_the_cpu(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--cuda-graphs"])
    assert exc.value.code == 2 and "--cuda-graphs needs --device cuda" in capsys.readouterr().err


def test_peer_ratios_read_our_bench_json_per_precision(tmp_path, capsys):
    assert bench.main(["--preset", "tiny", "--runs", "1", "--warmup", "0", "--precisions", "float32",
                       "--threads", "1", "--candidates", ""]) == 0
    out = tmp_path / "ours.txt"
    out.write_text(capsys.readouterr().out)
    ours = bench_peers._our_chunks(str(out))
    assert set(ours) == {"meanflow_1_float32"} and ours["meanflow_1_float32"] > 0
    out.write_text("no JSON here\n")
    assert bench_peers._our_chunks(str(out)) == {}
    assert "no ratios" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("lerobot") is not None, reason="LeRobot is installed here")
def test_peers_without_lerobot_say_how_to_get_it():
    with pytest.raises(SystemExit, match="install lerobot==0.4.4"):
        bench_peers.main(["--vlm-config", "/nonexistent", "--peers", "diffusion"])


def test_peers_refuse_an_unknown_peer(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_peers.main(["--vlm-config", "x", "--peers", "act"])
    assert exc.value.code == 2 and "['act'] not in smolvla, diffusion" in capsys.readouterr().err


def test_bench_train_times_given_bags(tmp_path):
    from meanflow_policy.tools import bench_train

    bags = bench_train.write_synthetic_bags(tmp_path / "bags", episodes=2, duration_s=1.0)
    result = bench_train.main(["--bags", str(bags), "--steps", "1", "--warmup", "0", "--batch-size", "4",
                               "--cpu-threads", "1"])
    assert set(result["steps_per_s"]) == {"joint", "frozen", "frozen_cached"}
    assert all(rate > 0 for rate in result["steps_per_s"].values()) and result["samples"] > 0


def test_peers_replot_draws_a_run_from_its_json(tmp_path):
    summary = {"device": "GPU X", "date_utc": "2026-12-04T00:00:00Z", "commit": "abc",
               "ours": {"meanflow_1_bfloat16": 6.4}, "peers": {"smolvla_16layers_10steps": {"chunk_ms": 190.0}}}
    source = tmp_path / "peers.txt"
    source.write_text("timing lines\n" + json.dumps(summary) + "\n")
    png = tmp_path / "peers.png"
    assert bench_peers.main(["--replot", str(source), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_times_the_variants_in_rounds_each_chunk_after_one_of_its_own():
    policy = bench.build_policy("tiny", "cpu", None, "float32")
    obs = bench.make_observation(policy.config, 48, 64)
    calls = []
    sample = policy.sample

    def spy(*args, **kwargs):
        calls.append((policy.objective.name, kwargs["nfe"]))
        return sample(*args, **kwargs)

    policy.sample = spy  # type: ignore[method-assign]
    variants = [bench.Variant("meanflow_1", "meanflow", 1), bench.Variant("flow_matching_2", "flow_matching", 2)]
    timings = bench.time_variants(policy, obs, variants, runs=bench.ROUND_CHUNKS + 2, warmup=1)
    assert all(len(t["expert_ms"]) == bench.ROUND_CHUNKS + 2 for t in timings.values())
    mf, fm = ("meanflow", 1), ("flow_matching", 2)
    first, second = bench.ROUND_CHUNKS + 1, 3  # a settling chunk, then the timed ones
    assert calls == [mf, fm] + [mf] * first + [fm] * first + [mf] * second + [fm] * second
    assert policy.objective.name == "meanflow"  # the policy's own sampler is put back
