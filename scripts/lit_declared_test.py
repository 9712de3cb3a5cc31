"""LIT's declared test (docs/lit.md), in one command: LIT's knobs chosen on the validation split, then LIT against
its --no-imagination ablation on five paired seeds of the test split, at the hard-puzzle recipe's scale.

    python scripts/lit_declared_test.py [--out runs/lit-declared] [--jobs N] [-- FLAGS FOR EVERY RUN]

1. the nine candidates, β ∈ {0.03, 0.1, 0.3} × {the self teacher, --hint-order propagation, --ema-teacher 0.999},
   seed 0, evaluated on the validation split (OUT/select/NAME);
2. their scores and the choice, by scripts/lit_select.py (the first listed wins a tie);
3. the chosen flags (--steps 6001) and the ablation (--steps 6500), seeds 0-4, on the test split (OUT/test/...);
4. LIT − ablation per seed for each metric, their mean ± sd and the 95 % interval of the mean, and the declared
   reading: a lead (or a loss) where the interval excludes 0, level otherwise; beside it the mean ± sd of seeds 1-4
   (seed 0 is the choice's training seed). Printed and written to OUT/summary.md.
Runs go N at a time, each a `python train.py` process with its log in its folder (on one GPU several of these
small runs share the device; on a CPU give each a thread: OMP_NUM_THREADS=1). A folder that holds results.json is
used as it stands and one that holds only a checkpoint is resumed, each after checking that its run has these
settings, so a stopped test continues where it was.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: train.py; and this folder: lit_select
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lit_select  # noqa: E402
from sudoku_data import write_atomically  # noqa: E402

RECIPE = ["--difficulty", "mixed", "--base-size", "3000", "--segment-steps", "2", "--compile", "--dtype", "bfloat16",
          "--ema", "0.999", "--eval-steps", "1,2,4,8,16,32,64,128"]
LIT_STEPS, ABLATION_STEPS = "6001", "6500"  # equal training FLOPs (docs/lit.md)
TEACHERS = {"self": [], "prop": ["--hint-order", "propagation"], "ema": ["--ema-teacher", "0.999"]}
CANDIDATES = {f"{teacher}-b{beta}": ["--imagination-weight", beta, *flags]
              for beta in ("0.03", "0.1", "0.3") for teacher, flags in TEACHERS.items()}
SEEDS = range(5)
T_95 = 2.776  # Student's t, 4 degrees of freedom, two-sided 95 %


def start_train(arguments, folder):
    """Start one `python train.py` process, its output in folder/train.log; returns the process."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.log", "w") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *arguments], stdout=log, stderr=subprocess.STDOUT)


def run_all(todo, jobs, start=start_train):
    """todo: [(folder, train.py arguments)]; runs those without results.json, `jobs` at a time. Returns the
    folders whose run failed."""
    waiting = [(folder, arguments) for folder, arguments in todo if not (folder / "results.json").exists()]
    running, failed = [], []
    while waiting or running:
        while waiting and len(running) < jobs:
            folder, arguments = waiting.pop(0)
            print(f"{time.strftime('%H:%M:%S')} start {folder}", flush=True)
            running.append((folder, start(arguments, folder)))
        finished = [(folder, process) for folder, process in running if process.poll() is not None]
        if not finished:
            time.sleep(1)
        for folder, process in finished:
            running.remove((folder, process))
            print(f"{time.strftime('%H:%M:%S')} end {folder}: exit status {process.returncode}", flush=True)
            if process.returncode or not (folder / "results.json").exists():
                failed.append(folder)
    return failed


def prepared(todo):
    """todo with each folder checked: a finished run (results.json) or an unfinished one (a checkpoint, resumed)
    must have been started with the same settings, else the test would mix runs; ValueError names the first."""
    import train

    ready = []
    for folder, arguments in todo:
        _, given = train.parse(arguments)
        if (folder / "results.json").exists():
            lit_select.same_settings(folder, json.loads((folder / "results.json").read_text()), given)
        elif (folder / "checkpoint.pt").exists():
            try:
                state = train.load_checkpoint(folder / "checkpoint.pt", "lit")
            except train.UsageError as error:
                raise ValueError(str(error)) from None
            lit_select.same_settings(folder, state, given, "an unfinished run")
            arguments = ["--method", "lit", "--resume", str(folder / "checkpoint.pt")]
        ready.append((folder, arguments))
    return ready


