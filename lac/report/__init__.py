"""`python -m lac.report PATH... [--out DIR] [--wandb] [--x frac|layer]`: tables and figures from lac jobs.

Reads every job directory (a directory holding `results.parquet`) under the given
paths, checks the tidy schema, pools the rows into one table and writes, under
`--out` (default `<first PATH>/report`):

    results.parquet        all rows, exactly the columns of `lac.schema.COLUMNS`
    tables.md              tables 1-4 of the paper, lac next to the published numbers
    figures/kl_by_layer.{png,pdf}        the paper's Figure 1 across models: one panel per
                                         (grid, site), one line per model, x = layer / depth
                                         (--x layer: absolute), published medians as diamonds
    figures/geometry_by_layer.{png,pdf}  the same per geometry metric
    figures/mechanism_<model>_<grid>_<site>.{png,pdf}
                                         controls and mechanism (results with control interventions
                                         or attention rows): KL by layer of host_oracle_lm,
                                         host_oracle_span, kv_persona / knockout_persona "from L"
                                         (x = L, the set's first layer), host_none, host_none_lm and
                                         clean (KL = 0) as horizontal lines; attention mass on the
                                         persona span by layer. tables.md's "Controls and mechanism"
                                         section holds the controls table, the attention table, the
                                         figures and what each curve would show if the paper's
                                         explanation holds
    figures/dose_<steer|steer_host>_<factor>_<model>_<grid>_<site>.{png,pdf}
                                         dose-response (results with steer / steer_host rows): median
                                         KL to XY over cells against alpha, one line per layer (band
                                         p25-p75), and the marker_any rate against alpha when markers
                                         were generated; alpha = 0 and 1 marked. tables.md's
                                         'Designs beyond "As X, Y"' section links them and holds the
                                         swap table (KL to XY and to X'Y, markers of X and X') and, for
                                         grids of k >= 3 factors, the interaction share by layer
    dose_response.csv, swap.csv, interaction_share.csv
                                         the numbers behind those (median, p25, p75, n), each only
                                         when the results hold its rows
    report.json            what was read and written (also marks this dir as a report,
                           so a later run over the same root does not read it back)

Every median / IQR is computed within one grid (never pooled across grids) with
numpy's default (linear) percentiles, as in the paper. This module never loads a
model: it imports neither torch nor transformers, so it runs anywhere the
results can be copied to.

A results.parquet that cannot be read at all (truncated, empty, not parquet) is
skipped with a warning naming it, and the report is built from the others; one
that reads but carries another schema is refused (exit 3), as before: its rows
mean something else, so a report without them would be silently partial.

Modules: loading (find, read, validate, write), published (the paper's numbers), summaries
(medians/IQRs over cells, via lac.stats), tables (display tables, markdown), figures, mechanism
(controls table, attention table, mechanism figures and their reading), designs (dose-response,
swap, interaction share),
wandb_upload (--wandb), cli. Everything is re-exported here.

Exit codes: 0 done; 2 no results under the paths (or none of them readable);
3 results refused (schema).
"""

from __future__ import annotations

