"""The batch forecast interface (core.batch): no look-ahead, determinism, any data layout, bad input."""

import random
from pathlib import Path

import numpy as np
import orjson
import pytest

from core.batch import BatchInputError, BatchRunner, PriceFolder, build_engines, parse_item, run_file
from core.csv_history import read_csv, write_csv
from core.engines.base import Engine, StepParams
from core.engines.ewma import EwmaTEngine
from core.evaluation import iso
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest
from core.response import round_for_wire
from core.response_checks import CORRECT, validate_response_head, validate_response_upstream
from core.settings import Settings

DAY = 86_400
SPAN_START = 1_772_323_200  # 2026-03-01 00:00 UTC: gap-free Binance BTC 1m
LOOKBACK = 2 * DAY
START_LF = SPAN_START + 3 * DAY + 7 * 3600 + 11 * 60
START_HF = SPAN_START + 3 * DAY + 9 * 3600 + 2 * 60


@pytest.fixture(scope="module")
def sources(shared_data: Path) -> dict[str, PriceHistory]:
    btc1 = read_csv(shared_data / "btc_1m.csv.gz", 60).between(SPAN_START, SPAN_START + 5 * DAY)
    btc5 = read_csv(shared_data / "btc_5m.csv.gz", 300).between(SPAN_START, SPAN_START + 5 * DAY)
    eth1 = read_csv(shared_data / "eth_1m.csv.gz", 60).between(SPAN_START, SPAN_START + 5 * DAY)
    spy5 = read_csv(shared_data / "spy_5m.csv.gz", 300).between(SPAN_START - 20 * DAY, SPAN_START + 5 * DAY)
    return {"btc_1m": btc1, "btc_5m": btc5, "foo_1m": eth1, "spy_5m": spy5}


