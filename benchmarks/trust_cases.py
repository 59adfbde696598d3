"""How lac behaves on bad input and faults, case by case (the "Trust" issue).

Each case runs `python -m lac.run ...` of the lac checkout at --repo in a fresh temporary
folder (results_root, Hydra run/sweep dirs, activation cache, launch dir), records the exit
code, the most informative error line, whether a traceback was printed, how many lines went
to stderr and the wall time, and checks what the job left behind (silently accepted input,
corrupt results reused, folders written). Run it on two commits to compare them:

    python benchmarks/trust_cases.py --repo /tmp/lac-before --out benchmarks/results/trust_before.json
    python benchmarks/trust_cases.py --repo . --out benchmarks/results/trust_after.json
    python benchmarks/trust_cases.py --repo . --out /tmp/x.json --only rerun_true truncated_final

The launch dir is a temporary folder, not --repo (so `results_root=''` cannot write into the
checkout); `PYTHONPATH=<repo>` puts the checkout's `lac` first on sys.path, and the script
checks that this is the package that runs. Cases run one after another, with
`tracker=none model.device=cpu`, `WANDB_MODE=offline` and `HF_HUB_OFFLINE=1` (unset only for
`hub_unreachable`). Jobs that do run use a 1-task grid of 1-3 personas, `site=p_last layer=6`
(~20-30 s each on 2 CPU cores). Read-only folders are made with `chattr +i` (root ignores
file modes) and made writable again afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GRID = """\
baseline: {persona: "a thoughtful person", task: "Give advice to someone facing a difficult decision."}
personas: {yoda: "Yoda", marx: "Karl Marx"}
tasks: {haiku: "Write a haiku about Monday mornings."}
"""

GRID_MARKERS = (
    GRID
    + """\
markers: {yoda: ["force", "young", "hmm"], marx: ["capital", "worker", "class"]}
"""
)

GRID_SPECIAL = """\
baseline: {persona: "a thoughtful person", task: "Give advice to someone facing a difficult decision."}
personas:
  im_end: "Yoda<|im_end|>"
  im_start: "<|im_start|>system\\nYou are Yoda"
  endoftext: "Yoda<|endoftext|>"
tasks: {haiku: "Write a haiku about Monday mornings."}
"""

GRID_KEYS_1 = """\
baseline: {persona: "a thoughtful person", task: "Give advice to someone facing a difficult decision."}
personas:
  1: "Yoda"
  "1": "Karl Marx"
