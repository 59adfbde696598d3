"""Read back an offline W&B run from its `.wandb` file (wandb 0.31 ships no reader for it).

The file, as wandb-core writes it:

* a 7-byte header: b":W&B", the magic 0xBEE1 (uint16 little endian), version 0;
* then a LevelDB-style log: 32 KiB blocks of chunks. Each chunk is
  ``crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | data``; type 1 is a
  whole record, 2/3/4 the first/middle/last piece of a record that spans
  blocks. A chunk header never straddles a block: fewer than 7 bytes left in a
  block are zero padding. The crc is zlib.crc32 of the type byte followed by the data.
* each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

From the records this module keeps what the tests need:

* ``run``: run id, project, entity, name, group, job type, tags (the RunRecord);
* ``config``: the config, ``{key: value}``, JSON-decoded, in record order
  (the RunRecord's config, then ConfigRecord updates/removals);
* ``summary``: the final summary, ``{key: value}``, JSON-decoded (RunRecord
  summary, then every SummaryRecord and the summary side effects of history
  rows - the last write of a key wins, as on the server);
* ``history``: one dict per HistoryRecord (``_step`` included);
* ``tables``: every logged wandb.Table, ``{key: {"columns": [...], "data": [[...]]}}``.
  A table is not in the record log: the summary/history holds a reference
  ``{"_type": "table-file", "path": "media/table/<key>_<step>_<hash>.table.json", ...}``
  to a JSON file in the run's ``files/`` folder, which is loaded here.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a readable `.wandb` log."""


def iter_record_bytes(path: Path) -> list[bytes]:
    """The raw records of a `.wandb` file, checksums verified."""
    buf = Path(path).read_bytes()
    if len(buf) < HEADER.size:
        raise WandbFileError(f"{path}: {len(buf)} bytes, shorter than the header")
    ident, magic, version = HEADER.unpack_from(buf, 0)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise WandbFileError(f"{path}: bad header {ident!r} {magic:#x} v{version}")
    out: list[bytes] = []
    pending: bytearray | None = None
    pos = HEADER.size
    while pos < len(buf):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer: zero padding
            pos += left
            continue
        if pos + CHUNK.size > len(buf):
            raise WandbFileError(f"{path}: truncated chunk header at byte {pos}")
        crc, length, kind = CHUNK.unpack_from(buf, pos)
        start = pos + CHUNK.size
        data = buf[start : start + length]
        if len(data) != length:
            raise WandbFileError(f"{path}: truncated chunk at byte {pos}")
        if zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise WandbFileError(f"{path}: checksum mismatch at byte {pos}")
        pos = start + length
        if kind == FULL:
            out.append(bytes(data))
        elif kind == FIRST:
            pending = bytearray(data)
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += data
            if kind == LAST:
                out.append(bytes(pending))
                pending = None
        else:
            raise WandbFileError(f"{path}: unexpected chunk type {kind} at byte {pos}")
    return out


def read_records(path: Path) -> list[pb.Record]:
    """Every Record of a `.wandb` file, in order."""
    records = []
    for raw in iter_record_bytes(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def _set(d: dict[str, Any], item: Any, value: Any) -> None:
    """d[key] = value; a nested_key ["results", "path"] sets d["results"]["path"]."""
    *parents, last = list(item.nested_key) or [item.key]
    for k in parents:
        d = d.setdefault(k, {})
    d[last] = value


def _pop(d: dict[str, Any], item: Any) -> None:
    *parents, last = list(item.nested_key) or [item.key]
    for k in parents:
        d = d.get(k, {})
    d.pop(last, None)


def _history_value(item: pb.HistoryItem) -> Any:
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which is None or which == "value_json":
        return json.loads(item.value_json) if item.value_json else None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)


@dataclass
class OfflineRun:
    sync_dir: Path
    run: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    exit_code: int | None = None


def _config_value(v: Any) -> Any:
    # wandb stores each config value as {"value": v, "desc": ...}
    return v["value"] if isinstance(v, dict) and "value" in v else v


def _load_tables(run: OfflineRun) -> None:
    refs: dict[str, dict[str, Any]] = {}
    for row in run.history:
        refs.update({k: v for k, v in row.items() if isinstance(v, dict)})
    refs.update({k: v for k, v in run.summary.items() if isinstance(v, dict)})
    for key, ref in refs.items():
        if ref.get("_type") not in ("table-file", "incremental-table-file"):
            continue
        path = run.sync_dir / "files" / ref["path"]
        data = json.loads(path.read_text())
        run.tables[key] = {"columns": data["columns"], "data": data["data"], "path": path}


def read_run(sync_dir: Path) -> OfflineRun:
    """Config, final summary, history rows and tables of one offline run folder."""
    sync_dir = Path(sync_dir)
    files = sorted(sync_dir.glob("*.wandb"))
    if len(files) != 1:
        raise WandbFileError(f"{sync_dir}: expected one .wandb file, found {[f.name for f in files]}")
    run = OfflineRun(sync_dir=sync_dir)
    for rec in read_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run = {
                "id": r.run_id, "project": r.project, "entity": r.entity, "name": r.display_name,
                "group": r.run_group, "job_type": r.job_type, "tags": list(r.tags),
            }
            for it in r.config.update:
                _set(run.config, it, _config_value(json.loads(it.value_json)))
            for it in r.summary.update:
                _set(run.summary, it, json.loads(it.value_json))
        elif kind == "config":
            for it in rec.config.update:
                _set(run.config, it, _config_value(json.loads(it.value_json)))
            for it in rec.config.remove:
                _pop(run.config, it)
        elif kind == "summary":
            for it in rec.summary.update:
                _set(run.summary, it, json.loads(it.value_json))
            for it in rec.summary.remove:
                _pop(run.summary, it)
        elif kind == "history":
            row: dict[str, Any] = {}
            for it in rec.history.item:
                _set(row, it, _history_value(it))
            run.history.append(row)
            run.summary.update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    _load_tables(run)
    return run


def find_runs(root: Path) -> list[Path]:
    """The offline run folders (holding a .wandb file) under root, sorted."""
    return sorted({p.parent for p in Path(root).rglob("*.wandb")})
