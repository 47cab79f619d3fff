"""The shipped checkpoints are product, not fixtures: each must load and predict at least as well as its
floor on 300 ID test scenes (seed 0), so a weaker file cannot be shipped unnoticed.

The floors are the scores of the files shipped now (``data_samples/checkpoints/RESULTS.md`` reports them
on 1,000 scenes), measured here on 300 scenes, less 0.03 for floating-point differences between torch
builds; a freshly initialised model of the same family stays below each of them (checked below, so a floor
is never one that chance would pass). They are far from what a learner needs (issue 14 asks for ITM 0.90,
zero-shot 0.85, TR@1 0.50); raise them when stronger checkpoints ship.
"""

import pytest
import torch

from vlat.evaluate import evaluate_task
from vlat.models import load_model
from vlat.resources import samples_dir

SHIPPED = samples_dir() / "checkpoints"
SIZE = 300
FLOORS = {  # (task, metric, floor); measured now: 0.873, 0.817, 0.850, 0.393, 0.223, 0.690
    "single_stream_tiny_itm": [("itm", "accuracy", 0.84)],
    "single_stream_tiny_tf": [("tf", "accuracy", 0.78)],
    "single_stream_tiny_qa": [("qa", "accuracy", 0.82)],
    "clip_tiny_itc": [("classify", "accuracy", 0.36), ("itc", "TR@1", 0.19)],
    "albef_tiny_pretrain": [("itm", "accuracy", 0.66)],
}
CASES = [(name, task, metric, floor) for name, rows in FLOORS.items() for task, metric, floor in rows]


@pytest.mark.parametrize("name,task,metric,floor", CASES, ids=lambda v: str(v))
def test_shipped_checkpoint_holds_its_floor(name, task, metric, floor):
    model = load_model(SHIPPED / f"{name}.safetensors")
    got = evaluate_task(model, task, "test", SIZE, seed=0)[metric]
    assert got >= floor, f"{name} scores {metric} {got:.3f} on {task}, under its floor {floor}"


@pytest.mark.parametrize("name,task,metric,floor", CASES, ids=lambda v: str(v))
def test_an_untrained_model_stays_under_the_floor(name, task, metric, floor):
    """The floor means something: the same architecture with random weights does not reach it."""
    shipped = load_model(SHIPPED / f"{name}.safetensors")
    torch.manual_seed(0)
    fresh = type(shipped)(shipped.config).eval()
    assert evaluate_task(fresh, task, "test", SIZE, seed=0)[metric] < floor
