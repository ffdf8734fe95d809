"""The ``prefect-recovery`` command line (typer + rich). Every command takes ``--json``.

Store selection, the same for every command: ``--region URL`` (repeatable), or ``--store
BLOCK_NAME`` (a saved ``CheckpointStore`` block), or neither for the embedded default (two
local regions under ``$PREFECT_RECOVERY_HOME``, default ``./.prefect-recovery``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

# Before Prefect is imported: no telemetry calls from an offline machine, and room for the
# temporary local server to start on a busy 2-core box (its default is 20 s).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from .blocks import CheckpointStore
from .core import CheckpointError
from .core.audit import human_bytes
from .core.codecs import check_codec
from .core.errors import InvalidArgumentError, ManifestError, RegionConfigError
from .core.redact import scrub, scrub_obj

try:  # typer vendors click (typer._click) and raises its exceptions
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - an older typer on the real click
    from click import exceptions as _click_errors  # type: ignore[no-redef]

DEBUG_ENV = "PREFECT_RECOVERY_DEBUG"
_debug_flag = False


def _debug() -> bool:
    """Tracebacks wanted: ``--debug``, or ``PREFECT_RECOVERY_DEBUG`` set."""
    return _debug_flag or bool(os.environ.get(DEBUG_ENV))


# Control characters (C0 but tab and newline, DEL, C1) and bidirectional overrides: in a stored record
# (a journal event's step or error, a manifest's created_at, a stray file's name) they could clear the
# operator's screen, retitle the window, plant a hyperlink, fake an output line or reorder what is read.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: each control character or bidi override escaped (``\\x1b``)."""
    return _UNPRINTABLE.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


class _RecordSafeConsole(Console):
    """What the CLI prints quotes stored records, which anyone who can write a region controls: rich
    markup is off unless a call asks for it (and escapes the record text it embeds: ``[/x]`` in a step
    name made `history` fail with MarkupError), and control characters are shown escaped."""

    def render_str(self, text: str, **kwargs: Any) -> Any:
        return super().render_str(printable(text), **kwargs)


def _error_line(message: str) -> None:
    """One line on stderr, never wrapped at the terminal's width (scripts grep it)."""
    if _debug() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"error: {printable(scrub(' '.join(message.split())))}", file=sys.stderr, flush=True)


class _OneLineErrors(typer.core.TyperGroup):
    """Every error is one line saying what to do: exit 2 for bad input (usage errors and the store's
    own errors), 1 for anything unexpected; the traceback only with ``--debug``."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except _click_errors.NoArgsIsHelpError as exc:  # bare `prefect-recovery`: the help
            exc.show()
            sys.exit(exc.exit_code)
        except _click_errors.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "prefect-recovery"
            _error_line(f"{exc.format_message()} (see `{where} --help`)")
            sys.exit(exc.exit_code)
        except _click_errors.ClickException as exc:
            _error_line(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            _error_line("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, _click_errors.ClickException):
            raise
        except Exception as exc:
            if _debug():
                raise
            if isinstance(exc, CheckpointError):
                _error_line(str(exc))
                raise typer.Exit(2) from None
            _error_line(f"{type(exc).__name__}: {exc} (an unexpected error: run with --debug for the traceback)")
            raise typer.Exit(1) from None


app = typer.Typer(
    name="prefect-recovery",
    help="Recoverable ML pipelines on Prefect: multi-region, verified checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)
console = _RecordSafeConsole(markup=False)
err_console = _RecordSafeConsole(stderr=True, markup=False)

RegionOpt = Annotated[
    list[str] | None,
    typer.Option("--region", help="Region URL or local path (repeat for several regions)."),
]
StoreOpt = Annotated[str | None, typer.Option("--store", help="Name of a saved CheckpointStore block.")]
RegionCodecOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--region-codec",
        help="REGION=CODEC: the codec a --region stores chunks in (none, zstd, bytegroup-zstd, auto), as the "
        "store's region_codecs say; repeat per region. Without it, verify and repair take every --region for raw.",
    ),
]
QuorumOpt = Annotated[int, typer.Option("--quorum", min=1, help="Write quorum when --region is given.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(message: str, as_json: bool, code: int = 2) -> NoReturn:
    if as_json:
        print(json.dumps({"error": scrub(message)}))
    else:
        _error_line(message)
    raise typer.Exit(code)


class _NoFlowTracebacks(logging.Filter):
    """Without --debug, Prefect's flow and task run loggers print the exception, not its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not _debug():
            exc = record.exc_info[1]
            if exc is not None:  # the exception stays in the line: "... transaction 'k': QuorumNotMetError: ..."
                record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {scrub(str(exc))}", ()
            record.exc_info = None
            record.exc_text = None
        return True


