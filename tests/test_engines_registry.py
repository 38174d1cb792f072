"""The engine registry: a LiveForecaster shared by the embedded pool's threads."""

import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import core.engines_registry as registry
from core.engines_registry import LiveForecaster
from core.forecast import Forecaster
from core.settings import Settings


@dataclass
class FakeSet:
    version: str

    @property
    def manifest(self) -> SimpleNamespace:  # each version carries a checkpoint of its own
        return SimpleNamespace(checkpoints={f"{self.version}.pt": self.version})


class FakeWatcher:
    """``current`` moves to each of ``versions`` in turn, one per poll."""

    def __init__(self, versions: list[str]) -> None:
        self.pending = list(versions)
        self.current: FakeSet | None = None

    @property
    def version(self) -> str | None:
        return None if self.current is None else self.current.version

    def poll(self) -> FakeSet | None:
        if not self.pending:
            return None
        self.current = FakeSet(self.pending.pop(0))
        return self.current


def test_two_threads_reloading_never_leave_an_older_version_serving(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """v2 is published, then v3 while a thread still builds v2's engines: another thread must not load
    v3 alongside, or v2's build, finishing last, serves on while the watcher has v3 as seen."""
    built: dict[str, Forecaster] = {}
    v2_building, v2_may_finish = threading.Event(), threading.Event()

    def forecaster_for(settings: Settings, artifact: FakeSet | None, engine: str | None = None) -> Forecaster:
        version = "committed" if artifact is None else artifact.version
        if version == "v2":
            v2_building.set()
            assert v2_may_finish.wait(10)
        built[version] = Forecaster()
        return built[version]

    monkeypatch.setattr(registry, "forecaster_for", forecaster_for)
    live = LiveForecaster(Settings(artifacts_dir=tmp_path / "artifacts"))
    live.watcher = FakeWatcher(["v2", "v3"])  # type: ignore[assignment]
    slow = threading.Thread(target=live.current)
    slow.start()
    assert v2_building.wait(10)
    served_meanwhile = live.current()  # the second thread, while v2 is being built
    v2_may_finish.set()
    slow.join(10)
    newest = live.current()  # the next task
    assert live.version == "v3" and newest is built["v3"]  # serves the version the watcher reports
    assert served_meanwhile is built["committed"]  # the loaded version served on; no second reload