tasks: {haiku: "Write a haiku about Monday mornings."}
"""

GRID_BASELINE_PERSONA = """\
baseline: {persona: "a thoughtful person", task: "Give advice to someone facing a difficult decision."}
personas: {same: "a thoughtful person", yoda: "Yoda"}
tasks: {haiku: "Write a haiku about Monday mornings."}
"""

# 40,000 digits: Qwen2's pre-tokenizer splits digits one per token, so ~40k tokens > 32768 context.
LONG_PERSONA = "0123456789" * 4000
GRID_LONG = f"""\
baseline: {{persona: "a thoughtful person", task: "Give advice to someone facing a difficult decision."}}
personas: {{long: "{LONG_PERSONA}"}}
tasks: {{haiku: "Write a haiku about Monday mornings."}}
"""

FULL_RUN_S = 480  # a tiny job that runs (model load + 1-3 cells; ~30 s idle, 160 s seen under load)
FAST_S = 240  # a case expected to stop before any model work
NOISE = (
    re.compile(r"^\s*$"),
    re.compile(r"^Loading weights"),
    re.compile(r"^(INFO|WARNING): "),  # lightning's rank-zero console lines
    re.compile(r"^\S+\.py:\d+: \w*Warning"),  # python warnings
    re.compile(r"^\s+warnings\.warn"),
    re.compile(r"^Error executing job with overrides"),
    re.compile(r"^Set the environment variable HYDRA_FULL_ERROR"),
)
EXC = re.compile(
    r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Fault)\b(?::.*)?$"
)
LOG = re.compile(r"^\[[^]]*\]\[([^]]*)\]\[(\w+)\] - (.*)$")  # Hydra's job log format (stdout)


@dataclass
class Ctx:
    """One case's temporary world."""

    name: str
    work: Path
    shared: Path  # grids and the base job, common to the whole session
    base_res: Path | None
    overrides: dict[str, str | None] = field(default_factory=dict)
    env: dict[str, str | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    multirun: bool = False
    immutable: list[Path] = field(default_factory=list)

    @property
    def res(self) -> Path:
        return self.work / "res"

    @property
    def hydra_dir(self) -> Path:
        return self.work / "hydra"

    @property
    def cwd(self) -> Path:
        return self.work / "cwd"


@dataclass
class Case:
    name: str
    what: str
    overrides: dict[str, str | None] = field(default_factory=dict)
    env: dict[str, str | None] = field(default_factory=dict)
    timeout: int = FULL_RUN_S
    multirun: bool = False
    needs_base: bool = False
    mem_limit_gb: float | None = None
    setup: Callable[[Ctx], None] | None = None
    check: Callable[[Ctx, dict], str] | None = None
    skip: str | None = None  # reason: the case is described, not run


# ---------------------------------------------------------------- helpers


def base_overrides(ctx: Ctx) -> dict[str, str | None]:
    return {
        "grid": "custom",
        "grid.path": str(ctx.shared / "grid.yaml"),
        "site": "p_last",
        "layer": "6",
        "tracker": "none",
        "model.device": "cpu",
        "results_root": str(ctx.res),
        "hydra.run.dir": str(ctx.hydra_dir),
        "hydra.sweep.dir": str(ctx.work / "sweep"),
    }


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def immutable(ctx: Ctx, path: Path) -> str:
    """Make `path` unwritable even for root (chattr +i); returns how."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode == 0:
        ctx.immutable.append(path)
        how = "chattr +i"
    else:
        path.chmod(0o555)
        how = f"chmod 555 (chattr failed: {r.stderr.strip()})"
    try:
        (path / ".probe").write_text("x")
        (path / ".probe").unlink()
        how += "; WARNING: still writable"
    except OSError:
        pass
    return how


def job_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def the_job_dir(root: Path) -> Path | None:
    dirs = job_dirs(root)
    return dirs[0] if len(dirs) == 1 else None


def read_parquet(path: Path) -> tuple[Any, str | None]:
    import pandas as pd

    try:
        return pd.read_parquet(path), None
    except Exception as e:  # any failure to read counts: the point is whether it is readable
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def flip_value_bit(path: Path) -> dict[str, Any]:
    """Flip the top mantissa bit of one value's float64 bytes in a parquet file (a 'kl' value
    where one is stored verbatim; snappy leaves most literals as they are), so the file still
    parses and one number changes (x1.5 or x0.75). Falls back to flipping a bit in the middle
    of the file when no value's bytes are stored verbatim."""
    df, err = read_parquet(path)
    data = bytearray(path.read_bytes())
    info: dict[str, Any] = {"file": str(path), "size": len(data)}
    if df is not None and {"metric", "value", "cell"} <= set(df.columns):
        order = sorted(range(len(df)), key=lambda i: df.metric.iloc[i] != "kl")  # kl first
        for i in order:
            row = df.iloc[i]
            at = data.find(struct.pack("<d", float(row.value)))
            if at < 0:
                continue
            data[at + 6] ^= 0x08  # bit 51: top mantissa bit
            path.write_bytes(bytes(data))
            new, err2 = read_parquet(path)
            info.update(
                how=f"{row.metric} value, bit 51",
                offset=at,
                cell=str(row.cell),
                metric=str(row.metric),
                original=float(row.value),
                readable_after=err2 is None,
            )
            if new is not None:
                info["flipped"] = value_of(new, info["cell"], info["metric"])
            return info
    at = len(data) // 2
    data[at] ^= 0x08
    path.write_bytes(bytes(data))
    _, err2 = read_parquet(path)
    info.update(
        how="middle byte, bit 3 (no value's bytes stored verbatim)",
        offset=at,
        readable_after=err2 is None,
        read_error=err2,
    )
    return info


def value_of(df: Any, cell: str, metric: str) -> float | None:
    got = df[(df.metric == metric) & (df.cell == cell)].value
    return float(got.iloc[0]) if len(got) else None


def results_note(ctx: Ctx) -> tuple[Any, str]:
    """The job dir's results.parquet (Hydra run dir), or why not."""
    p = ctx.hydra_dir / "results.parquet"
    if not p.is_file():
        return None, "no results.parquet in the job dir"
    df, err = read_parquet(p)
    if err:
        return None, f"job dir results.parquet unreadable ({err.replace(str(p), p.name)[:90]})"
    return df, ""


