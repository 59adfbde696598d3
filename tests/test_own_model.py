"""A researcher's own model folder and grid file: keyed by their contents, refused clearly when wrong.

The job key and the activation-cache key once covered only the path strings: an edited grid file,
or weights re-saved into the same folder, gave back the old numbers (and the cache mixed old
captures with new patched steps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lac import api
from lac.config import ConfigError, build_spec, job_key, preflight
from lac.errors import LacError
from tests.conftest import compose

GRID = """baseline: {persona: a thoughtful person, task: Give advice to someone facing a difficult decision.}
personas: {monk: a Zen monk, pirate: a pirate captain}
tasks: {haiku: Write a haiku about Monday mornings., policy: Comment on universal basic income.}
"""


def _save_model(folder: Path, tok, seed: int) -> None:
    """A tiny random Qwen2 with the embedded Qwen's tokenizer and chat template, as save_pretrained writes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from lac.embedded import embedded_path

    return AutoTokenizer.from_pretrained(embedded_path("qwen0.5"))


def _local(folder: Path, root: Path, *more: str) -> list[str]:
    grid = root.parent / "mygrid.yaml"
    grid.write_text(GRID)
    return ["model=local", f"model.id={folder}", "layer=1", "site=p_last", "tracker=none", "grid=custom",
            f"grid.path={grid}", f"results_root={root}", *more]


def _kl(rows) -> list[float]:
    return rows[rows.metric == "kl"].sort_values(["cell", "site", "layer"]).value.tolist()


@pytest.mark.slow
def test_weights_saved_again_into_a_folder_are_a_new_job_and_new_captures(tok, tmp_path, monkeypatch):
    from lac import runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "_MODEL", {})  # the session's embedded model stays loaded for later tests
    folder, root = tmp_path / "mymodel", tmp_path / "results"
    _save_model(folder, tok, seed=0)
    first = api.job(*_local(folder, root), job_dir=tmp_path / "j0")
    assert first.rows.model.unique().tolist() == ["local"] and first.rows.model_id.unique().tolist() == [str(folder)]
    # what the job read from files is in its config: the depth (reports line models up by it) and the grid's name
    assert first.summary["config"]["model"]["n_layers"] == 3 and first.summary["config"]["grid"]["name"] == "mygrid"
    assert first.rows.grid.unique().tolist() == ["mygrid"] and first.rows.cell.nunique() == 4

    shutil.copytree(folder, tmp_path / "copy")  # the same files elsewhere: the same job, reused
    copied = api.job(*_local(tmp_path / "copy", root), job_dir=tmp_path / "j1")
    assert copied.summary["key"] == first.summary["key"]
    from lac.cache import capture_key
    from lac.models import load_model

    grid = build_spec(compose(_local(folder, root))).grid
    assert capture_key(load_model(compose(_local(tmp_path / "copy", root)).model), grid) == \
        capture_key(load_model(compose(_local(folder, root)).model), grid)  # the captures too: not the path

    _save_model(folder, tok, seed=1)  # other weights, same path
    second = api.job(*_local(folder, root), job_dir=tmp_path / "j2")
    assert second.summary["key"] != first.summary["key"]
    # the truth for the new weights: a fresh job store and no activation cache at all
    truth = api.job(*_local(folder, tmp_path / "fresh", "engine.activation_cache=false"), job_dir=tmp_path / "j3")
    assert truth.summary["key"] == second.summary["key"]
    assert _kl(second.rows) == _kl(truth.rows)
    geo = second.rows[second.rows.metric != "kl"].value.tolist()
    assert geo == truth.rows[truth.rows.metric != "kl"].value.tolist()
    assert _kl(second.rows) != _kl(first.rows)  # the seed really changed what the job computes


