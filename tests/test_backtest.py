"""Backtest runner, summary tables, JSON and figures (core.backtest) on real held-out data."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from core.backtest import (
    ALL,
    UNSEEN,
    BacktestResult,
    EngineScore,
    PromptResult,
    Ratio,
    _seen_until,
    markdown_table,
    paired_ratio,
    pit_values,
    prompts_on_trained_dates,
    prompts_seen_in_training,
    rich_table,
    run_backtest,
    summarise,
    write_report,
)
from core.batch import PriceFolder, build_engines
from core.evaluation import EvalPrompt, Plan, plan_prompts
from core.settings import Settings

LOOKBACK = 14 * 86_400


@pytest.fixture(scope="module")
def plan(shared_data: Path) -> Plan:
    return plan_prompts(shared_data, {300: ["BTC", "SPYX"], 60: ["BTC", "SOL"]}, "heldout",
                        {300: 86_400, 60: 16 * 3600}, seed=0, max_per_window=2)


@pytest.fixture(scope="module")
def result(plan: Plan) -> BacktestResult:
    return run_backtest(plan.prompts, PriceFolder.from_histories(plan.histories), build_engines(Settings()),
                        ["gbm", "ewma_t"], seed=1, num_simulations=100, lookback_s=LOOKBACK, progress=False)


def test_tiny_backtest_end_to_end_writes_table_json_and_pngs(result: BacktestResult, plan: Plan,
                                                             tmp_path: Path) -> None:
    assert len(result.prompts) == len(plan.prompts) == 8
    written = write_report(result, tmp_path / "report", {"mode": "heldout"}, n_boot=200)
    table = (tmp_path / "report" / "table.md").read_text()
    for asset, label in (("BTC", "24h"), ("SPYX", "24h"), ("BTC", "1h"), ("SOL", "1h")):
        assert f"| {asset} | {label} | ewma_t |" in table and f"| {asset} | {label} | gbm |" in table
    assert "mean CRPS per interval" in table
    doc = json.loads((tmp_path / "report" / "scores.json").read_text())
    assert len(doc["prompts"]) == 8
    for p in doc["prompts"]:
        assert set(p["scores"]) == {"gbm", "ewma_t"}
        for s in p["scores"].values():
            assert s["valid"] and s["total"] > 0 and s["per_interval"]
    # The summary rows agree with the per-prompt scores in the same file.
    for row in doc["summary"]:
        if row["asset"] == ALL:
            continue
        totals = [p["scores"][row["engine"]]["total"] for p in doc["prompts"]
                  if p["asset"] == row["asset"] and p["prompt"] == row["prompt"]]
        assert row["n"] == len(totals) and row["mean"] == pytest.approx(np.mean(totals))
        ratio = row["ratios"]["gbm"]
        if row["engine"] == "gbm":
            assert ratio is None  # no ratio of an engine to itself
            continue
        gbm = [p["scores"]["gbm"]["total"] for p in doc["prompts"]
               if p["asset"] == row["asset"] and p["prompt"] == row["prompt"]]
        assert ratio["value"] == pytest.approx(np.mean(totals) / np.mean(gbm))
        assert ratio["lo"] <= ratio["value"] + 1e-12 and ratio["value"] <= ratio["hi"] + 1e-12
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"fan_BTC_24h.png", "fan_SOL_1h.png", "crps_intervals_24h.png", "crps_intervals_1h.png",
            "pit_24h.png", "pit_1h.png"} <= names
    for path in written.values():
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert set(doc["coverage"]) == {"24h", "1h"} and doc["coverage"]["1h"]["gbm"]["5min"]["n"] > 0


def test_upstream_rules_add_the_volatility_term_only_to_1h(result: BacktestResult, plan: Plan) -> None:
    for r in result.prompts:
        keys = set(r.scores["ewma_t"].per_interval)
        assert ("vol_crps" in keys) == (r.prompt.time_increment == 60)
    head = run_backtest(plan.prompts[-1:], PriceFolder.from_histories(plan.histories), build_engines(Settings()),
                        ["ewma_t"], seed=1, num_simulations=100, lookback_s=LOOKBACK, rules="head",
                        progress=False)
    assert "vol_crps" not in head.prompts[0].scores["ewma_t"].per_interval


def test_every_engine_sees_the_same_prompts_and_realised_prices(result: BacktestResult) -> None:
    for r in result.prompts:
        assert r.source_step == 60 and r.observed >= 2
        assert {s.engine_used for s in r.scores.values()} == {"gbm", "ewma_t"}
    rerun = summarise(result, n_boot=100, seed=5)
    assert [row.mean for row in rerun] == [row.mean for row in summarise(result, n_boot=100, seed=5)]
    console = Console(record=True, width=200)
    console.print(rich_table(rerun))
    text = console.export_text()
    assert "SOL" in text and "× gbm" in text and ALL in text
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", text), text


def test_ratios_not_bootstrapped_show_no_interval(result: BacktestResult) -> None:
    """--bootstrap 0 printed every ratio as "1.024 [1.024, 1.024]": a 95 % interval of zero width."""
    rows = summarise(result, n_boot=0, seed=5)
    console = Console(record=True, width=200)
    console.print(rich_table(rows))
    ratios = [r for row in rows for r in row.ratios.values() if r is not None]
    for text in (console.export_text(), markdown_table(rows)):
        assert ratios and all(f"{r.value:.3f}" in text for r in ratios) and "[" not in text.replace("[95% CI]", ""), \
            text


def test_paired_ratio_and_its_interval() -> None:
    rng = np.random.default_rng(0)
    b = rng.uniform(50, 150, 40)
    exact = paired_ratio(2 * b, b, 500, rng)
    assert exact is not None and exact.value == pytest.approx(2) and exact.lo == pytest.approx(2)
    a = b * rng.uniform(0.8, 1.1, 40)
    r = paired_ratio(a, b, 1000, rng)
    assert r is not None and r.lo < r.value < r.hi and r.n == 40
    assert r.value == pytest.approx(a.mean() / b.mean())
    assert paired_ratio(np.empty(0), np.empty(0), 10, rng) is None


def test_the_interval_resamples_whole_days_of_prompts() -> None:
    """Prompts of one day share most of their realised path, so their ratios move together: resampling them
    one by one made the interval too narrow. Drawn by day, it widens to what the days support."""
    rng = np.random.default_rng(3)
    days = np.repeat(np.arange(20), 6)  # 20 days of 6 prompts
    b = rng.uniform(50, 150, days.size)
    a = b * np.repeat(rng.uniform(0.9, 1.1, 20), 6)  # one ratio per day, shared by its prompts
    by_prompt = paired_ratio(a, b, 4000, np.random.default_rng(1))
    by_day = paired_ratio(a, b, 4000, np.random.default_rng(1), days)
    assert by_prompt is not None and by_day is not None and by_day.value == by_prompt.value
    assert by_day.hi - by_day.lo > 1.8 * (by_prompt.hi - by_prompt.lo)
    one_day = paired_ratio(a, b, 4000, np.random.default_rng(1), np.zeros(days.size, np.int64))
    assert one_day == by_prompt  # a single block: the pairs one by one, not an interval of zero width


def synthetic_result(assets: list[str], engines: list[str]) -> BacktestResult:
    """60 prompts per asset, 4 h apart, each engine's scores its own draw (the same whatever else is run)."""
    result = BacktestResult(engines, "upstream", 0, 100)
    for asset in assets:
        totals = {e: np.random.default_rng([ord(c) for c in asset + e]).uniform(50, 150, 60) for e in engines}
        for k in range(60):
            prompt = EvalPrompt(asset, 1_700_000_000 + k * 4 * 3600, 300, 86_400)
            scores = {e: EngineScore(float(totals[e][k]), True, {}, e, None, None, 0.0) for e in engines}
            result.prompts.append(PromptResult(prompt, 300, 289, scores))
    return result


