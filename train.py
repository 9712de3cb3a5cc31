"""The one entry point: python train.py --method <name> [--task ...] [--<config field> ...]

train.py owns the loop, the learning-rate schedule, logging, checkpoints and torchrun. Each method file owns its
model, loss, thinking loop and training step, through the names of the README's contract: TASKS, Config (every
field a flag), GPU_CONFIG, build_model, make_optimizer, train_step and evaluate. Examples:
  python train.py --method recurrent_depth
  python train.py --method recurrent_depth --eval-only runs/recurrent_depth-sudoku/checkpoint.pt --eval-steps 1,64
Run folders, cost and torchrun in detail: docs/engineering.md.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import importlib
import inspect
import itertools
import json
import math
import os
import re
import signal
import socket
import sys
import time
import typing
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.benchmark
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm

import sudoku_data
from sudoku_data import write_atomically  # a temporary file, then a rename: never half a file

METHODS = ("recurrent_depth", "ltm", "lit", "lvr")
SHARED_MNIST = Path(__file__).resolve().parent.parent / "shared" / "data" / "mnist"


@dataclasses.dataclass
class RunOptions:
    """The run options every method shares (its Config holds the rest): each a flag whose help is its comment."""
    task: str = None  # task (default: the method's first)
    preset: str = "cpu"  # cpu: the Config defaults; gpu: GPU_CONFIG overrides
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # autocast dtype; auto: bf16 on CUDA where supported, else fp16 + GradScaler; fp32 on CPU
    compile: bool = False  # torch.compile the model's forward (--no-compile: eager, e.g. without a C++ compiler)
    seed: int = 0  # seed for data, initialisation and sampling
    out: str = None  # run folder for log.jsonl, checkpoint.pt, results.json (default: runs/<method>-<task>)
    log_every: int = 50  # steps between log lines
    save_every: int = 500  # steps between checkpoints
    ema: float = 0.0  # evaluate an exponential moving average of the weights with this decay (TRM: 0.999)
    trained_weights: bool = False  # with --eval-only: the weights as trained, not the checkpoint's weight average
    eval_size: int = 500  # held-out examples per test set
    eval_split: str = "test"  # Sudoku: the generated test sets, or validation sets (another seed) to choose settings
    eval_sets: tuple[str, ...] = ("easy", "medium", "hard")  # Sudoku: generated sets evaluated on (extreme: slow)
    base_size: int = 1000  # generated Sudoku base puzzles that training augments
    data_dir: str = "data"  # cache folder for generated data
    mnist_dir: str = str(SHARED_MNIST) if SHARED_MNIST.exists() else "mnist"  # --task visual: MNIST IDX files
    misread_rate: float = None  # --task visual: share of training givens shown as another digit (0.05; 0: none)
    text_file: str = None  # --task text: a UTF-8 file or a folder of documents (default: Python's documentation)
    context_length: int = 128  # --task text: characters per sequence
    train_csv: tuple[str, ...] = ()  # Sudoku CSV file(s) to train on instead of the generated base set
    train_size: int = None  # with --train-csv: train on its first N puzzles (TRM's Sudoku-Extreme protocol: 1000)
    test_csv: tuple[str, ...] = ()  # Sudoku CSV file(s) to evaluate on instead of the generated test sets
    check_unique: bool = False  # refuse a CSV file in which a puzzle has more than one solution (lines named)


COMMON_DEFAULTS = dataclasses.asdict(RunOptions())
CHOICES = dict(preset=("cpu", "gpu"), device=("auto", "cpu", "cuda"), dtype=("auto", "float32", "bfloat16", "float16"),
               eval_split=("test", "validation"))
POSITIVE = ("steps", "batch_size", "eval_size", "base_size", "train_size", "log_every", "save_every", "context_length")
# what --resume may change besides every eval_* setting: where and how often it writes, device, dtype, steps, tests
RESUME_MAY_CHANGE = {"method", "resume", "out", "overwrite", "data_dir", "mnist_dir", "log_every", "save_every",
                     "device", "dtype", "compile", "steps", "test_csv", "check_unique"}


class UsageError(Exception):
    """A problem with the command line or its files: printed as one line, exit status 2."""


class TrainingError(Exception):
    """Training cannot go on (the loss is no longer finite): printed as one line, exit status 1."""


def flag(name):
    return "--" + name.replace("_", "-")


def shown(value):
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


# ------------------------------------------------------------------------------------------------------------ settings
def settings(method, given, checkpoint, checkpoint_path=None):
    """(run options, Config): defaults < --preset gpu's GPU_CONFIG < the checkpoint's (resuming or evaluating) < the
    command line. The checkpoint's --out and --data-dir (places on its machine) are not taken, nor its --eval-split
    where --test-csv gives test files. --resume continues a run exactly: a changed training setting is refused."""
    not_taken = ("out", "data_dir", "eval_split") if "test_csv" in given else ("out", "data_dir")
    saved_run = {k: v for k, v in checkpoint["run"].items() if k not in not_taken} if checkpoint else {}
    saved_config = checkpoint["config"] if checkpoint else {}
    saved = {**saved_run, **saved_config} if "resume" in given else {}
    for name, value in given.items():
        if name in RESUME_MAY_CHANGE or name.startswith("eval_") or name not in saved:
            continue
        old, new = (tuple(v) if isinstance(v, list) else v for v in (saved[name], value))
        if new != old:
            raise UsageError(f"{flag(name)} {shown(new)} differs from the checkpoint's {shown(old)}: --resume "
                             f"continues the run as it was set (start a new run, e.g. with --init-from, to change it)")
    if saved and "steps" in given:
        if given["steps"] < checkpoint["step"]:
            raise UsageError(f"--steps {given['steps']} is fewer than the {checkpoint['step']} steps the checkpoint "
                             f"has trained: --resume can only train on (--eval-only evaluates it as it is)")
        if given["steps"] != saved["steps"]:
            print(f"--steps {given['steps']}: the run now ends at step {given['steps']} (it was set to "
                  f"{saved['steps']}); the learning-rate schedule ends there too")
    preset = method.GPU_CONFIG if {**COMMON_DEFAULTS, **saved_run, **given}["preset"] == "gpu" else {}
    fields = {f.name for f in dataclasses.fields(method.Config)}
    retired = sorted(set(saved_config) - fields)
    if retired:  # a setting an earlier version of the method had: it no longer changes anything
        print(f"warning: {checkpoint_path} holds settings {method.__name__} no longer has, ignored: "
              f"{', '.join(retired)}", file=sys.stderr)
    merged = {**COMMON_DEFAULTS, **dataclasses.asdict(method.Config()), **preset, **saved_run, **saved_config, **given}
    options = argparse.Namespace(**{k: merged[k] for k in COMMON_DEFAULTS})
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items() if k in fields}
    values["eval_steps"] = tuple(dict.fromkeys(values["eval_steps"]))  # a step count listed twice is evaluated once
    check_settings(options, method.Config, values)
    try:
        config = method.Config(**values)
    except (TypeError, ValueError, ArithmeticError) as error:
        raise UsageError(f"invalid configuration: {error}") from None
    options.task = options.task or method.TASKS[0]
    check_combinations(method, options, config, given, resuming=bool(checkpoint))
    if options.misread_rate is None:  # --task visual trains with misread givens unless told otherwise (docs/lit.md)
        options.misread_rate = 0.05 if options.task == "visual" else 0.0
    return options, config


def check_settings(options, config_class, values):
    """Every setting (run options, Config field values) before anything is built: the first bad one as one line."""
    for name in ("data_dir", "mnist_dir"):
        if Path(getattr(options, name)).exists() and not Path(getattr(options, name)).is_dir():
            raise UsageError(f"{flag(name)} {getattr(options, name)} is a file, not a folder")
    lowest = min(1, *config_class().eval_steps)  # 0 thinking steps only where the method's own table has them
    if not values["eval_steps"] or min(values["eval_steps"]) < lowest:
        raise UsageError(f"--eval-steps must list thinking steps >= {lowest}, got {shown(values['eval_steps'])}")
    types = typing.get_type_hints(config_class)
    for name, value in values.items():
        kind = types.get(name)  # None: not a field (Config() will say so)
        if kind is float and not math.isfinite(value):
            raise UsageError(f"{flag(name)} must be a finite number, got {value}")
        lowest = 1 if name.startswith("n_") or name == "restarts" else 0  # a model needs at least one head, ...
        if kind is int and value < lowest or typing.get_origin(kind) is tuple and any(v < 0 for v in value):
            raise UsageError(f"{flag(name)} must be >= {lowest}, got {shown(value)}")
    for name, allowed, fits in RANGES:
        value = values.get(name, getattr(options, name, None))
        if value is not None and not fits(value):
            raise UsageError(f"{flag(name)} must be {allowed}, got {value}")


def in_unit_interval(value):
    return 0 <= value < 1


RANGES = (  # (setting, its range in words, whether a value is in it): run options and the fields every method names
    ("seed", "between 0 and 2**32 - 1", lambda value: 0 <= value < 2 ** 32),
    ("ema", "a decay in [0, 1)", in_unit_interval), ("misread_rate", "a share in [0, 1)", in_unit_interval),
    ("lr", "in (0, 1] (AdamW moves every weight by about lr a step)", lambda value: 0 < value <= 1),
    ("beta1", "in [0, 1)", in_unit_interval), ("beta2", "in [0, 1)", in_unit_interval),
    ("weight_decay", ">= 0", lambda value: value >= 0), ("grad_clip", ">= 0", lambda value: value >= 0))


def check_combinations(method, options, config, given, resuming):
    """Options that do not go together, or with this task, as one line."""
    task, sudoku = options.task, options.task in ("sudoku", "visual")
    if task not in method.TASKS:
        raise UsageError(f"--method {method.__name__} supports --task {', '.join(method.TASKS)}, not {task}")
    if options.eval_split != "test" and not sudoku:
        raise UsageError(f"--eval-split picks among generated Sudoku puzzles; --task {task} has its own held-out parts")
    if options.eval_split != "test" and options.test_csv:
        raise UsageError(f"--test-csv files are test sets and --eval-split {options.eval_split} evaluates generated "
                         f"{options.eval_split} puzzles instead: give one of them (--eval-split test with --test-csv)")
    if "eval_sets" in given and not sudoku:
        raise UsageError(f"--eval-sets names generated Sudoku sets; --task {task} has its own held-out parts")
    if "eval_sets" in given and options.test_csv:
        raise UsageError("--eval-sets names generated Sudoku test sets and --test-csv files replace them: "
                         "give one of them")
    for name in ("text_file", "context_length"):
        if name in given and task != "text":
            raise UsageError(f"{flag(name)} sets up --task text; --task {task} does not use it")
    if "mnist_dir" in given and task != "visual":
        raise UsageError(f"--mnist-dir holds the digit images of --task visual; --task {task} does not use it")
    if getattr(config, "stage", None) == "rl" and not resuming and "init_from" not in given:
        raise UsageError("--stage rl fine-tunes a trained model with reinforcement learning: give --init-from "
                         "CHECKPOINT of a supervised run (random weights earn no reward to learn from)")
    if options.train_size is not None and not options.train_csv:
        raise UsageError(f"--train-size {options.train_size} takes the first puzzles of --train-csv file(s); the "
                         f"generated base set's size is --base-size")
    if options.misread_rate and task != "visual":
        raise UsageError(f"--misread-rate changes the images of --task visual, not of --task {task}")


def data_files(options):
    """The data files a run reads (--train-csv, --test-csv, --text-file): {path: [bytes, SHA-256]}, recorded in
    the checkpoint so that --resume refuses one that changed (every file of a --text-file folder, in order)."""
    identities = {}
    for name in (*options.train_csv, *options.test_csv, *([options.text_file] if options.text_file else [])):
        path = Path(name)
        digest, size = hashlib.sha256(), 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        identities[str(name)] = [size, digest.hexdigest()]
    return identities


# ------------------------------------------------------------- the run: the run folder, the model, training, evaluation
def run(argv):
    method, given = parse(argv)
    checkpoint_path = given.get("resume") or given.get("eval_only")
    checkpoint = load_checkpoint(checkpoint_path, method.__name__, "resume" in given) if checkpoint_path else None
    options, config = settings(method, given, checkpoint, checkpoint_path)
    device, autocast_dtype = choose_device_and_dtype(options.device, options.dtype)
    rank, ranks = world()
    if config.batch_size % ranks:
        raise UsageError(f"--batch-size {config.batch_size} does not split evenly over {ranks} ranks")
    if ranks > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank
        torch.cuda.set_device(device)
    default = Path(checkpoint_path).parent if checkpoint_path else f"runs/{method.__name__}-{options.task}"
    out = Path(options.out or default)
    check_writable(out)
    options.out = str(out)
    if "eval_only" in given:
        if rank == 0:
            task, model = build(method, config, options, device, autocast_dtype, checkpoint)
            average = None if options.trained_weights else checkpoint.get("ema")  # the weight average, if any
            evaluate_and_write(method, model, task, config, options, autocast_dtype, out / "eval.json",
                               checkpoint["step"], average)
        return 0
    own = out / "checkpoint.pt"  # resumed in its own folder, a run goes on in its files
    here = "resume" in given and own.exists() and os.path.samefile(own, given["resume"])
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    try:
        with contextlib.ExitStack() as held:  # rank 0 makes the folder and locks it
            agreed(lambda: held.enter_context(run_folder_lock(out, here, "overwrite" in given)))
            return train_and_evaluate(method, checkpoint, given, config, options, device, autocast_dtype, here)
    finally:
        for folder in created if rank == 0 else ():
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()  # the run stopped before it wrote anything


def build(method, config, options, device, autocast_dtype, source):
    """The task and the model (with the weights of the checkpoint `source`, if any)."""
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    try:
        own_task = getattr(method, "build_task", lambda *args: None)  # a task the method file generates itself
        task = own_task(options.task, config, options) or build_task(options.task, config, options)
        check_fits(method, config, task, device)
        model = method.build_model(config, task).to(device)
    except (ValueError, FileNotFoundError, ArithmeticError) as error:
        raise UsageError(str(error)) from None
    if source:
        if source.get("vocabulary") not in (None, getattr(task, "characters", None)):  # a text checkpoint's ids
            raise UsageError(f"--text-file {options.text_file} holds other characters than the text the checkpoint "
                             f"was trained on, so its character ids would mean other characters")
        try:
            model.load_state_dict(source["model"])
        except RuntimeError as error:
            detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
            raise UsageError(f"checkpoint does not fit this configuration: {detail}") from None
    if options.compile:
        if type(model).forward is torch.nn.Module.forward:  # model.compile() compiles forward alone
            raise UsageError(f"--compile: {method.__name__}'s model has no forward for torch.compile to compile; "
                             f"run without --compile")
        model.compile()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # an EMA copy is not trained
    print(f"{method.__name__} on {options.task}: {trained:,} trained parameters, device {device}, autocast "
          f"{autocast_dtype or 'off'}, run folder {options.out}")
    return task, model


def train_and_evaluate(method, checkpoint, given, config, options, device, autocast_dtype, here):
    """Train from scratch, from --init-from weights or from --resume (here: in its own folder); then evaluate."""
    out, resuming = Path(options.out), "resume" in given
    rank, ranks = world()
    source = checkpoint or (load_checkpoint(given["init_from"], method.__name__) if "init_from" in given else None)
    task, model = build(method, config, options, device, autocast_dtype, source)
    files = data_files(options)
    for path, recorded in checkpoint.get("data_files", {}).items() if resuming else ():
        if files.get(path, recorded) != recorded:  # --resume trains on the data the run began with
            raise UsageError(f"{path} changed since the run began ({recorded[0]:,} bytes then, {files[path][0]:,} "
                             f"now, or other content): --resume continues on the data the run began with; restore "
                             f"the file or start a new run")
    if ranks > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)  # every rank starts from rank 0's weights
        torch.manual_seed(options.seed + 1_000_003 * rank)  # the ranks' own random draws (rank 0: reseeded too)
    try:
        optimizer = method.make_optimizer(model, config)
    except ValueError as error:  # AdamW's own checks, for a setting the Config does not name
        raise UsageError(f"invalid optimizer setting: {error}") from None
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    average = WeightAverage(model, options.ema, optimizer) if options.ema else None
    step = checkpoint["step"] if resuming else 0
    if resuming:
        if average and not checkpoint.get("ema"):
            raise UsageError(f"{given['resume']} was trained without --ema; resume it without one")
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint.get("rank_rngs") or [checkpoint]
        if len(states) == ranks:
            set_rng_state(states[rank], device)
        else:
            print(f"the checkpoint holds the random state of {len(states)} rank(s), this run has {ranks}: "
                  f"it continues with fresh random draws, not bit-exactly")
        if average:
            average.load_state_dict(checkpoint["ema"])
    peak = matmul_peak(device, autocast_dtype or torch.float32)
    print(f"matmul probe: {peak / 1e9:.1f} GFLOP/s ({device}, {autocast_dtype or torch.float32}), the peak for MFU")
    if device.type == "cpu" and autocast_dtype and (fp32 := matmul_peak(device, torch.float32)) > 2 * peak:
        print(f"warning: this CPU multiplies {autocast_dtype} matrices at {peak / 1e9:.1f} GFLOP/s and float32 ones "
              f"at {fp32 / 1e9:.1f} (no {str(autocast_dtype).removeprefix('torch.')} units): --dtype float32 "
              f"trains faster here")
    cost = CostMeter(peak, ranks, **(checkpoint.get("cost") or {} if resuming else {}))

    def checkpoint_state(step, rank_rngs):  # rank_rngs: every rank's random state under torchrun, else None
        return {"method": method.__name__, "run": vars(options), "config": dataclasses.asdict(config),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, **rng_state(device), "rank_rngs": rank_rngs, "data_files": files,
                "cost": {"counted_flops": cost.counted_flops, "counted_steps": cost.counted_steps},
                "vocabulary": getattr(task, "characters", None),  # a text checkpoint fits only a text of these
                "ema": average.state_dict() if average else None}

    check_evaluation(method, model, task, config, options, device, autocast_dtype)
    agreed(lambda: clear_run_folder(out, here, step))  # everything is checked: the old run can go
    step = train(method, model, optimizer, scaler, task, config, options, device, autocast_dtype, step,
                 checkpoint_state, cost)
    if step is None:
        return 130
    if rank == 0:
        summary = {"training_flops": cost.flops_per_step() * step, "flops_per_step": cost.flops_per_step(),
                   "flops_counted_on_steps": cost.counted_steps, "peak_flops_per_s": peak, "ranks": ranks,
                   "device": str(device), **cost.last, **peak_memory(device)}
        evaluate_and_write(method, model, task, config, options, autocast_dtype, out / "results.json", step,
                           average and average.state_dict(), summary)
    if ranks > 1:
        dist.barrier()  # the other ranks wait for the evaluation
    return 0


def check_evaluation(method, model, task, config, options, device, autocast_dtype):
    """The evaluation once before training, on two examples of each test set with every thinking-step count, so a
    setting only it rejects stops the run now; over a thousand steps are timed first and refused past a week."""
    probe = copy.copy(task)
    probe.test_sets = {name: {key: value[:2] for key, value in batch.items()} for name, batch in task.test_sets.items()}
    steps = config.eval_steps
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            if sum(steps) > 1000:
                began = time.perf_counter()
                method.evaluate(model, probe, config, (min(steps),), autocast_dtype)
                per_step = (time.perf_counter() - began) / max(1, min(steps)) / 2  # seconds a thinking step, example
                days = per_step * sum(steps) * options.eval_size / 86_400
                if days > 7:
                    raise UsageError(f"--eval-steps {shown(steps)}: the evaluation would take about {days:,.0f} days "
                                     f"here ({options.eval_size} examples a set); give fewer thinking steps or a "
                                     f"smaller --eval-size")
            method.evaluate(model, probe, config, steps, autocast_dtype)
        except (ValueError, ArithmeticError, RuntimeError) as error:
            reason = (str(error).splitlines() or [""])[0]
            raise UsageError(f"the evaluation fails with these settings: {reason}") from None
    model.train()
    model.zero_grad(set_to_none=True)


def evaluate_and_write(method, model, task, config, options, autocast_dtype, path, step, average=None, cost=None):
    """Evaluate the model (or the weight average `average`), print the table and write it to path with what was
    evaluated: the step, which weights, the seed, the test sets and their sizes (an earlier eval.json: "earlier")."""
    weights = f"weight average (--ema {options.ema})" if average else "as trained"
    if average:
        print(f"evaluating the {weights}")
        model.load_state_dict({k: v for k, v in average.items() if k != "updates"}, strict=False)
    broken = next((name for name, value in model.state_dict().items()
                   if value.is_floating_point() and not torch.isfinite(value).all()), None)
    if broken is not None:
        raise UsageError(f"the checkpoint's {'weight average' if average else 'weights'} hold non-finite values "
                         f"({broken}): its run diverged; evaluate an earlier checkpoint")
    rows = method.evaluate(model, task, config, config.eval_steps, autocast_dtype)
    split = getattr(task, "eval_split", None)  # the generated Sudoku sets' split
    print_table(rows, f"{method.__name__} on {options.task}: evaluation" + (f" on the {split} split" if split else ""))
    evaluated = {"step": step, "weights": weights, "seed": options.seed, **({"split": split} if split else {}),
                 "eval_size": options.eval_size, "test_files": list(options.test_csv),
                 "eval_steps": list(config.eval_steps),
                 "test_sets": {name: len(next(iter(batch.values()))) for name, batch in task.test_sets.items()}}
    record = {"method": method.__name__, "task": options.task, "run": vars(options),
              "config": dataclasses.asdict(config), "evaluated": evaluated, "rows": rows,
              **({"cost": cost} if cost else {})}
    if path.name == "eval.json" and path.exists():
        try:
            earlier = json.loads(path.read_text())
            record["earlier"] = [*earlier.pop("earlier", []), earlier]
        except (OSError, ValueError, AttributeError):
            print(f"warning: {path} cannot be read; the new evaluation replaces it", file=sys.stderr)
    write_json(path, record)


def print_table(rows, title):
    if not rows:
        return
    columns = list(dict.fromkeys(c for row in rows for c in row))  # every row's columns (restart rows add some)
    cells = [[f"{row.get(c, ''):.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
             for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    for line in [columns, *cells]:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


def choose_device_and_dtype(device_name, dtype_name):
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    device = torch.device(device_name if device_name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if dtype_name == "auto":
        dtype_name = "float32" if device.type != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, None if dtype_name == "float32" else getattr(torch, dtype_name)


# --------------------------------------------------------------------------------------------------- the training loop
def train(method, model, optimizer, scaler, task, config, options, device, autocast_dtype, step, checkpoint_state,
          cost):
    """The loop: the learning-rate schedule, the method's train_step on each batch, a JSON line every --log-every
    steps (step, lr, metrics, cost) and checkpoints. Returns the last step, or None when stopped (Ctrl-C, SIGTERM)."""
    out, (rank, ranks) = Path(options.out), world()
    path, saved = out / "checkpoint.pt", [step] if (out / "checkpoint.pt").exists() else []

    def kept():
        return f"{path} (step {saved[-1]}) is kept" if saved else "nothing was saved"

    def save(step):  # every rank gathers its state; rank 0 writes it atomically, or stops the run in one line
        gathered = rank_states(model, device)
        if rank == 0:
            try:
                save_checkpoint(path, checkpoint_state(step, gathered))
            except (OSError, RuntimeError) as error:  # a full disk (torch's writer adds a RuntimeError of its own)
                while not isinstance(error, OSError) and error.__context__ is not None:
                    error = error.__context__
                reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                raise TrainingError(f"cannot save the checkpoint of step {step}: {reason.splitlines()[0]}; "
                                    f"{kept()}") from None
        saved.append(step)

    stop = StopRequests()
    hooks = [optimizer.register_step_pre_hook(lambda *_: setattr(stop, "updating", True)),
             *(average_gradients_over_ranks(model) if ranks > 1 else [])]
    log = open(out / "log.jsonl", "a") if rank == 0 else open(os.devnull, "w")
    progress = tqdm(total=config.steps, initial=step, desc=method.__name__, dynamic_ncols=True, disable=rank != 0)
    start, start_step, tokens = time.perf_counter(), step, 0
    with stop_handler(stop), log, progress:
        try:
            while step < config.steps and not stop.requested:
                stop.rng_at_step_start = rng_state(device)  # what a stop inside this step must leave drawn again
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lr_factor(step, config)
                batch = with_example_seeds(task.train_batch(step, config.batch_size), options.seed, step)
                tokens += next((v.numel() for v in batch.values() if not v.is_floating_point()), 0)  # cells, chars
                # this rank's share on the device (the example seeds stay on the CPU: methods read them as ints)
                batch = {k: v.chunk(ranks)[rank] for k, v in batch.items()}
                batch = {k: v if k == "example_seed" else v.to(device, non_blocking=True) for k, v in batch.items()}
                counted = (step + 1) % options.log_every == 0 or step + 1 == config.steps  # by step: CostMeter
                metrics = cost.step(lambda: method.train_step(model, optimizer, scaler, batch, step, config,
                                                              autocast_dtype), counted)
                if ranks > 1:  # the metrics averaged over the ranks; a stop asked on any rank stops every rank
                    values = torch.stack([*(v.detach().float().reshape(()).to(device) for v in metrics.values()),
                                          torch.tensor(float(stop.requested), device=device)])
                    dist.all_reduce(values)
                    metrics, stop.requested = dict(zip(metrics, values[:-1] / ranks)), bool(values[-1] > 0)
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise TrainingError(f"the loss is {loss} at step {step + 1}: training diverged, try a lower "
                                        f"--lr; stopped, {kept()}")
                step += 1
                stop.rng_at_step_start, stop.updating = None, False
                progress.update(1)
                if step % options.log_every == 0 or step == config.steps:  # a line of log.jsonl
                    steps, seconds = step - start_step, time.perf_counter() - start
                    cost.last = last = cost.fields(steps, steps * config.batch_size, tokens, seconds)
                    values = {k: float(v) for k, v in metrics.items()}
                    logged = {k: v if math.isfinite(v) else None for k, v in values.items()}  # JSON has no NaN
                    print(json.dumps({"step": step, "lr": optimizer.param_groups[0]["lr"], **logged, **last},
                                     allow_nan=False), file=log, flush=True)
                    progress.set_postfix({**{k: f"{v:.4g}" for k, v in values.items()},
                                          "ex/s": f"{last['examples_per_s']:.0f}", "MFU": f"{last['mfu']:.1%}"})
                if step % options.save_every == 0:
                    save(step)
        except KeyboardInterrupt:  # a second stop, inside a step
            stop.requested = True
            if stop.rng_at_step_start is not None:  # the unfinished step had drawn random numbers: undo that
                set_rng_state(stop.rng_at_step_start, device)
        finally:
            for hook in hooks:
                hook.remove()
        if stop.updating:  # the weights may be half updated: no checkpoint beats an inexact one
            print(f"interrupted while step {step + 1} updated the weights; not saved, {kept()}")
            return None
        with stop_handler(signal.SIG_IGN):  # no Ctrl-C stops the last save
            save(step)
    if stop.requested:
        print(f"interrupted at step {step}; checkpoint saved to {path} (continue with --resume)")
        return None
    if step > start_step:
        memory = peak_memory(device)
        peak = f", peak GPU memory {memory['peak_memory_bytes'] / 2**30:.2f} GiB" if memory else ""
        print(f"trained {step - start_step} steps in {time.perf_counter() - start:.0f} s: "
              f"{cost.last['examples_per_s']:.1f} examples/s, {cost.flops_per_step():.3g} FLOPs/step, "
              f"MFU {cost.last['mfu']:.1%}{peak}")
    return step


def lr_factor(step, config):
    """Linear warmup, then cosine decay to 10 % of the peak at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def with_example_seeds(batch, seed, step):
    """The batch plus "example_seed", one int64 per example from (--seed, step, the example's place in the global
    batch): a method that draws an example's noise from its own seed draws the same under any torchrun split."""
    seeds = np.random.default_rng([seed, step, 1]).integers(2**62, size=len(next(iter(batch.values()))))
    return {**batch, "example_seed": torch.from_numpy(seeds)}