class _NoDrainNoise(logging.Filter):
    """Drops Prefect's "Still processing items: N items remaining..." (a queue service draining its events or
    logs at exit; the items are still sent). Other warnings of those services, such as dropped items, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Still processing items")


def _quiet_queue_services() -> None:
    """Each of Prefect's queue services (prefect/_internal/concurrency/services.py) logs through a logger named
    after its class (``EventsWorker``, ``APILogWorker``...), outside the ``prefect`` logger tree: filter them all."""
    from prefect._internal.concurrency.services import QueueService
    from prefect.events import worker as _events_worker  # noqa: F401 - defines EventsWorker
    from prefect.logging import handlers as _log_handlers  # noqa: F401 - defines APILogWorker

    pending, names = [QueueService], set()
    while pending:
        service = pending.pop()
        names.add(service.__name__)
        pending.extend(service.__subclasses__())
    for name in names:
        service_logger = logging.getLogger(name)
        if not any(isinstance(f, _NoDrainNoise) for f in service_logger.filters):
            service_logger.addFilter(_NoDrainNoise())


@app.callback()
def _main_options(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show tracebacks of errors (also: {DEBUG_ENV}=1).")] = False,
) -> None:
    """Recoverable ML pipelines on Prefect: multi-region, verified checkpoints."""
    global _debug_flag
    _debug_flag = debug
    _quiet_queue_services()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if not any(isinstance(f, _NoFlowTracebacks) for f in run_logger.filters):
            run_logger.addFilter(_NoFlowTracebacks())


def _no_server(doing: str, exc: BaseException | None = None, remedy: str = "") -> str:
    """The one line for a PREFECT_API_URL where no Prefect server answers: what could not be done, the URL, why."""
    from .deploy import _api_url

    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    remedy = remedy or "or point PREFECT_API_URL at your server"
    return f"{doing}: no Prefect server answers at {_api_url()}{cause}; start it, {remedy}"


def _pipeline_failed(exc: BaseException, as_json: bool) -> NoReturn:
    """A pipeline's own error as one line; the traceback with --debug or PREFECT_RECOVERY_DEBUG=1."""
    if _debug():
        raise exc
    if isinstance(exc, RuntimeError) and str(exc).startswith("Failed to reach API at"):
        # Prefect's own error when PREFECT_API_URL names a server that does not answer: no pipeline ran
        remedy = "point PREFECT_API_URL at your server, or unset it to run on Prefect's temporary local server"
        _fail(_no_server("cannot start the flow run", remedy=remedy), as_json)
    _fail(f"the pipeline failed: {type(exc).__name__}: {exc}", as_json, code=1)


def open_store(
    regions: list[str] | None, store: str | None, quorum: int = 1, region_codecs: list[str] | None = None
) -> CheckpointStore:
    if regions and store:
        raise typer.BadParameter("give either --region or --store, not both")
    if region_codecs and not regions:
        raise typer.BadParameter("--region-codec names a --region's codec: give the --region options too (a --store "
                                 "block has its own region_codecs)")  # fmt: skip
    if store:
        import httpx

        try:
            return CheckpointStore.load(store)
        except ValueError as exc:  # Prefect's "Unable to find block document named ..."
            raise CheckpointError(
                f"no CheckpointStore block named {store!r} on the Prefect server ({exc}); save one with "
                f"CheckpointStore(regions=[...]).save({store!r}) or check PREFECT_API_URL"
            ) from None
        except (OSError, httpx.TransportError) as exc:  # the block lives on a server that does not answer
            raise CheckpointError(_no_server(f"cannot load the CheckpointStore block {store!r}", exc)) from None
    if regions:
        if quorum > len(regions):
            raise CheckpointError(
                f"--quorum {quorum} is more than the {len(regions)} region(s) given: give a quorum of at most "
                f"{len(regions)}, or more --region options"
            )
        codecs: dict[str, str] = {}
        for item in region_codecs or []:
            region, sep, codec = item.rpartition("=")
            if not sep or not region:
                raise typer.BadParameter(f"--region-codec {item!r}: give REGION=CODEC, e.g. s3://bucket/ckpt=auto")
            try:
                codecs[region] = check_codec(codec)
            except InvalidArgumentError as exc:
                raise typer.BadParameter(f"--region-codec {item!r}: {exc}") from None
        try:
            return CheckpointStore(regions=regions, write_quorum=quorum, region_codecs=codecs)
        except RegionConfigError as exc:
            raise RegionConfigError(f"--region: {exc}") from None
    return CheckpointStore.default()


