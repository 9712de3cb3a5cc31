"""Recurrent depth: "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach"
(Geiping et al. 2025, the Huginn model; reference code: github.com/seal-rg/recurrent-pretraining).

Idea: a transformer split into a prelude P, a weight-tied recurrent core R and a coda C.
    e   = P(sqrt(h) * embed(x))                         embed the input once
    s_0 ~ TruncNormal(0, sqrt(2/5))                     random initial latent state
    s_i = R(A([s_{i-1}, e]))   for i = 1..r             input injection by the adapter A every step
    p   = softmax(head(norm(C(norm(s_r)))))             decode the final state (tied embeddings)
The number of recurrences r is the test-time compute knob: it is sampled per training step from a
log-normal Poisson distribution and only the last k steps are backpropagated (truncated BPTT, so
memory is flat in r). At test time r can be fixed or chosen per sample / per token by an exit rule
(KL between consecutive output distributions, or relative latent change).

Two modes of one model:
  * causal=False, task "sudoku": one token per cell, bidirectional attention, all 81 digits predicted.
  * causal=True,  task "text":   character LM with generate(): KV cache with one slot per (core layer,
    step), per-token adaptive exit, the "latest-m4" cache-sharing rule for early-exited tokens and
    continuous chain-of-thought (a new token's state starts from the previous token's final state).

What we changed for a CPU-scale reference (all else follows the paper / reference code):
  * sizes: d_model 96, 1 prelude / 2 core / 1 coda layers, mean recurrence 8, backprop depth k=4
    (paper: 5280, 2/4/2, 32, 8), batch 32: sized so the default Sudoku run fits ~10 CPU minutes.
  * Sudoku only: learned row/column/box embeddings added to the token embedding (`grid_embedding`),
    because 1-D RoPE over the 81 cells hides the grid's constraint structure from a tiny model.
  * Sudoku adaptive exit is per puzzle: the paper's per-token rule applied to every cell, a puzzle
    exits when its largest per-cell KL (or latent change) falls under the threshold.
  * no test-time noise injection, no flex-attention masks; speculative decoding is greedy only.

Also here: the official checkpoint layout (`load_huginn`, `HUGINN_CONFIG`, rope_layout "interleaved"),
self-speculative decoding (`generate_speculative`) and per-recurrence states (`latent_trajectory`).
"""

from __future__ import annotations

import json
import math
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sudoku_data

TASKS = ("sudoku", "text")
EXIT_CRITERIA = ("none", "kl", "latent-diff")
ROPE_LAYOUTS = ("halves", "interleaved")


@dataclass
class Config:
    # --- required by train.py ---
    steps: int = 1500  # optimizer steps
    batch_size: int = 32  # puzzles (or text windows) per step
    lr: float = 2e-3  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warmup steps
    difficulty: str = "easy"  # sudoku preset of the training base set: easy|medium|hard
    eval_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # recurrences r for the evaluation table
    # --- model sizes ---
    d_model: int = 96  # h: width of every block and of the latent state s
    n_heads: int = 4  # attention heads (head dim = d_model / n_heads, must be even for RoPE)
    d_mlp: int = 256  # hidden width of the gated SiLU MLP
    n_prelude: int = 1  # l_P: layers of the prelude P
    n_core: int = 2  # l_R: layers of the recurrent core R
    n_coda: int = 1  # l_C: layers of the coda C
    rope_base: float = 50000.0  # RoPE base (reference value)
    rope_layout: str = "halves"  # RoPE pairs: halves (j, j + hd/2) | interleaved (2j, 2j+1) as the official code
    grid_embedding: bool = True  # sudoku: add learned row/col/box embeddings (our addition)
    # --- training recurrence (log-normal Poisson sampler, truncated backprop) ---
    mean_recurrence: int = 8  # r_mean: mean of the sampled recurrence count (counts n + k together)
    backprop_depth: int = 4  # k: recurrences that carry gradient, the rest run under no_grad
    sampler_seed: int = 0  # the (n, k) draw of step t is seeded by sampler_seed and t
    # --- optimiser ---
    weight_decay: float = 0.1  # AdamW decay on 2-D weights only
    beta2: float = 0.95  # AdamW beta2
    # --- adaptive exit at inference ---
    exit_criterion: str = "kl"  # none | kl | latent-diff
    # a puzzle exits on its largest per-cell KL; on easy the paper's per-token 5e-4 lost 1.0 point to fixed-32, 1e-4 0.4
    kl_threshold: float = 1e-4  # exit when max over cells of KL(p_{i-1} || p_i) < this (paper: 5e-4 per token)
    latent_threshold: float = 0.03  # exit when ||s_i - s_{i-1}|| / ||s_i|| < this (reference: 0.03)
    continuous_cot: bool = True  # text generation: warm-start each token's state from the previous one


GPU_CONFIG = dict(
    steps=20000, batch_size=256, lr=5e-4, warmup_steps=500, difficulty="hard",
    d_model=384, n_heads=6, d_mlp=1024, n_prelude=2, n_core=4, n_coda=2,
    mean_recurrence=16, backprop_depth=8, eval_steps=(1, 2, 4, 8, 16, 32, 64),
)  # fmt: skip

# The released Huginn-0125 (3.5B parameters): github.com/seal-rg/recurrent-pretraining, raven_config_minimal.json
HUGINN_CONFIG = dict(
    d_model=5280, n_heads=55, d_mlp=17920, n_prelude=2, n_core=4, n_coda=2, rope_base=50000.0,
    rope_layout="interleaved", grid_embedding=False, mean_recurrence=32, backprop_depth=8, kl_threshold=5e-4,
)  # fmt: skip
HUGINN_VOCAB_SIZE, HUGINN_CONTEXT = 65536, 4096


# ----------------------------------------------------------------------------- model pieces


