"""Latent Thought Models (LTM): a decoder guided by a few global latent thought vectors z, fitted to each
sequence by variational Bayes; the number of fitting steps is the thinking knob.

Paper: Kong et al., "Latent Thought Models with Variational Bayes Inference-Time Computation",
ICML 2025 (arXiv 2502.01567). Facts checked against the public fork
ghidav/Latent-Thought-Language-Models (model.py, optimizer.py, config.py, train_ltm.py).

Idea. Each sequence x has latent thoughts z ~ p(z) = N(0, I): n_z_per_layer vectors per decoder layer.
In every block, after self-attention, every token cross-attends to all of its layer's vectors, so
    p_β(x|z) = Π_t p_β(x_t | x_<t, z).
Learning is "dual rate":
  fast learning (inference-time computation): for every sequence, fit a diagonal Gaussian
      q(z|x) = N(μ, diag(exp(logvar))) by T AdamW steps on the negative ELBO       (decoder frozen)
      -ELBO(x) = E_q[-log p_β(x|z)] + KL(q(z|x) || p(z)),   ppl(x) ≤ exp(-ELBO(x) / n_tokens);
  slow learning: one AdamW step on the decoder β on -log p_β(x|z) at a sample z = μ + σ ε of the fitted q,
      detached.
The self-attention sees a sliding window of recent tokens (the reference: 256 of 1,024, 12 layers); stacked
windows reach n_layers · (window - 1) tokens back, so the limit is soft: z carries what the window makes
expensive to route. Conditional use: fit z on a prefix, then predict the continuation given z = μ.

Simplified or changed relative to the reference, and why:
- a latent of width d_z projected up to d_model by the cross-attention's key/value maps (the reference:
  d_z = d_model); d_z = d_model is the reference's shape.
- no rotary positions on the latents' keys (the reference places them at evenly spaced positions): a latent
  then has no place in the sequence, so one fitted on a prefix can serve the tokens after it.
- a fresh noise ε at every fast step and for the slow step's sample (the paper's algorithm; the code draws
  one ε per fit, `fresh_noise=False`): the decoder then trains on samples of q, not on one ε that μ absorbed.
- every fit starts fresh at μ ~ N(0, 0.01²), as the reference (`cold_start=True`: μ is not carried over between
  epochs), and logvar ~ N(0, 0.1²) on the CPU, not the reference's N(-5, 0.1²) (`--init-logvar`; chosen on
  validation): from -5 every fit starts at a KL of about 2 nats per dimension whatever the data, the few fast steps
  leave σ small, and the decoder learns to read each window's own code from a near-noiseless μ, so z fitted on a
  prefix misleads it about the rest; from 0 a fit pays KL only for what z carries. `--preset gpu` keeps -5.
- the reported bound evaluates the NLL at a fresh ε' (the reference re-uses the fit's ε, which makes the
  one-sample estimate optimistic): an unbiased single-sample ELBO, a bound in expectation.
- the fast steps differentiate only (μ, logvar) (the reference's loss.backward() also accumulates decoder
  gradients, which its slow step then adds to its own).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("text",)


@dataclass
class Config:
    steps: int = 600  # slow (decoder) optimizer steps
    batch_size: int = 16  # sequences per step (each costs fast_steps forward and backward passes, then one more)
    lr: float = 3e-3  # slow-learning peak lr (paper: 4e-4 at 38M-76M params)
    warmup_steps: int = 20  # linear warmup of the slow lr (train.py)
    eval_steps: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)  # thinking steps T at test time; 0 = z from the prior
    d_model: int = 64  # width d of the decoder
    d_z: int = 64  # width of a latent thought vector (the reference: d_model)
    n_layers: int = 3  # decoder blocks, each with its own latent thoughts
    n_heads: int = 2  # attention heads (self and cross)
    n_z_per_layer: int = 8  # latent thought vectors per layer (the reference: 8)
    window: int = 16  # self-attention window in tokens, itself included (0 = full causal attention)
    fast_steps: int = 4  # T: posterior AdamW steps per training sequence (paper: 16; 4 keeps the CPU run short)
    fast_lr: float = 0.3  # fast-learning peak lr, cosine to fast_lr/10 over the T steps (paper: 0.3)
    init_logvar: float = 0.0  # each fit starts at logvar ~ N(init_logvar, 0.1²), q at the prior's scale (paper: -5)
    fresh_noise: bool = True  # a new ε at every fast step and for the slow step's sample; False: one ε per fit (code)
    grad_clip: float = 1.0  # max global grad norm of the slow step (paper: 1.0)
    beta1: float = 0.9  # slow AdamW betas (paper: 0.9, 0.95)
    beta2: float = 0.95
    weight_decay: float = 0.1  # slow AdamW weight decay on 2-D weights (paper: 0.1)
    use_latent: bool = True  # False: the plain decoder of the same size, no z (the control)
    eval_subset: int = 32  # held-out windows per test set used by evaluate() (each costs Σ eval_steps fits, twice)
    eval_batch_size: int = 64  # windows per posterior fit in evaluate() (memory and speed only)


# the reference's shape: 1,024-token windows (context_length, a train.py option), 12 layers of width 512 with
# 8 latents each, self-attention window 256, T = 16, the reference's logvar init
GPU_CONFIG = dict(context_length=1024, d_model=512, d_z=512, n_layers=12, n_heads=8, n_z_per_layer=8, window=256, fast_steps=16,
                  init_logvar=-5.0, batch_size=32, steps=20000, lr=4e-4, warmup_steps=1000, eval_subset=256, eval_batch_size=32,
                  eval_steps=(0, 4, 16, 32, 64))


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

    def forward(self, h, cos, sin, visible, z_layer, cache=None):
        h = h + self.attn(self.attn_norm(h), cos, sin, visible, cache)
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

    def forward(self, tokens, z=None, cache=None):
        """tokens (B, N) long, z (B, n_latents, d_z) or None -> logits (B, N, V).
        cache: optional list with one dict per block, for token-by-token decoding (see generate)."""
        B, N = tokens.shape
        start = cache[0]["k"].shape[2] if cache and cache[0] else 0  # tokens already in the cache
        cos, sin = self.rope_cos[start:start + N], self.rope_sin[start:start + N]  # (N, hd/2)
        visible = self.visible[start:start + N, :start + N]  # (N, start + N)
        z_layers = z.view(B, self.n_layers, -1, self.d_z).unbind(1) if z is not None else [None] * self.n_layers
        caches = cache if cache is not None else [None] * self.n_layers
        h = self.embed(tokens)  # (B, N, D)
        for block, z_layer, layer_cache in zip(self.blocks, z_layers, caches):  # z_layer (B, Z, d_z)
            h = block(h, cos, sin, visible, z_layer, layer_cache)
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
    fused = params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused)


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
    loss = (nll + kl).sum()
    return loss, {"nll": nll.sum().detach(), "kl": kl.sum().detach()}


# ----------------------------------------------------------------------------- fast learning (thinking)
def fast_lr_at(step, thinking_steps, peak):
    """Cosine from peak to peak/10 over the T fast steps (reference optimizer.py)."""
    return peak / 10 + 0.5 * (1 + math.cos(math.pi * step / thinking_steps)) * (peak - peak / 10)


def example_generators(batch: dict, device) -> list | None:
    """One generator per example, seeded by batch["example_seed"] (B,) (train.py draws one per example and step):
    an example's noise then does not depend on the rest of its batch, so torchrun ranks holding slices draw what
    one process draws. The seeds stay on the CPU (read without a device sync); the generators live on `device`.
    None (the global generator) for a batch without seeds."""
    if "example_seed" not in batch:
        return None
    return [torch.Generator(device).manual_seed(seed) for seed in batch["example_seed"].tolist()]


def example_noise(shape, generators, device) -> torch.Tensor:
    """N(0, 1) of `shape` on `device`: row b from generators[b], or all from the global generator if None."""
    if generators is None:
        return torch.randn(shape, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generators])


def fit_posterior(model, tokens, thinking_steps, config, autocast_dtype, generators=None):
    """Fast learning: T AdamW steps on q(z|x) = N(μ, diag e^logvar) for every sequence of tokens (B, S),
    decoder frozen, minimising the negative ELBO. fresh_noise: a new ε at every step and for the returned
    one (the caller's z = μ + σ ε is then a fresh sample of q); else one draw ε, reused by every step and
    returned. T = 0 returns the prior (μ = 0, logvar = 0). Returns detached μ, logvar, ε, each (B, n_latents, d_z)."""
    shape = (tokens.shape[0], model.n_latents, model.d_z)
    eps = example_noise(shape, generators, tokens.device)
    if thinking_steps == 0:
        return torch.zeros(shape, device=tokens.device), torch.zeros(shape, device=tokens.device), eps
    mu = (0.01 * example_noise(shape, generators, tokens.device)).requires_grad_()  # μ ~ N(0, 0.01²)
    logvar = (config.init_logvar + 0.1 * example_noise(shape, generators, tokens.device)).requires_grad_()
    # One optimizer over the whole batch: the loss is a sum over sequences and sequence b's (μ_b, logvar_b)
    # only enter its own term, so each gets exactly its own gradient; AdamW normalises per element, so
    # this is identical to B separate per-sequence optimisers, vectorised. torch's default weight decay, 0.01.
    optimizer = torch.optim.AdamW([mu, logvar], lr=config.fast_lr, betas=(0.9, 0.999))
    with torch.enable_grad():
        for step in range(thinking_steps):
            optimizer.param_groups[0]["lr"] = fast_lr_at(step, thinking_steps, config.fast_lr)
            if config.fresh_noise and step:
                eps = example_noise(shape, generators, tokens.device)
            loss, _ = negative_elbo(model, tokens, mu, logvar, eps, autocast_dtype)
            optimizer.zero_grad(set_to_none=True)
            # decoder frozen: backward only to (μ, logvar). No GradScaler: the summed loss keeps fp16
            # gradients well above underflow, and Adam ignores the loss scale anyway.
            loss.backward(inputs=[mu, logvar])
            optimizer.step()
    if config.fresh_noise:
        eps = example_noise(shape, generators, tokens.device)
    return mu.detach(), logvar.detach(), eps


@torch.no_grad()
def elbo_bound(model, tokens, thinking_steps, config, autocast_dtype=None):
    """Fit q(z|x) on the windows themselves with T = thinking_steps (0: the prior), then the negative ELBO
    with the NLL at z = μ + σ ε' for a fresh ε' (the fit's own ε would make the one-sample estimate
    optimistic). tokens (B, S); chunked by config.eval_batch_size. Returns summed nats {"nll", "kl"}."""
    nll = kl = 0.0
    for chunk in check_tokens(tokens, model).split(config.eval_batch_size):
        mu, logvar, _ = fit_posterior(model, chunk, thinking_steps, config, autocast_dtype)
        _, metrics = negative_elbo(model, chunk, mu, logvar, torch.randn_like(mu), autocast_dtype)
        nll, kl = nll + metrics["nll"].item(), kl + metrics["kl"].item()
    return {"nll": nll, "kl": kl}


@torch.no_grad()
def conditional_nll(model, tokens, thinking_steps, config, autocast_dtype=None):
    """Fit q(z | first half) with T = thinking_steps (0: the prior), then the exact -log p_β(second half |
    first half, z = μ): the fit reads only tokens[:, :S // 2], so no KL term and no token of the second half
    enters it. The plain decoder (no z) scores the same tokens. tokens (B, S) -> summed nats (float)."""
    half = tokens.shape[1] // 2
    total = 0.0
    for chunk in check_tokens(tokens, model).split(config.eval_batch_size):
        z = fit_posterior(model, chunk[:, :half], thinking_steps, config, autocast_dtype)[0] if model.use_latent else None
        total += token_nll(model, chunk, z, autocast_dtype, first=half).sum().item()
    return total


@torch.no_grad()
def generate(model, prefix, thinking_steps, n_new, config, autocast_dtype=None, temperature=0.0):
    """Conditional generation: fit q(z|prefix) with T = thinking_steps (0: z from the prior), then decode
    n_new tokens with z = μ fixed and a key/value cache. prefix (B, P) -> (B, P + n_new)."""
    check_tokens(prefix, model)
    if prefix.shape[1] + n_new - 1 > model.max_len:
        raise ValueError(f"prefix length + n_new - 1 = {prefix.shape[1] + n_new - 1} exceeds max_len {model.max_len}")
    z = fit_posterior(model, prefix, thinking_steps, config, autocast_dtype)[0] if model.use_latent else None
    cache, tokens, new_tokens = [{} for _ in range(model.n_layers)], prefix, []
    for _ in range(n_new):
        with torch.autocast(prefix.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(tokens, z, cache)[:, -1].float()  # (B, V); the first call reads the whole prefix
        if temperature == 0:
            tokens = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            tokens = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)  # (B, 1)
        new_tokens.append(tokens)
    return torch.cat([prefix, *new_tokens], dim=1)


# ----------------------------------------------------------------------------- slow learning (training)
def train_step(model, optimizer, scaler, batch, step, config, autocast_dtype):
    """Fast learning of q(z|x) for the batch (decoder frozen), then one slow AdamW step on β given z."""
    if "tokens" not in batch:
        raise ValueError("a text batch needs a 'tokens' long tensor of shape (B, N)")
    tokens = check_tokens(batch["tokens"], model)  # (B, S)
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
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if not model.use_latent:
        return {"loss": loss.detach()}
    kl_per_token = kl_to_prior(mu, logvar).mean() / (tokens.shape[1] - 1)
    return {"loss": loss.detach(), "nelbo/token": (loss + kl_per_token).detach()}  # -ELBO per token, training T


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, task, config, eval_steps, autocast_dtype):
    """Rows per (test set, thinking steps T) on config.eval_subset held-out windows of each test set:
    cond NLL/char: the exact NLL of each window's second half given its first half and z = μ fitted on the
               first half with T steps (T = 0: z = 0, the prior's mean);
    NLL/char, KL/char, bound/char: the negative ELBO of whole windows with q fitted on them (T = 0: q = the
               prior, KL = 0), the NLL at a fresh sample of q;
    seconds: the row's wall time. The plain decoder (use_latent=False) gives one row per test set (T = 0)
    with the same conditional NLL and its exact NLL of whole windows."""
    model.eval()
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for set_name, test_set in task.test_sets.items():
            tokens = check_tokens(test_set["tokens"][:config.eval_subset].to(device), model)  # (n, S)
            n_whole, n_second = tokens.shape[0] * (tokens.shape[1] - 1), tokens.shape[0] * (tokens.shape[1] - tokens.shape[1] // 2)
            for thinking_steps in (eval_steps if model.use_latent else (0,)):
                torch.manual_seed(0)  # the same posterior inits and noise for every T and every run
                start = time.perf_counter()
                row = {"test set": set_name, "thinking steps": thinking_steps,
                       "cond NLL/char": conditional_nll(model, tokens, thinking_steps, config, autocast_dtype) / n_second}
                if model.use_latent:
                    bound = elbo_bound(model, tokens, thinking_steps, config, autocast_dtype)
                    row["NLL/char"], row["KL/char"] = bound["nll"] / n_whole, bound["kl"] / n_whole
                    row["bound/char"] = row["NLL/char"] + row["KL/char"]
                else:
                    row["NLL/char"] = token_nll(model, tokens, None, autocast_dtype).sum().item() / n_whole
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
    model.train()
    return rows


if __name__ == "__main__":  # tiny demo: a character LM on a repeated sentence, the bound against T
    class DemoText:
        name, vocab_size, seq_len = "text", 27, 32
    corpus = torch.tensor([[ord(c) - 96 if c != " " else 0 for c in "the quick brown fox jumps over the lazy dog "]])
    config = Config(d_model=32, d_z=8, n_layers=2, n_heads=2, n_z_per_layer=2, window=4, fast_steps=4, batch_size=8)
    model = build_model(config, DemoText())
    optimizer, scaler = make_optimizer(model, config), torch.amp.GradScaler(enabled=False)
    windows = corpus.repeat(1, 3)[0].unfold(0, 33, 1)  # (N, 33) sliding windows
    for step in range(60):
        stats = train_step(model, optimizer, scaler, {"tokens": windows[torch.randint(len(windows), (8,))]},
                           step, config, None)
    print(f"train -ELBO/token after 60 steps: {stats['nelbo/token'].item():.3f}")
    for thinking_steps in (0, 1, 4, 16):
        bound = elbo_bound(model, windows[:16], thinking_steps, config)
        print(f"T={thinking_steps:2d}: -ELBO/token {(bound['nll'] + bound['kl']) / (16 * 32):.3f}")
