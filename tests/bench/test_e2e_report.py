"""The end-to-end report: figures of repeated runs are medians, and the runs are shown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from types import SimpleNamespace

import pytest
from aiohttp import web

from bench import e2e_modes
from bench.cpu import cpu_seconds
from bench.e2e import CallResult, _headroom, _median_row, engine_load, held_idle, report
from engine.process import free_port
from engine.supervisor import metric_totals


def row(e2e: float, makespan: float, calls: int = 10) -> dict:
    return {"e2e_p50": e2e, "e2e_p90": e2e * 1.5, "makespan": makespan, "ttft_p50": 0.1,
            "ttft_p90": 0.2, "cached_share": 0.5, "calls": calls, "prompt_tokens": 1000,
            "working_set": 2001}


def test_repeated_runs_report_their_median_and_every_run():
    direct = _median_row([row(40.0, 50.0), row(44.0, 52.0), row(42.0, 70.0)])
    on = _median_row([row(20.0, 49.0), row(30.0, 51.0), row(25.0, 48.0)])
    assert direct["e2e_p50"] == 42.0 and direct["makespan"] == 52.0
    assert on["e2e_p50"] == 25.0 and on["runs"]["e2e_p50"] == [20.0, 30.0, 25.0]
    text = report({"loops": {"direct": direct, "preheat-on": on}},
                  Namespace(idle=3.0), "an engine")
    assert "| loops | direct | 42.00 | 63.00 | 52.00 |" in text
    assert ("| loops | direct | 40.0 / 44.0 / 42.0 | 60.0 / 66.0 / 63.0 | 50.0 / 52.0 / 70.0 "
            "|  |  |") in text
    # Each run against its own turn's direct, on the median and on the makespan.
    assert ("| loops | preheat-on | 20.0 / 30.0 / 25.0 | 30.0 / 45.0 / 37.5 | 49.0 / 51.0 / 48.0 "
            "| 2.00x / 1.47x / 1.68x | 1.02x / 1.02x / 1.46x |") in text
    # Ratios without the modes left out (--modes direct preheat-on)
    assert "| loops | 1.68x | 1.06x | - | - | - |" in text


def test_what_preheat_costs_is_reported_without_preheat_on():
    # --modes direct preheat-off: the ratio of the two, the rest left blank
    text = report({"loops": {"direct": row(42.0, 52.0), "preheat-off": row(50.0, 55.0)}},
                  Namespace(idle=3.0), "x")
    assert "| loops | - | - | 0.84x | - | - | - | - | - |" in text
    # direct alone, or beside the oracle only, has nothing to compare
    direct = row(42.0, 52.0)
    for rows in ({"direct": direct}, {"direct": direct, "oracle": row(9.0, 20.0)}):
        assert "| loops | - |" not in report({"loops": rows}, Namespace(idle=3.0), "x")


def test_the_engine_counters_are_read_from_its_metrics_page():
    page = "\n".join([
        "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
        "# TYPE vllm:num_preemptions_total counter",
        'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0',
        'vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="m"} 40.0',
        'vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 12000.0',
        'vllm:iteration_tokens_total_sum{engine="1",model_name="m"} 500.0',
        'vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9',
        'vllm:generation_tokens_total{engine="0",model_name="m"} 9000.0',
    ])
    assert metric_totals(page, e2e_modes.ENGINE_COUNTERS) == {
        "preempted": 3.0, "stepped": 12500.0, "generated": 9000.0}
    missing = metric_totals("vllm:num_preemptions_total 1.0", e2e_modes.ENGINE_COUNTERS)
    assert missing["preempted"] == 1.0 and missing["generated"] != missing["generated"]


async def test_the_engine_gauges_are_averaged_over_the_run():
    # A stand-in for the engine's /metrics: two calls running and one waiting, then four
    # running and none waiting.
    pages = iter([(2, 1), (4, 0)])
    last = [(2, 1)]

    async def metrics(_: web.Request) -> web.Response:
        last[0] = next(pages, last[0])
        running, waiting = last[0]
        return web.Response(text="\n".join([
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}.0',
            f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}.0',
            'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0',
        ]))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        engine = SimpleNamespace(base_url=f"http://127.0.0.1:{port}")
        async with e2e_modes.GaugeSampler(engine) as gauges:
            while len(gauges.samples) < 2:
                await asyncio.sleep(0.01)
        taken = len(gauges.samples)
        await asyncio.sleep(e2e_modes.SAMPLE_EVERY * 1.5)
        assert len(gauges.samples) == taken  # it stops reading with the run
        expected = [(2, 1), (4, 0)] + [(4, 0)] * (taken - 2)
        assert gauges.means() == pytest.approx({
            "engine_running": sum(r for r, _ in expected) / taken,
            "engine_waiting": sum(w for _, w in expected) / taken})
    finally:
        await runner.cleanup()
    nothing = e2e_modes.GaugeSampler(engine)
    assert all(v != v for v in nothing.means().values())  # no reads: NaN, not 0


def test_calls_at_once_say_how_many_the_engine_ran():
    counted = dict(row(40.0, 50.0), engine_load=7.93, engine_running=4.06, engine_waiting=3.8)
    older = dict(row(30.0, 50.0), engine_load=4.3)
    text = report({"loops": {"direct": counted, "preheat-on": older}}, Namespace(idle=3.0), "x")
    assert "| 7.9 (4.1 running) |" in text
    assert "| 4.3 |" in text  # a row from before the gauges were read


def test_the_report_says_what_the_engine_prefilled_and_preempted():
    counted = dict(row(40.0, 50.0), stepped=12500.0, generated=9000.0, preempted=3.0)
    text = report({"loops": {"direct": counted, "preheat-on": row(30.0, 50.0)}},
                  Namespace(idle=3.0), "x")
    assert "| loops | direct | 40.00 |" in text
    direct_line = next(line for line in text.splitlines() if line.startswith("| loops | direct"))
    on_line = next(line for line in text.splitlines() if line.startswith("| loops | preheat-on"))
    assert direct_line.endswith("| 3500 / 3 |")
    assert on_line.endswith("| - |")  # not counted: said so, not zero


def test_each_instance_keeps_its_median_time_over_the_runs():
    runs = [dict(row(40.0, 50.0), instances={"debate-0": 10.0 + i, "desk-0": 50.0 - i})
            for i in (0, 4, 1)]
    assert _median_row(runs)["instances"] == {"debate-0": 11.0, "desk-0": 49.0}


def test_a_single_run_is_reported_as_it_was():
    only = row(40.0, 50.0)
    assert _median_row([only]) is only
    assert "the runs themselves" not in report({"loops": {"direct": only}}, Namespace(idle=3.0), "x")


def test_cpu_of_engine_and_preheat_is_reported_where_counted():
    on = dict(row(20.0, 49.0), cpu_engine=123.04, cpu_proxy=1.1, cpu_observer=0.4, cpu_client=2.0,
              engine_load=3.26)
    direct = dict(row(30.0, 50.0), cpu_engine=130.0, cpu_proxy=0.0, cpu_observer=0.0, cpu_client=2.0)
    text = report({"loops": {"direct": direct, "preheat-on": on, "oracle": row(10.0, 30.0)}},
                  Namespace(idle=3.0), "x")
    assert "| 2001 | 123.0 / 1.5 | 3.3 |" in text  # the proxy and its observer together
    assert "| 2001 | 130.0 / - | - |" in text  # calls at once: not in a row from before
    assert "| 2001 | 130.0 / - |" in text  # direct: no proxy
    assert "| 2001 | - |" in text  # the oracle is not counted


def test_headroom_is_given_only_where_the_oracle_is_clearly_faster():
    assert _headroom(12.7, 10.9, 10.9) == "100%"
    assert _headroom(50.0, 40.0, 30.0) == "50%"
    # An oracle 4% faster than direct: a single run's noise, not a headroom to capture.
    assert _headroom(27.15, 18.98, 26.0) == "- (oracle within 5% of direct)"
    assert _headroom(27.0, 19.0, float("nan")) == "-"
    # Ordering the generated workflows beats an oracle 8% faster than direct.
    assert _headroom(27.13, 20.25, 25.0) == "all (faster than it)"


def test_calls_at_once_count_each_call_from_when_admission_let_it_go():
    def call(start: float, latency: float, queued: float = 0.0) -> CallResult:
        return CallResult("i", "k", start, 0.1, latency, 10, 0, "", queued)

    # Two calls of 4 s side by side, one of 10 s that waited 6 of them, over 10 s: 1.2.
    calls = [call(0.0, 4.0), call(0.0, 4.0), call(0.0, 10.0, queued=6.0)]
    assert engine_load(calls, 10.0) == pytest.approx(1.2)
    assert engine_load([], 0.0) == 0.0


def test_held_idle_counts_the_time_a_call_waited_with_nothing_on_the_engine():
    def call(start: float, latency: float, queued: float = 0.0) -> CallResult:
        return CallResult("i", "k", start, 0.1, latency, 10, 0, "", queued)

    # One call runs 0-2 s; another arrives at 1 s and is held until 5 s: idle from 2 to 5.
    assert held_idle([call(0.0, 2.0), call(1.0, 6.0, queued=4.0)]) == pytest.approx(3.0)
    # Held while another runs all along: the engine never idled.
    assert held_idle([call(0.0, 10.0), call(1.0, 6.0, queued=4.0)]) == 0.0
    # Two calls held over the same idle second count it once; direct holds nothing.
    assert held_idle([call(0.0, 2.0, queued=1.0), call(0.0, 2.0, queued=1.0)]) == pytest.approx(1.0)
    assert held_idle([call(0.0, 2.0), call(3.0, 1.0)]) == 0.0


def test_seeded_calls_take_their_seed_from_the_prompt(monkeypatch):
    one = [{"role": "user", "content": "Summarise the report."}]
    two = [{"role": "user", "content": "Summarise the other report."}]
    assert e2e_modes.sampling(one) == {"temperature": 0}  # greedy unless asked
    monkeypatch.setattr(e2e_modes, "SEEDED", True)
    first = e2e_modes.sampling(one)
    assert first["temperature"] == 1.0
    # The same prompt is the same request (in every mode, and for the prompt cache).
    assert first == e2e_modes.sampling([dict(m) for m in one])
    assert first["seed"] != e2e_modes.sampling(two)["seed"]


def test_cpu_seconds_counts_a_process_and_its_descendants_apart():
    # A child that burns CPU in a grandchild: the parent's own time stays small.
    burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.5: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess,sys; subprocess.run([sys.executable,'-c',{burn!r}])"],
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while cpu_seconds(parent.pid)[1] < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        own, below = cpu_seconds(parent.pid)
        assert below >= 0.5 and own < below
        assert cpu_seconds(os.getpid())[0] > 0
        assert cpu_seconds(None) == (0.0, 0.0)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_a_pressure_workload_reports_the_share_of_what_the_pressure_cost():
    rows = {"direct": row(50.0, 60.0), "preheat-on": row(30.0, 55.0), "oracle": row(10.0, 20.0)}
    text = report({"loops": dict(rows, unpressured=row(20.0, 30.0))}, Namespace(idle=3.0), "x")
    assert "| 50% (67% of unpressured) |" in text
    # preheat-on faster than the unpressured engine: said so, not as a share over 100%
    text = report({"loops": dict(rows, unpressured=row(35.0, 40.0))}, Namespace(idle=3.0), "x")
    assert "| 50% (faster than unpressured) |" in text
    # an unpressured engine no faster than direct: the pressure cost nothing to win back
    text = report({"loops": dict(rows, unpressured=row(49.0, 60.0))}, Namespace(idle=3.0), "x")
    assert "| 50% |" in text


def test_the_report_names_the_processor_its_figures_came_from(monkeypatch, tmp_path):
    # The same run took half the time on one machine of this kind as on another: a figure
    # without its processor cannot be compared with the next.
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f "
                    "avx512_bf16\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **kw: real_open(
        info if path == "/proc/cpuinfo" else path, *a, **kw))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    text = report({"loops": {"direct": row(42.0, 52.0)}}, Namespace(idle=3.0), "x")
    assert " on 2 CPU cores (AMD EPYC, AVX-512 BF16), " in text.splitlines()[2]


def test_the_report_says_the_engine_ran_in_float32_where_bfloat16_is_not_native(
        monkeypatch, tmp_path):
    # An AVX2 processor runs the engine in float32 (engine.process.cpu_dtype), whose KV cache
    # takes twice the bytes for the tokens a report's "128 MiB cache" names.
    from bench import cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **kw: real_open(
        info if path == "/proc/cpuinfo" else path, *a, **kw))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpu, "engine_flavour", lambda python: "cpu")
    text = report({"loops": {"direct": row(42.0, 52.0)}}, Namespace(idle=3.0), "x")
    assert (" on 2 CPU cores (AMD EPYC, AVX2; the engine in float32, its KV caches 2x the "
            "bytes named, for the same tokens), ") in text.splitlines()[2]


def test_the_report_names_the_settings_it_ran_under_and_no_secret(monkeypatch):
    # A variant measured by setting PREHEAT_ADMISSION_MAX_WAIT=5 must not read as the
    # defaults; the environment the benchmark passes on may also hold secrets.
    for name in [n for n in os.environ if n.startswith(("PREHEAT_", "VLLM_", "ONEDNN_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PREHEAT_ADMISSION_MAX_WAIT", "5")
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    monkeypatch.setenv("PREHEAT_ADMIN_TOKEN", "hunter2")
    monkeypatch.setenv("PREHEAT_DB", "postgresql://u:pw@db/preheat")
    monkeypatch.setattr(sys, "argv", ["bench/e2e.py", "--only", "agent loops"])
    header = report({"loops": {"direct": row(42.0, 52.0)}}, Namespace(idle=3.0), "x")
    command = header.splitlines()[2].split("`")[1]
    assert command == ("ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 PREHEAT_ADMIN_TOKEN=... "
                       "PREHEAT_ADMISSION_MAX_WAIT=5 .venv/bin/python bench/e2e.py --only "
                       "'agent loops'")
    assert "hunter2" not in header and "pw@" not in header


def test_a_variant_is_preheat_on_with_settings_of_its_own():
    from bench.e2e import variants

    modes = variants([["no-guests", "PREHEAT_ADMISSION_GUESTS=0"],
                      ["both", "PREHEAT_ADMISSION_FILL=2.0", "PREHEAT_ORDERING=off"]])
    assert modes == {"on:no-guests": {"PREHEAT_ADMISSION_GUESTS": "0"},
                     "on:both": {"PREHEAT_ADMISSION_FILL": "2.0", "PREHEAT_ORDERING": "off"}}
    # A misspelt variable would measure the defaults under another name.
    for bad, said in ((["x", "PREHEAT_ADMISION_GUESTS=0"], "is not a preheat setting"),
                      (["x", "PREHEAT_ADMISSION_GUESTS"], "is not a preheat setting"),
                      (["x", "PREHEAT_ADMISSION_FILL=lots"], "is not a valid float"),
                      (["PREHEAT_ORDERING=0"], "a name of its own")):
        with pytest.raises(ValueError, match=said):
            variants([bad])
    with pytest.raises(ValueError, match="a name of its own"):
        variants([["x", "PREHEAT_ORDERING=0"], ["x"]])


def test_each_variant_is_compared_with_direct_beside_preheat_on():
    on = _median_row([row(20.0, 49.0), row(30.0, 51.0)])
    variant = _median_row([row(40.0, 60.0), row(44.0, 62.0)])
    direct = _median_row([row(40.0, 50.0), row(44.0, 52.0)])
    text = report({"loops": {"direct": direct, "preheat-on": on, "on:no-guests": variant}},
                  Namespace(idle=3.0, variants={"on:no-guests": {"PREHEAT_ADMISSION_GUESTS": "0"}}),
                  "an engine")
    assert "`on:no-guests` with PREHEAT_ADMISSION_GUESTS=0" in text
    assert "| loops | 1.68x | 1.02x | - | - | - |" in text
    assert "| loops, on:no-guests | 1.00x | 0.84x | - | - | - |" in text
    assert "| loops | on:no-guests | 40.0 / 44.0 | 60.0 / 66.0 | 60.0 / 62.0 | 1.00x / 1.00x |" \
        in text
    # A run of the variants alone (--modes direct) still compares them.
    alone = report({"loops": {"direct": direct, "on:no-guests": variant}}, Namespace(idle=3.0), "x")
    assert "| loops, on:no-guests | 1.00x |" in alone


def test_the_modes_run_in_the_order_given(monkeypatch):
    # `--modes preheat-off direct`: an order effect (the engine warmer, a process left
    # behind) shows as a mode's ratio changing with its place, so the order is the user's.
    sent: list[str] = []

    class FakeProxy:
        def __init__(self, upstream, optimised, capacity, kv_events=None, directory=None,
                     settings=None):
            self.url, self.proc = f"proxy-{'on' if optimised else 'off'}", None

        async def ready(self):
            return self

        async def counters(self):
            return {}

        def stop(self):
            pass

    async def run_workload(base, model, instances, sequential=False):
        sent.append(base)
        return {"e2e_p50": 1.0, "e2e_p90": 1.0, "makespan": 1.0, "cached_share": 0.5,
                "working_set": 1, "engine_load": 1.0, "queued": {}, "held_idle": 0.0}

    async def reset_cache(engine):
        pass

    monkeypatch.setattr(e2e_modes, "Proxy", FakeProxy)
    monkeypatch.setattr(e2e_modes, "run_workload", run_workload)
    monkeypatch.setattr(e2e_modes, "reset_cache", reset_cache)
    monkeypatch.setattr(e2e_modes, "_cpu_now", lambda engine, proxy: {
        "cpu_engine": 0.0, "cpu_proxy": 0.0, "cpu_observer": 0.0, "cpu_client": 0.0})

    async def engine_counters(engine):
        return dict.fromkeys(e2e_modes.ENGINE_COUNTERS, 0.0)

    monkeypatch.setattr(e2e_modes, "engine_counters", engine_counters)
    engine = Namespace(served_model_name="m", base_url="engine", kv_events_endpoint=None)
    rows = asyncio.run(e2e_modes._compare_once(
        engine, None, "w", [], [], 0, ["preheat-off", "direct", "preheat-on"], False, 0.0))
    assert sent == ["proxy-off", "engine", "proxy-on"]
    assert list(rows) == ["preheat-off", "direct", "preheat-on"]
    # Repeated, the order rotates by one from turn to turn: each mode runs once in each place
    sent.clear()
    rows = asyncio.run(e2e_modes.compare(engine, None, "w", [], [], 0, ["direct", "preheat-on"],
                                         idle=0.0, repeat=3))
    assert sent == ["engine", "proxy-on", "proxy-on", "engine", "engine", "proxy-on"]
    assert rows["direct"]["runs"]["e2e_p50"] == [1.0, 1.0, 1.0]
