"""The ``artifacts`` and ``calibrate`` commands, run through typer's CliRunner on a real store and CSVs."""

import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from core.artifact_files import Manifest
from core.artifacts import ArtifactStore
from core.calibration import CALIBRATION_FILE, CalibrationState, Entry
from core.csv_history import read_csv, write_csv
from core.path_sampling import unit_t
from core.prices import PriceHistory
from synth_miner.cli_artifacts import register

DAY = 86_400
T0 = 1_760_000_000 // DAY * DAY
DAYS = 4
EVAL_START = T0 + 3 * DAY  # the last day is held out


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer()
    register(root)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prices")
    minutes = DAYS * DAY // 60
    returns = 0.0009 * unit_t(np.random.default_rng(5), 5.0, (minutes, 1))[:, 0]
    m1 = PriceHistory.from_arrays(60, T0 + 60 * np.arange(minutes), 60_000.0 * np.exp(np.cumsum(returns)))
    write_csv(folder / "btc_1m.csv.gz", m1)
    write_csv(folder / "btc_5m.csv.gz", m1.resample(300))
    manifest = {"btc_1m": {"file": "btc_1m.csv.gz", "eval_start_ts": EVAL_START},
                "btc_5m": {"file": "btc_5m.csv.gz", "eval_start_ts": EVAL_START}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder



@pytest.fixture(autouse=True)
def _calibrate_the_ewma_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests exercise the calibration and gate mechanics on the statistical engine, served and calibrated."""
    monkeypatch.setenv("SYNTH_ENGINE", "ewma_t")
    monkeypatch.setenv("SYNTH_CALIBRATION_ENGINE", "ewma_t")

def calibrate_args(data_dir: Path, artifacts: Path, *extra: str) -> list[str]:
    return ["calibrate", "--data-dir", str(data_dir), "--dir", str(artifacts), "--asset", "BTC", "--prompt", "high",
            "--windows", "12", "--min-samples", "10", "--paths", "40", *extra]


def stage_scale(store: ArtifactStore, version: str, scale: float) -> Path:
    state = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=scale)})
    return store.stage({CALIBRATION_FILE: state.to_json()}, version=version)


def test_calibrate_publishes_through_the_gate_without_touching_held_out_rows(
        app: typer.Typer, data_dir: Path, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    result = CliRunner().invoke(app, calibrate_args(data_dir, artifacts, "--runs", "2"))
    assert result.exit_code == 0, result.output
    assert "ewma_t:BTC:60" in result.output and "promoted" in result.output
    said = " ".join(result.output.split())  # the first publish has no champion to name, not "champion - -"
    assert re.search(r"mean CRPS [0-9.]+ over \d+ prompts \(tolerance [0-9.]+\); no current artifact to defend",
                     said) and "champion -" not in said, said
    store = ArtifactStore(artifacts)
    current = store.load_current()
    entry = current.calibration.entries["ewma_t:BTC:60"]
    assert entry.scale != 1.0 and len(entry.history) == 2 and all(m.applied for m in entry.history)
    manifest = Manifest.from_json((current.path / "manifest.json").read_bytes())
    assert manifest.data_window is not None and manifest.data_window.end <= EVAL_START
    assert manifest.notes == {"kind": "calibration", "built_on": ""}  # staged over no set: the first


def test_calibrate_dry_run_writes_the_document_only(app: typer.Typer, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibration.json"
    result = CliRunner().invoke(app, calibrate_args(data_dir, tmp_path / "artifacts", "--dry-run", "--output",
                                                    str(out)))
    assert result.exit_code == 0, result.output
    assert "nothing published" in result.output
    state = CalibrationState.load(out)
    assert state.scale("ewma_t", "BTC", 60) != 1.0
    assert ArtifactStore(tmp_path / "artifacts").current_version() is None


def test_calibrate_refuses_an_output_it_cannot_write_before_calibrating(app: typer.Typer, data_dir: Path,
                                                                       tmp_path: Path) -> None:
    """Written after the calibration (and before its publish): a traceback then, the run lost."""
    (tmp_path / "plain").write_text("a file")
    for output, said in ((tmp_path / "plain" / "c.json", "is a file, not a folder"), (tmp_path, "is a folder")):
        result = CliRunner().invoke(app, calibrate_args(data_dir, tmp_path / "artifacts", "--output", str(output)))
        text = " ".join(result.output.replace("\u2502", " ").split())  # without rich's box and line breaks
        assert result.exit_code == 2 and "--output" in text and said in text, result.output
        assert "kept" not in result.output and "moved" not in result.output  # refused before any scale was fit
    assert ArtifactStore(tmp_path / "artifacts").current_version() is None


def test_calibrate_with_too_few_prompts_moves_nothing(app: typer.Typer, data_dir: Path, tmp_path: Path) -> None:
    args = calibrate_args(data_dir, tmp_path / "artifacts")
    args[args.index("--min-samples") + 1] = "50"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "no scale moved" in result.output and "< 50 needed" in result.output


def test_calibrate_refuses_a_folder_without_a_held_out_split(app: typer.Typer, tmp_path: Path,
                                                              data_dir: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "btc_1m.csv.gz").write_bytes((data_dir / "btc_1m.csv.gz").read_bytes())
    result = CliRunner().invoke(app, calibrate_args(bare, tmp_path / "artifacts", "--dry-run"))
    assert result.exit_code == 2 and "--all-rows" in result.output
    result = CliRunner().invoke(app, calibrate_args(data_dir, tmp_path / "artifacts", "--prompt", "medium"))
    assert result.exit_code == 2 and "unknown prompt type" in result.output


def test_artifacts_publish_list_and_rollback(app: typer.Typer, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    runner = CliRunner()
    assert "no artifact published" in runner.invoke(app, ["artifacts", "list", "--dir", str(root)]).output
    for version, scale in (("v001", 1.0), ("v002", 1.2)):
        result = runner.invoke(app, ["artifacts", "publish", str(stage_scale(store, version, scale)),
                                     "--dir", str(root)])
        assert result.exit_code == 0 and f"published {version}" in result.output
    listing = runner.invoke(app, ["artifacts", "list", "--dir", str(root)])
    assert listing.exit_code == 0
    lines = [line for line in listing.output.splitlines() if "v00" in line]
    assert len(lines) == 2 and "*" in lines[1] and "*" not in lines[0]
    result = runner.invoke(app, ["artifacts", "rollback", "--dir", str(root)])
    assert result.exit_code == 0 and "v002 -> v001" in result.output
    assert store.current_version() == "v001"
    result = runner.invoke(app, ["artifacts", "rollback", "--dir", str(root)])
    assert result.exit_code == 1 and "nothing to roll back to" in result.output
    # Both sets serve the committed models (neither carries a checkpoint): no other models to go back to.
    result = runner.invoke(app, ["artifacts", "rollback", "--models", "--dir", str(root)])
    assert result.exit_code == 1 and "no kept version serves other models than v001" in result.output
    result = runner.invoke(app, ["artifacts", "rollback", "--models", "--to", "v002", "--dir", str(root)])
    assert result.exit_code == 1 and "not both" in result.output


def test_artifacts_publish_refuses_a_corrupt_staging(app: typer.Typer, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    bad = stage_scale(store, "v002", 1.0)
    (bad / CALIBRATION_FILE).write_text("{}")
    result = CliRunner().invoke(app, ["artifacts", "publish", str(bad), "--dir", str(root)])
    assert result.exit_code == 1 and "manifest hash" in result.output
    assert store.current_version() == "v001"


def test_publishing_a_set_staged_on_an_older_version_by_hand_is_refused_unless_forced(
        app: typer.Typer, tmp_path: Path) -> None:
    """`retrain --no-publish`, an hourly calibration, then `artifacts publish`: the staged set's inherited
    calibration would silently replace the newer one."""
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    state = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=1.1)})
    models = store.stage({CALIBRATION_FILE: state.to_json()}, version="v002-hf", inherit=True)  # built on v001
    store.publish(stage_scale(store, "v003-calibrated", 1.3))
    runner = CliRunner()
    refused = runner.invoke(app, ["artifacts", "publish", str(models), "--dir", str(root)])
    assert refused.exit_code == 1 and "staged on v001, but v003-calibrated is current" in " ".join(refused.output.split())
    assert store.current_version() == "v003-calibrated"
    forced = runner.invoke(app, ["artifacts", "publish", str(models), "--dir", str(root), "--force"])
    assert forced.exit_code == 0, forced.output
    assert store.current_version() == "v002-hf"


def test_artifacts_publish_gate_rejects_a_worse_challenger(app: typer.Typer, data_dir: Path,
                                                           tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    worse = stage_scale(store, "v002", 1.8)
    result = CliRunner().invoke(app, ["artifacts", "publish", str(worse), "--dir", str(root), "--gate",
                                      "--data-dir", str(data_dir), "--asset", "BTC"],
                                env={"SYNTH_CALIBRATION_WINDOWS_HF": "10", "SYNTH_CALIBRATION_WINDOWS_LF": "3",
                                     "SYNTH_CALIBRATION_PATHS": "40"})
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())  # undo the terminal's line wrapping
    assert "v002 rejected" in text and "champion v001" in text
    assert "over 13 prompts" in text  # 10 one-hour + 3 one-day prompts, both scored
    assert store.current_version() == "v001"


GATE_ENV = {"SYNTH_CALIBRATION_WINDOWS_HF": "10", "SYNTH_CALIBRATION_WINDOWS_LF": "3", "SYNTH_CALIBRATION_PATHS": "40"}


def gate(app: typer.Typer, staged: Path, root: Path, data_dir: Path, *extra: str) -> tuple[int, str, float, float]:
    """``publish --gate`` (and ``extra`` options): exit code, output, challenger and champion mean CRPS."""
    result = CliRunner().invoke(app, ["artifacts", "publish", str(staged), "--dir", str(root), "--gate",
                                      "--data-dir", str(data_dir), "--asset", "BTC", *extra], env=GATE_ENV)
    text = " ".join(result.output.split())
    found = re.search(r"mean CRPS ([0-9.]+) vs champion \S+ ([0-9.]+) over", text)
    assert found is not None, text
    return result.exit_code, text, float(found[1]), float(found[2])


def test_publish_gate_scores_each_set_with_its_scales_on_the_engine_they_apply_to(
        app: typer.Typer, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Served on PatchTST, calibrated on EWMA-t (the defaults): the gate once scored both sides on PatchTST,
    where no scale applies, so every calibration tied with the champion and was promoted."""
    monkeypatch.delenv("SYNTH_ENGINE")
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    code, text, worse, champion = gate(app, stage_scale(store, "v002", 1.8), root, data_dir)
    assert code == 1 and "v002 rejected" in text and worse > champion, text
    assert store.current_version() == "v001"
    code, text, other, champion_again = gate(app, stage_scale(store, "v003", 0.9), root, data_dir)
    assert other != worse and champion_again == champion, text  # differing scales, differing scores


def test_publish_gate_scores_a_set_carrying_models_with_its_own_models(
        app: typer.Typer, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-staged retrained model (``retrain --no-publish``) is gated on its own checkpoint, not on the
    served one on both sides (a tie: any model, a random one included, would be published)."""
    from tests.model_fixtures import write_checkpoints

    monkeypatch.delenv("SYNTH_ENGINE")
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    random_head = write_checkpoints(tmp_path / "random", ("hf",), perturb=3.0) / "hf.pt"  # clearly worse
    staged = store.stage({"hf.pt": random_head.read_bytes()}, version="v002-hf", inherit=True)
    code, text, challenger, champion = gate(app, staged, root, data_dir)
    assert code == 1 and "v002-hf rejected" in text and challenger > champion, text
    assert store.current_version() == "v001" and staged.exists()


def test_publishing_the_current_set_again_says_so(app: typer.Typer, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(store.stage({CALIBRATION_FILE: CalibrationState().to_json()}, version="v001", inherit=True))
    result = CliRunner().invoke(app, ["artifacts", "publish", str(store.versions_dir / "v001"), "--dir", str(root)])
    assert result.exit_code == 0 and "v001 is already current: nothing to publish" in result.output, result.output
    store.publish(stage_scale(store, "v002", 1.2))
    result = CliRunner().invoke(app, ["artifacts", "publish", str(store.versions_dir / "v001"), "--dir", str(root)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "v001 is already published (not current)" in text and "--to v001" in text


def test_list_prints_whole_versions_and_no_empty_notes_and_rollback_says_it_once(
        app: typer.Typer, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    first, second = "20260101T000000Z-1a2b3c", "20260102T000000Z-4d5e6f-hf"  # as new_version() names them
    store.publish(store.stage({CALIBRATION_FILE: CalibrationState().to_json()}, version=first, inherit=True))
    store.publish(store.stage({}, version=second, inherit=True))
    listing = CliRunner().invoke(app, ["artifacts", "list", "--dir", str(root)])  # not a terminal
    assert listing.exit_code == 0 and first in listing.output and second in listing.output, listing.output
    assert "built_on=," not in listing.output and f"built_on={first}" in listing.output
    assert all("built_on" not in line for line in listing.output.splitlines() if first in line and "*" not in line)
    assert datetime.now(UTC).date().isoformat() + "T" in listing.output and "…" not in listing.output
    rolled = CliRunner().invoke(app, ["artifacts", "rollback", "--dir", str(root)])
    assert rolled.exit_code == 0 and rolled.output.count(f"{second} -> {first}") == 1, rolled.output


def test_calibrate_without_a_folder_reads_the_history_store_like_the_hourly_job(
        app: typer.Typer, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    from core.csv_history import read_csv
    from core.history_store import HistoryStore

    store = HistoryStore(tmp_path / "data" / "history")  # the production layout under SYNTH_DATA_DIR
    for step, name in ((60, "btc_1m.csv.gz"), (300, "btc_5m.csv.gz")):
        store.append("BTC", read_csv(data_dir / name, step))
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "data"))
    end = datetime.fromtimestamp(EVAL_START, UTC).date().isoformat()
    args = ["calibrate", "--dir", str(tmp_path / "artifacts"), "--asset", "btc", "--prompt", "high", "--windows", "12",
            "--min-samples", "10", "--paths", "40", "--dry-run", "--end", end]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ewma_t:BTC:60" in result.output and "nothing published" in result.output
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "empty"))
    empty = CliRunner().invoke(app, args)
    text = " ".join(empty.output.replace("│", " ").split())
    assert empty.exit_code == 2 and "holds no prices" in text and "SYNTH_DATA_DIR" in text
    unknown = CliRunner().invoke(app, [*args[:3], "--asset", "FOO", *args[5:]])  # not "no prices": unknown
    text = " ".join(unknown.output.replace("│", " ").split())
    assert unknown.exit_code == 2 and "unknown asset(s) FOO; known:" in text, text


def test_a_bad_setting_in_the_environment_is_a_usage_error(app: typer.Typer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_ARTIFACTS_KEEP", "several")
    for command in (["artifacts", "list", "--dir", str(tmp_path)], ["artifacts", "rollback", "--dir", str(tmp_path)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "SYNTH_ARTIFACTS_KEEP: Input should be a valid integer" in result.output, \
            (command, result.output)


def test_calibrate_on_a_store_of_older_history_points_at_end_not_at_a_reimport(
        app: typer.Typer, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibration reads the store's last few weeks only: after importing ../shared/data (months old) the store
    is not empty, and the refusal must say where its history ends and that --end reaches it."""
    from core.csv_history import read_csv
    from core.history_store import HistoryStore

    HistoryStore(tmp_path / "data" / "history").append("BTC", read_csv(data_dir / "btc_1m.csv.gz", 60))
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["calibrate", "--dir", str(tmp_path / "artifacts"), "--asset", "BTC", "--dry-run"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "holds no prices for BTC in the 21 days before" in text, text
    newest = T0 + DAYS * DAY - 60
    assert f"its newest bar is at {datetime.fromtimestamp(newest, UTC).isoformat()}" in text, text
    assert f"--end {datetime.fromtimestamp(newest + 60, UTC).date().isoformat()}" in text, text  # after its close


def test_list_and_rollback_repair_a_current_link_to_garbage(app: typer.Typer, tmp_path: Path) -> None:
    """`current` hand-edited to point at garbage: `list` must still show the versions, and `rollback --to`
    (the way to repair it) must not die on reading the link it is about to replace."""
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    for version in ("v001", "v002"):
        store.publish(stage_scale(store, version, 1.0))
    store.current_link.unlink()
    store.current_link.symlink_to("/tmp/not a version!")
    runner = CliRunner()
    listing = runner.invoke(app, ["artifacts", "list", "--dir", str(root)])
    assert listing.exit_code == 0 and "v001" in listing.output and "v002" in listing.output, listing.output
    text = " ".join(listing.output.split())
    assert "current is unusable:" in text and "not a version" in text and "points it at a set that loads" in text, text
    rolled = runner.invoke(app, ["artifacts", "rollback", "--to", "v001", "--dir", str(root)])
    assert rolled.exit_code == 0 and "-> v001" in rolled.output, (rolled.output, rolled.exception)
    assert store.current_version() == "v001"
    assert "unusable" not in runner.invoke(app, ["artifacts", "list", "--dir", str(root)]).output


def test_list_names_a_current_link_whose_version_is_gone(app: typer.Typer, tmp_path: Path) -> None:
    """The current version's folder removed by hand: the link still reads as a version, nothing loads from it,
    and the listing starred no row without a word."""
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    for version in ("v001", "v002"):
        store.publish(stage_scale(store, version, 1.0))
    shutil.rmtree(store.versions_dir / "v002")
    runner = CliRunner()
    listing = runner.invoke(app, ["artifacts", "list", "--dir", str(root)])
    text = " ".join(listing.output.split())
    assert listing.exit_code == 0 and "v001" in text and "*" not in text, text
    said = f"current is unusable: {store.current_link} points at v002, which {store.versions_dir} does not hold"
    assert "".join(said.split()) in "".join(text.split()), text  # a long path is wrapped mid-word by the terminal
    shutil.rmtree(store.versions_dir / "v001")  # nothing left to roll back to: a publish repairs it
    text = " ".join(runner.invoke(app, ["artifacts", "list", "--dir", str(root)]).output.split())
    assert "no artifact published" in text and "the next publish points it at a set that loads" in text, text
    rolled = runner.invoke(app, ["artifacts", "rollback", "--dir", str(root)])
    assert rolled.exit_code == 1, rolled.output


def test_publish_cannot_revert_a_set_published_while_it_waited_for_the_lock(
        app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`artifacts publish` checks that the set was staged on the current version, then publishes: the hourly
    calibration publishing in between (it holds the lock at that moment) must not be silently reverted."""
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    state = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=1.1)})
    staged = store.stage({CALIBRATION_FILE: state.to_json()}, version="v002-hf", inherit=True)  # built on v001
    rival = stage_scale(store, "v003-calibrated", 1.3)
    publish = ArtifactStore.publish

    def calibration_wins_the_lock(self: ArtifactStore, staging_dir: Path, *args: object, **kwargs: object) -> str:
        if staging_dir == staged and store.current_version() == "v001":
            publish(store, rival)  # the hourly job's publish, just before this one gets the lock
        return publish(self, staging_dir, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ArtifactStore, "publish", calibration_wins_the_lock)
    result = CliRunner().invoke(app, ["artifacts", "publish", str(staged), "--dir", str(root)])
    assert result.exit_code == 1 and "v003-calibrated" in result.output, result.output
    assert store.current_version() == "v003-calibrated" and staged.is_dir()


def test_calibrate_does_not_publish_over_a_set_published_while_it_calibrated(
        app: typer.Typer, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scales are computed from the set current when `calibrate` starts. If another job publishes
    meanwhile, staging then inherited the new set and named it as built_on, so the gate let the scales
    computed from the older set replace the new set's calibration."""
    import synth_miner.cli_artifacts as cli

    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    rival = stage_scale(store, "v002-hourly", 0.97)
    calibrate = cli.run_calibration

    def hourly_job_publishes_meanwhile(*args: object, **kwargs: object) -> object:
        if store.current_version() == "v001":
            store.publish(rival)
        return calibrate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "run_calibration", hourly_job_publishes_meanwhile)
    result = CliRunner().invoke(app, calibrate_args(data_dir, root))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "v002-hourly" in text and "v001" in text, (text, result.exception)
    assert store.current_version() == "v002-hourly"
    assert store.load_current().scale("ewma_t", "BTC", 60) == 0.97
    assert not [p for p in store.staging_dir.iterdir() if not p.name.startswith(".")]  # nothing half-staged


def test_calibrate_end_bounds_its_prompts_and_the_published_data_window(
        app: typer.Typer, data_dir: Path, tmp_path: Path) -> None:
    """`calibrate --end` on a CSV folder: the prompts end by --end, not at the folder's held-out boundary a
    day later, and the published set's data window runs from its earliest prompt (12 prompts one slot of
    calibration_spacing_hf_s apart, the last realised by --end) to --end."""
    from core.settings import Settings

    end = T0 + 2 * DAY
    artifacts = tmp_path / "artifacts"
    result = CliRunner().invoke(app, calibrate_args(data_dir, artifacts, "--end", datetime.fromtimestamp(
        end, UTC).date().isoformat()))
    assert result.exit_code == 0 and "promoted" in result.output, result.output
    current = ArtifactStore(artifacts).load_current()
    window = Manifest.from_json((current.path / "manifest.json").read_bytes()).data_window
    assert window is not None and window.end == end, window
    last_start, spacing = end - 3600 - 60, Settings().calibration_spacing_hf_s
    assert last_start - 12 * spacing <= window.start < last_start - 11 * spacing, window


def test_publish_gate_with_end_scores_the_prompts_a_folder_ending_there_would(
        app: typer.Typer, data_dir: Path, tmp_path: Path) -> None:
    """`publish --gate --end`: both sides are scored on the prompts realised by --end, the very ones a folder
    whose rows stop at --end gives (not on the folder's newest ones)."""
    end = T0 + 2 * DAY + 6 * 3600
    cut = tmp_path / "cut"
    cut.mkdir()
    for name, step in (("btc_1m.csv.gz", 60), ("btc_5m.csv.gz", 300)):
        write_csv(cut / name, read_csv(data_dir / name, step).between(T0, end))
    (cut / "manifest.json").write_bytes((data_dir / "manifest.json").read_bytes())
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    _, _, *at_end = gate(app, stage_scale(store, "v002", 1.8), root, data_dir, "--end",
                         datetime.fromtimestamp(end, UTC).isoformat())
    _, _, *cut_there = gate(app, stage_scale(store, "v003", 1.8), root, cut)
    _, _, *newest = gate(app, stage_scale(store, "v004", 1.8), root, data_dir)
    assert at_end == cut_there != newest
    assert store.current_version() == "v001"


def test_publish_gate_tolerance_option_overrides_the_setting(app: typer.Typer, data_dir: Path,
                                                             tmp_path: Path) -> None:
    """A challenger a few percent worse loses at the default tolerance (0.005) and is promoted at --tolerance 0.5."""
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    code, text, worse, champion = gate(app, stage_scale(store, "v002", 1.8), root, data_dir)
    assert code == 1 and champion < worse < champion * 1.5, text
    code, text, again, _ = gate(app, stage_scale(store, "v003", 1.8), root, data_dir, "--tolerance", "0.5")
    assert code == 0 and "v003 promoted" in text and "(tolerance 0.5)" in text and again == worse, text
    assert store.current_version() == "v003"


@pytest.mark.parametrize("tolerance", ["-0.5", "nan", "inf"])
def test_publish_gate_refuses_a_tolerance_that_is_no_tolerance_before_scoring(
        app: typer.Typer, data_dir: Path, tmp_path: Path, tolerance: str) -> None:
    """-0.5 scored every prompt, then died on a ValueError traceback; nan rejected every set as worse."""
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    store.publish(stage_scale(store, "v001", 1.0))
    result = CliRunner().invoke(app, ["artifacts", "publish", str(stage_scale(store, "v002", 1.0)), "--dir",
                                      str(root), "--gate", "--data-dir", str(data_dir), "--asset", "BTC",
                                      "--tolerance", tolerance], env=GATE_ENV)
    assert result.exit_code == 2 and "--tolerance" in result.output, result.output
    assert "mean CRPS" not in result.output and store.current_version() == "v001"


def test_calibrate_from_the_store_calibrates_only_the_assets_asked(
        app: typer.Typer, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`calibrate --asset BTC` on a store that also holds ETH: no ETH scale is computed, nor published."""
    from core.history_store import HistoryStore

    store = HistoryStore(tmp_path / "data" / "history")
    for asset in ("BTC", "ETH"):
        store.append(asset, read_csv(data_dir / "btc_1m.csv.gz", 60))
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "data"))
    end = datetime.fromtimestamp(EVAL_START, UTC).date().isoformat()
    result = CliRunner().invoke(app, ["calibrate", "--dir", str(tmp_path / "artifacts"), "--asset", "BTC", "--prompt",
                                      "high", "--windows", "12", "--min-samples", "10", "--paths", "40", "--end", end])
    assert result.exit_code == 0 and "ewma_t:BTC:60" in result.output, result.output
    assert "ETH" not in result.output
    assert set(ArtifactStore(tmp_path / "artifacts").load_current().calibration.entries) == {"ewma_t:BTC:60"}


def test_list_says_why_a_published_version_cannot_be_read(app: typer.Typer, tmp_path: Path) -> None:
    """A version whose manifest broke is listed with the reason (rollback skips it), not as a healthy row."""
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    for version in ("v001", "v002"):
        store.publish(stage_scale(store, version, 1.0))
    (store.versions_dir / "v001" / "manifest.json").write_text("{ not json")
    listing = CliRunner().invoke(app, ["artifacts", "list", "--dir", str(root)])
    assert listing.exit_code == 0, listing.output
    [row] = [line for line in listing.output.splitlines() if "v001" in line]
    assert "manifest is not valid JSON" in row and "*" not in row, listing.output
