"""VILLA's ablations in miniature: pre-training vs fine-tuning stage, modality, and the KL term.

    python benchmarks/villa.py --jobs 12                    # every arm, 3 seeds (a GPU: about 10 minutes)
    python benchmarks/villa.py --fast                       # a smoke run in about a minute on CPU
    python benchmarks/villa.py --arms baseline,VILLA-fine   # a subset; --report merges saved --json files

**Recipe.** Per seed, the single-stream tiny model is pre-trained on image-caption pairs with UNITER's
MLM + ITM (task ``pretrain``), once clean and once with VILLA (VILLA-pre); each is cached. Every arm
then fine-tunes one of them on true/false statements (``tf``, the NLVR2 analogue) and is scored like
``benchmarks/robustness.py``: clean accuracy, PGD-10 on the text and on the image, each OOD shift.

======================  ==============  ===========================================================
arm                     pre-training    fine-tuning
======================  ==============  ===========================================================
baseline                clean           clean                                  (paper Table 2)
VILLA-pre               VILLA           clean                                  (Table 2)
VILLA-fine              clean           VILLA, alternating text / image        (Table 2)
VILLA-pre+fine          VILLA           VILLA, alternating                     (Table 2)
VILLA-fine text         clean           VILLA, text only                       (Table 3a)
VILLA-fine image        clean           VILLA, image only                      (Table 3a)
FreeLB (w=0)            clean           VILLA with kl_weight 0, alternating    (Table 3b: the KL term)
======================  ==============  ===========================================================

VILLA settings: the VQA config (K = 3, no projection, δ₀ = 0, w = 1.5) with the step size stated as
a fraction of each site's norm (``Adversary.calibrate``): ``η`` = half the radius, so two ascents
reach at most text 1 % / image 3 % of the input norm, the training radii that kept the image
meaningful in the robustness table. "alternating" is the paper's ``R_at``: per ascent step one
forward with the text δ and one with the image δ, losses summed.

``pre_epoch_s`` / ``epoch_s``: seconds per epoch of the arm's pre-training / fine-tuning (runs share
the machine, so compare within one run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_run_options, check_init, group_runs, load_runs, machine, print_table, run_all,  # noqa: E402
                    run_and_report, threads_per_job)
from robustness import add_init_option, add_radius_options, fractions, score  # noqa: E402

from vlat.adversarial import VILLA  # noqa: E402
from vlat.models import build_model, load_model, read_metadata, save_model  # noqa: E402
from vlat.train import TrainConfig, clean_step, train  # noqa: E402
from vlat.world import Collator, WorldDataset, load_tokenizer  # noqa: E402


def villa(modality: str = "alternating", kl_weight: float = 1.5) -> VILLA:
    """The VQA config; η = 0.5 × each site's calibrated radius (two ascents reach at most the radius)."""
    return VILLA(modality=modality, kl_weight=kl_weight, steps=3, step_size=0.5, eps=0.0)


# arm -> (pre-training: clean / villa, fine-tuning step factory)
ARMS = {
    "baseline": ("clean", lambda: clean_step),
    "VILLA-pre": ("villa", lambda: clean_step),
    "VILLA-fine": ("clean", lambda: villa()),
    "VILLA-pre+fine": ("villa", lambda: villa()),
    "VILLA-fine text": ("clean", lambda: villa("text")),
    "VILLA-fine image": ("clean", lambda: villa("image")),
    "FreeLB (w=0)": ("clean", lambda: villa(kl_weight=0.0)),
}


def run_training(model, task: str, step, a, seed: int, epochs: int) -> float:
    """Calibrate ``step`` on one batch of ``task`` (if adversarial), train, return seconds per epoch."""
    data = WorldDataset(task, "train", a.train_size, seed)
    collate = Collator(load_tokenizer(), task)
    if step is not clean_step:
        step.calibrate(model, collate([data[i] for i in range(64)]), task, fractions(a, ""))
    cfg = TrainConfig(epochs=epochs, batch_size=a.batch_size, lr=a.lr, seed=seed, device=a.device, progress=False)
    state = train(model, task, data, cfg, step_fn=step, collate_fn=collate)
    return state.seconds / max(1, epochs)


