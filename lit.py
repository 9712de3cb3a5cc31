"""Latent Imagination Thinking (LIT) on Sudoku, in language and visual (MNIST) form.

Paper: "Latent Imagination Thinking: Beyond Recursive Models for Reasoning", ICLR 2026 Workshop on World Models
(openreview SYVmt9mFEm). Only the abstract is public (no paper text, no code), so the equations are our reading of
it in world-model terms: Dreamer's posterior/prior pair, the "observation" being privileged information (hints).

Idea: tokens and pixels are partial observations, not the language of thought. The model keeps a latent *belief*
b_t, one vector per Sudoku cell (81 x d), and thinks by updating it with a weight-tied transformer U over the cells,
once per thinking step; between steps the belief never passes through token or pixel space. An encoder E embeds
observations (digit tokens, or cell images through a small CNN); a decoder D reads digits out of a belief. A teacher
(posterior) takes each step with extra observations of the answer; a student (prior) learns to imagine its steps.
  student (prior):      b^S_{t+1} = U_S(b^S_t, E(puzzle))
  teacher (posterior):  b^T_{t+1} = U_T(b^S_t, E(puzzle ⊕ hints_t)),   θ_T ← d·θ_T + (1 − d)·θ_S after every update
      hints_t: the solution cells whose random rank is below t / (T − 1), entered as extra givens (⊕)
  L = Σ_t [ CE(D(b^S_{t+1}), y) + β·||b^S_{t+1} − sg(b^T_{t+1})||² ] / T
      (deep supervision at every step; `stochastic`: Gaussian beliefs and β·KL(sg(q_T) || p_S))
At test time only the student runs, for any number of thinking steps; accuracy against steps is the result.
Controls at equal training FLOPs: `no_imagination` (β = 0, no teacher) and `recursion="observation"` (only decoded
digits pass between steps: b_{t+1} = U(R·softmax(D(b_t)), E(puzzle))).

Choices the abstract leaves open, and deviations (one line each):
- The teacher is the student's own network reading the hints as givens, its weights an EMA of the student's (decay
  d = ema_teacher; d = 0: U_S itself), not a second trained network, which would double a step's cost.
- The teacher steps from the student's belief on the first teacher_share of each batch (its cost per step).
- The default d = 0 and β = 0.1: an average of the recipe's decay 0.999 spans more steps than the default's run.
- Attention in U only between Sudoku peers (same row, column or box: the recurrent relational network's graph).
- Truncated backprop: the state is detached between supervised segments of segment_steps steps (TRM's supervision).
- Beliefs are RMS-normalised after each update, so a student rolled for many steps stays bounded.
Beyond the paper (the last section): test-time restarts, TRM's halting head, an oracle verifier.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import sudoku_data

TASKS = ("sudoku", "visual")
N_CELLS, N_DIGITS = 81, 9
BETAS, WEIGHT_DECAY = (0.9, 0.95), 0.1  # AdamW; weight decay on matrices only
MIN_STD = 0.1                            # floor on a stochastic belief's std
N_SAMPLES = 8                            # stochastic: student samples per multi-solution puzzle in evaluate()


@dataclass
class Config:
    # 377 LIT steps train the FLOPs of 408 steps without a teacher (--no-imagination) and of 406 in observation
    # space: the three compare at equal training compute
    steps: int = 377
    batch_size: int = 32
    lr: float = 2e-3                     # peak learning rate (AdamW)
    warmup_steps: int = 50
    grad_clip: float = 1.0               # max global gradient norm
    difficulty: str = "easy"             # training base set: easy|medium|hard|extreme, or a mix: mixed|harder
    eval_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # test-time thinking steps in the table
    d_model: int = 64                    # belief width d per cell
    n_heads: int = 4                     # attention heads in U
    n_layers: int = 2                    # transformer blocks in U (applied once per thinking step)
    train_thinking_steps: int = 6        # T: thinking steps per training example; hints reach the solution at the last
    segment_steps: int = 1               # thinking steps per supervised segment: backprop through all, loss at its end
    imagination_weight: float = 0.1      # β in L
    ema_teacher: float = 0.0             # d: the teacher's weights are the student's under an EMA of this decay
    teacher_share: float = 0.25          # share of each batch the teacher runs on (its cost)
    no_imagination: bool = False         # control: no teacher, β = 0, the student on the solution loss alone
    recursion: str = "latent"            # latent: the belief passes between steps; observation: its decoded digits
    stochastic: bool = False             # Gaussian beliefs, KL(sg(q_T) || p_S) instead of the squared error
    n_diverse: int = 100                 # stochastic: puzzles per test set made multi-solution, sampled in evaluate()
    eval_batch_size: int = 250           # trajectories per forward pass in evaluate() (puzzles x restarts)
    cnn_channels: int = 16               # visual form: channels of the first convolution (2x in the second)
    restarts: int = 1                    # K: trajectories per puzzle at test time, picked by the model's own signal
    restart_noise: float = 0.0           # σ: noise σ·std(b) on the carried belief before every step, trajectories 2..K
    halt_weight: float = 0.0             # w: weight of the halting head's BCE in L; > 0 builds the head
    halt_threshold: float = 0.0          # τ in (0, 1): a puzzle stops at its first step where a trajectory has h_t > τ


# --preset gpu: the hard-puzzle recipe as LIT (docs/benchmark.md) scaled to one GPU for at most an hour: 3.2M trained
# parameters, 16 noisy restarts at test time, each stopped by its head. ema and base_size are train.py's run options.
GPU_CONFIG = dict(d_model=256, n_heads=8, n_layers=4, batch_size=256, steps=18500, lr=5e-4, warmup_steps=1000,
                  train_thinking_steps=16, segment_steps=2, imagination_weight=0.3, ema_teacher=0.999,
                  difficulty="mixed", base_size=3000, ema=0.999, eval_steps=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                  restarts=16, restart_noise=0.3, halt_weight=0.5, halt_threshold=0.99, eval_batch_size=2000)


# ============================================================================= the model
def cell_units() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(81,) x 3: each cell's row, column and box."""
    cell = torch.arange(N_CELLS)
    return cell // 9, cell % 9, (cell // 27) * 3 + (cell % 9) // 3


