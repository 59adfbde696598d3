"""The prefix tree: every prompt's trace equals its own plain forward, each shared prefix runs once."""

from __future__ import annotations

import pytest
import torch

from lac.engine import COUNTS, decode
from lac.prefix import Want, prefix_traces
from tests.test_engine import ARCHS, _plain
from tests.tiny import tiny_model


def _prompts(seed=0):
    """Prompts sharing a header, two 'personas' and tasks of different lengths; one is a prefix of another."""
    g = torch.Generator().manual_seed(seed)

    def r(k):
        return torch.randint(3, 97, (k,), generator=g).tolist()

    header, x1, x2 = r(7), r(5), r(3)
    t1, t2, t3 = r(4), r(9), r(2)
    seqs = [header + x1 + t1, header + x1 + t2, header + x2 + t1, header + x2 + t3, header + x1, r(6)]
    return [tuple(s) for s in seqs]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_traces_equal_plain_forwards(arch):
    lm = tiny_model(arch, seed=1)
    seqs = _prompts()
    n = lm.n_layers
    wants = {s: Want(depth=n if i % 2 == 0 else 2, first=max(len(s) - 4, 0), logp_last=i % 2 == 0)
             for i, s in enumerate(seqs)}
    before = dict(COUNTS)
    traces = prefix_traces(lm, wants)
    distinct = len({s[:k] for s in seqs for k in range(1, len(s) + 1)})
    assert COUNTS["tokens"] - before["tokens"] == distinct  # every distinct prefix position fed once
    # three tree levels (header and the odd prompt | persona | task): one forward each, though the
    # nodes of a level want different depths (a level costs its weight reads, not its rows)
    assert COUNTS["forwards"] - before["forwards"] == 3
    for s, w in wants.items():
        t = traces[s]
        out = _plain(lm, list(s))
        assert t.ids == list(s) and t.first == w.first and t.depth == w.depth
        ref = torch.stack(out.hidden_states[: w.depth])[:, 0, w.first :]
        torch.testing.assert_close(t.hidden, ref, atol=1e-5, rtol=1e-5)
        assert len(t.kv) == w.depth and all(k.shape[1] == len(s) for k, _ in t.kv)
        if w.logp_last:
            lp = torch.log_softmax(out.logits[0, -1].float(), -1)
            torch.testing.assert_close(t.logp[len(s) - 1], lp, atol=1e-5, rtol=1e-5)
        else:
            assert not t.logp


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_from_prefix_traces_equals_generate(arch):
    """The XY path: prompts from the tree, then greedy decode, as `generate` on each prompt."""
    lm = tiny_model(arch, seed=3)
    seqs = _prompts(seed=2)[:4]  # lengths 16, 21, 14, 12: longer than Gemma-2's window (6)
    traces = prefix_traces(lm, {s: Want(lm.n_layers, len(s), logp_last=True) for s in seqs})
    toks, _ = decode(lm, [traces[s] for s in seqs], 6)
    for s, tk in zip(seqs, toks, strict=True):
        with torch.no_grad():
            gen = lm.model.generate(torch.tensor([s], device=lm.device), max_new_tokens=6, do_sample=False, num_beams=1)[0, len(s):]
        assert tk[: len(gen)] == gen.tolist()


def test_empty_prompt_is_refused():
    lm = tiny_model("qwen2")
    with pytest.raises(ValueError, match="empty prompt"):
        prefix_traces(lm, {(): Want(2, 0)})