def test_a_rows_interval_does_not_move_with_the_other_rows_run() -> None:
    """Every row drew from one shared stream, so adding an engine or an asset moved the others' intervals."""
    def sol_vs_gbm(res: BacktestResult) -> Ratio | None:
        return next(r.ratios["gbm"] for r in summarise(res, n_boot=500, seed=5) if (r.asset, r.engine) == ("SOL", "ewma_t"))

    alone = sol_vs_gbm(synthetic_result(["SOL"], ["ewma_t", "gbm"]))
    assert alone is not None and alone.lo < alone.value < alone.hi
    assert sol_vs_gbm(synthetic_result(["BTC", "SOL"], ["ewma_t", "gbm"])) == alone  # another asset run first
    assert sol_vs_gbm(synthetic_result(["SOL"], ["patchtst", "ewma_t", "gbm"])) == alone  # another engine


def test_pit_is_uniform_for_a_calibrated_ensemble_and_skips_gaps() -> None:
    rng = np.random.default_rng(1)
    n_paths, steps = 400, 60
    sims = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, (n_paths, steps)), axis=1))
    paths = np.hstack([np.full((n_paths, 1), 100.0), sims])
    pits = []
    for _ in range(300):
        real = np.r_[100.0, 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, steps)))]
        pits.append(pit_values(paths, real, 5))
    values = np.concatenate(pits)
    counts = np.histogram(values, bins=10, range=(0, 1))[0]
    expected = values.size / 10
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert values.size == 300 * 12 and chi2 < 30  # 9 dof: 30 is far in the tail (p < 0.001)
    real = np.r_[100.0, 100.0 * np.exp(0.5 * np.arange(1, steps + 1))]  # far above every path, every block
    real[5] = np.nan
    high = pit_values(paths, real, 5)
    assert high.size == 10 and np.all(high == 1.0)  # two blocks touch the missing point


