"""``synth-miner data ...``: backfill the history store, import CSVs, show status, run a fake provider."""

import asyncio
import itertools
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.assets import ASSETS
from core.constants import SECONDS_PER_DAY
from core.csv_history import STEP_SUFFIX, read_csv
from core.datasets import DatasetError, before_cut, held_out_start, load_manifest, segment_starts
from core.fake_providers import FAKE_PROVIDERS, FakeMarket, FakeProvider, start_fake
from core.history_store import (
    HistoryStore,
    HistoryStoreError,
    Merged,
    StoreReadError,
    StoreSummary,
    combined_error,
)
from core.price_checks import screen_bars
from core.prices import PriceDataError, PriceHistory
from core.settings import Settings
from core.sources.base import PriceSource, ProviderError
from core.sources.holds import host_holds
from core.sources.http import ClockAheadError, PartialHistoryError
from core.sources.registry import PROVIDERS, build_source
from core.store_sources import Stretch
from synth_miner.cli_assets import checked_assets
from synth_miner.cli_checks import positive
from synth_miner.cli_settings import load_settings

app = typer.Typer(help="Market data: backfill the history store, import CSVs, status, local provider servers.",
                  no_args_is_help=True)
console = Console(width=160)

DATA_DIR_HELP = "store root is DATA_DIR/history (default: SYNTH_DATA_DIR)"
CSV_NAME = re.compile(r"^(?P<stem>[a-z0-9]+)_(?P<res>1m|5m)\.csv(\.gz)?$", re.IGNORECASE)


def parse_time(text: str) -> int:
    """Unix seconds, a UTC date (2026-01-01) or an ISO datetime (naive = UTC)."""
    text = text.strip()
    if re.fullmatch(r"\d{9,11}", text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date, an ISO datetime or unix seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _utc(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86_400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def known_assets(names: list[str] | None, also: set[str], option: str = "--asset") -> list[str] | None:
    """``--asset`` values checked (``also``: what the folder or store at hand holds); None when not given."""
    return checked_assets(names, option, also) if names else None


# --- sync -----------------------------------------------------------------------------------------------------
@app.command("sync")
def sync(
    asset: Annotated[str, typer.Option("--asset", help="asset name, e.g. BTC")],
    since: Annotated[str, typer.Option("--since", help="start: 2026-01-01, ISO datetime or unix seconds")],
    until: Annotated[str | None, typer.Option("--until", help="end (exclusive); default now")] = None,
    provider: Annotated[str | None, typer.Option("--provider", help=f"one of {', '.join(PROVIDERS)}; default: "
                                                 "the asset's configured provider")] = None,
    step: Annotated[int, typer.Option("--step", help="bar seconds: 60 or 300")] = 60,
    chunk_days: Annotated[float, typer.Option("--chunk-days", help="days fetched per round",
                                               callback=positive)] = 7.0,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=DATA_DIR_HELP)] = None,
) -> None:
    """Backfill the history store from a provider."""
    asset = checked_assets([asset], "--asset")[0]  # btc means BTC, as in every other command
    if step not in STEP_SUFFIX:
        raise typer.BadParameter("step must be 60 or 300", param_hint="--step")
    start, end = parse_time(since), parse_time(until) if until else int(time.time())
    if start >= end:
        raise typer.BadParameter("--since must be before --until")
    settings = load_settings(data_dir=data_dir)
    name = provider or settings.provider_for(asset)
    if name == "replay":  # as the refresh job: shifted old rows would pass for real history, held-out ones too
        raise typer.BadParameter("replayed prices are never written to the history store (the retrain trains "
                                 "on it): sync from a live provider, or `data import` the CSV folder",
                                 param_hint="--provider / SYNTH_PRICE_PROVIDER")
    store = HistoryStore.from_settings(settings)
    try:
        done = asyncio.run(_sync(asset, name, settings, store, start, end, step, max(60, int(chunk_days * 86_400))))
    except (ProviderError, HistoryStoreError, PriceDataError) as exc:
        _sync_failed(f"{type(exc).__name__}: {exc}")
    if done.stopped is not None:  # the bars before the failed page are stored: say where to pick up
        _sync_failed(f"{type(done.stopped).__name__}: {done.stopped}; {done.new} new bar(s) stored, rerun with "
                     f"--since {done.resume} to resume" + (f"; before it, {done.damaged[0]}" if done.damaged else ""))
    if done.damaged:  # every other day is stored; the damaged ones only once compaction has set them aside
        more = f" (and {len(done.damaged) - 1} more)" if len(done.damaged) > 1 else ""
        _sync_failed(f"{done.damaged[0]}{more}; {done.new} new bar(s) stored; once the compact-store job has set "
                     "the damaged partition(s) aside, rerun the same sync to fill their days")
    console.print(f"{asset} via {name}: {_utc(start)} -> {_utc(end)} UTC, {done.fetched} bars fetched, {done.new} new "
                  f"in {store.root}" + (f" ({done.empty} empty rounds: provider retention?)" if done.empty else ""))
    if done.dropped:
        console.print(f"[yellow]{done.dropped} implausible bar(s) dropped[/yellow] (ts {', '.join(done.dropped_ts)})")
    if done.held_back:
        console.print(f"{done.held_back} newest bar(s) not stored: no later bar confirms their jump (the refresh "
                      "fetches recent ones again; for a past --until, sync a later range)")


