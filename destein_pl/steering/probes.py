"""`Probes`: one logistic-regression probe (toxic vs non-toxic) per attention head, kept as plain tensors.

Calibration fits two sets on the same pairs (`destein_pl.calibration.probes`): one on the cued texts, whose
validation accuracies weigh the heads (the paper's), and one on the texts without their cues, which the gate reads.
`destein gate` fits a third on the model's own continuations (`destein_pl.calibration.continuation_probes`), which
the gate reads instead when its `probes` setting is `continuation`; for those, `accuracy` holds each probe's
validation AUROC. All are this type; a checkpoint stores them as `probe_*`, `gate_probe_*` and
`continuation_probe_*` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FIELDS = ("coef", "intercept", "accuracy")
HEAD_WEIGHT_PREFIX = "probe_"
"""Tensor-name prefix of the probes that weigh the heads."""
GATE_PREFIX = "gate_probe_"
"""Tensor-name prefix of the probes the gate reads by default (`GateSettings.probes` `context`)."""
CONTINUATION_PREFIX = "continuation_probe_"
"""Tensor-name prefix of the probes fit on the model's own continuations (`GateSettings.probes` `continuation`)."""
GATE_PROBE_PREFIXES = {"context": GATE_PREFIX, "continuation": CONTINUATION_PREFIX}
"""Each `GateSettings.probes` value and the prefix of the tensors it reads."""


class ProbesError(ValueError):
    """Probe tensors of the wrong shape, with non-finite values, or an incomplete set."""


@dataclass
class Probes:
    """Raw-activation logistic regressions, one per head (never pickled estimators)."""

    coef: Tensor
    """`[L, H, D]`; a positive logit means toxic."""
    intercept: Tensor
    """`[L, H]`."""
    accuracy: Tensor
    """`[L, H]` validation accuracy (continuation probes: validation AUROC) in [0, 1]; the gate's heads are the
    probes ranked highest by it."""

    def __post_init__(self) -> None:
        self.coef, self.intercept, self.accuracy = (torch.as_tensor(t).detach().float().cpu()
                                                    for t in (self.coef, self.intercept, self.accuracy))
        if self.coef.dim() != 3 or self.intercept.shape != self.coef.shape[:2] or \
                self.accuracy.shape != self.coef.shape[:2]:
            raise ProbesError(f"probes must be coef [L, H, D], intercept [L, H] and accuracy [L, H]; got "
                              f"{list(self.coef.shape)}, {list(self.intercept.shape)}, {list(self.accuracy.shape)}")
        if not all(torch.isfinite(t).all() for t in (self.coef, self.intercept, self.accuracy)):
            raise ProbesError("probes contain NaN or infinite values")

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(num_layers, num_heads, head_dim)`."""
        return tuple(self.coef.shape)

    def top_heads(self, k: int, layers: int | None = None) -> list[tuple[int, int]]:
        """The (layer, head) of the `k` most accurate probes among the first `layers` layers (None: all; all heads
        there if fewer; ties: lower (layer, head) first), sorted by layer then head."""
        accuracy = self.accuracy if layers is None else self.accuracy[:layers]
        order = torch.sort(accuracy.flatten(), descending=True, stable=True).indices[:k]
        num_heads = self.accuracy.shape[1]
        return sorted((int(i) // num_heads, int(i) % num_heads) for i in order)

    def arrays(self, prefix: str) -> dict[str, Tensor]:
        """The three tensors named `<prefix><field>`, as a checkpoint stores them."""
        return {f"{prefix}{name}": getattr(self, name) for name in FIELDS}

    @classmethod
    def from_arrays(cls, tensors: dict[str, Tensor], prefix: str) -> Probes | None:
        """The probes named `<prefix><field>` among `tensors`; None when none of the three is there, an error naming
        the missing ones when only some are."""
        names = [f"{prefix}{name}" for name in FIELDS]
        present = [n for n in names if n in tensors]
        if not present:
            return None
        if len(present) != len(names):
            missing = [n for n in names if n not in tensors]
            raise ProbesError(f"incomplete probes: {', '.join(present)} present but {', '.join(missing)} missing")
        return cls(*(tensors[n] for n in names))
