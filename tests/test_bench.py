"""The bench suite: its FLOP count against torch's own counter, and `nst bench` end to end on the CPU."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import layer_sizes, step_flops
from bench.suite import Lever, build_step
from helpers import one_error_line, run_together


def test_flops_by_hand_for_one_layer():
    # conv1_1 at 8x8: 2 * 3 * 64 * 9 * 64 forward, the same backward; Gram of 64 channels over 64 pixels.
    got = step_flops("vgg19", ["relu1_1"], ["relu1_1"], 8, 8)
    assert got["conv"] == 2 * (2 * 3 * 64 * 9 * 64)
    assert got["gram"] == 3 * (2 * 64 * 64 * 64)  # backward: one matmul per side of F F^T
    assert step_flops("vgg19", ["relu1_1"], ["relu1_1"], 8, 8, batch=3)["total"] == 3 * got["total"]


def test_layer_sizes_round_down_at_each_pool():
    sizes = layer_sizes("vgg19", ["relu3_1"], 37, 50)
    assert sizes["relu1_1"] == (37, 50) and sizes["relu2_1"] == (18, 25) and sizes["relu3_1"] == (9, 12)


@pytest.mark.parametrize("size,batch", [(48, 1), (40, 2)])
def test_flop_count_matches_torch_counter_for_a_real_step(size, batch):
    """torch's FlopCounterMode, run on the engine's actual step, counts convolutions and matmuls independently."""
    step, config = build_step(Lever("baseline", batch=batch), size, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        step()
    counted = counter.get_total_flops()
    ours = step_flops(config.model, config.feature_layers, config.style_layers, size, size, batch)["total"]
    # Neither counts element-wise work; convolutions and Gram matmuls must agree exactly.
    assert ours == counted


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    common = ["bench", "--device", "cpu", "--sizes", "32", "--warmup", "1", "--repeats", "2"]
    return run_together({
        "table": ([*common, "--only", "channels_last,batch2", "--batch", "2", "--json", "out/bench.json"], folder),
        "profile": ([*common, "--only", "baseline", "--profile", "trace.json"], folder),
        "unknown": ([*common, "--only", "warp_drive"], folder),
    }), folder


@pytest.mark.slow
def test_bench_prints_the_table_and_writes_json(bench_runs):
    results, folder = bench_runs
    r = results["table"]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("device: ") and "matmul peak measured now: fp32" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("config"))
    rows = [line.split() for line in lines[header + 1:] if line and not line.startswith("wrote")]
    assert [row[0] for row in rows] == ["baseline", "channels_last", "batch2"]
    assert rows[0][-1] == "1.00x" and rows[2][2] == "2"
    data = json.loads((folder / "out" / "bench.json").read_text())
    assert {"device", "torch", "commit", "matmul_peak_tflops", "date"} <= set(data["meta"])
    base, *others = data["rows"]
    assert base["speedup"] == 1.0 and base["precision"] == "fp32" and base["memory_format"] == "contiguous"
    for row in data["rows"]:
        assert row["ms_per_step"] > 0 and 0 < row["pct_matmul_peak"]
        # The ratio is what the columns say it is: time per image-step against the baseline's.
        assert row["speedup"] == pytest.approx(base["ms_per_step"] / (row["ms_per_step"] / row["batch"]))
        assert row["tflops"] == pytest.approx(row["flops_per_step"] / row["ms_per_step"] / 1e9)


@pytest.mark.slow
def test_bench_profile_writes_a_trace(bench_runs):
    results, folder = bench_runs
    assert results["profile"].returncode == 0, results["profile"].stderr
    trace = json.loads((folder / "trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("conv" in name for name in names)


@pytest.mark.slow
def test_bench_unknown_configuration_is_one_sentence(bench_runs):
    r = bench_runs[0]["unknown"]
    assert r.returncode == 2
    assert "configuration 'warp_drive' is not in the matrix here" in one_error_line(r)
