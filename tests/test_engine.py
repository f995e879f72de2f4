"""The long-lived Engine: jobs from many threads, the caches it keeps, cancel, failures, events, limits, resume.

Float32 on the CPU is deterministic, so a job through the Engine is compared with ``stylize`` bit for
bit; jobs batched together differ from jobs alone only in summation order: within 1e-3 in pixels
(a twentieth of one Adam step at lr 0.02; test_runtime sees up to 1e-4 over fewer steps).
"""

import threading
import time

import pytest
import torch

from engine import Config, Control, Engine, JobCancelled, JobFailed, JobInterrupted, QueueFull, UserError, stylize
from engine import checkpoint as ckpt
from engine.optimize import NonFiniteLoss

TINY = dict(
    device="cpu",
    size=32,
    min_size=23,
    steps=4,
    content_layers=("relu2_1",),
    style_layers=("relu1_1", "relu2_1"),
    batch_size=1,
    # These tests are about scheduling, batching and caching: with gram a batch's image equals a lone run's to
    # float rounding. ot's sorts turn that rounding into reordered projections (0.03 after 4 steps at 32 px on an
    # AMD EPYC); batched ot is checked with its own tolerance in test_runtime.py.
    style_loss="gram",
)
CUDA = torch.cuda.is_available()


def picture(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def engine():
    with Engine(Config(**TINY)) as e:
        yield e


def test_two_threads_get_the_images_of_sequential_runs():
    config = Config(**TINY)
    jobs = [(picture(32, 32, i), picture(32, 32, 10 + i % 2)) for i in range(4)]
    alone = [stylize(c, s, config).image for c, s in jobs]
    for batch_size, tolerance in ((1, 0.0), (2, 1e-3)):
        settings = Config(**{**TINY, "batch_size": batch_size})
        with Engine(settings) as engine:
            submitted = {}

            def client(indices, engine=engine, submitted=submitted, settings=settings):
                for i in indices:
                    submitted[i] = engine.submit(*jobs[i], settings)

            threads = [threading.Thread(target=client, args=(half,)) for half in ([0, 1], [2, 3])]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, expected in enumerate(alone):
                torch.testing.assert_close(submitted[i].result(60).image, expected, rtol=0, atol=tolerance)


def test_a_second_same_size_job_reuses_the_extractor_and_style_features(engine):
    style = picture(32, 32, 20)
    before = engine.stats
    extractor = engine.extractor
    first = engine.submit(picture(32, 32, 21), style).result(60)
    after_first = engine.stats
    scales = 2  # 23 and 32 px
    assert after_first["style_misses"] - before["style_misses"] == scales
    second = engine.submit(picture(32, 32, 22), style).result(60)
    after_second = engine.stats
    assert after_second["style_hits"] - after_first["style_hits"] == scales  # nothing recomputed
    assert after_second["style_misses"] == after_first["style_misses"]
    assert engine.extractor is extractor
    # The cached features give the same images as a run that computes them.
    torch.testing.assert_close(second.image, stylize(picture(32, 32, 22), style, Config(**TINY)).image, rtol=0, atol=0)
    assert not torch.equal(first.image, second.image)


def test_cancel_stops_a_running_job_within_one_step(engine, tmp_path):
    steps_run = []
    job = None

    def watch():  # called by the worker once per step: cancel from there at step 3, deterministically
        steps_run.append(len(steps_run) + 1)
        if len(steps_run) == 3:
            job.cancel()

    job = engine.submit(
        picture(32, 32, 1), picture(32, 32, 2), Config(**{**TINY, "steps": 200}), control=Control(watch=watch)
    )
    with pytest.raises(JobCancelled, match="was cancelled"):
        job.result(60)
    assert steps_run == [1, 2, 3]  # no step after the one that saw the cancel
    assert [e["type"] for e in job.events()][-1] == "cancelled"


def test_cancel_removes_a_queued_job_at_once(engine):
    long = engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**{**TINY, "steps": 2000}))
    queued = engine.submit(picture(32, 32, 3), picture(32, 32, 2))
    assert queued.state == "queued"
    queued.cancel()
    assert queued.state == "cancelled" and list(queued.events(timeout=0)) == [{"type": "cancelled"}]
    long.cancel()
    with pytest.raises(JobCancelled):
        long.result(60)


