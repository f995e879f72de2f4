"""The bench suite: its FLOP count against torch's own counter, its memory, statistics, cost model, charts,
run comparison, and `nst bench` end to end on the CPU."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from helpers import one_error_line, run_together
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bench import compare as bench_compare
from bench import suite
from bench.flops import layer_sizes, step_flops
from bench.memory import peak_memory
from bench.plot import charts, write_charts
from bench.stats import fit_cost, ratio_interval, summary
from bench.suite import Lever, build_step
from cli.main import main
from engine import Config

MIB = 2**20


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
    step, config = build_step(Lever("baseline", batch_size=batch), size, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        step()
    counted = counter.get_total_flops()
    ours = step_flops(config.model, config.feature_layers, config.style_layers, size, size, batch)["total"]
    # Neither counts element-wise work; convolutions and Gram matmuls must agree exactly.
    assert ours == counted


def test_a_lever_is_a_name_and_config_fields():
    lever = Lever("wide", batch_size=3, memory_format="channels_last")
    assert lever.batch == 3 and lever.settings["memory_format"] == "channels_last"
    assert lever.settings["precision"] == suite.BASELINE["precision"]
    config = dataclasses.replace(Config(), **lever.settings)  # every override is a Config field
    assert config.batch_size == 3
    with pytest.raises(TypeError, match="'warp' is not a Config field"):
        Lever("bad", warp=9)


# --- memory ---------------------------------------------------------------------------------------------------


def test_cpu_peak_memory_counts_what_the_call_allocates_and_frees():
    def allocate():
        block = torch.ones(64 * MIB // 4)  # 64 MiB, written so that every page is resident
        total = float(block[::4096].sum())
        del block
        return total

    result, peak = peak_memory(allocate, "cpu")
    assert result == 64 * MIB // 4 // 4096
    # Freed before the call returned, yet counted: the peak, not what is left. The kernel's RSS counters
    # are synchronised lazily (every 64 page faults per thread), hence the slack below 64 MiB.
    assert 63 * MIB <= peak < 64 * MIB + 24 * MIB
    _, idle = peak_memory(lambda: None, torch.device("cpu"))
    assert idle < 8 * MIB


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_counts_tensors_above_the_level_before():
    kept = torch.ones(32 * MIB // 4, device="cuda")
    _, peak = peak_memory(lambda: torch.ones(16 * MIB // 4, device="cuda").sum(), "cuda")
    assert 16 * MIB <= peak < 17 * MIB
    del kept


# --- statistics and the cost model -----------------------------------------------------------------------------


def test_summary_gives_median_quartiles_and_an_interval_around_the_median():
    samples = [10.0, 11.0, 9.0, 10.5, 30.0, 9.5, 10.2]
    got = summary(samples)
    assert got["median"] == 10.2 and got["q1"] <= got["median"] <= got["q3"]
    assert min(samples) <= got["ci_low"] <= got["median"] <= got["ci_high"] < 30.0  # the outlier is not the median
    assert summary(samples) == got  # seeded: the same samples, the same interval


def test_cost_model_fit_recovers_exact_coefficients():
    pixels = [128**2, 256**2, 512**2, 1024**2]
    model = fit_cost(pixels, [0.05 + 2e-7 * p for p in pixels])
    assert model.fixed_s == pytest.approx(0.05, rel=1e-9) and model.per_pixel_s == pytest.approx(2e-7, rel=1e-9)
    assert model.worst_residual < 1e-9
    assert model.describe().startswith("50.0 ms + 200.0 ms per Mpx")


def test_sweep_sizes_are_geometric_from_low_to_high():
    assert suite.sweep_sizes(128, 1024) == [128, 181, 256, 362, 512, 724, 1024]
    assert suite.sweep_sizes(128, 1024, 4) == [128, 256, 512, 1024]


def test_sweep_recovers_the_cost_of_an_injected_step():
    """A fake step that takes a + b * pixels seconds, timed and fitted by the real suite."""
    fixed, per_pixel = 0.04, 2e-6  # 42 ms at 32 px, 171 ms at 256 px

    def fake_build(lever, size, device):
        def step():
            time.sleep(fixed + per_pixel * lever.batch * size * size)

        return step, Config()

    # The rows and the fit of `nst bench --sweep 32:256:4` (less its matmul peak, which takes seconds here).
    cpu = torch.device("cpu")
    rows = [suite.run_row(Lever("baseline"), size, cpu, 0, 5, fake_build) for size in suite.sweep_sizes(32, 256, 4)]
    fit = suite.fit_levers(rows)["baseline"]
    # Sleeping overshoots by a little, a constant: it lands in the fixed cost.
    assert fit["fixed_ms"] == pytest.approx(fixed * 1e3, rel=0.15)
    assert fit["ms_per_mpx"] == pytest.approx(per_pixel * 1e9, rel=0.05)
    assert fit["worst_residual"] < 0.1
    assert [row["size"] for row in rows] == [32, 64, 128, 256]
    for row in rows:
        assert len(row["samples_ms"]) == 5 and row["ms_ci95"][0] <= row["ms_per_step"] <= row["ms_ci95"][1]


# --- compare ---------------------------------------------------------------------------------------------------


def _recorded(rows: dict, commit: str) -> dict:
    """A file as `nst bench --json` writes it, with ``rows`` as ``{(config, size): repeats in ms}``."""
    meta = {"device": "test CPU", "threads": 2, "torch": torch.__version__, "commit": commit, "date": "today"}
    return {
        "meta": meta,
        "rows": [
            {
                "config": config,
                "size": size,
                "batch": 1,
                "ms_per_step": float(np.median(samples)),
                "samples_ms": list(samples),
            }
            for (config, size), samples in rows.items()
        ],
    }


def _noisy(median_ms: float, seed: int, n: int = 9) -> list[float]:
    """Repeats with a 5% spread, as on a shared CPU."""
    return list(median_ms * (1 + 0.05 * np.random.default_rng(seed).standard_normal(n)))


@pytest.fixture(scope="module")
def recorded_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    old = {("baseline", 128): _noisy(100, 1), ("channels_last", 128): _noisy(80, 2), ("loss_w2", 128): _noisy(900, 3)}
    new = {
        ("baseline", 128): [t * 1.30 for t in _noisy(100, 4)],
        ("channels_last", 128): [t * 1.03 for t in _noisy(80, 5)],
        ("loss_ot", 128): _noisy(250, 6),
    }
    paths = {}
    for name, rows in (("old", old), ("new", new), ("new_small", {k: v for k, v in new.items() if k[0] != "baseline"})):
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(_recorded(rows, commit=name)))
    return folder, paths


def test_compare_marks_a_30_percent_slowdown_and_not_a_3_percent_change(recorded_pair):
    _, paths = recorded_pair
    old, new = bench_compare.load(paths["old"]), bench_compare.load(paths["new"])
    result = bench_compare.compare(old, new, noise=0.0)  # no floor: the interval alone decides
    by_key = {c.key: c for c in result.changes}
    slow, small = by_key["baseline", 128], by_key["channels_last", 128]
    assert slow.verdict == "slower" and slow.interval[0] > 1.15
    assert small.verdict == "~" and small.interval[0] < 1 < small.interval[1]
    assert slow.ratio == pytest.approx(
        np.median(new.rows["baseline", 128][1]) / np.median(old.rows["baseline", 128][1])
    )
    assert result.only_old == [("loss_w2", 128)] and result.only_new == [("loss_ot", 128)]


def test_nst_bench_compare_prints_ratios_lists_lone_rows_and_fails_only_beyond_the_noise(recorded_pair, capsys):
    folder, paths = recorded_pair
    assert main(["bench", "compare", str(paths["old"]), str(paths["new"])]) == 0
    out = capsys.readouterr().out
    verdicts = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.endswith(("~", "slower"))}
    assert verdicts == {"baseline": "slower", "channels_last": "~"}
    assert "only in old: loss_w2 128" in out and "only in new: loss_ot 128" in out
    assert main(["bench", "compare", str(paths["old"]), str(paths["new"]), "--fail-slower", "10"]) == 1
    assert "FAIL: 1 row(s) slower by more than 10%: baseline 128" in capsys.readouterr().out
    # Slower by 30% but not by 40%: no failure; the 3% change alone: no failure even at a 1% threshold.
    assert main(["bench", "compare", str(paths["old"]), str(paths["new"]), "--fail-slower", "40"]) == 0
    assert main(["bench", "compare", str(paths["old"]), str(paths["new_small"]), "--fail-slower", "1"]) == 0
    capsys.readouterr()
    assert main(["bench", "compare", str(paths["old"]), str(folder / "nothing.json")]) == 2
    assert capsys.readouterr().err.startswith("nst: error: cannot read ")


def test_ratio_interval_covers_the_true_ratio_of_two_noisy_runs():
    ratio, low, high = ratio_interval(_noisy(100, 7, n=15), _noisy(120, 8, n=15))
    assert low < 1.2 < high and low < ratio < high


def test_compare_reads_pytest_benchmark_json(tmp_path):
    def saved(scale):
        return {
            "machine_info": {"cpu": {"brand_raw": "test CPU"}},
            "commit_info": {"id": "abc"},
            "datetime": "now",
            "benchmarks": [
                {
                    "name": "test_step[baseline-128px]",
                    "stats": {"median": 0.1 * scale, "data": [t * scale / 1e3 for t in _noisy(100, 9)]},
                },
                {"name": "test_step[all-128px]", "stats": {"median": 0.09}},
            ],
        }

    (tmp_path / "a.json").write_text(json.dumps(saved(1.0)))
    (tmp_path / "b.json").write_text(json.dumps(saved(1.5)))
    result = bench_compare.compare(bench_compare.load(tmp_path / "a.json"), bench_compare.load(tmp_path / "b.json"))
    by_name = {c.key[0]: c for c in result.changes}
    assert by_name["test_step[baseline-128px]"].verdict == "slower"
    assert by_name["test_step[all-128px]"].verdict == "?" and by_name["test_step[all-128px]"].interval is None


# --- charts ----------------------------------------------------------------------------------------------------


def _synthetic_results() -> dict:
    rows = []
    for size in (64, 128, 256):
        for name, batch, factor, peak in (
            ("baseline", 1, 1.0, 0.01),
            ("channels_last", 1, 0.8, 0.012),
            ("batch2", 2, 1.7, 0.02),
        ):
            ms = factor * (20 + 0.01 * batch * size * size)
            rows.append(
                {
                    "config": name,
                    "size": size,
                    "batch": batch,
                    "ms_per_step": ms,
                    "ms_ci95": [0.9 * ms, 1.2 * ms],
                    "peak_mib": 50 + peak * batch * size * size,
                    "pct_matmul_peak": 40 + size / 10 + 10 * factor,
                }
            )
    for row in rows:
        base = next(r for r in rows if r["config"] == "baseline" and r["size"] == row["size"])
        row["speedup"] = base["ms_per_step"] / (row["ms_per_step"] / row["batch"])
    meta = {"device": "test CPU", "threads": 2, "torch": torch.__version__}
    return {"meta": meta, "rows": rows, "fits": suite.fit_levers(rows)}


def _covers(limits, values):
    return limits[0] <= min(values) and max(values) <= limits[1]


def test_charts_plot_every_row_and_their_axes_cover_the_data():
    results = _synthetic_results()
    rows = results["rows"]
    figures = charts(results)
    assert set(figures) == {"time", "memory", "speedup", "peak"}
    per_step = [r["batch"] * r["size"] ** 2 / 1e6 for r in rows]
    per_image = [r["size"] ** 2 / 1e6 for r in rows]
    expected = {
        "time": (per_step, [r["ms_ci95"][0] for r in rows] + [r["ms_ci95"][1] for r in rows], "ms_per_step"),
        "memory": (per_step, [r["peak_mib"] for r in rows], "peak_mib"),
        "speedup": (per_image, [r["speedup"] for r in rows], "speedup"),
        "peak": (per_step, [r["pct_matmul_peak"] for r in rows], "pct_matmul_peak"),
    }
    for name, (xs, ys, field) in expected.items():
        ax = figures[name].axes[0]
        assert ax.get_xscale() == "log"
        assert _covers(ax.get_xlim(), xs) and _covers(ax.get_ylim(), ys), name
        # Each configuration's line holds exactly its rows' values, in size order.
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        lines.update({bars.get_label(): bars.lines[0] for bars in ax.containers})  # error bars: their data line
        for config in ("baseline", "channels_last", "batch2"):
            mine = sorted((r for r in rows if r["config"] == config), key=lambda r: r["size"])
            assert list(lines[config].get_ydata()) == pytest.approx([r[field] for r in mine]), (name, config)
    # The fitted cost model is drawn over the measured range.
    fit_line = next(line for line in figures["time"].axes[0].get_lines() if line.get_label().startswith("baseline:"))
    assert min(fit_line.get_xdata()) == pytest.approx(min(per_step[0::3]))


def test_charts_are_written_as_non_blank_pngs(tmp_path):
    paths = write_charts(_synthetic_results(), tmp_path / "charts")
    assert sorted(p.name for p in paths) == ["memory.png", "peak.png", "speedup.png", "time.png"]
    for path in paths:
        image = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert image.shape[0] > 100 and image.std() > 5, path  # more than a blank canvas


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    (folder / "out").mkdir()  # --json writes into an existing folder only
    common = ["bench", "--device", "cpu", "--sizes", "32", "--warmup", "1", "--repeats", "2"]
    sweep = ["bench", "--device", "cpu", "--sweep", "32:48:2", "--warmup", "1", "--repeats", "2"]
    return run_together(
        {
            "table": (
                [*common, "--only", "channels_last,cli,batch2", "--batch", "2", "--json", "out/bench.json"],
                folder,
            ),
            "sweep": ([*sweep, "--plot", "charts", "--json", "sweep.json"], folder),
            "profile": ([*common, "--only", "baseline", "--profile", "trace.json"], folder),
            "unknown": ([*common, "--only", "warp_drive"], folder),
            "bad_sweep": (["bench", "--sweep", "256:128"], folder),
        }
    ), folder


@pytest.mark.slow
def test_bench_prints_the_table_and_writes_json(bench_runs):
    results, folder = bench_runs
    r = results["table"]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("device: ") and lines[1].startswith("host: ")
    assert "matmul peak measured now: fp32" in lines[2]
    header = next(i for i, line in enumerate(lines) if line.startswith("config"))
    rows = [line.split() for line in lines[header + 1 :] if line and not line.startswith("wrote")]
    assert [row[0] for row in rows] == ["baseline", "channels_last", "cli", "batch2"]
    assert rows[0][-1] == "1.00x" and rows[3][2] == "2"
    data = json.loads((folder / "out" / "bench.json").read_text())
    assert {"device", "cpu", "threads", "torch", "cuda", "cudnn", "commit", "matmul_peak_tflops", "date"} <= set(
        data["meta"]
    )
    base, *others = data["rows"]
    assert base["speedup"] == 1.0 and base["precision"] == "fp32" and base["memory_format"] == "contiguous"
    for row in data["rows"]:
        assert row["ms_per_step"] > 0 and 0 < row["pct_matmul_peak"]
        # The ratio is what the columns say it is: time per image-step against the baseline's.
        assert row["speedup"] == pytest.approx(base["ms_per_step"] / (row["ms_per_step"] / row["batch"]))
        assert row["tflops"] == pytest.approx(row["flops_per_step"] / row["ms_per_step"] / 1e9)
        # The cli row takes one sample per group of steps between loss reads: every step when a step takes
        # 0.1 s or more, every 16 when the machine is fast enough; the other rows one per repeat.
        count = len(row["samples_ms"])
        assert (count == 2) if row["config"] != "cli" else (1 <= count <= 2)
        assert row["ms_ci95"][0] <= row["ms_per_step"] <= row["ms_ci95"][1]
        # The CPU's peak memory is measured: at least the image, its gradient and Adam's two moments.
        assert row["peak_mib"] > 4 * row["batch"] * 3 * 32 * 32 * 4 / MIB
    assert data["rows"][2]["peak_mib"] > data["rows"][0]["peak_mib"]  # two images need more than one


@pytest.mark.slow
def test_bench_sweep_fits_the_cost_and_writes_charts(bench_runs):
    results, folder = bench_runs
    r = results["sweep"]
    assert r.returncode == 0, r.stderr
    data = json.loads((folder / "sweep.json").read_text())
    assert [(row["config"], row["size"]) for row in data["rows"]] == [("baseline", 32), ("baseline", 48)]
    assert f"cost model baseline: {data['fits']['baseline']['text']}" in r.stdout
    assert sorted(p.name for p in (folder / "charts").iterdir()) == [
        "memory.png",
        "peak.png",
        "speedup.png",
        "time.png",
    ]


@pytest.mark.slow
def test_bench_profile_writes_a_trace(bench_runs):
    results, folder = bench_runs
    assert results["profile"].returncode == 0, results["profile"].stderr
    trace = json.loads((folder / "trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("conv" in name for name in names)


@pytest.mark.slow
def test_bench_unknown_configuration_or_sweep_is_one_sentence(bench_runs):
    r = bench_runs[0]["unknown"]
    assert r.returncode == 2
    assert "configuration 'warp_drive' is not in the matrix here" in one_error_line(r)
    r = bench_runs[0]["bad_sweep"]
    assert r.returncode == 2
    assert "'256:128' must go from a smaller size to a larger one" in one_error_line(r)


@pytest.mark.parametrize(
    "case,args,message",
    [
        (
            "json exists",
            ["--json", "taken.json"],
            "--json file 'taken.json' already exists; pass --overwrite to replace it",
        ),
        ("json folder missing", ["--json", "nowhere/x.json"], "--json file directory 'nowhere' does not exist"),
        (
            "size too small",
            ["--sizes", "8"],
            "--sizes 8 would be 8x8 px, but the chosen layers (down to relu5_1) need at least 16 px",
        ),
    ],
)
def test_bench_refuses_before_timing_and_touches_nothing(tmp_path, monkeypatch, capsys, case, args, message):
    from cli.main import main

    (tmp_path / "taken.json").write_text("the user's earlier results\n")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "cpu", "--sizes", "32", *args]) == 2  # in this process: no torch import to pay
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith(f"nst: error: {message}"), err
    assert (tmp_path / "taken.json").read_text() == "the user's earlier results\n"
    assert not (tmp_path / "nowhere").exists()
