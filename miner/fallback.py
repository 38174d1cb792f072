"""The miner's in-process fallback forecaster (EWMA-t), built without loading the models a second time.

It used to be a second ``LiveForecaster``: that loads every engine, PatchTST checkpoints included,
only to serve EWMA-t, so each start loaded the models twice (embedded mode) or loaded models the
miner never runs (Celery mode, where the workers compute).
"""

from core.artifact_sets import ArtifactSet, kept_as_bytes
from core.engines_registry import LiveForecaster, scale_of
from core.forecast import FALLBACK_ENGINE, Forecaster, ForecasterSource, default_engines
from core.settings import Settings


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


class StatisticalForecaster(LiveForecaster):
    """EWMA-t and GBM only, with the calibration of ``artifacts/current`` (reloaded when it moves, under
    LiveForecaster's guard: the reply threads call ``current`` concurrently)."""

    reloads = "the fallback's calibration"
    # Its reloads run on a reply thread, under the request's deadline: checkpoints it never serves are
    # hash-checked, not loaded (torch's import and load made the first fallback after a publish 2.5 s late).
    loaders = {".pt": kept_as_bytes}

    def __init__(self, settings: Settings, engine: str = FALLBACK_ENGINE) -> None:
        super().__init__(settings, engine)

    def _build(self, artifact: ArtifactSet | None) -> Forecaster:
        return Forecaster(default_engines(), default=self.engine or FALLBACK_ENGINE, seed=self.settings.seed,
                          scale=scale_of(self.settings, artifact))

    def _unpublished(self) -> None:
        pass  # the served forecaster's start says it

    def _wanted_missing(self) -> bool:
        return False  # its statistical engines need no checkpoint: nothing to try again


def fallback_source(settings: Settings, pool_forecaster: ForecasterSource | None) -> ForecasterSource:
    """EWMA-t over the embedded pool's engines when there is one, else the statistical engines alone."""
    if pool_forecaster is not None:
        return EngineView(pool_forecaster)
    return StatisticalForecaster(settings)