# ------------------------------------------------------------------ benchmarks/replay_calibration.py


def test_calibration_replay_uses_only_prompts_realised_before_each_run() -> None:
    """The job (core.calibration.recent_cases) sees a prompt only once its last grid bar has closed
    (start + horizon + 60 s, and strictly before the run); the replay must not use it earlier."""
    from benchmarks.replay_calibration import GRID, replay
    from core.calibration import UpdateRules

    rules = UpdateRules(alpha=1.0, scale_min=0.5, scale_max=2.0, max_move=0.9, min_samples=1)
    origin = np.array([0, 3600, 7200 + 1800])  # the first ends exactly at the 3600 s run
    objective = np.tile((np.log(GRID) - np.log(GRID[0])) ** 2, (3, 1))  # every prompt wants the smallest scale
    served, _ = replay(origin, objective, 3600, 10, rules, 900)
    assert served[1] == 1.0  # its last price closes at 3660: unknown at the 3600 run
    assert served[2] == pytest.approx(GRID[0])  # known at the 7200 run


def test_calibration_replay_reports_an_asset_without_prompts_after_the_warm_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import benchmarks.replay_calibration as bench

    n = 12  # 3 hours of 1 h prompts: far fewer than the job's warm-up (min_samples)
    flat = np.ones((n, bench.GRID.size))
    np.savez(tmp_path / "tables.npz", origin=1_700_000_000 + 900 * np.arange(n), asset=np.array(["BTC"] * n),
             patchtst_objective=flat, patchtst_scored=flat, ewma_t_objective=flat, ewma_t_scored=flat)
    monkeypatch.setattr("sys.argv", ["replay_calibration", "--kind", "hf", "--checkpoint", str(tmp_path / "x.pt"),
                                     "--assets", "BTC", "--tables", str(tmp_path / "tables.npz")])
    bench.main()  # used to crash on the empty selection (min() of an empty array)
    out = capsys.readouterr().out
    assert "no prompt after the warm-up" in out


def test_prompts_a_served_checkpoint_was_fitted_on_are_named(plan: Plan, shared_data: Path) -> None:
    """The committed models never saw a held-out prompt; one started inside their data window is named."""
    from core.engines.patchtst import PatchTSTEngine

    engines = {"gbm": build_engines(Settings())["gbm"],
               "patchtst": PatchTSTEngine(Path(__file__).resolve().parents[1] / "models")}
    assert prompts_seen_in_training(engines, plan.prompts) == []
    eval_start = json.loads((shared_data / "manifest.json").read_text())["btc_5m"]["eval_start_ts"]
    inside = [EvalPrompt("BTC", eval_start - 3 * 86_400, 300, 86_400), EvalPrompt("BTC", eval_start, 300, 86_400),
              EvalPrompt("BTC", eval_start - 3 * 86_400, 60, 3600)]
    notes = prompts_seen_in_training(engines, inside)
    assert len(notes) == 2, notes
    assert notes[0].startswith("patchtst hf: fitted on BTC up to 2026-05-24T23:55") and "1 of the 1 BTC 1h" in notes[0]
    assert notes[1].startswith("patchtst lf_crypto: fitted on BTC up to 2026-05-24") and "1 of the 2 BTC 24h" in notes[1]


