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
# # 05 · SMART: keep the whole output distribution steady, not only the label
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/vlat-project/vlat/blob/main/notebooks/05_smart.ipynb)
#
# FGM, PGD and FreeLB ask that the *label* survive the perturbation. **SMART** (Jiang et al., ACL 2020)
# asks that the *prediction* barely move, with no label at all:
#
# $$\min_\theta\; L_\text{task}(f(x), y) + \lambda_s \max_{\lVert\delta\rVert\le\varepsilon}
#   \big[\mathrm{KL}(p(x+\delta)\,\Vert\,p(x)) + \mathrm{KL}(p(x)\,\Vert\,p(x+\delta))\big]$$
#
# The inner max starts from tiny noise $\delta_0\sim\mathcal N(0,\sigma^2)$ and takes K (usually one)
# normalised ascent steps. Optionally, a Bregman proximal term keeps each update near an EMA teacher.

# %%
import sys

if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/vlat-project/vlat"], check=True)

# %% tags=["parameters"]
import os

FAST = os.environ.get("VLAT_FAST") == "1"
TRAIN_SCENES = 256 if FAST else 2000
EPOCHS = 1 if FAST else 8
EVAL_SCENES = 64 if FAST else 300
SEED = 0

# %%
from pathlib import Path

import torch

import vlat
from vlat.adversarial import PGD, SMART, Frozen
from vlat.evaluate import compare_training, markdown_table
from vlat.explain import ood_bars
from vlat.models import build_model, load_model
from vlat.objectives import kl_logits, symmetric_kl
from vlat.train import TrainConfig
from vlat.world import Collator, WorldDataset, load_tokenizer

torch.manual_seed(SEED)
tok = load_tokenizer()
collate = Collator(tok, "itm")
model = load_model(Path(vlat.__file__).parents[1] / "data_samples" / "checkpoints" / "single_stream_tiny_itm.safetensors")
batch = collate([WorldDataset("itm", "test", 32, SEED)[k] for k in range(32)])

# %% [markdown]
# ## 1 · KL is not symmetric; SMART uses both directions

# %%
p, q = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
print(f"KL(p‖q) = {kl_logits(p, q):.4f}   KL(q‖p) = {kl_logits(q, p):.4f}   symmetric = {symmetric_kl(p, q):.4f}")
print(f"symmetric KL of a distribution with itself: {symmetric_kl(p, p):.1e}")

# %% [markdown]
# ## 2 · The regulariser as the ball grows
# How far can the prediction be pushed inside an ε-ball around the word embeddings? (One ascent step,
# per-token L∞ normalised, as in the authors' code.)

# %%
with torch.no_grad():
    clean_logits = model(batch, "itm").logits
for eps in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
    smart = SMART(sites=("text",), eps=eps, step_size=eps, sigma=1e-5)
    reg = smart.regulariser(Frozen(model, "itm"), batch, clean_logits)   # Frozen: the model, fixed, on one task
    print(f"eps {eps:7.4f}: symmetric KL = {reg.item():.2e}")

# %% [markdown]
# ## 3 · The NaN/Inf guard
# A non-finite gradient (from an overflow, say) must not poison training: the regulariser becomes 0 for
# that batch and the event is counted.

# %%
bad = clean_logits.clone()
bad[0, 0] = float("nan")
smart = SMART(sites=("text",))
print("regulariser:", smart.regulariser(Frozen(model, "itm"), batch, bad).item(), " skipped:", smart.skipped)

# %% [markdown]
# ## 4 · Training with SMART (and with the Bregman proximal term)
# Same data, seed and epochs; SMART costs about K + 2 passes (clean, ascent, regulariser), plus one
# teacher forward with the proximal term.

# %%
data = WorldDataset("itm", "train", TRAIN_SCENES, SEED)
test = WorldDataset("itm", "test", EVAL_SCENES, SEED)
attack = {"PGD-10 (text, eps 1)": PGD(sites=("text",), eps=1.0, step_size=0.25, steps=10)}
rows = compare_training({"clean": None,
                         "SMART λ=1": SMART(sites=("text",), eps=0.1, step_size=0.1, sigma=1e-3, weight=1.0),
                         "SMART + proximal μ=1": SMART(sites=("text",), eps=0.1, step_size=0.1, sigma=1e-3, mu=1.0)},
                        lambda: build_model("single_stream", "tiny"), "itm", data, test, attack,
                        TrainConfig(epochs=EPOCHS, seed=SEED, progress=False))
print(markdown_table(rows))
ood_bars({k: {c: v for c, v in r.items() if c != "train s"} for k, r in rows.items()}, "clean vs PGD-10 accuracy")
