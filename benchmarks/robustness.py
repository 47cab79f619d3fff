"""Train the single-stream model with each method and compare clean, robust and OOD accuracy.

    python benchmarks/robustness.py                     # the README table (>= 3 seeds; long on CPU)
    python benchmarks/robustness.py --fast              # a smoke run in about a minute

Every method trains for the same number of epochs on the same scenes (FreeAT: epochs / m, its
equal-cost schedule). Columns: clean accuracy, robust accuracy under PGD-10 with random start on the
text and on the image site, accuracy per OOD shift, training time; mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlat.adversarial import FGM, PGD, SMART, YOPO, FreeAT, FreeLB  # noqa: E402
from vlat.evaluate import accuracy, robust_accuracy  # noqa: E402
from vlat.models import build_model  # noqa: E402
from vlat.train import TrainConfig, clean_step, train  # noqa: E402
from vlat.world import SHIFTS, Collator, WorldDataset, load_tokenizer  # noqa: E402

METHODS = {
    "clean": lambda: clean_step,
    "FGM": lambda: FGM(sites=("text", "image"), eps=1.0),
    "PGD-3": lambda: PGD(sites=("text", "image"), eps=1.0, step_size=0.3, steps=3),
    "FreeAT m=4": lambda: FreeAT(sites=("text", "image"), eps=1.0, step_size=0.5, replays=4),
    "YOPO 3x3": lambda: YOPO(sites=("text",), norm="l2", eps=1.0, step_size=0.3, outer=3, inner=3),
    "FreeLB-3": lambda: FreeLB(sites=("text", "image"), steps=3, step_size=0.3, init_mag=0.2, eps=1.0),
    "SMART": lambda: SMART(sites=("text", "image"), eps=0.1, step_size=0.1, sigma=1e-3),
}


def run(method: str, seed: int, a) -> dict:
    torch.manual_seed(seed)
    model = build_model("single_stream", "tiny")
    tok = load_tokenizer()
    data = WorldDataset(a.task, "train", a.train_size, seed)
    step = METHODS[method]()
    epochs = step.equal_cost_epochs(a.epochs) if isinstance(step, FreeAT) else a.epochs
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, seed=seed, progress=False)
    t = time.perf_counter()
    train(model, a.task, data, cfg, step_fn=step, collate_fn=Collator(tok, a.task))
    row = {"time_s": time.perf_counter() - t}
    test = WorldDataset(a.task, "test", a.eval_size, 0)
    row["clean"] = accuracy(model, test, a.task, tok)
    for site in ("text", "image"):
        attack = PGD(sites=(site,), eps=a.attack_eps, step_size=a.attack_eps / 4, steps=10)
        row[f"PGD10_{site}"] = robust_accuracy(model, test, a.task, attack, tok, seed=seed)
    for s in SHIFTS:
        row[s] = accuracy(model, WorldDataset(a.task, "test", a.eval_size, 0, shift=s), a.task, tok)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="itm", help="single-stream task: itm, tf or qa")
    ap.add_argument("--epochs", type=int, default=20, help="epochs for every method (FreeAT: / m)")
    ap.add_argument("--train-size", type=int, default=4000, help="training scenes")
    ap.add_argument("--eval-size", type=int, default=500, help="test scenes per column")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method")
    ap.add_argument("--attack-eps", type=float, default=1.0, help="L2 radius of the PGD-10 evaluation attack")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--fast", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--json", default=None, help="write all per-seed rows here")
    a = ap.parse_args(argv)
    if a.fast:
        a.epochs, a.train_size, a.eval_size, a.seeds = 1, 128, 64, 1
    results = {}
    for m in a.methods.split(","):
        rows = [run(m, seed, a) for seed in range(a.seeds)]
        results[m] = rows
        cols = list(rows[0])
        cells = []
        for c in cols:
            vals = [r[c] for r in rows]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.0f} ± {sd:.0f}" if c == "time_s" else
                         f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        if len(results) == 1:
            print(f"single-stream tiny, task {a.task}, {a.epochs} epochs x {a.train_size} scenes, {a.seeds} seeds, "
                  f"{a.eval_size} test scenes, PGD-10 L2 eps {a.attack_eps}; torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads")
            print("| method | " + " | ".join(cols) + " |")
            print("|---" * (len(cols) + 1) + "|")
        print(f"| {m} | " + " | ".join(cells) + " |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
