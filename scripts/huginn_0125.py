"""The released Huginn-0125 (3.5B parameters, github.com/seal-rg/recurrent-pretraining) in recurrent_depth's model:
the official *.safetensors shards (or *.bin / *.pt state dicts) read with the standard library and torch, the
official names mapped, each head's q/k rows permuted from the official interleaved RoPE pairs (2j, 2j+1) to
recurrent_depth's pairs (j, j + hd/2). No tokenizer ships here: docs/recurrent_depth.md shows a session with one.

    import huginn_0125; model = huginn_0125.load_huginn("huginn-0125")  # the folder with the downloaded shards
"""

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
import recurrent_depth as rd  # noqa: E402

# The released Huginn-0125 (3.5B parameters): github.com/seal-rg/recurrent-pretraining, raven_config_minimal.json
HUGINN_CONFIG = dict(d_model=5280, n_heads=55, d_mlp=17920, n_prelude=2, n_core=4, n_coda=2, mean_recurrence=32,
                     backprop_depth=8, kl_threshold=5e-4)
HUGINN_VOCAB_SIZE, HUGINN_CONTEXT = 65536, 4096

# official name -> ours, applied in order (recpre/raven_modeling_minimal.py: RavenForCausalLM)
OFFICIAL_KEY_MAP = ((r"^transformer\.", ""), (r"^core_block\.", "core."), (r"\.norm_(\d)\.", r".n\1."),
                    (r"\.attn\.Wqkv\.", ".attn.qkv."))  # fmt: skip
OFFICIAL_UNUSED = ("lm_head.weight", "freqs_cis")  # the head is tied to wte; the RoPE table is recomputed
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """A .safetensors file with the standard library: an 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the raw bytes, offsets from the header's end."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    tensors = {}
    for name, info in json.loads(data[8:8 + n]).items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            raw = bytearray(data[8 + n + begin:8 + n + end])
            tensors[name] = torch.frombuffer(raw, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_state_dict(directory, config: rd.Config) -> dict[str, torch.Tensor]:
    """A checkpoint folder's *.safetensors shards, else its *.bin / *.pt state dicts, in
    recurrent_depth's names and layout: qk_bias (2, 1, H, hd) -> (2, H, 1, hd), each head's q/k rows and bias permuted
    so that our RoPE on pairs (j, j + hd/2) computes the official one on pairs (2j, 2j+1)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint folder not found: {directory}")
    files = sorted(directory.glob("*.safetensors")) or sorted([*directory.glob("*.bin"), *directory.glob("*.pt")])
    if not files:
        raise ValueError(f"{directory} has no *.safetensors, *.bin or *.pt files")
    head_dim = config.d_model // config.n_heads
    to_halves = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])  # our dim j <- this dim
    state = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                part = read_safetensors(file)
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # a file that is no state dict: the reader's or torch's error, in one line
            raise ValueError(f"{file}: cannot read it as a state dict ({str(error).splitlines()[0]})") from None
        if not isinstance(part, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in part.values()):
            raise ValueError(f"{file}: not a state dict of tensors")
        for name, tensor in part.items():
            if name in OFFICIAL_UNUSED:
                continue
            for pattern, replacement in OFFICIAL_KEY_MAP:
                name = re.sub(pattern, replacement, name)
            if name.endswith("attn.qk_bias"):
                tensor = tensor.transpose(1, 2)[..., to_halves]  # (2, 1, H, hd) -> (2, H, 1, hd)
            elif name.endswith("attn.qkv.weight"):
                rows = tensor.reshape(3, config.n_heads, head_dim, -1)  # (q|k|v, H, hd, D)
                tensor = torch.cat([rows[:2, :, to_halves], rows[2:]]).reshape(tensor.shape)  # v rows stay
            state[name] = tensor.contiguous()
    return state


def load_huginn(directory, config: rd.Config | None = None, vocab_size: int = HUGINN_VOCAB_SIZE,
                max_len: int = HUGINN_CONTEXT) -> rd.RecurrentDepthModel:
    """The causal model with the official weights of `directory` (default config: the released Huginn-0125), in
    the checkpoint's dtype (bfloat16 for the release; call .float() for float32)."""
    config = config or rd.Config(**HUGINN_CONFIG)
    rd.check_config(config)
    state = read_state_dict(directory, config)
    with torch.device("meta"):  # shapes only: no random init of 3.5B parameters that are overwritten anyway
        model = rd.RecurrentDepthModel(config, vocab_size, max_len, causal=True, grid=False)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise ValueError(f"{directory}: the checkpoint does not fit the config: {detail}") from None
    model.rope_cos, model.rope_sin = rd.rope_tables(config.d_model // config.n_heads, max_len)
    return model.eval()
