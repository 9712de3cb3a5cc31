"""Self-speculative decoding of a trained recurrent_depth text model against plain fixed-step and adaptive
decoding: accepted drafts, recurrences per token, agreement, wall time.

    python scripts/speculative_benchmark.py CHECKPOINT [DRAFT_STEPS LOOKAHEAD VERIFY_STEPS]
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))
import recurrent_depth  # noqa: E402
from recurrent_depth_trajectories import load_run  # noqa: E402


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
        fixed, _ = recurrent_depth.generate(model, prompt, new_tokens, verify_steps, "none", continuous_cot=False,
                                            init_scale=0.0)
        t1 = time.perf_counter()
        adaptive, adaptive_stats = recurrent_depth.generate(model, prompt, new_tokens, verify_steps)
        t2 = time.perf_counter()
        speculative, stats = recurrent_depth.generate_speculative(model, prompt, new_tokens, draft_steps, verify_steps,
                                                                  lookahead)
        t3 = time.perf_counter()
        for name, taken in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
            seconds[name] += taken
        accepted, sequential = accepted + stats["accepted"], sequential + stats["sequential steps"]
        adaptive_steps += adaptive_stats["mean steps"]
        identical += int(torch.equal(speculative, fixed))
        same_as_adaptive += (speculative[0, prompt_len:] == adaptive[0, prompt_len:]).sum().item()
    return {"accepted drafts": round(accepted / prompts, 3), "identical to fixed greedy": f"{identical}/{prompts}",
            "tokens equal to adaptive": round(same_as_adaptive / (prompts * new_tokens), 3),
            "recurrences per token (fixed, adaptive, speculative sequential)":
                (verify_steps, round(adaptive_steps / prompts, 2), round(sequential / prompts, 2)),
            "wall fixed / speculative": round(seconds["fixed"] / seconds["speculative"], 2),
            "wall adaptive / speculative": round(seconds["adaptive"] / seconds["speculative"], 2),
            **{f"seconds {name}": round(value, 2) for name, value in seconds.items()}}  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) not in (2, 5):
        sys.exit(__doc__)
    for name, value in speculative_benchmark(sys.argv[1], *map(int, sys.argv[2:5])).items():
        print(f"{name}: {value}")
