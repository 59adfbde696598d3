"""The job: validate, resume, run patched inference through Lightning's predict loop, record.

`Trainer.predict` drives batches of cells through `PatchingModule.predict_step`
(captures, decomposition, KL or generations for those cells); `PartWriter`
persists each batch's rows as it finishes, so a killed job resumes at cell
granularity. Models and clean captures stay in memory across the jobs of a
basic-launcher multirun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import lac
from lac.cache import ActivationCache
from lac.capture import CellCapture, capture_cells
from lac.config import ConfigError, Spec, job_key, preflight
from lac.engine import Row, eos_ids, greedy
from lac.errors import LacError
from lac.grid import Cell
from lac.interventions import WHOLE_DESIGN, Intervention, get_intervention, roles_needed
from lac.io import atomic_write_bytes
from lac.markers import score
from lac.metrics import design_geometry
from lac.models import LoadedModel, load_model
from lac.patching import attention_mass, change_row, kl_rows
from lac.prefix import Want, prefix_traces
from lac.prompts import PromptBook
from lac.results import JobStore, format_table, frame, summarize
from lac.schema import ATTENTION, DECOMPOSITION, SCHEMA_VERSION
from lac.sites import REF_TOKENS

log = logging.getLogger("lac")
_MODEL: dict[str, LoadedModel] = {}  # one model kept across the jobs of a process
_STARTED_UP = False  # the process's start-up was noted (by its first job)


def _model_key(mcfg: DictConfig) -> str:
    """The loaded model a config means: its settings, and a local folder's files (saved again since:
    loaded again)."""
    from lac.fingerprint import model_files

    return json.dumps([OmegaConf.to_container(mcfg, resolve=True), model_files(mcfg)], sort_keys=True)


def get_model(mcfg: DictConfig, tokenizer=None) -> LoadedModel:
    key = _model_key(mcfg)
    if key not in _MODEL:
        _MODEL.clear()
        t0 = time.time()
        _MODEL[key] = load_model(mcfg, tokenizer)
        from lac.tracking import note_phase

        note_phase("model load", time.time() - t0)
        log.info("loaded %s (%s, %s, %s Linears) in %.1f s", mcfg.name, mcfg.id, mcfg.dtype,
                 _MODEL[key].linear, time.time() - t0)
    return _MODEL[key]


def prepare_model(cfg: DictConfig, spec: Spec, on_checked: Callable[[], None] = lambda: None) -> LoadedModel:
    """The job's model, after the checks that need only its tokenizer and config: grid text
    that is no chat-control token, prompts that fit the context, a memory estimate that fits.
    `on_checked` runs once they pass, before the weights load."""
    from lac.budget import check_budget
    from lac.models import load_tokenizer
    from lac.prompts import check_grid_text, check_prompt_lengths

    lm = _MODEL.get(_model_key(cfg.model))
    tok = lm.tokenizer if lm else load_tokenizer(cfg.model)
    check_grid_text(tok, spec.grid, cfg.model.name)
    book = PromptBook(tok, spec.grid)
    roles = [*spec.grid.roles(), *(["bare"] if spec.mode == "markers" and "bare" in spec.conditions else [])]
    needs, _ = _capture_plan(spec)
    roles += sorted(r for r in needs.roles | needs.hosts if r not in roles and r != "bare")
    prompts = [(f"{c.key} {r}", book.get(c, r)) for c in spec.grid.cells() for r in roles]
    extra = spec.max_new_tokens if spec.mode == "markers" else REF_TOKENS
    check_prompt_lengths(prompts, _max_positions(cfg.model, tok), extra, cfg.model.name)
    check_budget(cfg, spec, [p for _, p in prompts], extra, loaded=lm is not None)
    on_checked()
    return lm or get_model(cfg.model, tok)


def length_matched_texts(cfg: DictConfig, spec: Spec) -> dict[str, str]:
    """The decoded persona replacement of each cell's length-matched baseline LY, for the record."""
    from lac.models import load_tokenizer

    lm = _MODEL.get(_model_key(cfg.model))
    book = PromptBook(lm.tokenizer if lm else load_tokenizer(cfg.model), spec.grid)
    hosts = {iv.host for iv in (*spec.interventions, *spec.condition_ivs) if "L" in iv.host}
    return {c.key: book.ly_text(c, h) for c in spec.grid.cells() for h in sorted(hosts)}