from lac.report._common import (  # noqa: I001
    CONTROL_INTERVENTIONS,
    CONTROL_ORDER,
    DASH,
    EXIT_NO_RESULTS,
    EXIT_OK,
    EXIT_REFUSED,
    FIGURE1_SITES,
    GRID_ORDER,
    HOST_ORDER,
    KL_THRESHOLD,
    LEGEND,
    MARKER_CONDITIONS,
    PAPER_GEMMA,
    PAPER_KL_TABLES,
    PAPER_LAYER_T3,
    PAPER_SITE_T34,
    REPORT_KIND,
    REPORT_MARKER,
    RESULTS_FILE,
    SITE_ORDER,
    SUMMARY_FILE,
    _condition_key,
    _grid_key,
    _host_key,
    _norm_layers,
    _site_key,
    fmt,
    fmt_iqr,
    is_single_layer,
    layer_set_label,
    model_labels,
    percentiles,
)
from lac.report.cli import default_out, main, parse_args
from lac.report.designs import (
    DESIGNS_SECTION,
    DOSE_INTERVENTIONS,
    design_csvs,
    design_tables,
    designs_markdown,
    dose_response_figure,
    dose_response_figures,
    dose_summary,
    interaction_summary,
    interaction_tables,
    swap_summary,
    swap_tables,
    without_doses,
    write_design_csvs,
)
from lac.report.figures import (
    GEOMETRY_LABELS,
    X_MODES,
    _new_figure,
    geometry_by_layer_figure,
    kl_by_layer_figure,
    save_figure,
)
from lac.report.loading import (
    UNREADABLE_ERRORS,
    Found,
    NoReadableResults,
    SchemaError,
    UnreadableResultsWarning,
    _atomic,
    drop_duplicate_rows,
    find_job_dirs,
    is_report_dir,
    load_results,
    model_depths,
    read_summary,
    write_parquet,
    write_text,
)
from lac.report.mechanism import (
    attention_tables,
    controls_summary,
    controls_tables,
    curves_present,
    mechanism_figure,
    mechanism_figures,
    mechanism_markdown,
    mechanism_panels,
)
from lac.report.published import (
    load_paper_tables,
    published_geometry,
    published_host,
    published_kl,
    published_markers,
)
from lac.report.summaries import (
    _summarise,
    attention_summary,
    coverage,
    coverage_compact,
    geometry_summary,
    kl_summary,
    marker_label,
    marker_summary,
    persona_marker_counts,
    render_coverage,
)
from lac.report.tables import (
    CONTROLS_SECTION,
    Report,
    Table,
    _rows_in_order,
    build_tables,
    depth_table,
    geometry_table,
    host_table,
    kl_layer_table,
    layer_set_summary,
    marker_table,
    no_vector_table,
    render_markdown,
    render_short,
    to_markdown,
)
from lac.report.wandb_upload import _tracker_config, upload_to_wandb, wandb_group, wandb_mode

__all__ = [
    "GEOMETRY_LABELS",
    "X_MODES",
    "model_depths",
    "EXIT_NO_RESULTS",
    "EXIT_OK",
    "EXIT_REFUSED",
    "RESULTS_FILE",
    "SUMMARY_FILE",
    "REPORT_MARKER",
    "REPORT_KIND",
    "SITE_ORDER",
    "GRID_ORDER",
    "MARKER_CONDITIONS",
    "HOST_ORDER",
    "CONTROL_INTERVENTIONS",
    "CONTROL_ORDER",
    "CONTROLS_SECTION",
    "FIGURE1_SITES",
    "KL_THRESHOLD",
    "PAPER_KL_TABLES",
    "PAPER_GEMMA",
    "PAPER_SITE_T34",
    "PAPER_LAYER_T3",
    "DASH",
    "LEGEND",
    "_norm_layers",
    "_site_key",
    "_grid_key",
    "_host_key",
    "_condition_key",
    "fmt",
    "fmt_iqr",
    "percentiles",
    "is_single_layer",
    "layer_set_label",
    "model_labels",
    "SchemaError",
    "UnreadableResultsWarning",
    "NoReadableResults",
    "UNREADABLE_ERRORS",
    "Found",
    "is_report_dir",
    "find_job_dirs",
    "read_summary",
    "load_results",
    "drop_duplicate_rows",
    "_atomic",
    "write_parquet",
    "write_text",
    "load_paper_tables",
    "published_kl",
    "published_geometry",
    "published_markers",
    "published_host",
    "_summarise",
    "kl_summary",
    "attention_summary",
    "geometry_summary",
    "marker_summary",
    "marker_label",
    "persona_marker_counts",
    "coverage",
    "coverage_compact",
    "render_coverage",
    "Table",
    "_rows_in_order",
    "depth_table",
    "kl_layer_table",
    "no_vector_table",
    "geometry_table",
    "marker_table",
    "layer_set_summary",
    "host_table",
    "Report",
    "build_tables",
    "to_markdown",
    "render_markdown",
    "render_short",
    "_new_figure",
    "kl_by_layer_figure",
    "geometry_by_layer_figure",
    "save_figure",
    "controls_summary",
    "controls_tables",
    "attention_tables",
    "mechanism_panels",
    "mechanism_figure",
    "mechanism_figures",
    "curves_present",
    "mechanism_markdown",
    "DESIGNS_SECTION",
    "DOSE_INTERVENTIONS",
    "design_csvs",
    "design_tables",
    "designs_markdown",
    "dose_response_figure",
    "dose_response_figures",
    "dose_summary",
    "interaction_summary",
    "interaction_tables",
    "swap_summary",
    "swap_tables",
    "without_doses",
    "write_design_csvs",
    "wandb_group",
    "_tracker_config",
    "wandb_mode",
    "upload_to_wandb",
    "default_out",
    "parse_args",
    "main",
]
