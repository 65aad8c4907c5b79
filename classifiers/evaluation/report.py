"""Markdown report with PNG plots next to the JSON report of ``eval classifier``.

Plots (matplotlib, Agg backend, no display needed): recall/FPR per split, recall per RWKU level-3 attack type,
and score histograms (positives: the score of the expected target; negatives: the highest score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(path: Path, title: str, labels: list[str], values: list[float], colors: list[str]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(i, min(v + 0.02, 1.0), f"{v:.3f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _histograms(path: Path, title: str, histograms: dict[str, list[float]], kinds: dict[str, str]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [i / 40 for i in range(41)]
    for name, scores in histograms.items():
        if not scores:
            continue
        style = "-" if kinds.get(name) == "recall" else "--"
        ax.hist(scores, bins=bins, histtype="step", linestyle=style, density=True, label=f"{name} ({kinds[name]})")
    ax.set_yscale("log")
    ax.set_xlabel("score")
    ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(json_path: Path, reports: list[dict[str, Any]], histograms: dict[str, dict[str, list[float]]]) -> Path:
    """Write ``<json stem>.md`` and its PNGs beside the JSON file; return the Markdown path."""
    out_dir = json_path.parent
    stem = json_path.stem
    lines = ["# Classifier evaluation", ""]
    for report in reports:
        suite = report["suite"]
        metrics = report["metrics"]
        kinds = {k: v.get("kind", "") for k, v in metrics.items()}
        cfg = report["config"]
        lines += [f"## {suite}", "", (f"Encoder `{cfg['encoder']}`, {cfg['targets']} targets, search "
                                      f"`{cfg['search']}`, build {cfg['build_seconds']} s, "
                                      f"{cfg['ms_per_prompt_batched']} ms/prompt batched."), "",
                  "| goal | value | bound | met |", "|---|---|---|---|"]
        for key, g in report.get("goals", {}).items():
            lines.append(f"| {key} | {g['value']:.4f} | {g['goal']} | {'yes' if g['met'] else '**no**'} |")
        lines += ["", "| split | n | recall | FPR | stages |", "|---|---|---|---|---|"]
        labels, values, colors = [], [], []
        for name, m in metrics.items():
            recall = m.get("recall")
            fpr = m.get("fpr", m.get("flag_rate"))
            lines.append(f"| {name} | {m['n']} | {'' if recall is None else f'{recall:.4f}'} | "
                         f"{'' if fpr is None else f'{fpr:.4f}'} | {m.get('stages', '')} |")
            if m.get("kind") in ("recall", "fpr", "info"):
                labels.append(name)
                values.append(recall if recall is not None else fpr)
                colors.append("tab:green" if recall is not None else "tab:red")
        if "fpr_excluding_other_targets" in metrics.get("neighbours", {}):
            n = metrics["neighbours"]
            lines += ["", (f"Neighbours: FPR {n['fpr']:.4f} over all {n['n']} probes; "
                           f"{n['fpr_excluding_other_targets']:.4f} over the {n['n_excluding_other_targets']} that "
                           f"name no other active target; {n['fpr_excluding_active_targets']:.4f} over the "
                           f"{n['n_excluding_active_targets']} that neither name nor, with the gold answer in place, "
                           f"ask for an active target; flagged for their own subject: {n['fpr_own_subject']:.4f}.")]
        bars = out_dir / f"{stem}-{suite}-splits.png"
        _bars(bars, f"{suite}: recall (green) / FPR (red) per split", labels, values, colors)
        lines += ["", f"![splits]({bars.name})"]
        for name, m in metrics.items():
            if "by_type" in m:
                types = list(m["by_type"])
                path = out_dir / f"{stem}-{suite}-{name}-types.png"
                _bars(path, f"{suite} {name}: recall per attack type", types,
                      [m["by_type"][t]["recall"] for t in types], ["tab:blue"] * len(types))
                lines += ["", f"| {name} type | n | recall |", "|---|---|---|"]
                lines += [f"| {t} | {m['by_type'][t]['n']} | {m['by_type'][t]['recall']:.4f} |" for t in types]
                lines += ["", f"![types]({path.name})"]
        hist = out_dir / f"{stem}-{suite}-scores.png"
        _histograms(hist, f"{suite}: score distributions", histograms.get(suite, {}), kinds)
        lines += ["", f"![scores]({hist.name})", ""]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