def test_prompts_on_dates_another_asset_was_fitted_on_are_named(shared_data: Path) -> None:
    """Each file is split at its own boundary, so the committed lf_crypto model, fitted on BTC into May 2026,
    has seen the days of ETH's February held-out window; the equity model and BTC's own window are clear.
    Only the parts of a data window count, not the years between them."""
    from core.engines.patchtst import PatchTSTEngine

    engines = {"ewma_t": build_engines(Settings())["ewma_t"],
               "patchtst": PatchTSTEngine(Path(__file__).resolve().parents[1] / "models")}
    manifest = json.loads((shared_data / "manifest.json").read_text())
    eth, btc, spy, sol_1m = (manifest[f]["eval_start_ts"] for f in ("eth_5m", "btc_5m", "spy_5m", "sol_1m"))
    day = 86_400
    prompts = {"eth_24h": EvalPrompt("ETH", eth + day, 300, day),  # BTC's training days (lf_crypto)
               "btc_24h": EvalPrompt("BTC", btc, 300, day),  # after every asset's data window
               "spyx_24h": EvalPrompt("SPYX", spy + day + 14 * 3600, 300, day),  # equities end at one date
               "sol_1h": EvalPrompt("SOL", sol_1m + day, 60, 3600),  # BTC and ETH 1 m trained through June 2025
               # hf: BTC trained to 2025-06-28 and selected from 2026-03-02, XAU selected to 2026-02-13
               "eth_1h_between": EvalPrompt("ETH", eth + day, 60, 3600),
               "eth_1h_in_btc_val": EvalPrompt("ETH", eth + 20 * day, 60, 3600)}
    dated, notes = prompts_on_trained_dates(engines, list(prompts.values()))
    assert dated == {prompts[k].id for k in ("eth_24h", "sol_1h", "eth_1h_in_btc_val")}
    assert len(notes) == 2, notes
    assert notes[0].startswith("patchtst hf: 2 of its 3 prompts (ETH, SOL) fall on dates it was fitted on for BTC, ETH")
    assert notes[1].startswith("patchtst lf_crypto: 1 of its 2 prompts (ETH) fall on dates it was fitted on for BTC")
    assert prompts_on_trained_dates({"ewma_t": engines["ewma_t"]}, list(prompts.values())) == (set(), [])


