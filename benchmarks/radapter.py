"""R-Adapter's Table 1 in miniature: robust fine-tuning of the zero-shot tiny CLIP, ID and per shift.

    python benchmarks/radapter.py --jobs 16              # every arm, 3 seeds (a GPU: a few minutes)
    python benchmarks/radapter.py --fast                 # a smoke run on CPU
    python benchmarks/radapter.py --report benchmarks/results/radapter_*.json

Every arm starts from the shipped zero-shot CLIP (``data_samples/checkpoints/clip_tiny_itc``) and
fine-tunes on the ID training split of ``--task`` (``classify``: 24 colour-shape classes with class
prompts, FLYP-style; ``itc``: retrieval captions). Columns: the metric (classification accuracy, or
TR@1) on the ID test split and on each OOD shift, their OOD mean, the trainable-parameter fraction,
training time and peak GPU memory (0 on CPU); ``trainable_%`` is the share of parameters trained.

Arms: zero-shot; linear probe (a linear classifier on frozen image features, ``classify`` only); full
fine-tuning and WiSE-FT of it at α = 0.25 / 0.5 / 0.75; a plain low-rank adapter (rank 8, no dropping,
no EMA, no rescaling); LoRA through Hugging Face PEFT, the baseline users know (``pip install
'vlat[lora]'``; rank 8 on every query and value projection, PEFT's defaults otherwise, at the adapters'
learning rate); and the R-Adapter ablation: base adapter (full rank, MPM-NCE) → + dropping (p = 0.2) →
+ EMA → + rescaling (α = 0.5) = R-Adapter, and R-Adapter trained with the ordinary InfoNCE /
cross-entropy instead of MPM-NCE.

Deviation: the EMA momentum is ``--ema`` (0.99 by default, not the reference's 0.999): a run here is a
few hundred steps, and an EMA with a 1,000-step horizon would still be close to its zero start.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_run_options, group_runs, load_runs, machine, print_table, run_and_report,  # noqa: E402
                    shift_means, threads_per_job)

from vlat.evaluate import ood_table  # noqa: E402
from vlat.models import load_model  # noqa: E402
from vlat.resources import checkpoint  # noqa: E402
from vlat.robust import add_adapters, set_alpha, wise_ft  # noqa: E402
from vlat.train import TrainConfig, resolve_device, train  # noqa: E402
from vlat.world import SHIFTS, Collator, WorldDataset, load_tokenizer  # noqa: E402

ZERO_SHOT = checkpoint("clip_tiny_itc")
WISE = (0.25, 0.5, 0.75)
# arm -> how to fine-tune: None (no training), "probe", "full", or adapter settings
ARMS = {
    "zero-shot": None,
    "linear probe": "probe",
    "full fine-tuning": "full",
    "PEFT: plain adapter r=8": dict(rank=8, drop=0.0, ema=False, alpha=1.0, objective="task"),
    "LoRA r=8 (peft)": "lora",
    "base adapter": dict(rank=None, drop=0.0, ema=False, alpha=1.0, objective="mpm_nce"),
    "+ dropping": dict(rank=None, drop=0.2, ema=False, alpha=1.0, objective="mpm_nce"),
    "+ EMA": dict(rank=None, drop=0.2, ema=True, alpha=1.0, objective="mpm_nce"),
    "R-Adapter (+ rescaling)": dict(rank=None, drop=0.2, ema=True, alpha=0.5, objective="mpm_nce"),
    "R-Adapter with InfoNCE": dict(rank=None, drop=0.2, ema=True, alpha=0.5, objective="task"),
}


def trainable_fraction(model) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total


def add_lora(model, rank: int) -> None:
    """LoRA (Hu et al. 2021) through Hugging Face PEFT, as a user would add it: rank ``rank`` on the query
    and value projections of every attention block of both towers (the paper's choice), PEFT's defaults
    otherwise (``lora_alpha`` 8, no dropout, B = 0 so training starts at the zero-shot model); every
    other weight frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise SystemExit("the LoRA arm needs Hugging Face PEFT: pip install 'vlat[lora]' (or pip install peft)") from e
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=["q_proj", "v_proj"]), model.clip)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def scores(model, a) -> dict:
    """``itc``: TR@1 on ID and each shift, and their mean; ``classify``: :func:`classify_scores`."""
    if a.task == "classify":
        return classify_scores(lambda batch: model(batch, "classify").logits, model, a)
    return ood_table(model, a.task, a.eval_size, 0, tokenizer=load_tokenizer())     # id, each shift, ood_mean


