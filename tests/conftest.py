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
