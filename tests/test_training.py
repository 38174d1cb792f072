"""Training data and training: the held-out cut, gap-free windows, the loss, a tiny run, the CLI."""

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from core.checkpoint import load, save
from core.csv_history import write_csv
from core.datasets import (
    DatasetError,
    FileSlice,
    WindowSet,
    build_windows,
    load_csv_dir,
    read_training_file,
    split_pieces,
    split_train_val,
)
from core.features import FEATURE_SPECS
from core.market_calendar import us_session
from core.model import PatchTST, PatchTSTEnsemble, StudentTParams, unit_t_log_prob
from core.path_sampling import LatentVol
from core.prices import PriceHistory
from core.training import (
    Batch,
    Intervals,
    TrainingError,
    TrainOptions,
    increment_nll,
    predict,
    recency_weights,
    refit,
    sample_crps_loss,
    train,
)
from synth_miner.cli_model import register

START = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp())
TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "head_hidden": 16}


def seasonal_prices(step: int, n: int, seed: int, start: int = START) -> PriceHistory:
    """A random walk whose volatility triples in the 'US afternoon': something a model can learn."""
    rng = np.random.default_rng(seed)
    ts = start + step * np.arange(n, dtype=np.int64)
    hour = (ts % 86_400) // 3600
    sigma = 4e-4 * np.sqrt(step / 60) * np.where((hour >= 13) & (hour < 21), 3.0, 1.0)
    close = 50_000.0 * np.exp(np.cumsum(sigma * rng.standard_t(6, n) * np.sqrt(4 / 6)))
    return PriceHistory(step, ts, close)


