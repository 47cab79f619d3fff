"""One training loop; the method is a step function plugged into it.

The loop owns data order, the optimiser (AdamW), the schedule (linear warm-up, cosine decay),
autocast, evaluation, checkpoints and resumption. It knows nothing of FGM or FreeLB: a **step
function** ``step_fn(ctx, batch) -> loss`` performs one batch's whole update through the
:class:`StepContext` it is handed, which offers ``ctx.forward`` (autocast on CUDA), ``ctx.backward``
(loss scaling when fp16) and ``ctx.optimizer_step`` (unscale, clip, guard, step). A clean step is:

>>> def clean_step(ctx, batch):                     # doctest: +SKIP
...     out = ctx.forward(batch)
...     ctx.backward(out.loss)
...     ctx.optimizer_step(out.loss)
...     return out.loss.detach()

A method that replays a batch (FreeAT) simply calls ``ctx.optimizer_step`` several times.

**Exact resume.** Data order is a permutation drawn from ``(seed, epoch)``; per-item randomness
depends on ``(seed, epoch, index)`` (see :class:`vlat.world.WorldDataset`); a checkpoint stores the
model, optimiser, schedule, step counters and the torch RNG state. Resuming from step k therefore
reproduces steps k+1.. of the uninterrupted run exactly (a test checks loss equality).

**Non-finite guard.** If a loss or the gradient norm is not finite the update is skipped, gradients
are cleared and ``state.skipped`` counts it; the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from vlat.checkpoint import load_tensors, read_header, save_tensors
from vlat import distributed
from vlat.models.base import TaskOutput, VLModel, to_device


@dataclass
class TrainConfig:
    epochs: int = 3                 # passes over the training set
    batch_size: int = 64            # examples per optimiser step
    lr: float = 1e-3                # peak AdamW learning rate (tiny models like it high)
    weight_decay: float = 0.01      # AdamW decoupled weight decay (not on biases / norms)
    warmup_frac: float = 0.1        # fraction of all steps spent warming up linearly from 0
    grad_clip: float = 1.0          # max global gradient norm (0 = no clipping)
    seed: int = 0                   # model init, data order, dropout
    eval_every: int = 0             # steps between evaluations (0 = at the end of each epoch only)
    save_every: int = 0             # steps between checkpoints (0 = at the end of each epoch only)
    amp: str = "auto"               # auto: bf16 (or fp16 + scaler) on CUDA, off on CPU; or bf16/fp16/off
    device: str = "auto"            # auto: cuda if available else cpu
    out_dir: str | None = None      # where checkpoints and history.json go (None: nowhere)
    max_steps: int | None = None    # stop early after this many steps (for tests and smoke runs)
    progress: bool = True           # tqdm progress bar
    drop_last: bool = False         # skip an epoch's last short batch (ALBEF's queue needs equal batches)
    objective: str = "task"         # the training loss: "task" (the model's own) or "mpm_nce" (contrastive models)
    objective_options: dict = field(default_factory=dict)   # its settings, e.g. {"temp": 0.01, "margin": 0.05}
    max_skipped_in_a_row: int = 25  # that many non-finite steps in a row stop training with an error
    grad_accum: int = 1             # micro-batches per optimiser step: batch_size examples in grad_accum parts
    workers: int = 0                # DataLoader worker processes preparing batches (0: in the training process)

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("max_skipped_in_a_row", 1), ("grad_accum", 1),
                          ("workers", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"TrainConfig.max_steps must be None or an integer >= 1, got {self.max_steps!r}")
        for name in ("lr", "weight_decay", "warmup_frac", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("TrainConfig.lr must be above 0")


class TrainingDiverged(ValueError):
    """Every step of a long run gave a non-finite loss or gradient: training stopped, nothing was saved."""


@dataclass
class TrainState:
    step: int = 0                   # optimiser steps taken (global)
    epoch: int = 0                  # current epoch
    batch_in_epoch: int = 0         # batches of the current epoch already consumed
    skipped: int = 0                # updates skipped by the non-finite guard
    losses: list = field(default_factory=list)     # loss of every batch, in order
    evals: list = field(default_factory=list)      # {"step": .., metric: ..} per evaluation
    seconds: float = 0.0            # wall-clock time spent training


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: this process's GPU (under torchrun: the one of its local rank), else the CPU."""
    if device == "auto":
        return distributed.local_device()
    return torch.device(device)


