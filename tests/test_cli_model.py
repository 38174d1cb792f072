"""``synth-miner train --store``: which folder it reads. Training itself is stubbed (core.training.fit
records what it was given and stops); tests/test_training.py trains through the CLI for real."""

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import core.training
from core.csv_history import read_csv
from core.history_store import HistoryStore
from core.training import TrainingError
from synth_miner.cli_model import app

DAY = 86_400
REPO_MODELS = Path(__file__).resolve().parents[1] / "models"  # train's default --out, run from the checkout


def committed_models() -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(REPO_MODELS.glob("*.pt"))}


@pytest.fixture(autouse=True)
def repo_models_untouched() -> Iterator[None]:
    """Every command here writes to its own --out: the checkout's models/ is never written."""
    before = committed_models()
    yield
    assert committed_models() == before, "a train command wrote to the repository's models/"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture(scope="module")
def cut(shared_data: Path) -> int:
    return int(json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"])


@pytest.fixture
def data_dir(tmp_path: Path, shared_data: Path, cut: int) -> Path:
    """A data dir as SYNTH_DATA_DIR: the store at data/history holds two days of BTC 1-minute bars."""
    store = HistoryStore(tmp_path / "data" / "history", durable=False)
    store.append("BTC", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 2 * DAY, cut))
    return tmp_path / "data"


