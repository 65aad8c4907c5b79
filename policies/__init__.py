"""Unlearning policies as pure functions on logits, token ids and embeddings.

Nothing here knows about HTTP or a particular engine, so the local engine, the reference worker, the vLLM
plugin and the benchmarks all share one implementation.
"""

from policies.processors import BadWords, LogitBias, LogitsProcessor, apply_processors

__all__ = ["BadWords", "LogitBias", "LogitsProcessor", "apply_processors"]
