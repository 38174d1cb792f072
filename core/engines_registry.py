"""Every engine by name, built once per process from settings (PatchTST when its checkpoints load)."""

import logging

from core.engines.base import Engine
from core.engines.ewma import EwmaTEngine
from core.engines.gbm import GbmEngine
from core.forecast import Forecaster, ScaleLookup, no_calibration
from core.settings import Settings

log = logging.getLogger(__name__)


def build_engines(settings: Settings) -> dict[str, Engine]:
    engines: dict[str, Engine] = {"gbm": GbmEngine(), "ewma_t": EwmaTEngine()}
    try:
        from core.engines.patchtst import PatchTSTEngine

        engines["patchtst"] = PatchTSTEngine.from_settings(settings)
    except Exception as exc:  # no checkpoints, torch missing or no such device: serve the statistical engines
        log.warning("PatchTST engine unavailable: %s", exc)
    return engines


def calibration_lookup(settings: Settings) -> ScaleLookup:
    try:
        from core.calibration import load_scale_lookup

        return load_scale_lookup(settings)
    except Exception as exc:
        log.info("no calibration loaded (%s): sigma_scale = 1", exc)
        return no_calibration


def build_forecaster(settings: Settings, engine: str | None = None) -> Forecaster:
    engines = build_engines(settings)
    name = engine or settings.engine
    if name not in engines:
        log.warning("engine %s unavailable; serving ewma_t", name)
        name = "ewma_t"
    return Forecaster(engines, default=name, seed=settings.seed, scale=calibration_lookup(settings))


class LiveForecaster:
    """A forecaster that follows ``artifacts/current``: between requests, a newly published version
    (models, calibration) is loaded once and swapped in; a version that fails to load is skipped and
    the previous one keeps serving. A poll that finds nothing new costs one readlink."""

    def __init__(self, settings: Settings, engine: str | None = None) -> None:
        from core.artifacts import ArtifactWatcher

        self.settings = settings
        self.engine = engine
        self.watcher = ArtifactWatcher(settings.artifacts_dir)
        self.watcher.poll()
        self._forecaster = build_forecaster(settings, engine)

    @property
    def version(self) -> str | None:
        return self.watcher.version

    def current(self) -> Forecaster:
        if self.watcher.poll() is not None:
            log.info("artifact %s published: reloading engines and calibration", self.watcher.version)
            self._forecaster = build_forecaster(self.settings, self.engine)
        return self._forecaster