def write_folder(folder: Path, files: dict[str, PriceHistory]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, history in files.items():
        write_csv(folder / f"{name}.csv.gz", history)
    return folder


def request(rid: str, asset: str, start: int, inc: int, n: int = 40) -> bytes:
    return orjson.dumps({"id": rid, "asset": asset, "start_time": iso(start), "time_increment": inc,
                         "time_length": 86_400 if inc == 300 else 3600, "num_simulations": n})


def runner(folder: Path, engine: str, seed: int | None = 7) -> BatchRunner:
    engines = build_engines(Settings())
    return BatchRunner(PriceFolder(folder), engines, engine, seed, LOOKBACK, 10_000)


def run_lines(folder: Path, engine: str, lines: list[bytes], seed: int | None = 7) -> list[dict[str, object]]:
    return [orjson.loads(o.line()) for o in runner(folder, engine, seed).run_lines(lines)]


ENGINES = sorted(build_engines(Settings()))
REQUESTS = [("btc-lf", "BTC", START_LF, 300), ("btc-hf", "BTC", START_HF, 60),
            ("foo-hf", "FOO", START_HF, 60), ("foo-lf", "FOO", START_LF, 300),
            ("spy-lf", "SPYX", START_LF, 300)]


def lines_for(n: int = 40) -> list[bytes]:
    return [request(*r, n=n) for r in REQUESTS]


# ------------------------------------------------------------------------------------- look-ahead


def after_cut(history: PriceHistory, start: int) -> np.ndarray:
    """Rows whose close is not yet known 60 s before ``start``."""
    return history.ts + history.step > start - 60


def tamper(history: PriceHistory, start: int, seed: int) -> PriceHistory:
    """Change every row after the cut: rescale, drop some, and add rows further on."""
    rng = np.random.default_rng(seed)
    late = after_cut(history, start)
    close = history.close.copy()
    close[late] *= rng.uniform(0.5, 1.5, late.sum())
    keep = ~late | (rng.random(history.ts.size) > 0.3)
    ts, close = history.ts[keep], close[keep]
    extra_ts = ts[-1] + history.step * np.arange(1, 50)
    return PriceHistory.from_arrays(history.step, np.r_[ts, extra_ts], np.r_[close, np.full(49, 1234.5)])


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_after_the_cut_change_no_output(tmp_path: Path, sources: dict[str, PriceHistory], engine: str) -> None:
    base = write_folder(tmp_path / "base", sources)
    outputs = run_lines(base, engine, lines_for())
    for (rid, _, start, _), out in zip(REQUESTS, outputs):
        assert "response" in out, out
        changed = {name: tamper(h, start, seed=len(name)) for name, h in sources.items()}
        folder = write_folder(tmp_path / f"tampered-{rid}", changed)
        [again] = run_lines(folder, engine, [request(*next(r for r in REQUESTS if r[0] == rid))])
        assert again == out, f"{engine}: {rid} changed when only rows after its cut changed"


def test_the_last_close_before_the_cut_does_matter(tmp_path: Path, sources: dict[str, PriceHistory]) -> None:
    """The look-ahead test above is not vacuous: the newest known close drives the anchor."""
    base = write_folder(tmp_path / "base", sources)
    [out] = run_lines(base, "ewma_t", [request("a", "BTC", START_HF, 60)])
    btc = sources["btc_1m"]
    known = ~after_cut(btc, START_HF)
    last = int(np.flatnonzero(known)[-1])
    assert int(btc.ts[last]) == START_HF - 120  # closes exactly at the cut: known
    close = btc.close.copy()
    close[last] *= 1.01
    folder = write_folder(tmp_path / "moved", {**sources, "btc_1m": PriceHistory(60, btc.ts, close)})
    [moved] = run_lines(folder, "ewma_t", [request("a", "BTC", START_HF, 60)])
    response, moved_response = out["response"], moved["response"]
    assert isinstance(response, list) and isinstance(moved_response, list)
    assert response[2][0] == float(round_for_wire(np.float32(btc.close[last])))
    assert moved_response[2][0] == float(round_for_wire(np.float32(close[last])))


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("engine", ENGINES)
def test_same_seed_same_output_and_order_does_not_matter(tmp_path: Path, sources: dict[str, PriceHistory],
                                                         engine: str) -> None:
    folder = write_folder(tmp_path / "d", sources)
    lines = lines_for()
    first = run_lines(folder, engine, lines)
    assert run_lines(folder, engine, lines) == first
    shuffled = lines[:]
    random.Random(3).shuffle(shuffled)
    by_id = {str(o["id"]): o for o in run_lines(folder, engine, shuffled)}
    assert {str(o["id"]): o for o in first} == by_id
    alone = run_lines(folder, engine, [lines[2]])[0]
    assert alone == first[2]
    other = run_lines(folder, engine, lines, seed=8)
    assert other[0] != first[0]


# --------------------------------------------------------------------------------- data layouts


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_serves_1m_only_5m_only_and_unknown_assets(tmp_path: Path, sources: dict[str, PriceHistory],
                                                               engine: str) -> None:
    only_1m = write_folder(tmp_path / "one", {"btc_1m": sources["btc_1m"], "foo_1m": sources["foo_1m"]})
    only_5m = write_folder(tmp_path / "five", {"btc_5m": sources["btc_5m"], "spy_5m": sources["spy_5m"]})
    cases = [(only_1m, "BTC", 300), (only_1m, "BTC", 60), (only_1m, "FOO", 300), (only_5m, "BTC", 60),
             (only_5m, "BTC", 300), (only_5m, "SPYX", 300)]
    for folder, asset, inc in cases:
        start = START_LF if inc == 300 else START_HF
        [out] = run_lines(folder, engine, [request("x", asset, start, inc, n=30)])
        assert "response" in out, (folder.name, asset, inc, out)
        response = out["response"]
        assert isinstance(response, list)
        assert response[0] == start and response[1] == inc and len(response) == 32
        assert all(len(p) == (289 if inc == 300 else 61) for p in response[2:])
        length = 86_400 if inc == 300 else 3600
        assert validate_response_upstream(response, start, inc, length, 30) == CORRECT
        assert validate_response_head(response, start, inc, length, 30) == CORRECT


def test_anchor_is_the_newest_close_known_at_the_cut(tmp_path: Path, sources: dict[str, PriceHistory]) -> None:
    folder = write_folder(tmp_path / "a", sources)
    for rid, asset, start, inc in REQUESTS:
        [out] = run_lines(folder, "gbm", [request(rid, asset, start, inc)])
        stem = {"BTC": "btc", "FOO": "foo", "SPYX": "spy"}[asset]
        known = [(int(h.ts[~after_cut(h, start)][-1]) + h.step, -h.step, float(h.close[~after_cut(h, start)][-1]))
                 for name, h in sources.items() if name.startswith(stem + "_") and (~after_cut(h, start)).any()]
        anchor = max(known)[2]
        response = out["response"]
        assert isinstance(response, list)
        assert {p[0] for p in response[2:]} == {float(round_for_wire(np.float32(anchor)))}  # float32 paths


# ------------------------------------------------------------------------------------- bad input


def test_bad_lines_get_error_lines_and_the_rest_is_served(tmp_path: Path, sources: dict[str, PriceHistory]) -> None:
    folder = write_folder(tmp_path / "b", sources)
    good = request("good-1", "BTC", START_HF, 60)
    raw = [
        good,
        b"{not json",
        b"[1, 2, 3]",
        orjson.dumps({"id": "missing", "asset": "BTC", "start_time": iso(START_HF), "time_increment": 60}),
        request("escape", "../etc", START_HF, 60),
        orjson.dumps({"id": "grid", "asset": "BTC", "start_time": iso(START_HF), "time_increment": 120,
                      "time_length": 3600, "num_simulations": 10}),
        request("zero", "BTC", START_HF, 60, n=0),
        request("nodata", "DOGE", START_HF, 60),
        orjson.dumps({"id": "when", "asset": "BTC", "start_time": "yesterday", "time_increment": 60,
                      "time_length": 3600, "num_simulations": 10}),
        orjson.dumps({"id": [1], "asset": "BTC", "start_time": iso(START_HF), "time_increment": 60,
                      "time_length": 3600, "num_simulations": 10}),
        request("future", "BTC", START_HF + 400 * DAY, 60),
        orjson.dumps({"id": "float", "asset": "BTC", "start_time": iso(START_HF), "time_increment": 60.0,
                      "time_length": 3600, "num_simulations": 10}),
        b"   ",
        request("good-2", "FOO", START_LF, 300),
    ]
    requests = tmp_path / "reqs.jsonl"
    requests.write_bytes(b"\n".join(raw) + b"\n")
    out = tmp_path / "out" / "resp.jsonl"
    summary = run_file(runner(folder, "ewma_t"), requests, out)
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(rows) == len(raw) - 1 == summary.lines  # the blank line is not a request
    assert summary.ok == 2 and summary.errors == len(rows) - 2
    by_id = {r["id"]: r for r in rows if r["id"] is not None}
    assert "response" in by_id["good-1"] and "response" in by_id["good-2"]
    expect = {"missing": "missing field", "escape": "ticker", "grid": "unsupported grid",
              "zero": "num_simulations", "nodata": "no price file for DOGE", "when": "ISO-8601",
              "future": "no BTC price", "float": "integer"}
    for rid, fragment in expect.items():
        assert fragment in by_id[rid]["error"], (rid, by_id[rid])
    anonymous = [r["error"] for r in rows if r["id"] is None]
    # No id to trace them by: each names its line in the requests file ("line 1 column 1" was of the line itself).
    bad_id = 1 + next(n for n, line in enumerate(raw) if line.startswith(b'{"id":[1]'))
    assert any(e.startswith("line 2: line is not valid JSON") for e in anonymous), anonymous
    assert any(e.startswith("line 3: ") and "JSON object" in e for e in anonymous), anonymous
    assert any(e.startswith(f"line {bad_id}: ") and "'id'" in e for e in anonymous), anonymous
    assert len(anonymous) == 3 and not any(r.get("error", "").startswith("line ") for r in rows if r["id"] is not None)
    [late] = run_lines(folder, "ewma_t", [b"\n", b"  \n", b"{no"])
    assert late["id"] is None and late["error"].startswith("line 3: "), late  # blank lines are counted
    assert not out.with_name("resp.jsonl.tmp").exists()


def test_a_registered_asset_in_another_case_is_served_as_that_asset(tmp_path: Path,
                                                                  sources: dict[str, PriceHistory]) -> None:
    """"btc" finds btc_1m.csv.gz as well: it must be forecast as BTC (its spec, model route and seed), not
    as an unknown asset that happens to share the file."""
    folder = write_folder(tmp_path / "case", sources)
    assert parse_item(orjson.loads(request("l", "btc", START_HF, 60)), 100).request.asset == "BTC"
    for engine in ("ewma_t", "gbm"):
        upper, lower = run_lines(folder, engine, [request("x", "BTC", START_LF, 300),
                                                  request("x", "btc", START_LF, 300)])
        assert "response" in upper and upper == lower, engine
    assert parse_item(orjson.loads(request("f", "foo", START_HF, 60)), 100).request.asset == "foo"


def test_parse_item_and_runner_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="'id'"):
        parse_item({"id": True}, 10)
    with pytest.raises(BatchInputError, match="does not exist"):
        PriceFolder(tmp_path / "absent")
    with pytest.raises(BatchInputError, match="unknown engine"):
        BatchRunner(PriceFolder(tmp_path), build_engines(Settings()), "nope", 1, DAY, 10)
    engines: dict[str, Engine] = build_engines(Settings())
    assert {"gbm", "ewma_t"} <= set(engines)
    assert Settings().engine in engines or Settings().engine == "patchtst"


