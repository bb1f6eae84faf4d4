"""samplebench's command line: sweep = generate + metrics + report, each also runnable alone."""

from __future__ import annotations

import errno
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from samplebench.errors import UsageError
from samplebench.models import is_analytic

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Benchmark diffusion and flow model samplers. Arguments are Hydra overrides: "
    "key=value, comma lists sweep (sampler=ddim,dpmpp nfe=5,10,20).",
)
# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
out = Console() if sys.stdout.isatty() else Console(width=160)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
_state = {"debug": False}

OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. model=gmm sampler=ddim,dpmpp nfe=5,10 run=demo")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _state["debug"] = debug


def _run_dir(overrides: list[str]) -> tuple[Path, dict]:
    """results_dir/run and the metrics config from overrides, for the stages that read a run."""
    from omegaconf import OmegaConf

    from samplebench.config import _check_override, _compose, validate

    base = _compose([])
    for o in overrides:
        _check_override(o.split("=")[0], [], base)
    cfg = OmegaConf.to_container(_compose(list(overrides)), resolve=True)
    validate(cfg)
    return Path(cfg["results_dir"]) / cfg["run"], cfg["metrics"]


def _generate(overrides: list[str], check_metrics: bool = False):
    from samplebench.config import plan

    cells = plan(overrides)  # only Hydra so far: bad overrides fail before torch is imported
    prepare_ems(cells)
    from samplebench.metrics import preflight

    # Every model that cannot be loaded, and for a sweep every missing metric prerequisite, named at
    # once before anything is generated.
    targets, checked = preflight.targets_of_cells(cells), None
    if check_metrics:
        from samplebench.metrics.run import report_skipped

        checked = preflight.check(cells[0].config["metrics"], targets, models=True)
        report_skipped(checked, err)
    else:
        preflight.check_models(targets)
    from samplebench import plan as run_plan
    from samplebench.generate import GenerationSummary, generate
    from samplebench.launch import launch

    cells, invocation = run_plan.record(cells, str(cells[0].config.get("on_change", "refuse")))
    workers = launch(cells, invocation)
    if workers is None:
        summary = generate(cells, err, worker=cells[0].config.get("worker"))
        err.print(
            f"generated {summary.shards_written} shards, {summary.shards_skipped} already finished, "
            f"{summary.cells} cells in {summary.run_dir}"
        )
        return cells, summary, checked
    from samplebench import store

    run_dir = run_plan.run_dir_of(cells[0])
    found = {c.key: c for c in store.find_cells(run_dir)}
    keys = {
        c.rel_dir: (c.model_label, store.solver_label(c.sampler_label, c.schedule_label), c.nfe, c.guidance)
        for c in cells
    }
    unfinished = [
        c.rel_dir for c in cells if keys[c.rel_dir] not in found or not found[keys[c.rel_dir]].complete()
    ]
    if unfinished:
        raise UsageError(
            f"{len(unfinished)} cells are unfinished after the workers ended (first: {unfinished[0]}); "
            "re-run to finish them"
        )
    err.print(f"{len(workers)} workers finished all {len(cells)} cells in {run_dir}")
    return cells, GenerationSummary(run_dir, len(cells), 0, 0, {}), checked


def _metrics(run_dir: Path, metrics_cfg: dict, checked=None):
    from samplebench.metrics.run import compute_metrics

    df = compute_metrics(run_dir, metrics_cfg, err, checked)
    err.print(f"{len(df)} metric rows in {run_dir / 'metrics.csv'}")
    return df


def _report(run_dirs: Path | list[Path]) -> list[Path]:
    from samplebench.report.build import build_report

    return build_report(run_dirs, out)


@app.command()
def sweep(overrides: list[str] = OVERRIDES) -> None:
    """Plan, generate, score and report a sweep in one go."""
    times = {}
    start = time.perf_counter()
    cells, summary, checked = _generate(overrides or [], check_metrics=True)
    times["plan+generate"] = time.perf_counter() - start
    files = [summary.run_dir / "metrics.csv"]
    t = time.perf_counter()
    scored = _metrics(summary.run_dir, cells[0].config["metrics"], checked)
    times["metrics"] = time.perf_counter() - t
    t = time.perf_counter()
    files += _report(summary.run_dir)
    times["report"] = time.perf_counter() - t
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
    err.print(f"done in {time.perf_counter() - start:.1f} s ({stages}). Files:")
    for f in files:
        err.print(f"  {f}")
    _warn_nonfinite(scored)


