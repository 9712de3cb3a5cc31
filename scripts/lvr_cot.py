"""The text chain-of-thought row of `python train.py --method lvr`, without training LVR and the no-latent baseline.

    python scripts/lvr_cot.py --seed S [--eval-size 2000] [--steps 2000 --align-steps 800 --teacher-ramp 500]
                              [--out ROW.json]

Stage 0 (lvr.train_step), then stage 1 for the chain-of-thought LLM alone (lvr.cot_loss, lvr.optimizer_step), on
train.py's batches with its example seeds and learning-rate schedule, at 1 thread on the CPU. The chain of thought
trains on its own loss and is clipped on its own, so its weights, and its row, are those of train.py's run at the
same seed and settings; what is left out is the other two LLMs' training. Prints the row (and writes it to --out).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import lvr  # noqa: E402
import train  # noqa: E402
import vqa_data  # noqa: E402


def cot_step(model, optimizer, scaler, batch, step, config):
    """lvr.train_step's stage 1 for the chain-of-thought LLM alone (it starts from the stage-0 LLM)."""
    if not bool(model.baseline_ready):
        model.cot_llm.load_state_dict(model.llm.state_dict())
        model.baseline_ready.fill_(True)
    with torch.no_grad():
        visual = model.visual_tokens(batch["image"])                                     # (B, P, D), frozen
    loss, metrics = lvr.cot_loss(model.cot_llm, visual, batch, model.task, lvr.teacher_prob(step, config))
    lvr.optimizer_step(model, optimizer, scaler, loss, config)
    return {"loss": loss.detach(), **metrics}


def train_cot(seed, eval_size, config, log_every=100):
    """Stage 0 and the chain of thought's stage 1 (as train.py builds and trains them); the model and the task."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    task = vqa_data.VQATask(seed=seed, eval_size=eval_size)
    model = lvr.build_model(config, task)
    optimizer, scaler = lvr.make_optimizer(model, config), torch.amp.GradScaler("cpu", enabled=False)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:  # train.py's schedule
            group["lr"] = group["initial_lr"] * train.lr_factor(step, config)
        batch = train.with_example_seeds(task.train_batch(step, config.batch_size), seed, step)
        if step < config.align_steps:
            metrics = lvr.train_step(model, optimizer, scaler, batch, step, config, None)
        else:
            metrics = cot_step(model, optimizer, scaler, batch, step, config)
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            print(json.dumps({"step": step + 1, "s": round(time.perf_counter() - start),
                              **{k: round(float(v), 4) for k, v in metrics.items()}}), flush=True)
    return model, task


@torch.no_grad()
def cot_row(model, task):
    """The chain of thought's row of lvr.evaluate (the same 256-question chunks of the held-out set)."""
    model.eval()
    data = task.test_sets["held-out"]
    chunks = [{**chunk, "visual": model.visual_tokens(chunk["image"])} for chunk in (
        {key: value[i:i + 256] for key, value in data.items()} for i in range(0, len(data["answer"]), 256))]
    return lvr.table_row(model, chunks, "text chain-of-thought", model.cot_llm, 0, variance=1.0)  # no latents


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="train.py's --seed")
    parser.add_argument("--eval-size", type=int, default=500, help="held-out questions")
    for name in ("steps", "align_steps", "teacher_ramp"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(lvr.Config, name),
                            help=f"lvr.Config.{name}")
    parser.add_argument("--out", help="a JSON file for the row")
    args = parser.parse_args(argv)
    if args.out and not Path(args.out).resolve().parent.is_dir():  # found out before training, not after
        parser.error(f"--out {args.out}: its folder does not exist")
    config = lvr.Config(steps=args.steps, align_steps=args.align_steps, teacher_ramp=args.teacher_ramp,
                        baseline=False)
    start = time.perf_counter()
    model, task = train_cot(args.seed, args.eval_size, config)
    row = {"seed": args.seed, "eval_size": args.eval_size, **cot_row(model, task),
           "seconds": round(time.perf_counter() - start)}
    print(json.dumps(row))
    if args.out:
        train.write_json(args.out, row)  # atomic: a stopped run leaves no half-written file
    return model


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
