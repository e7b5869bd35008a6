"""`SteeringCheckpoint`: the callback that writes the calibrated steering when `fit` ends."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from destein_pl.files import atomic_path

log = logging.getLogger(__name__)


class SteeringCheckpoint(Callback):
    """Writes the calibrated steering once `fit` ends (before teardown, so every process takes part):
    `<dirpath>/<filename>.ckpt` (Lightning, written atomically), and beside it `<filename>.safetensors`,
    `<filename>.json` and the probe-accuracy heatmap `<filename>-probes.png`.

    Use it with `trainer.enable_checkpointing: false`: calibration makes no optimizer steps, which Lightning's
    ModelCheckpoint takes as nothing to save.

    Args:
        dirpath: folder of the files.
        filename: their name, without extension.
    """

    def __init__(self, dirpath: str = "runs/checkpoints", filename: str = "steering") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            with atomic_path(self.path) as tmp:
                trainer.save_checkpoint(tmp, weights_only=True)
            pl_module.export_steering(self.path)
            log.info("steering checkpoint written to %s", self.path)
        else:
            trainer.save_checkpoint(self.path, weights_only=True)  # joins the collective steps; writes nothing
        trainer.strategy.barrier("steering_checkpoint")
