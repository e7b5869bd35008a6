"""Calibration: steering pairs, per-head probes, detoxification vectors and head weights."""

from destein_pl.calibration.calibrate import Calibration, CalibrationOptions, Calibrator, calibrate
from destein_pl.calibration.pairs import PairsConfig, SteeringPair, load_pairs, read_pairs
from destein_pl.calibration.probes import fit_head_probes

__all__ = [
    "Calibration",
    "CalibrationOptions",
    "Calibrator",
    "PairsConfig",
    "SteeringPair",
    "calibrate",
    "fit_head_probes",
    "load_pairs",
    "read_pairs",
]