def _max_positions(mcfg: DictConfig, tok) -> int:
    from lac.models import local_config

    found = local_config(mcfg) or {}
    return int(found.get("max_position_embeddings") or getattr(tok, "model_max_length", 0) or 1 << 30)


def _row(cell: Cell, site: str, layers: Sequence[int], intervention: str, metric: str, value: float, ctx: dict,
         *, factor: str = "", alpha: float | None = None, partner: str = "") -> dict:
    return {
        **ctx, "cell": cell.key, "persona": cell.persona, "task": cell.task, "site": site,
        "layer": max(layers) if layers else -1, "layers": ",".join(map(str, layers)),
        "intervention": intervention, "metric": metric, "value": float(value),
        "factor": factor, "alpha": float("nan") if alpha is None else float(alpha), "partner": partner,
    }


def _about(iv: Intervention) -> dict:
    """The factor, alpha and partner columns of an intervention's rows: factor "" for those about the
    whole design."""
    whole = iv.name in WHOLE_DESIGN
    return {"factor": "" if whole else iv.factor, "alpha": iv.alpha, "partner": iv.partner}


def _capture_plan(spec: Spec):
    """(what the captures must hold, deepest block) for the job."""
    if spec.mode == "markers":  # generations continue each condition's clean host prompt
        needs = roles_needed([iv for iv in spec.condition_ivs if iv.name != "bare"], spec.grid)
        trace = needs.trace_hosts | (needs.hosts - {"bare"})
        return replace(needs, trace_hosts=trace), max(spec.marker_layers) + 1
    needs = roles_needed(spec.interventions, spec.grid)
    if spec.attn_mass:  # the mass pass continues XY's trace from the span's end
        full = spec.grid.full
        needs = replace(needs, trace_hosts=needs.trace_hosts | {full}, span_hosts=needs.span_hosts | {full})
    depth = max([*spec.geometry_layers, *(L for j in spec.jobs for L in j.layers)]) + 1
    return needs, depth


# Deepest block any job of this process's multirun will need per (model, grid), set by the multirun
# callback before the first job: the first job captures that deep once, later jobs of `-m
# layer=range(4,14)` find every layer in the memory cache instead of capturing one layer deeper each.
CAPTURE_DEPTH: dict[tuple[str, str], int] = {}


def plan_sweep_depth(model_name: str, spec: Spec) -> None:
    """Record a multirun job's capture depth (lac.multirun calls this for every job before the first)."""
    key = (model_name, spec.grid.content_hash())
    CAPTURE_DEPTH[key] = max(CAPTURE_DEPTH.get(key, 0), _capture_plan(spec)[1])


def capture(
    lm: LoadedModel, spec: Spec, cells: Sequence[Cell], *, book: PromptBook,
    cache: ActivationCache | None, batch_cells: int,
) -> list[CellCapture]:
    """Clean captures of `cells`: from the activation cache where it has them, else computed and stored."""
    needs, depth = _capture_plan(spec)
    depth = min(max(depth, CAPTURE_DEPTH.get((lm.name, spec.grid.content_hash()), 0)), lm.n_layers)
    known = cache.get(list(cells), book) if cache else {}
    before = {k: cache.stored(c) for k, c in known.items()} if cache else {}
    caps = capture_cells(
        lm, book, cells, roles=needs.roles, hosts=needs.hosts, trace_hosts=needs.trace_hosts,
        span_hosts=needs.span_hosts, depth=depth, batch_size=batch_cells, known=known,
    )
    if cache:
        cache.put(caps, {c.cell.key for c in caps if before.get(c.cell.key) != cache.stored(c)})
    return caps


