"""More than one process: ``torchrun --standalone --nproc_per_node N -m vlat train ...``.

torchrun starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous;
:func:`init_from_env` joins the process group (NCCL on GPUs, gloo on CPUs). Then, in
:func:`vlat.train.train`:

- **data**: every rank walks the same epoch-seeded order (the role of a ``DistributedSampler``); each
  optimiser step's global batch of ``batch_size`` examples is collated once and split into ``world``
  contiguous row blocks, one per rank (:func:`shard_batch`). Collating the whole batch on every rank
  keeps the padding, the MLM mask and every per-batch draw exactly those of one process;
- **random starts** (δ₀ of PGD, FreeLB, YOPO, SMART, TRADES) are drawn for the global batch from the
  shared RNG and each rank keeps its rows (:func:`rows_of_global_draw`), so they equal one process's;
- **gradients are all-reduced once per optimiser step**, averaged, in
  :meth:`vlat.train.StepContext.optimizer_step` (:func:`all_reduce_gradients`): the K backward passes
  of FreeLB and VILLA, YOPO's layer-one passes and the ascent passes of every method only accumulate
  locally. This is what ``DistributedDataParallel`` does with ``no_sync()`` around all but the last
  backward, written out, because vlat's methods back-propagate through partial graphs (YOPO's layer
  one) that DDP's reducer does not expect. One all-reduce of every trainable gradient per update;
- **ALBEF's queues** take the momentum features of every rank's rows, gathered in rank order (its
  ``concat_all_gather``), so the queue equals one process's;
- progress bar, logs, evaluation and checkpoints on rank 0 only.

With one process (no torchrun) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

_SHARDING = False            # True inside a training loop that splits each global batch across ranks
_PART = (0, 1)               # (this rank's micro-batch, micro-batches per optimiser step): gradient accumulation
SHARED_KEYS = ("class_input_ids", "class_attention_mask")   # batch entries every example shares (not rows)
PAIRWISE_KEYS = ("truth",)                                   # [B, B] entries: rows and columns are examples


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints, evaluates and writes files."""
    return rank() == 0


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE > 1``); returns whether
    this run is distributed. A rank that dies makes the others fail within ``timeout_s``
    (``VLAT_DIST_TIMEOUT``, default 300 s) instead of hanging."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(timeout_s or os.environ.get("VLAT_DIST_TIMEOUT", 300)))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return True


def local_device() -> torch.device:
    """This rank's GPU under torchrun, else the one GPU, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if is_distributed() else torch.device("cuda")


@contextlib.contextmanager
def sharding(on: bool = True, micro: int = 0, micros: int = 1):
    """Inside: random starts are drawn for the global batch and each process keeps the rows of its block
    (see :func:`rows_of_global_draw`); ``micro`` of ``micros``: the micro-batch of gradient accumulation."""
    global _SHARDING, _PART
    before = _SHARDING, _PART
    _SHARDING, _PART = on and (is_distributed() or micros > 1), (micro, micros)
    try:
        yield
    finally:
        _SHARDING, _PART = before


def _block() -> tuple[int, int]:
    """(index of this block, blocks per global batch): rank r's micro-batch i is block r * k + i."""
    micro, micros = _PART
    return rank() * micros + micro, world_size() * micros


def rows_of_global_draw(shape, draw):
    """``draw(shape)`` as one process would make it for the global batch, the rows of this block of it."""
    if not _SHARDING:
        return draw(tuple(shape))
    (i, n), b = _block(), shape[0]
    return draw((b * n, *shape[1:]))[i * b:(i + 1) * b]


def shard_batch(batch: dict, batch_size: int, micro: int = 0, micros: int = 1) -> dict:
    """Block ``rank * micros + micro`` of a collated global batch of ``batch_size`` examples: this rank's
    part of it, and of that part the micro-batch ``micro`` of ``micros`` (gradient accumulation)."""
    n = world_size() * micros
    if n == 1:
        return batch
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} does not split into {n} equal blocks ({world_size()} process(es) "
                         f"x {micros} accumulation step(s)); use a multiple of {n}")
    b, i = batch_size // n, rank() * micros + micro
    rows = slice(i * b, (i + 1) * b)
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v) or k in SHARED_KEYS or v.dim() == 0 or v.shape[0] != batch_size:
            out[k] = v
        elif k in PAIRWISE_KEYS:
            out[k] = v[rows, rows]
        else:
            out[k] = v[rows]
    return out


def _collective(fn, what: str):
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as e:     # a peer died or timed out
        raise RuntimeError(f"rank {rank()}: {what} failed: another process stopped or timed out ({e})") from None


def all_reduce_gradients(params) -> None:
    """Average the gradients of ``params`` over all ranks, in one flat all-reduce. A parameter that has a
    gradient on some rank but not on this one counts as zero here; one with a gradient on no rank keeps
    ``None`` (so the optimiser leaves it alone, as with one process). Which ones have gradients is agreed
    first, in a small all-reduce of one flag per parameter."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    present = torch.tensor([float(p.grad is not None) for p in params])
    _collective(lambda: dist.all_reduce(present, op=dist.ReduceOp.MAX), "the gradient all-reduce")
    params = [p for p, here in zip(params, present.tolist()) if here]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    _collective(lambda: dist.all_reduce(flat), "the gradient all-reduce")
    flat /= world_size()
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


def all_finite(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (all ranks then skip or take the same update)."""
    if not is_distributed():
        return flag
    t = torch.tensor([0.0 if flag else 1.0])
    _collective(lambda: dist.all_reduce(t), "the non-finite check")
    return bool(t.item() == 0)


def _all_gather(t: torch.Tensor, what: str) -> torch.Tensor:
    """Every rank's ``t`` concatenated in rank order (gloo gathers CPU tensors: moved there and back)."""
    src = t.detach().contiguous()
    if dist.get_backend() == "gloo" and src.is_cuda:
        src = src.cpu()
    parts = [torch.empty_like(src) for _ in range(world_size())]
    _collective(lambda: dist.all_gather(parts, src), what)
    return torch.cat(parts).to(t.device)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated in rank order (ALBEF's concat_all_gather; no gradient)."""
    return _all_gather(t, "the queue all-gather") if is_distributed() else t


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order; the backward sums every rank's gradient of its rows (the gradient of
    the sum of all ranks' losses), as open_clip's ``gather_with_grad``."""

    @staticmethod
    def forward(ctx, t):
        ctx.rows = t.shape[0]
        return _all_gather(t, "the feature all-gather")

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _collective(lambda: dist.all_reduce(grad), "the feature gradient all-reduce")
        r, b = rank(), ctx.rows
        return grad[r * b:(r + 1) * b]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated in rank order, differentiable (contrastive negatives from every rank)."""
    return _GatherWithGrad.apply(t) if is_distributed() else t


@torch.no_grad()
def broadcast_state(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (they start equal anyway when seeded alike)."""
    if not is_distributed():
        return
    for t in list(model.parameters()) + list(model.buffers()):
        _collective(lambda: dist.broadcast(t.data, 0), "the start-up broadcast")


__all__ = ["all_finite", "all_reduce_gradients", "broadcast_state", "gather_rows", "gather_with_grad", "init_from_env",
           "is_distributed",
           "is_main", "local_device", "rank", "rows_of_global_draw", "shard_batch", "sharding", "world_size"]
