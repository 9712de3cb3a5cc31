"""Tests for the whole repository: python -m pytest -q test_all.py (CPU, tiny sizes, a few minutes)."""
import copy
import dataclasses
import gzip
import json
import math
import sys
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


# ============================================================================= sudoku_data.py
@pytest.fixture(scope="session")
def puzzles():
    """A few puzzles of every preset, generated once for the session."""
    return {name: sudoku_data.generate_puzzles(12, name, seed=3, workers=1) for name in sudoku_data.DIFFICULTIES}


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


def test_solver_counts_several_solutions_and_rejects_clashes():
    empty = np.zeros(81, np.int8)
    assert sudoku_data.solve(empty)[0] == 2
    clash = empty.copy()
    clash[0] = clash[1] = 5
    assert sudoku_data.solve(clash)[0] == 0
    with pytest.raises(ValueError, match="81 cells"):
        sudoku_data.solve(np.zeros(80))


def test_generation_is_deterministic_whatever_the_worker_count():
    one = sudoku_data.generate_puzzles(30, "medium", seed=7, workers=1)
    two = sudoku_data.generate_puzzles(30, "medium", seed=7, workers=2)
    other = sudoku_data.generate_puzzles(30, "medium", seed=8, workers=1)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert not np.array_equal(one[0], other[0])
    with pytest.raises(ValueError, match="unknown difficulty"):
        sudoku_data.generate_puzzles(3, "extreme")


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
    task = sudoku_data.SudokuTask("easy", seed=1, base_size=10, eval_size=6, data_dir=tmp_path)
    batch, same = task.train_batch(5, 16), task.train_batch(5, 16)
    assert batch["puzzle"].shape == (16, 81) and batch["puzzle"].dtype == torch.long
    assert torch.equal(batch["puzzle"], same["puzzle"]) and not torch.equal(batch["puzzle"], task.train_batch(6, 16)["puzzle"])
    assert set(task.test_sets) == {"easy", "medium", "hard"}
    train_puzzles = {p.tobytes() for p in task.base_puzzles}
    for test in task.test_sets.values():
        assert not any(p.numpy().astype(np.int8).tobytes() in train_puzzles for p in test["puzzle"])
    assert not list(tmp_path.glob("*.tmp"))


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


def test_mnist_checksum_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sudoku_data, "_download_mnist", lambda folder, names: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        sudoku_data.load_mnist(tmp_path, "t10k")
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(100)))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        sudoku_data.load_mnist(tmp_path, "t10k")


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


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "recurrent_depth", "--eval-only", "missing.pt"], "checkpoint not found: missing.pt"),
    (["--method", "recurrent_depth", "--lr", "-1"], "--lr must be positive"),
    (["--method", "recurrent_depth", "--steps", "0"], "--steps must be a positive integer"),
    (["--method", "recurrent_depth", "--task", "text"], "--task text needs --text-file"),
    (["--method", "recurrent_depth", "--device", "cuda"] if not torch.cuda.is_available() else
     ["--method", "nope"], "CUDA" if not torch.cuda.is_available() else "unknown method"),
])
def test_command_line_errors_are_one_line(argv, message, capsys):
    assert train.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1


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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One cache of generated Sudoku sets for every train.py test."""
    return str(tmp_path_factory.mktemp("data"))


def interrupting_at_step_3(train_step):
    """A method's train_step that behaves like Ctrl-C at step 3 (to test the save and --resume)."""
    def step_or_interrupt(model, optimizer, scaler, batch, step, *rest):
        if step == 3:
            raise KeyboardInterrupt
        return train_step(model, optimizer, scaler, batch, step, *rest)
    return step_or_interrupt


def _checkpoint(folder):
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)


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
    assert results["rows"] == json.loads((tmp_path / "straight" / "results.json").read_text())["rows"]
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [2, 4, 6] and all(np.isfinite(entry["loss"]) for entry in log)


