"""Latent trajectories of a trained recurrent_depth Sudoku model: s_1 .. s_r of a few cells of one puzzle from
two random s_0, each cell drawn in the plane of the first two principal components of its own states (SVG,
standard library).

    python scripts/recurrent_depth_trajectories.py CHECKPOINT OUT.svg [STEPS]
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: recurrent_depth, sudoku_data
import recurrent_depth  # noqa: E402
import sudoku_data  # noqa: E402

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def trajectory_svg(trajectories: torch.Tensor, labels, title: str, columns: int = 2) -> str:
    """SVG (standard library) of trajectories (S, N, R, D): N tracked vectors over R steps from S starts.
    One panel per vector, projected on the first two principal components of that vector's S R points;
    the first start solid, the others dashed; hollow circle = first step, dot = last step."""
    starts, count = trajectories.shape[:2]
    size, gap, top = 260, 20, 40
    rows = -(-count // columns)
    width, height = columns * (size + gap) + gap, top + rows * (size + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']  # fmt: skip
    for n, label in enumerate(labels):
        points = trajectories[:, n].double()  # (S, R, D)
        mean = points.flatten(0, 1).mean(0)
        _, singular, directions = torch.linalg.svd(points.flatten(0, 1) - mean, full_matrices=False)
        explained = 100 * singular[:2] ** 2 / (singular**2).sum()
        xy = (points - mean) @ directions[:2].T  # (S, R, 2)
        lo, hi = xy.flatten(0, 1).amin(0), xy.flatten(0, 1).amax(0)
        scale = (size - 40) / (hi - lo).clamp(min=1e-12)
        x0, y0 = gap + (n % columns) * (size + gap), top + (n // columns) * (size + gap)
        color = PALETTE[n % len(PALETTE)]
        parts += [f'<rect x="{x0}" y="{y0}" width="{size}" height="{size}" fill="none" stroke="#bbb"/>',
                  f'<text x="{x0 + 6}" y="{y0 + 15}">{label}</text>',
                  f'<text x="{x0 + size - 6}" y="{y0 + size - 6}" text-anchor="end" fill="#666">'
                  f'PC 1 / 2: {explained[0]:.0f} / {explained[1]:.0f} % of variance</text>']  # fmt: skip
        for start in range(starts):
            path = [(x0 + 20 + (x - lo[0]) * scale[0], y0 + size - 20 - (y - lo[1]) * scale[1])
                    for x, y in xy[start].tolist()]  # fmt: skip
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y in path)
            dash = ' stroke-dasharray="4 3"' if start else ""
            parts += [f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>',
                      f'<circle cx="{path[0][0]:.1f}" cy="{path[0][1]:.1f}" r="4" fill="white" stroke="{color}"/>',
                      f'<circle cx="{path[-1][0]:.1f}" cy="{path[-1][1]:.1f}" r="3" fill="{color}"/>']
    return "\n".join(parts + ["</svg>"]) + "\n"


def load_run(path) -> recurrent_depth.RecurrentDepthModel:
    """The model of a train.py checkpoint (run folder's checkpoint.pt), in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fields = {field.name for field in dataclasses.fields(recurrent_depth.Config)}  # a retired setting is ignored
    config = recurrent_depth.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()
                                       if k in fields})
    name = state["run"]["task"]
    seq_len = 81 if name == "sudoku" else state["run"]["context_length"]
    task = type("Task", (), dict(name=name, vocab_size=state["model"]["wte.weight"].shape[0], seq_len=seq_len))
    model = recurrent_depth.build_model(config, task)
    model.load_state_dict(state["model"])
    return model.eval()


def latent_trajectory(model, idx, steps: int, s0) -> torch.Tensor:
    """s_0, s_1, ..., s_steps of idx (B, T) from s_0 (B, T, D), each by recurrent_depth's thinking loop:
    (steps + 1, B, T, D)."""
    with torch.no_grad():
        return torch.stack([recurrent_depth.think(model, idx, r, state=s0).state for r in range(steps + 1)])


def sudoku_trajectory_figure(checkpoint, out, steps: int = 32, cells=(0, 3, 2, 6), seed: int = 1000003):
    """s_1 .. s_steps of a few cells of one easy puzzle, from two random s_0 (solid, dashed). s_0 itself is left
    out: the first recurrence jumps far from it and would squash the rest of the plot."""
    model = load_run(checkpoint)
    puzzle, solution, _ = sudoku_data.generate_puzzles(1, "easy", seed=seed, workers=1)
    idx = torch.from_numpy(puzzle).long()  # (1, 81)
    e = torch.zeros(1, 81, model.config.d_model)
    starts = [model.init_state(e, generator=torch.Generator().manual_seed(g)) for g in (0, 1)]
    runs = [latent_trajectory(model, idx, steps, s0)[1:, 0] for s0 in starts]  # (R, 81, D) each
    paths = torch.stack([run[:, list(cells)].transpose(0, 1) for run in runs])  # (2 starts, cells, R, D)
    labels = [f"r{c // 9 + 1}c{c % 9 + 1}: " + (f"given {puzzle[0, c]}" if puzzle[0, c] else
                                                f"blank, answer {solution[0, c]}") for c in cells]
    title = f"Latent state of {len(cells)} Sudoku cells, recurrences 1-{steps}"
    Path(out).write_text(trajectory_svg(paths, labels, title))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sudoku_trajectory_figure(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:4]))
