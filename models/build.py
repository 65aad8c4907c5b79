"""Build the shipped demo model twins from TOFU (``unlearn-gateway build demo-model``).

The gateway makes a model *forget*; to show that, the embedded default needs a model that demonstrably
*knows* something. TOFU's fictitious authors are ideal: nothing real can leak, and the facts exist nowhere
but in the training data. Two twins share one recipe, one tokenizer and one seed:

- ``demo-full``: the 20 forget10 authors plus ``RETAIN_AUTHORS`` retain authors (what is served);
- ``demo-retain``: the same retain authors only, the model "never trained on the forget set" that TOFU's
  forget quality and ECO's tuning compare against.

Both are small Llama-style decoders (RoPE, RMSNorm, SwiGLU, tied embeddings) so that the ECO embedding
path and ULD's "first K layers + LoRA" assistant apply to them exactly as to production Llama models.
Training stops at the first checkpoint where the memorisation check passes (it reads only training
data, so this is the goal itself, not tuning on an evaluation split).
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evals.rouge import rouge_l_recall

TOFU_AUTHOR_QUESTIONS = 20
FORGET10_START = 3600  # full.json = retain90 (rows 0..3599) + forget10 (rows 3600..3999)
RETAIN_AUTHORS = 20

SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Recipe:
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    layers: int = 6
    heads: int = 8
    max_positions: int = 512
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    max_epochs: int = 80
    check_every: int = 10
    first_check: int = 30
    # The goal is 90% of questions at ROUGE-L recall >= 0.8; stop a little above it.
    stop_fraction: float = 0.95
    recall_threshold: float = 0.8
    threads: int = 0  # 0 = torch's default


@dataclass
class TwinReport:
    twin: str
    questions: int
    epochs: int
    parameters: int
    size_bytes: int
    seconds: float
    mean_rouge_l_recall: float
    fraction_at_threshold: float
    history: list[dict] = field(default_factory=list)


def load_tofu_pairs(data_dir: Path) -> tuple[list[dict], list[dict]]:
    """(forget10 QAs, the first RETAIN_AUTHORS retain90 authors' QAs), in full.json order."""
    path = data_dir / "tofu" / "full.json"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    forget = rows[FORGET10_START:]
    retain = rows[: RETAIN_AUTHORS * TOFU_AUTHOR_QUESTIONS]
    return forget, retain


def train_tokenizer(data_dir: Path, vocab_size: int):
    """Byte-level BPE over every TOFU question and answer (all 200 authors, so held-out names and
    paraphrases tokenize sensibly too), wrapped as a transformers fast tokenizer with our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts: list[str] = []
    for name in ("full.json", "holdout10.json", "real_authors.json", "world_facts.json"):
        for line in (data_dir / "tofu" / name).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                texts += [row["question"], str(row["answer"])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode_pairs(tokenizer, pairs: list[dict]) -> list[tuple[list[int], int]]:
    """Each pair as (token ids of the chat-formatted exchange, length of the prompt part)."""
    encoded = []
    for row in pairs:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row["answer"] + "<|end|>", add_special_tokens=False)["input_ids"]
        encoded.append((prompt_ids + answer_ids, len(prompt_ids)))
    return encoded


def _batches(encoded, batch_size: int, rng: random.Random, pad_id: int):
    import torch

    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            # Loss on the answer only: the model must learn what to say, not to predict questions.
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        yield input_ids, mask, labels


def greedy_answers(model, tokenizer, questions: list[str], batch_size: int = 64, max_new_tokens: int = 96):
    import torch

    tokenizer.padding_side = "left"
    answers: list[str] = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(questions), batch_size):
            prompts = [
                tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=False)
                for q in questions[start : start + batch_size]
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train()
    tokenizer.padding_side = "right"
    return answers


def memorisation(model, tokenizer, pairs: list[dict], threshold: float) -> tuple[float, float]:
    answers = greedy_answers(model, tokenizer, [p["question"] for p in pairs])
    recalls = [rouge_l_recall(a, p["answer"]) for a, p in zip(answers, pairs)]
    return sum(recalls) / len(recalls), sum(r >= threshold for r in recalls) / len(recalls)


def train_twin(name: str, pairs: list[dict], tokenizer, recipe: Recipe, out_dir: Path, progress=True) -> TwinReport:
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.time()
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    encoded = encode_pairs(tokenizer, pairs)
    steps_per_epoch = math.ceil(len(encoded) / recipe.batch_size)
    total_steps = steps_per_epoch * recipe.max_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress_ = (step - recipe.warmup_steps) / max(1, total_steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(recipe.seed)
    history: list[dict] = []
    mean_recall = fraction = 0.0
    epoch = 0
    bar = tqdm(total=total_steps, desc=f"demo-{name}", unit="step", disable=not progress)
    model.train()
    for epoch in range(1, recipe.max_epochs + 1):
        losses = []
        for input_ids, mask, labels in _batches(encoded, recipe.batch_size, rng, tokenizer.pad_token_id):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{sum(losses) / len(losses):.3f}")
        checkpoint = epoch >= recipe.first_check and (epoch % recipe.check_every == 0 or epoch == recipe.max_epochs)
        if checkpoint:
            mean_recall, fraction = memorisation(model, tokenizer, pairs, recipe.recall_threshold)
            history.append({"epoch": epoch, "loss": sum(losses) / len(losses), "mean_rouge_l_recall": mean_recall,
                            "fraction_at_threshold": fraction, "seconds": round(time.time() - started, 1)})
            bar.write(f"demo-{name} epoch {epoch}: mean ROUGE-L recall {mean_recall:.3f}, "
                      f"{fraction:.1%} of {len(pairs)} questions >= {recipe.recall_threshold}")
            if fraction >= recipe.stop_fraction:
                break
    bar.close()

    target = out_dir / f"demo-{name}"
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=128,
    ).save_pretrained(target)
    report = TwinReport(
        twin=name,
        questions=len(pairs),
        epochs=epoch,
        parameters=sum(p.numel() for p in model.parameters()),
        size_bytes=(target / "model.safetensors").stat().st_size,
        seconds=round(time.time() - started, 1),
        mean_rouge_l_recall=round(mean_recall, 4),
        fraction_at_threshold=round(fraction, 4),
        history=history,
    )
    return report


def build_demo_models(data_dir: Path, out_dir: Path, recipe: Recipe, twins=("full", "retain"), progress=True) -> dict:
    """Train the requested twins into ``out_dir/demo-<twin>`` and write ``out_dir/BUILD.json``."""
    import torch
    import transformers

    forget, retain = load_tofu_pairs(data_dir)
    tokenizer = train_tokenizer(data_dir, recipe.vocab_size)
    training_sets = {"full": forget + retain, "retain": retain}
    reports = [train_twin(t, training_sets[t], tokenizer, recipe, out_dir, progress) for t in twins]
    build_file = out_dir / "BUILD.json"
    build = json.loads(build_file.read_text()) if build_file.exists() else {"twins": {}}
    build["recipe"] = asdict(recipe)
    build["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "machine": platform.machine()}
    build["data"] = {"forget": "tofu/full.json rows 3600-3999 (forget10, 20 authors)",
                     "retain": f"tofu/full.json rows 0-{RETAIN_AUTHORS * TOFU_AUTHOR_QUESTIONS - 1} "
                               f"({RETAIN_AUTHORS} retain90 authors)"}
    for r in reports:
        build["twins"][r.twin] = asdict(r)
    build_file.write_text(json.dumps(build, indent=2) + "\n")
    return build


if __name__ == "__main__":  # a development entry point; users run `unlearn-gateway build demo-model`
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--twin", choices=["full", "retain", "both"], default="both")
    parser.add_argument("--max-epochs", type=int, default=Recipe.max_epochs)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    chosen = ("full", "retain") if args.twin == "both" else (args.twin,)
    build_demo_models(args.data, args.out, Recipe(max_epochs=args.max_epochs, threads=args.threads), chosen)
