"""`destein_fsdp`: the strategy for a steered model that does not fit one device (e.g. 70B).

Like `ddp` it runs one process per device, each with its own prompts or pairs; unlike `ddp` each process holds
only its shard of every decoder layer (FSDP2 `fully_shard`, `DeSteinModule.configure_model` does it), gathering
one layer's parameters at a time during a forward pass. The steering buffers are small and stay whole on every
process. Lightning's own `fsdp` strategy wraps the whole module as one unit (it would gather every parameter at
once) and refuses the CPU; this one runs on GPUs and, with gloo, on CPUs.

    destein test --config configs/paper-base.yaml --config configs/paper/llama2-70b.yaml \
      --trainer.strategy destein_fsdp --trainer.devices 8
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn


class DeSteinFSDPStrategy(DDPStrategy):
    """Data-parallel processes holding a sharded model (see the module's docstring).

    Args:
        reshard_after_forward: free each layer's gathered parameters after its forward pass (True: what lets a
            model larger than one device fit; False keeps them after the first pass, so every device ends up
            holding the whole model, only worth it when it fits).
        **kwargs: `DDPStrategy`'s (process group backend, timeout, ...).
    """

    strategy_name = "destein_fsdp"

    def __init__(self, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup(self, trainer: Any) -> None:
        # DDPStrategy.setup, less the DDP wrapper and the broadcast of the weights: the model is sharded in
        # `configure_model`, and calibration computes no gradients to reduce.
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()


StrategyRegistry.register(
    DeSteinFSDPStrategy.strategy_name, DeSteinFSDPStrategy,
    description="one process per device, each holding a shard of the steered model (FSDP2, per decoder layer)",
    override=True,
)
