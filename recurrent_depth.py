"""Recurrent depth: "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach"
(Geiping et al. 2025, the Huginn model; reference code: github.com/seal-rg/recurrent-pretraining).

Idea: a transformer split into a prelude P, a weight-tied recurrent core R and a coda C. The number of
recurrences r is the test-time compute knob: more recurrences, more thinking, with no extra parameters.
    e   = P(sqrt(h) * embed(x))                         embed the input once
    s_0 ~ TruncNormal(0, sqrt(2/5))                     random initial latent state
    s_i = R(A([s_{i-1}, e]))   for i = 1..r             input injection by the adapter A every step
    p   = softmax(head(norm(C(norm(s_r)))))             decode the final state (tied embeddings)
Training draws r per step from a log-normal Poisson distribution, runs the first n = max(r - k, 0) recurrences
without a graph, backpropagates through the last k (memory flat in r) and minimises L = CE(p, y), nothing else.
At test time r is fixed, or chosen per puzzle / per token by an exit rule. Task "sudoku" is bidirectional (all
81 digits at once), task "text" a causal character LM.

Deviations from the paper and the reference code:
  * sizes: d_model 96, 1 prelude / 2 core / 1 coda layers, r_mean 8, k 4 (paper: 5280, 2/4/2, 32, 8): a CPU run.
  * Sudoku only: learned row/column/box embeddings added to the token embedding (1-D RoPE hides the grid).
  * Sudoku adaptive exit is per puzzle: the reference's per-token statistic, the largest over the 81 cells.
  * RoPE rotates the pairs (j, j + hd/2); scripts/huginn_0125.py maps the official pairs (2j, 2j+1) to them.
  * no flex-attention masks; generation and speculative decoding are greedy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sudoku_data

TASKS = ("sudoku", "text")
EXIT_CRITERIA = ("none", "kl", "latent-diff", "entropy-diff", "argmax-stability")
READS_DISTRIBUTION = ("kl", "entropy-diff", "argmax-stability")  # exit rules that read p_i out after every recurrence


@dataclass
class Config:
    # --- required by train.py ---
    steps: int = 1500  # optimizer steps
    batch_size: int = 32  # puzzles (or text windows) per step
    lr: float = 2e-3  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warmup steps
    difficulty: str = "easy"  # sudoku training base set: easy|medium|hard|extreme, or a mix: mixed|harder
    eval_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # recurrences r for the evaluation table
    # --- model sizes ---
    d_model: int = 96  # h: width of every block and of the latent state s
    n_heads: int = 4  # attention heads (head dim = d_model / n_heads, must be even for RoPE)
    d_mlp: int = 256  # hidden width of the gated SiLU MLP
    n_prelude: int = 1  # l_P: layers of the prelude P
    n_core: int = 2  # l_R: layers of the recurrent core R
    n_coda: int = 1  # l_C: layers of the coda C
    # --- training recurrence (log-normal Poisson sampler, truncated backprop) ---
    mean_recurrence: int = 8  # r_mean: mean of the sampled recurrence count (counts n + k together)
    backprop_depth: int = 4  # k: recurrences that carry gradient, the rest run under no_grad
    # --- the two controls of the paper's argument (sudoku) ---
    fixed_recurrence: bool = False  # control: train at the sampler's mean r_mean + 1 every step (no sampling)
    plain_transformer: bool = False  # control: l_P + l_R*(r_mean + 1) + l_C distinct layers, no recurrence
    # --- optimiser (the reference's AdamW) ---
    grad_clip: float = 1.0  # max global gradient norm
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    weight_decay: float = 0.1  # AdamW decay on 2-D weights only
    # --- adaptive exit at inference ---
    exit_criterion: str = "kl"  # none | kl | latent-diff | entropy-diff | argmax-stability
    kl_threshold: float = 1e-3  # kl: exit when max over cells of KL(p_{i-1} || p_i) < this (official code; paper 5e-4)
    latent_threshold: float = 0.03  # latent-diff: exit when ||s_i - s_{i-1}|| / ||s_i|| < this (reference: 0.03)
    entropy_threshold: float = 1e-3  # entropy-diff: exit when |H(p_i) - H(p_{i-1})| < this (reference: 1e-3)
    stable_steps: int = 5  # argmax-stability: exit when the argmax is unchanged for this many steps (reference: 5)
    min_steps: int = 0  # no exit check (and no state update) in the first min_steps recurrences, as the reference
    # --- test-time restarts (sudoku, beyond the paper) ---
    restarts: int = 1  # K: trajectories per puzzle, each from its own s_0, the answer picked by the model's confidence
    restart_noise: float = 0.0  # σ: s <- s + σ·std(s)·ε before every recurrence of trajectories 2..K


GPU_CONFIG = dict(steps=20000, batch_size=256, lr=5e-4, warmup_steps=500, difficulty="hard", d_model=384, n_heads=6,
                  d_mlp=1024, n_prelude=2, n_core=4, n_coda=2, mean_recurrence=16, backprop_depth=8,
                  eval_steps=(1, 2, 4, 8, 16, 32, 64))

# ----------------------------------------------------------------------------- model pieces


class RMSNorm(nn.Module):
    """RMSNorm with eps 1e-6, computed in float32 as in the reference."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight).type_as(x)