def classify_scores(predict, model, a) -> dict:
    """Accuracy on ID and each shift from ``predict(batch) -> [B, 24]`` class scores, their mean, the mean
    without ``composition``, and what separates a label prior from robustness (issue 15):

    - ``held_out_pred_id``: the share of ID test images predicted as one of the 6 held-out classes (never
      right on ID; a model that never pushed those prompts down predicts them);
    - ``id_closed``: ID accuracy with only the 18 ID prompts as candidates;
    - ``composition_open``: ``composition`` accuracy with only the 6 held-out prompts as candidates (the
      open-vocabulary protocol: which unseen class, not whether to answer one);
    - ``corruptions@3``: accuracy on the ID test scenes under each common corruption at severity 3, averaged.
    """
    from vlat.evaluate import task_batches
    from vlat.world.corruptions import CORRUPTIONS, corrupted
    from vlat.world.scenes import ALL_PAIRS, HELD_OUT_PAIRS

    held = torch.tensor([p in HELD_OUT_PAIRS for p in ALL_PAIRS])
    tok, row = load_tokenizer(), {}

    def run(data, allowed=None):
        right = total = held_pred = 0
        with torch.no_grad():
            for batch in task_batches(model, data, "classify", tok):
                logits = predict(batch).float()
                if allowed is not None:
                    logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
                pred = logits.argmax(-1)
                right += int((pred == batch["labels"]).sum())
                held_pred += int(held.to(pred.device)[pred].sum())
                total += len(pred)
        return right / total, held_pred / total

    data = {shift: WorldDataset("classify", "test", a.eval_size, 0, shift=shift) for shift in (None, *SHIFTS)}
    row["id"], row["held_out_pred_id"] = run(data[None])
    for shift in SHIFTS:
        row[shift] = run(data[shift])[0]
    row.update(shift_means(row))
    row["id_closed"] = run(data[None], ~held)[0]
    row["composition_open"] = run(data["composition"], held)[0]
    row["corruptions@3"] = sum(run(corrupted(data[None], name, 3))[0] for name in CORRUPTIONS) / len(CORRUPTIONS)
    return row


def fine_tune(model, a, seed: int, lr: float, objective: str = "task") -> float:
    """``objective``: the training loss, the task's own (InfoNCE / cross-entropy) or ``mpm_nce``."""
    data = WorldDataset(a.task, "train", a.train_size, seed)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=lr, seed=seed, device=a.device, progress=False,
                      grad_clip=1.0, objective=objective)
    return train(model, a.task, data, cfg, collate_fn=Collator(load_tokenizer(), a.task)).seconds


def linear_probe(model, a, seed: int) -> torch.nn.Linear:
    """A linear classifier on frozen image features, initialised from the class prompts' text features
    (the zero-shot head), trained with cross-entropy; it replaces the prompts at test time."""
    from vlat.evaluate import task_batches

    model.eval().requires_grad_(False)
    feats, labels = [], []
    data = WorldDataset("classify", "train", a.train_size, seed)
    with torch.no_grad():
        for batch in task_batches(model, data, "classify", load_tokenizer()):
            feats.append(model.image_features(batch["pixel_values"])[0])
            labels.append(batch["labels"])
            prompts = model.text_features(batch["class_input_ids"], batch["class_attention_mask"])[0]
    x, y = torch.cat(feats), torch.cat(labels)
    head = torch.nn.Linear(x.shape[1], prompts.shape[0], bias=True).to(x.device)
    with torch.no_grad():
        head.weight.copy_(prompts * model.clip.logit_scale.exp().clamp(max=100.0))
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head.requires_grad_(False)


def probe_scores(model, head, a) -> dict:
    return classify_scores(lambda batch: head(model.image_features(batch["pixel_values"])[0]), model, a)


