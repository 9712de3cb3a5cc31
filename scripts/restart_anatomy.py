"""Where lit's test-time restarts gain and where they stop. K noisy trajectories of a trained lit Sudoku checkpoint
(its weight average when it has one) run every step of the budget (no halting) on a generated set; per budget: the
share of trajectories whose grid is the solution, the share right at some earlier step (a solution left again), the
oracle (some trajectory's grid is the solution), what the model's own signals pick (confidence, the halting head's
h, a vote: the grid most trajectories end on, ties by confidence), and how many puzzles no trajectory solves; then
how many trajectories solve each puzzle. The rules of Sudoku only score.

    python scripts/restart_anatomy.py CHECKPOINT [--set hard] [--split validation] [--size 200] [--restarts 16]
        [--noise 0.3] [--budgets 64,128,256] [--data-dir data]
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: lit, sudoku_data
import lit  # noqa: E402
import sudoku_data  # noqa: E402


def load_run(path) -> tuple[lit.LatentImaginationModel, int]:
    """The model of a train.py lit checkpoint (its weight average when it has one), in eval mode, and the run's seed,
    which names its generated test and validation sets."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, cut short, or not a torch file
        raise SystemExit(f"error: cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("method") != "lit" or state.get("run", {}).get("task") != "sudoku":
        raise SystemExit(f"error: {path} is not a train.py checkpoint of lit on --task sudoku")
    fields = {field.name for field in dataclasses.fields(lit.Config)}
    config = lit.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()
                           if k in fields})
    model = lit.build_model(config, sudoku_data.SudokuTask)
    model.load_state_dict(state["model"])
    if state.get("ema"):
        model.load_state_dict({k: v for k, v in state["ema"].items() if k != "updates"}, strict=False)
    return model.eval(), state["run"]["seed"]


def vote_pick(grids, confidence) -> torch.Tensor:
    """grids (K, B, 81), confidence (K, B) -> (B,) a trajectory ending on the grid most trajectories end on; among
    grids with as many votes, the most confident trajectory's."""
    votes = (grids[:, None] == grids[None]).all(-1).sum(1)  # (K, B): trajectories ending on each one's grid
    best = votes == votes.amax(0)
    return torch.where(best, confidence, float("-inf")).argmax(0)


def anatomy(model, batch, restarts: int, noise: float, budgets, chunk: int = 250) -> tuple[list[dict], list[int]]:
    """Rows per budget (see the module docstring) and, at the last budget, the number of puzzles solved by exactly
    k trajectories, k = 0..K. Puzzles go in chunks of `chunk` trajectories; the noise is drawn per puzzle and
    trajectory as in lit.evaluate, so a puzzle's trajectories are those of `train.py --eval-only` at
    `--halt-threshold 0`."""
    right, picked = [], {}  # chunks of (T, K, b); (budget, pick) -> chunks of (b,)
    per_chunk = max(1, chunk // restarts)
    for first in range(0, batch["puzzle"].shape[0], per_chunk):
        puzzle, solution = batch["puzzle"][first:first + per_chunk], batch["solution"][first:first + per_chunk]
        thoughts = lit.think(model, {"puzzle": puzzle}, max(budgets), restarts, noise, first=first)
        right.append(torch.stack([(logits.argmax(-1) + 1 == solution).all(-1) for logits in thoughts.logits]))
        column = torch.arange(puzzle.shape[0])
        for s in budgets:
            logits = thoughts.logits[s - 1]
            confidence = lit.confidence(logits, puzzle)
            picks = {"confidence": confidence.argmax(0), "vote": vote_pick(logits.argmax(-1), confidence)}
            if thoughts.halt is not None:
                picks["halting head"] = thoughts.halt[s - 1].argmax(0)
            for name, pick in picks.items():
                picked.setdefault((s, name), []).append(right[-1][s - 1][pick, column])
    right = torch.cat(right, 2)  # (T, K, B)
    once = right.cummax(0).values
    rows = [{"budget": s, "trajectories right %": 100 * right[s - 1].float().mean().item(),
             "right at some step %": 100 * once[s - 1].float().mean().item(),
             "oracle %": 100 * right[s - 1].any(0).float().mean().item(),
             **{f"picked by {name} %": 100 * torch.cat(found).float().mean().item()
                for (budget, name), found in picked.items() if budget == s},
             "puzzles no trajectory solves": int((~right[s - 1].any(0)).sum())} for s in budgets]
    return rows, torch.bincount(right[max(budgets) - 1].sum(0), minlength=restarts + 1).tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--set", default="hard", choices=sudoku_data.DIFFICULTIES)
    parser.add_argument("--split", default="validation", choices=sudoku_data.EVAL_SPLITS)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--restarts", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args(argv)
    try:
        budgets = sorted({int(b) for b in args.budgets.split(",")})
    except ValueError:
        parser.error(f"--budgets takes comma-separated step counts such as 64,128, not {args.budgets!r}")
    if budgets[0] < 1 or args.restarts < 2 or args.size < 1:
        parser.error("budgets and --size must be positive and --restarts at least 2")
    model, seed = load_run(args.checkpoint)
    task = sudoku_data.SudokuTask("easy", seed, base_size=1, eval_size=args.size, data_dir=args.data_dir,
                                  eval_split=args.split, eval_sets=(args.set,))
    (name, test_set), = task.test_sets.items()
    rows, solvers = anatomy(model, test_set, args.restarts, args.noise, budgets)
    print(f"{name}: {args.size} puzzles, {args.restarts} trajectories at noise {args.noise}, every step run")
    print("| " + " | ".join(rows[0]) + " |\n|" + " ---: |" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    print(f"puzzles solved by k = 0, 1, ... trajectories at {budgets[-1]} steps: {solvers}")


if __name__ == "__main__":
    main()
