"""The `audit` command line: parse arguments, call the Python API, format its typed results.

Exit codes (the table in ``errors.py``): 0 success, 1 input or artifact error, 2 usage error, 3 a member was found
(only with --fail-on-member), 70 an unexpected error (a bug), 130 interrupted. Domain errors print one line on
stderr; an unexpected error prints one line naming the file its traceback was written to.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer
from typer.exceptions import TyperException

from .errors import EXIT_INTERRUPTED, EXIT_MEMBER_FOUND, AuditError, error_codes, unexpected_message

T = TypeVar("T")

# The command being run, for the one line that reports a bug.
_COMMAND: contextvars.ContextVar[str] = contextvars.ContextVar("command", default="audit")


def run(fn: Callable[[], T]) -> T:
    """The one boundary: a domain error becomes its one-line message and its exit code from ``errors.ERRORS``;
    any other exception one line (what failed, where its traceback was written) and exit code 70."""
    try:
        return fn()
    except (typer.Exit, typer.Abort, TyperException):
        raise  # typer's own exits and usage errors, and a boundary already crossed
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except AuditError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(error_codes(exc)[0]) from None
    except Exception as exc:
        typer.echo(f"error: {unexpected_message(exc, _COMMAND.get())}", err=True)
        raise typer.Exit(error_codes(exc)[0]) from None


class _Typer(typer.Typer):
    """A Typer whose every command runs inside ``run``, its formatting included."""

    def __init__(self, *args, prog: str = "audit", **kwargs):
        super().__init__(*args, **kwargs)
        self.prog = prog

    def command(self, name: Optional[str] = None, **kwargs):
        register = super().command(name, **kwargs)

        def decorator(fn):
            where = f"`{self.prog} {name or fn.__name__.replace('_', '-')}`"

            @functools.wraps(fn)  # typer reads the options from the wrapped signature
            def bounded(*a, **kw):
                _COMMAND.set(where)
                return run(lambda: fn(*a, **kw))

            register(bounded)
            return fn

        return decorator


app = _Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
             help="Was this image in the training set of that text-to-image generator?")
toy_app = _Typer(prog="audit toy", no_args_is_help=True,
                 help="The bundled toy world: rebuild it, or draw auxiliary data from it.")
app.add_typer(toy_app, name="toy")
heads_app = _Typer(prog="audit heads", no_args_is_help=True,
                   help="The default heads of each target: list, choose, remove.")
app.add_typer(heads_app, name="heads")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    from .progress import silence_libraries

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    silence_libraries(verbose)
    _setup_logging(verbose)


def _echo_json(obj) -> None:
    """A result as JSON on stdout (numpy values, NaN and Paths made JSON-safe), for pipelines."""
    import json

    from .report.jsonl import to_jsonable

    typer.echo(json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False))


_MAX_FPR_HELP = ("False-positive budget: `member` only where at most this fraction of unseen non-members would be "
                 "called members (split-conformal threshold on the heads' validation non-members).")
_MAX_MISS_HELP = "Miss budget for `non-member` verdicts (fraction of members missed; default: --max-fpr)."
_DECISION_HELP = ("budget: member / non-member / inconclusive at --max-fpr; balanced: two-way, the threshold "
                  "maximising balanced accuracy on validation.")


def _max_fpr_option():
    return typer.Option(0.01, "--max-fpr", help=_MAX_FPR_HELP)


def _max_miss_option():
    return typer.Option(None, "--max-miss", help=_MAX_MISS_HELP)


def _decision_option():
    return typer.Option("budget", "--decision", help=_DECISION_HELP)


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


@app.command("train")
def train_cmd(
    store: Path = typer.Argument(..., help="Feature store (.h5) written by `audit features` on auxiliary data."),
    out: Path = typer.Option(..., "--out", help="Heads folder to write: one ONNX head per attack + heads.json."),
    attacks: str = typer.Option("all", "--attacks", help="Comma-separated subset of I-P,I-S,II-P,II-S,III-X,III-T,"
                                "IV (black-box) and loss,PIA,SecMI and their -score forms (gray-box); default: every "
                                "attack whose features the store holds. The blind baseline is always trained too."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/validation/test split and of training."),
    epochs: int = typer.Option(200, "--epochs", help="Most epochs per head (early stopping on rows held out of the training split)."),
    folds: int = typer.Option(5, "--folds", help="Cross-fit K heads per attack (K >= 2): every row outside the "
                              "test split is scored out of fold and all of them calibrate the verdicts, so 200 + 200 "
                              "rows resolve a 1% budget. 0: one train/validation split (50/25/25)."),
    test_fraction: float = typer.Option(0.25, "--test-fraction", help="Share of rows held out as the test split "
                                        "`evaluate` measures on (0 only with cross-fitting)."),
    register: bool = typer.Option(False, "--register/--no-register",
                                  help="Make these the default heads of the store's target, used by check/scan "
                                  "without --heads (in $AUDIT_HOME or ~/.cache/audit; see `audit heads`)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for fitting the (tiny) heads; 0: library default."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON (for pipelines)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train the attack heads on a feature store (cross-fitted in 5 folds by default), calibrate them on the
    out-of-fold (or validation) rows, export them to ONNX."""
    from . import api

    res = run(lambda: api.train(store, out, attacks=attacks, seed=seed, register=register, epochs=epochs,
                                threads=threads, quiet=quiet, folds=folds, test_fraction=test_fraction))
    if json_out:
        return _echo_json(res.to_dict())
    info = res.info
    on = "oof" if info["split"].get("mode") == "cross-fit" else "val"
    typer.echo(f"{'attack':<11} {'tier':<9} {on + ' AUC':>8} {on + ' acc':>8} {'threshold':>10} {'epochs':>7}")
    for name, e in info["attacks"].items():
        v = e["validation"]
        auc = "-" if v["auc"] is None else f"{v['auc']:.3f}"
        typer.echo(f"{name:<11} {e.get('tier', '-'):<9} {auc:>8} {v['accuracy']:>8.3f} {e['threshold']:>10.3f} "
                   f"{e['training']['epochs_run']:>7}")
    counts = info["split"]["counts"]
    typer.echo("split (members/non-members): " + ", ".join(f"{s.replace('_', '-')} {c['members']}/{c['nonmembers']}"
                                                           for s, c in counts.items() if isinstance(c, dict))
               + (f"; {info['split']['folds']} cross-fitted folds" if info["split"].get("folds") else ""))
    blind = info.get("blind_baseline") or {}
    if blind.get("distribution_shift_warning"):
        typer.echo(f"warning: {blind['message']}", err=True)
    typer.echo(f"heads written to {res.heads} (default attack {info['default_attack']})"
               + (f"; registered at {res.registered}" if res.registered else ""))