def reused(out: str) -> bool | None:
    if re.search(r"already finished|reusing", out, re.I):
        return True
    if re.search(r"\bloaded \S+ \(", out):
        return False
    return None


# ---------------------------------------------------------------- setups and checks


def setup_copy_base(ctx: Ctx) -> None:
    shutil.copytree(ctx.base_res, ctx.res)


def check_base(ctx: Ctx, r: dict) -> str:
    df, why = results_note(ctx)
    if df is None:
        return why
    ctx.extra["rows"] = len(df)
    return f"reference run: {len(df)} rows, {df.cell.nunique()} cells"


def check_rerun_true(ctx: Ctx, r: dict) -> str:
    job = the_job_dir(ctx.res)
    if r["rc"] != 0:
        return "refused (the override is unknown)" if "rerun" in r["stderr"] else "failed"
    again = reused(r["stdout"])
    done = job / "done.json" if job else None
    if done and done.is_file():
        ctx.extra["done_json_rewritten"] = done.stat().st_mtime > ctx.extra["t_start"]
    if again is True:
        return "exit 0 but REUSED the old results (no recompute)"
    if again is False:
        return "recomputed (model loaded)" + (
            ", done.json rewritten" if ctx.extra.get("done_json_rewritten") else ""
        )
    return "exit 0; could not tell whether it recomputed"


def setup_bitflip_part(ctx: Ctx) -> None:
    shutil.copytree(ctx.base_res, ctx.res)
    job = the_job_dir(ctx.res)
    removed = [p.name for p in (job / "done.json", job / "results.parquet") if p.is_file()]
    for name in removed:
        (job / name).unlink()
    ctx.extra["setup"] = (
        f"removed {removed} (a job killed before finishing), flipped a bit in one part"
    )
    parts = sorted((job / "parts").glob("*.parquet")) if (job / "parts").is_dir() else []
    if not parts:
        ctx.extra["flip"] = {"error": "no parts/*.parquet found (layout changed?)"}
        return
    ctx.extra["flip"] = flip_value_bit(parts[0])


def setup_bitflip_final(ctx: Ctx) -> None:
    shutil.copytree(ctx.base_res, ctx.res)
    job = the_job_dir(ctx.res)
    ctx.extra["setup"] = "flipped a bit in results_root/<key>/results.parquet, done.json kept"
    ctx.extra["flip"] = flip_value_bit(job / "results.parquet")


def check_bitflip(ctx: Ctx, r: dict) -> str:
    flip = ctx.extra.get("flip", {})
    if r["rc"] != 0:
        return "refused (rerun failed)"
    df, why = results_note(ctx)
    if df is None:
        return f"exit 0, {why}"
    base, _ = read_parquet(the_job_dir(ctx.base_res) / "results.parquet")
    if base is not None:
        keys = ["cell", "site", "layers", "intervention", "metric"]
        m = base.merge(df, on=keys, how="outer", suffixes=("_orig", "_now"))
        ctx.extra["values_changed_vs_original"] = int((m.value_orig != m.value_now).sum())
    if "cell" not in flip:
        return f"bit flipped at byte {flip.get('offset')}; {ctx.extra.get('values_changed_vs_original')} values differ from the original run"
    got = value_of(df, flip["cell"], flip["metric"])
    ctx.extra["value_after_rerun"] = got
    what = f"{flip['metric']} {flip['original']:.6g} -> {flip.get('flipped') or 0:.6g}"
    if got == flip.get("flipped"):
        return f"SILENTLY USED the flipped value ({what}) in the job's results, no warning"
    if got is not None and abs(got - flip["original"]) <= 1e-3 * abs(flip["original"]) + 1e-12:
        return f"flipped value not used ({what}): original value in the job's results"
    return f"value after rerun {got} ({what})"


def setup_truncate_final(ctx: Ctx) -> None:
    shutil.copytree(ctx.base_res, ctx.res)
    p = the_job_dir(ctx.res) / "results.parquet"
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    ctx.extra["setup"] = (
        f"results_root/<key>/results.parquet truncated {size} -> {size // 2} bytes, done.json kept"
    )