def _sync_failed(reason: str) -> NoReturn:
    # One line whatever its length (no wrapping) and the provider's text never read as markup.
    console.print(f"[red]sync failed:[/red] {escape(reason)}", soft_wrap=True)
    raise typer.Exit(1)


async def _check_provider_clock(source: PriceSource, asset: str) -> None:
    """A provider whose clock runs ahead stamps every bar later than it closed (the refresh stores none of its
    bars, core.refresh): its latest price shows it, and then nothing is synced. Any other failure of the latest
    price (a closed market, a stale feed) says nothing about the history, which is fetched as before."""
    try:
        await source.latest(asset)
    except ClockAheadError as exc:
        raise ClockAheadError(f"{source.name} clock runs {exc.ahead_s:.0f} s ahead of our clock: nothing synced "
                              f"({exc})", exc.ahead_s) from exc
    except ProviderError:
        pass


@dataclass
class SyncReport:
    fetched: int = 0
    new: int = 0
    empty: int = 0
    dropped: int = 0
    dropped_ts: list[str] = field(default_factory=list)  # the first few, for the operator
    held_back: int = 0
    stopped: PartialHistoryError | None = None  # a page failed: the bars before it are stored, the rest not
    resume: int | None = None  # with ``stopped``: the first bar not stored, where a rerun starts
    damaged: list[str] = field(default_factory=list)  # why damaged partitions kept a round's bars out, each once


