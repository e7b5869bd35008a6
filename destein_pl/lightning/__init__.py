"""The Lightning adapter: `DeSteinModule` (fit = calibration, test = evaluation), `DeSteinDataModule`, the
`SteeringCheckpoint` callback, the `destein_fsdp` strategy and the `destein` command."""

from destein_pl.lightning.callbacks import SteeringCheckpoint
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.lightning.module import DeSteinModule
from destein_pl.lightning.strategies import DeSteinFSDPStrategy

__all__ = ["DeSteinDataModule", "DeSteinFSDPStrategy", "DeSteinModule", "SteeringCheckpoint"]
