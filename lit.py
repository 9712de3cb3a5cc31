"""Latent Imagination Thinking (LIT) on Sudoku, in language and visual (MNIST) form.

Paper: "Latent Imagination Thinking: Beyond Recursive Models for Reasoning", ICLR 2026 Workshop on
World Models (openreview SYVmt9mFEm). Only the abstract is public (no paper text, no code), so the
details below are our reading of it in world-model terms (Dreamer's posterior/prior pair, the
"observation" being privileged information about the answer).

Idea: tokens and pixels are partial observations, not the language of thought. The model keeps a
latent *belief* b_t, one vector per Sudoku cell (81 x d), and thinks by updating it with a weight-tied
transformer U (bidirectional over the cells), once per thinking step. An encoder E embeds observations
(digit tokens, or cell images through a small CNN); a decoder D reads digits out of a belief. Between
steps the belief never passes through token or pixel space. A teacher (posterior) refines its belief
with extra observations of the answer; a student (prior) learns to imagine those refinements.
  teacher (posterior):  b^T_{t+1} = U_T(b^T_t, E(puzzle) + W_h E(hints_t))
      hints_t reveals a growing random subset of the solution cells (none at t=0, all at the last
      training step), through the same encoder E.
  student (prior):      b^S_{t+1} = U_S(b^S_t, E(puzzle))
  L = Σ_t [ CE(D(b^T_{t+1}), y) + CE(D(b^S_{t+1}), y) + β·||b^S_{t+1} − sg(b^T_{t+1})||² ] / T
      (deep supervision at every step; `--stochastic`: Gaussian beliefs and β·KL(sg(q_T) || p_S))
At test time only the student runs, for any number of thinking steps; accuracy against steps is the result.
Test-time restarts (`--restarts K --restart-noise σ`; not in the abstract, after PTRM/EqR's noisy recursions):
  K trajectories per puzzle in one batch, b^{(k)}_t ← b^{(k)}_t + σ·std(b^{(k)}_t)·ε before every step (k ≥ 2;
  trajectory 1 is the noiseless student), answer = the trajectory k maximising the model's own confidence
  Σ_{i blank} max_d log softmax(D(b^{(k)}_T))_{i,d}; no rule of Sudoku is checked. evaluate() also reports an
  oracle verifier (a trajectory whose grid breaks no rule): the ceiling of the K, not the method.
Halting head (`--halt-weight w`, after TRM's Q-halt head): h_t = σ(w_h · mean_i b^S_{t,i} + c_h), trained with
  w · BCE(h_t, 1[argmax D(b^S_t) = y in all 81 cells]) at the student's supervised steps (the target detached).
  At test time it gives a second pick among the K restarts, beside the confidence pick (the trajectory with the
  highest h_T), and can stop each trajectory at the first step t with h_t > τ (`--halt-threshold τ`), its rows
  leaving the batch.

Baselines the paper compares with, at equal training FLOPs:
  `--no-imagination`: no teacher, β = 0, the same student recurrence and per-step cross-entropy.
  `--recursion observation` (with `--no-imagination`): recursion in observation space; between steps only
      the decoded digit distributions pass, re-embedded: b_{t+1} = U(R·softmax(D(b_t)), E(puzzle)), b_0 = R·uniform.

Choices the abstract leaves open, and deviations (one line each, with the reason):
- Default teacher: the student's own network U_S under no_grad, reading the hints as extra givens,
  stepping from the student's belief on a quarter of each batch (`--self-teacher --teacher-start student
  --teacher-share 0.25`): at equal training compute the teacher's cost is LIT's handicap (this one is a
  forward pass on a quarter batch). `--no-self-teacher --teacher-start own --teacher-share 1
  --imagination-weight 1` is the trained posterior/prior pair written above.
- Options for a teacher closer to the abstract's posterior (not defaults): `--ema-teacher d` makes the
  teacher U_S's weights under an exponential moving average (a mean teacher) rather than a second
  trained network: averaged, not trained, it adds no backward pass and its target moves slowly;
  `--hint-order propagation` reveals at step t the cells naked and hidden singles fix in waves 1..t
  (cells they never reach stay hidden), so every target is a refinement a few deduction steps reach.
- β = 0.1, not 1: a large β pulls the student toward beliefs that already hold most of the solution,
  so it commits early (docs/lit.md).
- At the hard-puzzle recipe's scale (6,001 steps) a validation split chose the EMA teacher with β = 0.3
  (`--ema-teacher 0.999 --imagination-weight 0.3`); the 377-step default keeps the self teacher, as an
  average of decay 0.999 spans more steps than the run (docs/lit.md, the declared test).
- The student rolls from its own belief (multi-step imagination), the recurrence it runs at test time,
  not from the teacher's (a world model's one-step prior).
- U_T and U_S are two instances of one class (`--shared-update` ties them); E and D are shared, and the
  language and visual forms differ only in E.
- Attention in U only between Sudoku peers (same row, column or box: the recurrent relational network's
  graph; `--no-peer-attention` for all 81 cells): it learns several times faster.
- Truncated backprop: the state is detached between supervised segments of `segment_steps` thinking
  steps (TRM's deep supervision), so memory grows with the segment, not with the number of steps.
- Beliefs are RMS-normalised after each update, so a student rolled for 64+ steps stays bounded.
- Gradients are clipped per model (teacher: U_T and W_h; student: the rest), so the teacher's terms
  cannot shrink the student's step relative to the ablation's.
- Halting head: a linear readout of the cell-mean belief (TRM reads the state of its one puzzle token; the belief
  has no such token); trained at the fixed train_thinking_steps with the plain BCE, without TRM's ACT (halting
  during training) or Q-continue target; its gradient reaches the student through the belief, as in TRM
  (`--halt-detach` cuts it, leaving the no-head student: a control, measured in docs/benchmark.md).
- Diverse solutions (`--stochastic`): evaluate() also samples the student n_samples times on
  multi-solution versions of each test set and reports the share of valid samples and the mean number
  of distinct valid solutions, the abstract's "diverse solutions" made measurable.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sudoku_data

TASKS = ("sudoku", "visual")
N_CELLS, N_DIGITS = 81, 9


@dataclass
class Config:
    steps: int = 377                     # optimizer steps: the training FLOPs of the baselines' --steps 408 / 406
    batch_size: int = 32
    lr: float = 2e-3                     # peak learning rate (AdamW)
    warmup_steps: int = 50
    beta1: float = 0.9                   # AdamW betas
    beta2: float = 0.95
    weight_decay: float = 0.1            # AdamW weight decay on matrices
    grad_clip: float = 1.0               # max gradient norm, per model (teacher; student with encoder and decoder)
    difficulty: str = "easy"             # training base set: easy|medium|hard|extreme, or a mix: mixed|harder
    eval_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # test-time thinking steps in the table
    d_model: int = 64                    # belief width d per cell
    n_heads: int = 4                     # attention heads in U
    n_layers: int = 2                    # transformer blocks in U (applied once per thinking step)
    peer_attention: bool = True          # cells attend only to their row/column/box peers (RRN's Sudoku graph)
    train_thinking_steps: int = 6        # T: thinking steps per training example; hints reach the full solution at the last
    segment_steps: int = 1               # thinking steps per supervised segment: backprop through all, loss at its end
    imagination_weight: float = 0.1      # β in L
    no_imagination: bool = False         # ablation: no teacher, β = 0, student on the solution loss alone
    recursion: str = "latent"            # latent: the belief passes between steps; observation: only its decoded digit distributions
    self_teacher: bool = True            # teacher = the student's own network under no_grad, hints entered as extra givens
    ema_teacher: float = 0.0             # > 0 (with self_teacher): the teacher is U_S's weights under an EMA of this decay
    hint_order: str = "random"           # random: a growing random subset of the solution; propagation: the cells singles fix, wave t by step t
    teacher_start: str = "student"       # own: the teacher rolls its own belief; student: it refines the student's current one
    teacher_share: float = 0.25          # share of each batch the teacher runs on (its cost)
    shared_update: bool = False          # one network U for teacher and student (hint slot empty for the student)
    stochastic: bool = False             # Gaussian beliefs, KL(sg(q_T) || p_S) instead of the squared error
    min_std: float = 0.1                 # floor on the belief std when stochastic
    n_samples: int = 8                   # student samples per multi-solution puzzle in evaluate() when stochastic
    n_diverse: int = 100                 # puzzles per test set made multi-solution for that measurement
    eval_batch_size: int = 250           # trajectories per forward pass in evaluate() (puzzles x restarts)
    restarts: int = 1                    # K: trajectories per puzzle at test time, the pick by the model's own signal
    restart_noise: float = 0.0           # σ: noise σ·std(b) on the carried belief before every step, trajectories 2..K
    halt_weight: float = 0.0             # w: weight of the halting head's BCE in L; > 0 builds the head, 0: no head
    halt_threshold: float = 0.0          # τ in (0, 1): a trajectory stops at the first step with h_t > τ; 0: never
    halt_detach: bool = False            # the head reads sg(b) and is clipped on its own: it never moves the student
    cnn_channels: int = 16               # visual form: channels of the first convolution (2x in the second); 16 measured best


# --preset gpu: the hard-puzzle recipe (docs/benchmark.md: no imagination, two-step supervised segments, a mixed base
# set, TRM's weight average, the halting head) scaled to one GPU for at most an hour: 3.2M parameters, 16 thinking
# steps in training, 16 noisy restarts at test time, each stopped by its head, picked by confidence. ema and
# base_size are run options (train.py takes them from here).
GPU_CONFIG = dict(d_model=256, n_heads=8, n_layers=4, batch_size=256, steps=20000, lr=5e-4, warmup_steps=1000,
                  train_thinking_steps=16, segment_steps=2, no_imagination=True, difficulty="mixed", base_size=3000,
                  ema=0.999, eval_steps=(1, 2, 4, 8, 16, 32, 64, 128, 256), restarts=16, restart_noise=0.3,
                  halt_weight=0.5, halt_threshold=0.99, eval_batch_size=2000)


# ----------------------------------------------------------------------------- model pieces
class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-6)


def sudoku_peers() -> torch.Tensor:
    """(81, 81) bool: True where two cells share a row, column or box (self included)."""
    cell = torch.arange(N_CELLS)
    row, col, box = cell // 9, cell % 9, (cell // 27) * 3 + (cell % 9) // 3
    return (row[:, None] == row) | (col[:, None] == col) | (box[:, None] == box)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over the 81 cells (optionally only between Sudoku peers)."""

    def __init__(self, config: Config):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.register_buffer("mask", sudoku_peers() if config.peer_attention else None, persistent=False)

    def forward(self, x):  # (B, 81, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, 81, D/H)
        # torch's CPU attention backward is 6x slower in bf16 than in fp32 at 81 cells: fp32 there
        cpu = x.device.type == "cpu"
        with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext():
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
        self.norm1, self.attn = RMSNorm(config.d_model), SelfAttention(config)
        self.norm2, self.mlp = RMSNorm(config.d_model), MLP(config)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BeliefUpdate(nn.Module):
    """U: one thinking step, b_t -> b_{t+1} given an observation embedding. Weight-tied over steps;
    the same class serves teacher and student, language and visual form."""

    def __init__(self, config: Config):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = RMSNorm(config.d_model)
        self.std_head = nn.Linear(config.d_model, config.d_model) if config.stochastic else None
        self.min_std = config.min_std

    def forward(self, belief, observation):  # (B, 81, D), (B, 81, D) -> mean (B, 81, D), std or None
        x = belief + observation
        for block in self.blocks:
            x = block(x)
        mean = self.norm_out(x)  # beliefs stay on the RMS-1 sphere-ish: bounded over 32+ steps
        std = F.softplus(self.std_head(x)) + self.min_std if self.std_head is not None else None
        return mean, std


