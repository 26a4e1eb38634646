"""``servesim profile``: inspect a calibration profile, and price step shapes with it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click

from calibrate.fit import FEATURES, error_table, format_error_table
from calibrate.profile import CalibratedCost, Profile, ProfileError, load_profile
from calibrate.samples import INT_COLUMNS, SWAP_COLUMNS, read_shapes
from calibrate.splitwise import is_splitwise, read_splitwise
from sim.batch import StepShape
from sim.cost import CostModel
from sim.hardware import HARDWARE, get_hardware
from sim.models import DTYPE_BYTES

PROVENANCE = ("source", "created_utc", "device", "driver_version", "cuda_version", "torch_version",
              "transformers_version", "torch_threads", "model", "weights", "dtype", "block_size",
              "kv_bytes_per_token", "kv_memory_bytes", "num_kv_blocks", "host_link_bytes_per_s",
              "host_link_source", "grid", "seed", "calibration_s", "interrupted", "out_of_memory_steps", "tp",
              "max_model_len")


def _load(path: Path) -> Profile:
    try:
        return load_profile(path)
    except ProfileError as e:
        raise click.ClickException(str(e)) from None


@click.group("profile", help="Inspect calibration profiles and predict step times with them.")
def profile() -> None:
    pass


@profile.command("show")
@click.argument("path", metavar="PROFILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a measured-vs-predicted scatter plot of the samples (PNG).")
def show(path: Path, plot: Path | None) -> None:
    """Print a profile's provenance, fitted model and error table."""
    prof = _load(path)
    data = prof.to_dict()
    for key in PROVENANCE:
        value = data[key]
        click.echo(f"{key:<24}{value:.4g}" if isinstance(value, float) else f"{key:<24}{value}")
    click.echo(f"{'samples':<24}{len(prof.samples)}")
    if prof.engine:
        settings = ", ".join(f"{k} {v}" for k, v in (prof.engine.get("settings") or {}).items())
        click.echo(f"{'engine':<24}{prof.engine.get('engine')} {prof.engine.get('vllm_version')} "
                   f"({prof.engine.get('mode')}): {settings}")
    if prof.phases_s:
        click.echo(f"{'phases_s':<24}" + ", ".join(f"{k} {v:.1f}" for k, v in prof.phases_s.items() if v is not None))
    if prof.fit_check:
        from calibrate.calibration import poor_fit_problems

        check = prof.fit_check
        verdict = "passed" if check["passed"] else "FAILED: " + "; ".join(poor_fit_problems(check)) + (
            " (accepted with --accept-poor-fit)" if check.get("accepted_poor_fit") else "")
        limits = ", ".join(f"{k} <= {v:g}%" for k, v in check["limits_pct"].items())
        click.echo(f"{'fit_check':<24}held-out {check['row']} {limits}: {verdict}")
    if prof.drift:
        from calibrate.drift import format_drift

        click.echo("\n" + format_drift(prof.drift))
    model = prof.model_fit
    click.echo("\nstep_ms = sum of coefficient x feature:")
    for name in FEATURES:
        click.echo(f"  {name:<28}{model.coefficients_ms[name]:.6g}")
    click.echo(f"  {'knee_tokens':<28}{model.knee_tokens}")
    click.echo(f"  {'knee_cache_tokens':<28}{model.knee_cache_tokens}")
    click.echo(f"  {'knee_decode_context_tokens':<28}{model.knee_decode_context_tokens}")
    click.echo(f"  {'pad_rows (engine)':<28}" + (", ".join(f"{rows}->{to}" for rows, to in model.pad_rows) or "none"))
    for key, title in (("held_out", f"held-out ({prof.errors.get('folds')}-fold)"), ("in_sample", "in-sample")):
        if prof.errors.get(key):
            click.echo(f"\n{title} absolute % error:")
            click.echo(format_error_table(prof.errors[key]))
    if plot is not None:
        write_scatter(prof, plot)
        click.echo(f"\nwrote {plot}")


