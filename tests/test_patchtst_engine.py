"""The PatchTST engine: routing, EWMA-t equality at zero correction, valid paths, errors and fallback."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.csv_history import load_asset
from core.engines.base import EngineError
from core.engines.ewma import EwmaTEngine
from core.engines.patchtst import PatchTSTEngine, route
from core.evaluation import AssetHistory, snapshot_at
from core.features import history_context, us_closed_steps
from core.forecast import Forecaster, paths_usable
from core.market_calendar import outside_gold_closures
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest
from core.settings import Settings
from tests.model_fixtures import write_checkpoints

BTC_START = 1779667200 + 3 * 86_400 + 17 * 60  # inside the BTC held-out window, on a minute
SPY_START = 1770595200 + 86_400 + 15 * 3600 + 35 * 60  # a Tuesday, 10:35 New York
LOOKBACK = 14 * 86_400


@pytest.fixture(scope="module")
def histories(shared_data: Path) -> dict[str, AssetHistory]:
    return {a: AssetHistory(*load_asset(shared_data, a)) for a in ("BTC", "SPYX", "XAU")}


def request(asset: str, start: int, inc: int) -> ForecastRequest:
    return ForecastRequest(asset, start, inc, 3600 if inc == 60 else 86_400, 1000)


def test_routing() -> None:
    assert route(request("BTC", 0, 60)) == "hf"
    assert route(request("BTC", 0, 300)) == "lf_crypto"
    assert route(request("XAU", 0, 300)) == "lf_crypto"
    assert route(request("SPYX", 0, 300)) == "lf_equity"
    assert route(request("WTIOIL", 0, 300)) == "lf_equity"
    assert route(request("NEWCOIN", 0, 300)) == "lf_crypto"


def test_zero_correction_model_equals_ewma_t(tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    engine = PatchTSTEngine(write_checkpoints(tmp_path))
    ewma = EwmaTEngine()
    for asset, start, inc in (("BTC", BTC_START, 60), ("BTC", BTC_START, 300), ("SPYX", SPY_START, 300)):
        snap = snapshot_at(asset, histories[asset], start, LOOKBACK)
        ours, theirs = engine.params(request(asset, start, inc), snap), ewma.params(request(asset, start, inc), snap)
        assert np.allclose(ours.sigma, theirs.sigma, rtol=1e-12)
        assert np.allclose(ours.nu, theirs.nu) and np.all(ours.mu == 0.0)


def test_closed_session_steps_take_the_checkpoint_scale(tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    engine = PatchTSTEngine(write_checkpoints(tmp_path, ("lf_equity",), closed_scale=0.6))
    req = request("SPYX", SPY_START, 300)
    snap = snapshot_at("SPYX", histories["SPYX"], SPY_START, LOOKBACK)
    ours, ewma = engine.params(req, snap), EwmaTEngine().params(req, snap)
    closed = us_closed_steps([SPY_START], 300, 288)[0]
    assert 0 < closed.sum() < closed.size and not closed[0]  # 10:35 New York: open first, then the night
    assert np.allclose(ours.sigma[~closed], ewma.sigma[~closed], rtol=1e-12)
    assert np.allclose(ours.sigma[closed], 0.6 * ewma.sigma[closed], rtol=1e-12)


def test_forecast_shape_and_validity(tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    engine = PatchTSTEngine(write_checkpoints(tmp_path, perturb=0.3))
    for asset, start, inc in (("BTC", BTC_START, 60), ("BTC", BTC_START, 300), ("SPYX", SPY_START, 300),
                              ("SP500", SPY_START, 300)):
        req = request(asset, start, inc)
        snap = snapshot_at(asset, histories["SPYX" if asset == "SP500" else asset], start, LOOKBACK)
        paths = engine.forecast(req, snap, np.random.default_rng(0))
        assert paths.shape == (1000, req.n_points) and paths.dtype == np.float32
        assert paths_usable(paths, req) is None
        assert np.all(paths[:, 0] == np.float32(snap.anchor))
        p = engine.params(req, snap)
        assert np.all(p.nu > 2.5) and np.all(p.sigma > 0)
        assert not np.allclose(p.sigma, p.sigma[0])  # the perturbed head moves sigma step by step


def test_unknown_asset_is_served_with_the_shared_embedding(tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    engine = PatchTSTEngine(write_checkpoints(tmp_path, perturb=0.3))
    btc = histories["BTC"]
    snap = snapshot_at("BTC", btc, BTC_START, LOOKBACK)
    renamed = MarketSnapshot("NEWCOIN", snap.m1, snap.m5, snap.anchor, snap.anchor_time)
    known = engine.params(request("BTC", BTC_START, 300), snap)
    unknown = engine.params(request("NEWCOIN", BTC_START, 300), renamed)
    assert np.all(np.isfinite(unknown.sigma)) and not np.allclose(known.sigma, unknown.sigma)


def test_inference_is_cached_per_asset_grid_and_minute(tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    engine = PatchTSTEngine(write_checkpoints(tmp_path, ("hf",)), cache_size=2)
    snap = snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK)
    first = engine.params(request("BTC", BTC_START, 60), snap)
    assert engine.params(request("BTC", BTC_START, 60), snap) is first  # no second inference
    other = ForecastRequest("BTC", BTC_START, 60, 3600, 10)  # another path count: same laws
    assert engine.params(other, snap) is first
    for minute in (1, 2):
        engine.params(request("BTC", BTC_START + 60 * minute, 60), snap)
    assert engine.params(request("BTC", BTC_START, 60), snap) is not first  # evicted (LRU of 2)


def test_a_start_within_the_same_minute_is_not_served_another_starts_laws(
        tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    """Start times off the minute (the batch interface takes any ISO time) have their own calendar
    features: a request's laws must not depend on which request of the same minute came first."""
    folder = write_checkpoints(tmp_path, ("hf",), perturb=0.3)
    snap = snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK)
    late = request("BTC", BTC_START + 30, 60)
    alone = PatchTSTEngine(folder).params(late, snap)
    engine = PatchTSTEngine(folder)
    on_the_minute = engine.params(request("BTC", BTC_START, 60), snap)
    assert not np.allclose(on_the_minute.sigma, alone.sigma)  # the two starts do have different laws
    after = engine.params(late, snap)
    assert np.array_equal(after.sigma, alone.sigma) and np.array_equal(after.mu, alone.mu)


