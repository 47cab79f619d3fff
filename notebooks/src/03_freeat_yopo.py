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
# # 03 · FreeAT and YOPO: adversarial training at (almost) the price of clean training
#
# PGD-K costs K + 1 passes per batch. Two ideas make the adversary nearly free:
#
# - **FreeAT** (Shafahi et al., 2019) replays each batch m times. Every replay is one forward/backward
#   whose gradient serves twice: the parameters take an optimiser step, and δ takes an ascent step.
#   Train N/m epochs and the total cost equals clean training.
# - **YOPO** (Zhang et al., 2019) notices that δ only enters through the first layer. One full pass
#   gives the gradient at layer one's output, $p = \partial L/\partial f_0$; then n cheap steps move δ
#   through layer one alone, maximising $\langle f_0(x+\delta), p\rangle$. As in the authors' code, layer
#   one's own weights then also learn from that same product at the new δ (the "Hamiltonian"), and δ
#   starts uniformly inside the ball.
#
# **Headline:** at the cost of clean fine-tuning, FreeAT lifts accuracy under PGD-10 from 0.56 to 0.60;
# PGD-3 reaches 0.67 and YOPO 0.70, each for several times the passes. Numbers of fast mode on a 2-core
# CPU; section 3 prints accuracy and seconds of your run.

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
TRAIN_SCENES = 512 if FAST else 4000   # scenes for the equal-cost comparison (fine-tuning the shipped model)
EPOCHS = 4 if FAST else 4              # clean epochs; FreeAT runs EPOCHS / m of them
REPLAYS = 4                             # FreeAT's m
EVAL_SCENES = 128 if FAST else 500
SEED = 0

# %%
import copy

import torch

from vlat.adversarial import PGD, YOPO, FreeAT, normalize_grad, project, registry, site_norms
from vlat.evaluate import compare_training, markdown_table
from vlat.exercises import check, grade
from vlat.explain import ood_bars
from vlat.models import build_model, load_model, perturbed
from vlat.models.base import run_layer_one
from vlat.resources import checkpoint
from vlat.train import StepContext, TrainConfig
from vlat.world import Collator, WorldDataset, load_tokenizer

torch.manual_seed(SEED)
tok = load_tokenizer()
collate = Collator(tok, "itm")
batch = collate([WorldDataset("itm", "train", 32, SEED)[k] for k in range(32)])


# %% [markdown]
# ## 1 · FreeAT on one batch: m replays, m optimiser steps, δ carried between them
# The loss printed is that of each replay *at its current δ*: the model learns while δ pushes back.

# %%
model = build_model("single_stream", "tiny").to(DEVICE).train()
freeat = FreeAT(sites=("image",), eps=2.0, step_size=1.0, replays=REPLAYS, trace=True)
ctx = StepContext.standalone(model, "itm", TrainConfig(seed=SEED))
for _ in range(3):
    freeat(ctx, batch)
    print("  ".join(f"replay {r['step']}: loss {r['loss']:.3f}, ‖δ‖ {r['|δ| image']:.2f}" for r in freeat.last_trace))
print("optimiser steps taken:", ctx.optimizer.state[next(iter(ctx.optimizer.state))]["step"].item())

# %% [markdown]
# ### Your turn: write FreeAT's replays
# One replay is one forward at $x + \delta$ and **one** backward. That backward fills both the parameters'
# gradients and δ's. The parameters take their optimiser step (`ctx.optimizer_step`, with the loop's
# clipping), and δ takes its ascent step, $\delta \leftarrow \Pi_\varepsilon(\delta + \varepsilon_{step}\,
# g_\delta/\lVert g_\delta\rVert_2)$. δ starts at zero on each batch. Complete the lines marked `←`; the
# check runs vlat's FreeAT and yours from the same weights and compares the weights after the m replays.
#
# **Predict before you run:** the first replay trains on δ = 0. Is FreeAT's first update on a batch the
# same as clean training's?

# %%
def my_freeat(ctx, batch, eps, step, replays):
    model = ctx.model
    delta = torch.zeros(model.perturbation_sites()["image"].shape(batch), device=model.device, requires_grad=True)
    for _ in range(replays):
        with perturbed(model, {"image": delta}, batch):
            loss = ctx.forward(batch).loss                                   # ← the loss at x + δ
        ctx.backward(loss)                                                   # ← one backward for θ and δ
        g = delta.grad                                                       # ← δ's gradient, kept ...
        ctx.optimizer_step(loss)                                             # ← ... before θ's step
        delta = project(delta.detach() + step * normalize_grad(g), eps).requires_grad_(True)   # ← δ's step
    return delta.detach()


