"""Redraw the benchmark's two figures from the exact-% table in docs/benchmark.md (its Results section):
exact % against thinking steps, and against test-time MFLOP per puzzle, each point's cost from its run's
configuration (the COMPARED flags of scripts/benchmark.py) by the method's own test_time_flops.

    python scripts/benchmark_figures.py [OUT_FOLDER]    (default figures/)
"""

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: train, lit, recurrent_depth
import sudoku_data  # noqa: E402
import train  # noqa: E402
from scripts import benchmark  # noqa: E402
from scripts.plot_curves import FLOPS_COLUMN, write_curve  # noqa: E402

HEADER = "| test set | thinking steps | "


def read_table(markdown: str) -> list[dict]:
    """The first table whose header starts with HEADER -> one record per filled cell."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADER)), None)
    if start is None:
        raise ValueError(f"no table starting with '{HEADER.strip()}'")
    names = [cell.strip() for cell in lines[start].strip("|").split("|")[2:]]
    points = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        test_set, steps, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        points += [{"difficulty": test_set, "method": name, "thinking steps": int(steps), "exact %": float(cell)}
                   for name, cell in zip(names, cells) if cell]
    return points


# The docs' table was measured when the recipe row was the --no-imagination student: the same student at test time.
EARLIER_NAMES = {"lit --no-imagination recipe": "lit recipe"}


def cost_per_puzzle(name: str, steps: int) -> float:
    """Test-time MFLOP per puzzle of the benchmark row `name` at `steps` thinking steps, from its flags."""
    name = EARLIER_NAMES.get(name, name)
    method_name, flags = next((m, f) for n, m, f in benchmark.COMPARED if n == name)
    method, given = train.parse(["--method", method_name, *flags])
    fields = {f.name for f in dataclasses.fields(method.Config)}
    config = method.Config(**{k: v for k, v in given.items() if k in fields})
    if method_name == "recurrent_depth":
        return method.test_time_flops(config, sudoku_data.SudokuTask.vocab_size, steps) / 1e6
    return method.test_time_flops(config, "sudoku", steps) / 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "figures"))
    options = parser.parse_args(argv)
    points = read_table((ROOT / "docs" / "benchmark.md").read_text())
    for point in points:
        point[FLOPS_COLUMN] = cost_per_puzzle(point["method"], point["thinking steps"])
    out = Path(options.out)
    write_curve(points, out / "compare_curve.svg", "exact % against thinking steps", panel_column="difficulty")
    write_curve(points, out / "compare_flops.svg", "exact % against test-time compute", panel_column="difficulty",
                x_name=FLOPS_COLUMN)
    print(benchmark.compare_table(points, {}).splitlines()[-1])
    print(f"wrote {out / 'compare_curve.svg'} and {out / 'compare_flops.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
