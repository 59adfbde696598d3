"""Why lac's default KLs and plain HF's can differ by ~1e-6 on small KLs: METHOD.md's float32 log_softmax.

lac's default `model.linear=auto` runs float32 Linears through oneDNN; plain HF (and the nnsight peer)
through MKL. Their logits differ by float32 rounding, and a float32 log_softmax shifts every log-prob
by its own rounding of logsumexp (~ulp of 20, ~2e-6), which a KL takes in full whatever its size. This
script computes the same additive KLs on `lac.naive` (one prompt per forward, no lac engine) with each
kernel, with the log_softmax in float32 (METHOD.md) and in float64, and prints |dKL| for both: if the
float64 column is ~100x smaller, the float32 difference is log_softmax rounding, not the patch.

    PYTHONPATH=. python benchmarks/kl_floor.py [--out benchmarks/results/kl_floor.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, compose, cpu, git_state, loadavg  # noqa: E402

# the three short-grid KLs outside rtol 1e-3 + atol 1e-6 against the nnsight peer on an AVX2 host
# (peer_nnsight_amd_avx2.json), its largest |dKL|, and one mid-sized KL
CASES = [("angelou__recommend", "p_last", 10), ("buffett__haiku", "p_last", 6), ("yoda__recommend", "g2", 20),
         ("angelou__policy", "p_last", 20), ("marx__policy", "g1", 13)]


def kls(linear: str, spec, cells) -> dict:
    from lac.models import load_model
    from lac.naive import Naive
    from lac.prompts import PromptBook

    lm = load_model(compose(["tracker=none", f"model.linear={linear}"]).model)
    book = PromptBook(lm.tokenizer, spec.grid)
    log_softmax, out = torch.log_softmax, {}
    try:
        for prec in ("float32", "float64"):
            if prec == "float64":  # lac.naive calls torch.log_softmax once per window
                torch.log_softmax = lambda x, dim: log_softmax(x.double(), dim=dim)
            nv = Naive(lm.model, lm.tokenizer)
            for key, site, layer in CASES:
                p = {r: book.get(cells[key], r) for r in ("BB", "XB", "BY", "XY")}
                out[prec, key, site, layer] = nv.intervention_kl(p, "additive", site, (layer,))
    finally:
        torch.log_softmax = log_softmax
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "kl_floor.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lac.config import build_spec

    spec = build_spec(compose(["tracker=none", "grid=short", "site=transition", "layer=paper"]))
    cells = {c.key: c for c in spec.grid.cells()}
    got = {lin: kls(lin, spec, cells) for lin in ("torch", "onednn")}
    rows = []
    print(f"{'cell':20s} {'site':6s} {'L':>3s} {'KL (f64, MKL)':>13s} {'|dKL| f32':>10s} {'|dKL| f64':>10s} "
          f"{'f32-f64, MKL':>12s}")
    for key, site, layer in CASES:
        k = {(lin, p): got[lin][p, key, site, layer] for lin in got for p in ("float32", "float64")}
        row = {"cell": key, "site": site, "layer": layer, "kl_float64_mkl": k["torch", "float64"],
               "dkl_float32": abs(k["torch", "float32"] - k["onednn", "float32"]),
               "dkl_float64": abs(k["torch", "float64"] - k["onednn", "float64"]),
               "float32_error_mkl": abs(k["torch", "float32"] - k["torch", "float64"]), "kl": k}
        rows.append(row)
        print(f"{key:20s} {site:6s} {layer:3d} {row['kl_float64_mkl']:13.3e} {row['dkl_float32']:10.2e} "
              f"{row['dkl_float64']:10.2e} {row['float32_error_mkl']:12.2e}")
    res = {"cases": [{**r, "kl": {f"{a}/{b}": v for (a, b), v in r["kl"].items()}} for r in rows],
           "threads": args.threads, "machine": {**cpu(), "torch": torch.__version__}, "git": git_state(),
           "loadavg": loadavg()}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
