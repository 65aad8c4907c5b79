"""The GUARD vLLM plugin: its slot/row mapping on real tensors, and its registration inside vLLM where it imports.

vLLM cannot be imported here (CUDA-only wheel, VLLM.md §4), so the adapter is driven with plain objects that
carry exactly the fields of vLLM 0.33's ``LogitsProcRequestState`` / ``LogitsContext`` it reads; the registration
test runs only where vLLM imports.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from policies.guard import apply_guard, compile_tables, history_window
from policies.vllm_plugin import VLLM_AVAILABLE, GuardLogitsProcessor

VOCAB = 20


def _req_states(histories: dict[int, tuple[list[int], list[int]]], slots: int = 4):
    """Slots -> (prompt ids, output ids), laid out like vLLM's per-slot token buffers."""
    width = 32
    all_ids = torch.zeros((slots, width), dtype=torch.int32)
    prompt_len = torch.zeros(slots, dtype=torch.int32)
    total_len = torch.zeros(slots, dtype=torch.int32)
    for slot, (prompt, output) in histories.items():
        ids = prompt + output
        all_ids[slot, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        prompt_len[slot], total_len[slot] = len(prompt), len(ids)
    return SimpleNamespace(device=torch.device("cpu"), max_num_reqs=slots, vocab_size=VOCAB,
                           all_token_ids=SimpleNamespace(gpu=all_ids), prompt_len=SimpleNamespace(gpu=prompt_len),
                           total_len=SimpleNamespace(gpu=total_len))


def _params(**xargs):
    return SimpleNamespace(extra_args=xargs)


def test_adapter_applies_guard_only_to_its_rows(tmp_path, monkeypatch):
    table = {"t": {"tokens": [4], "phrases": [[1, 2, 3]], "mode": "hard"}}
    (tmp_path / "guard.json").write_text(json.dumps({"targets": table}))
    monkeypatch.setenv("UNLEARN_GUARD_TABLE", str(tmp_path / "guard.json"))
    states = _req_states({0: ([1, 2], [5, 1]), 1: ([9], [1]), 2: ([7], [1, 2])})
    processor = GuardLogitsProcessor(SimpleNamespace(speculative_config=None), states)
    assert processor.add_request(0, _params(guard_target="t")) is True
    assert processor.add_request(1, _params(other=1)) is False  # no guard_* keys: a no-op
    assert processor.add_request(2, _params(guard_tokens="6,7", guard_phrases=["1,2,3"], guard_mode="soft",
                                            guard_penalty=2.0)) is True
    rows = torch.tensor([2, 0, 1])  # rows are not slots: vLLM reorders them every step
    ctx = SimpleNamespace(expanded_idx_mapping=rows, idx_mapping_np=np.array([2, 0, 1]))
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    out = processor.apply(logits.clone(), ctx)
    t_hard = compile_tables(VOCAB, [4], [[1, 2, 3]])
    t_soft = compile_tables(VOCAB, [6, 7], [[1, 2, 3]], 2.0, 5.0, 2.0)
    expect_slot0 = apply_guard(logits[1:2].clone(), torch.tensor([history_window([5, 1], t_hard.window)]), t_hard)
    expect_slot2 = apply_guard(logits[0:1].clone(), torch.tensor([history_window([1, 2], t_soft.window)]), t_soft)
    assert torch.equal(out[1], expect_slot0[0]) and out[1, 2] == -math.inf and out[1, 4] == -math.inf
    assert torch.equal(out[0], expect_slot2[0]) and out[0, 3] == logits[0, 3] - 2.0
    assert torch.equal(out[2], logits[2])  # the request without GUARD is untouched
    # The prompt never counts as history: slot 1's prompt ends nowhere near a phrase; slot 0's prompt [1, 2]
    # would have blocked 3 had it counted, but its output [5, 1] only blocks 2.
    assert out[1, 3] == logits[1, 3]
    # A recycled slot is cleared by add_request.
    assert processor.add_request(0, _params()) is False
    untouched = processor.apply(logits[1:2].clone(), SimpleNamespace(expanded_idx_mapping=torch.tensor([0]),
                                                                     idx_mapping_np=np.array([0])))
    assert torch.equal(untouched[0], logits[1])


def test_validate_params_rejects_bad_guard_args(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_GUARD_TABLE", str(tmp_path / "missing-is-fine-without-guard-target.json"))
    GuardLogitsProcessor.validate_params(_params(temperature=1))  # not ours: accepted
    GuardLogitsProcessor.validate_params(_params(guard_tokens="1,2", guard_mode="soft"))
    with pytest.raises(ValueError):
        GuardLogitsProcessor.validate_params(_params(guard_mode="medium"))
    with pytest.raises(ValueError):
        GuardLogitsProcessor.validate_params(_params(guard_tokens="1,x"))
    with pytest.raises(ValueError):
        GuardLogitsProcessor(SimpleNamespace(speculative_config=object()), _req_states({}))


def test_entry_point_is_declared():
    entry_points = importlib.metadata.entry_points(group="vllm.logits_processors")
    ours = [e for e in entry_points if e.name == "unlearn_guard"]
    if not ours:
        pytest.skip("the installed metadata predates the entry point: reinstall with `pip install -e .`")
    assert ours[0].value == "policies.vllm_plugin:GuardLogitsProcessor"


@pytest.mark.skipif(not VLLM_AVAILABLE, reason="vLLM cannot be imported here (0.33's wheel is CUDA-only, VLLM.md §4); "
                                               "the adapter's logic is tested above on plain objects")
def test_registered_as_a_model_runner_v2_processor():
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

    assert issubclass(GuardLogitsProcessor, LogitsProcessor)