async def _sync(asset: str, provider: str, settings: Settings, store: HistoryStore, start: int, end: int,
                step: int, chunk: int) -> SyncReport:
    """Fetch chunk by chunk, screened like the refresh job's bars (core.price_checks): a provider's lone
    x100 print would otherwise reach the store, then the cache, training and an anchor. A fleet's Retry-After
    holds (SYNTH_REDIS_URL) bind it too: it calls the providers from the same IP."""
    holds = host_holds(settings.redis_url)
    source = build_source(provider, settings, holds=holds)
    report = SyncReport()
    try:  # the reference for the first chunk's first bar; without it the chunk's own median is
        before = await asyncio.to_thread(store.read, asset, step, start - SECONDS_PER_DAY, start)
    except HistoryStoreError:  # a damaged day compaction has not set aside yet: not worth failing the sync
        before = PriceHistory.empty(step)
    previous = float(before.close[-1]) if len(before) else None
    pending = PriceHistory.empty(step)  # a chunk's unconfirmed newest bars, judged with the next chunk
    try:
        await _check_provider_clock(source, asset)
        for a in range(start, end, chunk):
            try:
                hist = await source.history(asset, a, min(a + chunk, end), step)
            except PartialHistoryError as exc:
                # Unbroken from ``a`` up to the failed page: screened and stored like any chunk, then stop.
                report.stopped, hist = exc, exc.partial
            report.fetched += len(hist)
            report.empty += not len(hist)
            bars = pending.merge(hist) if len(pending) else hist
            screened = screen_bars(bars, previous, settings.price_max_jump, settings.price_confirm_bars)
            report.dropped += len(screened.dropped)
            report.dropped_ts += [str(t) for t in screened.dropped.ts[:5 - len(report.dropped_ts)].tolist()]
            if len(screened.kept):
                previous = float(screened.kept.close[-1])
            held = screened.held_back
            pending = PriceHistory(step, bars.ts[len(bars) - held:], bars.close[len(bars) - held:])
            try:
                merged = await asyncio.to_thread(store.merge, asset, screened.kept, source.name)
                report.new += merged.new
            except StoreReadError as exc:
                # A damaged day (its other days are stored): stopping here left every later day unsynced, and
                # a rerun stopped at the same day until compaction set it aside.
                report.new += exc.stored
                if (said := f"{type(exc).__name__}: {exc}") not in report.damaged:  # one day spans several rounds
                    report.damaged.append(said)
            if report.stopped is not None:
                # Held-back bars were not stored: the rerun starts at them, or else at the failed page.
                report.resume = int(pending.ts[0]) if len(pending) else report.stopped.missing[0]
                return report
    finally:
        await source.close()
        holds.close()
    report.held_back = len(pending)
    return report


# --- import -----------------------------------------------------------------------------------------------------
def asset_cuts(manifest: Mapping[str, Any], stems: Iterable[str]) -> dict[str, int]:
    """Per file stem (``spy``), the earliest held-out boundary of its files (``spy_1m``, ``spy_5m``).

    Each file cut at its own boundary left the 1-minute file's rows past the 5-minute file's boundary
    in the store, and the retrain resamples 5-minute bars from 1-minute ones: spy_5m's held-out week
    came back into training that way."""
    out: dict[str, int] = {}
    for stem in set(stems):
        found = [c for suffix in STEP_SUFFIX.values()
                 if (c := held_out_start(manifest, f"{stem}_{suffix}".lower())) is not None]
        if found:
            out[stem] = min(found)
    return out

def assets_for_stem(stem: str) -> list[str]:
    """Registry assets whose files use this stem (spy -> SPYX and SP500), else the stem upper-cased."""
    found = [name for name, spec in ASSETS.items() if stem.lower() in spec.file_stems]
    return found or [stem.upper()]