class RMSNorm(nn.Module):
    """RMSNorm with eps 1e-6, computed in float32 as in the reference."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).type_as(x)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim / 2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin, layout: str = "halves"):
    """Rotate (B, H, T, hd) by positions given as cos/sin (T, hd/2); pair j is rotated by frequency j.

    halves: pair j = dims (j, j + hd/2); interleaved (official code): pair j = dims (2j, 2j+1). The two are
    the same attention once each head's q/k rows (and q/k bias) are permuted: halves dim j holds
    interleaved dim 2j, halves dim j + hd/2 holds interleaved dim 2j+1 (`from_official_state_dict`).
    """
    if layout == "interleaved":
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # 2 x (B, H, T, hd/2)
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention, no biases except the learned per-head q/k bias."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_layout = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.rope_layout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, self.n_heads, 1, self.head_dim))
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, rope, causal: bool, kv=None):
        """x (B, T, D); rope = (cos, sin) of x's positions; kv: cache callback (k, v) -> (k, v, mask)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        q = apply_rope(q + self.qk_bias[0], *rope, self.rope_layout)
        k = apply_rope(k + self.qk_bias[1], *rope, self.rope_layout)
        mask, is_causal = None, causal
        if kv is not None:  # cached decoding: keys/values of all positions so far, (B, H, T_all, hd)
            k, v, mask = kv(k, v)
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class GatedMLP(nn.Module):
    """proj(silu(x W1) * x W2), one fused input projection as in the reference."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 2 * cfg.d_mlp, bias=False)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)  # 2 x (B, T, d_mlp)
        return self.proj(F.silu(gate) * up)


class SandwichBlock(nn.Module):
    """x = n2(x + attn(n1(x))); x = n4(x + mlp(n3(x)))  (four RMSNorms per block)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n1, self.n2, self.n3, self.n4 = (RMSNorm(cfg.d_model) for _ in range(4))
        self.attn = Attention(cfg)
        self.mlp = GatedMLP(cfg)

    def forward(self, x, rope, causal: bool, kv=None):
        x = self.n2(x + self.attn(self.n1(x), rope, causal, kv))
        return self.n4(x + self.mlp(self.n3(x)))


