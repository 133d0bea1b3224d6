"""`LoRAModelManager`: a worker's adapters (host cache, active slots) and the
per-step mapping of batch rows to adapters.

Two LRU tiers: up to ``max_cpu_loras`` adapters read, checked and sharded for
this rank in host memory (float32), and up to ``max_loras`` of them active: each
in a slot of every layer's stacked A/B (`LayerSlots`), in the model's device
and dtype, usable by a step. The scheduler never puts more
than ``max_loras`` adapters in one step; an adapter a step needs and that is not
active takes the least recently used slot that no pinned adapter and no adapter
of this step holds. A pinned adapter is never evicted from either tier.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from engine.lora.adapter import read_adapter
from engine.lora.config import LoRAConfig
from engine.lora.layers import AdapterWeights, LoRATargets, StepBatch
from engine.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAModelManager:
    """Owns the adapters of one worker (one rank)."""

    def __init__(self, model: nn.Module, config: LoRAConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.step = StepBatch()
        self.targets = LoRATargets(model, self.step)
        self.requests: dict[int, LoRARequest] = {}  # every adapter cached or active
        self.cpu: OrderedDict[int, AdapterWeights] = OrderedDict()
        self.active: OrderedDict[int, int] = OrderedDict()  # adapter id -> its slot
        self.pinned: set[int] = set()
        self.seq_loras: dict[int, LoRARequest] = {}  # live sequence -> its adapter

    # ------------------------------------------------------------------ adapters

    def add(self, request: LoRARequest) -> bool:
        """Read, check and cache `request`'s adapter; False when it already is.
        Raises `LoRAAdapterError` (naming the adapter and field) when it cannot be
        served; nothing changes then."""
        known = self.requests.get(request.int_id)
        if known is not None and known != request:
            raise ValueError(f"LoRA int_id {request.int_id} is already used by adapter "
                             f"{known.name!r} ({known.path})")
        if request.int_id in self.cpu:
            self.cpu.move_to_end(request.int_id)
            return False
        weights = self.targets.bind(read_adapter(request, self.config.max_lora_rank))
        self.cpu[request.int_id] = weights
        self.requests[request.int_id] = request
        self._evict(self.cpu, self.config.max_cpu_loras or self.config.max_loras, keep=())
        return True

    def remove(self, int_id: int) -> bool:
        """Forget an adapter (also unpins it); False when it was not loaded."""
        self.pinned.discard(int_id)
        found = self.cpu.pop(int_id, None) is not None
        slot = self.active.pop(int_id, None)
        if slot is not None:
            self._write_slot(slot, {})
        self.requests.pop(int_id, None)
        return found or slot is not None
        return found

    def pin(self, int_id: int) -> bool:
        """Keep a loaded adapter resident in both tiers until removed."""
        if int_id not in self.cpu and int_id not in self.active:
            raise ValueError(f"LoRA adapter {int_id} is not loaded: add it before pinning it")
        if int_id not in self.pinned and len(self.pinned) >= self.config.max_loras:
            raise ValueError(f"{len(self.pinned)} adapters are pinned already, as many as "
                             f"max_loras={self.config.max_loras}; remove one first")
        self.pinned.add(int_id)
        return True

    def list(self) -> list[int]:
        """Ids of the adapters loaded (cached or active)."""
        return sorted(set(self.cpu) | set(self.active))

    def _evict(self, tier: OrderedDict, capacity: int, keep: Any) -> None:
        for int_id in list(tier):
            if len(tier) <= capacity:
                return
            if int_id not in self.pinned and int_id not in keep:
                del tier[int_id]
                if tier is self.cpu and int_id not in self.active:
                    self.requests.pop(int_id, None)

    def _write_slot(self, slot: int, weights: AdapterWeights) -> None:
        self.targets.write(slot, weights, self.config.max_loras, self.config.max_lora_rank,
                           self.device, self.dtype)

    def _activate(self, request: LoRARequest, in_step: set[int]) -> int:
        """The slot of `request`'s adapter, writing it into a free or the least
        recently used slot when it is not active."""
        slot = self.active.get(request.int_id)
        if slot is not None:
            self.active.move_to_end(request.int_id)
            return slot
        if request.int_id not in self.cpu:  # evicted from the host cache since: read it again
            self.add(request)
        self._evict(self.active, self.config.max_loras - 1, keep=in_step)
        if len(self.active) >= self.config.max_loras:
            raise RuntimeError(f"no free LoRA slot for adapter {request.name!r}: all "
                               f"max_loras={self.config.max_loras} slots are pinned or in use")
        slot = min(set(range(self.config.max_loras)) - set(self.active.values()))
        self._write_slot(slot, self.cpu[request.int_id])
        self.active[request.int_id] = slot
        self.cpu.move_to_end(request.int_id)
        return slot

    # ------------------------------------------------------------------ a step

    def begin_step(self, scheduler_output: Any) -> None:
        """Note the step's new and finished sequences and map the step's rows
        to the active adapters (the layers' hooks read the mapping)."""
        for seq_id in scheduler_output.finished_seq_ids:
            self.seq_loras.pop(seq_id, None)
        for new in scheduler_output.new_seqs:
            request = getattr(new, "lora_request", None)
            if request is not None:
                self.seq_loras[new.seq_id] = request
        runs: dict[int, list[tuple[int, int]]] = {}
        requests: dict[int, LoRARequest] = {}
        row = 0
        for item in scheduler_output.scheduled:
            n = len(item.token_ids)
            request = self.seq_loras.get(item.seq_id)
            if request is not None:
                requests[request.int_id] = request
                spans = runs.setdefault(request.int_id, [])
                if spans and spans[-1][1] == row:
                    spans[-1] = (spans[-1][0], row + n)
                else:
                    spans.append((row, row + n))
            row += n
        if not runs:
            self.step.set(None, [])
            return
        in_step = set(runs)
        slot_of = {int_id: self._activate(requests[int_id], in_step) for int_id in sorted(runs)}
        marks = [-1] * row  # each row's slot, -1: the base model
        groups: list[tuple[int, slice | torch.Tensor]] = []
        for int_id, spans in runs.items():
            slot = slot_of[int_id]
            for start, end in spans:
                marks[start:end] = [slot] * (end - start)
            if len(spans) == 1:
                groups.append((slot, slice(*spans[0])))
            else:
                groups.append((slot, torch.cat([torch.arange(s, e) for s, e in spans])
                               .to(self.device)))
        self.step.set(torch.tensor(marks, dtype=torch.int32), groups)

    def end_step(self) -> None:
        self.step.set(None, [])
