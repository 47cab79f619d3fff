"""ALBEF's momentum-distillation ablation: pre-train with and without it at several caption-noise rates.

    python benchmarks/albef_ablation.py --jobs 18       # 3 noise rates x MD on/off x 3 seeds, all at once
    python benchmarks/albef_ablation.py --fast          # a smoke run
    python benchmarks/albef_ablation.py --report benchmarks/results/albef_ablation_*.json

Each run pre-trains the tiny ALBEF from scratch (ITC + ITM + MLM, queue, hard negatives) on
``--train-size`` scenes whose captions are replaced by noise (another scene's caption, or keyword
soup) at the given rate. With ``distill`` the ITC and MLM targets mix in the momentum model's
predictions (α = 0.4, ramped over the first epoch); without it they are one-hot. Reported on the
clean ID test split: zero-shot retrieval with the ITC features (TR@k: image → caption, IR@k: caption →
image, one relational caption per image) and ITM accuracy on matched / mismatched pairs; mean ± std
over seeds. The paper's claim is that distillation helps more as captions get noisier.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_run_options, check_init, load_runs, machine, print_table, run_and_report,  # noqa: E402
                    threads_per_job)

from vlat.evaluate import accuracy, retrieval  # noqa: E402
from vlat.models import build_model, load_model  # noqa: E402
from vlat.train import TrainConfig, train  # noqa: E402
from vlat.world import Collator, WorldDataset, load_tokenizer  # noqa: E402


def run(job) -> dict:
    noise, distill, seed, a = job
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(seed)
    if a.init:                                   # continued pre-training: the momentum copies restart from it
        model = load_model(a.init).train()
        model.config.distill = distill
    else:
        model = build_model("albef", "tiny", distill=distill, seed=seed,
                            alpha_warmup_steps=max(1, a.train_size // a.batch_size))
    tok = load_tokenizer()
    data = WorldDataset("pretrain", "train", a.train_size, seed, noise_rate=noise)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=seed, device=a.device,
                      progress=False, drop_last=True)
    state = train(model, "pretrain", data, cfg, collate_fn=Collator(tok, "pretrain"))
    r = retrieval(model, WorldDataset("itc", "test", a.eval_size, 0), tok)
    itm = accuracy(model, WorldDataset("itm", "test", a.eval_size, 0), "itm", tok)
    return {"noise": noise, "distill": distill, "seed": seed, "time_s": state.seconds, "TR@1": r["TR@1"],
            "IR@1": r["IR@1"], "TR@5": r["TR@5"], "IR@5": r["IR@5"], "ITM acc": itm}


def settings(a) -> str:
    start = f"continued from {a.init}" if a.init else "from scratch"
    return (f"ALBEF tiny pre-training {start}, {a.epochs} epochs x {a.train_size} scenes, batch {a.batch_size}, "
            f"lr {a.lr}, {a.seeds} seeds; {a.eval_size} ID test scenes; {machine(a)}")


def table(runs: list[dict]) -> None:
    rows: dict = {}
    for r in sorted(runs, key=lambda r: (r["noise"], not r["distill"], r["seed"])):
        name = f"noise {r['noise']:.0%}, MD {'on' if r['distill'] else 'off'}"
        rows.setdefault(name, []).append({k: v for k, v in r.items() if k not in ("noise", "distill", "seed")})
    print_table(rows, first="pre-training")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--noise", default=None, help="comma-separated caption-noise rates (default 0,0.2,0.4; --fast: 0,0.4)")
    ap.add_argument("--epochs", type=int, default=5, help="pre-training epochs")
    ap.add_argument("--train-size", type=int, default=4096, help="training scenes")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per step (must divide the queue, 1024)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    ap.add_argument("--eval-size", type=int, default=500, help="test scenes")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    ap.add_argument("--init", default=None, metavar="CHECKPOINT",
                    help="continue pre-training this ALBEF checkpoint (e.g. the shipped "
                         "data_samples/checkpoints/albef_tiny_pretrain.safetensors) instead of starting from scratch")
    add_run_options(ap)
    a = ap.parse_args(argv)
    check_init(ap, a.init, "albef")
    if a.report:
        return table(load_runs(a.report))
    if a.fast:
        a.epochs, a.train_size, a.eval_size, a.seeds = 1, 256, 64, 1
    a.noise = a.noise or ("0,0.4" if a.fast else "0,0.2,0.4")
    a.threads = threads_per_job(a.jobs)
    noises = [float(x) for x in a.noise.split(",")]
    if any(not 0 <= x <= 1 for x in noises):
        ap.error(f"noise rates must lie in [0, 1], got {noises}")
    t0 = time.perf_counter()
    jobs = [(n, d, s, a) for n in noises for d in (True, False) for s in range(a.seeds)]
    run_and_report(run, jobs, a, settings, table, t0)


if __name__ == "__main__":
    main()