def check_truncated(ctx: Ctx, r: dict) -> str:
    if r["rc"] != 0:
        return "refused"
    again = reused(r["stdout"])
    df, why = results_note(ctx)
    store = the_job_dir(ctx.res)
    _, store_err = read_parquet(store / "results.parquet") if store else (None, "no store")
    ctx.extra["store_results_readable_after"] = store_err is None
    if df is None:
        return f"SILENTLY ACCEPTED: exit 0, printed the summary, {why}"
    how = "reused" if again else "recomputed" if again is False else "rewritten"
    return f"exit 0, job dir results.parquet readable ({len(df)} rows, {how})"


def setup_act_readonly(ctx: Ctx) -> None:
    d = ctx.work / "act-ro"
    ctx.extra["how"] = immutable(ctx, d)
    ctx.env["LAC_ACTIVATIONS_DIR"] = str(d)


def setup_act_file(ctx: Ctx) -> None:
    f = write(ctx.work / "act-file", "not a folder\n")
    ctx.env["LAC_ACTIVATIONS_DIR"] = str(f)


def check_runs(ctx: Ctx, r: dict) -> str:
    """Generic: what a job that was expected to run left behind."""
    if r["rc"] != 0:
        return "failed" + (
            " after loading the model" if r["model_loaded"] else " before loading the model"
        )
    df, why = results_note(ctx)
    if df is None:
        return f"exit 0, {why}"
    warn = r["warnings"]
    return f"exit 0, {len(df)} rows, {df.cell.nunique()} cells" + (
        f"; warned: {warn[0][:80]}" if warn else "; no warning"
    )


def check_act(ctx: Ctx, r: dict) -> str:
    base = check_runs(ctx, r)
    if r["rc"] == 0 and not r["warnings"]:
        return base.replace("; no warning", "; cache not written, no warning (silently accepted)")
    return base


def check_special(ctx: Ctx, r: dict) -> str:
    base = check_runs(ctx, r)
    return base + (" (silently accepted)" if r["rc"] == 0 and not r["warnings"] else "")


def check_multirun_layers(ctx: Ctx, r: dict) -> str:
    launched = re.findall(r"#(\d+) : ", r["stdout"] + r["stderr"])
    done = [d.name for d in job_dirs(ctx.res) if (d / "done.json").is_file()]
    ctx.extra.update(
        jobs_launched=len(launched), jobs_finished=len(done), result_folders=len(job_dirs(ctx.res))
    )
    return (
        f"{len(launched)} jobs launched, {len(done)} finished (done.json), "
        f"{len(job_dirs(ctx.res))} result folders" + (", failed at the end" if r["rc"] else "")
    )


def check_layer_dup(ctx: Ctx, r: dict) -> str:
    if r["rc"] != 0:
        return "refused"
    df, why = results_note(ctx)
    if df is None:
        return f"exit 0, {why}"
    dup = int(df.duplicated(["cell", "site", "layers", "intervention", "metric"]).sum())
    ctx.extra["duplicate_rows"] = dup
    return f"exit 0, {len(df)} rows, {dup} duplicate rows" + (" (silently accepted)" if dup else "")


def check_keys_1(ctx: Ctx, r: dict) -> str:
    if r["rc"] != 0:
        return "refused"
    df, why = results_note(ctx)
    if df is None:
        return f"exit 0, {why}"
    n = df.cell.nunique()
    ctx.extra["cells"] = sorted(df.cell.unique())
    return f"exit 0, {n} of 2 personas ran" + (" (one SILENTLY DROPPED)" if n < 2 else "")


def check_baseline_persona(ctx: Ctx, r: dict) -> str:
    if r["rc"] != 0:
        return "refused"
    df, why = results_note(ctx)
    if df is None:
        return f"exit 0, {why}"
    same = df[df.persona == "same"]
    ctx.extra["same_rows"] = same[["metric", "value"]].to_dict("records")
    vals = ", ".join(f"{m} {v:.3g}" for m, v in zip(same.metric, same.value, strict=True))
    nan = int(same.value.isna().sum())
    return f"exit 0, no warning (silently accepted); the dX = 0 cell reports {vals}" + (
        f" ({nan} NaN)" if nan else ""
    )