@contextmanager
def _progress(as_json: bool, label: str) -> Iterator[None]:
    """A rich progress bar for the store operations run inside (core/progress.py), when stdout is a terminal:
    never in --json or piped output, which scripts read."""
    if as_json or not console.is_terminal:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .core.progress import reporting

    tasks: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bar:  # fmt: skip

        def report(operation: str, done: int, total: int) -> None:
            if total <= 0:  # open-ended (the training's step count): nothing to draw a bar against
                return
            if operation not in tasks:
                tasks[operation] = bar.add_task(f"{label} ({operation})", total=total)
            bar.update(tasks[operation], completed=done, total=total)

        with reporting(report):
            yield


def _emit(payload: Any) -> None:
    print(json.dumps(scrub_obj(json.loads(json.dumps(payload, default=str))), indent=2, sort_keys=True))


@app.command("ls")
def ls(
    lineage: Annotated[str | None, typer.Option("--lineage", help="Only this lineage.")] = None,
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw the lineage's timeline into this PNG (needs --lineage).")
    ] = None,
) -> None:
    """List consistent checkpoints (committed in at least write_quorum regions).

    Without --lineage, a lineage that cannot be listed (on a signing store: its newest version has
    no copy that verifies) is reported with its reason and the others are still listed; the exit
    status is then 1 (with --json, the lineage is an item {"lineage", "error"})."""
    if plot is not None and not lineage:
        _fail("--plot draws one lineage's timeline: give --lineage too", as_json)
    refused: dict[str, str] = {}
    try:
        opened = open_store(region, store, quorum)
        reachable, down = opened.core.reachable_regions()
        if not reachable:
            raise CheckpointError("no region is reachable: " + "; ".join(down.values()))
        if lineage:
            infos = opened.list(lineage)
        else:
            infos = []
            for name in opened.lineages():
                try:
                    infos.extend(opened.list(name))
                except ManifestError as exc:  # one forged or damaged lineage does not hide the others
                    refused[name] = str(exc)
        if plot is not None:
            from .telemetry.plot import PlotUnavailableError, plot_timeline

            try:
                written = plot_timeline(opened, lineage, plot)
            except PlotUnavailableError as exc:
                _fail(str(exc), as_json)
            except OSError as exc:
                _fail(
                    f"cannot write --plot {plot}: {exc.strerror or exc}; give a path in a writable directory", as_json
                )
            # stderr under --json, so stdout stays one JSON document
            (err_console if as_json else console).print(f"timeline of {lineage} written to {written}")
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    for cause in down.values():
        err_console.print(
            f"[yellow]warning:[/] {escape_markup(cause)}; listing what the other regions hold", markup=True
        )
    if as_json:
        _emit(
            [info.model_dump(mode="json") for info in infos] + [{"lineage": n, "error": e} for n, e in refused.items()]
        )
        if refused:
            raise typer.Exit(1)
        return
    for name, cause in refused.items():
        err_console.print(
            f"[red]error:[/] lineage {name} not listed: {escape_markup(scrub(cause))}", soft_wrap=True, markup=True
        )
    if not infos:
        if not refused:
            console.print("no checkpoints yet")
        else:
            raise typer.Exit(1)
        return
    table = Table(title="checkpoints")
    for column in ("lineage", "version", "step", "created", "size", "regions", "lagging"):
        table.add_column(column)
    for info in infos:
        table.add_row(
            info.lineage,
            str(info.version),
            "" if info.step is None else str(info.step),
            info.created_at[:19].replace("T", " "),
            human_bytes(info.total_bytes),
            str(len(info.regions)),
            ", ".join(info.lagging) or "-",
        )
    console.print(table)
    if refused:
        raise typer.Exit(1)