def test_a_prompt_asked_again_on_newer_history_is_not_served_the_older_snapshots_laws(
        tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    """Validators ask one prompt at different minutes; a worker's snapshot moves on each minute. The
    laws must follow the snapshot each request came with, not the one the first request happened to see."""
    folder = write_checkpoints(tmp_path, ("hf", "lf_crypto"), perturb=0.3)
    for inc in (60, 300):
        req = request("BTC", BTC_START, inc)
        older = snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK, guard_s=600)  # 9 bars fewer
        newer = snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK)
        alone = PatchTSTEngine(folder).params(req, newer)
        engine = PatchTSTEngine(folder)
        first = engine.params(req, older)
        assert not np.allclose(first.sigma, alone.sigma)  # the two snapshots do have different laws
        after = engine.params(req, newer)
        assert np.array_equal(after.sigma, alone.sigma) and np.array_equal(after.nu, alone.nu)
        assert engine.params(req, newer) is after  # the same inputs still hit the cache


def test_bars_closing_after_the_guard_change_no_law(tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    """Training windows see closes known LOOKAHEAD_GUARD_S before the origin: a snapshot that already holds
    the bar closing at the start (a backtest or batch request without the guard) must get the same laws,
    or serving feeds the model a bar it was never trained to have."""
    engine = PatchTSTEngine(write_checkpoints(tmp_path, ("hf", "lf_crypto"), perturb=0.3))
    for inc in (60, 300):
        req = request("BTC", BTC_START, inc)
        guarded = engine.params(req, snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK))
        late_snapshot = snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK, guard_s=0)
        assert late_snapshot.m1 is not None and int(late_snapshot.m1.ts[-1]) + 60 == BTC_START  # the late bar
        late = engine.params(req, late_snapshot)
        assert np.array_equal(late.sigma, guarded.sigma) and np.array_equal(late.nu, guarded.nu)