# ------------------------------------------------------------------------------ served artifact


def publish_set(artifacts: Path, scale: float, model: Path | None = None) -> str:
    from core.artifacts import ArtifactStore
    from core.calibration import CALIBRATION_FILE, CalibrationState, Entry

    state = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=scale)})
    files = {CALIBRATION_FILE: state.to_json()} | ({"hf.pt": model.read_bytes()} if model is not None else {})
    store = ArtifactStore(artifacts)
    return store.publish(store.stage(files))


def test_from_settings_never_serves_the_models_of_a_corrupt_current_version(tmp_path: Path) -> None:
    """A current version that fails its hash check is refused as a whole: neither its calibration nor
    its (tampered) checkpoints serve; the committed models do, unscaled."""
    pytest.importorskip("torch")
    from tests.model_fixtures import write_checkpoints

    artifacts = tmp_path / "artifacts"
    version = publish_set(artifacts, 1.5, write_checkpoints(tmp_path / "retrained", ("hf",), perturb=0.3) / "hf.pt")
    settings = Settings(artifacts_dir=artifacts, engine="patchtst", calibration_engine="ewma_t")
    served = BatchRunner.from_settings(PriceFolder(tmp_path), settings, seed=1)
    assert served.forecaster.models["hf"] == str(artifacts / "versions" / version / "hf.pt")
    assert served.forecaster.scale("ewma_t", "BTC", 60) == 1.5
    other = write_checkpoints(tmp_path / "other", ("hf",), perturb=0.7) / "hf.pt"
    (artifacts / "versions" / version / "hf.pt").write_bytes(other.read_bytes())  # loads, but not what was published
    refused = BatchRunner.from_settings(PriceFolder(tmp_path), settings, seed=1)
    assert refused.forecaster.models["hf"] == str(settings.models_dir / "hf.pt")
    assert refused.forecaster.scale("ewma_t", "BTC", 60) == 1.0


