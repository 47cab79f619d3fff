"""The ``vlat`` command: ``vlat train``, ``vlat eval`` and ``vlat explore``.

    vlat train --model clip --task itc --epochs 3 --out runs/clip
    vlat eval --checkpoint runs/clip/model.safetensors --task classify
    vlat explore                       # the Gradio explorer on http://127.0.0.1:7860

Every option is explained by ``vlat train --help`` / ``vlat eval --help``. Errors in the arguments
(an unknown model, a missing checkpoint, a corrupt file) end with one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from vlat import __version__

CLEAN = "clean"      # plain training, no adversary; every other --method comes from vlat.adversarial.registry


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    p.add_argument("--eval-size", type=int, default=500, help="scenes per evaluation split (ID and each shift)")
    p.add_argument("--seed", type=int, default=0, help="world and training seed; same seed, same run")


def _add_method_options(t: argparse.ArgumentParser) -> None:
    """--method and every method's options, read from the registry (one flag per option; the help says
    which methods take it)."""
    from vlat.adversarial import registry

    g = t.add_argument_group("method", "the adversarial training step and its settings (defaults: the method's "
                             "own; see docs/methods.md)")
    lines = "; ".join(f"{s.name} ({s.paper.authors.split(',')[0].split(' &')[0]} {s.paper.year})"
                      for s in registry.specs())
    g.add_argument("--method", default=CLEAN, choices=[CLEAN, *registry.names()], metavar="METHOD",
                   help=f"training step: {CLEAN} or one of {lines}")
    g.add_argument("--sites", default=None, help="perturbation sites, comma-separated: text, image, pixels "
                   "(default: the method's own, text for most)")
    g.add_argument("--norm", default=None, choices=["l2", "linf"], help="norm of the ball (default: the method's)")
    g.add_argument("--eps", type=float, default=None, help="radius of the ball (default: the method's reference)")
    g.add_argument("--step-size", type=float, default=None, help="ascent step size eta (default: the method's)")
    for flag, (opt, takers) in registry.cli_options().items():
        kw = {"choices": list(opt.choices)} if opt.choices else {"type": opt.type}
        g.add_argument(flag, default=None, help=f"{opt.help} [{', '.join(s.name for s in takers)}]", **kw)


def build_parser() -> argparse.ArgumentParser:
    from vlat.adversarial import registry
    from vlat.objectives import OBJECTIVES
    from vlat.world.datasets import TASKS

    parser = argparse.ArgumentParser(prog="vlat", description="Adversarial and robust training of vision-language "
                                     "models on the built-in toy world (or your own checkpoints).")
    parser.add_argument("--version", action="version", version=f"vlat {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a toy-world task",
                       description="Train a model on a toy-world task with a progress bar; writes "
                       "OUT/model.safetensors (weights + config), OUT/last.safetensors (resumable state) and "
                       "OUT/history.json, then prints the ID and per-shift OOD table.")
    t.add_argument("--model", default="clip", help="model family: single_stream, clip or albef")
    t.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from a saved model (fine-tuning after pre-training); its family and sizes replace "
                        "--model, --preset and --model-overrides")
    t.add_argument("--pretrained", default=None, metavar="ID_OR_PATH",
                   help="start from a real pretrained model: a CLIPModel checkpoint for --model clip; a BERT for "
                        "single_stream and albef (the text side; their vision side starts from random weights). "
                        "A Hugging Face id (online) or a local folder")
    t.add_argument("--data", default=None, metavar="PATH",
                   help="train on your own image-caption pairs instead of the toy world: a folder with a "
                        "captions.jsonl (the format of vlat.world.folder), a folder with one sub-folder of images "
                        "per class (task classify, clip; prompts 'a photo of a CLASS'), or hf:NAME[:SPLIT] for a "
                        "Hugging Face dataset (a Hub id, or a folder written by save_to_disk; needs pip install "
                        "'vlat[data]'; at most --train-size pairs are read; with --task classify its labelled images, "
                        "balanced over the classes). Marked train/test splits are used so; otherwise 10 %% of the "
                        "pairs are held out for the final score. Tasks: itc (clip, albef) and pretrain (albef) on "
                        "pairs, classify (clip) on classes")
    t.add_argument("--image-column", default=None, help="with --data hf:...: the image column (default: the Image one)")
    t.add_argument("--caption-column", default=None,
                   help="with --data hf:...: the caption column (default: caption, captions, text, sentences or "
                        "sentence)")
    t.add_argument("--label-column", default=None,
                   help="with --data hf:... and --task classify: the class column (default: the ClassLabel one)")
    t.add_argument("--preset", default="tiny", help="size preset: tiny (about a minute on CPU), nano (seconds), "
                   "base (single_stream, GPU)")
    t.add_argument("--task", default=None, choices=TASKS,
                   help="what to train on: itm (image-text matching), itc (contrastive), qa, tf (true/false), "
                   "mlm, pretrain (single_stream: MLM + ITM; ALBEF: ITC + ITM + MLM); default: itm for single_stream, itc for clip, pretrain for albef")
    _add_method_options(t)
    t.add_argument("--epochs", type=int, default=3, help="passes over the training scenes")
    t.add_argument("--train-size", type=int, default=4000, help="number of training scenes")
    t.add_argument("--batch-size", type=int, default=64, help="examples per optimiser step (under torchrun: the "
                   "global batch, split evenly over the processes)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warm-up then cosine)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    t.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimiser step: --batch-size examples in that many parts (less memory, "
                        "the same update)")
    t.add_argument("--warmup", type=float, default=0.1, help="fraction of steps for linear warm-up")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables clipping)")
    t.add_argument("--noise-rate", type=float, default=0.0, help="fraction of training captions replaced by noise")
    t.add_argument("--gather-negatives", action="store_true",
                   help="under torchrun, contrastive (itc) training contrasts each pair with every process's "
                        "pairs, not only its own block (clip)")
    t.add_argument("--hard-negatives", action="store_true",
                   help="itc only: add a minimally wrong caption of each image to the contrastive softmax (NegCLIP)")
    t.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision: auto = bf16 (fp16 if unsupported) on CUDA, off on CPU")
    t.add_argument("--radapter", action="store_true",
                   help="clip: robust fine-tuning with R-Adapter (Kim et al. 2024): freeze the model, train adapters "
                        "after every attention output and FFN (with dropping and a weight EMA), then fold them in; "
                        "model.safetensors is a plain CLIP. Pairs well with --objective mpm_nce and --lr 1e-4")
    t.add_argument("--adapter-rank", type=int, default=None,
                   help="with --radapter: rank of each adapter (default: full rank, as in the paper)")
    t.add_argument("--adapter-ema", type=float, default=0.999,
                   help="with --radapter: momentum of the adapters' weight EMA, which the saved model uses (0: the "
                        "last weights; an EMA needs well over 1/(1-m) steps to catch up: 1,000 at 0.999)")
    t.add_argument("--adapter-alpha", type=float, default=1.0,
                   help="with --radapter: the weight-space ensemble's alpha when folding in (0: the model you "
                        "started from, 1: fully fine-tuned; the paper's WiSE-style trade-off)")
    t.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes that load and collate batches ahead of the GPU, into pinned "
                        "memory (0: in the training process; 2-4 suit a Colab GPU with your own images)")
    t.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute transformer activations in the backward: less memory for a larger batch, "
                        "about a third more time per step; the same gradients")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at each epoch end)")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at each epoch end)")
    t.add_argument("--out", default="runs/latest", help="output folder")
    t.add_argument("--resume", default=None, help="continue from OUT/last.safetensors of an interrupted run")
    t.add_argument("--objective", default="task", choices=list(OBJECTIVES),
                   help="training loss: task (the model's own) or mpm_nce (R-Adapter's multi-positive contrastive "
                        "loss; clip only)")
    t.add_argument("--model-overrides", default="{}", help='JSON of config fields to change, e.g. \'{"patch_size": 8}\'')
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_common(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint, ID and per shift",
                       description="Evaluate a saved model on the toy world's ID test split and each OOD shift.")
    e.add_argument("--checkpoint", required=True, help="a model.safetensors written by vlat train")
    e.add_argument("--task", default=None, choices=TASKS,
                   help="task to score: accuracy for itm/qa/tf/classify, TR@1 for itc; default: itm for "
                   "single_stream, classify (zero-shot) for clip")
    e.add_argument("--shifts", default="all", help="comma-separated shifts: 'all' (the semantic ones), 'none', "
                   "names of semantic shifts, 'corruptions' (noise, blur, digital, fog; 5 severities each), a "
                   "corruption's name, or name@severity")
    e.add_argument("--json", default=None, help="also write the table to this JSON file")
    e.add_argument("--attack", default=None, choices=registry.names(), metavar="METHOD",
                   help="also report robust accuracy under this method's inner maximisation: pgd (PGD-K with random "
                        f"start, the standard) or any of {', '.join(registry.names())}")
    e.add_argument("--site", default="text", help="where the attack perturbs: text, image or pixels")
    e.add_argument("--norm", default=None, choices=["l2", "linf"], help="attack norm (default l2; linf for pixels)")
    e.add_argument("--eps", type=float, default=None, help="attack radius (default 1.0 embeddings, 8/255 pixels)")
    e.add_argument("--step-size", type=float, default=None, help="attack step (default eps/4)")
    e.add_argument("--steps", type=int, default=10, help="attack steps K")
    _add_common(e)
    x = sub.add_parser("explore", help="start the Gradio explorer (vlat.apps.explorer) on this machine")
    x.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    x.add_argument("--port", type=int, default=7860, help="port")
    x.add_argument("--allow-model", action="append", default=[], metavar="ID_OR_FOLDER",
                   help="a CLIP checkpoint (Hugging Face id or local folder) the page may load besides the shipped "
                        "models; repeatable (nothing else is loaded)")
    return parser


def method_from_args(a):
    """The training step named by ``--method``, with only the options the user gave overriding its
    defaults; an option of another method, or one out of its range, is refused before any work."""
    from vlat.adversarial import registry

    flags = registry.cli_options()
    if a.method == CLEAN:
        from vlat.train import clean_step

        given = [f for f, (o, _) in flags.items() if getattr(a, o.dest) is not None]
        given += [f"--{k.replace('_', '-')}" for k in ("sites", "norm", "eps", "step_size") if getattr(a, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) an adversarial method; {CLEAN} training has none (pick a --method)")
        return clean_step
    spec = registry.get(a.method)
    if a.sites and spec.sites_hint:
        raise ValueError(f"--sites does not apply to {spec.name}: it picks its sites with {spec.sites_hint}")
    common = {"sites": tuple(a.sites.split(",")) if a.sites else None, "norm": a.norm, "eps": a.eps,
              "step_size": a.step_size}
    kw = {k: v for k, v in common.items() if v is not None}
    mine = {o.cli: o for o in spec.options}
    for flag, (opt, _) in flags.items():
        value = getattr(a, opt.dest)
        if value is None:
            continue
        if flag not in mine:
            raise ValueError(f"{flag} does not apply to {spec.name}")
        kw[opt.field] = mine[flag].check(value, spec.name)
    fields = spec.cls.__dataclass_fields__
    for k in common:
        if k in kw and k not in fields:
            raise ValueError(f"--{k.replace('_', '-')} does not apply to {spec.name}")
    return spec.cls(**kw)


def attack_from_args(a):
    """The evaluation attack of ``vlat eval --attack``: the method's registered preset at the given site,
    radius, norm, step size (default ε/4) and steps."""
    from dataclasses import replace

    from vlat.adversarial import registry

    pixels = a.site == "pixels"
    eps = a.eps if a.eps is not None else (8 / 255 if pixels else 1.0)
    norm = a.norm or ("linf" if pixels else "l2")
    step = a.step_size if a.step_size is not None else eps / 4
    return replace(registry.get(a.attack).build((a.site,), eps, a.steps, step), norm=norm)


def cmd_train(a) -> int:
    import torch

    from vlat.evaluate import evaluate_task, markdown_table, ood_table
    from vlat.models import MODELS, build_model, load_model, model_tokenizer, read_metadata, save_model
    from vlat.train import TrainConfig, clean_step, train
    from vlat.world import Collator, WorldDataset

    from vlat import distributed

    check_train_args(a)
    distributed.init_from_env()          # under torchrun: join the process group (a no-op otherwise)
    if a.init and a.pretrained:
        raise ValueError("--init continues a vlat checkpoint and --pretrained starts from a Hugging Face one: "
                         "give one of them")
    if a.init:
        a.model = read_metadata(a.init)["kind"]
    if a.model not in MODELS:
        raise ValueError(f"unknown model {a.model!r}; choose one of {', '.join(MODELS)}")
    task = a.task or MODELS[a.model][0].default_task
    kind = data_kind(a.data) if a.data is not None else None
    if kind is not None and (task, a.model) not in DATA_TASKS[kind]:
        what = "image folders per class" if kind == "classes" else "image-caption pairs"
        raise ValueError(f"--data {a.data}: {what} train {', '.join(f'{m} {t}' for t, m in DATA_TASKS[kind])}; "
                         f"{a.model} {task} needs the toy world's labels (leave out --data)")
    step = method_from_args(a)
    if step is not clean_step:  # equal cost to clean training (FreeAT: N/m epochs of m replays)
        a.epochs = step.epochs_for(a.epochs)
    torch.manual_seed(a.seed)
    if a.init:
        model = load_model(a.init).train()
    elif a.pretrained:
        model = MODELS[a.model][0].pretrained(a.pretrained, a.preset, **json.loads(a.model_overrides)).train()
    else:
        model = build_model(a.model, a.preset, **json.loads(a.model_overrides))
    model.check_task(task)
    unknown_sites = set(getattr(step, "sites", ())) - set(model.perturbation_sites())
    if unknown_sites:
        raise ValueError(f"--sites {','.join(sorted(unknown_sites))}: a {model.kind} model has the sites "
                         f"{', '.join(model.perturbation_sites())}")
    if a.gather_negatives:
        if not hasattr(model.config, "gather_negatives") or task != "itc":
            raise ValueError(f"--gather-negatives is for contrastive training of clip (task itc); got {a.model}, "
                             f"task {task}")
        model.config.gather_negatives = True
    if a.radapter:
        if a.model != "clip":
            raise ValueError(f"--radapter adapts a CLIP (--model clip); got --model {a.model}")
        from vlat.robust import add_adapters

        add_adapters(model, rank=a.adapter_rank, ema=a.adapter_ema)
    if a.hard_negatives and not (model.hard_negatives and task == "itc"):
        raise ValueError(f"--hard-negatives is for contrastive training of a model that uses them (clip, task itc); "
                         f"got {a.model}, task {task}")
    test = None
    if a.data is not None:
        data, test, score = load_your_data(a, model)
        unknown = data.unknown_characters(model_tokenizer(model)) if hasattr(data, "unknown_characters") else {}
        if unknown.get("captions") and distributed.is_main():
            print(f"note: {unknown['captions']} of {len(data)} training captions hold characters the tokenizer does "
                  f"not know ({' '.join(unknown['characters'][:12])}); they become [UNK]", file=sys.stderr)
    else:
        data = WorldDataset(task, "train", a.train_size, a.seed, noise_rate=a.noise_rate,
                            image_size=model.config.image_size, hard_negatives=a.hard_negatives)
    tok = model_tokenizer(model)
    model.prepare_training(max(1, len(data) // a.batch_size))
    eval_task = model.score_task(task)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                      warmup_frac=a.warmup, grad_clip=a.grad_clip, seed=a.seed, eval_every=a.eval_every,
                      save_every=a.save_every, amp=a.amp, device=a.device, out_dir=a.out, max_steps=a.max_steps,
                      progress=not a.no_progress, drop_last=model.full_batches, objective=a.objective,
                      grad_accum=a.grad_accum, workers=a.workers)
    if a.grad_checkpointing:
        model.checkpoint_activations()
    metric = "TR@1" if eval_task == "itc" else "accuracy"

    def eval_fn(m):
        if a.data is not None:
            return {f"test_{k}": v for k, v in score(m, tok).items() if k in ("TR@1", "accuracy")} if test else {}
        return {f"val_{metric}": evaluate_task(m, eval_task, "val", min(a.eval_size, 300), a.seed, None, tok)[metric]}

    collate = Collator(tok, task, class_texts=getattr(data, "class_texts", None))
    state = train(model, task, data, cfg, step_fn=step, collate_fn=collate, eval_fn=eval_fn, resume=a.resume)
    if not distributed.is_main():        # rank 0 writes the model and reports
        return 0
    out = Path(a.out)                    # train()'s last checkpoint refused non-finite weights already
    if a.radapter:                       # fold the adapters in: the saved model is a plain CLIP
        from vlat.robust import bake_adapters

        n = bake_adapters(model.eval(), use_ema=a.adapter_ema > 0, alpha=a.adapter_alpha)
        print(f"folded {n} R-Adapters into the model ({'EMA' if a.adapter_ema > 0 else 'last'} weights, "
              f"alpha {a.adapter_alpha})")
    save_model(model, out / "model.safetensors", task=task, method=a.method, train_size=len(data),
               epochs=a.epochs, seed=a.seed, **({"data": str(a.data)} if a.data is not None else {}))
    print(f"trained {state.step} steps in {state.seconds:.1f} s ({state.skipped} skipped); saved {out / 'model.safetensors'}")
    if a.data is not None:
        if test is None:
            print(f"nothing held out in {a.data} (fewer than 20 examples, or no \"test\" records): nothing to score")
        else:
            print(markdown_table({f"{a.model} {task} on {len(test)} held-out examples of {a.data}": score(model, tok)}))
        return 0
    table = ood_table(model, eval_task, a.eval_size, a.seed, tokenizer=tok)
    print(markdown_table({f"{a.model} {task}->{eval_task} ({metric})": table}))
    return 0


PAIR_TASKS = (("itc", "clip"), ("itc", "albef"), ("pretrain", "albef"))
DATA_TASKS = {"pairs": PAIR_TASKS, "hub": (*PAIR_TASKS, ("classify", "clip")),   # what --data can train
              "classes": (("classify", "clip"),)}


def data_kind(data: str) -> str:
    """``hub`` (hf:...), ``pairs`` (a folder with captions.jsonl) or ``classes`` (a folder per class)."""
    if data.startswith("hf:"):
        return "hub"
    return "pairs" if (Path(data) / "captions.jsonl").is_file() else "classes"


def load_your_data(a, model):
    """``(train, test, score)`` of ``--data``; ``score(model, tokenizer)`` gives the held-out metrics:
    retrieval recall for pairs, accuracy over the class prompts for class folders."""
    from vlat.evaluate import accuracy, pair_retrieval
    from vlat.world import ClassFolderDataset, train_test_pairs

    size, kind = model.config.image_size, data_kind(a.data)
    if kind == "classes":
        data, test = ClassFolderDataset(a.data, size).split(seed=a.seed)
        return data, test, lambda m, tok: {"accuracy": accuracy(m, test, "classify", tok)}
    if kind == "hub" and a.task == "classify":
        from vlat.world.hub import hub_classes

        data, test = hub_classes(a.data[3:], size, a.image_column, a.label_column, limit=a.train_size, seed=a.seed)
        return data, test, lambda m, tok: {"accuracy": accuracy(m, test, "classify", tok)} if test else {}
    if kind == "hub":
        from vlat.world.hub import hub_pairs

        data, test = hub_pairs(a.data[3:], size, a.image_column, a.caption_column, limit=a.train_size, seed=a.seed)
    else:
        data, test = train_test_pairs(a.data, size, seed=a.seed)
    return data, test, lambda m, tok: pair_retrieval(m, test, tok)


def parse_shifts(text: str) -> tuple[tuple, list]:
    """``--shifts``: ``all`` (the semantic shifts), ``none``, or a comma-separated list of semantic shifts,
    ``corruptions`` (every common corruption), corruption names (mean over severities 1-5) and
    ``name@severity``. Returns (semantic shifts, corruption items); unknown names are refused."""
    from vlat.world.corruptions import CORRUPTIONS, check_corruption
    from vlat.world.scenes import SHIFTS

    if text == "all":
        return SHIFTS, []
    if text == "none":
        return (), []
    shifts, corruptions = [], []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        name, _, level = token.partition("@")
        if token == "corruptions":
            corruptions += list(CORRUPTIONS)
        elif name in CORRUPTIONS:
            if level and not level.isdigit():
                raise ValueError(f"--shifts {token!r}: the severity after @ must be 1-5")
            if level:
                check_corruption(name, int(level))
            corruptions.append((name, int(level)) if level else name)
        elif token in SHIFTS:
            shifts.append(token)
        else:
            raise ValueError(f"unknown shift {token!r}; choose from {', '.join(SHIFTS)}, 'corruptions' or a "
                             f"corruption ({', '.join(CORRUPTIONS)}, optionally name@1-5)")
    return tuple(shifts), corruptions


def cmd_eval(a) -> int:
    from vlat.evaluate import markdown_table, ood_table
    from vlat.models import load_model, model_tokenizer
    from vlat.train import resolve_device

    check_eval_args(a)
    shifts, corruptions = parse_shifts(a.shifts)                   # bad names are refused before any work
    model = load_model(a.checkpoint).to(resolve_device(a.device))
    task = a.task or model.primary_task
    if task not in model.tasks and task != "itc":  # retrieval (itc) works for every model
        raise ValueError(f"a {model.kind} model cannot be scored on {task!r}; it supports {', '.join(model.tasks)}")
    if a.attack and task == "itc":
        raise ValueError("--attack scores accuracy; pick a classification task (itm, qa, tf, classify)")
    attack = attack_from_args(a) if a.attack else None
    tok = model_tokenizer(model)
    table = ood_table(model, task, a.eval_size, a.seed, shifts=shifts, tokenizer=tok)
    if corruptions:
        from vlat.evaluate import corruption_table

        table.update(corruption_table(model, task, a.eval_size, a.seed, corruptions, tokenizer=tok))
    metric = "TR@1" if task == "itc" else "accuracy"
    if attack is not None:
        from vlat.evaluate import robust_accuracy
        from vlat.world import WorldDataset

        data = WorldDataset(task, "test", a.eval_size, a.seed, image_size=model.config.image_size)
        table[f"robust_{a.attack}_{a.site}"] = robust_accuracy(model, data, task, attack, tok, seed=a.seed)
    print(markdown_table({f"{Path(a.checkpoint).name} {task} ({metric})": table}))
    if a.json:
        Path(a.json).write_text(json.dumps(table, indent=1))
    return 0


def cmd_explore(a) -> int:
    """The app is ``apps/explorer.py`` in the repository, installed with the package as ``vlat.apps``."""
    from vlat.apps.explorer import launch

    launch(a.host, a.port, allow=a.allow_model)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "eval": cmd_eval, "explore": cmd_explore}[args.command](args)
    except (ValueError, OSError) as e:                 # the user's input, files, devices: one line
        if args.debug:
            raise
        print(f"vlat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:                             # a bug of ours: say so, keep the traceback for --debug
        if args.debug:
            raise
        print(f"vlat {args.command}: internal error: {type(e).__name__}: {e} (run with --debug for the traceback, "
              "and please report it)", file=sys.stderr)
        return 1


# ---- validation of the arguments, before any work ---------------------------------------------------------
def _in_range(flag: str, value, low, high, integer: bool = False) -> None:
    ok = value is not None and (isinstance(value, int) if integer else math.isfinite(float(value)))
    if not ok or not low <= value <= high:
        raise ValueError(f"{flag} must lie in [{low}, {high}], got {value}")


def check_device(device: str) -> None:
    """``auto``, ``cpu``, or a GPU this machine has (``cuda``, ``cuda:N``, ``mps``)."""
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA GPU (use cpu, or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: no Apple GPU here (use cpu, or auto)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: vlat trains on cpu, cuda or mps")


def check_writable(flag: str, path: str, folder: bool) -> None:
    """``path`` can be written: not empty, not (under) an existing file, its nearest existing folder
    writable; a file path is not an existing folder."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty: name the {'folder' if folder else 'file'} to write")
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is an existing file; name a folder (nothing was changed)")
    if not folder and p.is_dir():
        raise ValueError(f"{flag} {p} is a folder; name a file")
    above = p if folder else p.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{flag} {p}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK):
        raise ValueError(f"{flag} {p}: {above} is not writable")