def write_folder(folder: Path, files: dict[str, PriceHistory], cuts: dict[str, int | None],
                 segments: dict[str, list[str]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {}
    for stem, history in files.items():
        write_csv(folder / f"{stem}.csv.gz", history)
        entry: dict[str, object] = {"file": f"{stem}.csv.gz"}
        if cuts.get(stem) is not None:
            entry["eval_start_ts"] = cuts[stem]
        entry["segments"] = [{"start": s} for s in (segments or {}).get(stem, [])]
        manifest[stem] = entry
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def test_held_out_rows_never_reach_the_windows(tmp_path: Path) -> None:
    h = seasonal_prices(300, 30 * 288, seed=1)
    cut = START + 20 * 86_400
    poisoned = h.close.copy()
    poisoned[h.ts >= cut] *= 1000.0  # any held-out row leaking in would be impossible to miss
    folder = write_folder(tmp_path / "data", {"btc_5m": PriceHistory(300, h.ts, poisoned)}, {"btc_5m": cut})
    files = load_csv_dir(folder, "lf_crypto")
    assert files["BTC"].history.ts.max() < cut and files["BTC"].eval_start_ts == cut
    windows = build_windows("lf_crypto", files, 3600)
    spec = FEATURE_SPECS["lf_crypto"]
    assert len(windows) > 100
    # The last realised price of every window is the close of a bar that opened before the cut.
    assert np.max(windows.origin - (spec.step - 60) + spec.horizon * spec.step) < cut
    assert np.nanmax(np.abs(windows.log_path)) < 1.0 and windows.anchor.max() < 10 * windows.anchor.min()
    assert np.abs(windows.returns).max() < 0.1


def test_a_windows_anchor_is_the_close_the_engines_snapshot_anchors_at() -> None:
    """Targets are log prices relative to the anchor: it must be the last close known at origin - guard,
    the snapshot's anchor at serving. A bar still open then would teach the model moves measured from a
    price it cannot know."""
    from core.evaluation import AssetHistory, snapshot_at

    h = seasonal_prices(300, 12 * 288, seed=4)
    windows = build_windows("lf_crypto", {"BTC": FileSlice("BTC", "btc_5m", h, START + 30 * 86_400, ())}, 3600)
    assert len(windows) > 50
    for origin, anchor in zip(windows.origin.tolist(), windows.anchor.tolist()):
        assert anchor == snapshot_at("BTC", AssetHistory(None, h), origin, 14 * 86_400).anchor, origin


def test_a_file_without_a_held_out_boundary_is_refused(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "data", {"btc_5m": seasonal_prices(300, 100, seed=2)}, {"btc_5m": None})
    with pytest.raises(DatasetError, match="eval_start_ts"):
        load_csv_dir(folder, "lf_crypto")
    (folder / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="manifest"):
        load_csv_dir(folder, "lf_crypto")


def test_windows_never_cross_gaps_or_source_joins(tmp_path: Path) -> None:
    h = seasonal_prices(300, 24 * 288, seed=3)
    gap_at, join_at = START + 8 * 86_400, START + 16 * 86_400
    keep = (h.ts < gap_at) | (h.ts >= gap_at + 1800)  # 30 minutes of missing crypto bars
    h = PriceHistory(300, h.ts[keep], h.close[keep])
    folder = write_folder(tmp_path / "data", {"btc_5m": h}, {"btc_5m": START + 40 * 86_400},
                          {"btc_5m": [iso(START), iso(join_at)]})
    file = read_training_file(folder, "BTC", 300, json.loads((folder / "manifest.json").read_text()))
    assert file is not None and join_at in file.segment_starts
    pieces = split_pieces(file, 300)
    assert len(pieces) == 3
    for piece in pieces:
        assert np.all(np.diff(piece.ts) == 300)  # crypto: diff(ts) == step inside every piece
    windows = build_windows("lf_crypto", {"BTC": file}, 3600)
    spec = FEATURE_SPECS["lf_crypto"]
    first_input = windows.origin - 60 - spec.lookback_s
    last_bar = windows.origin - (spec.step - 60) + spec.horizon * spec.step
    for boundary in (gap_at, join_at):
        crosses = (first_input < boundary) & (last_bar >= boundary)
        # A window may only start after the boundary if its inputs stay inside its own piece.
        inside_inputs = windows.origin - 60 - spec.min_returns * spec.step >= boundary
        assert not np.any(crosses & ~inside_inputs)
    assert not np.isnan(windows.log_path).any()  # crypto targets are complete


def test_closures_are_allowed_for_equities_but_not_inside_returns(tmp_path: Path) -> None:
    h = seasonal_prices(300, 40 * 288, seed=4)
    local_min = ((h.ts - 5 * 3600) % 86_400) // 60  # New York winter time
    weekday = ((h.ts - 5 * 3600) // 86_400 + 3) % 7
    rth = (local_min >= 570) & (local_min < 960) & (weekday < 5)
    eq = PriceHistory(300, h.ts[rth], h.close[rth])
    file = FileSlice("SPYX", "spy_5m", eq, START + 60 * 86_400, ())
    assert len(split_pieces(file, 300)) == 1  # nights and weekends are closures, not breaks
    windows = build_windows("lf_equity", {"SPYX": file}, 1800)
    assert len(windows) > 50 and np.isnan(windows.log_path).any()
    observed = ~np.isnan(windows.log_path)
    assert np.all(observed.sum(axis=1) >= 12)
    # Context returns are between adjacent bars only: no overnight jump among them.
    assert np.abs(windows.returns).max() < 20 * np.median(np.abs(windows.returns))


def test_equity_windows_from_a_24_7_feed_are_those_of_its_regular_hours() -> None:
    """A store filled from a feed trading around the clock trains the equity model on what serving feeds it:
    the regular-session bars (the files it was first trained on hold nothing else)."""
    h = seasonal_prices(300, 40 * 288, seed=5)
    session = us_session(h.ts + 150).open == 1
    assert 0 < session.sum() < 0.3 * len(h)
    cut = START + 60 * 86_400
    around_the_clock = build_windows("lf_equity", {"SPYX": FileSlice("SPYX", "spy_5m", h, cut, ())}, 1800)
    regular = build_windows("lf_equity", {"SPYX": FileSlice("SPYX", "spy_5m", PriceHistory(300, h.ts[session],
                                                                                         h.close[session]), cut, ())}, 1800)
    assert len(regular) > 50
    for name in ("origin", "scalars", "base", "log_path", "anchor", "returns"):
        assert np.array_equal(getattr(around_the_clock, name), getattr(regular, name), equal_nan=True), name
    assert around_the_clock.val_start == regular.val_start


def test_increment_nll_matches_the_student_t_density() -> None:
    torch.manual_seed(0)
    b, h = 3, 6
    p = StudentTParams(mu=torch.zeros(b, h), log_sigma=0.3 * torch.randn(b, h), nu=torch.full((b, h), 5.0))
    base = torch.ones(b, h)
    path = torch.cat([torch.zeros(b, 1), torch.randn(b, h).cumsum(1)], dim=1)
    sigma = torch.exp(p.log_sigma)
    steps = torch.diff(path, dim=1)
    expected = -(unit_t_log_prob(steps / sigma, p.nu) - torch.log(sigma)).mean()
    assert float(increment_nll(p, base, path)) == pytest.approx(float(expected), rel=1e-5)
    # A hole at points 2 and 3: the increment 1 -> 4 has the variance of steps 1..3 together.
    holed = path.clone()
    holed[:, 2:4] = float("nan")
    sd = torch.sqrt((sigma[:, 1:4] ** 2).sum(1))
    z_gap = (path[:, 4] - path[:, 1]) / sd
    terms = [-(unit_t_log_prob(steps[:, k] / sigma[:, k], p.nu[:, k]) - torch.log(sigma[:, k])) for k in (0, 4, 5)]
    terms.append(-(unit_t_log_prob(z_gap, p.nu[:, 3]) - torch.log(sd)))
    assert float(increment_nll(p, base, holed)) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_sample_crps_loss_prefers_the_true_scale() -> None:
    torch.manual_seed(0)
    b, h = 64, 36
    nu = torch.full((b, h), 6.0)
    draws = torch.distributions.StudentT(nu).sample() * (4 / 6) ** 0.5  # unit variance, true sigma = 1
    path = torch.cat([torch.zeros(b, 1), draws.cumsum(1)], dim=1)
    path[:5, 10] = float("nan")  # unobserved points are skipped, not scored as zero
    batch = Batch(series=torch.zeros(0), context=torch.zeros(0), steps=torch.zeros(0), asset=torch.zeros(0),
                  log_path=path, base_rel=torch.ones(b, h), base0=torch.ones(b))

    def loss(log_scale: float) -> float:
        p = StudentTParams(torch.zeros(b, h), torch.full((b, h), log_scale), nu)
        return float(sample_crps_loss(p, batch, Intervals((1, 6), (36, 12)), members=32))

    true, wide, narrow = loss(0.0), loss(float(np.log(2.0))), loss(float(np.log(0.5)))
    assert np.isfinite(true) and true < wide and true < narrow
    log_sigma = torch.zeros(b, h, requires_grad=True)
    sample_crps_loss(StudentTParams(torch.zeros(b, h), log_sigma, nu), batch, Intervals((1,), ())).backward()
    assert log_sigma.grad is not None and torch.isfinite(log_sigma.grad).all()


def test_price_weighted_crps_loss_weighs_windows_by_their_base_std() -> None:
    b, h = 8, 12
    path = torch.cat([torch.zeros(b, 1), torch.randn(b, h, generator=torch.Generator().manual_seed(1)).cumsum(1)], 1)
    p = StudentTParams(torch.zeros(b, h), torch.zeros(b, h), torch.full((b, h), 5.0))

    def loss(base0: torch.Tensor, weight: str) -> float:
        batch = Batch(series=torch.zeros(0), context=torch.zeros(0), steps=torch.zeros(0), asset=torch.zeros(0),
                      log_path=path, base_rel=torch.ones(b, h), base0=base0)
        torch.manual_seed(0)
        return float(sample_crps_loss(p, batch, Intervals((1,), (12,)), members=8, weight=weight))

    flat = torch.full((b,), 0.003)
    # Equal base stds: both weightings agree, whatever the level (only the relative weights count).
    assert loss(flat, "price") == pytest.approx(loss(flat, "std"), rel=1e-6)
    assert loss(flat * 7, "price") == pytest.approx(loss(flat, "price"), rel=1e-6)
    # All the weight on window 0: the loss is window 0's CRPS alone, not the batch mean.
    only_first = torch.zeros(b)
    only_first[0] = 1.0
    assert loss(only_first, "price") != pytest.approx(loss(flat, "std"), rel=1e-3)


@pytest.mark.parametrize("step", [60, 300])
def test_crps_loss_scores_the_abs_term_as_the_level_from_the_anchor(step: int) -> None:
    """The validator's ``_abs`` term scores the price at a point, not its change from the realised start:
    paths start at the anchor, so a move between the anchor and the start is part of what it scores."""
    from core.training import VALIDATOR_INTERVALS

    intervals = VALIDATOR_INTERVALS[step]
    horizon = FEATURE_SPECS["hf" if step == 60 else "lf_crypto"].horizon
    b, c = 3, 2.0  # the price moved by c (base stds) between the anchor and the start, then stayed flat
    batch = Batch(series=torch.zeros(0), context=torch.zeros(0), steps=torch.zeros(0), asset=torch.zeros(0),
                  log_path=torch.full((b, horizon + 1), c), base_rel=torch.ones(b, horizon), base0=torch.ones(b))
    flat = StudentTParams(torch.zeros(b, horizon), torch.full((b, horizon), -30.0), torch.full((b, horizon), 5.0))
    # Every change is 0 for paths and prices alike; the one abs term sees the level c.
    assert float(sample_crps_loss(flat, batch, intervals, members=8)) == pytest.approx(c, rel=1e-4)
    # And with the start observed at the anchor, the abs term and the gap terms agree (nothing to score).
    batch.log_path[:] = 0.0
    assert float(sample_crps_loss(flat, batch, intervals, members=8)) == pytest.approx(0.0, abs=1e-6)


def hf_files(tmp_path: Path) -> dict[str, FileSlice]:
    h = seasonal_prices(60, 6 * 1440, seed=5)
    folder = write_folder(tmp_path / "data", {"btc_1m": h}, {"btc_1m": START + 5 * 86_400})
    return load_csv_dir(folder, "hf")


def tiny_options(**extra: object) -> TrainOptions:
    opts = TrainOptions(epochs=3, batch_size=32, lr=5e-3, batches_per_epoch=12, val_prompts=6, n_paths=100,
                        stride_s=1200, arch=dict(TINY), val_frac=0.3)
    for key, value in extra.items():
        setattr(opts, key, value)
    return opts


def test_tiny_training_run_reduces_the_loss_and_is_reproducible(tmp_path: Path) -> None:
    files = hf_files(tmp_path)
    first = train("hf", files, tiny_options())
    nll = [row["val_nll"] for row in first.history]
    assert min(nll[1:]) < nll[0] - 0.02  # the intraday volatility pattern is learned
    m = first.checkpoint.metrics
    assert m["val_crps_ewma"] > 0 and m["val_crps"] <= m["val_crps_ewma"]  # never selected worse than EWMA-t
    assert first.checkpoint.data_window["BTC"]["train_origins"][1] < first.checkpoint.data_window["BTC"][
        "val_origins"][0]
    second = train("hf", files, tiny_options())
    for key, value in first.checkpoint.state_dict.items():
        assert torch.equal(value, second.checkpoint.state_dict[key]), key
    assert json.dumps(first.history) == json.dumps(second.history)  # NaN-safe equality


def test_crps_fine_tune_and_latent_choice_run_and_never_lose_to_ewma(tmp_path: Path) -> None:
    grid = (LatentVol(), LatentVol(0.98, 0.05))
    result = train("hf", hf_files(tmp_path), tiny_options(epochs=1, crps_epochs=1, latent_grid=grid))
    m = result.checkpoint.metrics
    assert len(result.history) == 3 and m["crps_epochs"] == 1
    assert set(m["latent_search"]) == {"0.0,0.0", "0.98,0.05"}
    assert result.checkpoint.latent in grid
    assert m["val_crps"] <= min(m["val_crps_ewma"], *m["latent_search"].values()) + 1e-9


def test_equity_training_picks_a_closed_session_scale_and_never_loses_to_ewma(tmp_path: Path) -> None:
    h = seasonal_prices(300, 60 * 288, seed=6)
    local_min = ((h.ts - 5 * 3600) % 86_400) // 60  # New York winter time
    weekday = ((h.ts - 5 * 3600) // 86_400 + 3) % 7
    rth = (local_min >= 570) & (local_min < 960) & (weekday < 5)
    files = {"SPYX": FileSlice("SPYX", "spy_5m", PriceHistory(300, h.ts[rth], h.close[rth]), START + 90 * 86_400, ())}
    grid = (0.5, 1.0)
    result = train("lf_equity", files, tiny_options(epochs=1, stride_s=3600, closed_grid=grid))
    ck, m = result.checkpoint, result.checkpoint.metrics
    assert set(m["closed_scale_search"]) == {"0.5", "1"} and ck.closed_scale in grid
    assert m["val_crps"] <= min(m["val_crps_ewma"], *m["closed_scale_search"].values()) + 1e-9
    assert ck.config.max_mu == 0.0  # no drift head for equities
    # 24/7 models ignore the grid: they have no closed steps.
    hf = train("hf", hf_files(tmp_path), tiny_options(epochs=1, closed_grid=grid))
    assert hf.checkpoint.closed_scale == 1.0 and hf.checkpoint.metrics["closed_scale_search"] == {}


def test_an_ensemble_trains_each_seed_and_is_kept_when_it_beats_ewma(tmp_path: Path) -> None:
    result = train("hf", hf_files(tmp_path), tiny_options(epochs=2, members=2))
    m, ck = result.checkpoint.metrics, result.checkpoint
    assert {row["member"] for row in result.history} == {0.0, 1.0} and len(m["member_val_crps"]) == 2
    assert m["members"] == 1 + len(ck.members)
    assert m["val_crps"] <= m["val_crps_ewma"] + 1e-9  # an ensemble or a member: never worse than EWMA-t
    if m["members"] == 1:  # the average lost to EWMA-t: the best member stands alone
        assert m["val_crps"] == min(m["member_val_crps"])
    else:
        assert not torch.equal(ck.state_dict["head.out.weight"], ck.members[0]["head.out.weight"])
    save(ck, tmp_path / "hf.pt")
    loaded, model = load(tmp_path / "hf.pt", expected_kind="hf")
    assert len(loaded.members) == len(ck.members)
    assert isinstance(model, PatchTSTEnsemble) == (m["members"] > 1)


def test_an_ensemble_that_loses_to_ewma_gives_way_to_its_best_member(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The average must beat EWMA-t on validation: here its laws are made 50 times too wide (the members'
    and EWMA-t's stay as trained), so it loses, and the best member by validation CRPS is kept alone."""
    import core.training
    from core.training import StepLaws
    ensembles: list[PatchTSTEnsemble] = []

    def widened(model: object, *args: Any, **kwargs: Any) -> StepLaws:
        laws = predict(model, *args, **kwargs)  # type: ignore[arg-type]
        if not isinstance(model, PatchTSTEnsemble):
            return laws
        ensembles.append(model)
        return StepLaws(laws.mu, laws.sigma * 50.0, laws.nu)

    monkeypatch.setattr(core.training, "predict", widened)
    console = Console(record=True, width=200)
    result = train("hf", hf_files(tmp_path), tiny_options(epochs=1, members=2), console)
    ck, m = result.checkpoint, result.checkpoint.metrics
    assert len(ensembles) == 1  # the average was scored on validation once
    member_crps = m["member_val_crps"]
    assert len(member_crps) == 2 and member_crps[0] != member_crps[1]
    best = int(np.argmin(member_crps))
    assert m["members"] == 1 and ck.members == [] and m["val_crps"] == member_crps[best]
    assert m["phase_epochs"][0][0] == best and len(m["phase_epochs"]) == 1
    kept = ensembles[0].members[best].state_dict()
    assert all(torch.equal(value, kept[key].cpu()) for key, value in ck.state_dict.items())
    other = ensembles[0].members[1 - best].state_dict()
    assert not torch.equal(ck.state_dict["head.out.weight"], other["head.out.weight"].cpu())
    shown = re.search(r"ensemble of 2: val CRPS [\d.]+ \(([\d.]+)x EWMA-t\)", console.export_text())
    assert shown is not None and float(shown.group(1)) > 1.0  # the console says the average lost


def test_refit_replays_the_selected_recipe_on_every_window(tmp_path: Path) -> None:
    files = hf_files(tmp_path)
    selected = train("hf", files, tiny_options(epochs=2, crps_epochs=1, members=2, seed=4)).checkpoint
    phases = selected.metrics["phase_epochs"]
    assert len(phases) == selected.metrics["members"] and all(len(p) == 3 for p in phases)
    # Other options are ignored: the schedule and the seed come from the selected checkpoint.
    first = refit("hf", files, selected, tiny_options(epochs=9, lr=1.0, seed=99))
    ck, m = first.checkpoint, first.checkpoint.metrics
    assert m["refit"] and m["seed"] == 4 and m["phase_epochs"] == phases
    every = build_windows("hf", files, 1200, val_frac=0.3)
    assert m["train_windows"] == len(every) > selected.metrics["train_windows"] + selected.metrics["val_windows"] - 1
    assert ck.latent == selected.latent and ck.config == selected.config and len(ck.members) == len(selected.members)
    assert ck.data_window["BTC"]["train_origins"][1] == int(every.origin.max())  # validation windows trained on too
    second = refit("hf", files, selected, tiny_options())
    for key, value in ck.state_dict.items():
        assert torch.equal(value, second.checkpoint.state_dict[key]), key
    save(ck, tmp_path / "refit.pt")
    again, _ = load(tmp_path / "refit.pt", expected_kind="hf")  # and a refit of a refit replays the same recipe
    assert again.metrics["phase_epochs"] == phases
    twice = refit("hf", files, again, tiny_options()).checkpoint  # still says where the recipe was chosen
    assert twice.data_window["BTC"]["selected_on"] == ck.data_window["BTC"]["selected_on"] == selected.data_window["BTC"]


def test_a_refit_of_zero_epochs_is_the_ewma_t_engine(tmp_path: Path) -> None:
    files = hf_files(tmp_path)
    selected = train("hf", files, tiny_options(epochs=1)).checkpoint
    selected.metrics["phase_epochs"] = [[0, 0, 0]]
    ck = refit("hf", files, selected, tiny_options()).checkpoint
    model = PatchTST(ck.config)
    model.load_state_dict(ck.state_dict)
    windows = build_windows("hf", files, 1200, val_frac=0.3)
    rows = np.arange(4)
    laws = predict(model, windows, rows, ck.norm, ck.config, "cpu", 1.0)
    ewma = predict(None, windows, rows, ck.norm, ck.config, "cpu", 1.0)
    np.testing.assert_allclose(laws.sigma, ewma.sigma, rtol=1e-6)
    np.testing.assert_allclose(laws.mu, 0.0, atol=1e-12)


def test_recency_weights_halve_every_half_life_before_each_assets_newest_window(tmp_path: Path) -> None:
    windows = build_windows("hf", hf_files(tmp_path), 1200, val_frac=0.3)
    two = windows.subset(np.arange(len(windows)))
    two.asset[::2] = 1  # a second asset whose newest window is older than BTC's
    assert recency_weights(two, None) is None
    p = recency_weights(two, 0.5)
    assert p is not None and p.sum() == pytest.approx(1.0) and np.all(p > 0)
    for asset in (0, 1):
        rows = np.flatnonzero(two.asset == asset)
        newest = rows[np.argmax(two.origin[rows])]
        age = (two.origin[newest] - two.origin[rows]) / 86_400
        np.testing.assert_allclose(p[rows] / p[newest], 0.5 ** (age / 0.5))  # each asset's own newest counts most
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        with pytest.raises(TrainingError, match="positive number of days"):
            recency_weights(two, bad)


def test_a_refit_with_a_half_life_draws_recent_windows_more_and_says_so(tmp_path: Path) -> None:
    files = hf_files(tmp_path)
    selected = train("hf", files, tiny_options(epochs=2)).checkpoint
    plain = refit("hf", files, selected, tiny_options())  # "auto": hf draws every window alike
    assert plain.checkpoint.metrics["refit_half_life_days"] is None
    recent = refit("hf", files, selected, tiny_options(refit_half_life_days=0.5)).checkpoint
    assert recent.metrics["refit_half_life_days"] == 0.5
    assert any(not torch.equal(v, plain.checkpoint.state_dict[k]) for k, v in recent.state_dict.items())
    again = refit("hf", files, selected, tiny_options(refit_half_life_days=0.5)).checkpoint
    for key, value in recent.state_dict.items():  # still seeded and reproducible
        assert torch.equal(value, again.state_dict[key]), key
    with pytest.raises(TrainingError, match="positive number of days"):
        refit("hf", files, selected, tiny_options(refit_half_life_days=-1.0))


def test_refit_refuses_a_checkpoint_it_cannot_replay(tmp_path: Path) -> None:
    files = hf_files(tmp_path)
    selected = train("hf", files, tiny_options(epochs=1)).checkpoint
    with pytest.raises(TrainingError, match="refit of a hf checkpoint"):
        refit("lf_crypto", files, selected, tiny_options())
    selected.metrics["crps_weight"] = "bps"
    with pytest.raises(TrainingError, match="crps_weight 'bps'"):
        refit("hf", files, selected, tiny_options())
    del selected.metrics["phase_epochs"]
    with pytest.raises(TrainingError, match="phase_epochs"):
        refit("hf", files, selected, tiny_options())


@pytest.mark.parametrize("kind", ["hf", "lf_crypto"])
def test_time_ordered_split_leaves_no_overlap(tmp_path: Path, kind: str) -> None:
    spec = FEATURE_SPECS[kind]
    if kind == "hf":
        files = hf_files(tmp_path)
    else:
        h = seasonal_prices(300, 30 * 288, seed=3)
        files = {"BTC": FileSlice("BTC", "btc_5m", h, START + 40 * 86_400, ())}
    # Every origin, so the one whose target ends exactly on the first validation bar is built too.
    windows = build_windows(kind, files, spec.step, val_frac=0.3)
    train_w, val_w = split_train_val(windows)
    assert len(train_w) and len(val_w)
    lag = spec.step - 60  # the grid price at t is the close of the bar opening at t - lag
    last_train_bar = (train_w.origin - lag + spec.horizon * spec.step).max()
    first_val_bar = (val_w.origin - lag).min()
    assert first_val_bar == windows.val_start["BTC"]
    assert last_train_bar < first_val_bar  # no bar is both a training target and a validation one
    # Nothing between the two is lost: the next origin's target would reach the first validation bar.
    assert last_train_bar + spec.step == first_val_bar


def test_training_without_a_scorable_validation_prompt_fails_clearly(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import core.training

    def unscorable(windows: WindowSet) -> tuple[WindowSet, WindowSet]:
        train_w, val_w = split_train_val(windows)
        val_w.scorable[:] = False  # e.g. equity validation windows whose 24 h end falls in a closure
        return train_w, val_w

    monkeypatch.setattr(core.training, "split_train_val", unscorable)
    with pytest.raises(TrainingError, match="no validation prompt"):
        train("hf", hf_files(tmp_path), tiny_options(epochs=1))


def test_training_errors_are_typed(tmp_path: Path) -> None:
    files = hf_files(tmp_path)
    with pytest.raises(TrainingError, match="unknown model"):
        train("weekly", files, tiny_options())
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="cuda"):
            train("hf", files, tiny_options(device="cuda"))
    with pytest.raises(DatasetError, match="multiple"):
        train("hf", files, tiny_options(stride_s=90))


def test_cli_train_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    hf_files(tmp_path)
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """The main app the lead mounts us on."""

    register(app)
    out = tmp_path / "models"
    result = CliRunner().invoke(app, ["train", "--model", "hf", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                                      "--batches-per-epoch", "2", "--batch-size", "16", "--val-prompts", "3",
                                      "--paths", "50", "--stride-min", "20", "--out", str(out), "--seed", "3",
                                      "--crps-epochs", "1", "--no-latent-search", "--members", "2", "--refit"])
    assert result.exit_code == 0, result.output
    checkpoint, _ = load(out / "hf.pt", expected_kind="hf")
    assert checkpoint.metrics["seed"] == 3 and "val CRPS" in result.output
    assert f" {checkpoint.metrics['train_windows']} " in result.output  # the refit window count is shown
    assert checkpoint.metrics["refit"]  # --refit asked for it (hf's default is no refit)
    assert len(checkpoint.metrics["best_epochs"]) == 2 and checkpoint.metrics["crps_epochs"] == 1
    bad = CliRunner().invoke(app, ["train", "--model", "weekly", "--data-dir", str(tmp_path / "data")])
    assert bad.exit_code != 0
    empty = tmp_path / "empty"
    write_folder(empty, {}, {})
    kept = (out / "hf.pt").read_bytes()
    # The default --out is models/, the served checkpoints: an existing one is replaced only with --force,
    # and the refusal comes before any training.
    refused = CliRunner().invoke(app, ["train", "--model", "hf", "--data-dir", str(empty), "--out", str(out)])
    assert refused.exit_code == 2 and "--force" in refused.output and (out / "hf.pt").read_bytes() == kept
    failed = CliRunner().invoke(app, ["train", "--model", "hf", "--data-dir", str(empty), "--out", str(out),
                                      "--force"])
    assert failed.exit_code == 1 and "training failed" in failed.output
    # --refit-from replays a checkpoint on every window; a refit checkpoint shows its window count.
    refitted = CliRunner().invoke(app, ["train", "--model", "hf", "--data-dir", str(tmp_path / "data"),
                                        "--refit-from", str(out / "hf.pt"), "--out", str(tmp_path / "refit")])
    assert refitted.exit_code == 0, refitted.output
    again, _ = load(tmp_path / "refit" / "hf.pt", expected_kind="hf")
    assert again.metrics["refit"] and again.metrics["seed"] == 3
    assert again.metrics["refit_half_life_days"] is None  # hf's default
    recent = CliRunner().invoke(app, ["train", "--model", "hf", "--data-dir", str(tmp_path / "data"), "--refit-from",
                                      str(out / "hf.pt"), "--refit-half-life", "2", "--out", str(tmp_path / "recent")])
    assert recent.exit_code == 0, recent.output
    assert load(tmp_path / "recent" / "hf.pt", expected_kind="hf")[0].metrics["refit_half_life_days"] == 2.0
    wrong = CliRunner().invoke(app, ["train", "--model", "lf_crypto", "--data-dir", str(tmp_path / "data"),
                                     "--refit-from", str(out / "hf.pt"), "--out", str(tmp_path / "wrong")])
    assert wrong.exit_code == 1 and "training failed" in wrong.output


def test_training_from_the_history_store_stops_at_the_cut(tmp_path: Path) -> None:
    from core.datasets import histories_from_cache
    from core.history_store import HistoryStore

    store = HistoryStore(tmp_path / "store", durable=False)
    store.append("BTC", seasonal_prices(60, 6 * 1440, seed=6))
    cut = START + 5 * 86_400
    files = histories_from_cache(store, ["BTC", "ETH"], 60, START, cut)
    assert list(files) == ["BTC"]  # nothing stored for ETH
    assert files["BTC"].history.ts.max() < cut and files["BTC"].eval_start_ts == cut
    windows = build_windows("hf", files, 1800)
    assert (windows.origin + 60 * FEATURE_SPECS["hf"].horizon).max() <= cut
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """The main app the lead mounts us on."""

    register(app)
    args = ["train", "--model", "hf", "--store", str(tmp_path / "store"), "--days", "6", "--epochs", "1",
            "--batches-per-epoch", "2", "--batch-size", "16", "--val-prompts", "3", "--paths", "50",
            "--stride-min", "20", "--out", str(tmp_path / "models"), "--crps-epochs", "0", "--no-latent-search"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "--cut" in refused.output
    result = CliRunner().invoke(app, [*args, "--cut", "2026-01-10"])
    assert result.exit_code == 0, result.output
    checkpoint, _ = load(tmp_path / "models" / "hf.pt", expected_kind="hf")
    assert checkpoint.data_window["BTC"]["eval_start_ts"] == cut


def test_hf_training_origins_cycle_through_every_minute_of_the_hour() -> None:
    """Live 1 h prompts start on any minute: on :00/:30 only, the hour marks sat on fixed steps."""
    from core.training import DEFAULT_STRIDE_S

    h = seasonal_prices(60, 3 * 1440, seed=7)  # three days of 1-minute bars: a day of context, 29 h of origins
    files = {"BTC": FileSlice("BTC", "btc_1m", h, int(h.ts[-1]) + 60, ())}
    windows = build_windows("hf", files, DEFAULT_STRIDE_S["hf"])
    minutes = (windows.origin % 3600) // 60
    assert sorted(set(minutes.tolist())) == list(range(60)), np.bincount(minutes, minlength=60)


def test_training_from_the_store_never_reads_a_bar_closing_after_an_off_grid_cut() -> None:
    """The retraining job's cut is a whole minute: a 5-minute bar opening before it closes after it,
    and its close (a held-out price) must not become a training target."""
    from core.datasets import histories_from_cache

    class Store:
        def read(self, asset: str, step: int, start: int, end: int) -> PriceHistory:
            return seasonal_prices(300, 20 * 288, seed=8).between(start, end)

    for minutes in range(5):
        cut = START + 15 * 86_400 + 60 * minutes
        history = histories_from_cache(Store(), ["BTC"], 300, START, cut)["BTC"].history
        assert int(history.ts[-1]) + 300 <= cut < int(history.ts[-1]) + 600
        windows = build_windows("lf_crypto", {"BTC": FileSlice("BTC", "btc", history, cut, ())}, 300)
        last_close = windows.origin - 240 + FEATURE_SPECS["lf_crypto"].horizon * 300 + 300
        assert last_close.max() <= cut


def test_window_inputs_are_those_the_engine_builds_from_a_backtest_snapshot() -> None:
    """A training window sees what ``snapshot_at`` (and the live cache) hands the engine at its origin: the
    bars opening at most ``lookback_s`` before the cut. Equity bars span more sessions than the slow EWMA's
    window holds, so one return older than that, which no snapshot carries, moved the base and the features."""
    from core.evaluation import AssetHistory, snapshot_at
    from core.features import history_context, session_bars

    h = seasonal_prices(300, 40 * 288, seed=9)
    session = us_session(h.ts + 150).open == 1
    eq = PriceHistory(300, h.ts[session], h.close[session])
    spec = FEATURE_SPECS["lf_equity"]
    windows = build_windows("lf_equity", {"SPYX": FileSlice("SPYX", "spy_5m", eq, START + 60 * 86_400, ())}, 1800)
    assert len(windows) > 200
    widened = 0
    for row in range(0, len(windows), 7):
        origin = int(windows.origin[row])
        snap = snapshot_at("SPYX", AssetHistory(None, eq), origin, spec.lookback_s)
        assert snap.m5 is not None
        served = history_context(spec, session_bars(spec, "SPYX", snap.m5), origin - 60)  # PatchTSTEngine._inputs
        ctx_end = int(windows.ctx_end[row])
        trained = windows.returns[ctx_end - spec.context_len:ctx_end] / windows.scale[row]
        assert np.array_equal(served.series, trained), origin
        assert np.array_equal(served.scalars, windows.scalars[row]), origin
        assert np.array_equal(served.base, windows.base[row]), origin
        # A live cache's window reaches further back (it starts at "now", before the origin): same inputs.
        wider = snapshot_at("SPYX", AssetHistory(None, eq), origin, spec.lookback_s + 86_400).m5
        assert wider is not None
        widened += len(wider) > len(snap.m5)
        live = history_context(spec, session_bars(spec, "SPYX", wider), origin - 60)
        assert np.array_equal(live.scalars, served.scalars) and np.array_equal(live.base, served.base), origin
    assert widened > 10  # windows whose wider history held older bars (the check is not vacuous)


def test_the_kept_epoch_is_the_one_with_the_best_validation_crps(tmp_path: Path) -> None:
    """Selection is on the validator's CRPS, not on the NLL it is trained with: the kept epoch, and the
    score reported for it, are those of the lowest validation CRPS in the history."""
    result = train("hf", hf_files(tmp_path), tiny_options(epochs=4, patience=10, seed=1))
    m = result.checkpoint.metrics
    crps = [row["val_crps"] for row in result.history]
    nll = [row["val_nll"] for row in result.history]
    assert int(np.argmin(crps)) != int(np.argmin(nll))  # the two criteria disagree here, so the pick tells
    assert m["best_epochs"] == [int(np.argmin(crps))]
    assert m["val_crps"] == min(crps)


def test_a_latent_volatility_that_scores_worse_is_not_taken(tmp_path: Path) -> None:
    """The latent-vol search may only lower the validation CRPS: a worse candidate leaves the model's own."""
    wild = LatentVol(0.99, 0.5)
    result = train("hf", hf_files(tmp_path), tiny_options(epochs=1, latent_grid=(wild,)))
    ck, m = result.checkpoint, result.checkpoint.metrics
    assert m["latent_search"]["0.99,0.5"] > m["val_crps"]
    assert ck.latent != wild
