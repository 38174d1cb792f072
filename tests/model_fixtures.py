"""Model checkpoints for tests: the default architecture, a zero or a random head (no training)."""

from pathlib import Path

import numpy as np
import torch

from core.checkpoint import Checkpoint, checkpoint_path, save
from core.engines.ewma import DEFAULT_CONFIGS
from core.features import FEATURE_SPECS, NormStats, context_feature_names
from core.model import PatchTST
from core.training import model_config


def write_checkpoints(folder: Path, kinds: tuple[str, ...] = ("hf", "lf_crypto", "lf_equity"),
                      perturb: float = 0.0, closed_scale: float = 1.0) -> Path:
    for kind in kinds:
        torch.manual_seed(0)
        cfg = model_config(kind)
        model = PatchTST(cfg)
        if perturb:
            with torch.no_grad():
                model.head.out.weight.normal_(0.0, perturb)
        n = len(context_feature_names(FEATURE_SPECS[kind]))
        save(Checkpoint(kind, cfg, model.state_dict(), NormStats(np.zeros(n), np.ones(n)),
                        ewma=DEFAULT_CONFIGS[FEATURE_SPECS[kind].step],
                        closed_scale=closed_scale if kind == "lf_equity" else 1.0), checkpoint_path(folder, kind))
    return folder
