"""The plain way: METHOD.md written out again as a hand-written hook script would be.

One prompt per forward, the clean sequence recomputed for every patch,
`output_hidden_states` for captures, `generate` for the reference. It shares
no code with the lac path it checks beyond the loaded model and tokenizer:
prompt rendering, site positions, KL windows, the interventions' vectors, the
hooks, KL and the decomposition geometry are all written here from METHOD.md,
so tests use it as the independent computation and the benchmark as the
baseline to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WINDOW = 10  # METHOD "Causal KL": 10 teacher-forced tokens
REF_TOKENS = 12  # METHOD "Sites": the greedy reference is 2 + 10 tokens
EPS = 1e-9  # METHOD "Decomposition": in denominators

# METHOD "Sites": g1's sequence is prompt + ref[:1], g2's prompt + ref[:2], the site being the last
# position; p_user_last and p_last sit in the prompt alone.
REF_BEFORE_SITE = {"p_user_last": 0, "p_last": 0, "g1": 1, "g2": 2}
# METHOD "Causal KL": the window is ref[0:10] at p_user_last and p_last, ref[1:11] at g1, ref[2:12] at g2.
WINDOW_FROM = {"p_user_last": 0, "p_last": 0, "g1": 1, "g2": 2}


@dataclass(frozen=True)
class NaivePrompt:
    ids: list[int]
    p_user_last: int


def render(tokenizer, persona: str | None, task: str) -> NaivePrompt:
    """METHOD "Prompts": one user turn "As {persona}, {task}" (the task alone for bare) in the model's
    own chat template with the generation prompt, encoded without added special tokens;
    p_user_last = length of the template rendered without the generation prompt, minus one."""
    content = task if persona is None else "As " + persona + ", " + task
    turn = [{"role": "user", "content": content}]
    full = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    user_only = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    n_user = len(tokenizer(user_only, add_special_tokens=False)["input_ids"])
    return NaivePrompt(ids, n_user - 1)


def cell_prompts(tokenizer, persona: str, task: str, base_persona: str, base_task: str) -> dict[str, NaivePrompt]:
    """The four prompts of a cell (first letter: persona X or baseline B; second: task Y or B) and bare."""
    return {
        "BB": render(tokenizer, base_persona, base_task),
        "XB": render(tokenizer, persona, base_task),
        "BY": render(tokenizer, base_persona, task),
        "XY": render(tokenizer, persona, task),
        "bare": render(tokenizer, None, task),
    }


def site_index(site: str, prompt_len: int, p_user_last: int) -> int:
    """Position of the site in its sequence prompt + ref[:REF_BEFORE_SITE[site]]."""
    if site == "p_user_last":
        return p_user_last
    return prompt_len + REF_BEFORE_SITE[site] - 1


def _additive(h):
    d_x, d_y = h["XB"] - h["BB"], h["BY"] - h["BB"]
    return h["BB"] + d_x + d_y


# METHOD "Interventions": name -> (host prompt, vector written at the site from h[role], None: nothing)
INTERVENTIONS = {
    "clean": ("XY", None),
    "additive": ("XY", _additive),
    "remove_x": ("XY", lambda h: h["XY"] - (h["XB"] - h["BB"])),
    "host_none": ("BY", None),
    "host_oracle": ("BY", lambda h: h["XY"]),
    "host_additive": ("BY", _additive),
    "bare": ("bare", None),
}


class Naive:
    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.forwards = 0  # one per model call, for the benchmark
        self.tokens = 0
        self._hidden: dict[tuple[int, ...], tuple] = {}  # one capture forward per sequence
        self._refs: dict[tuple[int, ...], list[int]] = {}
        self._clean: dict[tuple, torch.Tensor] = {}  # unpatched windows of intervention_kl

    def _forward(self, ids: list[int], **kw):
        self.forwards += 1
        self.tokens += len(ids)
        with torch.no_grad():
            return self.model(torch.tensor([ids], device=self.model.device), **kw)

    def ref(self, prompt: list[int]) -> list[int]:
        """The clean greedy continuation (do_sample=False, num_beams=1), REF_TOKENS tokens."""
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
        """hidden_states[layer] at the site of prompt + ref[:k] (its own forward)."""
        seq = tuple(prompt) + tuple(ref[: REF_BEFORE_SITE[site]])
        if seq not in self._hidden:  # a script captures every layer of a prompt in one forward
            self._hidden[seq] = self._forward(list(seq), output_hidden_states=True).hidden_states
        return self._hidden[seq][layer][0, site_index(site, len(prompt), p_user_last)].float()

    def window_logp(self, host: list[int], ref: list[int], site: str, patch=None) -> torch.Tensor:
        """Log-probs over the site's window, the host sequence teacher-forced on ref.

        patch: (layer, position, vector) written by a pre-hook on that block, or a
        list of them (multi-layer injection, all hooks at once).
        """
        a = WINDOW_FROM[site]
        seq = list(host) + ref[: a + WINDOW]
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
        # the distribution predicting ref[a + j] sits at the position just before it
        predicts = [len(host) + a + j - 1 for j in range(WINDOW)]
        return torch.log_softmax(logits[predicts], dim=-1)

    def intervention_kl(self, prompts: dict[str, NaivePrompt], name: str, site: str, layers=()) -> float:
        """Causal KL of one intervention at a site and layer set (all hooks at once), from scratch."""
        host_role, rule = INTERVENTIONS[name]
        xy = prompts["XY"]
        ref = self.ref(xy.ids)
        key = (tuple(xy.ids), WINDOW_FROM[site])
        if key not in self._clean:
            self._clean[key] = self.window_logp(xy.ids, ref, site)
        clean = self._clean[key]
        host = prompts[host_role]
        patches = []
        if rule is not None:
            for L in layers:
                h = {r: self.hidden(prompts[r].ids, prompts[r].p_user_last, ref, site, L) for r in ("BB", "XB", "BY", "XY")}
                patches.append((L, site_index(site, len(host.ids), host.p_user_last), rule(h)))
        return kl(clean, self.window_logp(host.ids, ref, site, patches or None))

    def geometry(self, prompts: dict[str, NaivePrompt], site: str, layer: int) -> dict[str, float]:
        ref = self.ref(prompts["XY"].ids)
        h = {r: self.hidden(prompts[r].ids, prompts[r].p_user_last, ref, site, layer) for r in ("BB", "XB", "BY", "XY")}
        return geometry(h["BB"], h["XB"], h["BY"], h["XY"])


def kl(logp_clean: torch.Tensor, logp_int: torch.Tensor) -> float:
    """sum_t KL(P_clean || P_int), written out again so tests don't lean on lac.metrics."""
    return float(torch.nn.functional.kl_div(logp_int, logp_clean, log_target=True, reduction="sum"))


def geometry(h_bb: torch.Tensor, h_xb: torch.Tensor, h_by: torch.Tensor, h_xy: torch.Tensor) -> dict[str, float]:
    """METHOD "Decomposition": cos(dXY, dX + dY), cos(dX, dY), |Inter| / |dXY| in float32."""
    d_x, d_y, d_xy = h_xb - h_bb, h_by - h_bb, h_xy - h_bb
    inter = d_xy - d_x - d_y

    def cos(a, b):
        return float((a * b).sum() / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b) + EPS))

    return {
        "cos_xy_sum": cos(d_xy, d_x + d_y),
        "cos_x_y": cos(d_x, d_y),
        "inter_ratio": float(torch.linalg.vector_norm(inter) / (torch.linalg.vector_norm(d_xy) + EPS)),
    }