def pretrained(kind: str, seed: int, a) -> tuple[Path, float]:
    """MLM + ITM pre-training of one seed, clean or with VILLA (cached); returns (path, seconds per epoch).
    With ``--init`` the pre-training continues from that checkpoint (both kinds for the same epochs)."""
    if a.init and not a.pretrain_epochs:
        return Path(a.init), 0.0
    start = f"{Path(a.init).stem}_" if a.init else ""
    path = Path(a.cache) / f"{start}{kind}_seed{seed}_{a.pretrain_epochs}x{a.train_size}_b{a.batch_size}.safetensors"
    if not path.exists():
        if a.threads:
            torch.set_num_threads(a.threads)
        torch.manual_seed(seed)
        model = load_model(a.init) if a.init else build_model("single_stream", "tiny")
        epoch_s = 0.0
        if a.pretrain_epochs:
            step = villa() if kind == "villa" else clean_step
            epoch_s = run_training(model, "pretrain", step, a, seed, a.pretrain_epochs)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, path, task="pretrain", method=kind, epochs=a.pretrain_epochs, train_size=a.train_size,
                   seed=seed, epoch_s=epoch_s)
    return path, float(read_metadata(path).get("epoch_s", 0.0))


def run(arm: str, seed: int, a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    kind, make_step = ARMS[arm]
    path, pre_epoch_s = pretrained(kind, seed, a)
    model = load_model(path)                          # calibrated on the CPU; train() moves it
    epoch_s = run_training(model, a.task, make_step(), a, seed, a.epochs)
    return {"pre_epoch_s": pre_epoch_s, "epoch_s": epoch_s, **score(model, a, seed)}


def _run(job):
    arm, seed, a = job
    return {"method": arm, "seed": seed, **run(arm, seed, a)}


def _pretrain(job):
    return pretrained(*job)[0]


def settings(a) -> str:
    start = f"from {a.init}, " if a.init else ""
    return (f"single-stream tiny, {start}MLM + ITM pre-training {a.pretrain_epochs} epochs, then task {a.task}: {a.epochs} "
            f"epochs x {a.train_size} scenes, batch {a.batch_size}, lr {a.lr}, {a.seeds} seeds, {a.eval_size} test "
            f"scenes per column; VILLA K=3, w=1.5, no projection, step = half the radius, radii as fractions of each "
            f"site's norm: text {a.text_eps} / image {a.image_eps}; PGD-10 L2 text {a.attack_text_eps} / image "
            f"{a.attack_image_eps}; {machine(a)}")


def table(runs: list[dict]) -> None:
    rows = group_runs(runs)
    print_table({m: rows[m] for m in ARMS if m in rows}, first="arm")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="tf", help="fine-tuning task: tf (true/false statements), itm or qa")
    ap.add_argument("--pretrain-epochs", type=int, default=10, help="MLM + ITM pre-training epochs per seed")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    ap.add_argument("--train-size", type=int, default=10000, help="training scenes (both stages)")
    ap.add_argument("--batch-size", type=int, default=128, help="examples per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    ap.add_argument("--eval-size", type=int, default=500, help="test scenes per column")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    add_radius_options(ap, "VILLA's largest perturbation")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of the arms")
    ap.add_argument("--pretrain-only", default=None, choices=["clean", "villa"],
                    help="only build the cached pre-trained models of this kind (all seeds) and stop")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "vlat" / "villa"),
                    help="folder for the per-seed pre-trained weights")
    add_init_option(ap, "a freshly built one (pre-training, if any, continues from it)")
    add_run_options(ap)
    a = ap.parse_args(argv)
    check_init(ap, a.init, "single_stream")
    if a.report:
        return table(load_runs(a.report))
    if a.fast:
        a.pretrain_epochs, a.epochs, a.train_size, a.eval_size, a.seeds = 1, 1, 128, 64, 1
    arms = a.arms.split(",")
    unknown = [m for m in arms if m not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if a.init and not a.pretrain_epochs and any(ARMS[m][0] == "villa" for m in arms):
        ap.error("with --init and --pretrain-epochs 0 there is no pre-training for VILLA-pre to change; "
                 "give --pretrain-epochs, or leave out the VILLA-pre arms")
    a.threads = threads_per_job(a.jobs)
    t0 = time.perf_counter()
    kinds = [a.pretrain_only] if a.pretrain_only else sorted({ARMS[m][0] for m in arms})
    pre_jobs = [(k, seed, a) for k in kinds for seed in range(a.seeds)]
    if a.pretrain_only or a.jobs > 1:  # each pre-trained model once, in parallel, before the arms that start from it
        run_all(_pretrain, pre_jobs, min(a.jobs, len(pre_jobs)), lambda _: None)
    if a.pretrain_only:
        print(f"pre-trained {len(pre_jobs)} model(s) into {a.cache} in {time.perf_counter() - t0:.0f} s")
        return
    run_and_report(_run, [(m, seed, a) for m in arms for seed in range(a.seeds)], a, settings, table, t0)


if __name__ == "__main__":
    main()
