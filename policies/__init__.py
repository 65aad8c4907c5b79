"""Unlearning policies as pure functions on logits, token ids and embeddings.

Nothing here knows about HTTP or a particular engine, so the local engine, the reference worker, the vLLM
plugin and the benchmarks all share one implementation: ``eco`` (corrupted prompt embeddings), ``guard``
(forbidden tokens and phrases at decoding time), ``uld`` (logit difference with an assistant), ``refuse``,
``output_guard`` (checks generated text) and ``vllm_plugin`` (GUARD as a vLLM Model Runner V2 processor).
"""

from policies.processors import BadWords, LogitBias, LogitsProcessor, apply_processors

__all__ = ["BadWords", "LogitBias", "LogitsProcessor", "apply_processors"]