class TokenEncoder(nn.Module):
    """E for the language form: digit tokens 0..9 (0 = blank) -> (B, 81, D)."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed = nn.Embedding(N_DIGITS + 1, config.d_model)

    def forward(self, tokens):  # (B, 81) long
        return self.embed(tokens)

    def blank(self):  # E(empty cell), (D,)
        return self.embed.weight[0]


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

    def blank(self):  # E(empty image), (D,)
        return self.cnn(self.cnn[0].weight.new_zeros(1, 1, 28, 28))[0]


class LatentImaginationModel(nn.Module):
    """Encoder E, cell positions, teacher U_T (posterior), student U_S (prior), decoder D."""

    def __init__(self, config: Config, task_name: str):
        super().__init__()
        self.config, self.task_name = config, task_name
        d = config.d_model
        self.encoder = ImageEncoder(config) if task_name == "visual" else TokenEncoder(config)
        self.row, self.col, self.box = (nn.Embedding(9, d) for _ in range(3))
        cell = torch.arange(N_CELLS)
        self.register_buffer("cell_row", cell // 9, persistent=False)
        self.register_buffer("cell_col", cell % 9, persistent=False)
        self.register_buffer("cell_box", (cell // 27) * 3 + (cell % 9) // 3, persistent=False)
        # W_h: the trained teacher's extra-observation slot (a self teacher reads hints as givens instead)
        self.hint_proj = None if config.self_teacher else nn.Linear(d, d, bias=False)
        observation_space = config.recursion == "observation"
        # observation-space recursion: the next step reads only the decoded digit distributions, re-embedded
        # by a linear map (the CNN encoder cannot read a distribution; a token model would embed its tokens)
        self.readback = nn.Linear(N_DIGITS, d, bias=False) if observation_space else None
        self.belief_init = None if observation_space else nn.Parameter(0.02 * torch.randn(d))  # b_0, every cell
        self.teacher = None if config.self_teacher else BeliefUpdate(config)  # U_T, posterior
        self.student = self.teacher if config.shared_update and self.teacher else BeliefUpdate(config)  # U_S, prior
        if config.self_teacher:  # U_S itself in the teacher's role, evaluated without gradient, or its weights' EMA
            self.teacher = copy.deepcopy(self.student).requires_grad_(False) if config.ema_teacher else self.student
        self.decoder = nn.Linear(d, N_DIGITS)  # D: belief -> logits over digits 1..9
        # halting head (w_h, c_h), built last so every other piece starts from the same weights as without it
        self.halt_head = nn.Linear(d, 1) if config.halt_weight > 0 else None

    def observe(self, batch: dict, teacher: bool):
        """Embeds what a role may see: the puzzle (B, 81, D) with cell positions; for the teacher also
        the solution (B, 81, D) and the blank cell (D,) to build its hints. E is per cell, so
        where(revealed, E(solution), E(blank)) equals E(solution with unrevealed cells blanked)."""
        key_p, key_s = ("puzzle_images", "solution_images") if self.task_name == "visual" else ("puzzle", "solution")
        position = self.row(self.cell_row) + self.col(self.cell_col) + self.box(self.cell_box)  # (81, D)
        puzzle = self.encoder(batch[key_p]) + position
        if not teacher:  # the student's forward pass never touches the solution
            return puzzle, None, None
        return puzzle, self.encoder(batch[key_s]), self.encoder.blank()

    def initial_belief(self, batch_size: int):  # (B, 81, D): b_0, or the uniform distribution read back
        if self.readback is not None:
            return self.readback(self.decoder.weight.new_full((batch_size, N_CELLS, N_DIGITS), 1 / N_DIGITS))
        return self.belief_init.expand(batch_size, N_CELLS, -1)

    def carry(self, belief, detach: bool = True):
        """What passes to the next thinking step, detached at a segment's end (truncated backprop): the
        belief itself (latent recursion), or only its decoded digit distributions, re-embedded (observation space)."""
        cut = torch.Tensor.detach if detach else (lambda x: x)
        if self.readback is None:
            return cut(belief)
        return self.readback(cut(self.decode(belief).softmax(-1)))  # (B, 81, 9) -> (B, 81, D)

    def teacher_parameters(self):
        """Parameters only the teacher uses (U_T and W_h; none for a self teacher): the teacher model
        for per-model clipping."""
        if self.hint_proj is None:
            return []
        own = list(self.hint_proj.parameters())
        return own if self.config.shared_update else own + list(self.teacher.parameters())

    @torch.no_grad()
    def update_ema_teacher(self):
        """EMA teacher, after each optimizer step: θ_T ← d·θ_T + (1 − d)·θ_S (d = ema_teacher), θ_T = θ_S at init."""
        if self.config.ema_teacher:
            for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
                teacher.lerp_(student, 1.0 - self.config.ema_teacher)

    def decode(self, belief):  # (B, 81, D) -> (B, 81, 9) float32 logits
        return self.decoder(belief).float()

    def halt_logit(self, belief):  # (B, 81, D) -> (B,) float32: logit of "my current answer is the solution"
        return self.halt_head(belief.mean(1)).float().squeeze(-1)  # w_h · mean_i b_i + c_h


# ----------------------------------------------------------------------------- hints and sampling
def hint_fraction(t: int, config: Config) -> float:
    """Schedule: fraction of solution cells the teacher sees at step t (0 at t=0, rising linearly to
    the whole solution at the last training step, then constant)."""
    return min(1.0, t / max(1, config.train_thinking_steps - 1))


def propagation_waves(puzzle, solution) -> torch.Tensor:
    """(B, 81) long: the wave in which naked and hidden singles (sudoku_data's solver rules) fix each blank
    cell, counting from 1; wave w applies both rules at once to the digits fixed before it. Givens, and cells
    the singles never reach (a puzzle that needs a guess), get N_CELLS + 1: never revealed."""
    others = (sudoku_peers() & ~torch.eye(N_CELLS, dtype=torch.bool)).float().to(puzzle.device)  # (81, 81)
    units = torch.zeros(len(sudoku_data.UNITS), N_CELLS, device=puzzle.device)  # (27, 81) cell membership
    for i, unit in enumerate(sudoku_data.UNITS):
        units[i, unit] = 1.0
    grid, waves = puzzle.clone(), torch.full_like(puzzle, N_CELLS + 1)  # (B, 81) digits fixed so far
    for wave in range(1, N_CELLS + 1):
        placed = F.one_hot(grid, N_DIGITS + 1)[..., 1:].float()  # (B, 81, 9)
        candidates = (grid == 0)[..., None] & (others @ placed == 0)  # (B, 81, 9): no peer holds the digit
        naked = candidates.sum(-1) == 1  # (B, 81) one digit left in the cell
        once = (units @ candidates.float() == 1).float()  # (B, 27, 9) digits with one place in the unit
        hidden = ((units.T @ once > 0) & candidates).any(-1)  # (B, 81) that place
        fixed = naked | hidden
        if not fixed.any():
            break
        waves[fixed], grid = wave, torch.where(fixed, solution, grid)
    return waves


def revealed_cells(reveal_order, t: int, config: Config) -> torch.Tensor:
    """(B, 81) bool: the solution cells the teacher sees at step t. random: reveal_order (B, 81) uniform,
    cell i revealed once reveal_order[i] < hint_fraction(t) (nested subsets); propagation: reveal_order
    holds propagation_waves, the cells of waves 1..t revealed."""
    if config.hint_order == "propagation":
        return reveal_order <= t
    return reveal_order < hint_fraction(t, config)


def draw_reveal_order(batch: dict, config: Config, draw) -> torch.Tensor:
    """(B, 81): the propagation waves of the batch's puzzles, or draw() (uniform noise) for random hints."""
    if config.hint_order == "propagation":
        return propagation_waves(batch["puzzle"], batch["solution"])
    return draw()


def hint_embedding(model, solution_emb, blank_emb, reveal_order, t: int):
    """E(hints_t): (B, 81, D), the solution at revealed_cells(t), blank elsewhere."""
    revealed = revealed_cells(reveal_order, t, model.config)  # (B, 81) bool
    return torch.where(revealed[..., None], solution_emb, blank_emb)


def teacher_update(model, state, puzzle_emb, solution_emb, blank_emb, puzzle, reveal_order, t: int):
    """The teacher's step from `state` (b, 81, D) with the hints of step t -> (mean, std) of b^T_{t+1}.
    Trained teacher: U_T(state, E(puzzle) + W_h E(hints_t)). Self teacher: U_S(state, E(puzzle with
    hints_t as extra givens)) under no_grad: a target only, trained through the student's own loss."""
    if model.hint_proj is not None:
        return model.teacher(state, puzzle_emb + model.hint_proj(hint_embedding(model, solution_emb, blank_emb, reveal_order, t)))
    revealed = revealed_cells(reveal_order, t, model.config) & (puzzle == 0)  # (b, 81) blank cells now given
    with torch.no_grad():  # E(puzzle + hints) = E(puzzle) + [E(solution) - E(blank)] on the new givens (E is per cell)
        return model.teacher(state, puzzle_emb + torch.where(revealed[..., None], solution_emb - blank_emb, 0))


def example_generators(batch: dict, device) -> list | None:
    """One generator per example, seeded by batch["example_seed"] (B,) (train.py draws one per example and step):
    an example's noise then does not depend on the rest of its batch, so torchrun ranks holding slices draw what
    one process draws. The seeds stay on the CPU (read without a device sync); the generators live on `device`.
    None (the global generator) for a batch without seeds."""
    if "example_seed" not in batch:
        return None
    return [torch.Generator(device).manual_seed(seed) for seed in batch["example_seed"].tolist()]


def example_noise(draw, shape, generators, device) -> torch.Tensor:
    """draw(shape) (torch.rand or torch.randn) on `device`: row b from generators[b], or all from the global
    generator when generators is None."""
    if generators is None:
        return draw(shape, device=device)
    return torch.stack([draw(shape[1:], generator=g, device=device) for g in generators])


def sample_belief(mean, std, sample: bool, generators=None):
    """Reparameterised draw b = μ + σ·ε (stochastic beliefs), else the mean; ε from `generators` (see example_noise)."""
    if std is None or not sample:
        return mean
    return mean + std * example_noise(torch.randn, mean.shape, generators, mean.device).to(mean.dtype)


# ----------------------------------------------------------------------------- LIT loss
def halting_target(logits, solution) -> torch.Tensor:
    """The halting head's target: 1 where the current answer, the argmax of the student's logits in all 81 cells
    (givens included: the grid exact % scores), equals the solution, else 0. logits (B, 81, 9), solution (B, 81)
    digits 1..9 -> (B,) float32, detached: the head learns to read the student, never to move its answer."""
    return (logits.detach().argmax(-1) + 1 == solution).all(-1).float()


def lit_loss(model, batch: dict, config: Config) -> tuple[torch.Tensor, dict]:
    """L = Σ_t [CE(D(b^T_{t+1}), y) + CE(D(b^S_{t+1}), y) + β·||b^S_{t+1} − sg(b^T_{t+1})||²] / T,
    β = imagination_weight (0 under no_imagination), T = train_thinking_steps; with segment_steps k > 1 the
    cross-entropies are taken at every k-th step only (averaged over the T / k segments). The teacher runs on the first
    teacher_share of the batch (its CE and the imagination term average over those examples; a self
    teacher has no CE). With a halting head (halt_weight w > 0), L gains w·BCE(h, halting_target) at the student's
    supervised steps (averaged over them). Returns (L, metrics: the terms, detached)."""
    target = batch["solution"] - 1  # (B, 81) digit classes 0..8
    B, T, k = target.shape[0], config.train_thinking_steps, config.segment_steps
    n = 0 if config.no_imagination else max(1, round(config.teacher_share * B))  # the teacher's sub-batch
    puzzle_emb, solution_emb, blank_emb = model.observe(batch, teacher=n > 0)
    generators = example_generators(batch, target.device)  # per-example noise: the same under any torchrun split
    reveal_order = draw_reveal_order({k: v[:n] for k, v in batch.items()}, config,
                                     lambda: example_noise(torch.rand, (B, N_CELLS), generators, target.device))
    student_state = model.initial_belief(B)  # what each role's next step reads, detached by carry():
    teacher_state = student_state[:n]        # k steps per supervised segment (truncated backprop)
    ce_teacher = ce_student = imagination = halt_bce = puzzle_emb.new_zeros((), dtype=torch.float32)
    halt_right = halt_positive = 0.0  # the head's accuracy at 0.5 and the share of right answers (metrics only)
    halting = model.halt_head is not None and config.halt_weight > 0
    for t in range(T):
        segment_end = (t + 1) % k == 0
        if n:  # teacher (posterior): the puzzle and the hints revealed so far, from its own or the student's belief
            start = student_state[:n] if config.teacher_start == "student" else teacher_state
            mean_t, std_t = teacher_update(model, start, puzzle_emb[:n], solution_emb[:n], blank_emb,
                                           batch["puzzle"][:n], reveal_order[:n], t)
            teacher_belief = sample_belief(mean_t, std_t, sample=True, generators=generators[:n] if generators else None)
            teacher_state = model.carry(teacher_belief, detach=segment_end)
            if not config.self_teacher and segment_end:
                ce_teacher = ce_teacher + F.cross_entropy(model.decode(teacher_belief).transpose(1, 2), target[:n])
        # student (prior): the puzzle only, from its own previous belief, as at test time
        mean_s, std_s = model.student(student_state, puzzle_emb)
        student_belief = sample_belief(mean_s, std_s, sample=True, generators=generators)
        student_state = model.carry(student_belief, detach=segment_end)
        if segment_end:
            student_logits = model.decode(student_belief)  # (B, 81, 9)
            ce_student = ce_student + F.cross_entropy(student_logits.transpose(1, 2), target)
            if halting:  # BCE(h_t, 1[current answer = solution]); the head reads the belief, the target is detached
                halt_logit = model.halt_logit(student_belief.detach() if config.halt_detach else student_belief)  # (B,)
                answer_right = halting_target(student_logits, batch["solution"])  # (B,) 0 or 1
                halt_bce = halt_bce + F.binary_cross_entropy_with_logits(halt_logit, answer_right)
                halt_right = halt_right + ((halt_logit.detach() > 0).float() == answer_right).float().mean()
                halt_positive = halt_positive + answer_right.mean()
        if not n:  # ablation: the same recurrence and deep supervision, no teacher
            continue
        if config.stochastic:  # KL(sg(q_T) || p_S) per cell, summed over d, averaged over cells
            q = torch.distributions.Normal(mean_t.detach().float(), std_t.detach().float())
            p = torch.distributions.Normal(mean_s[:n].float(), std_s[:n].float())
            imagination = imagination + torch.distributions.kl_divergence(q, p).sum(-1).mean()
        else:  # ||b^S_{t+1} − sg(b^T_{t+1})||², mean over cells and channels
            gap = student_belief[:n].float() - teacher_belief.detach().float()
            imagination = imagination + gap.pow(2).mean()
    ce_teacher, ce_student, imagination = ce_teacher / (T // k), ce_student / (T // k), imagination / T
    beta = 0.0 if config.no_imagination else config.imagination_weight
    loss = ce_teacher + ce_student + beta * imagination
    metrics = {"ce_teacher": ce_teacher.detach(), "ce_student": ce_student.detach(), "imagination": imagination.detach()}
    if halting:
        halt_bce = halt_bce / (T // k)
        loss = loss + config.halt_weight * halt_bce
        metrics.update({"halt_bce": halt_bce.detach(), "halt_accuracy": halt_right / (T // k),
                        "answers_right": halt_positive / (T // k)})
    return loss, metrics


# ----------------------------------------------------------------------------- thinking loop
@torch.no_grad()
def think(model, batch: dict, thinking_steps: int, role: str = "student", sample: bool = False, seed: int = 0,
          perturb=None):
    """Rolls one role for thinking_steps from b_0; returns the decoded logits after every step, a list of
    (B, 81, 9). The student sees only the puzzle; the teacher also gets hints on the training schedule
    (reveal order from `seed`), stepping from its own belief or, with teacher_start "student", from the
    student's rolled alongside. sample=True draws stochastic beliefs (diverse solutions). perturb(state), if
    given, replaces the student's carried state before every step (test-time noise, b_0 included)."""
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    puzzle_emb, solution_emb, blank_emb = model.observe(batch, teacher=role == "teacher")
    B = puzzle_emb.shape[0]
    reveal_order = draw_reveal_order(batch, model.config, lambda: torch.rand(
        B, N_CELLS, generator=torch.Generator().manual_seed(seed)).to(puzzle_emb.device)) if role == "teacher" else None
    student_state = teacher_state = model.initial_belief(B)
    logits = []
    for t in range(thinking_steps):
        if role == "teacher":
            start = student_state if model.config.teacher_start == "student" else teacher_state
            belief = sample_belief(*teacher_update(model, start, puzzle_emb, solution_emb, blank_emb, batch["puzzle"],
                                                   reveal_order, t), sample=sample)
            teacher_state = model.carry(belief)
            logits.append(model.decode(belief))
        if role == "student" or model.config.teacher_start == "student":
            student_state = perturb(student_state) if perturb is not None else student_state
            belief = sample_belief(*model.student(student_state, puzzle_emb), sample=sample)
            student_state = model.carry(belief)
            if role == "student":
                logits.append(model.decode(belief))
    return logits


def sample_grids(model, batch: dict, thinking_steps: int, n_samples: int, seed: int = 0):
    """Draws the stochastic student n_samples times per puzzle (noise from `seed`, the global RNG
    untouched); returns the digit grids after every step, a list of (n_samples, B, 81)."""
    repeated = {k: v.repeat_interleave(n_samples, 0) for k, v in batch.items()}  # (n_samples*B, ...) sample-major per puzzle
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logits = think(model, repeated, thinking_steps, "student", sample=True)
    B = batch["puzzle"].shape[0]
    return [(x.argmax(-1) + 1).view(B, n_samples, N_CELLS).transpose(0, 1) for x in logits]


def diversity(grids, puzzle) -> dict:
    """grids (N, B, 81) sampled for puzzles (B, 81): the share of samples that are valid Sudoku
    solutions keeping the givens, and the mean number of distinct valid solutions per puzzle."""
    N, B, _ = grids.shape
    complete = ((grids == puzzle) | (puzzle == 0)).all(-1) & (grids > 0).all(-1)  # (N, B): givens kept, no blank
    valid = complete & (sudoku_data.broken_constraints(grids.reshape(N * B, N_CELLS)).view(N, B) == 0)
    tagged = torch.cat([torch.arange(B).expand(N, B)[..., None], grids.cpu()], -1)[valid.cpu()]  # (V, 1 + 81)
    distinct = torch.bincount(torch.unique(tagged, dim=0)[:, 0], minlength=B)  # (B,)
    return {"valid samples %": 100.0 * valid.float().mean().item(), "distinct valid solutions": distinct.float().mean().item()}


def multi_solution_set(test_set: dict, n: int) -> dict:
    """The first n puzzles of a test set with givens removed until each has >= 2 solutions."""
    puzzle = torch.from_numpy(sudoku_data.multi_solution_puzzles(test_set["puzzle"][:n].numpy())).long()
    out = {k: v[:n] for k, v in test_set.items()}
    out["puzzle"] = puzzle
    if "puzzle_images" in out:
        out["puzzle_images"] = out["solution_images"] * (puzzle > 0)[..., None, None]
    return out


# ----------------------------------------------------------------------------- test-time restarts
PUZZLE_KEYS = ("puzzle", "puzzle_images")  # what the student sees; restarts never pass it the solution


def restart_trajectories(model, batch: dict, thinking_steps: int, restarts: int, noise: float, seed: int = 0):
    """K = restarts trajectories per puzzle, run as one batch (the puzzles repeated K times, trajectory-major).
    Trajectory 0 is the student's own noiseless rollout; trajectories 1..K-1 add ε·σ·std(b) to the carried
    belief b before every step (b_0 included; std over each cell's d channels, ε ~ N(0, 1) from a generator
    seeded by `seed`, the global RNG untouched). Returns the logits after every step, a list of (K, B, 81, 9)."""
    B = batch["puzzle"].shape[0]
    repeated = {k: v.repeat(restarts, *[1] * (v.dim() - 1)) for k, v in batch.items() if k in PUZZLE_KEYS}
    device = batch["puzzle"].device
    generator = torch.Generator(device).manual_seed(seed)
    noisy = (torch.arange(restarts * B, device=device) >= B)[:, None, None]  # (K*B, 1, 1): all but trajectory 0

    def perturb(state):  # (K*B, 81, D) -> b + σ·std(b)·ε on the noisy trajectories
        eps = torch.randn(state.shape, generator=generator, device=device)
        kick = noise * state.float().std(-1, keepdim=True) * eps
        return torch.where(noisy, state + kick.to(state.dtype), state)

    logits = think(model, repeated, thinking_steps, "student", perturb=perturb if noise and restarts > 1 else None)
    return [x.view(restarts, B, N_CELLS, N_DIGITS) for x in logits]


@torch.no_grad()
def halting_trajectories(model, batch: dict, thinking_steps: int, restarts: int, noise: float, threshold: float = 0.0,
                         seed: int = 0):
    """restart_trajectories' K trajectories, each also read by the halting head after every step, h_t = σ(halt_logit).
    With threshold τ > 0 a trajectory stops at the first step with h_t > τ: its rows leave the batch, so it computes
    nothing more, and its logits and h stay those of that step. τ = 0: every trajectory runs all thinking_steps
    (the same logits as restart_trajectories). Returns the logits after every step, a list of (K, B, 81, 9), the
    head's h after every step, a list of (K, B), and the steps each trajectory ran, (K, B) long: at a budget of
    s steps a trajectory runs min(steps, s)."""
    B, K = batch["puzzle"].shape[0], restarts
    repeated = {k: v.repeat(K, *[1] * (v.dim() - 1)) for k, v in batch.items() if k in PUZZLE_KEYS}
    device = batch["puzzle"].device
    generator = torch.Generator(device).manual_seed(seed)
    puzzle_emb, _, _ = model.observe(repeated, teacher=False)  # (K*B, 81, D)
    state = model.initial_belief(K * B)
    rows = torch.arange(K * B, device=device)  # the trajectories still thinking (trajectory-major: k*B + b)
    logits = torch.zeros(K * B, N_CELLS, N_DIGITS, device=device)
    halt = torch.zeros(K * B, device=device)
    steps = torch.full((K * B,), thinking_steps, dtype=torch.long, device=device)
    all_logits, all_halt = [], []
    for t in range(thinking_steps):
        if rows.numel():
            if noise and K > 1:  # b + σ·std(b)·ε on all but trajectory 0, as in restart_trajectories
                eps = torch.randn(state.shape, generator=generator, device=device)
                kick = noise * state.float().std(-1, keepdim=True) * eps
                state = torch.where((rows >= B)[:, None, None], state + kick.to(state.dtype), state)
            belief = sample_belief(*model.student(state, puzzle_emb[rows]), sample=False)
            state = model.carry(belief)
            logits = logits.index_put((rows,), model.decode(belief))  # out of place: earlier steps' tensors stay
            halt = halt.index_put((rows,), torch.sigmoid(model.halt_logit(belief)))
            if threshold:  # stop where h_t > τ, first time: those rows leave the batch
                stop = halt[rows] > threshold
                steps[rows[stop]] = t + 1
                rows, state = rows[~stop], state[~stop]
        all_logits.append(logits.view(K, B, N_CELLS, N_DIGITS))
        all_halt.append(halt.view(K, B))
    return all_logits, all_halt, steps.view(K, B)


def pick_by_halting(logits, halt) -> tuple[torch.Tensor, torch.Tensor]:
    """Per puzzle the trajectory whose halting head is surest its answer is the solution (the first on ties).
    logits (K, B, 81, 9), halt (K, B) -> the picked grids (B, 81) digits 1..9 and the picked trajectory (B,)."""
    best = halt.argmax(0)  # (B,)
    return logits[best, torch.arange(best.shape[0], device=best.device)].argmax(-1) + 1, best


def confidence(logits, puzzle) -> torch.Tensor:
    """The model's own signal: log p(argmax grid) over the blank cells, Σ_{i blank} max_d log softmax(logits_i)_d.
    logits (..., B, 81, 9), puzzle (B, 81) -> (..., B). Uses no rule of Sudoku and no solution."""
    return (logits.float().log_softmax(-1).amax(-1) * (puzzle == 0)).sum(-1)


def pick_by_confidence(logits, puzzle) -> tuple[torch.Tensor, torch.Tensor]:
    """Per puzzle the trajectory the model is most confident in (the first on ties: the noiseless one).
    logits (K, B, 81, 9) -> the picked grids (B, 81) digits 1..9 and the picked trajectory (B,)."""
    best = confidence(logits, puzzle).argmax(0)  # (B,)
    return logits[best, torch.arange(best.shape[0], device=best.device)].argmax(-1) + 1, best


def oracle_verifier_pick(grids, puzzle, fallback) -> torch.Tensor:
    """ORACLE VERIFIER, not the method: it checks Sudoku's rules, which the model never does. grids (K, B, 81),
    puzzle (B, 81), fallback (B,) -> (B,) the first trajectory whose grid keeps the givens and breaks no rule,
    else fallback (the model's pick). Its exact % is the ceiling of the K trajectories."""
    K, B, _ = grids.shape
    valid = ((grids == puzzle) | (puzzle == 0)).all(-1)  # (K, B) givens kept
    valid &= (sudoku_data.broken_constraints(grids.reshape(K * B, N_CELLS)).view(K, B) == 0)
    return torch.where(valid.any(0), valid.int().argmax(0), fallback)


def test_time_flops(config: Config, task_name: str, thinking_steps: float, restarts: int = 1) -> float:
    """Matrix-product FLOPs per puzzle of evaluate's student (elementwise ops and norms left out, attention as
    its two products over all 81 cells, train.py's convention): per trajectory the encoder once, then per
    thinking step U (n_layers blocks), the decoder, the std head (stochastic) or the readback (observation
    space), the halting head (halt_weight > 0); times K = restarts. thinking_steps may be a mean over the
    trajectories (adaptive stopping): the cost is linear in it."""
    d, cells, c = config.d_model, N_CELLS, config.cnn_channels
    encoder = 0 if task_name != "visual" else 2 * cells * (9 * c * 14 * 14 + 9 * c * 2 * c * 7 * 7 + 2 * c * 7 * 7 * d)
    block = 2 * cells * d * (3 * d + d + 8 * d) + 2 * 2 * cells * cells * d  # qkv, out, MLP; Q·Kᵀ and P·V
    step = config.n_layers * block + 2 * cells * d * N_DIGITS  # U, then D
    step += 2 * cells * d * d if config.stochastic else 0  # std head
    step += 2 * d if config.halt_weight > 0 else 0  # halting head, on the cell-mean belief
    readback = 2 * cells * N_DIGITS * d if config.recursion == "observation" else 0
    step += readback + (2 * cells * d * N_DIGITS if readback else 0)  # carry: D again, then the readback
    return restarts * (encoder + readback + thinking_steps * step)  # readback: b_0 = R·uniform


# ----------------------------------------------------------------------------- API
def check_config(config: Config):
    if config.d_model % config.n_heads:
        raise ValueError(f"d_model ({config.d_model}) must be divisible by n_heads ({config.n_heads})")
    if config.train_thinking_steps < 1:
        raise ValueError(f"train_thinking_steps must be >= 1, got {config.train_thinking_steps}")
    if config.segment_steps < 1 or config.train_thinking_steps % config.segment_steps:
        raise ValueError(f"segment_steps must be >= 1 and divide train_thinking_steps ({config.train_thinking_steps}), "
                         f"got {config.segment_steps}")
    if config.recursion not in ("latent", "observation"):
        raise ValueError(f"recursion must be 'latent' or 'observation', got {config.recursion!r}")
    for name in ("n_samples", "n_diverse", "cnn_channels", "restarts"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not (config.restart_noise >= 0.0 and math.isfinite(config.restart_noise)):
        raise ValueError(f"restart_noise must be a finite number >= 0, got {config.restart_noise}")
    if not (config.halt_weight >= 0.0 and math.isfinite(config.halt_weight)):
        raise ValueError(f"halt_weight must be a finite number >= 0, got {config.halt_weight}")
    if not (config.halt_threshold == 0.0 or 0.0 < config.halt_threshold < 1.0):
        raise ValueError(f"halt_threshold must be in (0, 1), or 0 for no adaptive stopping, got {config.halt_threshold}")
    if config.halt_weight == 0.0 and config.halt_threshold:
        raise ValueError(f"halt_threshold {config.halt_threshold} reads the halting head, which only a model trained "
                         f"with halt_weight > 0 has")
    if config.halt_weight == 0.0 and config.halt_detach:
        raise ValueError("halt_detach detaches the halting head, which only a model trained with halt_weight > 0 has")
    if config.grad_clip <= 0:
        raise ValueError(f"grad_clip must be positive, got {config.grad_clip}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    if config.hint_order not in ("random", "propagation"):
        raise ValueError(f"hint_order must be 'random' or 'propagation', got {config.hint_order!r}")
    if not 0.0 <= config.ema_teacher < 1.0:
        raise ValueError(f"ema_teacher must be in [0, 1), got {config.ema_teacher}")
    if config.ema_teacher and not config.self_teacher:
        raise ValueError("ema_teacher averages the student's network: it needs --self-teacher")
    if config.teacher_start not in ("own", "student"):
        raise ValueError(f"teacher_start must be 'own' or 'student', got {config.teacher_start!r}")
    if not 0.0 < config.teacher_share <= 1.0:
        raise ValueError(f"teacher_share must be in (0, 1], got {config.teacher_share}")


def check_batch(batch: dict, task_name: str, need_solution: bool = True):
    """Bad input -> one-line ValueError (shapes and value ranges of the contract's batch dict)."""
    keys = ["puzzle"] + (["solution"] if need_solution else [])
    if task_name == "visual":
        keys += ["puzzle_images"] + (["solution_images"] if need_solution else [])
    for key in keys:
        if key not in batch:
            raise ValueError(f"batch for task {task_name!r} is missing key {key!r} (has {sorted(batch)})")
    for key in keys:
        x, want = batch[key], (N_CELLS,) if not key.endswith("images") else (N_CELLS, 28, 28)
        if x.dim() != 1 + len(want) or tuple(x.shape[1:]) != want:
            raise ValueError(f"batch[{key!r}] must have shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
    if not ((batch["puzzle"] >= 0) & (batch["puzzle"] <= 9)).all():
        raise ValueError("batch['puzzle'] must hold digits 0..9 (0 = blank)")
    if need_solution and not ((batch["solution"] >= 1) & (batch["solution"] <= 9)).all():
        raise ValueError("batch['solution'] must hold digits 1..9")


def build_model(config: Config, task) -> nn.Module:
    if task.name not in TASKS:
        raise ValueError(f"lit supports tasks {TASKS}, got {task.name!r}")
    check_config(config)
    return LatentImaginationModel(config, task.name)


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (nanoGPT style)."""
    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]  # not an EMA teacher
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(config.beta1, config.beta2))


def clip_per_model(model, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips the teacher's and the student's (with the shared encoder and decoder) gradient norms
    separately, so the teacher's and the imagination term's gradients cannot shrink the student's step
    relative to the ablation's; a detached halting head (halt_detach) is clipped on its own for the same
    reason. Returns the teacher's and the student's norms before clipping."""
    detached_head = list(model.halt_head.parameters()) if model.halt_head is not None and model.config.halt_detach else []
    apart = {id(p) for p in [*model.teacher_parameters(), *detached_head]}
    student = [p for p in model.parameters() if id(p) not in apart]
    if detached_head:
        torch.nn.utils.clip_grad_norm_(detached_head, max_norm)
    return (torch.nn.utils.clip_grad_norm_(model.teacher_parameters(), max_norm),
            torch.nn.utils.clip_grad_norm_(student, max_norm))


def train_step(model, optimizer, scaler, batch: dict, step: int, config: Config,
               autocast_dtype: torch.dtype | None) -> dict:
    check_batch(batch, model.task_name)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device = batch["puzzle"].device
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss, metrics = lit_loss(model, batch, config)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    clip_per_model(model, config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    model.update_ema_teacher()
    return {"loss": loss.detach(), **metrics}


@torch.no_grad()
def evaluate(model, task, config: Config, eval_steps: tuple[int, ...],
             autocast_dtype: torch.dtype | None) -> list[dict]:
    """Rows per test set x thinking steps: the student's exact / blank-cell %. The teacher is not
    evaluated: with hints up to the full solution its accuracy measures nothing. With restarts K > 1, rows per
    test set x steps for each pick: by the model's own signals (the method: its confidence, and with a halting
    head the head's h as well, both on the same trajectories) and by an oracle verifier that checks the rules
    (the ceiling, not the method). Every row gives the test-time MFLOP per puzzle (K trajectories of that many steps).
    With a halting head the rows also give the head's accuracy (h > 0.5 against "the answer is the solution",
    over all trajectories); with halt_threshold > 0 the thinking steps are a budget, each trajectory stopping
    where its head says, and the rows give the mean thinking steps used and the MFLOP of the steps used."""
    if not eval_steps or any(int(s) < 1 for s in eval_steps):
        raise ValueError(f"eval_steps must be positive ints, got {eval_steps}")
    device = next(model.parameters()).device
    model.eval()
    thinking_steps, rows, K = max(eval_steps), [], config.restarts
    halting = model.halt_head is not None  # the head read at every step (and trajectories stopped by it)
    adaptive = halting and config.halt_threshold > 0
    per_chunk = config.eval_batch_size // K  # puzzles per forward pass: K trajectories each
    if per_chunk < 1:
        raise ValueError(f"eval_batch_size ({config.eval_batch_size}) must hold one puzzle's {K} restart trajectories")
    for set_name, test_set in task.test_sets.items():
        check_batch(test_set, model.task_name)
        picks = (None,) if K == 1 else ("confidence", *(("halting head",) if halting else ()), "oracle verifier")
        preds = {p: {s: [] for s in eval_steps} for p in picks}  # pick -> steps -> [(b, 81)]; None: the one trajectory
        used = {s: [] for s in eval_steps}  # steps -> [(K, b)]: thinking steps each trajectory ran (halting head)
        head_right = {s: [] for s in eval_steps}  # steps -> [(K, b)]: (h > 0.5) == (the answer is the solution)
        for start in range(0, test_set["puzzle"].shape[0], per_chunk):
            chunk = {k: v[start:start + per_chunk].to(device) for k, v in test_set.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if halting:
                    logits, halt, steps = halting_trajectories(model, chunk, thinking_steps, K, config.restart_noise,
                                                               config.halt_threshold if adaptive else 0.0, seed=start)
                elif K == 1:
                    logits = think(model, chunk, thinking_steps, "student")
                else:
                    logits = restart_trajectories(model, chunk, thinking_steps, K, config.restart_noise, seed=start)
            for s in eval_steps:
                if halting:
                    used[s].append(steps.clamp(max=s).cpu())
                    right = (logits[s - 1].argmax(-1) + 1 == chunk["solution"]).all(-1)  # (K, b)
                    head_right[s].append(((halt[s - 1] > 0.5) == right).cpu())
                if K == 1:
                    preds[None][s].append(logits[s - 1].view(-1, N_CELLS, N_DIGITS).argmax(-1).cpu() + 1)
                    continue
                picked, best = pick_by_confidence(logits[s - 1], chunk["puzzle"])
                preds["confidence"][s].append(picked.cpu())
                if halting:
                    preds["halting head"][s].append(pick_by_halting(logits[s - 1], halt[s - 1])[0].cpu())
                trajectories = logits[s - 1].argmax(-1) + 1  # (K, b, 81)
                checked = oracle_verifier_pick(trajectories, chunk["puzzle"], best)
                preds["oracle verifier"][s].append(trajectories[checked, torch.arange(checked.shape[0], device=device)].cpu())
        if config.stochastic:  # sampled student on multi-solution versions of the first n_diverse puzzles
            multi = {k: v.to(device) for k, v in multi_solution_set(test_set, config.n_diverse).items()}
            grids = sample_grids(model, multi, thinking_steps, config.n_samples)
        for s in eval_steps:
            mean_used = torch.cat(used[s], 1).float().mean().item() if adaptive else s
            for picked_by in picks:
                found = torch.cat(preds[picked_by][s])
                row = {"test set": set_name, "thinking steps": int(s)}
                if K > 1:
                    row.update({"restarts": K, "picked by": picked_by})
                if adaptive:
                    row.update({"halt threshold": config.halt_threshold, "mean thinking steps used": mean_used})
                row["test-time MFLOP per puzzle"] = test_time_flops(config, model.task_name, mean_used, K) / 1e6
                row.update({"exact %": sudoku_data.exact_accuracy(found, test_set["solution"]),
                            "blank-cell %": sudoku_data.blank_accuracy(found, test_set["puzzle"], test_set["solution"])})
                if halting:
                    row["halting head accuracy %"] = 100.0 * torch.cat(head_right[s], 1).float().mean().item()
                if config.stochastic:
                    row.update(diversity(grids[s - 1], multi["puzzle"]))
                rows.append(row)
    model.train()
    return rows


if __name__ == "__main__":  # tiny demo: a few seconds on CPU
    torch.manual_seed(0)
    demo_task = sudoku_data.SudokuTask("easy", base_size=64, eval_size=32)
    demo_config = Config(steps=30, d_model=64, train_thinking_steps=4, eval_steps=(1, 4, 8))
    demo_model = build_model(demo_config, demo_task)
    demo_opt = make_optimizer(demo_model, demo_config)
    demo_scaler = torch.amp.GradScaler("cpu", enabled=False)
    for demo_step in range(demo_config.steps):
        out = train_step(demo_model, demo_opt, demo_scaler, demo_task.train_batch(demo_step, 16), demo_step, demo_config, None)
    print({k: round(v.item(), 3) for k, v in out.items()})
    for demo_row in evaluate(demo_model, demo_task, demo_config, demo_config.eval_steps, None)[:3]:
        print(demo_row)