def test_cancelling_one_job_of_a_batch_leaves_the_other_running():
    settings = Config(**{**TINY, "batch_size": 2, "steps": 40})
    pair = picture(32, 32, 31), picture(32, 32, 32)
    alone = stylize(*pair, settings).image
    with Engine(settings) as engine:
        blocker = engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**{**TINY, "steps": 2000}))
        while blocker.state == "queued":
            time.sleep(0.01)
        dropped, kept = engine.submit(picture(32, 32, 33), pair[1]), engine.submit(*pair)
        batches = engine.stats["batches"]
        blocker.cancel()
        for event in dropped.events(timeout=60):  # once it has made progress, batched with the other
            if event["type"] == "progress":
                dropped.cancel()
        assert dropped.state == "cancelled"
        torch.testing.assert_close(kept.result(60).image, alone, rtol=0, atol=1e-3)
        assert engine.stats["batches"] == batches + 1  # the two ran as one batch


def test_a_failing_job_leaves_the_engine_serving_the_next(engine):
    with pytest.raises(UserError, match="content image tensor has NaN"):
        engine.submit(torch.full((3, 32, 32), float("nan")), picture(32, 32, 2))
    with pytest.raises(UserError, match="content image"):
        engine.submit("no-such-image.png", picture(32, 32, 2))
    assert engine.stats["queued"] == 0  # nothing was queued
    # Fails while running: no memory mode fits a budget of a few bytes.
    bad = engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**TINY, memory_budget=1e-9))
    with pytest.raises(JobFailed, match="but the budget is 0.0 GiB") as failed:
        bad.result(60)
    assert bad.state == "failed" and bad.error == str(failed.value) and "\n" not in bad.error
    assert list(bad.events())[-1] == {"type": "failed", "error": bad.error}
    # The loss overflows: the NaN guard's NonFiniteLoss fails this job only.
    huge = dict(content_weight=3e38, style_weight=3e38, tv_weight=3e38, init="noise")
    overflow = engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**TINY, **huge))
    with pytest.raises(JobFailed, match="^the loss became infinite at step 1 of this scale"):
        overflow.result(60)
    assert isinstance(overflow.exception, NonFiniteLoss)
    good = engine.submit(picture(32, 32, 1), picture(32, 32, 2)).result(60)
    assert good.image.shape == (3, 32, 32)
    assert engine.stats["running"] == 0 and engine.stats["failed"] >= 2


def test_a_job_speaks_the_words_of_whoever_submitted_it(engine):
    from engine.errors import cli_wording

    huge = dict(content_weight=3e38, style_weight=3e38, tv_weight=3e38, init="noise")
    with cli_wording():  # as the command line submits: options named --like-this, even from the worker thread
        job = engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**TINY, **huge))
    with pytest.raises(JobFailed, match="try a lower --lr"):
        job.result(60)


def test_settings_the_engine_fixed_are_refused_with_the_field_named(engine):
    with pytest.raises(UserError, match=r"^pooling is 'avg' but this engine was built with 'max'"):
        engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**TINY, pooling="avg"))
    with pytest.raises(UserError, match=r"^padding is 'replicate' but this engine was built with 'zeros'"):
        engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**TINY, padding="replicate"))


def test_events_arrive_in_order_with_one_terminal_event(engine):
    job = engine.submit(picture(32, 32, 5), picture(32, 32, 6), Config(**{**TINY, "steps": 6}))
    live = list(job.events(timeout=60))  # subscribed while it runs
    late = list(job.events())  # subscribed after it ended: the same events from the start
    assert live == late
    assert list(job.events(start=3)) == live[3:]  # a client that has seen three
    progress, terminal = live[:-1], live[-1]
    assert terminal == {"type": "done"}
    total = job.progress.total_steps
    assert [e["step"] for e in progress] == list(range(1, total + 1))
    assert all(e["type"] == "progress" and e["total_steps"] == total and e["scales"] == 2 for e in progress)
    assert set(progress[-1]["parts"]) == {"content", "style", "tv"}
    assert job.preview().shape == (3, 32, 32)