@heads_app.command("list")
def heads_list(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The heads check/scan use without --heads: one registered folder per target, and the bundled toy heads."""
    from . import api
    from .attacks.heads import provenance_line

    rows = run(api.heads_list)
    if json_out:
        return _echo_json(rows)
    if not rows:
        typer.echo("no heads registered; `audit heads use HEADS` or `audit train ... --register` registers some")
    for r in rows:
        target = r.get("target") or {}
        over = f"; not in use: {r['overridden_by']} is registered for it" if r.get("overridden_by") else ""
        typer.echo(f"{r['key']}: target {target.get('name')!r} (weights {target.get('hash')}){over}")
        typer.echo(f"  {provenance_line(r)}")


@heads_app.command("use")
def heads_use(heads: Path = typer.Argument(..., help="Heads folder from `audit train`.")) -> None:
    """Make these heads the default of the target they were trained for (copied into the registry)."""
    from . import api

    r = run(lambda: api.heads_use(heads))
    typer.echo(f"{r['key']}: check/scan of target {(r.get('target') or {}).get('name')!r} now use {r['path']} "
               f"(copied from {r['registered_from']})")


@heads_app.command("remove")
def heads_remove(name: str = typer.Argument(..., help="Registry key as `audit heads list` shows it, or a target "
                                            "name (all its registered heads).")) -> None:
    """Unregister a target's default heads (the bundled toy heads become the toy target's default again)."""
    from . import api

    for p in run(lambda: api.heads_remove(name)):
        typer.echo(f"removed {p}")


@app.command("evaluate")
def evaluate_cmd(
    store: Path = typer.Argument(..., help="The feature store the heads were trained on."),
    heads: Optional[Path] = typer.Option(None, "--heads", help="Heads folder (default: the store target's "
                                         "registered heads)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON here, and the ROC "
                                            "plot beside it (.png)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the ROC plot here instead."),
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write an HTML report (ROC, histograms, "
                                          "most and least member-like test images)."),
    max_fpr: float = _max_fpr_option(),
    max_miss: Optional[float] = _max_miss_option(),
    decision: str = _decision_option(),
) -> None:
    """Accuracy, AUC and TPR at 1% / 0.1% FPR per attack on the heads' test split, with bootstrap 95% CIs, and
    what the verdicts at --max-fpr do there (fraction decided, FPR, precision, TPR)."""
    from . import api
    from .attacks.evaluate import format_table

    result = run(lambda: api.evaluate(store, heads, json_out=json_out, plot=plot, n_boot=n_boot, seed=seed,
                                      report=report, max_fpr=max_fpr, decision=decision, max_miss=max_miss))
    typer.echo(format_table(result.to_dict()))
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    if json_out is not None:
        typer.echo(f"metrics written to {json_out}")
    if result.plot:
        typer.echo(f"ROC plot written to {result.plot}")
    if result.report:
        typer.echo(f"report written to {result.report}")


@app.command("report")
def report_cmd(
    results: Path = typer.Argument(..., help="A scan's results (.jsonl) or `audit evaluate --json` output."),
    out: Path = typer.Option(..., "--out", help="HTML report to write (one self-contained file)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Feature store, for generated images beside the "
                                         "queries (evaluate: default, the store the evaluation names)."),
    heads: Optional[Path] = typer.Option(None, "--heads", help="Heads folder (evaluate: default, the heads the "
                                         "evaluation names)."),
    images: Optional[Path] = typer.Option(None, "--images", help="The scanned folder: a scan report embeds only "
                                          "query images under it (default: the results file's folder)."),
) -> None:
    """Write the HTML report of a finished scan or evaluation."""
    from . import api

    typer.echo(f"report written to {run(lambda: api.report(results, out, store=store, heads=heads, images=images))}")


# ------------------------------------------------------------------------- features, check, scan, demo

_TARGET_HELP = "Registered name, diffusers folder, `audit export` folder, or http(s):// URL."
_EMBEDDER_HELP = "Embedder: registered name or CLIP folder (default: the target's)."
_CAPTIONER_HELP = "Captioner: registered name or BLIP folder (default: the target's)."
_HEADS_HELP = "Heads folder from `audit train` (default: the heads registered for the target)."
_EVIDENCE_HELP = ("Log each verdict in this evidence database (SQLite file or postgresql://...), as `audit serve` "
                  "does; check it with `audit evidence verify`.")
_RAY_HELP = ("Compute the batches on a Ray cluster: ray://HEAD:10001, auto, HOST:PORT, or local (a private cluster "
             "on this machine, stopped afterwards); the output is the same. Needs pip install 'audit[ray]'.")
_WORKERS_HELP = "With --ray: workers, each holding its own copy of the models (and with --device cuda one GPU)."
_THREADS_HELP = "With --ray: CPU threads per worker (default: those this command uses on this machine)."


def _on_ray(ray: dict | None) -> str:
    return f" on Ray ({ray['workers']} worker{'s' if ray['workers'] > 1 else ''})" if ray else ""


_REFERENCE_HELP = ("A reference model (the base a fine-tune started from; `toy-base` for the toy target): every "
                   "feature is computed on it too, with the same seeds and noise, for the calibrated attacks (X-ref, "
                   "X-ref-score). It must share the target's resolution, latent shape, noise schedule and VAE. About "
                   "doubles the featurising cost.")
_REFERENCE_CHECK_HELP = "The reference model the heads were trained with (`features --reference`), if any."
_TIER_SCORE_HELP = ("Score only the heads' attacks of these tiers, computing only their features: black-box, "
                    "gray-box, variation, all or a comma list (default: every tier the heads read; the blind "
                    "baseline always).")


@app.command()
def features(
    target: str = typer.Option(..., "--target", help=_TARGET_HELP),
    data: Path = typer.Option(..., "--data", help="ImageFolder: images + metadata.jsonl (text, member)."),
    out: Path = typer.Option(..., "--out", help="Feature store to write (HDF5)."),
    n_gen: int = typer.Option(2, "--n-gen", help="Images generated per caption."),
    steps: int = typer.Option(25, "--steps", help="Denoising steps per image."),
    guidance: float = typer.Option(1.0, "--guidance", help="Classifier-free guidance scale (1 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated images."),
    batch_size: str = typer.Option("8", "--batch-size", help="Captions per generation batch, or auto: the largest "
                                   "that fits in the available memory (compiled targets)."),
    caption_tokens: int = typer.Option(30, "--caption-tokens", help="Most tokens per caption of a generated image."),
    pixel_size: int = typer.Option(32, "--pixel-size", help="Side of the square thumbnails of query and generated "
                                   "images the pixel attacks compare (recorded in the store; heads and check/scan "
                                   "follow it)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help=_EMBEDDER_HELP),
    captioner: Optional[str] = typer.Option(None, "--captioner", help=_CAPTIONER_HELP),
    tier: str = typer.Option("black-box", "--tier", help="black-box (generate, caption, embed), gray-box (the "
                             "target's own denoising errors: loss, PIA, SecMI; local diffusion targets), variation "
                             "(the target's img2img variations of each image) or all."),
    graybox_timesteps: Optional[str] = typer.Option(None, "--graybox-timesteps", help="Gray-box: comma-separated "
                                                    "timesteps at which each attack's error is read (default "
                                                    "100,200,300)."),
    var_strengths: Optional[str] = typer.Option(None, "--var-strengths", help="Variation: comma-separated img2img "
                                                "strengths of the sweep (default 0.1,0.2,0.4; each runs the last "
                                                "strength x --steps DDIM steps)."),
    n_var: Optional[int] = typer.Option(None, "--n-var", help="Variation: variations (seeds) per strength "
                                        "(default 2)."),
    reference: Optional[str] = typer.Option(None, "--reference", help=_REFERENCE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted store."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (runs their code)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON (for pipelines)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help=_RAY_HELP),
    workers: int = typer.Option(1, "--workers", help=_WORKERS_HELP),
    threads: int = typer.Option(0, "--threads", help=_THREADS_HELP),
) -> None:
    """The features the attacks read, for every row of an ImageFolder: generated images, their captions and
    embeddings (black-box tier), the target's denoising errors on each image (gray-box tier) and/or how close the
    target's variations of each image come back to it (variation tier)."""
    from . import api

    s = run(lambda: api.featurize(target, data, out, embedder=embedder, captioner=captioner, n_gen=n_gen,
                                  steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                                  caption_tokens=caption_tokens, pixel_size=pixel_size, resume=resume,
                                  quiet=quiet, device=device, allow_pickle=allow_pickle, ray=ray, workers=workers,
                                  threads=threads, tier=tier, reference=reference,
                                  graybox_timesteps=_int_list(graybox_timesteps, "--graybox-timesteps"),
                                  var_strengths=_float_list(var_strengths, "--var-strengths"), n_var=n_var))
    if json_out:
        return _echo_json(s.to_dict())
    failed = ", ".join(f"{n} {k}" for k, n in sorted(s.status.items()) if k != "ok")
    evals = ", ".join(f"{t} {n}" for t, n in s.unet_evaluations_per_query.items())
    typer.echo(f"wrote {s.rows} rows to {s.out} ({s.ok} ok{'; ' + failed if failed else ''}) in "
               f"{s.seconds:.1f} s{_on_ray(s.ray)}; tiers {', '.join(s.tiers)} (UNet evaluations per query: "
               f"{evals}); embedder {s.embedder['name']}, captioner {s.captioner['name']}"
               + (f"; reference {s.reference['name']}" if s.reference else ""))


