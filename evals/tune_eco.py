"""``unlearn-gateway tune eco --target ID``: choose one target's ECO strength by zeroth-order search.

ECO (Liu et al., NeurIPS 2024) learns the corruption strength offline so that the corrupted model behaves on the
forget set like a model that never learned it. Here, with only what an operator has (ARCHITECTURE §7):
- forget-set behaviour ``f(sigma)``: the served model's greedy answers to the target's ``examples`` with the
  target's own ECO policy (corruption, dims, scope, seed) at strength sigma, scored by ROUGE-L recall against
  each example's answering fact (the fact sharing the most content words with it);
- the reference ``r``: the same score for the ``retain`` model's plain answers to the same examples (the model
  that never saw the target), or a number given with ``--reference``;
- loss ``|f(sigma) - r|``, minimised by the paper's two-point gradient estimate (its ``ZerothOrderOptimizerScalar``:
  ``g = [L(x + eps) - L(x - eps)] / 2 eps``, ``x <- x - lr * g``), on ``x = ln sigma``: useful strengths span
  orders of magnitude (0.1 for some models, 1e6 in the paper's WMDP runs), so steps are multiplicative.

The noise is seeded (the policy's seed, else 0), so ``f`` is a deterministic function of sigma and the two probes
of a step differ only by the strength (common random numbers). The search starts weak (the input embeddings' own
per-dimension scale, unless told otherwise), the best point seen wins, and it stops early once one is within
``tolerance`` of the reference. The result is stored in the target's policy through the
admin API (``PATCH /admin/targets/{id}``), like every other ``targets`` command.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from evals.rouge import rouge_l_recall
from evals.rouge import tokens as words_of
from gateway.engines.base import GenerationRequest, Message, SamplingParams
from gateway.engines.local import LocalEngine
from gateway.engines.policy import PolicyKit
from gateway.registry.targets import EcoPolicy, Target
from policies.eco import EcoParams
from policies.guard import STOPWORDS

Loss = Callable[[float], float]
OnStep = Callable[[dict], None]


@dataclass(frozen=True)
class ZerothOrderConfig:
    """Search settings (in ``x = ln sigma``)."""

    steps: int = 10
    eps: float = 0.5  # probe half-width: sigma * e^(+-0.5)
    max_eps: float = 2.0  # widest probes on a plateau: sigma * e^(+-2)
    lr: float = 4.0  # x <- x - lr * g; the loss is a difference of recalls in [0, 1]
    max_step: float = 1.5  # |dx| per step at most (x4.5 in sigma)
    tolerance: float = 0.02  # stop once a probe's loss is this small
    sigma_min: float = 1e-3
    sigma_max: float = 1e4


@dataclass
class SearchResult:
    sigma: float
    loss: float
    history: list[dict] = field(default_factory=list)
    evaluations: list[tuple[float, float]] = field(default_factory=list)  # every (sigma, loss) computed


def zeroth_order_search(loss: Loss, sigma0: float, config: ZerothOrderConfig, on_step: OnStep | None = None
                        ) -> SearchResult:
    """Minimise ``loss(sigma)`` with two-point gradient estimates in ``ln sigma``; return the best point seen.

    Every probe is a candidate (ties go to the weaker corruption), and so is the last iterate, evaluated once at
    the end. When the estimate changes sign, or the step is shorter than the probes' spread, the probes straddle the
    minimum and their width halves; when it is exactly 0 the probes sit on a plateau (greedy answers, and so the
    score, change in steps) and their width doubles.
    """
    lo, hi = math.log(config.sigma_min), math.log(config.sigma_max)
    x = min(max(math.log(max(sigma0, config.sigma_min)), lo), hi)
    eps = config.eps
    previous = 0.0

    def sigma_at(point: float) -> float:  # exp(ln b) may land a rounding error outside [a, b]
        return min(max(math.exp(point), config.sigma_min), config.sigma_max)

    best = SearchResult(sigma_at(x), math.inf)

    def consider(point: float, value: float) -> None:
        best.evaluations.append((sigma_at(point), value))
        if value < best.loss or (value == best.loss and sigma_at(point) < best.sigma):
            best.sigma, best.loss = sigma_at(point), value

    for step in range(1, config.steps + 1):
        x_plus, x_minus = min(x + eps, hi), max(x - eps, lo)
        l_plus, l_minus = loss(sigma_at(x_plus)), loss(sigma_at(x_minus))
        gradient = (l_plus - l_minus) / (x_plus - x_minus) if x_plus > x_minus else 0.0
        consider(x_minus, l_minus)
        consider(x_plus, l_plus)
        entry = {"step": step, "sigma": sigma_at(x), "sigma_minus": sigma_at(x_minus), "loss_minus": l_minus,
                 "sigma_plus": sigma_at(x_plus), "loss_plus": l_plus, "gradient": gradient,
                 "best_sigma": best.sigma, "best_loss": best.loss}
        best.history.append(entry)
        if on_step is not None:
            on_step(entry)
        if best.loss <= config.tolerance:
            return best
        if gradient == 0:
            eps = min(eps * 2, config.max_eps)  # a plateau (greedy answers change in steps): look further out
        elif gradient * previous < 0 or abs(config.lr * gradient) < eps / 2:
            eps /= 2  # the probes straddle the minimum: look closer
        previous = gradient
        x = min(max(x - max(-config.max_step, min(config.max_step, config.lr * gradient)), lo), hi)
    consider(x, loss(sigma_at(x)))
    return best


def answering_fact(question: str, facts: Sequence[str], names: Sequence[str] = ()) -> str:
    """The fact that shares the most content words with ``question`` (the first one on a tie), not counting the
    target's own names, which most of its facts repeat."""
    ignored = STOPWORDS | {w for name in names for w in words_of(name)}
    asked = {w for w in words_of(question) if w not in ignored}
    return max(facts, key=lambda f: len(asked & set(words_of(f))))


