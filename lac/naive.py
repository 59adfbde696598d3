"""The plain way: METHOD.md written as a hand-written hook script would be.

One prompt per forward, the clean sequence recomputed for every patch,
`output_hidden_states` for captures, `generate` for the reference. It shares no
code with lac's engine, so tests use it as the independent computation and the
benchmark as the baseline to beat.
"""

from __future__ import annotations

import torch

from lac.sites import REF_TOKENS, WINDOW, site_position, window_start


class Naive:
    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.forwards = 0  # one per model call, for the benchmark
        self.tokens = 0
        self._hidden: dict[tuple[int, ...], tuple] = {}  # one capture forward per sequence
        self._refs: dict[tuple[int, ...], list[int]] = {}

    def _forward(self, ids: list[int], **kw):
        self.forwards += 1
        self.tokens += len(ids)
        with torch.no_grad():
            return self.model(torch.tensor([ids], device=self.model.device), **kw)

    def ref(self, prompt: list[int]) -> list[int]:
        if tuple(prompt) in self._refs:
            return self._refs[tuple(prompt)]
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt], device=self.model.device),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=self.model.device),
                max_new_tokens=REF_TOKENS, do_sample=False, num_beams=1,
            )
        self.forwards += REF_TOKENS
        self.tokens += len(prompt) + REF_TOKENS - 1
        self._refs[tuple(prompt)] = out[0, len(prompt) :].tolist()
        return self._refs[tuple(prompt)]

    def hidden(self, prompt: list[int], p_user_last: int, ref: list[int], site: str, layer: int) -> torch.Tensor:
        """hidden_states[layer] at the site of prompt + ref[:w0] (its own forward)."""
        seq = tuple(prompt) + tuple(ref[: window_start(site)])
        if seq not in self._hidden:  # a script captures every layer of a prompt in one forward
            self._hidden[seq] = self._forward(list(seq), output_hidden_states=True).hidden_states
        return self._hidden[seq][layer][0, site_position(site, len(prompt), p_user_last)].float()

    def window_logp(self, host: list[int], ref: list[int], site: str, patch=None) -> torch.Tensor:
        """Log-probs over the site's window, the host sequence teacher-forced on ref.

        patch: (layer, position, vector) written by a pre-hook on that block, or a
        list of them (multi-layer injection, all hooks at once).
        """
        w0 = window_start(site)
        seq = list(host) + ref[: w0 + WINDOW]
        patches = [] if patch is None else (patch if isinstance(patch, list) else [patch])
        handles = []
        layers = self.model.model.layers
        for layer, pos, vec in patches:
            def hook(module, args, kwargs, pos=pos, vec=vec):
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                h[0, pos] = vec.to(h.dtype)
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}
            handles.append(layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            logits = self._forward(seq).logits[0].float()
        finally:
            for h in handles:
                h.remove()
        first = len(host) - 1 + w0
        return torch.log_softmax(logits[first : first + WINDOW], dim=-1)


def kl(logp_clean: torch.Tensor, logp_int: torch.Tensor) -> float:
    """sum_t KL(P_clean || P_int), written out again so tests don't lean on lac.metrics."""
    return float(torch.nn.functional.kl_div(logp_int, logp_clean, log_target=True, reduction="sum"))
