"""Two processes on CPU (gloo, 127.0.0.1), as torchrun would start them: every method's optimiser steps on
2 x (B/2) give the parameters of one process on B; ALBEF's queues equal one process's; a rank that dies
makes the other fail with a clear error instead of hanging; the torchrun command of the README works."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vlat.adversarial import registry

METHODS = ("clean", *registry.names())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_processes(target, world: int, *args, timeout: float = 300) -> list[int]:
    """Run ``target(rank, *args)`` in ``world`` fresh processes joined as one gloo group; exit codes."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(target, r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _worker(target, rank, world, port, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), VLAT_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    from vlat.distributed import init_from_env

    init_from_env()
    target(rank, *args)
    torch.distributed.destroy_process_group()


def method_step(name):
    from vlat.train import clean_step

    return clean_step if name == "clean" else registry.get(name).cls()


def train_every_method(rank, out: Path):
    """Two optimiser steps of each method on the nano single-stream model, global batch 8."""
    from vlat.models import build_model
    from vlat.train import TrainConfig, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    tok = load_tokenizer()
    data = WorldDataset("itm", "train", 16, seed=0)
    for name in METHODS:
        torch.manual_seed(0)
        model = build_model("single_stream", "nano", dropout=0.0)
        train(model, "itm", data, TrainConfig(batch_size=8, max_steps=2, lr=1e-3, device="cpu", progress=False),
              step_fn=method_step(name), collate_fn=Collator(tok, "itm"))
        if rank == 0:
            torch.save(model.state_dict(), out / f"{name}.pt")


def train_clip(rank, out: Path, gather: bool):
    from vlat.models import build_model
    from vlat.train import TrainConfig, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    torch.manual_seed(0)
    model = build_model("clip", "nano", gather_negatives=gather)
    train(model, "itc", WorldDataset("itc", "train", 16, seed=0), TrainConfig(batch_size=8, max_steps=2,
          device="cpu", progress=False), collate_fn=Collator(load_tokenizer(), "itc"))
    if rank == 0:
        torch.save(model.state_dict(), out / f"clip_{gather}.pt")


def train_albef(rank, out: Path):
    from vlat.models import build_model
    from vlat.train import TrainConfig, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    torch.manual_seed(0)
    model = build_model("albef", "nano")
    data = WorldDataset("pretrain", "train", 24, seed=0)
    train(model, "pretrain", data, TrainConfig(batch_size=12, max_steps=2, device="cpu", progress=False),
          collate_fn=Collator(load_tokenizer(), "pretrain"))
    if rank == 0:
        torch.save({k: v for k, v in model.state_dict().items() if "queue" in k}, out / "albef.pt")


def interrupted_and_resumed(rank, out: Path):
    """Four steps straight; the same run stopped in step 3 after a checkpoint at step 2, then resumed."""
    from vlat.models import build_model
    from vlat.train import TrainConfig, clean_step, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    tok = load_tokenizer()

    def run(where, step_fn=clean_step, resume=None):
        torch.manual_seed(0)
        model = build_model("single_stream", "nano", dropout=0.0)
        cfg = TrainConfig(epochs=2, batch_size=8, save_every=2, device="cpu", progress=False, out_dir=str(where))
        state = train(model, "itm", WorldDataset("itm", "train", 16, seed=0), cfg, step_fn=step_fn,
                      collate_fn=Collator(tok, "itm"), resume=resume)
        return model, state

    full, full_state = run(out / "full")
    from conftest import interrupted_at

    try:
        run(out / "part", interrupted_at(3))
    except KeyboardInterrupt:
        pass
    torch.manual_seed(123)
    resumed, state = run(out / "part", resume=out / "part" / "last.safetensors")
    if rank == 0:
        torch.save({"full": full.state_dict(), "resumed": resumed.state_dict(), "full_losses": full_state.losses,
                    "losses": state.losses}, out / "resume.pt")


def die_or_reduce(rank, out: Path):
    if rank == 1:
        os._exit(3)                                   # a rank that dies before the first update
    from vlat.distributed import all_reduce_gradients

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    t0 = time.monotonic()
    try:
        all_reduce_gradients([p])
        (out / "rank0.txt").write_text("no error")
    except RuntimeError as e:
        (out / "rank0.txt").write_text(f"{time.monotonic() - t0:.1f}\n{e}")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    assert in_processes(train_every_method, 2, out) == [0, 0]
    return out


