"""Turn a plain ``GenerationRequest`` into one that carries a policy, for either engine.

Why a separate module: the policy math lives in ``policies/`` (pure), the engines only know generic hooks
(embedding content parts, logits processors, a lock-step assistant, ``extra_body``). This is the small glue that
maps one onto the other, so the HTTP handler, the leakage evaluation and the benchmarks build policy requests the
same way. It does not decide *which* policy applies (that is the request path's job, after classification).

- ECO -> ``EmbedsPart`` content parts in the flagged messages (both engines; vLLM sends them as ``prompt_embeds``).
- GUARD -> a ``GuardProcessor`` (local) or flat ``vllm_xargs`` for our plugin / the reference worker (vLLM).
- ULD -> ``Assistant(model, combine, params)``: the local engine steps the assistant model beside the served one
  and calls ``combine``; the vLLM engine decodes in lock-step against an assistant worker with ``params``
  (``gateway.engines.lockstep.LockstepULD``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gateway.engines.base import Assistant, EmbedsPart, GenerationRequest, Message
from policies.eco import EcoParams, EmbedLookup, OffsetTokenizer, Span, corrupted_content, name_spans
from policies.guard import GuardBuilder, GuardParams, GuardProcessor, SentenceEncode, VocabEmbeddings
from policies.uld import UldParams, combiner

if TYPE_CHECKING:
    from classifiers.encoder import Encoder


def message_text(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(p for p in message.content if isinstance(p, str))


def last_user_text(messages: Sequence[Message]) -> str:
    return next((message_text(m) for m in reversed(messages) if m.role == "user"), "")


@dataclass
class PolicyKit:
    """What applying policies on one served model needs: its tokenizer, embedding rows and GUARD state."""

    tokenizer: OffsetTokenizer
    embed: EmbedLookup
    guard: GuardBuilder

    # -- ECO ---------------------------------------------------------------------------------------------------
    def eco(self, request: GenerationRequest, names: Iterable[str], params: EcoParams,
            spans: dict[int, list[Span]] | None = None, scope: str = "entity") -> GenerationRequest:
        """Corrupt the flagged spans of every user message (``spans`` by message index, else occurrences of
        ``names``); with no span anywhere, every token but the last of the last user message (ECO's rule for
        prompts without entities). ``scope="prompt"``: every token but the last of the last user message and of
        every user message with a span, so a name given in an earlier turn is blinded too."""
        if request.messages is None:
            raise ValueError("ECO applies to chat requests")
        messages = list(request.messages)
        found = {i: (spans or {}).get(i) or name_spans(message_text(m), list(names))
                 for i, m in enumerate(messages) if m.role == "user" and isinstance(m.content, str)}
        last = max(found, default=None)
        if last is None:
            return request
        if scope == "prompt":
            found = {i: [] for i, flagged in found.items() if flagged or i == last}
        else:  # only messages with spans; an empty span list would mean "every token" to corrupted_content
            found = {i: flagged for i, flagged in found.items() if flagged} or {last: []}
        out = []
        for i, message in enumerate(messages):
            if i in found:
                parts = corrupted_content(message_text(message), found[i], self.tokenizer, self.embed, params)
                out.append(Message(message.role, parts if any(isinstance(p, EmbedsPart) for p in parts)
                                   else message.content))
            else:
                out.append(message)
        return replace(request, messages=out)

    # -- GUARD -------------------------------------------------------------------------------------------------
    # ``generic``: the words too common across the active targets' facts to forbid (``generic_words``); None =
    # the builder's own set.
    def guard_processor_request(self, request: GenerationRequest, facts_by_target: Sequence[Sequence[str]],
                                params: GuardParams, generic: frozenset[str] | None = None) -> GenerationRequest:
        prompt = last_user_text(request.messages or []) if request.messages is not None else (request.prompt or "")
        return _with_processor(request, self.guard.processor(prompt, facts_by_target, params, generic))

    def guard_xargs_request(self, request: GenerationRequest, facts_by_target: Sequence[Sequence[str]],
                            params: GuardParams, generic: frozenset[str] | None = None) -> GenerationRequest:
        prompt = last_user_text(request.messages or []) if request.messages is not None else (request.prompt or "")
        return _with_xargs(request, self.guard.xargs(prompt, facts_by_target, params, generic))

    def forbid_names_request(self, request: GenerationRequest, names: Sequence[str], params: GuardParams,
                             generic: frozenset[str] | None = None, *, xargs: bool) -> GenerationRequest:
        """Forbid ``names`` alone (a cached, prompt-independent GUARD set): as ``vllm_xargs`` or a processor."""
        if xargs:
            return _with_xargs(request, self.guard.names_xargs(names, params, generic))
        processor = GuardProcessor(self.guard.names_tables(names, params, generic), params.include_prompt)
        return _with_processor(request, processor)

    # -- ULD ---------------------------------------------------------------------------------------------------
    @staticmethod
    def uld_request(request: GenerationRequest, assistant_model: str, params: UldParams) -> GenerationRequest:
        return replace(request, assistant=Assistant(assistant_model, combiner(params), params))


def _with_processor(request: GenerationRequest, processor) -> GenerationRequest:
    return replace(request, logits_processors=[*request.logits_processors, processor])


def _with_xargs(request: GenerationRequest, xargs: dict) -> GenerationRequest:
    """``xargs`` added to the request's ``vllm_xargs`` (a GUARD set beside others: ECO's names, say)."""
    extra = dict(request.extra_body)
    extra["vllm_xargs"] = {**extra.get("vllm_xargs", {}), **xargs}
    return replace(request, extra_body=extra)


def sentence_rows(load: Callable[[], Encoder]) -> SentenceEncode:
    """The classifier's sentence encoder (``load()``, called per use: pass a loader that caches) as the unit-row
    tensors GUARD's fact retrieval and semantic neighbours, and the output guard, take."""
    import torch

    def encode(texts: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(load().encode(list(texts)))

    return encode


def _guard_builder(tokenizer, encoder: Callable[[], Encoder] | None, generic: frozenset[str]) -> GuardBuilder:
    """GUARD's state for one served model. ``encoder`` (a loader of the classifier's encoder) enables fact
    retrieval and semantic neighbours; their vocabulary table is cached on disk per tokenizer and encoder, so
    only a machine's first worker process embeds the vocabulary (a minute for a 150k-token one)."""
    if encoder is None:
        return GuardBuilder(tokenizer, None, generic)

    def vocabulary() -> VocabEmbeddings:
        import hashlib

        import torch

        from classifiers.encoder import cached_array

        ids, texts = VocabEmbeddings.words(tokenizer)
        key = hashlib.sha1("\n".join([encoder().name, *texts]).encode()).hexdigest()[:16]
        matrix = cached_array(f"guard-vocab-{key}.npy", lambda: encoder().encode(texts))
        return VocabEmbeddings(torch.tensor(ids, dtype=torch.long), torch.from_numpy(matrix))

    return GuardBuilder(tokenizer, sentence_rows(encoder), generic, vocabulary)


def local_kit(engine, encoder: Callable[[], Encoder] | None = None, generic: frozenset[str] = frozenset()) -> PolicyKit:
    """A ``PolicyKit`` over a ``LocalEngine``'s model (embedding rows straight from its embedding module)."""
    import torch

    model = engine.main
    weight = model.model.get_input_embeddings().weight

    def embed(ids: Sequence[int]) -> torch.Tensor:
        return weight.detach()[torch.tensor(list(ids), device=weight.device)].float().cpu()

    return PolicyKit(model.tokenizer, embed, _guard_builder(model.tokenizer, encoder, generic))


def checkpoint_kit(checkpoint, encoder: Callable[[], Encoder] | None = None,
                   generic: frozenset[str] = frozenset()) -> PolicyKit:
    """A ``PolicyKit`` from checkpoint files only (the gateway in front of vLLM holds no model)."""
    from transformers import AutoTokenizer

    from gateway.engines.embeddings import EmbeddingTable
    from models import resolve_model_path

    path = resolve_model_path(str(checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return PolicyKit(tokenizer, EmbeddingTable(path), _guard_builder(tokenizer, encoder, generic))


__all__ = ["PolicyKit", "checkpoint_kit", "last_user_text", "local_kit", "message_text", "sentence_rows"]
