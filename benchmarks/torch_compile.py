"""Would `torch.compile` speed up lac's forwards? Compile cost, steady-state time and exactness.

    PYTHONPATH=. python benchmarks/torch_compile.py [--threads N] [--rows 36 --tokens 10]

Times the embedded model's decoder stack (`model.model`, what the engine calls) eager and compiled
(`torch.compile(dynamic=True)`, inductor on CPU) on one patched-step-sized batch (36 rows x 10
tokens: section 4's patched forwards), the first compiled call (compilation included), a call
with a new shape, and the largest difference of the final hidden states. lac keeps a compiled
path only if it wins end to end (a section-4 job computes for ~25 s) and stays exact (<= 1e-6
in KL: the KL between eager and compiled next-token distributions, times the 10 window
positions). Writes benchmarks/results/torch_compile.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import compose, git_state, loadavg  # noqa: E402


def _max_kl(lm, ref: torch.Tensor, out: torch.Tensor) -> float:
    """Largest KL(eager || compiled) of the next-token distributions over every position of the batch."""
    with torch.inference_mode():
        lp = torch.log_softmax(lm.logits(ref.flatten(0, 1)), -1)
        lq = torch.log_softmax(lm.logits(out.flatten(0, 1)), -1)
        return float((lp.exp() * (lp - lq)).sum(-1).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rows", type=int, default=36)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "torch_compile.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lac.runner import get_model

    lm = get_model(compose(["tracker=none", "model.device=cpu"]).model)
    stack = lm.model.model
    x = torch.randint(0, 1000, (args.rows, args.tokens))
    x_new = torch.randint(0, 1000, (20, 16))

    def run(f, ids):
        with torch.inference_mode():
            return f(input_ids=ids).last_hidden_state

    load0 = loadavg()
    ref = run(stack, x)
    t = time.perf_counter()
    for _ in range(3):
        run(stack, x)
    eager = (time.perf_counter() - t) / 3
    compiled = torch.compile(stack, dynamic=True)
    t = time.perf_counter()
    out = run(compiled, x)
    first = time.perf_counter() - t
    t = time.perf_counter()
    run(compiled, x_new)
    new_shape = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(3):
        run(compiled, x)
    steady = (time.perf_counter() - t) / 3
    res = {
        "batch": [args.rows, args.tokens], "threads": torch.get_num_threads(), "eager_s": eager,
        "compiled_s": steady, "steady_speedup": eager / steady, "first_call_s": first, "new_shape_s": new_shape,
        "max_abs_diff_hidden": float((out - ref).abs().max()),
        "max_rel_diff_hidden": float(((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max()),
        "max_kl_per_position": _max_kl(lm, ref, out), "loadavg": [load0, loadavg()],
        "torch": torch.__version__, "git": git_state(),
    }
    exact = res["max_kl_per_position"] * 10 <= 1e-6  # a 10-position KL window
    res["verdict"] = ("keep" if exact and first < 25 and steady < eager
                      else "drop: " + ", ".join(
                          w for w, bad in (("not exact (10 x max KL per position > 1e-6)", not exact),
                                           ("compiling costs more than a job computes", first > 25),
                                           ("no faster", steady >= eager)) if bad))
    print(json.dumps(res, indent=2))
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
