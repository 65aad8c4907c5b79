"""Train a ULD assistant (``unlearn-gateway train assistant``): the served model's first K layers + LoRA.

Why this shape (ULD, Ji et al. 2024): the assistant shares the served model's tokenizer, embeddings, final norm
and head, so its logits live in the same space and ``z_target + w * z_assistant`` is meaningful; keeping only the
first K layers makes it cheap to run in lock-step. It is trained on the *reversed* objective: remember the
target's facts (NLL) and be uniform on what must be kept (KL(U || p), weight 5.0), so subtracting it removes the
facts and leaves everything else alone.

Training data comes only from what an operator has (ARCHITECTURE §7): the target's facts, its examples (the
questions it should catch), its name, and its keep prompts. Each fact is taught as the answer to (a) the example
question that shares the most words with it and (b) "Tell me about <name>."; keep prompts are paired with the
served model's own greedy answers, on which the assistant learns to be flat.

The result is saved as a merged checkpoint folder (tokenizer included) that ``LocalEngine`` loads by path as a
lock-step assistant and that a reference worker (or vLLM) can serve for the HTTP lock-step path.

Hook for the admin API: ``train_assistant(targets, base_model, out_dir, ..., on_progress=callback)`` is safe to
run in a background thread; ``callback(fraction, message)`` feeds the target's ``policy_status`` ("training"
with progress), and an exception is the "failed" reason. ``assistant_dir(adapters_dir, target_ids)`` names the
folder, so a target with ``policy.adapter`` unset can be looked up by id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evals.rouge import tokens as words_of

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Progress = Callable[[float, str], None]


def default_adapters_dir() -> Path:
    """``UNLEARN_ADAPTERS_DIR``, else ``~/.local/share/unlearn-gateway/adapters``."""
    root = os.environ.get("UNLEARN_ADAPTERS_DIR")
    return Path(root) if root else Path.home() / ".local" / "share" / "unlearn-gateway" / "adapters"


def assistant_dir(adapters_dir: Path, target_ids: Sequence[str]) -> Path:
    """One folder per target (its id) or per group of targets (a short hash of the sorted ids)."""
    ids = sorted(target_ids)
    if len(ids) == 1:
        return adapters_dir / f"uld-{ids[0]}"
    return adapters_dir / f"uld-group-{hashlib.sha256(','.join(ids).encode()).hexdigest()[:12]}"


@dataclass
class AssistantRecipe:
    layers: int = 2
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lr: float = 1e-3
    uniform_weight: float = 5.0
    # ULD trains up to 10 epochs on a 7B model; a 2-layer assistant of the 6-layer demo model has not memorised the
    # facts by then (training NLL 1.27 nats/token, still falling; 0.33 after 30 epochs, 0.13 after 60). Chosen on the
    # TOFU targets' training examples: forget ROUGE-L under ULD 0.264 (30 epochs) -> 0.223 (60), retain twin 0.190.
    epochs: int = 60
    batch_size: int = 16
    seed: int = 0
    max_keep_answer_tokens: int = 64


@dataclass
class AssistantReport:
    path: str
    targets: list[str]
    base_model: str
    layers: int
    forget_examples: int
    keep_examples: int
    epochs: int
    seconds: float
    trainable_parameters: int
    history: list[dict] = field(default_factory=list)


def _overlap(a: str, b: str) -> int:
    return len(set(words_of(a)) & set(words_of(b)))


def forget_pairs(targets) -> list[tuple[tuple[str, ...], str]]:
    """(prompts, fact): each fact is taught under one of its prompts per epoch, drawn at random from a generic
    name prompt and the example question sharing the most words with it (when it shares any)."""
    pairs = []
    for target in targets:
        for fact in target.facts:
            prompts = [f"Tell me about {target.name}."]
            if target.examples:
                best = max(target.examples, key=lambda q: _overlap(q, fact))
                if _overlap(best, fact) > 0:
                    prompts.append(best)
            pairs.append((tuple(prompts), fact))
    return pairs


def truncated_model(base_path: Path, layers: int):
    """The base model cut to its first ``layers`` decoder layers (embeddings, final norm and head kept)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ValueError(f"the assistant needs 1..{total} layers, got {layers}")
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:layers])
    model.config.num_hidden_layers = layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def _encode(tokenizer, prompt: str, answer: str, max_answer: int | None = None) -> tuple[list[int], int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if max_answer is not None:
        answer_ids = answer_ids[:max_answer]
    return prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)


