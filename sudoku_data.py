"""Sudoku data shared by recurrent_depth.py, ltm.py and lit.py: generation, caching, augmentation,
CSV files, MNIST digits for the visual form, and the metrics every method reports.

Grids are int8 numpy arrays of shape (N, 81), row-major, 0 = blank, 1..9 = digits.

Difficulty presets (every generated puzzle has exactly one solution):
  easy    36-45 givens: clues removed from a random full grid in random order, keeping uniqueness,
          until a target count drawn uniformly from [36, 45] is reached.
  medium  28-35 givens: the same with a target drawn uniformly from [28, 35].
  hard    22-27 givens: every cell is tried for removal (the result is minimal: no given can be
          removed without losing uniqueness); kept only if it has 22-27 givens AND needs at least
          one guess, i.e. naked and hidden singles alone do not solve it.
  extreme 17-25 givens, rated at least EXTREME_RATING (the range of the public hardest lists): a hard puzzle,
          then a climb towards harder neighbours (a given removed, or moved, clues of the solution added back
          until the solution is unique again, the result made minimal), kept while its rating rises.
          Not among the default test sets (EVAL_SETS): a run evaluates on it when asked (eval_sets).
Guesses: the number of branch points the solver below visits while it proves the solution unique (propagation
with naked + hidden singles, branching on the first minimum-remaining-values cell). One solver path depends on
the order of the cells, so a puzzle's rating is the mean of its guesses over RATING_TRANSFORMS fixed random
validity-preserving transforms (rating()): a property of the puzzle, up to that averaging.

Training streams validity-preserving augmentations of a small cached base set (digit relabelling,
transpose, band/stack permutations, row/column permutations within bands/stacks), which is how the
Sudoku-Extreme baselines train: about 1k base puzzles, heavily augmented.
"""
import contextlib
import csv
import gzip
import hashlib
import itertools
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

DIFFICULTIES = {"easy": (36, 45), "medium": (28, 35), "hard": (22, 27), "extreme": (17, 25)}  # givens, inclusive
# the minimal presets (every cell tried for removal), each kept only with at least this many guesses
FEWEST_GUESSES = {"hard": 1}
EXTREME_RATING = 30  # the least rating of an extreme puzzle
RATING_TRANSFORMS, RATING_SEED = 32, 81  # the transforms a rating averages over, and their seed
CLIMB_STEPS = 300  # neighbours tried from one start before the climb starts again from another hard puzzle
# the generated test sets of a run unless it names others (extreme is left out: it is slow to generate)
EVAL_SETS = ("easy", "medium", "hard")
# training base sets made of equal shares of presets ("harder": without the easy third that a model masters first)
TRAINING_MIXES = {"mixed": ("easy", "medium", "hard"), "harder": ("medium", "hard")}
# the generated held-out sets of a run with seed s come from seed s + offset: the test sets, and a validation split
# for choosing settings; the validation offset is above every training (s < 2**32) and test seed, so no run's
# training or test stream is another run's validation stream
EVAL_SPLITS = {"test": 1_000_003, "validation": 2**33}

