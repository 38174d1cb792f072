"""Prompts, realised prices and no-look-ahead snapshots (core.evaluation)."""

import json
from pathlib import Path

import numpy as np
import pytest

from core.csv_history import read_csv, write_csv
from core.evaluation import (
    FIVE_MIN_LAG,
    AssetHistory,
    EvalPrompt,
    EvaluationError,
    Window,
    eval_starts,
    heldout_window,
    load_manifest,
    pick_prompts,
    plan_prompts,
    realised_from,
    realised_prices,
    scorable_starts,
    snapshot_at,
    training_history,
)
from core.prices import PriceHistory

DAY = 86_400
T0 = 1_760_000_400  # a whole 5-minute boundary (also a whole minute)


def walk(step: int, start: int, n: int, seed: int, drop: list[int] | None = None) -> PriceHistory:
    """A hand-made random-walk history; rows at positions in ``drop`` are gaps."""
    rng = np.random.default_rng(seed)
    ts = start + step * np.arange(n, dtype=np.int64)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    keep = np.ones(n, bool)
    keep[drop or []] = False
    return PriceHistory.from_arrays(step, ts[keep], close[keep])


# --------------------------------------------------------------------------------------- realised


def test_realised_1m_is_close_of_bar_opening_at_t_and_gaps_are_nan() -> None:
    m1 = walk(60, T0, 200, 1, drop=[10, 11, 60])
    real = realised_from(m1, T0, 60, 3600)
    assert real.shape == (61,)
    by_ts = dict(zip(m1.ts.tolist(), m1.close.tolist()))
    for k, value in enumerate(real):
        t = T0 + 60 * k
        if t in by_ts:
            assert value == by_ts[t]
        else:
            assert np.isnan(value)
    assert np.isnan(real[[10, 11, 60]]).all() and np.isfinite(np.delete(real, [10, 11, 60])).all()


def test_realised_24h_on_1m_takes_every_fifth_bar() -> None:
    m1 = walk(60, T0, 1500 * 5, 2, drop=[26])  # row 26 = t0 + 60 + 5 * 300 s: grid point 5 is missing
    real = realised_from(m1, T0 + 60, 300, 86_400)
    assert real.shape == (289,)
    assert real[0] == m1.close[1]  # t0 + 60 is row 1
    assert np.isnan(real[5]) and np.isfinite(np.delete(real, 5)).all()
    expected = [m1.close[m1.ts == T0 + 60 + 300 * k] for k in range(289)]
    for k, e in enumerate(expected):
        if e.size:
            assert real[k] == e[0]
        else:
            assert np.isnan(real[k])


def test_realised_from_5m_uses_the_bar_ending_at_t_plus_60_only() -> None:
    m5 = walk(300, T0, 400, 3, drop=[50])
    aligned = T0 + FIVE_MIN_LAG  # t ≡ 240 (mod 300): the 5-minute bar opening at t-240 ends at t+60
    real = realised_from(m5, aligned, 300, 86_400)
    by_ts = dict(zip(m5.ts.tolist(), m5.close.tolist()))
    for k, value in enumerate(real):
        key = aligned + 300 * k - FIVE_MIN_LAG
        assert value == by_ts[key] if key in by_ts else np.isnan(value)
    assert np.isnan(real[50])
    # Any other phase has no exact 5-minute equivalent: every point is left unobserved.
    assert np.isnan(realised_from(m5, T0 + 60, 300, 86_400)).all()
    assert np.isnan(realised_from(m5, T0, 300, 86_400)).all()


