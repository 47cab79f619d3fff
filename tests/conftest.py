import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tok():
    from vlat.world import load_tokenizer

    return load_tokenizer()


def interrupted_at(call: int, step_fn=None):
    """A training step that runs ``step_fn`` (clean by default) and raises KeyboardInterrupt at its
    ``call``-th call: a run killed mid-training, for the resume tests."""
    from vlat.train import clean_step

    calls = {"n": 0}

    def step(ctx, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return (step_fn or clean_step)(ctx, batch)

    return step


def make_batch(task: str, n: int = 6, seed: int = 0, **kw):
    from vlat.world import Collator, WorldDataset, load_tokenizer

    ds = WorldDataset(task, size=n, seed=seed, **kw)
    return Collator(load_tokenizer(), task)([ds[i] for i in range(n)])


@pytest.fixture
def nano():
    from vlat.models import build_model

    def build(name):
        torch.manual_seed(0)
        return build_model(name, "nano").eval()

    return build


def assert_updates_like_a_clean_step(step, name: str = "single_stream", task: str = "itm", train: bool = True,
                                     seed: int = 1) -> None:
    """One update with ``step`` leaves the same parameters as one plain clean step from the same weights,
    batch and RNG state (what a method with its regulariser weighted 0 must do)."""
    import copy

    from vlat.models import build_model
    from vlat.train import StepContext, TrainConfig, clean_step

    torch.manual_seed(0)
    a = build_model(name, "nano").train(train)
    b = copy.deepcopy(a)
    batch = make_batch(task)
    for model, fn in ((a, clean_step), (b, step)):
        torch.manual_seed(seed)
        fn(StepContext.standalone(model, task, TrainConfig(lr=1e-2, device="cpu", grad_clip=0.0), total_steps=10), batch)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)