# ----------------------------------------------------------------------------- the solver
ROWS = [[r * 9 + c for c in range(9)] for r in range(9)]
COLUMNS = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES = [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
UNITS = ROWS + COLUMNS + BOXES  # 27 units of 9 cells
PEERS = [sorted({p for unit in UNITS if cell in unit for p in unit} - {cell}) for cell in range(81)]
ALL_DIGITS = 0b111111111  # bit d-1 set = digit d still possible
POPCOUNT = [bin(mask).count("1") for mask in range(512)]


def _propagate(candidates, queue):
    """Naked + hidden singles until nothing changes. Mutates candidates; False on contradiction."""
    while True:
        while queue:
            cell = queue.pop()
            bit = candidates[cell]
            for peer in PEERS[cell]:
                mask = candidates[peer]
                if mask & bit:
                    mask ^= bit
                    if not mask:
                        return False
                    candidates[peer] = mask
                    if not mask & (mask - 1):
                        queue.append(peer)
        for unit in UNITS:  # hidden singles: a digit with one possible place in a unit
            once = twice = 0
            for cell in unit:
                mask = candidates[cell]
                twice |= once & mask
                once |= mask
            if once != ALL_DIGITS:
                return False
            hidden = once & ~twice
            if hidden:
                for cell in unit:
                    forced = candidates[cell] & hidden
                    if forced and candidates[cell] != forced:
                        if forced & (forced - 1):
                            return False  # two digits need this one cell
                        candidates[cell] = forced
                        queue.append(cell)
        if not queue:
            return True


def _search(candidates, limit, stats, rng=None):
    """Depth-first search on a propagated grid; returns up to `limit` solved candidate lists.
    stats[0] counts branch points (guesses). With rng, branches are tried in random order."""
    best, best_count = -1, 10
    for cell in range(81):
        mask = candidates[cell]
        if mask & (mask - 1) and POPCOUNT[mask] < best_count:  # minimum remaining values
            best, best_count = cell, POPCOUNT[mask]
            if best_count == 2:
                break
    if best < 0:
        return [candidates]
    stats[0] += 1
    bits = [1 << d for d in range(9) if candidates[best] >> d & 1]
    if rng is not None:
        rng.shuffle(bits)
    solutions = []
    for bit in bits:
        child = candidates[:]
        child[best] = bit
        if _propagate(child, [best]):
            solutions += _search(child, limit - len(solutions), stats, rng)
            if len(solutions) >= limit:
                break
    return solutions


def _candidates(grid):
    """Bitmask candidates of an 81-digit grid (sequence of ints, 0 = blank), or None if givens clash."""
    candidates = [ALL_DIGITS] * 81
    givens = [cell for cell in range(81) if grid[cell]]
    for cell in givens:
        candidates[cell] = 1 << (int(grid[cell]) - 1)
    return candidates if _propagate(candidates, givens) else None


def _to_digits(candidates):
    return [mask.bit_length() for mask in candidates]


def solve(grid, limit=2):
    """Count solutions of an 81-cell grid up to `limit`.
    Returns (count, first solution as a list of 81 digits or None, guesses)."""
    grid = [int(v) for v in np.asarray(grid).reshape(-1)]
    if len(grid) != 81 or any(not 0 <= v <= 9 for v in grid):
        raise ValueError("a Sudoku grid has 81 cells with values 0 (blank) to 9")
    stats = [0]
    candidates = _candidates(grid)
    solutions = [] if candidates is None else _search(candidates, limit, stats)
    return len(solutions), (_to_digits(solutions[0]) if solutions else None), stats[0]


def _has_other_solution(puzzle, cell, digit):
    """True if `puzzle` (which has `cell` blank) has a solution with `cell` != `digit`."""
    candidates = [ALL_DIGITS] * 81
    candidates[cell] = ALL_DIGITS & ~(1 << (digit - 1))
    givens = [c for c in range(81) if puzzle[c]]
    for c in givens:
        candidates[c] = 1 << (puzzle[c] - 1)
    return _propagate(candidates, givens) and bool(_search(candidates, 1, [0]))


def rating(puzzle, transforms=RATING_TRANSFORMS, seed=RATING_SEED):
    """Mean guesses of the solver over `transforms` random validity-preserving transforms of a unique-solution
    puzzle (81 ints), the same transforms for every puzzle (drawn from `seed`)."""
    return float(np.mean(_guesses(puzzle, transforms, np.random.default_rng(seed))))


def _guesses(puzzle, count, rng):
    """The solver's guesses on each of `count` random transforms of a puzzle."""
    grids = np.repeat(np.asarray(puzzle, np.int8).reshape(1, 81), count, 0)
    return [solve(grid)[2] for grid in augment(grids, grids, rng)[0].tolist()]


def _minimal(puzzle, rng):
    """The puzzle with givens removed in random order while its solution stays unique (no given can then go)."""
    for cell in rng.permutation([cell for cell in range(81) if puzzle[cell]]):
        digit, puzzle[cell] = puzzle[cell], 0
        if _has_other_solution(puzzle, cell, digit):
            puzzle[cell] = digit
    return puzzle


def _neighbour(puzzle, solution, rng):
    """A unique-solution puzzle near `puzzle`: one given removed (half the time put back on another cell),
    then clues of the solution added where a second solution differs from it, until it is the only one."""
    puzzle, givens = puzzle[:], [cell for cell in range(81) if puzzle[cell]]
    removed = givens[rng.integers(len(givens))]
    puzzle[removed] = 0
    if rng.random() < 0.5:
        blanks = [cell for cell in range(81) if not puzzle[cell] and cell != removed]
        added = blanks[rng.integers(len(blanks))]
        puzzle[added] = solution[added]
    while True:
        found = [_to_digits(candidates) for candidates in _search(_candidates(puzzle), 2, [0])]
        if len(found) == 1:
            return puzzle
        other = next(grid for grid in found if grid != solution)
        cells = [cell for cell in range(81) if other[cell] != solution[cell] and cell != removed] or [removed]
        cell = cells[rng.integers(len(cells))]
        puzzle[cell] = solution[cell]


def _generate_extreme(rng):
    """A hard puzzle, then the climb: a neighbour replaces the puzzle when its mean guesses over a few fresh
    transforms are at least the puzzle's (whose estimate gains transforms while it stays); done when the
    rating (over other transforms than the climb's) reaches EXTREME_RATING with the preset's givens."""
    low, high = DIFFICULTIES["extreme"]
    while True:
        puzzle, solution, _ = _generate_one("hard", rng)
        samples, rated = _guesses(puzzle, 8, rng), None  # the climb's estimate of the puzzle; its rating once known
        for _ in range(CLIMB_STEPS):
            candidate = _neighbour(puzzle, solution, rng)
            if np.mean(_guesses(candidate, 2, rng)) < np.mean(samples) / 2:
                continue  # made minimal only when it looks promising: most of the climb's work is there
            candidate = _minimal(candidate, rng)
            if not low <= sum(map(bool, candidate)) <= high:
                continue
            trial = _guesses(candidate, 8, rng)
            if np.mean(trial) >= np.mean(samples):
                puzzle, samples, rated = candidate, trial, None
            else:
                samples += _guesses(puzzle, 2, rng)
            if np.mean(samples) >= EXTREME_RATING:
                rated = rating(puzzle) if rated is None else rated
                if rated >= EXTREME_RATING:
                    return puzzle, solution, solve(puzzle)[2]


def _generate_one(difficulty, rng):
    """One puzzle of the preset: (puzzle, solution, guesses) as lists of 81 ints."""
    if difficulty == "extreme":
        return _generate_extreme(rng)
    low, high = DIFFICULTIES[difficulty]
    minimal = difficulty in FEWEST_GUESSES
    while True:
        solution = _to_digits(_search([ALL_DIGITS] * 81, 1, [0], rng)[0])  # a random full grid
        target = low if minimal else int(rng.integers(low, high + 1))
        puzzle, givens = solution[:], 81
        for cell in rng.permutation(81):
            if givens <= target:
                break
            digit, puzzle[cell] = puzzle[cell], 0
            if _has_other_solution(puzzle, cell, digit):
                puzzle[cell] = digit  # removing it would allow a second solution
            else:
                givens -= 1
        count, _, guesses = solve(puzzle)
        assert count == 1
        if not minimal or (givens <= high and guesses >= FEWEST_GUESSES[difficulty]):
            return puzzle, solution, guesses


def _generate_chunk(job, made=lambda: None):
    """One job's puzzles as arrays: puzzles and solutions int8 (count, 81), guesses int32 (count,); made() is
    called after each puzzle."""
    difficulty, count, seed = job
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        rows.append(_generate_one(difficulty, rng))
        made()
    puzzles, solutions, guesses = zip(*rows)
    return np.array(puzzles, np.int8), np.array(solutions, np.int8), np.array(guesses, np.int32)


GENERATION_CHUNK = 25  # puzzles a job; each job has its own seed, so the result does not depend on the worker count
BYTES_PER_PUZZLE = 81 + 81 + 4  # what generate_puzzles returns for each puzzle: two int8 grids and int32 guesses
GENERATION_BYTES = 3_500  # what a base-set puzzle takes while its set is generated, checked and cached


def available_memory():
    """Bytes this machine can still give a process (MemAvailable on Linux, all physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_request(n, difficulty):
    """ValueError naming the problem with a request generate_puzzles cannot meet, before any work."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")
    if n < 1:
        raise ValueError(f"number of puzzles must be positive, got {n}")
    needed, available = n * BYTES_PER_PUZZLE, available_memory()
    if needed > available:
        raise ValueError(f"{n} {difficulty} puzzles need {needed / 2**30:.1f} GiB of memory and this machine has "
                         f"{available / 2**30:.1f} GiB available: ask for fewer")