def test_runs(out, chosen_flags, shared):
    return [(out / "test" / f"{kind}-s{seed}", ["--method", "lit", *RECIPE, *flags, *shared, "--seed", str(seed),
                                                "--out", str(out / "test" / f"{kind}-s{seed}")])
            for seed in SEEDS for kind, flags in (("lit", ["--steps", LIT_STEPS, *chosen_flags]),
                                                  ("ablation", ["--no-imagination", "--steps", ABLATION_STEPS]))]


def exact(folder, test_set, steps):
    record = json.loads((folder / "results.json").read_text())
    if record.get("evaluated", {}).get("split", "test") != "test":
        raise ValueError(f"{folder} was not evaluated on the test split")
    return next(row["exact %"] for row in record["rows"]
                if (row["test set"], row["thinking steps"]) == (test_set, steps) and row.get("picked by") != "oracle verifier")


def reading(differences):
    """(mean, sd, low, high, word) of the paired differences: the 95 % interval of the mean, and 'lead', 'loss'
    or 'level' by whether it excludes 0."""
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    half = T_95 * sd / math.sqrt(len(differences))
    return mean, sd, mean - half, mean + half, "lead" if mean - half > 0 else "loss" if mean + half < 0 else "level"


def summary(out, chosen, selection_table):
    lines = [f"# LIT's declared test\n\nChosen on the validation split: **{chosen}** "
             f"(`{' '.join(CANDIDATES[chosen])}`)\n", selection_table, "",
             "| metric | LIT − ablation per seed (0-4) | mean ± sd | 95 % interval | reading | seeds 1-4: mean ± sd |",
             "|---|---|---:|---:|---|---:|"]
    for test_set, steps in lit_select.METRIC:
        d = [exact(out / "test" / f"lit-s{s}", test_set, steps) - exact(out / "test" / f"ablation-s{s}", test_set, steps)
             for s in SEEDS]
        mean, sd, low, high, word = reading(d)
        lines.append(f"| {test_set} at {steps} | {', '.join(f'{x:+.1f}' for x in d)} | {mean:+.1f} ± {sd:.1f} | "
                     f"{low:+.1f} to {high:+.1f} | {word} | {statistics.mean(d[1:]):+.1f} ± {statistics.stdev(d[1:]):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None, start=start_train):
    argv = sys.argv[1:] if argv is None else argv
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--out", default="runs/lit-declared", help="folder of every run and the summary")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    options = parser.parse_args(argv)
    out = Path(options.out)
    try:
        if options.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {options.jobs}")
        for flag in shared:
            if flag.split("=")[0] in (*lit_select.OWN_FLAGS, "--seed", "--steps", "--no-imagination"):
                raise ValueError(f"{flag.split('=')[0]} is set by the declared test; leave it out")
        candidates = lit_select.candidate_runs(out / "select", [f"{name}={' '.join(flags)}" for name, flags in CANDIDATES.items()],
                                               [*RECIPE, "--steps", LIT_STEPS, "--seed", "0", *shared])
        failed = run_all(prepared([(folder, arguments) for _, folder, arguments, _ in candidates]), options.jobs, start)
        if failed:
            raise ValueError(f"{len(failed)} run(s) failed: see train.log in {', '.join(map(str, failed))}")
        table = lit_select.scored({name: [folder] for name, folder, _, _ in candidates})
        chosen = lit_select.choose(table)
        print(f"chosen on the validation split: {chosen} ({' '.join(CANDIDATES[chosen])})")
        failed = run_all(prepared(test_runs(out, CANDIDATES[chosen], shared)), options.jobs, start)
        if failed:
            raise ValueError(f"{len(failed)} run(s) failed: see train.log in {', '.join(map(str, failed))}")
        text = summary(out, chosen, lit_select.markdown(table))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    write_atomically(out / "summary.md", lambda file: file.write(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