@dataclass
class TuneReport:
    target: str
    scope: str
    corruption: str
    sigma_before: float
    sigma: float
    recall: float  # f(sigma) on the examples
    reference: float
    reference_source: str
    loss: float
    matched: bool
    stored: bool
    examples: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    evaluations: list[tuple[float, float]] = field(default_factory=list)


def examples_recall(engine: LocalEngine, target: Target, gold: Sequence[str], build: Callable[[str], GenerationRequest]
                    ) -> float:
    """Mean ROUGE-L recall of ``engine``'s greedy answers to the target's examples, each against its fact."""

    async def answers() -> list[str]:
        out = []
        for question in target.examples:
            text = ""
            async for delta in engine.generate(build(question)):
                text += delta.text
            out.append(text.strip())
        return out

    return statistics.fmean(rouge_l_recall(a, g) for a, g in zip(asyncio.run(answers()), gold))


class EcoObjective:
    """``f(sigma)``: the served model's score on the target's examples with ECO at strength sigma (memoised)."""

    def __init__(self, engine: LocalEngine, kit: PolicyKit, target: Target, policy: EcoPolicy, max_new_tokens: int):
        self.engine, self.kit, self.target, self.policy = engine, kit, target, policy
        self.sampling = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        self.gold = example_facts(target)
        self._cache: dict[float, float] = {}

    def plain(self, question: str) -> GenerationRequest:
        return GenerationRequest("tune-eco", self.sampling, messages=[Message("user", question)])

    def __call__(self, sigma: float) -> float:
        if sigma not in self._cache:
            params = EcoParams(self.policy.corruption, sigma, self.policy.dims,
                               self.policy.seed if self.policy.seed is not None else 0)
            names = [self.target.name, *self.target.aliases]
            self._cache[sigma] = examples_recall(
                self.engine, self.target, self.gold,
                lambda q: self.kit.eco(self.plain(q), names, params, scope=self.policy.scope))
        return self._cache[sigma]


def example_facts(target: Target) -> list[str]:
    """Each example's answering fact; a target without examples or facts cannot be tuned."""
    if not target.examples:
        raise ValueError(f"target {target.id!r} has no examples to tune on")
    if not target.facts:
        raise ValueError(f"target {target.id!r} has no facts to score answers against")
    return [answering_fact(q, target.facts, [target.name, *target.aliases]) for q in target.examples]


def embedding_scale(engine: LocalEngine) -> float:
    """Per-dimension standard deviation of the served model's input embeddings: noise of this size is a weak
    corruption on any model, so a search started there finds the weakest strength that matches, as ECO's own
    search does by starting small (its sigma0 = 0.1) and raising it."""
    return float(engine.main.model.get_input_embeddings().weight.detach().float().std())


def tune_target(target: Target, engine: LocalEngine, kit: PolicyKit, reference: float, reference_source: str,
                config: ZerothOrderConfig, max_new_tokens: int = 48, on_step: OnStep | None = None,
                sigma0: float | None = None) -> TuneReport:
    """Search sigma for ``target`` (whose policy must be ECO with Gaussian noise) from ``sigma0`` (default: the
    embeddings' scale); nothing is stored here."""
    policy = target.policy
    if not isinstance(policy, EcoPolicy):
        raise ValueError(f"target {target.id!r} has policy {policy.method!r}; tune eco needs an 'eco' policy")
    if policy.corruption != "gaussian":
        raise ValueError(f"target {target.id!r} uses '{policy.corruption}' corruption, which has no sigma")
    started = time.time()
    objective = EcoObjective(engine, kit, target, policy, max_new_tokens)

    start = sigma0 if sigma0 is not None else embedding_scale(engine)
    result = zeroth_order_search(lambda sigma: abs(objective(sigma) - reference), start, config, on_step)
    recall = objective(result.sigma)
    return TuneReport(target.id, policy.scope, policy.corruption, policy.sigma, result.sigma, recall, reference,
                      reference_source, result.loss, result.loss <= config.tolerance, False, len(target.examples),
                      round(time.time() - started, 1), result.history, result.evaluations)


def reference_recall(target: Target, retain_model: str, max_new_tokens: int = 48) -> float:
    """The retain model's plain score on the target's examples."""
    engine = LocalEngine(retain_model)
    sampling = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    try:
        return examples_recall(engine, target, example_facts(target),
                               lambda q: GenerationRequest("tune-eco", sampling, messages=[Message("user", q)]))
    finally:
        asyncio.run(engine.aclose())


def report_dict(report: TuneReport, config: ZerothOrderConfig, model: str) -> dict:
    from gateway import __version__

    metrics = {k: v for k, v in asdict(report).items() if k not in ("history", "evaluations")}
    return {"tune": "eco", "metrics": metrics, "history": report.history,
            "evaluations": [{"sigma": s, "loss": v} for s, v in report.evaluations],
            "config": {"model": model, **asdict(config)}, "version": __version__}


__all__ = ["EcoObjective", "SearchResult", "TuneReport", "ZerothOrderConfig", "answering_fact", "embedding_scale",
           "example_facts", "examples_recall", "reference_recall", "report_dict", "tune_target",
           "zeroth_order_search"]