def _int_list(text: Optional[str], option: str) -> Optional[tuple[int, ...]]:
    """``"100,200"`` -> (100, 200); a usage error naming the option otherwise."""
    from .errors import UsageError

    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got {text!r}") from None


def _heads_line(source: dict | None) -> None:
    """Which heads decide, and where they came from, in one line on stderr (--json carries it as heads_source)."""
    from .attacks.heads import provenance_line

    if source:
        typer.echo(provenance_line(source), err=True)


def _float_list(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    """``"0.2,0.4"`` -> (0.2, 0.4); a usage error naming the option otherwise."""
    from .errors import UsageError

    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        return run(lambda: (_ for _ in ()).throw(UsageError(f"{option}: expected comma-separated numbers, got "
                                                             f"{text!r}")))


def _verdict_line(v) -> str:
    if v.status != "ok":
        return f"{v.image}: not scored ({v.status}): {v.error}"
    return f"{v.image}: {v.verdict} (P(member) {v.probability:.3f}, attack {v.attack}, {v.tier})"


def _rule_line(decision: dict | None) -> str:
    """The verdict rule in one line, from a Verdict's (or a scan summary's) ``decision`` dict."""
    from .attacks.decision import Decision

    if not decision:
        return "rule: unknown"
    rule = Decision.from_dict(decision)
    return f"rule ({rule.attack}): {rule.describe()}"


@app.command()
def check(
    image: Path = typer.Argument(..., help="The query image."),
    caption: Optional[str] = typer.Option(None, "--caption", help="Its caption (default: IMAGE.txt, else the "
                                          "captioner writes one)."),
    target: str = typer.Option(..., "--target", help=_TARGET_HELP),
    heads: Optional[Path] = typer.Option(None, "--heads", help=_HEADS_HELP),
    attack: Optional[str] = typer.Option(None, "--attack", help="Attack that decides (default: the heads')."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help=_EMBEDDER_HELP),
    captioner: Optional[str] = typer.Option(None, "--captioner", help=_CAPTIONER_HELP),
    reference: Optional[str] = typer.Option(None, "--reference", help=_REFERENCE_CHECK_HELP),
    tier: Optional[str] = typer.Option(None, "--tier", help=_TIER_SCORE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
    fail_on_member: bool = typer.Option(False, "--fail-on-member", help="Exit with code 3 on a member verdict "
                                        "(never on inconclusive)."),
    max_fpr: float = _max_fpr_option(),
    max_miss: Optional[float] = _max_miss_option(),
    decision: str = _decision_option(),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (runs their code)."),
    evidence: Optional[str] = typer.Option(None, "--evidence", help=_EVIDENCE_HELP),
    server: Optional[str] = typer.Option(None, "--server", help="Ask a running `audit serve` at this URL instead "
                                         "of loading the models here (key: $AUDIT_API_KEY)."),
) -> None:
    """Was this image (with this caption) in the target's training data? member, non-member or inconclusive."""
    from . import api
    from .errors import InputError

    if server:
        local_only = {"--embedder": embedder, "--captioner": captioner, "--reference": reference,
                      "--evidence": evidence, "--max-miss": max_miss, "--allow-pickle": allow_pickle or None,
                      "--decision": None if decision == "budget" else decision,
                      "--device": None if device == "cpu" else device}
        v = run(lambda: _check_on_server(server, image, caption, target, heads, attack, max_fpr, tier, local_only))
    else:
        v = run(lambda: api.check(image, caption, target=target, heads=heads, embedder=embedder,
                                  captioner=captioner, attack=attack, device=device, allow_pickle=allow_pickle,
                                  max_fpr=max_fpr, decision=decision, max_miss=max_miss, reference=reference,
                                  evidence=evidence, tier=tier))
    if json_out:
        typer.echo(v.to_json(indent=2))
    _heads_line(v.heads_source)
    if v.status != "ok":
        raise InputError(v.error or v.status)
    if not json_out:
        typer.echo(_verdict_line(v))
        typer.echo(_rule_line(v.decision))
        source = " (written by the captioner)" if v.caption_source == "captioner" else ""
        typer.echo(f"caption{source}: {v.caption}")
        typer.echo("scores: " + ", ".join(f"{a} ({s['tier']}) {s['probability']:.3f} ({s['verdict']})"
                                          for a, s in v.scores.items()))
        for w in v.warnings:
            typer.echo(f"warning: {w}", err=True)
    if getattr(v, "evidence_id", None):
        typer.echo(f"evidence record: {v.evidence_id}", err=True)
    if fail_on_member and v.is_member:
        raise typer.Exit(EXIT_MEMBER_FOUND)


def _check_on_server(server, image, caption, target, heads, attack, max_fpr, tier, local_only: dict):
    from .errors import UsageError
    from .service.client import Client

    if local_only.get("--evidence"):
        raise UsageError("--evidence logs local checks; with --server the service logs the verdict in its own "
                         "evidence database")
    # The service holds its own models, reference and rule: a flag it cannot honour is refused, not dropped.
    given = [flag for flag, value in local_only.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: with --server the service's models and verdict rule apply (its "
                         "/v1/info lists them); a request may set --heads, --attack, --max-fpr and --tier only")
    with Client(server) as client:
        return client.check(image, caption, target=target, heads=str(heads) if heads else None, attack=attack,
                            max_fpr=max_fpr, tier=tier)


@app.command()
def scan(
    folder: Path = typer.Argument(..., help="Folder of images (ImageFolder; captions optional)."),
    target: str = typer.Option(..., "--target", help=_TARGET_HELP),
    out: Path = typer.Option(..., "--out", help="Results file (JSONL, one line per image)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write an HTML report."),
    heads: Optional[Path] = typer.Option(None, "--heads", help=_HEADS_HELP),
    attack: Optional[str] = typer.Option(None, "--attack", help="Attack that decides (default: the heads')."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help=_EMBEDDER_HELP),
    captioner: Optional[str] = typer.Option(None, "--captioner", help=_CAPTIONER_HELP),
    reference: Optional[str] = typer.Option(None, "--reference", help=_REFERENCE_CHECK_HELP),
    tier: Optional[str] = typer.Option(None, "--tier", help=_TIER_SCORE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Skip images already in --out."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per batch."),
    fail_on_member: bool = typer.Option(False, "--fail-on-member", help="Exit with code 3 if any verdict is member "
                                        "(inconclusive never counts)."),
    max_fpr: float = _max_fpr_option(),
    max_miss: Optional[float] = _max_miss_option(),
    decision: str = _decision_option(),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (runs their code)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON (for pipelines)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help=_RAY_HELP),
    workers: int = typer.Option(1, "--workers", help=_WORKERS_HELP),
    threads: int = typer.Option(0, "--threads", help=_THREADS_HELP),
    evidence: Optional[str] = typer.Option(None, "--evidence", help=_EVIDENCE_HELP),
) -> None:
    """Score every image of a folder; results go to a JSONL file as they are computed."""
    from . import api

    s = run(lambda: api.scan(folder, out, target=target, heads=heads, embedder=embedder, captioner=captioner,
                             attack=attack, report=report, resume=resume, batch_size=batch_size, quiet=quiet,
                             device=device, allow_pickle=allow_pickle, max_fpr=max_fpr, decision=decision,
                             max_miss=max_miss, ray=ray, workers=workers, threads=threads, reference=reference,
                             evidence=evidence, tier=tier))
    _heads_line(s.heads_source)
    if json_out:
        _echo_json(s.to_dict())
        if fail_on_member and s.members:
            raise typer.Exit(EXIT_MEMBER_FOUND)
        return
    counts = ", ".join(f"{n} {k}" for k, n in s.counts.items())
    typer.echo(f"scanned {s.rows} rows of {folder} ({counts}) with attack {s.attack} ({s.tier}) in "
               f"{s.seconds:.1f} s{_on_ray(s.ray)}; results in {s.out}")
    typer.echo(_rule_line(s.decision))
    for note in (s.decision or {}).get("notes") or []:
        typer.echo(f"warning: {note}", err=True)
    if report is not None:
        typer.echo(f"report: {s.report}" if s.report else "report: skipped (no HTML report module)")
    if s.evidence:
        typer.echo(f"evidence: {s.evidence['added']} records added to job {s.evidence['job_id']}", err=True)
    if fail_on_member and s.members:
        raise typer.Exit(EXIT_MEMBER_FOUND)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where to write the demo's files (default: a "
                                           "temporary folder, removed afterwards)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON (for pipelines)."),
    runtime: str = typer.Option("onnx", "--runtime", help="onnx: compile the models with `audit export` first and "
                                "run on onnxruntime; torch: PyTorch eager."),
    max_fpr: float = typer.Option(0.05, "--max-fpr", help="False-positive budget of the demo's verdicts (its 50 "
                                  "validation non-members cannot resolve budgets below 1/51)."),
) -> None:
    """The whole audit on the bundled toy world: aux data, (export,) features, train, evaluate, check; prints a
    table."""
    from . import api
    from .demo import format_results

    result = run(lambda: api.demo(workdir, quiet=quiet, runtime=runtime, max_fpr=max_fpr))
    if json_out:
        return _echo_json(result)
    typer.echo(format_results(result))