_SECONDS_PER_PUZZLE = {}  # preset -> seconds one puzzle took here, timed once a process


def generation_cost(difficulty, n, workers=None):
    """Estimated (seconds, bytes) that generate_puzzles(n, difficulty, workers=workers) takes on this machine,
    before starting it: the seconds from timing a few puzzles of the preset here (about one second, once a process,
    at least one puzzle), the bytes those of the arrays it returns. ValueError (as generate_puzzles) for a request
    beyond this machine's memory."""
    _check_request(n, difficulty)
    if difficulty not in _SECONDS_PER_PUZZLE:
        rng, count, start = np.random.default_rng([2**40, len(difficulty)]), 0, time.perf_counter()
        while count == 0 or (count < 8 and time.perf_counter() - start < 1.0):
            _generate_one(difficulty, rng)
            count += 1
        _SECONDS_PER_PUZZLE[difficulty] = (time.perf_counter() - start) / count
    jobs = -(-n // GENERATION_CHUNK)
    parallel = min(workers or os.cpu_count() or 1, jobs)
    return _SECONDS_PER_PUZZLE[difficulty] * n / parallel, n * BYTES_PER_PUZZLE


def check_generation(difficulty, n, data_dir="data"):
    """Before a base set of n puzzles of a preset or a TRAINING_MIXES mix is generated (10,000 or more; smaller
    ones are quick): ValueError for one that cannot fit in free memory or would take more than a week here, else
    its time (generation_cost's estimate) printed."""
    if n < 10_000:
        return
    needed, free = n * GENERATION_BYTES, available_memory()
    if needed > free:
        raise ValueError(f"generating it needs about {needed / 2**30:,.1f} GiB, but {free / 2**30:,.1f} GiB are free")
    presets = TRAINING_MIXES.get(difficulty, (difficulty,))
    seconds = sum(generation_cost(preset, -(-n // len(presets)))[0] for preset in presets)
    if seconds > 7 * 86_400:
        raise ValueError(f"generating it would take about {seconds / 86_400:,.0f} days here; ask for fewer puzzles "
                         f"or train on CSV files")
    print(f"a base set of {n:,} {difficulty} puzzles: generating it takes about {seconds / 60:,.0f} min here, once "
          f"(then it is read from {data_dir})")


STOPS = {signal.SIGINT, signal.SIGTERM}


def _start_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which ends the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as the pool's terminate() expects


def _start_pool(stack, workers):
    """A worker pool entered into `stack` (terminated, its workers killed, on leaving it, also by an exception);
    Ctrl-C or SIGTERM while its workers start is held until then, so that it cannot leave them running."""
    if threading.current_thread() is not threading.main_thread():
        return stack.enter_context(multiprocessing.Pool(workers, initializer=_start_worker))
    stops = []
    held = {number: signal.signal(number, lambda number, frame: stops.append(number)) for number in STOPS}
    try:
        pool = stack.enter_context(multiprocessing.Pool(workers, initializer=_start_worker))
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)
    if stops:
        raise KeyboardInterrupt
    return pool


def _stop_at_once(signum, frame):
    raise KeyboardInterrupt


def generate_puzzles(n, difficulty, seed=0, workers=None):
    """n unique-solution puzzles of a preset, deterministic in (difficulty, seed) whatever the workers.
    Returns (puzzles int8 (n, 81), solutions int8 (n, 81), guesses int32 (n,)). A request beyond this machine's
    memory is refused at once (ValueError); a long generation shows its progress; Ctrl-C or SIGTERM ends the worker
    processes at once and raises KeyboardInterrupt."""
    _check_request(n, difficulty)
    jobs = ((difficulty, min(GENERATION_CHUNK, n - start), [seed, start]) for start in range(0, n, GENERATION_CHUNK))
    workers = min(workers or os.cpu_count() or 1, -(-n // GENERATION_CHUNK))
    puzzles, solutions, guesses = np.empty((n, 81), np.int8), np.empty((n, 81), np.int8), np.empty(n, np.int32)
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _stop_at_once)  # SIGTERM as Ctrl-C: the workers are ended too
    progress = tqdm(total=n, desc=f"generating {n} {difficulty} puzzles", unit="puzzle", delay=5, leave=False)
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1:
                parts = _start_pool(stack, workers).imap(_generate_chunk, jobs)
            else:  # progress after each puzzle
                parts = (_generate_chunk(job, lambda: progress.update(1)) for job in jobs)
            done = 0
            for part in parts:
                count = len(part[0])
                puzzles[done:done + count], solutions[done:done + count], guesses[done:done + count] = part
                done += count
                if workers > 1:
                    progress.update(count)
    finally:
        progress.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return puzzles, solutions, guesses


# ----------------------------------------------------------------------------- caching
def write_atomically(path, write):
    """write(binary file) into a temporary file beside path, then rename it to path: a crash or a full
    disk never leaves half a file, and the previous one stays until the rename (train.py writes its run
    folder with it too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)  # the usual permissions, not mkstemp's 0600: caches and runs are shared
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def invalid_rows(puzzles, solutions):
    """(N,) bool: the rows whose solution is not a full valid grid that agrees with the puzzle's givens."""
    puzzles, solutions = np.asarray(puzzles, np.int64), np.asarray(solutions, np.int64)
    bad = ((puzzles < 0) | (puzzles > 9)).any(1) | ((solutions < 1) | (solutions > 9)).any(1)
    bad |= ((puzzles != 0) & (puzzles != solutions)).any(1)
    return bad | (broken_constraints(torch.from_numpy(solutions.clip(0, 9))).numpy() > 0)


RECHECKED = 4  # extreme puzzles whose rating is computed again on every load of a cached set, drawn at random


def _rating_problem(puzzles, ratings):
    """What is wrong with the ratings stored beside a cached extreme set (None if nothing): each must reach
    EXTREME_RATING, and those of RECHECKED random puzzles must be their rating computed again."""
    if ratings is None or ratings.shape != (len(puzzles),):
        return "holds no rating for each puzzle"
    if (ratings < EXTREME_RATING).any():
        return f"has puzzle(s) rated {ratings.min():.1f}, below extreme's {EXTREME_RATING}"
    for index in np.random.default_rng().permutation(len(puzzles))[:RECHECKED]:
        if (computed := rating(puzzles[index])) != ratings[index]:
            return f"holds puzzle {index} rated {ratings[index]:.1f}, and its rating is {computed:.1f}"
    return None


def cache_path(difficulty, n, seed=0, data_dir="data"):
    """Where load_puzzles keeps a generated set (absent until it is first generated)."""
    return Path(data_dir) / f"sudoku-{difficulty}-{n}-seed{seed}.npz"


def load_puzzles(difficulty, n, seed=0, data_dir="data"):
    """The cached set data_dir/sudoku-<difficulty>-<n>-seed<seed>.npz, generated once if absent, checked
    on every load (each puzzle agrees with its valid solution and has its preset's number of givens; an extreme
    set's ratings as _rating_problem says) and generated again if damaged. Returns (puzzles, solutions) as int8
    (n, 81)."""
    path = cache_path(difficulty, n, seed, data_dir)
    low, high = DIFFICULTIES[difficulty]
    if path.exists():
        try:
            with np.load(path) as data:
                puzzles, solutions = data["puzzles"], data["solutions"]
                ratings = data["ratings"] if "ratings" in data else None
            if (puzzles.shape, solutions.shape, puzzles.dtype, solutions.dtype) != ((n, 81), (n, 81), np.int8, np.int8):
                problem = (f"holds {puzzles.dtype} {puzzles.shape} and {solutions.dtype} {solutions.shape}, "
                           f"not int8 ({n}, 81)")
            elif invalid_rows(puzzles, solutions).any():
                problem = f"has {int(invalid_rows(puzzles, solutions).sum())} puzzle(s) with a broken solution"
            elif not ((givens := (puzzles != 0).sum(1)) >= low).all() or not (givens <= high).all():
                problem = (f"has puzzle(s) with {givens.min()}-{givens.max()} givens, not the {low}-{high} of "
                           f"{difficulty}")
            elif difficulty != "extreme" or not (problem := _rating_problem(puzzles, ratings)):
                return puzzles, solutions
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as error:
            problem = f"cannot be read ({type(error).__name__}: {error})"
        print(f"warning: {path} {problem}; generating it again", file=sys.stderr)
    puzzles, solutions, guesses = generate_puzzles(n, difficulty, seed)
    ratings = {"ratings": np.array([rating(p) for p in puzzles.tolist()])} if difficulty == "extreme" else {}
    write_atomically(path, lambda f: np.savez(f, puzzles=puzzles, solutions=solutions, guesses=guesses, **ratings))
    return puzzles, solutions


# ----------------------------------------------------------------------------- augmentation
def _random_permutations(rng, shape, size):
    return np.argsort(rng.random((*shape, size)), axis=-1)


def _line_order(rng, batch):
    """(B, 9) random order of rows (or columns) that keeps bands (stacks) together."""
    bands = _random_permutations(rng, (batch,), 3)  # (B, 3)
    within = _random_permutations(rng, (batch, 3), 3)  # (B, 3, 3)
    return (bands[:, :, None] * 3 + np.take_along_axis(within, bands[:, :, None], axis=1)).reshape(batch, 9)


def augment(puzzles, solutions, rng):
    """Validity-preserving random transforms, vectorised over the batch; the same per pair."""
    batch = len(puzzles)
    digit_map = np.concatenate([np.zeros((batch, 1), np.int64), 1 + _random_permutations(rng, (batch,), 9)], 1)
    rows, columns = _line_order(rng, batch), _line_order(rng, batch)
    transpose = rng.random(batch) < 0.5
    out = []
    for grid in (puzzles, solutions):
        grid = np.take_along_axis(digit_map, grid.astype(np.int64), axis=1).reshape(batch, 9, 9)
        grid = np.where(transpose[:, None, None], grid.transpose(0, 2, 1), grid)
        grid = np.take_along_axis(grid, rows[:, :, None], axis=1)
        grid = np.take_along_axis(grid, columns[:, None, :], axis=2)
        out.append(grid.reshape(batch, 81).astype(np.int8))
    return out[0], out[1]


# ----------------------------------------------------------------------------- CSV files
CSV_CHUNK = 50_000  # rows read and checked at a time: memory stays flat whatever the file's length


def read_csv(path, check_unique=False, limit=None):
    """Read a public-format Sudoku CSV: 81-character grids ('.' or '0' for a blank), comma-separated, below a header
    naming the columns (question,answer, source,question,answer,rating, ...), below any other one-line header (the
    grid columns are then those of the first row), or without a header. Returns int8 (N, 81) pairs (the first `limit`
    rows with a limit). Every solution must be a valid grid agreeing with its givens; check_unique also solves every
    puzzle and reports those with more than one solution. A file without a solution column (a puzzle column alone)
    is solved with the solver above, and each puzzle must have exactly one solution. A file separated by tabs or
    semicolons is refused in one line. The file is read and checked in chunks of CSV_CHUNK rows, vectorised, into
    int8 arrays: memory grows with the puzzles kept, not with the text read."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:  # -sig: a byte-order mark is skipped
            puzzles, solutions = _read_csv_rows(csv.reader(file), path, check_unique, limit)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    except csv.Error as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from None
    return puzzles, solutions


SEPARATORS = {"\t": "tabs", ";": "semicolons", "|": "vertical bars"}  # what a one-column row may be split by instead


def _grid_like(field):
    """True for a field that is meant as a grid (more than half of 81 characters digits or dots), even a broken one:
    such a first row is read as data, never skipped as a header."""
    return sum(ch in ".0123456789" for ch in field) > 40


def _check_separator(row, path):
    """One line naming the separator of a row that csv read as one column because it is not split by commas."""
    name = next((name for separator, name in SEPARATORS.items() if len(row) == 1 and separator in row[0]), None)
    parts = row[0].split() if len(row) == 1 else []
    if name is None and len(parts) > 1 and any(len(part) == 81 for part in parts):
        name = "spaces"
    if name:
        raise ValueError(f"{path}: the columns are separated by {name}, not commas; save it as comma-separated values "
                         f"(an optional header line, then puzzle,solution rows)")


def _read_csv_rows(reader, path, check_unique, limit):
    first_row = next(reader, None)
    if first_row is None:
        raise ValueError(f"{path}: empty file")
    _check_separator(first_row, path)
    header = [name.strip().lower() for name in first_row]
    puzzle_names, solution_names = ("question", "puzzle", "quizzes", "quiz"), ("answer", "solution", "solutions")
    if any(name in puzzle_names for name in header):  # a header naming its columns
        question = next(i for i, name in enumerate(header) if name in puzzle_names)
        answer = next((i for i, name in enumerate(header) if name in solution_names), None)
        rows, first = iter(reader), 2
    else:  # the grid columns of the first row (no header) or of the first row below a header of other names
        first = 1 if any(map(_grid_like, first_row)) else 2
        data_row, skipped = (first_row, 0) if first == 1 else next(
            ((row, skipped) for skipped, row in enumerate(reader) if row), (None, 0))
        if data_row is None:
            raise ValueError(f"{path}: no puzzles")
        _check_separator(data_row, path)
        grids = [i for i, field in enumerate(data_row) if _grid_like(field)]
        if not grids:
            raise ValueError(f"{path}, line {first + skipped}: no column holds an 81-character puzzle (the header "
                             f"line {','.join(first_row)!r} names none of {', '.join(puzzle_names)})")
        question, answer = grids[0], (grids[1] if len(grids) > 1 else None)
        rows, first = itertools.chain([data_row], reader), first + skipped
    columns = max(question, answer or 0) + 1
    puzzle_parts, solution_parts, stored = [], [], 0
    while limit is None or stored < limit:
        block = list(itertools.islice(rows, CSV_CHUNK if limit is None else min(CSV_CHUNK, limit - stored)))
        if not block:
            break
        lines = range(first, first + len(block))  # the file line of each row
        first += len(block)
        if not all(block):  # blank lines are skipped
            lines, block = zip(*[(line, row) for line, row in zip(lines, block) if row]) or ((), ())
            if not block:
                continue
        if min(map(len, block)) < columns:
            line, row = next((line, row) for line, row in zip(lines, block) if len(row) < columns)
            raise ValueError(f"{path}, line {line}: expected at least {columns} columns, got {len(row)}")
        puzzles = [row[question].strip() for row in block]
        solutions = ([row[answer].strip() for row in block] if answer is not None else
                     [_solved(puzzle, path, line) for puzzle, line in zip(puzzles, lines)])
        _check_chunk(lines, puzzles, solutions, path, puzzle_parts, solution_parts, check_unique)
        stored += len(block)
    if not puzzle_parts:
        raise ValueError(f"{path}: no puzzles")
    return np.concatenate(puzzle_parts), np.concatenate(solution_parts)


def _grid_problem(puzzle, solution):
    """What is wrong with one row's puzzle and solution text (None if nothing), as the error names it."""
    for name, text, allowed in (("puzzle", puzzle, ".0123456789"), ("solution", solution, "123456789")):
        if len(text) != 81:
            return f"{name} has {len(text)} characters, expected 81"
        bad = sorted(set(text) - set(allowed))
        if bad:
            return f"{name} contains invalid characters {''.join(bad)!r}"
    puzzle_digits = [0 if ch == "." else int(ch) for ch in puzzle]
    clash = next((cell for cell in range(81) if puzzle_digits[cell] not in (0, int(solution[cell]))), None)
    if clash is not None:
        return (f"given {puzzle_digits[clash]} at row {clash // 9 + 1}, column {clash % 9 + 1} contradicts the "
                f"solution's {solution[clash]}")
    broken = int(broken_constraints(torch.tensor([[int(ch) for ch in solution]]))[0])
    return f"the solution breaks {broken} Sudoku rule(s)" if broken else None


UNIT_CELLS = np.array(UNITS)  # (27, 9)


def _check_chunk(lines, puzzle_texts, solution_texts, path, puzzle_parts, solution_parts, check_unique):
    """Check a chunk of rows at once and append them as int8 (n, 81) arrays; the first bad row is named with
    its line (its problem worded by the row-by-row check above)."""
    count = len(lines)
    ok = ((np.fromiter(map(len, puzzle_texts), np.int64, count) == 81) &
          (np.fromiter(map(len, solution_texts), np.int64, count) == 81))
    fixed = np.flatnonzero(ok)
    grids = []
    for texts in (puzzle_texts, solution_texts):
        text = "".join(texts if ok.all() else [texts[i] for i in fixed])
        grids.append(np.frombuffer(text.encode("ascii", errors="replace"), np.uint8).reshape(len(fixed), 81))
    # uint8: '.' and '0' -> 0; other characters wrap above 9
    puzzle = np.where(grids[0] == ord("."), 0, grids[0] - np.uint8(ord("0")))
    solution = grids[1] - np.uint8(ord("0"))
    bad = (puzzle > 9).any(1) | ((solution < 1) | (solution > 9)).any(1)
    bad |= ((puzzle != 0) & (puzzle != solution)).any(1)
    bits = np.left_shift(np.uint16(1), np.clip(solution, 1, 9).astype(np.uint16) - 1)  # (n, 81): one bit per digit
    # a unit missing a digit repeats another
    bad |= (np.bitwise_or.reduce(bits[:, UNIT_CELLS], axis=2) != ALL_DIGITS).any(1)
    ok[fixed[bad]] = False
    if not ok.all():
        index = int(np.argmin(ok))
        problem = _grid_problem(puzzle_texts[index], solution_texts[index]) or "the row cannot be read"
        raise ValueError(f"{path}, line {lines[index]}: {problem}")
    if check_unique:
        several = [line for line, grid in zip(lines, puzzle) if solve(grid)[0] > 1]
        if several:
            shown = ", ".join(map(str, several[:10])) + (", ..." if len(several) > 10 else "")
            raise ValueError(f"{path}: {len(several)} puzzle(s) have more than one solution, on line(s) {shown}")
    puzzle_parts.append(puzzle.astype(np.int8))
    solution_parts.append(solution.astype(np.int8))


def _solved(puzzle, path, line):
    """The one solution of a puzzle read without its solution, as 81 characters."""
    if len(puzzle) != 81 or set(puzzle) - set(".0123456789"):
        return ""  # the caller reports what is wrong with the puzzle
    count, solution, _ = solve([0 if ch == "." else int(ch) for ch in puzzle])
    if count != 1:
        raise ValueError(f"{path}, line {line}: the puzzle has {'no' if count == 0 else 'more than one'} solution")
    return "".join(map(str, solution))


def write_csv(path, puzzles, solutions):
    """Write puzzles ('.' for a blank) and solutions under a question,answer header, atomically."""
    def write(file):
        rows = np.full((len(puzzles), 164), ord(","), np.uint8)  # puzzle, comma, solution, newline
        rows[:, :81] = np.where(np.asarray(puzzles) == 0, ord("."), np.asarray(puzzles) + ord("0"))
        rows[:, 82:163], rows[:, 163] = np.asarray(solutions) + ord("0"), ord("\n")
        file.write(b"question,answer\n" + rows.tobytes())
    write_atomically(path, write)


# ----------------------------------------------------------------------------- metrics
_UNIT_INDEX = torch.tensor(UNITS)  # (27, 9)


def exact_accuracy(prediction, solution):
    """Percent of puzzles with all 81 cells right (the headline metric)."""
    return 100.0 * (prediction == solution).all(dim=1).float().mean().item()


def blank_accuracy(prediction, puzzle, solution):
    """Percent of the blank cells predicted right."""
    blank = puzzle == 0
    return 100.0 * ((prediction == solution) & blank).sum().item() / max(blank.sum().item(), 1)


def broken_constraints(prediction):
    """(B,) number of broken rules: for each row/column/box and digit, occurrences beyond the first."""
    one_hot = torch.nn.functional.one_hot(prediction.long().clamp(0, 9), 10)[..., 1:]  # (B, 81, 9)
    counts = one_hot[:, _UNIT_INDEX.to(prediction.device)].sum(dim=2)  # (B, 27, 9)
    return (counts - 1).clamp(min=0).sum(dim=(1, 2))


# ----------------------------------------------------------------------------- tasks
def _grid_keys(grids, chunk=100_000):
    """(N,) uint64 hash of each int8 (N, 81) grid, computed a chunk at a time (8 bytes a grid, not 81 in a set
    of bytes): equal grids have equal keys; a collision (odds about N²/2**64) would only drop a test puzzle."""
    weights = np.random.default_rng(81).integers(1, 2**63, 81, dtype=np.uint64)
    return np.concatenate([(grids[start:start + chunk].astype(np.uint64) * weights).sum(1, dtype=np.uint64)
                           for start in range(0, len(grids), chunk)] or [np.zeros(0, np.uint64)])


class SudokuTask:
    """Sudoku in language form: train batches are augmentations of a cached base set; test sets of
    the presets eval_sets (easy, medium, hard unless it names others, e.g. extreme) are generated from another
    seed and are disjoint from the base set (test files replace them). eval_split
    "validation" evaluates instead on sets generated from a third seed stream (EVAL_SPLITS), named
    "validation easy", ... so that settings are chosen without the test sets, which are then not built. Public CSV
    files (train_files, test_files) replace the generated base set or test sets (base_size sizes the generated
    set only); train_size takes the first train_size puzzles of the train files, in order, reading no further
    (TRM's Sudoku-Extreme protocol trains on 1,000, augmented), and refuses files that hold fewer;
    check_unique solves each of their puzzles and refuses a file with a puzzle that has several solutions."""
    name, vocab_size, seq_len = "sudoku", 10, 81

    def __init__(self, difficulty, seed=0, base_size=1000, eval_size=500, data_dir="data", train_files=(),
                 test_files=(), check_unique=False, train_size=None, eval_split="test", eval_sets=EVAL_SETS):
        if eval_split not in EVAL_SPLITS:
            raise ValueError(f"unknown eval_split {eval_split!r}; choose one of {', '.join(EVAL_SPLITS)}")
        if eval_split != "test" and test_files:
            raise ValueError(f"test files replace the generated test sets; the {eval_split} split is generated "
                             f"puzzles only")
        if train_size is not None and (train_size < 1 or not train_files):
            raise ValueError(f"train_size must be a positive number of puzzles, got {train_size}" if train_size < 1
                             else f"train_size {train_size} takes the first puzzles of train files, and none are given")
        if difficulty not in (*DIFFICULTIES, *TRAINING_MIXES):
            raise ValueError(f"unknown difficulty {difficulty!r}; choose one of "
                             f"{', '.join((*DIFFICULTIES, *TRAINING_MIXES))}")
        unknown = [name for name in eval_sets if name not in DIFFICULTIES]
        if unknown or not eval_sets or len(set(eval_sets)) < len(eval_sets):
            raise ValueError(f"eval sets must be distinct presets among {', '.join(DIFFICULTIES)}, "
                             f"got {', '.join(eval_sets) or 'none'}")
        self.seed = seed
        if train_files:  # public puzzle files replace the generated base set
            pairs, wanted = [], train_size
            for path in train_files:
                if wanted is not None and wanted <= 0:
                    break  # the files after it are not read
                pairs.append(read_csv(path, check_unique, limit=wanted))
                wanted = None if wanted is None else wanted - len(pairs[-1][0])
            if wanted:
                raise ValueError(f"train_size {train_size} is more puzzles than {', '.join(map(str, train_files))} "
                                 f"hold ({train_size - wanted})")
        else:  # a preset's base set, or equal shares of several (the first takes what does not divide)
            presets = TRAINING_MIXES.get(difficulty, (difficulty,))
            shares = [base_size // len(presets) + (i == 0) * (base_size % len(presets)) for i in range(len(presets))]
            pairs = [load_puzzles(preset, share, seed, data_dir) for preset, share in zip(presets, shares)]
        self.base_puzzles, self.base_solutions = (np.concatenate(column) for column in zip(*pairs))
        names = [Path(path).stem for path in test_files]
        if len(set(names)) < len(names):
            raise ValueError(f"test files {', '.join(map(str, test_files))} share a name; the table names sets by file")
        sources = dict(zip(names, test_files)) or dict.fromkeys(eval_sets)
        seen = None
        self.eval_split, self.test_sets = eval_split, {}
        for name, path in sources.items():
            if path:  # a public file's first eval_size puzzles, named after the file
                puzzles, solutions = read_csv(path, check_unique, limit=eval_size)
            else:
                puzzles, solutions = load_puzzles(name, eval_size, seed + EVAL_SPLITS[eval_split], data_dir)
                seen = _grid_keys(self.base_puzzles) if seen is None else seen
                keep = ~np.isin(_grid_keys(puzzles), seen)  # disjoint from the training base
                puzzles, solutions = puzzles[keep], solutions[keep]
                name = name if eval_split == "test" else f"{eval_split} {name}"
            self.test_sets[name] = {"puzzle": torch.from_numpy(puzzles).long(),
                                    "solution": torch.from_numpy(solutions).long()}

    def _sample(self, step, batch_size):
        rng = np.random.default_rng([self.seed, step])
        index = rng.integers(0, len(self.base_puzzles), batch_size)
        puzzles, solutions = augment(self.base_puzzles[index], self.base_solutions[index], rng)
        return rng, puzzles, solutions

    def train_batch(self, step, batch_size):
        _, puzzles, solutions = self._sample(step, batch_size)
        return {"puzzle": torch.from_numpy(puzzles).long(), "solution": torch.from_numpy(solutions).long()}


# ----------------------------------------------------------------------------- MNIST (visual form)
MNIST_FILES = {  # official names -> SHA-256 of the decompressed file
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"


def _read_idx(path, name):
    """Bytes of an IDX file, gzipped (.gz) or not, checked against its SHA-256."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a complete gzip file ({error})") from None
    if hashlib.sha256(data).hexdigest() != MNIST_FILES[name]:
        raise ValueError(f"{path}: SHA-256 mismatch; the file is corrupt or not the official {name}")
    return data


def _download_mnist(folder, names):
    for name in names:
        with urllib.request.urlopen(MNIST_URL + name + ".gz", timeout=20) as response:
            content = response.read()
        write_atomically(folder / (name + ".gz"), lambda f: f.write(content))  # makes the folder, once a file is here


def load_mnist(mnist_dir, split):
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the 'train' or 't10k' split from the standard
    IDX files in mnist_dir; downloads them when missing and the machine is online."""
    folder = Path(mnist_dir)
    names = [f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"]
    if split not in ("train", "t10k"):
        raise ValueError(f"MNIST split must be 'train' or 't10k', got {split!r}")

    def find(name):
        return next((folder / (name + ext) for ext in (".gz", "") if (folder / (name + ext)).exists()), None)

    if None in map(find, names):
        try:
            _download_mnist(folder, names)
        except OSError:
            raise FileNotFoundError(f"MNIST {split} files missing and no download possible: put {names[0]}(.gz) and "
                                    f"{names[1]}(.gz) into {folder}/ (or pass --mnist-dir)") from None
    images, labels = (_read_idx(find(name), name) for name in names)
    if images[:4] != b"\x00\x00\x08\x03" or labels[:4] != b"\x00\x00\x08\x01":
        raise ValueError(f"{folder}: {split} files are not IDX image/label files")
    count = int.from_bytes(images[4:8], "big")
    images = np.frombuffer(images, np.uint8, offset=16).reshape(count, 28, 28)
    return images, np.frombuffer(labels, np.uint8, offset=8).astype(np.int64)


class _DigitPool:
    """MNIST images grouped by digit, for drawing one image per cell without a Python loop."""

    def __init__(self, images, labels):
        self.images = torch.from_numpy(images.copy())
        order = np.argsort(labels, kind="stable")
        self.counts = np.bincount(labels, minlength=10)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.order = order

    def draw(self, digits, rng):
        """digits int (B, 81) in 1..9 -> float images (B, 81, 28, 28) in [0, 1]."""
        choice = (rng.random(digits.shape) * self.counts[digits]).astype(np.int64)
        return self.images[self.order[self.starts[digits] + choice]].float() / 255.0


class VisualSudokuTask(SudokuTask):
    """Sudoku whose cells are MNIST images (blank = an empty image). Train and test puzzles draw
    digit images from disjoint pools: the MNIST train split vs the test split when both are present,
    otherwise 80 % / 20 % of the test split. Validation puzzles (eval_split) draw from the held-out pool too: that
    split holds other puzzles, not other digit images."""
    name = "visual"

    def __init__(self, difficulty, seed=0, base_size=1000, eval_size=500, data_dir="data", train_files=(),
                 test_files=(), check_unique=False, mnist_dir="mnist", misread_rate=0.0, train_size=None,
                 eval_split="test", eval_sets=EVAL_SETS):
        if not 0 <= misread_rate < 1:
            raise ValueError(f"misread_rate is the share of training givens shown as another digit, in [0, 1); "
                             f"got {misread_rate}")
        super().__init__(difficulty, seed, base_size, eval_size, data_dir, train_files, test_files, check_unique,
                         train_size, eval_split, eval_sets)
        self.misread_rate = misread_rate
        test_images, test_labels = load_mnist(mnist_dir, "t10k")
        try:
            train_images, train_labels = load_mnist(mnist_dir, "train")
        except FileNotFoundError:
            split = np.random.default_rng(seed).random(len(test_labels)) < 0.8
            train_images, train_labels = test_images[split], test_labels[split]
            test_images, test_labels = test_images[~split], test_labels[~split]
        self.train_pool, test_pool = _DigitPool(train_images, train_labels), _DigitPool(test_images, test_labels)
        rng = np.random.default_rng([seed, 0, 0])  # a stream no training step uses
        for batch in self.test_sets.values():
            batch.update(self._images(batch["puzzle"].numpy(), batch["solution"].numpy(), test_pool, rng))

    @staticmethod
    def _images(puzzles, solutions, pool, rng, misread_rate=0.0):
        """Cell images (B, 81, 28, 28); with misread_rate, that share of the givens shows the image of
        another digit while the solution keeps the true one: a model trained so learns to let the
        Sudoku constraints overrule a given it reads wrong (test givens are misread, training ones rarely)."""
        solution_images = pool.draw(solutions.astype(np.int64), rng)  # (B, 81, 28, 28)
        puzzle_images = solution_images * torch.from_numpy(puzzles != 0)[:, :, None, None]
        if misread_rate:
            misread = (puzzles != 0) & (rng.random(puzzles.shape) < misread_rate)  # (B, 81)
            other = (solutions.astype(np.int64) - 1 + rng.integers(1, 9, puzzles.shape)) % 9 + 1  # never the true digit
            puzzle_images[torch.from_numpy(misread)] = pool.draw(other[misread], rng)
        return {"puzzle_images": puzzle_images, "solution_images": solution_images}

    def train_batch(self, step, batch_size):
        rng, puzzles, solutions = self._sample(step, batch_size)
        return {"puzzle": torch.from_numpy(puzzles).long(), "solution": torch.from_numpy(solutions).long(),
                **self._images(puzzles, solutions, self.train_pool, rng, self.misread_rate)}


def build_task(name, config, options):
    """The task of train.py's --task sudoku or visual, from the Config's difficulty and train.py's run options (as
    ltm.build_task builds its own); a large generated base set is checked first (check_generation)."""
    if not options.train_csv:
        try:
            check_generation(config.difficulty, options.base_size, options.data_dir)
        except ValueError as error:
            raise ValueError(f"--base-size {options.base_size:,}: {error}") from None  # the flag that set the size
    sizes = dict(seed=options.seed, base_size=options.base_size, eval_size=options.eval_size, data_dir=options.data_dir,
                 train_files=tuple(options.train_csv), train_size=options.train_size, check_unique=options.check_unique,
                 test_files=tuple(options.test_csv), eval_split=options.eval_split, eval_sets=tuple(options.eval_sets))
    if name == "sudoku":
        return SudokuTask(config.difficulty, **sizes)
    return VisualSudokuTask(config.difficulty, mnist_dir=options.mnist_dir, misread_rate=options.misread_rate, **sizes)


# ----------------------------------------------------------------------------- puzzles with several solutions
def multi_solution_puzzles(puzzles, seed=0):
    """Puzzles with at least two solutions, made from unique-solution puzzles (N, 81) by removing
    givens in random order until the solver finds >= 2 solutions. Every solution of the input is
    still a solution. Returns int8 (N, 81)."""
    rng = np.random.default_rng(seed)
    out = []
    for puzzle in np.asarray(puzzles):
        puzzle = [int(v) for v in puzzle]
        for cell in rng.permutation([c for c in range(81) if puzzle[c]]):
            puzzle[cell] = 0
            if solve(puzzle, limit=2)[0] >= 2:
                break
        else:
            raise ValueError("an empty grid is reached without two solutions: the input puzzle has none")
        out.append(puzzle)
    return np.array(out, np.int8)
