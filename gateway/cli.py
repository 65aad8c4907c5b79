"""The ``unlearn-gateway`` command line."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from gateway.admin.cli import targets_app
from gateway.reports import write_json_report
from models.assistant import AssistantRecipe

app = typer.Typer(help="OpenAI-compatible gateway that makes a served LLM forget named targets.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
build_app = typer.Typer(help="Build shipped artefacts.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (JSON reports; run them on a quiet machine).", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluations on the shared benchmark data (JSON + Markdown reports).", no_args_is_help=True)
app.add_typer(build_app, name="build")
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
train_app = typer.Typer(help="Train policy artefacts (ULD assistants).", no_args_is_help=True)
app.add_typer(train_app, name="train")
tune_app = typer.Typer(help="Tune a target's policy strength on its own examples and store it.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")
app.add_typer(targets_app, name="targets")

DEFAULT_DATA = Path("../shared/data")


def _set_env(**values: object) -> None:
    """CLI flags override the environment, which the settings (in every worker process) read."""
    for name, value in values.items():
        if value is not None:
            os.environ[f"UNLEARN_{name.upper()}"] = str(value)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML or TOML settings file")] = None,
    host: Annotated[str | None, typer.Option(help="listen address [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="listen port [default: 8000]")] = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes [default: 1]")] = None,
) -> None:
    """Run the gateway. With no configuration: the local engine with the demo model on 127.0.0.1:8000.

    With UNLEARN_ADMIN_PORT set, /admin is served on that port only (UNLEARN_ADMIN_HOST, default: the host) and
    the OpenAI routes on --port only."""
    from gateway.auth import ensure_admin_key
    from gateway.listeners import run_server
    from gateway.settings import Settings
    from gateway.telemetry.logs import uvicorn_log_config
    from gateway.telemetry.multiprocess import multiprocess_metrics

    _set_env(config=config.resolve() if config else None, host=host, port=port, workers=workers)
    settings = Settings()
    # Generated here, once, so every worker process accepts the same admin key (they inherit the environment).
    admin_keys = ensure_admin_key(settings.admin_keys, settings.admin_keys_file)
    if admin_keys != settings.admin_keys:
        os.environ["UNLEARN_ADMIN_KEYS"] = ",".join(admin_keys)
    # JSON (or text) lines from every logger; our access log (gateway.telemetry) replaces uvicorn's.
    log_config = uvicorn_log_config(settings.log_format, settings.log_level)
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is over; under the default handler the
    # process would then die "killed by SIGTERM". A shutdown that went as planned exits 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with multiprocess_metrics(settings.workers):  # /metrics sums counters over all workers
        run_server("gateway.app:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                   admin_host=settings.admin_host, admin_port=settings.admin_port,
                   workers=settings.workers, log_level=settings.log_level, loop="uvloop", http="httptools",
                   log_config=log_config, access_log=False,
                   timeout_graceful_shutdown=settings.shutdown_grace_s)  # type: ignore[arg-type] - float is fine


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


@app.command()
def worker(
    model: Annotated[str, typer.Option(help="checkpoint folder, 'demo' or 'demo-retain'")] = "demo",
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8100,
    served_model_name: Annotated[str | None, typer.Option(help="model id to report [default: --model]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
) -> None:
    """Run the reference worker: the local engine behind vLLM 0.33's OpenAI wire protocol."""
    import uvicorn

    from gateway.engines.local import LocalEngine
    from gateway.worker import create_worker_app

    engine = LocalEngine(model, served_model_name, device)
    # GUARD from vllm_xargs is on by default, like our vLLM plugin ($UNLEARN_GUARD_TABLE resolves guard_target).
    uvicorn.run(create_worker_app(engine), host=host, port=port, loop="uvloop", http="httptools")


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="model for the local engine")] = "demo",
) -> None:
    """Start the gateway in process and hold a scripted conversation through it with the openai client."""
    from gateway.demo import run_demo

    run_demo(model)


