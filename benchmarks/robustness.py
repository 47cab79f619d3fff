"""Train the single-stream model with each method and compare clean, robust and OOD accuracy.

    python benchmarks/robustness.py                     # the README table (>= 3 seeds; long on CPU)
    python benchmarks/robustness.py --fast              # a smoke run in about a minute

Every method trains for the same number of epochs on the same scenes (FreeAT: epochs / m, its
equal-cost schedule). Columns: clean accuracy, robust accuracy under PGD-10 with random start on the
text and on the image site, accuracy per OOD shift, training time; mean ± std over seeds.

Radii are relative (:meth:`vlat.adversarial.Adversary.calibrate`): ``--image-eps 0.1`` is 10 % of the
image site's mean clean L2 norm per example, ``--text-eps 0.02`` 2 % of a caption's. The text gets the
smaller share because a caption's norm is spread over ~10 words while the ascent concentrates δ on the
one word that decides the label: at 5 % (one colour word moved most of the way to another), FGM
training already collapsed to a constant prediction in a 5-epoch probe, at 2 % it trained normally. The training methods are calibrated on the freshly initialised model
(on one training batch), the PGD-10 evaluation attack on each trained model itself (on one test batch),
so a model cannot look robust merely by growing its word embeddings. Why relative: a caption's word
embeddings have a norm near 1 and a scene's raw region features near 200, so one absolute ε is either
no threat to the image or destroys the text.
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

SITES = ("text", "image")
# eps, step sizes and init magnitudes are fractions of each site's norm (see the module docstring); YOPO perturbs
# one site (its layer one is per site): the text, as in its NLP use
METHODS = {
    "clean": lambda e: clean_step,
    "FGM": lambda e: FGM(sites=SITES, eps=e),
    "PGD-3": lambda e: PGD(sites=SITES, eps=e, step_size=e / 2.5, steps=3),
    "FreeAT m=4": lambda e: FreeAT(sites=SITES, eps=e, step_size=e, replays=4),
    "YOPO 3x3": lambda e: YOPO(sites=("text",), eps=e, step_size=e / 2.5, outer=3, inner=3),
    "FreeLB-3": lambda e: FreeLB(sites=SITES, steps=3, step_size=e / 2.5, init_mag=e / 2, eps=e),
    "SMART": lambda e: SMART(sites=SITES, norm="linf", eps=e, step_size=e / 2.5, sigma=e / 10),
}


def fractions(a, prefix: str) -> dict:
    return {"text": getattr(a, f"{prefix}text_eps"), "image": getattr(a, f"{prefix}image_eps")}


def run(method: str, seed: int, a) -> dict:
    torch.manual_seed(seed)
    model = build_model("single_stream", "tiny")
    tok = load_tokenizer()
    data = WorldDataset(a.task, "train", a.train_size, seed)
    collate = Collator(tok, a.task)
    step = METHODS[method](1.0)                       # eps = 1 x each site's calibrated scale
    if step is not clean_step:
        step.calibrate(model, collate([data[i] for i in range(64)]), a.task, fractions(a, ""))
    epochs = step.equal_cost_epochs(a.epochs) if isinstance(step, FreeAT) else a.epochs
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, seed=seed, progress=False)
    t = time.perf_counter()
    train(model, a.task, data, cfg, step_fn=step, collate_fn=collate)
    row = {"time_s": time.perf_counter() - t}
    test = WorldDataset(a.task, "test", a.eval_size, 0)
    row["clean"] = accuracy(model, test, a.task, tok)
    probe = collate([test[i] for i in range(min(128, len(test)))])
    for site in SITES:
        attack = PGD(sites=(site,), eps=1.0, step_size=0.25, steps=10).calibrate(model, probe, a.task,
                                                                             fractions(a, "attack_"))
        row[f"PGD10_{site}"] = robust_accuracy(model, test, a.task, attack, tok, seed=seed)
    for s in SHIFTS:
        row[s] = accuracy(model, WorldDataset(a.task, "test", a.eval_size, 0, shift=s), a.task, tok)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="tf", help="single-stream task: tf (true/false statements), itm or qa")
    ap.add_argument("--epochs", type=int, default=10, help="epochs for every method (FreeAT: / m)")
    ap.add_argument("--train-size", type=int, default=2000, help="training scenes")
    ap.add_argument("--eval-size", type=int, default=500, help="test scenes per column")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method")
    ap.add_argument("--text-eps", type=float, default=0.02, help="training radius on the text, a fraction of its norm")
    ap.add_argument("--image-eps", type=float, default=0.1, help="training radius on the image, a fraction of its norm")
    ap.add_argument("--attack-text-eps", type=float, default=0.02, help="PGD-10 L2 radius on the text (fraction)")
    ap.add_argument("--attack-image-eps", type=float, default=0.1, help="PGD-10 L2 radius on the image (fraction)")
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
                  f"{a.eval_size} test scenes; eps as fractions of each site's norm: train text {a.text_eps} / image "
                  f"{a.image_eps}, PGD-10 L2 text {a.attack_text_eps} / image {a.attack_image_eps}; torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads")
            print("| method | " + " | ".join(cols) + " |")
            print("|---" * (len(cols) + 1) + "|")
        print(f"| {m} | " + " | ".join(cells) + " |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