class RecurrentKVCache:
    """KV cache for causal generation with one slot per prelude layer, per (core layer, step), per coda layer.

    Tokens may stop recurring at different steps (adaptive exit). `steps_done[b, t]` counts the core steps
    cached for token t of row b; a query at step i reads, for every earlier token, the most recent entry
    of the same core layer: step min(i, steps_done - 1) ("latest-m4" in the reference, whose 4-layer core
    makes "same core layer" = block index mod 4).
    """

    def __init__(self, model: "RecurrentDepthModel", batch: int, max_len: int, max_steps: int):
        p = next(model.parameters())
        shape = (2, batch, model.cfg.n_heads, max_len, model.cfg.d_model // model.cfg.n_heads)  # (k|v, B, H, T, hd)
        self.prelude = p.new_zeros(len(model.prelude), *shape)
        self.core = p.new_zeros(max_steps, len(model.core), *shape)
        self.coda = p.new_zeros(len(model.coda), *shape)
        self.steps_done = torch.zeros(batch, max_len, dtype=torch.long, device=p.device)  # (B, T)
        self.start = self.end = 0  # positions [start, end) are being processed

    def advance(self, n_new: int):
        """Open positions [end, end + n_new) for the next forward pass."""
        self.start, self.end = self.end, self.end + n_new

    def rewind(self, position: int):
        """Forget positions >= position (their entries are overwritten by the next pass)."""
        self.start = self.end = position

    def _mask(self):
        """(T_new, T_all) causal mask of the new queries over all cached keys; None for a single query."""
        if self.end - self.start == 1:
            return None
        q_pos = torch.arange(self.start, self.end, device=self.steps_done.device)
        return torch.arange(self.end, device=q_pos.device)[None, :] <= q_pos[:, None]

    def layer(self, store: torch.Tensor):
        """Callback for a prelude/coda layer: write the new k, v and return the full history."""

        def update(k, v):
            store[0, :, :, self.start : self.end] = k
            store[1, :, :, self.start : self.end] = v
            return store[0, :, :, : self.end].to(k.dtype), store[1, :, :, : self.end].to(v.dtype), self._mask()

        return update

    def core_layer(self, layer: int, step: int):
        """Callback for core layer `layer` at recurrence `step` with the latest-m4 lookup."""

        def update(k, v):
            self.core[step, layer, 0, :, :, self.start : self.end] = k
            self.core[step, layer, 1, :, :, self.start : self.end] = v
            B, T = self.steps_done.shape[0], self.end
            slot = (self.steps_done[:, :T] - 1).clamp(0, step)  # (B, T) latest cached step <= step
            rows, cols = torch.arange(B, device=slot.device)[:, None], torch.arange(T, device=slot.device)[None, :]
            keys = self.core[slot, layer, 0, rows, :, cols].transpose(1, 2)  # (B, T, H, hd) -> (B, H, T, hd)
            values = self.core[slot, layer, 1, rows, :, cols].transpose(1, 2)
            return keys.to(k.dtype), values.to(v.dtype), self._mask()

        return update


def example_generators(batch: dict, device) -> list | None:
    """One generator per example, seeded by batch["example_seed"] (B,) (train.py draws one per example and step):
    an example's noise then does not depend on the rest of its batch, so torchrun ranks holding slices draw what
    one process draws. The seeds stay on the CPU (read without a device sync); the generators live on `device`.
    None (one global generator) for a batch without seeds."""
    if "example_seed" not in batch:
        return None
    return [torch.Generator(device).manual_seed(seed) for seed in batch["example_seed"].tolist()]


def uniform_noise(shape, generator, device) -> torch.Tensor:
    """U(0, 1) of `shape` from one generator (or the global one if None), or row b from generator[b] for a list."""
    if isinstance(generator, list):
        return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
    return torch.rand(shape, generator=generator, device=device)


def exit_threshold(config: Config, criterion: str) -> float:
    """The adaptive-exit threshold of `criterion` in `config`."""
    return config.kl_threshold if criterion == "kl" else config.latent_threshold


class RecurrentDepthModel(nn.Module):
    """Prelude P -> recurrent core R (adapter input injection) -> coda C, tied embeddings."""

    def __init__(self, cfg: Config, vocab_size: int, max_len: int, causal: bool, grid: bool):
        super().__init__()
        self.cfg, self.causal, self.vocab_size, self.max_len = cfg, causal, vocab_size, max_len
        h = cfg.d_model
        self.wte = nn.Embedding(vocab_size, h)
        # Our addition for Sudoku: a learned embedding per row, column and 3x3 box (27 rows in one table).
        self.grid_emb = nn.Embedding(27, h) if grid else None
        if grid:
            cell = torch.arange(81)
            row, col = cell // 9, cell % 9
            self.register_buffer("grid_ids", torch.stack([row, 9 + col, 18 + (row // 3) * 3 + col // 3], -1), persistent=False)
        self.prelude = nn.ModuleList(SandwichBlock(cfg) for _ in range(cfg.n_prelude))
        self.adapter = nn.Linear(2 * h, h, bias=False)  # A: cat([s, e]) -> s, state first
        self.core = nn.ModuleList(SandwichBlock(cfg) for _ in range(cfg.n_core))
        self.coda = nn.ModuleList(SandwichBlock(cfg) for _ in range(cfg.n_coda))
        self.ln_f = RMSNorm(h)  # used twice: before and after the coda
        self.emb_scale = math.sqrt(h)
        cos, sin = rope_tables(h // cfg.n_heads, max_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        """'takase' init: TruncNormal std sqrt(2/(5h)); output projections std / sqrt(2 L_eff)."""
        std = math.sqrt(2 / (5 * self.cfg.d_model))
        l_eff = self.cfg.n_prelude + self.cfg.n_coda + self.cfg.n_core * self.cfg.mean_recurrence
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * l_eff) if name.endswith("proj.weight") else std
                nn.init.trunc_normal_(p, std=s, a=-3 * s, b=3 * s)

    def rope(self, start: int, end: int):
        return self.rope_cos[start:end], self.rope_sin[start:end]

    def embed(self, idx, rope, cache: RecurrentKVCache | None = None):
        """e = P(sqrt(h) * embed(x)): (B, T) -> (B, T, D)."""
        x = self.wte(idx)
        if self.grid_emb is not None:
            x = x + self.grid_emb(self.grid_ids).sum(1)  # (81, D) broadcast over the batch
        x = x * self.emb_scale
        for j, block in enumerate(self.prelude):
            x = block(x, rope, self.causal, cache.layer(cache.prelude[j]) if cache else None)
        return x

    def init_state(self, e, scale: float = 1.0, generator: torch.Generator | list | None = None):
        """s_0 ~ TruncNormal(0, sqrt(2/5) * scale), cut at 3 std; scale 0 gives the zero state. `generator`:
        one for the batch, or a list with one per example (see uniform_noise)."""
        # inverse-CDF sampling (what nn.init.trunc_normal_ does, but without its graph-breaking .item())
        cdf_lo = 0.5 * (1 + math.erf(-3 / math.sqrt(2)))  # Phi(-3)
        u = uniform_noise(e.shape, generator, e.device) * (1 - 2 * cdf_lo) + cdf_lo
        return (math.sqrt(2) * torch.erfinv(2 * u - 1) * math.sqrt(2 / 5) * scale).to(e.dtype)  # (B, T, D)

    def core_step(self, s, e, rope, cache: RecurrentKVCache | None = None, step: int = 0):
        """One recurrence s_i = R(A([s_{i-1}, e])): (B, T, D) -> (B, T, D)."""
        x = self.adapter(torch.cat([s, e], dim=-1))
        for layer, block in enumerate(self.core):
            x = block(x, rope, self.causal, cache.core_layer(layer, step) if cache else None)
        return x

    def readout(self, s, rope, cache: RecurrentKVCache | None = None):
        """logits = head(norm(C(norm(s)))), head tied to the embedding: (B, T, D) -> (B, T, V)."""
        x = self.ln_f(s)
        for j, block in enumerate(self.coda):
            x = block(x, rope, self.causal, cache.layer(cache.coda[j]) if cache else None)
        return F.linear(self.ln_f(x), self.wte.weight)

    @torch.compiler.disable(recursive=False)  # the loop count varies per step: keep it eager, compile the steps
    def recur(self, s, e, rope, n_no_grad: int, k_grad: int):
        """Truncated backprop: n steps without a graph, then k steps with gradients."""
        with torch.no_grad():
            for _ in range(n_no_grad):
                s = self.core_step(s, e, rope)
        for _ in range(k_grad):
            s = self.core_step(s, e, rope)
        return s

    def forward(self, idx, num_steps: tuple[int, int], state=None, generator=None):
        """(B, T) tokens -> (B, T, V) logits after n_no_grad + k_grad recurrences from `state` (or noise
        drawn from `generator`)."""
        rope = self.rope(0, idx.shape[1])
        e = self.embed(idx, rope)
        s = self.init_state(e, generator=generator) if state is None else state
        return self.readout(self.recur(s, e, rope, *num_steps), rope)

    # ------------------------------------------------------------------------- thinking loop

    def _exit_value(self, criterion: str, s_prev, s_new, log_p_prev, log_p_new):
        """Per-row exit statistic (B,): the largest per-position value, so a row exits once all converged."""
        if criterion == "kl":  # KL(p_{i-1} || p_i), prev starts uniform
            value = (log_p_prev.exp() * (log_p_prev - log_p_new)).sum(-1)  # (B, T)
        else:  # relative latent change ||s_i - s_{i-1}|| / ||s_i||
            value = (s_new - s_prev).float().norm(dim=-1) / s_new.float().norm(dim=-1).clamp(min=1e-12)
        return value.amax(-1)

    @torch.no_grad()
    def latent_trajectory(self, idx, num_steps: int, state=None, generator=None) -> torch.Tensor:
        """The latent state at every recurrence: (num_steps + 1, B, T, D) holding s_0, s_1, ..., s_r."""
        rope = self.rope(0, idx.shape[1])
        e = self.embed(idx, rope)
        states = [self.init_state(e, generator=generator) if state is None else state]
        for _ in range(num_steps):
            states.append(self.core_step(states[-1], e, rope))
        return torch.stack(states)

    @torch.no_grad()
    def think(self, idx, max_steps: int, exit_criterion: str = "none", record_steps=(), generator=None,
              threshold: float | None = None):
        """Recur up to max_steps with a per-row (per-puzzle) exit below `threshold` (default: the model's config).

        Returns logits at each row's exit (B, T, V), steps used per row (B,), and {step: logits} for the
        steps in record_steps (only with exit_criterion "none"). Rows that exited drop out of the batch.
        """
        if exit_criterion not in EXIT_CRITERIA or (record_steps and exit_criterion != "none"):
            raise ValueError(f"exit_criterion must be one of {EXIT_CRITERIA}; record_steps needs 'none'")
        threshold = exit_threshold(self.cfg, exit_criterion) if threshold is None else threshold
        rope = self.rope(0, idx.shape[1])
        e = self.embed(idx, rope)
        s = self.init_state(e, generator=generator)
        steps_used = torch.full((idx.shape[0],), max_steps, dtype=torch.long, device=idx.device)
        active = torch.arange(idx.shape[0], device=idx.device)  # rows still thinking
        log_p = torch.full((*idx.shape, self.vocab_size), -math.log(self.vocab_size), device=idx.device)
        recorded = {}
        for i in range(1, max_steps + 1):
            s_prev = s[active]
            s_new = self.core_step(s_prev, e[active], rope)
            s = s.index_copy(0, active, s_new)
            if i in record_steps:
                recorded[i] = self.readout(s, rope).float()
            if exit_criterion == "none" or i == max_steps:
                continue
            log_p_new = F.log_softmax(self.readout(s_new, rope).float(), -1) if exit_criterion == "kl" else None
            value = self._exit_value(exit_criterion, s_prev, s_new, log_p[active], log_p_new)
            if log_p_new is not None:
                log_p[active] = log_p_new
            done = value < threshold
            steps_used[active[done]] = i
            active = active[~done]
            if active.numel() == 0:
                break
        return self.readout(s, rope).float(), steps_used, recorded

    @torch.no_grad()
    def _cached_forward(self, idx, cache: RecurrentKVCache, max_steps: int, exit_criterion: str, state, init_scale):
        """Process new tokens (B, T_new) against the cache; per-row exit (per token when T_new == 1).

        Returns logits (B, T_new, V), final states (B, T_new, D), steps used (B,).
        """
        cache.advance(idx.shape[1])
        rope = self.rope(cache.start, cache.end)
        e = self.embed(idx, rope, cache)
        s = self.init_state(e, init_scale) if state is None else state
        active = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
        steps_used = torch.full_like(active, max_steps, dtype=torch.long)
        log_p = torch.full((*idx.shape, self.vocab_size), -math.log(self.vocab_size), device=idx.device)
        threshold = exit_threshold(self.cfg, exit_criterion)
        for i in range(max_steps):
            cache.steps_done[active, cache.start : cache.end] = i + 1
            s_new = self.core_step(s, e, rope, cache, step=i)
            s_prev, s = s, torch.where(active[:, None, None], s_new, s)  # exited rows stay frozen
            if exit_criterion == "none" or i == max_steps - 1:
                continue
            log_p_new = F.log_softmax(self.readout(s, rope, cache).float(), -1) if exit_criterion == "kl" else None
            done = active & (self._exit_value(exit_criterion, s_prev, s, log_p, log_p_new) < threshold)
            log_p = log_p_new if log_p_new is not None else log_p
            steps_used[done] = i + 1
            active &= ~done
            if not active.any():
                break
        return self.readout(s, rope, cache).float(), s, steps_used

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int, max_steps: int | None = None, exit_criterion: str | None = None,
                 continuous_cot: bool | None = None, temperature: float = 0.0, init_scale: float = 1.0):
        """Autoregressive sampling (greedy at temperature 0) with a KV cache and per-token adaptive exit.

        The prompt is prefilled with max_steps recurrences and no exit, as the reference's `step > 0` guard
        ("do not exit in prefill") in generate_with_adaptive_compute (recpre/raven_modeling_minimal.py).
        Returns tokens (B, T_prompt + max_new_tokens) and the mean recurrences per generated token.
        """
        if not self.causal:
            raise ValueError("generate() needs the causal (text) model")
        max_steps = max_steps or self.cfg.mean_recurrence
        exit_criterion = self.cfg.exit_criterion if exit_criterion is None else exit_criterion
        continuous_cot = self.cfg.continuous_cot if continuous_cot is None else continuous_cot
        if prompt.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"prompt + new tokens must fit in the context length {self.max_len}")
        cache = RecurrentKVCache(self, prompt.shape[0], prompt.shape[1] + max_new_tokens, max_steps)
        logits, s, _ = self._cached_forward(prompt, cache, max_steps, "none", None, init_scale)
        tokens, steps = [prompt], []
        for t in range(max_new_tokens):
            last = logits[:, -1]  # (B, V)
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(last / temperature, -1), 1)
            else:
                nxt = last.argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(nxt)
            if t + 1 < max_new_tokens:
                state = s[:, -1:] if continuous_cot else None  # continuous CoT warm start
                logits, s, used = self._cached_forward(nxt, cache, max_steps, exit_criterion, state, init_scale)
                steps.append(used.float())
        mean_steps = torch.stack(steps).mean().item() if steps else float(max_steps)
        return torch.cat(tokens, dim=1), mean_steps

    @torch.no_grad()
    def generate_speculative(self, prompt, max_new_tokens: int, draft_steps: int = 4, verify_steps: int | None = None,
                             lookahead: int = 4, init_scale: float = 0.0):
        """Self-speculative greedy decoding: the same model drafts with few recurrences and verifies with many.

        Each round drafts `lookahead` tokens one by one with draft_steps recurrences, then runs the pending
        token and the drafts through verify_steps recurrences in one pass over the shared KV cache (the
        drafts' entries are overwritten), keeps the longest prefix on which the verifier's greedy choice
        agrees, plus the verifier's own next token. The output equals generate(max_steps=verify_steps,
        exit_criterion="none", continuous_cot=False) from the same deterministic s_0 (init_scale 0: zero state).
        A batch advances by the shortest agreeing prefix of its rows.
        Returns tokens (B, T_prompt + max_new_tokens) and {"accepted": fraction of drafted tokens accepted,
        "sequential steps": recurrences run one after another per new token, drafts plus verify passes}.
        """
        if not self.causal:
            raise ValueError("generate_speculative() needs the causal (text) model")
        verify_steps = verify_steps or self.cfg.mean_recurrence
        if not 1 <= draft_steps <= verify_steps or lookahead < 1:
            raise ValueError(f"need 1 <= draft_steps ({draft_steps}) <= verify_steps ({verify_steps}), lookahead >= 1")
        if prompt.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"prompt + new tokens must fit in the context length {self.max_len}")
        cache = RecurrentKVCache(self, prompt.shape[0], prompt.shape[1] + max_new_tokens, verify_steps)
        logits, _, _ = self._cached_forward(prompt, cache, verify_steps, "none", None, init_scale)
        tokens = [prompt, logits[:, -1:].argmax(-1)]  # the last token is pending: not yet in the cache
        new, drafted, accepted, passes = 1, 0, 0, 0
        while new < max_new_tokens:
            start, count = cache.end, min(lookahead, max_new_tokens - new)
            draft = [tokens[-1][:, -1:]]
            for _ in range(count):  # draft: one token at a time with few recurrences
                logits, _, _ = self._cached_forward(draft[-1], cache, draft_steps, "none", None, init_scale)
                draft.append(logits[:, -1:].argmax(-1))
            cache.rewind(start)  # verify: the pending token and all but the last draft in one pass
            logits, _, _ = self._cached_forward(torch.cat(draft[:-1], 1), cache, verify_steps, "none", None, init_scale)
            verified = logits.argmax(-1)  # (B, count): the greedy token after each input
            agree = int((verified == torch.cat(draft[1:], 1)).cumprod(1).sum(1).min())  # longest agreeing prefix
            keep = min(agree + 1, count)  # the agreeing drafts, then the verifier's correction
            tokens.append(verified[:, :keep])
            cache.rewind(start + keep)  # inputs up to start + keep - 1 were correct; the last kept token is pending
            new, drafted, accepted, passes = new + keep, drafted + count, accepted + min(agree, count), passes + 1
        sequential = (drafted * draft_steps + passes * verify_steps) / max(new - 1, 1)  # token 1 is the prefill's
        return torch.cat(tokens, dim=1), {"accepted": accepted / max(drafted, 1), "sequential steps": sequential}


def check_config(config: Config):
    """Raise ValueError naming the first invalid field."""
    if config.d_model % config.n_heads or (config.d_model // config.n_heads) % 2:
        raise ValueError(f"d_model ({config.d_model}) must be divisible by n_heads ({config.n_heads}) into an even head dim")
    if min(config.n_prelude, config.n_core, config.n_coda) < 1 or min(config.mean_recurrence, config.backprop_depth) < 1:
        raise ValueError("n_prelude, n_core, n_coda, mean_recurrence and backprop_depth must all be >= 1")
    if config.exit_criterion not in EXIT_CRITERIA:
        raise ValueError(f"exit_criterion must be one of {EXIT_CRITERIA}, got {config.exit_criterion!r}")
    if config.difficulty not in (*sudoku_data.DIFFICULTIES, *sudoku_data.TRAINING_MIXES):
        raise ValueError(f"difficulty must be one of {', '.join((*sudoku_data.DIFFICULTIES, *sudoku_data.TRAINING_MIXES))}, "
                         f"got {config.difficulty!r}")
    if not config.eval_steps or min(config.eval_steps) < 1:
        raise ValueError("eval_steps must be a non-empty tuple of positive ints")
    if config.rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {config.rope_layout!r}")


def build_model(config: Config, task) -> nn.Module:
    """Validate the config and build the model for `task` (sudoku: bidirectional; text: causal)."""
    if task.name not in TASKS:
        raise ValueError(f"recurrent_depth supports tasks {TASKS}, not {task.name!r}")
    check_config(config)
    grid = task.name == "sudoku" and config.grid_embedding
    return RecurrentDepthModel(config, task.vocab_size, task.seq_len, causal=task.name == "text", grid=grid)


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on tensors of 2 or more dims (embeddings, projections, the 4-D q/k bias), none on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2))