def test_eval_only_with_other_thinking_steps(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train.main(TINY_RUN + ["--data-dir", data_dir, "--out", str(out)]) == 0
    capsys.readouterr()
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt"), "--eval-steps", "3"]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert {row["test set"] for row in rows} == {"easy", "medium", "hard"}
    assert train.main(["--method", "ltm", "--eval-only", str(out / "checkpoint.pt")]) == 2
    assert "trained with --method recurrent_depth" in capsys.readouterr().err
    assert train.main(["--method", "recurrent_depth", "--eval-only", str(out / "checkpoint.pt"), "--d-model", "64"]) == 2
    assert "does not fit" in capsys.readouterr().err

# ============================================================================= recurrent_depth.py
TEXT = SimpleNamespace(name="text", vocab_size=13, seq_len=32)
TINY = dict(d_model=32, n_heads=2, d_mlp=64, mean_recurrence=4, backprop_depth=2)


def tiny_model(task=TEXT, **overrides):
    torch.manual_seed(0)
    return rd.build_model(rd.Config(**{**TINY, **overrides}), task)


def test_recurrent_depth_cached_generation_equals_uncached_forward():
    """Prefill + one token at a time through the KV cache gives the logits of the full forward."""
    model = tiny_model().eval()
    idx = torch.randint(0, TEXT.vocab_size, (3, 20))
    steps = 5
    with torch.no_grad():
        zero = torch.zeros(3, 20, model.cfg.d_model)
        full = model(idx, (steps, 0), state=zero)  # (B, T, V)
        cache = rd.RecurrentKVCache(model, 3, 20, steps)
        parts = [model._cached_forward(idx[:, :12], cache, steps, "none", None, init_scale=0.0)[0]]
        for t in range(12, 20):
            parts.append(model._cached_forward(idx[:, t : t + 1], cache, steps, "none", None, init_scale=0.0)[0])
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    # generate() (greedy, fixed steps, no warm start) continues exactly as the uncached model would
    out, mean_steps = model.generate(idx[:, :8], 10, max_steps=steps, exit_criterion="none", continuous_cot=False,
                                     init_scale=0.0)
    logits = model(out[:, :-1], (steps, 0), state=torch.zeros(3, 17, model.cfg.d_model))
    assert torch.equal(out[:, 8:], logits[:, 7:].argmax(-1)) and mean_steps == steps


def test_recurrent_depth_latest_m4_lookup_reads_latest_step_of_early_exited_tokens():
    model = tiny_model()
    cache = rd.RecurrentKVCache(model, 1, 4, max_steps=6)
    for step in range(6):  # mark the (k) cache entry of step s for every token with value s
        cache.core[step, 0, 0] = step
    cache.steps_done[0] = torch.tensor([6, 2, 4, 6])  # token 1 exited after 2 steps, token 2 after 4; 3 is new
    cache.start, cache.end = 3, 4
    head_dim = model.cfg.d_model // model.cfg.n_heads
    new = torch.full((1, model.cfg.n_heads, 1, head_dim), 7.0)
    keys, _, _ = cache.core_layer(0, 5)(new, new)  # a query at step 5
    assert keys[0, 0, :, 0].tolist() == [5.0, 1.0, 3.0, 7.0]  # slot min(5, steps_done - 1); the new key itself


def test_recurrent_depth_adaptive_generation_uses_fewer_steps_and_threshold_zero_matches_fixed():
    model = tiny_model().eval()
    prompt = torch.randint(0, TEXT.vocab_size, (2, 6))
    torch.manual_seed(1)
    fixed, fixed_steps = model.generate(prompt, 10, max_steps=6, exit_criterion="none", continuous_cot=True)
    model.cfg.kl_threshold = 0.0  # never exits: the adaptive path must reproduce the fixed one
    torch.manual_seed(1)
    never, never_steps = model.generate(prompt, 10, max_steps=6, exit_criterion="kl", continuous_cot=True)
    assert torch.equal(fixed, never) and fixed_steps == never_steps == 6
    model.cfg.kl_threshold = 1e9  # exits after the first step whose KL is measured
    _, early_steps = model.generate(prompt, 10, max_steps=6, exit_criterion="kl")
    model.cfg.latent_threshold = 1e9
    _, latent_steps = model.generate(prompt, 10, max_steps=6, exit_criterion="latent-diff")
    assert early_steps == latent_steps == 1.0


def saved_bytes(model, idx, num_steps):
    """Bytes of tensors autograd saves for backward during one forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, num_steps).sum()
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
    model(idx, (0, 3), state=s0).sum().backward()
    assert s0.grad is not None and s0.grad.abs().sum() > 0  # without a prefix the initial state gets gradient
    s0.grad = None
    model.zero_grad()
    model(idx, (2, 1), state=s0).sum().backward()
    assert s0.grad is None  # the no-grad prefix cuts the graph
    truncated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.no_grad():  # the same computation by hand: prefix without a graph, then one step with one
        rope = model.rope(0, 16)
        e = model.embed(idx, rope)
        s = model.core_step(model.core_step(s0, e, rope), e, rope)
    e = model.embed(idx, rope)
    model.readout(model.core_step(s, e, rope), rope).sum().backward()
    for a, p in zip(truncated, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    model.zero_grad()
    model(idx, (0, 3), state=s0).sum().backward()  # full backprop through all 3 steps differs
    assert any(not torch.allclose(a, p.grad) for a, p in zip(truncated, model.parameters()))


def test_recurrent_depth_recurrence_sampler_mean_and_split():
    cfg = rd.Config(mean_recurrence=8, backprop_depth=4)
    draws = [rd.sample_recurrence(step, cfg) for step in range(4000)]
    totals = torch.tensor([n + k for n, k in draws], dtype=torch.float)
    # p = Poisson(rate) + 1 with E[rate] = r_mean; sd of p ~ 5.4 -> standard error ~ 0.09
    assert abs(totals.mean().item() - (cfg.mean_recurrence + 1)) < 0.4
    assert all(k == min(4, n + k) and n == max(n + k - 4, 0) for n, k in draws)
    assert rd.sample_recurrence(17, cfg) == rd.sample_recurrence(17, cfg)  # a function of the step


@pytest.fixture(scope="module")
def trained_sudoku():
    """A tiny model trained for 80 steps on a fixed set of 16 easy puzzles (no augmentation)."""
    puzzles, solutions, _ = sudoku_data.generate_puzzles(16, "easy", seed=0, workers=1)
    puzzle, solution = torch.from_numpy(puzzles).long(), torch.from_numpy(solutions).long()
    task = SimpleNamespace(name="sudoku", vocab_size=10, seq_len=81,
                           test_sets={"train": {"puzzle": puzzle, "solution": solution}})
    cfg = rd.Config(**TINY, lr=3e-3, warmup_steps=1, eval_steps=(1, 4, 8, 16))
    torch.manual_seed(0)
    model = rd.build_model(cfg, task)
    opt = rd.make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(enabled=False)
    batch = {"puzzle": puzzle, "solution": solution}
    losses = [rd.train_step(model, opt, scaler, batch, step, cfg, None)["loss"].item() for step in range(80)]
    return model, task, cfg, losses


def test_recurrent_depth_tiny_model_learns_tiny_sudoku_set(trained_sudoku):
    model, task, cfg, losses = trained_sudoku
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    rows = rd.evaluate(model, task, cfg, cfg.eval_steps, None)
    at_mean = next(r for r in rows if r["thinking steps"] == 4)
    assert at_mean["blank-cell %"] > 60  # chance is 11 %


def test_recurrent_depth_more_thinking_does_not_collapse(trained_sudoku):
    model, task, cfg, _ = trained_sudoku
    rows = {r["thinking steps"]: r for r in rd.evaluate(model, task, cfg, cfg.eval_steps, None)}
    assert rows[16]["blank-cell %"] >= rows[4]["blank-cell %"] - 5  # 4x the training mean
    assert rows[4]["blank-cell %"] > rows[1]["blank-cell %"]


def test_recurrent_depth_evaluate_rows_and_train_mode_restored(trained_sudoku):
    model, task, cfg, _ = trained_sudoku
    rows = rd.evaluate(model, task, cfg, (1, 2), None)
    assert [r["thinking steps"] for r in rows] == [1, 2, "adaptive (kl)"]
    assert 1 <= rows[-1]["mean steps used"] <= 2 and model.training
    assert set(rows[0]) == {"test set", "thinking steps", "mean steps used", "exact %", "blank-cell %"}


def test_recurrent_depth_adaptive_row_starts_from_the_fixed_rows_initial_state(trained_sudoku):
    model, task, cfg, _ = trained_sudoku
    never_exit = dataclasses.replace(cfg, kl_threshold=0.0)  # adaptive then runs all steps: must equal the last row
    rows = rd.evaluate(model, task, never_exit, (1, 4), None)
    fixed, adaptive = rows[1], rows[2]
    assert fixed["thinking steps"] == 4 and adaptive["mean steps used"] == 4
    assert (adaptive["exact %"], adaptive["blank-cell %"]) == (fixed["exact %"], fixed["blank-cell %"])


def test_recurrent_depth_text_evaluate_and_bf16_autocast_train_step():
    model = tiny_model()
    cfg = model.cfg
    opt = rd.make_optimizer(model, cfg)
    batch = {"tokens": torch.randint(0, TEXT.vocab_size, (4, 17))}
    before = [p.detach().clone() for p in model.parameters()]
    out = rd.train_step(model, opt, torch.amp.GradScaler(enabled=False), batch, 0, cfg, torch.bfloat16)
    assert math.isfinite(out["loss"].item()) and not out["loss"].requires_grad
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    task = SimpleNamespace(**vars(TEXT), test_sets={"held-out": batch})
    rows = rd.evaluate(model, task, cfg, (1, 3), torch.bfloat16)
    assert [r["thinking steps"] for r in rows] == [1, 3] and all(r["bits/char"] > 0 for r in rows)


@pytest.mark.parametrize("bad", [dict(d_model=30, n_heads=4), dict(n_heads=3, d_model=33), dict(exit_criterion="x"),
                                 dict(backprop_depth=0), dict(difficulty="extreme"), dict(eval_steps=())])
def test_recurrent_depth_bad_config_values_raise_value_error(bad):
    with pytest.raises(ValueError):
        rd.build_model(dataclasses.replace(rd.Config(**TINY), **bad), TEXT)
    with pytest.raises(ValueError):
        rd.build_model(rd.Config(**TINY), SimpleNamespace(name="visual", vocab_size=10, seq_len=81))

# ============================================================================= ltm.py
SENTENCE = "the quick brown fox jumps over the lazy dog "


class LtmTinyText:
    name, vocab_size, seq_len = "text", 27, 16

    def __init__(self):
        ids = torch.tensor([0 if c == " " else ord(c) - 96 for c in SENTENCE * 3])
        self.windows = ids.unfold(0, self.seq_len + 1, 1)  # (N, 17)
        self.test_sets = {"held-out": {"tokens": self.windows[:8]}}

    def train_batch(self, step, batch_size):
        index = torch.randint(len(self.windows), (batch_size,), generator=torch.Generator().manual_seed(step))
        return {"tokens": self.windows[index]}


class LtmTinySudoku:
    name, vocab_size, seq_len = "sudoku", 10, 81

    def __init__(self):
        rows = [[(3 * (r % 3) + r // 3 + c) % 9 + 1 for c in range(9)] for r in range(9)]  # a valid grid
        solution = torch.tensor(rows).flatten().repeat(4, 1)  # (4, 81)
        puzzle = solution.masked_fill(torch.rand(4, 81, generator=torch.Generator().manual_seed(0)) < 0.5, 0)
        self.test_sets = {"easy": {"puzzle": puzzle, "solution": solution}}

    def train_batch(self, step, batch_size):
        return {key: value[:batch_size] for key, value in self.test_sets["easy"].items()}


def ltm_tiny_config(**overrides):
    fields = dict(d_model=32, n_layers=2, n_heads=2, n_z_per_layer=2, fast_steps=2, batch_size=8, lr=3e-3,
                  eval_subset=8)
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


def test_ltm_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(3, 4, 5)
    assert torch.allclose(ltm.kl_to_prior(zeros, zeros), torch.zeros(3))
    assert (ltm.kl_to_prior(zeros + 0.5, zeros - 1.0) > 0).all()


def test_ltm_fast_step_touches_only_the_posterior():
    task, config, model, _, _ = ltm_setup()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(1)
    mu, logvar = ltm.fit_posterior(model, task.windows[:4], 3, config, None)
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
    assert not mu.requires_grad and not logvar.requires_grad
    assert (logvar + 5.0).abs().mean() > 0.5  # moved away from its N(-5, 0.1²) init


def test_ltm_batched_fast_loss_gives_each_sequence_its_own_gradient():
    task, config, model, _, _ = ltm_setup()
    tokens = task.windows[:3]
    mu = torch.randn(3, model.n_latents, config.d_model, requires_grad=True)
    logvar = torch.full_like(mu, -5.0)
    z = mu + logvar  # deterministic z so that both losses see the same sample
    nll = ltm.token_nll(model, tokens, z, None) + ltm.kl_to_prior(mu, logvar)
    batch_grad, = torch.autograd.grad(nll.sum(), mu, retain_graph=True)
    alone_grad, = torch.autograd.grad(nll[1], mu)
    assert torch.allclose(batch_grad[1], alone_grad[1], atol=1e-6)


def test_ltm_slow_step_updates_only_the_decoder_with_detached_z():
    task, config, model, optimizer, scaler = ltm_setup()
    seen = {}
    original = ltm.fit_posterior

    def recording_fit(*args):
        seen["mu"], seen["logvar"] = original(*args)
        return seen["mu"], seen["logvar"]

    ltm.fit_posterior = recording_fit
    try:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        ltm.train_step(model, optimizer, scaler, task.train_batch(0, 8), 0, config, None)
    finally:
        ltm.fit_posterior = original
    assert not seen["mu"].requires_grad and seen["mu"].grad is None and seen["logvar"].grad is None
    for name, p in model.named_parameters():  # every decoder weight, the cross-attention included, learns
        assert p.grad is not None and not torch.equal(p, before[name]), name


def test_ltm_bound_does_not_get_worse_with_more_fast_steps():
    task, config, model, optimizer, scaler = ltm_setup()
    ltm_train_steps(task, config, model, optimizer, scaler, 30)
    bounds = []
    for steps in (1, 2, 4, 8, 16):
        torch.manual_seed(0)
        bounds.append(ltm.elbo_bound(model, task.windows[:8], steps, config)["ppl_bound"])
    assert all(later <= earlier for earlier, later in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] < 0.5 * bounds[0]


def test_ltm_tiny_model_fits_a_tiny_corpus():
    task, config, model, optimizer, scaler = ltm_setup()
    losses = ltm_train_steps(task, config, model, optimizer, scaler, 80)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])


def test_ltm_bf16_autocast_train_step_on_cpu():
    task, config, model, optimizer, scaler = ltm_setup()
    stats = ltm.train_step(model, optimizer, scaler, task.train_batch(0, 8), 0, config, torch.bfloat16)
    assert torch.isfinite(stats["loss"]) and torch.isfinite(stats["nelbo/token"])
    assert stats["nelbo/token"] > stats["loss"]  # -ELBO = NLL + KL with KL > 0


def test_ltm_cached_decoding_matches_full_recompute():
    task, config, model, _, _ = ltm_setup()
    tokens, z = task.windows[:2, :10], torch.randn(2, model.n_latents, config.d_model)
    cache = [{} for _ in range(model.n_layers)]
    model(tokens[:, :5], z, cache)
    stepwise = torch.stack([model(tokens[:, i:i + 1], z, cache)[:, -1] for i in range(5, 10)], dim=1)
    full = model(tokens, z)[:, 5:10]
    assert torch.allclose(stepwise, full, atol=1e-5)
    generated = ltm.generate(model, tokens[:, :5], 2, 4, config)
    assert generated.shape == (2, 9) and torch.equal(generated[:, :5], tokens[:, :5])


def test_ltm_sudoku_evaluate_rows_and_plain_baseline():
    task, config, model, _, _ = ltm_setup(LtmTinySudoku())
    rows = ltm.evaluate(model, task, config, (1, 2), None)
    assert [row["T (fast steps)"] for row in rows] == [1, 2]
    assert "ppl ≤ (ELBO bound)" in rows[0] and 0 <= rows[0]["exact %"] <= 100 and model.training
    task, config, plain, _, _ = ltm_setup(LtmTinySudoku(), use_latent=False)
    assert not any("cross" in name for name, _ in plain.named_parameters())
    rows = ltm.evaluate(plain, task, config, (1, 2), None)
    assert len(rows) == 1 and rows[0]["T (fast steps)"] == 0 and rows[0]["ppl (next-token, exact)"] > 1


def test_ltm_bad_input_raises_value_error():
    task, config, model, optimizer, scaler = ltm_setup()
    with pytest.raises(ValueError):
        ltm.train_step(model, optimizer, scaler, {"tokens": task.windows[:2] + 100}, 0, config, None)
    with pytest.raises(ValueError):
        ltm.elbo_bound(model, task.windows[:2].float(), 1, config)
    with pytest.raises(ValueError):
        ltm.generate(model, task.windows[:2], 1, 10, config)  # longer than the RoPE table
    with pytest.raises(ValueError):
        ltm.build_model(ltm_tiny_config(), type("Maze", (), {"name": "maze"})())
    with pytest.raises(ValueError):
        ltm.build_model(ltm_tiny_config(d_model=30, n_heads=4), LtmTinyText())
    _, config, sudoku_model, optimizer, scaler = ltm_setup(LtmTinySudoku())
    with pytest.raises(ValueError):
        ltm.train_step(sudoku_model, optimizer, scaler, {"puzzle": torch.zeros(2, 80, dtype=torch.long),
                                                         "solution": torch.ones(2, 80, dtype=torch.long)},
                       0, config, None)


def test_ltm_train_py_resume_reproduces_the_straight_run(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SENTENCE * 40)
    run = ["--method", "ltm", "--task", "text", "--text-file", str(corpus), "--context-length", "16",
           "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--n-z-per-layer", "2", "--fast-steps", "2",
           "--steps", "6", "--batch-size", "4", "--warmup-steps", "2", "--eval-steps", "1,2", "--eval-size", "4",
           "--eval-subset", "4", "--log-every", "2"]
    assert train.main(run + ["--out", str(tmp_path / "straight")]) == 0
    original_step = ltm.train_step

    monkeypatch.setattr(ltm, "train_step", interrupting_at_step_3(original_step))
    assert train.main(run + ["--out", str(tmp_path / "split")]) == 130
    monkeypatch.setattr(ltm, "train_step", original_step)
    assert train.main(["--method", "ltm", "--resume", str(tmp_path / "split" / "checkpoint.pt")]) == 0
    load = lambda name: torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=True)
    straight, resumed = load("straight"), load("split")
    assert resumed["step"] == straight["step"] == 6
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    rows = [json.loads((tmp_path / name / "results.json").read_text())["rows"] for name in ("straight", "split")]
    assert rows[0] == rows[1] and [row["T (fast steps)"] for row in rows[0]] == [1, 2]

# ============================================================================= lvr.py
LVR_TASK = vqa_data.VQATask(seed=0, train_size=300, eval_size=16)
LVR_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def lvr_tiny(**kw):
    config = lvr.Config(**{**dict(d_model=32, n_layer=2, n_head=2, encoder_layers=1, batch_size=8, align_steps=2,
                                  group_size=4, max_latent=6, eval_steps=(0, 2)), **kw})
    torch.manual_seed(0)
    return lvr.build_model(config, LVR_TASK), config


def rollout_of(model, temperature=1.0, budget=3, n=6):
    batch = LVR_TASK.train_batch(0, n)
    with torch.no_grad():
        visual = model.visual_tokens(batch["image"])
    question = batch["question"]
    # make every row enter latent mode: bias the head towards <lvr_start> at the first text step
    torch.manual_seed(1)
    return visual, question, lvr.generate(model, model.llm, visual, question, budget, temperature)


def force_lvr_start(model):
    with torch.no_grad():
        model.llm.head.weight[LVR_TASK.lvr_start_id] += 0.1 * model.llm.ln.weight.sign()
        model.llm.ln.bias.copy_(model.llm.ln.weight.abs())


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
    a, b = vqa_data.VQATask(seed=3, train_size=200, eval_size=20), vqa_data.VQATask(seed=3, train_size=200, eval_size=20)
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
    assert vqa_data.roi_patch_mask(batch["box"], 48, 8).any(1).all()


def test_lvr_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        lvr.Config(stage="ppo")
    with pytest.raises(ValueError):
        lvr.Config(exit="sometimes")
    with pytest.raises(ValueError):
        lvr.Config(d_model=30, n_head=4)
    with pytest.raises(ValueError):
        vqa_data.VQATask(train_size=0)
    with pytest.raises(ValueError):
        lvr.build_model(lvr.Config(), object())


# ---------------- lvr: latent decoding


def test_lvr_latent_steps_feed_hidden_states_back():
    model, _ = lvr_tiny()
    force_lvr_start(model)
    visual, question, out = rollout_of(model, temperature=0.0, budget=3)
    lat = out["is_latent"]
    assert lat.sum(1).eq(3).all()                                # every row took exactly 3 latent steps
    assert not (out["sampled"] & lat).any()                      # no token is sampled inside the segment
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


def test_lvr_cached_decoding_equals_uncached_and_ratio_is_one():
    model, _ = lvr_tiny()
    force_lvr_start(model)
    visual, question, out = rollout_of(model, temperature=0.9, budget=4)
    replay = lvr.replay_logprobs(model.llm, visual, question, out, 0.9)      # uncached, teacher-forced replay
    mask = out["sampled"]
    assert out["is_latent"].any() and mask.sum() > 6
    torch.testing.assert_close(replay[mask], out["logprob"][mask], atol=1e-5, rtol=1e-5)
    assert torch.allclose(torch.exp(replay - out["logprob"])[mask], torch.ones(int(mask.sum())), atol=1e-4)


def test_lvr_adaptive_exits_run_and_respect_cap():
    for exit in ("latent_end", "mode_switch"):
        model, config = lvr_tiny(exit=exit)
        force_lvr_start(model)
        batch = LVR_TASK.train_batch(0, 4)
        with torch.no_grad():
            visual = model.visual_tokens(batch["image"])
        out = lvr.generate(model, model.llm, visual, batch["question"], config.max_latent, exit=exit)
        assert out["is_latent"].sum(1).le(config.max_latent).all()
        assert lvr.lvr_loss(model, visual, batch)[1].keys() >= {"L_NTP", "L_LVR"}


def test_lvr_pooled_roi_targets_average_segments():
    visual = torch.arange(36.0)[None, :, None].repeat(1, 1, 2)              # token value = patch index
    box = torch.tensor([[0, 0, 16, 16]])                                       # patches 0, 1, 6, 7
    full, valid = lvr.roi_targets(visual, box, LVR_TASK, 0)
    assert full[0, :, 0].tolist() == [0, 1, 6, 7] and valid.all()
    pooled, _ = lvr.roi_targets(visual, box, LVR_TASK, 2)
    assert pooled[0, :, 0].tolist() == [0.5, 6.5]
    up, _ = lvr.roi_targets(visual, box, LVR_TASK, 8)                              # fewer tokens than k: repeats
    assert up[0, :, 0].tolist() == [0, 0, 1, 1, 6, 6, 7, 7]


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
    model, config = lvr_tiny(lr=3e-3, warmup_steps=1, align_steps=40)
    opt = lvr.make_optimizer(model, config)
    batch = LVR_TASK.train_batch(0, 8)
    first = lvr.train_step(model, opt, LVR_SCALER, batch, 0, config, None)["L_grounding"].item()
    assert model.grounding_head.weight.grad.abs().sum() > 0
    for step in range(1, 30):
        last = lvr.train_step(model, opt, LVR_SCALER, batch, step, config, None)["L_grounding"].item()
    assert last < 0.5 * first
    metrics = lvr.train_step(model, opt, LVR_SCALER, batch, config.align_steps, config, None)  # stage 1
    assert "L_grounding" not in metrics and model.grounding_head.weight.grad is None


def test_lvr_grpo_step_and_bf16_autocast():
    for stage, step in (("sft", 0), ("sft", 5), ("rl", 0)):
        model, config = lvr_tiny(stage=stage)
        opt = lvr.make_optimizer(model, config)
        before = model.llm.head.weight.clone()
        metrics = lvr.train_step(model, opt, LVR_SCALER, LVR_TASK.train_batch(0, 4), step, config, torch.bfloat16)
        assert all(torch.isfinite(v) for v in metrics.values())
        assert not torch.equal(before, model.llm.head.weight)
    assert {"reward", "accuracy", "format", "kl"} <= metrics.keys()
    assert model.reference is not None and "reference.head.weight" not in model.state_dict()


def test_lvr_tiny_model_learns_tiny_vqa_set():
    model, config = lvr_tiny(d_model=48, lr=3e-3, warmup_steps=1, align_steps=60, latent_pool=2, eval_steps=(2,),
                         baseline=False)
    opt = lvr.make_optimizer(model, config)
    batch = LVR_TASK.train_batch(0, 12)
    stage1_losses = []
    for step in range(150):
        metrics = lvr.train_step(model, opt, LVR_SCALER, batch, step, config, None)
        stage1_losses += [metrics["L_LVR"].item()] if "L_LVR" in metrics else []
    assert metrics["L_NTP"] < 0.1 and stage1_losses[-1] < 0.5 * stage1_losses[0]  # the MSE scale is the tokens'
    with torch.no_grad():
        visual = model.visual_tokens(batch["image"])
        out = lvr.generate(model, model.llm, visual, batch["question"], 2)
    assert out["is_latent"].sum(1).eq(2).all()
    assert lvr.answer_correct(out, batch["answer"], LVR_TASK).float().mean() >= 0.75  # chance is < 0.3


def test_lvr_evaluate_rows():
    model, config = lvr_tiny()
    rows = lvr.evaluate(model, LVR_TASK, config, config.eval_steps, None)
    assert [r["model"] for r in rows] == ["answer prior", "baseline", "lvr", "lvr"]
    assert [r["latent steps"] for r in rows] == ["-", 0, 0, 2]
    assert model.training

# ============================================================================= lit.py
class LitFakeTask:
    """Just what build_model needs (the real tasks live in sudoku_data)."""

    def __init__(self, name):
        self.name = name


def lit_tiny_config(**overrides):
    base = dict(d_model=32, n_heads=2, n_layers=1, think_steps=3, batch_size=8, eval_batch_size=8, eval_steps=(1, 3))
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


@pytest.mark.parametrize("stochastic", [False, True])
def test_lit_imagination_target_carries_no_gradient_into_teacher(stochastic):
    model, config = lit_make(stochastic=stochastic)
    batch = lit_tiny_sudoku(4, 30)
    losses = lit.lit_loss(model, batch, config)
    losses["imagination"].backward()
    teacher_only = list(model.teacher.parameters()) + list(model.hint_proj.parameters())
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in teacher_only)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.student.parameters())
    # the solution loss does train the teacher (so the check above can fail)
    model.zero_grad()
    losses = lit.lit_loss(model, batch, config)
    losses["ce_teacher"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.teacher.parameters())
    assert model.hint_proj.weight.grad.abs().max() > 0  # the hints reach the teacher through W_h


@pytest.mark.parametrize("task_name", ["sudoku", "visual"])
def test_lit_teacher_observations_never_reach_the_student(task_name):
    model, _ = lit_make(task_name)
    batch = lit_tiny_sudoku(4, 40)
    batch = lit_with_images(batch) if task_name == "visual" else batch
    perturbed = dict(batch, solution=(batch["solution"] % 9) + 1)  # a different (wrong) answer
    if task_name == "visual":
        perturbed["solution_images"] = torch.rand_like(batch["solution_images"])
    student = lit.think(model, batch, 4, "student")
    student_perturbed = lit.think(model, perturbed, 4, "student")
    assert all(torch.equal(a, b) for a, b in zip(student, student_perturbed))
    teacher = lit.think(model, batch, 4, "teacher")
    teacher_perturbed = lit.think(model, perturbed, 4, "teacher")
    assert not torch.equal(teacher[-1], teacher_perturbed[-1])  # the hints do reach the teacher


def test_lit_visual_and_language_share_the_belief_network():
    language, _ = lit_make("sudoku")
    visual, _ = lit_make("visual")
    for model in (language, visual):
        assert type(model.teacher) is lit.BeliefUpdate and type(model.student) is lit.BeliefUpdate
    assert language.teacher.state_dict().keys() == visual.teacher.state_dict().keys()
    assert type(language.encoder) is not type(visual.encoder)  # only the observation encoder differs


def test_lit_tiny_model_learns_tiny_sudoku_set():
    model, config = lit_make(d_model=64, n_heads=4, n_layers=2, think_steps=4, lr=3e-3)
    data = lit_tiny_sudoku(8, 6)
    optimizer = lit.make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    first = lit.train_step(model, optimizer, scaler, data, 0, config, None)
    for step in range(1, 150):
        last = lit.train_step(model, optimizer, scaler, data, step, config, None)
    assert last["ce_student"] < 0.3 * first["ce_student"]
    prediction = lit.think(model, data, config.think_steps)[-1].argmax(-1) + 1  # (8, 81)
    assert (prediction == data["solution"]).float().mean() > 0.95


def test_lit_bf16_autocast_train_step_on_cpu():
    model, config = lit_make("visual")
    batch = lit_with_images(lit_tiny_sudoku(4, 30))
    optimizer = lit.make_optimizer(model, config)
    before = copy.deepcopy(model.state_dict())
    out = lit.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), batch, 0, config, torch.bfloat16)
    assert all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lit_train_step_randomness_comes_from_the_global_rng():
    model, config = lit_make(stochastic=True)
    twin = copy.deepcopy(model)
    batch = lit_tiny_sudoku(4, 30)
    outs = []
    for m in (model, twin):
        torch.manual_seed(123)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        outs.append(lit.train_step(m, lit.make_optimizer(m, config), scaler, batch, 0, config, None)["loss"])
    assert torch.equal(outs[0], outs[1])


def test_lit_no_imagination_ablation_has_no_teacher_terms():
    model, config = lit_make(no_imagination=True)
    losses = lit.lit_loss(model, lit_tiny_sudoku(4, 30), config)
    assert losses["imagination"] == 0 and losses["ce_teacher"] == 0 and losses["ce_student"] > 0


def test_lit_bad_input_raises_value_error():
    model, config = lit_make()
    optimizer = lit.make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    good = lit_tiny_sudoku(2, 30)
    bad_batches = [
        {"puzzle": good["puzzle"][:, :80], "solution": good["solution"]},        # wrong length
        {"puzzle": good["puzzle"] + 10, "solution": good["solution"]},           # digit out of range
        {"puzzle": good["puzzle"]},                                              # no solution
    ]
    for bad in bad_batches:
        with pytest.raises(ValueError):
            lit.train_step(model, optimizer, scaler, bad, 0, config, None)
    visual, _ = lit_make("visual")
    with pytest.raises(ValueError, match="puzzle_images"):
        lit.train_step(visual, lit.make_optimizer(visual, config), scaler, good, 0, config, None)
    with pytest.raises(ValueError):
        lit.build_model(config, LitFakeTask("text"))
    with pytest.raises(ValueError):
        lit.build_model(lit_tiny_config(d_model=30, n_heads=4), LitFakeTask("sudoku"))
    with pytest.raises(ValueError):
        lit.think(model, good, 2, role="oracle")
    for bad_field in (dict(recursion="pixels"), dict(max_hint_fraction=1.5), dict(imagination_share=-0.1),
                      dict(n_samples=0), dict(clip_norm=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad_field))):
            lit.build_model(lit_tiny_config(**bad_field), LitFakeTask("sudoku"))


@pytest.mark.skipif(not MNIST_DIR.exists(), reason=f"MNIST not found at {MNIST_DIR}")
def test_lit_visual_task_with_real_mnist(tmp_path):
    sudoku_data = pytest.importorskip("sudoku_data")
    if not hasattr(sudoku_data, "VisualSudokuTask"):
        pytest.skip("sudoku_data.VisualSudokuTask not written yet")
    task = sudoku_data.VisualSudokuTask("easy", seed=0, base_size=16, eval_size=4, data_dir=str(tmp_path),
                                        mnist_dir=str(MNIST_DIR))
    config = lit_tiny_config()
    model = lit.build_model(config, task)
    optimizer = lit.make_optimizer(model, config)
    out = lit.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                         task.train_batch(0, 4), 0, config, None)
    assert torch.isfinite(out["loss"])
    rows = lit.evaluate(model, task, config, (1, 2), None)
    assert len(rows) == 2 * len(task.test_sets) and {"student exact %", "training TFLOP"} <= set(rows[0])
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
    """Each step's input state is the previous step's decoded distributions, re-embedded: in the test
    rollout and in training, for the student and the teacher (latent mode passes the belief instead)."""
    for recursion in ("observation", "latent"):
        model, config = lit_make(recursion=recursion)
        batch = lit_tiny_sudoku(4, 40)
        seen = {"student": [], "teacher": []}  # (input state, output mean) per update call
        hooks = [getattr(model, role).register_forward_hook(
            lambda module, args, out, role=role: seen[role].append((args[0], out[0].detach())))
            for role in seen]
        logits = lit.think(model, batch, 4, "student")
        lit.lit_loss(model, batch, config)
        for hook in hooks:
            hook.remove()
        training = {role: calls[-config.think_steps:] for role, calls in seen.items()}
        states = [state for calls in training.values() for state, _ in calls[1:]]
        if recursion == "latent":  # truncated backprop: no gradient path from one step into the previous one
            assert not any(state.requires_grad for state in states)
        else:  # ... except into the read-back map itself
            earlier = list(model.student.parameters()) + list(model.teacher.parameters()) + [model.decoder.weight]
            for state in states:
                assert all(g is None for g in torch.autograd.grad(state.sum(), earlier, allow_unused=True, retain_graph=True))
        rollouts = [seen["student"][:4], training["student"], training["teacher"]]
        for calls in rollouts:
            for (_, before), (state, _) in zip(calls, calls[1:]):
                read_back = model.readback(model.decode(before).softmax(-1)) if model.readback is not None else None
                assert (torch.allclose(state.detach(), read_back, atol=1e-6) if recursion == "observation"
                        else torch.equal(state, before))
        if recursion == "observation":
            uniform = model.readback(torch.full((4, 81, 9), 1 / 9))
            assert torch.allclose(seen["student"][0][0], uniform) and model.belief_init is None
            assert torch.allclose(seen["student"][1][0], model.readback(logits[0].softmax(-1)), atol=1e-6)


def test_lit_per_model_clipping_bounds_each_model_separately():
    """With plain SGD (lr 1) the update is the clipped gradient: teacher and student each move by
    exactly clip_norm, which a global clip over both (total clip_norm) would not do."""
    model, config = lit_make(clip_norm=1e-3)
    teacher_ids = {id(p) for p in model.teacher_parameters()}
    assert teacher_ids and teacher_ids.isdisjoint(id(p) for p in model.student.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    lit.train_step(model, sgd, torch.amp.GradScaler("cpu", enabled=False), lit_tiny_sudoku(4, 40), 0, config, None)
    moved = {"teacher": 0.0, "student": 0.0}
    for name, p in model.named_parameters():
        moved["teacher" if id(p) in teacher_ids else "student"] += (p.detach() - before[name]).pow(2).sum().item()
    assert moved["teacher"] ** 0.5 == pytest.approx(1e-3, rel=1e-3)
    assert moved["student"] ** 0.5 == pytest.approx(1e-3, rel=1e-3)
    # small gradients are left alone: clipping one model does not rescale the other
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0 if id(p) in teacher_ids else 1e-6)
    lit.clip_per_model(model, 1.0)
    assert all(torch.all(p.grad == 1e-6) for p in model.parameters() if id(p) not in teacher_ids)
    teacher_norm = torch.cat([p.grad.flatten() for p in model.teacher_parameters()]).norm()
    assert teacher_norm == pytest.approx(1.0, rel=1e-4)


def test_lit_multi_solution_generator_gives_puzzles_with_several_solutions():
    puzzles, solutions, _ = sudoku_data.generate_puzzles(6, "easy", seed=5, workers=1)
    multi = sudoku_data.multi_solution_puzzles(puzzles, seed=1)
    assert multi.shape == puzzles.shape
    for reduced, unique, solution in zip(multi, puzzles, solutions):
        assert sudoku_data.solve(unique, limit=2)[0] == 1
        assert sudoku_data.solve(reduced, limit=2)[0] == 2  # at least two solutions
        assert np.all((reduced == 0) | (reduced == unique)) and (reduced > 0).sum() < (unique > 0).sum()
    assert np.array_equal(multi, sudoku_data.multi_solution_puzzles(puzzles, seed=1))  # deterministic in the seed


def test_lit_student_per_step_cross_entropies_are_its_test_rollouts():
    """Deep supervision: lit_loss's student CE is the mean over all T steps of the CE of think()'s
    student logits (hint-free, so no hint reaches the student in training); likewise the teacher's
    with the same reveal order (so its hints pass through W_h as at test time)."""
    model, config = lit_make(think_steps=4)
    batch = lit_tiny_sudoku(4, 40)
    target = batch["solution"] - 1

    def mean_ce(logits):
        return torch.stack([torch.nn.functional.cross_entropy(x.transpose(1, 2), target) for x in logits]).mean()

    torch.manual_seed(7)  # the reveal order lit_loss draws = think's generator seeded with 7
    losses = lit.lit_loss(model, batch, config)
    student, teacher = (lit.think(model, batch, config.think_steps, role, seed=7) for role in ("student", "teacher"))
    assert losses["ce_student"].item() == pytest.approx(mean_ce(student).item(), rel=1e-5)
    assert losses["ce_teacher"].item() == pytest.approx(mean_ce(teacher).item(), rel=1e-5)
    assert not torch.allclose(mean_ce(student), mean_ce(student[-1:]))  # the steps differ, so the check has teeth


def test_lit_stochastic_samples_differ_by_seed_and_are_scored_as_valid_solutions():
    model, _ = lit_make(stochastic=True)
    puzzle, solution_a, solution_b = lit_two_solution_puzzle()
    assert sudoku_data.solve(puzzle, limit=3)[0] == 2
    batch = {"puzzle": puzzle[None], "solution": solution_a[None]}
    first, again, other = (lit.sample_grids(model, batch, 3, 6, seed=s)[-1] for s in (1, 1, 2))
    assert first.shape == (6, 1, 81) and torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(lit.sample_grids(model, batch, 3, 6, seed=1)[0], first)  # one grid per step
    wrong = solution_a % 9 + 1  # a valid grid (digits relabelled) that breaks the givens
    grids = torch.stack([solution_a, solution_b, solution_a, wrong, puzzle])[:, None]  # (5, 1, 81)
    assert lit.diversity(grids, puzzle[None]) == pytest.approx({"valid samples %": 60.0, "distinct valid solutions": 2.0})


@pytest.mark.parametrize("stochastic", [False, True])
def test_lit_loss_is_the_sum_of_its_terms_computed_by_hand(stochastic):
    """L = Σ_t [CE_T + CE_S + β·||b^S − sg(b^T)||²] / T (or β·KL(sg(q_T) || p_S), summed over d,
    averaged over cells), the imagination term over the first imagination_share of the channels."""
    model, config = lit_make(stochastic=stochastic, imagination_weight=0.7, imagination_share=0.5)
    outputs = {"student": [], "teacher": []}  # (mean, std) of every update
    hooks = [getattr(model, role).register_forward_hook(lambda module, args, out, role=role: outputs[role].append(out))
             for role in outputs]
    losses = lit.lit_loss(model, lit_tiny_sudoku(4, 40), config)
    for hook in hooks:
        hook.remove()
    k, by_hand = config.d_model // 2, 0.0
    for (mean_s, std_s), (mean_t, std_t) in zip(outputs["student"], outputs["teacher"]):
        if stochastic:
            var_s, var_t = std_s[..., :k] ** 2, std_t[..., :k] ** 2
            kl = 0.5 * (var_t / var_s + (mean_t[..., :k] - mean_s[..., :k]) ** 2 / var_s - 1 + torch.log(var_s / var_t))
            by_hand += kl.sum(-1).mean().item()
        else:
            by_hand += (mean_s[..., :k] - mean_t[..., :k]).pow(2).mean().item()
    T = config.think_steps
    assert len(outputs["student"]) == T
    assert losses["imagination"].item() == pytest.approx(by_hand / T, rel=1e-4)
    total = losses["ce_teacher"] + losses["ce_student"] + 0.7 * losses["imagination"]
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_lit_hint_schedule_beta_schedule_and_sampling():
    config = lit_tiny_config(think_steps=5, max_hint_fraction=0.6, steps=100, imagination_weight=2.0,
                             imagination_decay_from=0.5)
    fractions = [lit.hint_fraction(t, config) for t in range(7)]
    assert fractions[0] == 0 and fractions[4] == pytest.approx(0.6) and fractions[6] == pytest.approx(0.6)
    assert fractions == sorted(fractions)
    model = lit.build_model(config, LitFakeTask("sudoku"))
    batch = lit_tiny_sudoku(64, 40)
    _, solution_emb, blank_emb = model.observe(batch, teacher=True)
    order = torch.rand(64, 81)
    hints = lit.hint_embedding(model, solution_emb, blank_emb, order, 2)  # fraction 0.3
    revealed = torch.where(order < 0.3, batch["solution"], 0)
    assert torch.allclose(hints, model.encoder(revealed))  # = E(solution with unrevealed cells blanked)
    visual = lit.build_model(config, LitFakeTask("visual"))
    images = lit_with_images(batch)
    _, solution_emb, blank_emb = visual.observe(images, teacher=True)
    hints = lit.hint_embedding(visual, solution_emb, blank_emb, order, 2)
    blanked = images["solution_images"] * (order < 0.3)[..., None, None]
    assert torch.allclose(hints, visual.encoder(blanked), atol=1e-5)
    assert [lit.imagination_beta(s, config) for s in (0, 49, 50, 75, 100)] == pytest.approx([2, 2, 2, 1, 0])
    assert lit.imagination_beta(0, dataclasses.replace(config, no_imagination=True)) == 0
    mean, std = torch.randn(3, 81, 4), torch.rand(3, 81, 4) + 0.1
    torch.manual_seed(1)
    drawn = lit.sample_belief(mean, std, sample=True)
    torch.manual_seed(1)
    assert torch.allclose(drawn, mean + std * torch.randn(3, 81, 4))  # b = μ + σ·ε
    assert torch.equal(lit.sample_belief(mean, std, sample=False), mean)


def test_lit_peer_mask_and_belief_normalisation():
    peers = lit.sudoku_peers()
    assert torch.equal(peers, peers.T) and torch.all(peers.sum(1) == 21)  # 8 + 8 + 4 others, and itself
    assert peers[0, 8] and peers[0, 72] and peers[0, 20] and not peers[0, 21] and not peers[0, 30]
    model, _ = lit_make(n_layers=1)
    x = torch.randn(2, 81, 32)
    changed = x.clone()
    changed[:, 80] += 5.0  # cell 80 (row 8, column 8, box 8) is no peer of cell 0
    first, second = model.student.blocks[0](x), model.student.blocks[0](changed)
    assert torch.allclose(first[:, 0], second[:, 0], atol=1e-6) and not torch.allclose(first[:, 8], second[:, 8])
    mean, _ = model.student(3.0 * torch.randn(2, 81, 32), torch.randn(2, 81, 32))
    assert torch.allclose(mean.pow(2).mean(-1), torch.ones(2, 81), atol=1e-3)  # RMS-normalised (weight 1 at init)


def test_lit_stochastic_evaluate_reports_diversity_on_multi_solution_sets():
    puzzles, solutions, _ = sudoku_data.generate_puzzles(6, "easy", seed=3, workers=1)
    test_set = {"puzzle": torch.from_numpy(puzzles).long(), "solution": torch.from_numpy(solutions).long()}
    task = SimpleNamespace(name="sudoku", test_sets={"easy": test_set})
    config = lit_tiny_config(stochastic=True, n_diverse=4, n_samples=3)
    model = lit.build_model(config, task)
    rows = lit.evaluate(model, task, config, (1, 3), None)
    assert [r["thinking steps"] for r in rows] == [1, 3]
    assert all(0 <= r["valid samples %"] <= 100 and 0 <= r["distinct valid solutions"] <= 3 for r in rows)
    multi = lit.multi_solution_set(test_set, 4)
    assert all(sudoku_data.solve(p, limit=2)[0] == 2 for p in multi["puzzle"].numpy())
