"""Latent Thought Models (LTM): a decoder conditioned on latent thought vectors z, with variational
Bayes "inference-time computation" as the thinking knob.

Paper: Kong et al., "Latent Thought Models with Variational Bayes Inference-Time Computation",
ICML 2025 (arXiv 2502.01567). Facts checked against the public fork
ghidav/Latent-Thought-Language-Models (model.py, optimizer.py, config.py, train_ltm.py).

Idea. Each sequence x has latent thoughts z ~ p(z) = N(0, I), shape (n_layers · n_z_per_layer, d_z);
layer l of a causal transformer decoder cross-attends to its own n_z_per_layer vectors, so
p_β(x|z) = Π_t p_β(x_t | x_<t, z). Learning is "dual rate":
  fast learning (inference-time computation): for every sequence, fit a diagonal Gaussian
      q(z|x) = N(μ, diag(exp(logvar))) by T AdamW steps on the negative ELBO
      -ELBO(x) = E_q[-log p_β(x|z)] + KL(q(z|x) || p(z))               (decoder frozen)
  slow learning: one AdamW step on the decoder β on -log p_β(x|z) at a sample z = μ + σ ε of q, detached.
More fast steps T -> a tighter posterior -> a tighter bound: ppl(x) ≤ exp(-ELBO(x) / n_tokens).

Tasks: "sudoku" is modelled as one sequence [81 puzzle cells, SEP, 81 solution cells] (z is fitted
on the whole sequence in training, on the puzzle prefix when solving); "text" is a character LM.
`use_latent=False` gives the plain decoder of the same size (no cross-attention) for comparison.

What keeps z in use (posterior collapse otherwise): the decoder's self-attention sees only a sliding
window of recent tokens (the reference: 256 of 1,024), so information from further back, such as a
Sudoku cell's given 81 tokens before its solution, can reach a token only through z. Evaluation reports
a T = 0 row (q = the prior, KL = 0) as the control every fitted row is compared with.

Simplified or changed relative to the reference, and why (numbers: README, "ltm.py"):
- one latent slot per Sudoku cell, read only by the tokens of that cell (z_window = 1): slot i of every
  layer owns a stretch of the predicted tokens, for sudoku cell i of the puzzle and of the solution, and
  a token's cross-attention sees only its own slot, so at z_window 1 it reads that slot's value and the
  query/key projections have no effect (they do for z_window > 1 or 0). The reference's cross-attention
  over all slots (z_window = 0), or over three (z_window = 3), has to learn which slot to read before any
  slot can carry a cell, and within the CPU budget it does not: z stays (almost) unused.
- narrow latents, d_z = 8 (reference: d_model): 81 slots of width 64 in every layer give 15,552
  dimensions per sequence, and the unused ones cost KL; the cross-attention projects d_z up to d_model.
- a fresh noise ε at every fast step and for the sample the slow step trains on (stochastic VI;
  fresh_noise = False is the reference's one ε per fit, AdamVI). With one ε the fit's posterior keeps
  σ near 1 in almost every dimension and μ absorbs that ε: the decoder learns on z values it never sees again, and
  at a new ε' (the honest bound below) its NLL is far above its training loss.
- fast_lr 1.0 (paper 0.3): Adam moves each logvar by about the lr per step, so from the logvar = -5
  init (KL ≈ 2 nats per latent dimension) 16 steps at 0.3 leave the bound loose by several nats per
  token; 1.0 lets unused dimensions reach the prior's scale within the training T.
- a learned absolute position embedding (not in the reference): with a sliding window and relative
  RoPE a token cannot tell which Sudoku cell it is at.
- no persistent init: the reference starts μ from the z fitted to the same sequence in the previous
  epoch; our training sequences are augmented on the fly and rarely repeat, so every fit starts fresh.
- the reported bound evaluates the NLL at a fresh ε' (the reference re-uses the fit's ε, which makes
  the one-sample estimate optimistic): an unbiased single-sample ELBO, a bound in expectation.
- AdamW on (μ, logvar) without weight decay (the reference leaves torch's default 0.01 on); the KL
  term is already the regulariser.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sudoku_data

TASKS = ("sudoku", "text")
SEPARATOR = 10  # sudoku: token between the puzzle and the solution (digits are 0..9, 0 = blank)


@dataclass
class Config:
    steps: int = 800  # slow (decoder) optimizer steps
    batch_size: int = 8  # sequences per step (each costs fast_steps + 1 decoder passes)
    lr: float = 3e-3  # slow-learning peak lr (paper: 4e-4 at 38M-76M params)
    warmup_steps: int = 20  # linear warmup of the slow lr (train.py)
    difficulty: str = "medium"  # sudoku training base set: easy|medium|hard
    eval_steps: tuple[int, ...] = (0, 1, 2, 4, 8, 16)  # fast steps T at test time; 0 = z from the prior
    d_model: int = 64  # width d of the decoder
    d_z: int = 8  # width of a latent thought vector (the reference: d_model; see docstring)
    n_layers: int = 3  # decoder blocks, each with its own latent thoughts
    n_heads: int = 2  # attention heads (self and cross)
    n_z_per_layer: int = 81  # latent thought vectors per layer (paper: 8); sudoku: one per cell (see docstring)
    z_window: int = 1  # slots a token's cross-attention sees: those within z_window - 1 of the slot owning
    #                    the token it predicts (1 = that slot only); 0 = every slot of the layer (the reference)
    # Self-attention window in tokens, itself included (0 = full causal). Stacked windows reach
    # n_layers · (window - 1) tokens back: 3 · 23 = 69 < 81, so no solution cell can see its own given
    # (81 tokens earlier) and the puzzle can reach a solution token only through z; 40 (the reference's
    # 1/4 of the sequence) reaches 117 back, and every solution cell could copy its given directly.
    window: int = 24
    fast_steps: int = 16  # T: posterior AdamW steps per training sequence (paper: 16)
    fast_lr: float = 1.0  # fast-learning peak lr, cosine to fast_lr/10 over the T steps (paper: 0.3; see docstring)
    init_logvar: float = -5.0  # the fit starts at logvar ~ N(init_logvar, 0.1²) (paper: -5)
    fresh_noise: bool = True  # a new ε at every fast step and for the slow step's sample; False: one ε per fit (paper)
    kl_weight: float = 1.0  # weight of KL(q || p) in the fast steps' loss (paper: 1); < 1 only as an ablation
    weight_decay: float = 0.1  # slow AdamW weight decay on 2-D weights (paper: 0.1)
    use_latent: bool = True  # False: plain decoder of the same size, no z (the baseline)
    eval_subset: int = 200  # held-out sequences per test set used by evaluate() (it costs Σ eval_steps fits)
    eval_batch_size: int = 64  # sequences per posterior fit in evaluate() (memory and speed only)


GPU_CONFIG = dict(d_model=384, n_layers=6, n_heads=6, window=14,  # reach 6 · 13 = 78 < 81
                  fast_steps=16, batch_size=128, steps=20000, lr=4e-4, warmup_steps=1000, eval_subset=500)


# ----------------------------------------------------------------------------- model pieces
def rope_tables(head_dim, max_len):
    """cos, sin tables for rotary position embeddings, each (max_len, head_dim / 2)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) of x (B, H, N, hd) by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, N, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cos, sin, visible, cache=None):
        """x (B, N, D); visible (N, past + N) bool: the keys each query may attend to (the sliding-window
        causal mask). cache: this layer's dict of past keys/values for decoding (filled in place)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, H, past + N, hd)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, H, N, hd)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Queries from the token stream, keys/values from this layer's latent thoughts z_l. Each slot owns a
    stretch of the sequence (see LatentThoughtModel); RoPE rotates a query by the slot that owns the token
    it predicts and slot i's key by i, and `visible` limits a query to the slots near its own. With one
    visible slot (z_window = 1) the softmax puts weight 1 on it: the sublayer reads that slot's value and
    has no query or key."""

    def __init__(self, config):
        super().__init__()
        self.n_heads, self.lookup = config.n_heads, config.z_window == 1
        if not self.lookup:
            self.norm = nn.RMSNorm(config.d_model, eps=1e-5)
            self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        self.kv = nn.Linear(config.d_z, (1 if self.lookup else 2) * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, h, z, q_cos, q_sin, z_cos, z_sin, visible):
        """h (B, N, D) residual stream, z (B, Z, d_z); q_cos, q_sin (N, hd/2); z_cos, z_sin (Z, hd/2);
        visible (N, Z) bool: the slots each query may attend to."""
        if self.lookup:
            v = self.kv(z.to(h.dtype))  # (B, Z, D)
            return self.out(visible.to(v.dtype) @ v)  # (B, N, D): each token's own slot
        B, N, D = h.shape
        hd = D // self.n_heads
        q = apply_rope(self.q(self.norm(h)).view(B, N, self.n_heads, hd).transpose(1, 2), q_cos, q_sin)  # (B, H, N, hd)
        k, v = self.kv(z.to(h.dtype)).view(B, -1, 2, self.n_heads, hd).permute(2, 0, 3, 1, 4)  # (B, H, Z, hd)
        k = apply_rope(k, z_cos, z_sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, H, N, hd)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = 32 * math.ceil(8 * config.d_model / 3 / 32)  # LLaMA's 2/3 · 4d, rounded up
        self.gate_up = nn.Linear(config.d_model, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block: h += SelfAttn(norm h); h += CrossAttn(norm h, z_l) (at z_window 1: the own slot's value);
    h += SwiGLU(norm h)."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(config.d_model, eps=1e-5), SelfAttention(config)
        if config.use_latent:
            self.cross = CrossAttention(config)  # normalises its own query input
        self.mlp_norm, self.mlp = nn.RMSNorm(config.d_model, eps=1e-5), SwiGLU(config)

    def forward(self, h, cos, sin, visible, z_layer, z_view, cache=None):
        """z_view: (q_cos, q_sin, z_cos, z_sin, visible slots) for the cross-attention (see the model)."""
        h = h + self.attn(self.attn_norm(h), cos, sin, visible, cache)
        if z_layer is not None:
            h = h + self.cross(h, z_layer, *z_view)
        return h + self.mlp(self.mlp_norm(h))


class LatentThoughtModel(nn.Module):
    """p_β(x|z): causal decoder whose layer l reads latent thoughts z[:, l·Z:(l+1)·Z]."""

    def __init__(self, config, task_name, vocab_size, max_len):
        super().__init__()
        self.task_name, self.vocab_size, self.max_len = task_name, vocab_size, max_len
        self.use_latent, self.n_layers, self.d_z = config.use_latent, config.n_layers, config.d_z
        self.n_latents = config.n_layers * config.n_z_per_layer  # z is (B, n_latents, d_z)
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.position = nn.Embedding(max_len, config.d_model)  # absolute position (see docstring)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=1e-5)
        self.head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied embeddings
        cos, sin = rope_tables(config.d_model // config.n_heads, max_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Slot i of every layer owns a stretch of the predicted tokens: the token predicted at position t
        # is t + 1; for sudoku its cell (puzzle cell t + 1, or solution cell t + 1 - 82; SEP goes with the
        # last puzzle cell), so a puzzle cell and the same cell of the solution share a slot.
        target = torch.arange(1, max_len + 1)  # (max_len,) index of the predicted token
        if task_name == "sudoku":
            cell, n_cells = torch.where(target < 82, target.clamp(max=80), target - 82), 81
        else:
            cell, n_cells = target - 1, max_len
        slot = cell * config.n_z_per_layer // n_cells  # (max_len,) slot owning each position's target
        z_cos, z_sin = rope_tables(config.d_model // config.n_heads, config.n_z_per_layer)
        self.register_buffer("q_cos", z_cos[slot], persistent=False)  # a query sits at its owner slot
        self.register_buffer("q_sin", z_sin[slot], persistent=False)
        self.register_buffer("z_cos", z_cos, persistent=False)
        self.register_buffer("z_sin", z_sin, persistent=False)
        slots = torch.arange(config.n_z_per_layer)[None]  # (1, Z)
        # z_window 0: every slot visible (the reference); else the slots within z_window - 1 of the owner
        z_visible = (slots - slot[:, None]).abs() < (config.z_window or config.n_z_per_layer)  # (max_len, Z)
        self.register_buffer("z_visible", z_visible, persistent=False)
        query, key = torch.arange(max_len)[:, None], torch.arange(max_len)[None]
        visible = key <= query  # (max_len, max_len): causal
        if config.window:
            visible &= key > query - config.window  # sliding window: the last `window` tokens, itself included
        self.register_buffer("visible", visible, persistent=False)
        for name, p in self.named_parameters():  # reference init: N(0, 0.02), residual outputs scaled
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layers) if name.endswith("out.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, tokens, z=None, cache=None):
        """tokens (B, N) long, z (B, n_latents, d_z) or None -> logits (B, N, V).
        cache: optional list with one dict per block, for token-by-token decoding (see generate)."""
        B, N = tokens.shape
        start = cache[0]["k"].shape[2] if cache and cache[0] else 0  # tokens already in the cache
        cos, sin = self.rope_cos[start:start + N], self.rope_sin[start:start + N]  # (N, hd/2)
        visible = self.visible[start:start + N, :start + N]  # (N, start + N)
        z_layers = z.view(B, self.n_layers, -1, self.d_z).unbind(1) if z is not None else [None] * self.n_layers
        caches = cache if cache is not None else [None] * self.n_layers
        h = self.embed(tokens) + self.position.weight[start:start + N]  # (B, N, D)
        z_view = (self.q_cos[start:start + N], self.q_sin[start:start + N], self.z_cos, self.z_sin,
                  self.z_visible[start:start + N])
        for block, z_layer, layer_cache in zip(self.blocks, z_layers, caches):  # z_layer (B, Z, d_z)
            h = block(h, cos, sin, visible, z_layer, z_view, layer_cache)
        return self.head(self.norm(h))  # (B, N, V)


def task_layout(task):
    """(vocab size, sequence length in tokens) of the sequences the decoder models for this task."""
    if task.name == "sudoku":
        return SEPARATOR + 1, 2 * 81 + 1
    return task.vocab_size, task.seq_len + 1


def build_model(config, task):
    if task.name not in TASKS:
        raise ValueError(f"ltm supports tasks {TASKS}, not {task.name!r}")
    if config.d_model % config.n_heads or (config.d_model // config.n_heads) % 2:
        raise ValueError(f"d_model={config.d_model} must split into n_heads={config.n_heads} heads of even size")
    if config.fast_steps < 1 or config.n_z_per_layer < 1 or min(config.eval_steps, default=0) < 0:
        raise ValueError("fast_steps and n_z_per_layer must be >= 1, every eval step >= 0")
    if config.window < 0 or config.z_window < 0:
        raise ValueError(f"window and z_window must be >= 0 (0 = see everything), got {config.window}, {config.z_window}")
    if config.kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {config.kl_weight}")
    vocab_size, seq_len = task_layout(task)
    return LatentThoughtModel(config, task.name, vocab_size, max_len=seq_len - 1)


def make_optimizer(model, config):
    """Slow learning: AdamW (0.9, 0.95), weight decay on 2-D weights only (paper's settings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=fused)


# ----------------------------------------------------------------------------- data -> token sequences
def check_tokens(tokens, model):
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"expected a (B, N) long tensor of token ids, got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.shape[1] < 2 or tokens.shape[1] > model.max_len + 1:
        raise ValueError(f"sequence length {tokens.shape[1]} outside [2, {model.max_len + 1}]")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= model.vocab_size):
        raise ValueError(f"token ids must lie in [0, {model.vocab_size})")
    return tokens


def to_sequences(batch, model):
    """Task batch -> (B, S) long tokens. Sudoku: [puzzle (81), SEP, solution (81)]; text: tokens."""
    if model.task_name == "sudoku":
        puzzle, solution = batch.get("puzzle"), batch.get("solution")
        if puzzle is None or solution is None or puzzle.shape != solution.shape or puzzle.shape[-1] != 81:
            raise ValueError("sudoku batch needs 'puzzle' and 'solution' long tensors of shape (B, 81)")
        separator = torch.full_like(puzzle[:, :1], SEPARATOR)
        return check_tokens(torch.cat([puzzle, separator, solution], dim=1), model)  # (B, 163)
    if "tokens" not in batch:
        raise ValueError("text batch needs a 'tokens' long tensor of shape (B, N)")
    return check_tokens(batch["tokens"], model)


# ----------------------------------------------------------------------------- the objective (ELBO)
def kl_to_prior(mu, logvar):
    """KL(q(z|x) || N(0, I)) = ½ Σ (μ² + σ² - 1 - log σ²), per sequence: (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2))


def sample_z(mu, logvar, eps):
    """Reparameterised sample z = μ + σ ⊙ ε with the fit's noise ε ~ N(0, I): (B, n_latents, d_z)."""
    return mu + eps * torch.exp(0.5 * logvar)


def token_nll(model, tokens, z, autocast_dtype):
    """-log p_β(x|z) summed over the predicted tokens x_2..x_S: (B,)."""
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(tokens[:, :-1], z)  # (B, S-1, V)
    return F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none").sum(dim=1)


def negative_elbo(model, tokens, mu, logvar, eps, autocast_dtype):
    """-ELBO(x) = E_q[-log p_β(x|z)] + KL(q||p), one-sample estimate; returns (NLL (B,), KL (B,))."""
    return token_nll(model, tokens, sample_z(mu, logvar, eps), autocast_dtype), kl_to_prior(mu, logvar)


# ----------------------------------------------------------------------------- fast learning (thinking)
def fast_lr_at(step, n_steps, peak):
    """Cosine from peak to peak/10 over the T fast steps (reference optimizer.py)."""
    return peak / 10 + 0.5 * (1 + math.cos(math.pi * step / n_steps)) * (peak - peak / 10)


def example_generators(batch: dict, device) -> list | None:
    """One generator per example, seeded by batch["example_seed"] (B,) (train.py draws one per example and step):
    an example's noise then does not depend on the rest of its batch, so torchrun ranks holding slices draw what
    one process draws. The seeds stay on the CPU (read without a device sync); the generators live on `device`.
    None (the global generator) for a batch without seeds."""
    if "example_seed" not in batch:
        return None
    return [torch.Generator(device).manual_seed(seed) for seed in batch["example_seed"].tolist()]


def gaussian_noise(shape, generators, device) -> torch.Tensor:
    """N(0, 1) of `shape` on `device`: row b from generators[b], or all from the global generator if None."""
    if generators is None:
        return torch.randn(shape, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generators])


def fit_posterior(model, tokens, steps, config, autocast_dtype, generators=None):
    """Fast learning: T AdamW steps on q(z|x) = N(μ, diag e^logvar) for every sequence of tokens (B, S),
    decoder frozen, minimising Σ NLL + kl_weight · KL (the negative ELBO at weight 1; the reported bound
    always uses weight 1). fresh_noise: a new ε at every step and for the returned one (the caller's
    z = μ + σ ε is then a fresh sample of q); else one draw ε, reused by every step and returned.
    T = 0 returns the prior (μ = 0, logvar = 0). Returns detached μ, logvar, ε, each (B, n_latents, d_z)."""
    shape = (tokens.shape[0], model.n_latents, model.d_z)
    eps = gaussian_noise(shape, generators, tokens.device)
    if steps == 0:
        return torch.zeros(shape, device=tokens.device), torch.zeros(shape, device=tokens.device), eps
    mu = (0.01 * gaussian_noise(shape, generators, tokens.device)).requires_grad_()  # μ ~ N(0, 0.01²)
    logvar = (config.init_logvar + 0.1 * gaussian_noise(shape, generators, tokens.device)).requires_grad_()  # (paper: -5)
    # One optimizer over the whole batch: the loss is a sum over sequences and sequence b's (μ_b, logvar_b)
    # only enter its own term, so each gets exactly its own gradient; AdamW normalises per element, so
    # this is identical to running B separate per-sequence optimisers, just vectorised.
    optimizer = torch.optim.AdamW([mu, logvar], lr=config.fast_lr, betas=(0.9, 0.999), weight_decay=0.0)
    with torch.enable_grad():
        for step in range(steps):
            optimizer.param_groups[0]["lr"] = fast_lr_at(step, steps, config.fast_lr)
            if config.fresh_noise and step:
                eps = gaussian_noise(shape, generators, tokens.device)
            nll, kl = negative_elbo(model, tokens, mu, logvar, eps, autocast_dtype)  # (B,), (B,)
            optimizer.zero_grad(set_to_none=True)
            # decoder frozen: backward only to (μ, logvar), so no grads reach β. No GradScaler: the summed
            # loss keeps fp16 gradients well above underflow, and Adam ignores the loss scale anyway.
            (nll + config.kl_weight * kl).sum().backward(inputs=[mu, logvar])
            optimizer.step()
    if config.fresh_noise:
        eps = gaussian_noise(shape, generators, tokens.device)
    return mu.detach(), logvar.detach(), eps


@torch.no_grad()
def elbo_bound(model, tokens, steps, config, autocast_dtype=None):
    """Fit q(z|x) on the sequences themselves with T = steps (0: the prior), then
    ppl ≤ exp(Σ(NLL + KL) / n_tokens), the NLL at z = μ + σ ε' with a fresh ε' (the fit's own ε would
    make the one-sample estimate optimistic).
    tokens (B, S); chunked by config.eval_batch_size. Returns {"ppl_bound", "nll_per_token", "kl_per_token"}."""
    check_tokens(tokens, model)
    nll_sum = kl_sum = 0.0
    for chunk in tokens.split(config.eval_batch_size):
        mu, logvar, _ = fit_posterior(model, chunk, steps, config, autocast_dtype)
        nll, kl = negative_elbo(model, chunk, mu, logvar, torch.randn_like(mu), autocast_dtype)
        nll_sum, kl_sum = nll_sum + nll.sum().item(), kl_sum + kl.sum().item()
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    return {"ppl_bound": math.exp((nll_sum + kl_sum) / n_tokens),
            "nll_per_token": nll_sum / n_tokens, "kl_per_token": kl_sum / n_tokens}


@torch.no_grad()
def generate(model, prefix, steps, n_new, config, autocast_dtype=None, temperature=0.0, allowed=None):
    """Conditional generation: fit q(z|prefix) with T = steps (0: z from the prior), then decode n_new
    tokens with z fixed at a sample μ + σ ε of the fitted q and a key/value cache.
    allowed: optional (V,) bool mask of tokens that may be generated. prefix (B, P) -> (B, P + n_new)."""
    check_tokens(prefix, model)
    if prefix.shape[1] + n_new - 1 > model.max_len:
        raise ValueError(f"prefix length + n_new - 1 = {prefix.shape[1] + n_new - 1} exceeds max_len {model.max_len}")
    z = None
    if model.use_latent:
        z = sample_z(*fit_posterior(model, prefix, steps, config, autocast_dtype))  # (B, n_latents, d_z)
    cache, tokens, new_tokens = [{} for _ in range(model.n_layers)], prefix, []
    for _ in range(n_new):
        with torch.autocast(prefix.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(tokens, z, cache)[:, -1].float()  # (B, V); the first call reads the whole prefix
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if temperature == 0:
            tokens = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            tokens = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)  # (B, 1)
        new_tokens.append(tokens)
    return torch.cat([prefix, *new_tokens], dim=1)


# ----------------------------------------------------------------------------- slow learning (training)
def train_step(model, optimizer, scaler, batch, step, config, autocast_dtype):
    """Fast learning of q(z|x) for the batch (decoder frozen), then one slow AdamW step on β given z."""
    tokens = to_sequences(batch, model)  # (B, S)
    optimizer.zero_grad(set_to_none=True)
    z = mu = logvar = None
    if model.use_latent:
        generators = example_generators(batch, tokens.device)  # per-example ε and init: the same under any torchrun split
        mu, logvar, eps = fit_posterior(model, tokens, config.fast_steps, config, autocast_dtype, generators)
        z = sample_z(mu, logvar, eps)  # (B, n_latents, d_z), detached: a sample of the fitted q
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(tokens[:, :-1], z)  # (B, S-1, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())  # -log p_β(x|z) per token
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    if not model.use_latent:
        return {"loss": loss.detach()}
    kl_per_token = kl_to_prior(mu, logvar).mean() / (tokens.shape[1] - 1)
    return {"loss": loss.detach(), "nelbo/token": (loss + kl_per_token).detach()}  # -ELBO per token, training T


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def solve_sudoku(model, puzzle, steps, config, autocast_dtype):
    """Fit z on the prefix [puzzle, SEP], greedily decode the 81 solution cells (digits 1..9 only)."""
    allowed = torch.zeros(model.vocab_size, dtype=torch.bool, device=puzzle.device)
    allowed[1:10] = True
    prefix = torch.cat([puzzle, torch.full_like(puzzle[:, :1], SEPARATOR)], dim=1)  # (B, 82)
    return torch.cat([generate(model, chunk, steps, 81, config, autocast_dtype, allowed=allowed)[:, 82:]
                      for chunk in prefix.split(config.eval_batch_size)])  # (B, 81)


@torch.no_grad()
def plain_nll_per_token(model, tokens, config, autocast_dtype):
    """Next-token NLL per token of the plain decoder (use_latent=False); exp() of it is its exact perplexity."""
    nll = sum(token_nll(model, chunk, None, autocast_dtype).sum().item()
              for chunk in tokens.split(config.eval_batch_size))
    return nll / (tokens.shape[0] * (tokens.shape[1] - 1))


def evaluate(model, task, config, eval_steps, autocast_dtype):
    """Rows per (test set, T): NLL/token, KL/token and the perplexity bound on held-out sequences and, for
    sudoku, blank-cell and exact-solve accuracy after fitting z on the puzzle. T = 0 is the control
    (z from the prior). The plain decoder (use_latent=False) reports its exact next-token perplexity
    on the same sequences with T = 0."""
    model.eval()
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # same posterior inits/noise for every T and every run
        test_sets = task.test_sets  # generated sudoku sets: only the training difficulty's (each row costs Σ eval_steps fits)
        if model.task_name == "sudoku" and config.difficulty in test_sets:  # (files given with --test-csv: all)
            test_sets = {config.difficulty: test_sets[config.difficulty]}
        for set_name, test_set in test_sets.items():
            subset = {key: value[:config.eval_subset].to(device) for key, value in test_set.items()}
            tokens = to_sequences(subset, model)  # (n, S)
            for steps in (eval_steps if model.use_latent else (0,)):
                row = {"test set": set_name, "T (fast steps)": steps}
                if model.use_latent:
                    bound = elbo_bound(model, tokens, steps, config, autocast_dtype)
                    row["ppl ≤ (ELBO bound)"] = bound["ppl_bound"]
                    row["NLL/token"], row["KL/token"] = bound["nll_per_token"], bound["kl_per_token"]
                else:
                    nll = plain_nll_per_token(model, tokens, config, autocast_dtype)
                    row["ppl (next-token, exact)"], row["NLL/token"] = math.exp(nll), nll
                if model.task_name == "sudoku":
                    prediction = solve_sudoku(model, subset["puzzle"], steps, config, autocast_dtype)
                    row["exact %"] = sudoku_data.exact_accuracy(prediction, subset["solution"])
                    row["blank-cell %"] = sudoku_data.blank_accuracy(prediction, subset["puzzle"], subset["solution"])
                    row["broken rules"] = sudoku_data.broken_constraints(prediction).float().mean().item()
                rows.append(row)
    model.train()
    return rows


if __name__ == "__main__":  # tiny demo: a character LM on a repeated sentence, bound against T
    class DemoText:
        name, vocab_size, seq_len = "text", 27, 32
    corpus = torch.tensor([[ord(c) - 96 if c != " " else 0 for c in "the quick brown fox jumps over the lazy dog "]])
    config = Config(d_model=32, n_layers=2, n_heads=2, n_z_per_layer=2, fast_steps=4, batch_size=8)
    model = build_model(config, DemoText())
    optimizer, scaler = make_optimizer(model, config), torch.amp.GradScaler(enabled=False)
    windows = corpus.repeat(1, 3)[0].unfold(0, 33, 1)  # (N, 33) sliding windows
    for step in range(60):
        stats = train_step(model, optimizer, scaler, {"tokens": windows[torch.randint(len(windows), (8,))]},
                           step, config, None)
    print(f"train -ELBO/token after 60 steps: {stats['nelbo/token'].item():.3f}")
    for steps in (0, 1, 4, 16):
        print(f"T={steps:2d}: ppl ≤ {elbo_bound(model, windows[:16], steps, config)['ppl_bound']:.2f}")
