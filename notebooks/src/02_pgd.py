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
# # 02 · PGD: many small steps, projected back into the ball
#
# Madry et al. (2018) turn FGSM's single step into an optimisation: start at δ₀ (zero or random in the
# ball) and repeat
#
# $$\delta \leftarrow \Pi_\varepsilon\big(\delta + \eta\, g/\lVert g\rVert_2\big) \quad\text{(L2)}\qquad
#   \delta \leftarrow \mathrm{clip}\big(\delta + \eta\,\mathrm{sign}(g), -\varepsilon, \varepsilon\big) \quad\text{(L}\infty\text{)}$$
#
# PGD is both the standard *evaluation* attack (robust accuracy) and, used inside training, the
# strongest of the classic defences, at K + 1 passes per batch.
#
# **Headline:** ten small steps find a higher loss than one step of the same size, and accuracy under
# PGD-10 falls from the clean 0.85 to 0.53 at ε = 2 and 0.30 at ε = 4; fine-tuning on PGD-3 examples lifts
# it at ε = 2 from 0.55 to 0.66. Numbers of fast mode on a 2-core CPU; sections 3 and 4 print those of
# your run.

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
TRAIN_SCENES = 1024 if FAST else 4000   # scenes for the defence (fine-tuning the shipped model)
EPOCHS = 2 if FAST else 3
EVAL_SCENES = 128 if FAST else 500
STEPS = 10                              # attack steps K
SEED = 0

# %%
import torch

from vlat.adversarial import FGM, PGD, per_example_norm
from vlat.evaluate import accuracy, compare_training, markdown_table, robust_accuracy
from vlat.explain import image_heatmap, loss_curve, ood_bars, patch_grid
from vlat.models import load_model, perturbed
from vlat.resources import checkpoint
from vlat.train import TrainConfig
from vlat.world import Collator, WorldDataset, load_tokenizer

torch.manual_seed(SEED)
CKPT = checkpoint("single_stream_tiny_itm")
model = load_model(CKPT).to(DEVICE)
tok = load_tokenizer()
collate = Collator(tok, "itm")
test = WorldDataset("itm", "test", EVAL_SCENES, SEED)
batch = collate([test[k] for k in range(16)])

# %% [markdown]
# ## 1 · The attack loop, step by step
# The loss of the batch after each PGD step on the image regions (L2, ε = 2, η = ε/4):

# %%
pgd = PGD(sites=("image",), eps=2.0, step_size=0.5, steps=STEPS)
delta, losses = pgd.attack(model, batch, "itm", random_start=True, generator=torch.Generator().manual_seed(SEED),
                           return_losses=True)
for t, loss in enumerate(losses):
    print(f"step {t:2d}: loss {loss:.4f}")
print(f"max ‖δ‖₂ per example: {per_example_norm(delta['image']).max().item():.3f} (ε = {pgd.eps})")
loss_curve(losses, "PGD: loss per step", smooth=1)

# %%
site = model.perturbation_sites()["image"]
image_heatmap(batch["pixel_values"][0], patch_grid(delta["image"], site, 64, model.config.patch_size)[0], "‖δ‖ per region")

# %% [markdown]
# ### Your turn: write the PGD loop
# Why these two operations. The steepest ascent step of length η in L2: among all $v$ with
# $\|v\|_2 \le \eta$, the first-order gain $g^\top v$ is largest at $v = \eta\, g / \|g\|_2$ (Cauchy-Schwarz:
# $g^\top v \le \|g\|_2 \|v\|_2$, with equality when $v$ points along $g$). The projection onto the ball
# $\{\|\delta\|_2 \le \epsilon\}$: the closest point of a ball lies on the ray to its centre, so a $\delta$
# outside is rescaled to $\epsilon\, \delta / \|\delta\|_2$ and one inside is left alone.
#
# Write the loop in the cell below (this copy ships filled in so that the notebook runs; to practise,
# delete the four lines marked `←` and write them yourself). From $\delta = 0$, K times: the loss at
# $x + \delta$, its gradient $g$ with respect to $\delta$, the step, the projection, each per example.
# `perturbed(model, {"image": delta}, batch)` adds $\delta$ at the image site for the forwards inside it.
#
# **Predict before you run:** after 10 steps of η = ε/4, will every example's $\|\delta\|_2$ be exactly ε?

