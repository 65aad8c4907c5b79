"""The ``unlearn-gateway`` command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from gateway.admin.cli import targets_app

app = typer.Typer(help="OpenAI-compatible gateway that makes a served LLM forget named targets.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
build_app = typer.Typer(help="Build shipped artefacts.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (JSON reports; run them on a quiet machine).", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluations on the shared benchmark data (JSON + Markdown reports).", no_args_is_help=True)
app.add_typer(build_app, name="build")
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
app.add_typer(targets_app, name="targets")

DEFAULT_DATA = Path("../shared/data")


def _set_env(**values: object) -> None:
    """CLI flags override the environment, which the settings (in every worker process) read."""
    for name, value in values.items():
        if value is not None:
            os.environ[f"UNLEARN_{name.upper()}"] = str(value)


@app.command()
def serve(
    config: Annotated[Optional[Path], typer.Option(help="YAML or TOML settings file")] = None,
    host: Annotated[Optional[str], typer.Option(help="listen address [default: 127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="listen port [default: 8000]")] = None,
    workers: Annotated[Optional[int], typer.Option(help="uvicorn worker processes [default: 1]")] = None,
) -> None:
    """Run the gateway. With no configuration: the local engine with the demo model on 127.0.0.1:8000."""
    import uvicorn

    from gateway.auth import ensure_admin_key
    from gateway.settings import Settings

    _set_env(config=config.resolve() if config else None, host=host, port=port, workers=workers)
    settings = Settings()
    # Generated here, once, so every worker process accepts the same admin key (they inherit the environment).
    admin_keys = ensure_admin_key(settings.admin_keys, settings.admin_keys_file)
    if admin_keys != settings.admin_keys:
        os.environ["UNLEARN_ADMIN_KEYS"] = ",".join(admin_keys)
    uvicorn.run("gateway.app:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level, loop="uvloop", http="httptools")


@app.command()
def worker(
    model: Annotated[str, typer.Option(help="checkpoint folder, 'demo' or 'demo-retain'")] = "demo",
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8100,
    served_model_name: Annotated[Optional[str], typer.Option(help="model id to report [default: --model]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
) -> None:
    """Run the reference worker: the local engine behind vLLM 0.33's OpenAI wire protocol."""
    import uvicorn

    from gateway.engines.local import LocalEngine
    from gateway.worker import create_worker_app

    engine = LocalEngine(model, served_model_name, device)
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
    out: Annotated[Optional[Path], typer.Option(help="folder for the twins [default: the package]")] = None,
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
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report["metrics"], indent=2))


@bench_app.command("http-client")
def bench_http_client(
    json_out: Annotated[Path, typer.Option("--json", help="report file")] = Path("bench-http-client.json"),
    duration: Annotated[float, typer.Option(help="seconds per measured cell")] = 8.0,
) -> None:
    """httpx vs aiohttp as the gateway's upstream client, relaying 64 concurrent streams."""
    from gateway.bench.http_client import run_http_client_bench

    report = run_http_client_bench(duration_s=duration)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report["metrics"], indent=2))


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
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report["metrics"], indent=2))


def main() -> None:
    app()
