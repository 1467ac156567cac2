"""The ``stampclf`` command: thin typer commands over the library."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from . import __version__
from ._errors import InputError, StampclfError, check_choice

__all__ = ["app", "main"]

app = typer.Typer(
    name="stampclf",
    help="Classify astronomical image stamps (and images) with ONNX models that carry their own model card.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state: dict[str, bool] = {"debug": False}


_PREP_HELP = (
    "Where stamps are normalised: auto (on the GPU with CUDA, else on the host), host (numpy) or device "
    "(an ONNX graph on the inference device); stamp models only (alert and FITS cut-outs are normalised "
    "on the host)."
)


def _fail(message: str, code: int) -> None:
    typer.echo(f"stampclf: error: {message}", err=True)
    raise typer.Exit(code)


def _guard(fn: Callable[[], Any], printed: Callable[[], bool] = lambda: False) -> Any:
    """Run *fn*, turning errors into one line and an exit code (traceback with --debug).

    *printed*: whether CSV rows have gone to stdout, which an error or Ctrl-C then says
    is incomplete (they cannot be taken back).
    """

    got: list[int] = []

    def on_term(signum: int, _frame: Any) -> None:
        got.append(signum)
        raise KeyboardInterrupt

    def partial() -> str:
        return "the CSV on stdout is incomplete" if printed() else ""

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return fn()
    except StampclfError as exc:
        if _state["debug"]:
            traceback.print_exc()
        _fail("; ".join(filter(None, [str(exc), partial()])), exc.exit_code)
    except KeyboardInterrupt:
        typer.echo(f"stampclf: interrupted; {partial() or 'no output written'}", err=True)
        # the shell's convention, 128 + signal number: 130 for Ctrl-C, 143 for SIGTERM
        raise typer.Exit(128 + (got[0] if got else signal.SIGINT)) from None
    except BrokenPipeError:
        # the reader of stdout went away (`| head`, a crashed consumer): end silently with the
        # status of a process killed by SIGPIPE, as other Unix tools do, so that `set -o
        # pipefail` sees it; stderr closed so that Python's own flush at exit prints nothing
        sys.stderr.close()
        raise typer.Exit(128 + signal.SIGPIPE) from None
    except Exception as exc:  # noqa: BLE001 - last line of defence
        if _state["debug"]:
            traceback.print_exc()
        internal = f"internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for a traceback)"
        _fail("; ".join(filter(None, [internal, partial()])), 1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _debug(value: bool) -> bool:
    if value:
        _state["debug"] = True
    return value  # (a callback's return is the option's value)


#: ``--debug``, before the command or after it (``stampclf classify x.h5 --debug``)
_Debug = Annotated[bool, typer.Option("--debug", callback=_debug, help="Show tracebacks on errors.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stampclf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    debug: _Debug = False,
) -> None:
    _state["debug"] = debug  # reset: a run in this process (tests) must not inherit the last one's


@app.command()
def classify(
    files: Annotated[
        Optional[list[str]],
        typer.Argument(help="HDF5 stamp files, Avro alerts, FITS cut-outs, image files or folders of images."),
    ] = None,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Output .csv or .h5 (default: CSV on stdout).")
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Shipped model name or path to an .onnx file.")] = "hits",
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", "-b", min=1, help="Rows per batch: read, inferred and written together (default: the model card's; 1024 for stamps). On CPU a batch runs in calls of at most 8 MB of input.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: all allowed).")] = None,
    threshold: Annotated[
        Optional[str],
        typer.Option("--threshold", help="Decision threshold in [0, 1], or an operating point of the card, e.g. "
                     "fpr_1pct (stampclf info lists them; default: the card's threshold)."),
    ] = None,
    layout: Annotated[str, typer.Option("--layout", help="HDF5 layout: auto, channels or stacked.")] = "auto",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Stacked stamps are (N, H, W, C).")] = False,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Print metrics against the input's labels.")] = False,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Report a bad file and classify the rest.")] = False,
    progress: Annotated[
        Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No notices, progress or summary on stderr.")] = False,
    precision: Annotated[
        str, typer.Option("--precision", help="fp32, or fp16 (GPU; needs onnxconverter-common; docs/benchmarks.md).")
    ] = "fp32",
    prep: Annotated[
        str, typer.Option("--prep", help=_PREP_HELP)
    ] = "auto",
    scheduler: Annotated[
        Optional[str],
        typer.Option("--scheduler", help="Run on a Dask cluster: scheduler address, or local[:N] (docs/scale-out.md)."),
    ] = None,
    files_from: Annotated[
        Optional[str],
        typer.Option("--files-from", help="Also read input paths from this file, one per line ('-': standard "
                     "input; blank lines and lines starting with # skipped): more files than a command line holds."),
    ] = None,
    debug: _Debug = False,
) -> None:
    """Classify stamps, images, Avro alerts or FITS cut-outs; one output row per input row, in input order."""

    def run() -> int:
        from ._run import classify_files, read_path_list
        from .classifier import Classifier

        paths = [*(files or []), *(read_path_list(files_from) if files_from is not None else [])]
        if not paths:
            raise InputError("no input files given (as arguments or with --files-from); see stampclf classify --help")
        if scheduler:
            return _classify_on_dask(
                scheduler, paths, output, model, batch_size, device, threads, threshold, layout, channels_last,
                keep_going, evaluate, quiet, precision, prep,
            )  # fmt: skip
        clf = Classifier(
            model, device=device, threads=threads, batch_size=batch_size, threshold=threshold, precision=precision,
            prep=prep,
        )
        if clf.notice and not quiet:
            typer.echo(f"stampclf: {clf.notice}", err=True)
        s = classify_files(
            clf, paths, output, batch_size, layout, channels_last, keep_going, evaluate, False if quiet else progress
        )
        code = _report(s, f"with {clf.name} v{clf.version} on {clf.device}", output, quiet, len(paths))
        if s.metrics is not None:
            _print_metrics(s.metrics)
        return code

    from .io._writers import stdout_writes

    printed_before = stdout_writes()
    code = _guard(run, lambda: stdout_writes() > printed_before)
    if code:
        raise typer.Exit(code)


def _classify_on_dask(
    scheduler: str, files: list[str], output: Optional[str], model: str, batch_size: Optional[int], device: str,
    threads: Optional[int], threshold: Optional[str], layout: str, channels_last: bool, keep_going: bool,
    evaluate: bool, quiet: bool, precision: str, prep: str = "auto",
) -> int:  # fmt: skip
    from ._card import read_card, resolve_threshold
    from ._dask import classify_dask, connect
    from ._registry import resolve_model
    from ._session import PRECISIONS
    from .classifier import PREPS

    if evaluate:
        raise InputError("--evaluate is not available with --scheduler (run it without one)")
    check_choice("precision", precision, PRECISIONS)  # before a cluster starts, not on every worker
    check_choice("prep", prep, PREPS)
    card, _ = read_card(resolve_model(model), verify=False)  # a bad model fails before a cluster starts
    threshold = resolve_threshold(card, threshold)
    with connect(scheduler) as client:
        s = classify_dask(
            client, files, model, output, batch_size=batch_size, device=device, threads=threads or 1,
            threshold=threshold, layout=layout, channels_last=channels_last, keep_going=keep_going,
            precision=precision, prep=prep,
        )  # fmt: skip
    return _report(s, f"with {card.name} v{card.version} on Dask ({scheduler})", output, quiet, len(files))


def _report(s: Any, where: str, output: Optional[str], quiet: bool, given: int | None = None) -> int:
    """Print the run's file errors and (unless quiet) its summary line; return the exit code.

    *given*: the number of input paths, when some were left out (``--keep-going``).
    """
    for err in s.file_errors:
        typer.echo(f"stampclf: error: {err}", err=True)
    if not quiet:
        rate = s.rows / s.seconds if s.seconds > 0 else 0.0
        of = f" of {given}" if given is not None and given != s.files else ""
        typer.echo(
            f"stampclf: {s.rows:,} rows from {s.files}{of} input(s) {where} in {s.seconds:.2f} s "
            f"({rate:,.0f} rows/s); flagged {s.flagged:,}, failed {s.failed:,}"
            + (f"; written to {s.output}" if s.output and s.output != "-" else "")
            + ("; no output written" if output and output != "-" and not s.output else ""),
            err=True,
        )
    return 2 if s.file_errors else 0


def _print_metrics(m: dict[str, Any]) -> None:
    avg = m.get("average")
    keys = ("n", "accuracy", "precision", "recall", "f1", "roc_auc", "unscored", "threshold")
    lines = []
    for k in (k for k in keys if k in m):
        v = m[k]
        name = f"{k} ({avg})" if avg and k in ("precision", "recall", "f1", "roc_auc") else k
        if isinstance(v, float) and v != v:  # NaN: say why
            text = "n/a (no scored rows)" if not m.get("n") else "n/a (the labels hold one class only)"
        else:
            text = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{name:>24}: {text}")
    if avg == "macro":  # several classes: each one's figures too
        lines.append(f"{'per class':>24}: precision / recall / support")
        lines += [f"{c:>24}: {p['precision']:.4f} / {p['recall']:.4f} / {p['support']}" for c, p in m["per_class"].items()]
    typer.echo("\n".join(["evaluation:", *lines]), err=True)


@app.command()
def models(debug: _Debug = False) -> None:
    """List the shipped models with version, task and classes."""

    def run() -> int:
        from ._card import read_card
        from ._registry import MODELS_ENV, list_models, missing_model_dirs, resolve_model

        bad, rows = [], []
        missing = missing_model_dirs()
        if missing:  # the listing goes on: the shipped models are still there
            typer.echo(f"stampclf: ${MODELS_ENV} names no folder {', '.join(missing)}", err=True)
        for name in list_models():
            try:
                card, _ = read_card(resolve_model(name), verify=False)
            except StampclfError as exc:  # one bad file (e.g. in $STAMPCLF_MODELS) hides none of the others
                bad.append(str(exc))
                continue
            acc = card.metrics.get("test", {}).get("accuracy")
            acc_s = f"  test accuracy {acc:.4f}" if isinstance(acc, float) else ""
            rows.append((name, f"v{card.version}", card.task, "/".join(card.classes) + acc_s))
        # columns as wide as their longest value: a local version (1.1.0+local.20261123.1a2b3c4d) is long
        widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
        for r in rows:
            typer.echo(" ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + " " + r[3])
        for line in bad:
            typer.echo(f"stampclf: error: {line}", err=True)
        return 2 if bad else 0

    code = _guard(run)
    if code:
        raise typer.Exit(code)


@app.command()
def info(
    model: Annotated[Optional[str], typer.Argument(help="Shipped model name or path to an .onnx file (default: hits).")] = None,
    model_opt: Annotated[
        Optional[str], typer.Option("--model", "-m", help="The same, as an option (as in classify and bench).")
    ] = None,
    debug: _Debug = False,
) -> None:
    """Print a model's card (JSON)."""

    def run() -> None:
        from ._card import read_card
        from ._registry import resolve_model, shadowing_notice

        if model and model_opt and model != model_opt:
            raise InputError(f"two models given: {model!r} and --model {model_opt!r}")
        name = model or model_opt or "hits"
        path = resolve_model(name)
        card, _ = read_card(path)
        note = shadowing_notice(name, path)
        if note:
            typer.echo(f"stampclf: {note}", err=True)
        typer.echo(json.dumps(card.to_dict(), indent=2, sort_keys=True))

    _guard(run)


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="Shipped model name or path.")] = "hits",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="Rows per inference call (default: the model card's).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Rows to time.")] = 100_000,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: all allowed).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32 or fp16 (converted on load).")] = "fp32",
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="CUDA: capture and replay a CUDA graph.")] = False,
    prep: Annotated[
        str, typer.Option("--prep", help=_PREP_HELP)
    ] = "auto",
    debug: _Debug = False,
) -> None:
    """Print rows/s: the model alone, classify in memory, and classify of an HDF5 file to CSV."""

    def run() -> None:
        from ._bench import run_bench

        for line in run_bench(model, device, batch_size, n, threads, precision, cuda_graph, prep):
            typer.echo(line)

    _guard(run)


def main() -> None:
    """Console-script entry point: usage errors are one line too, like every other error."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's (vendored click's) usage errors: bad value, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command: its help, as typer shows it
            typer.echo(exc.message, err=True)
        else:
            ctx = getattr(exc, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            text = exc.format_message() if hasattr(exc, "format_message") else exc.message
            typer.echo(f"stampclf: error: {text}{where}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("stampclf: interrupted; no output written", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
