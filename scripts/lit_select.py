"""Choose among LIT settings (β, the teacher) on the validation split of generated puzzles, never on the test sets.

    python scripts/lit_select.py train --out DIR --candidate "NAME=FLAGS" [--candidate ...] [-- SHARED FLAGS]
        trains each candidate in DIR/NAME, one after another, as
            python train.py --method lit SHARED FLAGS --eval-split validation --out DIR/NAME
        (a folder that already holds results.json is scored as it stands, and one that holds only a checkpoint is
        resumed, each after checking that its run has these settings; --overwrite among the flags trains again),
        then scores them as below. Every command line is checked before the first run starts.
    python scripts/lit_select.py score NAME=RUN_FOLDER[,RUN_FOLDER...] ...
        scores finished runs (each folder's results.json, or a .json file train.py wrote); several folders under one
        name score as the mean of their scores.

The score, one number, higher is better: the mean of three exact % on the validation split,
    score = (hard at 128 thinking steps + medium at 8 + medium at 32) / 3,
read from the rows "validation hard" and "validation medium" (with restarts, the method's own pick, not the
oracle verifier's). A run evaluated on the test split is refused, and so is a table without those rows. Prints a
markdown table and the chosen candidate: the highest score, a tie going to the candidate listed first.
"""

import argparse
import contextlib
import io
import json
import math
import re
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

METRIC = (("hard", 128), ("medium", 8), ("medium", 32))  # (generated set, thinking steps), averaged with equal weights
SPLIT = "validation"
OWN_FLAGS = ("--method", "--out", "--eval-split", "--test-csv", "--resume", "--eval-only")  # set here, or not for selection


def score(rows):
    """(the score, {(set, steps): exact %}) of a results table; ValueError when a row of the metric is missing."""
    found = {}
    for difficulty, steps in METRIC:
        matches = [row["exact %"] for row in rows if row.get("test set") == f"{SPLIT} {difficulty}"
                   and row.get("thinking steps") == steps and row.get("picked by") != "oracle verifier"]
        if len(matches) != 1:
            problem = "no row" if not matches else f"{len(matches)} rows"
            raise ValueError(f"{problem} for '{SPLIT} {difficulty}' at {steps} thinking steps (the score reads hard at 128, "
                             f"medium at 8 and 32: evaluate with --eval-steps holding 8, 32 and 128)")
        found[difficulty, steps] = matches[0]
    return statistics.mean(found.values()), found