def test_unusable_history_raises_and_the_forecaster_falls_back(tmp_path: Path,
                                                                histories: dict[str, AssetHistory]) -> None:
    engine = PatchTSTEngine(write_checkpoints(tmp_path))
    full = snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK)
    short = snapshot_at("BTC", histories["BTC"], BTC_START, 2 * 3600)  # 2 hours: too little history
    five_only = MarketSnapshot("BTC", None, full.m5, full.anchor, full.anchor_time)
    for snap, req, message in ((short, request("BTC", BTC_START, 300), "need"),
                               (short, request("BTC", BTC_START, 60), "need"),
                               (five_only, request("BTC", BTC_START, 60), "no 60s history")):
        with pytest.raises(EngineError, match=message):
            engine.params(req, snap)
    forecaster = Forecaster({"patchtst": engine, "ewma_t": EwmaTEngine()}, default="patchtst", seed=1)
    result = forecaster.run(request("BTC", BTC_START, 300), short)
    assert result.engine == "ewma_t" and result.fallback_reason and "EngineError" in result.fallback_reason
    assert paths_usable(result.paths, request("BTC", BTC_START, 300)) is None
    served = forecaster.run(request("BTC", BTC_START, 300), full)
    assert served.engine == "patchtst" and served.fallback_reason is None


def test_missing_or_broken_models_raise_engine_errors(tmp_path: Path, histories: dict[str, AssetHistory]) -> None:
    folder = write_checkpoints(tmp_path, ("hf",))
    (folder / "lf_crypto.pt").write_bytes(b"garbage")
    engine = PatchTSTEngine(folder)
    assert engine.kinds == ["hf"]
    snap = snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK)
    with pytest.raises(EngineError, match="unreadable"):
        engine.params(request("BTC", BTC_START, 300), snap)
    with pytest.raises(EngineError, match="no such checkpoint"):
        engine.params(request("SPYX", SPY_START, 300), snap)
    with pytest.raises(EngineError, match="not 30 of 60s"):
        engine.params(ForecastRequest("BTC", BTC_START, 60, 1800, 100), snap)
    with pytest.raises(EngineError, match="no usable PatchTST checkpoint"):
        PatchTSTEngine.from_settings(Settings(models_dir=tmp_path / "nothing"))
    assert PatchTSTEngine.from_settings(Settings(models_dir=folder)).kinds == ["hf"]
    assert PatchTSTEngine.from_settings(Settings(models_dir=folder, device="cpu")).device == "cpu"
    if not torch.cuda.is_available():  # asked for by name, a missing GPU is an error, not a quiet CPU model
        with pytest.raises(ValueError, match="no CUDA device"):
            PatchTSTEngine.from_settings(Settings(models_dir=folder, device="cuda"))