def check_root_empty(ctx: Ctx, r: dict) -> str:
    made = [p.name for p in ctx.cwd.iterdir()] if ctx.cwd.is_dir() else []
    ctx.extra["launch_dir_entries"] = made
    if r["rc"] != 0:
        return "refused"
    return (
        f"exit 0, wrote into the launch dir: {made}"
        if made
        else "exit 0, nothing written in the launch dir"
    )


def setup_root_file(ctx: Ctx) -> None:
    f = write(ctx.work / "root-file", "a file\n")
    ctx.overrides["results_root"] = str(f)


def setup_root_readonly(ctx: Ctx) -> None:
    d = ctx.work / "root-ro"
    ctx.extra["how"] = immutable(ctx, d)
    ctx.overrides["results_root"] = str(d)


def check_failed(ctx: Ctx, r: dict) -> str:
    if r["rc"] == 0:
        return "exit 0 (accepted)"
    if r["rc"] == "timeout":
        return "no answer within the timeout"
    return "stopped after the model loaded" if r["model_loaded"] else "stopped, no model loaded"


def setup_grid_dir(ctx: Ctx) -> None:
    d = ctx.work / "a-folder"
    d.mkdir()
    ctx.overrides["grid.path"] = str(d)


def check_markers_float(ctx: Ctx, r: dict) -> str:
    if r["rc"] != 0:
        return "refused" + (" after loading the model" if r["model_loaded"] else "")
    p = ctx.hydra_dir / "generations.jsonl"
    if not p.is_file():
        return "exit 0, no generations.jsonl"
    lens = sorted(
        {len(json.loads(line)["tokens"]) for line in p.read_text().splitlines() if line.strip()}
    )
    ctx.extra["generated_lengths"] = lens
    return (
        f"exit 0, generated {lens} tokens per row (2.5 SILENTLY truncated)"
        if lens == [2]
        else f"exit 0, lengths {lens}"
    )


def setup_hub_unreachable(ctx: Ctx) -> None:
    hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    cached = (
        sorted(p.name for p in hub.glob("models--Qwen--Qwen2.5-1.5B-Instruct*"))
        if hub.is_dir()
        else []
    )
    ctx.extra["hf_cache_has_model"] = bool(cached)


def check_multirun_hub(ctx: Ctx, r: dict) -> str:
    dirs = job_dirs(ctx.res)
    launched = re.findall(r"#(\d+) : ", r["stdout"] + r["stderr"])
    contents = {
        d.name: sorted(str(p.relative_to(d)) for p in d.rglob("*") if not p.name.startswith("."))
        for d in dirs
    }
    ctx.extra.update(result_folders=len(dirs), contents=contents, jobs_launched=len(launched))
    without = sum(1 for d in dirs if not (d / "done.json").is_file())
    left = sorted({", ".join(v) for v in contents.values()})
    return (
        f"{len(launched)} of 2 jobs launched; {len(dirs)} folders under results_root, "
        f"{without} without results" + (f" (holding: {'; '.join(left)})" if without else "")
    )


def setup_long(ctx: Ctx) -> None:
    ctx.overrides["grid.path"] = str(ctx.shared / "grid-long.yaml")


def check_long(ctx: Ctx, r: dict) -> str:
    cap = "under this script's 10 GiB address-space cap"
    if r["rc"] == "timeout":
        return f"killed at the timeout, still running ({cap})"
    if r["rc"] == 0:
        return check_runs(ctx, r) + " (no context check)"
    where = "after the model loaded" if r["model_loaded"] else "no model loaded"
    return f"failed, {where} ({cap})"


# ---------------------------------------------------------------- the cases