@app.command("import")
def import_csv(
    folder: Annotated[Path, typer.Argument(help="folder of <stem>_<1m|5m>.csv(.gz) files")],
    only: Annotated[list[str] | None, typer.Option("--asset", help="import only these assets")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=DATA_DIR_HELP)] = None,
    include_held_out: Annotated[bool, typer.Option(
        "--include-held-out", help="also import the rows from each file's eval_start_ts in the folder's "
        "manifest.json on (the weekly retrain would then train on the held-out windows)")] = False,
) -> None:
    """Import CSV history (the ../shared/data format): 1m files at step 60, 5m files at step 300. Rows from a
    file's held-out boundary (eval_start_ts in the folder's manifest.json) on are left out unless
    --include-held-out: the store is what the weekly retrain trains on."""
    if not folder.is_dir():
        raise typer.BadParameter(f"{folder} is not a folder")
    manifest: dict[str, Any] = {}
    if (folder / "manifest.json").exists():
        try:
            manifest = load_manifest(folder)
        except DatasetError as exc:  # unreadable: importing past held-out boundaries it may name is no default
            raise typer.BadParameter(f"{exc} (--include-held-out imports every row regardless)") from None
    try:
        listing = sorted(folder.iterdir())
    except OSError as exc:  # a folder this user may not list (permissions): one line, not a traceback
        raise typer.BadParameter(f"{folder} cannot be read: {exc.strerror or exc}") from None
    files = [(path, match) for path in listing if (match := CSV_NAME.match(path.name))]
    in_folder = {a for _, match in files for a in assets_for_stem(match["stem"])}
    only = known_assets(only, in_folder)
    cuts = {} if include_held_out or not manifest else asset_cuts(manifest, [m["stem"].lower() for _, m in files])
    store = HistoryStore.from_settings(load_settings(data_dir=data_dir))
    table = Table("file", "asset", "step", "rows", "new", "replaced", "span (UTC)", "held out",
                  title=f"import into {store.root}")
    steps = {suffix: step for step, suffix in STEP_SUFFIX.items()}
    imported = refused = replaced = 0
    failed = False
    for path, match in files:
        step = steps[match["res"].lower()]
        targets = [a for a in assets_for_stem(match["stem"]) if not only or a in only]
        if not targets:
            continue
        file_stem = path.name.split(".")[0].lower()
        if manifest and not include_held_out and held_out_start(manifest, file_stem) is None:
            # As training refuses it: a file the manifest gives no boundary for may be all held out.
            table.add_row(path.name, ",".join(targets), str(step), "-", "-", "-", "-",
                          "[yellow]refused: no eval_start_ts in the manifest[/yellow]")
            refused += 1
            continue
        try:
            hist = read_csv(path, step)
            now = int(time.time())
            if len(hist) and int(hist.ts[-1]) > now:
                # A time-shifted file, or local times written as UTC: once their time came, the refresh would
                # serve these bars from the store and fetch only after them, so the real ones never replaced them.
                ahead = len(hist) - int(np.searchsorted(hist.ts, now, side="right"))
                raise PriceDataError(f"{ahead} row(s) start after now (the newest at {_utc(int(hist.ts[-1]))}): "
                                     "a time-shifted file or local times? nothing of it imported")
            hist = hist.known_at(now)  # a bar still in progress has no final close yet
            held = "-"
            cut = cuts.get(match["stem"].lower())
            if cut is not None:
                kept = before_cut(hist, cut)
                held = f"{len(hist) - len(kept)} rows from {_utc(cut)}"
                hist = kept
            starts = segment_starts(manifest, file_stem)
            for asset in targets:
                merged = merge_segments(store, asset, hist, path.name, starts)
                imported += 1
                replaced += merged.replaced
                table.add_row(path.name, asset, str(step), str(len(hist)), str(merged.new),
                              f"[yellow]{merged.replaced}[/yellow]" if merged.replaced else "0",
                              f"{_utc(hist.first_ts)} -> {_utc(hist.last_ts)}", held)
        except (PriceDataError, HistoryStoreError, DatasetError) as exc:
            failed = True
            table.add_row(path.name, ",".join(targets), str(step), "-", "-", "-", f"[red]{escape(str(exc))}[/red]", "-")
    if not imported and not failed and not refused:
        wanted = f" for {', '.join(only)}" if only else ""
        console.print(f"[red]nothing imported:[/red] no <stem>_<1m|5m>.csv(.gz) file{wanted} in {folder}")
        raise typer.Exit(1)
    console.print(table)
    if replaced:  # another source's closes for the same bars (a live provider's, an earlier file's)
        console.print(f"[yellow]{replaced} stored bar(s) had another close and now hold the file's[/yellow]")
    if failed or not imported:
        raise typer.Exit(1)


