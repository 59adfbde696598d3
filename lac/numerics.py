"""The numerics version: bumped by any change to lac that alters a number it reports.

It enters every job key and the activation-cache key, so results computed by
an older lac are never returned as if current. `fingerprint()` runs the whole
clean-capture + patch + KL + geometry + generation path on a tiny seeded
model; its values are stored in `lac/data/numerics.json` beside the version,
and a test fails when they change while the version stays the same.

After a deliberate change of numbers: bump NUMERICS_VERSION, then
`python -m lac.numerics --write`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# 1: lac up to the "trust" work (implicit); 2: first explicit version; 3: CPU float32 Linears run
# oneDNN's kernel by default (lac/kernels.py; a model config without `linear` keeps its job key)
NUMERICS_VERSION = 3
PAPER = ("clean", "additive", "remove_x", "host_none", "host_oracle", "host_additive", "bare")
FINGERPRINT_FILE = Path(__file__).parent / "data" / "numerics.json"


class _Book:
    """Fixed token-id prompts for the fingerprint: header, persona, separator, task, template tail."""

    HEAD, SEP, TAIL = (2, 5, 6), (7,), (8, 9, 10)
    PERSONAS = {"base": (11, 12), "p1": (13, 14, 15), "p2": (16,)}
    TASKS = {"base": (20, 21, 22), "t1": (23, 24), "t2": (25, 26, 27, 28)}

    def get(self, cell, role: str):
        from lac.prompts import Prompt

        persona = self.PERSONAS[cell.persona if role[0] == "X" else "base"]
        task = self.TASKS[cell.task if role[-1] == "Y" else "base"]
        if role == "bare":
            persona, task = (), self.TASKS[cell.task]
        ids = self.HEAD + persona + self.SEP + task + self.TAIL
        return Prompt(tuple(ids), len(ids) - len(self.TAIL) - 1)


def _tiny_model():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lac.models import LoadedModel

    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1234)  # weights from our own generator: independent of HF's init
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    model.generation_config.eos_token_id = 1

    class Tok:
        pad_token_id, eos_token_id = 0, 1

    return LoadedModel("fingerprint", "tiny-qwen2-seeded", model, Tok(), torch.float32, torch.device("cpu"))


def fingerprint() -> dict[str, list]:
    """KL of every intervention at every site, geometry, refs and marker generations on the tiny model."""
    from lac.capture import capture_cells
    from lac.grid import Cell
    from lac.interventions import Job, get_intervention
    from lac.metrics import geometry
    from lac.patching import kl_records
    from lac.runner import marker_generations
    from lac.sites import SITES

    lm, book = _tiny_model(), _Book()
    cells = [Cell("p1", "t1"), Cell("p2", "t2"), Cell("p1", "t2")]
    ivs = [get_intervention(n) for n in PAPER]
    hosts = {iv.host for iv in ivs}
    caps = capture_cells(lm, book, cells, roles=("BB", "XB", "BY", "XY"), hosts=hosts,
                         trace_hosts=hosts, batch_size=2)
    jobs = [Job(iv, s, (L,) if iv.writes else ()) for iv in ivs for s in SITES for L in (1, 3)]
    jobs.append(Job(get_intervention("host_additive"), "p_last", (1, 2, 3)))
    out: dict[str, list] = {"ref": [c.ref for c in caps], "kl": [], "geometry": []}
    for cap, job, kl in kl_records(lm, caps, jobs, max_rows=5):
        out["kl"].append([cap.cell.key, job.intervention.name, job.site, list(job.layers), kl])
    for cap in caps:
        for s in SITES:
            g = geometry(*(cap.h(r, s, 2) for r in ("BB", "XB", "BY", "XY")))
            out["geometry"].append([cap.cell.key, s, [g[k] for k in sorted(g)]])
    gens = marker_generations(lm, caps, ["clean", "additive", "bare"], 2, book=book, max_new_tokens=6, batch_rows=4)
    out["generations"] = [[cap.cell.key, cond, toks] for cap, cond, _, toks in gens]
    out["kl"].sort(key=str)
    return out


def stored() -> dict:
    return json.loads(FINGERPRINT_FILE.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--write"]:
        print("usage: python -m lac.numerics --write   (after bumping NUMERICS_VERSION)")
        return 2
    FINGERPRINT_FILE.write_text(json.dumps({"version": NUMERICS_VERSION, "fingerprint": fingerprint()}) + "\n")
    print(f"wrote {FINGERPRINT_FILE} for numerics version {NUMERICS_VERSION}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