def write_scatter(prof: Profile, path: Path) -> None:
    """Measured vs predicted step time of every sample, log-log, one colour per kind of step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    measured = [s.step_ms for s in prof.samples]
    predicted = [prof.model_fit.predict_ms(s.shape) for s in prof.samples]
    for kind, colour in (("prefill", "tab:blue"), ("decode", "tab:orange"), ("mixed", "tab:green")):
        pts = [(m, p) for s, m, p in zip(prof.samples, measured, predicted, strict=True) if s.kind == kind]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=14, label=f"{kind} ({len(pts)})", color=colour, alpha=0.8)
    lo, hi = min(measured + predicted), max(measured + predicted)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="exact")
    ax.set(xscale="log", yscale="log", xlabel="measured step (ms)", ylabel="predicted by the profile (ms)",
           title=f"{prof.model or '?'} on {prof.device[:40]}")
    held = (prof.errors.get("held_out") or {}).get("all")
    if held and held["median_ape_pct"] is not None:
        ax.text(0.02, 0.98, f"held-out median {held['median_ape_pct']:.1f}%, p90 {held['p90_ape_pct']:.1f}%",
                transform=ax.transAxes, va="top", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@profile.command("predict")
@click.argument("paths", nargs=-1, required=True, metavar="[PROFILE] STEPS.csv",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--roofline", is_flag=True,
              help="Price with the uncalibrated roofline of --model on --hardware (at --tp x --pp) instead of "
                   "a profile.")
@click.option("--model", default=None, metavar="NAME|PATH",
              help="The roofline's model: a preset or a config.json. Also picks a splitwise file's rows "
                   "[default: the profile's model].")
@click.option("--hardware", default=None, type=click.Choice(list(HARDWARE)), help="The roofline's GPU.")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(list(DTYPE_BYTES)))
@click.option("--tp", default=None, type=click.IntRange(min=1),
              help="Tensor-parallel GPUs of the roofline; picks a splitwise file's rows [default: the profile's "
                   "tp, else 1].")
@click.option("--pp", default=1, show_default=True, type=click.IntRange(min=1), help="Pipeline stages (roofline).")
def predict(paths: tuple[Path, ...], roofline: bool, model: str | None, hardware: str | None, dtype: str,
            tp: int | None, pp: int) -> None:
    """Print the predicted step_ms of every step of STEPS.csv, as CSV: by PROFILE, or by the
    roofline with --roofline (then no PROFILE).

    STEPS.csv is a samples file (the shape columns of `calibrate fit`; step_ms optional;
    swap_in_tokens and swap_out_tokens priced when present), or splitwise-sim's performance-model
    CSV (a prefill and a mean decode step per row; --model and --tp pick its rows). When step_ms
    is there, the error is printed too and summarised per kind of step on stderr.
    """
    if roofline:
        if len(paths) != 1:
            raise click.UsageError("with --roofline give only STEPS.csv (no PROFILE)")
        if model is None or hardware is None:
            raise click.UsageError("--roofline needs --model and --hardware")
        samples_path, source = paths[0], f"the roofline of {model} on {hardware} at tp {tp or 1} x pp {pp}"
        try:
            from sim.models import get_model
            from sim.parallel import Parallelism
            from sim.roofline import RooflineCost

            cost: CostModel = RooflineCost(get_model(model), get_hardware(hardware), dtype, Parallelism(tp or 1, pp))
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    else:
        if len(paths) != 2:
            raise click.UsageError("give PROFILE and STEPS.csv (or --roofline and STEPS.csv)")
        prof = _load(paths[0])
        samples_path, source = paths[1], "the profile"
        model = model or prof.model
        tp = tp or prof.tp
        cost = CalibratedCost(prof)
    try:
        rows: list[tuple[StepShape, float | None]]
        if is_splitwise(samples_path):
            rows = list(read_splitwise(samples_path, model, tp).steps)
        else:
            rows = read_shapes(samples_path)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    measured = any(ms is not None for _, ms in rows)
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow([*INT_COLUMNS, *SWAP_COLUMNS, "predicted_step_ms", *(["step_ms", "ape_pct"] if measured else [])])
    pairs = []
    for shape, ms in rows:
        try:
            pred = cost.step_time(shape) * 1000
        except ValueError as e:
            raise click.ClickException(f"{paths[0]}: {e}") from None
        extra = []
        if measured:
            extra = ["", ""] if ms is None else [repr(ms), f"{abs(pred - ms) / ms * 100:.3f}"]
            if ms is not None:
                pairs.append((shape, ms, pred))
        w.writerow([*(getattr(shape, c) for c in (*INT_COLUMNS, *SWAP_COLUMNS)), f"{pred:.6g}", *extra])
    if pairs:
        from calibrate.samples import Sample

        samples = [Sample(sh, ms) for sh, ms, _ in pairs]
        click.echo(f"absolute % error of {source} on these steps:", err=True)
        click.echo(format_error_table(error_table(samples, [p for _, _, p in pairs])), err=True)
