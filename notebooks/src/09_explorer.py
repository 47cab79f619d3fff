# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · The explorer, inline: what a perturbation does to one image-text pair
#
# The Gradio app (`vlat explore`) and this notebook draw the same views from the same
# function, `vlat.explain.pair.explore`. For one pair it runs a method's **inner maximisation** on a
# fixed model and measures:
#
# 1. where δ went: its size per image patch and per caption token;
# 2. the model's image attention before and after ([CLS] attention rollout);
# 3. the prediction before and after, with $\mathrm{KL}(p\,\|\,p_{adv})$, $\mathrm{KL}(p_{adv}\,\|\,p)$ and their sum
#    (SMART's and VILLA's regulariser);
# 4. captum's integrated gradients: which tokens and patches carried the clean prediction.
#
# ε is relative: 0.1 means 10 % of the perturbed input's own norm on this pair.
#
# **Headline:** on the pair of two objects the shipped model is surest of (P(match) 0.78; it is surer of
# single objects, 0.96 on the explorer's first pair), PGD on both modalities at 10 % of each input's norm
# makes it a sure "no match" (1.00), while FGSM's one step at the same ε barely moves it (symmetric KL 0.10
# against PGD's 6.4). Numbers of fast mode on a 2-core CPU; sections 1 and 6 print those of your run.

# %% tags=["install"]
# Setup, written by scripts/sync_notebooks.py: installs vlat where it is missing (Colab, a fresh kernel)
# and is safe to re-run. To install another build, set VLAT_SOURCE to a wheel's path or a URL.
VLAT_SOURCE = "vlat"
import importlib
import importlib.util
import subprocess
import sys

found = importlib.util.find_spec("vlat")
if found is None or found.origin is None:          # missing, or only a folder named vlat (no package)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", VLAT_SOURCE], check=True)
    importlib.invalidate_caches()
import torch

import vlat

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # every model below lives here, the GPU when present
where = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "the CPU (no GPU found)"
print(f"vlat {vlat.__version__} from {vlat.__file__}; running on {where}")

# %% tags=["parameters"]
import os

FAST = os.environ.get("VLAT_FAST") == "1"
PAIRS = 2 if FAST else 4            # gallery pairs to compare
STEPS = 5 if FAST else 10           # attack steps
SEED = 0

# %%
import json

import torch

from vlat.explain.pair import explore, explorer_methods, probe
from vlat.explain.views import attention_figure, attribution_figure, confidence_figure, perturbation_figure, token_figure
from vlat.models import load_model, model_tokenizer
from vlat.resources import samples_dir

torch.manual_seed(SEED)
samples = samples_dir()
model = load_model(samples / "checkpoints" / "single_stream_tiny_itm.safetensors").to(DEVICE)
tok = model_tokenizer(model)
records = [json.loads(line) for line in (samples / "pairs" / "captions.jsonl").read_text().splitlines()]
# the gallery's scenes of two or three objects (their longest caption is a relation), the pairs the model
# is surest match first: an attack that flips one of them has undone a confident, correct answer
relational = [(samples / "pairs" / r["image"], max(r["captions"], key=len))
              for r in records if r["shift"] is None and len(r["objects"]) > 1]
sure = {k: probe(model, tok, img, cap).logits.softmax(-1)[0, 1].item() for k, (img, cap) in enumerate(relational)}
pairs = [relational[k] for k in sorted(sure, key=sure.get, reverse=True)[:PAIRS]]
image, caption = pairs[0]
print(f"{caption!r}: P(match) = {max(sure.values()):.3f}")

# %% [markdown]
# ## 1 · One PGD attack on both modalities
# The model is the shipped tiny single-stream model; it answers "does the caption match the image?".
# PGD pushes it away from its own clean answer.

# %%
ex = explore(model, tok, image, caption, "PGD", "both", eps=0.1, steps=STEPS, seed=SEED)
print(ex.summary())
print("loss at each step:", [round(v, 3) for v in ex.losses])

# %% [markdown]
# ## 2 · Where δ went
# Per image region (the model sees 16 regions of 16 × 16 px) and per caption token.

# %%
perturbation_figure(ex)

# %%
token_figure(ex)

# %% [markdown]
# ## 3 · Attention before and after
# The rollout of [CLS] over the image regions: how much of the final [CLS] state flows from each.

# %%
attention_figure(ex)

# %% [markdown]
# ## 4 · Confidence and KL
# The bars on the right are what SMART and VILLA penalise: how far the attacked prediction drifted.

# %%
confidence_figure(ex)

# %% [markdown]
# ## 5 · What carried the clean prediction: integrated gradients
# Red pushes towards the predicted answer, blue against it; the attributions add up to
# p(x) − p(baseline) (the baseline is the zero input at each site).

# %%
attribution_figure(ex)

# %% [markdown]
# ## 6 · Every method on the same pair
# The symmetric KL each method's inner maximisation reaches at the same ε (YOPO perturbs one site, so
# all run on the image here).

# %%
rows = {}
for m in explorer_methods():      # every method in vlat's registry
    e = explore(model, tok, image, caption, m, "image", eps=0.1, steps=STEPS, seed=SEED, attributions=False)
    rows[m] = e.kl["symmetric KL"]
    print(f"{m:7s} symmetric KL {rows[m]:.4f}   {e.prediction[0]} -> {e.prediction[1]}")

# %% [markdown]
# ## 7 · Try it
# Pick a pair, a method, the modality and ε (in CI the controls are only drawn).

# %%
import ipywidgets as widgets
from IPython.display import display


def show(pair, method, modality, eps):
    img, cap = pairs[pair]
    try:
        e = explore(model, tok, img, cap, method, modality, eps=eps, steps=STEPS, seed=SEED)
    except ValueError as err:        # e.g. YOPO on both modalities
        print(err)
        return
    print(cap, "|", e.summary())
    display(perturbation_figure(e), confidence_figure(e))


widgets.interact_manual(show, pair=widgets.IntSlider(0, 0, len(pairs) - 1, description="pair"),
                        method=widgets.Dropdown(options=explorer_methods(), value="PGD"),
                        modality=widgets.Dropdown(options=["image", "text", "both", "pixels"], value="both"),
                        eps=widgets.FloatSlider(value=0.1, min=0.01, max=0.5, step=0.01, description="ε"));

# %% [markdown]
# The same views with an upload box and a gallery: `vlat explore` (or `python -m vlat.apps.explorer`).

# %% [markdown]
# ## Recap and where to go next
# One pair at a time: where δ goes (per patch, per token), where the model looks before and after
# (attention rollout, cross-attention), how far the prediction moves (both KLs and their sum) and what
# the clean prediction rests on (integrated gradients). The explorer app (`vlat explore`) shows the same
# panels, adds uploads and compares two settings side by side. Next: notebook 10 takes the methods to a
# real CLIP, or `docs/methods.md` for each method's math and defaults.