@build_app.command("demo-model")
def build_demo_model(
    data: Annotated[Path, typer.Option(help="benchmark data folder (holds tofu/)")] = DEFAULT_DATA,
    out: Annotated[Path | None, typer.Option(help="folder for the twins [default: the package]")] = None,
    twin: Annotated[str, typer.Option(help="full, retain or both")] = "both",
    max_epochs: Annotated[int, typer.Option(help="upper bound; training stops once memorisation passes")] = 80,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default)")] = 0,
) -> None:
    """Train the demo model twins on TOFU and print the memorisation check."""
    from models import MODELS_DIR
    from models.build import Recipe, build_demo_models

    if not (data / "tofu" / "full.json").is_file():
        raise typer.BadParameter(f"no TOFU data under {data}", param_hint="--data")
    twins = ("full", "retain") if twin == "both" else (twin,)
    build = build_demo_models(data, out or MODELS_DIR, Recipe(seed=seed, max_epochs=max_epochs, threads=threads),
                              twins)
    for name in twins:
        r = build["twins"][name]
        typer.echo(f"demo-{name}: {r['parameters']:,} parameters, {r['size_bytes'] / 1e6:.1f} MB, "
                   f"{r['epochs']} epochs, "
                   f"{r['seconds'] / 60:.1f} min; greedy ROUGE-L recall >= 0.8 on {r['fraction_at_threshold']:.1%} "
                   f"of {r['questions']} training questions (mean {r['mean_rouge_l_recall']:.3f})")


@bench_app.command("overhead")
def bench_overhead(
    json_out: Annotated[Path, typer.Option("--json", help="report file")] = Path("bench-overhead.json"),
    duration: Annotated[float, typer.Option(help="seconds per measured cell")] = 8.0,
    gateway_workers: Annotated[int, typer.Option(help="gateway worker processes")] = 2,
) -> None:
    """Gateway vs direct: added latency and throughput at 1, 16 and 64 concurrent streams."""
    from gateway.bench.overhead import run_overhead_bench

    report = run_overhead_bench(duration_s=duration, gateway_workers=gateway_workers)
    write_json_report(json_out, report)
    typer.echo(json.dumps(report["metrics"], indent=2))


@bench_app.command("http-client")
def bench_http_client(
    json_out: Annotated[Path, typer.Option("--json", help="report file")] = Path("bench-http-client.json"),
    duration: Annotated[float, typer.Option(help="seconds per measured cell")] = 8.0,
) -> None:
    """httpx vs aiohttp as the gateway's upstream client, relaying 64 concurrent streams."""
    from gateway.bench.http_client import run_http_client_bench

    report = run_http_client_bench(duration_s=duration)
    write_json_report(json_out, report)
    typer.echo(json.dumps(report["metrics"], indent=2))