start = build_model("single_stream", "tiny", dropout=0.0).to(DEVICE).train()
theirs, mine = copy.deepcopy(start), copy.deepcopy(start)
FreeAT(sites=("image",), eps=2.0, step_size=1.0, replays=REPLAYS)(
    StepContext.standalone(theirs, "itm", TrainConfig(seed=SEED)), batch)
my_freeat(StepContext.standalone(mine, "itm", TrainConfig(seed=SEED)), batch, eps=2.0, step=1.0, replays=REPLAYS)
flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
check("weights after the replays", flat(mine), flat(theirs), atol=1e-6,
      hint="keep δ's gradient before the optimiser step; normalise it per example, then project")

# %% [markdown]
# Answer: yes. At δ = 0 the first replay's loss and gradient are the clean ones, so its update is clean
# training's. Only from the second replay on does the model meet a perturbed input (the authors carry δ
# over from the previous batch, `carry=True`, so that even the first replay is perturbed).

# %% [markdown]
# ## 2 · YOPO: the rest of the network is never touched by the inner steps
# Why that is allowed. Write the network as $L = \ell(g(f_0(x+\delta)))$, with $f_0$ the first layer.
# The chain rule gives $\nabla_\delta L = J_{f_0}(x+\delta)^\top p$ with the co-state $p = \partial L/\partial f_0$.
# YOPO computes $p$ once per full pass and holds it fixed for n inner steps. Each inner step then ascends
# the *Hamiltonian* $H(\delta) = \langle f_0(x+\delta), p\rangle$, whose gradient $J_{f_0}^\top p$ is exact at
# the δ where $p$ was taken and an approximation after, and costs one pass through layer one only.
#
# Count how often the first and the last transformer block run during one YOPO step with m = 3, n = 4.
# Count how often the first and the last transformer block run during one YOPO step with m = 3, n = 4.

# %%
calls = {"layer one": 0, "last block": 0}
first, _ = model.layer_one("text")
h1 = first.register_forward_hook(lambda *a: calls.__setitem__("layer one", calls["layer one"] + 1))
h2 = model.bert.encoder.layer[-1].register_forward_hook(lambda *a: calls.__setitem__("last block", calls["last block"] + 1))
yopo = YOPO(sites=("text",), norm="l2", eps=1.0, step_size=0.3, outer=3, inner=4, trace=True)
yopo(StepContext.standalone(model, "itm", TrainConfig(seed=SEED)), batch)
h1.remove(), h2.remove()
print(calls, "-> m full passes; m·(n+2) passes through layer one (per full pass: its own, n inner steps, "
      "and the Hamiltonian that trains layer one)")

# %% [markdown]
# What does one inner step cost? `run_layer_one` runs the embeddings and the first block, then stops.

# %%
import time

t = time.perf_counter()
for _ in range(10):
    with torch.no_grad():
        model(batch, "itm")
full = (time.perf_counter() - t) / 10
t = time.perf_counter()
for _ in range(10):
    with torch.no_grad():
        run_layer_one(model, "text", batch)
one = (time.perf_counter() - t) / 10
print(f"full forward {1000 * full:.1f} ms, layer one {1000 * one:.1f} ms ({one / full:.0%} of the network; "
      f"the tiny model has only {model.config.num_layers} blocks, so YOPO saves less here than on a 12-layer BERT)")

# %% [markdown]
# ## 3 · Equal-cost fine-tuning: clean, FreeAT (EPOCHS / m epochs of m replays), YOPO, PGD-3
# Every arm starts from the shipped model (0.87 clean), same data and seed. Columns: accuracy clean and
# under PGD-10 on the image regions, and training time.

