"""The explorer's pure functions: one pair, every method, and the bad inputs."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlat.adversarial import per_example_norm
from vlat.adversarial import registry
from vlat.explain.pair import build_method, explorer_methods, explore, integrated_gradients, load_image, probe
from vlat.explain.views import all_figures
from vlat.models import build_model, model_tokenizer, perturbed
from vlat.models.base import attention_rollout


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    from vlat.world import WorldDataset

    item = WorldDataset("itm", "test", 1, 0)[0]
    arr = (item["pixel_values"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("pair") / "scene.png"
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module", params=["single_stream", "clip", "albef"])
def model_tok(request):
    torch.manual_seed(0)
    model = build_model(request.param, "nano").eval()
    return model, model_tokenizer(model)


# ---- attention rollout, by hand ----------------------------------------------------------------------
def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(3).expand(1, 2, 3, 3)                                    # [B, H, T, T]
    assert torch.allclose(attention_rollout([eye, eye]), torch.eye(3).unsqueeze(0))


def test_rollout_two_tokens_worked_by_hand():
    """A = [[0, 1], [0, 1]] (everyone attends to token 1); with r = 0.5, A' = [[.5, .5], [0, 1]];
    two layers: A'A' = [[.25, .75], [0, 1]]."""
    a = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(1, 1, 2, 2)
    assert torch.allclose(attention_rollout([a, a]), torch.tensor([[[0.25, 0.75], [0.0, 1.0]]]))


# ---- loading what people upload -----------------------------------------------------------------------
def test_grayscale_rgba_and_arrays_become_rgb(tmp_path):
    grey = Image.new("L", (100, 80), 128)
    assert load_image(grey, 64).shape == (3, 64, 64)
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))                      # fully transparent red
    assert torch.allclose(load_image(rgba, 64), torch.ones(3, 64, 64))     # composited over white
    arr = np.random.default_rng(0).random((32, 32, 3))                       # floats in [0, 1]
    assert load_image(arr, 64).shape == (3, 64, 64)
    path = tmp_path / "g.png"
    grey.save(path)
    assert load_image(str(path), 64).shape == (3, 64, 64)


def test_bad_images_are_refused_with_a_reason(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        load_image(fake, 64)
    with pytest.raises(ValueError, match="largest accepted"):
        load_image(Image.new("RGB", (5000, 10)), 64)
    with pytest.raises(ValueError, match="no image"):
        load_image(None, 64)
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8), 64)


@pytest.mark.parametrize("kw,msg", [
    ({"eps": -0.1}, "ε must lie"), ({"eps": float("nan")}, "ε must lie"), ({"eps": 2.0}, "ε must lie"),
    ({"eps": 0.0}, "nothing to perturb"), ({"steps": 0}, "steps must lie"), ({"steps": 500}, "steps must lie"),
    ({"name": "VILLA?"}, "unknown method"), ({"modality": "audio"}, "unknown modality"),
    ({"name": "YOPO", "modality": "both"}, "one site at a time"),
])
def test_bad_controls_are_refused(kw, msg):
    args = {"name": "PGD", "modality": "image", "eps": 0.1, "steps": 10, **kw}
    with pytest.raises(ValueError, match=msg):
        build_method(**args)


def test_empty_caption_is_refused(model_tok, scene_png):
    model, tok = model_tok
    with pytest.raises(ValueError, match="caption is empty"):
        probe(model, tok, scene_png, "   ")


# ---- one pair, every method --------------------------------------------------------------------------
COMBOS = [(m, s) for m in explorer_methods() for s in ("image", "text", "both", "pixels")
          if not (registry.get(m).single_site and s == "both")]   # YOPO refuses two sites (see below)


@pytest.mark.parametrize("method,modality", COMBOS)
def test_explore_every_method_stays_in_its_ball(model_tok, scene_png, method, modality):
    model, tok = model_tok
    ex = explore(model, tok, scene_png, "a red circle left of a blue square", method, modality, eps=0.2, steps=3,
                 attributions=False)
    adv = build_method(method, modality, 0.2, 3)
    adv.calibrate(model, probe(model, tok, scene_png, "a red circle left of a blue square").batch,
                  "itm" if "itm" in model.tasks else "classify")
    for site, d in ex.deltas.items():
        assert (per_example_norm(d, adv.norm) <= 0.2 * adv.scale(site) * (1 + 1e-4)).all(), site
    assert math.isclose(float(ex.probs_clean.sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(float(ex.probs_adv.sum()), 1.0, rel_tol=1e-5)
    assert ex.kl["symmetric KL"] == pytest.approx(ex.kl["KL(p||p_adv)"] + ex.kl["KL(p_adv||p)"])
    assert min(ex.kl.values()) >= -1e-6
    if modality in ("text", "both"):
        assert len(ex.token_delta) == len(ex.tokens) and ex.tokens[0] == "[CLS]"
    else:
        assert ex.token_delta is None
    n = model.config.image_size // model.config.patch_size
    assert ex.attention_clean.shape == ex.attention_adv.shape == (n, n)
    if modality == "text":
        assert ex.patch_delta is None
    else:
        assert ex.patch_delta.shape == (n, n)


def test_pgd_with_more_budget_moves_the_prediction_more(model_tok, scene_png):
    model, tok = model_tok
    small = explore(model, tok, scene_png, "a red circle", "PGD", "both", eps=0.01, steps=5, attributions=False)
    big = explore(model, tok, scene_png, "a red circle", "PGD", "both", eps=0.5, steps=5, attributions=False)
    assert big.kl["KL(p||p_adv)"] > small.kl["KL(p||p_adv)"]


def test_integrated_gradients_are_complete(model_tok, scene_png):
    """IG's completeness axiom: attributions sum to p(x) - p(baseline), here the zero site inputs."""
    model, tok = model_tok
    p = probe(model, tok, scene_png, "a red circle left of a blue square")
    target = int(p.batch["labels"][0])
    attrs = integrated_gradients(model, p.batch, p.task, target, ("text", "image"), n_steps=64)
    from vlat.adversarial.base import Frozen, forward_capturing

    with torch.no_grad():
        out, xs = forward_capturing(Frozen(model, p.task), p.batch, ("text", "image"))
        px = out.logits.float().softmax(-1)[0, target]
        with perturbed(model, {s: -xs[s].detach() for s in xs}, p.batch):
            p0 = model(p.batch, p.task).logits.float().softmax(-1)[0, target]
    total = sum(float(a.sum()) for a in attrs.values())
    assert total == pytest.approx(float(px - p0), abs=0.02 + 0.05 * abs(float(px - p0)))


