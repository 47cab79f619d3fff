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
# # 00 · A tour of vlat: the toy world, a model, a minute of training, an evaluation
#
# vlat teaches adversarial and robust training of vision-language models by running them. Everything
# here runs on a laptop CPU: the images and captions come from a small procedural world, the models are
# tiny but real Hugging Face transformers, and later notebooks attack and defend them.
#
# This tour: **(1)** look at the world, **(2)** build a CLIP dual encoder and see where perturbations
# go, **(3)** train it for about a minute, **(4)** evaluate it in-distribution and under five shifts.

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
# Parameters. VLAT_FAST=1 (set by CI) shrinks everything to seconds; the defaults take about a minute on CPU.
import os

FAST = os.environ.get("VLAT_FAST") == "1"
TRAIN_SCENES = 512 if FAST else 3000   # training scenes
EPOCHS = 1 if FAST else 3              # passes over them
EVAL_SCENES = 100 if FAST else 500     # test scenes per split
SEED = 0

# %%
import torch

import vlat
from vlat.evaluate import markdown_table, ood_table
from vlat.explain import loss_curve, ood_bars, scene_grid
from vlat.models import build_model, load_model
from vlat.resources import checkpoint
from vlat.train import TrainConfig, train
from vlat.world import SHIFTS, Collator, WorldDataset, load_tokenizer

torch.manual_seed(SEED)
print("vlat", vlat.__version__, "| torch", torch.__version__, "| device:", DEVICE)

# %% [markdown]
# ## 1 · The world
#
# A scene has one to three objects (shape × colour × size × position). Every scene comes with several
# true captions, built from *claims* whose truth is known exactly, so matching and retrieval can be
# scored without human labels.

# %%
world = WorldDataset("itc", split="train", size=8, seed=SEED)
scene_grid(world.images, [world.captions[i][-2] for i in range(8)])

# %%
for caption in world.captions[0]:
    print(caption)

# %% [markdown]
# **Distribution shifts** are the ImageNet-Sketch/-R/-V2 analogues: the same scenes drawn as outlines,
# on textured backgrounds, in shifted colours, described in new words, and scenes built only from
# colour-shape pairs never seen in training ("composition").

# %%
views = [WorldDataset("itc", "test", 1, SEED, shift=s) for s in (None, *SHIFTS)]
scene_grid(torch.cat([v.images for v in views]), ["id"] + [f"{s}: {v.captions[0][0]}" for s, v in zip(SHIFTS, views[1:])], cols=6)

# %% [markdown]
# ## 2 · A model and its perturbation sites
#
# Methods never know which model they train: each model names the places where a perturbation δ is
# added (word embeddings, patch embeddings, pixels) and the mask that keeps padding untouched.

# %%
model = build_model("clip", "tiny").to(DEVICE)
tok = load_tokenizer()
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
batch = Collator(tok, "itc")([world[i] for i in range(4)])
for name, site in model.perturbation_sites().items():
    print(f"{name:>6}: δ of shape {tuple(site.shape(batch))} on {type(site.module).__name__}")

# %% [markdown]
# ## 3 · About a minute of training
#
# One loop (`vlat.train.train`); the training step is plugged in (here the clean one; later notebooks
# plug in FGM, PGD, FreeLB, ...). CLIP learns by matching each image to its caption within the batch.

# %%
data = WorldDataset("itc", "train", TRAIN_SCENES, SEED)
state = train(model, "itc", data, TrainConfig(epochs=EPOCHS, batch_size=128, lr=1e-3, seed=SEED),
              collate_fn=Collator(tok, "itc"))
print(f"{state.step} steps in {state.seconds:.1f} s")
loss_curve(state.losses)

# %% [markdown]
# ## 4 · Evaluation, in distribution and under shift
#
# Zero-shot classification: each test image's main object is one of 24 colour-shape classes; the model
# picks the prompt "a photo of a {colour} {shape}" closest to the image. Chance is 1/24 ≈ 0.04.
# Compare our minute of training with the shipped checkpoint (trained longer by
# `python scripts/make_checkpoints.py`).

# %%
rows = {"this notebook": ood_table(model, "classify", size=EVAL_SCENES)}
rows["shipped clip_tiny_itc"] = ood_table(load_model(checkpoint("clip_tiny_itc")).to(DEVICE), "classify", size=EVAL_SCENES)
print(markdown_table(rows))
ood_bars(rows, "zero-shot accuracy: ID and per shift")

# %% [markdown]
# Every shift costs accuracy, most of all the ones that change what the model relied on (colour
# rendering, backgrounds). That gap is what the robust fine-tuning notebook (R-Adapter) works on, and
# the adversarial notebooks ask the complementary question: how small a change flips a prediction?

# %% [markdown]
# ## Recap and where to go next
# The toy world gives images and captions whose truth is known exactly, so every score is exact. A vlat
# model is a real Hugging Face transformer behind one contract: a forward per task and named perturbation
# sites (words, image regions, pixels) where δ is added. One call of `train` trains any model on any task,
# and `ood_table` scores it in-distribution and under five shifts. Next: notebook 01 attacks a trained
# model with one gradient step (FGSM, FGM), 02-07 go through the adversarial methods, 08 fine-tunes CLIP
# robustly, 09 looks at one pair at a time, and 10 does it all with a real CLIP.
