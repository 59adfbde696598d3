"""`python -m lac.report PATH... [--out DIR] [--wandb] [--x frac|layer]`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lac
from lac.report._common import (  # noqa: I001
    EXIT_NO_RESULTS,
    EXIT_OK,
    EXIT_REFUSED,
    REPORT_KIND,
    REPORT_MARKER,
    RESULTS_FILE,
    label_conditions,
)
from lac.report.designs import (
    DESIGNS_SECTION,
    designs_markdown,
    dose_response_figures,
    write_design_csvs,
)
from lac.report.figures import (
    geometry_by_layer_figure,
    kl_by_layer_figure,
    save_figure,
)
from lac.report.loading import (
    NoReadableResults,
    SchemaError,
    describe_incomplete,
    drop_duplicate_rows,
    find_job_dirs,
    is_report_dir,
    load_results,
    model_depths,
    write_parquet,
    write_text,
)
from lac.report.mechanism import mechanism_figures, mechanism_markdown
from lac.report.summaries import (
    attention_summary,
    coverage,
    geometry_summary,
    kl_summary,
    marker_summary,
    render_coverage,
)
from lac.report.tables import (
    CONTROLS_SECTION,
    build_tables,
    render_markdown,
    render_short,
)
from lac.report.wandb_upload import _tracker_config, upload_to_wandb, wandb_group
from lac.schema import SCHEMA_VERSION

# --------------------------------------------------------------------------- CLI


def default_out(first: Path) -> Path:
    first = Path(first)
    return (first if first.is_dir() else first.parent) / "report"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m lac.report",
        description="Tables (paper tables 1-4, side by side with the published numbers) and "
        "figures from lac job dirs.",
    )
    ap.add_argument("paths", nargs="+", type=Path, help="job dirs, multirun dirs or results roots")
    ap.add_argument(
        "--out", type=Path, default=None, help="output dir (default: <first PATH>/report)"
    )
    ap.add_argument("--wandb", action="store_true", help="upload tables and figures to one W&B run")
    ap.add_argument(
        "--x",
        choices=("frac", "layer"),
        default="frac",
        help="figures' x axis: layer as a fraction of the model's depth (default; models of "
        "different depth line up) or the absolute layer",
    )
    return ap.parse_args(argv)


def out_problem(out: Path) -> str | None:
    """Why `out` cannot take a report: a file, or a job's own folder (its results.parquet would be
    overwritten, and the folder then read as a report)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder (new, or a previous report's)"
    if out.is_dir() and not is_report_dir(out) and any(
            (out / name).exists() for name in ("summary.json", "done.json", "parts", ".hydra")):
        return (f"--out {out} is a job's folder (it holds its results); a report there would overwrite them: "
                "give a new folder, or a previous report's")
    return None


def clear_previous(out: Path) -> None:
    """A previous report's files go before a new one is written (none of its figures or CSVs stays behind
    to be mistaken for this one's); the marker is written first, so a report cut short is never read as
    a job. Other files in the folder (a W&B run of an earlier --wandb) are left."""
    import shutil

    if is_report_dir(out):  # what a report writes, its marker aside: results, tables, CSVs, figures/
        for f in [out / RESULTS_FILE, out / "tables.md", *out.glob("*.csv")]:
            f.unlink(missing_ok=True)
        shutil.rmtree(out / "figures", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps({"kind": REPORT_KIND, "complete": False}) + "\n", out / REPORT_MARKER)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out if args.out is not None else default_out(args.paths[0])
    err = sys.stderr
    if why := out_problem(out):
        print(f"lac.report: {why}", file=err)
        return EXIT_NO_RESULTS
    found = find_job_dirs(args.paths, exclude=[out])

    if not found.jobs:
        print(
            "lac.report: no results found (no job dir holding results.parquet). Searched:", file=err
        )
        for p in found.searched:
            print(f"  {p}{'  (does not exist)' if p in found.missing else ''}", file=err)
        for d in found.incomplete:
            print(f"  incomplete: {describe_incomplete(d)}", file=err)
        return EXIT_NO_RESULTS
    for p in found.missing:
        print(f"lac.report: warning: {p} does not exist", file=err)

    unreadable: list[Path] = []

    def skip(f: Path, why: str) -> None:
        unreadable.append(f)
        print(f"lac.report: warning: skipped unreadable results file {f} ({why})", file=err)

    try:
        df = load_results(found.jobs, on_unreadable=skip)
    except SchemaError as e:
        print(f"lac.report: refused: {e}", file=err)
        return EXIT_REFUSED
    except NoReadableResults as e:
        print(f"lac.report: no readable results: {e}", file=err)
        return EXIT_NO_RESULTS
    jobs = [d for d in found.jobs if Path(d) / RESULTS_FILE not in unreadable]
    renamed = df.attrs.get("grids_renamed", {})
    raw, n_dup, n_differ = drop_duplicate_rows(df)
    df = label_conditions(raw)  # remove_x[task] apart from remove_x: a factor other than the persona is named
    if df.empty:
        print(f"lac.report: {len(jobs)} job dir(s) found but they hold no rows", file=err)
        return EXIT_NO_RESULTS

    print(
        f"lac.report: {len(jobs)} job dir(s), {len(df)} rows, {len(found.incomplete)} incomplete"
        + (f", {len(unreadable)} unreadable results file(s) skipped" if unreadable else "")
    )
    for name, names in renamed.items():
        print(f"lac.report: warning: grid name {name!r} belongs to {len(names)} different grids (files or "
              f"contents); reported apart as {', '.join(names)} (grid.name=... names each)")
    if n_differ:
        print(f"lac.report: warning: {n_differ} duplicated row(s) with different values (the same model, grid "
              f"name, cell, site, layer and intervention measured twice: before and after a change of lac"
              + ("; or swap jobs with different intervention.partner rules written before lac recorded the rule "
                 "(results schema < 3): report those separately"
                 if ((raw["intervention"] == "swap") & (raw["partner"] == "")).any() else "")
              + "); kept the newest (the job that finished last)")
    if n_dup > n_differ:
        print(f"lac.report: {n_dup - n_differ} duplicated row(s) with equal values (the same cell in two jobs) "
              f"counted once")
    for d in found.incomplete:
        print(f"  incomplete: {describe_incomplete(d)}")
    print("present (model · grid · intervention · site: layer:cells):")
    print(render_coverage(df))

    depths = model_depths(jobs, df)
    shallow = sorted({f"{m} ({i})" for m, i in zip(df["model"], df["model_id"], strict=True) if (m, i) not in depths})
    if args.x == "frac" and shallow:
        print(f"lac.report: warning: no depth (n_layers) known for {', '.join(shallow)}: the figures use absolute "
              "layers for every model (--x frac needs each model's depth, from its jobs' summary.json)")
    report = build_tables(df, depths=depths)
    header = [
        f"lac {lac.__version__}, schema {SCHEMA_VERSION}. {len(jobs)} job dir(s), "
        f"{len(df)} rows, {len(found.incomplete)} incomplete job dir(s).",
        "",
        "Searched: " + ", ".join(f"`{p}`" for p in found.searched),
    ]
    if found.incomplete:
        header += ["", "Incomplete: " + "; ".join(describe_incomplete(d) for d in found.incomplete)]
    if unreadable:
        header += ["", "Skipped (unreadable): " + ", ".join(f"`{f}`" for f in unreadable)]
    for name, names in renamed.items():
        header += ["", f"Grid name `{name}` belongs to {len(names)} different grids: reported apart as "
                       + ", ".join(f"`{n}`" for n in names) + "."]
    if n_differ:
        header += ["", f"{n_differ} row(s) were measured twice with different values; each keeps the value of "
                       "the job that finished last."]

    clear_previous(out)
    written: dict[str, Any] = {}
    written["results"] = str(write_parquet(raw, out / RESULTS_FILE))

    figures: dict[str, Path] = {}
    for name, make in (
        ("kl_by_layer", kl_by_layer_figure),
        ("geometry_by_layer", geometry_by_layer_figure),
    ):
        fig = make(df, depths=depths, x=args.x)
        if fig is None:
            print(f"lac.report: no data for figure {name}; skipped")
            continue
        paths = save_figure(fig, out / "figures" / name)
        figures[name] = paths[0]
        written[f"figure_{name}"] = [str(p) for p in paths]
    mechanism = []
    for name, title, fig in mechanism_figures(df, depths):
        paths = save_figure(fig, out / "figures" / name)
        figures[name] = paths[0]
        written[f"figure_{name}"] = [str(p) for p in paths]
        mechanism.append((name, title))
    if CONTROLS_SECTION in report.text:
        report.text[CONTROLS_SECTION] = mechanism_markdown(df, mechanism, depths)
    doses = []
    for name, title, fig in dose_response_figures(df):
        paths = save_figure(fig, out / "figures" / name)
        figures[name] = paths[0]
        written[f"figure_{name}"] = [str(p) for p in paths]
        doses.append((name, title))
    if DESIGNS_SECTION in report.text:
        report.text[DESIGNS_SECTION] = designs_markdown(df, doses)
    csvs = write_design_csvs(df, out)
    written |= {f"csv_{k}": str(p) for k, p in csvs.items()}
    written["tables"] = str(write_text(render_markdown(report, header), out / "tables.md"))

    if args.wandb:
        group = wandb_group(found.jobs)
        run_dir = upload_to_wandb(
            report,
            figures,
            group=group,
            out_dir=out,
            tracker=_tracker_config(found.jobs),
            config={
                "paths": [str(p) for p in found.searched],
                "n_jobs": len(jobs),
                "lac_version": lac.__version__,
                "schema": SCHEMA_VERSION,
            },
            extra_tables={
                "kl_summary": kl_summary(df),
                "geometry_summary": geometry_summary(df),
                "marker_summary": marker_summary(df),
                "attention_summary": attention_summary(df),
                "coverage": coverage(df),
            },
        )
        written["wandb_run_dir"] = str(run_dir)
        print(f"lac.report: W&B run (group {group!r}, job_type 'report'): {run_dir}")

    manifest = {
        "kind": REPORT_KIND,
        "lac_version": lac.__version__,
        "schema": SCHEMA_VERSION,
        "searched": [str(p) for p in found.searched],
        "job_dirs": [str(d) for d in jobs],
        "incomplete": [str(d) for d in found.incomplete],
        "unreadable": [str(f) for f in unreadable],
        "grids_renamed": renamed,
        "duplicates": {"dropped": n_dup, "with_other_values": n_differ},
        "written": written,
    }
    write_text(json.dumps(manifest, indent=2) + "\n", out / REPORT_MARKER)

    print()
    print(render_short(report))
    print()
    print(f"lac.report: wrote {out}/")
    print(f"  {RESULTS_FILE}  tables.md  {REPORT_MARKER}")
    if csvs:
        print("  " + "  ".join(p.name for p in csvs.values()))
    for name in figures:
        print(f"  figures/{name}.png  figures/{name}.pdf")
    return EXIT_OK
