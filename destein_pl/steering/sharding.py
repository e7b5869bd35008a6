"""A model sharded over the processes of a run (FSDP2), for one larger than a device, and the lockstep that keeps
its forward passes matched.

`load_sharded` builds the model on the meta device on every process; process 0 alone reads the weights (in the
requested dtype, on the CPU) and sends each tensor in turn, of which every process keeps only its shard. Each
decoder layer is its own FSDP unit, so a forward pass gathers one layer's parameters at a time.

A sharded model's forward pass is collective: every process must make the same calls in the same order, also
one with nothing to do (fewer prompts on an uneven split, prompts a resumed run already holds). `Lockstep` keeps
them matched: before each real call every process says whether it makes one (an all-reduce), and `drain()` makes
empty one-token calls for as long as another process still makes real ones. Calls of two sharded models must not
interleave: finish (drain) one model's work before the other's.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from destein_pl.steering.architectures import architecture_for
from destein_pl.steering.loading import load_base_model, load_tokenizer, resolve_dtype, resolve_model

log = logging.getLogger(__name__)


def world_mesh(device: torch.device | str) -> DeviceMesh:
    """A one-dimensional mesh over every process of the run, of `device`'s type. An explicit CPU mesh keeps a
    gloo run on the CPU on a machine that also has a GPU."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sharding needs the processes of a distributed run (e.g. --trainer.devices 2)")
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


class Lockstep:
    """Matches the forward calls of a sharded model across processes (see the module's docstring).

    Installed by `load_sharded` as `model.destein_lockstep`; `drain(model)` is the way to use it.
    """

    def __init__(self, model: nn.Module, mesh: DeviceMesh, device: torch.device, pad_token_id: int) -> None:
        self.model, self.group, self.device = model, mesh.get_group(), device
        self.pad_token_id = pad_token_id
        self.draining = False
        # First among the pre-forward hooks, so the vote comes before the root's parameter all-gather.
        model.register_forward_pre_hook(self._before_call, prepend=True)

    def _vote(self, calling: bool) -> int:
        votes = torch.tensor([int(calling)], device=self.device)
        dist.all_reduce(votes, group=self.group)
        return int(votes.item())

    def _before_call(self, module: nn.Module, args: Any) -> None:
        if not self.draining:
            self._vote(True)

    @torch.no_grad()
    def drain(self) -> int:
        """Make empty calls while another process makes real ones; returns how many were made."""
        calls = 0
        self.draining = True
        try:
            while self._vote(False):
                ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=self.device)
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                calls += 1
        finally:
            self.draining = False
        return calls


def drain(model: nn.Module | None) -> int:
    """Let a sharded model's other processes finish their forward calls (a no-op for a model that is not
    sharded)."""
    lockstep = getattr(model, "destein_lockstep", None)
    return 0 if lockstep is None else lockstep.drain()


def _from_rank0(value: Any, group: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, group_src=0, group=group)
    return box[0]


def load_sharded(
    name_or_path: str | os.PathLike,
    mesh: DeviceMesh,
    device: torch.device | str,
    dtype: str | torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM sharded over `mesh` (each decoder layer an FSDP2 unit), on this process's `device`.

    Only process 0 holds the whole model, on the CPU, while loading; the others never do. `reshard_after_forward`
    frees each layer's gathered parameters after its forward pass: what makes a model larger than one device fit
    (False keeps them gathered after the first pass: faster, but the whole model on every device).
    """
    device = torch.device(device)
    group = mesh.get_group()
    rank = mesh.get_local_rank()
    source, extra, config = resolve_model(name_or_path)
    if rank == 0:
        full, tokenizer = load_base_model(name_or_path, dtype=dtype)
        state = full.state_dict()
    else:
        full, tokenizer, state = None, load_tokenizer(source, extra), {}
    torch_dtype = _from_rank0(None if full is None else full.dtype, group)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(torch_dtype))
    model.eval()
    model.requires_grad_(False)
    for layer in architecture_for(config).layer_modules(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    model.to_empty(device=device)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers outside the state dict (e.g. rotary frequencies) were computed at construction, not stored.
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in persistent:
            if full is not None:
                buffer.copy_(full.get_buffer(name))
            dist.broadcast(buffer, group_src=0, group=group)
    model.generation_config = _from_rank0(None if full is None else full.generation_config, group)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.destein_source = os.fspath(name_or_path)
    model.destein_lockstep = Lockstep(model, mesh, device, tokenizer.pad_token_id)
    del full, state
    log.info("%s sharded over %d processes (this one holds 1/%d of each layer)", os.fspath(name_or_path),
             mesh.size(), mesh.size())
    return model, tokenizer
