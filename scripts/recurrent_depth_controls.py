"""The controls of recurrent_depth's claim at equal training FLOPs, and their table and plot.

    python scripts/recurrent_depth_controls.py flops STEPS [--flag value ...]
        training FLOPs of the default over STEPS steps, summed over the recurrence counts the sampler draws
        (deterministic: seeded by the step), and the steps at which the fixed-recurrence and plain-transformer
        controls (both at the sampler's mean depth) spend the same, with each model's parameter count; FLOPs
        counted as train.py's cost meter counts them (FlopCounterMode on train_step, batch_size Sudoku puzzles)
    python scripts/recurrent_depth_controls.py plot OUT.svg [--metric "blank-cell %"] NAME=FOLDER[,FOLDER...] ...
        the metric (default exact %) against test-time recurrences per test set, mean +- sd over the run folders
        (seeds) of each name; a run with one row per test set (the plain transformer) is one point. Prints a
        markdown table. Standard library only.
"""

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root


def step_flops(config, n_no_grad, k_grad):
    """FLOPs of one training step at (n, k) recurrences, counted as train.py counts them."""
    import types

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import recurrent_depth
    import train

    task = types.SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81)
    torch.manual_seed(0)
    model = recurrent_depth.build_model(config, task)
    optimizer = recurrent_depth.make_optimizer(model, config)
    batch = {"puzzle": torch.randint(0, 10, (config.batch_size, 81)),
             "solution": torch.randint(1, 10, (config.batch_size, 81))}
    original = recurrent_depth.sample_recurrence
    recurrent_depth.sample_recurrence = lambda step, config: (n_no_grad, k_grad)
    try:
        with FlopCounterMode(display=False, custom_mapping=train.ATTENTION_FLOPS) as counter:
            recurrent_depth.train_step(model, optimizer, torch.amp.GradScaler(enabled=False), batch, 0, config, None)
    finally:
        recurrent_depth.sample_recurrence = original
    return counter.get_total_flops()


def parameters(config):
    import types

    import recurrent_depth

    model = recurrent_depth.build_model(config, types.SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81))
    return sum(p.numel() for p in model.parameters())


def equal_flops(steps, flags):
    import dataclasses

    import recurrent_depth

    overrides = {}
    for name, value in zip(flags[::2], flags[1::2]):
        field = name.lstrip("-").replace("-", "_")
        overrides[field] = type(getattr(recurrent_depth.Config(), field))(value)
    config = dataclasses.replace(recurrent_depth.Config(), **overrides)
    # a step's FLOPs are linear in n and k: F(n, k) = F(0, 0) + n a + k b (measured at 3 points, checked at a 4th)
    f01, f11, f02 = step_flops(config, 0, 1), step_flops(config, 1, 1), step_flops(config, 0, 2)
    a, b = f11 - f01, f02 - f01
    check = step_flops(config, 3, 4)
    assert abs(check - (f01 - b + 3 * a + 4 * b)) <= 1e-6 * check, "FLOPs not linear in (n, k)"
    draws = [recurrent_depth.sample_recurrence(t, config) for t in range(steps)]
    default = sum(f01 - b + n * a + k * b for n, k in draws)
    fixed = dataclasses.replace(config, fixed_recurrence=True)
    n, k = recurrent_depth.sample_recurrence(0, fixed)
    fixed_step = f01 - b + n * a + k * b
    plain = dataclasses.replace(config, plain_transformer=True)
    plain_step = step_flops(plain, 0, 0)
    print(f"default: {steps} steps, mean recurrence drawn {sum(n + k for n, k in draws) / steps:.2f}, "
          f"{default:.4g} training FLOPs ({default / steps:.4g} per step), {parameters(config):,} parameters")
    print(f"fixed recurrence {n + k}: {fixed_step:.4g} FLOPs per step -> {round(default / fixed_step)} steps, "
          f"{parameters(fixed):,} parameters")
    print(f"plain transformer, {plain.n_prelude + plain.n_core * (n + k) + plain.n_coda} layers: {plain_step:.4g} "
          f"FLOPs per step -> {round(default / plain_step)} steps, {parameters(plain):,} parameters")


def load_rows(folder):
    return json.loads((Path(folder) / "results.json").read_text())["rows"]