def load_validation_record(path):
    """The record train.py wrote (results.json in a run folder, or the .json file given), refused unless its
    evaluation was on the validation split."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    try:
        record = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    except ValueError:
        raise ValueError(f"{path}: not a JSON file written by train.py") from None
    if not isinstance(record, dict) or "rows" not in record or "evaluated" not in record:
        raise ValueError(f"{path}: not a results table written by train.py")
    split = record["evaluated"].get("split", "test")  # a record without the field predates the validation split
    names = {row.get("test set") for row in record["rows"]}
    if split != SPLIT or any(not str(name).startswith(f"{SPLIT} ") for name in names):
        raise ValueError(f"{path} was evaluated on the {split} split ({', '.join(map(str, names))}); settings are "
                         f"chosen on the validation split only (train with --eval-split validation)")
    return record


def scored(named_paths):
    """{name: {"runs": [(path, record, score, parts)], "score": mean score, "parts": mean parts}}."""
    table = {}
    for name, paths in named_paths.items():
        runs = []
        for path in paths:
            record = load_validation_record(path)
            try:
                runs.append((path, record, *score(record["rows"])))
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
        parts = {key: statistics.mean(run[3][key] for run in runs) for key in runs[0][3]}
        table[name] = {"runs": runs, "score": statistics.mean(run[2] for run in runs), "parts": parts}
    return table


def choose(table):
    """The name with the highest score; the first listed on a tie."""
    return max(table, key=lambda name: (table[name]["score"], -list(table).index(name)))


def markdown(table):
    columns = [f"{difficulty} @{steps}" for difficulty, steps in METRIC]
    lines = ["| candidate | runs (seeds) | training FLOPs | " + " | ".join(f"validation {c}" for c in columns) + " | score |",
             "|---|---|---:|" + "---:|" * (len(columns) + 1)]
    for name, entry in table.items():
        seeds = ", ".join(str(run[1]["run"].get("seed", "?")) for run in entry["runs"])
        flops = [run[1].get("cost", {}).get("training_flops", math.nan) for run in entry["runs"]]
        cells = [f"{entry['parts'][key]:.1f}" for key in METRIC]
        lines.append(f"| {name} | {len(entry['runs'])} ({seeds}) | {statistics.mean(flops):.3g} | " + " | ".join(cells)
                     + f" | {entry['score']:.2f} |")
    return "\n".join(lines)


def report(table):
    print(markdown(table))
    chosen = choose(table)
    print(f"\nscore = mean of validation exact % on hard at 128 thinking steps and medium at 8 and 32\n"
          f"chosen: {chosen} (score {table[chosen]['score']:.2f})")
    return chosen


def candidate_runs(out, candidates, shared):
    """[(name, folder, train.py arguments)], every command line parsed and checked before anything runs."""
    import train

    runs = []
    for text in candidates:
        name, _, flags = text.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or not _:
            raise ValueError(f"--candidate {text!r}: expected NAME=FLAGS, NAME of letters, digits, '.', '_' or '-'")
        if name in [run[0] for run in runs]:
            raise ValueError(f"two candidates are named {name}")
        flags = shlex.split(flags)
        for flag in (*shared, *flags):
            if flag.split("=")[0] in OWN_FLAGS:
                raise ValueError(f"{flag.split('=')[0]} is set by lit_select (it trains --method lit on the validation "
                                 f"split, each candidate in --out DIR/NAME); leave it out")
        folder = Path(out) / name
        arguments = ["--method", "lit", *shared, *flags, "--eval-split", SPLIT, "--out", str(folder)]
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):  # argparse's usage lines: only its error is kept
                _, given = train.parse(arguments)
        except train.UsageError as error:
            raise ValueError(f"candidate {name}: {error}") from None
        except SystemExit:
            problem = (said.getvalue().strip().splitlines() or [""])[-1].split("error: ", 1)[-1]
            raise ValueError(f"candidate {name}: train.py cannot parse its flags ({problem})") from None
        if not {steps for _, steps in METRIC} <= set(given.get("eval_steps", ())):
            raise ValueError(f"candidate {name}: the score reads 8, 32 and 128 thinking steps; give --eval-steps with "
                             f"them (e.g. --eval-steps 1,2,4,8,16,32,64,128)")
        runs.append((name, folder, arguments, given))
    return runs


def same_settings(folder, record, given, kind="a finished run"):
    """Refuse a run (its results.json or checkpoint) whose recorded settings differ from the candidate's command
    line; where files live and how often the run logs are not settings."""
    saved = {**record["run"], **record["config"]}
    for key, value in given.items():
        if key in ("method", "out", "overwrite", "data_dir", "mnist_dir", "log_every", "save_every"):
            continue
        old = tuple(saved.get(key)) if isinstance(saved.get(key), list) else saved.get(key)
        new = tuple(value) if isinstance(value, list) else value
        if old != new:
            raise ValueError(f"{folder} holds {kind} with --{key.replace('_', '-')} {old}, not {new}: remove it or "
                             f"choose another --out")


def train_and_score(out, candidates, shared):
    import train

    runs = candidate_runs(out, candidates, shared)
    for name, folder, arguments, given in runs:
        if (folder / "results.json").exists() and not given.get("overwrite"):
            same_settings(folder, load_validation_record(folder), given)
            print(f"{name}: using the finished run in {folder}")
            continue
        if (folder / "checkpoint.pt").exists() and not given.get("overwrite"):  # an interrupted run continues
            try:
                state = train.load_checkpoint(folder / "checkpoint.pt", "lit")
            except train.UsageError as error:
                raise ValueError(str(error)) from None
            same_settings(folder, state, given, "an unfinished run")
            arguments = ["--method", "lit", "--resume", str(folder / "checkpoint.pt")]
        print(f"\n=== {name}: python train.py {shlex.join(arguments)}")
        status = train.main(arguments)
        if status:
            return status
    return scored({name: [folder] for name, folder, _, _ in runs})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    modes = parser.add_subparsers(dest="mode", required=True)
    trains = modes.add_parser("train", help="train every candidate on the validation split, then score them")
    trains.add_argument("--out", required=True, help="folder of the candidates' run folders")
    trains.add_argument("--candidate", action="append", required=True, metavar="NAME=FLAGS",
                        help='one candidate: a name and its train.py flags, e.g. "beta0.1=--imagination-weight 0.1"')
    scores = modes.add_parser("score", help="score finished runs")
    scores.add_argument("runs", nargs="+", metavar="NAME=RUN_FOLDER[,RUN_FOLDER...]")
    options = parser.parse_args(argv)
    try:
        if options.mode == "train":
            table = train_and_score(options.out, options.candidate, shared)
            if isinstance(table, int):
                return table  # a run failed; train.py has said why
        else:
            if shared:
                raise ValueError("score reads finished runs: it takes no train.py flags after --")
            named = {}
            for item in options.runs:
                name, _, folders = item.partition("=")
                if not name or not folders:
                    raise ValueError(f"{item!r}: expected NAME=RUN_FOLDER[,RUN_FOLDER...]")
                named[name] = [folder for folder in folders.split(",") if folder]
            table = scored(named)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