def test_a_full_queue_raises_queue_full():
    with Engine(Config(**TINY), max_queued=1) as engine:
        running = engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**{**TINY, "steps": 2000}))
        while running.state == "queued":
            time.sleep(0.01)
        waiting = engine.submit(picture(32, 32, 3), picture(32, 32, 2))
        with pytest.raises(QueueFull, match=r"^the queue is full \(1 jobs waiting\); try again later$"):
            engine.submit(picture(32, 32, 4), picture(32, 32, 2))
        waiting.cancel()
        running.cancel()


def test_a_job_over_its_time_limit_fails(engine):
    job = engine.submit(picture(32, 32, 1), picture(32, 32, 2), Config(**{**TINY, "steps": 5000}), time_limit=0.2)
    with pytest.raises(JobFailed, match=r"^the job ran past its time limit of 0.2 s and was stopped after step"):
        job.result(60)
    with pytest.raises(UserError, match="time_limit must be a number of seconds greater than zero"):
        engine.submit(picture(32, 32, 1), picture(32, 32, 2), time_limit=0)


def test_interrupted_job_resumed_equals_an_uninterrupted_one(engine, tmp_path):
    pair = picture(32, 32, 7), picture(32, 32, 8)
    config = Config(**{**TINY, "steps": 6})
    full = engine.submit(*pair, config).result(60)
    calls = []

    def watch():  # once per step: interrupt after the fourth
        calls.append(1)
        if len(calls) == 4:
            control.interrupt()

    control = Control(watch=watch)
    plan = ckpt.CheckpointPlan(str(tmp_path / "job.ckpt"))
    stopped = engine.submit(*pair, config, checkpoint=plan, control=control)
    with pytest.raises(JobInterrupted):
        stopped.result(60)
    assert stopped.state == "interrupted" and list(stopped.events())[-1] == {"type": "interrupted"}
    resumed = engine.submit(*pair, config, resume=ckpt.load(tmp_path / "job.ckpt")).result(60)
    torch.testing.assert_close(resumed.image, full.image, rtol=0, atol=0)
    assert not (tmp_path / "job.ckpt").exists()  # done: the checkpoint could only repeat it


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_second_open_engine_with_another_precision_is_refused():
    with Engine(Config(**{**TINY, "device": "cuda", "precision": "tf32"})):
        with pytest.raises(UserError, match="an open Engine with precision 'tf32' set this process's CUDA math"):
            Engine(Config(**{**TINY, "device": "cuda", "precision": "fp32"}))
    Engine(Config(**{**TINY, "device": "cuda", "precision": "fp32"})).close()  # once the first is closed


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_second_same_size_job_replays_the_captured_graphs():
    settings = dict(TINY, device="cuda", size=64, min_size=64, steps=12, cuda_graphs="on", precision="fp32")
    pair = picture(64, 64, 1), picture(64, 64, 2)
    with Engine(Config(**settings)) as engine:
        engine.submit(picture(64, 64, 3), picture(64, 64, 4)).result(120)
        assert engine.stats["graph_captures"] == 1 and engine.stats["graph_reuses"] == 0
        second = engine.submit(*pair).result(120)
        assert engine.stats["graph_captures"] == 1 and engine.stats["graph_reuses"] == 1
    fresh = stylize(*pair, Config(**settings))  # warm-up steps eager, then a new capture
    # The same kernels, but cuDNN may pick other algorithms for a fresh capture: the batch tolerance.
    torch.testing.assert_close(second.image, fresh.image, rtol=0, atol=1e-3)


def test_loading_optimizer_state_keeps_the_tensors_a_captured_graph_reads():
    from engine.optimize import Objective, StepFunction, load_optimizer_state

    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    step = StepFunction(
        image, Objective(lambda x: {"x": x}, lambda f, x: ((f["x"] - 0.3).pow(2).mean(), {})), optimizer="adam", lr=0.1
    )
    step()
    saved = {k: v.clone() for k, v in step.optimizer.state[image].items()}
    step()
    tensors = dict(step.optimizer.state[image])  # what a graph captured after these steps would read
    load_optimizer_state(
        step.optimizer, {"state": {0: saved}, "param_groups": step.optimizer.state_dict()["param_groups"]}
    )
    for name, tensor in step.optimizer.state[image].items():
        assert tensor is tensors[name]  # the same tensors, now holding the loaded values
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