# ----------------------------------------------------------------------------- the method's loss


def sample_recurrence(step: int, config: Config) -> tuple[int, int]:
    """Log-normal Poisson draw of the recurrence count, shared by all devices (seeded by the step).

    sigma = 0.5, mu = log(max(r_mean - k, 0) + k) - sigma^2 / 2, rate ~ LogNormal(mu, sigma),
    p = Poisson(rate) + 1, n = max(p - k, 0) steps without gradient, k' = min(k, p) steps with gradient.
    E[rate] = max(r_mean, k), as in the reference's randomized_iteration_sampler.
    """
    g = torch.Generator().manual_seed(config.sampler_seed * 1_000_003 + step)
    sigma = 0.5
    k = config.backprop_depth
    mu = math.log(max(config.mean_recurrence - k, 0) + k) - sigma**2 / 2
    rate = torch.exp(mu + sigma * torch.randn(1, generator=g))
    p = int(torch.poisson(rate, generator=g).item()) + 1
    return max(p - k, 0), min(k, p)


def inputs_and_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sudoku: puzzle -> solution for all 81 cells. Text: next-character prediction."""
    if "puzzle" in batch:
        return batch["puzzle"], batch["solution"]
    return batch["tokens"][:, :-1], batch["tokens"][:, 1:]


def recurrent_loss(model, batch: dict, num_steps: tuple[int, int]) -> torch.Tensor:
    """L = CE(head(norm(C(norm(s_r)))), y): plain cross-entropy on the coda output, no intermediate loss."""
    inputs, targets = inputs_and_targets(batch)
    logits = model(inputs, num_steps, generator=example_generators(batch, inputs.device))  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------- training step


def train_step(model, optimizer, scaler, batch: dict, step: int, config: Config, autocast_dtype) -> dict:
    """One optimizer step with a freshly sampled recurrence count (n no-grad steps + k grad steps)."""
    model.train()
    n_no_grad, k_grad = sample_recurrence(step, config)
    device_type = next(iter(batch.values())).device.type
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = recurrent_loss(model, batch, (n_no_grad, k_grad))
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "recurrence": torch.tensor(n_no_grad + k_grad)}


# ----------------------------------------------------------------------------- evaluation


def _digits(logits):
    """Most likely digit 1..9 per cell (token 0 = blank is never predicted): (B, 81, V) -> (B, 81)."""
    return logits[..., 1:].argmax(-1) + 1


def _evaluate_sudoku(model, task, config: Config, eval_steps, autocast_dtype) -> list[dict]:
    rows, max_steps = [], max(eval_steps)
    device_type = model.rope_cos.device.type
    chunk = 4 * config.batch_size
    for set_name, data in task.test_sets.items():
        g = torch.Generator(model.rope_cos.device).manual_seed(0)  # same s_0 for every step count
        fixed = {r: [] for r in eval_steps}
        adaptive, used = [], []
        for i in range(0, data["puzzle"].shape[0], chunk):
            puzzle = data["puzzle"][i : i + chunk].to(model.rope_cos.device)
            initial_state = g.get_state()  # the adaptive run starts from the same s_0 as the fixed runs
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                _, _, recorded = model.think(puzzle, max_steps, "none", record_steps=eval_steps, generator=g)
                g.set_state(initial_state)
                logits, steps_used, _ = model.think(puzzle, max_steps, config.exit_criterion, generator=g,
                                                    threshold=exit_threshold(config, config.exit_criterion))
            for r in eval_steps:
                fixed[r].append(_digits(recorded[r]).cpu())
            adaptive.append(_digits(logits).cpu())
            used.append(steps_used.cpu())
        puzzle, solution = data["puzzle"], data["solution"]

        def row(steps, mean_steps, pred):
            return {"test set": set_name, "thinking steps": steps, "mean steps used": round(mean_steps, 2),
                    "exact %": sudoku_data.exact_accuracy(pred, solution),
                    "blank-cell %": sudoku_data.blank_accuracy(pred, puzzle, solution)}

        rows += [row(r, float(r), torch.cat(fixed[r])) for r in eval_steps]
        rows.append(row(f"adaptive ({config.exit_criterion})", torch.cat(used).float().mean().item(), torch.cat(adaptive)))
    return rows


def _evaluate_text(model, task, config: Config, eval_steps, autocast_dtype) -> list[dict]:
    rows, device = [], model.rope_cos.device
    for set_name, data in task.test_sets.items():
        for r in eval_steps:
            g = torch.Generator(device).manual_seed(0)
            total, count = 0.0, 0
            for i in range(0, data["tokens"].shape[0], config.batch_size):
                x, y = inputs_and_targets({"tokens": data["tokens"][i : i + config.batch_size].to(device)})
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits, _, _ = model.think(x, r, "none", generator=g)
                total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                count += y.numel()
            rows.append({"test set": set_name, "thinking steps": r, "loss": total / count,
                         "bits/char": total / count / math.log(2)})
    return rows


@torch.no_grad()
def evaluate(model, task, config: Config, eval_steps: tuple[int, ...], autocast_dtype) -> list[dict]:
    """Sudoku: exact / blank-cell accuracy per fixed recurrence count and for adaptive exit, per test set.
    Text: held-out loss and bits per character per recurrence count."""
    model.eval()
    try:
        evaluate_task = _evaluate_sudoku if task.name == "sudoku" else _evaluate_text
        return evaluate_task(model, task, config, eval_steps, autocast_dtype)
    finally:
        model.train()


# ----------------------------------------------------------------------------- the official Huginn checkpoint

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
# official name -> ours, applied in order (recpre/raven_modeling_minimal.py: RavenForCausalLM)
OFFICIAL_KEY_MAP = ((r"^transformer\.", ""), (r"^core_block\.", "core."), (r"\.norm_(\d)\.", r".n\1."),
                    (r"\.attn\.Wqkv\.", ".attn.qkv."))  # fmt: skip
OFFICIAL_UNUSED = ("lm_head.weight", "freqs_cis")  # the head is tied to wte; the RoPE table is recomputed


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Tensors of one .safetensors file, read with the standard library and torch.

    Format: an 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}} (and an optional "__metadata__"), then the raw little-endian bytes,
    offsets counted from the end of the header. Accepted dtypes: SAFETENSORS_DTYPES (F64, F32, F16, BF16,
    I64, I32, I16, I8, U8, BOOL); float8 and unsigned 16-64-bit tensors are refused.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: the safetensors header is not JSON") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: the safetensors header is not a JSON object")
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype_name, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets [begin, end]") from None
            if dtype_name not in SAFETENSORS_DTYPES:
                accepted = ", ".join(SAFETENSORS_DTYPES)
                raise ValueError(f"{path}: tensor {name!r} has dtype {dtype_name}; accepted: {accepted}")
            dtype = SAFETENSORS_DTYPES[dtype_name]
            nbytes = math.prod(shape) * dtype.itemsize
            if not 0 <= begin <= end or end - begin != nbytes or 8 + n + end > size:
                raise ValueError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] do not match "
                                 f"its shape {shape} and dtype {dtype_name}, or run past the end of the file")
            f.seek(8 + n + begin)
            data = bytearray(f.read(nbytes))
            empty = torch.empty(shape, dtype=dtype)
            tensors[name] = torch.frombuffer(data, dtype=dtype).reshape(shape) if nbytes else empty
    return tensors


def read_state_dict(directory) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: its *.safetensors shards, else its *.bin / *.pt state dicts."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint folder not found: {directory}")
    files = sorted(directory.glob("*.safetensors")) or sorted([*directory.glob("*.bin"), *directory.glob("*.pt")])
    if not files:
        raise ValueError(f"{directory} has no *.safetensors, *.bin or *.pt files")
    state = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(read_safetensors(file))
            continue
        try:
            part = torch.load(file, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
            raise ValueError(f"{file}: cannot read it as a torch state dict ({str(error).splitlines()[0]})") from None
        if not isinstance(part, dict) or not all(isinstance(t, torch.Tensor) for t in part.values()):
            raise ValueError(f"{file}: not a state dict of tensors")
        state.update(part)
    return state


def from_official_state_dict(state: dict, config: Config) -> dict[str, torch.Tensor]:
    """Official names and layout -> this file's: key map, qk_bias (2, 1, H, hd) -> (2, H, 1, hd), and for
    rope_layout "halves" each head's q/k rows permuted so that halves RoPE computes the interleaved one."""
    head_dim = config.d_model // config.n_heads
    to_halves = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])  # halves dim j <- this dim
    local = {}
    for name, tensor in state.items():
        if name in OFFICIAL_UNUSED:
            continue
        for pattern, replacement in OFFICIAL_KEY_MAP:
            name = re.sub(pattern, replacement, name)
        if name.endswith("attn.qk_bias"):
            tensor = tensor.transpose(1, 2)  # (2, 1, H, hd) -> (2, H, 1, hd)
            if config.rope_layout == "halves":
                tensor = tensor[..., to_halves]
        elif name.endswith("attn.qkv.weight") and config.rope_layout == "halves":
            rows = tensor.reshape(3, config.n_heads, head_dim, -1)  # (q|k|v, H, hd, D)
            tensor = torch.cat([rows[:2, :, to_halves], rows[2:]]).reshape(tensor.shape)  # v rows stay
        local[name] = tensor.contiguous()
    return local


