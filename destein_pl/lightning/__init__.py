"""The Lightning adapter: `DeSteinModule` (fit = calibration, test = evaluation), `DeSteinDataModule`, the
`SteeringCheckpoint` callback and the `destein` command."""

from destein_pl.lightning.callbacks import SteeringCheckpoint
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.lightning.module import DeSteinModule

__all__ = ["DeSteinDataModule", "DeSteinModule", "SteeringCheckpoint"]