def activation_cache(cfg: DictConfig, lm: LoadedModel, spec: Spec) -> ActivationCache:
    """The job's activation cache; `engine.cache_traces=auto` keeps traces on disk where the model runs
    on the CPU (12 cells: ~40 MB read in milliseconds, where rebuilding them took ~4 s of forwards)."""
    traces = cfg.engine.get("cache_traces", "auto")
    on = bool(cfg.engine.activation_cache)
    return ActivationCache(lm, spec.grid, disk=on, shared=on,
                           traces=lm.device.type == "cpu" if traces == "auto" else bool(traces))


def clean_phase(
    lm: LoadedModel, spec: Spec, cells: Sequence[Cell], *, book: PromptBook, cache: ActivationCache,
    capture_cells: int,
) -> None:
    """Captures of a job's cells in large batches (one prefix tree and one XY decode per
    `capture_cells` cells), before the patched steps: kept in memory for those steps, on disk
    for other jobs. Cells beyond what the memory cache holds are captured in their own steps."""
    from lac.tracking import phase_progress

    size = max(capture_cells, 1)
    ahead = list(cells[: cache.memory_cells])
    t0 = time.time()
    with phase_progress("clean captures", len(ahead), "cell") as advance:
        for i in range(0, len(ahead), size):
            capture(lm, spec, ahead[i : i + size], book=book, cache=cache, batch_cells=size)
            advance(len(ahead[i : i + size]))
            log.info("clean captures: %d/%d cells (%.0f s)", min(i + size, len(ahead)), len(ahead), time.time() - t0)


def compute_cells(
    lm: LoadedModel, spec: Spec, cells: Sequence[Cell], *, book: PromptBook,
    cache: ActivationCache | None, max_rows: int, batch_cells: int, ctx: dict,
) -> tuple[list[dict], list[dict]]:
    """Rows (and generation records) of one batch of cells: the work of one predict step."""
    caps = capture(lm, spec, cells, book=book, cache=cache, batch_cells=batch_cells)
    rows: list[dict] = []
    if spec.mode == "markers":
        gens = _markers(lm, spec, caps, book, ctx, rows, batch_cells)
        return rows, gens
    grid = spec.grid
    for cap in caps:
        for site in spec.sites:
            for L in spec.geometry_layers:
                h = {s: cap.h(grid.role(s), site, L) for s in grid.subsets()}
                rows += [_row(cap.cell, site, [L], DECOMPOSITION, m, v, ctx, factor=f)
                         for m, f, v in design_geometry(h, grid.factor_names)]
    for cap, job, metric, kl in kl_rows(lm, caps, spec.jobs, max_rows=max_rows):
        if kl != kl or kl in (float("inf"), float("-inf")):
            raise FloatingPointError(
                f"non-finite KL for {lm.name} ({lm.dtype}) cell {cap.cell.key}, site {job.site}, layers {job.layers}"
            )
        iv = job.intervention
        rows.append(_row(cap.cell, job.site, job.layers, iv.name, metric, kl, ctx, **_about(iv)))
    if spec.attn_mass:
        for cap, site, L, values in attention_mass(lm, caps, spec.sites, max_rows=max_rows):
            rows += [_row(cap.cell, site, [L], ATTENTION, m, v, ctx) for m, v in values.items()]
    return rows, []