def rope_tables(head_dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim / 2), base 50,000 as the reference."""
    inv_freq = 50000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, hd) by positions given as cos/sin (T, hd/2): pair j = dims (j, j + hd/2), frequency j."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention, no biases except the learned per-head q/k bias."""

    def __init__(self, config: Config):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, self.n_heads, 1, self.head_dim))
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, rope, causal: bool, kv=None):
        """x (B, T, D); rope = (cos, sin) of x's positions; kv: a RecurrentKVCache callback (generation only)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        q, k = apply_rope(q + self.qk_bias[0], *rope), apply_rope(k + self.qk_bias[1], *rope)
        mask = None
        if kv is not None:  # cached decoding: keys/values of all positions so far, (B, H, T_all, hd)
            k, v, mask = kv(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and kv is None)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class GatedMLP(nn.Module):
    """proj(silu(x W1) * x W2), one fused input projection as in the reference."""

    def __init__(self, config: Config):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 2 * config.d_mlp, bias=False)
        self.proj = nn.Linear(config.d_mlp, config.d_model, bias=False)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)  # 2 x (B, T, d_mlp)
        return self.proj(F.silu(gate) * up)


class SandwichBlock(nn.Module):
    """x = n2(x + attn(n1(x))); x = n4(x + mlp(n3(x)))  (four RMSNorms per block)."""

    def __init__(self, config: Config):
        super().__init__()
        self.n1, self.n2, self.n3, self.n4 = (RMSNorm(config.d_model) for _ in range(4))
        self.attn = Attention(config)
        self.mlp = GatedMLP(config)

    def forward(self, x, rope, causal: bool, kv=None):
        x = self.n2(x + self.attn(self.n1(x), rope, causal, kv))
        return self.n4(x + self.mlp(self.n3(x)))


def takase_init(model: nn.Module, d_model: int, l_eff: float):
    """'takase' init: TruncNormal(std sqrt(2/(5h))) cut at 3 std; output projections std / sqrt(2 L_eff)."""
    std = math.sqrt(2 / (5 * d_model))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            s = std / math.sqrt(2 * l_eff) if name.endswith("proj.weight") else std
            nn.init.trunc_normal_(p, std=s, a=-3 * s, b=3 * s)


def example_generators(batch: dict, device) -> list | None:
    """One generator per example, seeded by batch["example_seed"] (B,): an example's noise does not depend on its
    batch, so torchrun ranks holding slices draw what one process draws. None for a batch without seeds."""
    if "example_seed" not in batch:
        return None
    return [torch.Generator(device).manual_seed(seed) for seed in batch["example_seed"].tolist()]


def example_noise(draw, shape, generators, device) -> torch.Tensor:
    """draw (torch.rand or torch.randn) of `shape`: row b from generators[b] (a list), else from one (None: global)."""
    if isinstance(generators, list):
        return torch.stack([draw(shape[1:], generator=g, device=device) for g in generators])
    return draw(shape, generator=generators, device=device)


class TiedEmbedding(nn.Module):
    """Shared by both models: the input sqrt(h)·embed(x) (+ grid embedding), RoPE tables, head(x) = norm(x) Wᵀ."""

    def __init__(self, config: Config, vocab_size: int, max_len: int, grid: bool):
        super().__init__()
        self.config, self.vocab_size, self.max_len = config, vocab_size, max_len
        self.wte = nn.Embedding(vocab_size, config.d_model)
        self.grid_emb = nn.Embedding(27, config.d_model) if grid else None  # rows, columns, boxes in one table
        if grid:  # the row (0-8), column (9-17) and 3x3 box (18-26) of every cell: (81, 3)
            cell = torch.arange(81)
            ids = torch.stack([cell // 9, 9 + cell % 9, 18 + cell // 27 * 3 + cell % 9 // 3], -1)
            self.register_buffer("grid_ids", ids, persistent=False)
        cos, sin = rope_tables(config.d_model // config.n_heads, max_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope(self, start: int, end: int):
        return self.rope_cos[start:end], self.rope_sin[start:end]

    def tokens(self, idx):
        """sqrt(h) * embed(x) (+ the row, column and box embeddings of each cell): (B, T) -> (B, T, D)."""
        x = self.wte(idx)
        if self.grid_emb is not None:
            x = x + self.grid_emb(self.grid_ids).sum(1)  # (81, D) broadcast over the batch
        return x * math.sqrt(self.config.d_model)

    def head(self, x):
        return F.linear(self.ln_f(x), self.wte.weight)


class RecurrentDepthModel(TiedEmbedding):
    """Prelude P -> recurrent core R (input injection by A) -> coda C; forward() is one recurrence (compiled)."""

    def __init__(self, config: Config, vocab_size: int, max_len: int, causal: bool, grid: bool):
        super().__init__(config, vocab_size, max_len, grid)
        self.causal, h = causal, config.d_model
        self.prelude = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_prelude))
        self.adapter = nn.Linear(2 * h, h, bias=False)  # A: cat([s, e]) -> s, state first
        self.core = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_core))
        self.coda = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_coda))
        self.ln_f = RMSNorm(h)  # used twice: before and after the coda
        takase_init(self, h, config.n_prelude + config.n_coda + config.n_core * config.mean_recurrence)  # L_eff

    def embed(self, idx, rope, cache: RecurrentKVCache | None = None):
        """e = P(sqrt(h) * embed(x)): (B, T) -> (B, T, D)."""
        x = self.tokens(idx)
        for j, block in enumerate(self.prelude):
            x = block(x, rope, self.causal, cache.layer(cache.prelude[j]) if cache else None)
        return x

    def init_state(self, e, scale: float = 1.0, generator: torch.Generator | list | None = None):
        """s_0 ~ TruncNormal(0, sqrt(2/5) * scale) cut at 3 std, by inverse-CDF sampling (trunc_normal_'s method
        without its graph-breaking .item()); scale 0 gives the zero state; generator(s): see example_noise."""
        cdf_lo = 0.5 * (1 + math.erf(-3 / math.sqrt(2)))  # Phi(-3)
        u = example_noise(torch.rand, e.shape, generator, e.device) * (1 - 2 * cdf_lo) + cdf_lo
        return (math.sqrt(2) * torch.erfinv(2 * u - 1) * math.sqrt(2 / 5) * scale).to(e.dtype)  # (B, T, D)

    def forward(self, s, e, rope, kv=None):
        """One recurrence s_i = R(A([s_{i-1}, e])): (B, T, D) -> (B, T, D); kv: one cache callback per core layer."""
        x = self.adapter(torch.cat([s, e], dim=-1))
        for block, layer_kv in zip(self.core, kv or [None] * len(self.core)):
            x = block(x, rope, self.causal, layer_kv)
        return x

    def readout(self, s, rope, cache: RecurrentKVCache | None = None):
        """logits = head(norm(C(norm(s)))), head tied to the embedding: (B, T, D) -> (B, T, V)."""
        x = self.ln_f(s)
        for j, block in enumerate(self.coda):
            x = block(x, rope, self.causal, cache.layer(cache.coda[j]) if cache else None)
        return self.head(x)


class PlainTransformer(TiedEmbedding):
    """Control (Sudoku): L = l_P + l_R * mean_depth + l_C distinct blocks (the unrolled depth at the sampler's mean),
    the same embedding and head, no latent state or injection: its depth is fixed, it cannot think longer."""

    def __init__(self, config: Config, vocab_size: int, max_len: int, grid: bool):
        super().__init__(config, vocab_size, max_len, grid)
        depth = config.n_prelude + config.n_core * mean_depth(config) + config.n_coda
        self.layers = nn.ModuleList(SandwichBlock(config) for _ in range(depth))
        self.ln_f = RMSNorm(config.d_model)
        takase_init(self, config.d_model, depth)

    def forward(self, idx):
        """(B, T) tokens -> (B, T, V) logits."""
        x, rope = self.tokens(idx), self.rope(0, idx.shape[1])
        for block in self.layers:
            x = block(x, rope, False)
        return self.head(x)


def check_config(config: Config):
    """Raise ValueError naming the first invalid field."""
    if config.d_model % config.n_heads or (config.d_model // config.n_heads) % 2:
        raise ValueError(f"d_model ({config.d_model}) must split into n_heads ({config.n_heads}) even head dims")
    if min(config.n_prelude, config.n_core, config.n_coda, config.mean_recurrence, config.backprop_depth) < 1:
        raise ValueError("n_prelude, n_core, n_coda, mean_recurrence and backprop_depth must all be >= 1")
    if config.exit_criterion not in EXIT_CRITERIA:
        raise ValueError(f"exit_criterion must be one of {EXIT_CRITERIA}, got {config.exit_criterion!r}")
    if config.stable_steps < 1 or config.min_steps < 0:
        raise ValueError(f"stable_steps must be >= 1 and min_steps >= 0, got {config.stable_steps}, {config.min_steps}")
    difficulties = (*sudoku_data.DIFFICULTIES, *sudoku_data.TRAINING_MIXES)
    if config.difficulty not in difficulties:
        raise ValueError(f"difficulty must be one of {', '.join(difficulties)}, got {config.difficulty!r}")
    if not config.eval_steps or min(config.eval_steps) < 1:
        raise ValueError("eval_steps must be a non-empty tuple of positive ints")
    if config.restarts < 1 or not (config.restart_noise >= 0.0 and math.isfinite(config.restart_noise)):
        raise ValueError(f"restarts must be >= 1 and restart_noise a finite number >= 0, got {config.restarts} and "
                         f"{config.restart_noise}")


def build_model(config: Config, task) -> nn.Module:
    """Validate the config and build the model for `task` (sudoku: bidirectional; text: causal)."""
    if task.name not in TASKS:
        raise ValueError(f"recurrent_depth supports tasks {TASKS}, not {task.name!r}")
    check_config(config)
    if config.plain_transformer:  # no recurrence: no fixed count to train at, no s_0 to restart from
        if task.name != "sudoku" or config.fixed_recurrence or config.restarts > 1:
            raise ValueError("plain_transformer is a control for the Sudoku task only, with neither "
                             "fixed_recurrence nor restarts")
        return PlainTransformer(config, task.vocab_size, task.seq_len, grid=True)
    sudoku = task.name == "sudoku"
    return RecurrentDepthModel(config, task.vocab_size, task.seq_len, causal=not sudoku, grid=sudoku)


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on tensors of 2 or more dims (embeddings, projections, the 4-D q/k bias), none on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


# ----------------------------------------------------------------------------- the paper's loss


def sample_recurrence(step: int, config: Config) -> tuple[int, int]:
    """Log-normal Poisson draw of the recurrence count p (the reference's randomized_iteration_sampler), seeded by
    the step: n = max(p - k, 0) steps without gradient, k' = min(k, p) with. The fixed-depth control takes p =
    mean_depth at every step."""
    k = config.backprop_depth
    if config.fixed_recurrence:
        p = mean_depth(config)
        return max(p - k, 0), min(k, p)
    g = torch.Generator().manual_seed(step)
    sigma = 0.5
    mu = math.log(max(config.mean_recurrence - k, 0) + k) - sigma**2 / 2  # mu = log(r_mean) - sigma^2 / 2
    rate = torch.exp(mu + sigma * torch.randn(1, generator=g))  # rate ~ LogNormal(mu, sigma)
    p = int(torch.poisson(rate, generator=g).item()) + 1  # p = Poisson(rate) + 1
    return max(p - k, 0), min(k, p)


def mean_depth(config: Config) -> int:
    """E[p] = E[rate] + 1 = max(r_mean, k) + 1: the sampled count's mean, the depth of both controls."""
    return max(config.mean_recurrence, config.backprop_depth) + 1


def inputs_and_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sudoku: puzzle -> solution for all 81 cells. Text: next-character prediction."""
    if "puzzle" in batch:
        return batch["puzzle"], batch["solution"]
    return batch["tokens"][:, :-1], batch["tokens"][:, 1:]


def recurrent_loss(model, batch: dict, num_steps: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """L = CE(head(norm(C(norm(s_r)))), y): plain cross-entropy on the coda output after r = n + k recurrences
    (the first n without a graph), no intermediate loss. Returns (L, {"recurrence": r}); the plain-transformer
    control ignores num_steps."""
    inputs, targets = inputs_and_targets(batch)
    if isinstance(model, PlainTransformer):
        logits, recurrence = model(inputs), 0
    else:
        n, k = num_steps
        logits = think(model, inputs, n + k, no_grad_steps=n, generator=example_generators(batch, inputs.device)).logits
        recurrence = n + k
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # (B, T, V) against (B, T)
    return loss, {"recurrence": torch.tensor(float(recurrence))}


# ----------------------------------------------------------------------------- the thinking loop and its exit rules


class ExitRule:
    """The reference's exit evaluators (recpre/raven_modeling_minimal.py), fed each recurrence by `think`, p_i the
    output distribution after recurrence i. A row (a puzzle, a token's batch row) stops when every position passes,
    from recurrence min_steps + 1 on; steps_used (B,): the recurrence each row stopped at (else the budget)."""

    def __init__(self, criterion: str, threshold: float, min_steps: int = 0):
        if criterion not in EXIT_CRITERIA:
            raise ValueError(f"exit_criterion must be one of {EXIT_CRITERIA}, got {criterion!r}")
        self.criterion, self.threshold, self.min_steps = criterion, threshold, min_steps
        self.reads_distribution = criterion in READS_DISTRIBUTION

    @classmethod
    def from_config(cls, config: Config, criterion: str | None = None, min_steps: int | None = None) -> ExitRule:
        """The rule `criterion` (default: the config's) with the config's threshold for it."""
        criterion = config.exit_criterion if criterion is None else criterion
        threshold = {"none": math.inf, "kl": config.kl_threshold, "latent-diff": config.latent_threshold,
                     "entropy-diff": config.entropy_threshold, "argmax-stability": config.stable_steps}[criterion]
        return cls(criterion, threshold, config.min_steps if min_steps is None else min_steps)

    def start(self, s0, budget: int):
        """A new batch from the states s_0 (B, T, D), at most `budget` recurrences."""
        self.s_prev, self.log_p, self.entropy, self.answer = s0, None, None, None
        self.unchanged = torch.zeros(s0.shape[0], dtype=torch.long, device=s0.device)  # steps with the same argmax
        self.running = torch.ones(s0.shape[0], dtype=torch.bool, device=s0.device)
        self.steps_used = torch.full((s0.shape[0],), budget, dtype=torch.long, device=s0.device)

    def update(self, step: int, s, log_p=None):
        """Feed recurrence `step` (1-based): the states s_i (B, T, D) and, when reads_distribution, log p_i
        (B, T, V). Rows that pass stop at this step."""
        if step <= self.min_steps:  # the reference: neither a check nor a state update before min_steps (0-based)
            return
        if self.criterion == "kl":
            previous = torch.full_like(log_p, -math.log(log_p.shape[-1])) if self.log_p is None else self.log_p
            kl = (previous.exp() * (previous - log_p)).sum(-1)  # KL(p_{i-1} || p_i), p_0 uniform: (B, T)
            passed = kl.amax(-1) < self.threshold
            self.log_p = log_p
        elif self.criterion == "latent-diff":
            change = (s - self.s_prev).float().norm(dim=-1) / s.float().norm(dim=-1).clamp(min=1e-12)  # ||Δs||/||s_i||
            passed = change.amax(-1) < self.threshold
        elif self.criterion == "entropy-diff":
            entropy = -(log_p.exp() * log_p).sum(-1)  # H(p_i): (B, T)
            previous = 100.0 if self.entropy is None else self.entropy  # H_0 = 100 (the reference's start)
            passed = (entropy - previous).abs().amax(-1) < self.threshold  # |H(p_i) - H(p_{i-1})|
            self.entropy = entropy
        elif self.criterion == "argmax-stability":
            answer = log_p.argmax(-1)  # (B, T): unchanged for `threshold` recurrences
            same = (answer == self.answer).all(-1) if self.answer is not None else torch.zeros_like(self.running)
            self.unchanged = torch.where(same, self.unchanged + 1, 0)
            self.answer, passed = answer, self.unchanged >= self.threshold
        else:  # "none"
            passed = torch.zeros_like(self.running)
        self.s_prev = s
        stop = self.running & passed
        self.steps_used[stop] = step
        self.running &= ~stop


@dataclass
class Thought:
    logits: torch.Tensor  # (B, T, V) from the final states (a row that stopped is frozen at its exit)
    state: torch.Tensor  # (B, T, D) the final latent states
    steps_used: torch.Tensor  # (B,) recurrences each row ran
    recorded: dict  # {step: log p (B, T, V)} at the steps asked for


def think(model, idx, thinking_steps: int, rules=(), record=(), state=None, generator=None, init_scale: float = 1.0,
          no_grad_steps: int = 0, restarts: int = 1, noise: float = 0.0, cache=None) -> Thought:
    """The thinking loop, which training, evaluation, restarts, adaptive exits, generation and trajectories run:
    e = P(x), s_0 (`state`, or drawn at init_scale), s_i = R(A([s_{i-1}, e])) for i = 1..thinking_steps, readout.
    rules: ExitRules; a row recurs while a rule still runs it or a step in `record` (whose log p is kept) is
    ahead, and is frozen after. no_grad_steps: the first n recurrences run without a graph (truncated backprop).
    restarts K: row k*B + b is trajectory k of puzzle b; trajectories 2..K get s <- s + σ·std(s)·ε before every
    recurrence (σ = noise). cache: the RecurrentKVCache that the new tokens extend (generation)."""
    idx = idx.repeat(restarts, 1)  # (K*B, T)
    B, T = idx.shape
    start = 0 if cache is None else cache.advance(T)
    rope = model.rope(start, start + T)
    e = model.embed(idx, rope, cache)  # e = P(sqrt(h) embed(x)): (B, T, D)
    s = model.init_state(e, init_scale, generator) if state is None else state  # s_0
    for rule in rules:
        rule.start(s, thinking_steps)
    noisy = (torch.arange(B, device=idx.device) >= B // restarts)[:, None, None]  # all but trajectory 1
    steps_used = torch.zeros(B, dtype=torch.long, device=idx.device)
    recorded, logits, grad = {}, None, torch.is_grad_enabled()
    for i in range(1, thinking_steps + 1):
        moving = torch.ones(B, dtype=torch.bool, device=idx.device)
        if rules:
            moving = torch.stack([rule.running for rule in rules]).any(0) | (i <= max(record, default=0))
            if not moving.any():
                break
        if noise:
            kick = noise * s.float().std(-1, keepdim=True) * example_noise(torch.randn, s.shape, generator, s.device)
            s = torch.where(noisy, s + kick.to(s.dtype), s)
        steps_used += moving
        if cache is not None:
            cache.steps_done[:, start : start + T] = steps_used[:, None]
        kv = None if cache is None else [cache.layer(cache.core[j], i - 1) for j in range(len(cache.core))]
        with torch.set_grad_enabled(grad and i > no_grad_steps):
            s_new = model(s, e, rope, kv)  # s_i = R(A([s_{i-1}, e]))
        s = torch.where(moving[:, None, None], s_new, s).to(s_new.dtype) if rules else s_new  # stopped rows frozen
        logits = log_p = None
        if i in record or any(rule.reads_distribution for rule in rules):
            logits = model.readout(s, rope, cache).float()  # (B, T, V)
            log_p = F.log_softmax(logits, -1)  # log p_i
        if i in record:
            recorded[i] = log_p
        for rule in rules:
            rule.update(i, s, log_p)
    if logits is None:  # not read out at the last step yet
        logits = model.readout(s, rope, cache).float()
    return Thought(logits, s, steps_used, recorded)


# ----------------------------------------------------------------------------- training step and evaluation


def train_step(model, optimizer, scaler, batch: dict, step: int, config: Config, autocast_dtype) -> dict:
    """One optimizer step with a freshly sampled recurrence count (n no-grad steps + k grad steps)."""
    model.train()
    n_no_grad, k_grad = sample_recurrence(step, config)
    device = next(iter(batch.values())).device
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss, metrics = recurrent_loss(model, batch, (n_no_grad, k_grad))
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), **metrics}


def digits(log_p):
    """Most likely digit 1..9 per cell (token 0 = blank is never predicted): (..., 81, V) -> (..., 81)."""
    return log_p[..., 1:].argmax(-1) + 1


def adaptive_rows(config: Config) -> list[tuple[str, str, int]]:
    """(row name, criterion, min_steps) of the table's exit rules: the config's first, then the others, then the
    config's (kl if none) with no exit before r_mean."""
    first = config.exit_criterion
    rows = [(f"adaptive ({c})", c, config.min_steps) for c in dict.fromkeys((first, *EXIT_CRITERIA[1:])) if c != "none"]
    if config.min_steps < config.mean_recurrence:
        criterion = "kl" if first == "none" else first
        rows.append((f"adaptive ({criterion}, min_steps {config.mean_recurrence})", criterion, config.mean_recurrence))
    return rows


def test_time_flops(config: Config, vocab_size: int, recurrences: float, restarts: int = 1, readouts: float = 1,
                    cells: int = 81) -> float:
    """Matrix-product FLOPs per puzzle at test time (train.py's convention): per trajectory the prelude, r (maybe a
    mean) recurrences and `readouts` coda passes (about r for a rule that reads p_i), times K. Plain: whatever r."""
    h, m, T = config.d_model, config.d_mlp, cells
    block = 2 * T * h * (3 * h + h + 2 * m) + 2 * T * m * h + 2 * 2 * T * T * h  # qkv, out, MLP in/out; Q·Kᵀ, P·V
    head = 2 * T * h * vocab_size
    if config.plain_transformer:
        return (config.n_prelude + config.n_core * mean_depth(config) + config.n_coda) * block + head
    core_step = 2 * T * (2 * h) * h + config.n_core * block  # A([s, e]), then l_R blocks
    readout = config.n_coda * block + head
    return restarts * (config.n_prelude * block + recurrences * core_step + readouts * readout)


def sudoku_answers(model, puzzle, config: Config, eval_steps, generator, restart_generator) -> dict:
    """{(thinking steps, picked by): (answers (B, 81), recurrences used (B,))}: from one pass, a row per fixed count
    and per exit rule (the answer where it stops); with restarts, the picks of confidence and an oracle verifier."""
    B, every = puzzle.shape[0], torch.arange(puzzle.shape[0], device=puzzle.device)
    if isinstance(model, PlainTransformer):
        return {(mean_depth(config), None): (digits(model(puzzle)), torch.full((B,), mean_depth(config)))}
    budget = max(eval_steps)
    rules = {name: ExitRule.from_config(config, criterion, min_steps) for name, criterion, min_steps in
             adaptive_rows(config)}
    thought = think(model, puzzle, budget, rules.values(), record=range(1, budget + 1), generator=generator)
    answers = {(r, None): (digits(thought.recorded[r]), torch.full((B,), r)) for r in eval_steps}
    every_step = torch.stack([digits(thought.recorded[i]) for i in range(1, budget + 1)])  # (budget, B, 81)
    for name, rule in rules.items():
        answers[name, None] = every_step[rule.steps_used - 1, every], rule.steps_used
    if config.restarts > 1:
        K = config.restarts
        thought = think(model, puzzle, budget, record=eval_steps, generator=restart_generator, restarts=K,
                        noise=config.restart_noise)
        for r in eval_steps:
            log_p = thought.recorded[r].view(K, B, *puzzle.shape[1:], -1)  # (K, B, 81, V)
            grids, best = digits(log_p), pick_by_confidence(log_p, puzzle)  # (K, B, 81), (B,)
            answers[r, "confidence"] = grids[best, every], torch.full((B,), r)
            answers[r, "oracle verifier"] = grids[oracle_verifier_pick(grids, puzzle, best), every], torch.full((B,), r)
    return answers


def _evaluate_sudoku(model, task, config: Config, eval_steps) -> list[dict]:
    device, rows = model.wte.weight.device, []
    reads_p = {name for name, criterion, _ in adaptive_rows(config) if criterion in READS_DISTRIBUTION}
    for set_name, data in task.test_sets.items():
        generators = torch.Generator(device).manual_seed(0), torch.Generator(device).manual_seed(1)  # s_0; restarts
        chunks = []
        for i in range(0, data["puzzle"].shape[0], 4 * config.batch_size):
            answers = sudoku_answers(model, data["puzzle"][i : i + 4 * config.batch_size].to(device), config,
                                     eval_steps, *generators)
            chunks.append({key: (pred.cpu(), used.float().cpu()) for key, (pred, used) in answers.items()})
        puzzle, solution = data["puzzle"], data["solution"]
        for steps, picked_by in chunks[0]:
            pred = torch.cat([chunk[steps, picked_by][0] for chunk in chunks])
            used = torch.cat([chunk[steps, picked_by][1] for chunk in chunks]).mean().item()
            K = config.restarts if picked_by else 1
            flops = test_time_flops(config, model.vocab_size, used, K, used if steps in reads_p else 1, puzzle.shape[1])
            rows.append({"test set": set_name, "thinking steps": steps, "mean steps used": round(used, 2),
                         "exact %": sudoku_data.exact_accuracy(pred, solution),
                         "blank-cell %": sudoku_data.blank_accuracy(pred, puzzle, solution),
                         "test-time MFLOP per puzzle": flops / 1e6,
                         **({"restarts": K, "picked by": picked_by} if picked_by else {})})
    return rows


@torch.no_grad()
def evaluate(model, task, config: Config, eval_steps: tuple[int, ...], autocast_dtype) -> list[dict]:
    """Sudoku: exact and blank-cell % per count and exit rule (`sudoku_answers`); text: bits per character."""
    model.eval()
    device, rows = model.wte.weight.device, []
    try:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if task.name == "sudoku":
                return _evaluate_sudoku(model, task, config, eval_steps)
            for set_name, data in task.test_sets.items():
                for r in eval_steps:
                    g, total, count = torch.Generator(device).manual_seed(0), 0.0, 0
                    for i in range(0, data["tokens"].shape[0], config.batch_size):
                        x, y = inputs_and_targets({"tokens": data["tokens"][i : i + config.batch_size].to(device)})
                        logits = think(model, x, r, generator=g).logits
                        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                        count += y.numel()
                    rows.append({"test set": set_name, "thinking steps": r, "loss": total / count,
                                 "bits/char": total / count / math.log(2)})
        return rows
    finally:
        model.train()


# ================================== beyond the paper: restarts, KV-cache generation, speculative decoding


def pick_by_confidence(log_p, puzzle) -> torch.Tensor:
    """Restarts (after EqR's and PTRM's noisy recursions) pick by the model's own signal, no rule of Sudoku: log_p
    (K, B, 81, V), puzzle (B, 81) -> (B,) the trajectory of highest Σ_{blank i} max_d log p_{i,d}, first on ties."""
    return (log_p[..., 1:].amax(-1) * (puzzle == 0)).sum(-1).argmax(0)


def oracle_verifier_pick(grids, puzzle, fallback) -> torch.Tensor:
    """ORACLE VERIFIER, the ceiling of the K trajectories, not the method: grids (K, B, 81), puzzle (B, 81) -> (B,)
    the first trajectory whose grid keeps the givens and breaks no rule of Sudoku, else fallback (B,)."""
    K, B, cells = grids.shape
    valid = ((grids == puzzle) | (puzzle == 0)).all(-1)  # (K, B) givens kept
    valid &= sudoku_data.broken_constraints(grids.reshape(K * B, cells)).view(K, B) == 0
    return torch.where(valid.any(0), valid.int().argmax(0), fallback)


class RecurrentKVCache:
    """KV cache for generation: one slot per prelude layer, per (core layer, recurrence), per coda layer. A token
    that exited early has fewer core steps (`steps_done`); a query at step i reads each earlier token's entry of
    the same core layer at step min(i, steps_done - 1), the reference's "latest-m4" policy."""

    def __init__(self, model: RecurrentDepthModel, batch: int, max_len: int, thinking_steps: int):
        if not getattr(model, "causal", False) or max_len > model.max_len:
            raise ValueError(f"generation needs the causal (text) model and at most {model.max_len} tokens")
        p, config = next(model.parameters()), model.config
        shape = (2, batch, config.n_heads, max_len, config.d_model // config.n_heads)  # (k|v, B, H, T, hd)
        self.prelude = p.new_zeros(len(model.prelude), 1, *shape)  # (layer, step, k|v, B, H, T, hd)
        self.core = p.new_zeros(len(model.core), thinking_steps, *shape)
        self.coda = p.new_zeros(len(model.coda), 1, *shape)
        self.steps_done = torch.zeros(batch, max_len, dtype=torch.long, device=p.device)  # (B, T)
        self.start = self.end = 0  # positions [start, end) are being processed

    def advance(self, n_new: int) -> int:
        """Open positions [end, end + n_new) for the next forward pass; returns their start."""
        self.start, self.end = self.end, self.end + n_new
        return self.start

    def rewind(self, position: int):
        """Forget positions >= position (their entries are overwritten by the next pass)."""
        self.start = self.end = position

    def layer(self, store: torch.Tensor, step: int = 0):
        """Attention's callback for a layer's store (steps, k|v, B, H, T, hd) at `step` (see Attention.forward)."""

        def update(k, v):
            store[step, :, :, :, self.start : self.end] = torch.stack([k, v])
            B, T = self.steps_done.shape[0], self.end
            slot = (self.steps_done[:, :T] - 1).clamp(0, step)  # (B, T) latest cached step <= step
            rows, cols = torch.arange(B, device=slot.device)[:, None], torch.arange(T, device=slot.device)[None, :]
            keys, values = store[slot, :, rows, :, cols].permute(2, 0, 3, 1, 4)  # (B, T, 2, H, hd) -> 2x(B, H, T, hd)
            q_pos = torch.arange(self.start, self.end, device=slot.device)
            mask = None if len(q_pos) == 1 else torch.arange(T, device=slot.device)[None, :] <= q_pos[:, None]
            return keys.to(k.dtype), values.to(v.dtype), mask

        return update


@torch.no_grad()
def generate(model, prompt, max_new_tokens: int, thinking_steps: int | None = None, exit_criterion: str | None = None,
             continuous_cot: bool = True, init_scale: float = 1.0):
    """Greedy decoding with a KV cache and per-token exit; with continuous_cot, a token's s_0 is the previous
    token's last state. The prompt is prefilled without exit. Returns the tokens and {"mean steps": recurrences
    per token and row, "batch steps": recurrences the batch ran per token (exited rows wait)}."""
    thinking_steps = thinking_steps or model.config.mean_recurrence
    cache = RecurrentKVCache(model, prompt.shape[0], prompt.shape[1] + max_new_tokens, thinking_steps)
    thought = think(model, prompt, thinking_steps, init_scale=init_scale, cache=cache)
    tokens, steps = [prompt], []
    for t in range(max_new_tokens):
        nxt = thought.logits[:, -1:].argmax(-1)  # greedy: (B, 1)
        tokens.append(nxt)
        if t + 1 < max_new_tokens:
            state = thought.state[:, -1:] if continuous_cot else None  # continuous CoT warm start
            rule = ExitRule.from_config(model.config, exit_criterion)
            thought = think(model, nxt, thinking_steps, [rule], state=state, init_scale=init_scale, cache=cache)
            steps.append(thought.steps_used.float())
    used = torch.stack(steps) if steps else torch.full((1, 1), float(thinking_steps))  # (tokens, B)
    return torch.cat(tokens, dim=1), {"mean steps": used.mean().item(), "batch steps": used.amax(1).mean().item()}


@torch.no_grad()
def generate_speculative(model, prompt, max_new_tokens: int, draft_steps: int = 4, verify_steps: int | None = None,
                         lookahead: int = 4, init_scale: float = 0.0):
    """Self-speculative greedy decoding: each round drafts `lookahead` tokens with draft_steps recurrences, verifies
    them in one pass of verify_steps over the shared KV cache and keeps the agreeing prefix (the shortest of the
    batch) plus the verifier's next token: the output of generate(verify_steps, "none", continuous_cot=False) from
    the same s_0. Returns it and {"accepted": drafts accepted, "sequential steps": recurrences in turn per token}."""
    verify_steps = verify_steps or model.config.mean_recurrence
    if not 1 <= draft_steps <= verify_steps or lookahead < 1:
        raise ValueError(f"need 1 <= draft_steps ({draft_steps}) <= verify_steps ({verify_steps}), lookahead >= 1")
    cache = RecurrentKVCache(model, prompt.shape[0], prompt.shape[1] + max_new_tokens, verify_steps)
    logits = think(model, prompt, verify_steps, init_scale=init_scale, cache=cache).logits
    tokens = [prompt, logits[:, -1:].argmax(-1)]  # the last token is pending: not yet in the cache
    new, drafted, accepted, passes = 1, 0, 0, 0
    while new < max_new_tokens:
        start, count = cache.end, min(lookahead, max_new_tokens - new)
        draft = [tokens[-1][:, -1:]]
        for _ in range(count):  # draft: one token at a time with few recurrences
            logits = think(model, draft[-1], draft_steps, init_scale=init_scale, cache=cache).logits
            draft.append(logits[:, -1:].argmax(-1))
        cache.rewind(start)  # verify: the pending token and all but the last draft in one pass
        logits = think(model, torch.cat(draft[:-1], 1), verify_steps, init_scale=init_scale, cache=cache).logits
        verified = logits.argmax(-1)  # (B, count): the greedy token after each input
        agree = int((verified == torch.cat(draft[1:], 1)).cumprod(1).sum(1).min())  # longest agreeing prefix
        keep = min(agree + 1, count)  # the agreeing drafts, then the verifier's correction
        tokens.append(verified[:, :keep])
        cache.rewind(start + keep)  # inputs up to start + keep - 1 were correct; the last kept token is pending
        new, drafted, accepted, passes = new + keep, drafted + count, accepted + min(agree, count), passes + 1
    sequential = (drafted * draft_steps + passes * verify_steps) / max(new - 1, 1)  # token 1 is the prefill's
    return torch.cat(tokens, dim=1), {"accepted": accepted / max(drafted, 1), "sequential steps": sequential}


if __name__ == "__main__":  # a tiny causal model memorises a string in seconds, then generates with per-token exit
    from types import SimpleNamespace

    text = "the cat sat on the mat. " * 8
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    config = Config(d_model=64, d_mlp=128, mean_recurrence=4, backprop_depth=2, lr=3e-3)
    torch.manual_seed(0)
    model = build_model(config, SimpleNamespace(name="text", vocab_size=len(chars), seq_len=64))
    optimizer, scaler = make_optimizer(model, config), torch.amp.GradScaler(enabled=False)
    for step in range(150):
        batch = {"tokens": torch.stack([data[s : s + 33] for s in torch.randint(0, len(data) - 33, (16,))])}
        train_step(model, optimizer, scaler, batch, step, config, None)
    out, stats = generate(model.eval(), data[None, :8], 40, thinking_steps=8)
    print(repr("".join(chars[i] for i in out[0].tolist())), f"mean recurrences per token {stats['mean steps']:.2f} / 8")