def test_from_settings_takes_models_and_calibration_from_one_version(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish landing while the batch builds its engines must not pair one version's models with
    the next version's calibration."""
    pytest.importorskip("torch")
    import core.engines_registry
    from tests.model_fixtures import write_checkpoints

    artifacts = tmp_path / "artifacts"
    first = publish_set(artifacts, 1.5, write_checkpoints(tmp_path / "retrained", ("hf",), perturb=0.3) / "hf.pt")
    real = core.engines_registry.engines_over
    later: list[str] = []

    def build_then_publish(settings: Settings, models_dir: Path | None) -> dict[str, Engine]:
        engines = real(settings, models_dir)
        if not later:
            later.append(publish_set(artifacts, 1.8))  # the hourly calibration lands meanwhile
        return engines

    monkeypatch.setattr(core.engines_registry, "engines_over", build_then_publish)
    settings = Settings(artifacts_dir=artifacts, engine="patchtst", calibration_engine="ewma_t")
    runner = BatchRunner.from_settings(PriceFolder(tmp_path), settings, seed=1)
    assert later and runner.forecaster.models["hf"] == str(artifacts / "versions" / first / "hf.pt")
    assert runner.forecaster.scale("ewma_t", "BTC", 60) == 1.5


@pytest.mark.parametrize("batch_days, hf_days, lf_days", [(None, 1.0, 2.5), (3.0, 3.0, 3.0)])
def test_each_grid_sees_the_history_the_live_cache_holds_for_it(
        tmp_path: Path, sources: dict[str, PriceHistory], batch_days: float | None, hf_days: float,
        lf_days: float) -> None:
    """Offline runs gave every grid 14 days while the miner's 1-minute cache held 3: a 1 h XAU forecast that
    fell back to EWMA-t live for want of history (every Sunday evening) never did in a backtest. Unless
    ``batch_lookback_days`` says otherwise, each grid now gets its own cache window."""
    seen: dict[int, int] = {}

    class Recording(EwmaTEngine):
        name = "recording"

        def params(self, request: ForecastRequest, snapshot: MarketSnapshot) -> StepParams:
            firsts = [h.first_ts for h in (snapshot.m1, snapshot.m5) if h is not None and h.first_ts is not None]
            seen[request.time_increment] = request.start_ts - min(firsts)
            return super().params(request, snapshot)

    folder = write_folder(tmp_path / "prices", {"btc_1m": sources["btc_1m"], "btc_5m": sources["btc_5m"]})
    settings = Settings(cache_days_hf=1.0, cache_days_lf=2.5, batch_lookback_days=batch_days)
    runner = BatchRunner.from_settings(PriceFolder(folder), settings, seed=1, engine="recording",
                                       engines={"recording": Recording()}, calibrated=False)
    for line in (request("hf", "BTC", START_HF, 60), request("lf", "BTC", START_LF, 300)):
        assert runner.run_line(line).error is None
    assert abs(seen[60] - hf_days * DAY) <= 600 and abs(seen[300] - lf_days * DAY) <= 600, seen
