"""`synth-miner bench` (synth_miner.bench): the figures it prints are the ones it measured (the full run needs
the whole stack and minutes; the pieces that turn timings into figures are checked here)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from miner.protocol import Simulation, SimulationInput
from synth_miner.bench import children, peak_rss_mb, print_report, summarise, timeit
from synth_miner.devstack import Timed


def test_timeit_warms_up_once_then_takes_the_median_of_the_repeats() -> None:
    calls: list[float] = []

    def fn() -> None:
        calls.append(time.perf_counter())
        if len(calls) == 1:
            time.sleep(0.3)  # a first call that loads or compiles is not what a request pays

    assert timeit(fn, 1) < 0.1
    assert len(calls) == 2
    calls.clear()
    assert timeit(fn, 4) < 0.1 and len(calls) == 5


def timed(parsed_ms: float, last_byte_ms: float, miner_ms: float | None) -> Timed:
    reply = Simulation(simulation_input=SimulationInput())
    return Timed(reply, last_byte_ms / 1e3, parsed_ms / 1e3, None if miner_ms is None else miner_ms / 1e3)


def test_summary_percentiles_come_from_their_own_timings() -> None:
    """p50/p99 of the parse, the time to last byte and the axon's own time; a reply without the axon's
    header (no process time) counts in the latencies, not in the miner's own time."""
    rows = [timed(float(k), k / 2, 0.1 * k if k % 2 else None) for k in range(1, 101)]
    summary = summarise(rows)
    assert summary["n"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5) and summary["p99_ms"] == pytest.approx(99.01)
    assert summary["ttlb_p50_ms"] == pytest.approx(25.25)
    assert summary["miner_p50_ms"] == pytest.approx(5.0)  # the odd k: 0.1, 0.3, ..., 9.9
    assert np.isnan(summarise([timed(1.0, 0.5, None)])["miner_p50_ms"])


def test_peak_rss_is_the_largest_high_water_mark_of_the_process_and_its_children() -> None:
    own = peak_rss_mb(os.getpid())
    assert own == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, abs=2.0)  # KiB -> MiB
    # A small shell whose child touches 64 MiB: the prefork pool's children are where the memory is.
    child = "import sys, time; block = b'x' * (64 << 20); print('ready', flush=True); time.sleep(60)"
    with subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{child}"; true'], stdout=subprocess.PIPE) as shell:
        try:
            assert shell.stdout is not None and shell.stdout.readline() == b"ready\n"
            assert len(children(shell.pid)) == 1
            assert 64 <= peak_rss_mb(shell.pid) < 200
        finally:
            for pid in children(shell.pid):
                os.kill(pid, signal.SIGTERM)
            shell.wait(10)
    assert children(shell.pid) == [] and peak_rss_mb(shell.pid) == 0.0  # gone: nothing to read


def test_report_prints_each_figure_in_its_column_and_the_whole_report_as_json(
        capsys: pytest.CaptureFixture[str]) -> None:
    stages = {"cache_read_ms": 1.5, "forecast_ms": 20.25}
    miner = {"n": 24, "p50_ms": 120.0, "p99_ms": 480.0, "ttlb_p50_ms": 110.0, "miner_p50_ms": 35.5}
    floor = {"n": 24, "p50_ms": 100.0, "p99_ms": 160.0, "ttlb_p50_ms": 95.0, "miner_p50_ms": 1.0}
    report = {"engine": "patchtst", "stages": {"1h": stages, "24h": {**stages, "forecast_ms": 90.0}},
              "celery": {"1h_roundtrip_ms": 30.0},
              "e2e": {"24h@8": {"miner": miner, "floor": floor, "p50_over_floor": 1.2, "p99_over_floor": 3.0},
                      "worker_peak_rss_mb": 812.4}}
    print_report(report)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "engine served: patchtst"
    assert next(x for x in lines if x.strip().startswith("forecast_ms")).split() == ["forecast_ms", "20.25", "90.00"]
    assert next(x for x in lines if x.strip().startswith("24h@8")).split() == [
        "24h@8", "120", "480", "100", "160", "1.20", "3.00", "35.5"]  # p50 p99 floor-p50 floor-p99 ratios miner-p50
    assert "worker peak RSS: 812 MB" in lines
    assert json.loads(lines[-1]) == report
