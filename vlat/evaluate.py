"""Clean, retrieval and out-of-distribution metrics.

- :func:`accuracy`: classification accuracy of a task head (``itm`` accuracy is this on ITM pairs);
- :func:`retrieval`: text retrieval (TR@k, image -> caption) and image retrieval (IR@k, caption ->
  image) over a gallery of N images with one caption each. Captions in the toy world are often true
  of several images ("a small red circle"), so a hit is any retrieved item of which the caption is
  **true** (known exactly from the scene's claims), the multi-positive reading used for COCO's five
  captions per image;
- :func:`ood_table`: one metric on the ID test split and on every shift;
- :func:`corruption_table`: the same metric under common image corruptions (noise, blur, digital, fog),
  five severities each: an OOD test the world was not designed around.

The ``evaluate`` functions take a model in eval mode and never change its parameters.
"""

from __future__ import annotations


import torch
from torch.utils.data import DataLoader

import vlat.world.captions as C
from vlat.models.base import VLModel, evaluating
from vlat.train import to_device
from vlat.world.datasets import Collator, WorldDataset, encode_text
from vlat.world.scenes import SHIFTS

def task_batches(model: VLModel, dataset, task: str, tokenizer=None, batch_size: int = 256):
    """Collated batches of ``dataset`` for ``task``, on the model's device."""
    from vlat.models import model_tokenizer

    collate = Collator(tokenizer or model_tokenizer(model), task, paraphrase_prompts=getattr(dataset, "paraphrase", False),
                       class_texts=getattr(dataset, "class_texts", None))
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        yield to_device(batch, model.device)


def accuracy(model: VLModel, dataset, task: str, tokenizer=None, batch_size: int = 256) -> float:
    """Fraction of items whose arg-max logit equals the label."""
    correct = total = 0
    with evaluating(model), torch.no_grad():
        for batch in task_batches(model, dataset, task, tokenizer, batch_size):
            out = model(batch, task)
            correct += int((out.logits.argmax(-1) == out.labels).sum())
            total += len(out.labels)
    return correct / max(1, total)


def attacked_outputs(model: VLModel, dataset, task: str, attack, tokenizer=None, batch_size: int = 128, seed: int = 0):
    """Yield ``(clean, adversarial)`` task outputs batch by batch, the attack run on the model in eval mode."""
    from vlat.models import perturbed

    g = torch.Generator().manual_seed(seed)
    with evaluating(model):
        for batch in task_batches(model, dataset, task, tokenizer, batch_size):
            with torch.no_grad():
                out = model(batch, task)
            deltas = attack.attack(model, batch, task, generator=g)
            with torch.no_grad(), perturbed(model, deltas, batch):
                adv = model(batch, task)
            yield out, adv


def robust_accuracy(model: VLModel, dataset, task: str, attack, tokenizer=None, batch_size: int = 128,
                    seed: int = 0) -> float:
    """Accuracy under an attack (``attack.attack(model, batch, task, generator) -> {site: δ}``, e.g.
    PGD-K with random start): an item counts if it is classified correctly **both** clean and at
    ``x + δ`` (δ = 0 lies in every ball, so the worst case is at least as bad as the clean point; this
    makes robust <= clean hold by construction, as in AutoAttack's reporting)."""
    correct = total = 0
    for out, adv in attacked_outputs(model, dataset, task, attack, tokenizer, batch_size, seed):
        ok = out.logits.argmax(-1) == out.labels
        correct += int((ok & (adv.logits.argmax(-1) == adv.labels)).sum())
        total += len(ok)
    return correct / max(1, total)