def merge_segments(store: HistoryStore, asset: str, hist: PriceHistory, name: str, starts: Sequence[int]) -> Merged:
    """The file's bars, each of its manifest segments stored as a source of its own, named by the segment's
    start (the same in a later import of the file that lacks its first rows): training from the store then
    splits at the file's source joins as training from the file does. A day that cannot be written costs
    only its own bars, as in ``HistoryStore.merge``: the error is raised once every segment was tried."""
    cuts = np.searchsorted(hist.ts, np.asarray(starts, np.int64), side="left").tolist()
    bounds = sorted({0, len(hist), *[c for c in cuts if 0 < c < len(hist)]})
    new = replaced = 0
    failed: list[HistoryStoreError] = []
    for a, b in itertools.pairwise(bounds):
        began = [t for t in starts if t <= int(hist.ts[a])]
        label = f"{name}@{_utc(max(began))}" if began else name
        try:
            merged = store.merge(asset, PriceHistory(hist.step, hist.ts[a:b], hist.close[a:b]), label)
        except HistoryStoreError as exc:
            failed.append(exc)
            new += exc.stored
            continue
        new, replaced = new + merged.new, replaced + merged.replaced
    if failed:
        raise combined_error(failed, new, "segment(s)") from failed[0]
    return Merged(new, replaced)


# --- status -----------------------------------------------------------------------------------------------------
@app.command("status")
def status(
    only: Annotated[list[str] | None, typer.Option("--asset", help="only these assets")] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="cache to inspect (default SYNTH_REDIS_URL; "
                                                  "none = store only)")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=DATA_DIR_HELP)] = None,
) -> None:
    """Per asset: span, rows, gaps and freshness of the store (and of the Redis cache when configured)."""
    settings = load_settings(data_dir=data_dir, redis_url=redis_url)
    store = HistoryStore.from_settings(settings)
    try:
        stored = store.assets()
    except OSError as exc:  # a store this user may not list (permissions): one line, not a traceback
        raise typer.BadParameter(f"{store.root} cannot be read: {exc.strerror or exc}",
                                 param_hint="--data-dir / SYNTH_DATA_DIR") from None
    only = known_assets(only, set(stored))
    now = time.time()
    table = Table("asset", "step", "days", "first (UTC)", "last (UTC)", "rows", "gaps", "missing", "fresh", "source",
                  title=f"history store {store.root}")
    summaries: list[tuple[StoreSummary, str]] = []  # with the step's sources, read as it was
    seen: set[str] = set()  # assets with a row in the table, a summary or an unreadable step
    for asset in stored:
        if only and asset not in only:
            continue
        try:
            steps = store.steps(asset)
        except OSError as exc:
            seen.add(asset)
            table.add_row(asset, "-", "-", "-", "-", "-", "-", "-", f"[red]unreadable: {exc.strerror or exc}[/red]",
                          "-")
            continue
        for step in steps:
            seen.add(asset)
            try:  # an unreadable sources.json too is this row's error, not a traceback
                summaries.append((store.summary(asset, step), _sources(store.stretches(asset, step))))
            except HistoryStoreError as exc:
                table.add_row(asset, str(step), "-", "-", "-", "-", "-", "-", f"[red]{exc}[/red]", "-")
    for s, sources in summaries:
        fresh = None if s.last_ts is None else now - (s.last_ts + s.step)
        table.add_row(s.asset, str(s.step), str(s.days), _utc(s.first_ts), _utc(s.last_ts), str(s.rows),
                      str(s.gaps), str(s.missing_bars), _age(fresh), sources)
    empty = not seen
    if empty:  # nothing matched: say so instead of an empty table
        wanted = f" for {', '.join(only)}" if only else ""
        console.print(f"[red]no history{wanted} in the store at {store.root}[/red] (fill it with "
                      "`synth-miner data sync` or `data import`)")
    else:
        console.print(table)
        absent = [a for a in only or () if a not in seen]
        if absent:
            console.print(f"[yellow]no history for {', '.join(absent)} in the store[/yellow]")
    if settings.redis_url:
        _cache_status(settings.redis_url, sorted({s.asset for s, _ in summaries} | set(only or ())), now)
    if empty:
        raise typer.Exit(1)


def _sources(stretches: Sequence[Stretch]) -> str:
    """The newest bars' source, and how many stretches of others the training splits from it."""
    if not stretches:
        return "-"
    newest = escape(stretches[-1].source)
    return newest if len(stretches) == 1 else f"{newest} (+{len(stretches) - 1} earlier)"


