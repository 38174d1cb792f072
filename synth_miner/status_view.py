"""`synth-miner status` as tables: what an operator reads off the report ``synth_miner.status.collect`` gathers."""

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from synth_miner.status import DEAD_LISTED, EXIT_NO_INFERENCE, EXIT_REDIS, age, exit_code, finite


def ago(started: Any) -> str:
    at = finite(started)
    return "?" if at is None else age(time.time() - at)


def clock(at: Any, fmt: str) -> str:
    seconds = finite(at)
    return "?" if seconds is None or not 0 <= seconds < 1e11 else time.strftime(fmt, time.gmtime(seconds))


def models_cell(models: dict[str, str] | None) -> str:
    """Where each model comes from: a published artifact version (retrained) or the committed checkpoint."""
    if models is None:
        return "?"  # a heartbeat from before models were announced

    from core.artifact_files import VERSIONS

    def origin(path: str) -> str:
        parts = Path(path).parts
        return parts[-2] if len(parts) > 2 and parts[-3] == VERSIONS else "committed"

    return " ".join(f"{kind}:{origin(path)}" for kind, path in sorted(models.items())) or "-"


def job_detail(run: dict[str, Any]) -> str:
    """One line on what a job run did: its error, else what it published (per model for a retrain)."""
    if run.get("error"):
        return str(run["error"])
    result = run.get("result")
    if not isinstance(result, dict):
        return ""

    def verdict(outcome: Any) -> str:
        if not isinstance(outcome, dict):
            return str(outcome)  # e.g. "skipped: no history in the store"
        gate = outcome.get("gate", outcome)
        if not isinstance(gate, dict):
            return str(gate)
        return f"published {gate['published']}" if gate.get("published") else str(gate.get("reason") or "not published")

    if isinstance(result.get("models"), dict):  # the retrain: one gate per model
        return "; ".join(f"{kind}: {verdict(outcome)}" for kind, outcome in result["models"].items())
    if "published" in result:  # the calibration: its reason says why not (summaries from before had none)
        return verdict(result) if result["published"] else str(result.get("reason") or "nothing published")
    failed = result.get("failed")
    if isinstance(failed, dict) and failed:  # the refresh: it runs "ok" while some assets' providers fail
        return f"{len(failed)} of {result.get('assets', '?')} assets not refreshed: {', '.join(sorted(failed))}"
    return ""


def render_holds(holds: list[dict[str, Any]], console: Console) -> None:
    """The provider hosts the fleet sends nothing to until their Retry-After lapses (a 418 is Binance's IP ban)."""
    if not holds:
        console.print("[bold]provider holds (Retry-After)[/]: none")
        return
    table = Table(title="provider holds (Retry-After): no request is sent to these hosts until they lapse")
    for col in ("host", "client", "answered", "asked", "left"):
        table.add_column(col)
    for hold in holds:
        status = hold.get("status")
        asked, left = finite(hold.get("asked_s")), finite(hold.get("left_s"))
        table.add_row(*(escape(str(cell)) for cell in (
            hold.get("origin", "?"), hold.get("by") or "?",
            "?" if status is None else f"HTTP {status}" + (" (IP banned)" if status == 418 else ""),
            "?" if asked is None else f"{asked:.0f}s", "?" if left is None else f"{left:.0f}s")))
    console.print(table)


def render(report: dict[str, Any], console: Console) -> None:
    published = report["artifact_version"] or "none published (workers serve the committed checkpoints in models/)"
    console.print(f"[bold]artifact version[/]: {published}")
    if exit_code(report) == EXIT_REDIS and not any(report.get(k) for k in ("workers", "queues", "jobs", "cache")):
        # Nothing was read: empty tables and "last calibration: never" read as an idle fleet, not an unread one.
        footer(report, console)
        return
    workers = Table(title="workers (heartbeats)")
    for col in ("name", "queues", "engine", "device", "models", "artifact", "seen"):
        workers.add_column(col)
    dead = 0
    for w in report["workers"]:
        dead += not w.get("alive", True)
        if dead > DEAD_LISTED and not w.get("alive", True):
            continue
        seen = escape(str(w.get("seen", "?")))
        seen = seen if w.get("alive", True) else f"[red]{seen} (gone?)[/]"
        workers.add_row(*(escape(str(cell)) for cell in (
            w.get("name", "?"), w.get("queues", ""), w.get("engine", "?"), w.get("device", "?"),
            models_cell(w.get("models")), w.get("artifact_version") or "-")), seen)
    if dead > DEAD_LISTED:
        workers.add_row(f"[red]... {dead - DEAD_LISTED} more gone (all in --json)[/]", *[""] * 6)
    console.print(workers)
    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    queues.add_column("expired (discarded unrun)", justify="right")
    for name, depth in report["queues"].items():
        queues.add_row(name, str(depth), str(report.get("expired", {}).get(name, "-")))
    console.print(queues)
    jobs = Table(title="recent periodic jobs")
    for col in ("job", "slot", "status", "seconds", "detail"):
        jobs.add_column(col)
    last_calibration = report.get("last_calibration") or next(
        (j for j in report["jobs"] if j.get("job") == "calibrate"), None)
    for j in report["jobs"][:10]:
        jobs.add_row(*(escape(str(cell)) for cell in (j.get("job"), clock(j.get("slot"), "%H:%M:%S"),
                                                       j.get("status", "?"), j.get("seconds"), job_detail(j)[:60])))
    console.print(jobs)
    if report.get("last_runs"):
        each = Table(title="last run of each job")
        for col in ("job", "started", "status", "seconds", "outcome"):
            each.add_column(col)
        for name, j in report["last_runs"].items():
            each.add_row(*(escape(str(cell)) for cell in (name, ago(j.get("started")), j.get("status", "?"),
                                                           j.get("seconds"), job_detail(j)[:100])))
        console.print(each)
    calibrated = "never" if last_calibration is None else (
        f"{ago(last_calibration.get('started'))} ({escape(str(last_calibration.get('status', '?')))})")
    console.print(f"[bold]last calibration[/]: {calibrated}")
    cache = Table(title="rolling cache")
    for col in ("asset", "step", "from", "to", "freshness"):
        cache.add_column(col)
    for asset, span in report["cache"].items():
        if span is None:
            cache.add_row(asset, "-", "-", "-", "[red]empty[/]")
        else:
            fresh = span["freshness_s"]
            color = "green" if fresh < 180 else "yellow" if fresh < 900 else "red"
            cache.add_row(asset, f"{span['step']}s", time.strftime("%Y-%m-%d %H:%M", time.gmtime(span["first"])),
                          time.strftime("%Y-%m-%d %H:%M", time.gmtime(span["last"])), f"[{color}]{age(fresh)}[/]")
    console.print(cache)
    render_holds(report.get("provider_holds") or [], console)
    footer(report, console)


def footer(report: dict[str, Any], console: Console) -> None:
    """The problems found, and the line saying what the exit code means."""
    for error in report["errors"]:
        console.print(f"[red]! {escape(error)}[/]")
    code = exit_code(report)
    if code == EXIT_NO_INFERENCE:
        unread = sorted(set(report["unread_queues"]) & set(report["inference_queues"]))
        console.print(f"[red bold]no live worker reads {', '.join(unread)}: the miner answers those requests from "
                      f"its in-process fallback, not the fleet's models (exit {code})[/]")
    elif code == EXIT_REDIS:
        console.print(f"[red bold]the fleet could not be read (exit {code})[/]")
