"""The `audit` command line: parse arguments, call the Python API, map domain errors to exit codes.

Exit codes: 0 success, 1 input or artifact error, 2 usage error, 3 a member was found (only with
--fail-on-member). Domain errors print one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from .errors import AuditError

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Was this image in the training set of that text-to-image generator?")
toy_app = typer.Typer(no_args_is_help=True, help="The bundled toy world: rebuild it, or draw auxiliary data from it.")
app.add_typer(toy_app, name="toy")


def run(fn: Callable[[], T]) -> T:
    """The one boundary where domain errors become a one-line message and an exit code."""
    try:
        return fn()
    except AuditError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _setup_logging(verbose)


@app.command()
def targets(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List registered targets, embedders and captioners, and where each loads from."""
    from . import api

    rows = run(api.list_models)
    if json_out:
        import json

        typer.echo(json.dumps(rows, indent=2))
        return
    for kind in ("target", "embedder", "captioner"):
        typer.echo(f"{kind}s:")
        for r in (r for r in rows if r["kind"] == kind):
            typer.echo(f"  {r['name']:<34} {r['source']}")


@toy_app.command("build")
def toy_build(
    out: Path = typer.Option(..., "--out", help="Folder to write target/, clip/, blip/ and world.json into."),
    quick: bool = typer.Option(False, "--quick", help="Reduced scale for tests (a few minutes on a CPU)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
) -> None:
    """Rebuild the toy world (data and models) from a seed."""
    from . import api

    world = run(lambda: api.build_toy_world(out, quick=quick, seed=seed, device=device))
    gap = world["metrics"]["membership_gap"]
    typer.echo(
        f"toy world written to {out} in {world['build_seconds']:.0f} s; member/non-member reconstruction MSE "
        f"{gap['member_mse_mean']:.4f} / {gap['nonmember_mse_mean']:.4f}, AUC {gap['auc']:.3f}"
    )


@toy_app.command("data")
def toy_data(
    out: Path = typer.Option(..., "--out", help="ImageFolder to write (images + metadata.jsonl with member)."),
    n_members: int = typer.Option(200, "--n-members"),
    n_nonmembers: int = typer.Option(200, "--n-nonmembers"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write an auxiliary ImageFolder (with a member column) for the bundled `toy` target."""
    from . import api

    path = run(lambda: api.toy_aux_data(out, n_members, n_nonmembers, seed))
    typer.echo(f"wrote {n_members} members and {n_nonmembers} non-members to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