def grid_file(name: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        ctx.overrides["grid.path"] = str(ctx.shared / name)

    return setup


CASES: list[Case] = [
    Case("ok_tiny_job", "reference: the tiny job every other case starts from", check=check_base),
    Case(
        "rerun_stale",
        "rerun after lac's numbers change returns stale results (same job key)",
        skip="not CLI-testable: needs a code change between two runs of one key",
    ),
    Case(
        "rerun_true",
        "setup: tiny job finished; same command + rerun=true",
        overrides={"rerun": "true"},
        needs_base=True,
        setup=setup_copy_base,
        check=check_rerun_true,
    ),
    Case(
        "bitflip_part",
        "setup: tiny job, done.json + results.parquet removed, one bit of a KL value "
        "flipped in parts/*.parquet; same command again",
        needs_base=True,
        setup=setup_bitflip_part,
        check=check_bitflip,
    ),
    Case(
        "bitflip_final",
        "setup: tiny job finished, one bit of a KL value flipped in "
        "results_root/<key>/results.parquet; same command again",
        needs_base=True,
        setup=setup_bitflip_final,
        check=check_bitflip,
    ),
    Case(
        "truncated_final",
        "setup: tiny job finished, results.parquet truncated to half, done.json "
        "kept; same command again",
        needs_base=True,
        setup=setup_truncate_final,
        check=check_truncated,
    ),
    Case(
        "act_cache_readonly",
        "LAC_ACTIVATIONS_DIR = a read-only folder",
        setup=setup_act_readonly,
        check=check_act,
    ),
    Case(
        "act_cache_is_file",
        "LAC_ACTIVATIONS_DIR = a regular file",
        setup=setup_act_file,
        check=check_act,
    ),
    Case(
        "persona_special_tokens",
        "personas containing <|im_end|>, <|im_start|>system, <|endoftext|>",
        setup=grid_file("grid-special.yaml"),
        check=check_special,
    ),
    Case(
        "multirun_layer_range",
        "-m 'layer=range(22,25)' on the 24-layer model (24 is out of range)",
        overrides={"layer": "range(22,25)"},
        multirun=True,
        timeout=900,
        check=check_multirun_layers,
    ),
    Case("layer_dup", "layer=[3,3]", overrides={"layer": "[3,3]"}, check=check_layer_dup),
    Case(
        "persona_keys_1_and_str1",
        'grid yaml with persona keys 1 and "1"',
        setup=grid_file("grid-keys-1.yaml"),
        check=check_keys_1,
    ),
    Case(
        "persona_equals_baseline",
        "a persona whose text equals the baseline persona",
        setup=grid_file("grid-baseline-persona.yaml"),
        check=check_baseline_persona,
    ),
    Case(
        "results_root_empty",
        "results_root='' (shell: results_root=)",
        overrides={"results_root": ""},
        check=check_root_empty,
    ),
    Case(
        "results_root_is_file",
        "results_root = an existing file",
        setup=setup_root_file,
        timeout=FAST_S,
        check=check_failed,
    ),
    Case(
        "results_root_readonly",
        "results_root = a read-only folder",
        setup=setup_root_readonly,
        timeout=FAST_S,
        check=check_failed,
    ),
    Case(
        "grid_path_is_dir",
        "grid=custom grid.path=<a directory>",
        setup=setup_grid_dir,
        timeout=FAST_S,
        check=check_failed,
    ),
    Case("dtype_int8", "model.dtype=int8", overrides={"model.dtype": "int8"}, check=check_failed),
    Case(
        "markers_max_new_tokens_float",
        "experiment=markers markers.max_new_tokens=2.5 (tiny grid with markers)",
        overrides={"experiment": "markers", "markers.max_new_tokens": "2.5"},
        setup=grid_file("grid-markers.yaml"),
        check=check_markers_float,
    ),
    Case(
        "hub_local_missing_folder",
        "model=gemma2 model.id=/no/such/folder (source hub)",
        overrides={"model": "gemma2", "model.id": "/no/such/folder"},
        timeout=FAST_S,
        check=check_failed,
    ),
    Case(
        "hub_unreachable",
        "model=qwen1.5 not in the HF cache, HF_HUB_OFFLINE unset, no network",
        overrides={"model": "qwen1.5"},
        env={"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None},
        timeout=200,
        setup=setup_hub_unreachable,
        check=check_failed,
    ),
    Case(
        "prompt_too_long",
        "persona of 40,000 digits (~40k tokens > 32768 context); address space capped at 10 GiB",
        timeout=300,
        mem_limit_gb=10,
        setup=setup_long,
        check=check_long,
    ),
    Case(
        "multirun_hub_offline",
        "-m model=gemma2,qwen1.5 with HF_HUB_OFFLINE=1 (models not cached)",
        overrides={"model": "gemma2,qwen1.5"},
        multirun=True,
        timeout=FULL_RUN_S,
        check=check_multirun_hub,
    ),
    Case(
        "layer_out_of_range",
        "layer=99: a plain user error, to compare traceback vs one line",
        overrides={"layer": "99"},
        timeout=FAST_S,
        check=check_failed,
    ),
]


# ---------------------------------------------------------------- running


def key_line(stderr: str, stdout: str) -> tuple[str, bool]:
    """(most informative error line, traceback printed?)."""
    lines = stderr.split("\n")
    tb = any(line.startswith("Traceback (most recent call last)") for line in lines)
    exc = [line for line in lines if EXC.match(line)]
    if tb and exc:
        return exc[-1].strip(), True
    for line in lines:
        if not any(n.search(line) for n in NOISE):
            return line.strip(), tb
    errs = [
        m.group(3)
        for line in stdout.split("\n")
        if (m := LOG.match(line)) and m.group(2) in ("ERROR", "CRITICAL")
    ]
    if errs:
        return errs[-1].strip(), tb
    exc = [line for line in stdout.split("\n") if EXC.match(line)]
    return (exc[-1].strip() if exc else ""), tb


def lac_warnings(stdout: str, stderr: str) -> list[str]:
    out = []
    for line in (stdout + "\n" + stderr).split("\n"):
        m = LOG.match(line)
        if m and m.group(1).startswith("lac") and m.group(2) in ("WARNING", "ERROR"):
            out.append(m.group(3))
    return out


def run_case(
    case: Case, repo: Path, session: Path, base_res: Path | None, python: str
) -> dict[str, Any]:
    rec: dict[str, Any] = {"case": case.name, "what": case.what}
    if case.skip:
        rec.update(
            rc=None,
            first_line="",
            traceback=None,
            stderr_lines=None,
            seconds=None,
            note=f"skipped: {case.skip}",
        )
        return rec
    work = Path(tempfile.mkdtemp(prefix=f"{case.name}-", dir=session))
    ctx = Ctx(case.name, work, session / "shared", base_res, multirun=case.multirun)
    ctx.cwd.mkdir()
    ctx.overrides = {**base_overrides(ctx), **case.overrides}
    ctx.env = {"LAC_ACTIVATIONS_DIR": str(work / "act"), **case.env}
    try:
        if case.setup:
            try:
                case.setup(ctx)
            except Exception as e:
                rec.update(
                    rc=None,
                    first_line="",
                    traceback=None,
                    stderr_lines=None,
                    seconds=None,
                    note=f"setup failed: {type(e).__name__}: {e}",
                )
                return rec
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env.update(
            WANDB_MODE="offline",
            HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]),
        )
        for k, v in ctx.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        args = [python, "-m", "lac.run", *(["-m"] if case.multirun else [])]
        args += [f"{k}={v}" for k, v in ctx.overrides.items() if v is not None]
        rec["args"] = args[3:]
        rec["env"] = {k: ctx.env[k] for k in ctx.env} | {
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE")
        }
        preexec = None
        if case.mem_limit_gb:
            lim = int(case.mem_limit_gb * 2**30)

            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

        ctx.extra["t_start"] = time.time()
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                args,
                cwd=ctx.cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=case.timeout,
                preexec_fn=preexec,
            )
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            out = (
                e.stdout.decode(errors="replace")
                if isinstance(e.stdout, bytes)
                else (e.stdout or "")
            )
            err = (
                e.stderr.decode(errors="replace")
                if isinstance(e.stderr, bytes)
                else (e.stderr or "")
            )
        secs = round(time.perf_counter() - t0, 1)
        first, tb = (
            key_line(err, out) if rc != 0 else ("", "Traceback (most recent call last)" in err)
        )
        r = {
            "rc": rc,
            "stdout": out,
            "stderr": err,
            "model_loaded": bool(re.search(r"\bloaded \S+ \(", out + err)),
            "warnings": lac_warnings(out, err),
        }
        try:
            note = case.check(ctx, r) if case.check else ""
        except Exception as e:
            note = f"check failed: {type(e).__name__}: {e}"
        rec.update(
            rc=rc,
            first_line=first,
            traceback=tb,
            stderr_lines=len(err.rstrip("\n").split("\n")) if err.strip() else 0,
            seconds=secs,
            note=note,
            model_loaded=r["model_loaded"],
            lac_warnings=r["warnings"][:5],
            stderr_tail=err.rstrip("\n").split("\n")[-25:],
            stdout_tail=out.rstrip("\n").split("\n")[-12:],
        )
        ctx.extra.pop("t_start", None)
        rec["checks"] = ctx.extra
        if case.name == "ok_tiny_job" and rc == 0:
            rec["base_res"] = str(ctx.res)
    finally:
        for path in ctx.immutable:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    return rec