def test_realised_prices_prefers_1m_and_falls_back_to_5m_without_mixing() -> None:
    m5 = walk(300, T0, 2000, 4)
    m1 = walk(60, T0 + 3 * DAY, 3000, 5)
    history = AssetHistory(m1, m5)
    inside_1m = T0 + 3 * DAY + 2000 * 60  # the 1-minute file ends 16.7 h into this prompt
    real, source = realised_prices(history, inside_1m, 300, 86_400)
    assert source == 60
    assert np.isnan(real[-1])  # the 1-minute file ends inside the prompt: not filled from 5-minute bars
    real, source = realised_prices(history, T0 + FIVE_MIN_LAG, 300, 86_400)
    assert source == 300 and np.isfinite(real).all()
    real, source = realised_prices(history, T0 + 30 * DAY, 300, 86_400)
    assert source is None and np.isnan(real).all()


def test_realised_rejects_fractional_minutes_and_bad_grids() -> None:
    m1 = walk(60, T0, 100, 6)
    with pytest.raises(EvaluationError, match="whole minute"):
        realised_from(m1, T0 + 30, 60, 3600)
    with pytest.raises(EvaluationError, match="grid"):
        realised_from(m1, T0, 70, 3600)


# --------------------------------------------------------------------------------------- snapshot


def test_snapshot_sees_only_bars_closed_a_minute_before_start() -> None:
    m1 = walk(60, T0, 500, 7)
    m5 = walk(300, T0, 100, 8)
    start = T0 + 200 * 60
    snap = snapshot_at("BTC", AssetHistory(m1, m5), start, lookback_s=DAY)
    assert snap.m1 is not None and snap.m5 is not None
    assert int(snap.m1.ts[-1]) + 60 <= start - 60 < int(snap.m1.ts[-1]) + 120
    assert int(snap.m5.ts[-1]) + 300 <= start - 60
    assert snap.anchor == snap.m1.close[-1] and snap.anchor_time == int(snap.m1.ts[-1]) + 60


def test_snapshot_anchor_is_newest_close_across_files_and_lookback_limits_history() -> None:
    m1 = walk(60, T0, 100, 9)  # ends long before the start
    m5 = walk(300, T0, 2000, 10)
    start = T0 + 3 * DAY
    snap = snapshot_at("ETH", AssetHistory(m1, m5), start, lookback_s=DAY)
    assert snap.m1 is None  # its rows are older than the lookback
    assert snap.m5 is not None and int(snap.m5.ts[0]) >= start - 60 - DAY
    assert snap.anchor == snap.m5.close[-1]
    with pytest.raises(EvaluationError, match="no SOL price"):
        snapshot_at("SOL", AssetHistory(m1, None), start, lookback_s=DAY)


# ---------------------------------------------------------------------------------------- prompts


