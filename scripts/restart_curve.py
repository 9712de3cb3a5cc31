"""Exact % against test-time compute, averaged over seeds, from the eval.json files of lit runs evaluated with
and without restarts (train.py --eval-only ... --out FOLDER writes FOLDER/eval.json).

    python scripts/restart_curve.py runs/halt-s*/*/eval.json --out figures/recipe_restarts.svg

Rows are grouped by test set, line and thinking steps: the line is "one trajectory", or "K restarts, picked by
P", with "stopped by the head" where the run stopped trajectories at a threshold. The halting head's pick is left
out (the docs' table gives it). Prints one markdown table (mean ± sd of exact % and the mean test-time MFLOP per
puzzle over the files holding that point, n of them) and draws the means against MFLOP with the curve writer of
scripts/plot_curves.py.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.plot_curves import FLOPS_COLUMN, write_curve  # noqa: E402

LEFT_OUT = ("halting head",)  # picks not drawn
SET_ORDER = ("easy", "medium", "hard", "extreme")  # then any other test set, by name


def line_name(row: dict) -> str:
    name = "one trajectory" if row.get("restarts", 1) == 1 else f"{row['restarts']} restarts, {row['picked by']}"
    return name + (", stopped by the head" if row.get("halt threshold") else "")


def read_points(paths) -> dict:
    """eval.json paths -> {(test set, line, thinking steps): [(exact %, MFLOP per puzzle), ...]}."""
    points = {}
    for path in paths:
        try:
            rows = json.loads(Path(path).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"error: {path} is not an eval.json of train.py ({type(error).__name__}: {error})")
        for row in rows:
            if row.get("picked by") in LEFT_OUT or FLOPS_COLUMN not in row:
                continue
            key = (row["test set"], line_name(row), int(row["thinking steps"]))
            points.setdefault(key, []).append((row["exact %"], row[FLOPS_COLUMN]))
    return points


def summary_rows(points: dict) -> list[dict]:
    rows = []
    def order(key):
        test_set, line, steps = key
        return (SET_ORDER.index(test_set) if test_set in SET_ORDER else len(SET_ORDER), test_set, line, steps)

    for (test_set, line, steps), values in sorted(points.items(), key=lambda item: order(item[0])):
        exact = [e for e, _ in values]
        rows.append({"test set": test_set, "line": line, "thinking steps": steps, "n": len(values),
                     "exact %": statistics.mean(exact), "sd": statistics.stdev(exact) if len(exact) > 1 else 0.0,
                     FLOPS_COLUMN: statistics.mean(f for _, f in values)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [f"| test set | line | thinking steps | {FLOPS_COLUMN} | exact %, mean ± sd | n |",
             "| --- | --- | ---: | ---: | --- | ---: |"]
    lines += [f"| {r['test set']} | {r['line']} | {r['thinking steps']} | {r[FLOPS_COLUMN]:,.0f} | "
              f"{r['exact %']:.1f} ± {r['sd']:.1f} | {r['n']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_json", nargs="+", help="eval.json files of train.py --eval-only runs")
    parser.add_argument("--out", default=None, help="SVG to write (default: only print the table)")
    options = parser.parse_args(argv)
    rows = summary_rows(read_points(options.eval_json))
    if not rows:
        raise SystemExit("error: the files hold no rows with a test-time cost")
    print(markdown(rows))
    if options.out:
        curve_rows = [{"test set": r["test set"], "line": r["line"], FLOPS_COLUMN: r[FLOPS_COLUMN],
                       "exact %": r["exact %"]} for r in rows]
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        write_curve(curve_rows, Path(options.out), "exact % against test-time compute (mean over seeds)",
                    x_name=FLOPS_COLUMN)
        print(f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