def run(job) -> list[dict]:
    arm, seed, a = job
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(seed)
    device = resolve_device(a.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = load_model(ZERO_SHOT).to(device)
    how = ARMS[arm]
    seconds, rows = 0.0, []
    if how is None:
        row, frac = scores(model, a), 0.0
    elif how == "probe":
        t0 = time.perf_counter()
        head = linear_probe(model, a, seed)
        seconds = time.perf_counter() - t0
        frac = sum(p.numel() for p in head.parameters()) / sum(p.numel() for p in model.parameters())
        row = probe_scores(model, head, a)
    elif how == "lora":
        add_lora(model, a.lora_rank)
        frac = trainable_fraction(model)
        seconds = fine_tune(model, a, seed, a.adapter_lr)
        row = scores(model.eval(), a)
    elif how == "full":
        zero = copy.deepcopy(model)
        frac = trainable_fraction(model)
        seconds = fine_tune(model, a, seed, a.lr)
        row = scores(model, a)
        for alpha in WISE:
            mixed = copy.deepcopy(zero)
            mixed.load_state_dict(wise_ft(zero, model, alpha))
            rows.append({"method": f"WiSE-FT α={alpha}", "seed": seed, **scores(mixed, a), "trainable_%": 100 * frac,
                         "time_s": seconds, "peak_MB": 0.0})
    else:
        adapters = add_adapters(model, rank=how["rank"], drop=how["drop"], ema=a.ema if how["ema"] else 0.0)
        frac = trainable_fraction(model)
        seconds = fine_tune(model, a, seed, a.adapter_lr, how["objective"])
        model.eval()
        for ad in adapters:
            ad.use_ema = how["ema"]
        set_alpha(model, how["alpha"])
        row = scores(model, a)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    rows.insert(0, {"method": arm, "seed": seed, **row, "trainable_%": 100 * frac, "time_s": seconds, "peak_MB": peak})
    return rows


def settings(a) -> str:
    return (f"tiny CLIP from {ZERO_SHOT.name}, fine-tuned on {a.task}: {a.epochs} epochs x {a.train_size} scenes, batch "
            f"{a.batch_size}, lr {a.lr} (adapters {a.adapter_lr}), EMA {a.ema}; {a.seeds} seeds; {a.eval_size} test "
            f"scenes per column; {machine(a)}")


def table(runs: list[dict]) -> None:
    rows = group_runs(runs)
    order = [m for m in ARMS if m in rows]
    names = []
    for m in order:
        names.append(m)
        if m == "full fine-tuning":
            names += [f"WiSE-FT α={x}" for x in WISE if f"WiSE-FT α={x}" in rows]
    print_table({m: rows[m] for m in names})
    return {m: rows[m] for m in names}


def plot(rows: dict, path: str, title: str) -> None:
    """The ID-vs-OOD-mean plot (mean over seeds) as a standalone HTML file (plotly.js from its CDN)."""
    import statistics

    from vlat.explain import id_ood_scatter

    points = {m: (statistics.mean(r["id"] for r in rs), statistics.mean(r["ood_mean"] for r in rs))
              for m, rs in rows.items()}
    id_ood_scatter(points, title, baseline="zero-shot" if "zero-shot" in points else None).write_html(
        path, include_plotlyjs="cdn")
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="classify", choices=["classify", "itc"], help="fine-tuning and scoring task")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    ap.add_argument("--train-size", type=int, default=8000, help="ID training scenes")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per step")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of full fine-tuning")
    ap.add_argument("--adapter-lr", type=float, default=1e-3,
                    help="peak learning rate of the adapters (zero-initialised behind a 0.1 scale, they need more)")
    ap.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA arm (through peft)")
    ap.add_argument("--ema", type=float, default=0.99, help="EMA momentum of the adapter weights")
    ap.add_argument("--eval-size", type=int, default=500, help="test scenes per column")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    ap.add_argument("--plot", default=None, metavar="HTML", help="with --report: also write the ID-vs-OOD plot here")
    add_run_options(ap)
    a = ap.parse_args(argv)
    if a.report:
        rows = table(load_runs(a.report))
        if a.plot:
            plot(rows, a.plot, f"tiny CLIP fine-tuned on {a.task}: ID vs OOD mean")
        return None
    if a.fast:
        a.epochs, a.train_size, a.eval_size, a.seeds = 1, 128, 64, 1
    arms = a.arms.split(",")
    unknown = [m for m in arms if m not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if a.task == "itc" and "linear probe" in arms:
        arms.remove("linear probe")
    a.threads = threads_per_job(a.jobs)
    jobs = [(m, seed, a) for m in arms for seed in range(a.seeds)]
    run_and_report(run, jobs, a, settings, table, time.perf_counter())


if __name__ == "__main__":
    main()