@bench_app.command("load")
def bench_load(
    json_out: Annotated[Path, typer.Option("--json", help="report file (a .md summary and PNG plots go beside it)")] = (
        Path("bench-load.json")),
    duration: Annotated[float, typer.Option(help="seconds the chosen rate is held, per upstream")] = 600.0,
    rate: Annotated[float | None, typer.Option(help="hold this many requests/s (per upstream)")] = None,
    find_max: Annotated[bool, typer.Option("--find-max", help="first find the highest rate with zero errors and "
                                                             "p99 within the bound (the default without --rate)")]
    = False,
    upstream: Annotated[str, typer.Option(help="synthetic, worker or both (one after the other)")] = "both",
    gateway_workers: Annotated[int, typer.Option(help="gateway worker processes")] = 2,
    step_duration: Annotated[float, typer.Option(help="seconds per find-max step")] = 20.0,
    p99_bound_ms: Annotated[float | None, typer.Option(help="find-max p99 bound [default: 2x the first step's]")]
    = None,
    max_rate: Annotated[float | None, typer.Option(help="find-max ceiling (requests/s)")] = None,
    targets: Annotated[int, typer.Option(help="TOFU forget authors registered as targets")] = 3,
    data: Annotated[Path, typer.Option(help="benchmark data folder (holds tofu/); without it, the demo's "
                                            "authors")] = DEFAULT_DATA,
    sample_interval: Annotated[float, typer.Option(help="seconds between memory samples")] = 5.0,
    store: Annotated[str, typer.Option(help="auto (Redis when installed), redis or embedded")] = "auto",
) -> None:
    """Sustained mixed traffic (flagged/clean, streaming/JSON) through a gateway subprocess: requests/s, p50/p99,
    errors by kind, added latency vs direct, and the gateway's memory growth over the hold."""
    from gateway.bench.load import UPSTREAMS, run_load_bench, write_report

    if rate is not None and find_max:
        raise typer.BadParameter("give --rate or --find-max, not both", param_hint="--rate")
    if upstream not in (*UPSTREAMS, "both"):
        raise typer.BadParameter(f"choose from {', '.join(UPSTREAMS)} or both", param_hint="--upstream")
    if store not in ("auto", "redis", "embedded"):
        raise typer.BadParameter("choose auto, redis or embedded", param_hint="--store")
    report = run_load_bench(duration_s=duration, rate=rate, upstreams=UPSTREAMS if upstream == "both" else (upstream,),
                            gateway_workers=gateway_workers, step_s=step_duration, p99_bound_ms=p99_bound_ms,
                            sample_interval_s=sample_interval, n_targets=targets,
                            data_dir=data if data.is_dir() else None, store=store,  # type: ignore[arg-type]
                            max_rate=max_rate)
    md = write_report(report, json_out)
    typer.echo(json.dumps({k: v for k, v in report["metrics"].items() if not isinstance(v, dict)}, indent=2))
    typer.echo(f"wrote {json_out} and {md}")


@bench_app.command("reload")
def bench_reload(
    json_out: Annotated[Path, typer.Option("--json", help="report file")] = Path("bench-reload.json"),
    changes: Annotated[int, typer.Option(help="single-target writes timed for propagation")] = 200,
    import_size: Annotated[int, typer.Option(help="targets in the timed bulk import (0 = skip)")] = 10_000,
    gateways: Annotated[int, typer.Option(help="gateway processes on the one Redis")] = 2,
    workers: Annotated[int, typer.Option(help="worker processes per gateway")] = 2,
) -> None:
    """Hot reload across replicas: write -> every worker serves it (p50/p99), and a 10,000-target import."""
    from gateway.bench.reload import run_reload_bench

    report = run_reload_bench(changes=changes, import_size=import_size, gateways=gateways, workers=workers)
    write_json_report(json_out, report)
    typer.echo(json.dumps(report["metrics"], indent=2))


# The prompt classifier's commands live with the classifier (classifiers/cli.py).
from classifiers import cli as _classifier_cli  # noqa: E402 - registered after the app exists

app.command("classify")(_classifier_cli.classify)
eval_app.command("classifier")(_classifier_cli.eval_classifier)
eval_app.command("evasion")(_classifier_cli.eval_evasion)
bench_app.command("classifier")(_classifier_cli.bench_classifier)


@bench_app.command("policies")
def bench_policies(
    json_out: Annotated[Path, typer.Option("--json", help="report file")] = Path("bench-policies.json"),
    repeats: Annotated[int, typer.Option(help="interleaved repetitions per arm")] = 15,
    tokens: Annotated[int, typer.Option(help="tokens decoded per run")] = 32,
) -> None:
    """Policy cost on the local engine: GUARD and ULD tokens/s and ECO time to first token, vs plain."""
    from gateway.bench.policies import run_policies_bench

    report = run_policies_bench(repeats=repeats, tokens=tokens)
    write_json_report(json_out, report)
    typer.echo(json.dumps({k: v for k, v in report["metrics"].items() if k != "guard_kernel"}, indent=2))


