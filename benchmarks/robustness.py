"""Train the single-stream model with each method and compare clean, robust and OOD accuracy.

    python benchmarks/robustness.py                     # the README table (3 seeds; a GPU, or hours on CPU)
    python benchmarks/robustness.py --jobs 8            # the same, 8 runs at a time (one GPU is enough)
    python benchmarks/robustness.py --fast              # a smoke run in about a minute

**Recipe (UNITER/VILLA's, in miniature).** Per seed, the model is first pre-trained with masked
language modelling on image-caption pairs (``--pretrain-epochs``); then one copy per method is
fine-tuned on true/false statements (the NLVR2 analogue) for the same number of epochs (FreeAT:
epochs / m, its equal-cost schedule). Why pre-train: trained on statements alone from scratch, the
model never binds words to regions inside a short budget; it answers from text priors ("statements
about relations are false", 0.68-0.73 accuracy), and an image attack then has nothing to attack.
Filling in "a small [MASK] circle" needs the image, so MLM teaches the grounding (0.84 after 30 + 30
epochs of 10,000 scenes, against 0.73 for 60 epochs of statements alone).

Columns: clean accuracy, robust accuracy under PGD-10 with random start on the text and on the image
site, accuracy per OOD shift, then three OOD means (``common.ood_means``): the semantic shifts', the same
without ``composition``, and the common corruptions' at severity 3 (:mod:`vlat.world.corruptions`: shifts
nobody designed this world around); fine-tuning time; mean ± std over seeds.

Radii are relative (:meth:`vlat.adversarial.Adversary.calibrate`): ``--image-eps 0.03`` is 3 % of the
image site's mean clean L2 norm per example, ``--text-eps 0.01`` 1 % of a caption's. Why relative: a
caption's word embeddings have a norm near 1 and a scene's raw region features near 200, so one
absolute ε is either no threat to the image or destroys the text. The training methods are
calibrated on the pre-trained model they start from (one training batch), the PGD-10 evaluation attack
on each fine-tuned model itself (one test batch; text 2 % / image 10 %), so a model cannot look robust
merely by growing its word embeddings.

Why training radii smaller than the attack's: the ascent concentrates δ where the label is decided
(one colour word; the patch of the object a statement names). With training radii of 2 % / 10 %,
PGD-3, FreeAT and FreeLB fine-tuning ended at about 0.69, the text-only prior, with image PGD
powerless against them: a ball that large can change what a patch shows, the "label-preserving"
assumption fails, and the cheapest fit is to stop looking at the image. At 1 % / 3 % PGD-3 and FreeLB
keep the image and gain robustness (README, both tables). Earlier, without pre-training, FGM at 5 %
of the text collapsed to a constant prediction.

The ``paraphrase`` column re-words captions, not statements, so for ``tf`` it equals the ID column.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_run_options, check_init, group_runs, load_runs, machine, ood_means, print_table,  # noqa: E402
                    run_all, run_and_report, threads_per_job)

from vlat.adversarial import PGD, registry  # noqa: E402
from vlat.evaluate import accuracy, robust_accuracy  # noqa: E402
from vlat.models import build_model, load_model, save_model  # noqa: E402
from vlat.train import TrainConfig, clean_step, to_device, train  # noqa: E402
from vlat.world import SHIFTS, Collator, WorldDataset, load_tokenizer  # noqa: E402

SITES = ("text", "image")
CLEAN = "clean"


def arms() -> list[str]:
    """clean, then every registered method by display name (oldest paper first)."""
    return [CLEAN, *(spec.label for spec in registry.specs())]


def method_step(arm: str, steps: int):
    """The training step of one arm: the method's registered preset (the explorer's) at ε = 1 x each
    site's calibrated scale, with ``steps`` steps and the shared step rule ``2.5 ε / K``; a one-site
    method (YOPO) perturbs the text, as in its NLP use."""
    if arm == CLEAN:
        return clean_step
    spec = registry.get(arm)
    return spec.build(SITES[:1] if spec.single_site else SITES, 1.0, steps)


def add_radius_options(ap, what: str) -> None:
    """The radii, as fractions of each site's norm: the training method's (``what``) and the PGD-10
    evaluation attack's (read by :func:`score`)."""
    ap.add_argument("--text-eps", type=float, default=0.01, help=f"{what} on the text, a fraction of its norm")
    ap.add_argument("--image-eps", type=float, default=0.03, help=f"{what} on the image, a fraction of its norm")
    ap.add_argument("--attack-text-eps", type=float, default=0.02, help="PGD-10 L2 radius on the text (fraction)")
    ap.add_argument("--attack-image-eps", type=float, default=0.1, help="PGD-10 L2 radius on the image (fraction)")


def add_init_option(ap, instead: str) -> None:
    """``--init``: start every arm from one trained checkpoint (e.g. a shipped one) instead of ``instead``."""
    ap.add_argument("--init", default=None, metavar="CHECKPOINT",
                    help=f"start every arm of every seed from this single-stream checkpoint instead of {instead} "
                         "(seeds then vary the fine-tuning's data order and the attacks' random starts), e.g. "
                         "data_samples/checkpoints/single_stream_tiny_tf.safetensors")


def fractions(a, prefix: str) -> dict:
    return {"text": getattr(a, f"{prefix}text_eps"), "image": getattr(a, f"{prefix}image_eps")}


