"""Latent Thought Models (LTM): a decoder guided by a few global latent thought vectors z, fitted to each
sequence by variational Bayes; the number of fitting steps is the thinking knob.

Paper: Kong et al., "Latent Thought Models with Variational Bayes Inference-Time Computation", ICML 2025
(arXiv 2502.01567); facts checked against the public fork ghidav/Latent-Thought-Language-Models.

Idea. Each sequence x has latent thoughts z ~ p(z) = N(0, I): n_z_per_layer vectors per decoder layer. In every
block, after self-attention, every token cross-attends to all of its layer's vectors:
  p_β(x|z) = Π_t p_β(x_t|x_<t, z),   and for the bound below ppl(x) ≤ exp(-ELBO(x) / n_tokens);
  fast learning (inference-time computation): fit q(z|x) = N(μ, diag(exp(logvar))) to each sequence by T AdamW
      steps on -ELBO(x) = E_q[-log p_β(x|z)] + KL(q(z|x) || p(z)), step t at a sample z_t = μ + σ ε_t of q;
  slow learning: one AdamW step on the decoder β at every iterate of the fit (near the prior to the posterior),
      z_t detached, as the reference code does: L(β) = (1/T) Σ_t (1/n_tokens) Σ_i -log p_β(x_i | x_<i, z_t);
      every_iterate=False is the ablation that learns only at one sample z ~ q of the fitted posterior.
The self-attention sees a sliding window (the reference: 256 of 1,024 tokens, 12 layers): stacked windows reach
n_layers · (window - 1) tokens back. Conditional use: fit z on a prefix, then predict the continuation given z.

Simplified or changed relative to the reference, and why:
- a latent of width d_z, projected to d_model by the cross-attention (the reference: d_z = d_model).
- no rotary positions on the latents' keys (the reference spaces them evenly): a latent fitted on a prefix can
  serve the tokens after it.
- L(β) is a mean: the reference's fast losses are sums over tokens and sequences, and its slow step adds a mean
  at the final sample (1/(B·n_tokens) of one iterate's weight, left out); with Adam the scale only moves the clip.
- a fresh ε at every fast step, as the paper's algorithm (the code draws one ε per fit).
- the reported bound takes the NLL at a fresh ε' (the code re-uses the fit's ε, an optimistic estimate).
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("text", "topics")


@dataclass
class Config:
    steps: int = 600  # slow (decoder) optimizer steps
    batch_size: int = 16  # sequences per step (each costs fast_steps forward and backward passes)
    lr: float = 3e-3  # slow-learning peak lr (paper: 4e-4 at 38M-76M params)
    warmup_steps: int = 20  # linear warmup of the slow lr (train.py)
    eval_steps: tuple[int, ...] = (0, 1, 4, 16, 64)  # thinking steps T at test time; 0 = z from the prior
    d_model: int = 64  # width d of the decoder
    d_z: int = 4  # width of a latent thought vector (the reference: d_model; few dimensions chosen on validation)
    n_layers: int = 3  # decoder blocks, each with its own latent thoughts
    n_heads: int = 2  # attention heads (self and cross)
    n_z_per_layer: int = 1  # latent thought vectors per layer (the reference: 8)
    window: int = 16  # self-attention window in tokens, itself included (0 = full causal attention)
    fast_steps: int = 4  # T: posterior AdamW steps per training sequence (paper: 16; 4 keeps the CPU run short)
    fast_lr: float = 0.3  # fast-learning peak lr, cosine to fast_lr/10 over the T steps (paper: 0.3)
    init_logvar: float = -5.0  # each fit starts at logvar ~ N(init_logvar, 0.1²) (paper: -5)
    every_iterate: bool = True  # the decoder learns at every fast iterate z_t (reference); False: at z ~ q_T only
    grad_clip: float = 1.0  # max global grad norm of the slow step (paper: 1.0)
    beta1: float = 0.9  # slow AdamW betas (paper: 0.9, 0.95)
    beta2: float = 0.95
    weight_decay: float = 0.1  # slow AdamW weight decay on 2-D weights (paper: 0.1)
    use_latent: bool = True  # False: the plain decoder of the same window, no z (the control)
    eval_subset: int = 32  # held-out windows per test set used by evaluate() (each costs Σ eval_steps fits, twice)
    eval_batch_size: int = 64  # windows per posterior fit in evaluate() (memory and speed only)


# the reference's shape: 1,024-token windows (train.py's context_length), 12 layers of 512, 8 latents each, T = 16
GPU_CONFIG = dict(context_length=1024, d_model=512, d_z=512, n_layers=12, n_heads=8, n_z_per_layer=8, window=256,
                  fast_steps=16, batch_size=32, steps=20000, lr=4e-4, warmup_steps=1000, eval_subset=256,
                  eval_batch_size=32, eval_steps=(0, 4, 16, 32, 64))


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

    def forward(self, x, cos, sin, visible):
        """x (B, N, D); visible (N, N) bool: the keys each query may attend to (the sliding-window causal mask)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, H, N, hd)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Queries from every token, keys and values from all of this layer's latent thoughts z_l."""

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        self.kv = nn.Linear(config.d_z, 2 * config.d_model, bias=False)  # d_z -> keys and values of width d
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, z):
        """x (B, N, D) normalised residual stream, z (B, Z, d_z) this layer's latents -> (B, N, D)."""
        B, N, D = x.shape
        hd = D // self.n_heads
        q = self.q(x).view(B, N, self.n_heads, hd).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.kv(z.to(x.dtype)).view(B, -1, 2, self.n_heads, hd).permute(2, 0, 3, 1, 4)  # (B, H, Z, hd) each
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd): every token sees every latent
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
    """Pre-norm block: h += SelfAttn(norm h); h += CrossAttn(norm h, z_l); h += SwiGLU(norm h)."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(config.d_model, eps=1e-5), SelfAttention(config)
        if config.use_latent:
            self.cross_norm, self.cross = nn.RMSNorm(config.d_model, eps=1e-5), CrossAttention(config)
        self.mlp_norm, self.mlp = nn.RMSNorm(config.d_model, eps=1e-5), SwiGLU(config)

    def forward(self, h, cos, sin, visible, z_layer):
        h = h + self.attn(self.attn_norm(h), cos, sin, visible)
        if z_layer is not None:
            h = h + self.cross(self.cross_norm(h), z_layer)
        return h + self.mlp(self.mlp_norm(h))


class LatentThoughtModel(nn.Module):
    """p_β(x|z): causal decoder whose layer l reads latent thoughts z[:, l·Z:(l+1)·Z]."""

    def __init__(self, config, vocab_size, max_len):
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.use_latent, self.n_layers, self.d_z = config.use_latent, config.n_layers, config.d_z
        self.n_latents = config.n_layers * config.n_z_per_layer  # z is (B, n_latents, d_z)
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=1e-5)
        self.head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied embeddings
        cos, sin = rope_tables(config.d_model // config.n_heads, max_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        query, key = torch.arange(max_len)[:, None], torch.arange(max_len)[None]
        visible = key <= query  # (max_len, max_len): causal
        if config.window:
            visible &= key > query - config.window  # sliding window: the last `window` tokens, itself included
        self.register_buffer("visible", visible, persistent=False)
        for name, p in self.named_parameters():  # reference init: N(0, 0.02), residual outputs scaled
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layers) if name.endswith("out.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, tokens, z=None):
        """tokens (B, N) long, z (B, n_latents, d_z) or None -> logits (B, N, V)."""
        B, N = tokens.shape
        z_layers = z.view(B, self.n_layers, -1, self.d_z).unbind(1) if z is not None else [None] * self.n_layers
        h = self.embed(tokens)  # (B, N, D)
        for block, z_layer in zip(self.blocks, z_layers):  # z_layer (B, Z, d_z)
            h = block(h, self.rope_cos[:N], self.rope_sin[:N], self.visible[:N, :N], z_layer)
        return self.head(self.norm(h))  # (B, N, V)


def build_model(config, task):
    if task.name not in TASKS:
        raise ValueError(f"ltm supports tasks {TASKS}, not {task.name!r}")
    if config.d_model % config.n_heads or (config.d_model // config.n_heads) % 2:
        raise ValueError(f"d_model={config.d_model} must split into n_heads={config.n_heads} heads of even size")
    if config.fast_steps < 1 or config.n_z_per_layer < 1 or config.d_z < 1 or min(config.eval_steps, default=0) < 0:
        raise ValueError("fast_steps, n_z_per_layer and d_z must be >= 1, every eval step >= 0")
    if config.window < 0:
        raise ValueError(f"window must be >= 0 (0 = full causal attention), got {config.window}")
    if task.seq_len < 4:
        raise ValueError(f"a window of {task.seq_len} tokens has no halves to condition on: use at least 4")
    return LatentThoughtModel(config, task.vocab_size, max_len=task.seq_len)


def make_optimizer(model, config):
    """Slow learning: AdamW, weight decay on 2-D weights only (the paper's settings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=params[0].is_cuda)


def check_tokens(tokens, model):
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"expected a (B, N) long tensor of token ids, got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.shape[1] < 2 or tokens.shape[1] > model.max_len + 1:
        raise ValueError(f"sequence length {tokens.shape[1]} outside [2, {model.max_len + 1}]")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= model.vocab_size):
        raise ValueError(f"token ids must lie in [0, {model.vocab_size})")
    return tokens