def marker_generations(
    lm: LoadedModel, caps: Sequence[CellCapture], conditions: Sequence[str | Intervention],
    layers: int | Sequence[int], *, book: PromptBook, max_new_tokens: int, batch_rows: int,
) -> list[tuple[CellCapture, str, bool, list[int]]]:
    """Greedy generations of each cell under each condition: (cap, condition, changed, tokens).

    Each condition's Change at p_last of `layers` applies in the prompt pass (residual
    writes) or for the whole generation (knockout, transplanted K/V). Every row
    continues a clean prompt trace (the host's from the capture, the bare prompts'
    from one prefix tree) from the change's first position; a plain write at p_last
    makes the prompt pass that one token.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    ivs = {(c if isinstance(c, str) else c.name): (get_intervention(c, getattr(book, "grid", None)) if isinstance(c, str) else c)
           for c in conditions}
    conditions = list(ivs)
    bare = {}
    if "bare" in conditions:
        ids = {book.get(c.cell, "bare").ids for c in caps}
        bare = prefix_traces(lm, {p[:-1]: Want(lm.n_layers, len(p) - 1) for p in ids})
    items = []
    for cap in caps:
        for cond in conditions:
            if cond == "bare":
                p = book.get(cap.cell, "bare").ids
                items.append((cap, cond, Row([p[-1]], prefix=bare[p[:-1]], start=len(p) - 1)))
                continue
            iv = ivs[cond]
            p = cap.prompts[iv.host].ids
            if iv.writes:
                items.append((cap, cond, change_row(cap, iv.change(cap, "p_last", layers), len(p))))
            else:
                items.append((cap, cond, Row([p[-1]], prefix=cap.traces[iv.host], start=len(p) - 1)))
    from lac.tracking import phase_progress

    out = []
    step = max(batch_rows, 1)
    with phase_progress("generation", len(items) * max_new_tokens, "tok") as advance:
        for i in range(0, len(items), step):
            part = items[i : i + step]
            toks, _ = greedy(lm, [r for *_, r in part], max_new_tokens)
            out += [(cap, cond, cond != "bare" and ivs[cond].writes, tk)
                    for (cap, cond, _), tk in zip(part, toks, strict=True)]
            advance(len(part) * max_new_tokens)
            log.info("generated %d/%d rows x %d tokens", len(out), len(items), max_new_tokens)
    return out


def _markers(lm, spec, caps, book, ctx, rows, batch_cells) -> list[dict]:
    """Generations under each condition, scored with the persona's markers."""
    layers = list(spec.marker_layers)
    gens = []
    eos = eos_ids(lm)
    batch_rows = max(batch_cells * len(spec.conditions), 1)
    ivs = {iv.name: iv for iv in spec.condition_ivs}
    for cap, cond, patched, tk in marker_generations(
        lm, caps, spec.condition_ivs, layers, book=book, max_new_tokens=spec.max_new_tokens, batch_rows=batch_rows
    ):
        cut = next((j for j, t in enumerate(tk) if t in eos), len(tk))
        text = lm.tokenizer.decode(tk[:cut], skip_special_tokens=True)
        s = score(text, spec.grid.markers[cap.cell.persona])
        dose: dict[str, Any] = {} if ivs[cond].alpha is None else {"alpha": ivs[cond].alpha}  # what produced the text
        if ivs[cond].name == "swap" and ivs[cond].factor == "persona":  # the partner persona's markers too (METHOD: markers of X and X')
            partner = spec.grid.partners["persona"][cap.cell.persona]
            s |= {f"{k}_partner": v for k, v in score(text, spec.grid.markers[partner]).items()}
            dose["partner"] = partner
        used = layers if patched else []
        about = _about(ivs[cond])
        for metric in ("marker_any", "marker_distinct", "marker_any_partner", "marker_distinct_partner"):
            if metric in s:
                rows.append(_row(cap.cell, "p_last", used, cond, metric, s[metric], ctx, **about))
        gens.append({"cell": cap.cell.key, "persona": cap.cell.persona, "task": cap.cell.task,
                     "condition": cond, "layer": max(used) if used else -1, **dose, "tokens": tk, "text": text, **s})
    return gens