def test_the_unseen_rows_pool_only_the_prompts_off_trained_dates(result: BacktestResult, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sol = frozenset(r.prompt.id for r in result.prompts if r.prompt.asset == "SOL")
    assert len(sol) == 2
    rows = summarise(result, n_boot=100, seed=0, trained_dates=sol)
    unseen = {(r.prompt, r.engine): r for r in rows if r.asset == UNSEEN}
    assert set(unseen) == {(label, e) for label in ("24h", "1h", ALL) for e in ("gbm", "ewma_t")}
    kept = [r for r in result.prompts if r.prompt.id not in sol]
    for (label, engine), row in unseen.items():
        pool = [r for r in kept if label in (ALL, r.prompt.label)]
        mine = [r.scores[engine].total for r in pool]
        assert row.n == len(pool) == (6 if label == ALL else 2 if label == "1h" else 4)
        assert row.mean == pytest.approx(np.mean(mine))
        if engine == "ewma_t":
            ratio = row.ratios["gbm"]
            assert ratio is not None
            assert ratio.value == pytest.approx(np.mean(mine) / np.mean([r.scores["gbm"].total for r in pool]))
    # The other rows are those of the plain summary, and no subset (none or all dated) adds no row.
    assert [r for r in rows if r.asset != UNSEEN] == summarise(result, n_boot=100, seed=0)
    everything = frozenset(r.prompt.id for r in result.prompts)
    for dated in (frozenset(), everything):
        assert not [r for r in summarise(result, n_boot=100, seed=0, trained_dates=dated) if r.asset == UNSEEN]
    import core.backtest
    charted: list[str] = []  # the assets drawn in the per-interval charts: a pooled row is not an asset

    def interval_chart(path: Path, means: dict[str, dict[str, dict[str, float]]], title: str) -> Path:
        charted.extend(means)
        return path

    monkeypatch.setattr(core.backtest, "interval_chart", interval_chart)
    write_report(result, tmp_path, {"mode": "heldout"}, n_boot=100, trained_dates=sol)
    assert sorted(charted) == ["BTC", "BTC", "SOL", "SPYX"]
    assert f"| {UNSEEN} | {ALL} | ewma_t |" in (tmp_path / "table.md").read_text()
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert {p["id"] for p in doc["prompts"] if p["on_trained_dates"]} == sol


def test_the_summary_interval_is_drawn_by_utc_day() -> None:
    """The table's interval must come from whole-day blocks: prompts 4 h apart on one day share a ratio,
    and blocks of any finer unit (an hour) narrow the interval back to the prompt-by-prompt one."""
    result = BacktestResult(["ewma_t", "gbm"], "upstream", 0, 100)
    rng = np.random.default_rng(7)
    day_ratio = rng.uniform(0.9, 1.1, 20)
    a_all, b_all = [], []
    for k in range(120):  # 20 days of 6 prompts, 4 h apart, starting on a day boundary
        b = float(rng.uniform(50, 150))
        a = b * float(day_ratio[k // 6])
        a_all.append(a)
        b_all.append(b)
        prompt = EvalPrompt("BTC", 1_699_920_000 + k * 4 * 3600, 300, 86_400)
        scores = {"ewma_t": EngineScore(a, True, {}, "ewma_t", None, None, 0.0),
                  "gbm": EngineScore(b, True, {}, "gbm", None, None, 0.0)}
        result.prompts.append(PromptResult(prompt, 300, 289, scores))
    row = next(r for r in summarise(result, n_boot=4000, seed=0) if (r.asset, r.engine) == ("BTC", "ewma_t"))
    ratio = row.ratios["gbm"]
    by_prompt = paired_ratio(np.array(a_all), np.array(b_all), 4000, np.random.default_rng(1))
    assert ratio is not None and by_prompt is not None and ratio.n == 120
    assert ratio.hi - ratio.lo > 1.8 * (by_prompt.hi - by_prompt.lo)


def test_the_interval_is_a_95_percent_one() -> None:
    """Against the delta-method standard error of a ratio of means, a 95 % interval is ±1.96 SE wide;
    a 90 % one (±1.645 SE) would report a flatteringly tight ratio."""
    rng = np.random.default_rng(11)
    b = rng.uniform(50, 150, 400)
    a = b * rng.uniform(0.8, 1.2, 400)
    r = paired_ratio(a, b, 8000, np.random.default_rng(2))
    assert r is not None
    value = a.mean() / b.mean()
    se = float(np.std(a - value * b, ddof=1) / np.sqrt(a.size) / b.mean())
    assert 1.8 < (r.hi - r.lo) / 2 / se < 2.1


def test_ratios_use_only_prompts_both_engines_answered() -> None:
    """A prompt the baseline failed (-1.0, invalid) must leave the pair out, not enter the ratio."""
    result = synthetic_result(["SOL"], ["ewma_t", "gbm"])
    failed = {3, 10, 11}
    for k in failed:
        r = result.prompts[k]
        r.scores["gbm"] = EngineScore(-1.0, False, {}, None, None, "boom", 0.0)
    row = next(r for r in summarise(result, n_boot=200, seed=0) if (r.asset, r.engine) == ("SOL", "ewma_t"))
    both = [r for k, r in enumerate(result.prompts) if k not in failed]
    a = np.array([r.scores["ewma_t"].total for r in both])
    b = np.array([r.scores["gbm"].total for r in both])
    ratio = row.ratios["gbm"]
    assert ratio is not None and ratio.n == len(both) == 57
    assert ratio.value == pytest.approx(a.mean() / b.mean(), rel=1e-12)


def test_every_engine_gets_the_same_seed_per_prompt(plan: Plan) -> None:
    """Two names for one engine must score identically: each request's RNG depends on the seed and the
    request only, so engines are paired path for path, never by their name."""
    engines = build_engines(Settings())
    both = {"gbm": engines["gbm"], "gbm_twin": engines["gbm"]}
    hourly = [p for p in plan.prompts if p.time_increment == 60][:2]
    res = run_backtest(hourly, PriceFolder.from_histories(plan.histories), both, ["gbm", "gbm_twin"],
                       seed=1, num_simulations=50, lookback_s=LOOKBACK, progress=False)
    for r in res.prompts:
        assert r.scores["gbm"].valid and r.scores["gbm"].total == r.scores["gbm_twin"].total


def test_a_refits_selection_window_counts_as_seen() -> None:
    """A refit checkpoint records the windows its recipe was selected on under ``selected_on``; those count."""
    entry = {"train_origins": [100, 200], "selected_on": {"train_origins": [50, 150], "val_origins": [160, 900]}}
    assert _seen_until(entry) == 900
    assert _seen_until({"train_origins": [1, 5], "val_origins": None}) == 5
    assert _seen_until(None) is None
