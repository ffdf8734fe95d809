"""The ``prefect-recovery`` command line (typer + rich). Every command takes ``--json``.

Store selection, the same for every command: ``--region URL`` (repeatable), or ``--store
BLOCK_NAME`` (a saved ``CheckpointStore`` block), or neither for the embedded default (two
local regions under ``$PREFECT_RECOVERY_HOME``, default ``./.prefect-recovery``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from .blocks import CheckpointStore
from .core import CheckpointError

app = typer.Typer(
    name="prefect-recovery",
    help="Recoverable ML pipelines on Prefect: multi-region, verified checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

RegionOpt = Annotated[
    list[str] | None,
    typer.Option("--region", help="Region URL or local path (repeat for several regions)."),
]
StoreOpt = Annotated[str | None, typer.Option("--store", help="Name of a saved CheckpointStore block.")]
QuorumOpt = Annotated[int, typer.Option("--quorum", help="Write quorum when --region is given.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(message: str, as_json: bool, code: int = 2) -> NoReturn:
    if as_json:
        print(json.dumps({"error": message}))
    else:
        err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def open_store(regions: list[str] | None, store: str | None, quorum: int = 1) -> CheckpointStore:
    if regions and store:
        raise typer.BadParameter("give either --region or --store, not both")
    if store:
        return CheckpointStore.load(store)
    if regions:
        return CheckpointStore(regions=regions, write_quorum=quorum)
    return CheckpointStore.default()


def _emit(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@app.command("ls")
def ls(
    lineage: Annotated[str | None, typer.Option("--lineage", help="Only this lineage.")] = None,
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """List consistent checkpoints (committed in at least write_quorum regions)."""
    try:
        infos = open_store(region, store, quorum).list(lineage)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit([info.model_dump(mode="json") for info in infos])
        return
    if not infos:
        console.print("no checkpoints yet")
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
            _human_bytes(info.total_bytes),
            str(len(info.regions)),
            ", ".join(info.lagging) or "-",
        )
    console.print(table)


@app.command("verify")
def verify(
    repair: Annotated[bool, typer.Option("--repair", help="Heal missing or corrupt copies.")] = False,
    lineage: Annotated[str | None, typer.Option("--lineage", help="Only this lineage.")] = None,
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every manifest and blob in every region. Exit 0 when healthy, 1 otherwise."""
    try:
        report = open_store(region, store, quorum).verify(repair=repair, lineage=lineage)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit(report.model_dump(mode="json"))
    else:
        status = "[green]healthy[/]" if report.healthy else "[red]problems remain[/]"
        console.print(
            f"{status}: {report.lineages} lineages, {report.versions} versions, {report.blobs} blobs, "
            f"{_human_bytes(report.bytes_checked)} re-hashed in {len(report.regions)} regions"
        )
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


@app.command("export")
def export(
    lineage: Annotated[str, typer.Option("--lineage", help="Lineage to export.")],
    to: Annotated[Path, typer.Option("--to", help="Directory to write into.")],
    version: Annotated[int | None, typer.Option("--version", help="Version (default: latest).")] = None,
    region: RegionOpt = None,
    store: StoreOpt = None,
    quorum: QuorumOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint as DIR/tensors.safetensors plus DIR/state.json."""
    from .training.export import export_checkpoint

    try:
        summary = export_checkpoint(open_store(region, store, quorum).core, lineage=lineage, version=version, to=to)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit(summary)
    else:
        console.print(
            f"exported {lineage} v{summary['version']} ({summary['tensors']} tensors) to {summary['directory']}"
        )


@app.command("demo")
def demo(
    lineage: Annotated[str, typer.Option("--lineage", help="Lineage to write.")] = "demo",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the small model.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Save, list, verify and restore a small model's checkpoint on the embedded default store."""
    from .demo import run_store_demo

    try:
        result = run_store_demo(lineage=lineage, seed=seed, say=None if as_json else console.print)
    except CheckpointError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit(result)
    if result["status"] != "ok":
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # `python -m prefect_recovery.cli`
    main()