def _lightning_module(lm, spec, book, cache, engine_cfg, ctx):
    import lightning as L

    class PatchingModule(L.LightningModule):
        """Holds the HF model; one predict step = all the work of one batch of cells."""

        def __init__(self):
            super().__init__()
            self.model = lm.model

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch  # cells are names, not tensors; the engine places its own tensors

        def predict_step(self, batch, batch_idx):
            rows, gens = compute_cells(
                lm, spec, batch, book=book, cache=cache, max_rows=engine_cfg.max_rows,
                batch_cells=engine_cfg.batch_cells, ctx=ctx,
            )
            return {"cells": [c.key for c in batch], "rows": rows, "generations": gens}

    return PatchingModule()


def _predict(lm: LoadedModel, spec: Spec, cells: list[Cell], store: JobStore, cfg: DictConfig, ctx: dict) -> None:
    book = PromptBook(lm.tokenizer, spec.grid)
    cache = activation_cache(cfg, lm, spec)
    clean_phase(lm, spec, cells, book=book, cache=cache, capture_cells=int(cfg.engine.capture_cells))
    t0 = time.monotonic()
    _imported()
    import lightning as L
    from lightning.pytorch.callbacks import BasePredictionWriter
    from torch.utils.data import DataLoader

    class PartWriter(BasePredictionWriter):
        """Persists each batch's rows the moment it is done: the unit of resume."""

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
            name = f"{time.time_ns()}-{batch_idx:05d}"
            store.write_part(name, frame(prediction["rows"]), prediction["cells"], prediction["generations"])
            log.info("cells done: %s", ", ".join(prediction["cells"]))

    module = _lightning_module(lm, spec, book, cache, cfg.engine, ctx)
    loader = DataLoader(cells, batch_size=int(cfg.engine.batch_cells), shuffle=False, collate_fn=list)
    accel = {"cuda": "gpu", "mps": "mps"}.get(lm.device.type, "cpu")
    from lac.tracking import trainer_options

    options = trainer_options(len(cells))  # progress in cells, Lightning quiet, patched steps timed
    trainer = L.Trainer(
        accelerator=accel, devices=1, **{**options, "callbacks": [PartWriter("batch"), *options["callbacks"]]},
    )
    from lac.tracking import note_phase

    note_phase("lightning set-up", time.monotonic() - t0)
    try:
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    except SystemExit as e:
        # Lightning turns Ctrl-C (and lac.run's SIGTERM) into sys.exit(1) while handling it: it stays
        # what it was for lac.run. Any other exit (submitit's requeue on USR2) goes on as it is.
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None
        raise
    log.info("activation cache %s: %s", cache.key, cache.hits)


def _copy_into(job_dir: Path, store: JobStore) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)  # Hydra's is made already; lac.api's is made here
    for name in ("results.parquet", "summary.json", "generations.jsonl"):
        src = store.dir / name
        if src.is_file():
            atomic_write_bytes(job_dir / name, src.read_bytes())


