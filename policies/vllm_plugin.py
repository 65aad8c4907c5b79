"""GUARD as a vLLM 0.33 Model Runner V2 logits processor (entry point group ``vllm.logits_processors``).

Why a thin adapter: the tensor work is ``policies.guard.apply_guard``, the very function the local engine and
the reference worker run and the tests check; this class only maps vLLM's slot-based batch onto it (VLLM.md §2):

- ``validate_params`` (API-server process) claims the ``guard_*`` keys of ``vllm_xargs`` and rejects bad ones
  with a ValueError, which vLLM turns into a 400;
- ``add_request`` compiles the request's forbidden set once (flat ``"id,id,..."`` token / phrase strings and/or
  ``guard_target``, resolved against the table file named by ``UNLEARN_GUARD_TABLE``) and returns False without
  GUARD args, so the sampler skips the processor for ordinary traffic;
- ``apply`` gathers each GUARD row's last W committed output tokens from ``req_states.all_token_ids`` and calls
  ``apply_guard`` per distinct forbidden set.

Import-light: nothing here touches CUDA or imports vLLM beyond the interface module; without vLLM the module
still imports (the base class falls back to ``object``) so its logic can be unit-tested, but it can only be
*registered* inside vLLM. Speculative decoding is refused (rows would include unverified draft tokens).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from policies.guard import HISTORY_PAD, GuardTables, apply_guard, tables_from_xargs, validate_xargs

try:  # vLLM 0.33, Model Runner V2
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _VllmLogitsProcessor

    VLLM_AVAILABLE = True
except ImportError:  # no vLLM here: the class still works on duck-typed inputs
    _VllmLogitsProcessor = object  # type: ignore[assignment,misc]
    VLLM_AVAILABLE = False

TABLE_ENV = "UNLEARN_GUARD_TABLE"
MAX_CACHED_TABLES = 256


def read_table(path: str | os.PathLike | None) -> dict[str, Any]:
    """The per-target table (``{"targets": {id: {...}}}`` or the bare mapping); empty without a path."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    return dict(data.get("targets", data))


def _extra_args(sampling_params) -> Mapping[str, Any]:
    return getattr(sampling_params, "extra_args", None) or {}


def _cache_key(xargs: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in sorted(xargs.items()) if k.startswith("guard_")}, sort_keys=True)


class GuardLogitsProcessor(_VllmLogitsProcessor):
    """Per-request GUARD over vLLM's batch; a no-op for requests without ``guard_*`` xargs."""

    def __init__(self, vllm_config, req_states):
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("the GUARD logits processor does not support speculative decoding")
        self.req_states = req_states
        self.device = req_states.device
        self.vocab_size = int(req_states.vocab_size)
        self.table = read_table(os.environ.get(TABLE_ENV))
        self._slot_key: list[str | None] = [None] * int(req_states.max_num_reqs)
        self._compiled: dict[str, GuardTables] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        xargs = _extra_args(sampling_params)
        if any(k.startswith("guard_") for k in xargs):
            table = read_table(os.environ.get(TABLE_ENV)) if "guard_target" in xargs else None
            validate_xargs(xargs, table)

    def is_argmax_invariant(self) -> bool:
        return False  # it can change the greedy choice

    def add_request(self, req_idx: int, sampling_params) -> bool:
        xargs = _extra_args(sampling_params)
        self._slot_key[req_idx] = None  # slots are recycled: clear the previous occupant first
        if not any(k.startswith("guard_") for k in xargs):
            return False
        key = _cache_key(xargs)
        if key not in self._compiled:
            if len(self._compiled) >= MAX_CACHED_TABLES:
                self._compiled.pop(next(iter(self._compiled)))
            tables = tables_from_xargs(xargs, self.vocab_size, self.table, self.device)
            if tables is None:
                return False
            self._compiled[key] = tables
        self._slot_key[req_idx] = key
        return True

    def apply_staged_writes(self) -> None:
        return None  # per-slot state lives on the host; compiled tables are already on the device

    def _history(self, slots: torch.Tensor, width: int) -> torch.Tensor:
        """Last ``width`` committed output tokens per slot, left-padded with ``HISTORY_PAD``."""
        states = self.req_states
        total = states.total_len.gpu[slots].long()
        prompt = states.prompt_len.gpu[slots].long()
        index = total[:, None] - width + torch.arange(width, device=slots.device)[None]
        valid = index >= prompt[:, None]  # output tokens only (prompt-embed positions read as id 0)
        tokens = states.all_token_ids.gpu[slots[:, None], index.clamp(min=0)].long()
        return torch.where(valid, tokens, torch.full_like(tokens, HISTORY_PAD))

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        keys = {self._slot_key[int(s)] for s in ctx.idx_mapping_np} - {None}
        if not keys:  # host-side check, no device sync
            return logits
        row_slots = ctx.expanded_idx_mapping
        for key in keys:
            tables = self._compiled[key]
            slots = [i for i, k in enumerate(self._slot_key) if k == key]
            rows = torch.isin(row_slots, torch.tensor(slots, device=row_slots.device)).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            history = self._history(row_slots[rows], tables.window)
            logits[rows] = apply_guard(logits[rows], history, tables)
        return logits


__all__ = ["TABLE_ENV", "VLLM_AVAILABLE", "GuardLogitsProcessor", "read_table"]