def test_each_kind_comes_from_the_first_folder_that_serves_it(
        tmp_path: Path, histories: dict[str, AssetHistory], caplog: pytest.LogCaptureFixture) -> None:
    committed = write_checkpoints(tmp_path / "committed")
    published = write_checkpoints(tmp_path / "published", ("hf",), perturb=0.3)
    (published / "lf_crypto.pt").write_bytes(b"garbage")  # a broken file: the next folder serves the kind
    engine = PatchTSTEngine([published, committed])
    assert engine.sources == {"hf": published / "hf.pt", "lf_crypto": committed / "lf_crypto.pt",
                              "lf_equity": committed / "lf_equity.pt"}
    assert any("lf_crypto served from" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    snap = snapshot_at("BTC", histories["BTC"], BTC_START, LOOKBACK)
    hf = request("BTC", BTC_START, 60)
    random_head = engine.params(hf, snap).sigma
    assert not np.allclose(random_head, PatchTSTEngine(committed).params(hf, snap).sigma)
    assert np.allclose(random_head, PatchTSTEngine(published).params(hf, snap).sigma)
    settings = Settings(models_dir=committed)
    assert PatchTSTEngine.from_settings(settings, published).sources["hf"] == published / "hf.pt"
    assert PatchTSTEngine.from_settings(settings).sources["hf"] == committed / "hf.pt"


def with_night_bars(snap: MarketSnapshot, seed: int, weekend_only: bool = False) -> MarketSnapshot:
    """The same snapshot as a 24/7 feed would give it: extra 5-minute bars through the closures (every
    one, or the weekends only) as noise around the last close before each, the other bars untouched."""
    m5 = snap.m5
    assert m5 is not None
    rng = np.random.default_rng(seed)
    night = np.setdiff1d(np.arange(m5.ts[0], m5.ts[-1], 300, dtype=np.int64), m5.ts)
    if weekend_only:
        night = night[~outside_gold_closures(night + 150)]
    last = np.searchsorted(m5.ts, night, side="right") - 1
    close = m5.close[last] * np.exp(rng.normal(0.0, 5e-4, night.size))
    ts = np.concatenate([m5.ts, night])
    order = np.argsort(ts)
    full = PriceHistory(300, ts[order], np.concatenate([m5.close, close])[order])
    return replace(snap, m1=None, m5=full)


@pytest.mark.parametrize("start", [SPY_START, SPY_START + 10 * 3600, SPY_START + 4 * 86_400])  # open, night, Saturday
def test_an_equity_model_sees_only_session_bars_of_a_24_7_feed(tmp_path: Path, histories: dict[str, AssetHistory],
                                                               start: int) -> None:
    """The lf_equity model trained on regular-hours bars: a live feed trading around the clock gives it the
    same inputs, so the same laws, as the regular-hours history."""
    engine = PatchTSTEngine(write_checkpoints(tmp_path, ("lf_equity",), perturb=0.05))
    session = snapshot_at("SPYX", histories["SPYX"], start, LOOKBACK)
    session = replace(session, m1=None)  # the 5-minute bars, as the files hold them
    around_the_clock = with_night_bars(session, seed=1)
    assert session.m5 is not None and around_the_clock.m5 is not None
    assert len(around_the_clock.m5) > 2 * len(session.m5)
    req = request("SPYX", start, 300)
    ours = engine.params(req, session)
    engine.clear_cache()
    live = engine.params(req, around_the_clock)
    assert np.array_equal(ours.sigma, live.sigma) and np.array_equal(ours.mu, live.mu)
    # The same night bars do move a model that keeps every bar (the check above is not vacuous).
    spec = engine.checkpoint("lf_equity").spec
    kept_all = history_context(replace(spec, session_only=False), around_the_clock.m5, start - 60)
    assert not np.allclose(kept_all.scalars, history_context(spec, session.m5, start - 60).scalars)


# Monday 01:17 UTC after a weekend; a Saturday noon; Tuesday 18:30 New York, after the daily break
@pytest.mark.parametrize("start", [1771204620, 1771675200, 1771371000])
def test_gold_sees_no_closure_bars_of_a_24_7_feed(tmp_path: Path, histories: dict[str, AssetHistory],
                                                  start: int) -> None:
    """Gold trained on files that close for the weekend and 16:50-18:05 daily; live XAUT trades through."""
    engine = PatchTSTEngine(write_checkpoints(tmp_path, ("lf_crypto",), perturb=0.05))
    files = replace(snapshot_at("XAU", histories["XAU"], start, LOOKBACK), m1=None)
    around_the_clock = with_night_bars(files, seed=2, weekend_only=True)
    assert files.m5 is not None and around_the_clock.m5 is not None
    assert len(around_the_clock.m5) > len(files.m5) + 500  # the weekend's bars, at least
    req = request("XAU", start, 300)
    ours = engine.params(req, files)
    engine.clear_cache()
    assert np.array_equal(ours.sigma, engine.params(req, around_the_clock).sigma)


def test_gold_on_sunday_evening_gets_the_1h_model_from_the_default_cache_window() -> None:
    """The 1 h model reads 24 h of open-market 5-minute returns and drops gold's weekend (Friday to Sunday
    17:00 New York). With 3 days cached, a 24/7 feed on Sunday 17:30 held 22 h of them: XAU 1 h fell back
    to EWMA-t every Sunday evening. The default window now spans the weekend and those 24 h."""
    start = 1796596200  # Sunday 2026-12-06, 17:30 New York
    ts = np.arange(start - 10 * 86_400, start, 60, dtype=np.int64)
    closes = 4000.0 * np.exp(np.cumsum(np.random.default_rng(3).normal(0, 3e-4, ts.size)))
    live = AssetHistory(PriceHistory(60, ts, closes), None)  # the live token trades through the weekend
    lookback = int(Settings().cache_days_hf * 86_400)
    engine = PatchTSTEngine(Path(__file__).resolve().parents[1] / "models")
    params = engine.params(request("XAU", start, 60), snapshot_at("XAU", live, start, lookback))
    assert params.sigma.shape == (60,) and np.all(params.sigma > 0)
