"""Calibration: steering pairs, per-head probes, detoxification vectors and head weights, and the continuation
probes of the forward-looking gate."""

from destein_pl.calibration.calibrate import Calibration, CalibrationOptions, Calibrator, calibrate
from destein_pl.calibration.continuation_probes import (
    ContinuationProbeOptions,
    ContinuationProbes,
    fit_continuation_probes,
)
from destein_pl.calibration.pairs import PairsConfig, SteeringPair, load_pairs, read_pairs
from destein_pl.calibration.probes import fit_head_probes

__all__ = [
    "Calibration",
    "CalibrationOptions",
    "Calibrator",
    "ContinuationProbeOptions",
    "ContinuationProbes",
    "PairsConfig",
    "SteeringPair",
    "calibrate",
    "fit_continuation_probes",
    "fit_head_probes",
    "load_pairs",
    "read_pairs",
]
