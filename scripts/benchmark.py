"""One benchmark: every Sudoku method on the same puzzles (docs/benchmark.md).

    python scripts/benchmark.py [flags for every method]      (default --out runs/compare)

Trains (or reuses) runs/compare/<row>/ for each COMPARED row with train.py, draws its curve.svg, then writes
runs/compare/results.json, table.md, curve.svg and curve-flops.svg. A row whose folder holds results is reused, one
that holds only a checkpoint is resumed; --overwrite trains every row again.
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: train and the methods
import train  # noqa: E402
from scripts.plot_curves import FLOPS_COLUMN, STEP_COLUMN, write_curve  # noqa: E402
from train import UsageError  # noqa: E402

# Every Sudoku method with its CPU default (unless the command line says otherwise), trained on the same
# base set and evaluated on the same test puzzles; (row name, method, its own flags).
COMPARED = (("recurrent_depth", "recurrent_depth", ()),
            ("lit", "lit", ()),
            ("lit --no-imagination", "lit", ("--no-imagination", "--steps", "408")),  # steps: LIT's training FLOPs
            ("lit observation-space recursion", "lit", ("--no-imagination", "--recursion", "observation",
                                                        "--steps", "406")),
            # the hard-puzzle recipe (docs/benchmark.md): LIT with the EMA teacher and β = 0.3, a mixed base set,
            # two-step supervised segments, longer training (compiled, bf16 products), TRM's weight average, 128
            # steps at test time
            ("lit recipe", "lit", ("--ema-teacher", "0.999", "--imagination-weight", "0.3", "--difficulty", "mixed",
                                   "--base-size", "3000", "--steps", "6001", "--segment-steps", "2", "--compile",
                                   "--dtype", "bfloat16", "--ema", "0.999", "--eval-steps", "1,2,4,8,16,32,64,128")))


def run_all(argv):
    """Runs (or reuses) OUT/<row>/ for each COMPARED row, then writes the comparison into OUT."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--out", default="runs/compare")
    first.add_argument("--task", default="sudoku")
    known, rest = first.parse_known_args(argv)
    if known.task != "sudoku":
        raise UsageError(f"the benchmark compares the Sudoku methods; --task {known.task} is not among them")
    if any(flag in rest for flag in ("--resume", "--eval-only", "--init-from", "--method")):
        raise UsageError("the benchmark runs every method itself: use --method, --resume, --eval-only or --init-from "
                         "with train.py and one --method")
    compare = Path(known.out)
    train.check_writable(compare)
    results = {}
    for name, method_name, flags in COMPARED:
        folder = compare / name.replace(" --", "-").replace(" ", "-")
        if (folder / "results.json").exists() and "--overwrite" not in rest:
            print(f"{name}: using the finished run in {folder} (--overwrite trains it again)")
        else:
            arguments = ["--method", method_name, *flags, *rest, "--out", str(folder)]
            if (folder / "checkpoint.pt").exists() and "--overwrite" not in rest:  # an interrupted run continues
                arguments = ["--method", method_name, "--resume", str(folder / "checkpoint.pt")]
            print(f"\n=== {name}: python train.py {' '.join(arguments)}")
            status = train.run(arguments)
            if status:
                return status
        results[name] = json.loads((folder / "results.json").read_text())
        if train.world()[0] == 0:  # each row's own curve, as scripts/plot_curves.py draws it
            write_curve(results[name]["rows"], folder / "curve.svg", f"{name} on sudoku")
    if train.world()[0] != 0:
        return 0  # rank 0 writes the comparison
    train.write_json(compare / "results.json", results)
    points = benchmark_points(results)
    table = compare_table(points, results)
    train.write_atomically(compare / "table.md", lambda file: file.write(table.encode()))
    print("\n" + table)
    write_curve(points, compare / "curve.svg", "exact % against thinking steps", panel_column="difficulty")
    costed = [p for p in points if p.get(FLOPS_COLUMN) is not None]
    write_curve(costed, compare / "curve-flops.svg", "exact % against test-time compute",
                panel_column="difficulty", x_name=FLOPS_COLUMN)
    print(f"wrote {compare / 'results.json'}, {compare / 'table.md'}, {compare / 'curve.svg'} and "
          f"{compare / 'curve-flops.svg'}")
    return 0


def benchmark_points(results):
    """{run name: its results.json} -> one record per (line, test set, thinking steps), adaptive rows left out;
    a line is a run, or its K restarts' pick ("NAME, K restarts picked by confidence"; the oracle verifier's apart)."""
    points = []
    for name, result in results.items():
        for row in result["rows"]:
            steps, exact = row.get(STEP_COLUMN), row.get("exact %")
            if isinstance(steps, int) and not isinstance(steps, bool) and exact is not None:
                line = f"{name}, {row['restarts']} restarts picked by {row['picked by']}" if "restarts" in row else name
                points.append({"difficulty": row["test set"], "method": line, STEP_COLUMN: steps, "exact %": exact,
                               FLOPS_COLUMN: row.get(FLOPS_COLUMN)})
    return points


def compare_table(points, results):
    """Markdown: exact % per (test set, thinking steps), one column per line (a compared run, or its restarts'
    pick), then each line's test-time MFLOP per puzzle at its fewest and most thinking steps."""
    names = list(dict.fromkeys(p["method"] for p in points))
    cells = {(p["method"], p["difficulty"], p[STEP_COLUMN]): p["exact %"] for p in points}
    lines = ["| test set | thinking steps | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for test_set in dict.fromkeys(p["difficulty"] for p in points):
        for step in sorted({p[STEP_COLUMN] for p in points}):
            values = [cells.get((name, test_set, step)) for name in names]
            if any(v is not None for v in values):
                shown_values = " | ".join("" if v is None else f"{v:.1f}" for v in values)
                lines.append(f"| {test_set} | {step} | {shown_values} |")
    trained_on = ", ".join(f"{name}: {result['config'].get('difficulty')}, {result['config'].get('steps')} steps, "
                           f"{result.get('cost', {}).get('training_flops', math.nan):.3g} FLOPs"
                           for name, result in results.items())
    costs = []
    for name in names:
        costed = sorted((p[STEP_COLUMN], p[FLOPS_COLUMN]) for p in points
                        if p["method"] == name and p.get(FLOPS_COLUMN))
        if costed:
            (few, low), (most, high) = costed[0], costed[-1]
            costs.append(f"{name}: {low:.3g} at {few}, {high:.3g} at {most}")
    cost_line = f"\n\nTest-time MFLOP per puzzle (thinking steps): {'; '.join(costs)}." if costs else ""
    return "\n".join(lines) + f"\n\nTrained on (base set, steps, training FLOPs): {trained_on}.{cost_line}\n"


def main(argv=None):
    """train.py's entry point (its torchrun set-up, Ctrl-C handling and one-line errors) around run_all."""
    return train.main(argv, entry=run_all)


if __name__ == "__main__":
    train.exit_process(main())