class StepContext:
    """What a step function may use: the model, its task, and the update primitives."""

    def __init__(self, model: VLModel, task: str, optimizer, scheduler, config: TrainConfig, device, state):
        self.model, self.task, self.optimizer, self.scheduler = model, task, optimizer, scheduler
        self.config, self.device, self.state = config, device, state
        amp = config.amp
        if amp == "auto":
            amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
        if amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be auto, off, bf16 or fp16; got {config.amp!r}")
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        from vlat.objectives import make_objective

        self.objective = make_objective(config.objective, **config.objective_options)
        model.check_objective(self.objective)

    @classmethod
    def standalone(cls, model: VLModel, task: str, config: TrainConfig | None = None, total_steps: int = 100):
        """A context outside the loop (notebooks, benchmarks): its own AdamW and schedule, fresh state. It
        runs where the model is (``device="auto"``) or moves the model to ``config.device``."""
        config = config or TrainConfig(progress=False)
        device = model.device if config.device == "auto" else resolve_device(config.device)
        model.to(device)
        opt, sched = make_optimizer(model, config, total_steps)
        return cls(model, task, opt, sched, config, device, TrainState())

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, batch: dict, task: str | None = None, **kw) -> TaskOutput:
        """The model's forward under autocast, with the training objective (``config.objective``)."""
        if self.objective is not None:
            kw.setdefault("objective", self.objective)
        with self.autocast():
            return self.model(batch, task or self.task, **kw)

    micro, micros = 0, 1              # gradient accumulation: this micro-batch of how many per update

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Back-propagate ``loss`` into the parameters' gradients (scaled by 1 / micro-batches, so that
        accumulated gradients are those of the whole batch's mean loss)."""
        loss = loss / self.micros if self.micros > 1 else loss
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(retain_graph=retain_graph)

    def unscale(self) -> None:
        """Bring parameter gradients back to true scale (fp16) before reading or clipping them."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def optimizer_step(self, loss: torch.Tensor | None = None) -> bool:
        """Clip and apply the accumulated gradients; skip (and count) if anything is non-finite. Under
        torchrun the gradients are first averaged over the ranks: the one all-reduce of the step. With
        gradient accumulation, every micro-batch but the last only accumulates (and returns True)."""
        if self.micro < self.micros - 1:
            return True
        self.unscale()
        distributed.all_reduce_gradients(self.model.parameters())
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        ok = torch.isfinite(norm) if loss is None else torch.isfinite(norm) & torch.isfinite(loss.detach()).all()
        finite = bool(ok)                # the step's one host sync (two before: a GPU idles at each)
        finite = distributed.all_finite(finite)
        if not finite and self.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped += 1
            return False
        if self.scaler is not None:  # the scaler skips inf steps itself and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if not finite:  # what the scaler skipped (its first steps, while the scale comes down) counts too
                self.state.skipped += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:  # momentum encoders and feature queues (ALBEF) advance once per real update
            self.model.after_optimizer_step()
        return finite


def clean_step(ctx: StepContext, batch: dict) -> torch.Tensor:
    """Ordinary training: one forward, one backward, one update (1 pass)."""
    out = ctx.forward(batch)
    ctx.backward(out.loss)
    ctx.optimizer_step(out.loss)
    return out.loss.detach()


def _items(items: list) -> list:
    return items


def batches_of(data, index_lists: list, collate_fn, workers: int, device: torch.device):
    """``(indices, batch)`` for each list of indices, in order: collated here (``workers=0``) or by a
    DataLoader's worker processes, ``workers`` batches ahead, into pinned memory when training on a GPU
    (the loop's copy to the device is then asynchronous)."""
    collate = collate_fn or _items
    if workers == 0:
        for idx in index_lists:
            yield idx, collate([data[i] for i in idx])
        return
    loader = DataLoader(data, batch_sampler=index_lists, collate_fn=collate, num_workers=workers,
                        pin_memory=device.type == "cuda" and collate_fn is not None,
                        generator=torch.Generator())         # its seed draw leaves the global RNG alone
    yield from zip(index_lists, loader)


def make_optimizer(model: VLModel, config: TrainConfig, total_steps: int):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    warm = max(1, int(config.warmup_frac * total_steps))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def save_train_checkpoint(path: Path, model, optimizer, scheduler, scaler, state: TrainState, config, task) -> None:
    """Everything needed to continue exactly, in one safetensors file (no pickle)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "train_state": json.dumps(asdict(state)),
        "train_config": json.dumps(asdict(config)),
        "task": task,
        "param_groups": json.dumps(opt["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict()["last_epoch"]),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None else None),
    }
    from vlat.models import checkpoint_metadata

    meta.update(checkpoint_metadata(model, task=task))
    save_tensors(tensors, path, meta)


def load_train_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> TrainState:
    meta = read_header(path)
    if "train_state" not in meta:
        raise ValueError(f"{path}: not a training checkpoint (no train_state); use load_model for weights only")
    t = load_tensors(path)
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    opt = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for k, v in t.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt["state"].setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict(opt)
    scheduler.last_epoch = json.loads(meta["scheduler"])
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if scaler is not None and json.loads(meta["scaler"]) is not None:
        scaler.load_state_dict(json.loads(meta["scaler"]))
    torch.set_rng_state(t["rng.torch"])
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
    return TrainState(**json.loads(meta["train_state"]))


def train(model: VLModel, task: str, train_data, config: TrainConfig | None = None,
          step_fn: Callable = clean_step, collate_fn=None, eval_fn: Callable | None = None,
          resume: str | Path | None = None) -> TrainState:
    """Train ``model`` on ``task`` over ``train_data`` (a map-style dataset) with ``step_fn``.

    Args:
        collate_fn: turns a list of items into a batch (e.g. :class:`vlat.world.Collator`).
        eval_fn: ``model -> dict of metrics``, called every ``eval_every`` steps and after each epoch.
        resume: a checkpoint written by this loop; training continues where it stopped.

    Returns the final :class:`TrainState` (losses, evaluations, skipped count, time).
    """
    config = config or TrainConfig()
    model.check_task(task)
    world = distributed.world_size()
    if not config.drop_last and (model.full_batches or world > 1):
        config = replace(config, drop_last=True)     # ALBEF's queues, or equal shards: whole batches only
    k = config.grad_accum
    if config.batch_size % (world * k):
        raise ValueError(f"batch size {config.batch_size} (the global batch) does not split into {world} process(es) "
                         f"x {k} accumulation step(s); use a multiple of {world * k}")
    if k > 1 and getattr(step_fn, "updates_per_batch", 1) > 1:
        raise ValueError(f"{type(step_fn).__name__} takes several optimiser steps per batch; gradient accumulation "
                         "would change what it computes (use grad_accum=1)")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device)
    distributed.broadcast_state(model)
    n = len(train_data)
    per_epoch = n // config.batch_size if config.drop_last else math.ceil(n / config.batch_size)
    if per_epoch == 0:
        raise ValueError(f"drop_last with {n} items and batch size {config.batch_size} leaves no batch")
    total = per_epoch * config.epochs if config.max_steps is None else min(config.max_steps, per_epoch * config.epochs)
    optimizer, scheduler = make_optimizer(model, config, total)
    state = TrainState()
    ctx = StepContext(model, task, optimizer, scheduler, config, device, state)
    if resume is not None:
        state = load_train_checkpoint(Path(resume), model, optimizer, scheduler, ctx.scaler)
        ctx.state = state
    out_dir = Path(config.out_dir) if config.out_dir else None

    main = distributed.is_main()

    saved_at = {"step": None}

    def checkpoint():
        if out_dir is not None and main:
            if not all(bool(p.isfinite().all()) for p in model.parameters()):
                raise TrainingDiverged(f"training left non-finite weights at step {state.step}; the last good "
                                       "checkpoint was kept (lower the learning rate or the radius)")
            saved_at["step"] = state.step
            save_train_checkpoint(out_dir / "last.safetensors", model, optimizer, scheduler, ctx.scaler, state,
                                  config, task)
            (out_dir / "history.json").write_text(json.dumps(asdict(state), indent=1))

    def evaluate():
        if eval_fn is not None and main:
            model.eval()
            with torch.no_grad():
                metrics = eval_fn(model)
            model.train()
            state.evals.append({"step": state.step, **metrics})
            return metrics
        return {}

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=state.step, disable=not (config.progress and main), desc=f"train {task}",
               unit="step")
    t0 = time.perf_counter() - state.seconds
    model.train()
    in_a_row = 0
    while state.epoch < config.epochs and state.step < total:
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(state.epoch)
        order = epoch_order(n, config.seed, state.epoch)
        last = n - config.batch_size + 1 if config.drop_last else n
        starts = range(state.batch_in_epoch * config.batch_size, last, config.batch_size)
        lists = [order[s:s + config.batch_size] for s in starts][:max(total - state.step, 0)]   # up to max_steps
        for indices, batch in batches_of(train_data, lists, collate_fn, config.workers, device):
            skipped, loss = state.skipped, 0.0
            rng = torch.get_rng_state() if k > 1 else None
            for micro in range(k):                      # this rank's rows of the global batch, k parts in turn
                if micro:                               # each part draws its rows of the same global draws
                    torch.set_rng_state(rng)
                part = distributed.shard_batch(batch, len(indices), micro, k)     # the batch itself when 1 x 1
                ctx.micro, ctx.micros = micro, k
                with distributed.sharding(micro=micro, micros=k):
                    loss = loss + step_fn(ctx, to_device(part, device)) / k
            ctx.micro, ctx.micros = 0, 1
            in_a_row = in_a_row + 1 if state.skipped > skipped else 0
            if in_a_row >= config.max_skipped_in_a_row:
                bar.close()
                raise TrainingDiverged(
                    f"training diverged: the last {in_a_row} steps all gave non-finite losses or gradients and were "
                    f"skipped (step {state.step + 1}); nothing was saved for them. Lower the learning rate or the "
                    "radius (--lr, --eps)")
            scheduler.step()
            state.step += 1
            state.batch_in_epoch += 1
            state.losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}", epoch=state.epoch)
            state.seconds = time.perf_counter() - t0
            if config.eval_every and state.step % config.eval_every == 0:
                bar.set_postfix(loss=f"{state.losses[-1]:.4f}", **{k: f"{v:.3f}" for k, v in evaluate().items()})
            if config.save_every and state.step % config.save_every == 0:
                checkpoint()
            if state.step >= total and state.batch_in_epoch < per_epoch:
                break                                   # max_steps mid-epoch: no end-of-epoch evaluation
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            state.seconds = time.perf_counter() - t0
            if not config.eval_every or state.step % config.eval_every:
                metrics = evaluate()
                if metrics:
                    bar.write(f"epoch {state.epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            checkpoint()
            continue
        break
    bar.close()
    state.seconds = time.perf_counter() - t0
    if saved_at["step"] != state.step:   # stopped by max_steps mid-epoch: the same final files as a full run
        checkpoint()
    model.eval()
    return state
