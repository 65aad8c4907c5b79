"""The Markdown summary of ``bench load``, with one plot per upstream: memory, latency and rate over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plot(path: Path, title: str, series: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory, buckets = series["memory"], series["timeline"]
    fig, (rss_ax, latency_ax, rate_ax) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    times = [m["t_s"] / 60 for m in memory]
    rss_ax.plot(times, [m["gateway_rss_mb"] for m in memory], label="gateway (process tree)")
    rss_ax.plot(times, [m["upstream_rss_mb"] for m in memory], label="upstream", linestyle="--")
    rss_ax.set_ylabel("RSS (MB)")
    rss_ax.legend(fontsize=8)
    hold = [m["t_s"] / 60 for m in memory if m["phase"] == "hold"]
    for ax in (rss_ax, latency_ax, rate_ax):
        if hold:
            ax.axvspan(hold[0], hold[-1], color="tab:green", alpha=0.07)
    bucket_t = [b["t_s"] / 60 for b in buckets]
    latency_ax.plot(bucket_t, [b["latency_p50_ms"] for b in buckets], label="p50")
    latency_ax.plot(bucket_t, [b["latency_p99_ms"] for b in buckets], label="p99")
    latency_ax.set_ylabel("latency (ms), all classes")
    latency_ax.set_yscale("log")
    latency_ax.legend(fontsize=8)
    rate_ax.plot(bucket_t, [b["completed_per_s"] for b in buckets], label="completed req/s")
    rate_ax.set_ylabel("requests/s")
    rate_ax.set_xlabel("minutes (shaded: the hold)")
    load_ax = rate_ax.twinx()
    load_ax.plot(times, [m["load_1m"] for m in memory], color="tab:gray", linestyle=":", label="load average 1m")
    load_ax.set_ylabel("load average", color="tab:gray")
    rate_ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _row(name: str, c: dict[str, Any]) -> str:
    decisions = ", ".join(f"{k}: {v}" for k, v in c.get("decisions", {}).items())
    return (f"| {name} | {c['requests']} | {c['errors']} | {c['requests_per_s']} | {c['latency_p50_ms']} | "
            f"{c['latency_p99_ms']} | {c['ttft_p50_ms']} | {c['ttft_p99_ms']} | {decisions} |")


def write_markdown(report: dict[str, Any], json_path: Path) -> Path:
    """Write ``<json stem>.md`` and ``<json stem>-<upstream>.png`` beside the JSON report."""
    config, metrics = report["config"], report["metrics"]
    machine = config["machine"]
    lines = ["# Load benchmark", "",
             f"{config['mode']}; hold {config['duration_s']:g} s; gateway `{config['gateway_command']}` with "
             f"{config['gateway_workers']} workers; store: {config.get('store', '-')}; targets: "
             + ", ".join(f"{t['name']} ({t['policy']})" for t in config["targets"]) + f" ({config['workload']}).",
             "", f"Machine: {machine['cpus']} CPUs, load average {machine['load_average_1m_at_start']} at start, "
                 f"{machine.get('load_average_1m_at_end')} at end (shared machine: read latencies with that in mind).",
             "", "| goal | " + " | ".join(u for u in config["upstreams"]) + " |",
             "|---|" + "---|" * len(config["upstreams"])]
    for key, label in (("errors", "errors (goal 0)"), ("sustained_requests_per_s", "sustained requests/s"),
                       ("latency_p50_ms", "latency p50 (ms)"), ("latency_p99_ms", "latency p99 (ms)"),
                       ("added_latency_p50_ms", "added latency vs direct, p50 (ms)"),
                       ("rss_slope_mb_per_min", f"RSS slope (MB/min, goal <= {metrics['goal_rss_slope_mb_per_min']})"),
                       ("rss_slope_second_half_mb_per_min", "RSS slope, second half of the hold (MB/min)"),
                       ("rss_growth_mb_over_hold", "RSS growth over the hold (MB)")):
        lines.append(f"| {label} | " + " | ".join(str(metrics.get(f"{key}_{u}", "-")) for u in config["upstreams"])
                     + " |")
    for upstream in config["upstreams"]:
        m = metrics[upstream]
        hold, memory = m["hold"], m["memory"]
        lines += ["", f"## {upstream}", ""]
        if "find_max" in m:
            search = m["find_max"]
            lines += [f"Find-max (p99 bound {search['p99_bound_ms']} ms, {search['p99_bound_source']}): "
                      f"highest passing rate {search['found_rate_per_s']} req/s"
                      + (f" ({search['note']})" if search["note"] else "") + ".", "",
                      "| offered req/s | sustained | p99 ms | errors | send lag p99 ms | passed |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {s['offered_rate_per_s']} | {s['sustained_requests_per_s']} | "
                      f"{s['gateway_latency_p99_ms']} | {s['errors']} | {s['send_lag_p99_ms']} | "
                      f"{'yes' if s['passed'] else 'no'} |" for s in search["steps"]]
            lines.append("")
        lines += [f"Hold: {hold['offered_rate_per_s']} req/s offered for {hold['window_s']} s, "
                  f"{hold['sustained_requests_per_s']} req/s sustained through the gateway "
                  f"(+{hold['direct_requests_per_s']} direct), errors {hold['errors']} {hold['errors_by_kind']}, "
                  f"generator send lag p99 {hold['send_lag_p99_ms']} ms.", "",
                  "| class | requests | errors | req/s | p50 ms | p99 ms | TTFT p50 | TTFT p99 | decisions |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [_row(name, c) for name, c in hold["classes"].items()]
        lines += ["", "Memory (MB): " + ", ".join(f"{k} {v}" for k, v in memory.items()), ""]
        plot = json_path.parent / f"{json_path.stem}-{upstream}.png"
        _plot(plot, f"bench load: {upstream}", report["series"][upstream])
        lines += [f"![{upstream}]({plot.name})", ""]
    md = json_path.parent / f"{json_path.stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return md
