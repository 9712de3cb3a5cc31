"""Draw a run's evaluation table as a curve: its metric against thinking steps, one panel per test set (SVG).

    python scripts/plot_curves.py runs/lit-sudoku                  # runs/lit-sudoku/curve.svg from its results.json
    python scripts/plot_curves.py runs/lit-sudoku/eval.json        # runs/lit-sudoku/eval-curve.svg
    python scripts/plot_curves.py runs/a runs/b --out both.svg     # several runs in one figure, a line per run

A run folder stands for its results.json (its eval.json where it has no results.json). Without --out each file's
curve is written next to it. write_curve is also the writer of scripts/benchmark.py, benchmark_figures.py and
restart_curve.py. Standard library only: a log2 x axis, one line per remaining text column (e.g. lvr's model).
"""
import argparse
import json
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: sudoku_data
from sudoku_data import write_atomically  # noqa: E402  (a temporary file, then a rename: never half a file)

STEP_COLUMN = "thinking steps"
FLOPS_COLUMN = "test-time MFLOP per puzzle"  # Sudoku rows: the compute a puzzle's answer cost
METRIC_COLUMNS = ("exact %", "accuracy %", "cond NLL/char", "bits/char", "NLL/token")  # the first a table has is drawn
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def curve_panels(rows, panel_column="test set", x_name=STEP_COLUMN):
    """Table rows -> (y name, {panel: {line: [(x, y), ...]}}): y is the table's headline metric; rows whose x
    is not a positive number (adaptive exit; step 0, which a log axis cannot show) are left out. Lines are
    named by the remaining text columns (e.g. lvr's model)."""
    y_name = next((c for c in METRIC_COLUMNS if rows and c in rows[0]), None)
    panels = {}
    for row in rows if y_name and x_name in rows[0] else ():
        x, y = row.get(x_name), row.get(y_name)
        if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and isinstance(y, (int, float)):
            line = " ".join(str(v) for c, v in row.items() if isinstance(v, str) and c not in (x_name, panel_column))
            panels.setdefault(str(row.get(panel_column, "")), {}).setdefault(line or y_name, []).append((x, y))
    return y_name, panels


def write_curve(rows, path, title, panel_column="test set", x_name=STEP_COLUMN):
    """The table's metric against thinking steps (or the column x_name) as an SVG line chart per panel, log2
    x axis, written atomically; nothing is written for a table without those columns (e.g. a single-row
    baseline). Returns whether it was written."""
    y_name, panels = curve_panels(rows, panel_column, x_name)
    if not panels:
        return False
    width, height, left, top, plot_w, plot_h = 360, 260, 56, 40, 288, 176
    names = sorted({line for lines in panels.values() for line in lines})
    points = [p for lines in panels.values() for line in lines.values() for p in line]
    x_low, x_high = math.log2(min(x for x, _ in points)), math.log2(max(x for x, _ in points))
    y_low = min(0.0, *(y for _, y in points))
    y_high = 100.0 if y_name.endswith("%") else max(y for _, y in points)
    x_span, y_span = max(x_high - x_low, 1e-9), max(y_high - y_low, 1e-9)
    total_w, total_h = width * len(panels), height + 18 * len(names) + 10
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" font-family="sans-serif" '
           f'font-size="11"><rect width="{total_w}" height="{total_h}" fill="white"/>',
           f'<text x="{total_w / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for index, (panel, lines) in enumerate(panels.items()):
        x0 = index * width + left

        def px(x):
            return x0 + (math.log2(x) - x_low) / x_span * plot_w

        def py(y):
            return top + plot_h - (y - y_low) / y_span * plot_h

        svg += [f'<text x="{x0 + plot_w / 2}" y="{top - 8}" text-anchor="middle">{escape(panel)}</text>',
                f'<rect x="{x0}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>',
                f'<text x="{x0 + plot_w / 2}" y="{top + plot_h + 30}" text-anchor="middle">{escape(x_name)} '
                f'(log scale)</text>', f'<text x="{x0 - 40}" y="{top + plot_h / 2}" text-anchor="middle" '
                f'transform="rotate(-90 {x0 - 40} {top + plot_h / 2})">{escape(y_name)}</text>']
        stride = max(1, math.ceil((x_high - x_low + 1) / 8))  # at most about 8 labels on the axis
        svg += [f'<text x="{px(2 ** tick):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{2 ** tick:g}</text>'
                for tick in range(math.ceil(x_low - 1e-9), math.floor(x_high + 1e-9) + 1) if tick % stride == 0]
        svg += [f'<text x="{x0 - 4}" y="{py(y_low + f * y_span) + 4:.1f}" text-anchor="end">'
                f'{y_low + f * y_span:.3g}</text>' for f in (0, 0.25, 0.5, 0.75, 1)]
        for name, line in sorted(lines.items()):
            points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(line))
            svg.append(f'<polyline fill="none" stroke="{COLOURS[names.index(name) % len(COLOURS)]}" '
                       f'stroke-width="2" points="{points}"><title>{escape(name)}</title></polyline>')
    for index, name in enumerate(names):  # the legend
        y, colour = height + 8 + 18 * index, COLOURS[index % len(COLOURS)]
        svg += [f'<line x1="{left}" y1="{y}" x2="{left + 24}" y2="{y}" stroke="{colour}" stroke-width="2"/>',
                f'<text x="{left + 30}" y="{y + 4}">{escape(name)}</text>']
    text = "\n".join(svg + ["</svg>"]) + "\n"
    write_atomically(path, lambda file: file.write(text.encode()))
    return True


# ------------------------------------------------------------------------------------------------------- command line
def read_record(given):
    """A run folder or a results.json / eval.json of train.py -> (its path, its record); ValueError in one line."""
    path = Path(given)
    if path.is_dir():
        path = next((path / name for name in ("results.json", "eval.json") if (path / name).is_file()), None)
        if path is None:
            raise ValueError(f"{given} holds no results.json or eval.json (train.py writes them after training)")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found") from None
    except OSError as error:
        raise ValueError(f"{path} cannot be read: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error})") from None
    rows = record.get("rows") if isinstance(record, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path} is not a results.json or eval.json of train.py: it has no list of table rows")
    return path, record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_FOLDER_OR_JSON", help="run folders, results.json or eval.json")
    parser.add_argument("--out", metavar="FILE.svg", help="one figure of every run given (default: each file's "
                        "curve next to it, curve.svg or eval-curve.svg)")
    options = parser.parse_args(argv)
    try:
        records = [read_record(given) for given in options.runs]
        titles = [f"{record.get('method')} on {record.get('task')}" for _, record in records]
        if options.out:  # one figure; with several runs, one line per run, named as given
            several = len(records) > 1
            figures = [(Path(options.out), " / ".join(dict.fromkeys(titles)),
                        [{**({"run": given} if several else {}), **row}
                         for given, (_, record) in zip(options.runs, records) for row in record["rows"]])]
        else:
            figures = [(path.parent / ("curve.svg" if path.name == "results.json" else f"{path.stem}-curve.svg"),
                        title, record["rows"]) for (path, record), title in zip(records, titles)]
        for out, title, rows in figures:
            try:
                written = write_curve(rows, out, title)
            except OSError as error:
                raise ValueError(f"cannot write {out}: {error.strerror or error}") from None
            if not written:
                raise ValueError(f"{out} not written: the table has no {STEP_COLUMN} and metric columns to draw")
            print(f"wrote {out}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
