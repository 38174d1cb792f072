"""Every engine by name, built once per process from settings (PatchTST when its checkpoints load)."""

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from core.engines.base import Engine
from core.engines.ewma import EwmaTEngine
from core.engines.gbm import GbmEngine
from core.forecast import Forecaster, ScaleLookup, no_calibration
from core.settings import Settings

if TYPE_CHECKING:
    from core.artifact_sets import ArtifactSet, Loader

log = logging.getLogger(__name__)

# A process whose engine did not load tries it again after the artifact retry interval, then twice as long after
# each failed try up to this: one that lacks the models for good says so hourly, not every minute.
ENGINE_RETRY_MAX_S = 3600.0


def served_artifact(settings: Settings) -> "ArtifactSet | None":
    """The current artifact version, every file hash-verified and loaded; None before the first
    publish, or when the current version does not load (corrupt, truncated, unreadable): then the
    committed ``models/`` serve, unscaled, as a worker does; a refused set's models are never served."""
    from core.artifact_files import ArtifactError
    from core.artifacts import ArtifactStore

    try:
        return ArtifactStore.from_settings(settings).load_current_or_none()
    except ArtifactError as exc:
        log.warning("artifacts unusable (%s): serving the committed models", exc)
        return None


def served_models_dir(settings: Settings) -> Path | None:
    """The current artifact version's folder when it carries model checkpoints (the weekly retraining
    publishes them there after they pass its gate) and it verifies; None: the committed ``models/``
    serve alone."""
    artifact = served_artifact(settings)
    return None if artifact is None else models_in(artifact.path)


def models_in(folder: Path) -> Path | None:
    """An artifact version's folder when it carries model checkpoints, else None (calibration only)."""
    return folder if any(folder.glob("*.pt")) else None


def engines_over(settings: Settings, models_dir: Path | None) -> dict[str, Engine]:
    """Every engine; PatchTST from ``models_dir`` first, the committed models for the kinds it lacks."""
    engines: dict[str, Engine] = {"gbm": GbmEngine(), "ewma_t": EwmaTEngine()}
    try:
        from core.engines.patchtst import PatchTSTEngine

        engines["patchtst"] = PatchTSTEngine.from_settings(settings, models_dir)
    except Exception as exc:  # no checkpoints, torch missing or no such device: serve the statistical engines
        log.warning("PatchTST engine unavailable: %s", exc)
    return engines


def build_engines(settings: Settings) -> dict[str, Engine]:
    """The engines as served now: the current artifact's models over the committed ones."""
    return engines_over(settings, served_models_dir(settings))


def calibration_lookup(settings: Settings) -> ScaleLookup:
    try:
        from core.calibration import load_scale_lookup

        return load_scale_lookup(settings)
    except Exception as exc:
        log.info("no calibration loaded (%s): sigma_scale = 1", exc)
        return no_calibration


def forecaster_over(engines: dict[str, Engine], name: str, seed: int | None, scale: ScaleLookup) -> Forecaster:
    if name not in engines:
        log.warning("engine %s unavailable; serving ewma_t", name)
        name = "ewma_t"
    return Forecaster(engines, default=name, seed=seed, scale=scale)


def served_engines(settings: Settings, calibrated: bool = True) -> tuple[dict[str, Engine], ScaleLookup]:
    """The engines and the calibration as served now, both from one verified load of ``current``
    (resolving it twice could pair one version's models with the next version's calibration)."""
    artifact = served_artifact(settings)
    engines = engines_over(settings, None if artifact is None else models_in(artifact.path))
    if artifact is None or not calibrated:
        return engines, no_calibration
    return engines, artifact.calibration.lookup_for(settings.calibration_engine)


def build_forecaster(settings: Settings, engine: str | None = None) -> Forecaster:
    return forecaster_for(settings, served_artifact(settings), engine)


def scale_of(settings: Settings, artifact: "ArtifactSet | None") -> ScaleLookup:
    """An artifact version's calibration of ``settings.calibration_engine`` (None: unscaled)."""
    return artifact.calibration.lookup_for(settings.calibration_engine) if artifact is not None else no_calibration


def checkpoints_of(artifact: "ArtifactSet | None") -> frozenset[tuple[str, str]]:
    """The (checkpoint file, sha256) an artifact version carries: empty for the committed models alone."""
    return frozenset() if artifact is None else frozenset(artifact.manifest.checkpoints.items())