def pretrained(seed: int, a) -> Path:
    """MLM pre-training of one seed's model, cached: every method of that seed starts from these weights
    (with ``--init``, every seed starts from that checkpoint instead)."""
    if a.init:
        return Path(a.init)
    path = Path(a.cache) / f"mlm_seed{seed}_{a.pretrain_epochs}x{a.train_size}_b{a.batch_size}.safetensors"
    if not path.exists():
        if a.threads:
            torch.set_num_threads(a.threads)
        torch.manual_seed(seed)
        model = build_model("single_stream", "tiny")
        if a.pretrain_epochs:
            cfg = TrainConfig(epochs=a.pretrain_epochs, batch_size=a.batch_size, lr=a.lr, seed=seed, device=a.device,
                              progress=False)
            train(model, "mlm", WorldDataset("mlm", "train", a.train_size, seed), cfg,
                  collate_fn=Collator(load_tokenizer(), "mlm"))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, path, task="mlm", epochs=a.pretrain_epochs, train_size=a.train_size, seed=seed)
    return path


def run(method: str, seed: int, a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(pretrained(seed, a))
    tok = load_tokenizer()
    data = WorldDataset(a.task, "train", a.train_size, seed)
    collate = Collator(tok, a.task)
    step = method_step(method, a.steps)
    epochs = a.epochs
    if step is not clean_step:
        step.calibrate(model, collate([data[i] for i in range(64)]), a.task, fractions(a, ""))
        epochs = step.epochs_for(a.epochs)                   # FreeAT: epochs / m, its equal-cost schedule
    cfg = TrainConfig(epochs=epochs, batch_size=a.batch_size, lr=a.lr, seed=seed, device=a.device, progress=False)
    state = train(model, a.task, data, cfg, step_fn=step, collate_fn=collate)
    return {"time_s": state.seconds, **score(model, a, seed)}


def score(model, a, seed: int) -> dict:
    """Clean accuracy, robust accuracy under PGD-10 at each site (radii ``a.attack_*_eps``, calibrated on the
    model itself) and accuracy per OOD shift, on ``a.eval_size`` test scenes of ``a.task``."""
    tok = load_tokenizer()
    test = WorldDataset(a.task, "test", a.eval_size, 0)
    row = {"clean": accuracy(model, test, a.task, tok)}
    probe = to_device(Collator(tok, a.task)([test[i] for i in range(min(128, len(test)))]), model.device)
    for site in SITES:
        attack = PGD(sites=(site,), eps=1.0, step_size=0.25, steps=10).calibrate(model, probe, a.task,
                                                                             fractions(a, "attack_"))
        row[f"PGD10_{site}"] = robust_accuracy(model, test, a.task, attack, tok, seed=seed)
    for s in SHIFTS:
        row[s] = accuracy(model, WorldDataset(a.task, "test", a.eval_size, 0, shift=s), a.task, tok)
    row.update(ood_means(model, a.task, a.eval_size, tok, row))
    return row


def _run(job):
    method, seed, a = job
    return {"method": method, "seed": seed, **run(method, seed, a)}


def settings(a) -> str:
    start = f"from {a.init}" if a.init else f"MLM pre-training {a.pretrain_epochs} epochs"
    return (f"single-stream tiny, {start}, then task {a.task}: {a.epochs} epochs x "
            f"{a.train_size} scenes, batch {a.batch_size}, lr {a.lr}, {a.seeds} seeds, {a.eval_size} test scenes per column; "
            f"registered presets with K = {a.steps}, step 2.5 eps / K; eps "
            f"as fractions of each site's norm: train text {a.text_eps} / image {a.image_eps}, PGD-10 L2 text "
            f"{a.attack_text_eps} / image {a.attack_image_eps}; {machine(a)}")


def table(runs: list[dict]) -> None:
    rows = group_runs(runs)
    order = [m for m in arms() if m in rows] + [m for m in rows if m not in arms()]   # older reports' arm names too
    print_table({m: rows[m] for m in order})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="tf", help="single-stream task: tf (true/false statements), itm or qa")
    ap.add_argument("--pretrain-epochs", type=int, default=30, help="MLM pre-training epochs per seed (0: none)")
    ap.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs for every method (FreeAT: / m)")
    ap.add_argument("--train-size", type=int, default=10000, help="training scenes")
    ap.add_argument("--batch-size", type=int, default=128, help="examples per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    ap.add_argument("--eval-size", type=int, default=500, help="test scenes per column")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method")
    add_radius_options(ap, "training radius")
    ap.add_argument("--steps", type=int, default=3, help="each method's steps K (FreeAT replays, YOPO full passes)")
    ap.add_argument("--methods", default=",".join(arms()), help="comma-separated subset")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "vlat" / "robustness"),
                    help="folder for the per-seed pre-trained weights")
    add_init_option(ap, "pre-training one model per seed")
    add_run_options(ap)
    a = ap.parse_args(argv)
    check_init(ap, a.init, "single_stream")
    if a.report:
        return table(load_runs(a.report))
    if a.fast:
        a.pretrain_epochs, a.epochs, a.train_size, a.eval_size, a.seeds = 1, 1, 128, 64, 1
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in arms()]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(arms())}")
    a.threads = threads_per_job(a.jobs)
    t0 = time.perf_counter()
    if a.jobs > 1 and not a.init:  # pre-train each seed once, in parallel, before the runs that start from it
        run_all(_pretrain, [(seed, a) for seed in range(a.seeds)], min(a.jobs, a.seeds), lambda _: None)
    run_and_report(_run, [(m, seed, a) for m in methods for seed in range(a.seeds)], a, settings, table, t0)


def _pretrain(job):
    return pretrained(*job)


if __name__ == "__main__":
    main()