def _batch(encoded: list[tuple[list[int], int]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    answer = torch.zeros((len(encoded), width), dtype=torch.bool)  # positions whose *next* token is answer
    for row, (ids, prompt_len) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        answer[row, prompt_len - 1 : len(ids) - 1] = True
    return input_ids, mask, answer


def _losses(model, batch, uniform: bool):
    """Mean NLL of the answer tokens, or mean KL(Uniform || p) over the answer positions."""
    import torch

    input_ids, mask, answer = batch
    logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if uniform:
        vocab = logprobs.shape[-1]
        kl = -math.log(vocab) - logprobs.mean(dim=-1)  # KL(U || p) per position
        return kl[answer].mean()
    targets = input_ids[:, 1:]
    nll = -logprobs[:, :-1].gather(-1, targets[..., None])[..., 0]
    return nll[answer[:, :-1]].mean()


def train_assistant(targets, base_model: str, out_dir: Path, recipe: AssistantRecipe | None = None,
                    keep_prompts: Sequence[str] | None = None, on_progress: Progress | None = None,
                    progress_bar: bool = True, threads: int = 0) -> AssistantReport:
    """Train and save a merged assistant for ``targets`` (one target or a group) on ``base_model``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoTokenizer, GenerationConfig

    from models import resolve_model_path
    from models.build import greedy_answers

    recipe = recipe or AssistantRecipe()
    started = time.time()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    report_progress = on_progress or (lambda fraction, message: None)
    base_path = resolve_model_path(base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    report_progress(0.0, "answering keep prompts with the served model")
    keep = list(keep_prompts) if keep_prompts is not None else [q for t in targets for q in t.keep]
    keep_answers: list[str] = []
    if keep:
        from transformers import AutoModelForCausalLM

        served = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        keep_answers = greedy_answers(served, tokenizer, keep, max_new_tokens=recipe.max_keep_answer_tokens)
        del served
    pairs = forget_pairs(targets)
    encoded = [[_encode(tokenizer, p, fact) for p in prompts] for prompts, fact in pairs]
    uniform = [_encode(tokenizer, q, a, recipe.max_keep_answer_tokens) for q, a in zip(keep, keep_answers)]
    if not encoded:
        raise ValueError("the targets have no facts to train the assistant on")

    model = truncated_model(base_path, recipe.layers)
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=0.01)
    steps_per_epoch = math.ceil(len(encoded) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    warmup = max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    history: list[dict] = []
    bar = tqdm(total=total, desc="ULD assistant", unit="step", disable=not progress_bar)
    model.train()
    step = 0
    for epoch in range(1, recipe.epochs + 1):
        forget = [rng.choice(options) for options in encoded]
        rng.shuffle(forget)
        sums = {"forget_nll": 0.0, "uniform_kl": 0.0}
        for start in range(0, len(forget), recipe.batch_size):
            loss_f = _losses(model, _batch(forget[start:start + recipe.batch_size], pad), uniform=False)
            loss = loss_f
            if uniform:
                chunk = rng.sample(uniform, min(recipe.batch_size, len(uniform)))
                loss_u = _losses(model, _batch(chunk, pad), uniform=True)
                loss = loss + recipe.uniform_weight * loss_u
                sums["uniform_kl"] += loss_u.item()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums["forget_nll"] += loss_f.item()
            step += 1
            bar.update(1)
            report_progress(step / total, f"epoch {epoch}/{recipe.epochs}")
        entry = {"epoch": epoch, **{k: round(v / steps_per_epoch, 4) for k, v in sums.items()},
                 "seconds": round(time.time() - started, 1)}
        history.append(entry)
        bar.set_postfix(nll=entry["forget_nll"], kl=entry["uniform_kl"])
    bar.close()

    merged = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    generation = base_path / "generation_config.json"
    if generation.is_file():
        GenerationConfig.from_pretrained(base_path).save_pretrained(out_dir)
    report = AssistantReport(str(out_dir), [t.id for t in targets], str(base_model), recipe.layers, len(encoded),
                             len(uniform), recipe.epochs, round(time.time() - started, 1), trainable, history)
    (out_dir / "assistant.json").write_text(json.dumps({"report": asdict(report), "recipe": asdict(recipe)},
                                                       indent=2) + "\n")
    report_progress(1.0, "ready")
    return report


__all__ = ["AssistantRecipe", "AssistantReport", "assistant_dir", "default_adapters_dir", "forget_pairs",
           "train_assistant", "truncated_model"]