def _warn_nonfinite(df) -> None:
    """Repeat the metrics stage's warning after the report, where it is not scrolled away."""
    from samplebench.report import nonfinite_cells

    cells = nonfinite_cells(df)
    if not cells.empty:
        names = "; ".join(
            f"{r.model} · {r.sampler} · NFE {r.nfe} · guidance {r.guidance:g}" for r in cells.itertuples()
        )
        err.print(
            f"warning: {len(cells)} {'cell' if len(cells) == 1 else 'cells'} had non-finite samples, "
            "excluded from their metrics and rankings "
            f"(see leaderboard.md): {names}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def prepare_ems(cells, announce: bool = False) -> list[Path]:
    """DPM-Solver-v3's empirical model statistics for every (model, guidance, ems_grid, ems_samples,
    ems_data) the cells need, before anything is generated: found in <results_dir>/.cache/ems/, else
    computed now (the analytic model's exact draws, an image model's sampler.ems_data reference folder;
    the one-time cost is printed here, outside every cell's timing and NFE), else a one-line error (an
    image model without sampler.ems_data)."""
    wanted = {}
    for c in cells:
        if c.sampler.get("name") != "dpm_solver_v3":
            continue
        key = (
            repr(sorted(c.model.items())),
            c.guidance,
            c.sampler.get("ems_grid"),
            c.sampler.get("ems_samples"),
            c.sampler.get("ems_data"),
        )
        wanted.setdefault(key, c)
    if not wanted:
        return []
    from samplebench.samplers.dpm_solver_v3 import model_check_v3, validate_v3

    for c in wanted.values():  # every refusal before any model is loaded
        validate_v3(c.sampler)
        model_check_v3(c.sampler, c.model)
    from samplebench.models import load_model
    from samplebench.samplers.ems import ems_key, ems_path, load_or_compute

    paths, models = [], {}
    for c in wanted.values():
        model_key = repr(sorted(c.model.items()))
        if model_key not in models:
            device = "cpu" if is_analytic(str(c.model.get("name"))) else str(c.config.get("device", "auto"))
            models[model_key] = load_model(c.model, device)
        model = models[model_key]
        grid, n = int(c.sampler["ems_grid"]), int(c.sampler["ems_samples"])
        data = c.sampler.get("ems_data") or None
        root = Path(str(c.config.get("results_dir", "results"))) / ".cache"
        _, seconds = load_or_compute(model, c.guidance, grid, n, root, data=data)
        path = ems_path(root, ems_key(model, c.guidance, grid, n, data=data))
        paths.append(path)
        if seconds or announce:
            what = (
                f"computed in {seconds:.1f} s (one-time, not in cell timings or NFE)" if seconds else "found"
            )
            err.print(
                f"DPM-Solver-v3 statistics for {c.model_label} at guidance {c.guidance:g}: {what}: {path}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    return paths


@app.command()
def ems(overrides: list[str] = OVERRIDES) -> None:
    """Compute and cache DPM-Solver-v3's empirical model statistics for a model and guidance:
    samplebench ems model=gmm guidance=1,3 [sampler.ems_grid=250 sampler.ems_samples=256]; image models
    need a reference folder: samplebench ems model=sd15 sampler.ems_data=<folder of images>."""
    from samplebench.config import plan

    given = list(overrides or [])
    if not any(o.split("=")[0].lstrip("+~") == "sampler" for o in given):
        given.insert(0, "sampler=dpm_solver_v3")
    cells = [c for c in plan(given) if c.sampler.get("name") == "dpm_solver_v3"]
    if not cells:
        raise UsageError("samplebench ems computes statistics for sampler=dpm_solver_v3 only")
    prepare_ems(cells, announce=True)


@app.command()
def generate(overrides: list[str] = OVERRIDES) -> None:
    """Generate the samples of a sweep (skips finished shards)."""
    _generate(overrides or [])


@app.command(hidden=True)
def worker(
    run_dir: Path = typer.Argument(..., help="the run folder holding plan.json"),
    invocation: int = typer.Option(..., "--invocation", help="which planned sweep of the run to work on"),
    name: str = typer.Option(..., "--name", help="this worker's name in logs and claims"),
) -> None:
    """One worker of a launched sweep: generates the unclaimed shards of cells the sweep planned."""
    from samplebench.launch import worker_main

    worker_main(str(run_dir), invocation, name)


@app.command()
def metrics(overrides: list[str] = OVERRIDES) -> None:
    """Score a generated run: samplebench metrics run=NAME (its sweep's metrics, metrics.* on top)."""
    run_dir, metrics_cfg = _run_dir(overrides or [])
    _metrics(run_dir, _with_planned_metrics(run_dir, metrics_cfg, overrides or []))


def _with_planned_metrics(run_dir: Path, given: dict, overrides: list[str]) -> dict:
    """The metrics config the run's sweep planned with, with the metrics.* keys given now on top, so
    scoring a run again uses its own metrics and reference, not the defaults."""
    from omegaconf import OmegaConf

    from samplebench.plan import planned_metrics

    planned = planned_metrics(run_dir)
    keys = [o.split("=")[0].lstrip("+~") for o in overrides]
    if planned is None or "metrics" in keys:
        return given
    merged, now = OmegaConf.create(planned), OmegaConf.create(given)
    for key in keys:
        if key.startswith("metrics."):
            sub = key.removeprefix("metrics.")
            OmegaConf.update(merged, sub, OmegaConf.select(now, sub), force_add=True)
    return OmegaConf.to_container(merged, resolve=True)


@app.command()
def report(overrides: list[str] = OVERRIDES) -> None:
    """Leaderboards, plots, grids and an HTML page: samplebench report run=NAME, or run=a,b to merge runs."""
    runs = [o.split("=", 1)[1] for o in overrides or [] if o.startswith("run=")]
    rest = [o for o in overrides or [] if not o.startswith("run=")]
    names = [n for r in runs for n in r.split(",") if n] or [None]
    dirs = [_run_dir([*rest, *([f"run={n}"] if n else [])])[0] for n in names]
    for f in _report(dirs):
        err.print(f"  {f}")


@app.command()
def score(
    path: Path = typer.Argument(..., help="an image folder, or a folder of samplebench shards"),
    ref: str = typer.Option(
        None, "--ref", help="reference: image folder, folder of shards, or .npz with mu/sigma"
    ),
    prompts: Path = typer.Option(None, "--prompts", help="text file, one prompt per image (file-name order)"),
    out_csv: Path = typer.Option(None, "--out", help="also write the rows to this CSV file"),
    overrides: list[str] = typer.Argument(None, help="metrics options, e.g. metrics.fid.mode=clean"),
) -> None:
    """Score any image folder (or shard run) against any reference."""
    from omegaconf import OmegaConf

    from samplebench.config import _check_override, _compose
    from samplebench.metrics.score import score_path

    base = _compose([])
    for o in overrides or []:
        _check_override(o.split("=")[0], [], base)
    cfg = OmegaConf.to_container(_compose(list(overrides or [])), resolve=True)
    metrics_cfg = {**cfg["metrics"], "ref": ref or cfg["metrics"].get("ref")}
    df, protocols = score_path(path, metrics_cfg, Path(cfg["results_dir"]) / ".cache", prompts)
    table = Table(title=f"{path} vs {metrics_cfg['ref'] or '(no reference)'}")
    for col in ("metric", "value", "95% CI", "images"):
        table.add_column(col)
    for r in df.itertuples():
        table.add_row(r.metric, f"{r.value:.6g}", f"[{r.ci_low:.6g}, {r.ci_high:.6g}]", str(r.n_images))
    out.print(table)
    for metric, proto in protocols.items():
        err.print(f"{metric}: " + ", ".join(f"{k}={v}" for k, v in proto.items()), highlight=False)
    if out_csv:
        df.to_csv(out_csv, index=False)


@app.command()
def check(
    overrides: list[str] = OVERRIDES,
    baseline: Path = typer.Option(..., "--baseline", help="a metrics.csv to compare against"),
    tolerance: str = typer.Option("rel=0.05", "--tolerance", help="rel=0.05, abs=0.01, or ci"),
) -> None:
    """Exit 1 when a run regressed against a baseline: samplebench check run=NAME --baseline FILE."""
    from samplebench.report.check import Tolerance, compare, load_metrics, nonfinite_messages

    tol = Tolerance.parse(tolerance)
    run_dir, _ = _run_dir(overrides or [])
    run_df, base_df = load_metrics(run_dir / "metrics.csv", "run metrics"), load_metrics(baseline, "baseline")
    result = compare(run_df, base_df, tol)
    bad = result[result.status != "ok"]
    if bad.empty:
        out.print(f"check passed: {len(result)} rows of {baseline} within tolerance {tolerance}")
        return
    for line in nonfinite_messages(run_df, base_df):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    table = Table(
        title=f"{len(bad)} of {len(result)} rows regressed beyond {tolerance} (or are missing or non-finite)"
    )
    for col in ("model", "sampler", "nfe", "guidance", "metric", "baseline", "run", "worse by", "status"):
        table.add_column(col)
    for r in bad.itertuples():
        table.add_row(
            str(r.model),
            str(r.sampler),
            str(r.nfe),
            f"{r.guidance:g}",
            f"{r.metric} ({r.direction})",
            f"{r.baseline:.6g}",
            f"{r.run:.6g}",
            f"{r.worse_by:.3g}",
            str(r.status),
        )
    out.print(table)
    sys.exit(1)


@app.command("list")
def list_(what: str = typer.Argument("samplers", help="samplers, schedules, models or metrics")) -> None:
    """List registered samplers (NFE rule, schedules they take), schedules, models or metrics."""
    from samplebench.config import group_choices

    if what == "samplers":
        from samplebench.samplers import SAMPLERS

        table = Table(title="samplers (NFE for N solver steps, on the default schedule)")
        for col in ("name", "algorithm", "type", "NFE", "schedules", "paper", "year", "code"):
            table.add_column(col, no_wrap=col in ("name", "NFE"))
        for s in SAMPLERS.values():
            try:
                rule = str(s.rule({}, {"name": "karras"}))
            except UsageError:
                rule = str(s.rule({}, {"name": "linspace"}))
            table.add_row(s.name, s.title, s.kind, rule, s.grids, s.paper, str(s.year or ""), s.code)
        out.print(table)
    elif what == "schedules":
        from samplebench.models.base import NoiseSchedule
        from samplebench.samplers.diffusers_loop import _probe_sigmas
        from samplebench.schedules import SCHEDULES, make_grid

        noise = NoiseSchedule("vp_discrete", _probe_sigmas())  # Stable Diffusion's training levels
        table = Table(title="schedules (N levels, then 0; ends shown at N=10 on SD's training levels)")
        for col in ("name", "grid", "ends", "source"):
            table.add_column(col)
        for s in SCHEDULES.values():
            opts = {"name": s.name, "sigmas": [14.6, 7, 3, 1.5, 0.8, 0.4, 0.2, 0.1, 0.05, 0.03]}
            ends = make_grid(opts if s.name == "custom" else {"name": s.name}, noise, 10).ends
            table.add_row(s.name, s.title, "as given, then 0" if s.name == "custom" else ends, s.source)
        out.print(table)
    elif what == "metrics":
        from omegaconf import OmegaConf

        from samplebench.config import conf_dir
        from samplebench.metrics.names import ANALYTIC, IMAGE, TEXT
        from samplebench.report import lower_is_better

        defaults = OmegaConf.load(conf_dir() / "metrics" / "default.yaml").get("names", [])
        inception = "Inception weights (cached, or metrics.inception_weights=)"
        clip = "text prompts, CLIP weights (cached, or metrics.clip.pretrained=)"
        needs = {
            "fid": f"metrics.ref=, {inception}",
            "kid": f"metrics.ref=, {inception}",
            "precision": f"metrics.ref=, {inception}",
            "recall": f"metrics.ref=, {inception}",
            "is": f"{inception}, num_images >= metrics.is.splits",
            "clip_score": clip,
            "clip_score_paper": clip,
            "image_reward": "text prompts, metrics.image_reward.checkpoint=, bert-base-uncased tokenizer",
            "traj_mse": "a reference solve (metrics.traj_mse.*)",
        }
        table = Table(
            title="metrics (choose with metrics.names=[...]; each cell gets those that apply; the preflight "
            "checks what they need before generating)"
        )
        for col in ("name", "models", "direction", "default", "needs"):
            table.add_column(col)
        for name in ANALYTIC + IMAGE:
            table.add_row(
                name,
                "gmm, gmm_flow"
                if name in ANALYTIC
                else "text-to-image models"
                if name in TEXT
                else "image models",
                "lower is better" if lower_is_better(name) else "higher is better",
                "yes" if name in defaults else "no",
                needs.get(name, ""),
            )
        out.print(table)
    elif what == "models":
        from omegaconf import OmegaConf

        from samplebench.config import conf_dir
        from samplebench.models import is_analytic

        table = Table(title="models (model=NAME; image models also take model.path=<local copy>)")
        for col in ("name", "source", "guidance"):
            table.add_column(col)
        for name in group_choices("model"):
            cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / f"{name}.yaml"))
            source = str(cfg.get("id") or "model.id= or model.path=")
            source = "exact, analytic" if is_analytic(name) else source
            table.add_row(name, source, str(cfg.get("guidance_kind") or "cfg"))
        out.print(table)
    else:
        raise UsageError(f"cannot list '{what}'; choose samplers, schedules, models or metrics")


def main() -> None:
    """Entry point: user errors become one line and exit code 2 (tracebacks with --debug)."""
    try:
        code = app(standalone_mode=False)
        # In non-standalone mode typer turns Ctrl-C into a *returned* 130 rather than raising it.
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except UsageError as e:
        if _state["debug"]:
            raise
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")  # one line, never wrapped
        sys.exit(2)
    except OSError as e:
        if _state["debug"] or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}.get(
            e.errno, "a file could not be written"
        )
        sys.stderr.write(
            f"error: {what} ({e.filename or e.strerror}); free space or choose another "
            "results_dir=, then re-run: finished shards are kept\n"
        )
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write(
            "interrupted: finished shards and metric rows already written are kept; "
            "re-run the same command to resume\n"
        )
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            sys.stderr.write(f"error: {' '.join(e.format_message().split())}\n")
            sys.exit(2)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