def provenance() -> dict[str, Any]:
    """What produced a job's numbers: lac, its numerics version, the git commit of a checkout, libraries."""
    import subprocess

    import transformers

    from lac.numerics import NUMERICS_VERSION

    out: dict[str, Any] = {"lac_version": lac.__version__, "numerics_version": NUMERICS_VERSION,
                           "torch": torch.__version__, "transformers": transformers.__version__, "git_commit": None}
    repo = Path(lac.__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            git = ["git", "-C", str(repo)]
            head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            if head.returncode == 0:
                out["git_commit"] = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def _compute(cfg: DictConfig, spec: Spec, store: JobStore, key: str, config: dict, t0: float,
             on_loaded: Callable[[], None] = lambda: None, on_checked: Callable[[], None] = lambda: None):
    """Resume or start the job's cells in `store` and write its final files; returns (summary, df, gens).
    `on_checked` runs once the job's checks pass (before the weights load), `on_loaded` once the model
    is loaded (work to overlap with the load, or with the compute)."""
    store.claim(config)
    done_cells = store.read_parts()[2] if store.has_parts() else set()
    cells = [c for c in spec.grid.cells() if c.key not in done_cells]
    if done_cells:
        log.info("resuming job %s: %d cells done, %d to go", key, len(done_cells), len(cells))
    ctx = {"model": cfg.model.name, "model_id": str(cfg.model.id), "grid": spec.grid.name}
    if cells:
        lm = prepare_model(cfg, spec, on_checked)
        if lm.n_layers != spec.n_layers:
            raise ConfigError(f"{cfg.model.name} has {lm.n_layers} layers but its config says n_layers={spec.n_layers}")
        on_loaded()
        _import_in_background("pandas", "lightning.pytorch")  # ~0.5 + 1.5 s, beside the clean captures
        torch.manual_seed(0)
        _predict(lm, spec, cells, store, cfg, ctx)
    df, gens, got = store.read_parts()
    missing = {c.key for c in spec.grid.cells()} - got
    if missing:
        raise RuntimeError(f"job {key} is missing cells after the run: {sorted(missing)}")
    df = df.sort_values(["metric", "intervention", "site", "layer", "layers", "cell"], kind="stable").reset_index(drop=True)
    summary = {
        **provenance(), "schema": SCHEMA_VERSION, "key": key,
        "config": config, "summary": summarize(df), "seconds": round(time.time() - t0, 2),
        # the report tells two grids of one name apart by it (swap's partners are the intervention's, not the grid's)
        "grid_hash": dataclasses.replace(spec.grid, partners={}).content_hash(), "finished": round(time.time(), 3),
    }
    changed = [*spec.interventions, *(spec.condition_ivs if spec.mode == "markers" else ())]
    if any("L" in iv.host for iv in changed):
        summary["length_matched"] = length_matched_texts(cfg, spec)
    t1 = time.monotonic()
    store.finish(df, summary, gens)
    from lac.tracking import note_phase

    note_phase("writes", time.monotonic() - t1)
    return summary, df, gens


def _import_in_background(*modules: str) -> None:
    """Import `modules`, in order, in one daemon thread: the imports overlap torch work (which releases
    the GIL). The main thread calls `_imported()` before it uses them: Python's import lock does not
    make a concurrent import of the same package safe (the main thread's `from lightning.pytorch...`
    went ahead on the half-initialised package, whose __init__ then set Lightning's log level back to
    INFO after lac had quieted it)."""
    import importlib
    import sys
    import threading

    todo = [m for m in modules if m not in sys.modules]

    def work() -> None:
        from lac.tracking import note_beside

        t0 = time.thread_time()
        for m in todo:
            importlib.import_module(m)
        note_beside("imports", time.thread_time() - t0)

    if todo:
        _IMPORTING.append(threading.Thread(target=work, name="lac-import", daemon=True))
        _IMPORTING[-1].start()


_IMPORTING: list = []  # background import threads not yet joined


def _imported() -> None:
    """Wait for the background imports (an import that failed there is simply done again by the caller)."""
    while _IMPORTING:
        _IMPORTING.pop().join()


class _EarlyRun:
    """A job's W&B run, begun beside the job's work; its results are logged only once they are safe
    on disk (`_track`). With tracker.process (the default on POSIX) a child process is spawned as
    the job starts (it imports wandb while the job's start leaves a core idle) and begins the run
    once the job's checks pass, while the weights load (lac.tracker_process); else a thread begins
    it once the model is loaded (`_start_tracking`). `pending`: Future-like, or None."""

    def __init__(self, cfg: DictConfig, store: JobStore, run_id: str, job_dir: Path, name: str, config: dict):
        from lac.tracking import use_process

        self.args = (cfg, store, run_id, job_dir, name, config)
        self.pending: Any = None
        self.remote = None
        if use_process(cfg.tracker) and not store.tracked(run_id, _dest(cfg)):
            from lac.tracker_process import RemoteTracker

            self.remote = RemoteTracker()

    def checked(self) -> None:
        if self.remote is not None and self.pending is None:
            cfg, _, run_id, job_dir, name, config = self.args
            self.remote.begin(cfg.tracker, run_id=run_id, config=config, run_dir=job_dir, name=name)
            self.pending = self.remote

    def loaded(self) -> None:
        if self.remote is None and self.pending is None:
            self.pending = _start_tracking(*self.args)

    def for_track(self) -> Any:
        """What `_track` logs to: the run begun here (a resumed job with nothing left to compute
        begins it now)."""
        self.checked()
        return self.pending

    def abandon(self) -> None:
        """A job that failed: a run begun ends marked failed; a child never asked for one waits for
        the process's next job."""
        if self.remote is not None and self.pending is None:
            self.remote.release()
        else:
            _abandon_tracking(self.pending)


def _dest(cfg: DictConfig) -> tuple[str | None, str | None]:
    """The W&B project and entity a job's run goes to (W&B's variables win): a run is logged once per pair."""
    if cfg.tracker.get("name") == "none":
        return (None, None)
    from lac.tracking import wandb_settings

    s = wandb_settings(cfg.tracker)
    return (s.get("project"), s.get("entity"))


def _start_tracking(cfg: DictConfig, store: JobStore, run_id: str, job_dir: Path, name: str,
                    config: dict) -> Future | None:
    """Begin the job's W&B run (import, init) in a background thread while the job computes."""
    if cfg.tracker.get("name") == "none" or store.tracked(run_id, _dest(cfg)):
        return None
    from lac.tracking import start_tracker

    def begin():
        from lac.tracking import note_beside

        t0 = time.thread_time()
        try:
            return start_tracker(cfg.tracker, run_id=run_id, config=config, run_dir=job_dir, name=name)
        finally:
            note_beside("W&B start", time.thread_time() - t0)

    pool = ThreadPoolExecutor(1, thread_name_prefix="lac-wandb")
    pending = pool.submit(begin)
    pool.shutdown(wait=False)
    return pending


def _abandon_tracking(pending: Any, exit_code: int | None = 1) -> None:
    """A job that failed: its early-started W&B run ends marked failed (exit code 1), never left open."""
    if pending is None:
        return
    try:
        pending.result().finish(exit_code=exit_code)
    except Exception as e:  # the job's own error is the one to report
        log.debug("W&B run of a failed job could not be finished: %s", e)


def _track(cfg: DictConfig, store: JobStore, run_id: str, job_dir: Path, name: str, config: dict,
           pending: Future | None = None) -> None:
    """Log the job's W&B run unless this store already holds a finished one for this run id
    (a job killed after its results were safe, or a twin that waited on the lock, logs it now)."""
    from lac.tracking import TrackerError, start_tracker, timing_line

    t0 = time.monotonic()
    summary = json.loads((store.dir / "summary.json").read_text())
    if not store.tracked(run_id, _dest(cfg)):
        import pandas as pd

        df = pd.read_parquet(store.dir / "results.parquet")
        gens_file = store.dir / "generations.jsonl"
        gens = [json.loads(line) for line in gens_file.read_text().splitlines()] if gens_file.is_file() else []
        if pending is not None:
            tracker = pending.result()
        else:
            tracker = start_tracker(cfg.tracker, run_id=run_id, config=config, run_dir=job_dir, name=name)
        try:
            try:
                tracker.log_results(df, summary["summary"])
                if gens:
                    tracker.log_generations(gens)
            finally:
                tracker.finish()
        except TrackerError as e:  # W&B's process died under us: the results are safe, the run is not marked
            raise TrackerError(f"{e}; the job's results are kept in {store.dir}, and the same command logs "
                               "its W&B run") from e
        if tracker.mode in ("online", "offline"):
            store.mark_tracked(run_id, tracker.url_or_dir, _dest(cfg))
    elif pending is not None:  # a twin logged this run meanwhile: end ours without logging twice
        _abandon_tracking(pending, exit_code=None)
    log.info("%s", timing_line(summary.get("seconds"), time.monotonic() - t0))


_FULL_OR_LOCKED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}  # a disk full, read-only or not ours