def forecaster_for(settings: Settings, artifact: "ArtifactSet | None", engine: str | None = None) -> Forecaster:
    """The forecaster serving one loaded artifact version, its models and calibration both taken from
    it (None: the committed models, unscaled). Never re-reads ``current``: a publish in between would
    pair one version's models with another's calibration."""
    models_dir = models_in(artifact.path) if artifact is not None else None
    return forecaster_over(engines_over(settings, models_dir), engine or settings.engine, settings.seed,
                           scale_of(settings, artifact))


class LiveForecaster:
    """A forecaster that follows ``artifacts/current``: between requests, a newly published version
    (models, calibration) is loaded once and swapped in; a version that fails to load is skipped and
    the previous one keeps serving. A poll that finds nothing new costs one readlink.

    Subclasses change what a version builds (``_build``) and how a reload is logged (``reloads``)."""

    reloads = "engines and calibration"
    loaders: "Mapping[str, Loader]" = {}  # by file suffix, over the store's defaults

    def __init__(self, settings: Settings, engine: str | None = None) -> None:
        from core.artifact_watcher import ArtifactWatcher
        from core.artifacts import ArtifactStore

        self.settings = settings
        self.engine = engine
        self.watcher = ArtifactWatcher(ArtifactStore(settings.artifacts_dir, loaders=self.loaders))
        self._checkpoints: frozenset[tuple[str, str]] | None = None  # those the loaded engines were built from
        if self.watcher.poll() is None:
            self._unpublished()
        self._forecaster = self._build(self.watcher.current)
        self._built_at = time.monotonic()
        self._engine_retries = 0  # failed tries of the engine asked for since it last loaded
        # The embedded pool calls ``current`` from several threads. Unserialised, two threads reloading
        # two versions published in quick succession could finish out of order: the older version's
        # engines would then serve while the watcher counts the newer one as seen (never loaded again).
        self._reloading = threading.Lock()

    def _build(self, artifact: "ArtifactSet | None") -> Forecaster:
        checkpoints = checkpoints_of(artifact)
        if self._checkpoints == checkpoints:
            kept = self._forecaster
            # The hourly calibration copies the models forward: only its scales are new, and the loaded
            # engines serve on (every worker rebuilt them all, on its next request, every hour).
            forecaster = Forecaster(kept.engines, default=kept.default, seed=kept.seed,
                                    scale=scale_of(self.settings, artifact))
        else:
            forecaster = forecaster_for(self.settings, artifact, self.engine)
        self._checkpoints = checkpoints
        return forecaster

    def _unpublished(self) -> None:
        log.info("no artifact loaded from %s: committed models, sigma_scale = 1", self.settings.artifacts_dir)

    @property
    def version(self) -> str | None:
        return self.watcher.version

    def _wanted_missing(self) -> bool:
        """Whether the engine asked for did not load, and its fallback serves instead."""
        return self._forecaster.default != (self.engine or self.settings.engine)

    def current(self) -> Forecaster:
        if not self._reloading.acquire(blocking=False):
            return self._forecaster  # another thread is polling or reloading: serve what is loaded
        try:
            loaded = self.watcher.poll()
            if loaded is not None:
                log.info("artifact %s published: reloading %s", loaded.version, self.reloads)
                self._forecaster = self._build(loaded)
                self._built_at = time.monotonic()
            elif self._wanted_missing() and time.monotonic() - self._built_at >= min(
                    ENGINE_RETRY_MAX_S, self.watcher.retry_s * 2 ** min(self._engine_retries, 16)):
                # Its checkpoints were unreadable, or its device not ready, when they were loaded (a volume
                # mounted late, a GPU still held by the previous process): tried again like a refused artifact,
                # where the fallback served until the process was restarted.
                self._checkpoints = None  # the engines are built again, not only the calibration
                self._forecaster = self._build(self.watcher.current)
                self._built_at = time.monotonic()
                if self._wanted_missing():
                    self._engine_retries += 1
                else:
                    self._engine_retries = 0
                    log.warning("engine %s loaded on a later try: serving it", self._forecaster.default)
            return self._forecaster
        finally:
            self._reloading.release()