@pytest.fixture
def fitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What fit was called with; it then stops the command (no model is trained here)."""
    calls: list[dict[str, Any]] = []

    def fake_fit(kind: str, files: dict[str, Any], *_: object, **__: object) -> None:
        calls.append({"kind": kind, "files": files})
        raise TrainingError("stub: stopped before training")

    monkeypatch.setattr(core.training, "fit", fake_fit)
    return calls


def train(store: Path, cut: int, out: Path, *extra: str) -> Result:
    when = datetime.fromtimestamp(cut, UTC).strftime("%Y-%m-%dT%H:%M")
    return CliRunner().invoke(app, ["train", "--model", "hf", "--store", str(store), "--cut", when, "--days", "3",
                                    "--out", str(out), *extra])


def said(result: Result) -> str:
    """The output in one line: rich and typer wrap long lines, typer's errors inside a box."""
    return " ".join(result.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def squeezed(result: Result) -> str:
    """No whitespace at all: a long path may be wrapped anywhere."""
    return "".join(said(result).split())


@pytest.mark.parametrize("where", ["data dir", "history root"])
def test_train_store_takes_the_data_dir_as_every_command_does(data_dir: Path, cut: int, where: str, out: Path,
                                                              fitted: list[dict[str, Any]]) -> None:
    result = train(data_dir if where == "data dir" else data_dir / "history", cut, out)
    assert result.exit_code == 1 and "stub: stopped before training" in said(result), result.output
    (call,) = fitted
    btc = call["files"]["BTC"].history
    assert call["kind"] == "hf" and set(call["files"]) == {"BTC"} and btc.step == 60
    assert len(btc) == 2 * DAY // 60 and int(btc.ts[-1]) < cut


def test_train_store_resamples_one_minute_bars_for_the_24h_models(data_dir: Path, cut: int, out: Path,
                                                                  fitted: list[dict[str, Any]]) -> None:
    """As the retraining job reads the store: a store synced at 60 s still trains lf_crypto."""
    result = train(data_dir, cut, out, "--model", "lf_crypto")
    assert result.exit_code == 1 and "stub" in said(result), result.output
    btc = fitted[0]["files"]["BTC"].history
    assert fitted[0]["kind"] == "lf_crypto" and btc.step == 300 and len(btc) == 2 * DAY // 300


def test_train_store_refuses_a_path_that_holds_no_store(tmp_path: Path, data_dir: Path, cut: int, out: Path,
                                                        fitted: list[dict[str, Any]]) -> None:
    missing = train(tmp_path / "nowhere", cut, out)
    assert missing.exit_code == 2 and "does not exist" in said(missing), missing.output
    (tmp_path / "plain").mkdir()
    plain = train(tmp_path / "plain", cut, out)
    assert plain.exit_code == 2 and "no history store at" in said(plain), plain.output
    (data_dir / "BTC").mkdir()  # a data dir that also looks like a history root: which one was meant?
    both = train(data_dir, cut, out)
    assert both.exit_code == 2 and "both a history/ folder and asset folders" in said(both), both.output
    assert not fitted


def test_train_store_says_when_the_store_lacks_the_window(data_dir: Path, cut: int, out: Path,
                                                          fitted: list[dict[str, Any]]) -> None:
    early = train(data_dir, cut - 10 * DAY, out)
    assert early.exit_code == 1 and "has no 60s history" in said(early), early.output
    assert str(data_dir / "history") in squeezed(early) and not fitted
    no_cut = CliRunner().invoke(app, ["train", "--model", "hf", "--store", str(data_dir), "--out", str(out)])
    assert no_cut.exit_code == 2 and "--cut" in said(no_cut)


@pytest.mark.parametrize(("option", "value"), [("--days", "inf"), ("--days", "nan"), ("--lr", "nan"), ("--lr", "-1"),
                                               ("--refit-half-life", "inf")])
def test_train_refuses_numbers_that_are_not_numbers_before_training(data_dir: Path, cut: int, out: Path,
                                                                   fitted: list[dict[str, Any]], option: str,
                                                                   value: str) -> None:
    """--days inf was an OverflowError traceback; a nan learning rate trained on nan losses; an infinite
    half-life was refused by the refit, after the whole selection had trained."""
    result = train(data_dir, cut, out, option, value)
    assert result.exit_code == 2 and option in said(result), result.output
    assert not fitted


@pytest.mark.parametrize(("option", "value"), [("--threads", "0"), ("--threads", "-1"), ("--stride-min", "-5")])
def test_train_refuses_counts_below_one_before_training(data_dir: Path, cut: int, out: Path,
                                                        fitted: list[dict[str, Any]], option: str, value: str) -> None:
    """--threads -1 was torch's RuntimeError traceback (0 meant torch's default); --stride-min -5 read every
    file, then said 'no usable windows'."""
    result = train(data_dir, cut, out, option, value)
    assert result.exit_code == 2 and option in said(result), result.output
    assert not fitted


def test_retrain_refuses_threads_below_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    result = CliRunner().invoke(app, ["retrain", "--threads", "-1"])
    assert result.exit_code == 2 and "--threads" in said(result), result.output


def test_train_refuses_an_out_it_cannot_write_before_training(tmp_path: Path, data_dir: Path, cut: int,
                                                              fitted: list[dict[str, Any]]) -> None:
    """The checkpoint is written once training is done (hours): an --out under a file, or a file, was a
    traceback then, and the trained model was lost."""
    plain = tmp_path / "plain"
    plain.write_text("a file")
    for out, text in ((plain, "is a file"), (plain / "models", "cannot be written")):
        result = train(data_dir, cut, out)
        assert result.exit_code == 2 and text in said(result) and "--out" in said(result), result.output
    assert not fitted and plain.read_text() == "a file"


def test_retrain_names_its_own_option_for_a_bad_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    result = CliRunner().invoke(app, ["retrain", "--at", "next tuesday"])
    assert result.exit_code == 2 and "--at" in result.output and "--cut" not in result.output, result.output
    monkeypatch.setenv("SYNTH_ALLOWED_HOTKEYS", "notjson")  # a list setting that is not JSON: not a traceback
    result = CliRunner().invoke(app, ["retrain"])
    assert result.exit_code == 2 and "list and dict settings are JSON" in result.output, result.output


def test_train_never_replaces_a_checkpoint_without_force(tmp_path: Path, out: Path) -> None:
    """The default --out is the served models' folder: an existing <model>.pt is replaced only with --force,
    and the refusal comes before any data is read or any training starts."""
    out.mkdir()
    (out / "hf.pt").write_bytes(b"served")
    missing = tmp_path / "no-such-folder"
    refused = CliRunner().invoke(app, ["train", "--model", "hf", "--data-dir", str(missing), "--out", str(out)])
    assert refused.exit_code == 2 and "--force" in said(refused), said(refused)
    assert (out / "hf.pt").read_bytes() == b"served"
    forced = CliRunner().invoke(app, ["train", "--model", "hf", "--data-dir", str(missing), "--out", str(out),
                                      "--force"])
    assert forced.exit_code == 2 and "isnotafolder" in squeezed(forced) and "--force" not in said(forced)
