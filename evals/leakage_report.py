"""Markdown report and PNG plots for ``eval leakage`` (written next to the JSON)."""

from __future__ import annotations

from pathlib import Path

ORDER = ("none", "eco", "eco-entity", "guard", "uld", "uld-paper", "retain")
LABELS = {"none": "no policy (full twin)", "eco": "ECO (default: whole prompt)", "eco-entity": "ECO (name spans only)",
          "guard": "GUARD", "uld": "ULD (default: gated)",
          "uld-paper": "ULD (published rule: w -0.8, relative-top filter alone, no gate)",
          "retain": "retain twin (reference)"}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def plots(report: dict, folder: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["metrics"]
    arms = [a for a in ORDER if a in metrics]
    files = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    recall = [metrics[a]["forget_rouge_l_recall"] for a in arms]
    axes[0].bar(arms, recall, color=["#888" if a in ("none", "retain") else "#3a7" for a in arms])
    retain = metrics["retain"]["forget_rouge_l_recall"]
    axes[0].axhspan(retain - 0.05, retain + 0.05, color="#f90", alpha=0.25, label="retain twin ± 0.05")
    axes[0].set_title("Forget answers: ROUGE-L recall of the gold answer")
    axes[0].legend()
    fq = [max(metrics[a]["forget_quality"], 1e-30) for a in arms]
    axes[1].bar(arms, fq, color="#37a")
    axes[1].set_yscale("log")
    axes[1].axhline(report["published_uld"]["forget_quality"], color="red", ls="--", label="ULD published 0.99")
    axes[1].axhline(0.05, color="#999", ls=":", label="p = 0.05")
    axes[1].set_title("TOFU forget quality (KS p-value vs retain twin)")
    axes[1].legend()
    ppl = [metrics[a]["fluency_retain_twin_ppl"].get("median", 0) for a in arms]
    axes[2].bar(arms, ppl, color="#a73")
    axes[2].set_title("Fluency: retain twin's perplexity of outputs (median)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    summary = folder / f"{stem}-summary.png"
    fig.savefig(summary, dpi=110)
    plt.close(fig)
    files.append(summary.name)

    stats = report.get("truth_stats", {})
    if stats:
        import math

        fig, ax = plt.subplots(figsize=(7, 4))
        for arm in arms:
            values = [math.log(v) for v in stats.get(arm, []) if v > 0]
            ax.hist(values, bins=30, histtype="step", label=arm, linewidth=1.5)
        ax.set_xlabel("log truth-ratio statistic  log P(paraphrased) / P(perturbed)")
        ax.set_title("Forget questions: truth-ratio distributions")
        ax.legend()
        fig.tight_layout()
        hist = folder / f"{stem}-truth-ratios.png"
        fig.savefig(hist, dpi=110)
        plt.close(fig)
        files.append(hist.name)
    return files


def write_report(report: dict, markdown: Path, folder: Path) -> None:
    metrics = report["metrics"]
    arms = [a for a in ORDER if a in metrics]
    images = plots(report, folder, markdown.stem)
    cfg = report["config"]
    lines = [
        "# Leakage evaluation: tofu-mini",
        "",
        f"{cfg['targets']} targets (TOFU forget10 authors: name, facts = their 20 answers, examples = their first 5 "
        f"questions). {cfg['forget_questions']} held-out forget questions, {cfg['retain_questions']} retain "
        "questions (authors the demo twins were trained on), greedy decoding, "
        f"{cfg['max_new_tokens']} new tokens at most.",
        "",
        "**Flagging is the ground truth** (forget questions flag their author's target; retain questions are "
        "unflagged): the classifier is measured separately "
        "(`eval classifier`). Gated retain answers are therefore unchanged by construction; the 'as if flagged' "
        "rows serve retain questions *with* the policy.",
        "",
        "| arm | forget ROUGE-L recall | gap to retain twin | within 0.05 | novel-word recall | gold contained | "
        "names another target | truth ratio | forget quality | model utility | fluency ppl (median) | "
        "real words |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        m = metrics[arm]
        lines.append(
            f"| {LABELS[arm]} | {_fmt(m['forget_rouge_l_recall'])} | {_fmt(m['gap_to_retain_twin'])} | "
            f"{_fmt(m['goal_within_0_05_of_retain'])} | {_fmt(m['forget_novel_recall'])} | "
            f"{_fmt(m['forget_gold_contained'])} | {_fmt(m.get('forget_names_other_target'))} | "
            f"{_fmt(m['truth_ratio_forget'])} | {_fmt(m['forget_quality'])} | {_fmt(m['model_utility'])} | "
            f"{_fmt(m['fluency_retain_twin_ppl'].get('median'))} | {_fmt(m.get('fluency_word_validity'))} |")
    lines += ["", "Novel-word recall: the share of the gold answer's content words that the question does not "
                  "already contain (TOFU answers restate their question, which ROUGE-L recall also rewards). "
                  "Names another target: the share of forget answers that write the full name of another of the "
                  "targets (an answer drifting into another forgotten author's memorised answer leaks that one). "
                  "Real words: the share of the answers' words that are English words or words of the question "
                  "(word salad built from sub-word pieces scores low; the retain twin's perplexity also punishes "
                  "fluent text it never saw)."]
    published = report["published_uld"]
    lines += ["", f"ULD as published: forget quality {published['forget_quality']}, model utility "
                  f"{published['model_utility']} ({published['setting']}). Our model utility is the demo model's "
                  "(a 6-layer model never trained on real authors or world facts, so its utility is low for every "
                  "arm; compare arms with each other). Its harmonic mean is pinned near 0 by the real-author and "
                  "world-fact ROUGE-L, which is ~0 for every arm; the JSON has the nine parts, and the retain-split "
                  "parts are the informative ones.", "",
              "Fluency caveat: the retain twin is a 6M-parameter model that memorised its own 400 answers, so its "
              "perplexity mostly measures how *unfamiliar* a text is to it (the perfectly fluent gold-like answers of "
              "the no-policy arm score ~10^4, its own greedy outputs ~2); read it as a relative signal only.", ""]
    lines += ["## Retain answers", "", "| arm | unchanged (ROUGE-L vs no-policy answer), gated | as if flagged | "
              "share >= 0.98 as if flagged | model utility, policy on every request |", "|---|---|---|---|---|"]
    for arm in arms:
        if arm in ("none", "retain"):
            continue
        m = metrics[arm]
        lines.append(f"| {LABELS[arm]} | {_fmt(m.get('retain_unchanged_rouge_l'))} | "
                     f"{_fmt(m.get('retain_unchanged_if_flagged'))} | "
                     f"{_fmt(m.get('retain_unchanged_if_flagged_share_ge_0_98'))} | "
                     f"{_fmt(m.get('model_utility_always_on'))} |")
    lines += ["", "GUARD 'as if flagged': each retain question served with GUARD for its nearest target (sentence "
                  "embeddings). ULD 'as if flagged': the assistant on every request, ULD's own ungated setting.", ""]
    lines += ["## Samples (first forget questions)", ""]
    for arm in arms:
        sample = report["samples"][arm][0]
        lines += [f"- **{LABELS[arm]}**: {sample['output']!r}"]
    if report["samples"].get("none"):
        lines += [f"- gold: {report['samples']['none'][0]['gold']!r}", ""]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in images]
    lines += ["", f"Config: `{ {k: v for k, v in cfg.items() if k not in ('flagging',)} }`", ""]
    markdown.write_text("\n".join(lines) + "\n")


__all__ = ["plots", "write_report"]