@contextlib.contextmanager
def _full_disk_is_one_line(store_dir: Path) -> Iterator[None]:
    """A disk that fills up while a job writes: a LacError (`lac: ...`, exit 2) that says what is kept
    and what to do, not a traceback through Lightning; other OS errors stay what they are."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL_OR_LOCKED:
            raise
        where = f": {e.filename}" if e.filename else ""  # a failed write() names no file
        raise LacError(f"{e.strerror}{where}; the cells written before it are kept in {store_dir}: "
                       "free space (or fix the permissions) and run the same command again") from e


def run(cfg: DictConfig, job_dir: Path | None = None) -> dict[str, Any]:
    """One job end to end; returns its summary. Re-running a finished job loads no model;
    `rerun=true` recomputes it and swaps the new results in atomically."""
    from lac.tracking import run_id_for

    global _STARTED_UP
    if not _STARTED_UP:  # the process's imports and Hydra, once (a multirun's later jobs have none)
        from lac.tracking import note_phase

        note_phase("start-up", time.monotonic() - lac.STARTED)
        _STARTED_UP = True
    spec = preflight(cfg)  # every user error surfaces here, before any model loads
    with open_dict(cfg):  # what the job read from files goes into its config (summary.json, W&B)
        if cfg.model.get("n_layers") is None:  # model=local: from config.json, so reports line models up by depth
            cfg.model.n_layers = spec.n_layers
        if cfg.grid.get("name") is None:  # grid=custom: the file's stem, so two grid files are two grids
            cfg.grid.name = spec.grid.name
    key = job_key(cfg)
    job_dir = Path(job_dir or ".")
    rerun = bool(cfg.get("rerun", False))
    final = JobStore(Path(cfg.results_root), key)
    config = OmegaConf.to_container(cfg, resolve=True)
    t0 = time.time()
    pending = None
    with _full_disk_is_one_line(final.dir), final.lock(timeout=float(cfg.engine.get("lock_timeout", -1))):
        # a rerun of finished results is a W&B run of its own (`-r1`, `-r2` ...): under the first run's id
        # (resume="allow") its history would be appended to the old run's
        reruns = final.reruns + (1 if rerun and final.done else 0)
        run_id = run_id_for(key, cfg.tracker) + (f"-r{reruns}" if reruns else "")
        name = f"{cfg.model.name}-{spec.grid.name}-{key[:8]}" + (f"-rerun{reruns}" if reruns else "")
        if not rerun and final.done:
            log.info("job %s already finished in %s: reusing its results", key, final.dir)
            staged = JobStore(Path(cfg.results_root), key, staging=True)
            if staged.has_parts():  # a rerun killed mid-way: its parts wait for the next rerun=true
                log.warning("an unfinished rerun of job %s is in %s (rerun=true resumes it; delete the folder "
                            "to drop it)", key, staged.dir)
            summary = json.loads((final.dir / "summary.json").read_text())
        else:
            store = JobStore(Path(cfg.results_root), key, staging=True) if rerun else final
            if rerun:
                log.info("rerun=true: recomputing job %s in %s", key, store.dir)
            early = _EarlyRun(cfg, store, run_id, job_dir, name, config)
            try:
                summary, _, _ = _compute(cfg, spec, store, key, config, t0, on_loaded=early.loaded,
                                         on_checked=early.checked)
                pending = early.for_track()
            except BaseException:
                store.discard_if_empty()
                early.abandon()
                raise
            store.publish(reruns)
        _copy_into(job_dir, final)
        _track(cfg, final, run_id, job_dir, name, config, pending)
    print(format_table(summary["summary"]))
    log.info("results: %s (job store %s)", job_dir.resolve(), final.dir)
    return summary