# %%
data = WorldDataset("itm", "train", TRAIN_SCENES, SEED)
test = WorldDataset("itm", "test", EVAL_SCENES, SEED)
attack = {"PGD-10 (image, eps 2)": PGD(sites=("image",), eps=2.0, step_size=0.5, steps=10)}
CKPT = checkpoint("single_stream_tiny_itm")
build = lambda: load_model(CKPT).to(DEVICE)
norm = site_norms(build(), batch, "itm")["image"]
print(f"ε = 2 on the image regions is {100 * 2 / norm:.1f} % of their norm ({norm:.0f}) per scene")
rows = compare_training({"clean": None, "PGD-3": PGD(sites=("image",), eps=2.0, step_size=0.7, steps=3),
                         "YOPO m=3 n=3": YOPO(sites=("image",), norm="l2", eps=2.0, step_size=0.5, outer=3, inner=3)},
                        build, "itm", data, test, attack, TrainConfig(epochs=EPOCHS, lr=3e-4, seed=SEED, progress=False))
rows.update(compare_training({f"FreeAT m={REPLAYS}": FreeAT(sites=("image",), eps=2.0, step_size=1.0, replays=REPLAYS)},
                             build, "itm", data, test, attack,
                             TrainConfig(epochs=max(1, EPOCHS // REPLAYS), lr=3e-4, seed=SEED, progress=False)))
print(markdown_table(rows))
ood_bars({k: {c: v for c, v in r.items() if c != "train s"} for k, r in rows.items()}, "clean vs PGD-10 accuracy")

# %% [markdown]
# Compare the `train s` column with PGD-3: FreeAT spends about as much time as clean training, YOPO
# its m full passes plus the cheap inner steps; the accuracy-under-attack column says what each bought.

# %% [markdown]
# ## Exercises
# Work each one out, type your answer in place of the value given (the solutions ship filled in;
# `python -m vlat.exercises notebooks/03_freeat_yopo.ipynb mine.ipynb` blanks them), and run the cell.
#
# **1.** A clean run of 8 epochs. FreeAT with m = 4 replays: how many epochs does it run so that its cost
# equals the clean run's, and how many forward/backward passes per training example does it make in all?

# %%
answer = [2, 8]                                             # ← [8 / m epochs, (8 / m) · m passes]
f = FreeAT(replays=4)
grade("1. FreeAT's budget", answer, [f.epochs_for(8), f.epochs_for(8) * registry.get("freeat").passes(f, 0.0)])

# %% [markdown]
# **2.** In section 2's YOPO step (m = 3 full passes, n = 4 inner steps): how many times did the last block
# run, and how many times did layer one run?

# %%
answer = [3, 18]                                            # ← [m, m · (1 + n + 1)]
grade("2. YOPO's passes", answer, [calls["last block"], calls["layer one"]],
      hint="layer one runs in each full pass, in each inner step, and once more for the Hamiltonian's update")

# %% [markdown]
# **3.** A linear first layer $f_0(x) = Wx$ with $W = \begin{pmatrix}1 & 2\\ 0 & 1\end{pmatrix}$ and a co-state
# $p = (1, -1)$. What is the Hamiltonian's gradient $\nabla_\delta \langle f_0(x+\delta), p\rangle$?

# %%
answer = [1.0, 1.0]                                         # ← Wᵀ p
W, p = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([1.0, -1.0])
d = torch.zeros(2, requires_grad=True)
grade("3. the Hamiltonian's gradient", answer, torch.autograd.grad((W @ (torch.ones(2) + d) * p).sum(), d)[0])

# %% [markdown]
# **4.** A YOPO step costs `m + m · (n + 1) · f` clean passes, with f the cost of a layer-one pass relative
# to a full one. With m = 3, n = 4 and a 12-layer network (f ≈ 1/12), about how many clean passes?

# %%
answer = 3 + 3 * 5 / 12                                     # ← m + m (n + 1) f
y = YOPO(sites=("text",), outer=3, inner=4)
grade("4. YOPO's cost", answer, registry.get("yopo").passes(y, 1 / 12), tol=1e-2)

# %% [markdown]
# ## Recap and where to go next
# FreeAT reuses each backward twice, for θ's step and δ's, and replays the batch m times over N/m epochs:
# the cost of clean training, with δ built up across replays. YOPO uses the co-state p = ∂L/∂f₀ of one
# full pass for n cheap steps through layer one, ascending the Hamiltonian ⟨f₀(x+δ), p⟩. Both trade an
# exact inner maximum for cost. Next: notebook 04 (FreeLB) turns every ascent step into training signal.