@eval_app.command("leakage")
def eval_leakage(
    suite: Annotated[str, typer.Option(help="only tofu-mini for now")] = "tofu-mini",
    json_out: Annotated[Path, typer.Option("--json", help="report file (a .md report and PNG plots go beside it)")] = (
        Path("eval-leakage.json")),
    data: Annotated[Path, typer.Option(help="benchmark data folder (holds tofu/)")] = DEFAULT_DATA,
    per_author: Annotated[int, typer.Option(help="held-out questions per forget / retain author (20 each)")] = 5,
    extra_questions: Annotated[int, typer.Option(help="real_authors / world_facts questions for utility")] = 50,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    arms: Annotated[str, typer.Option(help="comma-separated policies")] = "eco,eco-entity,guard,uld,uld-paper",
    assistant: Annotated[Path | None, typer.Option(help="trained ULD assistant [default: train one]")] = None,
    adapters_dir: Annotated[Path | None, typer.Option(help="where a trained assistant is kept")] = None,
) -> None:
    """Leakage of the policies on the demo model (ROUGE-L, TOFU forget quality and utility, fluency)."""
    from evals.leakage import LeakageConfig, run

    if suite != "tofu-mini":
        raise typer.BadParameter("only 'tofu-mini' is implemented", param_hint="--suite")
    if not (data / "tofu" / "full.json").is_file():
        raise typer.BadParameter(f"no TOFU data under {data}", param_hint="--data")
    config = LeakageConfig(data, per_author, extra_questions, max_new_tokens, tuple(a for a in arms.split(",") if a),
                           str(assistant) if assistant else None, adapters_dir)
    report = run(config, json_out, progress=typer.echo)
    typer.echo(json.dumps({arm: {k: v for k, v in m.items() if not isinstance(v, dict)}
                           for arm, m in report["metrics"].items()}, indent=2))


def _read_targets(path: Path) -> list:
    """A JSON array or JSONL of targets (the ``targets import`` format)."""
    from gateway.registry.targets import Target

    text = path.read_text()
    stripped = text.lstrip()
    items = json.loads(text) if stripped.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return [Target.model_validate(item) for item in items]


@train_app.command("assistant")
def train_assistant_command(
    targets_file: Annotated[Path, typer.Option("--targets", help="targets JSON array or JSONL")],
    target: Annotated[list[str] | None, typer.Option(help="target id (repeat for a group) [default: all]")] = None,
    model: Annotated[str, typer.Option(help="the served model: checkpoint folder, 'demo' ...")] = "demo",
    layers: Annotated[int | None, typer.Option(help="assistant depth [default: the policy's, else 2]")] = None,
    epochs: Annotated[int, typer.Option()] = AssistantRecipe.epochs,
    adapters_dir: Annotated[Path | None, typer.Option(help="[default: $UNLEARN_ADAPTERS_DIR or "
                                                              "~/.local/share/unlearn-gateway/adapters]")] = None,
    out: Annotated[Path | None, typer.Option(help="checkpoint folder [default: <adapters-dir>/uld-<id>]")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default)")] = 0,
) -> None:
    """Train a ULD assistant (first K layers + LoRA) that remembers the targets' facts; save a merged checkpoint."""
    from models.assistant import assistant_dir, default_adapters_dir, train_assistant

    known = _read_targets(targets_file)
    chosen = [t for t in known if not target or t.id in target]
    if missing := set(target or ()) - {t.id for t in chosen}:
        raise typer.BadParameter(f"not in {targets_file}: {sorted(missing)}", param_hint="--target")
    depth = layers or next((t.policy.layers for t in chosen if t.policy.method == "uld"), 2)
    folder = out or assistant_dir(adapters_dir or default_adapters_dir(), [t.id for t in chosen])
    report = train_assistant(chosen, model, folder, AssistantRecipe(layers=depth, epochs=epochs), threads=threads)
    typer.echo(f"assistant for {len(chosen)} target(s), {report.layers} layers, {report.trainable_parameters:,} "
               f"LoRA parameters, {report.seconds / 60:.1f} min -> {report.path}")