def test_every_view_is_a_plotly_figure(model_tok, scene_png):
    import plotly.graph_objects as go

    model, tok = model_tok
    ex = explore(model, tok, scene_png, "a red circle", "PGD", "pixels", eps=0.1, steps=2)
    figs = all_figures(ex)
    assert set(figs) == {"perturbation", "tokens", "attention", "confidence", "attribution"}
    assert all(isinstance(f, go.Figure) for f in figs.values())
    assert len(figs["perturbation"].data) == 4                        # image, heat map, δ magnified, x + δ
    kl_bars = [t for t in figs["confidence"].data if list(t.y)[0].startswith("KL")][0]
    assert list(kl_bars.x) == pytest.approx(list(ex.kl.values()))
    from vlat.explain import token_bars

    assert list(token_bars(["a", "red", "a"], [1, 2, 3]).data[0].y) == ["0. a", "1. red", "2. a"]   # reading order


def test_long_captions_are_wrapped_never_cut():
    from vlat.explain.views import wrap

    text = "a purple circle left of a red circle and a tiny blue square above them"
    assert wrap(text).replace("<br>", " ") == text
    assert all(len(line) <= 22 for line in wrap(text).split("<br>"))
    assert wrap("supercalifragilisticexpialidocious word") == "supercalifragilisticexpialidocious<br>word"


def test_comparison_figure_puts_both_settings_side_by_side(model_tok, scene_png):
    from vlat.explain.views import comparison_figure

    model, tok = model_tok
    a = explore(model, tok, scene_png, "a red circle", "PGD", "both", eps=0.1, steps=3, attributions=False)
    b = explore(model, tok, scene_png, "a red circle", "FGSM", "text", eps=0.2, steps=3, attributions=False)
    fig = comparison_figure(a, b)
    names = [t.name for t in fig.data if t.name]
    assert "A: PGD both ε=0.1" in names and "B: FGSM text ε=0.2" in names
    assert sum(t.type == "heatmap" for t in fig.data) == 1             # B perturbs no image: its image instead
    lines = [t for t in fig.data if t.type == "scatter"]
    assert [len(t.y) for t in lines] == [3, 1]                          # PGD's 3 steps, FGSM's one



def test_nearest_tokens_reads_a_text_delta_back_as_words(model_tok):
    """δ = 0 leaves every word itself; δ = E[v] - E[w] at one position turns that word into v exactly."""
    from conftest import make_batch
    from vlat.explain.perturbation import nearest_tokens

    model, tok = model_tok
    batch = make_batch("itm", n=2)
    site = model.perturbation_sites()["text"]
    ids = batch["input_ids"]
    zero = torch.zeros(*ids.shape, site.module.weight.shape[1])
    assert nearest_tokens(site, ids, zero, tok) == [tok.convert_ids_to_tokens(row.tolist()) for row in ids]
    v = tok.convert_tokens_to_ids("square")
    swap = zero.clone()
    swap[0, 1] = site.module.weight[v].detach() - site.module.weight[ids[0, 1]].detach()
    words = nearest_tokens(site, ids, swap, tok)
    assert words[0][1] == "square" and words[0][2:] == tok.convert_ids_to_tokens(ids[0, 2:].tolist())