def _cache_status(url: str, assets: list[str], now: float) -> None:
    import redis

    from core.cache_redis import CacheError, RedisHistoryCache

    try:
        client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
    except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
        raise typer.BadParameter(str(exc), param_hint="--redis-url / SYNTH_REDIS_URL") from None
    try:
        cache = RedisHistoryCache(client)
        table = Table("asset", "step", "first (UTC)", "last (UTC)", "rows", "gaps", "fresh", "latest", "latest age",
                      title="Redis cache")
        for asset in assets or sorted(ASSETS):
            try:
                latest = cache.latest(asset)
            except CacheError as exc:  # the damaged entry is this asset's finding, not a traceback
                table.add_row(asset, "-", "-", "-", "-", "-", "-", f"[red]{escape(str(exc))}[/red]", "-")
                latest = None
            for step in (60, 300):
                try:
                    span = cache.span(asset, step)
                    hist = None if span is None else cache.read(asset, step, span[0], span[1] + 1)
                except CacheError as exc:
                    table.add_row(asset, str(step), "-", "-", "-", "-", f"[red]{escape(str(exc))}[/red]", "-", "-")
                    continue
                if span is None or hist is None:
                    continue
                gaps = int((hist.ts[1:] - hist.ts[:-1] > step).sum()) if len(hist) > 1 else 0
                table.add_row(asset, str(step), _utc(span[0]), _utc(span[1]), str(len(hist)), str(gaps),
                              _age(now - span[1] - step), f"{latest.price:.8g}" if latest else "-",
                              _age(now - latest.publish_time) if latest else "-")
        console.print(table)
    except redis.RedisError as exc:
        from synth_miner.status import redis_failure

        console.print(f"[red]cache unavailable:[/red] {escape(redis_failure(exc))}")
    finally:
        client.close()


# --- serve-fake -----------------------------------------------------------------------------------------------
@app.command("serve-fake")
def serve_fake(
    provider: Annotated[str, typer.Option("--provider", help=f"one of {', '.join(FAKE_PROVIDERS)}")],
    port: Annotated[int, typer.Option("--port", help="TCP port (0 = any free port)")],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="CSV folder in the ../shared/data format")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    lead_s: Annotated[int, typer.Option("--lead-s", help="seconds of rows still ahead of now at start: they "
                                        "appear as time passes, like a live feed")] = 86_400,
    duration: Annotated[float | None, typer.Option("--duration", help="stop after this many seconds",
                                                   callback=positive)] = None,
) -> None:
    """Serve a CSV folder in a provider's exact wire format (faults via POST /_faults)."""
    if provider not in FAKE_PROVIDERS:
        raise typer.BadParameter(f"unknown provider {provider!r}; known: {', '.join(FAKE_PROVIDERS)}",
                                 param_hint="--provider")
    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a folder", param_hint="--data-dir")
    if not 0 <= port <= 65_535:
        raise typer.BadParameter(f"{port} is not a TCP port (0-65535)", param_hint="--port")
    market = FakeMarket(data_dir, lead_s=lead_s)
    if not market.assets():  # a mistyped folder would serve nothing but "unknown symbol" to every request
        raise typer.BadParameter(f"{data_dir} holds no <stem>_<1m|5m>.csv(.gz) price file of a known asset",
                                 param_hint="--data-dir")
    try:
        asyncio.run(_serve(provider, market, host, port, duration))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the host is not this machine's, ...
        typer.echo(f"fake {provider} cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


async def _serve(provider: FakeProvider, market: FakeMarket, host: str, port: int, duration: float | None) -> None:
    server = await start_fake(provider, market, host, port)
    typer.echo(f"fake {provider} serving {market.folder} ({', '.join(market.assets())}) at {server.url}")
    sys.stdout.flush()
    try:
        if duration is not None:
            await asyncio.sleep(duration)
        else:
            await asyncio.Event().wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    app()