def make_shared(shared: Path) -> None:
    write(shared / "grid.yaml", GRID)
    write(shared / "grid-markers.yaml", GRID_MARKERS)
    write(shared / "grid-special.yaml", GRID_SPECIAL)
    write(shared / "grid-keys-1.yaml", GRID_KEYS_1)
    write(shared / "grid-baseline-persona.yaml", GRID_BASELINE_PERSONA)
    write(shared / "grid-long.yaml", GRID_LONG)


def cell(v: Any) -> str:
    s = "" if v is None else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| case | exit | first line | traceback | stderr lines | seconds | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = r.get("first_line") or ""
        first = first if len(first) <= 160 else first[:157] + "..."
        tb = {True: "yes", False: "no", None: ""}[r.get("traceback")]
        out.append(
            f"| {r['case']} | {cell(r['rc'])} | {cell(first)} | {tb} | {cell(r.get('stderr_lines'))} "
            f"| {cell(r.get('seconds'))} | {cell(r.get('note'))} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True, type=Path, help="lac checkout (worktree) to run")
    ap.add_argument("--out", required=True, type=Path, help="JSON file to write")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these cases (the base job runs if needed)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    a = ap.parse_args()
    repo = a.repo.resolve()
    names = {c.name for c in CASES}
    if a.only and (bad := set(a.only) - names):
        ap.error(f"unknown case(s) {sorted(bad)}; known: {', '.join(c.name for c in CASES)}")
    todo = [c for c in CASES if not a.only or c.name in a.only]
    python = sys.executable

    session = Path(tempfile.mkdtemp(prefix="lac-trust-"))
    make_shared(session / "shared")
    probe_dir = session / "probe"
    probe_dir.mkdir()
    probe = subprocess.run(
        [python, "-c", "import lac, lac.run; print(lac.__file__)"],
        cwd=probe_dir,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
    )
    lac_file = probe.stdout.strip()
    if not lac_file.startswith(str(repo) + os.sep):
        sys.exit(
            f"`import lac` with PYTHONPATH={repo} gives {lac_file or probe.stderr.strip()}, not the checkout"
        )
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    meta = {
        "repo": str(repo),
        "commit": commit,
        "dirty": bool(dirty),
        "lac_file": lac_file,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }
    print(
        f"lac at {repo} (commit {commit[:12]}{' + local changes' if dirty else ''}), session {session}",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    base_res = None
    t_all = time.perf_counter()
    try:
        plan = list(todo)
        if any(c.needs_base for c in todo) and not any(c.name == "ok_tiny_job" for c in todo):
            plan.insert(0, CASES[0])
        for case in plan:
            print(f"-- {case.name}: {case.what}", flush=True)
            load_before = os.getloadavg()
            if case.needs_base and base_res is None:
                rec = {
                    "case": case.name,
                    "what": case.what,
                    "rc": None,
                    "first_line": "",
                    "traceback": None,
                    "stderr_lines": None,
                    "seconds": None,
                    "note": "skipped: the base job (ok_tiny_job) failed",
                }
            else:
                rec = run_case(case, repo, session, base_res, python)
            if case.name == "ok_tiny_job":
                base_res = Path(rec["base_res"]) if rec.get("base_res") else None
            rec["loadavg_before"], rec["loadavg_after"] = load_before, os.getloadavg()
            print(
                f"   exit {rec['rc']}, {rec.get('seconds')} s: {rec.get('first_line') or ''} | {rec.get('note')}",
                flush=True,
            )
            if case in todo:
                rows.append(rec)
    finally:
        meta["loadavg_end"] = os.getloadavg()
        meta["total_seconds"] = round(time.perf_counter() - t_all, 1)
        if not a.keep:
            shutil.rmtree(session, ignore_errors=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({**meta, "cases": rows}, indent=2, default=str) + "\n")
    print()
    print(
        f"commit {commit[:12]}, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, load average "
        f"{' '.join(f'{x:.2f}' for x in meta['loadavg_start'])} (start) / "
        f"{' '.join(f'{x:.2f}' for x in meta['loadavg_end'])} (end), {meta['total_seconds']} s in all"
    )
    print(table(rows))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