@app.command("verify")
def verify(
    repair: Annotated[bool, typer.Option("--repair", help="Heal missing or corrupt copies.")] = False,
    lineage: Annotated[str | None, typer.Option("--lineage", help="Only this lineage.")] = None,
    decode: Annotated[
        bool, typer.Option("--decode", help="Also decode compressed and delta chunks and check their content digest.")
    ] = False,
    region: RegionOpt = None,
    region_codec: RegionCodecOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every manifest and blob in every region. Exit 0 when healthy, 1 otherwise."""
    try:
        with _progress(as_json, "verifying blobs"):
            opened = open_store(region, store, quorum, region_codec)
            report = opened.verify(repair=repair, lineage=lineage, decode=decode)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit(report.model_dump(mode="json"))
    else:
        status = "[green]healthy[/]" if report.healthy else "[red]problems remain[/]"
        console.print(
            f"{status}: {report.lineages} lineages, {report.versions} versions, {report.blobs} blobs, "
            f"{human_bytes(report.bytes_checked)} re-hashed in {len(report.regions)} regions",
            markup=True,
        )
        console.print(f"signing: {report.signing}")
        if report.problems:
            table = Table(title="problems")
            for column in ("region", "object", "kind", "repaired", "detail"):
                table.add_column(column)
            for problem in report.problems:
                table.add_row(
                    problem.region,
                    problem.object,
                    problem.kind,
                    "yes" if problem.repaired else "no",
                    problem.detail,
                )
            console.print(table)
        for note in report.notes:
            console.print(f"note: {note}")
    raise typer.Exit(0 if report.healthy else 1)


@app.command("audit")
def audit_command(
    read_data: Annotated[
        float, typer.Option("--read-data", min=0.0, max=1.0, help="Fraction of blobs read and re-hashed (0-1).")
    ] = 1.0,
    repair: Annotated[bool, typer.Option("--repair/--no-repair", help="Heal copies from verified ones.")] = True,
    retention: Annotated[
        bool, typer.Option("--retention/--no-retention", help="Apply the store's retention policy and collect garbage.")
    ] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what retention and GC would delete.")] = False,
    lineage: Annotated[str | None, typer.Option("--lineage", help="Only this lineage (no GC).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the read-data sample.")] = None,
    region: RegionOpt = None,
    region_codec: RegionCodecOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Scrub, repair and prune the store (the audit flow's work, without Prefect). Exit 0 when healthy."""
    try:
        with _progress(as_json, "auditing blobs"):
            report = open_store(region, store, quorum, region_codec).audit(
                read_data=read_data,
                repair=repair,
                apply_retention=retention,
                lineage=lineage,
                dry_run=dry_run,
                seed=seed,
            )
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit({**report.model_dump(mode="json"), "rows": report.rows(), "healthy": report.healthy})
    else:
        rows = report.rows()
        if rows:
            table = Table(title="checkpoints")
            for column in rows[0]:
                table.add_column(column)
            for row in rows:
                table.add_row(*("-" if value is None else str(value) for value in row.values()))
            console.print(table)
        console.print(report.markdown())
    raise typer.Exit(0 if report.healthy else 1)


@app.command("keygen")
def keygen_command(
    name: Annotated[str, typer.Argument(help="Secret block name; it becomes the key id in every signature.")],
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="hmac-sha256 or ed25519.", case_sensitive=False)
    ] = "ed25519",
    public_name: Annotated[
        str | None, typer.Option("--public", help="ed25519: also save the public key under this Secret block name.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing Secret block.")] = False,
) -> None:
    """Make a signing key and save it as a Prefect Secret block (set the store's signing_key to NAME)."""
    import secrets

    from prefect.blocks.system import Secret

    from .core.signing import check_key_id, new_ed25519_key_pem

    try:
        check_key_id(name)
        if algorithm == "hmac-sha256":
            Secret(value=secrets.token_hex(32)).save(name, overwrite=overwrite)
        elif algorithm == "ed25519":
            private_pem, public_pem = new_ed25519_key_pem()
            Secret(value=private_pem).save(name, overwrite=overwrite)
            if public_name:
                # Readers verify signatures made as NAME, so the public key carries that key id.
                Secret(value={"key_id": name, "key": public_pem}).save(public_name, overwrite=overwrite)
        else:
            _fail(f"unknown algorithm {algorithm!r}: use hmac-sha256 or ed25519", False)
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc), False)
    console.print(
        f"saved {algorithm} key as Secret block {name!r}"
        + (f" (public key: {public_name!r})" if public_name else "")
        + f'; sign with CheckpointStore(..., signing_key="{name}", signing_algorithm="{algorithm}")'
    )


