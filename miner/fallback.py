"""The miner's in-process fallback forecaster (EWMA-t), built without loading the models a second time.

It used to be a second ``LiveForecaster``: that loads every engine, PatchTST checkpoints included,
only to serve EWMA-t, so each start loaded the models twice (embedded mode) or loaded models the
miner never runs (Celery mode, where the workers compute).
"""

import logging
import threading

from core.artifacts import ArtifactSet, ArtifactWatcher
from core.forecast import FALLBACK_ENGINE, Forecaster, ForecasterSource, default_engines, no_calibration
from core.settings import Settings

log = logging.getLogger(__name__)


class EngineView:
    """Another default engine over a forecaster source's engines: shares its loaded engines and the
    artifact version it follows (the view is rebuilt, cheaply, when the source swaps its forecaster)."""

    def __init__(self, source: ForecasterSource, engine: str = FALLBACK_ENGINE) -> None:
        self.source = source
        self.engine = engine
        self._base: Forecaster | None = None
        self._view: Forecaster | None = None

    def current(self) -> Forecaster:
        base = self.source.current()
        view = self._view
        if base is not self._base or view is None:
            view = Forecaster(base.engines, default=self.engine, seed=base.seed, scale=base.scale)
            self._base, self._view = base, view
        return view


class StatisticalForecaster:
    """EWMA-t and GBM only, with the calibration of ``artifacts/current`` (reloaded when it moves)."""

    def __init__(self, settings: Settings, engine: str = FALLBACK_ENGINE) -> None:
        self.settings = settings
        self.engine = engine
        self.watcher = ArtifactWatcher(settings.artifacts_dir)
        self.watcher.poll()
        self._forecaster = self._build(self.watcher.current)
        # The reply threads call ``current`` concurrently: unserialised, a thread still loading one version
        # could overwrite the forecaster another had just built from a newer one, which the watcher then
        # counts as seen (never loaded again). Same guard as LiveForecaster's.
        self._reloading = threading.Lock()

    def _build(self, artifact: ArtifactSet | None) -> Forecaster:
        scale = artifact.calibration.lookup_for(self.settings.calibration_engine) if artifact else no_calibration
        return Forecaster(default_engines(), default=self.engine, seed=self.settings.seed, scale=scale)

    def current(self) -> Forecaster:
        if not self._reloading.acquire(blocking=False):
            return self._forecaster  # another thread is polling or reloading: serve what is loaded
        try:
            loaded = self.watcher.poll()
            if loaded is not None:
                log.info("artifact %s published: reloading the fallback's calibration", loaded.version)
                self._forecaster = self._build(loaded)
            return self._forecaster
        finally:
            self._reloading.release()


def fallback_source(settings: Settings, pool_forecaster: ForecasterSource | None) -> ForecasterSource:
    """EWMA-t over the embedded pool's engines when there is one, else the statistical engines alone."""
    if pool_forecaster is not None:
        return EngineView(pool_forecaster)
    return StatisticalForecaster(settings)