def curves(named_folders, metric="exact %"):
    """{name: {test set: {steps: [metric per seed]}}} from the integer-step rows of each run."""
    found = {}
    for name, folders in named_folders.items():
        for folder in folders:
            for row in load_rows(folder):
                if isinstance(row["thinking steps"], int):
                    points = found.setdefault(name, {}).setdefault(row["test set"], {})
                    points.setdefault(row["thinking steps"], []).append(row[metric])
    return found


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(found):
    lines = ["| test set | model | seeds | " + " | ".join(str(s) for s in sorted({s for sets in found.values()
             for points in sets.values() for s in points})) + " |"]
    all_steps = sorted({s for sets in found.values() for points in sets.values() for s in points})
    lines.append("|---|---|---:|" + "---:|" * len(all_steps))
    for test_set in dict.fromkeys(t for sets in found.values() for t in sets):
        for name, sets in found.items():
            points = sets.get(test_set, {})
            seeds = max(len(v) for v in points.values())
            cells = []
            for s in all_steps:
                if s in points:
                    m, sd = mean_sd(points[s])
                    cells.append(f"{m:.1f} ± {sd:.1f}" if seeds > 1 else f"{m:.1f}")
                else:
                    cells.append("")
            lines.append(f"| {test_set} | {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def svg(found, title):
    """One panel per test set, log2 x axis (recurrences), exact % with +-sd bars; a one-point model is a marker."""
    sets = list(dict.fromkeys(t for sets in found.values() for t in sets))
    steps = sorted({s for model in found.values() for points in model.values() for s in points})
    width, height, left, top, bottom, gap = 300, 240, 50, 40, 40, 20
    total = left + len(sets) * (width + gap)
    legend = 20 * len(found) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{top + height + bottom + legend}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{total / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>']
    lo, hi = math.log2(steps[0]), math.log2(steps[-1])
    for p, test_set in enumerate(sets):
        x0 = left + p * (width + gap)
        X = lambda s: x0 + (math.log2(s) - lo) / max(hi - lo, 1e-9) * width  # noqa: E731
        Y = lambda v: top + height - v / 100 * height  # noqa: E731
        out += [f'<rect x="{x0}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>',
                f'<text x="{x0 + width / 2}" y="{top - 6}" text-anchor="middle">{test_set}</text>']
        for v in (0, 25, 50, 75, 100):
            out.append(f'<text x="{x0 - 4}" y="{Y(v) + 4}" text-anchor="end">{v}</text>')
        for s in steps:
            out.append(f'<text x="{X(s):.1f}" y="{top + height + 14}" text-anchor="middle">{s}</text>')
        out.append(f'<text x="{x0 + width / 2}" y="{top + height + 30}" text-anchor="middle">'
                   'recurrences at test time</text>')
        for color, (name, model) in zip(COLORS, found.items()):
            points = sorted(model.get(test_set, {}).items())
            xy = [(X(s), Y(mean_sd(v)[0]), mean_sd(v)[1]) for s, v in points]
            if len(xy) > 1:
                line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in xy)
                out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5">'
                           f'<title>{name}</title></polyline>')
            for x, y, sd in xy:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4 if len(xy) == 1 else 2.5}" fill="{color}"/>')
                if sd:
                    y1, y2 = y - sd / 100 * height, y + sd / 100 * height
                    out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" stroke="{color}"/>')
    for i, (color, name) in enumerate(zip(COLORS, found)):
        y = top + height + bottom + 14 + 20 * i
        out += [f'<rect x="{left}" y="{y - 9}" width="12" height="12" fill="{color}"/>',
                f'<text x="{left + 18}" y="{y + 1}">{name}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["flops"] and len(sys.argv) >= 3:
        equal_flops(int(sys.argv[2]), sys.argv[3:])
    elif sys.argv[1:2] == ["plot"] and len(sys.argv) >= 4:
        named, rest, metric = {}, sys.argv[3:], "exact %"
        if rest[0] == "--metric":
            metric, rest = rest[1], rest[2:]
        for item in rest:
            name, folders = item.rsplit("=", 1)
            named[name] = folders.split(",")
        found = curves(named, metric)
        Path(sys.argv[2]).write_text(svg(found, f"{metric} against recurrences at test time (equal training FLOPs)"))
        print(table(found))
    else:
        sys.exit(__doc__)