def test_an_edited_grid_file_is_a_new_job(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    key = job_key(compose(["grid=custom", f"grid.path={path}", "tracker=none"]))
    path.write_text("# a comment and other spacing change nothing\n" + GRID.replace(": {", ":  {"))
    assert job_key(compose(["grid=custom", f"grid.path={path}", "tracker=none"])) == key
    elsewhere = tmp_path / "sub" / "grid.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(GRID)
    assert job_key(compose(["grid=custom", f"grid.path={elsewhere}", "tracker=none"])) == key
    path.write_text(GRID.replace("a Zen monk", "a Tibetan monk"))
    assert job_key(compose(["grid=custom", f"grid.path={path}", "tracker=none"])) != key


def test_an_edited_model_folder_is_a_new_job_key(tmp_path, monkeypatch):
    """Keyed by file contents: a byte changed anywhere is a new key, a copy is the same key, and an
    unchanged folder is not read again (its digests are remembered with each file's stat)."""
    import lac.fingerprint as fp

    monkeypatch.setenv("LAC_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_hidden_layers": 24}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    args = ["model=local", f"model.id={folder}", "layer=3", "tracker=none"]
    key = job_key(compose(args))
    assert job_key(compose([*args[:1], f"model.id={folder}/", *args[2:]])) == key
    shutil.copytree(folder, tmp_path / "copy")
    assert job_key(compose([args[0], f"model.id={tmp_path / 'copy'}", *args[2:]])) == key
    (folder / "checkpoint-500").mkdir()  # what from_pretrained does not read does not count
    (folder / "checkpoint-500" / "model.safetensors").write_bytes(b"\1" * 10)
    (folder / ".cache").write_text("download metadata")
    assert job_key(compose(args)) == key

    hashed = []
    monkeypatch.setattr(fp, "sha256_file", lambda p, real=fp.sha256_file: (hashed.append(Path(p).name), real(p))[1])
    fp._SEEN.clear()
    assert job_key(compose(args)) == key and hashed == []  # from the memo in the cache: nothing read
    (folder / "model.safetensors").write_bytes(b"\0" * 999 + b"\1")
    assert job_key(compose(args)) != key
    assert hashed == ["model.safetensors"]  # only the changed file was read again


def test_own_model_mistakes_are_one_clear_line(tmp_path, monkeypatch):
    from omegaconf import open_dict

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.id='/tmp/x' is not what qwen0.5 loads: .*model=local model.id=/tmp/x"):
        build_spec(compose(["model.id=/tmp/x", "tracker=none"]))
    with pytest.raises(ConfigError, match=r"model=local needs model.id=/path/to/hf_folder"):
        build_spec(compose(["model=local", "tracker=none"]))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_hidden_layers": 3}')
    with pytest.raises(ConfigError, match=r"layer is not set and local has no default_layer; give layer=N \(0..2\)"):
        build_spec(compose(["model=local", f"model.id={folder}", "tracker=none"]))
    with pytest.raises(ConfigError, match=r"layer='paper': not a layer list; local names no layer lists"):
        build_spec(compose(["model=local", f"model.id={folder}", "layer=paper", "tracker=none"]))
    assert build_spec(compose(["model=local", f"model.id={folder}", "layer=2", "tracker=none"])).n_layers == 3
    # a folder that does not exist, with n_layers read from it: the id is named, not a hub-library traceback
    with pytest.raises(LacError, match=r"model.id='/no/such/folder' is neither an existing folder nor a hub id"):
        build_spec(compose(["model=local", "model.id=/no/such/folder", "layer=1", "tracker=none"]))
    # a model config of one's own that lacks keys: all of them in one line
    cfg = compose(["model=local", f"model.id={folder}", "layer=1", "tracker=none"])
    with open_dict(cfg):
        del cfg.model["dtype"], cfg.model["device"]
    with pytest.raises(ConfigError, match=r"model config 'local' lacks dtype, device; a model config needs name, source"):
        build_spec(cfg)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_results_root_where_no_folder_can_be_made(tmp_path):
    with pytest.raises(ConfigError, match=r"results_root='/proc/lac-results' is not writable \(No such file"):
        preflight(compose(["tracker=none", "results_root=/proc/lac-results"]))
    assert not Path("/proc/lac-results").exists()
    assert preflight(compose(["tracker=none", f"results_root={tmp_path}/new/results"])) is not None
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # the probe leaves nothing


def test_a_file_as_lac_cache_dir_names_it(tmp_path, monkeypatch):
    from lac.embedded import EmbeddedModelError, embedded_path

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("LAC_CACHE_DIR", str(tmp_path / "afile"))
    with pytest.raises(EmbeddedModelError, match=r"cannot convert it into .*afile/models \(Not a directory.*set LAC_CACHE_DIR"):
        embedded_path("qwen0.5")


def test_api_overrides_as_a_list_or_a_bad_type():
    assert compose(["layer=11", "site=g1"]) == api.compose("layer=11", "site=g1")
    assert api.compose(["layer=11", "site=g1"]) == api.compose("layer=11", "site=g1")
    with pytest.raises(ConfigError, match=r"override 10 \(int\): overrides are strings"):
        api.job(10)
    with pytest.raises(ConfigError, match=r"override None \(NoneType\)"):
        api.compose_sweep("layer=1,2", None)


@pytest.mark.slow  # the embedded model's tokenizer (embedded_path converts on a cold cache)
def test_a_tokenizer_without_a_chat_template_is_named(tok):
    import copy

    from lac.prompts import PromptBook, PromptError

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    grid = build_spec(compose(["tracker=none"])).grid
    with pytest.raises(PromptError, match=r"has no chat template; lac renders every prompt in the model's chat template"):
        PromptBook(bare, grid).get(grid.cells()[0], grid.full)


@pytest.mark.slow  # the embedded model's tokenizer (embedded_path converts on a cold cache)
def test_a_hub_id_is_keyed_and_loaded_at_the_commit_the_local_cache_holds(tok, tmp_path, monkeypatch):
    """A hub id whose cached `main` moves to another commit is a new job, new captures and new weights."""
    import huggingface_hub.constants

    from lac.cache import capture_key
    from lac.models import load_model

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = hub / "models--lac-test--tiny"
    commits = {"a" * 40: 0, "b" * 40: 1}
    for commit, seed in commits.items():
        _save_model(repo / "snapshots" / commit, tok, seed=seed)
    (repo / "refs").mkdir()
    args = ["model=local", "model.id=lac-test/tiny", "layer=1", "tracker=none"]
    keys, weights, captures = {}, {}, {}
    for commit in commits:
        (repo / "refs" / "main").write_text(commit)
        cfg = compose(args)
        keys[commit] = job_key(cfg)
        lm = load_model(cfg.model)
        assert lm.files == f"hub:{commit}"
        weights[commit] = lm.model.model.layers[0].mlp.up_proj.weight.clone()
        captures[commit] = capture_key(lm, build_spec(cfg).grid)
    from safetensors.torch import load_file

    for commit in commits:  # each load is the commit its key names
        saved = load_file(repo / "snapshots" / commit / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(weights[commit], saved)
    assert len(set(keys.values())) == 2 and len(set(captures.values())) == 2
    # the load follows the commit lac resolved (the hub's answer when online), not whatever main is then
    import lac.fingerprint as fp

    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(fp, "hub_commit", lambda model_id: "a" * 40)
    lm = load_model(compose(args).model)
    assert lm.files == f"hub:{'a' * 40}" and torch.equal(lm.model.model.layers[0].mlp.up_proj.weight, weights["a" * 40])
