"""Latent Visual Reasoning (LVR, ICLR 2026): the LLM "thinks" by reconstructing visual tokens.

A vision encoder and a projector turn the image into visual tokens v; a causal LLM reads
    [question, v, <lvr_start>, x_1 .. x_N, <lvr_end>, answer, <eos>],
where no token is decoded between the markers: the last hidden state is the next input embedding, x_{t+1} = h_t
(Coconut-style, KV cache kept). The thinking budget is the number of latent steps N.
Stage 1 (lvr_loss): L = L_NTP + λ·L_LVR, L_LVR = 1/N Σ_t ||h_t − v_t||², L_NTP = −1/T_y Σ_t log p(y_t | y_<t, h_{1:N}).
Stage 2 (GRPO_latent, `--stage rl`): J = E[min(ρ_t Â_i, clip(ρ_t, 1−ε, 1+ε) Â_i) − β·D_KL(π_θ‖π_ref)] with
    Â_i = (r_i − mean(r)) / (std(r) + 1e-4) over G rollouts of a question, r = r_format + r_accuracy.

Deviations from the paper (Qwen2.5-VL 3B/7B on Visual-CoT):
- a tiny ViT and LLM trained from scratch on vqa_data's synthetic task, lr 1e-3 (paper 1e-5): nothing is pretrained;
- stage 0 (alignment_loss: VQA plus an object and a grounding loss) stands in for the pretrained VLM;
- a fixed 2D sin-cos code on the visual tokens stands in for Qwen2.5-VL's 2D M-RoPE;
- the projector ends in a LayerNorm: the visual tokens get the scale of the normed h that L_LVR regresses on them;
- λ = 1 (paper 0.1): the answer pass reads detached latents, so L_LVR alone teaches the latents where to look;
- L_NTP's answer on a second pass fed the model's own detached latents (scheduled sampling from the ROI tokens);
- the ROI tokens averaged to exactly latent_steps targets (the train/test budget mismatch of the reference code);
- GRPO_latent samples the latents x_{t+1} = h_t + σε with greedy text (the official code replays fixed latents as
  constants: RL has no signal for them), on fresh questions, not the SFT pool.
Controls beyond the paper (same run, batches, stage-0 LLM): a no-latent baseline; a CoT writing what the latents hold.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import vqa_data

TASKS = ("vqa",)


@dataclass
class Config:
    steps: int = 2000                 # optimizer steps (the first align_steps are stage 0)
    batch_size: int = 32              # questions per step (GRPO: questions, each with group_size rollouts)
    lr: float = 1e-3                  # peak lr (paper: 1e-5 SFT / 5e-6 RL on a pretrained 7B)
    warmup_steps: int = 100           # linear warmup steps
    grad_clip: float = 1.0            # max global grad norm, applied to each trained model on its own
    beta1: float = 0.9                # AdamW β1
    beta2: float = 0.98               # AdamW β2
    weight_decay: float = 0.01        # AdamW weight decay (matrices only)
    eval_steps: tuple[int, ...] = (0, 1, 2, 4)  # fixed latent budgets in the table
    stage: str = "sft"                # "sft": stage 0 then stage 1; "rl": stage 2 (GRPO_latent)
    align_steps: int = 800            # stage-0 steps (all modules, plain VQA) before LVR SFT
    baseline: bool = True             # also train the SFT data baseline (no latent segment) in the same run
    cot: bool = True                  # also train the text chain-of-thought baseline in the same run
    d_model: int = 128                # width of ViT, projector and LLM
    n_layers: int = 3                 # LLM decoder blocks
    n_heads: int = 4                  # attention heads
    encoder_layers: int = 2           # ViT blocks
    lvr_weight: float = 1.0           # λ in L = L_NTP + λ·L_LVR (paper: 0.1; see docstring)
    exit_weight: float = 0.1          # λ_ms: weight of the latent-end-vector and mode-switching losses (paper 0.1)
    latent_steps: int = 2             # trained latent budget: the ROI tokens pooled to this many targets
    teacher_ramp: int = 500           # stage-1 steps over which the answer pass moves from ROI tokens to own latents
    end_threshold: float = 0.02       # latent-end exit: MSE to the end vector below this
    max_latent: int = 16              # step cap of the adaptive exits (latent end, mode switching, RL rollouts)
    group_size: int = 8               # GRPO group size G (and k of the validation pass@k)
    policy_updates: int = 2           # GRPO optimizer steps per rollout batch (the clip acts from the second)
    latent_sigma: float = 0.5         # σ of the RL latent policy x_{t+1} = h_t + σε (validation rows: 0, σ/2, σ, 2σ)
    clip_eps: float = 0.2             # PPO/GRPO clip ε
    kl_beta: float = 0.04             # β of the KL to the frozen reference policy
    validation_size: int = 256        # validation questions (fresh scenes) for the latent policy's pass@1 / pass@G

    def __post_init__(self):
        if self.stage not in ("sft", "rl"):
            raise ValueError(f"stage must be 'sft' or 'rl', got {self.stage!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.eval_steps, default=0) < 0 or self.latent_steps < 1 or self.group_size < 2:
            raise ValueError("eval_steps must be >= 0, latent_steps >= 1 and group_size >= 2")
        if self.policy_updates < 1 or self.teacher_ramp < 0:
            raise ValueError("policy_updates must be >= 1 and teacher_ramp >= 0")
        if self.latent_sigma < 0 or (self.stage == "rl" and self.latent_sigma == 0) or self.grad_clip <= 0:
            raise ValueError("latent_sigma must be >= 0 (> 0 for --stage rl) and grad_clip > 0")


GPU_CONFIG = dict(d_model=384, n_layers=8, n_heads=6, encoder_layers=4, steps=12000, align_steps=4000,
                  batch_size=256, lr=5e-4)

# ---- Model: ViT encoder, projector, decoder LLM with a KV cache --------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads, self.qkv, self.proj = n_heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, causal, cache=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        if cache is not None:  # append to the KV cache of earlier positions
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        past = k.shape[2] - T
        # with a cache, new queries see the cached keys and the new keys up to themselves
        mask = (torch.arange(k.shape[2], device=x.device)[None] <= past + torch.arange(T, device=x.device)[:, None]
                if causal and past and T > 1 else None)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and not past)
        return self.proj(y.transpose(1, 2).reshape(B, T, D)), (k, v)  # (B, T, D)


class Block(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, n_heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, causal, cache=None):
        a, cache = self.attn(self.ln1(x), causal, cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache


class VisionEncoder(nn.Module):
    """ViT: non-overlapping patches -> linear -> + position -> bidirectional blocks."""

    def __init__(self, config, image_size, patch_size, patch_classes):
        super().__init__()
        self.patch_size, n_patches = patch_size, (image_size // patch_size) ** 2
        self.patch = nn.Linear(3 * patch_size ** 2, config.d_model)
        self.pos = nn.Parameter(torch.randn(n_patches, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.encoder_layers))
        self.ln = nn.LayerNorm(config.d_model)
        self.object_head = nn.Linear(config.d_model, patch_classes)  # stage-0 patch-object classifier only

    def forward(self, image):  # (B, 3, H, W), patches in row-major order
        patches = F.unfold(image, self.patch_size, stride=self.patch_size).transpose(1, 2)  # (B, P, 3p²)
        x = self.patch(patches) + self.pos                                                # (B, P, D)
        for block in self.blocks:
            x, _ = block(x, causal=False)
        return self.ln(x)


class Decoder(nn.Module):
    """Causal LLM over input embeddings; returns the last hidden state (after the final norm), logits, KV cache."""

    def __init__(self, config, vocab_size, max_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.pos = nn.Parameter(torch.randn(max_len, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.ln = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, vocab_size, bias=False)

    def forward(self, inputs, cache=None):  # inputs (B, T, D) embeddings; cache: list of (k, v) per block
        start = cache[0][0].shape[2] if cache else 0
        if start + inputs.shape[1] > len(self.pos):
            raise ValueError(f"sequence of {start + inputs.shape[1]} positions exceeds max_len {len(self.pos)}")
        x = inputs + self.pos[start:start + inputs.shape[1]]
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, causal=True, cache=cache[i] if cache else None)
            new_cache.append(kv)
        h = self.ln(x)                      # (B, T, D): "last hidden state", fed back in latent mode
        return h, self.head(h), new_cache   # logits (B, T, V)


class LVRModel(nn.Module):
    """Vision encoder -> projector -> LLM; the latent end vector; the baseline LLMs; for GRPO the frozen π_ref."""

    def __init__(self, config, task):
        super().__init__()
        self.config, self.task = config, task
        grid = task.image_size // task.patch_size
        self.n_patches = grid * grid
        max_latent = max(config.max_latent, config.latent_steps, self.n_patches, *config.eval_steps)
        # the longer response (LVR's markers and latents, or the hop words), the answer, <eos>, 5 spare positions
        self.max_len = self.n_patches + task.question_len + max(max_latent + 2, task.hop_len) + task.answer_len + 6
        self.encoder = VisionEncoder(config, task.image_size, task.patch_size, task.patch_classes)
        self.projector = nn.Sequential(nn.Linear(config.d_model, config.d_model), nn.GELU(),
                                       nn.Linear(config.d_model, config.d_model), nn.LayerNorm(config.d_model))
        self.grounding_head = nn.Linear(config.d_model, 1)  # stage-0 ROI-patch classifier only
        self.llm = Decoder(config, task.vocab_size, self.max_len)
        self.baseline_llm = Decoder(config, task.vocab_size, self.max_len) if config.baseline else None
        self.cot_llm = Decoder(config, task.vocab_size, self.max_len) if config.cot else None
        end = F.normalize(torch.randn(config.d_model), dim=0) * math.sqrt(config.d_model)  # norm √H (paper)
        self.latent_end = nn.Parameter(end)                      # the latent end vector e, for the latent-end exit
        self.register_buffer("baseline_ready", torch.tensor(False))  # baseline LLMs copied from stage 0?
        self.register_buffer("visual_pos", grid_position_code(grid, config.d_model), persistent=False)
        self.reference = copy.deepcopy(self.llm).requires_grad_(False) if config.stage == "rl" else None  # π_ref

    def visual_tokens(self, image):  # (B, 3, H, W) -> (B, P, D): the projector outputs v, with their 2D position
        return self.projector(self.encoder(image)) + self.visual_pos

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """A stage-1 checkpoint holds no π_ref: GRPO's reference policy starts as the checkpoint's LLM."""
        if self.reference is not None and not any(key.startswith("reference.") for key in state_dict):
            state_dict = {**state_dict, **{"reference." + key[len("llm."):]: value
                                           for key, value in state_dict.items() if key.startswith("llm.")}}
        return super().load_state_dict(state_dict, strict, assign)

    def compile(self, *args, **kwargs):
        """torch.compile every pass of training and the thinking loop: encoder, projector and decoder forwards."""
        for module in (self.encoder, self.projector, self.llm, self.baseline_llm, self.cot_llm, self.reference):
            if module is not None:
                module.compile(*args, **kwargs)


def grid_position_code(grid, d):
    """(grid², d) fixed 2D sin-cos code of each patch's (x, y) (ours, for Qwen2.5-VL's 2D M-RoPE)."""
    if d % 4:
        raise ValueError(f"d_model must be a multiple of 4 for the 2D position code, got {d}")
    freq = grid ** (-torch.arange(d // 4) / (d // 4))                                  # 1 .. 1/grid rad per patch
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angle = torch.cat([x.reshape(-1, 1) * freq, y.reshape(-1, 1) * freq], 1)         # (grid², d/2)
    return torch.cat([angle.sin(), angle.cos()], 1)                                   # (grid², d), row-major


def build_model(config, task):
    if not hasattr(task, "lvr_start_id"):
        raise ValueError("lvr needs the vqa task (vqa_data.VQATask)")
    if config.stage == "rl":
        task.train_on_fresh_scenes()  # GRPO trains on questions the SFT stage never saw
    return LVRModel(config, task)


def make_optimizer(model, config):
    trained = [p for p in model.parameters() if p.requires_grad]  # not π_ref
    return torch.optim.AdamW([{"params": [p for p in trained if p.dim() >= 2], "weight_decay": config.weight_decay},
                              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}],
                             lr=config.lr, betas=(config.beta1, config.beta2))

# ---- The paper's loss (stage 1): L = L_NTP + λ·L_LVR, plus the exits' losses -------------------------------------


def prompt(llm, visual, question):
    """[question, v] embeddings (B, Lq + P, D): the question first, so each visual token can read it (ours)."""
    return torch.cat([llm.embed(question).to(visual.dtype), visual], 1)


def roi_targets(visual, boxes, task, k):
    """The targets v_1..v_k (B, k, D): the N visual tokens of the patches the ROI boxes (B, K, 4) touch, box by box
    (a chain of K boxes, ours), row-major within a box, averaged over k segments (ours; the paper takes all N)."""
    chain = boxes.view(len(boxes), -1, 4)                                                              # (B, K, 4)
    mask = vqa_data.roi_patch_mask(chain.flatten(0, 1).cpu(), task.image_size, task.patch_size)       # (B·K, P)
    mask = mask.view(len(boxes), -1).to(visual.device)                                  # (B, K·P): box k at k·P + p
    visual = visual.repeat(1, chain.shape[1], 1)                                        # (B, K·P, D)
    count, rank = mask.sum(1), mask.cumsum(1) - 1                                       # (B,), (B, K·P)
    j = torch.arange(k, device=visual.device)[None]                                                   # (1, k)
    lo = (j * count[:, None]) // k
    hi = torch.maximum(((j + 1) * count[:, None]) // k, lo + 1)                                      # (B, k)
    weight = mask[:, None] & (rank[:, None] >= lo[..., None]) & (rank[:, None] < hi[..., None])     # (B, k, K·P)
    weight = weight.float() / weight.sum(-1, keepdim=True)
    return weight.to(visual.dtype) @ visual


def example_rand(batch, shape, device):
    """torch.rand(shape); row b from a generator seeded by batch["example_seed"][b] where the batch has them."""
    if "example_seed" not in batch:
        return torch.rand(shape, device=device)
    return torch.stack([torch.rand(shape[1:], generator=torch.Generator(device).manual_seed(seed), device=device)
                        for seed in batch["example_seed"].tolist()])


def lvr_loss(model, visual, batch, teacher_prob=0.0):
    """Stage 1 over [question, v, <lvr_start>, x_1..x_N, <lvr_end>, answer, <eos>], N = latent_steps, in two passes
    sharing the prefix [question, v, <lvr_start>] (its KV cache). Pass 1, teacher-forced (x_t = v_t): L_LVR (raw last
    hidden state, no head), L_NTP on the markers, the exits' L_end = ||h_N − e||² and L_switch = BCE of the <lvr_end>
    logit at <lvr_start>, v_1..v_N (1 only at v_N's). Pass 2, fed the own latents decoded as at test time (detached;
    v_t with probability teacher_prob): L_NTP on the answer. L = L_NTP + λ·L_LVR + λ_ms·(L_end + L_switch)."""
    config, task, llm = model.config, model.task, model.llm
    targets = roi_targets(visual, batch["box"], task, config.latent_steps)             # (B, N, D): v_1..v_N
    B, N, D = targets.shape
    answer, one = batch["answer"], torch.ones_like(batch["answer"][:, :1])            # (B, A), (B, 1)
    response = torch.cat([task.lvr_end_id * one, answer, task.eos_id * one], 1)       # after the latents (B, A+2)
    start = llm.embed.weight[task.lvr_start_id].expand(B, 1, D).to(visual.dtype)
    h_prefix, logits_prefix, cache = llm(torch.cat([prompt(llm, visual, batch["question"]), start], 1))
    s = h_prefix.shape[1] - 1                                                          # position of <lvr_start>

    def response_pass(latents):  # [x_1..x_N, <lvr_end>, answer, <eos>] after the cached prefix
        inputs = torch.cat([latents.to(visual.dtype), llm.embed(response).to(visual.dtype)], 1)
        h_response, logits_response, _ = llm(inputs, cache)
        return torch.cat([h_prefix, h_response], 1), torch.cat([logits_prefix, logits_response], 1)

    # labels of positions s-1 .. s+N+A+1: <lvr_start>, no label at the N latents, <lvr_end>, answer, <eos>
    labels = torch.cat([task.lvr_start_id * one, -100 * one.expand(B, N),
                        response.masked_fill(response == task.pad_id, -100)], 1)      # (B, N+A+3)
    is_marker = (labels == task.lvr_start_id) | (labels == task.lvr_end_id)

    def ntp(logits, keep):  # shifted cross-entropy over the kept labels
        return F.cross_entropy(logits[:, s - 1:s - 1 + labels.shape[1]].flatten(0, 1).float(),
                               labels.masked_fill(~keep, -100).flatten(), ignore_index=-100)

    h, logits = response_pass(targets)                                                 # pass 1: teacher-forced
    # L_LVR = 1/N Σ_t ||h_t − v_t||² (mean over dimensions): h(<lvr_start>) -> v_1, h(slot of v_1) -> v_2, ...
    l_lvr = ((h[:, s:s + N].float() - targets.float()) ** 2).mean(-1).flatten().mean()
    with torch.no_grad():  # pass 2's latents: free-running from the prefix's (detached) KV cache
        x, own, own_cache = h_prefix[:, -1:].detach(), [], [(k.detach(), v.detach()) for k, v in cache]
        for _ in range(N):
            own.append(x)
            x, _, own_cache = llm(x, own_cache)
        own = torch.cat(own, 1).to(targets.dtype)                                      # (B, N, D)
    teacher = example_rand(batch, (B, N, 1), visual.device)
    _, own_logits = response_pass(torch.where(teacher < teacher_prob, targets, own))   # pass 2
    l_answer = ntp(own_logits, ~is_marker)   # same weight on the answer token as direct_loss gives the baseline
    l_ntp = ntp(logits, is_marker) + l_answer
    l_end = ((h[:, s + N].float() - model.latent_end) ** 2).mean()                     # latent end vector e
    end_logit = logits[:, s:s + N + 1, task.lvr_end_id].float().flatten()             # mode switching, (B·(N+1))
    switch = (torch.arange(N + 1, device=visual.device) == N).float().repeat(B)       # 1 only at v_N's slot
    l_switch = F.binary_cross_entropy_with_logits(end_logit, switch)
    loss = l_ntp + config.lvr_weight * l_lvr + config.exit_weight * (l_end + l_switch)
    metrics = {"L_NTP": l_ntp, "L_LVR": l_lvr, "answer_NTP": l_answer, "L_end": l_end, "L_switch": l_switch}
    return loss, {k: v.detach() for k, v in metrics.items()}

# ---- The thinking loop: text, then latent mode (h_t is the next input), then text --------------------------------


@torch.no_grad()
def generate(model, llm, visual, question, thinking_steps, exit_rule="fixed", fed_latents=None, sigma=0.0):
    """Greedy decoding of all rows in lockstep with a KV cache. After <lvr_start> a row is in latent mode: the next
    input is x_{t+1} = h_t (+ σε: GRPO_latent's policy; fed_latents (B, thinking_steps, D): a control's) until the
    exit rule or the cap thinking_steps ends it with <lvr_end>. Exit rules: fixed (the budget alone), latent_end
    (||h_t − e||², mean over dimensions, < end_threshold), mode_switch (<lvr_end> decoded, as the official code).
    Returns tokens (B, R) (pad at latent slots), latents (B, R, D) (inputs x), is_latent, capped (cap hit), sigma."""
    task, B, device = model.task, visual.shape[0], visual.device
    h, logits, cache = llm(prompt(llm, visual, question))
    h, logits = h[:, -1], logits[:, -1]                                               # (B, D), (B, V)
    left = torch.full((B,), -1, device=device)  # latent steps still allowed; -1: before the segment, -2: after it
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = {k: [] for k in ("tokens", "latents", "is_latent", "capped")}
    for _ in range(max(thinking_steps + 2, task.hop_len) + task.answer_len + 1):
        token = logits.argmax(-1)                                                       # (B,)
        in_latent, cap = left >= 0, left == 0
        chose_end = (((h.float() - model.latent_end) ** 2).mean(-1) < model.config.end_threshold
                     if exit_rule == "latent_end" else (token == task.lvr_end_id) & (exit_rule == "mode_switch"))
        leave = in_latent & (cap | chose_end)
        feed = in_latent & ~leave
        x = h.float()                                                                   # x_{t+1} = h_t
        if fed_latents is not None:
            slot = (thinking_steps - left).clamp(0, thinking_steps - 1)                 # the i-th latent fed
            x = torch.where(feed[:, None], fed_latents[torch.arange(B), slot].float(), x)
        elif sigma > 0:
            x = x + sigma * torch.randn_like(x)                                         # x_{t+1} = h_t + σε
        text = ~in_latent & ~done                                                       # a text token is decoded
        token = torch.where(leave, task.lvr_end_id, torch.where(feed | done, task.pad_id, token))
        out["tokens"].append(token)
        out["latents"].append(torch.where(feed[:, None], x, 0).to(h.dtype))
        out["is_latent"].append(feed)
        out["capped"].append(leave & cap & (exit_rule != "fixed"))
        entering = text & (token == task.lvr_start_id) & (left == -1)
        left = torch.where(entering, thinking_steps, torch.where(feed, left - 1, torch.where(leave, -2, left)))
        done |= text & (token == task.eos_id)
        if bool(done.all()):
            break
        inputs = torch.where(feed[:, None], x.to(h.dtype), llm.embed(token).to(h.dtype))[:, None]  # (B, 1, D)
        h, logits, cache = llm(inputs, cache)
        h, logits = h[:, -1], logits[:, -1]
    return {**{k: torch.stack(v, 1) for k, v in out.items()}, "sigma": sigma if fed_latents is None else 0.0}

# ---- GRPO_latent (stage 2): rewards, advantages, the replay, the clipped objective -------------------------------


def replay_latents(llm, visual, question, rollout):
    """One pass over [question, v, response] with the rollout's latents x patched in, so π_θ sees the rollout's
    context. Returns h (B, R, D) before each response slot and logp (B, R) = log N(x_{t+1}; h_t, σ²I) at the latent
    slots, per dimension (ours: a sum over d makes one latent's log-ratio d times what the clip ε is set for)."""
    response = torch.where(rollout["is_latent"][..., None], rollout["latents"].to(visual.dtype),
                           llm.embed(rollout["tokens"]).to(visual.dtype))               # (B, R, D)
    h, _, _ = llm(torch.cat([prompt(llm, visual, question), response[:, :-1]], 1))
    h = h[:, -response.shape[1]:].float()                                               # before each slot
    logp = torch.distributions.Normal(h, rollout["sigma"]).log_prob(rollout["latents"].float()).mean(-1)
    return {"h": h, "logp": logp * rollout["is_latent"]}


def answer_correct(rollout, answer, task, skip=0):
    """Accuracy: the text tokens after the first `skip` (specials and pads removed) are the answer, then <eos>."""
    tokens = rollout["tokens"][:, skip:]                                                # (B, R)
    special = torch.isin(tokens, torch.tensor([task.pad_id, task.lvr_start_id, task.lvr_end_id], device=tokens.device))
    text = tokens.gather(1, torch.sort(special.int(), dim=1, stable=True).indices)      # text tokens first
    text = F.pad(text, (0, answer.shape[1] + 1), value=task.pad_id)
    return (text[:, :answer.shape[1]] == answer).all(1) & (text[:, answer.shape[1]] == task.eos_id)


def rewards(rollout, answer, task):
    """(r, r_format, r_accuracy) (B,), r = r_format + r_accuracy. r_format: exactly <lvr_start> (latents) <lvr_end>
    answer word(s) <eos>, the segment ended by the model (not by the cap); r_accuracy: answer_correct."""
    tokens = rollout["tokens"]
    text = tokens.gather(1, torch.sort((tokens == task.pad_id).int(), dim=1, stable=True).indices)  # pads last
    text = F.pad(text, (0, task.answer_len + 3), value=task.pad_id)
    words = text[:, 2:2 + task.answer_len]
    specials = torch.tensor([task.pad_id, task.eos_id, task.lvr_start_id, task.lvr_end_id], device=tokens.device)
    has_format = ((text[:, 0] == task.lvr_start_id) & (text[:, 1] == task.lvr_end_id)
                  & ~torch.isin(words, specials).any(1) & (text[:, 2 + task.answer_len] == task.eos_id)
                  & ~rollout["capped"].any(1)).float()
    correct = answer_correct(rollout, answer, task).float()
    return has_format + correct, has_format, correct


def group_advantages(reward):
    """GRPO advantages Â_i = (r_i − mean_group)/(std_group + 1e-4) for rewards (B, G)."""
    return (reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)


@torch.no_grad()
def grpo_rollouts(model, visual, batch):
    """G rollouts per question (greedy text, x_{t+1} = h_t + σε, mode switching capped at max_latent), rewards,
    advantages, log π_θold by the loss's own replay (the first ratio is exactly 1, also under autocast), π_ref's h."""
    config, task, G = model.config, model.task, model.config.group_size
    visual = visual.repeat_interleave(G, 0)                                          # (B*G, P, D)
    question, answer = batch["question"].repeat_interleave(G, 0), batch["answer"].repeat_interleave(G, 0)
    rollout = generate(model, model.llm, visual, question, config.max_latent, "mode_switch", sigma=config.latent_sigma)
    reward, has_format, correct = rewards(rollout, answer, task)
    reward = reward.view(-1, G)                                                       # (B, G)
    metrics = {"reward": reward.mean(), "reward_sd": reward.std(1).mean(),
               "spread_groups": (reward.std(1) > 0).float().mean(),                   # groups with a signal
               "accuracy": correct.mean(), f"pass@{G}": correct.view(-1, G).amax(1).mean(),
               "format": has_format.mean(), "latent_steps": rollout["is_latent"].sum(1).float().mean()}
    return dict(visual=visual, question=question, rollout=rollout, reward=reward, metrics=metrics,
                advantage=group_advantages(reward).view(-1, 1),                          # (B*G, 1)
                old_logp=replay_latents(model.llm, visual, question, rollout)["logp"],
                reference_h=replay_latents(model.reference, visual, question, rollout)["h"])


def grpo_latent_loss(llm, batch, config):
    """Per latent step t of rollout i: min(ρ_t·Â_i, clip(ρ_t, 1−ε, 1+ε)·Â_i) − β·D_KL(π_θ‖π_ref), ρ_t = π_θ / π_θold;
    mean over a rollout's latent steps, then over rollouts."""
    rollout, advantage, sigma = batch["rollout"], batch["advantage"], batch["rollout"]["sigma"]
    mask = rollout["is_latent"].float()                                               # (B*G, R)
    replay = replay_latents(llm, batch["visual"], batch["question"], rollout)          # with grad
    ratio = torch.exp(replay["logp"] - batch["old_logp"])                             # π_θ / π_θold
    objective = torch.minimum(ratio * advantage, ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps) * advantage)
    kl = ((replay["h"] - batch["reference_h"]) ** 2).mean(-1) / (2 * sigma ** 2)     # exact, per dimension
    per_step = -(objective - config.kl_beta * kl)
    loss = ((per_step * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    metrics = {"kl": kl, "ratio_dev": (ratio - 1).abs(), "clipped": ((ratio - 1).abs() > config.clip_eps).float()}
    return loss, {name: ((value * mask).sum() / mask.sum().clamp(min=1)).detach() for name, value in metrics.items()}

# ---- Training step (AMP): stage 0, stage 1 with the two baselines, stage 2 ---------------------------------------


def teacher_prob(step, config):
    """Scheduled sampling: P(the answer pass reads v_t, not the own latent), 1 at stage 1's start, 0 after the ramp."""
    return max(0.0, 1 - (step - config.align_steps) / config.teacher_ramp) if config.teacher_ramp else 0.0


def optimizer_step(model, optimizer, scaler, loss, config):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    llms = [llm for llm in (model.llm, model.baseline_llm, model.cot_llm) if llm is not None]
    vision = [p for name, p in model.named_parameters() if not name.split(".")[0].endswith("llm")]  # encoder, heads, e
    for params in [list(llm.parameters()) for llm in llms] + [vision]:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)  # each model on its own: a baseline cannot
    scaler.step(optimizer)                                         # rescale LVR's step
    scaler.update()


def train_step(model, optimizer, scaler, batch, step, config, autocast_dtype):
    """Stage 0 for the first align_steps steps (every module trains), then stage 1, or stage 2 with --stage rl.
    From stage 1 on the vision encoder and projector are frozen: the visual tokens are computed without gradient."""
    amp = dict(device_type=batch["image"].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    if config.stage == "rl":  # stage 2: one rollout batch, policy_updates clipped steps on it
        with torch.autocast(**amp), torch.no_grad():
            rollouts = grpo_rollouts(model, model.visual_tokens(batch["image"]), batch)
        for _ in range(config.policy_updates):
            with torch.autocast(**amp):
                loss, metrics = grpo_latent_loss(model.llm, rollouts, config)
            optimizer_step(model, optimizer, scaler, loss, config)
        return {"loss": loss.detach(), **rollouts["metrics"], **metrics}
    if step >= config.align_steps and not bool(model.baseline_ready):  # the baselines start from the stage-0 LLM
        for llm in [llm for llm in (model.baseline_llm, model.cot_llm) if llm is not None]:
            llm.load_state_dict(model.llm.state_dict())
        model.baseline_ready.fill_(True)
    with torch.autocast(**amp):
        if step < config.align_steps:  # stage 0: alignment on plain VQA
            loss, metrics = alignment_loss(model, batch)
        else:
            with torch.no_grad():
                visual = model.visual_tokens(batch["image"])                          # (B, P, D), frozen
            share = teacher_prob(step, config)  # of ROI tokens among LVR's latents, of true hops among the CoT's
            loss, metrics = lvr_loss(model, visual, batch, share)
            for llm, baseline_loss in ((model.baseline_llm, direct_loss), (model.cot_llm, cot_loss)):
                if llm is not None:  # the no-latent and chain-of-thought baselines, on the same batch
                    baseline, baseline_metrics = baseline_loss(llm, visual, batch, model.task, share)
                    loss, metrics = loss + baseline, metrics | baseline_metrics
    optimizer_step(model, optimizer, scaler, loss, config)
    return {"loss": loss.detach(), **metrics}

# ---- Evaluation: accuracy against latent steps, the baselines, the controls, the exits ---------------------------


@torch.no_grad()
def evaluate(model, task, config, eval_steps, autocast_dtype):
    """Held-out accuracy, a row per model and budget: the answer prior (majority answer per type), the two baselines,
    LVR at each budget in eval_steps (0: control (d), the markers alone), the controls at the trained budget, the two
    exits; then GRPO_latent's policy at σ = 0, σ/2, σ, 2σ, G samples of each validation question (fresh scenes)."""
    model.eval()
    device, k, G = next(model.parameters()).device, config.latent_steps, config.group_size
    validation = task.fresh_batch(6, 0, min(config.validation_size, len(task.test_sets["held-out"]["answer"])))
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        chunks, validation = ([{**c, "visual": model.visual_tokens(c["image"])} for c in (
            {key: value[i:i + 256].to(device) for key, value in data.items()}
            for i in range(0, len(data["answer"]), 256))] for data in (task.test_sets["held-out"], validation))
        roi_tokens = torch.cat([roi_targets(c["visual"], c["box"], task, k) for c in chunks]).flatten(0, 1).float()
        variance = roi_tokens.var(0).mean().item()                                     # MSE of the mean token
        rows = [{"model": "answer prior", "thinking steps": 0, "accuracy %": task.prior_accuracy()}]
        rows += [table_row(model, chunks, name, llm, 0, variance) for name, llm in
                 (("baseline", model.baseline_llm), ("text chain-of-thought", model.cot_llm)) if llm is not None]
        for n in eval_steps:
            rows.append(table_row(model, chunks, "lvr, markers only (d)" if n == 0 else "lvr", model.llm, n, variance))
        noise = torch.Generator(device=device).manual_seed(0)
        for kind, name in CONTROLS.items():
            fed = [control_latents(kind, c["visual"], c["box"], task, k, roi_tokens, noise) for c in chunks]
            rows.append(table_row(model, chunks, f"lvr, {name}", model.llm, k, variance, fed=fed))
        for exit_rule in ("latent_end", "mode_switch"):
            rows.append(table_row(model, chunks, f"lvr, {exit_rule.replace('_', ' ')} exit", model.llm,
                                  config.max_latent, variance, exit_rule=exit_rule))
        rows = [{"test set": "held-out", **row} for row in rows]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same draws for every σ and every checkpoint
            for sigma in (0.0, config.latent_sigma / 2, config.latent_sigma, 2 * config.latent_sigma):
                rows.append({"test set": "validation", **table_row(
                    model, validation, f"latent policy σ={sigma:g}", model.llm, config.max_latent, variance, group=G,
                    exit_rule="mode_switch", sigma=sigma)})
    model.train()
    return rows


def table_row(model, chunks, name, llm, thinking_steps, variance, fed=None, group=1, **decoding):
    """A row of evaluate's table from `group` samples per question (fed: a control's latents per chunk): accuracy
    (pass@1) overall and per type, pass@group, mean latent steps, the CoT's right hops, latent MSE / ROI variance."""
    task, cot, k = model.task, llm is model.cot_llm, model.config.latent_steps
    correct = torch.zeros(len(task.question_types))                                    # right answers per type
    any_right, steps, hops, squared_error, compared = 0, 0, 0, 0.0, 0
    for i, chunk in enumerate(chunks):
        chunk = {key: value.repeat_interleave(group, 0) for key, value in chunk.items()}
        rollout = generate(model, llm, chunk["visual"], chunk["question"], thinking_steps,
                           fed_latents=fed[i] if fed else None, **decoding)
        right = answer_correct(rollout, chunk["answer"], task, skip=task.hop_len if cot else 0)
        correct.index_add_(0, chunk["qtype"].cpu(), right.float().cpu())
        any_right += right.view(-1, group).any(1).sum().item()
        is_latent, steps = rollout["is_latent"], steps + rollout["is_latent"].sum().item()
        if cot:  # the written hops: the first hop_len tokens against the chain's hop words
            written = F.pad(rollout["tokens"], (0, task.hop_len), value=task.pad_id)[:, :task.hop_len]
            truth = vqa_data.hop_words(chunk["box"], chunk["patch_object"], task.patch_size)  # (b, hop_len)
            hops += (written == truth).all(1).sum().item()
        index = is_latent.cumsum(1) - 1                                                # latent i fed at this slot
        targets = roi_targets(chunk["visual"], chunk["box"], task, k).gather(
            1, index.clamp(0, k - 1)[..., None].expand(-1, -1, chunk["visual"].shape[-1]))      # (b, R, D)
        taken = is_latent & (index < k)                                                # latent i vs target i
        error = ((rollout["latents"].float() - targets.float()) ** 2).mean(-1)[taken]
        squared_error, compared = squared_error + error.sum().item(), compared + len(error)
    type_count = torch.bincount(torch.cat([c["qtype"].cpu() for c in chunks]), minlength=len(correct)).clamp(min=1)
    questions = sum(len(chunk["answer"]) for chunk in chunks)
    row = {"model": name}
    if decoding.get("exit_rule", "fixed") == "fixed":  # adaptive exits: see mean steps
        row["thinking steps"] = task.hop_len if cot else thinking_steps
    row |= {"accuracy %": 100.0 * correct.sum().item() / (questions * group),
            **{f"{q} %": 100.0 * (correct[i] / type_count[i] / group).item()
               for i, q in enumerate(task.question_types)}, "mean steps": steps / (questions * group)}
    if group > 1:
        row[f"pass@{group} %"] = 100.0 * any_right / questions
    if cot:
        row["hops right %"] = 100.0 * hops / questions
    if compared:
        row["latent MSE/var"] = squared_error / compared / variance
    return row

# ---- Beyond the paper: stage 0 (for a pretrained VLM), the two baselines, the control rows -----------------------


def answer_pass(llm, visual, batch, task, before=None, prefix=None):
    """One teacher-forced pass over [question, v, before (B, W), answer, <eos>]: targets (B, W + A + 1), their
    logits and all last hidden states. prefix: llm's (h, logits, KV cache) of [question, v], computed once."""
    before = batch["answer"][:, :0] if before is None else before
    targets = torch.cat([before, batch["answer"], torch.full_like(batch["answer"][:, :1], task.eos_id)], 1)
    response = llm.embed(targets[:, :-1]).to(visual.dtype)
    if prefix is None:
        h, logits, _ = llm(torch.cat([prompt(llm, visual, batch["question"]), response], 1))
    else:  # the response alone, on the prefix's cache
        h, logits, _ = llm(response, prefix[2])
        h, logits = torch.cat([prefix[0], h], 1), torch.cat([prefix[1], logits], 1)
    return targets, logits[:, -targets.shape[1]:], h


def alignment_loss(model, batch):
    """Stage 0 on plain VQA: L = L_NTP + L_object + L_grounding. L_object: each encoder patch token classifies its
    patch's object; L_grounding (BCE): the LLM's state at each visual token classifies its patch as in the first box."""
    task = model.task
    encoded = model.encoder(batch["image"])                                                 # (B, P, D)
    visual = model.projector(encoded) + model.visual_pos                                    # = visual_tokens
    targets, logits, h = answer_pass(model.llm, visual, batch, task)
    l_ntp = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    l_object = F.cross_entropy(model.encoder.object_head(encoded).flatten(0, 1).float(),
                               batch["patch_object"].flatten())
    in_roi = vqa_data.roi_patch_mask(batch["box"].view(len(batch["box"]), -1, 4)[:, 0].cpu(), task.image_size,
                                     task.patch_size)                                      # (B, P): the first box
    question_len = batch["question"].shape[1]                                               # visual tokens follow it
    relevance = model.grounding_head(h[:, question_len:question_len + model.n_patches])[..., 0]  # (B, P)
    l_grounding = F.binary_cross_entropy_with_logits(relevance.float(), in_roi.to(relevance.device).float())
    loss = l_ntp + l_object + l_grounding
    return loss, {"L_NTP": l_ntp.detach(), "L_object": l_object.detach(), "L_grounding": l_grounding.detach()}


def direct_loss(llm, visual, batch, task, teacher_prob=None):
    """L_NTP for plain VQA [question, v] -> answer <eos> (the SFT data baseline); nothing to schedule."""
    targets, logits, _ = answer_pass(llm, visual, batch, task)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss, {"baseline_NTP": loss.detach()}


def cot_loss(llm, visual, batch, task, teacher_prob=0.0):
    """Text chain of thought, exposed as lvr_loss: L = L_NTP(hops) on pass 1, teacher-forced on the true hop words,
    + L_NTP(answer, <eos>) on pass 2, fed each hop's words (one box's) true with probability teacher_prob (lvr_loss's
    draw), else the model's own greedy ones (decoded without gradient). The passes share the prompt's KV cache."""
    hops = vqa_data.hop_words(batch["box"], batch["patch_object"], task.patch_size)      # (B, H): K boxes' words
    prefix = llm(prompt(llm, visual, batch["question"]))                                 # (h, logits, cache)
    _, logits, _ = answer_pass(llm, visual, batch, task, hops, prefix)                   # pass 1: teacher-forced
    l_hops = F.cross_entropy(logits[:, :task.hop_len].flatten(0, 1).float(), hops.flatten())
    with torch.no_grad():  # the own hop words: greedy, free-running from the prompt's KV cache
        own, cache = [prefix[1][:, -1:].argmax(-1)], prefix[2]
        for _ in range(task.hop_len - 1):
            _, word_logits, cache = llm(llm.embed(own[-1]).to(visual.dtype), cache)
            own.append(word_logits.argmax(-1))
    K = batch["box"].shape[1]
    teacher = example_rand(batch, (len(hops), K, 1), visual.device)                     # lvr_loss's draw
    fed = torch.where((teacher < teacher_prob).expand(-1, -1, task.hop_len // K).flatten(1), hops, torch.cat(own, 1))
    targets, logits, _ = answer_pass(llm, visual, batch, task, fed, prefix)              # pass 2
    l_answer = F.cross_entropy(logits[:, task.hop_len:].flatten(0, 1).float(), targets[:, task.hop_len:].flatten())
    return l_hops + l_answer, {"cot_hops_NTP": l_hops.detach(), "cot_answer_NTP": l_answer.detach()}


CONTROLS = {"oracle": "oracle ROI tokens (a)", "zero": "zero latents (b)", "random": "random latents (c)"}


def control_latents(kind, visual, boxes, task, k, roi_tokens, generator=None):
    """A control row's latents (B, k, D): "oracle" the targets (the ceiling), "zero" zeros, "random" Gaussian with
    the per-dimension mean and std of roi_tokens (M, D)."""
    B, D = visual.shape[0], visual.shape[-1]
    if kind == "oracle":
        return roi_targets(visual, boxes, task, k)
    if kind == "zero":
        return visual.new_zeros(B, k, D)
    noise = torch.randn(B, k, D, generator=generator, device=visual.device)
    return (roi_tokens.mean(0) + roi_tokens.std(0) * noise).to(visual.dtype)


if __name__ == "__main__":  # a tiny demo: stage 0, stage 1, the table
    torch.manual_seed(0)
    demo_task = vqa_data.VQATask(seed=0, train_size=2000, eval_size=64)
    demo = Config(steps=40, align_steps=20, d_model=32, n_layers=2, encoder_layers=1, teacher_ramp=10)
    demo_model, scaler = build_model(demo, demo_task), torch.amp.GradScaler("cpu", enabled=False)
    optimizer = make_optimizer(demo_model, demo)
    for step in range(demo.steps):
        metrics = train_step(demo_model, optimizer, scaler, demo_task.train_batch(step, 32), step, demo, None)
    print({k: round(v.item(), 3) for k, v in metrics.items()}, *evaluate(demo_model, demo_task, demo, (0, 4), None),
          sep="\n")