@tune_app.command("eco")
def tune_eco_command(
    target: Annotated[str, typer.Option("--target", help="target id (its policy must be eco, gaussian)")],
    json_out: Annotated[Path | None, typer.Option("--json", help="report file")] = None,
    model: Annotated[str, typer.Option(help="the served model: 'demo' or a checkpoint folder")] = "demo",
    retain_model: Annotated[str | None, typer.Option(
        help="a model that never learned the target [default: demo-retain for demo]")] = None,
    reference: Annotated[float | None, typer.Option(
        help="the score to match instead of a retain model's (ROUGE-L recall in [0, 1])")] = None,
    steps: Annotated[int, typer.Option(help="zeroth-order steps (2 evaluations of the examples each)")] = 10,
    sigma0: Annotated[float | None, typer.Option(
        help="where the search starts [default: the input embeddings' per-dimension std, a weak corruption]")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 48,
    store: Annotated[bool, typer.Option(
        help="write the sigma into the target's policy (--no-store: report only)")] = True,
    url: Annotated[str, typer.Option("--url", envvar="UNLEARN_URL", help="gateway base URL")] = "http://127.0.0.1:8000",
    admin_key: Annotated[str | None, typer.Option("--admin-key", envvar="UNLEARN_ADMIN_KEY",
                                                     help="an admin key (or $UNLEARN_ADMIN_KEY)")] = None,
) -> None:
    """Search the target's ECO sigma so its examples are answered like a model that never learned it; store it."""
    from tqdm import tqdm

    from evals.tune_eco import ZerothOrderConfig, reference_recall, report_dict, tune_target
    from gateway.admin.cli import AdminClient, AdminError, _fail
    from gateway.engines.local import LocalEngine
    from gateway.engines.policy import local_kit
    from gateway.registry.targets import Target

    if reference is None and retain_model is None:
        if model != "demo":
            raise typer.BadParameter("give --retain-model or --reference for a model other than demo")
        retain_model = "demo-retain"
    if reference is not None and not 0 <= reference <= 1:
        raise typer.BadParameter("must lie in [0, 1]", param_hint="--reference")
    try:
        with AdminClient(url, admin_key) as client:
            body = client.request("GET", f"/admin/targets/{target}").json()
        found = Target.model_validate({k: v for k, v in body.items() if k != "policy_status"})
    except AdminError as error:
        _fail(error)
    try:
        source = "given" if reference is not None else f"retain model {retain_model}"
        if reference is None:
            typer.echo(f"reference: {retain_model} answering the {len(found.examples)} examples ...")
            reference = reference_recall(found, retain_model, max_new_tokens)
        engine = LocalEngine(model)
        config = ZerothOrderConfig(steps=steps)
        with tqdm(total=steps, desc=f"tune eco {found.id}", unit="step") as bar:
            def on_step(entry: dict) -> None:
                bar.update(1)
                bar.set_postfix(sigma=f"{entry['best_sigma']:.3g}", loss=f"{entry['best_loss']:.3f}")

            report = tune_target(found, engine, local_kit(engine), reference, source, config, max_new_tokens,
                                 on_step, sigma0)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if store:
        try:
            with AdminClient(url, admin_key) as client:
                client.request("PATCH", f"/admin/targets/{found.id}",
                               json={"policy": {"method": "eco", "sigma": report.sigma}})
            report.stored = True
        except AdminError as error:
            _fail(error)
    out = report_dict(report, config, model)
    if json_out is not None:
        write_json_report(json_out, out)
    typer.echo(json.dumps(out["metrics"], indent=2))


def main() -> None:
    app()