def peak_memory(device):
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}


class WeightAverage:
    """average <- d·average + (1 - d)·weights after optimizer step n, d = min(decay, (1 + n) / (10 + n));
    the warm-up of d (TensorFlow's ExponentialMovingAverage) keeps a short run from averaging in its random init."""

    def __init__(self, model, decay, optimizer):
        self.decay, self.updates = decay, 0
        self.weights = [weight.data for weight in model.parameters()]
        self.names = [name for name, _ in model.named_parameters()]
        self.average = [weight.clone() for weight in self.weights]
        optimizer.register_step_post_hook(self.update)

    def update(self, *unused):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, self.weights, 1 - decay)
        self.updates += 1

    def state_dict(self):
        return {**dict(zip(self.names, self.average)), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state):
        self.updates = int(state["updates"])
        torch._foreach_copy_(self.average, [state[name] for name in self.names])


def rng_state(device):
    """The random generators' state: all that a step draws from besides its seeded batch."""
    return {"rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}


def set_rng_state(state, device):
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"])


# ----------------------------------------------------------- tasks (the Sudoku and VQA tasks live in the data scripts)
class TextTask:
    """Character-level language modelling on UTF-8 documents (Python's documentation topics by default, or each
    file of a --text-file folder) split whole into training, validation and test, about 80/10/10 % of the characters
    for every seed; no window crosses a document's end. A single --text-file: its first 90 % trains."""
    name = "text"

    def __init__(self, text_file, context_length, seed=0, eval_size=500):
        documents = self.read_documents(text_file)
        self.characters = sorted(set("".join(documents.values())))
        self.vocab_size, self.seq_len, self.seed = len(self.characters), context_length, seed
        self.index = {ch: i for i, ch in enumerate(self.characters)}
        window = context_length + 1
        if len(documents) == 1:  # one file: split by position
            data = np.array(self.encode(next(iter(documents.values()))), np.int64)
            parts = {"train": [data[:int(0.9 * len(data))]], "held-out": [data[int(0.9 * len(data)):]]}
        else:  # split by document, in an order fixed by the names
            parts, total, taken = {"test": [], "validation": [], "train": []}, sum(map(len, documents.values())), 0
            for name in sorted(documents, key=lambda name: zlib.crc32(name.encode())):  # (hash() varies per run)
                part = "test" if taken < 0.1 * total else "validation" if taken < 0.2 * total else "train"
                parts[part].append(np.array(self.encode(documents[name]), np.int64))
                taken += len(documents[name])
        self.train_parts = [part for part in parts.pop("train") if len(part) > window]
        self.test_sets = {}
        for set_name, set_parts in parts.items():
            # windows taken round-robin over the documents, so that the first few cover many of them
            columns = [part[:len(part) // window * window].reshape(-1, window) for part in set_parts]
            rows = [row for rows in itertools.zip_longest(*columns) for row in rows if row is not None]
            if rows:
                self.test_sets[set_name] = {"tokens": torch.from_numpy(np.stack(rows[:eval_size]))}
        if len(documents) > 1 and (not self.train_parts or len(self.test_sets) < len(parts)):
            raise UsageError(f"{text_file} has {len(documents)} documents: too few for a training, a validation and "
                             f"a test part of whole documents, each with a document of at least {window} characters "
                             f"(--context-length {context_length}); add documents or give one file")
        if not self.train_parts or len(self.test_sets) < len(parts):
            raise UsageError(f"{text_file or 'the text'} has {sum(map(len, documents.values()))} characters; "
                             f"--context-length {context_length} needs at least {20 * window}")
        self.starts = np.cumsum([0] + [len(part) - window for part in self.train_parts])  # window starts per document

    @staticmethod
    def read_documents(text_file):
        if not text_file:
            from pydoc_data.topics import topics
            return dict(topics)
        path, documents = Path(text_file), {}
        for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            try:
                documents[str(file.relative_to(path)) if path.is_dir() else file.name] = file.read_text("utf-8")
            except FileNotFoundError:
                raise UsageError(f"text file not found: {text_file}") from None
            except OSError as error:
                raise UsageError(f"--text-file {file} cannot be read: {error.strerror or error}") from None
            except UnicodeDecodeError as error:
                raise UsageError(f"{file} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        if not documents:
            raise UsageError(f"--text-file {text_file} is a folder without files")
        return documents

    def encode(self, text):
        return [self.index[ch] for ch in text]

    def decode(self, tokens):
        return "".join(self.characters[t] for t in tokens)

    def train_batch(self, step, batch_size):
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, self.starts[-1], batch_size)  # a window start, uniform over every document's
        documents = np.searchsorted(self.starts, picks, side="right") - 1
        offsets = picks - self.starts[documents]
        windows = [self.train_parts[d][p:p + self.seq_len + 1] for d, p in zip(documents, offsets)]
        return {"tokens": torch.from_numpy(np.stack(windows))}


def build_task(name, config, options):
    if name in ("sudoku", "visual"):
        return sudoku_data.build_task(name, config, options)
    if options.train_csv or options.test_csv:
        raise UsageError(f"--train-csv and --test-csv hold Sudoku puzzles; --task {name} does not read them")
    if name == "text":
        return TextTask(options.text_file, options.context_length, options.seed, options.eval_size)
    import vqa_data
    return vqa_data.VQATask(seed=options.seed, eval_size=options.eval_size)


# -------------------------------------------------------------------------------------------------------- command line
def load_method(name):
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} (scripts/benchmark.py runs "
                         f"every Sudoku method)")
    return importlib.import_module(name)


class BooleanFlag(argparse.Action):
    """--name sets True and --no-name sets False, also for a field whose own name starts with no_."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__([option_strings[0], "--no-" + option_strings[0][2:]], dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string == self.option_strings[0])


def field_argument(kind):
    """argparse keywords for a field's type; a tuple takes comma-separated values (of strings: also the flag again)."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]

        def parse_list(text):
            try:
                return tuple(item(part.strip()) for part in text.split(",") if part.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        return dict(type=parse_list, action="extend") if item is str else dict(type=parse_list)
    return dict(action=BooleanFlag) if kind is bool else dict(type=kind)


@functools.cache  # inspect parses the whole file to find a class: once per process
def field_comments(fields_class):
    """{field: its trailing '# comment'} from the dataclass source, so --help explains every knob."""
    try:
        source = inspect.getsource(fields_class)
    except OSError:
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.M))


ACTIONS = (  # what the command line does, besides the settings of the run
    ("--method", dict(required=True, help=f"one of: {', '.join(METHODS)}")),
    ("--resume", dict(metavar="PATH", help="continue a run from its checkpoint (written next to it unless --out)")),
    ("--overwrite", dict(action="store_true", help="start again in a run folder that already holds a run")),
    ("--init-from", dict(metavar="PATH", help="load model weights only (fresh optimizer and step count)")),
    ("--eval-only", dict(metavar="PATH", help="evaluate a checkpoint and exit (eval.json next to it unless --out)")))


def build_parser(method=None):
    """ACTIONS, then every field of RunOptions and of the method's Config as a flag: its trailing comment is the
    help, its default added (the parser keeps only what the user typed: settings() fills in the rest)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                                     epilog=None if method else "Use --method NAME --help for its options.")
    run_options = parser.add_argument_group("run options")
    for name, keywords in ACTIONS:
        run_options.add_argument(name, **keywords)
    groups = {run_options: RunOptions}
    if method is not None:
        groups[parser.add_argument_group(f"{method.__name__} options (Config fields)")] = method.Config
    for group, fields_class in groups.items():
        defaults, types, comments = fields_class(), typing.get_type_hints(fields_class), field_comments(fields_class)
        for field in dataclasses.fields(fields_class):
            default = getattr(defaults, field.name)
            help = comments.get(field.name, "") + ("" if default is None else f" (default: {shown(default)})")
            group.add_argument(flag(field.name), dest=field.name, help=help.lstrip().replace("%", "%%"),
                               choices=CHOICES.get(field.name), **field_argument(types[field.name]))
    return parser


def parse(argv):
    """(method module, options given on the command line as a dict)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--method")
    known, _ = first.parse_known_args(argv)
    if known.method is None:
        build_parser().parse_args(argv)  # prints usage/--help and exits
    method = load_method(known.method)
    given = vars(build_parser(method).parse_args(argv))
    for name in POSITIVE:
        if name in given and given[name] < 1:
            raise UsageError(f"{flag(name)} must be a positive integer, got {given[name]}")
    if "resume" in given and "eval_only" in given:
        raise UsageError("--resume continues a run and --eval-only evaluates one: give one of them")
    if "init_from" in given and ("resume" in given or "eval_only" in given):
        raise UsageError("--init-from starts a new run: it does not go with --resume or --eval-only")
    if "trained_weights" in given and "eval_only" not in given:
        raise UsageError("--trained-weights chooses the weights --eval-only evaluates; give it with --eval-only")
    return method, given


def check_fits(method, config, task, device):
    """Refuse a model or batch that cannot fit, before anything is allocated: the parameters (counted on the meta
    device) with their gradients and AdamW's two moments, plus a batch; a lower bound (activations come on top)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else sudoku_data.available_memory()
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the real build draws the same numbers
            parameters = sum(p.numel() for p in method.build_model(config, task).parameters())
    except Exception:  # a model that cannot be built on the meta device: no estimate
        return
    finally:
        np.random.set_state(numpy_state)
    example = sum(v.element_size() * v[:1].numel() for v in task.train_batch(0, 1).values())
    needed = 16 * parameters + example * config.batch_size
    if needed > free:
        raise UsageError(f"this run needs at least {needed / 2**30:,.1f} GiB ({parameters:,} parameters with their "
                         f"gradients and optimizer state, and a batch of {config.batch_size:,}), but {device} has "
                         f"{free / 2**30:,.1f} GiB free")


# ------------------------------------------ run-folder safety: atomic files, checkpoints, the lock, Ctrl-C and SIGTERM
def save_checkpoint(path, state):
    write_atomically(path, lambda file: torch.save(state, file))


def load_checkpoint(path, method_name, for_resume=False):
    path = Path(path)
    if path.is_dir():
        inside = f"; its checkpoint is {path / 'checkpoint.pt'}" if (path / "checkpoint.pt").is_file() else ""
        raise UsageError(f"{path} is a folder, not a checkpoint file{inside}")
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except EOFError:
        raise UsageError(f"cannot read checkpoint {path}: the file is empty or cut short") from None
    except OSError as error:
        raise UsageError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except Exception:  # not a torch file, or one holding objects other than tensors and plain values
        state = None
    if not isinstance(state, dict) or "model" not in state:
        raise UsageError(f"{path} is not a checkpoint train.py wrote; nothing was loaded from it")
    if state.get("method") != method_name:
        raise UsageError(f"{path} was trained with --method {state.get('method')}, not {method_name}")
    needed = ("run", "config", "step", *(("optimizer", "scaler", "rng") if for_resume else ()))
    missing = [key for key in needed if key not in state]
    if missing:
        raise UsageError(f"{path} lacks the {', '.join(missing)} entr{'ies' if len(missing) > 1 else 'y'} of a "
                         f"train.py checkpoint{' that --resume needs' if for_resume else ''}")
    return state


def write_json(path, value):
    write_atomically(path, lambda file: file.write(json.dumps(value, indent=1, allow_nan=False).encode()))


def check_writable(out):
    """Refuse, in one line, a run folder that cannot be created or written (checked before any work)."""
    existing = next(folder for folder in (out, *out.parents) if folder.exists() or folder == Path(folder.anchor))
    if existing == out and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {existing} is not writable")


@contextlib.contextmanager
def run_folder_lock(out, here=False, overwrite=False):
    """Make the run folder and hold out/lock (this process's id and host) while a run writes the folder. A lock left
    on this host by an ended process is taken over; a live one, or one from another host (whose process this host
    cannot see), refuses this run, as does a run in the folder that the user did not name (here: resumed in its
    folder; --overwrite clears the folder only once the new run has been built and checked)."""
    lock, mine = out / "lock", out / f"lock.{os.getpid()}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        mine.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        try:
            while True:
                with contextlib.suppress(FileExistsError):
                    os.link(mine, lock)  # atomic, and the lock never shows a half-written id
                    break
                if lock.is_dir():
                    raise UsageError(f"{lock} is a folder, not a run's lock: remove it")
                owner = lock.read_text().split() if lock.exists() else []
                pid = int(owner[0]) if owner and owner[0].isdigit() else 0
                if pid > 0 and (owner[1:] != [socket.gethostname()] or process_alive(pid)):
                    raise UsageError(f"{out} is in use by another run (process {pid} on {' '.join(owner[1:])}); "
                                     f"wait for it, choose another --out, or delete {lock} if no run uses it")
                lock.unlink(missing_ok=True)  # stale: its run has ended without releasing it
        finally:
            mine.unlink()
    except OSError as error:
        raise UsageError(f"--out {out}: {error.strerror or error}") from None
    try:
        held = [name for name in ("checkpoint.pt", "results.json", "log.jsonl") if (out / name).exists()]
        if held and not here and not overwrite:
            checkpoint = out / "checkpoint.pt"
            resume = f"continue it with --resume {checkpoint} or " if checkpoint.exists() else ""
            raise UsageError(f"{out} already holds a run ({', '.join(held)}); {resume}start it again with --overwrite")
        yield
    finally:
        lock.unlink(missing_ok=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


# A run's files, and the curves scripts/plot_curves.py draws beside them (a new run removes the old run's plot too)
RUN_FILES = ("checkpoint.pt", "results.json", "eval.json", "log.jsonl", "curve.svg", "eval-curve.svg")


def clear_run_folder(out, here, step):
    """With the folder locked, just before step `step`: remove what --overwrite replaces and what a crash left."""
    for name in RUN_FILES:
        for temporary in out.glob(f"{name}.*.tmp"):  # left by a run killed while saving
            temporary.unlink()
        if not here:  # a new run, or one continued in another folder, starts its own files and log
            (out / name).unlink(missing_ok=True)
    log = out / "log.jsonl"
    if here and log.exists():  # drop the lines a crashed run wrote after its last checkpoint, or cut short
        kept = []
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
        write_atomically(log, lambda file: file.write("".join(kept).encode()))


@contextlib.contextmanager
def stop_handler(handler):
    """Ctrl-C and SIGTERM (sent by timeout, job schedulers, docker stop) go to handler inside the block (in the main
    thread)."""
    try:
        previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        previous = {}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


class StopRequests:
    """The signal handler while training: the first Ctrl-C or SIGTERM lets the step in flight finish, then the run
    saves and stops; a second stops inside the step (raising KeyboardInterrupt; what train does then is said there)."""

    def __init__(self):
        self.requested, self.updating, self.rng_at_step_start = False, False, None

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}: saving after this step "
                   f"(Ctrl-C again to stop at once)")


# ---------------------------------------------------------------------------------- cost meter: FLOPs, throughput, MFU
def _attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)  # Q·Kᵀ and P·V: 2 products


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return 2 * sdpa_flop_count(query, key, value)  # dV, dP, dQ, dK: 4 products, the forward's scores not recomputed


# Attention counted as its mathematics, the model-FLOPs convention of MFU (PaLM, appendix B): a kernel that
# recomputes the scores does more work, not more model FLOPs. torch's counter does not know the CPU kernel at all.
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    **{getattr(torch.ops.aten, name): _attention_backward_flops for name in (
        "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward") if hasattr(torch.ops.aten, name)}}


def matmul_peak(device, dtype, seconds=0.2):
    """FLOP/s of the fastest square matmul on `device` in `dtype` over `seconds` (torch's benchmark Timer, which
    synchronises the GPU): the peak MFU is measured against. 4096² on CUDA, 1024² on a CPU, 256² for a dtype the
    CPU has no fast kernel for (fp16: seconds a 1024²)."""
    generator = torch.Generator(device).manual_seed(0)  # its own: the run's random state stays untouched

    def product(n):
        a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
        return torch.utils.benchmark.Timer("a @ b", globals=dict(a=a, b=b), num_threads=torch.get_num_threads())

    n = 4096 if device.type == "cuda" else 256 if product(256).timeit(1).mean * 64 > seconds else 1024
    return 2 * n ** 3 / min(product(n).blocked_autorange(min_run_time=seconds).times)


class CostMeter:
    """Throughput, training FLOPs and MFU. FLOPs are counted, not modelled: FlopCounterMode around the real
    train_step of the step before each log line (every product, convolution and attention of every pass, under
    no_grad too; elementwise ops and the optimizer left out, the usual MFU convention); a per-step cost that varies
    is the mean of the counted steps. Under torchrun each rank counts its slice: the world's FLOPs are that × ranks."""

    def __init__(self, peak, ranks, counted_flops=0, counted_steps=0):  # the counts so far: a resumed run's
        self.peak, self.ranks = peak, ranks  # FLOP/s of one device
        self.counted_flops, self.counted_steps = counted_flops, counted_steps
        self.counted_here, self.counted_seconds = 0, 0.0  # the steps counted since this process began, their time
        self.last = {}  # the latest log line's cost fields

    def flops_per_step(self):
        return self.counted_flops / max(1, self.counted_steps)

    def step(self, train_step, count):
        """train_step(), counting its FLOPs when count is true (and timing it: the counter slows the step)."""
        if not count:
            return train_step()
        began = time.perf_counter()
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            metrics = train_step()
        self.counted_seconds += time.perf_counter() - began
        self.counted_here += 1
        self.counted_flops += counter.get_total_flops() * self.ranks
        self.counted_steps += 1
        return metrics

    def fields(self, steps, examples, tokens, seconds):
        """The log's cost fields for `steps` steps in `seconds`: rates over the steps the counter did not slow."""
        if steps > self.counted_here:
            share = (steps - self.counted_here) / steps
            steps, examples, tokens = steps - self.counted_here, examples * share, tokens * share
            seconds -= self.counted_seconds
        return {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds,
                "flops_per_step": self.flops_per_step(),
                "mfu": self.flops_per_step() * steps / seconds / (self.peak * self.ranks),
                "timed_steps": steps, "seconds": seconds}


# ------------------------------------------------------------------------------------------ torchrun: data parallelism
# torchrun --nproc_per_node N train.py ...: each rank trains on its slice of every global batch; rank 0 logs and saves
def world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def agreed(work):
    """work() on rank 0 while the others wait; a UsageError there is raised on every rank, so none waits forever."""
    message = [None]
    if world()[0] == 0:
        try:
            work()
        except UsageError as error:
            message = [str(error)]
    if world()[1] > 1:
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UsageError(message[0])


def average_gradients_over_ranks(model):
    """Hooks (returned) that replace each gradient by its mean over the ranks at the end of every backward pass, in
    one flat all-reduce as DDP does, before the method's own clipping and optimizer step. A missing gradient counts
    as zero where another rank has one and stays None where none has; a second pass adds the mean of its parts."""
    parameters = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    queued = []

    def all_reduce_gradients():
        queued.clear()
        present = torch.tensor([p.grad is not None for p in parameters], device=parameters[0].device).float()
        flat = torch.cat([present, *(p.grad.float().flatten() if p.grad is not None else
                                     torch.zeros(p.numel(), device=p.device) for p in parameters)])
        dist.all_reduce(flat)
        flat[len(parameters):] /= dist.get_world_size()
        for p, somewhere, grad in zip(parameters, flat[:len(parameters)].tolist(),
                                      flat[len(parameters):].split([p.numel() for p in parameters])):
            if somewhere:
                p.grad = grad.view_as(p).to(p.dtype)

    def queue(parameter):
        if not queued:  # once per backward pass, run when the pass has accumulated every gradient
            queued.append(True)
            torch.autograd.Variable._execution_engine.queue_callback(all_reduce_gradients)

    return [p.register_post_accumulate_grad_hook(queue) for p in parameters]


def rank_states(model, device):
    """Every rank's random state for a checkpoint (None in one process), once the ranks' weights are checked equal."""
    ranks = world()[1]
    if ranks == 1:
        return None
    fingerprint = [t.item() for p in model.parameters() for t in (p.double().sum(), p.double().square().sum())]
    everyone = [None] * ranks
    dist.all_gather_object(everyone, (fingerprint, rng_state(device)))
    if any(other != everyone[0][0] for other, _ in everyone):
        raise TrainingError("the ranks' weights differ: the gradient averaging failed; stopped")
    return [state for _, state in everyone]


# --------------------------------------------------------------------------------------------------------- entry point
def main(argv=None, entry=run):
    """entry(argv) as a command: torchrun's process group, Ctrl-C and SIGTERM, one-line errors; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # launched by torchrun
        # the other ranks wait while rank 0 evaluates: a long timeout
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(hours=3))
    rank, ranks = world()
    speaking = sys.stdout if rank == 0 else open(os.devnull, "w")  # rank 0 alone prints
    try:  # outside the loop (start-up, data, evaluation) a stop, SIGTERM as Ctrl-C, is immediate: KeyboardInterrupt
        with stop_handler(signal.default_int_handler), contextlib.redirect_stdout(speaking):
            status = entry(argv)
    except (UsageError, TrainingError) as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        status = 2 if isinstance(error, UsageError) else 1
    except KeyboardInterrupt:
        print("interrupted outside the training steps; checkpoints already written are kept, nothing else was saved",
              file=sys.stderr)
        status = 130
    if ranks > 1:
        dist.barrier()
        dist.destroy_process_group()
    return status


def exit_process(status):
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # a torchrun rank leaves without the interpreter's teardown: gloo's C++ threads destroyed there can
        # abort a rank whose work is done ("terminate called without an active exception")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    exit_process(main())