def load_huginn(directory, config: Config | None = None, vocab_size: int = HUGINN_VOCAB_SIZE,
                max_len: int = HUGINN_CONTEXT) -> RecurrentDepthModel:
    """The causal model with the official weights of `directory` (default config: the released Huginn-0125).

    Parameters keep the checkpoint's dtype (bfloat16 for the release); call .float() for float32.
    """
    config = config or Config(**HUGINN_CONFIG)
    check_config(config)
    state = from_official_state_dict(read_state_dict(directory), config)
    with torch.device("meta"):  # shapes only: no random init of 3.5B parameters that are overwritten anyway
        model = RecurrentDepthModel(config, vocab_size, max_len, causal=True, grid=False)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise ValueError(f"{directory}: the checkpoint does not fit the config: {detail}") from None
    model.rope_cos, model.rope_sin = rope_tables(config.d_model // config.n_heads, max_len, config.rope_base)
    return model.eval()


# ----------------------------------------------------------------------------- analysis

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def trajectory_svg(trajectories: torch.Tensor, labels, title: str, columns: int = 2) -> str:
    """SVG (standard library) of trajectories (S, N, R, D): N tracked vectors over R steps from S starts.
    One panel per vector, projected on the first two principal components of that vector's S R points;
    the first start solid, the others dashed; hollow circle = first step, dot = last step."""
    starts, count = trajectories.shape[:2]
    size, gap, top = 260, 20, 40
    rows = -(-count // columns)
    width, height = columns * (size + gap) + gap, top + rows * (size + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']  # fmt: skip
    for n, label in enumerate(labels):
        points = trajectories[:, n].double()  # (S, R, D)
        mean = points.flatten(0, 1).mean(0)
        _, singular, directions = torch.linalg.svd(points.flatten(0, 1) - mean, full_matrices=False)
        explained = 100 * singular[:2] ** 2 / (singular**2).sum()
        xy = (points - mean) @ directions[:2].T  # (S, R, 2)
        lo, hi = xy.flatten(0, 1).amin(0), xy.flatten(0, 1).amax(0)
        scale = (size - 40) / (hi - lo).clamp(min=1e-12)
        x0, y0 = gap + (n % columns) * (size + gap), top + (n // columns) * (size + gap)
        color = PALETTE[n % len(PALETTE)]
        parts += [f'<rect x="{x0}" y="{y0}" width="{size}" height="{size}" fill="none" stroke="#bbb"/>',
                  f'<text x="{x0 + 6}" y="{y0 + 15}">{label}</text>',
                  f'<text x="{x0 + size - 6}" y="{y0 + size - 6}" text-anchor="end" fill="#666">'
                  f'PC 1 / 2: {explained[0]:.0f} / {explained[1]:.0f} % of variance</text>']  # fmt: skip
        for start in range(starts):
            path = [(x0 + 20 + (x - lo[0]) * scale[0], y0 + size - 20 - (y - lo[1]) * scale[1])
                    for x, y in xy[start].tolist()]  # fmt: skip
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y in path)
            dash = ' stroke-dasharray="4 3"' if start else ""
            parts += [f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>',
                      f'<circle cx="{path[0][0]:.1f}" cy="{path[0][1]:.1f}" r="4" fill="white" stroke="{color}"/>',
                      f'<circle cx="{path[-1][0]:.1f}" cy="{path[-1][1]:.1f}" r="3" fill="{color}"/>']
    return "\n".join(parts + ["</svg>"]) + "\n"


def load_run(path) -> RecurrentDepthModel:
    """The model of a train.py checkpoint (run folder's checkpoint.pt), in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
    name = state["run"]["task"]
    seq_len = 81 if name == "sudoku" else state["run"]["context_length"]
    task = type("Task", (), dict(name=name, vocab_size=state["model"]["wte.weight"].shape[0], seq_len=seq_len))
    model = build_model(config, task)
    model.load_state_dict(state["model"])
    return model.eval()


def sudoku_trajectory_figure(checkpoint, out, steps: int = 32, cells=(0, 3, 2, 6), seed: int = 1000003):
    """s_1 .. s_steps of a few cells of one easy puzzle, from two random s_0 (solid, dashed). s_0 itself is left
    out: the first recurrence jumps far from it and would squash the rest of the plot."""
    model = load_run(checkpoint)
    puzzle, solution, _ = sudoku_data.generate_puzzles(1, "easy", seed=seed, workers=1)
    idx = torch.from_numpy(puzzle).long()  # (1, 81)
    runs = [model.latent_trajectory(idx, steps, generator=torch.Generator().manual_seed(g))[1:, 0] for g in (0, 1)]
    paths = torch.stack([run[:, list(cells)].transpose(0, 1) for run in runs])  # (2 starts, cells, R, D)
    labels = [f"r{c // 9 + 1}c{c % 9 + 1}: " + (f"given {puzzle[0, c]}" if puzzle[0, c] else f"blank, answer {solution[0, c]}")
              for c in cells]  # fmt: skip
    title = f"Latent state of {len(cells)} Sudoku cells, recurrences 1-{steps}"
    Path(out).write_text(trajectory_svg(paths, labels, title))


def speculative_benchmark(checkpoint, draft_steps: int = 4, lookahead: int = 4, verify_steps: int = 32,
                          prompts: int = 8, prompt_len: int = 32, new_tokens: int = 64) -> dict:
    """generate_speculative against plain fixed-step and adaptive decoding (the run's exit rule, warm start and
    random s_0) with verify_steps as the budget, one prompt at a time from the held-out tail (last 10 %) of the
    run's text file: accepted drafts, recurrences per token, agreement, wall time."""
    model = load_run(checkpoint)
    run = torch.load(checkpoint, map_location="cpu", weights_only=True)["run"]
    text = Path(run["text_file"]).read_text(encoding="utf-8")
    characters = sorted(set(text))  # the vocabulary of train.py's text task
    ids = torch.tensor([characters.index(c) for c in text[int(0.9 * len(text)) :]])
    seconds = {"fixed": 0.0, "adaptive": 0.0, "speculative": 0.0}
    accepted, sequential, adaptive_steps, identical, same_as_adaptive = 0.0, 0.0, 0.0, 0, 0
    for start in torch.linspace(0, len(ids) - prompt_len - 1, prompts).long().tolist():
        prompt = ids[start : start + prompt_len][None]
        t0 = time.perf_counter()
        fixed, _ = model.generate(prompt, new_tokens, verify_steps, "none", continuous_cot=False, init_scale=0.0)
        t1 = time.perf_counter()
        adaptive, steps = model.generate(prompt, new_tokens, verify_steps)
        t2 = time.perf_counter()
        speculative, stats = model.generate_speculative(prompt, new_tokens, draft_steps, verify_steps, lookahead)
        t3 = time.perf_counter()
        for name, taken in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
            seconds[name] += taken
        accepted, sequential = accepted + stats["accepted"], sequential + stats["sequential steps"]
        adaptive_steps += steps
        identical += int(torch.equal(speculative, fixed))
        same_as_adaptive += (speculative[0, prompt_len:] == adaptive[0, prompt_len:]).sum().item()
    return {"accepted drafts": round(accepted / prompts, 3), "identical to fixed greedy": f"{identical}/{prompts}",
            "tokens equal to adaptive": round(same_as_adaptive / (prompts * new_tokens), 3),
            "recurrences per token (fixed, adaptive, speculative sequential)":
                (verify_steps, round(adaptive_steps / prompts, 2), round(sequential / prompts, 2)),
            "wall fixed / speculative": round(seconds["fixed"] / seconds["speculative"], 2),
            "wall adaptive / speculative": round(seconds["adaptive"] / seconds["speculative"], 2),
            **{f"seconds {name}": round(value, 2) for name, value in seconds.items()}}  # fmt: skip


# ----------------------------------------------------------------------------- demo

if __name__ == "__main__":
    # python recurrent_depth.py [trajectories CHECKPOINT OUT.svg | speculative CHECKPOINT [DRAFT LOOKAHEAD VERIFY]]
    # no arguments: the demo
    import sys

    if sys.argv[1:2] == ["trajectories"]:
        sudoku_trajectory_figure(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["speculative"]:
        for name, value in speculative_benchmark(sys.argv[2], *map(int, sys.argv[3:6])).items():
            print(f"{name}: {value}")
    else:
        # A tiny causal model memorises a short string in seconds, then generates with per-token exit.
        from types import SimpleNamespace

        text = "the cat sat on the mat. " * 8
        chars = sorted(set(text))
        data = torch.tensor([chars.index(c) for c in text])
        task = SimpleNamespace(name="text", vocab_size=len(chars), seq_len=64)
        cfg = Config(d_model=64, d_mlp=128, mean_recurrence=4, backprop_depth=2, lr=3e-3)
        torch.manual_seed(0)
        model = build_model(cfg, task)
        opt = make_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(enabled=False)
        t0 = time.time()
        for step in range(150):
            starts = torch.randint(0, len(data) - 33, (16,))
            batch = {"tokens": torch.stack([data[s : s + 33] for s in starts])}
            loss = train_step(model, opt, scaler, batch, step, cfg, None)["loss"]
        print(f"loss {loss.item():.3f} after 150 steps ({time.time() - t0:.1f}s)")
        model.eval()
        out, mean_steps = model.generate(data[None, :8], 40, max_steps=8)
        print(repr("".join(chars[i] for i in out[0].tolist())), f"mean recurrences per token {mean_steps:.2f} / 8")