@app.command("init")
def init_command(
    region: RegionOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create regions: a local one's directory (mkdir -p) and each one's marker file (docs/FORMAT.md).

    A save never creates a local region's directory, so an unmounted disk is not replaced by the
    root disk; and an empty directory next to regions that hold checkpoints is taken for an
    empty mount point, not written to, until `init` says it is a new region. Safe to re-run.
    """
    from .core.region import open_region
    from .core.region_marker import MARKER_KEY, init_region

    if not region and not store:
        _fail("give the regions to create: --region URL (repeatable) or --store BLOCK_NAME", as_json)
    try:
        if store:
            configured = [(r.url, r.fsspec_options(), r.name) for r in open_store(None, store).regions]
        else:
            open_store(region, None)  # the same checks of the URLs as every command
            configured = [(url, {}, None) for url in region or []]
        results = []
        for url, options, name in configured:
            opened = open_region(url, options, name)
            created = init_region(opened)
            results.append({"region": opened.name, "created": created, "marker": MARKER_KEY})
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit(results)
        return
    for row in results:
        state = "initialised" if row["created"] else "already initialised"
        console.print(f"{state}: {row['region']} ({row['marker']})", soft_wrap=True)


@app.command("export")
def export(
    lineage: Annotated[str, typer.Option("--lineage", help="Lineage to export.")],
    to: Annotated[Path, typer.Option("--to", help="Directory to write into (new or empty, unless --force).")],
    version: Annotated[int | None, typer.Option("--version", help="Version (default: latest).")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty directory (replacing its exported files).")
    ] = False,
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint as DIR/tensors.safetensors plus DIR/state.json."""
    from .training.export import export_checkpoint

    if to.exists() and not to.is_dir():
        _fail(f"--to {to} is a file: give a directory (new or empty) to export into", as_json)
    if to.is_dir() and any(to.iterdir()) and not force:
        _fail(f"--to {to} is not empty: give a new or empty directory, or --force to write into it", as_json)
    for name in ("tensors.safetensors", "state.json"):  # the files export_checkpoint writes
        target = to / name
        if target.is_symlink() or (target.exists() and not target.is_file()):
            _fail(
                f"--to {to}: {name} there is a symbolic link or not a regular file, and export never writes "
                "through one (it would replace what it points to): remove it, or give a new directory",
                as_json,
            )
    try:
        with _progress(as_json, "exporting"):  # chunks read and verified
            summary = export_checkpoint(open_store(region, store, quorum).core, lineage=lineage, version=version, to=to)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    except OSError as exc:
        _fail(f"cannot write into --to {to}: {exc.strerror or exc}; give a writable directory", as_json)
    if as_json:
        _emit(summary)
    else:
        console.print(
            f"exported {lineage} v{summary['version']} ({summary['tensors']} tensors) to {summary['directory']}"
        )


# Digests and records too long for a table cell; `history --json` shows everything.
_HIDDEN_HISTORY_KEYS = {"environment", "process", "cache_key", "code", "input_digest", "output_digest", "code_digest"}


@app.command("history")
def history(
    lineage: Annotated[str, typer.Option("--lineage", help="Lineage whose journal to show.")],
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            help="Another lineage run with the same parameters: report the first checkpoint (by step) where the "
            "two differ and what differs first (settings, counters, RNG and data before optimizer and weights).",
        ),
    ] = None,
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """The lineage's timeline from its journal: runs, steps, checkpoints, failures, where a run stopped."""
    from .core.journal import Journal
    from .core.lineage_history import fold_journal

    if against is not None:
        _divergence(lineage, against, open_store(region, store, quorum), as_json)
        return
    try:
        events = Journal(open_store(region, store, quorum).core, lineage).events()
        summary = fold_journal(events)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    shown = [event.model_dump(mode="json", exclude={"format", "format_version", "event_digest"}) for event in events]
    if as_json:
        _emit({"lineage": lineage, "summary": summary.model_dump(mode="json"), "events": shown})
        return
    if not events:
        console.print(f"lineage {lineage} has no journal events")
        return
    table = Table(title=f"journal of {lineage}")
    for column in ("seq", "time", "run", "event", "details"):
        table.add_column(column)
    for event in shown:
        data = event["data"]
        shown_keys = [key for key in data if key not in _HIDDEN_HISTORY_KEYS]
        shown_keys.sort(key=lambda key: (key != "step", key))  # the step's name first
        details = ", ".join(f"{key}={data[key]}" for key in shown_keys)
        table.add_row(str(event["seq"]), event["time"][:19].replace("T", " "), event["run_id"][:8], event["kind"],
                      details[:120])  # fmt: skip
    console.print(table)
    where = summary.interrupted_step or summary.failed_step
    console.print(
        f"status: {summary.status}"
        + (f", stopped in step {where!r}" if where and summary.status != "finished" else "")
        + (f", last checkpoint v{summary.last_checkpoint['version']}" if summary.last_checkpoint else "")
    )


