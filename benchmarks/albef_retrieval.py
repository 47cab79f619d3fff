"""ALBEF retrieval and ITM, zero-shot after pre-training and after fine-tuning, ID and per shift.

    python benchmarks/albef_retrieval.py --jobs 3        # 3 seeds (a GPU: a few minutes)
    python benchmarks/albef_retrieval.py --fast          # a smoke run
    python benchmarks/albef_retrieval.py --init data_samples/checkpoints/albef_tiny_pretrain.safetensors \
        --epochs 0 --finetune-epochs 2 --train-size 2048 --eval-size 300   # from the shipped model (CPU)
    python benchmarks/albef_retrieval.py --report benchmarks/results/albef_retrieval_*.json

Per seed: pre-train the tiny ALBEF from scratch (ITC + ITM + MLM, queue, hard negatives, momentum
distillation) on scenes with ``--noise`` of the captions replaced by noise; score it **zero-shot**;
then fine-tune two copies on clean captions, ``itc`` for retrieval and ``itm`` for matching
(ALBEF's retrieval fine-tuning uses both losses on one model; here each head gets its own copy so the
two rows stay separate), and score them again (**fine-tuned**).

Retrieval: one relational caption per test image, multi-positive (a caption true of several scenes
counts for each); TR@k image → caption, IR@k caption → image, ranked by the ITC similarity. ITM:
accuracy on matched / mismatched pairs. Per-shift columns: TR@1 and ITM accuracy on each OOD shift, then
for each the semantic-shift mean, the same without ``composition`` and the common corruptions' at severity 3.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_run_options, check_init, group_runs, load_runs, machine, ood_means, print_table, run_and_report,  # noqa: E402
                    threads_per_job)

from vlat.evaluate import ood_table, retrieval  # noqa: E402
from vlat.models import build_model, load_model  # noqa: E402
from vlat.train import TrainConfig, train  # noqa: E402
from vlat.world import SHIFTS, Collator, WorldDataset, load_tokenizer  # noqa: E402

RECALL = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")


def fit(model, task: str, epochs: int, lr: float, noise: float, seed: int, a) -> float:
    data = WorldDataset(task, "train", a.train_size, seed, noise_rate=noise)
    cfg = TrainConfig(epochs=epochs, batch_size=a.batch_size, lr=lr, seed=seed, device=a.device, progress=False,
                      drop_last=True)
    return train(model, task, data, cfg, collate_fn=Collator(load_tokenizer(), task)).seconds


def scores(retrieval_model, itm_model, a) -> dict:
    tok = load_tokenizer()
    row = {k: v for k, v in retrieval(retrieval_model, WorldDataset("itc", "test", a.eval_size, 0), tok).items()
           if k in RECALL}
    tr1 = ood_table(retrieval_model, "itc", a.eval_size, 0, tokenizer=tok)
    itm = ood_table(itm_model, "itm", a.eval_size, 0, tokenizer=tok)
    row["ITM"] = itm["id"]
    row.update({f"TR@1 {s}": tr1[s] for s in SHIFTS})
    row.update({f"ITM {s}": itm[s] for s in SHIFTS})
    for label, model, task, table in (("TR@1", retrieval_model, "itc", tr1), ("ITM", itm_model, "itm", itm)):
        row.update({f"{label} {k}": v for k, v in ood_means(model, task, a.eval_size, tok, table).items()})
    return row


def run(job) -> list[dict]:
    seed, a = job
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(seed)
    if a.init:                        # the momentum copies restart from the loaded model
        model = load_model(a.init).train()
    else:
        model = build_model("albef", "tiny", seed=seed, alpha_warmup_steps=max(1, a.train_size // a.batch_size),
                            **json.loads(a.overrides))
    pre_s = fit(model, "pretrain", a.epochs, a.lr, a.noise, seed, a) if a.epochs else 0.0
    tag = f"{a.name}, " if a.name else ""
    rows = [{"stage": f"{tag}zero-shot", "seed": seed, "train_s": pre_s, **scores(model, model, a)}]
    tuned = {task: copy.deepcopy(model) for task in ("itc", "itm")}
    seconds = sum(fit(m, task, a.finetune_epochs, a.finetune_lr, 0.0, seed, a) for task, m in tuned.items())
    rows.append({"stage": f"{tag}fine-tuned", "seed": seed, "train_s": seconds, **scores(tuned["itc"], tuned["itm"], a)})
    return rows


def settings(a) -> str:
    pre = (f"{a.epochs} epochs x {a.train_size} scenes ({a.noise:.0%} noisy captions), batch {a.batch_size}, "
           f"lr {a.lr}")
    if a.init:
        start = f"from {a.init}" + (f", pre-training continued {pre}" if a.epochs else " as it is")
    else:
        start = f"pre-trained from scratch {pre}"
    return (f"ALBEF tiny {a.overrides} {start}; fine-tuned {a.finetune_epochs} epochs x {a.train_size} clean scenes "
            f"(itc and itm copies, batch {a.batch_size}, lr {a.finetune_lr}); {a.seeds} seeds; {a.eval_size} test "
            f"scenes per column; {machine(a)}")


def table(runs: list[dict]) -> None:
    rows = group_runs(runs, "stage")
    groups = [["train_s", *RECALL, "ITM"], [f"TR@1 {s}" for s in SHIFTS], [f"ITM {s}" for s in SHIFTS]]
    means = [f"{m} {k}" for m in ("TR@1", "ITM") for k in ("ood_mean", "ood_mean_no_composition", "corruptions@3")]
    if all(c in r for runs_s in rows.values() for r in runs_s for c in means):   # older rows lack them
        groups.append(means)
    for cols in groups:
        print_table({s: [{c: r[c] for c in cols} for r in runs_s] for s, runs_s in rows.items()}, first="stage")
        print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="pre-training epochs (0 with --init: score it as it is)")
    ap.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs (each of itc, itm)")
    ap.add_argument("--train-size", type=int, default=8192, help="training scenes")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per step (the queue is a multiple)")
    ap.add_argument("--lr", type=float, default=1e-3, help="pre-training peak learning rate")
    ap.add_argument("--finetune-lr", type=float, default=2e-4, help="fine-tuning peak learning rate")
    ap.add_argument("--noise", type=float, default=0.2, help="fraction of pre-training captions replaced by noise")
    ap.add_argument("--eval-size", type=int, default=1000, help="test scenes per column")
    ap.add_argument("--seeds", type=int, default=3, help="seeds")
    ap.add_argument("--overrides", default="{}", help='JSON of AlbefConfig fields, e.g. \'{"queue_size": 64}\'')
    ap.add_argument("--name", default="", help="a label for this configuration's rows")
    ap.add_argument("--init", default=None, metavar="CHECKPOINT",
                    help="start from this ALBEF checkpoint (e.g. the shipped "
                         "data_samples/checkpoints/albef_tiny_pretrain.safetensors) instead of from scratch")
    add_run_options(ap)
    a = ap.parse_args(argv)
    check_init(ap, a.init, "albef")
    if a.init and json.loads(a.overrides):
        ap.error("--overrides builds a model from scratch; a model loaded with --init keeps its own configuration")
    if a.epochs < 0 or (a.epochs == 0 and not a.init):
        ap.error("--epochs must be positive (0 only with --init)")
    if a.report:
        return table(load_runs(a.report))
    if a.fast:
        a.epochs, a.finetune_epochs, a.train_size, a.eval_size, a.seeds, a.batch_size = 1, 1, 128, 64, 1, 32
    a.threads = threads_per_job(a.jobs)
    run_and_report(run, [(seed, a) for seed in range(a.seeds)], a, settings, table, time.perf_counter())


if __name__ == "__main__":
    main()
