"""Tests for the whole repository: python -m pytest -q test_all.py (CPU, tiny sizes, a few minutes)."""
import copy
import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lit
import ltm
import lvr
import recurrent_depth as rd
import sudoku_data
import train
import vqa_data

MNIST_DIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason=f"MNIST test files not found in {MNIST_DIR}")


@pytest.fixture(autouse=True)
def _small_and_seeded():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and steady on a busy machine


# ============================================================================= shared helpers and fixtures
# (every section below uses only these and its own helpers, so a method's section can be copied with its file)
@pytest.fixture(scope="session")
def puzzles():
    """A few puzzles of every preset a run is tested on by default, generated once for the session."""
    return {name: sudoku_data.generate_puzzles(12, name, seed=3, workers=1) for name in sudoku_data.EVAL_SETS}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One cache of generated Sudoku sets for every train.py test."""
    return str(tmp_path_factory.mktemp("data"))


MATMUL_PEAK = train.matmul_peak


@pytest.fixture(autouse=True)
def _no_matmul_probe(monkeypatch):
    """train.py probes the matmul peak for MFU (0.2 s a run); the runs here take a constant instead, and
    test_the_matmul_probe_is_finite_and_leaves_the_random_state measures the probe itself."""
    monkeypatch.setattr(train, "matmul_peak", lambda device, dtype, seconds=0.2: 1e10)


def interrupting_at_step_3(train_step):
    """A method's train_step that behaves like Ctrl-C in the middle of step 3, after the step has drawn
    random numbers (to test the save and --resume)."""
    def step_or_interrupt(model, optimizer, scaler, batch, step, *rest):
        if step == 3:
            torch.rand(8)  # what the interrupted step drew must be drawn again by --resume
            raise KeyboardInterrupt
        return train_step(model, optimizer, scaler, batch, step, *rest)
    return step_or_interrupt


def _checkpoint(folder):
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)


# ============================================================================= sudoku_data.py
def test_generated_puzzles_are_unique_and_match_their_preset(puzzles):
    for name, (grid, solution, guesses) in puzzles.items():
        low, high = sudoku_data.DIFFICULTIES[name]
        givens = (grid != 0).sum(1)
        assert ((givens >= low) & (givens <= high)).all(), (name, givens)
        assert (sudoku_data.broken_constraints(torch.from_numpy(solution)) == 0).all()
        assert ((grid == 0) | (grid == solution)).all()
        for p, s in zip(grid[:4], solution[:4]):
            count, found, _ = sudoku_data.solve(p)
            assert count == 1 and found == s.tolist()
    assert (puzzles["hard"][2] > 0).all()  # hard ones need a guess: singles alone do not solve them


def test_missing_mnist_files_offline_are_one_error_and_leave_no_folder_behind(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(sudoku_data.urllib.request, "urlopen", offline)
    folder = tmp_path / "not-here" / "mnist"
    with pytest.raises(FileNotFoundError, match="no download possible"):
        sudoku_data.load_mnist(folder, "t10k")
    assert not (tmp_path / "not-here").exists()


def test_generated_presets_reach_both_ends_of_their_given_ranges(puzzles):
    for name in ("easy", "medium"):  # the target count is drawn uniformly over the range: 12 puzzles span it
        low, high = sudoku_data.DIFFICULTIES[name]
        givens = (puzzles[name][0] != 0).sum(1)
        assert givens.min() <= low + 1 and givens.max() >= high - 1, (name, sorted(givens))
    assert ((puzzles["hard"][0] != 0).sum(1) < sudoku_data.DIFFICULTIES["medium"][0]).all()


def test_solver_counts_several_solutions_and_rejects_clashes():
    empty = np.zeros(81, np.int8)
    assert sudoku_data.solve(empty)[0] == 2
    clash = empty.copy()
    clash[0] = clash[1] = 5
    assert sudoku_data.solve(clash)[0] == 0
    with pytest.raises(ValueError, match="81 cells"):
        sudoku_data.solve(np.zeros(80))


def test_generation_is_deterministic_whatever_the_worker_count(monkeypatch):
    monkeypatch.setattr(sudoku_data, "GENERATION_CHUNK", 3)  # 6 puzzles are two jobs, one a worker
    one = sudoku_data.generate_puzzles(6, "medium", seed=7, workers=1)
    two = sudoku_data.generate_puzzles(6, "medium", seed=7, workers=2)
    other = sudoku_data.generate_puzzles(6, "medium", seed=8, workers=1)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert not np.array_equal(one[0], other[0])
    with pytest.raises(ValueError, match="unknown difficulty"):
        sudoku_data.generate_puzzles(3, "impossible")


def test_extreme_puzzles_are_minimal_need_search_are_rated_at_least_their_threshold_and_rechecked_on_load(
        tmp_path, monkeypatch, capsys):
    low, high = sudoku_data.DIFFICULTIES["extreme"]
    assert (low, high) == (17, 25) and sudoku_data.EXTREME_RATING >= 30  # the public hardest lists' range
    monkeypatch.setattr(sudoku_data, "EXTREME_RATING", 4)  # the preset's own climb, to a rating reached in seconds
    puzzles, solutions = sudoku_data.load_puzzles("extreme", 1, 7, tmp_path)
    for puzzle, solution in zip(puzzles.tolist(), solutions.tolist()):
        assert low <= sum(map(bool, puzzle)) <= high and sudoku_data.rating(puzzle) >= 4
        count, found, guesses = sudoku_data.solve(puzzle)
        assert count == 1 and found == solution
        singles = sudoku_data._candidates(puzzle)  # naked and hidden singles alone leave cells open
        assert singles is not None and any(mask & (mask - 1) for mask in singles)
        for cell in (c for c in range(81) if puzzle[c]):  # minimal: without any one given, two solutions
            assert sudoku_data.solve(puzzle[:cell] + [0] + puzzle[cell + 1:])[0] == 2
    path = tmp_path / "sudoku-extreme-1-seed7.npz"
    stored = dict(np.load(path))
    assert stored["ratings"].tolist() == [sudoku_data.rating(puzzles[0])]
    assert np.array_equal(sudoku_data.load_puzzles("extreme", 1, 7, tmp_path)[0], puzzles)  # a good cache is kept

    def generated_again(*args, **kwargs):
        raise RuntimeError("generated again")
    monkeypatch.setattr(sudoku_data, "generate_puzzles", generated_again)
    capsys.readouterr()
    without = {name: array for name, array in stored.items() if name != "ratings"}
    for damaged, problem in ((without, "holds no rating"),
                             ({**without, "ratings": stored["ratings"] + 0.5}, "its rating is"),
                             ({**without, "ratings": np.array([3.5])}, "rated 3.5, below extreme's 4")):
        np.savez(path, **damaged)
        with pytest.raises(RuntimeError, match="generated again"):
            sudoku_data.load_puzzles("extreme", 1, 7, tmp_path)
        warning = capsys.readouterr().err
        assert str(path) in warning and problem in warning and warning.count("\n") == 1


def test_rating_is_the_mean_guesses_over_fixed_transforms_a_property_of_the_puzzle_where_one_path_is_not(puzzles):
    grid, solution, guesses = puzzles["hard"]
    index = int(np.argmax(guesses))  # the puzzle of the most guesses on one path
    puzzle = grid[index]
    copies = np.repeat(puzzle[None], sudoku_data.RATING_TRANSFORMS, 0)
    transformed = sudoku_data.augment(copies, copies, np.random.default_rng(sudoku_data.RATING_SEED))[0]
    rating = sudoku_data.rating(puzzle)
    assert rating == np.mean([sudoku_data.solve(g)[2] for g in transformed])  # its definition, computed directly
    others = sudoku_data.augment(np.repeat(grid[index:index + 1], 6, 0), np.repeat(solution[index:index + 1], 6, 0),
                                 np.random.default_rng(1))[0]  # the same puzzle, transformed
    one_path = [sudoku_data.solve(g)[2] for g in others]
    assert abs(np.mean(one_path) - guesses[index]) > 0.3 * guesses[index]  # one solver path is no property of it
    assert abs(np.mean([sudoku_data.rating(g) for g in others]) - rating) < 0.2 * rating  # its rating is


def test_augmentation_preserves_validity_and_uniqueness(puzzles):
    grid, solution, _ = puzzles["hard"]
    rng = np.random.default_rng(0)
    new_grid, new_solution = sudoku_data.augment(grid, solution, rng)
    assert not np.array_equal(new_grid, grid)
    assert (sudoku_data.broken_constraints(torch.from_numpy(new_solution)) == 0).all()
    assert ((new_grid == 0) | (new_grid == new_solution)).all()
    assert ((new_grid != 0).sum(1) == (grid != 0).sum(1)).all()
    for p, s in zip(new_grid[:4], new_solution[:4]):
        count, found, _ = sudoku_data.solve(p)
        assert count == 1 and found == s.tolist()


def test_base_set_is_cached_atomically_and_tasks_are_deterministic(tmp_path):
    first = sudoku_data.load_puzzles("easy", 10, seed=1, data_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["sudoku-easy-10-seed1.npz"]
    again = sudoku_data.load_puzzles("easy", 10, seed=1, data_dir=tmp_path)
    assert np.array_equal(first[0], again[0])
    task = sudoku_data.SudokuTask("easy", seed=1, base_size=10, eval_size=2, data_dir=tmp_path)
    batch, same = task.train_batch(5, 16), task.train_batch(5, 16)
    assert batch["puzzle"].shape == (16, 81) and batch["puzzle"].dtype == torch.long
    assert torch.equal(batch["puzzle"], same["puzzle"])
    assert not torch.equal(batch["puzzle"], task.train_batch(6, 16)["puzzle"])
    assert set(task.test_sets) == {"easy", "medium", "hard"}
    train_puzzles = {p.tobytes() for p in task.base_puzzles}
    for test in task.test_sets.values():
        assert not any(p.numpy().astype(np.int8).tobytes() in train_puzzles for p in test["puzzle"])
    assert not list(tmp_path.glob("*.tmp"))


def test_validation_split_is_disjoint_from_the_test_sets_and_the_base_set_and_named_as_validation(data_dir):
    def keys(grids):
        return {bytes(grid.numpy().astype(np.int8)) if torch.is_tensor(grid) else bytes(grid) for grid in grids}

    test = sudoku_data.SudokuTask("mixed", seed=0, base_size=3, eval_size=2, data_dir=data_dir)
    validation = sudoku_data.SudokuTask("mixed", seed=0, base_size=3, eval_size=2, data_dir=data_dir,
                                        eval_split="validation")
    assert list(validation.test_sets) == ["validation easy", "validation medium", "validation hard"]
    assert validation.eval_split == "validation" and test.eval_split == "test"
    assert np.array_equal(validation.base_puzzles, test.base_puzzles)  # the split changes what is evaluated only
    held_out = keys(p for batch in test.test_sets.values() for p in batch["puzzle"])
    base = keys(test.base_puzzles)
    for name, batch in validation.test_sets.items():
        assert len(batch["puzzle"]) == 2, name
        assert (sudoku_data.broken_constraints(batch["solution"]) == 0).all(), name
        assert ((batch["puzzle"] == 0) | (batch["puzzle"] == batch["solution"])).all(), name
        assert not keys(batch["puzzle"]) & held_out and not keys(batch["puzzle"]) & base, name
    # another difficulty and base size train differently; the validation puzzles stay the same
    other = sudoku_data.SudokuTask("easy", seed=0, base_size=3, eval_size=2, data_dir=data_dir, eval_split="validation")
    assert all(torch.equal(other.test_sets[name]["puzzle"], batch["puzzle"])
               for name, batch in validation.test_sets.items())
    seed_1 = sudoku_data.SudokuTask("easy", seed=1, base_size=3, eval_size=2, data_dir=data_dir,
                                    eval_split="validation")
    seed_0_hard = keys(validation.test_sets["validation hard"]["puzzle"])
    assert not seed_0_hard & keys(seed_1.test_sets["validation hard"]["puzzle"])  # each seed has its own puzzles
    with pytest.raises(ValueError, match="generated puzzles only"):
        sudoku_data.SudokuTask("easy", base_size=12, eval_size=4, data_dir=data_dir, test_files=("x.csv",),
                               eval_split="validation")
    with pytest.raises(ValueError, match="unknown eval_split 'train'"):
        sudoku_data.SudokuTask("easy", base_size=12, eval_size=4, data_dir=data_dir, eval_split="train")


def test_csv_round_trip_and_clear_errors(tmp_path, puzzles):
    grid, solution, _ = puzzles["easy"]
    path = tmp_path / "set.csv"
    sudoku_data.write_csv(path, grid, solution)
    read_grid, read_solution = sudoku_data.read_csv(path)
    assert np.array_equal(read_grid, grid) and np.array_equal(read_solution, solution)
    question, answer = path.read_text().splitlines()[1].split(",")
    bad_solution = answer[1] + answer[0] + answer[2:]  # swapping two different digits breaks rules
    cases = {
        "short": (f"question,answer\n{question[:80]},{answer}\n", "line 2: puzzle has 80 characters"),
        "letters": (f"question,answer\n{question[:80]}x,{answer}\n", "invalid characters 'x'"),
        "clash": (f"source,question,answer,rating\nx,{answer[0]}{'.' * 80},{answer[1:]}{answer[0]},0\n",
                  "contradicts the solution"),
        "rules": (f"question,answer\n{'.' * 81},{bad_solution}\n{question},{answer}\n", "breaks"),
    }
    for name, (text, message) in cases.items():
        bad = tmp_path / f"{name}.csv"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            sudoku_data.read_csv(bad)
        assert str(bad) in str(error.value)
    with pytest.raises(ValueError, match="no such file"):
        sudoku_data.read_csv(tmp_path / "missing.csv")


def test_csv_is_read_in_chunks_into_int8_with_flat_memory_and_bad_rows_named_in_any_chunk(tmp_path, puzzles,
                                                                                           monkeypatch):
    grids, solutions = (np.concatenate([puzzles[name][i] for name in sudoku_data.EVAL_SETS]) for i in (0, 1))
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(grids), 5_000)
    many = sudoku_data.augment(grids[index], solutions[index], rng)
    path = tmp_path / "many.csv"
    sudoku_data.write_csv(path, *many)
    import tracemalloc

    def read_with_peak():  # the most memory Python and numpy held at once while reading
        tracemalloc.start()
        try:
            return sudoku_data.read_csv(path), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    (p, s), peak = read_with_peak()
    assert p.dtype == s.dtype == np.int8 and len(p) == 5_000
    assert peak < 5_000 * 2.5 * 1024  # under 2.5 kB a row read (the two int8 grids are 162 bytes)
    monkeypatch.setattr(sudoku_data, "CSV_CHUNK", 500)  # a tenth of the file at a time: a third of the memory
    assert read_with_peak()[1] < 5_000 * 0.5 * 1024
    monkeypatch.setattr(sudoku_data, "CSV_CHUNK", 7)  # rows now span many chunks: the same arrays, lines still named
    small = tmp_path / "small.csv"
    sudoku_data.write_csv(small, many[0][:30], many[1][:30])
    read = sudoku_data.read_csv(small)
    assert np.array_equal(read[0], many[0][:30]) and np.array_equal(read[1], many[1][:30])
    assert np.array_equal(sudoku_data.read_csv(small, limit=10)[1], many[1][:10])
    lines = small.read_text().splitlines()
    question, answer = lines[20].split(",")
    lines[20] = question + "," + answer[1] + answer[0] + answer[2:]
    small.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 21: (given|the solution breaks)"):
        sudoku_data.read_csv(small)
    assert len(sudoku_data.read_csv(small, limit=19)[0]) == 19  # a test set's first rows: the rest is not read


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        sudoku_data.write_csv(tmp_path / "out.csv", [[0] * 81], [object()])
    assert list(tmp_path.iterdir()) == []


def test_metrics():
    solution = torch.from_numpy(sudoku_data.generate_puzzles(2, "easy", seed=0, workers=1)[1]).long()
    puzzle = solution.clone()
    puzzle[:, :10] = 0
    prediction = solution.clone()
    prediction[1, 0] = prediction[1, 0] % 9 + 1  # one wrong blank cell in the second grid
    assert sudoku_data.exact_accuracy(prediction, solution) == 50.0
    assert sudoku_data.blank_accuracy(prediction, puzzle, solution) == pytest.approx(95.0)
    broken = sudoku_data.broken_constraints(prediction)
    assert broken[0] == 0 and broken[1] == 3  # the new digit repeats in its row, column and box
    assert sudoku_data.broken_constraints(torch.ones(1, 81, dtype=torch.long))[0] == 27 * 8


@needs_mnist
def test_mnist_loads_and_visual_pools_are_disjoint(tmp_path):
    images, labels = sudoku_data.load_mnist(MNIST_DIR, "t10k")
    assert images.shape == (10000, 28, 28) and np.bincount(labels)[0] == 980
    task = sudoku_data.VisualSudokuTask("easy", base_size=8, eval_size=4, data_dir=tmp_path, mnist_dir=MNIST_DIR)
    batch = task.train_batch(0, 3)
    assert batch["puzzle_images"].shape == (3, 81, 28, 28) and batch["solution_images"].dtype == torch.float32
    blank = batch["puzzle"] == 0
    assert (batch["puzzle_images"][blank] == 0).all() and (batch["solution_images"][blank].sum((1, 2)) > 0).all()
    assert torch.equal(batch["puzzle_images"][~blank], batch["solution_images"][~blank])
    train_pixels = {image.numpy().tobytes() for image in (task.train_pool.images)}
    test_images = task.test_sets["hard"]["solution_images"].flatten(0, 1)
    assert not any((image * 255).round().byte().numpy().tobytes() in train_pixels for image in test_images[:50])


@needs_mnist
def test_visual_cells_show_an_image_of_their_own_digit_after_augmentation(tmp_path):
    images, labels = sudoku_data.load_mnist(MNIST_DIR, "t10k")
    label_of = {image.tobytes(): label for image, label in zip(images, labels)}
    task = sudoku_data.VisualSudokuTask("easy", base_size=8, eval_size=2, data_dir=tmp_path, mnist_dir=MNIST_DIR)
    for batch in (task.train_batch(5, 3), task.test_sets["easy"]):  # an augmented training batch, a test set
        pixels = (batch["solution_images"] * 255).round().byte().flatten(0, 1).numpy()  # (B*81, 28, 28)
        shown = np.array([label_of[image.tobytes()] for image in pixels])  # each cell's image is an MNIST digit ...
        assert np.array_equal(shown, batch["solution"].flatten().numpy())  # ... of the cell's own digit
        givens = batch["puzzle"] != 0
        assert torch.equal(batch["puzzle_images"][givens], batch["solution_images"][givens])
        assert (batch["puzzle_images"][~givens] == 0).all()
        assert ((batch["puzzle"] == 0) | (batch["puzzle"] == batch["solution"])).all()


@needs_mnist
def test_visual_misread_rate_shows_some_training_givens_as_another_digit(tmp_path):
    task = sudoku_data.VisualSudokuTask("easy", base_size=8, eval_size=4, data_dir=tmp_path, mnist_dir=MNIST_DIR,
                                        misread_rate=0.3)
    pool = task.train_pool
    label_of = {image.numpy().tobytes(): int(label) for image, label in zip(pool.images[pool.order], np.repeat(
        np.arange(10), pool.counts))}  # pixels -> digit
    batch = task.train_batch(0, 16)
    given = batch["puzzle"] > 0
    shown = torch.tensor([label_of[(image * 255).round().byte().numpy().tobytes()]
                          for image in batch["puzzle_images"][given]])
    misread = shown != batch["puzzle"][given]
    assert 0.2 < misread.float().mean() < 0.4  # about 30 % of the givens, each showing a digit 1-9 but the true one
    assert (shown[misread] >= 1).all() and (batch["puzzle_images"][~given] == 0).all()
    assert torch.equal(batch["puzzle"], task.train_batch(0, 16)["puzzle"])  # targets and givens stay the true digits
    test_set = task.test_sets["easy"]  # test images are never altered
    givens = test_set["puzzle"] > 0
    assert torch.equal(test_set["puzzle_images"][givens], test_set["solution_images"][givens])
    with pytest.raises(ValueError, match="misread_rate"):
        sudoku_data.VisualSudokuTask("easy", base_size=8, eval_size=4, data_dir=tmp_path, mnist_dir=MNIST_DIR,
                                     misread_rate=1.0)
    assert train.main(["--method", "lit", "--misread-rate", "0.1", "--steps", "1", "--data-dir", str(tmp_path)]) == 2


@needs_mnist
def test_visual_defaults_are_misread_training_and_the_wide_cnn(tmp_path, data_dir):
    """--task visual trains with 5 % misread givens and 16 channels unless told otherwise; --task sudoku without."""
    def run(name, *flags):
        mnist = ["--mnist-dir", str(MNIST_DIR)] if "visual" in flags else []  # --task sudoku refuses it
        argv = ["--method", "lit", *TINY_FLAGS["lit"], "--steps", "1", "--data-dir", data_dir, *mnist,
                "--out", str(tmp_path / name), *flags]
        assert train.main(argv) == 0
        record = json.loads((tmp_path / name / "results.json").read_text())
        return record["run"]["misread_rate"], record["config"]["cnn_channels"]
    assert run("visual", "--task", "visual") == (0.05, 16)
    assert run("off", "--task", "visual", "--misread-rate", "0", "--cnn-channels", "8") == (0.0, 8)
    assert run("language", "--task", "sudoku")[0] == 0.0


def test_mnist_checksum_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sudoku_data, "_download_mnist", lambda folder, names: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        sudoku_data.load_mnist(tmp_path, "t10k")
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(100)))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        sudoku_data.load_mnist(tmp_path, "t10k")


def test_mnist_training_files_are_checked_too_and_a_bad_gzip_is_named(tmp_path):
    labels = np.random.default_rng(0).integers(0, 10, 2, dtype=np.uint8).tobytes()  # random labels, valid header
    images = b"\x00\x00\x08\x03" + bytes([0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(2 * 784)  # 2 blank images
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    label_file = b"\x00\x00\x08\x01" + bytes([0, 0, 0, 2]) + labels
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_file))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        sudoku_data.load_mnist(tmp_path, "train")
    whole = gzip.compress(bytes(5000))
    for content in (whole[:len(whole) // 2], b"not gzip at all"):  # truncated, not gzip
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(content)
        (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(content)
        with pytest.raises(ValueError, match="not a complete gzip file") as error:
            sudoku_data.load_mnist(tmp_path, "t10k")
        assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(error.value)


def test_a_damaged_cached_set_is_generated_again(tmp_path, capsys):
    puzzles, solutions = sudoku_data.load_puzzles("easy", 4, seed=1, data_dir=tmp_path)
    path = tmp_path / "sudoku-easy-4-seed1.npz"
    whole, broken = path.read_bytes(), solutions.copy()
    broken[0, :2] = broken[0, 1::-1]  # two digits of a row swapped: the rules break
    for damage in (lambda: path.write_bytes(whole[:len(whole) // 2]),
                   lambda: np.savez(path, puzzles=puzzles[:3], solutions=solutions[:3]),
                   lambda: np.savez(path, puzzles=puzzles, solutions=broken)):
        damage()
        again = sudoku_data.load_puzzles("easy", 4, seed=1, data_dir=tmp_path)
        assert np.array_equal(again[0], puzzles) and np.array_equal(again[1], solutions)
        warning = capsys.readouterr().err
        assert str(path) in warning and warning.count("\n") == 1
        assert np.array_equal(sudoku_data.load_puzzles("easy", 4, seed=1, data_dir=tmp_path)[1], solutions)
        assert capsys.readouterr().err == ""


def test_a_cached_set_with_blanked_or_extra_givens_is_generated_again(tmp_path, capsys):
    puzzles, solutions = sudoku_data.load_puzzles("medium", 3, seed=1, data_dir=tmp_path)
    path = tmp_path / "sudoku-medium-3-seed1.npz"
    blanked = puzzles.copy()
    blanked[1] = 0  # no givens left, the solutions intact: every given still agrees with its solution
    for damaged in (blanked, solutions.copy()):  # (a solved grid: 81 givens, not medium's 28-35)
        np.savez(path, puzzles=damaged, solutions=solutions)
        again = sudoku_data.load_puzzles("medium", 3, seed=1, data_dir=tmp_path)
        assert np.array_equal(again[0], puzzles)
        warning = capsys.readouterr().err
        assert str(path) in warning and "givens, not the 28-35 of medium" in warning


def test_csv_encoding_solutions_and_optional_uniqueness_check(tmp_path, puzzles):
    grid, solution, _ = puzzles["easy"]
    path = tmp_path / "set.csv"
    sudoku_data.write_csv(path, grid[:2], solution[:2])
    text = path.read_text()
    question, answer = text.splitlines()[1].split(",")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert np.array_equal(sudoku_data.read_csv(tmp_path / "bom.csv")[0], grid[:2])
    (tmp_path / "latin1.csv").write_bytes(text.encode() + "caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8") as error:
        sudoku_data.read_csv(tmp_path / "latin1.csv")
    assert str(tmp_path / "latin1.csv") in str(error.value)
    bad_solution = answer[1] + answer[0] + answer[2:]
    (tmp_path / "rules.csv").write_text(f"question,answer\n{question},{answer}\n{'.' * 81},{bad_solution}\n")
    with pytest.raises(ValueError, match="line 3: the solution breaks"):
        sudoku_data.read_csv(tmp_path / "rules.csv")
    several = tmp_path / "several.csv"  # all-blank puzzles on lines 3 and 5 have many solutions
    several.write_text(f"question,answer\n{question},{answer}\n{'.' * 81},{answer}\n{question},{answer}\n"
                       f"{'.' * 81},{answer}\n")
    assert len(sudoku_data.read_csv(several)[0]) == 4
    with pytest.raises(ValueError, match=r"2 puzzle\(s\) have more than one solution, on line\(s\) 3, 5"):
        sudoku_data.read_csv(several, check_unique=True)
    assert len(sudoku_data.read_csv(path, check_unique=True)[0]) == 2



def test_csv_reader_takes_any_one_line_header_and_names_a_separator_that_is_not_a_comma(tmp_path, puzzles):
    grid, solution, _ = puzzles["medium"]
    text = lambda row, blank="0": "".join(str(v) if v else blank for v in row)
    rows = [(text(p, "."), text(s)) for p, s in zip(grid[:3], solution[:3])]
    for header, line in (("unsolved,solved", "{},{}"), ("id,grid,sol,level", "7,{},{},hard"), ("Sudoku", "{}")):
        path = tmp_path / "named.csv"
        path.write_text("\n".join([header] + [line.format(p, s) for p, s in rows]) + "\n")
        read_grid, read_solution = sudoku_data.read_csv(path)  # the puzzle alone: solved by the solver
        assert np.array_equal(read_grid, grid[:3]) and np.array_equal(read_solution, solution[:3]), header
    path.write_text("\n".join([rows[0][0][:80] + "," + rows[0][1]] + [f"{p},{s}" for p, s in rows[1:]]) + "\n")
    with pytest.raises(ValueError, match="line 1: puzzle has 80 characters"):  # a broken first row is no header
        sudoku_data.read_csv(path)
    for separator, name in (("\t", "tabs"), (";", "semicolons")):
        for header in ("question{}answer\n", ""):
            path.write_text(header.format(separator) + "\n".join(p + separator + s for p, s in rows) + "\n")
            with pytest.raises(ValueError, match=f"separated by {name}, not commas") as error:
                sudoku_data.read_csv(path)
            assert str(path) in str(error.value) and "\n" not in str(error.value)
    path.write_text("unsolved,solved\n" + "\n".join(f"{p[:80]},{s[:80]}" for p, s in rows) + "\n")
    with pytest.raises(ValueError, match="line 2: puzzle has 80 characters"):  # below any header, rows are checked
        sudoku_data.read_csv(path)
    path.write_text("unsolved,solved\n\nfirst,second\n")
    with pytest.raises(ValueError, match="line 3: no column holds an 81-character puzzle"):
        sudoku_data.read_csv(path)


def test_generation_estimates_its_cost_and_refuses_a_size_beyond_memory_in_one_line():
    for call in (lambda: sudoku_data.generate_puzzles(10**13, "easy"),
                 lambda: sudoku_data.generation_cost("hard", 10**13)):
        started = time.perf_counter()
        with pytest.raises(ValueError, match=r"10000000000000 \w+ puzzles need [\d.]+ GiB of memory") as error:
            call()
        assert time.perf_counter() - started < 1 and "\n" not in str(error.value)
    seconds, size = sudoku_data.generation_cost("easy", 20, workers=1)
    assert size == 20 * (81 + 81 + 4) and sudoku_data.generation_cost("easy", 40, workers=2) == (seconds, 2 * size)
    started = time.perf_counter()
    sudoku_data.generate_puzzles(20, "easy", seed=5, workers=1)
    assert 0.1 < (time.perf_counter() - started) / seconds < 10  # the estimate is the time it takes, roughly


def test_a_large_base_set_is_refused_beyond_memory_or_a_week_and_announced_otherwise(monkeypatch, capsys):
    assert sudoku_data.check_generation("easy", 9_999) is None and capsys.readouterr().out == ""  # quick: unchecked
    monkeypatch.setattr(sudoku_data, "available_memory", lambda: 2**30)
    with pytest.raises(ValueError, match=r"^generating it needs about 3\.3 GiB, but 1\.0 GiB are free$"):
        sudoku_data.check_generation("easy", 1_000_000)
    monkeypatch.setattr(sudoku_data, "available_memory", lambda: 2**40)
    monkeypatch.setitem(sudoku_data._SECONDS_PER_PUZZLE, "medium", 1.0)  # one second a puzzle, per core
    monkeypatch.setitem(sudoku_data._SECONDS_PER_PUZZLE, "hard", 1.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.raises(ValueError, match=r"would take about 12 days here"):  # 1,000,000 s: 500,000 a preset
        sudoku_data.check_generation("harder", 1_000_000)
    sudoku_data.check_generation("harder", 10_000, data_dir="cache")
    assert capsys.readouterr().out == ("a base set of 10,000 harder puzzles: generating it takes about 167 min here, "
                                       "once (then it is read from cache)\n")


def _child_processes(pid):
    """The live (not zombie) processes whose parent is pid, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(parent) == pid and state != "Z":
            children.append(int(stat.parent.name))
    return children


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_end_a_generation_and_its_workers_at_once(signum):
    # a fresh interpreter, as on a command line: hours of generation on 2 workers, stopped while they run
    script = ("import signal, sys, sudoku_data\n"  # Ctrl-C's handler as a shell gives it, whatever pytest's is
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "try:\n    sudoku_data.generate_puzzles(10**6, 'easy', workers=2)\n"
              "except KeyboardInterrupt:\n    print('stopped', flush=True)\n    sys.exit(130)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(sudoku_data.__file__).parent,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, workers = time.monotonic() + 120, []
        while len(workers) < 2 and time.monotonic() < deadline and process.poll() is None:
            workers = _child_processes(process.pid)
            time.sleep(0.02)
        assert len(workers) >= 2, f"the generation never started its workers: {process.poll()} {process.stderr.read()}"
        time.sleep(1)  # the workers are generating
        process.send_signal(signum)
        sent = time.monotonic()
        out, _ = process.communicate(timeout=30)
        assert time.monotonic() - sent < 5 and process.returncode == 130 and "stopped" in out
        time.sleep(0.5)
        assert not [pid for pid in workers if _alive(pid)]  # the workers are gone too
    finally:
        process.kill()
        for pid in _child_processes(process.pid):
            os.kill(pid, signal.SIGKILL)

# ============================================================================= train.py
def test_text_task(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo wörld, " * 400, encoding="utf-8")
    task = train.TextTask(path, context_length=16, seed=0)
    batch = task.train_batch(3, 4)["tokens"]
    assert batch.shape == (4, 17) and torch.equal(batch, task.train_batch(3, 4)["tokens"])
    assert task.decode(task.encode("wörld")) == "wörld"
    assert task.test_sets["held-out"]["tokens"].shape[1] == 17
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 1000)
    with pytest.raises(train.UsageError, match="not UTF-8"):
        train.TextTask(tmp_path / "latin1.txt", 16)


def test_text_task_splits_documents_and_no_window_crosses_one(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    letters = "abcdefghijklmnopqrst"
    for i, letter in enumerate(letters):  # document i: one letter, repeated (i + 1) * 40 times
        (folder / ("sub" if i % 2 else "") / f"{letter}.txt").write_text(letter * (i + 1) * 40)
    task = train.TextTask(folder, context_length=16, seed=0)
    sets = {name: {task.characters[t] for t in test_set["tokens"].flatten().tolist()}
            for name, test_set in task.test_sets.items()}
    trained = {task.characters[t] for step in range(50) for t in task.train_batch(step, 8)["tokens"].flatten().tolist()}
    assert set(sets) == {"validation", "test"} and sets["validation"] and sets["test"]
    assert not sets["validation"] & sets["test"] and not trained & (sets["validation"] | sets["test"])  # by document
    windows = [task.train_batch(step, 8)["tokens"] for step in range(20)]
    windows += [t["tokens"] for t in task.test_sets.values()]
    for tokens in windows:
        assert (tokens == tokens[:, :1]).all()  # every window lies inside one document
    held_out = sum(len(t["tokens"].flatten()) for t in task.test_sets.values())
    assert 0.1 < held_out / sum(40 * (i + 1) for i in range(20)) < 0.35
    default = train.TextTask(None, context_length=64, seed=0, eval_size=16)  # Python's documentation topics
    assert set(default.test_sets) == {"validation", "test"} and default.test_sets["test"]["tokens"].shape == (16, 65)
    assert "e" in default.characters and default.starts[-1] > 100_000


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "recurrent_depth", "--eval-only", "missing.pt"], "checkpoint not found: missing.pt"),
    (["--method", "recurrent_depth", "--lr", "-1"], "--lr must be in (0, 1]"),
    (["--method", "recurrent_depth", "--steps", "0"], "--steps must be a positive integer"),
    (["--method", "recurrent_depth", "--n-heads", "0"], "--n-heads must be >= 1, got 0"),
    (["--method", "lvr", "--n-heads", "0"], "--n-heads must be >= 1, got 0"),
    (["--method", "recurrent_depth", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--method", "recurrent_depth", "--ema", "1"], "--ema must be a decay in [0, 1)"),
    (["--method", "recurrent_depth", "--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (["--method", "recurrent_depth", "--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
    (["--method", "lit", "--eval-steps", "0"], "--eval-steps must list thinking steps >= 1, got 0"),
    (["--method", "recurrent_depth", "--resume", "a.pt", "--eval-only", "b.pt"], "give one of them"),
    (["--method", "recurrent_depth", "--device", "cuda"] if not torch.cuda.is_available() else
     ["--method", "nope"], "CUDA" if not torch.cuda.is_available() else "unknown method"),
])
def test_command_line_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything was built or written


def test_bad_paths_and_files_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    cases = [(["--out", "file.txt"], "--out file.txt is a file, not a folder"),
             (["--data-dir", "file.txt"], "--data-dir file.txt is a file, not a folder"),
             (["--task", "text", "--text-file", "folder"], "--text-file folder is a folder without files"),
             (["--resume", "empty.pt"], "cannot read checkpoint empty.pt: the file is empty or cut short"),
             (["--eval-only", "empty.pt"], "cannot read checkpoint empty.pt: the file is empty or cut short")]
    for extra, message in cases:
        assert train.main(["--method", "recurrent_depth", *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty.pt", "file.txt", "folder"]


def test_more_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "unreadable.csv").write_text("question,answer\n")
    (tmp_path / "unreadable.txt").write_text("abc " * 1000)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    for path in (tmp_path / "unreadable.csv", tmp_path / "unreadable.txt"):
        path.chmod(0)
    readonly.chmod(0o555)
    root = os.geteuid() == 0  # root reads and writes whatever the mode says: those cases cannot be made here
    cases = [(["--train-csv", "folder.csv"], "folder.csv is a folder, not a CSV file"),
             (["--test-csv", "folder.csv"], "folder.csv is a folder, not a CSV file"),
             (["--out", "file.txt/run"], "file.txt is a file, not a folder"),
             (["--beta2", "2"], "--beta2 must be in [0, 1), got 2.0"),
             (["--lr", "1e39"], "--lr must be in (0, 1]"),
             (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
             (["--d-model", "1000000", "--n-heads", "1"], "this run needs at least"),
             (["--batch-size", "100000000"], "this run needs at least"),
             (["--text-file", "file.txt"], "--text-file sets up --task text; --task sudoku does not use it"),
             (["--context-length", "64"], "--context-length sets up --task text"),
             (["--method", "lvr", "--stage", "rl"], "--stage rl fine-tunes a trained model")]
    unreadable = "/proc/self/mem"  # a file that fails to read (at offset 0) even for root
    cases += [(["--test-csv", unreadable], "mem: cannot be read (Input/output error)"),
              (["--task", "text", "--text-file", unreadable], "mem cannot be read: Input/output error")]
    if not root:
        cases += [(["--test-csv", "unreadable.csv"], "unreadable.csv: cannot be read (Permission denied)"),
                  (["--task", "text", "--text-file", "unreadable.txt"],
                   "unreadable.txt cannot be read: Permission denied"),
                  (["--out", "readonly/run"], "readonly is not writable")]
    for extra, message in cases:
        argv = (["--method", "recurrent_depth"] if extra[0] != "--method" else []) + extra
        assert train.main(argv + ["--base-size", "8", "--eval-size", "2", "--data-dir", data_dir]) == 2, extra
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1, (extra, error)
    from scripts import benchmark
    assert benchmark.main(["--out", "file.txt"]) == 2
    assert "file.txt is a file, not a folder" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt", "folder.csv", "locked", "readonly",
                                                                "unreadable.csv", "unreadable.txt"]


def test_checkpoints_without_their_entries_a_lock_folder_and_a_stop_during_start_up_are_one_line(tmp_path, data_dir,
                                                                                                  monkeypatch, capsys):
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--steps", "2"]) == 0
    checkpoint = _checkpoint(out)
    for key, use in (("optimizer", "--resume"), ("run", "--eval-only"), ("run", "--resume")):
        torch.save({k: v for k, v in checkpoint.items() if k != key}, tmp_path / "partial.pt")
        capsys.readouterr()
        assert train.main(["--method", "recurrent_depth", use, str(tmp_path / "partial.pt")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"lacks the {key} entry" in error, error
    other = tmp_path / "other"
    (other / "lock").mkdir(parents=True)
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(other)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "lock is a folder" in error

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the data is generated
    monkeypatch.setattr(train, "build_task", ctrl_c)
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(tmp_path / "third")]) == 130
    error = capsys.readouterr().err
    assert error.startswith("interrupted") and error.count("\n") == 1 and not (tmp_path / "third").exists()


def test_a_full_disk_while_saving_is_one_line_naming_the_kept_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    saves = []

    def full_disk_at_the_second_save(path, state):
        saves.append(state["step"])
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        torch.save(state, path)
    monkeypatch.setattr(train, "save_checkpoint", full_disk_at_the_second_save)
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--save-every", "2"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (f"error: cannot save the checkpoint of step 4: No space left on device; "
                     f"{out / 'checkpoint.pt'} (step 2) is kept")
    assert _checkpoint(out)["step"] == 2 and not (out / "lock").exists()


def test_run_files_and_the_data_cache_take_the_usual_umask_and_eval_only_caches_where_it_is_run(tmp_path, data_dir,
                                                                                              monkeypatch):
    previous = os.umask(0o022)
    try:
        out, cache = tmp_path / "run", tmp_path / "cache"
        assert train.main(TINY_RUN + ["--data-dir", str(cache), "--out", str(out), "--steps", "2"]) == 0
        for path in [*out.iterdir(), *cache.iterdir()]:
            assert path.stat().st_mode & 0o777 == 0o644, path
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)  # another machine or folder: the checkpoint's --data-dir is not this one's
        shutil.rmtree(cache)
        assert train.main(["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt")]) == 0
        assert not cache.exists() and any((elsewhere / "data").iterdir())
    finally:
        os.umask(previous)


def test_boolean_flags_including_fields_named_no_something():
    assert train.parse(["--method", "lit", "--no-imagination"])[1]["no_imagination"] is True
    assert train.parse(["--method", "lit", "--no-no-imagination"])[1]["no_imagination"] is False
    assert train.parse(["--method", "ltm", "--no-use-latent"])[1]["use_latent"] is False
    assert train.parse(["--method", "ltm", "--use-latent"])[1]["use_latent"] is True


def test_lr_schedule():
    class Config:
        warmup_steps, steps = 10, 110
    factors = [train.lr_factor(step, Config) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


TINY_RUN = ["--method", "recurrent_depth", "--d-model", "32", "--n-heads", "2", "--d-mlp", "64", "--steps", "6",
            "--batch-size", "8", "--warmup-steps", "2", "--mean-recurrence", "3", "--backprop-depth", "2",
            "--eval-steps", "1,2", "--eval-size", "6", "--base-size", "16", "--log-every", "2"]


def test_train_py_resumes_to_the_same_result_after_ctrl_c(tmp_path, data_dir, monkeypatch, capsys):
    data = ["--data-dir", data_dir]
    assert train.main(TINY_RUN + data + ["--out", str(tmp_path / "straight")]) == 0
    straight = _checkpoint(tmp_path / "straight")
    original_step = rd.train_step

    monkeypatch.setattr(rd, "train_step", interrupting_at_step_3(original_step))
    assert train.main(TINY_RUN + data + ["--out", str(tmp_path / "split")]) == 130
    assert "interrupted at step 3" in capsys.readouterr().out
    assert _checkpoint(tmp_path / "split")["step"] == 3
    monkeypatch.setattr(rd, "train_step", original_step)
    assert train.main(["--method", "recurrent_depth", "--resume", str(tmp_path / "split" / "checkpoint.pt")]) == 0
    resumed = _checkpoint(tmp_path / "split")
    assert resumed["step"] == straight["step"] == 6
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    results = json.loads((tmp_path / "split" / "results.json").read_text())
    expected = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["rows"] == expected["rows"]
    # the FLOP counter carries over: steps 2, 4 and 6 counted, across the stop at step 3
    for key in ("flops_counted_on_steps", "training_flops", "flops_per_step"):
        assert results["cost"][key] == expected["cost"][key], key
    assert expected["cost"]["flops_counted_on_steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [2, 4, 6] and all(np.isfinite(entry["loss"]) for entry in log)


def test_eval_only_with_other_thinking_steps(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out)]) == 0
    capsys.readouterr()
    evaluate = ["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt")]
    assert train.main(evaluate + ["--eval-steps", "3"]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert {row["test set"] for row in rows} == {"easy", "medium", "hard"}
    assert train.main(["--method", "ltm", "--eval-only", str(out / "checkpoint.pt")]) == 2
    assert "trained with --method recurrent_depth" in capsys.readouterr().err
    assert train.main(evaluate + ["--d-model", "64"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_printed_table_shows_the_columns_that_only_later_rows_have(capsys):
    train.print_table([{"thinking steps": 8, "exact %": 50.0},
                       {"thinking steps": 8, "exact %": 62.5, "restarts": 4, "picked by": "oracle verifier"}], "title")
    header, first, second = capsys.readouterr().out.strip().splitlines()[1:]
    assert header.split() == ["thinking", "steps", "exact", "%", "restarts", "picked", "by"]
    assert first.split() == ["8", "50.00"] and second.split() == ["8", "62.50", "4", "oracle", "verifier"]


def test_evaluations_record_what_was_evaluated_keep_earlier_ones_and_refuse_non_finite_weights(tmp_path, data_dir,
                                                                                              capsys):
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--steps", "2", "--ema", "0.9"]) == 0
    results = json.loads((out / "results.json").read_text())
    sizes = {"easy": 6, "medium": 6, "hard": 6}
    assert results["evaluated"] == {"step": 2, "weights": "weight average (--ema 0.9)", "seed": 0, "split": "test",
                                    "eval_size": 6, "test_files": [], "eval_steps": [1, 2], "test_sets": sizes}
    evaluate = ["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt")]
    assert train.main(evaluate + ["--eval-size", "2", "--eval-steps", "1"]) == 0
    assert train.main(evaluate + ["--trained-weights"]) == 0
    latest = json.loads((out / "eval.json").read_text())
    assert latest["evaluated"]["weights"] == "as trained" and latest["evaluated"]["eval_size"] == 6
    (first,) = latest["earlier"]  # the first evaluation is kept, with its own size
    assert first["evaluated"]["eval_size"] == 2
    assert first["evaluated"]["test_sets"] == {"easy": 2, "medium": 2, "hard": 2}
    assert {row["thinking steps"] for row in first["rows"] if isinstance(row["thinking steps"], int)} == {1}
    assert "adaptive (kl)" in {row["thinking steps"] for row in first["rows"]}
    checkpoint = _checkpoint(out)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name][0] = math.nan
    torch.save(checkpoint, out / "diverged.pt")
    capsys.readouterr()
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(out / "diverged.pt"), "--trained-weights",
                       "--out", str(tmp_path / "elsewhere")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"non-finite values ({name})" in error and not (tmp_path / "elsewhere").exists()


def _files(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_train_py_never_overwrites_a_run_unless_told(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    run = TINY_RUN + ["--data-dir", data_dir, "--out", str(out)]
    assert train.main(run) == 0
    before = _files(out)
    capsys.readouterr()
    assert train.main(run) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(out) in error and "--resume" in error and "--overwrite" in error
    assert _files(out) == before
    (out / "checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # left by a run killed while saving
    assert train.main(run + ["--overwrite", "--steps", "4"]) == 0
    assert _checkpoint(out)["step"] == 4
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4]
    assert sorted(_files(out)) == ["checkpoint.pt", "log.jsonl", "results.json"]  # no .tmp, no lock left
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')  # written after the last checkpoint, then killed
    assert train.main(["--method", "recurrent_depth", "--resume", str(out / "checkpoint.pt"), "--steps", "6"]) == 0
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4, 6]


def test_overwrite_keeps_the_old_run_until_the_new_one_is_built_and_checked(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    run = TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--steps", "2"]
    assert train.main(run) == 0
    before = _files(out)
    capsys.readouterr()
    for extra, message in ((["--test-csv", str(tmp_path / "typo.csv")], "no such file"),
                           (["--init-from", str(out / "checkpoint.pt"), "--d-model", "64"], "does not fit"),
                           (["--task", "text", "--text-file", str(tmp_path / "missing.txt")], "text file not found")):
        assert train.main(run + ["--overwrite", *extra]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
        assert _files(out) == before  # the run it would have replaced is intact
    log_only = tmp_path / "log-only"  # a run that stopped before its first checkpoint
    log_only.mkdir()
    (log_only / "log.jsonl").write_text('{"step": 50, "loss": 1.0}\n')
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(log_only)]) == 2
    assert "already holds a run (log.jsonl)" in capsys.readouterr().err
    assert _files(log_only) == {"log.jsonl": b'{"step": 50, "loss": 1.0}\n'}


def test_resume_refuses_a_changed_setting_in_one_line_and_applies_more_steps(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--steps", "2"]) == 0
    before = _files(out)
    resume = ["--method", "recurrent_depth", "--resume", str(out / "checkpoint.pt")]
    capsys.readouterr()
    for flag, value in (("--lr", "0.5"), ("--seed", "1"), ("--difficulty", "medium"), ("--batch-size", "4"),
                        ("--base-size", "32"), ("--warmup-steps", "1"), ("--ema", "0.9")):
        assert train.main(resume + [flag, value]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {flag} {value} differs from the checkpoint's"), error
        assert error.count("\n") == 1, error
        assert _files(out) == before
    assert train.main(resume + ["--lr", "0.002", "--steps", "4", "--eval-steps", "1"]) == 0  # the same lr: not a change
    assert "the run now ends at step 4" in capsys.readouterr().out
    checkpoint = _checkpoint(out)
    assert checkpoint["step"] == 4 and checkpoint["config"]["lr"] == 0.002 and checkpoint["run"]["seed"] == 0


def test_train_py_resume_and_eval_only_write_next_to_the_checkpoint_given(tmp_path, data_dir):
    original, copied = tmp_path / "original", tmp_path / "copied"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(original), "--steps", "4"]) == 0
    before = _files(original)
    copied.mkdir()
    shutil.copy(original / "checkpoint.pt", copied)
    assert train.main(["--method", "recurrent_depth", "--resume", str(copied / "checkpoint.pt"), "--steps", "6"]) == 0
    assert _checkpoint(copied)["step"] == 6 and (copied / "results.json").exists()
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(copied / "checkpoint.pt")]) == 0
    assert (copied / "eval.json").exists()
    elsewhere = tmp_path / "elsewhere"
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(copied / "checkpoint.pt"),
                       "--out", str(elsewhere)]) == 0
    assert sorted(_files(elsewhere)) == ["eval.json"]
    assert _files(original) == before


def test_train_py_refuses_a_folder_locked_by_a_live_run_but_takes_over_a_stale_lock(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    run = TINY_RUN + ["--data-dir", data_dir, "--out", str(out)]
    (out / "lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live process holds it
    assert train.main(run) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{out} is in use by another run (process {os.getpid()}" in error
    assert sorted(_files(out)) == ["lock"]
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (out / "lock").write_text(f"{ended.pid} {socket.gethostname()}\n")  # its run crashed without unlocking
    assert train.main(run) == 0
    assert sorted(_files(out)) == ["checkpoint.pt", "log.jsonl", "results.json"]


def test_train_py_saves_nothing_when_a_second_ctrl_c_lands_in_the_weight_update(tmp_path, data_dir, monkeypatch,
                                                                                 capsys):
    original_step = rd.train_step

    def interrupted_after_the_update(model, optimizer, scaler, batch, step, *rest):
        metrics = original_step(model, optimizer, scaler, batch, step, *rest)
        if step == 4:
            raise KeyboardInterrupt  # after optimizer.step(): the weights no longer match the step count
        return metrics

    monkeypatch.setattr(rd, "train_step", interrupted_after_the_update)
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--save-every", "2"]) == 130
    assert "not saved" in capsys.readouterr().out and _checkpoint(out)["step"] == 4


def _strict_json(line):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_train_py_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, data_dir,
                                                                                         monkeypatch, capsys):
    original_step = rd.train_step

    def diverging_at_step_5(model, optimizer, scaler, batch, step, *rest):
        metrics = original_step(model, optimizer, scaler, batch, step, *rest)
        return {**metrics, "loss": metrics["loss"] * (math.nan if step == 4 else 1),
                "grad_norm": torch.tensor(math.inf if step == 0 else 1.0)}  # a non-finite metric that may happen

    monkeypatch.setattr(rd, "train_step", diverging_at_step_5)
    out = tmp_path / "run"
    run = TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--log-every", "1", "--save-every", "2"]
    assert train.main(run) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: the loss is nan at step 5") and "(step 4) is kept" in error
    assert _checkpoint(out)["step"] == 4 and not (out / "results.json").exists()
    log = [_strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4] and log[0]["grad_norm"] is None


def _recording(train_step, record):
    """A method's train_step that calls record(model, optimizer, step, when) before and after the real step."""
    def step_and_record(model, optimizer, scaler, batch, step, *rest):
        record(model, optimizer, step, "before")
        metrics = train_step(model, optimizer, scaler, batch, step, *rest)
        record(model, optimizer, step, "after")
        return metrics
    return step_and_record


def test_the_learning_rate_applied_at_each_step_and_the_weight_average_match_a_hand_computation(tmp_path, data_dir,
                                                                                                 monkeypatch):
    seen = {"lr": [], "weights": []}

    def record(model, optimizer, step, when):
        if when == "before":
            seen["lr"].append({group["lr"] for group in optimizer.param_groups})
            if step == 0:
                seen["weights"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        else:
            seen["weights"].append({n: p.detach().clone() for n, p in model.named_parameters()})
    monkeypatch.setattr(rd, "train_step", _recording(rd.train_step, record))
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--lr", "0.004", "--ema", "0.5"]) == 0
    # 2 warmup steps rising linearly, then a cosine from the peak to a tenth over the 4 steps left
    expected = [0.004 * (step + 1) / 2 for step in range(2)] + \
               [0.004 * (0.1 + 0.45 * (1 + math.cos(math.pi * k / 4))) for k in range(4)]
    assert [len(lrs) for lrs in seen["lr"]] == [1] * 6  # every parameter group at the same rate
    assert [lrs.pop() for lrs in seen["lr"]] == pytest.approx(expected, rel=1e-12)
    # average_n = d_n average_{n-1} + (1 - d_n) weights_n, d_n = min(0.5, (1+n)/(10+n))
    average = dict(seen["weights"][0])
    for n, weights in enumerate(seen["weights"][1:]):
        decay = min(0.5, (1 + n) / (10 + n))
        average = {name: decay * average[name] + (1 - decay) * weights[name] for name in average}
    saved = _checkpoint(out)["ema"]
    for name, value in average.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(saved[name], seen["weights"][-1][name])


@pytest.mark.parametrize("method", train.METHODS)
def test_gradients_are_clipped_before_the_optimizer_uses_them(method, tmp_path, data_dir, monkeypatch):
    # after the first AdamW step, exp_avg = (1 - beta1) * the gradient the optimizer saw: with a clip far below
    # the gradient's norm it must hold the clipped gradient (each model's share at most the clip), not the raw one
    fields = {field.name for field in dataclasses.fields(train.load_method(method).Config)}
    flag = next((f for f in ("grad_clip", "clip_norm") if f in fields), None)
    if flag is None:
        pytest.skip(f"{method}'s Config names no gradient clip")
    module, clip, found = train.load_method(method), 1e-4, []

    def record(model, optimizer, step, when):
        if when == "after" and step == 0:
            beta1 = optimizer.param_groups[0]["betas"][0]
            moments = [state["exp_avg"] for state in optimizer.state.values() if "exp_avg" in state]
            found.append(float(torch.linalg.vector_norm(torch.cat([m.flatten() for m in moments]))) / (1 - beta1))
    monkeypatch.setattr(module, "train_step", _recording(module.train_step, record))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 40)
    run = ["--method", method, *TINY_FLAGS[method], "--steps", "1", "--eval-size", "2", "--data-dir", data_dir,
           "--out", str(tmp_path / "run"), "--" + flag.replace("_", "-"), str(clip)]
    assert train.main(run + (["--text-file", str(corpus)] if method == "ltm" else [])) == 0
    assert 0.99 * clip <= found[0] <= 2 * clip  # raw gradients are 1000s of clips long


def test_batches_and_example_seeds_vary_with_step_and_seed_and_test_sets_do_not_vary_with_training_settings(data_dir):
    batch = {"puzzle": torch.zeros(6, 81, dtype=torch.long)}
    seeds = {(seed, step): train.with_example_seeds(batch, seed, step)["example_seed"]
             for seed in (0, 1) for step in (0, 1)}
    assert torch.equal(seeds[0, 0], train.with_example_seeds(batch, 0, 0)["example_seed"])
    assert len({s for values in seeds.values() for s in values.tolist()}) == 4 * 6  # all distinct
    sudoku = sudoku_data.SudokuTask("easy", seed=0, base_size=16, eval_size=4, data_dir=data_dir)
    tasks = {"sudoku": (sudoku, sudoku_data.SudokuTask("easy", seed=1, base_size=16, eval_size=4, data_dir=data_dir)),
             "vqa": (vqa_data.VQATask(seed=0, train_size=50, eval_size=4),
                     vqa_data.VQATask(seed=1, train_size=50, eval_size=4))}
    for name, (task, other_seed) in tasks.items():
        first = task.train_batch(3, 4)
        key = next(iter(first))
        assert all(torch.equal(first[k], task.train_batch(3, 4)[k]) for k in first), name  # (seed, step) decides
        assert not torch.equal(first[key], task.train_batch(4, 4)[key]), name
        assert not torch.equal(first[key], other_seed.train_batch(3, 4)[key]), name
    # what a run is measured on does not move with how it trains
    other = sudoku_data.SudokuTask("medium", seed=0, base_size=32, eval_size=4, data_dir=data_dir)
    for name, test_set in sudoku.test_sets.items():
        assert torch.equal(test_set["puzzle"], other.test_sets[name]["puzzle"]), name
    vqa = vqa_data.VQATask(seed=0, train_size=80, eval_size=4)
    held_out = tasks["vqa"][0].test_sets["held-out"]
    assert all(torch.equal(vqa.test_sets["held-out"][k], held_out[k]) for k in vqa.test_sets["held-out"])


def test_each_log_line_holds_the_step_it_names_and_the_comparison_table_puts_each_value_in_its_cell(tmp_path, data_dir,
                                                                                                   monkeypatch):
    original = rd.train_step

    def numbered(model, optimizer, scaler, batch, step, *rest):
        return {**original(model, optimizer, scaler, batch, step, *rest), "loss": torch.tensor(100.0 + step)}
    monkeypatch.setattr(rd, "train_step", numbered)
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--log-every", "2", "--lr", "0.004"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in log] == [(2, 101.0), (4, 103.0), (6, 105.0)]  # the step's own
    assert log[0]["lr"] == pytest.approx(0.004)  # the rate step 2 trained at: the warmup's top (the lr of step index 1)
    points = [{"difficulty": "easy", "method": "a", "thinking steps": 1, "exact %": 10.0},
              {"difficulty": "easy", "method": "b", "thinking steps": 4, "exact %": 44.44},
              {"difficulty": "hard", "method": "a", "thinking steps": 4, "exact %": 3.0}]
    results = {"a": {"config": {"difficulty": "easy", "steps": 5}, "cost": {"training_flops": 2e12}},
               "b": {"config": {"difficulty": "mixed", "steps": 7}}}
    from scripts import benchmark
    table = benchmark.compare_table(points, results).splitlines()
    assert table[:5] == ["| test set | thinking steps | a | b |", "|---|---:|---:|---:|", "| easy | 1 | 10.0 |  |",
                         "| easy | 4 |  | 44.4 |", "| hard | 4 | 3.0 |  |"]
    assert "a: easy, 5 steps, 2e+12 FLOPs" in table[-1] and "b: mixed, 7 steps, nan FLOPs" in table[-1]


def test_text_checkpoint_refuses_a_text_with_other_characters(tmp_path, capsys):
    trained, edited = tmp_path / "trained.txt", tmp_path / "edited.txt"
    trained.write_text("abcdefgh " * 300)
    edited.write_text("abcdefgX " * 300)  # as many distinct characters, so the model would fit
    run = ["--method", "recurrent_depth", "--task", "text", "--context-length", "16", "--d-model", "32",
           "--n-heads", "2",
           "--d-mlp", "64", "--mean-recurrence", "3", "--backprop-depth", "2", "--steps", "2", "--batch-size", "4",
           "--eval-steps", "1", "--eval-size", "4"]
    assert train.main(run + ["--text-file", str(trained), "--out", str(tmp_path / "run")]) == 0
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    capsys.readouterr()
    for use in ("--eval-only", "--resume", "--init-from"):
        extra = ["--out", str(tmp_path / "other")] if use == "--init-from" else []
        assert train.main(["--method", "recurrent_depth", use, checkpoint, "--text-file", str(edited), *extra] +
                          (run[2:] if use == "--init-from" else [])) == 2
        error = capsys.readouterr().err
        # --resume refuses any change of the file
        expected = "differs from the checkpoint's" if use == "--resume" else "holds other characters"
        assert error.count("\n") == 1 and expected in error
    assert train.main(["--method", "recurrent_depth", "--eval-only", checkpoint]) == 0


def test_a_cpu_slow_at_the_asked_dtype_gets_one_warning_line(tmp_path, data_dir, monkeypatch, capsys):
    """bf16 autocast on a CPU without bf16 units is many times slower than fp32: the run says so, once."""
    speeds = {torch.bfloat16: 1e9, torch.float32: 2e10}
    monkeypatch.setattr(train, "matmul_peak", lambda device, dtype, seconds=0.2: speeds[dtype])
    run = ["--method", "lit", *TINY_FLAGS["lit"], "--steps", "1", "--data-dir", data_dir]
    assert train.main(run + ["--dtype", "bfloat16", "--out", str(tmp_path / "slow")]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: this CPU multiplies torch.bfloat16 matrices at 1.0 GFLOP/s and float32 ones at 20.0 "
                        "(no bfloat16 units): --dtype float32 trains faster here"]
    speeds[torch.bfloat16] = 3e10  # a CPU with bf16 units, and fp32 itself: no warning
    for name, dtype in (("fast", "bfloat16"), ("fp32", "float32")):
        assert train.main(run + ["--dtype", dtype, "--out", str(tmp_path / name)]) == 0
        assert "warning:" not in capsys.readouterr().out


def test_checkpoint_save_failing_with_an_os_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    train.save_checkpoint(path, {"step": 1, "weights": torch.ones(3)})

    def half_written(state, file):
        file.write(b"half a check")
        raise OSError(28, "No space left on device")

    def refused(*args):
        raise OSError(13, "Permission denied")

    for target, name, failing in ((torch, "save", half_written), (os, "replace", refused)):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, failing)
            with pytest.raises(OSError):
                train.save_checkpoint(path, {"step": 2, "weights": torch.zeros(3)})
        assert torch.load(path, weights_only=True)["step"] == 1
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


SIGINT_STEPS = 20
TINY_FLAGS = {  # tiny runs of every method, for the Ctrl-C test
    "recurrent_depth": TINY_RUN[2:],
    "ltm": ["--task", "text", "--context-length", "16", "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
            "--n-z-per-layer", "2", "--fast-steps", "2", "--batch-size", "4", "--eval-steps", "1", "--eval-size", "4",
            "--eval-subset", "4"],
    "lit": ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--train-thinking-steps", "2", "--batch-size", "4",
            "--eval-steps", "1", "--eval-size", "6", "--base-size", "16", "--eval-batch-size", "8"],
    "lvr": ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--encoder-layers", "1", "--align-steps", "5",
            "--no-baseline", "--batch-size", "4", "--eval-steps", "0,2", "--eval-size", "8"],
}


def test_a_setting_only_the_evaluation_rejects_stops_the_run_before_training(tmp_path, data_dir, capsys, monkeypatch):
    def evaluate_refusing(model, task, config, eval_steps, autocast_dtype):  # stands for a setting only it rejects
        raise ValueError("this evaluation cannot run\nsecond line")

    monkeypatch.setattr(lit, "evaluate", evaluate_refusing)
    monkeypatch.setattr(lit, "train_step", lambda *args: pytest.fail("trained before the evaluation was checked"))
    out = tmp_path / "run"
    run = ["--method", "lit", *TINY_FLAGS["lit"], "--steps", "100000", "--data-dir", data_dir]
    assert train.main(run + ["--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error == "error: the evaluation fails with these settings: this evaluation cannot run\n"
    assert not out.exists()


@pytest.mark.parametrize("method", train.METHODS)
def test_train_py_resumes_bit_exactly_after_a_real_ctrl_c_or_sigterm(method, tmp_path, data_dir, capsys):
    # recurrent_depth gets SIGTERM (what timeout, a job scheduler or docker stop sends), the others Ctrl-C
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 40)
    run = ["--method", method, *TINY_FLAGS[method], "--steps", str(SIGINT_STEPS), "--warmup-steps", "2",
           "--log-every", "4", "--data-dir", data_dir]  # (a logged step is also FLOP-counted, 5x slower)
    run += ["--text-file", str(corpus)] if method == "ltm" else []
    straight, split = tmp_path / "straight", tmp_path / "split"
    process = subprocess.Popen([sys.executable, "train.py", *run, "--out", str(split)], cwd=Path(train.__file__).parent,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = split / "log.jsonl"

    def pause_after_two_log_lines():  # paused in the middle of a step: the loop is almost all steps
        while process.poll() is None and not (log.exists() and log.read_text().count("\n") >= 2):
            time.sleep(0.005)
        process.send_signal(signal.SIGSTOP)
    watcher = threading.Thread(target=pause_after_two_log_lines)
    watcher.start()
    try:
        assert train.main(run + ["--out", str(straight)]) == 0  # (beside it)
    finally:
        watcher.join()
    capsys.readouterr()
    assert train.main(run + ["--out", str(split)]) == 2  # a second run in the same folder is refused
    assert "is in use by another run" in capsys.readouterr().err
    process.send_signal(signal.SIGTERM if method == "recurrent_depth" else signal.SIGINT)  # lands where it paused
    process.send_signal(signal.SIGCONT)
    output, errors = process.communicate(timeout=300)
    assert process.returncode == 130, errors[-3000:]
    interrupted = int(re.search(r"interrupted at step (\d+)", output).group(1))
    assert 8 <= interrupted < SIGINT_STEPS and _checkpoint(split)["step"] == interrupted  # (after 2 log lines)
    assert not (split / "lock").exists()
    assert train.main(["--method", method, "--resume", str(split / "checkpoint.pt")]) == 0
    resumed, expected = _checkpoint(split), _checkpoint(straight)
    assert resumed["step"] == expected["step"] == SIGINT_STEPS
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(4, SIGINT_STEPS + 1, 4))
    rows = [[{k: v for k, v in row.items() if k != "seconds"}
             for row in json.loads((folder / "results.json").read_text())["rows"]]
            for folder in (straight, split)]  # (ltm's rows carry their wall time)
    assert rows[0] == rows[1]

def test_the_matmul_probe_is_finite_and_leaves_the_random_state():
    state = torch.get_rng_state()
    peak = MATMUL_PEAK(torch.device("cpu"), torch.float32, seconds=0.01)
    assert 1e8 < peak < 1e14 and torch.equal(state, torch.get_rng_state())


def test_cost_counts_linear_and_cpu_attention_flops_and_every_log_line_has_the_cost_fields(tmp_path, data_dir):
    layer, x = torch.nn.Linear(64, 32, bias=False), torch.randn(8, 64, requires_grad=True)
    meter = train.CostMeter(peak=1e9, ranks=2)
    meter.step(lambda: layer(x).sum().backward(), count=True)
    assert meter.flops_per_step() == 2 * 6 * 8 * 64 * 32  # forward + two backward products, times 2 ranks
    q = torch.randn(2, 4, 81, 16, requires_grad=True)
    meter = train.CostMeter(peak=1e9, ranks=1)
    meter.step(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward(), count=True)
    assert meter.flops_per_step() == (4 + 8) * 2 * 4 * 81 * 81 * 16  # 2 products forward, 4 backward (no recompute)
    assert meter.step(lambda: "not counted", count=False) == "not counted" and meter.counted_steps == 1
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["examples_per_s"] > 0 and line["tokens_per_s"] == pytest.approx(81 * line["examples_per_s"])
        assert line["flops_per_step"] > 0 and 0 < line["mfu"]
    cost = json.loads((out / "results.json").read_text())["cost"]
    assert cost["training_flops"] == pytest.approx(6 * cost["flops_per_step"]) and cost["flops_counted_on_steps"] == 3
    assert cost["peak_flops_per_s"] > 0 and cost["ranks"] == 1


def test_peak_gpu_memory_is_in_the_end_of_training_line_and_the_results_only_on_cuda(tmp_path, data_dir, monkeypatch,
                                                                                     capsys):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30 + 2**29)
    assert train.peak_memory(torch.device("cuda", 0)) == {"peak_memory_bytes": 3 * 2**30 + 2**29}
    assert train.peak_memory(torch.device("cpu")) == {}
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out)]) == 0  # the CPU: no memory figure
    assert "peak GPU memory" not in capsys.readouterr().out
    assert "peak_memory_bytes" not in json.loads((out / "results.json").read_text())["cost"]
    real = train.peak_memory
    monkeypatch.setattr(train, "peak_memory", lambda device: real(torch.device("cuda", 0)))  # as a CUDA run reports it
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--overwrite"]) == 0
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trained 6 steps")]
    assert len(trained) == 1 and trained[0].endswith(", peak GPU memory 3.50 GiB"), trained
    assert json.loads((out / "results.json").read_text())["cost"]["peak_memory_bytes"] == 3 * 2**30 + 2**29


def test_cost_meter_counts_a_lit_step_as_the_same_step_with_attention_as_explicit_products(puzzles):
    # the slower direct computation: torch's math attention is plain matrix products, which torch's counter
    # counts by itself; the meter must give the fused CPU kernel's step the same FLOPs (a count that leaves the
    # fused kernel out, or counts its recomputed scores, gives another number)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    config = lit.Config(d_model=16, n_heads=2, n_layers=1)
    batch = {"puzzle": torch.from_numpy(puzzles["easy"][0][:4]).long(),
             "solution": torch.from_numpy(puzzles["easy"][1][:4]).long()}
    counts = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        torch.manual_seed(0)
        model = lit.build_model(config, SimpleNamespace(name="sudoku"))
        optimizer = lit.make_optimizer(model, config)
        meter = train.CostMeter(peak=1e9, ranks=1)
        with sdpa_kernel(backend):
            meter.step(lambda: lit.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), batch, 0,
                                              config, None), count=True)
        counts.append(meter.flops_per_step())
    assert counts[0] == counts[1] > 0


# Each method's GPU_CONFIG shape for a step on the CPU, shrunk in batch size (1), steps, evaluation sizes
# (1 example) and training data (--base-size, easy puzzles, the easy test set) only, in fp32 (bf16 matmuls are ~50x
# slower on a CPU without bf16 units; every method trains and evaluates in bf16 at tiny size below). Two more cuts,
# each the least that keeps the test to seconds: recurrent_depth and lit evaluate at 1 and 2 thinking steps, not up
# to 64; ltm takes 1 fast step in training, not 16 (no tensor changes shape), evaluates its prior row only, on
# 16-token windows, not 1,024 (its weights keep their shapes). lvr starts stage 1 at step 1, so
# both stages run, and its adaptive exits and sampled validation rows take 2 latent steps, 2 samples and 1
# question at most (no tensor changes shape).
EASY = ["--difficulty", "easy", "--eval-sets", "easy"]
GPU_SHAPE_CUTS = {
    "recurrent_depth": ["--eval-steps", "1,2", "--base-size", "8", "--mean-recurrence", "2", "--backprop-depth", "1",
                        *EASY],
    "ltm": ["--fast-steps", "1", "--eval-steps", "0", "--eval-subset", "1", "--context-length", "16"],
    "lit": ["--eval-steps", "1,2", "--eval-batch-size", "4", "--base-size", "8", "--train-thinking-steps", "2",
            "--restarts", "2", *EASY],  # (4: 2 puzzles of 2 restarts)
    "lvr": ["--align-steps", "1", "--eval-steps", "0,2", "--group-size", "2", "--max-latent", "2",
            "--validation-size", "1"],
}


@pytest.mark.parametrize("method", train.METHODS)
def test_train_py_gpu_preset_shape_trains_on_the_cpu(method, tmp_path, data_dir):
    steps = 2 if method == "lvr" else 1  # lvr: a step of each stage
    run = ["--method", method, "--preset", "gpu", "--dtype", "float32", "--batch-size", "1", "--steps", str(steps),
           "--eval-size", "1", "--log-every", "1", "--data-dir", data_dir, "--out", str(tmp_path),
           *GPU_SHAPE_CUTS[method]]
    assert train.main(run) == 0
    config = _checkpoint(tmp_path)["config"]
    module = train.load_method(method)
    kept = {k: v for k, v in module.GPU_CONFIG.items() if k not in ("batch_size", "steps", "eval_steps", "fast_steps",
                                                                     "eval_subset", "eval_batch_size", "align_steps",
                                                                     "train_thinking_steps", "restarts",
                                                                     "mean_recurrence", "backprop_depth", "difficulty")
            and k not in train.COMMON_DEFAULTS}  # (run options, not fields: context_length, ema, base_size)
    assert {k: config[k] for k in kept} == {k: tuple(v) if isinstance(v, list) else v for k, v in kept.items()}
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2][:steps]


@pytest.mark.parametrize("method", train.METHODS)
def test_compile_builds_a_graph_of_the_training_step_or_is_refused_in_one_line(method, tmp_path, data_dir, monkeypatch,
                                                                               capsys):
    # model.compile() compiles forward alone: with a counting backend in place of inductor, a compiled run must
    # hand dynamo at least one frame (step 1, the one the FLOP counter does not run); a model without a forward
    # is refused before training
    import torch._dynamo.testing
    counter, compile = torch._dynamo.testing.CompileCounter(), torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compile(self, backend=counter))
    torch._dynamo.reset()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 40)
    run = ["--method", method, *TINY_FLAGS[method], "--steps", "2", "--log-every", "2", "--eval-size", "2",
           "--data-dir", data_dir, "--out", str(tmp_path / "run"), "--compile"]
    run += ["--text-file", str(corpus)] if method == "ltm" else []
    module, built = train.load_method(method), []
    real_build = module.build_model
    monkeypatch.setattr(module, "build_model", lambda config, task: built.append(real_build(config, task)) or built[-1])
    try:
        status = train.main(run)
    finally:
        torch._dynamo.reset()
    if type(built[-1]).forward is not torch.nn.Module.forward:
        assert status == 0 and counter.frame_count > 0
    else:
        error = capsys.readouterr().err
        assert status == 2 and error.startswith("error: --compile:") and error.count("\n") == 1, error
        assert not (tmp_path / "run").exists()


class SettingsChecked(Exception):
    """Raised in place of choosing the device: every setting of the run has passed train.py's checks."""


def stop_once_settings_are_checked(monkeypatch):
    """train.run stops with SettingsChecked(device, dtype) where it would choose the device; returns the exception
    and the list of (options, config values) train.check_settings was called with."""
    checked = []
    real_check = train.check_settings
    monkeypatch.setattr(train, "check_settings", lambda options, kind, values: checked.append((options, values))
                        or real_check(options, kind, values))

    def stop(device, dtype):
        raise SettingsChecked(device, dtype)

    monkeypatch.setattr(train, "choose_device_and_dtype", stop)
    return SettingsChecked, checked


def test_lit_gpu_preset_is_the_hard_puzzle_recipe_scaled_and_takes_the_public_protocol(tmp_path, puzzles, monkeypatch):
    # the recipe's flags as scripts/benchmark.py runs them; the preset must agree wherever the recipe sets something
    from scripts import benchmark
    recipe = next(flags for name, _, flags in benchmark.COMPARED if name.endswith("recipe"))
    _, recipe = train.parse(["--method", "lit", *recipe])
    public = tmp_path / "public.csv"
    sudoku_data.write_csv(public, puzzles["hard"][0], puzzles["hard"][1])

    SettingsChecked, checked = stop_once_settings_are_checked(monkeypatch)
    with pytest.raises(SettingsChecked):
        train.run(["--method", "lit", "--preset", "gpu", "--train-csv", str(public), "--train-size", "10",
                   "--test-csv", str(public), "--out", str(tmp_path / "run")])
    options, values = checked[-1]
    settings = {**vars(options), **values}
    for name in ("imagination_weight", "ema_teacher", "segment_steps", "difficulty", "base_size", "ema"):
        assert settings[name] == recipe[name], name
    assert not settings["no_imagination"]  # LIT, as the recipe
    assert set(recipe["eval_steps"]) < set(settings["eval_steps"]) and options.train_size == 10
    assert settings["restarts"] > 1 and settings["restart_noise"] > 0
    assert settings["halt_weight"] > 0 and 0 < settings["halt_threshold"] < 1  # trained with its head, stopped by it
    assert settings["eval_batch_size"] % settings["restarts"] == 0
    with pytest.raises(SettingsChecked):
        train.run(["--method", "lit", "--preset", "gpu", "--ema", "0", "--out", str(tmp_path / "run")])
    assert checked[-1][0].ema == 0  # the command line still wins over the preset's run options
    config = lit.Config(**values)
    with torch.device("meta"):
        gpu, cpu = (sum(p.numel() for p in lit.build_model(c, SimpleNamespace(name="sudoku")).parameters()
                        if p.requires_grad)
                    for c in (config, lit.Config(**{k: v for k, v in recipe.items() if k in values})))
    assert 20 < gpu / cpu < 40 and gpu < 5e6  # scaled up, still below TRM's 5M


GPU_CHECK = Path(train.__file__).parent / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses_and_refuses_in_one_line_without_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    done = subprocess.run(["bash", str(GPU_CHECK), "--out", str(tmp_path / "check")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                                           "PYTHON": sys.executable})
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.startswith("gpu_check: no CUDA device is visible") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "check").exists()
    done = subprocess.run(["bash", str(GPU_CHECK), "--methods", "lit,nope", "--dry-run"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "unknown method nope" in done.stderr and done.stdout == ""


def test_gpu_check_commands_pass_train_py_settings_checks_and_fit_its_table(tmp_path, monkeypatch):
    import shlex
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--out", str(tmp_path / "a check")],
                          capture_output=True, text=True, check=True)
    commands = [shlex.split(line) for line in done.stdout.splitlines()]
    assert [command[:4] for command in commands] == [["python", "train.py", "--method", m]
                                                     for m in ("recurrent_depth", "lit", "ltm", "lvr")]

    SettingsChecked, checked = stop_once_settings_are_checked(monkeypatch)
    for command in commands:
        with pytest.raises(SettingsChecked, match="cuda.*bfloat16"):
            train.run(command[2:])
        options, values = checked[-1]
        method = train.load_method(command[3])
        assert options.preset == "gpu" and options.compile and options.out == str(tmp_path / "a check" / command[3])
        assert all(values[k] == (tuple(v) if isinstance(v, list) else v) for k, v in method.GPU_CONFIG.items()
                   if k not in train.COMMON_DEFAULTS and "--" + k.replace("_", "-") not in command)
        # the table's rates are taken between the last two log lines: at least two, the last at the last step
        assert values["steps"] % options.log_every == 0 and values["steps"] >= 2 * options.log_every
        if command[3] == "lvr":  # every counted step (log_every, 2 log_every, ...) is past stage 0
            assert values["align_steps"] < options.log_every
    assert not (tmp_path / "a check").exists()


def test_gpu_check_runs_the_methods_and_prints_their_table_or_names_the_method_that_fails(tmp_path, data_dir):
    # a stand-in python that says a GPU is there and runs each command on the CPU with the tiny runs' sizes (later
    # flags win), so that the script's loop, refusals and table are exercised here
    stand_in = tmp_path / "python"
    stand_in.write_text(f"""#!{sys.executable}
import os, sys
argv = sys.argv[1:]
if argv[0] == "-c":
    print("stand-in GPU")
    sys.exit(0)
if argv[0] == "train.py":
    argv = ["cpu" if a == "cuda" else a for a in argv if a != "--compile"]
    method = argv[argv.index("--method") + 1]
    argv += [*{TINY_FLAGS!r}[method], "--steps", "4", "--log-every", "2", "--data-dir", {data_dir!r},
             *(["--align-steps", "1"] if method == "lvr" else []),
             *(["--eval-batch-size", "16"] if method == "lit" else []),  # one puzzle's 16 restarts of the preset
             *os.environ.get("BREAK_" + method, "").split()]
os.execv({sys.executable!r}, [{sys.executable!r}, *argv])
""")
    stand_in.chmod(0o755)
    environment = {**os.environ, "PYTHON": str(stand_in), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(GPU_CHECK), "--out", str(out), "--methods", "lvr,lit"], capture_output=True,
                          text=True, timeout=240, env=environment)  # (two of the four: a test of seconds)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout[done.stdout.index("\nmethod ") + 1:].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["lvr", "lit", "gpu_check:"]
    assert table[-1].startswith("gpu_check: done")
    for line in table[1:3]:
        steps, examples, mfu, peak, memory, first_loss, loss = line.split()[1:8]
        assert steps == "4" and float(examples) > 0 and float(mfu.rstrip("%")) > 0 and float(peak) > 0
        assert memory == "n/a" and math.isfinite(float(loss)) and line.endswith("steps 2-4")  # (no CUDA memory here)
        logged = [json.loads(text) for text in (out / line.split()[0] / "log.jsonl").read_text().splitlines()]
        assert [float(first_loss), float(loss)] == pytest.approx([logged[0]["loss"], logged[-1]["loss"]], abs=1e-4), \
            (line, logged)
        # the window's rates leave out the step the FLOP counter ran: one timed step between steps 2 and 4
        assert logged[-1]["timed_steps"] - logged[0]["timed_steps"] == 1
        batch = json.loads((out / line.split()[0] / "results.json").read_text())["config"]["batch_size"]
        assert float(examples) == pytest.approx(batch / (logged[-1]["seconds"] - logged[0]["seconds"]), abs=0.06)
    again = subprocess.run(["bash", str(GPU_CHECK), "--out", str(out), "--methods", "lit"], capture_output=True,
                           text=True, env=environment)
    assert again.returncode == 1 and again.stderr == f"gpu_check: {out}/lit already holds a run; give --overwrite to " \
                                                     f"replace it, or another --out\n"
    broken = subprocess.run(["bash", str(GPU_CHECK), "--out", str(out), "--methods", "lvr", "--overwrite"],
                            capture_output=True, text=True, timeout=120, env={**environment, "BREAK_lvr": "--lr -1"})
    assert broken.returncode == 1
    assert broken.stderr.splitlines()[-1].startswith("gpu_check: lvr failed with exit status 2")
    assert "\nmethod " not in broken.stdout  # no table after a failure


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", train.METHODS)
def test_train_py_trains_and_evaluates_under_fp16_with_grad_scaler_and_bf16_on_the_cpu(method, dtype, tmp_path,
                                                                                      data_dir):
    # fp16 autocast and a GradScaler: the CUDA default where bf16 is missing; bf16 autocast: the GPU default; torch
    # runs both on the CPU
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 40)
    run = ["--method", method, *TINY_FLAGS[method], "--dtype", dtype, "--steps", "3", "--log-every", "1",
           "--eval-size", "2", "--eval-steps", "1", "--data-dir", data_dir, "--out", str(tmp_path / "run")]
    run += ["--text-file", str(corpus)] if method == "ltm" else []  # (a short evaluation: one step count, 2 examples)
    run += ["--align-steps", "1"] if method == "lvr" else []  # a step of each stage
    assert train.main(run) == 0
    checkpoint = _checkpoint(tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["run"]["dtype"] == dtype and results["rows"]  # evaluated under the same autocast
    if dtype == "float16":
        assert checkpoint["scaler"]["scale"] > 1  # the scaler was on (a disabled one saves no scale)
    else:
        assert "scale" not in checkpoint["scaler"]  # bf16 needs no scaler: a disabled one saves no scale
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def _torchrun(args, ranks=2, wait=True):
    """python -m torch.distributed.run --standalone --nproc_per_node ranks train.py args (CPU, gloo): the finished
    process, or (wait=False) the running one."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([*launcher, "train.py", *args], cwd=Path(train.__file__).parent, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _finished(process) if wait else process


def _finished(process):
    try:
        process.stdout, process.stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return process


def test_train_py_torchrun_equals_one_process_and_resumes_exactly_recurrent_depth(tmp_path, data_dir):
    # warmup longer than the run: the schedule of steps 1-4 does not depend on --steps, so 2 + 2 resumed = 4
    run = TINY_RUN + ["--warmup-steps", "10", "--save-every", "1", "--eval-size", "2", "--eval-steps", "1",
                      "--data-dir", data_dir]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for args in (run + ["--steps", "4", "--out", str(straight)], run + ["--steps", "2", "--out", str(split)],
                 ["--method", "recurrent_depth", "--resume", str(split / "checkpoint.pt"), "--steps", "4"]):
        done = _torchrun(args)
        assert done.returncode == 0, done.stderr[-3000:]  # a checkpoint with the ranks' weights unequal fails
    expected, resumed = _checkpoint(straight), _checkpoint(split)
    assert resumed["step"] == expected["step"] == 4 and len(expected["rank_rngs"]) == 2
    assert not torch.equal(expected["rank_rngs"][0]["rng"], expected["rank_rngs"][1]["rng"])  # the ranks draw apart
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # s_0 is drawn per example (batch["example_seed"]): one process with the whole batch takes the same steps
    assert train.main(run + ["--steps", "4", "--out", str(tmp_path / "one")]) == 0
    # the key bias's gradient is zero in exact arithmetic (a per-query shift of the scores); Adam divides by
    # sqrt(v), so the roundoff of another reduction order becomes up to ~1e-6 of weight there; a batch split or
    # averaged wrongly moves weights by about one step, lr 2e-4 to 8e-4 here (warm-up), so agreement to 1e-5
    # (under 5 % of the smallest step) still catches it
    for name, tensor in _checkpoint(tmp_path / "one")["model"].items():
        torch.testing.assert_close(expected["model"][name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [2, 4] and all(line["flops_per_step"] > 0 for line in log)


def test_train_py_torchrun_equals_one_process_with_the_same_total_batch_lit(tmp_path, data_dir):
    # the teacher's reveal order (it matters from 3 thinking steps on) and, stochastic, the beliefs' noise are
    # drawn per example from its seed; the teacher runs on the whole batch (a --teacher-share below 1 is taken
    # from each rank's slice: README); a tight --grad-clip makes the clipping act, so averaging clipped
    # gradients would show
    run = ["--method", "lit", *TINY_FLAGS["lit"], "--stochastic", "--train-thinking-steps", "4", "--teacher-share", "1",
           "--grad-clip", "0.05", "--steps", "3", "--eval-size", "2", "--data-dir", data_dir]
    running = _torchrun(run + ["--out", str(tmp_path / "two")], wait=False)
    assert train.main(run + ["--out", str(tmp_path / "one")]) == 0  # beside it
    done = _finished(running)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = _torchrun(run + ["--out", str(tmp_path / "two")])  # rank 0's error reaches every rank: none hangs
    assert refused.returncode != 0 and refused.stderr.count("already holds a run") == 1
    two, one = _checkpoint(tmp_path / "two")["model"], _checkpoint(tmp_path / "one")["model"]
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# --- bad inputs, faults and budgets: one line or the right result, never a lost run or a hang
def _one_line_error(capsys, *parts):
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and all(part in error for part in parts), error
    return error


def test_the_check_before_training_runs_the_evaluation_steps_the_evaluation_runs_and_overwrite_waits_for_it(
        tmp_path, data_dir, monkeypatch, capsys):
    calls, real_evaluate = [], rd.evaluate
    monkeypatch.setattr(rd, "evaluate", lambda model, task, config, steps, dtype: calls.append(tuple(steps)) or
                        real_evaluate(model, task, config, steps, dtype))
    out = tmp_path / "run"
    run = TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--steps", "2", "--eval-size", "2"]
    assert train.main(run + ["--eval-steps", "1,3,2,3"]) == 0  # a count listed twice is evaluated once
    assert calls == [(1, 3, 2), (1, 3, 2)]  # the check, then the evaluation
    before = _files(out)

    def failing_in_the_check(model, task, config, steps, dtype):
        raise ValueError("no evaluation with these settings")
    monkeypatch.setattr(rd, "evaluate", failing_in_the_check)
    capsys.readouterr()
    assert train.main(run + ["--overwrite"]) == 2  # the check fails: the old run must still be there
    _one_line_error(capsys, "the evaluation fails with these settings: no evaluation with these settings")
    assert _files(out) == before


def test_lit_evaluates_a_thinking_step_count_listed_twice_after_training_and_with_eval_only(tmp_path, data_dir,
                                                                                             capsys):
    out = tmp_path / "run"
    run = ["--method", "lit", *TINY_FLAGS["lit"], "--steps", "1", "--eval-size", "2", "--data-dir", data_dir]
    assert train.main(run + ["--out", str(out), "--eval-steps", "1,1", "--ema-teacher", "0.5"]) == 0
    model = torch.load(out / "checkpoint.pt", weights_only=False)["model"]  # the EMA teacher's copy is not trained
    student = sum(v.numel() for k, v in model.items() if not k.startswith(("teacher.", "_orig_mod.teacher.")))
    assert student < sum(map(torch.numel, model.values()))
    assert f": {student:,} trained parameters," in capsys.readouterr().out
    assert train.main(["--method", "lit", "--eval-only", str(out / "checkpoint.pt"), "--eval-steps", "2,1,2"]) == 0
    for name, steps in (("results.json", [1]), ("eval.json", [2, 1])):
        record = json.loads((out / name).read_text())
        assert record["evaluated"]["eval_steps"] == steps
        rows = [(row["test set"], row["thinking steps"]) for row in record["rows"] if "restarts" not in row]
        assert len(rows) == len(set(rows)) and {s for _, s in rows if isinstance(s, int)} == set(steps)


def test_resume_refuses_changed_data_files_and_fewer_steps_than_trained(tmp_path, data_dir, puzzles, capsys):
    text, csv = tmp_path / "corpus.txt", tmp_path / "train.csv"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    sudoku_data.write_csv(csv, puzzles["easy"][0][:8], puzzles["easy"][1][:8])
    runs = {"text": TINY_RUN + ["--task", "text", "--context-length", "16", "--text-file", str(text)],
            "csv": TINY_RUN + ["--train-csv", str(csv), "--data-dir", data_dir]}
    for name, run in runs.items():
        assert train.main(run + ["--steps", "2", "--eval-size", "2", "--out", str(tmp_path / name)]) == 0
    checkpoint = str(tmp_path / "text" / "checkpoint.pt")
    before = _files(tmp_path / "text")
    capsys.readouterr()
    assert train.main(["--method", "recurrent_depth", "--resume", checkpoint, "--steps", "1"]) == 2
    _one_line_error(capsys, "--steps 1 is fewer than the 2 steps the checkpoint has trained")
    with open(text, "a") as file:
        file.write("more text")
    assert train.main(["--method", "recurrent_depth", "--resume", checkpoint, "--steps", "4"]) == 2
    _one_line_error(capsys, f"{text} changed since the run began")
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")  # the same size, other order
    assert train.main(["--method", "recurrent_depth", "--resume", str(tmp_path / "csv" / "checkpoint.pt"),
                       "--steps", "4"]) == 2
    _one_line_error(capsys, f"{csv} changed since the run began")
    assert _files(tmp_path / "text") == before


def test_budgets_that_cannot_finish_are_refused_before_they_start(tmp_path, data_dir, capsys):
    def too_long(signum, frame):
        raise TimeoutError("the refusal took more than a minute")
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    try:
        assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(tmp_path / "a"),
                                      "--base-size", "100000000"]) == 2
        _one_line_error(capsys, "--base-size 100,000,000: generating it needs about", "GiB are free")
        assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(tmp_path / "b"),
                                      "--eval-steps", "1,100000000"]) == 2
        _one_line_error(capsys, "--eval-steps 1,100000000: the evaluation would take about", "days")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_full_disk_inside_torch_save_is_one_line_too(tmp_path, data_dir, monkeypatch, capsys):
    def full_disk(path, state):  # torch's zip writer raises its own RuntimeError over the OSError
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(train, "save_checkpoint", full_disk)
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--steps", "2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: cannot save the checkpoint of step 2: No space left "
                                                        f"on device; nothing was saved")


def test_checkpoint_files_that_are_not_checkpoints_folders_and_unpicklable_objects_are_one_line(tmp_path, capsys):
    class Planted:
        def __reduce__(self):
            return open, (str(tmp_path / "planted"), "w")  # what unpickling would run
    import pickle
    (tmp_path / "hello.pt").write_text("hello")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"model": Planted()}))
    torch.save({"model": Planted()}, tmp_path / "zipped.pt")
    for name in ("hello.pt", "random.pt", "pickle.pt", "zipped.pt"):
        for use in ("--resume", "--eval-only", "--init-from"):
            assert train.main(["--method", "recurrent_depth", use, str(tmp_path / name),
                               "--out", str(tmp_path / "out")]) == 2
            error = _one_line_error(capsys, f"{tmp_path / name} is not a checkpoint train.py wrote")
            assert "weights_only" not in error and not (tmp_path / "planted").exists()
    folder = tmp_path / "run"
    folder.mkdir()
    assert train.main(["--method", "recurrent_depth", "--resume", str(folder)]) == 2
    _one_line_error(capsys, f"{folder} is a folder, not a checkpoint file")
    shutil.copy(tmp_path / "zipped.pt", folder / "checkpoint.pt")
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(folder)]) == 2
    _one_line_error(capsys, f"its checkpoint is {folder / 'checkpoint.pt'}")
    assert not (tmp_path / "out").exists()


def test_unclear_refusals_name_their_cause(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    documents = tmp_path / "two"
    documents.mkdir()
    for name in ("a.txt", "b.txt"):
        (documents / name).write_text(name[0] * 64_000)
    tiny = ["--data-dir", data_dir, "--eval-size", "2"]
    cases = [(["--task", "text", "--text-file", str(documents)], "has 2 documents: too few for a training, a "
              "validation and a test part"),
             (["--mnist-dir", str(tmp_path)], "--mnist-dir holds the digit images of --task visual; --task sudoku"),
             (["--method", "lit", "--restarts", "-1"], "--restarts must be >= 1, got -1"),
             (["--method", "lit", "--restarts", "0"], "restarts must be >= 1, got 0"),
             (["--method", "lit", "--eval-steps=-1"], "--eval-steps must list thinking steps >= 1, got -1"),
             (["--method", "lit", "--eval-steps", "0"], "--eval-steps must list thinking steps >= 1, got 0")]
    for extra, message in cases:
        argv = (["--method", "recurrent_depth"] if extra[0] != "--method" else []) + extra
        assert train.main(argv + tiny + (TINY_FLAGS["lit"][:6] if "lit" in argv else [])) == 2, extra
        _one_line_error(capsys, message)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["two"]


def test_benchmark_names_a_run_line_and_one_line_per_restart_pick(tmp_path):
    from scripts import benchmark
    rows = [{"test set": "easy", "thinking steps": 4, "exact %": 50.0},
            {"test set": "easy", "thinking steps": 4, "exact %": 60.0, "restarts": 8, "picked by": "confidence"},
            {"test set": "easy", "thinking steps": 4, "exact %": 70.0, "restarts": 8, "picked by": "oracle verifier"},
            {"test set": "easy", "thinking steps": "adaptive (kl)", "exact %": 99.0},
            {"test set": "hard", "thinking steps": True, "exact %": 1.0}]
    points = benchmark.benchmark_points({"lit recipe": {"rows": rows}})
    assert [(p["method"], p["exact %"]) for p in points] == [
        ("lit recipe", 50.0), ("lit recipe, 8 restarts picked by confidence", 60.0),
        ("lit recipe, 8 restarts picked by oracle verifier", 70.0)]
    assert [benchmark.COMPARED[i][0] for i in range(len(benchmark.COMPARED))] == [
        "recurrent_depth", "lit", "lit --no-imagination", "lit observation-space recursion",
        "lit recipe"]  # the folder names runs/compare/<row> derive from these


def test_benchmark_trains_every_sudoku_method_then_writes_one_table_and_plot(tmp_path, data_dir, capsys):
    import xml.etree.ElementTree as ElementTree
    from scripts import benchmark
    out = tmp_path / "compare"
    argv = ["--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--eval-steps", "1,2",
            "--eval-size", "4", "--base-size", "16", "--data-dir", data_dir, "--out", str(out),
            "--no-compile"]  # flags after a row's own win: the recipe's inductor build, tested apart, is most of it
    assert benchmark.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == [name for name, _, _ in benchmark.COMPARED]
    for name in results:  # every single-method run writes its own plot
        assert (out / name.replace(" --", "-").replace(" ", "-") / "curve.svg").exists()
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == "| test set | thinking steps | " + " | ".join(results) + " |"
    assert "| medium | 2 |" in table
    polylines = ElementTree.parse(out / "curve.svg").getroot().findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 5 * 3  # lit x4 and recurrent_depth, on 3 test sets
    svg = ElementTree.parse(out / "curve-flops.svg").getroot()  # the same lines against test-time compute
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 5 * 3 and "test-time MFLOP per puzzle (log scale)" in ElementTree.tostring(svg, "unicode")
    for line in lines:  # 2 thinking steps cost more than 1: every line runs left to right
        (x1, _), (x2, _) = [map(float, point.split(",")) for point in line.get("points").split()]
        assert x2 > x1
    cost_line = table.splitlines()[-1]
    assert cost_line.startswith("Test-time MFLOP per puzzle (thinking steps): ")
    assert all(f"{name}: " in cost_line for name in results)
    capsys.readouterr()
    (out / "lit" / "results.json").unlink()  # as if the benchmark had been stopped during lit's run
    assert benchmark.main(argv) == 0  # a second call reuses the finished runs and continues the unfinished one
    printed = capsys.readouterr().out
    assert printed.count("using the finished run") == len(results) - 1
    assert f"--method lit --resume {out / 'lit' / 'checkpoint.pt'}" in printed
    assert (out / "lit" / "results.json").exists()
    for bad, message in ((["--task", "visual"], "compares the Sudoku methods"), (["--resume", "x"], "one --method")):
        assert benchmark.main(argv + bad) == 2
        assert message in capsys.readouterr().err


def test_benchmark_table_keeps_restart_picks_apart_and_gives_each_line_its_cost():
    """A run evaluated with restarts: its single trajectory and its K-restart picks are separate lines at the same
    thinking steps, each with its own cost, never one overwriting the other."""
    def row(steps, exact, flops, **restarts):
        return {"test set": "easy", "thinking steps": steps, "exact %": exact, "test-time MFLOP per puzzle": flops,
                **restarts}
    rows = [row(1, 10.0, 2.0), row(8, 50.0, 9.0), row(1, 12.0, 8.0, restarts=4, **{"picked by": "confidence"}),
            row(8, 60.0, 36.0, restarts=4, **{"picked by": "confidence"}),
            row(8, 70.0, 36.0, restarts=4, **{"picked by": "oracle verifier"})]
    rows.append({**row("adaptive (kl)", 40.0, 5.0), "mean steps used": 4.2})  # not a point: no thinking-step count
    from scripts import benchmark
    results = {"rd": {"rows": rows, "config": {"difficulty": "easy", "steps": 5}, "cost": {}}}
    table = benchmark.compare_table(benchmark.benchmark_points(results), results).splitlines()
    assert table[0] == ("| test set | thinking steps | rd | rd, 4 restarts picked by confidence | rd, 4 restarts "
                        "picked by oracle verifier |")
    assert table[2:4] == ["| easy | 1 | 10.0 | 12.0 |  |", "| easy | 8 | 50.0 | 60.0 | 70.0 |"]
    assert table[-1] == ("Test-time MFLOP per puzzle (thinking steps): rd: 2 at 1, 9 at 8; rd, 4 restarts picked by "
                         "confidence: 8 at 1, 36 at 8; rd, 4 restarts picked by oracle verifier: 36 at 8, 36 at 8.")


def test_a_preset_never_overrides_the_checkpoint_and_the_command_line_overrides_both(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    run = TINY_RUN + ["--preset", "gpu", "--difficulty", "easy", "--batch-size", "2", "--steps", "2",
                      "--eval-size", "2", "--data-dir", data_dir, "--out", str(out)]
    assert train.main(run) == 0
    trained = _checkpoint(out)["config"]
    assert trained["d_model"] == 32 and trained["n_core"] == rd.GPU_CONFIG["n_core"] != rd.Config().n_core
    for extra in ([], ["--preset", "gpu"]):  # the preset named again, or taken from the checkpoint's settings
        assert train.main(["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt"),
                           "--eval-steps", "3", *extra]) == 0
        evaluated = json.loads((out / "eval.json").read_text())["config"]
        assert {k: v for k, v in evaluated.items() if k != "eval_steps"} == \
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in trained.items() if k != "eval_steps"}
        assert evaluated["eval_steps"] == [3]
    assert train.main(["--method", "recurrent_depth", "--resume", str(out / "checkpoint.pt"), "--steps", "3",
                       "--preset", "gpu"]) == 0
    resumed = _checkpoint(out)["config"]
    assert resumed == {**trained, "steps": 3}


def test_the_lock_refuses_a_lock_from_another_host_even_when_its_process_number_is_free_here(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / "lock").write_text(f"{ended.pid} another-host\n")  # that process number means nothing here
    with pytest.raises(train.UsageError, match=f"in use by another run \\(process {ended.pid} on another-host\\)"):
        with train.run_folder_lock(tmp_path):
            pass
    assert (tmp_path / "lock").read_text() == f"{ended.pid} another-host\n"
    (tmp_path / "lock").write_text(f"{ended.pid} {socket.gethostname()}\n")  # this host, ended: taken over
    with train.run_folder_lock(tmp_path):
        assert (tmp_path / "lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_clearing_a_run_folder_removes_the_run_files_and_leftovers_and_nothing_else(tmp_path):
    run_files = ["checkpoint.pt", "results.json", "eval.json", "curve.svg", "eval-curve.svg", "log.jsonl"]

    def fill():
        for name in run_files:
            (tmp_path / name).write_text('{"step": 2}\n{"step": 3}\n' if name == "log.jsonl" else name)
            (tmp_path / f"{name}.abc.tmp").write_text("half")
        (tmp_path / "notes.txt").write_text("mine")
    fill()
    train.clear_run_folder(tmp_path, False, 0)  # --overwrite, or a new run
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    fill()
    train.clear_run_folder(tmp_path, True, 2)  # resuming here at step 2
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*run_files, "notes.txt"])
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 2}\n'  # the line after the checkpoint goes


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_an_infinite_loss_stops_training_like_nan(bad, tmp_path, data_dir, monkeypatch, capsys):
    original_step = rd.train_step

    def diverging_at_step_2(model, optimizer, scaler, batch, step, *rest):
        metrics = original_step(model, optimizer, scaler, batch, step, *rest)
        return {**metrics, "loss": torch.tensor(bad) if step == 1 else metrics["loss"]}
    monkeypatch.setattr(rd, "train_step", diverging_at_step_2)
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--save-every", "1"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"error: the loss is {bad} at step 2") and "(step 1) is kept" in error
    assert _checkpoint(out)["step"] == 1


def test_gradients_are_averaged_over_ranks_after_each_backward_pass(monkeypatch):
    # two ranks simulated in one process: the all-reduce adds the other rank's flat vector (presence flags, then
    # gradients); every parameter must end with the mean, one the other rank alone reached with half its
    # gradient, one no rank reached with None, and a second backward pass adds the mean of its own gradients
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 1),
                                 "other_only": torch.nn.Linear(3, 1), "unused": torch.nn.Linear(1, 1)})

    def loss(x, other):
        out = model["b"](model["a"](x)).sum()
        return out + model["other_only"](x).sum() if other else out

    def gradients(x, other):
        model.zero_grad(set_to_none=True)
        loss(x, other).backward()
        return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}

    inputs = [torch.randn(4, 3) for _ in range(4)]  # (mine, the other rank's) for two passes
    mine = [gradients(inputs[0], False), gradients(inputs[2], False)]
    theirs = [gradients(inputs[1], True), gradients(inputs[3], True)]
    model.zero_grad(set_to_none=True)
    parameters = dict(model.named_parameters())
    passes, other_grads = iter(theirs), dict.fromkeys(parameters)

    def all_reduce(flat):  # the other rank's gradients so far plus this pass's, added in; then both hold the mean
        for name, grad in next(passes).items():
            if grad is not None:
                other_grads[name] = grad if other_grads[name] is None else other_grads[name] + grad
        present = [float(other_grads[name] is not None) for name in parameters]
        flat += torch.cat([torch.tensor(present), *(other_grads[name].flatten() if other_grads[name] is not None else
                                                    torch.zeros(p.numel()) for name, p in parameters.items())])
        sums = flat[len(parameters):].split([p.numel() for p in parameters.values()])
        for (name, p), total, somewhere in zip(parameters.items(), sums, flat[:len(parameters)].tolist()):
            other_grads[name] = (total / 2).view_as(p).clone() if somewhere else None
    monkeypatch.setattr(train.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    hooks = train.average_gradients_over_ranks(model)
    try:
        loss(inputs[0], False).backward()
        first = {name: None if p.grad is None else p.grad.clone() for name, p in parameters.items()}
        loss(inputs[2], False).backward()
    finally:
        for hook in hooks:
            hook.remove()
    for name, p in parameters.items():
        if name.startswith("unused"):
            assert first[name] is None and p.grad is None
            continue
        mean = [((m[name] if m[name] is not None else 0) + t[name]) / 2 for m, t in zip(mine, theirs)]
        torch.testing.assert_close(first[name], mean[0])
        torch.testing.assert_close(p.grad, mean[0] + mean[1])


def test_curve_svg_is_well_formed_with_one_polyline_per_line_and_panel(tmp_path):
    import xml.etree.ElementTree as ElementTree
    from scripts import plot_curves
    rows = [{"test set": test_set, "model": model, "thinking steps": steps, "exact %": 10.0 * steps}
            for test_set in ("easy", "hard") for model in ("a <b>", "c") for steps in (1, 2, 4)]
    rows.append({"test set": "easy", "model": "c", "thinking steps": "adaptive (kl)", "exact %": 99.0})
    plot_curves.write_curve(rows, tmp_path / "curve.svg", "title & more")
    root = ElementTree.parse(tmp_path / "curve.svg").getroot()
    polylines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 4  # 2 panels x 2 lines; the adaptive row is no point on a step axis
    assert all(len(line.get("points").split()) == 3 for line in polylines)
    assert {line.find("{http://www.w3.org/2000/svg}title").text for line in polylines} == {"a <b>", "c"}
    plot_curves.write_curve([{"test set": "x", "loss": 1.0}], tmp_path / "none.svg", "no step column")
    assert not (tmp_path / "none.svg").exists()


def test_plot_curves_draws_a_run_from_its_results_json_and_refuses_bad_files_in_one_line(tmp_path, data_dir, capsys):
    import xml.etree.ElementTree as ElementTree
    from scripts import plot_curves
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out), "--steps", "2", "--eval-size", "2"]) == 0
    assert not (out / "curve.svg").exists()  # train.py writes the table, not its plot
    evaluate = ["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt"), "--eval-steps", "1,4"]
    assert train.main(evaluate) == 0
    assert plot_curves.main([str(out)]) == 0 and plot_curves.main([str(out / "eval.json")]) == 0
    for name, steps in (("curve.svg", ["1", "2"]), ("eval-curve.svg", ["1", "4"])):
        root = ElementTree.parse(out / name).getroot()
        panels = [text.text for text in root.iter("{http://www.w3.org/2000/svg}text")][1:]
        assert root.find("{http://www.w3.org/2000/svg}text").text == "recurrent_depth on sudoku"
        assert [p for p in ("easy", "medium", "hard") if p in panels] == ["easy", "medium", "hard"]
        lines = root.findall("{http://www.w3.org/2000/svg}polyline")
        assert len(lines) == 3 and all(len(line.get("points").split()) == 2 for line in lines), name
        assert all(step in panels for step in steps) and "exact %" in panels
    both = tmp_path / "figures" / "both.svg"
    assert plot_curves.main([str(out), str(out / "eval.json"), "--out", str(both)]) == 0
    titles = {line.find("{http://www.w3.org/2000/svg}title").text
              for line in ElementTree.parse(both).getroot().findall("{http://www.w3.org/2000/svg}polyline")}
    assert titles == {str(out), str(out / "eval.json")}  # one line per run given, in each test set's panel
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "rowless.json").write_text('{"rows": 3}')
    (tmp_path / "empty").mkdir()
    for given, message in ((tmp_path / "missing.json", "missing.json not found"),
                           (tmp_path / "empty", "holds no results.json or eval.json"),
                           ("/proc/self/mem", "mem cannot be read: Input/output error"),
                           (tmp_path / "bad.json", "bad.json is not JSON"),
                           (tmp_path / "rowless.json", "rowless.json is not a results.json or eval.json")):
        assert plot_curves.main([str(given), "--out", str(tmp_path / "no.svg")]) == 2
        _one_line_error(capsys, message)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.json", "empty", "figures", "rowless.json", "run"]


# ============================================================================= recurrent_depth.py
TEXT = SimpleNamespace(name="text", vocab_size=13, seq_len=32)
TINY = dict(d_model=32, n_heads=2, d_mlp=64, mean_recurrence=4, backprop_depth=2)


@pytest.mark.parametrize("header", ["quizzes,solutions", "puzzle,solution", "question,answer",
                                    "source,question,answer,rating", None, "quizzes"])
def test_csv_reader_accepts_each_public_layout(tmp_path, puzzles, header):
    puzzle, solution = puzzles["easy"][0][:3], puzzles["easy"][1][:3]
    text = lambda grid, blank: "".join(str(v) if v else blank for v in grid)
    rows = {"source,question,answer,rating": [f"gen,{text(p, '.')},{text(s, '')},3" for p, s in zip(puzzle, solution)],
            "quizzes": [text(p, "0") for p in puzzle]}.get(
                header, [f"{text(p, '0')},{text(s, '')}" for p, s in zip(puzzle, solution)])
    path = tmp_path / "public.csv"
    path.write_text("\n".join(([header] if header else []) + rows) + "\n")
    read_puzzles, read_solutions = sudoku_data.read_csv(path)  # "quizzes" alone: solved by the project's solver
    assert (read_puzzles == puzzle).all() and (read_solutions == solution).all()


def test_csv_reader_rejects_malformed_rows_with_their_line(tmp_path, puzzles):
    puzzle, solution = "".join(map(str, puzzles["easy"][0][0])), "".join(map(str, puzzles["easy"][1][0]))
    blank = puzzle.index("0")
    wrong_given = puzzle[:blank] + solution[blank - 1 if blank else 1] + puzzle[blank + 1:]
    swapped = solution[1] + solution[0] + solution[2:]  # two columns now repeat a digit
    for rows, message in (([f"{wrong_given},{solution}"], "line 3: given"),
                          ([f"{'.' * 81},{swapped}"], "line 3: the solution breaks"),
                          ([puzzle[:80] + "x," + solution], "line 3: puzzle contains invalid characters")):
        path = tmp_path / "bad.csv"
        path.write_text("question,answer\n" + f"{puzzle},{solution}\n" + "\n".join(rows) + "\n")
        with pytest.raises(ValueError, match=message):
            sudoku_data.read_csv(path)
    path.write_text("quizzes\n" + "0" * 81 + "\n")
    with pytest.raises(ValueError, match="line 2: the puzzle has more than one solution"):
        sudoku_data.read_csv(path)


def test_train_csv_and_test_csv_train_and_evaluate_on_public_files(tmp_path, puzzles, capsys):
    sudoku_data.write_csv(tmp_path / "public_train.csv", puzzles["easy"][0][:8], puzzles["easy"][1][:8])
    sudoku_data.write_csv(tmp_path / "extreme.csv", puzzles["easy"][0][8:], puzzles["easy"][1][8:])
    run = TINY_RUN[:TINY_RUN.index("--eval-size")] + ["--out", str(tmp_path / "run"), "--base-size", "999",
                                                      "--steps", "2"]
    assert train.main(run + ["--train-csv", str(tmp_path / "public_train.csv"),
                             "--test-csv", str(tmp_path / "extreme.csv")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {row["test set"] for row in results["rows"]} == {"extreme"}
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(tmp_path / "run" / "checkpoint.pt"),
                       "--test-csv", f"{tmp_path / 'extreme.csv'},{tmp_path / 'public_train.csv'}"]) == 0
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert {row["test set"] for row in evaluated["rows"]} == {"extreme", "public_train"}
    capsys.readouterr()
    (tmp_path / "broken.csv").write_text("question,answer\n" + "1" * 81 + "," + "1" * 81 + "\n")
    assert train.main(run + ["--overwrite", "--test-csv", str(tmp_path / "broken.csv")]) == 2
    assert "broken.csv, line 2" in capsys.readouterr().err
    solution = "".join(map(str, puzzles["easy"][1][0]))
    (tmp_path / "open.csv").write_text(f"question,answer\n{'.' * 81},{solution}\n")  # consistent, but not unique
    assert train.main(run + ["--overwrite", "--test-csv", str(tmp_path / "open.csv"), "--check-unique"]) == 2
    assert "more than one solution, on line(s) 2" in capsys.readouterr().err


def test_eval_split_validation_through_train_py_labels_and_records_its_rows_and_refuses_test_files(tmp_path, data_dir,
                                                                                                   puzzles, capsys):
    tiny = ["--method", "lit", *TINY_FLAGS["lit"], "--steps", "2", "--data-dir", data_dir]
    assert train.main(tiny + ["--eval-split", "validation", "--out", str(tmp_path / "val")]) == 0
    assert "evaluation on the validation split" in capsys.readouterr().out
    results = json.loads((tmp_path / "val" / "results.json").read_text())
    names = ["validation easy", "validation medium", "validation hard"]
    assert results["run"]["eval_split"] == "validation" and results["evaluated"]["split"] == "validation"
    assert list(results["evaluated"]["test_sets"]) == names
    assert list(dict.fromkeys(row["test set"] for row in results["rows"])) == names
    # the checkpoint's evaluation keeps its split unless told; --eval-split test measures the test sets
    evaluate = ["--method", "lit", "--eval-only", str(tmp_path / "val" / "checkpoint.pt")]
    assert train.main(evaluate) == 0
    assert list(json.loads((tmp_path / "val" / "eval.json").read_text())["evaluated"]["test_sets"]) == names
    assert train.main(evaluate + ["--eval-split", "test"]) == 0
    evaluated = json.loads((tmp_path / "val" / "eval.json").read_text())
    assert evaluated["evaluated"]["split"] == "test"
    assert {row["test set"] for row in evaluated["rows"]} == {"easy", "medium", "hard"}
    public = tmp_path / "public.csv"
    sudoku_data.write_csv(public, puzzles["easy"][0], puzzles["easy"][1])
    assert train.main(evaluate + ["--test-csv", str(public), "--eval-size", "3"]) == 0  # test files: the test split
    evaluated = json.loads((tmp_path / "val" / "eval.json").read_text())
    assert evaluated["evaluated"]["split"] == "test" and evaluated["evaluated"]["test_sets"] == {"public": 3}
    capsys.readouterr()
    for refused, message in ((tiny + ["--eval-split", "validation", "--test-csv", str(public)],
                              "--test-csv files are test sets"),
                             (evaluate + ["--eval-split", "validation", "--test-csv", str(public)],
                              "--eval-split validation evaluates generated"),
                             (["--method", "recurrent_depth", "--task", "text", "--eval-split", "validation"],
                              "--task text has its own held-out parts")):
        assert train.main(refused + ["--out", str(tmp_path / "refused")]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "refused").exists()


def test_train_size_takes_the_first_rows_of_the_train_files_and_reads_no_further(tmp_path, puzzles):
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    sudoku_data.write_csv(first, puzzles["hard"][0][:5], puzzles["hard"][1][:5])
    sudoku_data.write_csv(second, puzzles["easy"][0][:7], puzzles["easy"][1][:7])
    with open(first, "a") as file:
        file.write("not,a puzzle\n")  # a broken row after the first 5: read only if the reader goes too far
    task = sudoku_data.SudokuTask("easy", eval_size=2, train_files=(first,), test_files=(second,), train_size=3)
    assert np.array_equal(task.base_puzzles, puzzles["hard"][0][:3])
    assert np.array_equal(task.base_solutions, puzzles["hard"][1][:3])
    batch = task.train_batch(0, 16)  # augmented on the fly: valid grids with the givens' counts of the 3, not copies
    assert (sudoku_data.broken_constraints(batch["solution"]) == 0).all()
    assert set((batch["puzzle"] > 0).sum(1).tolist()) <= set((task.base_puzzles > 0).sum(1).tolist())
    assert not any(np.array_equal(p, q) for p in batch["puzzle"].numpy() for q in task.base_puzzles)
    task = sudoku_data.SudokuTask("easy", eval_size=2, train_files=(second, first), test_files=(second,), train_size=9)
    assert np.array_equal(task.base_puzzles, np.concatenate([puzzles["easy"][0][:7], puzzles["hard"][0][:2]]))
    with pytest.raises(ValueError, match="line 7"):
        sudoku_data.SudokuTask("easy", eval_size=2, train_files=(first,), test_files=(second,), train_size=6)
    with pytest.raises(ValueError, match=r"train_size 13 is more puzzles than .*second.csv hold \(7\)"):
        sudoku_data.SudokuTask("easy", eval_size=2, train_files=(second,), test_files=(second,), train_size=13)


def test_train_size_through_train_py_is_recorded_refused_on_resume_and_bad_values_are_one_line(tmp_path, puzzles,
                                                                                               capsys):
    public = tmp_path / "public.csv"
    sudoku_data.write_csv(public, puzzles["medium"][0], puzzles["medium"][1])  # 12 puzzles
    run = TINY_RUN[:TINY_RUN.index("--base-size")] + ["--log-every", "2", "--out", str(tmp_path / "run"),
                                                       "--train-csv", str(public), "--test-csv", str(public)]
    assert train.main(run + ["--train-size", "4", "--steps", "2"]) == 0
    assert _checkpoint(tmp_path / "run")["run"]["train_size"] == 4
    assert json.loads((tmp_path / "run" / "results.json").read_text())["run"]["train_size"] == 4
    capsys.readouterr()
    resume = ["--method", "recurrent_depth", "--resume", str(tmp_path / "run" / "checkpoint.pt")]
    cases = [(resume + ["--train-size", "5"], "--train-size 5 differs from the checkpoint's 4"),
             (run + ["--overwrite", "--train-size", "0"], "--train-size must be a positive integer, got 0"),
             (run + ["--overwrite", "--train-size", "13"], "train_size 13 is more puzzles than"),
             (run + ["--overwrite", "--train-size", "13"], "hold (12)"),
             (TINY_RUN + ["--out", str(tmp_path / "other"), "--train-size", "4"],
              "--train-size 4 takes the first puzzles of --train-csv file(s)")]
    for argv, message in cases:
        assert train.main(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1, (argv, error)
    assert _checkpoint(tmp_path / "run")["step"] == 2 and not (tmp_path / "other").exists()


def test_ema_weights_differ_from_the_trained_ones_and_are_what_evaluation_uses(tmp_path, data_dir, monkeypatch, capsys):
    evaluated = []
    original_evaluate = rd.evaluate

    def recording_evaluate(model, *rest):
        evaluated.append({name: value.clone() for name, value in model.state_dict().items()})
        return original_evaluate(model, *rest)

    monkeypatch.setattr(rd, "evaluate", recording_evaluate)
    out = tmp_path / "run"
    small = ["--data-dir", data_dir, "--ema", "0.9", "--eval-steps", "1", "--eval-size", "2"]
    run = TINY_RUN + small + ["--out", str(out)]
    assert train.main(run) == 0
    saved = _checkpoint(out)
    average, trained = saved["ema"], saved["model"]
    assert int(average["updates"]) == 6
    names = [name for name in average if name != "updates"]
    assert all(not torch.equal(average[name], trained[name]) for name in names if name.endswith("weight"))
    results_weights = evaluated[-1]  # evaluated[0] is the check before training
    assert all(torch.equal(results_weights[name], average[name]) for name in names)
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt")]) == 0
    assert all(torch.equal(evaluated[-1][name], average[name]) for name in names)
    assert json.loads((out / "eval.json").read_text())["rows"] == json.loads((out / "results.json").read_text())["rows"]
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt"),
                       "--trained-weights"]) == 0
    assert all(torch.equal(evaluated[-1][name], trained[name]) for name in names)  # the raw weights, for comparison
    capsys.readouterr()
    assert train.main(run + ["--trained-weights"]) == 2
    assert "--trained-weights chooses the weights --eval-only evaluates" in capsys.readouterr().err
    # --resume continues the average exactly
    monkeypatch.setattr(rd, "train_step", interrupting_at_step_3(rd.train_step))
    interrupted = tmp_path / "interrupted"
    assert train.main(TINY_RUN + small + ["--out", str(interrupted)]) == 130
    monkeypatch.undo()
    assert train.main(["--method", "recurrent_depth", "--resume", str(interrupted / "checkpoint.pt")]) == 0
    assert all(torch.equal(_checkpoint(interrupted)["ema"][name], average[name]) for name in names)


def test_eval_sets_name_the_generated_test_sets_and_add_extreme_to_a_task_and_to_a_checkpoint(tmp_path, data_dir,
                                                                                             capsys, monkeypatch):
    monkeypatch.setattr(sudoku_data, "EXTREME_RATING", 4)  # a real extreme puzzle takes minutes to make
    data_dir = str(tmp_path / "data")  # these easier extreme puzzles stay out of the shared cache
    sizes = dict(seed=7, base_size=12, eval_size=2, data_dir=data_dir)
    task = sudoku_data.SudokuTask("easy", **sizes, eval_sets=("hard", "extreme"))
    assert list(task.test_sets) == ["hard", "extreme"]
    assert ((task.test_sets["extreme"]["puzzle"] > 0).sum(1) <= sudoku_data.DIFFICULTIES["extreme"][1]).all()
    default = sudoku_data.SudokuTask("easy", **sizes)
    assert list(default.test_sets) == ["easy", "medium", "hard"]
    for bad in (("hard", "impossible"), (), ("hard", "hard")):
        with pytest.raises(ValueError, match="eval sets must be distinct presets among easy, medium, hard, extreme"):
            sudoku_data.SudokuTask("easy", **sizes, eval_sets=bad)
    # train.py: a run evaluates the three default sets; --eval-sets evaluates its checkpoint on extreme too
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--steps", "2", "--seed", "7", "--data-dir", data_dir, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {row["test set"] for row in results["rows"]} == {"easy", "medium", "hard"}
    evaluate = ["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt"), "--eval-size", "2"]
    assert train.main(evaluate + ["--eval-sets", "easy,extreme"]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert list(evaluated["evaluated"]["test_sets"]) == ["easy", "extreme"]
    assert list(dict.fromkeys(row["test set"] for row in evaluated["rows"])) == ["easy", "extreme"]
    capsys.readouterr()
    for refused, message in ((evaluate + ["--eval-sets", "easy,impossible"], "eval sets must be distinct presets"),
                             (evaluate + ["--eval-sets", "extreme", "--test-csv", "x.csv"],
                              "--test-csv files replace them"),
                             (["--method", "recurrent_depth", "--task", "text", "--eval-sets", "extreme",
                               "--out", str(tmp_path / "refused")], "--task text has its own held-out parts")):
        assert train.main(refused) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1


def test_training_mixes_hold_equal_shares_of_their_presets(data_dir):
    task = sudoku_data.SudokuTask("mixed", base_size=7, eval_size=2, data_dir=data_dir)
    givens = (task.base_puzzles > 0).sum(1)
    ranges = [sudoku_data.DIFFICULTIES[name] for name in ("easy", "medium", "hard")]
    shares = [(givens >= low) & (givens <= high) for low, high in ranges]
    assert [int(share.sum()) for share in shares] == [3, 2, 2] and len(givens) == 7
    assert set(task.test_sets) == set(sudoku_data.EVAL_SETS)  # tested on each default preset, as always
    harder = (sudoku_data.SudokuTask("harder", base_size=5, eval_size=2, data_dir=data_dir).base_puzzles > 0).sum(1)
    assert [int(((harder >= low) & (harder <= high)).sum()) for low, high in ranges] == [0, 3, 2]
    with pytest.raises(ValueError, match="unknown difficulty 'impossible'; choose one of easy, medium, hard, extreme, "
                                         "mixed, harder"):
        sudoku_data.SudokuTask("impossible", data_dir=data_dir)


def test_benchmark_figures_script_reads_the_table_and_costs_each_row_by_its_flags(tmp_path):
    from scripts import benchmark_figures
    markdown = ("text\n\n| test set | thinking steps | recurrent_depth | lit observation-space recursion |\n"
                "|---|---:|---:|---:|\n"
                "| easy | 4 | 33.6 | 34.8 |\n| hard | 16 |  | 0.6 |\n\nafter")
    points = benchmark_figures.read_table(markdown)
    assert [(p["difficulty"], p["method"], p["thinking steps"], p["exact %"]) for p in points] == [
        ("easy", "recurrent_depth", 4, 33.6), ("easy", "lit observation-space recursion", 4, 34.8),
        ("hard", "lit observation-space recursion", 16, 0.6)]  # a blank cell is no point
    assert benchmark_figures.cost_per_puzzle("recurrent_depth", 4) == rd.test_time_flops(rd.Config(), 10, 4) / 1e6
    observation = lit.Config(recursion="observation", no_imagination=True)
    assert benchmark_figures.cost_per_puzzle("lit observation-space recursion", 4) == \
        lit.test_time_flops(observation, "sudoku", 4) / 1e6 > lit.test_time_flops(lit.Config(), "sudoku", 4) / 1e6
    with pytest.raises(ValueError, match="no table"):
        benchmark_figures.read_table("no table here")
    page = (Path(train.__file__).parent / "docs" / "benchmark.md").read_text()
    recipe = lit.Config(difficulty="mixed", segment_steps=2, no_imagination=True)  # the page's recipe column
    methods = {p["method"] for p in benchmark_figures.read_table(page)}
    assert methods >= {"recurrent_depth", "lit --no-imagination recipe"}
    assert benchmark_figures.cost_per_puzzle("lit --no-imagination recipe", 128) == \
        lit.test_time_flops(recipe, "sudoku", 128) / 1e6


def test_restart_curve_script_averages_each_point_over_the_seeds_files_and_draws_one_line_per_pick(tmp_path, capsys):
    from scripts import restart_curve
    mflop = restart_curve.FLOPS_COLUMN

    def rows(one, confidence, stopped):
        return {"rows": [
            {"test set": "hard", "thinking steps": 8, mflop: 10.0, "exact %": one},
            *({"test set": "hard", "thinking steps": 8, "restarts": 4, "picked by": pick, mflop: 40.0, "exact %": value}
              for pick, value in (("confidence", confidence), ("halting head", 99.0), ("oracle verifier", 90.0))),
            {"test set": "easy", "thinking steps": 8, "halt threshold": 0.9, "mean thinking steps used": 3.0,
             mflop: stopped, "exact %": 50.0}]}
    (tmp_path / "s0.json").write_text(json.dumps(rows(10.0, 30.0, 4.0)))
    (tmp_path / "s1.json").write_text(json.dumps(rows(20.0, 40.0, 6.0)))
    svg = tmp_path / "fig" / "curve.svg"  # its folder is made
    assert restart_curve.main([str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--out", str(svg)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2:6] == [  # easy before hard; the halting head's pick left out; sd of (10, 20) is 7.07
        "| easy | one trajectory, stopped by the head | 8 | 5 | 50.0 ± 0.0 | 2 |",
        "| hard | 4 restarts, confidence | 8 | 40 | 35.0 ± 7.1 | 2 |",
        "| hard | 4 restarts, oracle verifier | 8 | 40 | 90.0 ± 0.0 | 2 |",
        "| hard | one trajectory | 8 | 10 | 15.0 ± 7.1 | 2 |"]
    drawn = svg.read_text()
    assert drawn.count("<polyline") == 4 and "halting head" not in drawn and "4 restarts, confidence" in drawn
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json is not an eval.json"):
        restart_curve.main([str(tmp_path / "bad.json")])


def test_restart_anatomy_agrees_with_lit_evaluate_and_its_vote_takes_the_most_common_grid(tmp_path, data_dir, capsys):
    from scripts import restart_anatomy
    # the vote by hand: puzzle 0's trajectories 0 and 2 end on one grid (the more confident of them wins over the
    # lone, most confident trajectory 1); puzzle 1's three grids differ, so the most confident trajectory is taken
    grids = torch.tensor([[[1] * 81, [4] * 81], [[2] * 81, [5] * 81], [[1] * 81, [6] * 81]])  # (K 3, B 2, 81)
    confidence = torch.tensor([[-3.0, -2.0], [-1.0, -5.0], [-2.0, -4.0]])
    assert restart_anatomy.vote_pick(grids, confidence).tolist() == [2, 0]
    # one blank cell a puzzle: noisy trajectories of an untrained model fill it right or wrong, so each pick, the
    # oracle and the counts are non-trivial; they must equal what lit.evaluate reports for the same trajectories
    model, config = lit_make(halt_weight=0.5, restarts=3, restart_noise=0.5, eval_batch_size=9, eval_steps=(1, 3),
                             lr=2e-2, train_thinking_steps=2)
    optimizer, scaler = lit.make_optimizer(model, config), torch.amp.GradScaler("cpu", enabled=False)
    for step in range(30):  # enough to copy the givens and fill some of the blanks
        lit.train_step(model, optimizer, scaler, lit_tiny_sudoku(8, blanks=1, seed=step + 1), step, config, None)
    batch = lit_tiny_sudoku(40, blanks=1)
    task = type("Task", (), {"test_sets": {"one blank": batch}})
    reported = {(row["thinking steps"], row["picked by"]): row["exact %"]
                for row in lit.evaluate(model, task, config, (1, 3), None)}
    rows, solvers = restart_anatomy.anatomy(model.eval(), batch, 3, 0.5, (1, 3), chunk=6)  # other chunks than 9
    for row in rows:
        s = row["budget"]
        assert row["picked by confidence %"] == pytest.approx(reported[s, "confidence"])
        assert row["picked by halting head %"] == pytest.approx(reported[s, "halting head"])
        assert row["oracle %"] == pytest.approx(reported[s, "oracle verifier"])  # one completion per puzzle
        assert row["right at some step %"] >= row["trajectories right %"]
        assert row["puzzles no trajectory solves"] == round(40 * (1 - row["oracle %"] / 100))
    assert 0 < rows[-1]["trajectories right %"] < 100 and 0 < rows[-1]["oracle %"] < 100
    assert sum(solvers) == 40 and solvers[0] == rows[-1]["puzzles no trajectory solves"]
    assert sum(k * n for k, n in enumerate(solvers)) == round(120 * rows[-1]["trajectories right %"] / 100)
    # the command line reads a train.py checkpoint, its weight average first
    state = {"method": "lit", "run": {"task": "sudoku", "seed": 0}, "config": dataclasses.asdict(config),
             "model": model.state_dict(), "step": 0,
             "ema": {**{name: torch.zeros_like(w) for name, w in model.named_parameters()}, "updates": torch.tensor(1)}}
    torch.save(state, tmp_path / "checkpoint.pt")
    assert restart_anatomy.load_run(tmp_path / "checkpoint.pt")[0].decoder.weight.abs().sum() == 0
    restart_anatomy.main([str(tmp_path / "checkpoint.pt"), "--set", "easy", "--split", "test", "--size", "2",
                          "--restarts", "2", "--budgets", "2,1", "--data-dir", data_dir])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("easy: 2 puzzles, 2 trajectories") and len(lines) == 6
    assert [line.split(" | ")[0] for line in lines[3:5]] == ["| 1", "| 2"]
    with pytest.raises(SystemExit):
        restart_anatomy.main([str(tmp_path / "checkpoint.pt"), "--restarts", "1"])
    with pytest.raises(SystemExit):
        restart_anatomy.main([str(tmp_path / "checkpoint.pt"), "--budgets", "64,x"])
    assert "--budgets takes comma-separated step counts" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for bad, says in ((tmp_path / "absent.pt", "cannot read checkpoint"), (tmp_path / "notes.txt", "cannot read")):
        with pytest.raises(SystemExit, match=says) as stop:
            restart_anatomy.main([str(bad)])
        assert str(stop.value).startswith("error: ") and "\n" not in str(stop.value)
    torch.save({"method": "ltm"}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a train.py checkpoint of lit"):
        restart_anatomy.main([str(tmp_path / "other.pt")])


def tiny_model(task=TEXT, **overrides):
    torch.manual_seed(0)
    return rd.build_model(rd.Config(**{**TINY, **overrides}), task)


def unrolled(model, idx, num_steps, state=None):
    """The training forward: logits after n recurrences without a graph and k with one."""
    return rd.think(model, idx, sum(num_steps), no_grad_steps=num_steps[0], state=state).logits


def test_recurrent_depth_cached_generation_equals_uncached_forward():
    """Prefill + one token at a time through the KV cache gives the logits of the full forward."""
    model = tiny_model().eval()
    idx = torch.randint(0, TEXT.vocab_size, (3, 20))
    steps = 5
    with torch.no_grad():
        zero = torch.zeros(3, 20, model.config.d_model)
        full = unrolled(model, idx, (steps, 0), state=zero)  # (B, T, V)
        cache = rd.RecurrentKVCache(model, 3, 20, steps)
        parts = [rd.think(model, idx[:, :12], steps, init_scale=0.0, cache=cache).logits]
        for t in range(12, 20):
            parts.append(rd.think(model, idx[:, t : t + 1], steps, init_scale=0.0, cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    # generate() (greedy, fixed steps, no warm start) continues exactly as the uncached model would
    out, stats = rd.generate(model, idx[:, :8], 10, thinking_steps=steps, exit_criterion="none", continuous_cot=False,
                                     init_scale=0.0)
    logits = unrolled(model, out[:, :-1], (steps, 0), state=torch.zeros(3, 17, model.config.d_model))
    assert torch.equal(out[:, 8:], logits[:, 7:].argmax(-1)) and stats["mean steps"] == steps


def test_recurrent_depth_latest_m4_lookup_reads_latest_step_of_early_exited_tokens():
    model = tiny_model()
    cache = rd.RecurrentKVCache(model, 1, 4, thinking_steps=6)
    for step in range(6):  # mark the (k) cache entry of step s for every token with value s
        cache.core[0, step, 0] = step
    cache.steps_done[0] = torch.tensor([6, 2, 4, 6])  # token 1 exited after 2 steps, token 2 after 4; 3 is new
    cache.start, cache.end = 3, 4
    head_dim = model.config.d_model // model.config.n_heads
    new = torch.full((1, model.config.n_heads, 1, head_dim), 7.0)
    keys, _, _ = cache.layer(cache.core[0], 5)(new, new)  # a query at step 5
    assert keys[0, 0, :, 0].tolist() == [5.0, 1.0, 3.0, 7.0]  # slot min(5, steps_done - 1); the new key itself


def test_recurrent_depth_adaptive_generation_uses_fewer_steps_and_threshold_zero_matches_fixed():
    model = tiny_model().eval()
    prompt = torch.randint(0, TEXT.vocab_size, (2, 6))
    torch.manual_seed(1)
    fixed, fixed_steps = rd.generate(model, prompt, 10, thinking_steps=6, exit_criterion="none", continuous_cot=True)
    model.config.kl_threshold = 0.0  # never exits: the adaptive path must reproduce the fixed one
    torch.manual_seed(1)
    never, never_steps = rd.generate(model, prompt, 10, thinking_steps=6, exit_criterion="kl", continuous_cot=True)
    assert torch.equal(fixed, never) and fixed_steps["mean steps"] == never_steps["mean steps"] == 6
    model.config.kl_threshold = 1e9  # exits after the first step whose KL is measured
    _, early_steps = rd.generate(model, prompt, 10, thinking_steps=6, exit_criterion="kl")
    model.config.latent_threshold = 1e9
    _, latent_steps = rd.generate(model, prompt, 10, thinking_steps=6, exit_criterion="latent-diff")
    assert early_steps["mean steps"] == latent_steps["mean steps"] == 1.0


def test_recurrent_depth_batched_generation_reports_the_recurrences_the_batch_ran():
    """Exited rows wait frozen for the batch's slowest row: "batch steps" is the core passes actually run per
    token (counted by a hook), "mean steps" the rows' own exit steps, smaller when rows exit at different steps."""
    model = tiny_model().eval()
    model.config.latent_threshold = 0.3  # exits after 1 to 8 steps on this model
    passes = []
    model.core[0].register_forward_hook(lambda *unused: passes.append(1))
    prompt = torch.randint(0, TEXT.vocab_size, (4, 6))
    rd.generate(model, prompt, 1, thinking_steps=8, exit_criterion="latent-diff")  # the prefill alone
    prefill = len(passes)
    _, stats = rd.generate(model, prompt, 11, thinking_steps=8, exit_criterion="latent-diff")
    assert stats["batch steps"] == pytest.approx((len(passes) - 2 * prefill) / 10)  # 10 tokens after the prefill
    assert 1 <= stats["mean steps"] < stats["batch steps"] <= 8


def test_recurrent_depth_per_token_exit_in_a_batch_equals_each_row_alone():
    """Rows that exit early stay frozen and keep their cached steps: a batch decodes as its rows one by one."""
    model = tiny_model().eval()
    model.config.latent_threshold = 0.3  # exits after 1 to 8 steps on this model
    tokens = torch.randint(0, TEXT.vocab_size, (4, 16))

    @torch.no_grad()
    def decode(rows):  # prefill 6 tokens, then feed the next 10 one at a time with per-token exit
        cache = rd.RecurrentKVCache(model, rows.shape[0], 16, 8)
        outputs, steps = [rd.think(model, rows[:, :6], 8, init_scale=0.0, cache=cache).logits], []
        for t in range(6, 16):
            rule = rd.ExitRule.from_config(model.config, "latent-diff")
            thought = rd.think(model, rows[:, t : t + 1], 8, [rule], init_scale=0.0, cache=cache)
            outputs.append(thought.logits)
            steps.append(thought.steps_used)
        return torch.cat(outputs, 1), torch.stack(steps, 1)  # (B, 16, V), (B, 10)

    batch, steps = decode(tokens)
    assert (steps != steps[:1]).any(dim=0).sum() >= 3  # in at least 3 tokens the rows exit at different steps
    for i in range(4):
        logits, row_steps = decode(tokens[i : i + 1])
        assert torch.equal(row_steps[0], steps[i])
        torch.testing.assert_close(logits, batch[i : i + 1], atol=1e-5, rtol=1e-5)


def test_recurrent_depth_generation_prefills_without_exit_and_warm_starts_each_token(monkeypatch):
    model = tiny_model().eval()
    model.config.kl_threshold = 1e9  # every generated token exits at its first KL check
    calls, think = [], rd.think

    def spy(*args, **kwargs):
        thought = think(*args, **kwargs)
        calls.append((kwargs.get("state"), thought.state, thought.steps_used))
        return thought

    monkeypatch.setattr(rd, "think", spy)
    rd.generate(model, torch.randint(0, TEXT.vocab_size, (2, 6)), 5, thinking_steps=6, exit_criterion="kl",
                continuous_cot=True)
    assert calls[0][0] is None and calls[0][2].tolist() == [6, 6]  # the prompt: fresh s_0, all 6 steps, no exit
    assert all(used.tolist() == [1, 1] for _, _, used in calls[1:])
    for (_, previous, _), (state, _, _) in zip(calls, calls[1:]):  # continuous CoT: s_0 of a token = last s_r
        assert torch.equal(state, previous[:, -1:])
    calls.clear()
    rd.generate(model, torch.randint(0, TEXT.vocab_size, (2, 6)), 5, thinking_steps=6, exit_criterion="kl",
                continuous_cot=False)
    assert all(state is None for state, _, _ in calls)


def test_recurrent_depth_self_speculative_decoding_equals_greedy_decoding():
    model = tiny_model().eval()
    prompt = torch.randint(0, TEXT.vocab_size, (2, 5))
    greedy, _ = rd.generate(model, prompt, 11, thinking_steps=6, exit_criterion="none", continuous_cot=False,
                            init_scale=0.0)
    rates = []
    for draft_steps, lookahead in ((1, 3), (2, 4), (6, 5)):
        out, stats = rd.generate_speculative(model, prompt, 11, draft_steps=draft_steps, verify_steps=6,
                                             lookahead=lookahead)
        assert torch.equal(out, greedy), (draft_steps, lookahead)
        rates.append(stats["accepted"])
    assert rates[-1] == 1.0 and rates[0] < 1.0  # drafting with all 6 steps agrees always; with 1 step it is rejected
    # all drafts accepted: 10 tokens after the prefill in rounds of 5, 5 -> (10 * 6 + 2 * 6) / 10 steps per token
    assert stats["sequential steps"] == pytest.approx((10 * 6 + 2 * 6) / 10)
    one_row, _ = rd.generate_speculative(model, prompt[:1], 11, draft_steps=1, verify_steps=6, lookahead=3)
    assert torch.equal(one_row, greedy[:1])
    with pytest.raises(ValueError, match="draft_steps"):
        rd.generate_speculative(model, prompt, 4, draft_steps=7, verify_steps=6)


def test_recurrent_depth_latent_trajectory_holds_every_state_and_plots_as_svg():
    import xml.etree.ElementTree as ElementTree

    model = tiny_model(task=SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81)).eval()
    idx = torch.randint(0, 10, (2, 81))
    s0 = model.init_state(torch.zeros(2, 81, model.config.d_model))
    from scripts.recurrent_depth_trajectories import latent_trajectory, trajectory_svg
    trajectory = latent_trajectory(model, idx, 5, s0)  # (r + 1, B, T, D)
    assert trajectory.shape == (6, 2, 81, model.config.d_model) and torch.equal(trajectory[0], s0)
    with torch.no_grad():
        for r in (1, 5):  # s_r decodes to the logits of r recurrences from the same s_0
            torch.testing.assert_close(model.readout(trajectory[r], model.rope(0, 81)),
                                       unrolled(model, idx, (r, 0), s0))
    paths = trajectory[:, :, :3].permute(1, 2, 0, 3)  # (2 starts, 3 cells, 6 steps, D)
    root = ElementTree.fromstring(trajectory_svg(paths, ["a", "b", "c"], "test"))
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 6 and all(len(line.get("points").split()) == 6 for line in lines)  # one per start and cell
    assert [("stroke-dasharray" in line.attrib) for line in lines] == [False, True] * 3  # the second start dashed
    # colour per cell
    assert [line.get("stroke") for line in lines[::2]] == [line.get("stroke") for line in lines[1::2]]
    # points on a line through the data: PC 1 carries all variance, PC 2 none
    line = torch.linspace(0, 1, 6)[None, None, :, None] * torch.randn(1, 1, 1, 8)
    assert "PC 1 / 2: 100 / 0 % of variance" in trajectory_svg(line, ["x"], "line")


def test_recurrent_depth_grid_embedding_groups_and_weight_decay_groups():
    model = tiny_model(task=SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81))
    row, col, box = model.grid_ids.unbind(-1)  # (81,) each: the row, column and 3x3-box entry of every cell
    grid = torch.arange(81).view(9, 9)
    assert torch.equal(row.view(9, 9), grid // 9) and torch.equal(col.view(9, 9), 9 + grid % 9)
    boxes = box.view(3, 3, 3, 3).permute(0, 2, 1, 3).reshape(9, 9)  # the cells of box b in row b of this view
    assert all(len(set(cells.tolist())) == 1 for cells in boxes) and sorted(boxes[:, 0].tolist()) == list(range(18, 27))
    decay, no_decay = rd.make_optimizer(model, model.config).param_groups
    assert decay["weight_decay"] == model.config.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])  # norms
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters())) and no_decay["params"]


def saved_bytes(model, idx, num_steps):
    """Bytes of tensors autograd saves for backward during one forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unrolled(model, idx, num_steps).sum()
    return total[0]


def test_recurrent_depth_memory_is_flat_in_no_grad_recurrences():
    model = tiny_model(task=SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81)).train()
    idx = torch.randint(0, 10, (2, 81))
    base = saved_bytes(model, idx, (0, 2))
    assert saved_bytes(model, idx, (20, 2)) == base  # the no-grad prefix saves nothing
    assert saved_bytes(model, idx, (0, 4)) > 1.5 * base  # ... while steps with gradient do


def test_recurrent_depth_gradient_reaches_only_the_last_k_steps():
    model = tiny_model().train()
    idx = torch.randint(0, TEXT.vocab_size, (2, 16))
    s0 = model.init_state(model.embed(idx, model.rope(0, 16))).detach().requires_grad_(True)
    unrolled(model, idx, (0, 3), s0).sum().backward()
    assert s0.grad is not None and s0.grad.abs().sum() > 0  # without a prefix the initial state gets gradient
    s0.grad = None
    model.zero_grad()
    unrolled(model, idx, (2, 1), s0).sum().backward()
    assert s0.grad is None  # the no-grad prefix cuts the graph
    truncated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.no_grad():  # the same computation by hand: prefix without a graph, then one step with one
        rope = model.rope(0, 16)
        e = model.embed(idx, rope)
        s = model(model(s0, e, rope), e, rope)
    e = model.embed(idx, rope)
    model.readout(model(s, e, rope), rope).sum().backward()
    for a, p in zip(truncated, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    model.zero_grad()
    unrolled(model, idx, (0, 3), s0).sum().backward()  # full backprop through all 3 steps differs
    assert any(not torch.allclose(a, p.grad) for a, p in zip(truncated, model.parameters()))


def test_recurrent_depth_recurrence_sampler_mean_spread_and_split():
    config = rd.Config(mean_recurrence=8, backprop_depth=4)
    draws = [rd.sample_recurrence(step, config) for step in range(4000)]
    totals = torch.tensor([n + k for n, k in draws], dtype=torch.float)
    # p = Poisson(rate) + 1 with E[rate] = r_mean; sd of p ~ 5.1 -> standard error of the mean ~ 0.08
    assert abs(totals.mean().item() - (config.mean_recurrence + 1)) < 0.4 and rd.mean_depth(config) == 9
    # Var p = E[rate] + Var rate = r + r^2 (exp(sigma^2) - 1): sd 5.12 with sigma 0.5 (3.48 with 0.25, 6.1 with 0.6)
    assert 4.6 < totals.std().item() < 5.7
    assert all(k == min(4, n + k) and n == max(n + k - 4, 0) for n, k in draws)
    assert rd.sample_recurrence(17, config) == rd.sample_recurrence(17, config)  # a function of the step
    # r_mean < k: the reference's mu = log(max(r - k, 0) + k) - sigma^2/2 makes E[rate] = k, not r_mean
    short = rd.Config(mean_recurrence=2, backprop_depth=4)
    totals = torch.tensor([sum(rd.sample_recurrence(step, short)) for step in range(4000)], dtype=torch.float)
    assert abs(totals.mean().item() - (4 + 1)) < 0.3 and rd.mean_depth(short) == 5


SUDOKU_SHAPE = SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81)


def core_passes_per_step(config, steps):
    """Recurrences each train_step runs, counted by a hook on the first core block."""
    torch.manual_seed(0)
    model = rd.build_model(config, SUDOKU_SHAPE)
    optimizer = rd.make_optimizer(model, config)
    passes = []
    model.core[0].register_forward_hook(lambda *unused: passes.append(1))
    batch = {"puzzle": torch.randint(0, 10, (2, 81)), "solution": torch.randint(1, 10, (2, 81))}
    counts, reported = [], []
    for step in range(steps):
        before = len(passes)
        metrics = rd.train_step(model, optimizer, torch.amp.GradScaler(enabled=False), batch, step, config, None)
        counts.append(len(passes) - before)
        reported.append(int(metrics["recurrence"]))
    return counts, reported


def test_recurrent_depth_fixed_depth_control_draws_the_same_recurrence_count_every_step():
    counts, reported = core_passes_per_step(rd.Config(**TINY, fixed_recurrence=True), 8)
    assert counts == reported == [TINY["mean_recurrence"] + 1] * 8  # the sampler's mean r_mean + 1 every step
    fixed = rd.Config(**TINY, fixed_recurrence=True)
    assert {rd.sample_recurrence(step, fixed) for step in range(100)} == {(3, 2)}  # n = r - k without, k with grad
    counts, reported = core_passes_per_step(rd.Config(**TINY), 8)  # the default samples: the counts vary
    assert counts == reported and len(set(counts)) > 2


def test_recurrent_depth_plain_transformer_control_has_distinct_layers_and_one_point():
    config = rd.Config(**TINY, plain_transformer=True)  # 1 + 2 * (4 + 1) + 1 = 12 layers: the sampler's mean depth
    torch.manual_seed(0)
    model = rd.build_model(config, SUDOKU_SHAPE)
    assert len(model.layers) == 12 and not hasattr(model, "core") and not hasattr(model, "adapter")
    block = sum(p.numel() for p in model.layers[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == 12 * block + (10 + 27 + 1) * config.d_model  # wte, grid, ln_f
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))  # no tying
    idx = torch.randint(0, 10, (2, 81))
    batch = {"puzzle": idx, "solution": torch.randint(1, 10, (2, 81))}
    loss, _ = rd.recurrent_loss(model, batch, (3, 2))
    loss.backward()
    grads = [layer.attn.qkv.weight.grad for layer in model.layers]
    assert all(g.abs().sum() > 0 for g in grads) and not any(torch.equal(grads[0], g) for g in grads[1:])
    with torch.no_grad():  # recurrences do not apply: the same loss whatever count is asked
        torch.testing.assert_close(rd.recurrent_loss(model, batch, (0, 1))[0],
                                   rd.recurrent_loss(model, batch, (30, 4))[0])
    task = SimpleNamespace(**vars(SUDOKU_SHAPE),
                           test_sets={"a": {"puzzle": idx, "solution": torch.randint(1, 10, (2, 81))},
                                      "b": {"puzzle": idx, "solution": torch.randint(1, 10, (2, 81))}})
    rows = rd.evaluate(model, task, config, (1, 2, 8, 16), None)
    assert [(r["test set"], r["thinking steps"]) for r in rows] == [("a", 5), ("b", 5)]  # one point, at its depth
    with pytest.raises(ValueError, match="Sudoku task only"):
        rd.build_model(config, TEXT)


def test_recurrent_depth_controls_script_sums_the_metered_flops_of_the_steps_it_draws(capsys):
    """The equal-FLOPs budget of the controls: the default's total equals the FLOPs train.py's meter counts around
    each real train_step (the sampler's own draws), summed; the fixed control's per-step FLOPs equal its meter."""
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.recurrent_depth_controls import equal_flops

    flags = ["--batch-size", "1", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32", "--mean-recurrence", "3"]
    equal_flops(3, flags)
    out = capsys.readouterr().out
    total = float(re.search(r"mean recurrence drawn [0-9.]+, ([0-9.e+]+) training FLOPs", out).group(1))
    fixed_step = float(re.search(r"fixed recurrence \d+: ([0-9.e+]+) FLOPs per step", out).group(1))
    config = rd.Config(batch_size=1, d_model=16, n_heads=2, d_mlp=32, mean_recurrence=3)
    task = SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81)

    def metered(config, step):
        torch.manual_seed(0)
        model = rd.build_model(config, task)
        optimizer = rd.make_optimizer(model, config)
        batch = {"puzzle": torch.randint(0, 10, (1, 81)), "solution": torch.randint(1, 10, (1, 81))}
        with FlopCounterMode(display=False, custom_mapping=train.ATTENTION_FLOPS) as counter:
            rd.train_step(model, optimizer, torch.amp.GradScaler(enabled=False), batch, step, config, None)
        return counter.get_total_flops()

    assert total == pytest.approx(sum(metered(config, step) for step in range(3)), rel=1e-3)  # printed to 4 digits
    fixed = dataclasses.replace(config, fixed_recurrence=True)
    assert fixed_step == pytest.approx(metered(fixed, 5), rel=1e-3)


def test_recurrent_depth_initial_state_is_the_truncated_normal_of_std_sqrt_2_over_5():
    model = tiny_model()
    s0 = model.init_state(torch.zeros(8, 500, 64), generator=torch.Generator().manual_seed(0))  # 256,000 draws
    sigma = math.sqrt(2 / 5)
    # a normal cut at +-3 sigma has std 0.9866 sigma (0.624 here; 2/5 instead of sqrt(2/5) would give 0.395)
    assert abs(s0.std().item() - 0.9866 * sigma) < 0.005
    assert s0.abs().max().item() <= 3 * sigma and s0.abs().max().item() > 2.9 * sigma
    assert abs(s0.mean().item()) < 0.005
    assert torch.equal(model.init_state(torch.zeros(2, 3, 64), scale=0.0), torch.zeros(2, 3, 64))


def test_recurrent_depth_takase_init_scales_output_projections_by_effective_depth():
    model = tiny_model(d_model=128, d_mlp=256, n_prelude=2, n_core=2, n_coda=2, mean_recurrence=8)
    std = 0.9866 * math.sqrt(2 / (5 * 128))  # std of the +-3 sigma truncated normal, sqrt(2/(5h)) before the cut
    l_eff = 2 + 2 + 2 * 8
    for name, p in model.named_parameters():
        if p.dim() == 2:
            expected = std / math.sqrt(2 * l_eff) if name.endswith("proj.weight") else std
            assert abs(p.std().item() / expected - 1) < 0.05, name
        else:
            assert torch.equal(p, torch.ones_like(p)) or torch.equal(p, torch.zeros_like(p)), name  # norms, q/k bias


def first_exits(criterion, threshold, log_ps=None, states=None, min_steps=0):
    """The recurrence at which ExitRule stops each row of a hand-made sequence (None: never): log_ps (R, B, T, V)
    are log p_1 .. log p_R, states (R + 1, B, T, D) are s_0 .. s_R."""
    R, B, T = (log_ps.shape[:3] if log_ps is not None else (states.shape[0] - 1, *states.shape[1:3]))
    rule = rd.ExitRule(criterion, threshold, min_steps)
    rule.start(torch.zeros(B, T, 2) if states is None else states[0], budget=R + 1)
    for i in range(R):
        rule.update(i + 1, None if states is None else states[i + 1], None if log_ps is None else log_ps[i])
    return [None if used == R + 1 else used for used in rule.steps_used.tolist()]


def test_recurrent_depth_exit_rules_stop_where_they_should_on_hand_made_sequences():
    # kl: KL(p_{i-1} || p_i) from a uniform p_0, the largest over positions (position 1 stays uniform: KL 0)
    log_p1 = torch.log_softmax(torch.tensor([[[3.0, 0.0, -1.0], [0.0, 0.0, 0.0]]]), -1)  # (B=1, T=2, V=3)
    log_p2 = torch.log_softmax(torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]), -1)
    p1 = log_p1.exp()[0, 0]
    kl_1_2 = (p1 * (log_p1[0, 0] - log_p2[0, 0])).sum().item()  # 1.24; KL(p_2 || p_1) = 1.67, KL(p_0 || p_1) = 1.30
    sequence = torch.stack([log_p1, log_p2])
    assert first_exits("kl", 1.01 * kl_1_2, sequence) == [2] and first_exits("kl", 0.99 * kl_1_2, sequence) == [None]
    assert first_exits("kl", 1.01 * kl_1_2, sequence, min_steps=3) == [None]
    # min_steps as the reference: neither a check nor a state update before it, an exit allowed right after; so with
    # min_steps 1 the first check compares p_2 with the uniform p_0, not with p_1
    p0 = torch.full((3,), 1 / 3)
    kl_0_2 = (p0 * (p0.log() - log_p2[0, 0])).sum().item()  # 0.12, far from KL(p_1 || p_2) = 1.24
    assert first_exits("kl", 1.01 * kl_0_2, sequence, min_steps=1) == [2]
    assert first_exits("kl", 0.99 * kl_0_2, sequence, min_steps=1) == [None]
    # latent-diff: ||s_i - s_{i-1}|| / ||s_i||, the largest over positions: 1 at step 1 (from 0), 1/sqrt(5) at step 2
    states = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 0.0], [1.0, 1.0]]], [[[1.0, 0.0], [2.0, 1.0]]]])
    assert (first_exits("latent-diff", 0.45, states=states) == [2]
            and first_exits("latent-diff", 0.44, states=states) == [None])
    # entropy-diff: p = (a, (1-a)/2, (1-a)/2) with a = .4, .6, .8, .9, .9, .9 beside a uniform position; H_0 = 100
    shares = torch.tensor([0.4, 0.6, 0.8, 0.9, 0.9, 0.9])
    changing = torch.stack([shares, (1 - shares) / 2, (1 - shares) / 2], -1)  # (6, 3)
    sequence = torch.stack([changing, torch.full((6, 3), 1 / 3)], 1).log()[:, None]  # (R=6, B=1, T=2, V=3)
    assert first_exits("entropy-diff", 1e-3, sequence) == [5]  # |H(.9) - H(.8)| = 0.26 at step 4, 0 at step 5
    assert first_exits("entropy-diff", 1e-3, sequence, min_steps=4) == [6]  # H_4 never recorded: step 5 meets H_0
    constant = torch.full((3, 1, 1, 3), 1 / 3).log()
    assert first_exits("entropy-diff", 1e-3, constant) == [2]  # H_0 = 100: never at step 1
    # argmax-stability: row 0 answers [0,1] [2,1] [2,1] [2,1] [2,1] ...; row 1 [0,0] x3 then [0,2] from step 4
    answers = torch.tensor([[[0, 1], [0, 0]], [[2, 1], [0, 0]], [[2, 1], [0, 0]], [[2, 1], [0, 2]]]
                           + [[[2, 1], [0, 2]]] * 4)  # (R=8, B=2, T=2)
    sequence = torch.log_softmax(5.0 * torch.nn.functional.one_hot(answers, 3) + 0.1 * torch.randn(8, 2, 2, 3), -1)
    assert first_exits("argmax-stability", 3, sequence) == [5, 7]  # unchanged 3 times: steps 3-5; 5-7
    assert first_exits("argmax-stability", 1, sequence) == [3, 2]
    assert first_exits("argmax-stability", 3, sequence, min_steps=2) == [6, 7]  # counted from step 3: 3-6; 4-7
    assert first_exits("none", 0, sequence) == [None, None]


def test_recurrent_depth_evaluate_adaptive_rows_equal_think_stopping_each_puzzle(trained_sudoku):
    """Every adaptive row of the table is what think() gives when it stops each puzzle by that rule alone (a
    stopped puzzle is frozen): the same answers and the same recurrences used, from the same s_0."""
    model, task, config, _ = trained_sudoku
    config = dataclasses.replace(config, latent_threshold=0.1)  # so that latent-diff exits within 16 steps here
    rows = {r["thinking steps"]: r for r in rd.evaluate(model, task, config, (1, 16), None)}
    data = task.test_sets["train"]
    names = {name for name in rows if isinstance(name, str)}
    assert names == {"adaptive (kl)", "adaptive (latent-diff)", "adaptive (entropy-diff)",
                     "adaptive (argmax-stability)", "adaptive (kl, min_steps 4)"}
    model.eval()
    for name, criterion, min_steps in rd.adaptive_rows(config):
        rule = rd.ExitRule.from_config(config, criterion, min_steps)
        thought = rd.think(model, data["puzzle"], 16, [rule], generator=torch.Generator().manual_seed(0))
        answer, used = thought.logits[..., 1:].argmax(-1) + 1, thought.steps_used
        assert rows[name]["mean steps used"] == round(used.float().mean().item(), 2), name
        assert rows[name]["exact %"] == sudoku_data.exact_accuracy(answer, data["solution"]), name
        assert (used >= min_steps).all()
    assert 1 < rows["adaptive (kl)"]["mean steps used"] < 16  # the rules do stop puzzles at different steps here
    assert len({rows[name]["mean steps used"] for name in names}) >= 3


def official_layout(model):
    """The state dict of a halves-RoPE model in the official naming and layout (recpre/raven_modeling_minimal.py):
    transformer.* names, core_block, norm_1..4, Wqkv, qk_bias (2, 1, H, hd), interleaved RoPE pairs (2j, 2j+1)
    = our dims (j, j + hd/2), tied lm_head.weight and the freqs_cis buffer."""
    heads, width = model.config.n_heads, model.config.d_model
    head_dim = width // heads
    interleaved = torch.arange(head_dim).view(2, head_dim // 2).t().flatten()  # official dim 2j <- j, 2j+1 <- j + hd/2
    official = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("attn.qkv.weight"):
            rows = tensor.view(3, heads, head_dim, width).clone()
            rows[:2] = rows[:2, :, interleaved]
            tensor = rows.view(3 * width, width)
        if name.endswith("attn.qk_bias"):
            tensor = tensor[..., interleaved].transpose(1, 2)  # (2, H, 1, hd) -> (2, 1, H, hd)
        name = ("core_block." + name[5:] if name.startswith("core.") else name).replace(".qkv.", ".Wqkv.")
        for i in range(1, 5):
            name = name.replace(f".n{i}.", f".norm_{i}.")
        official["transformer." + name] = tensor.contiguous()
    official["lm_head.weight"] = official["transformer.wte.weight"]
    official["freqs_cis"] = torch.zeros(1, model.max_len, 1, head_dim // 2, 2)
    return official


def reference_logits(official, idx, n_heads, steps, rope_base=50000.0):
    """The official forward pass written out from the equations with the official state dict and interleaved RoPE:
    e = P(sqrt(h) wte(x)); s_i = R(adapter([s_{i-1}, e])) from s_0 = 0; logits = lm_head(ln_f(C(ln_f(s_r))))."""
    B, T = idx.shape
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu
    width = official["transformer.wte.weight"].shape[1]
    head_dim = width // n_heads
    angles = torch.outer(torch.arange(T).float(), rope_base ** (-torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, hd/2)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(x):  # (B, T, H, hd), pairs (2j, 2j+1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)

    def block(x, p):
        q, k, v = linear(norm(x, official[p + "norm_1.weight"]), official[p + "attn.Wqkv.weight"]).split(width, -1)
        q_bias, k_bias = official[p + "attn.qk_bias"]  # 2 x (1, H, hd)
        q, k = rope(q.view(B, T, n_heads, head_dim) + q_bias), rope(k.view(B, T, n_heads, head_dim) + k_bias)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.view(B, T, n_heads, head_dim)).reshape(B, T, width)
        x = norm(x + linear(y, official[p + "attn.proj.weight"]), official[p + "norm_2.weight"])
        gate, up = linear(norm(x, official[p + "norm_3.weight"]), official[p + "mlp.fc.weight"]).chunk(2, -1)
        return norm(x + linear(silu(gate) * up, official[p + "mlp.proj.weight"]), official[p + "norm_4.weight"])

    def stack(x, part):
        count = len({k.split(".")[2] for k in official if k.startswith(f"transformer.{part}.")})
        for i in range(count):
            x = block(x, f"transformer.{part}.{i}.")
        return x

    e = stack(official["transformer.wte.weight"][idx] * math.sqrt(width), "prelude")
    s = torch.zeros_like(e)
    for _ in range(steps):
        s = stack(linear(torch.cat([s, e], -1), official["transformer.adapter.weight"]), "core_block")
    x = norm(stack(norm(s, official["transformer.ln_f.weight"]), "coda"), official["transformer.ln_f.weight"])
    return linear(x, official["lm_head.weight"])


def test_recurrent_depth_official_checkpoint_loads_to_the_same_logits(tmp_path):
    from scripts import huginn_0125
    source = tiny_model(n_prelude=2, n_coda=2).eval()
    with torch.no_grad():  # non-trivial norms and q/k biases, so a wrong mapping of either shows
        for name, p in source.named_parameters():
            if p.dim() < 2 or name.endswith("qk_bias"):
                p.add_(0.3 * torch.randn_like(p))
    official = official_layout(source)
    names = sorted(official)
    torch.save({n: official[n] for n in names[:9]}, tmp_path / "pytorch_model-00001-of-00002.bin")  # two shards
    torch.save({n: official[n] for n in names[9:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    idx = torch.randint(0, TEXT.vocab_size, (2, 12))
    zero = torch.zeros(2, 12, source.config.d_model)
    with torch.no_grad():
        expected = unrolled(source, idx, (4, 0), zero)
        torch.testing.assert_close(reference_logits(official, idx, source.config.n_heads, 4), expected,
                                   atol=1e-4, rtol=1e-4)
        # the official interleaved RoPE pairs become ours by the q/k row permutation
        loaded = huginn_0125.load_huginn(tmp_path, source.config, vocab_size=TEXT.vocab_size, max_len=TEXT.seq_len)
        torch.testing.assert_close(unrolled(loaded, idx, (4, 0), zero), expected, atol=1e-5, rtol=1e-5)
        out, _ = rd.generate(loaded, idx[:, :5], 6, thinking_steps=4, exit_criterion="none", init_scale=0.0)
        ref, _ = rd.generate(source, idx[:, :5], 6, thinking_steps=4, exit_criterion="none", init_scale=0.0)
        assert torch.equal(out, ref)  # generation from token ids
        (tmp_path / "st").mkdir()  # the release's format, written here by hand: header length, JSON header, bytes
        tensors = {n: t.contiguous() for n, t in official.items() if n != "lm_head.weight"}
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n, t in tensors.items():
            header[n] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * 4]}
            offset += t.numel() * 4
        encoded = json.dumps(header).encode()
        (tmp_path / "st" / "m.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(
            t.float().numpy().tobytes() for t in tensors.values()))
        loaded = huginn_0125.load_huginn(tmp_path / "st", source.config, vocab_size=TEXT.vocab_size,
                                         max_len=TEXT.seq_len)
        torch.testing.assert_close(unrolled(loaded, idx, (4, 0), zero), expected, atol=1e-5, rtol=1e-5)


def test_recurrent_depth_huginn_preset_has_the_released_parameter_count():
    from scripts import huginn_0125
    with torch.device("meta"):  # shapes only, no memory
        model = rd.RecurrentDepthModel(rd.Config(**huginn_0125.HUGINN_CONFIG), huginn_0125.HUGINN_VOCAB_SIZE,
                                       huginn_0125.HUGINN_CONTEXT, causal=True, grid=False)
    assert sum(p.numel() for p in model.parameters()) == 3_564_976_800


@pytest.mark.parametrize("content, message", [
    (b"\x01\x00 not a state dict", "cannot read it as a state dict"),
    ("not tensors", "not a state dict of tensors"),
    ("missing key", "does not fit the config: Missing key\\(s\\)"),
    ("", "has no \\*.safetensors, \\*.bin or \\*.pt files"),
])
def test_recurrent_depth_bad_checkpoint_files_raise_one_line_value_errors(tmp_path, content, message):
    from scripts import huginn_0125
    if content == "missing key":
        official = official_layout(tiny_model())
        del official["transformer.adapter.weight"]
        torch.save(official, tmp_path / "pytorch_model.bin")
    elif content == "not tensors":
        torch.save({"transformer.adapter.weight": [1.0, 2.0]}, tmp_path / "pytorch_model.bin")
    elif content:
        (tmp_path / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        huginn_0125.load_huginn(tmp_path, rd.Config(**TINY), vocab_size=TEXT.vocab_size, max_len=TEXT.seq_len)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def trained_sudoku():
    """A tiny model trained for 50 steps on a fixed set of 8 easy puzzles (no augmentation)."""
    puzzles, solutions, _ = sudoku_data.generate_puzzles(8, "easy", seed=0, workers=1)
    puzzle, solution = torch.from_numpy(puzzles).long(), torch.from_numpy(solutions).long()
    task = SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81,
                           test_sets={"train": {"puzzle": puzzle, "solution": solution}})
    config = rd.Config(**TINY, lr=6e-3, warmup_steps=1, eval_steps=(1, 4, 8, 16))
    torch.manual_seed(0)
    model = rd.build_model(config, task)
    opt = rd.make_optimizer(model, config)
    scaler = torch.amp.GradScaler(enabled=False)
    batch = {"puzzle": puzzle, "solution": solution}
    losses = [rd.train_step(model, opt, scaler, batch, step, config, None)["loss"].item() for step in range(50)]
    return model, task, config, losses


def test_recurrent_depth_tiny_model_learns_tiny_sudoku_set(trained_sudoku):
    model, task, config, losses = trained_sudoku
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    rows = rd.evaluate(model, task, config, config.eval_steps, None)
    at_mean = next(r for r in rows if r["thinking steps"] == 4)
    assert at_mean["blank-cell %"] > 60  # chance is 11 %


def test_recurrent_depth_more_thinking_does_not_collapse(trained_sudoku):
    model, task, config, _ = trained_sudoku
    rows = {r["thinking steps"]: r for r in rd.evaluate(model, task, config, config.eval_steps, None)}
    assert rows[16]["blank-cell %"] >= rows[4]["blank-cell %"] - 5  # 4x the training mean
    assert rows[4]["blank-cell %"] > rows[1]["blank-cell %"]


def test_recurrent_depth_evaluate_rows_and_train_mode_restored(trained_sudoku):
    model, task, config, _ = trained_sudoku
    rows = rd.evaluate(model, task, config, (1, 2), None)
    assert [r["thinking steps"] for r in rows] == [1, 2, "adaptive (kl)", "adaptive (latent-diff)",
                                                   "adaptive (entropy-diff)", "adaptive (argmax-stability)",
                                                   "adaptive (kl, min_steps 4)"]
    assert all(1 <= r["mean steps used"] <= 2 for r in rows[2:6]) and rows[-1]["mean steps used"] == 2  # capped at 2
    assert 1 <= rows[-1]["mean steps used"] <= 2 and model.training
    assert set(rows[0]) == {"test set", "thinking steps", "mean steps used", "exact %", "blank-cell %",
                            "test-time MFLOP per puzzle"}


def test_recurrent_depth_adaptive_row_starts_from_the_fixed_rows_initial_state(trained_sudoku):
    model, task, config, _ = trained_sudoku
    never_exit = dataclasses.replace(config, kl_threshold=0.0)  # adaptive then runs all steps: must equal the last row
    rows = rd.evaluate(model, task, never_exit, (1, 4), None)
    fixed, adaptive = rows[1], rows[2]
    assert fixed["thinking steps"] == 4 and adaptive["mean steps used"] == 4
    assert (adaptive["exact %"], adaptive["blank-cell %"]) == (fixed["exact %"], fixed["blank-cell %"])
    # the threshold evaluate() uses is the one in the config it is given, not the model's own
    always_exit = dataclasses.replace(config, kl_threshold=1e9)
    assert rd.evaluate(model, task, always_exit, (1, 4), None)[2]["mean steps used"] == 1


def test_recurrent_depth_text_evaluate_and_bf16_autocast_train_step():
    model = tiny_model()
    config = model.config
    opt = rd.make_optimizer(model, config)
    batch = {"tokens": torch.randint(0, TEXT.vocab_size, (4, 17))}
    before = [p.detach().clone() for p in model.parameters()]
    out = rd.train_step(model, opt, torch.amp.GradScaler(enabled=False), batch, 0, config, torch.bfloat16)
    assert math.isfinite(out["loss"].item()) and not out["loss"].requires_grad
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    task = SimpleNamespace(**vars(TEXT), test_sets={"held-out": batch})
    rows = rd.evaluate(model, task, config, (1, 3), torch.bfloat16)
    assert [r["thinking steps"] for r in rows] == [1, 3] and all(r["bits/char"] > 0 for r in rows)


def test_recurrent_depth_restarts_first_trajectory_is_the_plain_one_and_the_rest_differ(trained_sudoku):
    """K = 1 restart is think() from the same generator, noise or not; with K = 3 and noise, trajectory 1 is still
    that noiseless pass (its s_0 the first rows of the generator's draw) and trajectories 2, 3 are other passes."""
    model, task, _, _ = trained_sudoku
    model.eval()
    puzzle = task.test_sets["train"]["puzzle"][:6]
    plain = torch.log_softmax(rd.think(model, puzzle, 5, generator=torch.Generator().manual_seed(3)).logits, -1)

    def restarts(K, record):
        thought = rd.think(model, puzzle, 5, record=record, generator=torch.Generator().manual_seed(3), restarts=K,
                           noise=0.5)
        return {step: log_p.view(K, 6, 81, 10) for step, log_p in thought.recorded.items()}
    one = restarts(1, (5,))[5]
    assert one.shape == (1, 6, 81, 10) and torch.allclose(one[0], plain, atol=1e-5)
    three = restarts(3, (2, 5))
    assert set(three) == {2, 5} and torch.allclose(three[5][0], plain, atol=1e-5)
    assert not torch.allclose(three[5][1], plain, atol=1e-3) and not torch.allclose(three[5][2], three[5][1], atol=1e-3)
    model.train()


def test_recurrent_depth_confidence_pick_by_hand_and_without_the_rules_checker(monkeypatch):
    """The pick is the trajectory with the largest Σ over blank cells of max_d log p (given cells ignored, the
    first on ties), computed without Sudoku's rules: it is the same with the rules' checker unavailable."""
    puzzle = torch.zeros(2, 81, dtype=torch.long)
    puzzle[:, 0] = 5  # cell 0 given
    log_p = torch.full((3, 2, 81, 10), -5.0)
    log_p[:, :, :, 1] = -1.0  # every trajectory: max log p = -1 on every cell -> confidence -80 (80 blank cells)
    log_p[1, 0, 7, 1] = -0.5  # puzzle 0: trajectory 1 surer on a blank cell -> -79.5
    log_p[2, 0, 0, 1] = 0.0  # a given cell: does not count
    log_p[2, 1, :, 1] = -1.0  # puzzle 1: all tie -> the first
    log_p[0, 1, 3, 0] = 0.0  # token 0 (blank) is never a digit: does not count
    assert rd.pick_by_confidence(log_p, puzzle).tolist() == [1, 0]
    monkeypatch.setattr(sudoku_data, "broken_constraints",
                        lambda *a: (_ for _ in ()).throw(AssertionError("rules used")))
    assert rd.pick_by_confidence(log_p, puzzle).tolist() == [1, 0]


def test_recurrent_depth_oracle_verifier_takes_the_first_valid_grid_that_keeps_the_givens():
    puzzles, solutions, _ = sudoku_data.generate_puzzles(2, "easy", seed=0, workers=1)
    puzzle, solution = torch.from_numpy(puzzles).long(), torch.from_numpy(solutions).long()
    broken = solution.clone()
    broken[:, [0, 1]] = broken[:, [1, 0]]  # two cells of a row swapped: breaks the columns (and maybe a given)
    relabelled = solution % 9 + 1  # a valid grid, but not the givens
    grids = torch.stack([broken, relabelled, solution])  # (3, 2, 81)
    assert rd.oracle_verifier_pick(grids, puzzle, torch.tensor([1, 1])).tolist() == [2, 2]
    assert rd.oracle_verifier_pick(grids[:2], puzzle, torch.tensor([0, 1])).tolist() == [0, 1]  # none valid: fallback


def test_recurrent_depth_evaluate_restart_rows(trained_sudoku):
    """With K restarts, a confidence row and an oracle-verifier row per step; the fixed rows do not change; the
    oracle is never below the confidence pick (a grid that keeps the givens and breaks no rule is the solution)."""
    model, task, config, _ = trained_sudoku
    single = rd.evaluate(model, task, config, (2, 8), None)
    rows = rd.evaluate(model, task, dataclasses.replace(config, restarts=4, restart_noise=0.3), (2, 8), None)
    assert rows[: len(single)] == single
    extra = rows[len(single):]
    assert [(r["thinking steps"], r["picked by"], r["restarts"]) for r in extra] == [
        (2, "confidence", 4), (2, "oracle verifier", 4), (8, "confidence", 4), (8, "oracle verifier", 4)]
    assert all(o["exact %"] >= c["exact %"] for c, o in zip(extra[::2], extra[1::2]))


def test_recurrent_depth_test_time_flops_are_what_the_flop_counter_sees():
    """B puzzles: r recurrences and one readout, K restarts of them, and the plain transformer's single pass each
    cost B x test_time_flops by torch's flop counter; the rows report it, in MFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(run):
        with FlopCounterMode(display=False, custom_mapping=train.ATTENTION_FLOPS) as counter, torch.no_grad():
            run()
        return counter.get_total_flops()
    config, idx = rd.Config(**TINY), torch.randint(0, 10, (2, 81))
    torch.manual_seed(0)
    model = rd.build_model(config, SUDOKU_SHAPE).eval()
    assert counted(lambda: rd.think(model, idx, 3)) == 2 * rd.test_time_flops(config, 10, 3)
    assert counted(lambda: rd.think(model, idx, 3, record={3}, generator=torch.Generator().manual_seed(0), restarts=4,
                                    noise=0.1)) == \
        2 * rd.test_time_flops(config, 10, 3, restarts=4)
    assert rd.test_time_flops(config, 10, 6) > rd.test_time_flops(config, 10, 3)  # linear in r, more is dearer
    plain_config = dataclasses.replace(config, plain_transformer=True)
    plain = rd.build_model(plain_config, SUDOKU_SHAPE).eval()
    assert counted(lambda: plain(idx)) == 2 * rd.test_time_flops(plain_config, 10, 1) == \
        2 * rd.test_time_flops(plain_config, 10, 64)  # its depth is fixed
    task = SimpleNamespace(**vars(SUDOKU_SHAPE),
                           test_sets={"a": {"puzzle": idx, "solution": torch.randint(1, 10, (2, 81))}})
    rows = rd.evaluate(model, task, dataclasses.replace(config, restarts=2), (1, 3), None)
    fixed = {r["thinking steps"]: r for r in rows if "restarts" not in r}
    assert fixed[3]["test-time MFLOP per puzzle"] == rd.test_time_flops(config, 10, 3) / 1e6
    assert [r["test-time MFLOP per puzzle"] for r in rows if r.get("picked by") == "confidence"] == [
        rd.test_time_flops(config, 10, r, restarts=2) / 1e6 for r in (1, 3)]


def test_recurrent_depth_compile_builds_a_graph_for_the_recurrence_of_training_and_of_the_thinking_loop():
    """model.compile() compiles forward(), which is one recurrence: a training step and an evaluation both run it."""
    import torch._dynamo.testing
    config = rd.Config(**TINY, n_core=1, eval_steps=(1, 2))
    torch.manual_seed(0)
    model = rd.build_model(config, SUDOKU_SHAPE)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    model.compile(backend=counter)
    batch = {"puzzle": torch.randint(0, 10, (2, 81)), "solution": torch.randint(1, 10, (2, 81))}
    rd.train_step(model, rd.make_optimizer(model, config), torch.amp.GradScaler(enabled=False), batch, 0, config, None)
    trained = counter.frame_count
    assert trained > 0 and counter.op_count > 0
    rd.evaluate(model, SimpleNamespace(**vars(SUDOKU_SHAPE), test_sets={"a": batch}), config, (1, 2), None)
    assert counter.frame_count > trained  # the thinking loop under no_grad: its own graph of the same forward
    torch._dynamo.reset()


@pytest.mark.parametrize("bad", [dict(d_model=30, n_heads=4), dict(n_heads=3, d_model=33), dict(exit_criterion="x"),
                                 dict(backprop_depth=0), dict(difficulty="impossible"), dict(eval_steps=()),
                                 dict(fixed_recurrence=True, plain_transformer=True),
                                 dict(stable_steps=0), dict(min_steps=-1), dict(restarts=0), dict(restart_noise=-0.1),
                                 dict(restart_noise=float("nan")), dict(restarts=2, plain_transformer=True)])
def test_recurrent_depth_bad_config_values_raise_value_error(bad):
    with pytest.raises(ValueError):
        rd.build_model(dataclasses.replace(rd.Config(**TINY), **bad), TEXT)
    with pytest.raises(ValueError):
        rd.build_model(rd.Config(**TINY), SimpleNamespace(name="visual", vocab_size=10, seq_len=81))

# ============================================================================= ltm.py
LTM_SENTENCE = "the quick brown fox jumps over the lazy dog "


class LtmTinyText:
    name, vocab_size, seq_len = "text", 27, 16

    def __init__(self):
        ids = torch.tensor([0 if c == " " else ord(c) - 96 for c in LTM_SENTENCE * 3])
        self.windows = ids.unfold(0, self.seq_len + 1, 1)  # (N, 17)
        self.test_sets = {"validation": {"tokens": self.windows[:8]}, "test": {"tokens": self.windows[8:16]}}

    def train_batch(self, step, batch_size):
        index = torch.randint(len(self.windows), (batch_size,), generator=torch.Generator().manual_seed(step))
        return {"tokens": self.windows[index]}


def ltm_tiny_config(**overrides):
    fields = dict(d_model=32, d_z=8, n_layers=2, n_heads=2, n_z_per_layer=2, window=6, fast_steps=2, batch_size=8,
                  lr=3e-3, eval_subset=8)
    return ltm.Config(**{**fields, **overrides})


def ltm_setup(task=None, **overrides):
    torch.manual_seed(0)
    task = task or LtmTinyText()
    config = ltm_tiny_config(**overrides)
    model = ltm.build_model(config, task)
    return task, config, model, ltm.make_optimizer(model, config), torch.amp.GradScaler(enabled=False)


def ltm_train_steps(task, config, model, optimizer, scaler, n_steps, autocast_dtype=None):
    return [ltm.train_step(model, optimizer, scaler, task.train_batch(step, config.batch_size), step, config,
                           autocast_dtype)["loss"].item() for step in range(n_steps)]


_LTM_TRAINED = []


def ltm_trained_once():
    """A tiny decoder trained 20 steps with the reference's logvar init (a near-noiseless q it learns to read),
    built once for the section; callers copy it."""
    if not _LTM_TRAINED:
        task, config, model, optimizer, scaler = ltm_setup(init_logvar=-5.0, lr=1e-2)
        ltm_train_steps(task, config, model, optimizer, scaler, 20)
        _LTM_TRAINED.append((task, config, model))
    return _LTM_TRAINED[0]


def test_ltm_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(3, 4, 5)
    assert torch.allclose(ltm.kl_to_prior(zeros, zeros), torch.zeros(3))
    assert (ltm.kl_to_prior(zeros + 0.5, zeros - 1.0) > 0).all()


def test_ltm_kl_matches_the_closed_form_of_two_gaussians():
    mu, logvar = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    q, prior = torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    assert torch.allclose(ltm.kl_to_prior(mu, logvar), torch.distributions.kl_divergence(q, prior).sum(dim=(1, 2)))


def test_ltm_sample_is_mu_plus_sigma_times_the_given_noise():
    mu, logvar, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(ltm.sample_z(mu, logvar, eps), mu + eps * logvar.exp().sqrt())


def test_ltm_example_noise_draws_each_row_from_its_own_generator():
    rows = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
    noise = ltm.example_noise(torch.rand, (2, 5), rows, "cpu")
    assert torch.equal(noise[1], torch.rand(5, generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(7)
    whole = ltm.example_noise(torch.randn, (2, 5), None, "cpu")
    torch.manual_seed(7)
    assert torch.equal(whole, torch.randn(2, 5))


def test_ltm_token_nll_is_the_chain_rule_sum_of_next_token_losses():
    task, config, model, _, _ = ltm_setup()
    tokens, z = task.windows[:2, :9], torch.randn(2, model.n_latents, config.d_z)
    log_p = torch.zeros(2)
    for t in range(8):  # -log p(x) = -Σ_t log p(x_{t+1} | x_≤t, z), each prefix on its own
        log_p += model(tokens[:, :t + 1], z)[:, -1].log_softmax(-1).gather(1, tokens[:, t + 1:t + 2])[:, 0]
    assert torch.allclose(ltm.token_nll(model, tokens, z, None), -log_p, atol=1e-4)


def test_ltm_fast_lr_is_a_cosine_from_the_peak_to_a_tenth():
    lrs = [ltm.fast_lr_at(step, 16, 0.3) for step in range(17)]
    assert lrs[0] == pytest.approx(0.3) and lrs[8] == pytest.approx(0.165) and lrs[16] == pytest.approx(0.03)
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:]))


def test_ltm_init_scales_the_residual_outputs():
    _, _, model, _, _ = ltm_setup(d_model=64, n_layers=8)
    out_std = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("out.weight")]).std()
    assert out_std.item() == pytest.approx(0.02 / 4, rel=0.1)  # 0.02 / sqrt(2 · n_layers)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_ltm_rope_scores_depend_only_on_the_relative_position():
    cos, sin = ltm.rope_tables(8, 32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = lambda m, n: (ltm.apply_rope(q, cos[m], sin[m]) * ltm.apply_rope(k, cos[n], sin[n])).sum()
    assert torch.allclose(score(5, 2), score(20, 17), atol=1e-5) and not torch.allclose(score(5, 2), score(5, 4))


def test_ltm_every_token_reads_every_latent_of_its_layer():
    # the last layer (self-attention cannot spread a change there): each of its latents changes the logits at
    # every position; a latent of the first layer changes a late position's logits
    task, config, model, _, _ = ltm_setup(n_z_per_layer=4)
    tokens, z = task.windows[:1, :16], torch.randn(1, model.n_latents, config.d_z)
    logits = model(tokens, z)
    for latent in range(model.n_latents):
        changed = z.clone()
        changed[0, latent] += 1.0
        differs = (model(tokens, changed) - logits).abs().amax(dim=-1)[0] > 0  # (16,)
        assert differs[-1], latent
        if latent >= model.n_latents - 4:
            assert differs.all(), latent


def test_ltm_latents_have_no_order():
    # no position codes on the latents: permuting a layer's latent vectors leaves every logit unchanged
    task, config, model, _, _ = ltm_setup(n_z_per_layer=3)
    tokens, z = task.windows[:1, :16], torch.randn(1, model.n_latents, config.d_z)
    permuted = z.clone()
    permuted[:, [0, 1, 2]] = z[:, [2, 0, 1]]
    assert torch.allclose(model(tokens, z), model(tokens, permuted), atol=1e-5)


def test_ltm_window_limits_what_a_position_can_see():
    # two layers of a 3-token window: position i sees tokens i-4..i (each layer reaches 2 tokens further back)
    task, config, model, _, _ = ltm_setup(window=3)
    tokens, z = task.windows[:1, :16].clone(), torch.randn(1, model.n_latents, config.d_z)
    logits = model(tokens, z)[0, 12]  # (V,)
    for position, seen in ((8, True), (7, False), (0, False), (12, True)):
        changed = tokens.clone()
        changed[0, position] = (changed[0, position] + 1) % task.vocab_size
        assert torch.equal(model(changed, z)[0, 12], logits) is not seen, position
    _, _, full, _, _ = ltm_setup(window=0)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % task.vocab_size
    assert not torch.equal(full(changed, z)[0, 12], full(tokens, z)[0, 12])  # 0 = full causal attention


def test_ltm_fresh_noise_draws_a_new_sample_at_every_step():
    # the same frozen (μ, logvar) (a zero fast lr), a new ε at every fast step and for the slow step's sample
    task, config, model, optimizer, scaler = ltm_setup(fast_lr=0.0, fast_steps=3, init_logvar=-5.0,
                                                       every_iterate=False)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    ltm.train_step(model, optimizer, scaler, task.train_batch(0, 8), 0, config, None)
    assert len(seen) == 4 and all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])
    spread = torch.stack(seen).std(dim=0).mean()  # the draws differ by σ ε with σ = e^(init_logvar / 2) at the init
    assert spread.item() == pytest.approx(math.exp(config.init_logvar / 2), rel=0.2)


def ltm_hand_fit_gradients(model, tokens, config, every_iterate):
    """The decoder gradient of one training step by a hand-written loop (the global generator, seeded as the
    caller seeded it): the fit's T AdamW steps on (μ, logvar), recording z_t at each iterate; then the mean
    per-token NLL at every z_t (every_iterate) or at one fresh sample of the fitted q."""
    shape = (tokens.shape[0], model.n_latents, config.d_z)
    eps = torch.randn(shape)
    mu = (0.01 * torch.randn(shape)).requires_grad_()
    logvar = (config.init_logvar + 0.1 * torch.randn(shape)).requires_grad_()
    adam, samples = torch.optim.AdamW([mu, logvar], lr=config.fast_lr, betas=(0.9, 0.999)), []
    for t in range(config.fast_steps):
        lr = config.fast_lr
        adam.param_groups[0]["lr"] = 0.1 * lr + 0.45 * lr * (1 + math.cos(math.pi * t / config.fast_steps))
        eps = torch.randn(shape) if t else eps
        z = mu + eps * (0.5 * logvar).exp()
        samples.append(z.detach())
        negative_elbo = ltm.token_nll(model, tokens, z, None).sum() + ltm.kl_to_prior(mu, logvar).sum()
        mu.grad, logvar.grad = torch.autograd.grad(negative_elbo, [mu, logvar])
        adam.step()
    if not every_iterate:
        samples = [(mu + torch.randn(shape) * (0.5 * logvar).exp()).detach()]
    loss = sum(ltm.token_nll(model, tokens, z, None).sum() for z in samples) / (len(samples) * tokens[:, 1:].numel())
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("every_iterate", [True, False])
def test_ltm_decoder_learns_at_every_fast_iterate_as_a_hand_written_loop(every_iterate):
    # every_iterate (the reference): the decoder's gradient is the mean NLL's at z_1..z_T of the fit;
    # the ablation: at one sample of the fitted q. Compared before the slow step (clip out of reach).
    task, config, model, optimizer, scaler = ltm_setup(fast_steps=3, init_logvar=-5.0, grad_clip=1e9,
                                                       every_iterate=every_iterate)
    tokens, seen = task.train_batch(0, 4)["tokens"], []
    optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in model.parameters()]))
    torch.manual_seed(5)
    ltm.train_step(model, optimizer, scaler, {"tokens": tokens}, 0, config, None)
    _, _, fresh, _, _ = ltm_setup(fast_steps=3, init_logvar=-5.0)  # the same weights before the step
    torch.manual_seed(5)
    expected = ltm_hand_fit_gradients(fresh, tokens, config, every_iterate)
    for got, want in zip(seen[0], expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    torch.manual_seed(5)
    other = ltm_hand_fit_gradients(fresh, tokens, config, not every_iterate)  # the other signal differs
    assert not all(torch.allclose(got, want, rtol=1e-4, atol=1e-7) for got, want in zip(seen[0], other))


def test_ltm_prior_row_has_zero_kl_and_fitted_rows_add_their_kl():
    task, config, model, _, _ = ltm_setup()
    rows = ltm.evaluate(model, task, config, (0, 2), None)
    assert [(row["test set"], row["thinking steps"]) for row in rows] == [
        ("validation", 0), ("validation", 2), ("test", 0), ("test", 2)]
    prior, fitted = rows[:2]
    assert prior["KL/char"] == 0.0 and prior["bound/char"] == prior["NLL/char"]
    assert fitted["KL/char"] > 0 and fitted["bound/char"] == pytest.approx(fitted["NLL/char"] + fitted["KL/char"])
    assert all(row["seconds"] > 0 for row in rows) and model.training
    _, _, plain, _, _ = ltm_setup(use_latent=False)
    assert not any("cross" in name for name, _ in plain.named_parameters())
    plain_rows = ltm.evaluate(plain, task, config, (0, 2), None)
    assert [row["thinking steps"] for row in plain_rows] == [0, 0] and "KL/char" not in plain_rows[0]
    windows = task.test_sets["validation"]["tokens"]
    exact = ltm.token_nll(plain, windows, None, None).sum().item() / windows[:, 1:].numel()
    assert plain_rows[0]["NLL/char"] == pytest.approx(exact)
    # every row prints its model's parameter count: LTM's includes the cross-attention the plain one lacks
    assert {row["parameters"] for row in rows} == {sum(p.numel() for p in model.parameters())}
    assert plain_rows[0]["parameters"] == sum(p.numel() for p in plain.parameters()) < rows[0]["parameters"]


def test_ltm_thinking_steps_zero_draws_z_from_the_prior_in_both_columns():
    task, config, model = copy.deepcopy(ltm_trained_once())
    tokens = task.windows[:6]
    shape, half = (6, model.n_latents, config.d_z), tokens.shape[1] // 2
    torch.manual_seed(3)
    bound, cond = ltm.elbo_bound(model, tokens, 0, config), ltm.conditional_nll(model, tokens, 0, config)
    torch.manual_seed(3)
    torch.randn(shape)  # the prior fit's unused ε
    z_bound = torch.randn(shape)  # z ~ N(0, I): the bound's fresh sample
    z_cond = torch.randn(shape)  # and the conditional column's own sample
    with torch.no_grad():
        assert bound["nll"] == pytest.approx(ltm.token_nll(model, tokens, z_bound, None).sum().item(), rel=1e-5)
        second_half = ltm.token_nll(model, tokens, z_cond, None, first=half).sum().item()
        assert cond["own"] == pytest.approx(second_half, rel=1e-5)
        at_zero = ltm.token_nll(model, tokens, torch.zeros(shape), None, first=half).sum().item()
    assert bound["kl"] == 0.0 and cond["own"] != pytest.approx(at_zero, rel=1e-3)  # a sample, not z = 0


def test_ltm_other_z_scores_the_same_tokens_with_another_windows_fit(monkeypatch):
    task, config, model = copy.deepcopy(ltm_trained_once())
    tokens, fits, original = task.windows[::3][:6], [], ltm.fit_posterior
    monkeypatch.setattr(ltm, "fit_posterior", lambda *args, **kw: fits.append(original(*args, **kw)) or fits[-1])
    cond = ltm.conditional_nll(model, tokens, 4, config)
    z = ltm.sample_z(*fits[0][:3])  # each window's own fit on its first half
    with torch.no_grad():
        other = ltm.token_nll(model, tokens, z[[5, 0, 1, 2, 3, 4]], None, first=8).sum().item()  # window b: b - 1's z
        own = ltm.token_nll(model, tokens, z, None, first=8).sum().item()
    assert len(fits) == 1 and cond["other"] == pytest.approx(other, rel=1e-5)
    assert cond["own"] == pytest.approx(own, rel=1e-5)
    assert cond["own"] < cond["other"]  # the decoder reads its own window's fit


def test_ltm_fitting_on_a_prefix_moves_the_latents_and_lowers_the_prefix_nll():
    task, config, model = copy.deepcopy(ltm_trained_once())
    prefix = task.windows[20:28, :9]
    torch.manual_seed(1)
    mu, _, _, _ = ltm.fit_posterior(model, prefix, 16, config, None)
    assert mu.abs().mean() > 0.05  # moved from the N(0, 0.01²) init
    with torch.no_grad():
        fitted, prior = ltm.token_nll(model, prefix, mu, None), ltm.token_nll(model, prefix, torch.zeros_like(mu), None)
    assert (fitted < prior).all() and fitted.sum() < 0.99 * prior.sum(), (fitted, prior)  # every prefix


def test_ltm_conditional_nll_scores_only_tokens_the_fit_never_saw(monkeypatch):
    task, config, model, _, _ = ltm_setup()
    tokens = task.windows[:4]  # (4, 17): the fit reads the first 8 tokens, the NLL scores tokens 8..16
    fits, original = [], ltm.fit_posterior
    monkeypatch.setattr(ltm, "fit_posterior",
                        lambda *args, **kw: fits.append((args[1], original(*args, **kw))) or fits[-1][1])
    torch.manual_seed(0)
    total = ltm.conditional_nll(model, tokens, 3, config)["own"]
    seen, fit = fits[0]
    assert torch.equal(seen, tokens[:, :8])
    logits = model(tokens[:, :-1], ltm.sample_z(*fit[:3]))  # z: the sample of q the column scores at
    log_p = logits.log_softmax(-1).gather(2, tokens[:, 1:, None])[..., 0]  # (4, 16)
    assert total == pytest.approx(-log_p[:, 7:].sum().item(), rel=1e-5)  # targets x_8..x_16
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % task.vocab_size
    torch.manual_seed(0)
    assert ltm.conditional_nll(model, changed, 3, config)["own"] != pytest.approx(total)
    assert torch.equal(fits[1][1][0], fit[0])  # the same fit: the second half never reached it


def test_ltm_decoder_gradient_reaches_every_layers_latents():
    task, config, model, _, _ = ltm_setup()
    z = torch.randn(2, model.n_latents, config.d_z, requires_grad=True)
    ltm.token_nll(model, task.windows[:2], z, None).sum().backward()
    per_layer = z.grad.view(2, config.n_layers, -1).abs().sum(dim=-1)  # (B, n_layers)
    assert (per_layer > 0).all()


def test_ltm_fast_step_touches_only_the_posterior():
    task, config, model, _, _ = ltm_setup()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(1)
    mu, logvar, eps, _ = ltm.fit_posterior(model, task.windows[:4], 3, config, None)
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
    assert not mu.requires_grad and not logvar.requires_grad and not eps.requires_grad
    assert (logvar + 5.0).abs().mean() > 0.5  # moved away from its N(-5, 0.1²) init


def test_ltm_batched_fast_loss_gives_each_sequence_its_own_gradient():
    task, config, model, _, _ = ltm_setup()
    tokens = task.windows[:3]
    mu = torch.randn(3, model.n_latents, config.d_z, requires_grad=True)
    logvar = torch.full_like(mu, -5.0)
    z = mu + logvar  # deterministic z so that both losses see the same sample
    nll = ltm.token_nll(model, tokens, z, None) + ltm.kl_to_prior(mu, logvar)
    batch_grad, = torch.autograd.grad(nll.sum(), mu, retain_graph=True)
    alone_grad, = torch.autograd.grad(nll[1], mu)
    assert torch.allclose(batch_grad[1], alone_grad[1], atol=1e-6)


@pytest.mark.parametrize("every_iterate", [True, False])
def test_ltm_slow_step_updates_only_the_decoder_with_detached_z(monkeypatch, every_iterate):
    task, config, model, optimizer, scaler = ltm_setup(every_iterate=every_iterate)
    seen, original = {}, ltm.fit_posterior

    def recording_fit(*args, **kwargs):
        fit = original(*args, **kwargs)
        seen["mu"], seen["logvar"] = fit[:2]
        return fit

    monkeypatch.setattr(ltm, "fit_posterior", recording_fit)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ltm.train_step(model, optimizer, scaler, task.train_batch(0, 8), 0, config, None)
    assert not seen["mu"].requires_grad and seen["mu"].grad is None and seen["logvar"].grad is None
    for name, p in model.named_parameters():  # every decoder weight, the cross-attention included, learns
        assert p.grad is not None and not torch.equal(p, before[name]), name


def test_ltm_bound_does_not_get_worse_with_more_fast_steps():
    task, config, model = copy.deepcopy(ltm_trained_once())
    bounds = []
    for steps in (1, 2, 4, 8, 16):
        torch.manual_seed(0)
        bound = ltm.elbo_bound(model, task.windows[:8], steps, config)
        bounds.append(bound["nll"] + bound["kl"])
    assert all(later <= earlier for earlier, later in zip(bounds, bounds[1:])), bounds
    assert (bounds[0] - bounds[-1]) / (8 * 16) > math.log(2), bounds  # the perplexity bound at least halves


def test_ltm_tiny_model_fits_a_tiny_corpus():
    task, config, model, optimizer, scaler = ltm_setup(lr=1e-2, fast_steps=1)
    losses = ltm_train_steps(task, config, model, optimizer, scaler, 30)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])


def test_ltm_bf16_autocast_train_step_on_cpu():
    task, config, model, optimizer, scaler = ltm_setup()
    stats = ltm.train_step(model, optimizer, scaler, task.train_batch(0, 8), 0, config, torch.bfloat16)
    assert torch.isfinite(stats["loss"]) and torch.isfinite(stats["nelbo/token"])
    assert stats["nelbo/token"] > stats["loss"]  # -ELBO = NLL + KL with KL > 0


def test_ltm_compile_builds_a_graph_of_the_training_step_and_the_thinking_loop():
    task, config, model, optimizer, scaler = ltm_setup(n_layers=1, fast_steps=1)
    task.test_sets = {"test": {"tokens": task.windows[:8]}}  # the training batch's shape: no recompilation
    from torch._dynamo.testing import CompileCounter  # counts the graphs torch.compile builds, without inductor
    torch._dynamo.reset()
    counter = CompileCounter()
    model.compile(backend=counter)
    ltm.train_step(model, optimizer, scaler, task.train_batch(0, 8), 0, config, None)
    trained = counter.frame_count
    ltm.evaluate(model, task, config, (0,), None)
    assert trained > 0 and counter.frame_count > trained  # the evaluation (no gradients) is a graph of its own
    torch._dynamo.reset()


def test_ltm_topic_documents_oracle_is_the_generators_own_probability():
    task = ltm.TopicDocuments(seed=0, eval_size=3)
    tokens = task.test_sets["test"]["tokens"]
    assert tokens.shape == (3, task.seq_len + 1) and tokens.dtype == torch.long
    assert torch.equal(task.train_batch(5, 2)["tokens"], ltm.TopicDocuments(seed=0).train_batch(5, 2)["tokens"])
    p = task.log_topics.exp()  # (K, V): slower direct sums over topics of products of token probabilities
    for x in tokens[:2, :20].tolist():  # -log p(x_8..x_19 | x_<8) = log p(x_<8) - log p(x_≤19)
        joint = lambda upto: sum(math.prod(p[k, t].item() for t in x[:upto]) for k in range(task.n_topics))
        nll = task.oracle_nll(torch.tensor([x]), first=8)[0].item()
        assert nll == pytest.approx(math.log(joint(8)) - math.log(joint(20)), rel=1e-6)
    documents = torch.cat([task.train_batch(step, 64)["tokens"] for step in range(2)])  # (128, 257)
    late, every = task.oracle_nll(documents, first=129) / 128, task.oracle_nll(documents) / 256  # nats per token
    assert late.mean() < every.mean()  # a long prefix tells the topic: the later tokens cost less
    assert ltm.build_task("text", None, None) is None
    assert ltm.build_task("topics", None, SimpleNamespace(seed=1, eval_size=2)).name == "topics"


def test_ltm_bad_input_raises_value_error():
    task, config, model, optimizer, scaler = ltm_setup()
    with pytest.raises(ValueError):
        ltm.train_step(model, optimizer, scaler, {"tokens": task.windows[:2] + 100}, 0, config, None)
    with pytest.raises(ValueError):
        ltm.elbo_bound(model, task.windows[:2].float(), 1, config)
    with pytest.raises(ValueError):
        ltm.conditional_nll(model, task.windows[:2, :10].repeat(1, 2), 1, config)  # longer than the RoPE table
    with pytest.raises(ValueError):
        ltm.build_model(ltm_tiny_config(), type("Maze", (), {"name": "maze"})())
    with pytest.raises(ValueError):
        ltm.build_model(ltm_tiny_config(d_model=30, n_heads=4), LtmTinyText())
    with pytest.raises(ValueError):
        ltm.build_model(ltm_tiny_config(window=-1), LtmTinyText())
    with pytest.raises(ValueError):
        ltm.build_model(ltm_tiny_config(), type("Sudoku", (), {"name": "sudoku", "vocab_size": 10, "seq_len": 163})())
    with pytest.raises(ValueError):
        ltm.train_step(model, optimizer, scaler, {"puzzle": torch.zeros(2, 81, dtype=torch.long)}, 0, config, None)


def test_ltm_train_py_resume_reproduces_the_straight_run(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LTM_SENTENCE * 40)
    run = ["--method", "ltm", "--task", "text", "--text-file", str(corpus), "--context-length", "16",
           "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--n-z-per-layer", "2", "--fast-steps", "1",
           "--steps", "4", "--batch-size", "4", "--warmup-steps", "2", "--eval-steps", "1,2", "--eval-size", "2",
           "--eval-subset", "2", "--log-every", "2"]
    monkeypatch.setattr(train, "matmul_peak", lambda *args: 1e9)  # the MFU's probe: not what is tested here
    assert train.main(run + ["--out", str(tmp_path / "straight")]) == 0
    assert "parameters" in capsys.readouterr().out  # the table prints every row's parameter count
    original_step = ltm.train_step

    monkeypatch.setattr(ltm, "train_step", interrupting_at_step_3(original_step))
    assert train.main(run + ["--out", str(tmp_path / "split")]) == 130
    monkeypatch.setattr(ltm, "train_step", original_step)
    assert train.main(["--method", "ltm", "--resume", str(tmp_path / "split" / "checkpoint.pt")]) == 0
    load = lambda name: torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=True)
    straight, resumed = load("straight"), load("split")
    assert resumed["step"] == straight["step"] == 4
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    rows = [[{k: v for k, v in row.items() if k != "seconds"}
             for row in json.loads((tmp_path / name / "results.json").read_text())["rows"]]
            for name in ("straight", "split")]  # every column but the wall time
    assert rows[0] == rows[1] and [row["thinking steps"] for row in rows[0]] == [1, 2]  # one file: one held-out set

# ============================================================================= lvr.py
LVR_TASK = vqa_data.VQATask(seed=0, train_size=300, eval_size=16)
LVR_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def lvr_tiny(**kw):
    config = lvr.Config(**{**dict(d_model=32, n_layers=2, n_heads=2, encoder_layers=1, batch_size=8, align_steps=2,
                                  group_size=4, max_latent=6, eval_steps=(0, 2)), **kw})
    torch.manual_seed(0)
    task = copy.copy(LVR_TASK) if config.stage == "rl" else LVR_TASK  # the RL stage switches its task to fresh scenes
    return lvr.build_model(config, task), config


def rollout_of(model, budget=3, n=6, sigma=0.0):
    batch = LVR_TASK.train_batch(0, n)
    with torch.no_grad():
        visual = model.visual_tokens(batch["image"])
    question = batch["question"]
    # make every row enter latent mode: bias the head towards <lvr_start> at the first text step
    torch.manual_seed(1)
    return visual, question, lvr.generate(model, model.llm, visual, question, budget, sigma=sigma)


def force_lvr_start(model):
    with torch.no_grad():
        model.llm.head.weight[LVR_TASK.lvr_start_id] += 0.1 * model.llm.ln.weight.sign()
        model.llm.ln.bias.copy_(model.llm.ln.weight.abs())
        if model.reference is not None:  # π_ref is the policy GRPO starts from
            model.reference.load_state_dict(model.llm.state_dict())


# ---------------- vqa_data


def test_lvr_roi_patch_indices_edge_cases():
    assert vqa_data.roi_patch_indices((0, 0, 8, 8), 48, 8) == [0]             # exactly one patch
    assert vqa_data.roi_patch_indices((2, 3, 5, 6), 48, 8) == [0]             # inside one patch
    assert vqa_data.roi_patch_indices((7, 0, 9, 1), 48, 8) == [0, 1]          # straddles a patch border
    assert vqa_data.roi_patch_indices((40, 40, 48, 48), 48, 8) == [35]        # bottom-right border
    assert vqa_data.roi_patch_indices((44, 0, 60, 9), 48, 8) == [5, 11]       # clipped at the right edge
    assert vqa_data.roi_patch_indices((0, 0, 48, 48), 48, 8) == list(range(36))
    assert vqa_data.roi_patch_indices((8, 8, 24, 16), 48, 8) == [7, 8]       # row-major y*w + x
    for bad in [(5, 5, 5, 9), (5, 9, 9, 2), (50, 50, 60, 60)]:
        with pytest.raises(ValueError):
            vqa_data.roi_patch_indices(bad, 48, 8)
    with pytest.raises(ValueError):
        vqa_data.roi_patch_mask(torch.zeros(3, 3), 48, 8)


def test_lvr_vqa_data_deterministic_and_disjoint():
    a, b = (vqa_data.VQATask(seed=3, train_size=200, eval_size=20) for _ in range(2))
    for k in ("image", "question", "answer", "box"):
        assert torch.equal(a.train_batch(7, 5)[k], b.train_batch(7, 5)[k])
        assert torch.equal(a.test_sets["held-out"][k], b.test_sets["held-out"][k])
    assert not torch.equal(a.train_batch(7, 5)["image"], a.train_batch(8, 5)["image"])
    c = vqa_data.VQATask(seed=4, train_size=200, eval_size=20)
    assert not torch.equal(a.test_sets["held-out"]["image"], c.test_sets["held-out"]["image"])
    test_keys = set(vqa_data.scene_keys(vqa_data.sample_scenes(np.random.default_rng([3, 2]), 20)))
    assert not test_keys & set(vqa_data.scene_keys(a.train_scenes))
    batch = a.train_batch(0, 64)
    assert batch["image"].shape == (64, 3, 48, 48) and 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert ((batch["question"][:, -1] == vqa_data.PAD) | (batch["question"][:, -1] == vqa_data.STOI["?"])).all()
    # every ROI box touches at least one patch, answers are single vocabulary words
    assert batch["box"].shape == (64, 2, 4) and vqa_data.roi_patch_mask(batch["box"].flatten(0, 1), 48, 8).any(1).all()


def test_vqa_roi_chain_is_the_named_object_then_the_object_the_answer_is_read_from():
    task = vqa_data.VQATask(seed=1, train_size=500, eval_size=10)
    batch = task.train_batch(0, 300)
    first, second = (vqa_data.roi_patch_mask(batch["box"][:, k], 48, 8) for k in (0, 1))  # (B, 36) each
    assert (first.sum(1) == 1).all() and (second.sum(1) == 1).all()                       # one patch per box
    assert (batch["patch_object"] > 0).sum(1).eq(vqa_data.N_OBJECTS).all()
    named, read = batch["patch_object"][first] - 1, batch["patch_object"][second] - 1       # objects in the boxes
    assert (named >= 0).all() and (read >= 0).all()
    colors = torch.tensor([vqa_data.STOI[w] for w in vqa_data.COLORS])
    shapes = torch.tensor([vqa_data.STOI[w] for w in vqa_data.SHAPES])
    assert (batch["question"] == colors[named // len(vqa_data.SHAPES)][:, None]).any(1).all()  # box 1 is named
    asks_color = batch["qtype"] == vqa_data.QUESTION_TYPES.index("near_color")
    answer = torch.where(asks_color, colors[read // len(vqa_data.SHAPES)], shapes[read % len(vqa_data.SHAPES)])
    assert torch.equal(batch["answer"][:, 0], answer)                                      # read off box 2
    asks_shape = batch["qtype"] == vqa_data.QUESTION_TYPES.index("shape")
    assert torch.equal(first[asks_shape], second[asks_shape]) and not (first & second)[~asks_shape].any()
    # box 2 of a "nearest" question: the object at the smallest grid distance from box 1 (unique by construction)
    grid, where = torch.arange(36), first.int().argmax(1)
    dist = ((grid % 6 - (where % 6)[:, None]) ** 2 + (grid // 6 - (where // 6)[:, None]) ** 2).float()
    dist[(batch["patch_object"] == 0) | first] = float("inf")
    assert (dist.sort(1).values[:, 0] < dist.sort(1).values[:, 1]).all()
    assert torch.equal(dist.argmin(1)[~asks_shape], second.int().argmax(1)[~asks_shape])
    for k, name in enumerate(vqa_data.QUESTION_TYPES):                                     # every type is asked
        assert (batch["qtype"] == k).any(), name


def test_vqa_boxes_frame_the_rendered_objects_their_question_and_answer_name():
    task = vqa_data.VQATask(seed=0, train_size=100, eval_size=4)
    batch = task.train_batch(0, 24)
    lit_pixels = batch["image"].amax(1) > 0.4  # (B, 48, 48): objects (a channel >= 0.7) over a dark noisy background
    colours = torch.from_numpy(vqa_data.RGB)
    for i in range(24):
        words = [vqa_data.VOCAB[t] for t in batch["question"][i].tolist()]
        named = next(w for w in words if w in vqa_data.COLORS)
        objects = []
        for x0, y0, x1, y1 in batch["box"][i].tolist():
            px, py = x0 // 8 * 8, y0 // 8 * 8  # the object's patch holds its box
            assert (x1 - 1) // 8 * 8 == px and (y1 - 1) // 8 * 8 == py
            patch = lit_pixels[i, py:py + 8, px:px + 8]
            ys, xs = patch.nonzero(as_tuple=True)
            assert (px + xs.min(), py + ys.min(), px + xs.max() + 1, py + ys.max() + 1) == (x0, y0, x1, y1)  # tight box
            mean = batch["image"][i, :, y0:y1, x0:x1][:, lit_pixels[i, y0:y1, x0:x1]].mean(1)
            colour = vqa_data.COLORS[int((colours - mean).abs().sum(1).argmin())]
            count, r = int(patch.sum()), (x1 - x0 - 1) // 2
            shape = {(2 * r + 1) ** 2: "square", 4 * r + 1: "cross"}.get(count)
            objects.append((colour, shape, ((px + 4, py + 4))))
        assert objects[0][0] == named  # the first box frames the object the question names
        answer, kind = vqa_data.VOCAB[int(batch["answer"][i, 0])], vqa_data.QUESTION_TYPES[int(batch["qtype"][i])]
        if kind == "shape":
            assert objects[1] == objects[0]
        if kind == "near_color":
            assert objects[1][0] == answer
        elif answer in ("square", "cross"):
            assert objects[1][1] == answer
        else:
            assert objects[1][1] is None  # a circle or a triangle: neither a square's nor a cross's pixel count
        if kind != "shape":  # the second box's object is the nearest lit patch to the first (grid distance)
            centres = {(x // 8 * 8 + 4, y // 8 * 8 + 4) for y, x in lit_pixels[i].nonzero().tolist()}
            (cx, cy), (nx, ny) = objects[0][2], objects[1][2]
            distances = sorted((x - cx) ** 2 + (y - cy) ** 2 for x, y in centres - {(cx, cy)})
            assert (nx - cx) ** 2 + (ny - cy) ** 2 == distances[0] < distances[1]


def test_lvr_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        lvr.Config(stage="ppo")
    with pytest.raises(ValueError):
        lvr.Config(latent_sigma=-0.1)
    with pytest.raises(ValueError):
        lvr.Config(d_model=30, n_heads=4)
    with pytest.raises(ValueError):
        vqa_data.VQATask(train_size=0)
    with pytest.raises(ValueError):
        lvr.build_model(lvr.Config(), object())


# ---------------- lvr: latent decoding


def test_lvr_latent_steps_feed_hidden_states_back():
    model, _ = lvr_tiny()
    force_lvr_start(model)
    visual, question, out = rollout_of(model, budget=3)
    lat = out["is_latent"]
    assert lat.sum(1).eq(3).all()                                # every row took exactly 3 latent steps
    assert (out["tokens"][lat] == LVR_TASK.pad_id).all()
    # the input at each latent position is the last hidden state of the position before it
    response = torch.where(lat[..., None], out["latents"], model.llm.embed(out["tokens"]))
    inputs = torch.cat([lvr.prompt(model.llm, visual, question), response], 1)
    with torch.no_grad():
        h, _, _ = model.llm(inputs)
    p = visual.shape[1] + question.shape[1]
    h_before = h[:, p - 1:p - 1 + lat.shape[1]]                  # hidden at the position before each response slot
    torch.testing.assert_close(h_before[lat], out["latents"][lat], atol=1e-5, rtol=1e-5)
    # perturbing one recorded latent changes every later hidden state (and so the answer's context)
    first = lat.float().argmax(1)                                # first latent slot per row
    rows = torch.arange(len(first))
    perturbed = response.clone()
    perturbed[rows, first] += torch.randn(len(first), perturbed.shape[-1])  # (not a constant: LayerNorm removes it)
    with torch.no_grad():
        h2, _, _ = model.llm(torch.cat([lvr.prompt(model.llm, visual, question), perturbed], 1))
    later = p + first + 3                                        # the position holding <lvr_end>
    assert ((h2[rows, later] - h[rows, later]).abs().amax(-1) > 1e-3).all()
    assert torch.equal(h2[:, :p], h[:, :p])                      # earlier positions untouched (causal)


def test_lvr_cached_decoding_equals_uncached():
    model, _ = lvr_tiny()
    force_lvr_start(model)
    visual, question, out = rollout_of(model, budget=4)
    lat, tokens = out["is_latent"], out["tokens"]
    decoded = ~lat & (tokens != LVR_TASK.pad_id) & (tokens != LVR_TASK.lvr_end_id)    # <lvr_end>: the budget's
    assert lat.any() and decoded.sum() > 6
    response = torch.where(lat[..., None], out["latents"], model.llm.embed(out["tokens"]))
    with torch.no_grad():  # uncached, teacher-forced over the recorded inputs
        _, logits, _ = model.llm(torch.cat([lvr.prompt(model.llm, visual, question), response[:, :-1]], 1))
    logits = logits[:, -lat.shape[1]:]                                               # before each response slot
    assert torch.equal(logits.argmax(-1)[decoded], tokens[decoded])                 # the cached greedy choices


def test_lvr_adaptive_exits_run_and_respect_cap():
    for exit in ("latent_end", "mode_switch"):
        model, config = lvr_tiny()
        force_lvr_start(model)
        batch = LVR_TASK.train_batch(0, 4)
        with torch.no_grad():
            visual = model.visual_tokens(batch["image"])
        out = lvr.generate(model, model.llm, visual, batch["question"], config.max_latent, exit_rule=exit)
        assert out["is_latent"].sum(1).le(config.max_latent).all()
        assert lvr.lvr_loss(model, visual, batch)[1].keys() >= {"L_NTP", "L_LVR"}


def test_lvr_pooled_roi_targets_average_segments():
    visual = torch.arange(36.0)[None, :, None].repeat(1, 1, 2)              # token value = patch index
    box = torch.tensor([[0, 0, 16, 16]])                                       # patches 0, 1, 6, 7
    full = lvr.roi_targets(visual, box, LVR_TASK, 4)                                 # k = N: the ROI tokens
    assert full[0, :, 0].tolist() == [0, 1, 6, 7]
    pooled = lvr.roi_targets(visual, box, LVR_TASK, 2)
    assert pooled[0, :, 0].tolist() == [0.5, 6.5]
    up = lvr.roi_targets(visual, box, LVR_TASK, 8)                                   # fewer tokens than k: repeats
    assert up[0, :, 0].tolist() == [0, 0, 1, 1, 6, 6, 7, 7]
    chain = torch.tensor([[[40, 40, 48, 48], [0, 0, 16, 8]], [[8, 0, 9, 1], [8, 0, 9, 1]]])  # (B=2, K=2, 4)
    full = lvr.roi_targets(visual.repeat(2, 1, 1), chain, LVR_TASK, 3)              # box order, then row-major
    assert full[0, :, 0].tolist() == [35, 0, 1]
    assert full[1, :, 0].tolist() == [1, 1, 1]                                       # N = 2 < k: repeats
    pooled = lvr.roi_targets(visual.repeat(2, 1, 1), chain, LVR_TASK, 2)
    assert pooled[:, :, 0].tolist() == [[35, 0.5], [1, 1]]


# ---------------- lvr: training


def test_lvr_stage1_freezes_encoder_and_projector():
    model, config = lvr_tiny()
    opt = lvr.make_optimizer(model, config)
    lvr.train_step(model, opt, LVR_SCALER, LVR_TASK.train_batch(0, 8), 0, config, None)       # stage 0: all train
    assert model.encoder.patch.weight.grad is not None
    assert model.baseline_llm.head.weight.grad is None                               # baseline waits
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    lvr.train_step(model, opt, LVR_SCALER, LVR_TASK.train_batch(1, 8), config.align_steps, config, None)
    assert all(p.grad is None for p in [*model.encoder.parameters(), *model.projector.parameters()])
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert model.llm.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.baseline_llm.head.weight.grad.abs().sum() > 0
    assert bool(model.baseline_ready)


def test_lvr_stage0_grounding_loss_learns_roi_patches_and_stops_in_stage1():
    model, config = lvr_tiny(lr=1e-2, warmup_steps=1, align_steps=40)
    opt = lvr.make_optimizer(model, config)
    batch = LVR_TASK.train_batch(0, 8)
    first = lvr.train_step(model, opt, LVR_SCALER, batch, 0, config, None)["L_grounding"].item()
    assert model.grounding_head.weight.grad.abs().sum() > 0
    for step in range(1, 10):
        last = lvr.train_step(model, opt, LVR_SCALER, batch, step, config, None)["L_grounding"].item()
    assert last < 0.5 * first
    metrics = lvr.train_step(model, opt, LVR_SCALER, batch, config.align_steps, config, None)  # stage 1
    assert "L_grounding" not in metrics and model.grounding_head.weight.grad is None


def test_lvr_grpo_step_and_bf16_autocast():
    for stage, step in (("sft", 0), ("sft", 5), ("rl", 0)):
        model, config = lvr_tiny(stage=stage)
        if stage == "rl":
            force_lvr_start(model)                                                  # latent steps: RL's choices
        opt = lvr.make_optimizer(model, config)
        before = model.llm.blocks[0].mlp[0].weight.clone()
        metrics = lvr.train_step(model, opt, LVR_SCALER, LVR_TASK.train_batch(0, 2), step, config, torch.bfloat16)
        assert all(torch.isfinite(v) for v in metrics.values())
        assert not torch.equal(before, model.llm.blocks[0].mlp[0].weight)
    assert {"reward", "accuracy", "format", "kl"} <= metrics.keys()
    # π_ref: loading a stage-1 state dict (no π_ref in it) sets it to the loaded LLM
    stage1 = {k: v for k, v in model.state_dict().items() if not k.startswith("reference.")}
    stage1["llm.head.weight"] = stage1["llm.head.weight"] + 1
    model.load_state_dict(stage1)
    assert torch.equal(model.reference.head.weight, stage1["llm.head.weight"])
    assert not any(p.requires_grad for p in model.reference.parameters())


def test_lvr_tiny_model_learns_tiny_vqa_set():
    model, config = lvr_tiny(lr=1e-2, warmup_steps=1, align_steps=30, latent_steps=2, eval_steps=(2,),
                             baseline=False, cot=False, teacher_ramp=15)
    opt = lvr.make_optimizer(model, config)
    batch = LVR_TASK.train_batch(0, 8)
    stage1_losses = []
    for step in range(70):
        metrics = lvr.train_step(model, opt, LVR_SCALER, batch, step, config, None)
        stage1_losses += [metrics["L_LVR"].item()] if "L_LVR" in metrics else []
    assert metrics["L_NTP"] < 0.1 and stage1_losses[-1] < 0.5 * stage1_losses[0]  # the MSE scale is the tokens'
    with torch.no_grad():
        visual = model.visual_tokens(batch["image"])
        out = lvr.generate(model, model.llm, visual, batch["question"], 2)
    assert out["is_latent"].sum(1).eq(2).all()
    assert lvr.answer_correct(out, batch["answer"], LVR_TASK).float().mean() >= 0.75  # chance is < 0.3


def test_lvr_evaluate_rows():
    model, config = lvr_tiny(validation_size=4)
    rows = lvr.evaluate(model, LVR_TASK, config, config.eval_steps, None)
    held_out = [r for r in rows if r["test set"] == "held-out"]
    assert [r["model"] for r in held_out] == [
        "answer prior", "baseline", "text chain-of-thought", "lvr, markers only (d)", "lvr",
        "lvr, oracle ROI tokens (a)",
        "lvr, zero latents (b)", "lvr, random latents (c)", "lvr, latent end exit", "lvr, mode switch exit"]
    steps = [0, 0, LVR_TASK.hop_len, 0, 2] + [config.latent_steps] * 3 + [None] * 2   # adaptive exits: none
    assert [r.get("thinking steps") for r in held_out] == steps
    assert all(r["mean steps"] <= config.max_latent for r in held_out[1:])  # the prior row decodes nothing
    validation = [r for r in rows if r["test set"] == "validation"]
    assert len(validation) == 4 and all(r["pass@4 %"] >= r["accuracy %"] for r in validation)
    for row in held_out[1:]:  # accuracy per question type, weighted by the type counts, gives the overall accuracy
        counts = torch.bincount(LVR_TASK.test_sets["held-out"]["qtype"], minlength=3).float()
        per_type = torch.tensor([row[f"{q} %"] for q in LVR_TASK.question_types])
        assert abs((per_type * counts).sum() / counts.sum() - row["accuracy %"]) < 1e-3
    assert model.training


def test_lvr_compile_builds_graphs_for_the_training_step_and_the_thinking_loop():
    import torch._dynamo.testing
    torch._dynamo.reset()
    model, config = lvr_tiny(baseline=False, cot=False)
    counter = torch._dynamo.testing.CompileCounter()
    model.compile(backend=counter)
    batch = LVR_TASK.train_batch(0, 2)
    try:
        lvr.train_step(model, lvr.make_optimizer(model, config), LVR_SCALER, batch, 0, config, None)
        trained = counter.frame_count                                        # the training step's passes
        with torch.no_grad():
            lvr.generate(model, model.llm, model.visual_tokens(batch["image"]), batch["question"], 1)
        assert trained > 0 and counter.frame_count > trained    # the training step and the thinking loop compiled
    finally:
        torch._dynamo.reset()


# ---------------- lvr: controls, own-latent pass, GRPO_latent


class LvrIdentityLLM(torch.nn.Module):
    """A decoder whose last hidden state is its input embedding, for the shift tests. Logits are zero, except
    that with end_logit the <lvr_end> logit is the input's first dimension."""

    def __init__(self, embed, vocab_size, end_logit=False):
        super().__init__()
        self.embed, self.vocab_size, self.end_logit = embed, vocab_size, end_logit

    def forward(self, inputs, cache=None):
        logits = inputs.new_zeros(*inputs.shape[:2], self.vocab_size)
        if self.end_logit:
            logits[..., LVR_TASK.lvr_end_id] = inputs[..., 0]
        return inputs, logits, cache or []


def lvr_stage1_inputs(model, n=6):
    batch = LVR_TASK.train_batch(0, n)
    with torch.no_grad():
        visual = model.visual_tokens(batch["image"])
    return visual, batch


def test_lvr_loss_compares_each_target_with_the_hidden_state_one_position_earlier():
    model, config = lvr_tiny(latent_steps=3)
    visual, batch = lvr_stage1_inputs(model)
    model.llm = LvrIdentityLLM(model.llm.embed, LVR_TASK.vocab_size)
    targets = lvr.roi_targets(visual, batch["box"], LVR_TASK, 3)                       # (B, 3, D): v_1..v_3
    start = model.llm.embed.weight[LVR_TASK.lvr_start_id].expand(len(visual), 1, -1)
    expected = ((torch.cat([start, targets[:, :-1]], 1) - targets) ** 2).mean()     # [e(<lvr_start>), v_1, v_2] vs v
    torch.testing.assert_close(lvr.lvr_loss(model, visual, batch)[1]["L_LVR"], expected)
    assert expected > 1e-3                                                           # the same-position MSE is 0


def test_lvr_exit_losses_supervise_the_position_holding_the_last_target():
    """latent_end: h(position holding v_N) -> the end vector; mode_switch: the <lvr_end> logit at positions
    <lvr_start>, v_1..v_N is 1 only at the position holding v_N (which predicts <lvr_end>)."""
    for exit in ("latent_end", "mode_switch"):
        model, config = lvr_tiny(latent_steps=3)
        visual, batch = lvr_stage1_inputs(model)
        model.llm = LvrIdentityLLM(model.llm.embed, LVR_TASK.vocab_size, end_logit=True)
        targets = lvr.roi_targets(visual, batch["box"], LVR_TASK, 3)                  # (B, 3, D)
        metrics = lvr.lvr_loss(model, visual, batch)[1]
        if exit == "latent_end":
            torch.testing.assert_close(metrics["L_end"], ((targets[:, -1] - model.latent_end) ** 2).mean())
        else:
            start = model.llm.embed.weight[LVR_TASK.lvr_start_id].expand(len(visual), 1, -1)
            logit = torch.cat([start, targets], 1)[..., 0]                              # (B, 4)
            want = torch.nn.functional.binary_cross_entropy_with_logits(
                logit, torch.tensor([0.0, 0.0, 0.0, 1.0]).expand_as(logit))
            torch.testing.assert_close(metrics["L_switch"], want)


def test_lvr_total_loss_is_ntp_plus_lambda_times_lvr_plus_the_exit_losses():
    for weight, exit_weight in ((0.5, 0.1), (2.0, 0.0), (1.0, 3.0)):
        model, config = lvr_tiny(lvr_weight=weight, exit_weight=exit_weight)
        visual, batch = lvr_stage1_inputs(model)
        loss, metrics = lvr.lvr_loss(model, visual, batch)
        torch.testing.assert_close(loss, metrics["L_NTP"] + weight * metrics["L_LVR"]
                                   + exit_weight * (metrics["L_end"] + metrics["L_switch"]))
        assert not any(value.requires_grad for value in metrics.values())


def test_lvr_answer_pass_reads_detached_own_latents():
    """The answer loss equals a reference pass fed the model's free-running latents (decoded here without a
    cache) as constants: same value and same gradients (no gradient flows back through the fed latents),
    unlike a non-detached feed. (Gradients of the whole loss with λ = λ_ms = 0: the markers' NTP, whose
    reference is the teacher-forced pass, plus the answer's.)"""
    model, config = lvr_tiny(latent_steps=3, lvr_weight=0.0, exit_weight=0.0)
    visual, batch = lvr_stage1_inputs(model)
    llm, k = model.llm, 3
    targets = lvr.roi_targets(visual, batch["box"], LVR_TASK, k)
    B, D = len(visual), visual.shape[-1]
    answer = batch["answer"][:, 0]
    s = visual.shape[1] + batch["question"].shape[1]                                # position of <lvr_start>

    def prefix():  # [question, v, <lvr_start>] embeddings
        start = llm.embed.weight[LVR_TASK.lvr_start_id].expand(B, 1, D)
        return torch.cat([lvr.prompt(llm, visual, batch["question"]), start], 1)

    def answer_loss(latents):  # CE of [answer, <eos>] after [prefix, latents, <lvr_end>, answer]
        tail = llm.embed(torch.stack([torch.full_like(answer, LVR_TASK.lvr_end_id), answer], 1))
        _, logits, _ = llm(torch.cat([prefix(), latents, tail], 1))
        labels = torch.stack([answer, torch.full_like(answer, LVR_TASK.eos_id)], 1)
        return torch.nn.functional.cross_entropy(logits[:, s + k + 1:s + k + 3].flatten(0, 1), labels.flatten())

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in llm.parameters() if p.grad is not None])

    loss, metrics = lvr.lvr_loss(model, visual, batch, teacher_prob=0.0)
    got, got_grad = metrics["answer_NTP"], grads(loss)

    def markers_loss():  # CE of <lvr_start> (at s - 1) and <lvr_end> (at s + k) on the teacher-forced pass
        end = llm.embed.weight[LVR_TASK.lvr_end_id].expand(B, 1, D)
        _, logits, _ = llm(torch.cat([prefix(), targets, end], 1))
        labels = torch.tensor([LVR_TASK.lvr_start_id, LVR_TASK.lvr_end_id]).expand(B, 2)
        return torch.nn.functional.cross_entropy(logits[:, [s - 1, s + k]].flatten(0, 1), labels.flatten())

    def free_running():  # x_1 = h(<lvr_start>), x_{i+1} = h(position holding x_i): full passes, no cache
        inputs = prefix()
        for _ in range(k):
            h, _, _ = llm(inputs)
            inputs = torch.cat([inputs, h[:, -1:]], 1)
        return inputs[:, s + 1:]                                                     # (B, k, D)

    want = answer_loss(free_running().detach())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, grads(markers_loss() + want), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got_grad, grads(markers_loss() + answer_loss(free_running())), atol=1e-5, rtol=1e-4)
    h, _, _ = llm(torch.cat([prefix(), targets], 1))                                # teacher-forced hidden states
    assert not torch.allclose(got, answer_loss(h[:, s:s + k].detach()), atol=1e-4)  # are not what pass 2 reads
    # teacher_prob = 1: the answer pass reads the true ROI tokens instead
    torch.testing.assert_close(lvr.lvr_loss(model, visual, batch, teacher_prob=1.0)[1]["answer_NTP"],
                               answer_loss(targets), atol=1e-5, rtol=1e-5)


def test_lvr_answer_token_weight_equals_the_baselines():
    """Same answer labels, same logits -> same loss: the LVR answer pass and direct_loss weigh the answer alike."""
    model, config = lvr_tiny()
    visual, batch = lvr_stage1_inputs(model)
    model.llm = LvrIdentityLLM(model.llm.embed, LVR_TASK.vocab_size)                 # logits 0: CE = log V
    answer_ntp = lvr.lvr_loss(model, visual, batch)[1]["answer_NTP"]
    baseline, _ = lvr.direct_loss(model.llm, visual, batch, LVR_TASK)
    torch.testing.assert_close(answer_ntp, baseline)
    torch.testing.assert_close(answer_ntp, torch.tensor(math.log(LVR_TASK.vocab_size)))


def test_lvr_control_rows_change_only_the_latent_inputs():
    model, config = lvr_tiny()
    force_lvr_start(model)
    visual, batch = lvr_stage1_inputs(model)
    question, k = batch["question"], config.latent_steps
    free = lvr.generate(model, model.llm, visual, question, k)
    own = torch.stack([free["latents"][r][free["is_latent"][r]] for r in range(len(visual))])  # (B, k, D)
    again = lvr.generate(model, model.llm, visual, question, k, fed_latents=own)    # own latents fed: same run
    assert all(torch.equal(free[key], again[key]) for key in ("tokens", "is_latent", "capped"))
    roi_tokens = torch.randn(5000, visual.shape[-1]) * 0.3 + 2.0
    for kind in lvr.CONTROLS:
        fed = lvr.control_latents(kind, visual, batch["box"], LVR_TASK, k, roi_tokens)
        out = lvr.generate(model, model.llm, visual, question, k, fed_latents=fed)
        assert torch.equal(out["is_latent"], free["is_latent"])                     # same slots, same budget
        torch.testing.assert_close(out["latents"][out["is_latent"]], fed.flatten(0, 1))  # what is fed, in order
        first = free["is_latent"].float().argmax(1)[0]
        assert torch.equal(out["tokens"][:, :first], free["tokens"][:, :first])     # text before: untouched
    assert torch.equal(lvr.control_latents("oracle", visual, batch["box"], LVR_TASK, k, roi_tokens),
                       lvr.roi_targets(visual, batch["box"], LVR_TASK, k))
    assert not lvr.control_latents("zero", visual, batch["box"], LVR_TASK, k, roi_tokens).any()
    noise = lvr.control_latents("random", visual.repeat(200, 1, 1), None, LVR_TASK, k, roi_tokens).flatten(0, 1)
    torch.testing.assert_close(noise.mean(0), roi_tokens.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(noise.std(0), roi_tokens.std(0), atol=0.03, rtol=0)
    markers = lvr.generate(model, model.llm, visual, question, 0)                   # control (d): no latent slot
    assert not markers["is_latent"].any()
    tokens = markers["tokens"]
    assert ((tokens == LVR_TASK.lvr_start_id).any(1) & (tokens == LVR_TASK.lvr_end_id).any(1)).all()


def test_lvr_stage0_loss_is_ntp_plus_object_and_grounding_terms():
    batch = LVR_TASK.train_batch(0, 4)
    model, config = lvr_tiny()
    loss, metrics = lvr.alignment_loss(model, batch)
    torch.testing.assert_close(loss, metrics["L_NTP"] + metrics["L_object"] + metrics["L_grounding"])
    logits = model.encoder.object_head(model.encoder(batch["image"]))                       # (B, 36, classes)
    torch.testing.assert_close(metrics["L_object"], torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["patch_object"].flatten()))


def test_lvr_visual_tokens_carry_their_2d_grid_position():
    code = lvr.grid_position_code(6, 32)                                                   # (36, 32)
    assert code.shape == (36, 32) and torch.unique(code, dim=0).shape[0] == 36
    similarity = (code @ code[0]).view(6, 6)                                               # to patch (x=0, y=0)
    assert (similarity[0].diff() < 0).all() and (similarity[:, 0].diff() < 0).all()       # falls with distance
    model, _ = lvr_tiny()
    image = LVR_TASK.train_batch(0, 2)["image"]
    with torch.no_grad():
        torch.testing.assert_close(model.visual_tokens(image), model.projector(model.encoder(image)) + code)
    with pytest.raises(ValueError):
        lvr.grid_position_code(6, 30)


def test_lvr_grounding_head_reads_the_llm_state_at_each_visual_token():
    model, config = lvr_tiny()
    batch = LVR_TASK.train_batch(0, 4)
    seen = []
    model.grounding_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    lvr.alignment_loss(model, batch)
    with torch.no_grad():
        h, _, _ = model.llm(lvr.prompt(model.llm, model.visual_tokens(batch["image"]), batch["question"]))
    torch.testing.assert_close(seen[0], h[:, -model.n_patches:], atol=1e-5, rtol=1e-5)  # prompt = [question, v]


def test_lvr_teacher_prob_ramps_from_roi_tokens_to_own_latents():
    config = lvr.Config(align_steps=100, teacher_ramp=50)
    assert [lvr.teacher_prob(s, config) for s in (100, 125, 150, 400)] == [1.0, 0.5, 0.0, 0.0]
    assert lvr.teacher_prob(100, lvr.Config(align_steps=100, teacher_ramp=0)) == 0.0
    model, config = lvr_tiny(teacher_ramp=10)                  # first stage-1 step: the answer reads ROI tokens
    visual, batch = lvr_stage1_inputs(model, n=8)
    with torch.no_grad():
        want = lvr.lvr_loss(model, visual, batch, teacher_prob=1.0)[1]["answer_NTP"]
        own = lvr.lvr_loss(model, visual, batch, teacher_prob=0.0)[1]["answer_NTP"]
    got = lvr.train_step(model, lvr.make_optimizer(model, config), LVR_SCALER, batch, config.align_steps, config, None)
    torch.testing.assert_close(got["answer_NTP"], want)
    assert abs(want - own) > 1e-4


def test_lvr_baseline_starts_from_the_stage0_llm():
    model, config = lvr_tiny()
    opt = lvr.make_optimizer(model, config)
    stage0 = {k: v.clone() for k, v in model.llm.state_dict().items()}
    for group in opt.param_groups:
        group["lr"] = 0.0                                                            # a step that moves nothing
    lvr.train_step(model, opt, LVR_SCALER, LVR_TASK.train_batch(0, 8), config.align_steps, config, None)
    assert all(torch.equal(stage0[k], v) for k, v in model.baseline_llm.state_dict().items())


def test_lvr_baseline_cannot_change_the_lvr_models_step():
    """Per-model clipping: one stage-1 step moves the LVR LLM identically with and without the baseline."""
    after = []
    for baseline in (True, False):
        model, config = lvr_tiny(baseline=baseline, align_steps=0, lr=1e-2)
        with torch.no_grad():  # the same end vector in both (drawn after the baseline LLMs)
            model.latent_end.copy_(torch.linspace(-2, 2, config.d_model))
        opt = lvr.make_optimizer(model, config)
        torch.manual_seed(4)
        lvr.train_step(model, opt, LVR_SCALER, LVR_TASK.train_batch(0, 8), 0, config, None)
        after.append(torch.cat([p.flatten() for p in model.llm.parameters()]))
    torch.testing.assert_close(after[0], after[1], atol=1e-6, rtol=0)


def lvr_rollout(rows):
    """A hand-written rollout from token lists (None marks a latent slot)."""
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), LVR_TASK.pad_id)
    is_latent = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        for t, token in enumerate(row):
            is_latent[r, t] = token is None
            tokens[r, t] = LVR_TASK.pad_id if token is None else token
    return {"tokens": tokens, "is_latent": is_latent, "capped": torch.zeros_like(is_latent)}


def test_lvr_reward_varies_with_format_and_answer():
    S, E, eos = LVR_TASK.lvr_start_id, LVR_TASK.lvr_end_id, LVR_TASK.eos_id
    right, wrong = LVR_TASK.stoi["circle"], LVR_TASK.stoi["square"]
    rollout = lvr_rollout([[S, None, None, E, right, eos],   # format and answer right
                           [right, eos],                     # right answer, no latent segment
                           [S, None, E, wrong, eos],         # format right, wrong answer
                           [S, None, E, right, right, eos],  # two answer words
                           [S, None, None, E, right]])       # no <eos>
    answer = torch.full((5, 1), right)
    assert lvr.rewards(rollout, answer, LVR_TASK)[1].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]        # format
    assert lvr.answer_correct(rollout, answer, LVR_TASK).tolist() == [True, True, False, False, False]


def lvr_rl_batch(beta=0.04, **kw):
    model, config = lvr_tiny(stage="rl", kl_beta=beta, **kw)
    force_lvr_start(model)
    batch = LVR_TASK.train_batch(0, 3)
    torch.manual_seed(2)
    rollouts = lvr.grpo_rollouts(model, model.visual_tokens(batch["image"]).detach(), batch)
    return model, config, rollouts


def test_lvr_grpo_advantages_are_group_normalised_rewards():
    reward = torch.tensor([[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advantage = lvr.group_advantages(reward)
    want = torch.tensor([1.0, 0.0, 0.0, -1.0]) / (math.sqrt(2 / 3) + 1e-4)                 # sample std
    torch.testing.assert_close(advantage[0], want)
    assert not advantage[1].any()                                                   # equal rewards: no signal
    model, config, rollouts = lvr_rl_batch()
    assert rollouts["reward"].shape == (3, config.group_size)
    torch.testing.assert_close(rollouts["advantage"], lvr.group_advantages(rollouts["reward"]).view(-1, 1))


def test_lvr_grpo_loss_grows_with_kl_beta_when_the_reference_differs():
    model, config, rollouts = lvr_rl_batch()
    same = [lvr.grpo_latent_loss(model.llm, rollouts, dataclasses.replace(config, kl_beta=b))[0] for b in (0.0, 1.0)]
    torch.testing.assert_close(same[0], same[1])                                    # reference == policy: KL 0
    with torch.no_grad():
        for p in model.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollouts["reference_h"] = lvr.replay_latents(model.reference, rollouts["visual"], rollouts["question"],
                                                 rollouts["rollout"])["h"]
    losses = [lvr.grpo_latent_loss(model.llm, rollouts, dataclasses.replace(config, kl_beta=b))
              for b in (0.0, 0.1, 1.0)]
    assert losses[0][0] < losses[1][0] < losses[2][0]
    kl = losses[2][1]["kl"]
    torch.testing.assert_close(losses[2][0] - losses[0][0], kl, rtol=0.2, atol=0)  # ≈ β·KL (per-row means)
    with torch.no_grad():  # D_KL(π_θ‖π_ref) of the two Gaussians, exact, per dimension as log π
        policy = lvr.replay_latents(model.llm, rollouts["visual"], rollouts["question"], rollouts["rollout"])
    sigma, latent = rollouts["rollout"]["sigma"], rollouts["rollout"]["is_latent"]
    gauss = ((policy["h"] - rollouts["reference_h"]) ** 2).mean(-1) / (2 * sigma ** 2)
    assert latent.any() and sigma > 0
    torch.testing.assert_close(kl, gauss[latent].mean())


def test_lvr_grpo_second_update_moves_the_ratio_and_the_clip_bounds_it():
    ratio_dev = {}
    for updates, dtype in ((1, None), (2, None), (1, torch.bfloat16)):
        model, config = lvr_tiny(stage="rl", policy_updates=updates, lr=3e-2, warmup_steps=1)
        force_lvr_start(model)
        opt = lvr.make_optimizer(model, config)
        torch.manual_seed(3)
        metrics = lvr.train_step(model, opt, LVR_SCALER, LVR_TASK.train_batch(0, 4), 0, config, dtype)
        assert metrics["latent_steps"] > 0                                           # latent choices in the ratio
        ratio_dev[updates, dtype] = metrics["ratio_dev"].item()
    # one update: the ratio is 1; old log-probs by the loss's own replay, so exactly 1 under bf16 autocast too
    assert ratio_dev[1, None] == 0.0 < ratio_dev[2, None] and ratio_dev[1, torch.bfloat16] == 0.0
    # the clip: with every ratio at e > 1 + ε and a positive advantage, the objective is flat in θ (no KL)
    model, config, rollouts = lvr_rl_batch(beta=0.0)
    rollouts["advantage"] = torch.ones_like(rollouts["advantage"])
    logp = lvr.replay_latents(model.llm, rollouts["visual"], rollouts["question"], rollouts["rollout"])["logp"]
    for shift, flat in ((1.0, True), (0.0, False)):
        rollouts["old_logp"] = logp.detach() - shift
        loss, metrics = lvr.grpo_latent_loss(model.llm, rollouts, config)
        model.zero_grad()
        loss.backward()
        grad = sum(p.grad.abs().sum() for p in model.llm.parameters() if p.grad is not None)
        assert (grad == 0) == flat and (metrics["clipped"] == 1.0) == flat


# ---------------- lvr: text chain-of-thought baseline, exits, stochastic latent policy


def cot_words(batch, task):
    return vqa_data.hop_words(batch["box"], batch["patch_object"], task.patch_size)


def test_lvr_cot_targets_write_each_roi_objects_position_colour_and_shape_as_the_scene_holds_them():
    rng = np.random.default_rng(7)
    scenes = vqa_data.sample_scenes(rng, 60)
    batch = vqa_data.make_batch(scenes, rng)
    targets = cot_words(batch, LVR_TASK)                                          # (B, 8)
    assert targets.shape == (60, LVR_TASK.hop_len)
    for i in range(60):  # from the scene's parameters: the named object, then the object the answer is about
        cells, named = scenes["cells"][i], int(scenes["target"][i])
        nearest = min((j for j in range(6) if j != named),
                      key=lambda j: (cells[j] % 6 - cells[named] % 6) ** 2 + (cells[j] // 6 - cells[named] // 6) ** 2)
        about = named if vqa_data.QUESTION_TYPES[scenes["qtype"][i]] == "shape" else nearest
        want = [word for j in (named, about) for word in (f"x{cells[j] % 6}", f"y{cells[j] // 6}",
                vqa_data.COLORS[scenes["colors"][i, j]], vqa_data.SHAPES[scenes["shapes"][i, j]])]
        assert [vqa_data.VOCAB[t] for t in targets[i].tolist()] == want
        assert want[2] in [vqa_data.VOCAB[t] for t in batch["question"][i].tolist()]    # the colour the question names
        assert vqa_data.VOCAB[int(batch["answer"][i, 0])] in want[6:]                    # read off the second object
    assert len(set(scenes["qtype"].tolist())) == 3
    with pytest.raises(ValueError, match="no object"):
        vqa_data.hop_words(batch["box"], torch.zeros_like(batch["patch_object"]))


def test_lvr_cot_loss_trains_the_hops_teacher_forced_and_the_answer_on_its_own_hops_at_lvr_s_rate():
    batch = {**LVR_TASK.train_batch(0, 6), "example_seed": torch.tensor([3, 5, 8, 13, 21, 34])}
    model, config = lvr_tiny()
    llm, visual = model.cot_llm, model.visual_tokens(batch["image"]).detach()
    hops = cot_words(batch, LVR_TASK)

    def answer_ce(before):  # one full pass, no cache: per-token cross-entropy of [before, answer, <eos>]
        seq, logits, _ = lvr.answer_pass(llm, visual, batch, LVR_TASK, before=before)
        return seq, logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq.flatten(),
                                                              reduction="none").view(6, 10)

    seq, logits, ce = answer_ce(hops)
    assert torch.equal(seq, torch.cat([hops, batch["answer"], torch.full((6, 1), LVR_TASK.eos_id)], 1))
    other = hops.clone()
    other[:, 1] = LVR_TASK.stoi["y5"] + LVR_TASK.stoi["y0"] - other[:, 1]                  # another row word
    _, logits_other, _ = answer_ce(other)
    assert torch.equal(logits[:, :2], logits_other[:, :2])                              # before the change: causal
    assert (logits[:, 8] - logits_other[:, 8]).abs().amax() > 1e-4                      # the answer reads the hops
    with torch.no_grad():
        own = hops[:, :0]  # the model's own words: greedy, one full pass per word
        for _ in range(8):
            _, word_logits, _ = llm(torch.cat([lvr.prompt(llm, visual, batch["question"]), llm.embed(own)], 1))
            own = torch.cat([own, word_logits[:, -1:].argmax(-1)], 1)
        teacher = torch.stack([torch.rand(2, 1, generator=torch.Generator().manual_seed(seed))
                               for seed in batch["example_seed"].tolist()]) < 0.5        # lvr_loss's draw, per hop
        assert teacher.any() and not teacher.all()
        mixed = torch.where(teacher.expand(-1, -1, 4).flatten(1), hops, own)            # a hop: one box's 4 words
        for share, fed in ((1.0, hops), (0.0, own), (0.5, mixed)):
            loss, metrics = lvr.cot_loss(llm, visual, batch, LVR_TASK, teacher_prob=share)
            torch.testing.assert_close(metrics["cot_hops_NTP"], ce[:, :8].mean())       # always teacher-forced
            torch.testing.assert_close(metrics["cot_answer_NTP"], answer_ce(fed)[2][:, 8:].mean())
            torch.testing.assert_close(loss, metrics["cot_hops_NTP"] + metrics["cot_answer_NTP"])
        assert not torch.equal(own, hops)


def test_lvr_cot_answer_reads_its_own_hops_once_lvr_s_ramp_is_over():
    """train_step gives the chain of thought LVR's share: after the ramp its answer loss does not depend on the true
    hop words (another scene's boxes and objects in their place), at the first stage-1 step it does."""
    model, config = lvr_tiny(teacher_ramp=10)
    opt = lvr.make_optimizer(model, config)
    for group in opt.param_groups:
        group["lr"] = 0.0                                                            # steps that move nothing
    batch = LVR_TASK.train_batch(0, 8)
    moved = {**batch, "box": batch["box"].roll(1, 0), "patch_object": batch["patch_object"].roll(1, 0)}
    assert not torch.equal(cot_words(batch, LVR_TASK), cot_words(moved, LVR_TASK))
    for step, same in ((config.align_steps + 10, True), (config.align_steps, False)):
        first, second = (lvr.train_step(model, opt, LVR_SCALER, b, step, config, None) for b in (batch, moved))
        assert torch.equal(first["cot_answer_NTP"], second["cot_answer_NTP"]) == same
        assert not torch.equal(first["cot_hops_NTP"], second["cot_hops_NTP"])


def test_lvr_cot_script_equals_the_three_llm_runs_chain_of_thought():
    """scripts/lvr_cot.py leaves LVR and the baseline untrained: the chain of thought's weights and row are still
    those of lvr.train_step's three-LLM run on train.py's batches and learning rates."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("lvr_cot", Path(lvr.__file__).parent / "scripts" / "lvr_cot.py")
    lvr_cot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lvr_cot)
    tiny = dict(d_model=32, n_layers=2, n_heads=2, encoder_layers=1, batch_size=4, steps=5, align_steps=2,
                teacher_ramp=2, warmup_steps=2, eval_steps=(2,), validation_size=2, group_size=2, max_latent=4)
    alone, task = lvr_cot.train_cot(3, 8, lvr.Config(**tiny, baseline=False), log_every=100)
    config = lvr.Config(**tiny)
    torch.manual_seed(3)
    full = lvr.build_model(config, vqa_data.VQATask(seed=3, eval_size=8))
    optimizer = lvr.make_optimizer(full, config)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * train.lr_factor(step, config)
        batch = train.with_example_seeds(task.train_batch(step, config.batch_size), 3, step)
        lvr.train_step(full, optimizer, LVR_SCALER, batch, step, config, None)
    for name, weight in full.cot_llm.state_dict().items():
        assert torch.equal(weight, alone.cot_llm.state_dict()[name]), name
    assert not torch.equal(full.llm.head.weight, alone.llm.head.weight)                 # LVR trained in one only
    rows = lvr.evaluate(full, full.task, config, config.eval_steps, None)
    assert {"test set": "held-out", **lvr_cot.cot_row(alone, task)} in rows


def test_lvr_cot_baseline_starts_from_the_stage0_llm_and_is_scored_on_its_answer():
    model, config = lvr_tiny()
    opt = lvr.make_optimizer(model, config)
    stage0 = {k: v.clone() for k, v in model.llm.state_dict().items()}
    for group in opt.param_groups:
        group["lr"] = 0.0
    metrics = lvr.train_step(model, opt, LVR_SCALER, LVR_TASK.train_batch(0, 8), config.align_steps, config, None)
    assert all(torch.equal(stage0[k], v) for k, v in model.cot_llm.state_dict().items())
    assert model.cot_llm.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and "cot_hops_NTP" in metrics
    right, eos = LVR_TASK.stoi["circle"], LVR_TASK.eos_id
    hops = [LVR_TASK.stoi[w] for w in "x2 y4 red circle x3 y4 blue circle".split()]
    rollout = lvr_rollout([hops + [right, eos], hops + [LVR_TASK.stoi["square"], eos], [right, eos]])
    answer = torch.full((3, 1), right)
    # scored on what follows its hop words; one that writes no hops is wrong
    assert lvr.answer_correct(rollout, answer, LVR_TASK, skip=LVR_TASK.hop_len).tolist() == [True, False, False]
    assert lvr.answer_correct(rollout, answer, LVR_TASK).tolist() == [False, False, True]


class LvrScriptedLLM(torch.nn.Module):
    """A decoder whose call c returns the scripted hidden state hs[c] and <lvr_end> logit ends[c] at its last
    position; call 0 (the prompt) picks <lvr_start>, text after the latent segment picks <eos>."""

    def __init__(self, embed, hs, ends):
        super().__init__()
        self.embed, self.hs, self.ends, self.calls = embed, hs, ends, 0

    def forward(self, inputs, cache=None):
        c = min(self.calls, len(self.hs) - 1)
        self.calls += 1
        logits = inputs.new_zeros(*inputs.shape[:2], LVR_TASK.vocab_size)
        logits[..., LVR_TASK.lvr_start_id if c == 0 else LVR_TASK.eos_id] = 50.0
        logits[..., LVR_TASK.lvr_end_id] = self.ends[c]
        h = self.hs[c].expand(*inputs.shape[:2], -1)
        return h, logits, cache or []


def test_lvr_each_exit_stops_where_it_should_on_a_scripted_decoder():
    model, config = lvr_tiny(end_threshold=0.02)
    D, far = config.d_model, torch.full((config.d_model,), 3.0)
    visual, question = torch.zeros(2, 36, D), LVR_TASK.train_batch(0, 2)["question"]
    # calls 1.. are the states after <lvr_start>, x_1, x_2, ...: the end vector is reached at call 3, the
    # decoded token is <lvr_end> at call 2 (its logit above <eos>'s 50)
    hs = [far, far, far, model.latent_end.detach().clone(), far, far, far, far, far]
    ends = [-9.0, -9.0, 60.0, -9.0, -9.0, -9.0, -9.0, -9.0, -9.0]

    def steps(exit, cap, end_logits=ends):
        llm = LvrScriptedLLM(model.llm.embed, hs, end_logits)
        out = lvr.generate(model, llm, visual, question, cap, exit_rule=exit)
        assert (out["tokens"] == LVR_TASK.lvr_end_id).sum(1).eq(1).all()
        return out["is_latent"].sum(1).tolist(), out["capped"].any(1).tolist()

    assert steps("fixed", 4) == ([4, 4], [False, False])                 # exactly the budget
    assert steps("fixed", 1) == ([1, 1], [False, False])
    assert steps("latent_end", 6) == ([2, 2], [False, False])            # x_1, x_2 fed, then h = e: stop
    assert steps("latent_end", 1) == ([1, 1], [True, True])              # the cap comes first
    assert steps("mode_switch", 6) == ([1, 1], [False, False])           # <lvr_end> decoded after x_1
    assert steps("mode_switch", 6, [-30.0] * 9) == ([6, 6], [True, True])   # never ends itself
    assert steps("mode_switch", 6, [-30.0, 60.0] + [-30.0] * 7) == ([0, 0], [False, False])
    # the exit is the decoded token, as the official code: a positive <lvr_end> logit that is not the argmax
    # (sigmoid > 0.5) does not end the segment
    assert steps("mode_switch", 6, [-9.0, -9.0, 9.0] + [-9.0] * 6) == ([6, 6], [True, True])


def test_lvr_stochastic_latent_policy_is_gaussian_and_enters_the_ratio():
    model, config = lvr_tiny(stage="rl", latent_sigma=0.3, kl_beta=0.0)
    force_lvr_start(model)
    sigma = 0.3
    visual, question, out = rollout_of(model, budget=3, n=8, sigma=sigma)
    lat = out["is_latent"]
    assert lat.sum(1).eq(3).sum() >= 4 and torch.isin(lat.sum(1), torch.tensor([0, 3])).all()  # entered: 3 steps
    # h_t, the hidden state before each latent slot, from a plain uncached pass over the recorded inputs
    response = torch.where(lat[..., None], out["latents"], model.llm.embed(out["tokens"]))
    with torch.no_grad():
        h, _, _ = model.llm(torch.cat([lvr.prompt(model.llm, visual, question), response], 1))
    p = visual.shape[1] + question.shape[1]
    h_before = h[:, p - 1:p - 1 + lat.shape[1]][lat]                                   # (M, D)
    x = out["latents"][lat]
    noise = (x - h_before) / sigma
    assert abs(noise.std().item() - 1) < 0.1 and abs(noise.mean().item()) < 0.1        # x = h + σε, ε ~ N(0, I)
    want = torch.distributions.Normal(h_before, sigma).log_prob(x).mean(-1)         # per dimension
    replay = lvr.replay_latents(model.llm, visual, question, out)
    torch.testing.assert_close(replay["logp"][lat], want, atol=1e-3, rtol=1e-5)
    assert (replay["logp"][~lat] == 0).all()                                         # the latent steps are the choices
    # in the ratio: with only the latent steps as choices, old log π lowered by 0.1 and Â = 1, the loss is −e^0.1
    # per row with latent steps (0 for the others), and it pulls h_t towards the sampled x_{t+1}
    batch = {"rollout": out, "visual": visual, "question": question, "reference_h": replay["h"].detach(),
             "advantage": torch.ones(len(visual), 1), "old_logp": (replay["logp"].detach() - 0.1) * lat}
    loss, metrics = lvr.grpo_latent_loss(model.llm, batch, config)
    torch.testing.assert_close(loss, -math.exp(0.1) * lat.any(1).float().mean(), atol=1e-4, rtol=0)
    loss.backward()
    assert model.llm.head.weight.grad is None or model.llm.head.weight.grad.abs().sum() == 0  # no text term
    assert model.llm.blocks[0].mlp[0].weight.grad.abs().sum() > 0
    out["latents"] = out["latents"] + 0.05 * lat[..., None]                           # other sampled latents
    moved, _ = lvr.grpo_latent_loss(model.llm, batch, config)
    assert abs(moved.item() - loss.item()) > 1e-3


def test_lvr_reference_policy_stays_frozen_and_rl_trains_on_fresh_scenes():
    model, config = lvr_tiny(stage="rl", lr=3e-2, warmup_steps=1)
    force_lvr_start(model)
    opt = lvr.make_optimizer(model, config)
    batch = model.task.train_batch(0, 4)
    lvr.train_step(model, opt, LVR_SCALER, batch, 0, config, None)
    reference = {k: v.clone() for k, v in model.reference.state_dict().items()}
    policy = {k: v.clone() for k, v in model.llm.state_dict().items()}
    metrics = lvr.train_step(model, opt, LVR_SCALER, model.task.train_batch(1, 4), 1, config, None)
    assert all(torch.equal(reference[k], v) for k, v in model.reference.state_dict().items())
    assert not any(p.requires_grad for p in model.reference.parameters())
    assert any(not torch.equal(policy[k], v) for k, v in model.llm.state_dict().items())
    assert {"spread_groups", "pass@4", "latent_steps"} <= metrics.keys() and 0 <= metrics["spread_groups"] <= 1
    # the RL questions: fresh scenes, deterministic in the step, never one of the SFT pool or the held-out set
    assert LVR_TASK.fresh_stream is None and model.task.fresh_stream is not None
    assert torch.equal(model.task.fresh_batch(5, 0, 4)["image"], batch["image"])
    assert not torch.equal(batch["image"], LVR_TASK.train_batch(0, 4)["image"])
    held_out = vqa_data.sample_scenes(np.random.default_rng([0, 2]), len(LVR_TASK.test_sets["held-out"]["answer"]))
    assert model.task._seen == set(vqa_data.scene_keys(LVR_TASK.train_scenes)) | set(vqa_data.scene_keys(held_out))
    task = copy.copy(LVR_TASK)
    task._seen = set()
    first = vqa_data.sample_scenes(np.random.default_rng([0, 5, 0]), 8)                # what the stream draws first
    assert torch.equal(task.fresh_batch(5, 0, 8)["question"], torch.from_numpy(vqa_data.ask(first)[0]))
    task._seen = set(vqa_data.scene_keys(first))                                       # now all of them are seen
    assert not (task.fresh_batch(5, 0, 8)["box"] == torch.from_numpy(vqa_data.ask(first)[2])).all((1, 2)).any()


def test_lvr_rewards_add_format_and_accuracy_by_hand():
    S, E, eos = LVR_TASK.lvr_start_id, LVR_TASK.lvr_end_id, LVR_TASK.eos_id
    right, wrong = LVR_TASK.stoi["circle"], LVR_TASK.stoi["square"]
    rollout = lvr_rollout([[S, None, E, right, eos],          # r = 1 + 1
                           [S, None, None, E, right, eos],    # ended by the cap: r = 0 + 1
                           [S, None, E, wrong, eos],          # r = 1 + 0
                           [right, eos],                      # no latent segment: r = 0 + 1
                           [S, None, E, wrong]])              # r = 0 + 0
    rollout["capped"][1, 3] = True
    reward, has_format, correct = lvr.rewards(rollout, torch.full((5, 1), right), LVR_TASK)
    assert reward.tolist() == [2.0, 1.0, 1.0, 1.0, 0.0]
    assert has_format.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0] and correct.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]

# ============================================================================= lit.py
class LitFakeTask:
    """Just what build_model needs (the real tasks live in sudoku_data)."""

    def __init__(self, name):
        self.name = name


def lit_tiny_config(**overrides):
    base = dict(d_model=16, n_heads=2, n_layers=1, train_thinking_steps=3, batch_size=8, eval_batch_size=8,
                eval_steps=(1, 3))
    return lit.Config(**{**base, **overrides})


def lit_tiny_sudoku(n, blanks, seed=0):
    """n valid solutions (digit relabel + row/col permutations of a pattern) and puzzles with `blanks` holes."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(9)
    pattern = (3 * (r[:, None] % 3) + r[:, None] // 3 + r[None, :]) % 9  # (9, 9) valid grid of 0..8
    solutions = []
    for _ in range(n):
        rows = torch.cat([b * 3 + torch.randperm(3, generator=g) for b in torch.randperm(3, generator=g)])
        cols = torch.cat([b * 3 + torch.randperm(3, generator=g) for b in torch.randperm(3, generator=g)])
        relabel = torch.randperm(9, generator=g) + 1
        solutions.append(relabel[pattern[rows][:, cols]].reshape(81))
    solution = torch.stack(solutions)  # (n, 81) digits 1..9
    holes = torch.rand(n, 81, generator=g).argsort(-1)[:, :blanks]
    puzzle = solution.scatter(1, holes, 0)
    return {"puzzle": puzzle, "solution": solution}


def lit_with_images(batch, seed=0):
    """Fake MNIST cells: a fixed random 28x28 pattern per digit plus noise; blank = zeros."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 28, 28, generator=g)
    solution_images = prototypes[batch["solution"]] + 0.1 * torch.rand(*batch["solution"].shape, 28, 28, generator=g)
    given = (batch["puzzle"] > 0).float()[..., None, None]
    return {**batch, "puzzle_images": solution_images * given, "solution_images": solution_images}


def lit_make(task_name="sudoku", **overrides):
    torch.manual_seed(0)
    config = lit_tiny_config(**overrides)
    model = lit.build_model(config, LitFakeTask(task_name))
    return model, config


def lit_student(model, batch, steps):
    """The one trajectory's logits after every step, each (B, 81, 9)."""
    return [x[0] for x in lit.think(model, batch, steps).logits]


def lit_no_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


@pytest.mark.parametrize("task_name", ["sudoku", "visual"])
def test_lit_teacher_observations_never_reach_the_student(task_name):
    model, _ = lit_make(task_name, ema_teacher=0.5)
    batch = lit_tiny_sudoku(2, 40)
    batch = lit_with_images(batch) if task_name == "visual" else batch
    perturbed = dict(batch, solution=(batch["solution"] % 9) + 1)  # a different (wrong) answer
    if task_name == "visual":
        perturbed["solution_images"] = torch.rand_like(batch["solution_images"])
    student, student_perturbed = lit_student(model, batch, 3), lit_student(model, perturbed, 3)
    assert all(torch.equal(a, b) for a, b in zip(student, student_perturbed))
    order, state = torch.rand(2, 81), torch.randn(2, 81, 16)
    teacher, teacher_perturbed = (lit.teacher_update(model, state, *model.observe(b, teacher=True), b["puzzle"],
                                                     order, 1)[0]
                                  for b in (batch, perturbed))
    assert not torch.equal(teacher, teacher_perturbed)  # the hints do reach the teacher


def test_lit_visual_and_language_share_the_belief_network():
    language, _ = lit_make("sudoku")
    visual, _ = lit_make("visual")
    for model in (language, visual):
        assert type(model.teacher) is lit.BeliefUpdate and type(model.student) is lit.BeliefUpdate
    assert language.teacher.state_dict().keys() == visual.teacher.state_dict().keys()
    assert type(language.encoder) is not type(visual.encoder)  # only the observation encoder differs
    wide, _ = lit_make("visual", cnn_channels=16)
    assert [conv.out_channels for conv in wide.encoder.cnn if isinstance(conv, torch.nn.Conv2d)] == [16, 32]


def test_lit_tiny_model_learns_tiny_sudoku_set():
    model, config = lit_make(d_model=32, n_heads=2, n_layers=1, train_thinking_steps=2, lr=1e-2, warmup_steps=0)
    data = lit_tiny_sudoku(4, 6)
    optimizer = lit.make_optimizer(model, config)
    first = lit.train_step(model, optimizer, lit_no_scaler(), data, 0, config, None)
    for step in range(1, 25):
        last = lit.train_step(model, optimizer, lit_no_scaler(), data, step, config, None)
    assert last["ce_student"] < 0.3 * first["ce_student"]
    prediction = lit_student(model, data, config.train_thinking_steps)[-1].argmax(-1) + 1  # (4, 81)
    assert (prediction == data["solution"]).float().mean() > 0.95


def test_lit_bf16_autocast_train_step_on_cpu():
    model, config = lit_make("visual")
    batch = lit_with_images(lit_tiny_sudoku(2, 30))
    optimizer = lit.make_optimizer(model, config)
    before, full_precision = copy.deepcopy(model.state_dict()), copy.deepcopy(model)
    torch.manual_seed(0)
    out = lit.train_step(model, optimizer, lit_no_scaler(), batch, 0, config, torch.bfloat16)
    assert all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(0)  # the same step in fp32 (the attention runs in fp32 on the CPU either way)
    reference = lit.train_step(full_precision, lit.make_optimizer(full_precision, config), lit_no_scaler(), batch, 0,
                               config, None)
    assert out["loss"].item() == pytest.approx(reference["loss"].item(), rel=2e-2)
    assert out["loss"].item() != reference["loss"].item()  # the bf16 products did run


def test_lit_train_step_randomness_comes_from_the_global_rng():
    model, config = lit_make(stochastic=True)
    twin = copy.deepcopy(model)
    batch = lit_tiny_sudoku(4, 30)
    outs = []
    for m in (model, twin):
        torch.manual_seed(123)
        outs.append(lit.train_step(m, lit.make_optimizer(m, config), lit_no_scaler(), batch, 0, config, None)["loss"])
    assert torch.equal(outs[0], outs[1])


def test_lit_no_imagination_ablation_has_no_teacher_terms():
    model, config = lit_make(no_imagination=True)
    calls = []
    hook = model.student.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    losses = lit.lit_loss(model, lit_tiny_sudoku(4, 30), config)
    hook.remove()
    assert losses["imagination"] == 0 and losses["ce_student"] > 0 and losses["loss"] == losses["ce_student"]
    assert calls == [4] * config.train_thinking_steps  # the student's steps only: no teacher step on the same network


def test_lit_bad_input_raises_value_error():
    model, config = lit_make()
    optimizer = lit.make_optimizer(model, config)
    good = lit_tiny_sudoku(2, 30)
    bad_batches = [
        {"puzzle": good["puzzle"][:, :80], "solution": good["solution"]},        # wrong length
        {"puzzle": good["puzzle"] + 10, "solution": good["solution"]},           # digit out of range
        {"puzzle": good["puzzle"]},                                              # no solution
    ]
    for bad in bad_batches:
        with pytest.raises(ValueError):
            lit.train_step(model, optimizer, lit_no_scaler(), bad, 0, config, None)
    visual, _ = lit_make("visual")
    with pytest.raises(ValueError, match="puzzle_images"):
        lit.train_step(visual, lit.make_optimizer(visual, config), lit_no_scaler(), good, 0, config, None)
    with pytest.raises(ValueError):
        lit.build_model(config, LitFakeTask("text"))
    for bad_field in (dict(d_model=30, n_heads=4), dict(recursion="pixels"), dict(grad_clip=0.0),
                      dict(teacher_share=0.0), dict(teacher_share=1.5), dict(ema_teacher=1.0), dict(ema_teacher=-0.1),
                      dict(cnn_channels=0), dict(train_thinking_steps=0), dict(restarts=0), dict(restart_noise=-0.1),
                      dict(n_diverse=0), dict(restart_noise=float("nan")), dict(eval_batch_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad_field))) as error:
            lit.build_model(lit_tiny_config(**bad_field), LitFakeTask("sudoku"))
        assert "\n" not in str(error.value)


@pytest.mark.skipif(not MNIST_DIR.exists(), reason=f"MNIST not found at {MNIST_DIR}")
def test_lit_visual_task_with_real_mnist(tmp_path):
    task = sudoku_data.VisualSudokuTask("easy", seed=0, base_size=16, eval_size=4, data_dir=str(tmp_path),
                                        mnist_dir=str(MNIST_DIR))
    config = lit_tiny_config()
    model = lit.build_model(config, task)
    optimizer = lit.make_optimizer(model, config)
    out = lit.train_step(model, optimizer, lit_no_scaler(), task.train_batch(0, 4), 0, config, None)
    assert torch.isfinite(out["loss"])
    rows = lit.evaluate(model, task, config, (1, 2), None)
    assert len(rows) == 2 * len(task.test_sets) and "exact %" in rows[0]
    assert "teacher exact %" not in rows[0]  # with hints up to the full solution it measures nothing


def lit_two_solution_puzzle():
    """(puzzle (81,), solution A (81,), solution B (81,)): a valid grid with one unavoidable rectangle
    (four cells a b / b a in two boxes) blanked, so exactly those two completions exist."""
    solution = torch.from_numpy(sudoku_data.generate_puzzles(1, "easy", seed=0, workers=1)[1][0]).long().view(9, 9)
    for r1, r2, c1, c2 in ((r1, r2, c1, c2) for r1 in range(9) for r2 in range(r1 + 1, 9)
                           for c1 in range(9) for c2 in range(c1 + 1, 9)):
        same_band, same_stack = r1 // 3 == r2 // 3, c1 // 3 == c2 // 3
        a, b = solution[r1, c1], solution[r1, c2]
        if same_band != same_stack and solution[r2, c2] == a and solution[r2, c1] == b:
            other = solution.clone()
            other[r1, c1], other[r1, c2], other[r2, c1], other[r2, c2] = b, a, a, b
            puzzle = solution.clone()
            puzzle[r1, c1] = puzzle[r1, c2] = puzzle[r2, c1] = puzzle[r2, c2] = 0
            return puzzle.reshape(81), solution.reshape(81), other.reshape(81)
    raise AssertionError("no unavoidable rectangle in this grid")


def test_lit_observation_recursion_passes_only_digit_distributions():
    """Each step's input state is the previous step's decoded distributions, re-embedded: in the test rollout and in
    training, where the teacher steps from the same state (latent mode passes the belief instead)."""
    for recursion in ("observation", "latent"):
        model, config = lit_make(recursion=recursion, ema_teacher=0.5, teacher_share=1.0)
        batch = lit_tiny_sudoku(2, 40)
        seen = {"student": [], "teacher": []}  # (input state, output mean) per update call
        hooks = [getattr(model, role).register_forward_hook(
            lambda module, args, out, role=role: seen[role].append((args[0], out[0].detach())))
            for role in seen]
        logits = lit_student(model, batch, 3)
        lit.lit_loss(model, batch, config)
        for hook in hooks:
            hook.remove()
        T = config.train_thinking_steps
        training = seen["student"][-T:]
        states = [state for state, _ in training[1:]]
        if recursion == "latent":  # truncated backprop: no gradient path from one step into the previous one
            assert not any(state.requires_grad for state in states)
        else:  # ... except into the read-back map itself
            earlier = list(model.student.parameters()) + [model.decoder.weight]
            for state in states:
                assert all(g is None for g in torch.autograd.grad(state.sum(), earlier, allow_unused=True,
                                                                  retain_graph=True))
        for calls in (seen["student"][:3], training):
            for (_, before), (state, _) in zip(calls, calls[1:]):
                read_back = model.readback(model.decode(before).softmax(-1)) if model.readback is not None else None
                assert (torch.allclose(state.detach(), read_back, atol=1e-6) if recursion == "observation"
                        else torch.equal(state, before))
        assert all(torch.equal(t, s) for (t, _), (s, _) in zip(seen["teacher"], training))  # the same carried state
        if recursion == "observation":
            uniform = model.readback(torch.full((2, 81, 9), 1 / 9))
            assert torch.allclose(seen["student"][0][0], uniform) and model.belief_init is None
            assert torch.allclose(seen["student"][1][0], model.readback(logits[0].softmax(-1)), atol=1e-6)


def test_lit_segments_backpropagate_through_their_steps_and_supervise_their_ends():
    """segment_steps k: the state passed inside a segment keeps its graph (the loss at the segment's end
    reaches the segment's first update), it is detached between segments, and the student's CE is the
    mean over the T / k segment ends of think()'s logits."""
    model, config = lit_make(train_thinking_steps=4, segment_steps=2, no_imagination=True)
    batch = lit_tiny_sudoku(2, 40)
    states = []
    hook = model.student.register_forward_hook(lambda module, args, out: states.append(args[0]))
    losses = lit.lit_loss(model, batch, config)
    hook.remove()
    assert [state.requires_grad for state in states[1:]] == [True, False, True]  # inside, cut, inside (b_0 is learned)
    first_update = model.student.blocks[0].mlp.up.weight
    segment_two_only = torch.autograd.grad(states[3].sum(), first_update, retain_graph=True)[0]
    assert segment_two_only.abs().sum() > 0  # the second segment's inner state reaches its own first update
    target = batch["solution"] - 1
    logits = lit_student(model, batch, 4)
    ends = torch.stack([torch.nn.functional.cross_entropy(logits[t].transpose(1, 2), target) for t in (1, 3)]).mean()
    assert losses["ce_student"].item() == pytest.approx(ends.item(), rel=1e-5)
    for bad in (0, 3):  # must divide train_thinking_steps
        with pytest.raises(ValueError, match="segment_steps"):
            lit.build_model(lit_tiny_config(train_thinking_steps=4, segment_steps=bad), LitFakeTask("sudoku"))


def test_lit_gradients_are_clipped_to_grad_clip():
    """With plain SGD (lr 1) the update is the clipped gradient: every trained weight together moves by grad_clip."""
    model, config = lit_make(grad_clip=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    lit.train_step(model, sgd, lit_no_scaler(), lit_tiny_sudoku(2, 40), 0, config, None)
    moved = sum((p.detach() - before[name]).pow(2).sum().item() for name, p in model.named_parameters())
    assert moved ** 0.5 == pytest.approx(1e-3, rel=1e-3)


def test_lit_multi_solution_generator_gives_puzzles_with_several_solutions():
    puzzles, solutions, _ = sudoku_data.generate_puzzles(3, "easy", seed=5, workers=1)
    multi = sudoku_data.multi_solution_puzzles(puzzles, seed=1)
    assert multi.shape == puzzles.shape
    for reduced, unique, solution in zip(multi, puzzles, solutions):
        assert sudoku_data.solve(unique, limit=2)[0] == 1
        assert sudoku_data.solve(reduced, limit=2)[0] == 2  # at least two solutions
        assert np.all((reduced == 0) | (reduced == unique)) and (reduced > 0).sum() < (unique > 0).sum()
    assert np.array_equal(multi, sudoku_data.multi_solution_puzzles(puzzles, seed=1))  # deterministic in the seed


def test_lit_student_per_step_cross_entropies_are_its_test_rollouts():
    """Deep supervision: lit_loss's student CE is the mean over all T steps of the CE of think()'s logits (hint-free,
    so no hint reaches the student in training, while the teacher runs beside it)."""
    model, config = lit_make(train_thinking_steps=4, teacher_share=1.0)
    batch = lit_tiny_sudoku(2, 40)
    target = batch["solution"] - 1

    def mean_ce(logits):
        return torch.stack([torch.nn.functional.cross_entropy(x.transpose(1, 2), target) for x in logits]).mean()

    losses = lit.lit_loss(model, batch, config)
    student = lit_student(model, batch, config.train_thinking_steps)
    assert losses["imagination"] > 0  # the teacher did run
    assert losses["ce_student"].item() == pytest.approx(mean_ce(student).item(), rel=1e-5)
    assert not torch.allclose(mean_ce(student), mean_ce(student[-1:]))  # the steps differ, so the check has teeth


def test_lit_stochastic_samples_differ_by_seed_and_are_scored_as_valid_solutions():
    model, _ = lit_make(stochastic=True)
    puzzle, solution_a, solution_b = lit_two_solution_puzzle()
    assert sudoku_data.solve(puzzle, limit=3)[0] == 2
    batch = {"puzzle": puzzle[None], "solution": solution_a[None]}
    first, again, other = (lit.sample_grids(model, batch, 3, seed=s)[-1] for s in (1, 1, 2))
    assert first.shape == (lit.N_SAMPLES, 1, 81) and torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(lit.sample_grids(model, batch, 3, seed=1)[0], first)  # one grid per step
    assert len({tuple(grid.tolist()) for grid in first[:, 0]}) > 1  # the samples differ from each other
    wrong = solution_a % 9 + 1  # a valid grid (digits relabelled) that breaks the givens
    grids = torch.stack([solution_a, solution_b, solution_a, wrong, puzzle])[:, None]  # (5, 1, 81)
    assert lit.diversity(grids, puzzle[None]) == pytest.approx({"valid samples %": 60.0,
                                                                "distinct valid solutions": 2.0})


@pytest.mark.parametrize("stochastic", [False, True])
def test_lit_loss_is_the_sum_of_its_terms_computed_by_hand(stochastic):
    """L = Σ_t [CE_S + β·||b^S − sg(b^T)||²] / T (or β·KL(sg(q_T) || p_S), summed over d, averaged over cells)."""
    model, config = lit_make(stochastic=stochastic, imagination_weight=0.7, ema_teacher=0.5, teacher_share=1.0)
    outputs = {"student": [], "teacher": []}  # (mean, std) of every update
    hooks = [getattr(model, role).register_forward_hook(lambda module, args, out, role=role: outputs[role].append(out))
             for role in outputs]
    losses = lit.lit_loss(model, lit_tiny_sudoku(2, 40), config)
    for hook in hooks:
        hook.remove()
    by_hand = 0.0
    for (mean_s, std_s), (mean_t, std_t) in zip(outputs["student"], outputs["teacher"]):
        if stochastic:
            var_s, var_t = std_s ** 2, std_t ** 2
            kl = 0.5 * (var_t / var_s + (mean_t - mean_s) ** 2 / var_s - 1 + torch.log(var_s / var_t))
            by_hand += kl.sum(-1).mean().item()
        else:
            by_hand += (mean_s - mean_t).pow(2).mean().item()
    T = config.train_thinking_steps
    assert len(outputs["student"]) == len(outputs["teacher"]) == T
    assert losses["imagination"].item() == pytest.approx(by_hand / T, rel=1e-4)
    assert losses["loss"].item() == pytest.approx((losses["ce_student"] + 0.7 * losses["imagination"]).item(), rel=1e-5)
    assert all(v.dim() == 0 and not v.requires_grad for k, v in losses.items() if k != "loss")
    assert losses["loss"].requires_grad


def test_lit_hint_schedule_and_sampling():
    """The teacher sees the solution cells whose random rank is below t / (T − 1): none at t = 0, all from the last
    training step on (here T = 5, ranks i / 81)."""
    model, _ = lit_make(train_thinking_steps=5)
    batch = {"puzzle": torch.zeros(1, 81, dtype=torch.long), "solution": lit_tiny_sudoku(1, 0)["solution"]}
    seen = []
    hook = model.student.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    for t in range(7):
        lit.teacher_update(model, model.initial_belief(1), *model.observe(batch, teacher=True), batch["puzzle"],
                           (torch.arange(81.0) / 81)[None], t)
    hook.remove()
    blank = model.observe(batch, teacher=False)[0]
    assert [int((~torch.isclose(s, blank).all(-1)).sum()) for s in seen] == [0, 21, 41, 61, 81, 81, 81]
    mean, std = torch.randn(3, 81, 4), torch.rand(3, 81, 4) + 0.1
    torch.manual_seed(1)
    drawn = lit.sample_belief(mean, std, sample=True)
    torch.manual_seed(1)
    assert torch.allclose(drawn, mean + std * torch.randn(3, 81, 4))  # b = μ + σ·ε
    assert torch.equal(lit.sample_belief(mean, std, sample=False), mean)
    generators = [torch.Generator().manual_seed(s) for s in (4, 5, 6)]  # row b from its own generator
    drawn = lit.sample_belief(mean, std, True, generators)
    assert torch.allclose(drawn[1], mean[1] + std[1] * torch.randn(81, 4, generator=torch.Generator().manual_seed(5)))


def test_lit_peer_mask_and_belief_normalisation():
    peers = lit.sudoku_peers()
    assert torch.equal(peers, peers.T) and torch.all(peers.sum(1) == 21)  # 8 + 8 + 4 others, and itself
    assert peers[0, 8] and peers[0, 72] and peers[0, 20] and not peers[0, 21] and not peers[0, 30]
    model, _ = lit_make(n_layers=1)
    x = torch.randn(2, 81, 16)
    changed = x.clone()
    changed[:, 80] += 5.0  # cell 80 (row 8, column 8, box 8) is no peer of cell 0
    first, second = model.student.blocks[0](x), model.student.blocks[0](changed)
    assert torch.allclose(first[:, 0], second[:, 0], atol=1e-6) and not torch.allclose(first[:, 8], second[:, 8])
    mean, _ = model.student(3.0 * torch.randn(2, 81, 16), torch.randn(2, 81, 16))
    assert torch.allclose(mean.pow(2).mean(-1), torch.ones(2, 81), atol=1e-3)  # RMS-normalised (weight 1 at init)


def test_lit_stochastic_evaluate_reports_diversity_on_multi_solution_sets():
    puzzles, solutions, _ = sudoku_data.generate_puzzles(3, "easy", seed=3, workers=1)
    test_set = {"puzzle": torch.from_numpy(puzzles).long(), "solution": torch.from_numpy(solutions).long()}
    task = SimpleNamespace(name="sudoku", test_sets={"easy": test_set})
    config = lit_tiny_config(stochastic=True, n_diverse=2)
    model = lit.build_model(config, task)
    rows = lit.evaluate(model, task, config, (1, 3), None)
    assert [r["thinking steps"] for r in rows] == [1, 3]
    assert all(0 <= r["valid samples %"] <= 100 and 0 <= r["distinct valid solutions"] <= lit.N_SAMPLES for r in rows)
    multi = lit.multi_solution_set(test_set, 2)
    assert len(multi["puzzle"]) == 2 and all(sudoku_data.solve(p, limit=2)[0] == 2 for p in multi["puzzle"].numpy())


@pytest.mark.parametrize("task_name", ["sudoku", "visual"])
def test_lit_self_teacher_is_the_student_network_reading_hints_as_givens(task_name):
    """At decay 0 the teacher has no network of its own: its step is U_S on the puzzle with the revealed solution
    cells filled in as givens, computed without gradient."""
    model, config = lit_make(task_name)
    assert model.teacher is model.student and all(p.requires_grad for p in model.parameters())
    batch = lit_tiny_sudoku(2, 40)
    batch = lit_with_images(batch) if task_name == "visual" else batch
    puzzle_emb, solution_emb, blank_emb = model.observe(batch, teacher=True)
    order, state = torch.rand(2, 81), torch.randn(2, 81, config.d_model)
    mean, _ = lit.teacher_update(model, state, puzzle_emb, solution_emb, blank_emb, batch["puzzle"], order, 1)  # half
    given = torch.where(order < 0.5, batch["solution"], batch["puzzle"])  # (2, 81) the puzzle with the hints as givens
    assert (given > 0).sum() > (batch["puzzle"] > 0).sum() + 20  # the hints did add givens
    easier = dict(batch, puzzle=given)
    if task_name == "visual":
        easier["puzzle_images"] = batch["solution_images"] * (given > 0)[..., None, None]
    expected, _ = model.student(state, model.observe(easier, teacher=False)[0])
    assert torch.allclose(mean, expected, atol=1e-5) and not mean.requires_grad
    losses = lit.lit_loss(model, batch, config)
    assert losses["imagination"] > 0


@pytest.mark.parametrize("ema_teacher", [0.0, 0.9])
def test_lit_teacher_share_sets_the_rows_the_teacher_steps_from(ema_teacher):
    """teacher_share 0.25: the teacher runs on the first quarter of the batch (and costs less), stepping from the
    student's current belief."""
    model, config = lit_make(ema_teacher=ema_teacher, teacher_share=0.25)
    batch = lit_tiny_sudoku(8, 40)
    calls = {"teacher": [], "student": []}  # input states per update call
    hooks = [getattr(model, role).register_forward_hook(
                 lambda module, args, out, role=role: calls[role].append(args[0]))
             for role in ("teacher", "student")]
    lit.lit_loss(model, batch, config)
    for hook in hooks:
        hook.remove()
    if not ema_teacher:  # one module in both roles: the calls alternate teacher (2 rows), student (8 rows)
        calls = {"teacher": calls["student"][0::2], "student": calls["student"][1::2]}
    assert [s.shape[0] for s in calls["teacher"]] == [2] * config.train_thinking_steps
    assert [s.shape[0] for s in calls["student"]] == [8] * config.train_thinking_steps
    assert all(torch.equal(t, s[:2]) for t, s in zip(calls["teacher"], calls["student"]))
    full = dataclasses.replace(config, teacher_share=1.0)
    from torch.utils.flop_counter import FlopCounterMode

    def loss_flops(config):  # one step's forward and backward: the teacher on a share of the batch costs less
        with FlopCounterMode(display=False) as counter:
            lit.lit_loss(model, batch, config)["loss"].backward()
        return counter.get_total_flops()
    assert loss_flops(config) < loss_flops(full)


def test_lit_ema_teacher_is_the_average_of_the_students_past_weights():
    """θ_T after k steps = d^k θ_S(0) + Σ_i (1 − d) d^(k−i) θ_S(i), θ_S(i) the student after step i; the
    optimizer never moves the teacher's copy, and the teacher is what steps in the teacher's role."""
    decay = 0.6
    model, config = lit_make(ema_teacher=decay)
    assert model.teacher is not model.student and not any(p.requires_grad for p in model.teacher.parameters())
    optimizer = lit.make_optimizer(model, config)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]}.isdisjoint(
        map(id, model.teacher.parameters()))
    batch = lit_tiny_sudoku(4, 40)
    history = [[p.detach().clone() for p in model.student.parameters()]]  # θ_S(0), ..., θ_S(k)
    for step in range(3):
        lit.train_step(model, optimizer, lit_no_scaler(), batch, step, config, None)
        history.append([p.detach().clone() for p in model.student.parameters()])
    k = len(history) - 1
    for i, teacher in enumerate(model.teacher.parameters()):
        average = decay ** k * history[0][i] + sum((1 - decay) * decay ** (k - s) * history[s][i]
                                                   for s in range(1, k + 1))
        assert torch.allclose(teacher, average, atol=1e-6)
    assert not all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.student.parameters()))
    calls = []
    hook = model.teacher.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    lit.lit_loss(model, batch, config)
    hook.remove()
    assert calls == [1] * config.train_thinking_steps  # a quarter of 4 examples, every step


@pytest.mark.parametrize("ema_teacher,stochastic", [(0.0, False), (0.9, False), (0.9, True)])
def test_lit_teacher_targets_carry_no_gradient_into_the_student(ema_teacher, stochastic):
    """The teacher steps from the student's belief through the shared encoder, so a target with a graph would send
    gradient back into the student along the teacher's path. The imagination term's gradient (L at β = 1 minus L at
    β = 0, the same draws) equals that of Σ_t ||b^S_{t+1} − c_t||² / T (or Σ_t KL(c_t || p_S) / T) with the
    teacher's outputs c_t as constants; the EMA teacher's own weights get no gradient at all."""
    model, config = lit_make(ema_teacher=ema_teacher, teacher_share=1.0, stochastic=stochastic)
    batch = lit_tiny_sudoku(2, 40)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for beta in (1.0, 0.0):
        outputs = {"teacher": [], "student": []}
        hooks = [model.student.register_forward_hook(lambda module, args, out: outputs["student"].append(out))]
        if ema_teacher:
            hooks.append(model.teacher.register_forward_hook(lambda module, args, out: outputs["teacher"].append(out)))
        torch.manual_seed(5)
        loss = lit.lit_loss(model, batch, dataclasses.replace(config, imagination_weight=beta))["loss"]
        for hook in hooks:
            hook.remove()
        if not ema_teacher:  # one module in both roles: teacher, student, teacher, ...
            outputs = {"teacher": outputs["student"][0::2], "student": outputs["student"][1::2]}
        if beta:
            T = config.train_thinking_steps
            if stochastic:
                terms = [torch.distributions.kl_divergence(torch.distributions.Normal(mt.detach(), st.detach()),
                                                           torch.distributions.Normal(ms, ss)).sum(-1).mean()
                         for (ms, ss), (mt, st) in zip(outputs["student"], outputs["teacher"])]
            else:
                terms = [(s[0] - t[0].detach()).pow(2).mean() for s, t in zip(outputs["student"], outputs["teacher"])]
            expected = torch.autograd.grad(sum(terms) / T, params, retain_graph=True, allow_unused=True)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    assert not any(t[0].requires_grad for t in outputs["teacher"])
    for with_beta, without, want in zip(*grads, expected):
        zero = torch.zeros(())
        got = (with_beta if with_beta is not None else zero) - (without if without is not None else zero)
        assert torch.allclose(got, want if want is not None else zero, atol=1e-6)
    assert any(w is not None and w.abs().max() > 0 for w in expected)  # the imagination term does train the student
    assert all(p.grad is None for p in model.teacher.parameters() if not p.requires_grad)


def test_lit_compile_builds_a_graph_for_the_training_step_and_the_thinking_loop():
    """train.py's --compile calls model.compile(), which compiles forward only: forward must be the thinking step that
    lit_loss and think run, so that a compiled training step and evaluation build graphs."""
    from torch._dynamo.testing import CompileCounter
    model, config = lit_make(no_imagination=True, train_thinking_steps=1)
    torch._dynamo.reset()
    counter = CompileCounter()
    model.compile(backend=counter)
    batch = lit_tiny_sudoku(2, 40)
    lit.train_step(model, lit.make_optimizer(model, config), lit_no_scaler(), batch, 0, config, None)
    trained = counter.frame_count
    assert trained > 0
    lit.evaluate(model, SimpleNamespace(name="sudoku", test_sets={"tiny": batch}), config, (1,), None)
    assert counter.frame_count > trained  # evaluation (without gradient) runs the compiled step too
    torch._dynamo.reset()


# ---------------- lit: beyond the paper (restarts, the halting head, the oracle verifier)
def lit_tiny_restart_task(n=4, blanks=30):
    return SimpleNamespace(name="sudoku", test_sets={"tiny": lit_tiny_sudoku(n, blanks, seed=7)})


def lit_fake_thoughts(logits, halt=None, steps=None):
    """A stand-in for lit.think giving the same hand-built trajectories (K, B, ...) at every step."""
    def think(model, batch, thinking_steps, restarts=1, noise=0.0, threshold=0.0, sample=False, first=0, seed=0):
        b = batch["puzzle"].shape[0]
        used = torch.full((restarts, b), thinking_steps) if steps is None else steps[:, :b]
        return lit.Thoughts([logits[:, first:first + b]] * thinking_steps,
                            None if halt is None else [halt[:, first:first + b]] * thinking_steps, used)
    return think


def test_lit_one_restart_is_the_single_trajectory_and_noiseless_restarts_are_copies_of_it():
    model, config = lit_make()
    batch = lit_tiny_sudoku(3, 40)
    single = lit_student(model, batch, 3)
    one = lit.think(model, batch, 3, restarts=1, noise=0.5).logits  # K = 1: the noise never applies
    assert all(torch.equal(a[0], b) for a, b in zip(one, single))
    copies = lit.think(model, batch, 3, restarts=3, noise=0.0).logits
    assert all(torch.allclose(x[k], b, atol=1e-5) for x, b in zip(copies, single) for k in range(3))
    noisy = lit.think(model, batch, 3, restarts=3, noise=0.3).logits
    assert torch.allclose(noisy[-1][0], single[-1], atol=1e-5)  # trajectory 0 stays the student's own
    assert not torch.allclose(noisy[-1][1], noisy[-1][0], atol=1e-3)  # the others are pushed off it
    assert not torch.allclose(noisy[-1][2], noisy[-1][1], atol=1e-3)  # each by its own noise
    torch.manual_seed(99)
    again = lit.think(model, batch, 3, restarts=3, noise=0.3).logits
    assert torch.equal(again[-1], noisy[-1])  # the noise comes from its seed, not the global RNG
    # evaluate at K = 1 is the single trajectory's table, whatever the noise
    task = lit_tiny_restart_task()
    rows = lit.evaluate(model, task, dataclasses.replace(config, restart_noise=0.3), (1, 3), None)
    assert rows == lit.evaluate(model, task, config, (1, 3), None) and all("picked by" not in r for r in rows)
    test_set = task.test_sets["tiny"]
    answers = lit_student(model, test_set, 3)
    assert [r["blank-cell %"] for r in rows] == [
        sudoku_data.blank_accuracy(answers[s - 1].argmax(-1) + 1, test_set["puzzle"], test_set["solution"])
        for s in (1, 3)]


def test_lit_a_trajectory_is_the_same_at_any_eval_batch_size_and_whether_or_not_others_stop():
    """Noise drawn per puzzle and trajectory: puzzle 3's trajectories are the same run alone (as puzzle index 3), in a
    batch of 4, or beside trajectories that stop after one step; evaluate's rows do not change with eval_batch_size."""
    model, config = lit_make(halt_weight=0.5, restarts=3, restart_noise=0.5)
    batch = lit_tiny_sudoku(4, 40)
    together = lit.think(model, batch, 3, restarts=3, noise=0.5)
    alone = lit.think(model, {k: v[3:] for k, v in batch.items()}, 3, restarts=3, noise=0.5, first=3)
    assert all(torch.allclose(a[:, 3], b[:, 0], atol=1e-5) for a, b in zip(together.logits, alone.logits))
    shifted = lit.think(model, {k: v[3:] for k, v in batch.items()}, 3, restarts=3, noise=0.5, first=0)
    assert not torch.allclose(shifted.logits[-1][1:, 0], alone.logits[-1][1:, 0], atol=1e-3)  # the index matters
    def puzzles_0_to_2_stop(model, belief):  # h = σ(20) on puzzles 0-2's rows at the first step, σ(−20) elsewhere
        first_step = belief.shape[0] == 12
        return torch.where((torch.arange(belief.shape[0]) % 4 != 3) & first_step, 20.0, -20.0)
    original = lit.halt_logit
    try:
        lit.halt_logit = puzzles_0_to_2_stop
        stopped = lit.think(model, batch, 3, restarts=3, noise=0.5, threshold=0.9)
    finally:
        lit.halt_logit = original
    assert (stopped.steps[:, :3] == 1).all() and (stopped.steps[:, 3] == 3).all()
    assert all(torch.allclose(a[:, 3], b[:, 3], atol=1e-5) for a, b in zip(stopped.logits, together.logits))
    task = SimpleNamespace(name="sudoku", test_sets={"tiny": batch})
    by_size = [lit.evaluate(model, task, dataclasses.replace(config, eval_batch_size=size), (1, 3), None)
               for size in (3, 12)]
    assert by_size[0] == by_size[1] and len(by_size[0]) == 2 * 3


def test_lit_confidence_pick_is_the_argmax_of_a_direct_computation():
    """log p(argmax grid) over the blank cells, computed cell by cell with math.log; given cells do not count."""
    g = torch.Generator().manual_seed(1)
    K, B = 4, 3
    logits = torch.randn(K, B, 81, 9, generator=g) * 2
    puzzle = lit_tiny_sudoku(B, 30)["puzzle"]
    logits[3] = 0.99 * logits[0]  # trajectory 3: a little less sure than 0 of the blank cells ...
    logits[3, :, :, 0] += 50 * (puzzle != 0)  # ... and very sure of the given cells, which must not count
    direct = torch.zeros(K, B)
    for k in range(K):
        for b in range(B):
            for i in range(81):
                if puzzle[b, i] == 0:
                    row = [math.exp(v) for v in logits[k, b, i].tolist()]
                    direct[k, b] += math.log(max(row) / sum(row))
    assert torch.allclose(lit.confidence(logits, puzzle), direct, atol=1e-4)
    best = lit.pick_by_confidence(logits, puzzle)
    assert torch.equal(best, direct.argmax(0)) and (best != 3).all()


def test_lit_confidence_pick_needs_neither_the_rules_nor_the_solution(monkeypatch):
    model, config = lit_make()
    batch = lit_tiny_sudoku(4, 40)
    logits = lit.think(model, batch, 3, restarts=4, noise=0.5).logits
    expected = lit.pick_by_confidence(logits[-1], batch["puzzle"])
    assert len(set(expected.tolist())) > 1  # the pick does vary

    def unavailable(*args, **kwargs):
        raise RuntimeError("the rules' checker is unavailable")
    monkeypatch.setattr(sudoku_data, "broken_constraints", unavailable)
    puzzle_only = {"puzzle": batch["puzzle"]}  # no solution either
    logits = lit.think(model, puzzle_only, 3, restarts=4, noise=0.5).logits
    assert torch.equal(lit.pick_by_confidence(logits[-1], batch["puzzle"]), expected)
    with pytest.raises(RuntimeError, match="unavailable"):  # the oracle row does check the rules
        lit.evaluate(model, lit_tiny_restart_task(), dataclasses.replace(config, restarts=4, restart_noise=0.5),
                     (3,), None)


def test_lit_oracle_verifier_picks_a_grid_that_keeps_the_givens_and_breaks_no_rule():
    sudoku = lit_tiny_sudoku(3, 30)
    puzzle, solution = sudoku["puzzle"], sudoku["solution"]
    other = lit_tiny_sudoku(3, 30, seed=5)["solution"]  # valid grids, other givens
    broken = solution.clone()
    broken[:, [0, 1]] = broken[:, [1, 0]]  # two cells swapped: breaks columns
    grids = torch.stack([broken, other, solution])  # (K=3, B=3, 81)
    grids[2, 1] = broken[1]  # puzzle 1: no valid trajectory
    fallback = torch.tensor([0, 1, 0])
    assert lit.oracle_verifier_pick(grids, puzzle, fallback).tolist() == [2, 1, 2]


def lit_two_puzzles_two_trajectories():
    """Hand-built logits (K=2, B=2): puzzle 0's right grid is the less confident trajectory 1, puzzle 1's right grid
    the more confident trajectory 0."""
    task = lit_tiny_restart_task(n=2)
    test_set = task.test_sets["tiny"]
    wrong = test_set["solution"] % 9 + 1  # every cell wrong
    grids = torch.stack([torch.stack([wrong[0], test_set["solution"][1]]),
                         torch.stack([test_set["solution"][0], wrong[1]])])  # (K, B, 81)
    logits = torch.nn.functional.one_hot(grids - 1, 9).float() * torch.tensor([[4.0, 4.0], [2.0, 2.0]])[..., None, None]
    return task, logits


def test_lit_restart_rows_report_the_confidence_pick_the_oracle_and_the_flops(monkeypatch):
    """The model misses puzzle 0's right grid, the oracle finds it: 50 % and 100 % exact."""
    task, logits = lit_two_puzzles_two_trajectories()
    model, config = lit_make(restarts=2, restart_noise=0.1)
    seen = []

    def fake(model, batch, thinking_steps, restarts=1, noise=0.0, threshold=0.0, sample=False, first=0, seed=0):
        seen.append((restarts, noise, threshold, batch["puzzle"].shape[0]))
        return lit_fake_thoughts(logits)(model, batch, thinking_steps, restarts, first=first)
    monkeypatch.setattr(lit, "think", fake)
    rows = lit.evaluate(model, task, config, (1, 2), None)
    assert seen == [(2, 0.1, 0.0, 2)]
    assert [(r["thinking steps"], r["picked by"], r["exact %"]) for r in rows] == [
        (1, "confidence", 50.0), (1, "oracle verifier", 100.0), (2, "confidence", 50.0), (2, "oracle verifier", 100.0)]
    assert [r["test-time MFLOP per puzzle"] for r in rows[::2]] == [lit.test_time_flops(config, "sudoku", s, 2) / 1e6
                                                                     for s in (1, 2)]
    assert all(r["restarts"] == 2 for r in rows)


@pytest.mark.parametrize("variant", [dict(), dict(stochastic=True), dict(recursion="observation", no_imagination=True),
                                     dict(task="visual"), dict(halt_weight=0.5)])
def test_lit_test_time_flops_are_what_the_flop_counter_sees(variant):
    from torch.utils.flop_counter import FlopCounterMode
    variant = dict(variant)
    task_name = variant.pop("task", "sudoku")
    model, config = lit_make(task_name, **variant)
    batch = lit_tiny_sudoku(2, 40)
    batch = lit_with_images(batch) if task_name == "visual" else batch
    with FlopCounterMode(display=False, custom_mapping=train.ATTENTION_FLOPS) as counter:
        lit.think(model, batch, 3, restarts=2, noise=0.1)
    assert counter.get_total_flops() == 2 * lit.test_time_flops(config, task_name, 3, restarts=2)


# ---------------- lit: the halting head
def lit_flip(grid, cell):
    """grid (81,) with one cell's digit changed."""
    grid = grid.clone()
    grid[cell] = grid[cell] % 9 + 1
    return grid


def test_lit_halting_target_is_whether_the_current_answer_equals_the_solution():
    """Hand-made answers: all 81 cells right -> 1; one blank cell wrong -> 0; one given cell wrong -> 0 (the full
    grid, as exact % scores). lit_loss trains the head on it: with a bias-only head c = 0.3 and solutions set to
    the student's own step-1 answers on puzzles 0 and 1, the BCE is [2·softplus(−c) + 2·softplus(c)] / 4."""
    sudoku = lit_tiny_sudoku(3, 30)
    solution, puzzle = sudoku["solution"], sudoku["puzzle"]
    blank, given = (puzzle[1] == 0).nonzero()[0, 0], (puzzle[2] != 0).nonzero()[0, 0]
    answers = torch.stack([solution[0], lit_flip(solution[1], blank), lit_flip(solution[2], given)])
    logits = 3 * torch.nn.functional.one_hot(answers - 1, 9).float() + 0.1 * torch.randn(3, 81, 9)  # argmax: answers
    assert lit.halting_target(logits, solution).tolist() == [1.0, 0.0, 0.0]

    model, config = lit_make(train_thinking_steps=1, halt_weight=0.5)
    batch = lit_tiny_sudoku(4, 40)
    own = lit_student(model, batch, 1)[0].argmax(-1) + 1  # (4, 81) the student's answers after one step
    assert not (own[2:] == batch["solution"][2:]).all(-1).any()
    batch["solution"][:2] = own[:2]
    with torch.no_grad():
        model.halt_head.weight.zero_()
        model.halt_head.bias.fill_(0.3)
    torch.manual_seed(0)
    losses = lit.lit_loss(model, batch, config)
    by_hand = (2 * math.log1p(math.exp(-0.3)) + 2 * math.log1p(math.exp(0.3))) / 4
    assert losses["halt_bce"].item() == pytest.approx(by_hand, rel=1e-5)
    assert losses["answers_right"].item() == 0.5 and losses["halt_accuracy"].item() == 0.5  # h > 0.5 on all four
    torch.manual_seed(0)
    without = lit.lit_loss(model, batch, dataclasses.replace(config, halt_weight=0.0))["loss"]
    assert (losses["loss"] - without).item() == pytest.approx(0.5 * by_hand, rel=1e-4)


def test_lit_halting_target_carries_no_gradient_into_the_student():
    """The halting term's gradient (L with w = 1 minus L with w = 0, the same draws) reaches the head and, through
    the belief the head reads, the student's U; never the decoder D, which only the target reads (a target that
    carried gradient, e.g. the probability of the argmax grid, would train D)."""
    model, config = lit_make(halt_weight=1.0, train_thinking_steps=2)
    with torch.no_grad():
        model.halt_head.weight.normal_()  # a head that reads the belief (it starts at weight 0)
    batch = lit_tiny_sudoku(2, 40)
    names, params = zip(*model.named_parameters())
    grads = []
    for weight in (1.0, 0.0):
        torch.manual_seed(0)
        loss = lit.lit_loss(model, batch, dataclasses.replace(config, halt_weight=weight))["loss"]
        grads.append([g if g is not None else torch.zeros_like(p)
                      for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)])
    halt_term = {n: a - b for n, a, b in zip(names, *grads)}
    assert all(torch.equal(g, torch.zeros_like(g)) for n, g in halt_term.items() if n.startswith("decoder."))
    assert halt_term["halt_head.weight"].abs().max() > 0
    assert any(g.abs().max() > 0 for n, g in halt_term.items() if n.startswith("student."))


def test_lit_halting_trajectories_are_the_restarts_and_one_with_the_halting_pick_is_the_single_trajectory():
    model, config = lit_make(halt_weight=0.5)
    batch = lit_tiny_sudoku(3, 40)
    single = lit_student(lit_make()[0], batch, 3)  # the same weights without a head
    thoughts = lit.think(model, batch, 3, restarts=1, noise=0.5)
    assert all(torch.equal(a[0], b) for a, b in zip(thoughts.logits, single)) and (thoughts.steps == 3).all()
    assert len(thoughts.halt) == 3 and thoughts.halt[0].shape == (1, 3)
    assert (lit.pick_trajectory("halting head", thoughts, 3, batch["puzzle"]) == 0).all()
    task = lit_tiny_restart_task()
    rows = lit.evaluate(model, task, dataclasses.replace(config, restart_noise=0.3), (1, 3), None)
    assert rows == lit.evaluate(model, task, config, (1, 3), None) and all("picked by" not in r for r in rows)
    assert all(0 <= r["halting head accuracy %"] <= 100 for r in rows)


def test_lit_restart_rows_of_a_model_with_a_head_give_both_picks_on_the_same_trajectories(monkeypatch):
    """The head is surest of trajectory 1 on both puzzles: right on puzzle 0, wrong on puzzle 1. Expected: the
    confidence pick 50 %, the halting head's 50 % (the other puzzle), the oracle 100 %, from one pass."""
    task, logits = lit_two_puzzles_two_trajectories()
    test_set = task.test_sets["tiny"]
    model, config = lit_make(halt_weight=0.5, restarts=2, restart_noise=0.1)
    halt = torch.tensor([[0.2, 0.3], [0.9, 0.8]])  # (K, B): trajectory 1 surest on both puzzles
    calls = []

    def fake(model, batch, thinking_steps, restarts=1, *args, **kwargs):
        calls.append(restarts)
        return lit_fake_thoughts(logits, halt)(model, batch, thinking_steps, restarts)
    monkeypatch.setattr(lit, "think", fake)
    rows = lit.evaluate(model, task, config, (1, 2), None)
    assert calls == [2]
    assert [(r["thinking steps"], r["picked by"], r["exact %"]) for r in rows] == [
        (s, pick, exact) for s in (1, 2)
        for pick, exact in (("confidence", 50.0), ("halting head", 50.0), ("oracle verifier", 100.0))]
    by_pick = {r["picked by"]: r["blank-cell %"] for r in rows if r["thinking steps"] == 2}
    right_blank = sudoku_data.blank_accuracy(test_set["solution"][:1], test_set["puzzle"][:1], test_set["solution"][:1])
    assert by_pick["oracle verifier"] == right_blank == 100.0 and by_pick["halting head"] < 100.0
    # the head's accuracy: h > 0.5 against "the answer is right", over the 4 trajectories: right on 2 of them
    assert all(r["halting head accuracy %"] == 50.0 for r in rows)


def test_lit_halting_pick_is_the_argmax_of_the_heads_probability_and_needs_no_rules(monkeypatch):
    """h is σ(head(mean belief)) of each step, computed here puzzle by puzzle with the student's own pieces; the
    pick is the first trajectory of highest h (a double loop); unchanged when the rules' checker is unavailable."""
    model, config = lit_make(halt_weight=0.5)
    with torch.no_grad():
        model.halt_head.weight.normal_(std=30.0)  # spread h, so that the trajectories differ in it
    batch = lit_tiny_sudoku(3, 40)
    halt = lit.think(model, batch, 3, restarts=2, noise=0.0).halt
    with torch.no_grad():
        for b in range(3):
            emb, _, _ = model.observe({"puzzle": batch["puzzle"][b:b + 1]}, teacher=False)
            state = model.initial_belief(1)
            for t in range(3):
                state, _ = model.student(state, emb)
                h = torch.sigmoid(state.mean(1) @ model.halt_head.weight.T + model.halt_head.bias).item()
                assert halt[t][:, b].tolist() == pytest.approx([h, h], abs=1e-5)

    def slow_pick(h):
        best = []
        for b in range(h.shape[1]):
            top = 0
            for k in range(1, h.shape[0]):
                top = k if h[k, b] > h[top, b] else top
            best.append(top)
        return best
    hand = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.9, 0.1], [0.7, 0.3, 0.6]])  # (K=3, B=3), ties -> the first
    fake = lit.Thoughts([torch.randn(3, 3, 81, 9)], [hand], torch.ones(3, 3))
    assert lit.pick_trajectory("halting head", fake, 1, batch["puzzle"]).tolist() == slow_pick(hand) == [1, 0, 2]
    thoughts = lit.think(model, batch, 3, restarts=4, noise=0.5)
    expected = lit.pick_trajectory("halting head", thoughts, 3, batch["puzzle"])
    assert expected.tolist() == slow_pick(thoughts.halt[-1]) and len(set(expected.tolist())) > 1

    def unavailable(*args, **kwargs):
        raise RuntimeError("the rules' checker is unavailable")
    monkeypatch.setattr(sudoku_data, "broken_constraints", unavailable)
    thoughts = lit.think(model, {"puzzle": batch["puzzle"]}, 3, restarts=4, noise=0.5)  # no solution
    assert torch.equal(lit.pick_trajectory("halting head", thoughts, 3, batch["puzzle"]), expected)
    with pytest.raises(RuntimeError, match="unavailable"):  # the oracle row does check the rules
        lit.evaluate(model, lit_tiny_restart_task(), dataclasses.replace(config, restarts=4, restart_noise=0.5),
                     (3,), None)


LIT_HALT_SCHEDULE = [[0.1, 0.7, 0.95, 0.2],  # trajectory 0 of puzzle 0: h_t per step; τ = 0.8 -> first above after 3
                     [0.9, 0.1, 0.1, 0.1],   # trajectory 0 of puzzle 1: 1
                     [0.1, 0.1, 0.1, 0.1],   # trajectory 0 of puzzle 2: never
                     [0.5, 0.79, 0.81, 0.9],  # trajectory 1 of puzzle 0: 3
                     [0.2, 0.85, 0.1, 0.1],  # trajectory 1 of puzzle 1: 2
                     [0.3, 0.3, 0.3, 0.99]]  # trajectory 1 of puzzle 2: 4 (at the last step)
LIT_HALT_STEPS = [[3, 1, 4], [3, 1, 4]]  # a puzzle's trajectories all stop at the first crossing among them


def lit_scheduled_head(threshold):
    """A stand-in for lit.halt_logit giving LIT_HALT_SCHEDULE's h to the rows still thinking (in order), and
    checking that only those rows are computed: a stopped puzzle's trajectories must leave the batch."""
    probs, thinking, step = torch.tensor(LIT_HALT_SCHEDULE), list(range(6)), [0]

    def halt_logit(model, belief):
        assert belief.shape[0] == len(thinking)
        h = probs[thinking, step[0]]
        halted = {row % 3 for row, p in zip(thinking, h.tolist()) if threshold and p > threshold}  # B = 3
        thinking[:] = [row for row in thinking if row % 3 not in halted]
        step[0] += 1
        return torch.logit(h)
    return halt_logit


def test_lit_adaptive_stopping_stops_a_puzzle_where_one_of_its_trajectories_first_crosses_the_threshold(monkeypatch):
    model, config = lit_make(halt_weight=0.5)
    batch = lit_tiny_sudoku(3, 40)
    monkeypatch.setattr(lit, "halt_logit", lit_scheduled_head(0.0))
    free = lit.think(model, batch, 4, restarts=2, noise=0.0)
    monkeypatch.setattr(lit, "halt_logit", lit_scheduled_head(0.8))
    stopped = lit.think(model, batch, 4, restarts=2, noise=0.0, threshold=0.8)
    assert stopped.steps.tolist() == LIT_HALT_STEPS
    for t in range(4):
        for k in range(2):
            for b in range(3):
                # a stopped trajectory keeps the answer and h of its last step
                stop = min(LIT_HALT_STEPS[k][b], t + 1) - 1
                assert torch.allclose(stopped.logits[t][k, b], free.logits[stop][k, b], atol=1e-6)
                assert stopped.halt[t][k, b].item() == pytest.approx(LIT_HALT_SCHEDULE[3 * k + b][stop], abs=1e-6)
    assert not torch.allclose(free.logits[0], free.logits[3])  # the answers move with the steps: freezing them shows
    # evaluate: the mean steps used at a budget s is the mean of min(stop, s); the MFLOP are those of the steps used
    config = dataclasses.replace(config, restarts=2, halt_threshold=0.8)
    monkeypatch.setattr(lit, "halt_logit", lit_scheduled_head(0.8))
    task = SimpleNamespace(name="sudoku", test_sets={"tiny": batch})
    rows = lit.evaluate(model, task, config, (1, 2, 4), None)
    means = [sum(min(h, s) for h in LIT_HALT_STEPS[0] + LIT_HALT_STEPS[1]) / 6 for s in (1, 2, 4)]
    assert [r["mean thinking steps used"] for r in rows[::3]] == pytest.approx(means)
    assert [r["test-time MFLOP per puzzle"] for r in rows[::3]] == pytest.approx(
        [lit.test_time_flops(config, "sudoku", m, 2) / 1e6 for m in means])
    assert [r["picked by"] for r in rows] == ["confidence", "halting head", "oracle verifier"] * 3


def test_lit_adaptive_stopping_computes_only_the_steps_it_reports():
    """The flop counter sees exactly B × test_time_flops at the mean steps used: stopped trajectories compute
    nothing."""
    from torch.utils.flop_counter import FlopCounterMode
    model, config = lit_make(halt_weight=0.5)
    with torch.no_grad():
        model.halt_head.weight.normal_(std=30.0)
    batch = lit_tiny_sudoku(4, 40)
    halt = lit.think(model, batch, 4, restarts=2, noise=0.3).halt
    threshold = halt[0].median().item()  # about half the trajectories stop after one step
    with FlopCounterMode(display=False, custom_mapping=train.ATTENTION_FLOPS) as counter:
        steps = lit.think(model, batch, 4, restarts=2, noise=0.3, threshold=threshold).steps
    assert steps.min() < steps.max()
    mean_steps = steps.float().mean().item()
    assert counter.get_total_flops() == pytest.approx(4 * lit.test_time_flops(config, "sudoku", mean_steps, 2))


def test_lit_halting_head_starts_as_trms_and_trains_under_bf16_autocast_on_cpu():
    """TRM's initialisation: weight 0 and bias −5, so h = σ(−5) whatever the belief and every answer is taken for
    wrong at first; under bf16 autocast the head then trains."""
    model, config = lit_make(halt_weight=0.5, lr=5e-3, d_model=32)
    assert torch.equal(model.halt_head.weight, torch.zeros(1, 32)) and model.halt_head.bias.item() == -5.0
    data = lit_tiny_sudoku(4, 6)
    h = torch.cat(lit.think(model, data, 2, restarts=2, noise=0.5).halt)
    assert torch.allclose(h, torch.full_like(h, 1 / (1 + math.exp(5))))
    optimizer = lit.make_optimizer(model, config)
    outs = [lit.train_step(model, optimizer, lit_no_scaler(), data, step, config, torch.bfloat16) for step in range(10)]
    assert all(v.dim() == 0 and torch.isfinite(v) for out in outs for v in out.values())
    assert outs[0]["halt_bce"].item() == pytest.approx(math.log1p(math.exp(-5)), rel=0.05)  # all wrong, h ≈ 0.007
    assert outs[0]["answers_right"] == 0 and outs[0]["halt_accuracy"] == 1
    assert not torch.equal(model.halt_head.weight, torch.zeros(1, 32))  # the head trains: its loss falls
    assert sum(out["halt_bce"] for out in outs[-3:]) / 3 < 0.9 * outs[0]["halt_bce"]


def test_lit_halting_settings_raise_one_line_value_errors():
    for bad, match in ((dict(halt_weight=-1.0), "halt_weight"),
                       (dict(halt_weight=float("nan")), "halt_weight"),
                       (dict(halt_weight=0.5, halt_threshold=1.0), "halt_threshold"),
                       (dict(halt_weight=0.5, halt_threshold=-0.1), "halt_threshold"),
                       (dict(halt_weight=0.5, halt_threshold=float("nan")), "halt_threshold"),
                       (dict(halt_threshold=0.5), "halt_weight > 0")):
        with pytest.raises(ValueError, match=match) as error:
            lit.build_model(lit_tiny_config(**bad), LitFakeTask("sudoku"))
        assert "\n" not in str(error.value)
    model = lit.build_model(lit_tiny_config(halt_weight=0.5, halt_threshold=0.5), LitFakeTask("sudoku"))
    assert model.halt_head is not None and lit.build_model(lit_tiny_config(), LitFakeTask("sudoku")).halt_head is None


def test_lit_halting_flags_through_train_py_and_a_checkpoint_without_a_head_is_one_line(tmp_path, data_dir, capsys):
    tiny = ["--method", "lit", *TINY_FLAGS["lit"], "--steps", "2", "--data-dir", data_dir]
    assert train.main(tiny + ["--halt-weight", "0.5", "--out", str(tmp_path / "halt")]) == 0
    assert train.main(["--method", "lit", "--eval-only", str(tmp_path / "halt" / "checkpoint.pt"), "--restarts", "2",
                       "--halt-threshold", "0.5", "--eval-steps", "1,3"]) == 0
    rows = json.loads((tmp_path / "halt" / "eval.json").read_text())["rows"]
    assert {row["picked by"] for row in rows} == {"confidence", "halting head", "oracle verifier"}
    assert all(1 <= row["mean thinking steps used"] <= row["thinking steps"] for row in rows)
    assert train.main(tiny + ["--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    plain = tmp_path / "plain" / "checkpoint.pt"
    assert train.main(["--method", "lit", "--eval-only", str(plain), "--halt-threshold", "0.5"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "halt_weight > 0" in error and error.count("\n") == 1
    # a checkpoint holding a setting the method no longer has is evaluated, the setting named in one warning
    state = torch.load(plain, weights_only=True)
    state["config"]["pick"] = "confidence"
    torch.save(state, tmp_path / "older.pt")
    assert train.main(["--method", "lit", "--eval-only", str(tmp_path / "older.pt"),
                       "--out", str(tmp_path / "older")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "no longer has" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and warning[0].endswith("ignored: pick")


# ---------------- lit: pinned by direct computations (the peer graph, seeding, sampling, adaptive compute)
def lit_direct_peers():
    """(81, 81) bool by a loop over cells: same row, same column or same 3x3 box, the cell itself included."""
    peers = torch.zeros(81, 81, dtype=torch.bool)
    for i in range(81):
        for j in range(81):
            (ri, ci), (rj, cj) = divmod(i, 9), divmod(j, 9)
            peers[i, j] = ri == rj or ci == cj or (ri // 3 == rj // 3 and ci // 3 == cj // 3)
    return peers


def test_lit_peer_attention_is_a_direct_loop_over_rows_columns_and_boxes_with_each_cell_attending_to_itself():
    """The mask equals a loop over rows/columns/boxes; each head's output at cell i is Σ_j softmax_j(q_i·k_j/√d_h)·v_j
    over i's peers (i itself among them); the box embedding of cell i is that of its 3x3 box."""
    direct = lit_direct_peers()
    assert torch.equal(lit.sudoku_peers(), direct) and direct.diagonal().all()
    model, _ = lit_make(d_model=8, n_heads=2, n_layers=1)
    attention = model.student.blocks[0].attn
    x = torch.randn(1, 81, 8)
    q, k, v = attention.qkv(x)[0].view(81, 3, 2, 4).unbind(1)  # (81, H, D/H) each
    heads = []
    for h in range(2):
        cells = []
        for i in range(81):
            j = direct[i].nonzero()[:, 0]
            weights = torch.softmax(k[j, h] @ q[i, h] / math.sqrt(4), 0)
            cells.append(weights @ v[j, h])
        heads.append(torch.stack(cells))
    expected = attention.out(torch.cat(heads, -1))
    assert torch.allclose(attention(x)[0], expected, atol=1e-5)
    empty = model.observe({"puzzle": torch.zeros(1, 81, dtype=torch.long)}, teacher=False)[0][0]  # E(blank) + position
    for i in range(81):
        r, c = divmod(i, 9)
        position = model.row.weight[r] + model.col.weight[c] + model.box.weight[(r // 3) * 3 + c // 3]
        assert torch.allclose(empty[i], model.encoder.embed.weight[0] + position, atol=1e-6)


def test_lit_diversity_counts_each_sample_for_its_own_puzzle():
    """Hand-counted, N = 3 samples of B = 2 puzzles: puzzle 0 (two solutions A, B) gets A, a complete grid that breaks
    the rules, B; puzzle 1 (one solution S) gets S three times: 5 of 6 valid, (2 + 1) / 2 distinct."""
    puzzle, a, b = lit_two_solution_puzzle()
    unique = lit_tiny_sudoku(1, 30)
    blank = (puzzle == 0).nonzero()[:2, 0]  # two blanks of one row: swapped, the grid breaks two columns
    broken = a.clone()
    broken[blank] = broken[blank.flip(0)]
    grids = torch.stack([torch.stack([a, unique["solution"][0]]), torch.stack([broken, unique["solution"][0]]),
                         torch.stack([b, unique["solution"][0]])])  # (N=3, B=2, 81)
    puzzles = torch.stack([puzzle, unique["puzzle"][0]])
    assert lit.diversity(grids, puzzles) == pytest.approx({"valid samples %": 500 / 6, "distinct valid solutions": 1.5})
    assert lit.diversity(grids[[0, 2, 1]], puzzles) == lit.diversity(grids, puzzles)  # the samples' order is free


def test_lit_each_sample_belongs_to_its_puzzle_and_removed_givens_lose_their_images():
    """sample_grids: puzzle 0's N samples do not change when puzzle 1 does, and differ from each other; the visual
    multi-solution set blanks the images of the givens it removes and keeps the others'."""
    model, _ = lit_make(stochastic=True)
    batch = lit_tiny_sudoku(2, 40)
    other = dict(batch, puzzle=torch.cat([batch["puzzle"][:1], lit_tiny_sudoku(1, 40, seed=3)["puzzle"]]))
    both, changed = lit.sample_grids(model, batch, 2)[-1], lit.sample_grids(model, other, 2)[-1]  # (N, 2, 81)
    assert torch.equal(both[:, 0], changed[:, 0]) and not torch.equal(both[:, 1], changed[:, 1])
    assert len({tuple(g.tolist()) for g in both[:, 0]}) > 1
    puzzles, solutions, _ = sudoku_data.generate_puzzles(2, "easy", seed=3, workers=1)
    test_set = lit_with_images({"puzzle": torch.from_numpy(puzzles).long(),
                                "solution": torch.from_numpy(solutions).long()})
    multi = lit.multi_solution_set(test_set, 2)
    removed = (test_set["puzzle"] > 0) & (multi["puzzle"] == 0)
    assert removed.any() and torch.equal(multi["puzzle"] > 0, (test_set["puzzle"] > 0) & ~removed)
    pixels = multi["puzzle_images"].flatten(2).abs().sum(-1)  # (2, 81)
    assert (pixels[multi["puzzle"] == 0] == 0).all()
    kept = multi["puzzle"] > 0
    assert torch.equal(multi["puzzle_images"][kept], test_set["puzzle_images"][kept])


def test_lit_each_evaluation_row_is_its_trajectories_whatever_the_other_rows_and_sets(monkeypatch):
    """A row (test set, s) is the confidence pick of the K noisy trajectories after s steps and, stochastic, the
    samples of that set's multi-solution puzzles after s steps, computed directly from think and sample_grids on the
    set alone; the same with another set beside it, or other step counts, or another chunking. (The grids scored
    are read through stand-ins for exact % and the diversity.)"""
    grids, samples = [], []
    monkeypatch.setattr(sudoku_data, "exact_accuracy", lambda found, solution: grids.append(found) or len(grids) - 1)
    monkeypatch.setattr(lit, "diversity", lambda found, puzzle: samples.append(found) or {"sample": len(samples) - 1})
    model, config = lit_make(stochastic=True, restarts=3, restart_noise=0.5, n_diverse=2, eval_batch_size=6)
    sets = {"a": lit_tiny_sudoku(3, 40, seed=1), "b": lit_tiny_sudoku(3, 40, seed=2)}
    for name in sets:
        sets[name]["puzzle"][:2] = torch.from_numpy(sudoku_data.generate_puzzles(2, "easy", seed=4, workers=1)[0])
    runs = {}
    for names, steps in (("ab", (1, 3)), ("b", (1, 3)), ("b", (3,)), ("ab", (1,))):
        grids.clear()
        samples.clear()
        rows = lit.evaluate(model, SimpleNamespace(name="sudoku", test_sets={n: sets[n] for n in names}), config,
                            steps, None)
        runs[names, steps] = {(r["test set"], r["thinking steps"]): (grids[r["exact %"]], samples[r["sample"]])
                              for r in rows if r["picked by"] == "confidence"}
    checked = 0
    for name, test_set in sets.items():
        thoughts = lit.think(model, test_set, 3, 3, 0.5)
        sampled = lit.sample_grids(model, lit.multi_solution_set(test_set, 2), 3)
        for s in (1, 3):
            pick = lit.pick_by_confidence(thoughts.logits[s - 1], test_set["puzzle"])
            grid = thoughts.logits[s - 1].argmax(-1)[pick, torch.arange(3)] + 1
            for run in runs.values():
                if (name, s) in run:
                    assert torch.equal(run[name, s][0], grid) and torch.equal(run[name, s][1], sampled[s - 1])
                    checked += 1
    assert checked == 2 + 4 + 1 + 2
    other_seed = lit.think(model, sets["b"], 3, 3, 0.5, seed=1).logits[-1]
    assert not torch.equal(other_seed, lit.think(model, sets["b"], 3, 3, 0.5).logits[-1])


def test_lit_every_noisy_trajectory_is_a_direct_rollout_from_its_own_noised_start(monkeypatch):
    """Each trajectory k ≥ 1 of each puzzle, rolled alone with its own generator: b ← b + σ·std(b)·ε (std over the
    cell's channels) before every step, from b_0; trajectory 0 noiseless; a puzzle stops all K at the first step where
    one has h > τ, each keeping its last step, and the other puzzles' noise does not depend on who stopped. The
    generators' seeds are read from example_generators."""
    model, _ = lit_make(halt_weight=0.5)
    with torch.no_grad():
        model.halt_head.weight.normal_(std=30.0)
        model.student.norm_out.weight.uniform_(0.5, 2.0)  # cells' stds differ from the whole belief's
    batch, K, B, T, sigma = lit_tiny_sudoku(3, 40), 3, 3, 3, 0.4
    h = lit.think(model, batch, 1, K, sigma).halt[0]  # (K, B) at step 1
    threshold = h[:, h.amax(0).argmax()].median().item()  # some of one puzzle's trajectories cross at step 1, not all
    seeds = []
    real = lit.example_generators
    monkeypatch.setattr(lit, "example_generators",
                        lambda b, device: seeds.append(b["example_seed"].tolist()) or real(b, device))
    thoughts = lit.think(model, batch, T, K, sigma, threshold=threshold)
    seeds = seeds[0]
    assert len(set(seeds)) == K * B and 1 < thoughts.steps.float().mean() < T
    emb = model.observe(batch, teacher=False)[0]
    with torch.no_grad():
        for b in range(B):
            g = [torch.Generator().manual_seed(seeds[k * B + b]) for k in range(K)]
            state, logits, stopped = [model.initial_belief(1)[0]] * K, [None] * K, False
            for t in range(T):
                if not stopped:
                    halts = []
                    for k in range(K):
                        if k:
                            noise = torch.randn(81, 16, generator=g[k])
                            state[k] = state[k] + sigma * state[k].std(-1, keepdim=True) * noise
                        mean = model.student(state[k][None], emb[b:b + 1])[0][0]
                        logits[k], state[k] = model.decode(mean), mean
                        halts.append(torch.sigmoid(lit.halt_logit(model, mean[None])).item())
                    stopped, steps = max(halts) > threshold, t + 1
                for k in range(K):
                    assert torch.allclose(thoughts.logits[t][k, b], logits[k], atol=1e-4)
                    if t == 0 and k:  # its own start: off trajectory 0 from the first step
                        assert not torch.allclose(logits[k], thoughts.logits[0][0, b], atol=1e-3)
            assert (thoughts.steps[:, b] == steps).all()


def test_lit_adaptive_compute_is_the_mean_over_all_trajectories_whatever_the_chunks():
    """Mean thinking steps used = the mean of min(steps, s) over every trajectory of the set (not a mean of the
    chunks' means), and the MFLOP those of that mean: the same at chunks of 3 + 1 puzzles as in one pass, and at the
    largest budget what the flop counter sees evaluate compute (observation space: each trajectory reads back b_0)."""
    from torch.utils.flop_counter import FlopCounterMode
    model, config = lit_make(halt_weight=0.5, restarts=2, restart_noise=0.3, recursion="observation")
    with torch.no_grad():
        model.halt_head.weight.normal_(std=30.0)
    batch = lit_tiny_sudoku(4, 40)
    threshold = lit.think(model, batch, 1, 2, 0.3).halt[0].median().item()
    config = dataclasses.replace(config, halt_threshold=threshold)
    steps = lit.think(model, batch, 4, 2, 0.3, threshold=threshold).steps  # (K, B)
    task = SimpleNamespace(name="sudoku", test_sets={"tiny": batch})
    for size in (6, 8):  # 3 + 1 puzzles, or all 4 at once
        with FlopCounterMode(display=False, custom_mapping=train.ATTENTION_FLOPS) as counter:
            rows = lit.evaluate(model, task, dataclasses.replace(config, eval_batch_size=size), (2, 4), None)
        assert counter.get_total_flops() == pytest.approx(4 * rows[-1]["test-time MFLOP per puzzle"] * 1e6)
        for row in rows:
            mean = steps.clamp(max=row["thinking steps"]).float().mean().item()
            assert row["mean thinking steps used"] == pytest.approx(mean)
            flops = lit.test_time_flops(config, "sudoku", mean, 2)
            assert row["test-time MFLOP per puzzle"] == pytest.approx(flops / 1e6)
    chunk_means = (steps[:, :3].float().mean() + steps[:, 3:].float().mean()) / 2
    assert chunk_means.item() != pytest.approx(steps.float().mean().item())  # the chunks' sizes do matter here


def test_lit_exact_percent_counts_a_grid_only_with_its_givens_right(monkeypatch):
    """A trajectory right on every blank cell but wrong on a given cell is not solved: exact 50 %, blank-cell 100 %."""
    task = lit_tiny_restart_task(n=2)
    test_set = task.test_sets["tiny"]
    grids = test_set["solution"].clone()
    given = (test_set["puzzle"][0] > 0).nonzero()[0, 0]
    grids[0] = lit_flip(grids[0], given)
    monkeypatch.setattr(lit, "think", lit_fake_thoughts(torch.nn.functional.one_hot(grids - 1, 9).float()[None]))
    model, config = lit_make()
    rows = lit.evaluate(model, task, config, (1,), None)
    assert (rows[0]["exact %"], rows[0]["blank-cell %"]) == (50.0, 100.0)


def test_lit_gpu_preset_builds_at_its_size_and_its_head_stops_nothing_at_init():
    """GPU_CONFIG (less train.py's run options): 3.2M parameters; at a tiny width its model starts with TRM's head
    (h = σ(−5) < τ: no trajectory stops), its restarts are noised, and one training step at T = 16, k = 2 runs."""
    values = {k: v for k, v in lit.GPU_CONFIG.items() if k not in train.COMMON_DEFAULTS}
    full = lit.build_model(lit.Config(**values), LitFakeTask("sudoku"))
    assert round(sum(p.numel() for p in full.parameters() if p.requires_grad) / 1e6, 1) == 3.2  # the EMA copy aside
    config = lit.Config(**{**values, "d_model": 16, "n_heads": 2, "n_layers": 1, "eval_batch_size": 32})
    torch.manual_seed(0)
    model = lit.build_model(config, LitFakeTask("sudoku"))
    assert torch.equal(model.halt_head.weight, torch.zeros(1, 16)) and model.halt_head.bias.item() == -5.0
    batch = lit_tiny_sudoku(2, 40)
    thoughts = lit.think(model, batch, 3, config.restarts, config.restart_noise, config.halt_threshold)
    assert (thoughts.steps == 3).all() and thoughts.steps.shape == (16, 2)
    assert not torch.allclose(thoughts.logits[0][1:], thoughts.logits[0][:1].expand(15, -1, -1, -1), atol=1e-3)
    out = lit.train_step(model, lit.make_optimizer(model, config), lit_no_scaler(), batch, 0, config, None)
    assert out["halt_bce"].item() == pytest.approx(math.log1p(math.exp(-5)), rel=1e-3)
    assert out["imagination"] > 0 and config.ema_teacher == 0.999  # LIT with its EMA teacher, not the ablation


def test_lit_ema_teacher_update_by_hand():
    """θ_T ← d·θ_T + (1 − d)·θ_S: with θ_T = 2 and θ_S = 6 everywhere and d = 0.75, every teacher weight becomes 3."""
    model, _ = lit_make(ema_teacher=0.75)
    with torch.no_grad():
        for teacher, student in zip(model.teacher.parameters(), model.student.parameters()):
            teacher.fill_(2.0)
            student.fill_(6.0)
    model.update_ema_teacher()
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in model.teacher.parameters())
    assert all(torch.equal(p, torch.full_like(p, 6.0)) for p in model.student.parameters())