@app.command()
def experiment(
    out: Path = typer.Option(Path("docs"), "--out", help="Folder for RESULTS.md, its PNG plots and experiment.json."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Cache of data, models, feature stores and "
                                           "heads (default: $AUDIT_HOME/experiment); a rerun resumes it."),
    quick: bool = typer.Option(False, "--quick", help="Tiny settings that exercise every stage (a smoke test; its "
                               "numbers mean nothing)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel worker processes (default: 2)."),
) -> None:
    """The paper's study (RQ1-RQ5, FID analogue, set-level inference) on the toy world -> RESULTS.md + plots."""
    from . import api

    result = run(lambda: api.experiment(out, workdir=workdir, quick=quick, workers=workers))
    typer.echo(f"wrote {Path(out) / 'RESULTS.md'} and {len(result['plots'])} plots in "
               f"{result['run']['total_seconds'] / 60:.1f} min")


@app.command("export")
def export_cmd(
    target: str = typer.Option(..., "--target", help="Target to compile: registered name or diffusers folder."),
    out: Path = typer.Option(..., "--out", help="Export folder to create (must not exist, or be empty)."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda (needs onnxruntime-gpu and a GPU)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 (GPU only)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="Embedder to compile (default: the target's)."),
    captioner: Optional[str] = typer.Option(None, "--captioner", help="Captioner to compile (default: the "
                                            "target's)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (runs their code)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Compile a target and its embedder and captioner to validated ONNX graphs; use the folder as --target."""
    from . import api

    info = run(lambda: api.export(target, out, embedder=embedder, captioner=captioner, device=device,
                                  precision=precision, allow_pickle=allow_pickle, quiet=quiet))
    for name, part in info["components"].items():
        typer.echo(f"{name}: {part['identity']['name']} (weights {part['identity']['hash']}) -> {out / part['path']}")
    checks = info["end_to_end"]
    typer.echo(f"validated every graph against PyTorch; end to end: images within {checks['target']['max_abs_uint8']}"
               f" uint8 levels, embeddings within {max(checks['embedder'].values()):.1e}, captions "
               f"{'equal' if checks['captioner']['captions_equal'] else 'DIFFERENT'} ({info['export_seconds']:.0f} s)")
    typer.echo(f"use it with: audit check IMAGE --target {out}")


_SERVE_TARGET_POINTER = ("`audit serve` is now the auditing service; the txt2img/img2img target emulator is "
                         "`audit serve-target` (same options)")


@app.command("serve-target")
def serve_target(
    target: str = typer.Option(..., "--target", help="Target to serve: registered name or folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(7860, "--port", help="Port (0: any free one)."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", help="Stop after this many requests."),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", help="Stop after this many seconds "
                                                 "without a request."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (runs their code)."),
) -> None:
    """Serve a target over the /sdapi/v1/txt2img HTTP protocol (audit it as a black box with --target URL)."""
    from .serve_target import serve as serve_txt2img

    n = run(lambda: serve_txt2img(target, host, port, device=device, allow_pickle=allow_pickle,
                                  max_requests=max_requests, idle_timeout=idle_timeout,
                                  on_ready=lambda url: typer.echo(f"serving {target} at {url} (Ctrl-C stops)")))
    typer.echo(f"stopped after {n} requests")


@app.command()
def serve(
    target: Optional[list[str]] = typer.Option(None, "--target", help="Target to audit against (repeat for "
                                               "several; the first is the default). " + _TARGET_HELP),
    heads: Optional[list[str]] = typer.Option(None, "--heads", help="Heads folder: one for every target, or one "
                                              "per target (default: each target's registered heads)."),
    reference: Optional[list[str]] = typer.Option(None, "--reference", help="The reference model heads were "
                                                  "trained with (`features --reference`), if any: one for every "
                                                  "target, or one per target."),
    embedder: Optional[list[str]] = typer.Option(None, "--embedder", help="Embedder: registered name or CLIP "
                                                 "folder, one for every target or one per target (default: each "
                                                 "target's)."),
    captioner: Optional[list[str]] = typer.Option(None, "--captioner", help="Captioner: registered name or BLIP "
                                                  "folder, one for every target or one per target (default: each "
                                                  "target's)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1); any but "
                                       "loopback needs --api-keys."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 8000)."),
    db: Optional[str] = typer.Option(None, "--db", help="Evidence database: a SQLite file or postgresql://... "
                                     "(default: $AUDIT_HOME/evidence.db)."),
    api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="File of SHA-256-hashed API keys, one "
                                            "`sha256:HEX` a line, optionally followed by a name (AUDIT_API_KEYS may hold more)."),
    data_root: Optional[list[Path]] = typer.Option(None, "--data-root", help="Folder that scan jobs may read "
                                                   "(repeatable); without one, only uploaded archives."),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Most checks per batched model "
                                                 "call (1: no batching; default 8)."),
    max_wait_ms: Optional[float] = typer.Option(None, "--max-wait-ms", help="Longest wait for a batch to fill "
                                                "(default 20)."),
    queue_size: Optional[int] = typer.Option(None, "--queue-size", help="Most checks waiting; beyond, 503 with "
                                             "Retry-After (default 64)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="JSON file of the service's settings "
                                               "(ServiceConfig fields); flags override it."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="Run scan jobs on a Ray cluster: "
                                      "ray://HEAD:10001, auto, HOST:PORT, or local (a private cluster on this "
                                      "machine); checks stay in this process. Needs pip install 'audit[ray]'."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="With --ray: workers per scan job, each "
                                              "holding its own copy of the models (default 1)."),
    ray_threads: Optional[int] = typer.Option(None, "--ray-threads", help="With --ray: CPU threads per worker "
                                              "(default: those this process uses)."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", hidden=True),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", hidden=True),
) -> None:
    """The auditing service: HTTP checks (batched), scan jobs, an evidence log of every verdict, metrics, a page."""
    from .errors import UsageError
    from .service import ServiceConfig, serve as run_service

    def start():
        if max_requests is not None or idle_timeout is not None:
            raise UsageError(_SERVE_TARGET_POINTER)
        cfg = ServiceConfig.load(config_file) if config_file else ServiceConfig()
        flags = {"host": host, "port": port, "targets": target or None, "heads": heads or None, "db": db,
                 "api_keys": str(api_keys) if api_keys else None,
                 "data_roots": [str(p) for p in data_root] if data_root else None,
                 "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "queue_size": queue_size,
                 "device": device, "reference": reference or None, "embedder": embedder or None,
                 "captioner": captioner or None, "ray": ray, "ray_workers": ray_workers, "ray_threads": ray_threads}
        import dataclasses

        cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
        cfg.validate()
        on_ray = f"; scan jobs on Ray at {cfg.ray}" if cfg.ray else ""
        typer.echo(f"auditing service for {', '.join(cfg.targets)} at http://{cfg.host}:{cfg.port} (models load in "
                   f"the background; GET /v2/health/ready says when they are in; Ctrl-C stops){on_ray}", err=True)
        run_service(cfg)

    run(start)


