"""The classifier's commands: ``classify``, ``eval classifier`` and ``bench classifier``.

They are plain functions with typer annotations; ``gateway/cli.py`` registers them on its app. Heavy imports
happen inside the functions so that ``unlearn-gateway --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.reports import write_json_report

DEFAULT_DATA = Path("../shared/data")
SUITES = ("tofu", "rwku", "hp")


def _read_targets(path: Path) -> list[Any]:
    from gateway.registry.targets import Target

    text = path.read_text(encoding="utf-8").strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                          if line.strip()]
    return [Target.model_validate(row) for row in rows]


def classify(
    targets: Annotated[Path, typer.Option(help="targets as a JSON array or JSONL (ARCHITECTURE §5)")],
    input: Annotated[Path, typer.Option("--input", help="JSONL: {id, messages} or {id, text} per line")],
    output: Annotated[Path, typer.Option("--output", help="JSONL: {id, flagged, targets, score, stage}")],
    batch: Annotated[int, typer.Option(help="prompts per encoder call")] = 32,
    details: Annotated[bool, typer.Option(help="add per-target scores, spans and timings")] = False,
) -> None:
    """Classify prompts offline against a targets file (no server)."""
    from tqdm import tqdm

    from classifiers.batching import classify_batch
    from classifiers.index import build_index

    index = build_index(_read_targets(targets), progress=sys.stderr.isatty())
    lines = [json.loads(line) for line in input.read_text(encoding="utf-8").splitlines() if line.strip()]
    with output.open("w", encoding="utf-8") as out:
        for k in tqdm(range(0, len(lines), batch), desc="classify", unit="batch", disable=not sys.stderr.isatty()):
            chunk = lines[k:k + batch]
            conversations = [row["messages"] if "messages" in row else row.get("text", "") for row in chunk]
            for row, decision in zip(chunk, classify_batch(index, conversations), strict=True):
                record = decision.line(row.get("id"))
                if details:
                    record |= {k: v for k, v in decision.as_dict().items() if k in ("scores", "spans", "timings_ms")}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    typer.echo(f"classified {len(lines)} prompts against {len(index.entries)} targets -> {output}")


def eval_classifier(
    suite: Annotated[str, typer.Option(help="tofu, rwku, hp or all")] = "all",
    json_out: Annotated[Path, typer.Option("--json", help="report file (a Markdown report and PNGs go beside it)")]
    = Path("eval-classifier.json"),
    data: Annotated[Path, typer.Option(help="benchmark data folder")] = DEFAULT_DATA,
    limit: Annotated[int | None, typer.Option(help="use only the first N targets (smoke runs)")] = None,
    max_items: Annotated[int | None, typer.Option(help="classify at most N prompts per split")] = None,
    fpr: Annotated[float, typer.Option(help="conformal false-positive bound of the learned stage")] = 0.01,
    items: Annotated[Path | None, typer.Option(help="also write every classified prompt as a JSON line: its text, "
                                                    "expected target, decision and top scores (error analysis)")]
    = None,
) -> None:
    """Evaluate the classifier on TOFU, RWKU and Harry Potter following ARCHITECTURE §7."""
    from importlib.metadata import version

    from classifiers.evaluation.report import write_report
    from classifiers.evaluation.runner import run_suite
    from classifiers.index import ClassifierConfig

    names = SUITES if suite == "all" else (suite,)
    if any(n not in SUITES for n in names):
        raise typer.BadParameter(f"unknown suite {suite!r}", param_hint="--suite")
    if not data.is_dir():
        raise typer.BadParameter(f"no benchmark data at {data}", param_hint="--data")
    config = ClassifierConfig(fpr=fpr)
    reports, histograms = [], {}
    with items.open("w", encoding="utf-8") if items else contextlib.nullcontext() as items_out:
        for name in names:
            report, hist = run_suite(name, data, config=config, progress=sys.stderr.isatty(), limit=limit,
                                     max_items=max_items, items_out=items_out)
            reports.append(report)
            histograms[name] = hist
            typer.echo(json.dumps({"suite": name, "goals": report["goals"]}, indent=2))
    payload: dict[str, Any]
    if len(reports) == 1:
        payload = reports[0]
    else:
        payload = {"suite": "all", "metrics": {r["suite"]: r["metrics"] for r in reports},
                   "goals": {r["suite"]: r["goals"] for r in reports},
                   "config": {r["suite"]: r["config"] for r in reports}}
    payload["version"] = version("unlearn-gateway")
    write_json_report(json_out, payload)
    md = write_report(json_out, reports, histograms)
    typer.echo(f"wrote {json_out} and {md}" + (f", every prompt's decision in {items}" if items else ""))


def bench_classifier(
    json_out: Annotated[Path, typer.Option("--json", help="report file")] = Path("bench-classifier.json"),
    large: Annotated[int, typer.Option(help="synthetic targets for the scale test")] = 100_000,
    requests: Annotated[int, typer.Option(help="prompts per latency cell")] = 200,
    concurrency: Annotated[int, typer.Option(help="concurrent callers for the throughput cell")] = 64,
) -> None:
    """Latency (200-token prompt, 10 and many targets), throughput under concurrency, memory at scale."""
    from importlib.metadata import version

    from classifiers.bench import run_bench

    report = run_bench(large=large, requests=requests, concurrency=concurrency, progress=sys.stderr.isatty())
    report["version"] = version("unlearn-gateway")
    write_json_report(json_out, report)
    typer.echo(json.dumps(report["metrics"], indent=2))


def eval_evasion(
    suite: Annotated[str, typer.Option(help="only tofu for now")] = "tofu",
    json_out: Annotated[Path, typer.Option("--json", help="report file (a Markdown report and a PNG go beside it)")]
    = Path("eval-evasion.json"),
    data: Annotated[Path, typer.Option(help="benchmark data folder")] = DEFAULT_DATA,
    limit: Annotated[int | None, typer.Option(help="use only the first N targets (smoke runs)")] = None,
    max_per_target: Annotated[int | None, typer.Option(help="held-back forget questions per target (all 15)")] = None,
    negatives: Annotated[int, typer.Option(help="retain questions wrapped the same way (false-positive rate)")] = 300,
    fpr: Annotated[float, typer.Option(help="conformal false-positive bound of the learned stage")] = 0.01,
) -> None:
    """Recall per evasion wrapper (role play, filler, injection, appended words, split turns, other languages)."""
    from importlib.metadata import version

    from classifiers.evaluation.evasion import run_evasion, write_markdown
    from classifiers.index import ClassifierConfig

    if suite != "tofu":
        raise typer.BadParameter("only 'tofu' is implemented", param_hint="--suite")
    if not (data / "tofu" / "forget10.json").is_file():
        raise typer.BadParameter(f"no TOFU data under {data}", param_hint="--data")
    report = run_evasion(data, limit=limit, max_per_target=max_per_target, n_negatives=negatives,
                         config=ClassifierConfig(fpr=fpr), progress=lambda line: typer.echo(line, err=True))
    report["version"] = version("unlearn-gateway")
    write_json_report(json_out, report)
    md = write_markdown(report, json_out)
    typer.echo(json.dumps(report["metrics"]["summary"], indent=2, ensure_ascii=False))
    typer.echo(f"wrote {json_out} and {md}")
