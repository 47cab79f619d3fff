"""Common corruptions (vlat.world.corruptions): shapes, determinism, worked cases, severity order, the table
and the CLI."""

import pytest
import torch

from vlat.cli import main as vlat
from vlat.resources import checkpoint
from vlat.world import WorldDataset
from vlat.world.corruptions import CORRUPTIONS, SEVERITIES, corrupt

ITM = checkpoint("single_stream_tiny_itm")


@pytest.fixture(scope="module")
def images():
    return WorldDataset("itm", "test", 8).images


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_keeps_shape_and_is_deterministic(images, name):
    for s in SEVERITIES:
        out = corrupt(images, name, s)
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert torch.equal(out, corrupt(images, name, s))                  # same call, same pixels
        assert not torch.equal(out, images)                                # it does change the image


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_makes_the_image_move_further(images, name):
    """Mean |corrupted - clean| never falls from one severity to the next (5 % slack for random draws)."""
    moved = [float((corrupt(images, name, s).float() - images.float()).abs().mean()) for s in SEVERITIES]
    assert all(b >= 0.95 * a for a, b in zip(moved, moved[1:])), moved
    assert moved[-1] > moved[0]


def test_worked_cases():
    img = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    img[..., :2] = 255                                                     # half white, half black: mean 0.5
    # contrast at severity 1 (c = 0.75): 0.5 ± 0.375 -> 0.875 and 0.125 of 255 = 223.125 and 31.875
    out = corrupt(img, "contrast", 1)
    assert out[0, 0, 0, 0] == 223 and out[0, 0, 0, 3] == 32
    # brightness at severity 1 adds 0.05: 100 -> 112.75 -> 113; white stays 255
    grey = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    assert (corrupt(grey, "brightness", 1) == 113).all()
    # a flat image is a fixed point of every blur and of pixelation
    for name in ("gaussian_blur", "defocus_blur", "motion_blur", "pixelate"):
        assert torch.equal(corrupt(grey, name, 5), grey), name
    # impulse noise at severity 5 sets about 7 % of the entries to 0 or 255
    big = torch.full((4, 3, 64, 64), 128, dtype=torch.uint8)
    hit = (corrupt(big, "impulse_noise", 5) != 128).float().mean()
    assert 0.06 < float(hit) < 0.08


def test_bad_input_is_refused(images):
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        corrupt(images, "snow", 1)
    with pytest.raises(ValueError, match="severity must be one of 1-5"):
        corrupt(images, "fog", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.float(), "fog", 1)


def test_corruption_table_and_cli(capsys):
    from vlat.evaluate import corruption_table
    from vlat.models import load_model

    model = load_model(ITM).eval()
    row = corruption_table(model, "itm", size=32, corruptions=["fog", ("gaussian_noise", 5)])
    assert list(row) == ["fog", "gaussian_noise@5", "corruption_mean"]
    assert all(0.0 <= v <= 1.0 for v in row.values())
    assert row["corruption_mean"] == pytest.approx((row["fog"] + row["gaussian_noise@5"]) / 2)
    assert vlat(["eval", "--checkpoint", str(ITM), "--eval-size", "24", "--shifts", "sketch,fog@2"]) == 0
    out = capsys.readouterr().out
    assert "sketch" in out and "fog@2" in out and "corruption_mean" in out
    for bad, message in (("snow", "unknown shift 'snow'"), ("fog@9", "severity must be one of 1-5"),
                         ("fog@x", "the severity after @ must be 1-5")):
        assert vlat(["eval", "--checkpoint", str(ITM), "--shifts", bad]) == 2
        assert message in capsys.readouterr().err