def test_scorable_starts_have_observed_first_and_last_points() -> None:
    m1 = walk(60, T0, 3 * 1440, 11, drop=list(range(1500, 1600)))
    history = AssetHistory(m1, None)
    starts = scorable_starts(history, 60, 3600, T0, T0 + 2 * DAY)
    assert starts.size
    for s in starts[:: max(1, starts.size // 50)]:
        real = realised_from(m1, int(s), 60, 3600)
        assert np.isfinite(real[0]) and np.isfinite(real[-1])
    assert scorable_starts(AssetHistory(None, walk(300, T0, 2000, 12)), 60, 3600, T0, T0 + DAY).size == 0


def test_5m_only_24h_prompts_sit_where_the_whole_grid_is_observable() -> None:
    m5 = walk(300, T0, 6000, 13)
    history = AssetHistory(None, m5)
    window = Window("SPYX", 300, T0, T0 + 15 * DAY)
    prompts = pick_prompts(history, window, DAY, seed=1)
    assert len(prompts) >= 10
    for p in prompts:
        assert p.start_ts % 300 == FIVE_MIN_LAG
        real, source = realised_prices(history, p.start_ts, 300, 86_400)
        assert source == 300 and np.isfinite(real).all()


def test_pick_prompts_one_per_slot_seeded() -> None:
    m1 = walk(60, T0, 10 * 1440, 14)
    history = AssetHistory(m1, None)
    window = Window("BTC", 60, T0, T0 + 9 * DAY)
    a = pick_prompts(history, window, 12 * 3600, seed=3)
    b = pick_prompts(history, window, 12 * 3600, seed=3)
    c = pick_prompts(history, window, 12 * 3600, seed=4)
    assert a == b and a != c
    slots = [(p.start_ts - T0) // (12 * 3600) for p in a]
    assert slots == sorted(set(slots)) and len(a) == 18
    assert all(p.start_ts % 60 == 0 and window.start <= p.start_ts < window.end for p in a)
    capped = pick_prompts(history, window, 12 * 3600, seed=3, max_prompts=4)
    assert len(capped) == 4 and capped[0] == a[0] and capped[-1] == a[-1]
    with pytest.raises(EvaluationError, match="spacing"):
        pick_prompts(history, window, 90, seed=3)


def test_prompt_request_line_round_trips() -> None:
    p = EvalPrompt("BTC", T0, 300, 86_400)
    line = p.request_line(1000)
    assert line["id"] == p.id and line["time_increment"] == 300 and line["num_simulations"] == 1000
    assert p.request(10).start_ts == T0 and p.label == "24h"


# ------------------------------------------------------------------------------------ held-out split


def make_folder(tmp_path: Path, eval_1m: int | None, eval_5m: int | None) -> Path:
    m1 = walk(60, T0, 20 * 1440, 15)
    m5 = walk(300, T0 - 10 * DAY, 30 * 288, 16)
    write_csv(tmp_path / "btc_1m.csv.gz", m1)
    write_csv(tmp_path / "btc_5m.csv.gz", m5)
    manifest = {"btc_1m": {"file": "btc_1m.csv.gz", "eval_start_ts": eval_1m},
                "btc_5m": {"file": "btc_5m.csv.gz", "eval_start_ts": eval_5m}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_heldout_and_training_windows_respect_each_files_eval_start(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, T0 + 12 * DAY, T0 + 10 * DAY)
    manifest = load_manifest(folder)
    marks = eval_starts(folder, "BTC", manifest)
    assert marks == {60: T0 + 12 * DAY, 300: T0 + 10 * DAY}
    history = AssetHistory(read_csv(folder / "btc_1m.csv.gz", 60), read_csv(folder / "btc_5m.csv.gz", 300))
    lf = heldout_window("BTC", 300, history, marks)
    hf = heldout_window("BTC", 60, history, marks)
    assert lf is not None and lf.start == T0 + 12 * DAY  # the later of the two files
    assert hf is not None and hf.start == T0 + 12 * DAY
    cut = training_history(history, marks)
    assert cut.m1 is not None and int(cut.m1.ts[-1]) < T0 + 12 * DAY
    assert cut.m5 is not None and int(cut.m5.ts[-1]) < T0 + 10 * DAY


def test_walkforward_plan_never_touches_held_out_rows(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, T0 + 12 * DAY, T0 + 10 * DAY)
    plan = plan_prompts(folder, {300: ["BTC"], 60: ["BTC"]}, "walkforward", {300: 12 * 3600, 60: 6 * 3600},
                        seed=0, days=8)
    assert plan.prompts and not plan.skipped
    for p in plan.prompts:
        assert p.start_ts + p.time_length + 60 <= T0 + 12 * DAY
        if p.time_increment == 300:
            # Its realised prices come from the 1-minute file (cut at its own eval start).
            assert realised_prices(plan.histories["BTC"], p.start_ts, 300, 86_400)[1] == 60
    h = plan.histories["BTC"]
    assert h.m1 is not None and int(h.m1.ts.max()) < T0 + 12 * DAY
    assert h.m5 is not None and int(h.m5.ts.max()) < T0 + 10 * DAY
    held = plan_prompts(folder, {300: ["BTC"], 60: ["BTC"]}, "heldout", {300: 12 * 3600, 60: 6 * 3600}, seed=0)
    assert held.prompts and all(p.start_ts >= T0 + 12 * DAY for p in held.prompts)


def test_plan_reports_missing_assets_and_bad_modes(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, T0 + 12 * DAY, None)
    plan = plan_prompts(folder, {60: ["BTC", "DOGE"]}, "heldout", {60: 6 * 3600}, seed=0)
    assert any("DOGE" in s for s in plan.skipped)
    with pytest.raises(EvaluationError, match="range mode"):
        plan_prompts(folder, {60: ["BTC"]}, "range", {60: 3600}, seed=0)
    with pytest.raises(EvaluationError, match="unknown mode"):
        plan_prompts(folder, {60: ["BTC"]}, "future", {60: 3600}, seed=0)  # type: ignore[arg-type]
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="manifest"):
        load_manifest(folder)


def test_a_file_without_eval_start_is_all_held_out_in_heldout_mode(tmp_path: Path) -> None:
    """A file the manifest gives no eval_start_ts is never trained on (training_history drops it, the
    trainer refuses it): every row of it is held out, so held-out mode must place prompts on it, not skip it.
    A file with a mark still bounds the window when both are read (24 h prompts)."""
    folder = make_folder(tmp_path, None, T0 + 10 * DAY)
    marks = eval_starts(folder, "BTC", load_manifest(folder))
    history = AssetHistory(read_csv(folder / "btc_1m.csv.gz", 60), read_csv(folder / "btc_5m.csv.gz", 300))
    hf = heldout_window("BTC", 60, history, marks)
    assert hf is not None and hf.start == T0 and hf.end == T0 + 20 * DAY  # the whole 1-minute file
    lf = heldout_window("BTC", 300, history, marks)
    assert lf is not None and lf.start == T0 + 10 * DAY  # the 5-minute file's mark still applies
    plan = plan_prompts(folder, {60: ["BTC"]}, "heldout", {60: 6 * 3600}, seed=0)
    assert plan.prompts and not plan.skipped
    assert training_history(history, marks).m1 is None  # and none of those rows is ever trained on
    (tmp_path / "none").mkdir()
    unmarked = make_folder(tmp_path / "none", None, None)
    both = heldout_window("BTC", 300, history, eval_starts(unmarked, "BTC", load_manifest(unmarked)))
    assert both is not None and both.start == T0 - 10 * DAY  # the earliest row of either file


def test_a_file_under_another_extension_keeps_its_manifest_boundary(tmp_path: Path) -> None:
    """A gunzipped ``btc_1m.csv`` is the manifest's ``btc_1m.csv.gz``: the trainer (core.datasets, by stem)
    cuts it at eval_start_ts, so held-out mode must start there too, not score the training rows as held out."""
    import gzip

    from core.datasets import load_csv_dir

    folder = make_folder(tmp_path, T0 + 12 * DAY, T0 + 10 * DAY)
    for stem in ("btc_1m", "btc_5m"):
        with gzip.open(folder / f"{stem}.csv.gz", "rb") as src:
            (folder / f"{stem}.csv").write_bytes(src.read())
        (folder / f"{stem}.csv.gz").unlink()
    assert eval_starts(folder, "BTC", load_manifest(folder)) == {60: T0 + 12 * DAY, 300: T0 + 10 * DAY}
    assert int(load_csv_dir(folder, "hf")["BTC"].history.ts.max()) < T0 + 12 * DAY  # what training sees
    held = plan_prompts(folder, {60: ["BTC"], 300: ["BTC"]}, "heldout", {60: 6 * 3600, 300: 12 * 3600}, seed=0)
    assert held.prompts and all(p.start_ts >= T0 + 12 * DAY for p in held.prompts)
    walk = plan_prompts(folder, {60: ["BTC"]}, "walkforward", {60: 6 * 3600}, seed=0, days=8)
    assert walk.prompts and all(p.start_ts + p.time_length + 60 <= T0 + 12 * DAY for p in walk.prompts)