# ----------------------------------------------------------------------------- the paper's loss: -ELBO
def kl_to_prior(mu, logvar):
    """KL(q(z|x) || N(0, I)) = ½ Σ (μ² + σ² - 1 - log σ²), per sequence: (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2))


def sample_z(mu, logvar, eps):
    """Reparameterised sample z = μ + σ ⊙ ε with noise ε ~ N(0, I): (B, n_latents, d_z)."""
    return mu + eps * torch.exp(0.5 * logvar)


def token_nll(model, tokens, z, autocast_dtype, first=1):
    """-log p_β(x_t | x_<t, z) summed over the predicted tokens x_first..x_S (first >= 1): (B,)."""
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(tokens[:, :-1], z)[:, first - 1:]  # (B, S - first, V)
    return F.cross_entropy(logits.float().transpose(1, 2), tokens[:, first:], reduction="none").sum(dim=1)


def negative_elbo(model, tokens, mu, logvar, eps, autocast_dtype):
    """-ELBO(x) = -log p_β(x|z) + KL(q||p) at z = μ + σ ε (a one-sample estimate), summed over the batch.
    Returns (loss, {"nll": Σ NLL, "kl": Σ KL}) in nats."""
    nll, kl = token_nll(model, tokens, sample_z(mu, logvar, eps), autocast_dtype), kl_to_prior(mu, logvar)  # (B,) each
    return (nll + kl).sum(), {"nll": nll.sum().detach(), "kl": kl.sum().detach()}


# ----------------------------------------------------------------------------- fast learning (thinking)
def fast_lr_at(step, thinking_steps, peak):
    """Cosine from peak to peak/10 over the T fast steps (reference optimizer.py)."""
    return peak / 10 + 0.5 * (1 + math.cos(math.pi * step / thinking_steps)) * (peak - peak / 10)


def example_generators(batch: dict, device) -> list | None:
    """One generator per example, seeded by batch["example_seed"] (B,), so that torchrun ranks holding slices of
    a batch draw what one process draws; None (the global generator) for a batch without seeds."""
    if "example_seed" not in batch:
        return None
    return [torch.Generator(device).manual_seed(seed) for seed in batch["example_seed"].tolist()]


def example_noise(draw, shape, generators, device) -> torch.Tensor:
    """`draw` (torch.rand or torch.randn) of `shape` on `device`: row b from generators[b], or the whole
    tensor from the global generator if generators is None."""
    if generators is None:
        return draw(shape, device=device)
    return torch.stack([draw(shape[1:], generator=g, device=device) for g in generators])


def fit_posterior(model, tokens, thinking_steps, config, autocast_dtype, generators=None, train_decoder=False):
    """Fast learning: T AdamW steps on q(z|x) = N(μ, diag e^logvar) for every sequence of tokens (B, S),
    minimising the negative ELBO at z_t = μ + σ ε_t. train_decoder: each step's backward pass also adds
    ∇_β Σ -log p_β(x|z_t), summed over tokens and sequences, to the decoder's .grad, as the reference's
    loss.backward() does (train_step takes the mean); otherwise the decoder is frozen. T = 0: the prior (μ = 0,
    logvar = 0). Returns detached μ, logvar, a fresh ε, each (B, n_latents, d_z), and the summed NLL at each
    iterate (T,)."""
    shape, device = (tokens.shape[0], model.n_latents, model.d_z), tokens.device
    eps = example_noise(torch.randn, shape, generators, device)
    if thinking_steps == 0:
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device), eps, torch.zeros(0, device=device)
    mu = (0.01 * example_noise(torch.randn, shape, generators, device)).requires_grad_()  # μ ~ N(0, 0.01²)
    logvar = (config.init_logvar + 0.1 * example_noise(torch.randn, shape, generators, device)).requires_grad_()
    # One optimizer for the batch: the loss is a sum over sequences, so each (μ_b, logvar_b) gets its own gradient,
    # and AdamW is per element: B separate optimisers, vectorised. torch's default weight decay, 0.01.
    optimizer = torch.optim.AdamW([mu, logvar], lr=config.fast_lr, betas=(0.9, 0.999))
    decoder = [p for p in model.parameters() if p.requires_grad] if train_decoder else []
    nlls = []
    with torch.enable_grad():
        for step in range(thinking_steps):
            optimizer.param_groups[0]["lr"] = fast_lr_at(step, thinking_steps, config.fast_lr)
            if step:  # a fresh sample of q at every step
                eps = example_noise(torch.randn, shape, generators, device)
            loss, metrics = negative_elbo(model, tokens, mu, logvar, eps, autocast_dtype)
            optimizer.zero_grad(set_to_none=True)
            # No GradScaler: the summed loss keeps fp16 gradients well above underflow, and Adam ignores the
            # loss scale anyway. The KL term has no decoder gradient: the decoder's share is the NLL's.
            loss.backward(inputs=[mu, logvar, *decoder])
            optimizer.step()
            nlls.append(metrics["nll"])
    eps = example_noise(torch.randn, shape, generators, device)  # μ + σ ε: a fresh sample of the fitted q
    return mu.detach(), logvar.detach(), eps, torch.stack(nlls)


@torch.no_grad()
def elbo_bound(model, tokens, thinking_steps, config, autocast_dtype=None):
    """Fit q(z|x) on the windows themselves with T = thinking_steps (0: the prior), then the negative ELBO
    with the NLL at z = μ + σ ε' for a fresh ε' (the fit's own ε would make the one-sample estimate
    optimistic). tokens (B, S); chunked by config.eval_batch_size. Returns summed nats {"nll", "kl"}."""
    nll = kl = 0.0
    for chunk in check_tokens(tokens, model).split(config.eval_batch_size):
        mu, logvar, _, _ = fit_posterior(model, chunk, thinking_steps, config, autocast_dtype)
        _, metrics = negative_elbo(model, chunk, mu, logvar, torch.randn_like(mu), autocast_dtype)
        nll, kl = nll + metrics["nll"].item(), kl + metrics["kl"].item()
    return {"nll": nll, "kl": kl}


@torch.no_grad()
def conditional_nll(model, tokens, thinking_steps, config, autocast_dtype=None):
    """Fit q(z | first half) with T = thinking_steps (0: q = the prior), then the exact -log p_β(second half |
    first half, z) at a sample z of q: no KL term, and no token of the second half reaches the fit. "other": the
    same tokens given the z fitted on the previous window's first half, a control that a decoder reading z as
    noise or as a code of its own window fails. tokens (B, S) -> summed nats {"own"[, "other"]} (plain: "own")."""
    half, size = tokens.shape[1] // 2, config.eval_batch_size
    chunks = check_tokens(tokens, model).split(size)
    score = lambda z_chunks: sum(token_nll(model, chunk, z, autocast_dtype, first=half).sum().item()
                                 for chunk, z in zip(chunks, z_chunks))
    if not model.use_latent:
        return {"own": score([None] * len(chunks))}
    z = torch.cat([sample_z(*fit_posterior(model, chunk[:, :half], thinking_steps, config, autocast_dtype)[:3])
                   for chunk in chunks])  # (B, n_latents, d_z)
    return {"own": score(z.split(size)), "other": score(z.roll(1, dims=0).split(size))}


# ----------------------------------------------------------------------------- slow learning (training)
def train_step(model, optimizer, scaler, batch, step, config, autocast_dtype):
    """Fast learning of q(z|x) for the batch, then one slow AdamW step on β: on the NLL at every iterate z_t of
    the fit (every_iterate, the reference), or on the NLL at one sample z ~ q of the fitted posterior."""
    if "tokens" not in batch:
        raise ValueError("a text batch needs a 'tokens' long tensor of shape (B, N)")
    tokens = check_tokens(batch["tokens"], model)  # (B, S)
    n_tokens = tokens[:, 1:].numel()
    optimizer.zero_grad(set_to_none=True)
    if model.use_latent:
        generators = example_generators(batch, tokens.device)  # per-example ε and init: alike under any torchrun split
        mu, logvar, eps, nlls = fit_posterior(model, tokens, config.fast_steps, config, autocast_dtype, generators,
                                              train_decoder=config.every_iterate)
    if model.use_latent and config.every_iterate:
        # L(β) = (1/T) Σ_t (1/n_tokens) Σ_i -log p_β(x_i | x_<i, z_t): the fit's backward passes left the sum over
        # iterates, tokens and sequences in .grad; scaled to the mean (and by the fp16 loss scale, if any)
        weight = scaler.scale(torch.ones((), device=tokens.device)) / (config.fast_steps * n_tokens)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(weight)
        loss = nlls.mean() / n_tokens
    else:
        z = sample_z(mu, logvar, eps) if model.use_latent else None  # (B, n_latents, d_z): a sample of the fitted q
        with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(tokens[:, :-1], z)  # (B, S-1, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())  # -log p_β(x|z) per token
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if not model.use_latent:
        return {"loss": loss.detach()}
    kl_per_token = kl_to_prior(mu, logvar).sum() / n_tokens
    return {"loss": loss.detach(), "nelbo/token": (loss + kl_per_token).detach()}  # -ELBO per token, training T


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, task, config, eval_steps, autocast_dtype):
    """Rows per (test set, T) on config.eval_subset held-out windows of each set, in nats per token:
    bound/char = NLL/char + KL/char (elbo_bound; T = 0: q = the prior), the paper's metric at the training T;
    cond NLL/char (conditional_nll; T = 0: z ~ N(0, I)) and other-z cond NLL/char, z from another window;
    the generator's own NLLs for a task that knows them (--task topics); parameters; the row's seconds.
    The plain decoder (use_latent=False) gives one row per test set, its exact NLL of whole windows as bound."""
    model.eval()
    device = next(model.parameters()).device
    parameters = sum(p.numel() for p in model.parameters())
    rows = []
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for set_name, test_set in task.test_sets.items():
            tokens = check_tokens(test_set["tokens"][:config.eval_subset].to(device), model)  # (n, S)
            half = tokens.shape[1] // 2
            n_whole, n_second = tokens[:, 1:].numel(), tokens[:, half:].numel()
            oracle = {}
            if hasattr(task, "oracle_nll"):
                oracle = {"oracle NLL/char": task.oracle_nll(tokens.cpu()).sum().item() / n_whole,
                          "oracle cond NLL/char": task.oracle_nll(tokens.cpu(), first=half).sum().item() / n_second}
            for thinking_steps in (eval_steps if model.use_latent else (0,)):
                torch.manual_seed(0)  # the same posterior inits and noise for every T and every run
                start = time.perf_counter()
                row = {"test set": set_name, "thinking steps": thinking_steps, "parameters": parameters}
                if model.use_latent:
                    bound = elbo_bound(model, tokens, thinking_steps, config, autocast_dtype)
                    row["bound/char"] = (bound["nll"] + bound["kl"]) / n_whole
                    row["NLL/char"], row["KL/char"] = bound["nll"] / n_whole, bound["kl"] / n_whole
                else:
                    nll = token_nll(model, tokens, None, autocast_dtype).sum().item()
                    row["bound/char"] = row["NLL/char"] = nll / n_whole
                cond = conditional_nll(model, tokens, thinking_steps, config, autocast_dtype)
                row["cond NLL/char"] = cond["own"] / n_second
                if "other" in cond:
                    row["other-z cond NLL/char"] = cond["other"] / n_second
                rows.append({**row, **oracle, "seconds": time.perf_counter() - start})
    model.train()
    return rows


# ----------------------------------------------------------------------------- a task where thoughts must help
class TopicDocuments:
    """--task topics, a positive control: each document draws a hidden topic k ~ U(K), then every token i.i.d.
    from the topic's p_k over the vocabulary (K Dirichlet(α) draws, the same for every seed). The topic is global:
    a window of w tokens over L layers sees L·(w - 1) of them, a thought can hold it whole. The oracle is the
    generator: -log p(x_a..x_S | x_<a) with p(x_0..x_i) = Σ_k p(k) Π_j p_k(x_j)."""
    name, n_topics, vocab_size, seq_len, alpha = "topics", 64, 32, 256, 1.0

    def __init__(self, seed=0, eval_size=256):
        self.seed = seed
        topics = np.random.default_rng(1234).dirichlet([self.alpha] * self.vocab_size, self.n_topics)  # (K, V)
        self.log_topics, self.cdf = torch.from_numpy(np.log(topics)), np.cumsum(topics, axis=1)
        self.test_sets = {name: {"tokens": self.documents(np.random.default_rng([2**40, part]), eval_size)}
                          for part, name in enumerate(("validation", "test"))}  # the same documents for every seed

    def documents(self, rng, count):
        """count documents of seq_len + 1 tokens, by inverse-CDF sampling: (count, seq_len + 1) long."""
        cdf = self.cdf[rng.integers(self.n_topics, size=count)]  # (count, V): each document's topic
        uniform = rng.random((count, self.seq_len + 1))
        tokens = (uniform[:, :, None] > cdf[:, None, :]).sum(-1)
        return torch.from_numpy(np.minimum(tokens, self.vocab_size - 1))

    def train_batch(self, step, batch_size):
        return {"tokens": self.documents(np.random.default_rng([self.seed, step]), batch_size)}

    def oracle_nll(self, tokens, first=1):
        """-log p(x_first..x_S | x_<first) under the generator, per document: (B,) nats."""
        log_joint = self.log_topics[:, tokens].cumsum(-1) - math.log(self.n_topics)  # (K, B, S + 1): log p(k, x_≤i)
        return (torch.logsumexp(log_joint[..., first - 1], 0) - torch.logsumexp(log_joint[..., -1], 0)).float()


def build_task(name, config, options):
    """The task this file generates itself (--task topics); None for the tasks train.py builds."""
    return TopicDocuments(options.seed, options.eval_size) if name == "topics" else None


if __name__ == "__main__":  # tiny demo: a short run on the topic documents, the table against T
    task = TopicDocuments(eval_size=16)
    config = Config(d_model=32, d_z=4, n_layers=2, n_z_per_layer=1, window=4, batch_size=8, eval_subset=16)
    model = build_model(config, task)
    optimizer, scaler = make_optimizer(model, config), torch.amp.GradScaler(enabled=False)
    for step in range(100):
        train_step(model, optimizer, scaler, task.train_batch(step, config.batch_size), step, config, None)
    for row in evaluate(model, task, config, (0, 4, 16), None):
        print({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()})