def prediction_shift(model: VLModel, dataset, task: str, attack, tokenizer=None, batch_size: int = 128,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """How far an attack moves each prediction, per example ``[N]``: ``kl`` = KL(p‖p_adv) + KL(p_adv‖p)
    (VILLA's fine-grained term), ``conf`` / ``conf_adv`` = the probability of the true label clean / attacked,
    ``robust`` = correct both clean and attacked (its mean is :func:`robust_accuracy`)."""
    from vlat.objectives import symmetric_kl

    cols: dict[str, list] = {"kl": [], "conf": [], "conf_adv": [], "robust": []}
    for out, adv in attacked_outputs(model, dataset, task, attack, tokenizer, batch_size, seed):
        a, b = out.logits.float(), adv.logits.float()
        cols["kl"].append(symmetric_kl(a, b, reduce=False))
        cols["conf"].append(a.softmax(-1).gather(-1, out.labels[:, None])[:, 0])
        cols["conf_adv"].append(b.softmax(-1).gather(-1, adv.labels[:, None])[:, 0])
        cols["robust"].append(((a.argmax(-1) == out.labels) & (b.argmax(-1) == adv.labels)).float())
    return {k: torch.cat(v).cpu() for k, v in cols.items()}


def compare_training(steps: dict, build, task: str, train_data, test_data, attacks: dict, config=None,
                     tokenizer=None) -> dict[str, dict[str, float]]:
    """Train one fresh model per step function (same seed, data and epochs) and score each clean and
    under each attack: ``{name: {"clean acc": .., "acc under <attack>": .., "train s": ..}}``.

    ``steps`` maps a name to a step function (``None`` = clean training); ``build()`` returns a fresh
    model; ``attacks`` maps a column name to an attack object."""
    from vlat.train import TrainConfig, train
    from vlat.world.tokenizer import load_tokenizer

    config = config or TrainConfig(progress=False)
    tokenizer = tokenizer or load_tokenizer()
    collate = Collator(tokenizer, task)
    rows = {}
    for name, step in steps.items():
        torch.manual_seed(config.seed)
        model = build()
        kw = {} if step is None else {"step_fn": step}
        state = train(model, task, train_data, config, collate_fn=collate, **kw)
        row = {"clean acc": accuracy(model, test_data, task, tokenizer)}
        for col, attack in attacks.items():
            row[f"acc under {col}"] = robust_accuracy(model, test_data, task, attack, tokenizer, seed=config.seed)
        row["train s"] = round(state.seconds, 1)
        rows[name] = row
    return rows


def truth_matrix(scenes, claims) -> torch.Tensor:
    """``[N_images, N_captions]`` booleans: is caption j true of image i."""
    return torch.tensor([[C.holds(s, c) for c in claims] for s in scenes], dtype=torch.bool)


@torch.no_grad()
def similarity(model: VLModel, pixels: torch.Tensor, texts: list[str], tokenizer, batch_size: int = 256) -> torch.Tensor:
    """Image-text scores ``[N_images, N_texts]``: cosine similarity of the models that embed each side alone
    (``model.feature_scores``: CLIP, ALBEF's ITC) or ITM log-odds (single stream, one joint forward per pair,
    batched)."""
    device = model.device
    enc = encode_text(tokenizer, texts)
    if model.feature_scores:
        img = torch.cat([model.image_features(pixels[i:i + batch_size].to(device))[0]
                         for i in range(0, len(pixels), batch_size)])
        txt = torch.cat([model.text_features(enc["input_ids"][i:i + batch_size].to(device),
                                             enc["attention_mask"][i:i + batch_size].to(device))[0]
                         for i in range(0, len(texts), batch_size)])
        return (img @ txt.t()).cpu()
    n, m = len(pixels), len(texts)
    ii, tt = torch.meshgrid(torch.arange(n), torch.arange(m), indexing="ij")
    ii, tt = ii.flatten(), tt.flatten()
    scores = []
    for k in range(0, n * m, batch_size):
        i, t = ii[k:k + batch_size], tt[k:k + batch_size]
        batch = {"pixel_values": pixels[i], "input_ids": enc["input_ids"][t], "attention_mask": enc["attention_mask"][t]}
        scores.append(model.match_scores(to_device(batch, device)).cpu())
    return torch.cat(scores).view(n, m)


def recall_at_k(scores: torch.Tensor, truth: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """TR@k over rows (image -> texts) and IR@k over columns (text -> images), multi-positive."""
    out = {}
    for k in ks:
        k_ = min(k, scores.shape[1])
        top = scores.topk(k_, dim=1).indices                                 # [N, k] best captions per image
        out[f"TR@{k}"] = float(truth.gather(1, top).any(1).float().mean())
        k_ = min(k, scores.shape[0])
        top = scores.t().topk(k_, dim=1).indices                             # [M, k] best images per caption
        out[f"IR@{k}"] = float(truth.t().gather(1, top).any(1).float().mean())
    return out


@torch.no_grad()
def retrieval(model: VLModel, dataset: WorldDataset, tokenizer=None, ks=(1, 5, 10), caption_kind: str = "rel") -> dict:
    """Recall@k with one caption per image: the first relational caption where the scene has one
    (the most specific), else its full object description."""
    from vlat.models import model_tokenizer

    tokenizer = tokenizer or model_tokenizer(model)
    claims = []
    for s in dataset.scenes:
        cs = C.true_claims(s)
        rel = [c for c in cs if c[0] == "rel"]
        claims.append(rel[0] if (rel and caption_kind == "rel") else cs[0])
    texts = [C.caption_text(c, dataset.paraphrase) for c in claims]
    with evaluating(model):
        scores = similarity(model, dataset.images.float() / 255.0, texts, tokenizer)
    return recall_at_k(scores, truth_matrix(dataset.scenes, claims), ks)


def pair_retrieval(model: VLModel, dataset, tokenizer=None, ks=(1, 5, 10)) -> dict:
    """Recall@k on image-caption pairs of your own (:class:`vlat.world.FolderDataset`): each image's first
    caption is its query text; a caption counts as right for every image that lists it."""
    from vlat.models import model_tokenizer

    tokenizer = tokenizer or model_tokenizer(model)
    texts = [caps[0] for caps in dataset.captions]
    truth = torch.tensor([[t in caps for t in texts] for caps in dataset.captions], dtype=torch.bool)
    with evaluating(model):
        scores = similarity(model, dataset.images.float(), texts, tokenizer)
    return recall_at_k(scores, truth, ks)


def evaluate_task(model: VLModel, task: str, split: str = "test", size: int = 500, seed: int = 0,
                  shift: str | None = None, tokenizer=None) -> dict[str, float]:
    """The task's metrics on one split/shift of the toy world."""
    return dataset_metrics(model, WorldDataset(task, split, size, seed, shift), task, tokenizer)


def dataset_metrics(model: VLModel, dataset, task: str, tokenizer=None) -> dict[str, float]:
    """Retrieval metrics for ``itc``, ``{"accuracy": ...}`` for every other task, on ``dataset``."""
    if task == "itc":
        return retrieval(model, dataset, tokenizer)
    return {"accuracy": accuracy(model, dataset, task, tokenizer)}


def ood_table(model: VLModel, task: str, size: int = 500, seed: int = 0, shifts=SHIFTS, metric: str | None = None,
              tokenizer=None) -> dict[str, float]:
    """``{"id": m, shift: m, ..., "ood_mean": m}`` for one metric (accuracy, or TR@1 for ``itc``)."""
    metric = metric or ("TR@1" if task == "itc" else "accuracy")
    row = {"id": evaluate_task(model, task, "test", size, seed, None, tokenizer)[metric]}
    for s in shifts:
        row[s] = evaluate_task(model, task, "test", size, seed, s, tokenizer)[metric]
    if shifts:
        row["ood_mean"] = sum(row[s] for s in shifts) / len(shifts)
    return row


def corruption_table(model: VLModel, task: str, size: int = 500, seed: int = 0, corruptions=None,
                     severities=None, metric: str | None = None, tokenizer=None) -> dict[str, float]:
    """``{corruption: m, ..., "corruption_mean": m}``: one metric (accuracy, or TR@1 for ``itc``) on the ID
    test scenes under each common corruption (:mod:`vlat.world.corruptions`), averaged over ``severities``
    (default 1-5). ``corruptions`` items may be ``name`` or ``(name, severity)`` (then that severity only,
    column ``name@severity``)."""
    from vlat.world.corruptions import CORRUPTIONS, SEVERITIES, check_corruption, corrupted

    metric = metric or ("TR@1" if task == "itc" else "accuracy")
    base = WorldDataset(task, "test", size, seed)
    row = {}
    for item in corruptions or CORRUPTIONS:
        name, levels = (item, tuple(severities or SEVERITIES)) if isinstance(item, str) else (item[0], (item[1],))
        scores = []
        for level in levels:
            check_corruption(name, level)
            scores.append(dataset_metrics(model, corrupted(base, name, level, seed), task, tokenizer)[metric])
        row[name if isinstance(item, str) else f"{name}@{item[1]}"] = sum(scores) / len(scores)
    row["corruption_mean"] = sum(row.values()) / len(row)
    return row


def markdown_table(rows: dict[str, dict[str, float]], digits: int = 3) -> str:
    """``{row name: {column: value}}`` as a Markdown table (columns from the first row)."""
    cols = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.{digits}f}" if isinstance(row[c], float) else str(row[c])
                                                for c in cols) + " |")
    return "\n".join(lines)


__all__ = ["accuracy", "compare_training", "corruption_table", "dataset_metrics", "evaluate_task", "evaluating",
           "markdown_table", "ood_table", "pair_retrieval", "recall_at_k", "retrieval", "robust_accuracy", "similarity",
           "task_batches", "truth_matrix"]
