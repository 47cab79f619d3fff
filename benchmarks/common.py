"""What the benchmark scripts share: runs in parallel processes, rows saved as they finish, mean ± std tables."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Callable


def threads_per_job(jobs: int) -> int:
    """CPU threads each of ``jobs`` parallel runs may use (0: leave torch's default, for one run)."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0


def run_all(fn: Callable, jobs: list, n_jobs: int, on_result: Callable) -> None:
    """``fn(job)`` for every job, ``n_jobs`` at a time in spawned processes (CUDA cannot be forked; the
    runs can share one GPU), calling ``on_result`` as each finishes so a cut-off run loses nothing."""
    if n_jobs > 1:
        with mp.get_context("spawn").Pool(n_jobs) as pool:
            for result in pool.imap_unordered(fn, jobs):
                on_result(result)
    else:
        for job in jobs:
            on_result(fn(job))


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark with seeds shares: device, parallel runs, smoke size, saved rows, report."""
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (processes; they can share one GPU)")
    ap.add_argument("--fast", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--json", default=None, help="write all per-seed rows here (as each run finishes)")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON", help="only print the table of saved --json files")


def check_init(ap: argparse.ArgumentParser, path: str | None, kind: str) -> None:
    """Refuse an ``--init`` that is not a vlat checkpoint of ``kind`` before any work starts."""
    if path:
        from vlat.models import read_metadata
        try:
            found = read_metadata(path)["kind"]
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--init {path}: not a vlat checkpoint ({e})")
        if found != kind:
            ap.error(f"--init {path} is a {found} checkpoint; these arms need a {kind} one")


def run_and_report(fn: Callable, jobs: list, a, settings: Callable, table: Callable, t0: float) -> None:
    """Run every job (``a.jobs`` at a time), saving rows to ``a.json`` as they finish, then print the
    settings line with the total time since ``t0`` and the table of all rows."""
    runs: list = []

    def keep(row):
        runs.append(row)
        save_runs(a.json, settings(a), runs)

    run_all(fn, jobs, a.jobs, keep)
    print(f"{settings(a)}; total {time.perf_counter() - t0:.0f} s")
    table(runs)


def machine(a) -> str:
    """The tail of a settings line: the GPU's name or the CPU's cores, torch's version, runs at a time."""
    import torch

    from vlat.train import resolve_device

    device = resolve_device(a.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    return f"{where}, torch {torch.__version__}, {a.jobs} run(s) at a time"


def group_runs(runs: list, key: str = "method") -> dict[str, list[dict]]:
    """Saved rows grouped by ``key`` in seed order, each without ``key`` and ``seed`` (a run that returned a
    list of rows, one per stage or per derived model, counts as those rows)."""
    flat = [r for item in runs for r in (item if isinstance(item, list) else [item])]
    rows: dict = {}
    for r in sorted(flat, key=lambda r: r["seed"]):
        rows.setdefault(r[key], []).append({k: v for k, v in r.items() if k not in (key, "seed")})
    return rows


def save_runs(path: str | None, settings: str, runs: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))


def load_runs(files: list[str]) -> list[dict]:
    runs = []
    for f in files:
        saved = json.loads(Path(f).read_text())
        print(f"{f}: {saved['settings']}")
        runs += saved["runs"]
    return runs


def mean_std(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def shift_means(row: dict) -> dict:
    """The mean over the semantic shifts of a row that holds each of them, and the same without
    ``composition`` (which partly measures a label prior: which classes a model expects)."""
    from vlat.world import SHIFTS

    others = [s for s in SHIFTS if s != "composition"]
    return {"ood_mean": sum(row[s] for s in SHIFTS) / len(SHIFTS),
            "ood_mean_no_composition": sum(row[s] for s in others) / len(others)}


def ood_means(model, task: str, size: int, tokenizer, row: dict) -> dict:
    """Three OOD summaries: :func:`shift_means` and the mean over the common corruptions at severity 3 (the
    ID test scenes, corrupted; shifts this project did not design)."""
    from vlat.evaluate import corruption_table
    from vlat.world.corruptions import CORRUPTIONS

    corrupted = corruption_table(model, task, size, 0, [(c, 3) for c in CORRUPTIONS], tokenizer=tokenizer)
    return {**shift_means(row), "corruptions@3": corrupted["corruption_mean"]}


def print_table(rows: dict[str, list[dict]], first: str = "method") -> None:
    """``{row name: [per-seed dicts of metrics]}`` as a Markdown table of mean ± std (seconds to one decimal)."""
    cols = list(next(iter(rows.values()))[0])
    print(f"| {first} | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, runs in rows.items():
        cells = [mean_std([r[c] for r in runs], 1 if c.endswith("_s") else 3) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