def check_train_args(a) -> None:
    """Every number in range, the device present, the files there, the output writable: before any work."""
    for flag, v, lo, hi in (("--batch-size", a.batch_size, 1, 65_536), ("--epochs", a.epochs, 1, 100_000),
                            ("--train-size", a.train_size, 1, 10_000_000), ("--eval-size", a.eval_size, 1, 100_000),
                            ("--save-every", a.save_every, 0, 10**9), ("--eval-every", a.eval_every, 0, 10**9),
                            ("--seed", a.seed, 0, 2**31 - 1), ("--grad-accum", a.grad_accum, 1, 1024),
                            ("--workers", a.workers, 0, 64)):
        _in_range(flag, v, lo, hi, integer=True)
    _in_range("--adapter-alpha", a.adapter_alpha, 0.0, 1.0)
    _in_range("--adapter-ema", a.adapter_ema, 0.0, 0.999999)
    if a.adapter_rank is not None:
        _in_range("--adapter-rank", a.adapter_rank, 1, 65_536, integer=True)
    if not a.radapter and (a.adapter_rank is not None or a.adapter_alpha != 1.0 or a.adapter_ema != 0.999):
        raise ValueError("--adapter-rank, --adapter-ema and --adapter-alpha set R-Adapter up: add --radapter")
    if a.batch_size % a.grad_accum:
        raise ValueError(f"--batch-size {a.batch_size} does not split into --grad-accum {a.grad_accum} equal parts")
    if a.max_steps is not None:
        _in_range("--max-steps", a.max_steps, 1, 10**9, integer=True)
    _in_range("--lr", a.lr, 0.0, 1.0)
    if a.lr <= 0:
        raise ValueError(f"--lr must be above 0, got {a.lr}")
    for flag, v, hi in (("--weight-decay", a.weight_decay, 1.0), ("--warmup", a.warmup, 1.0),
                        ("--grad-clip", a.grad_clip, 1e6), ("--noise-rate", a.noise_rate, 1.0)):
        _in_range(flag, v, 0.0, hi)
    for flag, v in (("--eps", a.eps), ("--step-size", a.step_size)):
        if v is not None:
            _in_range(flag, v, 0.0, math.inf)
    check_device(a.device)
    check_writable("--out", a.out, folder=True)
    try:
        overrides = json.loads(a.model_overrides)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-overrides is not JSON ({e.msg}); write e.g. '{{\"patch_size\": 8}}'") from None
    if not isinstance(overrides, dict):
        raise ValueError("--model-overrides must be a JSON object of config fields, e.g. '{\"patch_size\": 8}'")
    for flag, path in (("--init", a.init), ("--resume", a.resume)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: checkpoint not found")
    if a.data is not None and a.data.startswith("hf:"):
        if not a.data[3:].strip():
            raise ValueError("--data hf: names no dataset; write hf:NAME[:SPLIT] or hf:FOLDER")
    elif a.data is not None:
        if not Path(a.data).is_dir():
            raise FileNotFoundError(f"--data {a.data}: no such folder (a folder with images and a captions.jsonl)")
        if not (Path(a.data) / "captions.jsonl").is_file() and \
                not any(p.is_dir() for p in Path(a.data).iterdir()):
            raise FileNotFoundError(f"--data {a.data}: neither a captions.jsonl (image-caption pairs) nor one "
                                    "folder of images per class in it (see vlat.world.folder)")


def check_eval_args(a) -> None:
    _in_range("--eval-size", a.eval_size, 1, 100_000, integer=True)
    _in_range("--seed", a.seed, 0, 2**31 - 1, integer=True)
    _in_range("--steps", a.steps, 1, 10_000, integer=True)
    for flag, v in (("--eps", a.eps), ("--step-size", a.step_size)):
        if v is not None:
            _in_range(flag, v, 0.0, math.inf)
    check_device(a.device)
    if a.json is not None:
        check_writable("--json", a.json, folder=False)
    if not Path(a.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {a.checkpoint}: checkpoint not found")


if __name__ == "__main__":
    sys.exit(main())