# %%
def my_pgd(model, batch, eps, eta, steps):
    delta = torch.zeros(model.perturbation_sites()["image"].shape(batch), device=model.device, requires_grad=True)
    for _ in range(steps):
        with perturbed(model, {"image": delta}, batch):
            loss = model(batch, "itm").loss                                  # ← the loss at x + δ
        (g,) = torch.autograd.grad(loss, delta)                              # ← its gradient with respect to δ
        delta = delta + eta * g / per_example_norm(g).clamp_min(1e-8).view(-1, 1, 1)     # ← steepest L2 step
        scale = torch.clamp(eps / per_example_norm(delta).clamp_min(1e-12), max=1.0)     # ← back into the ball
        delta = (delta * scale.view(-1, 1, 1)).detach().requires_grad_(True)
    return delta.detach()


# %% [markdown]
# The check: your δ against vlat's `PGD` on the same batch, from the same start (δ = 0, no random start).

# %%
mine = my_pgd(model, batch, eps=2.0, eta=0.5, steps=STEPS)
vlat_pgd = PGD(sites=("image",), eps=2.0, step_size=0.5, steps=STEPS)
theirs = vlat_pgd.attack(model, batch, "itm", random_start=False)["image"]
diff = (mine - theirs).abs().max().item()
print(f"largest difference from vlat's PGD: {diff:.1e}:", "the same loop" if diff < 1e-5 else
      "not yet; print both after one step (steps=1) and compare the step, then the projection")
print("‖δ‖₂ per example:", [round(v, 3) for v in per_example_norm(mine).tolist()])

# %% [markdown]
# Answer: not necessarily. 10 steps of ε/4 could travel 2.5 ε, so most examples reach the sphere and the
# projection keeps them on it (the printed 2.0s). But an example whose gradient turns back, step after step,
# zig-zags and can end inside: look for a norm below 2.0 above. The ball is a bound, not a target.

# %% [markdown]
# ## 2 · One step vs many
# FGM spends its whole budget in one direction; PGD can turn. At the same ε, PGD finds higher loss.

# %%
with torch.no_grad():
    base = model(batch, "itm").loss.item()
for name, attack in [("FGM", FGM(sites=("image",), eps=2.0)), (f"PGD-{STEPS}", pgd)]:
    d = attack.attack(model, batch, "itm")
    with torch.no_grad(), perturbed(model, d, batch):
        print(f"{name:>7}: loss {model(batch, 'itm').loss.item():.4f} (clean {base:.4f})")

# %% [markdown]
# ## 3 · Robust accuracy as ε grows
# An item counts as robust when it is right clean *and* under PGD-10 with a random start.

# %%
clean_acc = accuracy(model, test, "itm", tok)
curve = {}
for eps in (0.5, 1.0, 2.0, 4.0):
    curve[f"eps {eps}"] = robust_accuracy(model, test, "itm", PGD(sites=("image",), eps=eps, step_size=eps / 4, steps=STEPS), tok)
print(f"clean accuracy {clean_acc:.3f}")
for k, v in curve.items():
    print(f"  {k}: robust {v:.3f}")

# %% [markdown]
# Try it: robust accuracy for your own ε and number of steps (in CI the controls are only drawn).

# %%
import ipywidgets as widgets

widgets.interact_manual(
    lambda eps, steps: print(f"robust accuracy {robust_accuracy(model, test, 'itm', PGD(sites=('image',), eps=eps, step_size=eps / 4, steps=steps), tok):.3f}"),
    eps=widgets.FloatSlider(value=2.0, min=0.25, max=8.0, step=0.25, description="ε"),
    steps=widgets.IntSlider(value=10, min=1, max=20, description="K"));

# %% [markdown]
# ## 4 · The defence: PGD adversarial fine-tuning
# Training on the final PGD iterate (K = 3) against clean training: both start from the shipped model and
# see the same data for the same epochs.

# %%
data = WorldDataset("itm", "train", TRAIN_SCENES, SEED)
rows = compare_training({"clean fine-tuning": None, "PGD-3 fine-tuning": PGD(sites=("image",), eps=2.0, step_size=0.7, steps=3)},
                        lambda: load_model(CKPT).to(DEVICE), "itm", data, test,
                        {"PGD-10": PGD(sites=("image",), eps=2.0, step_size=0.5, steps=STEPS)},
                        TrainConfig(epochs=EPOCHS, lr=3e-4, seed=SEED, progress=False))
print(markdown_table(rows))
ood_bars({k: {c: v for c, v in r.items() if c != "train s"} for k, r in rows.items()}, "clean vs PGD-10 accuracy")