evidence_app = typer.Typer(no_args_is_help=True, help="The evidence log: verify its hash chain, export records.")
app.add_typer(evidence_app, name="evidence")


@evidence_app.command("verify")
def evidence_verify(db: str = typer.Argument(..., help="Evidence database: a SQLite file or postgresql://...")) -> None:
    """Check every record's digest against its content and the record before it; name the first that fails."""
    from . import api

    result = run(lambda: api.evidence_verify(db))
    if not result["ok"]:
        bad = result["first_bad"]
        typer.echo(f"error: {db}: record {bad['id']} (#{bad['seq']}) does not verify: {bad['problem']}; "
                   f"{result['records']} records before it verify", err=True)
        raise typer.Exit(1)
    typer.echo(f"{db}: {result['records']} records verify; chain head {result['head']}")


@evidence_app.command("export")
def evidence_export(
    db: str = typer.Argument(..., help="Evidence database: a SQLite file or postgresql://..."),
    out: Path = typer.Option(..., "--out", help="JSONL file to write: each record with its in-toto Statement."),
    since: Optional[str] = typer.Option(None, "--since", help="Records at or after this UTC time (ISO 8601)."),
    until: Optional[str] = typer.Option(None, "--until", help="Records before this UTC time (ISO 8601)."),
    job: Optional[str] = typer.Option(None, "--job", help="Only the records of this scan job."),
) -> None:
    """Write evidence records as JSONL, each also as an in-toto Statement whose subject is the image's SHA-256."""
    from . import api

    result = run(lambda: api.evidence_export(db, out, since=since, until=until, job=job))
    typer.echo(f"wrote {result['records']} records to {result['out']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
