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

from vlat.adversarial import FGM, PGD, normalize_grad, per_example_norm, project, site_norms
from vlat.evaluate import accuracy, compare_training, markdown_table, robust_accuracy
from vlat.exercises import check, grade
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
# The loss of the batch after each PGD step on the image regions (L2, ε = 2, η = ε/4). What ε = 2 means
# here: the regions' features of one scene have an L2 norm near 190, so δ may change them by about 1 %:

# %%
print(f"‖x‖₂ of the image site: {site_norms(model, batch, 'itm')['image']:.1f} per example; ε = 2 is "
      f"{100 * 2 / site_norms(model, batch, 'itm')['image']:.2f} % of it")

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
check("your PGD δ", mine, theirs, hint="run both with steps=1 and compare the step, then the projection")
print("‖δ‖₂ per example:", [round(v, 3) for v in per_example_norm(mine).tolist()])

# %% [markdown]
# Answer: not necessarily. 10 steps of ε/4 could travel 2.5 ε, so most examples reach the sphere and the
# projection keeps them on it (the printed 2.0s). But an example whose gradient turns back, step after step,
# zig-zags and can end inside: look for a norm below 2.0 above. The ball is a bound, not a target.

# %% [markdown]
# ### Why a random start
# From δ = 0 every run of PGD follows the same path; if the gradient at $x$ is small or misleading (a
# model can learn to flatten the loss right at its training points, "gradient masking"), the attack
# stalls. Madry et al. start from a uniform draw in the ball and, for evaluation, restart several times:
# the worst case over starts is a better estimate of the inner maximum. Section 3 uses a random start.
#
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
# Adversarial training minimises the worst-case loss, $\min_\theta \rho(\theta)$ with
# $\rho(\theta) = \mathbb{E}\,\max_{\lVert\delta\rVert\le\varepsilon} L(\theta, x+\delta)$. Why is it right to
# back-propagate only $L$ at the attack's final $\delta^*$, as if $\delta^*$ did not depend on θ? Danskin's
# theorem: where the maximiser $\delta^*$ is unique, $\nabla_\theta \max_\delta L(\theta, x+\delta) =
# \nabla_\theta L(\theta, x+\delta^*)$. The maximum moves with θ, but to first order only through
# $L$'s own dependence on θ: at a maximum, moving δ changes nothing. PGD's $\delta^*$ is an approximate
# maximiser, so this is an approximate gradient of ρ, and a better attack gives a better one.
#
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

# %% [markdown]
# ## Exercises
# Work each one out on paper, type your answer in place of the value given (the solutions ship filled in;
# `python -m vlat.exercises notebooks/02_pgd.ipynb mine.ipynb` writes a copy with them blanked), and run
# the cell: `grade` compares it with what vlat computes.
#
# **1.** δ = (3, 4) has left the L2 ball of radius ε = 1. Where does the projection put it?

# %%
answer = [0.6, 0.8]                                         # ← Π_ε(δ) = ε δ / ‖δ‖₂
grade("1. the L2 projection", answer, project(torch.tensor([[3.0, 4.0]]), 1.0, "l2")[0])

# %% [markdown]
# **2.** The same δ in the L∞ ball of radius 1 (a clip of each entry). And how far (L2) does each
# projection move δ?

# %%
answer = [1.0, 1.0]                                         # ← clip(δ, -ε, ε)
grade("2a. the L∞ projection", answer, project(torch.tensor([[3.0, 4.0]]), 1.0, "linf")[0])
answer = [4.0, 13**0.5]                                     # ← [‖δ - Π₂(δ)‖₂, ‖δ - Π∞(δ)‖₂]
grade("2b. distances moved", answer, [float((torch.tensor([3.0, 4.0]) - project(torch.tensor([[3.0, 4.0]]), 1.0, n)[0]).norm())
                                      for n in ("l2", "linf")])

# %% [markdown]
# **3.** One L2 PGD step from δ = 0 with η = 0.5 along $g = (1, -2, 2)$, ε = 2: what is δ after it?

# %%
answer = [0.5 / 3, -1.0 / 3, 1.0 / 3]                       # ← η g / ‖g‖₂ (inside the ball: no projection)
grade("3. one PGD step", answer, project(0.5 * normalize_grad(torch.tensor([[1.0, -2.0, 2.0]]), "l2"), 2.0)[0])

# %% [markdown]
# **4.** How many steps of η = ε/4, all in the same direction from δ = 0, before the projection starts to
# act (the first step that would leave the ball)? Check it on the loop above: the norm after each step.

# %%
answer = 5                                                  # ← after 4 steps ‖δ‖ = ε exactly; the 5th leaves
d, norms_seen = torch.zeros(1, 3), []
for _ in range(6):
    d = project(d + 0.5 * normalize_grad(torch.tensor([[1.0, -2.0, 2.0]]), "l2"), 2.0)
    norms_seen.append(round(float(d.norm()), 4))
grade("4. the first projected step", answer, 1 + next(k for k in range(1, 6) if norms_seen[k] == norms_seen[k - 1]))

# %% [markdown]
# ## Recap and where to go next
# PGD repeats the steepest step and projects back into the ball: a rescale in L2, a clip in L∞, each the
# closest point of the ball. A random start avoids a path that stalls at a flat point. Danskin's theorem
# says that the gradient of the worst-case loss is the gradient at the attack's δ*, which is why adversarial
# training back-propagates only the final iterate. PGD costs K + 1 passes a batch. Next: notebook 03 gets
# (almost) the same defence at the price of clean training (FreeAT, YOPO).