@pytest.mark.parametrize("name", METHODS)
def test_two_processes_on_half_batches_equal_one_process_on_the_whole(name, two_process_runs):
    torch.set_num_threads(1)
    from vlat.models import build_model
    from vlat.train import TrainConfig, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    torch.manual_seed(0)
    model = build_model("single_stream", "nano", dropout=0.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, "itm", WorldDataset("itm", "train", 16, seed=0),
          TrainConfig(batch_size=8, max_steps=2, lr=1e-3, device="cpu", progress=False),
          step_fn=method_step(name), collate_fn=Collator(load_tokenizer(), "itm"))
    ddp = torch.load(two_process_runs / f"{name}.pt")
    moved = [k for k in start if not torch.equal(start[k], model.state_dict()[k])]
    assert moved                                                   # the steps changed the weights ...
    for k, v in model.state_dict().items():                        # ... alike in both runs
        assert torch.allclose(ddp[k], v, atol=1e-5), k


def test_clip_with_gathered_negatives_equals_one_process_and_without_differs(tmp_path):
    from vlat.models import build_model
    from vlat.train import TrainConfig, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    for gather in (True, False):
        assert in_processes(train_clip, 2, tmp_path, gather) == [0, 0]
    torch.manual_seed(0)
    model = build_model("clip", "nano")
    train(model, "itc", WorldDataset("itc", "train", 16, seed=0), TrainConfig(batch_size=8, max_steps=2,
          device="cpu", progress=False), collate_fn=Collator(load_tokenizer(), "itc"))
    one = model.state_dict()
    gathered, blocks = torch.load(tmp_path / "clip_True.pt"), torch.load(tmp_path / "clip_False.pt")
    # a key projection's bias shifts every logit of a query alike, which softmax ignores: its true gradient
    # is 0, so its gradient is float noise, and Adam turns noise of either sign into lr-sized steps
    noise_only = [k for k in one if k.endswith("k_proj.bias")]
    for k, v in one.items():
        assert k in noise_only or torch.allclose(gathered[k], v, atol=1e-5), k
    assert any(not torch.allclose(blocks[k], v, atol=1e-5) for k, v in one.items() if k not in noise_only)


def test_albef_queues_over_two_processes_equal_one_process(tmp_path):
    from vlat.models import build_model
    from vlat.train import TrainConfig, train
    from vlat.world import Collator, WorldDataset, load_tokenizer

    assert in_processes(train_albef, 2, tmp_path) == [0, 0]
    torch.manual_seed(0)
    model = build_model("albef", "nano")
    before = model.image_queue.clone()
    train(model, "pretrain", WorldDataset("pretrain", "train", 24, seed=0),
          TrainConfig(batch_size=12, max_steps=2, device="cpu", progress=False),
          collate_fn=Collator(load_tokenizer(), "pretrain"))
    ddp = torch.load(tmp_path / "albef.pt")
    assert int(ddp["queue_ptr"]) == int(model.queue_ptr) == 24
    assert not torch.allclose(before[:24], model.image_queue[:24])
    for k in ("image_queue", "text_queue", "idx_queue"):
        assert torch.allclose(ddp[k], getattr(model, k), atol=1e-5), k


def test_resume_over_two_processes_is_exact(tmp_path):
    assert in_processes(interrupted_and_resumed, 2, tmp_path) == [0, 0]
    saved = torch.load(tmp_path / "resume.pt")
    assert len(saved["full_losses"]) == 4 and saved["losses"] == saved["full_losses"]   # exact
    for k, v in saved["full"].items():
        assert torch.equal(saved["resumed"][k], v), k


def test_a_rank_that_dies_makes_the_other_fail_with_a_clear_error(tmp_path):
    codes = in_processes(die_or_reduce, 2, tmp_path, timeout=120)
    assert codes[1] == 3
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "another process stopped or timed out" in message and float(seconds) < 90


def test_torchrun_trains_freelb_and_writes_one_checkpoint_vlat_eval_loads(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlat",
           "train", "--model", "single_stream", "--preset", "nano", "--method", "freelb", "--train-size", "256",
           "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--out", str(out), "--eval-size", "32",
           "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved ") == 1                         # rank 0 alone reports and writes
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "last.safetensors", "model.safetensors"]
    from vlat.cli import main as vlat

    assert vlat(["eval", "--checkpoint", str(out / "model.safetensors"), "--eval-size", "32", "--shifts", "none"]) == 0