def sudoku_peers() -> torch.Tensor:
    """(81, 81) bool: True where two cells share a row, column or box (self included)."""
    row, col, box = cell_units()
    return (row[:, None] == row) | (col[:, None] == col) | (box[:, None] == box)


class SelfAttention(nn.Module):  # bidirectional, between Sudoku peers
    def __init__(self, config: Config):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.register_buffer("mask", sudoku_peers(), persistent=False)

    def forward(self, x):  # (B, 81, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, 81, D/H)
        cpu = x.device.type == "cpu"  # torch's CPU attention backward is slow in bf16 at 81 cells: fp32 there
        with torch.autocast("cpu", enabled=False):  # a no-op on a GPU
            y = F.scaled_dot_product_attention(*(t.float() if cpu else t for t in (q, k, v)), attn_mask=self.mask)
        return self.out(y.to(q.dtype).transpose(1, 2).reshape(B, L, D))  # y: (B, H, 81, D/H)


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.down = nn.Linear(4 * config.d_model, config.d_model, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(config.d_model, eps=1e-6), SelfAttention(config)
        self.norm2, self.mlp = nn.RMSNorm(config.d_model, eps=1e-6), MLP(config)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BeliefUpdate(nn.Module):
    """U: one thinking step, b_t -> b_{t+1} given an observation embedding; weight-tied over steps."""

    def __init__(self, config: Config):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = nn.RMSNorm(config.d_model, eps=1e-6)
        self.std_head = nn.Linear(config.d_model, config.d_model) if config.stochastic else None

    def forward(self, belief, observation):  # (B, 81, D), (B, 81, D) -> mean (B, 81, D), std or None
        x = belief + observation
        for block in self.blocks:
            x = block(x)
        std = F.softplus(self.std_head(x)) + MIN_STD if self.std_head is not None else None
        return self.norm_out(x), std  # the mean stays RMS-normalised: bounded over many steps


class TokenEncoder(nn.Module):
    """E for the language form: digit tokens 0..9 (0 = blank) -> (B, 81, D)."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed = nn.Embedding(N_DIGITS + 1, config.d_model)

    def forward(self, tokens):  # (B, 81) long
        return self.embed(tokens)


class ImageEncoder(nn.Module):
    """E for the visual form: a small CNN per 28x28 cell image (all-zero = blank) -> (B, 81, D)."""

    def __init__(self, config: Config):
        super().__init__()
        channels = config.cnn_channels  # C
        self.cnn = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.GELU(),             # (N, C, 14, 14)
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.GELU(),  # (N, 2C, 7, 7)
            nn.Flatten(), nn.Linear(2 * channels * 7 * 7, config.d_model))

    def forward(self, images):  # (B, 81, 28, 28) float
        B = images.shape[0]
        return self.cnn(images.reshape(B * N_CELLS, 1, 28, 28)).view(B, N_CELLS, -1)


class LatentImaginationModel(nn.Module):
    """E, cell positions, U_S (prior), its EMA teacher U_T, D; forward is one thinking step: what --compile compiles."""

    def __init__(self, config: Config, task_name: str):
        super().__init__()
        self.config, self.task_name = config, task_name
        d = config.d_model
        self.encoder = ImageEncoder(config) if task_name == "visual" else TokenEncoder(config)
        self.row, self.col, self.box = (nn.Embedding(9, d) for _ in range(3))
        self.register_buffer("cell_units", torch.stack(cell_units()), persistent=False)  # (3, 81) row, column, box
        observation_space = config.recursion == "observation"
        # observation space: the next step reads only the decoded digit distributions, re-embedded by a linear map R
        self.readback = nn.Linear(N_DIGITS, d, bias=False) if observation_space else None
        self.belief_init = None if observation_space else nn.Parameter(0.02 * torch.randn(d))  # b_0, every cell
        self.student = BeliefUpdate(config)  # U_S, prior
        # U_T, posterior: U_S's weights under an EMA (never trained), or U_S itself at decay 0
        self.teacher = copy.deepcopy(self.student).requires_grad_(False) if config.ema_teacher else self.student
        self.decoder = nn.Linear(d, N_DIGITS)  # D: belief -> logits over digits 1..9
        # halting head (w_h, c_h; beyond the paper), built last so every other piece starts from the same weights
        self.halt_head = nn.Linear(d, 1) if config.halt_weight > 0 else None
        if self.halt_head is not None:  # TRM's initialisation: h = σ(−5) whatever the belief
            nn.init.zeros_(self.halt_head.weight)
            nn.init.constant_(self.halt_head.bias, -5.0)

    def forward(self, state, observation, teacher: bool = False):  # (B, 81, D) x 2 -> mean (B, 81, D), std or None
        return (self.teacher if teacher else self.student)(state, observation)

    def observe(self, batch: dict, teacher: bool):
        """What a role sees: E(puzzle) + cell positions (B, 81, D); the teacher also E(solution) and E(blank) (D,)."""
        key_p, key_s = ("puzzle_images", "solution_images") if self.task_name == "visual" else ("puzzle", "solution")
        position = self.row(self.cell_units[0]) + self.col(self.cell_units[1]) + self.box(self.cell_units[2])  # (81, D)
        puzzle = self.encoder(batch[key_p]) + position
        if not teacher:  # the student's forward pass never touches the solution
            return puzzle, None, None
        return puzzle, self.encoder(batch[key_s]), self.encoder(torch.zeros_like(batch[key_p][:1]))[0, 0]

    def initial_belief(self, batch_size: int):  # (B, 81, D): b_0, or the uniform distribution read back
        if self.readback is not None:
            return self.readback(self.decoder.weight.new_full((batch_size, N_CELLS, N_DIGITS), 1 / N_DIGITS))
        return self.belief_init.expand(batch_size, N_CELLS, -1)

    def carry(self, belief, detach: bool = True):
        """What passes to the next thinking step, detached at a segment's end (truncated backprop): the belief
        itself (latent recursion), or only its decoded digit distributions, re-embedded (observation space)."""
        cut = torch.Tensor.detach if detach else (lambda x: x)
        if self.readback is None:
            return cut(belief)
        return self.readback(cut(self.decode(belief).softmax(-1)))  # (B, 81, 9) -> (B, 81, D)

    def decode(self, belief):  # (B, 81, D) -> (B, 81, 9) float32 logits
        return self.decoder(belief).float()

    @torch.no_grad()
    def update_ema_teacher(self):
        """After each optimizer step: θ_T ← d·θ_T + (1 − d)·θ_S (d = ema_teacher), θ_T = θ_S at init."""
        if self.teacher is not self.student:
            for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
                teacher.lerp_(student, 1.0 - self.config.ema_teacher)


def check_config(config: Config):
    """Bad settings -> one-line ValueError."""
    checks = [
        (config.d_model % config.n_heads == 0, f"d_model ({config.d_model}) must be divisible by n_heads"),
        *((getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
          for name in ("train_thinking_steps", "n_diverse", "cnn_channels", "restarts", "eval_batch_size")),
        (config.segment_steps >= 1 and config.train_thinking_steps % config.segment_steps == 0,
         f"segment_steps must be >= 1 and divide train_thinking_steps, got {config.segment_steps}"),
        (config.recursion in ("latent", "observation"), f"recursion must be latent or observation: {config.recursion}"),
        (0.0 <= config.ema_teacher < 1.0, f"ema_teacher must be in [0, 1), got {config.ema_teacher}"),
        (0.0 < config.teacher_share <= 1.0, f"teacher_share must be in (0, 1], got {config.teacher_share}"),
        (config.grad_clip > 0.0, f"grad_clip must be positive, got {config.grad_clip}"),
        *((0.0 <= getattr(config, name) < math.inf, f"{name} must be a finite number >= 0, got {getattr(config, name)}")
          for name in ("restart_noise", "halt_weight")),
        (config.halt_threshold == 0.0 or 0.0 < config.halt_threshold < 1.0 and config.halt_weight > 0.0,
         f"halt_threshold must be 0 (no stopping) or in (0, 1), read by a halting head (halt_weight > 0 builds it), "
         f"got {config.halt_threshold}"),
        (config.eval_batch_size >= config.restarts,
         f"eval_batch_size ({config.eval_batch_size}) must hold one puzzle's {config.restarts} restart trajectories")]
    for ok, problem in checks:
        if not ok:
            raise ValueError(problem)


def build_model(config: Config, task) -> nn.Module:
    if task.name not in TASKS:
        raise ValueError(f"lit supports tasks {TASKS}, got {task.name!r}")
    check_config(config)
    return LatentImaginationModel(config, task.name)


def check_batch(batch: dict, task_name: str):
    """Bad input -> one-line ValueError (shapes and value ranges of the contract's batch dict)."""
    images = ("puzzle_images", "solution_images") if task_name == "visual" else ()
    for key in ("puzzle", "solution", *images):
        if key not in batch:
            raise ValueError(f"batch for task {task_name!r} is missing key {key!r} (has {sorted(batch)})")
        x, want = batch[key], (N_CELLS, 28, 28) if key in images else (N_CELLS,)
        if x.dim() != 1 + len(want) or tuple(x.shape[1:]) != want:
            raise ValueError(f"batch[{key!r}] must have shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
    if not ((batch["puzzle"] >= 0) & (batch["puzzle"] <= 9)).all():
        raise ValueError("batch['puzzle'] must hold digits 0..9 (0 = blank)")
    if not ((batch["solution"] >= 1) & (batch["solution"] <= 9)).all():
        raise ValueError("batch['solution'] must hold digits 1..9")


# ============================================================================= the LIT loss
def teacher_update(model, state, puzzle_emb, solution_emb, blank_emb, puzzle, reveal_order, t: int):
    """b^T_{t+1} = U_T(state, E(puzzle ⊕ hints_t)) without gradient: a target only. state (b, 81, D); reveal_order
    (b, 81) uniform, cell i revealed once reveal_order[i] < t / (T − 1) (nested subsets). E is per cell, so
    E(puzzle ⊕ hints) = E(puzzle) + [E(solution) − E(blank)] on the newly given cells. -> (mean, std)."""
    fraction = min(1.0, t / max(1, model.config.train_thinking_steps - 1))  # 0 at t = 0, all from the last step on
    revealed = (reveal_order < fraction) & (puzzle == 0)  # (b, 81) blank cells now given
    with torch.no_grad():
        return model(state, puzzle_emb + torch.where(revealed[..., None], solution_emb - blank_emb, 0), teacher=True)


def example_generators(batch: dict, device) -> list | None:
    """One generator per example, seeded by batch["example_seed"] (B,), so torchrun ranks holding slices draw what one
    process draws; None (torch's global generator) for a batch without seeds."""
    seeds = batch.get("example_seed")
    return None if seeds is None else [torch.Generator(device).manual_seed(seed) for seed in seeds.tolist()]


def example_noise(draw, shape, generators, device) -> torch.Tensor:
    """draw(shape) (torch.rand or torch.randn): row b from generators[b], or all from the global generator (None)."""
    if generators is None:
        return draw(shape, device=device)
    return torch.stack([draw(shape[1:], generator=g, device=device) for g in generators])


def sample_belief(mean, std, sample: bool, generators=None):
    """Reparameterised draw b = μ + σ·ε (stochastic beliefs), else the mean; ε from `generators` (example_noise)."""
    if std is None or not sample:
        return mean
    return mean + std * example_noise(torch.randn, mean.shape, generators, mean.device).to(mean.dtype)


def lit_loss(model, batch: dict, config: Config) -> dict:
    """L = Σ_t [CE(D(b^S_{t+1}), y) + β·||b^S_{t+1} − sg(b^T_{t+1})||²] / T, β = imagination_weight (no teacher and
    no term under no_imagination), T = train_thinking_steps, the CE at every k-th step (k = segment_steps), the teacher
    on the first teacher_share of the batch; a halting head adds w·BCE. -> {"loss": L, the terms detached}."""
    target = batch["solution"] - 1  # (B, 81) digit classes 0..8
    B, T, k = target.shape[0], config.train_thinking_steps, config.segment_steps
    n = 0 if config.no_imagination else max(1, round(config.teacher_share * B))  # the teacher's sub-batch
    puzzle_emb, solution_emb, blank_emb = model.observe(batch, teacher=n > 0)
    generators = example_generators(batch, target.device)  # per-example noise: the same under any torchrun split
    reveal_order = example_noise(torch.rand, (B, N_CELLS), generators, target.device)[:n]  # (n, 81)
    state = model.initial_belief(B)  # what the next step reads, detached by carry() at each segment's end
    ce = imagination = puzzle_emb.new_zeros((), dtype=torch.float32)
    halting = defaultdict(float)  # the halting head's terms, summed over the segment ends
    for t in range(T):
        segment_end = (t + 1) % k == 0
        if n:  # teacher (posterior): the puzzle and the hints revealed so far, from the student's belief
            mean_t, std_t = teacher_update(model, state[:n], puzzle_emb[:n], solution_emb[:n], blank_emb,
                                           batch["puzzle"][:n], reveal_order, t)
            teacher_belief = sample_belief(mean_t, std_t, True, generators[:n] if generators else None)
        # student (prior): the puzzle only, from its own previous belief, as at test time
        mean_s, std_s = model(state, puzzle_emb)
        belief = sample_belief(mean_s, std_s, True, generators)
        state = model.carry(belief, detach=segment_end)
        if segment_end:
            logits = model.decode(belief)  # (B, 81, 9)
            ce = ce + F.cross_entropy(logits.transpose(1, 2), target)
            if model.halt_head is not None:
                for name, value in halting_loss(model, belief, logits, batch["solution"]).items():
                    halting[name] = halting[name] + value
        if not n:  # control: the same recurrence and deep supervision, no teacher
            continue
        if config.stochastic:  # KL(sg(q_T) || p_S) per cell, summed over d, averaged over cells
            q = torch.distributions.Normal(mean_t.float(), std_t.float())
            p = torch.distributions.Normal(mean_s[:n].float(), std_s[:n].float())
            imagination = imagination + torch.distributions.kl_divergence(q, p).sum(-1).mean()
        else:  # ||b^S_{t+1} − sg(b^T_{t+1})||², mean over cells and channels
            imagination = imagination + (belief[:n].float() - teacher_belief.float()).pow(2).mean()
    ce, imagination = ce / (T // k), imagination / T
    terms = {"ce_student": ce, "imagination": imagination, **{name: v / (T // k) for name, v in halting.items()}}
    loss = ce + config.imagination_weight * imagination + config.halt_weight * terms.get("halt_bce", 0.0)
    return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}


# ============================================================================= the thinking loop
class Thoughts(NamedTuple):
    logits: list   # after every step: (K, B, 81, 9); a stopped trajectory keeps its last step's
    halt: list     # after every step: (K, B) the halting head's h, or None without a head
    steps: torch.Tensor  # (K, B) long: the steps each trajectory ran (at a budget s: min(steps, s))


@torch.no_grad()
def think(model, batch: dict, thinking_steps: int, restarts: int = 1, noise: float = 0.0, threshold: float = 0.0,
          sample: bool = False, first: int = 0, seed: int = 0) -> Thoughts:
    """The student alone from b_0: b_{t+1} = U_S(b_t, E(puzzle)), decoded after every step, for K = restarts
    trajectories per puzzle in one batch (rows k·B + b); sample: stochastic beliefs are drawn. Beyond the paper (last
    section): restart noise σ, a halting head stopping a puzzle's K at the first h_t > τ among them. Noise: one
    generator per trajectory, seeded by (seed, puzzle index first + b, k): the same in any batch, whoever stops."""
    K, B, device = restarts, batch["puzzle"].shape[0], batch["puzzle"].device
    puzzle_emb = model.observe(batch, teacher=False)[0].repeat(K, 1, 1)  # (K*B, 81, D), E once per puzzle
    state = model.initial_belief(K * B)
    rows = torch.arange(K * B, device=device)  # the trajectories still thinking
    index = ((seed * 1_000_003 + first + torch.arange(B)) * 65_537 + torch.arange(K)[:, None]).flatten()  # (K*B,)
    generators = example_generators({"example_seed": index}, device) if sample or (noise and K > 1) else None
    sigma = noise * (rows >= B).float()[:, None, None]  # (K*B, 1, 1): trajectory 0 is the noiseless student
    logits = torch.zeros(K * B, N_CELLS, N_DIGITS, device=device)
    halt = torch.zeros(K * B, device=device) if model.halt_head is not None else None
    steps = torch.full((K * B,), thinking_steps, dtype=torch.long, device=device)
    thoughts = Thoughts([], [] if halt is not None else None, steps.view(K, B))
    for t in range(thinking_steps):
        if rows.numel():
            drawn = [generators[r] for r in rows.tolist()] if generators else None
            if noise and K > 1:  # b + σ·std(b)·ε
                eps = example_noise(torch.randn, state.shape, drawn, device)
                state = state + (sigma[rows] * state.float().std(-1, keepdim=True) * eps).to(state.dtype)
            mean, std = model(state, puzzle_emb[rows])
            belief = sample_belief(mean, std, sample, drawn)
            state = model.carry(belief)
            logits = logits.index_put((rows,), model.decode(belief))  # out of place: earlier steps' tensors stay
            if halt is not None:
                halt = halt.index_put((rows,), torch.sigmoid(halt_logit(model, belief)))
                if threshold:  # a puzzle stops where one of its trajectories first has h_t > τ: its rows leave
                    stop = torch.isin(rows % B, rows[halt[rows] > threshold] % B)
                    steps[rows[stop]] = t + 1
                    rows, state = rows[~stop], state[~stop]
        thoughts.logits.append(logits.view(K, B, N_CELLS, N_DIGITS))
        if halt is not None:
            thoughts.halt.append(halt.view(K, B))
    return thoughts


# ============================================================================= the training step
def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (nanoGPT style); the EMA teacher's copy is not trained."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=config.lr, betas=BETAS)


def train_step(model, optimizer, scaler, batch: dict, step: int, config: Config,
               autocast_dtype: torch.dtype | None) -> dict:
    check_batch(batch, model.task_name)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(batch["puzzle"].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        losses = lit_loss(model, batch, config)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    model.update_ema_teacher()
    return {**losses, "loss": losses["loss"].detach()}


# ============================================================================= evaluation
@torch.no_grad()
def evaluate(model, task, config: Config, eval_steps: tuple[int, ...],
             autocast_dtype: torch.dtype | None) -> list[dict]:
    """One row per test set x thinking steps: the student's exact and blank-cell % and test-time MFLOP per puzzle
    (the teacher, with hints up to the solution, measures nothing). With restarts, a row per pick (picks below);
    with a halting head, its accuracy (h > 0.5 against "the answer is right") and, with halt_threshold, the mean
    steps used; stochastic: valid and distinct samples on multi-solution versions of the test puzzles."""
    if not eval_steps or any(int(s) < 1 for s in eval_steps):
        raise ValueError(f"eval_steps must be positive ints, got {eval_steps}")
    K, device = config.restarts, next(model.parameters()).device
    per_chunk = config.eval_batch_size // K  # puzzles per forward pass: K trajectories each
    head = ["halting head"] if model.halt_head is not None else []
    picks = ["confidence", *head, "oracle verifier"] if K > 1 else ["confidence"]  # K = 1: the one trajectory
    model.eval()
    rows = []
    for set_name, test_set in task.test_sets.items():
        check_batch(test_set, model.task_name)
        grids, used, head_right = defaultdict(list), defaultdict(list), defaultdict(list)  # lists of chunks' tensors
        for first in range(0, test_set["puzzle"].shape[0], per_chunk):
            chunk = {k: v[first:first + per_chunk].to(device) for k, v in test_set.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                thoughts = think(model, chunk, max(eval_steps), K, config.restart_noise, config.halt_threshold,
                                 first=first)
            for s in eval_steps:
                answers = thoughts.logits[s - 1].argmax(-1) + 1  # (K, b, 81)
                for pick in picks:  # grids[s, pick]: (b, 81) the picked trajectories' answers
                    best = pick_trajectory(pick, thoughts, s, chunk["puzzle"])  # (b,)
                    grids[s, pick].append(answers[best, torch.arange(answers.shape[1], device=device)].cpu())
                used[s].append(thoughts.steps.clamp(max=s).cpu())  # (K, b) thinking steps each trajectory ran
                if thoughts.halt is not None:  # (K, b): the head is right about its trajectory's answer
                    right = (answers == chunk["solution"]).all(-1)
                    head_right[s].append(((thoughts.halt[s - 1] > 0.5) == right).cpu())
        if config.stochastic:  # sampled student on multi-solution versions of the first n_diverse puzzles
            multi = {k: v.to(device) for k, v in multi_solution_set(test_set, config.n_diverse).items()}
            samples = sample_grids(model, multi, max(eval_steps))
        for s in eval_steps:
            mean_used = torch.cat(used[s], 1).float().mean().item()
            for pick in picks:
                found = torch.cat(grids[s, pick])
                row = {"test set": set_name, "thinking steps": int(s)}
                row.update({"restarts": K, "picked by": pick} if K > 1 else {})
                row.update({"halt threshold": config.halt_threshold, "mean thinking steps used": mean_used}
                           if config.halt_threshold else {})
                row["test-time MFLOP per puzzle"] = test_time_flops(config, model.task_name, mean_used, K) / 1e6
                row["exact %"] = sudoku_data.exact_accuracy(found, test_set["solution"])
                row["blank-cell %"] = sudoku_data.blank_accuracy(found, test_set["puzzle"], test_set["solution"])
                if head_right[s]:
                    row["halting head accuracy %"] = 100.0 * torch.cat(head_right[s], 1).float().mean().item()
                row.update(diversity(samples[s - 1], multi["puzzle"]) if config.stochastic else {})
                rows.append(row)
    model.train()
    return rows


def sample_grids(model, batch: dict, thinking_steps: int, seed: int = 0):
    """Draws the stochastic student N_SAMPLES times per puzzle (noise from `seed`, the global RNG untouched); returns
    the digit grids after every step, a list of (N_SAMPLES, B, 81)."""
    thoughts = think(model, batch, thinking_steps, restarts=N_SAMPLES, sample=True, seed=seed)
    return [x.argmax(-1) + 1 for x in thoughts.logits]


def diversity(grids, puzzle) -> dict:
    """grids (N, B, 81) sampled for puzzles (B, 81): the share of samples that are valid Sudoku solutions keeping the
    givens, and the mean number of distinct valid solutions per puzzle."""
    N, B, _ = grids.shape
    complete = ((grids == puzzle) | (puzzle == 0)).all(-1) & (grids > 0).all(-1)  # (N, B): givens kept, no blank
    valid = complete & (sudoku_data.broken_constraints(grids.reshape(N * B, N_CELLS)).view(N, B) == 0)
    distinct = [len({tuple(grid.tolist()) for grid in grids[valid[:, b], b]}) for b in range(B)]
    return {"valid samples %": 100.0 * valid.float().mean().item(), "distinct valid solutions": sum(distinct) / B}


def multi_solution_set(test_set: dict, n: int) -> dict:
    """The first n puzzles of a test set with givens removed until each has >= 2 solutions."""
    puzzle = torch.from_numpy(sudoku_data.multi_solution_puzzles(test_set["puzzle"][:n].numpy())).long()
    out = {**{k: v[:n] for k, v in test_set.items()}, "puzzle": puzzle}
    if "puzzle_images" in out:
        out["puzzle_images"] = out["solution_images"] * (puzzle > 0)[..., None, None]
    return out


def test_time_flops(config: Config, task_name: str, thinking_steps: float, restarts: int = 1) -> float:
    """Matrix-product FLOPs per puzzle of evaluate's student (train.py's convention: elementwise ops left out,
    attention as two products over all 81 cells): the encoder once, then per trajectory and thinking step U, D and
    the std head, readback or halting head where built. thinking_steps may be a mean (adaptive stopping)."""
    d, cells, c = config.d_model, N_CELLS, config.cnn_channels
    encoder = 0 if task_name != "visual" else 2 * cells * (9 * c * 14 * 14 + 9 * c * 2 * c * 7 * 7 + 2 * c * 7 * 7 * d)
    block = 2 * cells * d * (3 * d + d + 8 * d) + 2 * 2 * cells * cells * d  # qkv, out, MLP; Q·Kᵀ and P·V
    step = config.n_layers * block + 2 * cells * d * N_DIGITS  # U, then D
    step += 2 * cells * d * d if config.stochastic else 0  # std head
    step += 2 * d if config.halt_weight > 0 else 0  # halting head, on the cell-mean belief
    readback = 2 * cells * N_DIGITS * d if config.recursion == "observation" else 0
    step += readback + (2 * cells * d * N_DIGITS if readback else 0)  # carry: D again, then the readback
    return encoder + restarts * (readback + thinking_steps * step)  # readback: b_0 = R·uniform


# ============================================================================= beyond the paper
# Test-time restarts (after PTRM/EqR's noisy recursions): K trajectories per puzzle, k ≥ 1 adding σ·std(b)·ε to the
#   carried belief before every step (std over each cell's channels); the answer is the most confident trajectory.
# Halting head (after TRM's Q-halt head): h_t = σ(w_h · mean_i b^S_{t,i} + c_h), L += w·BCE(h_t, 1[argmax D(b^S_t) = y])
#   at the supervised steps, the target detached (its gradient reaches U_S through b, as in TRM). At test time it
#   picks among restarts (highest h_T) and stops a puzzle's K at the first step where one has h_t > τ. Deviations: K
#   stop together, it reads the cell-mean belief (TRM: a puzzle token), trains at fixed T, no ACT or Q-continue target.
# Oracle verifier: the first trajectory whose grid keeps the givens and breaks no rule: the ceiling of the K, not
#   the method (the model never checks a rule).
def halt_logit(model, belief):  # (B, 81, D) -> (B,) float32: logit of "my current answer is the solution"
    return model.halt_head(belief.mean(1)).float().squeeze(-1)  # w_h · mean_i b_i + c_h


def halting_target(logits, solution) -> torch.Tensor:
    """logits (B, 81, 9), solution (B, 81) -> (B,) float32: 1 where the argmax grid (all 81 cells, as exact % scores)
    is the solution. Detached: the head learns to read the student, never to move its answer."""
    return (logits.detach().argmax(-1) + 1 == solution).all(-1).float()


def halting_loss(model, belief, logits, solution) -> dict:
    """BCE(h_t, halting_target) at a supervised step; metrics: the head's accuracy at 0.5, the right answers' share."""
    logit, right = halt_logit(model, belief), halting_target(logits, solution)  # (B,), (B,) 0 or 1
    return {"halt_bce": F.binary_cross_entropy_with_logits(logit, right),
            "halt_accuracy": ((logit.detach() > 0).float() == right).float().mean(), "answers_right": right.mean()}


def confidence(logits, puzzle) -> torch.Tensor:
    """The model's own signal: log p(argmax grid) over the blank cells, Σ_{i blank} max_d log softmax(logits_i)_d.
    logits (..., B, 81, 9), puzzle (B, 81) -> (..., B). Uses no rule of Sudoku and no solution."""
    return (logits.float().log_softmax(-1).amax(-1) * (puzzle == 0)).sum(-1)


def pick_by_confidence(scores, puzzle) -> torch.Tensor:
    """scores: logits (K, B, 81, 9) -> (B,) the trajectory the model is most confident in (the first on ties)."""
    return confidence(scores, puzzle).argmax(0)


def oracle_verifier_pick(grids, puzzle, fallback) -> torch.Tensor:
    """grids (K, B, 81), puzzle (B, 81), fallback (B,) -> (B,) the first trajectory whose grid keeps the givens and
    breaks no rule, else fallback (the model's pick)."""
    K, B, _ = grids.shape
    valid = ((grids == puzzle) | (puzzle == 0)).all(-1)  # (K, B) givens kept
    valid &= (sudoku_data.broken_constraints(grids.reshape(K * B, N_CELLS)).view(K, B) == 0)
    return torch.where(valid.any(0), valid.int().argmax(0), fallback)


def pick_trajectory(pick: str | None, thoughts: Thoughts, s: int, puzzle) -> torch.Tensor:
    """(B,) the trajectory a pick chooses at a budget of s steps: the most confident (with K = 1, the only one), the
    one the halting head is surest of (the first on ties), or the oracle verifier's."""
    logits = thoughts.logits[s - 1]  # (K, B, 81, 9)
    if pick == "halting head":
        return thoughts.halt[s - 1].argmax(0)
    best = pick_by_confidence(logits, puzzle)
    return oracle_verifier_pick(logits.argmax(-1) + 1, puzzle, best) if pick == "oracle verifier" else best


if __name__ == "__main__":  # a tiny demo, a few seconds on CPU
    torch.manual_seed(0)
    task, config = sudoku_data.SudokuTask("easy", base_size=64, eval_size=32), Config(eval_steps=(1, 4, 8))
    model = build_model(config, task)
    optimizer, scaler = make_optimizer(model, config), torch.amp.GradScaler("cpu", enabled=False)
    for step in range(30):
        out = train_step(model, optimizer, scaler, task.train_batch(step, 16), step, config, None)
    print({k: round(v.item(), 3) for k, v in out.items()})
    for row in evaluate(model, task, config, config.eval_steps, None)[:3]:
        print(row)