def _divergence(a: str, b: str, checkpoint_store: CheckpointStore, as_json: bool) -> None:
    from .training.divergence import first_divergence

    try:
        found = first_divergence(checkpoint_store.core, a, b)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit({"lineage": a, "against": b, "identical": found is None,
               "first_divergence": None if found is None else {
                   "step": found.step, "tier": found.tier, "trigger": found.trigger,
                   "versions": list(found.versions), "first_cause": found.first_cause,
                   "differing": found.differing, "identical_before": found.compared,
                   "execution_differences": found.execution, "ended_at": found.ended_at,
                   "run_differences": found.runs}})  # fmt: skip
        return
    console.print(f"{a} and {b}: every checkpoint identical" if found is None else found.describe(a, b))


@app.command("demo")
def demo(
    lineage: Annotated[str, typer.Option("--lineage", help="Lineage of the run.")] = "demo",
    steps: Annotated[int, typer.Option("--steps", help="Training steps.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, model and RNGs.")] = 0,
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Run the example pipeline (embedded defaults unless --region/--store); resume the lineage if it is unfinished."""
    from .examples.pipeline import example_pipeline
    from .flows.lineage_status import lineage_status

    try:
        before = lineage_status(open_store(region, store, quorum), lineage)
        if not as_json and before.status == "unfinished":
            latest = before.latest
            console.print(
                f"lineage {lineage} has an unfinished run: resuming"
                + (f" from version {latest.version} (step {latest.step})" if latest else " from the start")
            )
        with _progress(as_json, "demo"):  # checkpoints written, and read when it resumes
            result = example_pipeline(
                lineage=lineage, steps=steps, seed=seed, store_block=store, regions=region or None, write_quorum=quorum
            )
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    except typer.Exit:  # _fail's, inside the try
        raise
    except Exception as exc:  # the pipeline's own error: one line (the flow run's log has the traceback)
        _pipeline_failed(exc, as_json)
    payload = {key: result[key] for key in ("lineage", "status", "final_version", "final_digest", "resumed_from")}
    if as_json:
        _emit(payload)
        return
    if result["status"] == "finished":
        console.print(f"lineage {lineage} already finished: final version {result['final_version']}")
    else:
        resumed = result["resumed_from"]
        how = f"resumed from v{resumed['version']} (step {resumed['step']})" if resumed else "from scratch"
        console.print(f"lineage {lineage} completed {how}: final version {result['final_version']}")
    console.print(f"final state digest {result['final_digest']}")


def latest_unfinished_lineage(store: CheckpointStore) -> str | None:
    """The unfinished lineage (journal status running or failed) with the most recent event."""
    from .core.journal import Journal, JournalError
    from .core.layout import LIGHT_SUFFIX, STEPS_SUFFIX

    candidates: list[tuple[str, str]] = []
    unreadable: dict[str, str] = {}
    for name in store.lineages():
        if name.endswith((STEPS_SUFFIX, LIGHT_SUFFIX)):
            continue
        try:
            history = Journal(store.core, name).history()
        except JournalError as exc:  # every journal is read: one that cannot be may be the crashed run's
            unreadable[name] = str(exc)
            continue
        if history.status in ("running", "failed"):
            candidates.append((history.last_time or "", name))
    if unreadable:
        name, cause = next(iter(sorted(unreadable.items())))
        others = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise JournalError(
            f"cannot tell which lineage to recover: the journal of lineage {name!r}{others} cannot be read, and it "
            f"may be the crashed run's. Pass --lineage NAME to recover a lineage; {cause}"
        )
    return max(candidates)[1] if candidates else None


@app.command("recover")
def recover_command(
    lineage: Annotated[
        str | None, typer.Option("--lineage", help="Lineage to recover (default: the latest unfinished one).")
    ] = None,
    crashed_run: Annotated[
        str | None,
        typer.Option(
            "--crashed-run",
            help="Instead of --lineage: the id of a crashed flow run; its lineage is read from the journal.",
        ),
    ] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="'latest' or a version number.")] = "latest",
    from_step: Annotated[
        str | None, typer.Option("--from-step", help="Run this step and all later ones again.")
    ] = None,
    preflight: Annotated[
        str, typer.Option("--preflight", help="strict: stop on any failed check; warn: report and go on.")
    ] = "strict",
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Recover a crashed pipeline run: preflight checks, restore, resume at the failed step."""
    from .blocks.checkpoint_store import HOME_ENV, recovery_home, shared_store
    from .flows.recover import recover
    from .tasks.errors import PreflightError

    if preflight not in ("strict", "warn"):
        _fail(f"--preflight must be strict or warn, got {preflight!r}", as_json)
    if lineage is not None and crashed_run is not None:
        _fail("give either --lineage or --crashed-run, not both", as_json)
    if not region and not store and not recovery_home().exists():
        # Checked before opening: the default store would create an empty one here.
        _fail(
            f"no checkpoint store at {recovery_home()} (the default store: ${HOME_ENV}, else ./.prefect-recovery "
            f"under the working directory {os.getcwd()}). Run from the directory the pipeline ran in, set "
            f"{HOME_ENV}, or pass --region / --store",
            as_json,
            code=1,
        )
    try:
        checkpoint_store = open_store(region, store, quorum)
        if lineage is not None and lineage not in checkpoint_store.lineages():
            # Refused before Prefect starts a flow run (whose failure would print its traceback).
            where = ", ".join(r.url for r in checkpoint_store.regions)
            _fail(
                f"no lineage {lineage!r} in the store at {where}: `prefect-recovery ls` lists its lineages",
                as_json,
            )
        if crashed_run is not None:
            # The lineage that run journaled, read before Prefect starts a flow run (one line, not a failed run).
            from .flows.recover import lineage_of_run

            lineage = lineage_of_run(checkpoint_store, crashed_run)
        lineage = lineage or latest_unfinished_lineage(checkpoint_store)
        if lineage is None:
            where = ", ".join(r.url for r in checkpoint_store.regions)
            _fail(f"no unfinished lineage in the store at {where}: nothing to recover", as_json, code=1)
        if not as_json:
            found = f" (flow run {crashed_run} worked on it: its journal)" if crashed_run else ""
            console.print(f"recovering lineage {lineage}{found} ({preflight} preflight)", soft_wrap=True)
        # The flow (and the pipeline run it starts) use the store opened here: one block load.
        with shared_store(checkpoint_store, store, region or None, quorum), _progress(as_json, "recovering"):
            result = recover(lineage=lineage, checkpoint=checkpoint, from_step=from_step, preflight=preflight,
                             store_block=store, regions=region or None, write_quorum=quorum)  # fmt: skip
    except PreflightError as exc:
        if not as_json:
            for row in exc.results:
                console.print(f"  {row['status']:>4}  {row['check']}: {row['reason']}", soft_wrap=True)
        _fail(str(exc), as_json)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    except typer.Exit:  # _fail's, inside the try
        raise
    except Exception as exc:  # the pipeline's own error: one line (the flow run's log has the traceback)
        _pipeline_failed(exc, as_json)
    keys = ("lineage", "status", "final_version", "final_digest", "resumed_from", "failed_step", "reused_steps",
            "preflight")  # fmt: skip
    payload = {key: result[key] for key in keys if key in result}
    if as_json:
        _emit(payload)
        return
    if result["status"] == "finished":
        console.print(f"lineage {lineage} already finished: final version {result['final_version']}; nothing changed")
        return
    for row in result["preflight"]:
        console.print(f"  {row['status']:>4}  {row['check']}: {row['reason']}", soft_wrap=True)
    resumed = result["resumed_from"]
    how = f"from v{resumed['version']} (step {resumed['step']})" if resumed else "from the start"
    console.print(
        f"lineage {lineage} recovered {how} at step {result['failed_step']!r}; reused steps: "
        f"{', '.join(result['reused_steps']) or 'none'}; final version {result['final_version']}"
    )
    console.print(f"final state digest {result['final_digest']}")


@app.command("replay-check")
def replay_check_command(
    lineage: Annotated[str, typer.Option("--lineage", help="Lineage whose training to replay.")],
    from_version: Annotated[int, typer.Option("--from", help="Checkpoint version to start from.")],
    to_version: Annotated[int, typer.Option("--to", help="Later version whose stored state the replay must equal.")],
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Re-run training from --from to --to's step and compare tensor by tensor. Exit 0 deterministic, 1 not."""
    from .flows.replay import describe, replay_check

    try:
        with _progress(as_json, "replaying"):  # the checkpoints read
            report = replay_check(open_store(region, store, quorum), lineage, from_version, to_version)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit(report.model_dump(mode="json"))
    else:
        console.print(
            ("[green]" if report.deterministic else "[red]") + escape_markup(describe(report)) + "[/]",
            soft_wrap=True,
            markup=True,
        )
        for name in report.differing[1:10]:
            console.print(f"  also differs: {name}", soft_wrap=True)
        for note in report.notes:
            console.print(f"note: {note}", soft_wrap=True)
    raise typer.Exit(0 if report.deterministic else 1)


@app.command("serve")
def serve_command(
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many concurrent runs.")] = None,
) -> None:
    """Serve the example-pipeline, recover and daily audit deployments from this process."""
    from .deploy import deployment_home, serve

    # The served runs' default store is not the CLI's (./.prefect-recovery): say where it is.
    err_console.print(
        f"runs without a store block keep checkpoints under {deployment_home()} "
        "(set PREFECT_RECOVERY_HOME to choose; the same value lets `prefect-recovery ls` see them)",
        soft_wrap=True,
    )
    serve(limit=limit)


automations_app = typer.Typer(help="Prefect automations for crash detection and automatic recovery.")
app.add_typer(automations_app, name="automations")


@automations_app.command("install")
def automations_install(
    deployment: Annotated[
        list[str] | None,
        typer.Option(
            "--deployment",
            help="Watch and recover runs of this deployment, FLOW/DEPLOYMENT (repeatable).",
        ),
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag",
            help="Watch and recover runs carrying this tag (repeatable). Default, with no --deployment: "
            "prefect-recovery.",
        ),
    ] = None,
    zombie_after: Annotated[
        int,
        typer.Option(
            "--zombie-after",
            help="Seconds without a heartbeat before a run is marked Crashed (at least 60: two heartbeats).",
        ),
    ] = 120,
    max_attempts: Annotated[
        int,
        typer.Option(
            "--max-attempts",
            min=1,
            help="Recoveries of one crash that are started when recoveries themselves crash; then give up.",
        ),
    ] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Create (or update) the zombie-run detector, the auto-recover trigger for your deployments and the one
    that recovers crashed recoveries (at most --max-attempts); safe to re-run (the last install's scope wins)."""
    from datetime import timedelta

    import httpx

    from .deploy import RECOVER_AGAIN_AUTOMATION, AutomationScopeError, install_automations

    try:
        results = install_automations(
            deployment or [], tag or [], zombie_after=timedelta(seconds=zombie_after), max_attempts=max_attempts
        )
    except AutomationScopeError as exc:
        _fail(f"cannot install automations: {exc}", as_json)
    except (OSError, httpx.TransportError) as exc:  # nothing answers at PREFECT_API_URL
        _fail(_no_server("cannot install automations", exc), as_json)
    except Exception as exc:  # the server's answer (refused, an error) is the message
        _fail(
            f"cannot install automations: {exc}. Serve or deploy the deployments first "
            "(`prefect-recovery serve` or `prefect deploy --all`) and check PREFECT_API_URL",
            as_json,
        )
    if as_json:
        _emit(results)
        return
    for row in results:
        scope = row["scope"]
        matched = ", ".join([*scope["deployments"], *(f"tag {t}" for t in scope["tags"])])
        if row["automation"] == RECOVER_AGAIN_AUTOMATION:
            matched = f"recover runs, at most {max_attempts} attempts"
        console.print(f"{row['action']}: {row['automation']} (runs of {matched})", soft_wrap=True)


@app.command("crash-test")
def crash_test(
    steps: Annotated[int, typer.Option("--steps", help="Training steps of each run.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, model and RNGs.")] = 0,
    kill_after: Annotated[
        int, typer.Option("--kill-after", help="SIGKILL the run once this many checkpoints are committed.")
    ] = 4,
    as_json: JsonOpt = False,
) -> None:
    """Run the demo uninterrupted, then again killed with SIGKILL part-way and resumed; compare."""
    from .crash_test import run_crash_test

    say = None if as_json else (lambda message: console.print(message, soft_wrap=True))
    result = run_crash_test(steps=steps, seed=seed, kill_after=kill_after, say=say)
    if as_json:
        _emit(result)
    if not result["identical"]:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # `python -m prefect_recovery.cli`
    main()
