"""How fast, and in how much memory, sudoku_data.read_csv reads a public-size Sudoku CSV.

    python scripts/csv_benchmark.py --rows 1000000

writes a question,answer file of --rows augmented generated puzzles (valid, with their solutions) to a
temporary folder, then reads it with read_csv in a fresh process and prints the rows per second and the
reading process's peak resident memory (its baseline after importing numpy and torch shown apart). Rows per
CPU second are shown too: on a shared machine the wall-clock rate depends on the other jobs (load average shown).
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sudoku_data  # noqa: E402


def write_file(path, rows, seed=0):
    """rows puzzle,answer lines: augmentations of 50 generated easy puzzles, a chunk at a time."""
    base_puzzles, base_solutions, _ = sudoku_data.generate_puzzles(50, "easy", seed=seed, workers=1)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as file:
        file.write(b"question,answer\n")
        for start in range(0, rows, 100_000):
            count = min(100_000, rows - start)
            index = rng.integers(0, 50, count)
            puzzles, solutions = sudoku_data.augment(base_puzzles[index], base_solutions[index], rng)
            text = np.empty((count, 164), np.uint8)  # 81 + ',' + 81 + '\n'
            text[:, :81] = np.where(puzzles == 0, ord("."), puzzles + ord("0"))
            text[:, 81], text[:, 163] = ord(","), ord("\n")
            text[:, 82:163] = solutions + ord("0")
            file.write(text.tobytes())


def read(path):
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    began, cpu_began = time.perf_counter(), time.process_time()
    puzzles, solutions = sudoku_data.read_csv(path)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"read {len(puzzles):,} rows in {seconds:.1f} s: {len(puzzles) / seconds:,.0f} rows/s "
          f"({len(puzzles) / cpu_seconds:,.0f} rows per CPU second, {os.getloadavg()[0]:.1f} load average); "
          f"peak memory {peak:,.0f} MiB ({baseline:,.0f} MiB after imports, "
          f"{peak - baseline:,.0f} MiB more while reading); "
          f"arrays {puzzles.dtype} {puzzles.nbytes + solutions.nbytes:,} bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--read", metavar="FILE", help=argparse.SUPPRESS)  # the measuring child process
    options = parser.parse_args()
    if options.read:
        return read(options.read)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "puzzles.csv"
        write_file(path, options.rows)
        print(f"wrote {options.rows:,} rows ({path.stat().st_size / 2**20:,.0f} MiB)")
        subprocess.run([sys.executable, __file__, "--read", str(path)], check=True)


if __name__ == "__main__":
    main()
