"""``unlearn-gateway bench policies``: what each policy costs on the local engine, as ratios to plain decoding.

Why ratios in one run: this machine is shared and its speed drifts, so every arm is measured interleaved with
its plain twin, repetition by repetition, and only ratios of medians are compared with the goals:
- GUARD decoding tokens/s >= 0.9x plain with 10,000 forbidden-token entries and 1,000 phrases;
- ULD tokens/s >= 0.7x plain with a quarter-depth assistant (ceil(layers / 4) of the served model's layers);
- ECO time to first token <= 1.1x plain (building the corrupted content parts is inside the timed region).

Both arms of a decoding comparison ban end-of-sequence (the same logit-bias processor) so that they generate the
same number of tokens. The GUARD kernel is also timed alone on larger vocabularies (32k, 152k) with 10,000
*distinct* forbidden tokens, since the demo vocabulary has only 4,096 ids.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gateway import __version__
from gateway.engines.base import GenerationRequest, Message, SamplingParams
from gateway.engines.local import LocalEngine
from gateway.engines.policy import local_kit
from gateway.registry.targets import EcoPolicy
from policies.eco import EcoParams
from policies.guard import GuardProcessor, apply_guard, compile_tables, history_window
from policies.processors import LogitBias
from policies.uld import UldParams

QUESTION = "What genre does Carmen Montenegro write in, and what are her best known books?"
NAME = "Carmen Montenegro"
TTFT_PAIRS = 10  # plain/ECO prefill pairs per repeat


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "p99": _percentile(values, 0.99),
            "mean": statistics.fmean(values)}


async def _timed(engine: LocalEngine, request: GenerationRequest, started: float | None = None) -> dict:
    """Time to first token, per-token gaps after it, tokens generated."""
    started = time.perf_counter() if started is None else started
    stamps = []
    async for delta in engine.generate(request):
        if delta.token_ids:
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    decode = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {"ttft": stamps[0] - started, "gaps": gaps, "tokens_per_s": (len(stamps) - 1) / decode}


def guard_kernel_bench(vocab: int, tokens: int = 10_000, phrases: int = 1_000, steps: int = 300) -> dict:
    """Microseconds per decoding step of ``apply_guard`` alone, one sequence, CPU."""
    rng = random.Random(0)
    table = compile_tables(vocab, rng.sample(range(vocab), min(tokens, vocab)),
                           [[rng.randrange(vocab) for _ in range(rng.randint(2, 6))] for _ in range(phrases)],
                           token_penalty=5.0, first_token_penalty=2.0, continuation_penalty=math.inf)
    logits = torch.randn(1, vocab)
    history = [rng.randrange(vocab) for _ in range(8)]
    times = []
    for step in range(steps):
        row = logits.clone()
        t0 = time.perf_counter()
        apply_guard(row, torch.tensor([history_window(history[-table.window:], table.window)]), table)
        times.append((time.perf_counter() - t0) * 1e6)
        history.append(step % vocab)
    return {"vocab": vocab, "forbidden_tokens": table.n_tokens, "phrases": table.n_phrases,
            "prefix_rows": int(table.next_tokens.shape[0]), "us_per_step": _stats(times[10:])}


def run_policies_bench(repeats: int = 15, tokens: int = 32, model: str = "demo") -> dict:
    engine = LocalEngine(model)
    main = engine.main
    vocab = len(main.tokenizer)
    no_eos = LogitBias({i: -100.0 for i in main.eos_ids})
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0)
    messages = [Message("user", QUESTION)]

    rng = random.Random(1)
    entries = [rng.randrange(vocab) for _ in range(10_000)]  # 10,000 entries over a 4,096-id vocabulary
    phrase_ids = [[rng.randrange(vocab) for _ in range(rng.randint(2, 6))] for _ in range(1_000)]
    guard_tables = compile_tables(vocab, entries, phrase_ids, token_penalty=0.5, first_token_penalty=0.5,
                                  continuation_penalty=math.inf)

    layers = int(main.model.config.num_hidden_layers)
    assistant_layers = max(1, math.ceil(layers / 4))
    kit = local_kit(engine)
    eco_policy = EcoPolicy()  # the registry default (its scope decides how many prompt tokens are corrupted)
    eco = EcoParams.from_policy(eco_policy)

    with tempfile.TemporaryDirectory() as tmp:
        from models.assistant import truncated_model

        assistant_path = Path(tmp) / "assistant"
        truncated_model(main.path, assistant_layers).save_pretrained(assistant_path)
        main.tokenizer.save_pretrained(assistant_path)

        def plain() -> GenerationRequest:
            return GenerationRequest("plain", sampling, messages=messages, logits_processors=[no_eos])

        def guarded() -> GenerationRequest:
            return GenerationRequest("guard", sampling, messages=messages,
                                     logits_processors=[no_eos, GuardProcessor(guard_tables)])

        def uld() -> GenerationRequest:
            return kit.uld_request(plain(), str(assistant_path), UldParams())

        async def measure() -> dict:
            runs: dict[str, list[dict]] = {k: [] for k in ("plain", "guard", "uld", "ttft_plain", "ttft_eco")}
            first = SamplingParams(max_tokens=1, temperature=0.0)
            for request in (plain(), guarded(), uld()):  # warm-up (loads the assistant)
                await _timed(engine, request)
            async def ttft_plain() -> None:
                started = time.perf_counter()
                runs["ttft_plain"].append(await _timed(
                    engine, GenerationRequest("p", first, messages=[Message("user", QUESTION)]), started))

            async def ttft_eco() -> None:
                started = time.perf_counter()  # building the corrupted prompt is part of ECO's cost
                request = kit.eco(GenerationRequest("e", first, messages=[Message("user", QUESTION)]), [NAME], eco,
                                  scope=eco_policy.scope)
                runs["ttft_eco"].append(await _timed(engine, request, started))

            for repeat in range(repeats):
                runs["plain"].append(await _timed(engine, plain()))
                runs["guard"].append(await _timed(engine, guarded()))
                runs["uld"].append(await _timed(engine, uld()))
                # The first prefill after a decoding run is ~2 ms slower (measured: whichever arm came first after
                # the ULD run lost 1.1-1.2x), so an untimed prefill goes first and the two arms swap places.
                await _timed(engine, GenerationRequest("w", first, messages=[Message("user", QUESTION)]))
                for pair in range(TTFT_PAIRS):  # a prefill is short: more samples per repeat steady the median
                    for arm in (ttft_plain, ttft_eco) if (repeat + pair) % 2 == 0 else (ttft_eco, ttft_plain):
                        await arm()
            return runs

        runs = asyncio.run(measure())
        assistant_thread = engine.assistant_overlaps(str(assistant_path))
        asyncio.run(engine.aclose())

    def tps(name: str) -> dict:
        return _stats([r["tokens_per_s"] for r in runs[name]])

    def gaps_ms(name: str) -> dict:
        return _stats([g * 1e3 for r in runs[name] for g in r["gaps"]])

    def ttft_ms(name: str) -> dict:
        return _stats([r["ttft"] * 1e3 for r in runs[name]])

    plain_tps, guard_tps, uld_tps = tps("plain"), tps("guard"), tps("uld")
    metrics = {
        "guard_tokens_per_s_ratio": guard_tps["median"] / plain_tps["median"],
        "uld_tokens_per_s_ratio": uld_tps["median"] / plain_tps["median"],
        "eco_ttft_ratio": ttft_ms("ttft_eco")["median"] / ttft_ms("ttft_plain")["median"],
        "goals": {"guard_tokens_per_s_ratio": ">= 0.9", "uld_tokens_per_s_ratio": ">= 0.7",
                  "eco_ttft_ratio": "<= 1.1"},
        "tokens_per_s": {"plain": plain_tps, "guard": guard_tps, "uld": uld_tps},
        "token_latency_ms": {"plain": gaps_ms("plain"), "guard": gaps_ms("guard"), "uld": gaps_ms("uld")},
        "ttft_ms": {"plain": ttft_ms("ttft_plain"), "eco": ttft_ms("ttft_eco")},
        "guard_kernel": [guard_kernel_bench(v) for v in (vocab, 32_000, 152_064)],
    }
    metrics["goals_met"] = {"guard": metrics["guard_tokens_per_s_ratio"] >= 0.9,
                            "uld": metrics["uld_tokens_per_s_ratio"] >= 0.7,
                            "eco": metrics["eco_ttft_ratio"] <= 1.1}
    return {"bench": "policies", "metrics": metrics, "version": __version__,
            "config": {"model": model, "repeats": repeats, "tokens": tokens, "layers": layers,
                       "assistant_layers": assistant_layers, "assistant_in_own_thread": assistant_thread,
                       "guard_token_entries": len(entries),
                       "guard_distinct_tokens": guard_tables.n_tokens, "guard_phrases": guard_tables.n_phrases,
                       "torch_threads": torch.get_num_threads(), "question": QUESTION}}


__all__ = ["guard_kernel_bench", "run_policies_bench"]
