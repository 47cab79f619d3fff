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
# # 04 · FreeLB: K ascent steps, and every one of them trains the model
#
# PGD throws away the parameter gradients of its first K − 1 steps. **FreeLB** (Zhu et al., ICLR 2020)
# keeps them: each step back-propagates $L(x+\delta_t)/K$, so after K steps the parameters hold the
# average gradient over K adversarial points, a "virtual K× batch", for the price of K passes.
#
# $$\delta_0 \sim U(-1,1)\odot m\cdot\frac{\text{init\_mag}}{\sqrt{\text{len}\cdot D}},\qquad
#   \delta_{t} = \Pi_\varepsilon\!\Big(\delta_{t-1} + \eta\,\frac{g_t}{\lVert g_t\rVert}\Big),\qquad
#   \nabla_\theta \mathrel{+}= \tfrac1K\nabla_\theta L(x+\delta_{t-1})$$
#
# VILLA (notebook 07) is FreeLB plus a KL term, applied to image and text.
#
# **Headline:** for 3 passes per batch (PGD-3 needs 4), FreeLB-3 fine-tuning lifts accuracy under a
# PGD-10 attack on the words from 0.35 to 0.54, close to PGD-3's 0.59. Numbers of fast mode on a 2-core
# CPU; section 4 prints those of your run.

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
TRAIN_SCENES = 1024 if FAST else 4000  # scenes for section 4 (fine-tuning the shipped model)
EPOCHS = 2 if FAST else 3
EVAL_SCENES = 128 if FAST else 500
SEED = 0

# %%
import torch

from vlat.adversarial import PGD, FreeLB, per_example_norm, registry, site_norms
from vlat.evaluate import compare_training, markdown_table
from vlat.exercises import check, grade
from vlat.explain import ood_bars, token_bars, token_magnitudes
from vlat.models import build_model, load_model, perturbed
from vlat.resources import checkpoint
from vlat.train import StepContext, TrainConfig
from vlat.world import Collator, WorldDataset, load_tokenizer

torch.manual_seed(SEED)
tok = load_tokenizer()
collate = Collator(tok, "itm")
batch = collate([WorldDataset("itm", "train", 16, SEED)[k] for k in range(16)])
model = build_model("single_stream", "tiny", dropout=0.1).to(DEVICE).train()   # dropout on: see section 3


# %% [markdown]
# ## 1 · The K steps: loss rises, δ grows
# `accumulate` runs the ascent and leaves the averaged gradient in `.grad` (the loop then steps once).

# %%
freelb = FreeLB(sites=("text",), steps=4, step_size=0.3, init_mag=0.2, eps=0.0, trace=True)
loss, final = freelb.accumulate(StepContext.standalone(model, "itm", TrainConfig(seed=SEED)), batch)
for r in freelb.last_trace:
    print(f"step {r['step']}: loss {r['loss']:.4f}   mean ‖δ‖ {r['|δ| text']:.3f}")
n = int(batch["attention_mask"][0].sum())
token_bars(tok.convert_ids_to_tokens(batch["input_ids"][0, :n].tolist()),
           token_magnitudes(final["text"], model.perturbation_sites()["text"])[0, :n], "final δ per word")

# %% [markdown]
# Change K and the step size and rerun the ascent (in CI the controls are only drawn):

# %%
import ipywidgets as widgets


def show_steps(K, eta):
    f = FreeLB(sites=("text",), steps=K, step_size=eta, init_mag=0.2, eps=0.0, trace=True)
    f.accumulate(StepContext.standalone(model, "itm", TrainConfig(seed=SEED)), batch)
    model.zero_grad()
    print("  ".join(f"{r['loss']:.3f}" for r in f.last_trace))


widgets.interact_manual(show_steps, K=widgets.IntSlider(value=4, min=1, max=8, description="K"),
                        eta=widgets.FloatSlider(value=0.3, min=0.05, max=1.0, step=0.05, description="η"));

# %% [markdown]
# ## 2 · The accumulated gradient is the mean of the K per-step gradients
# Why a "virtual K× batch". FreeLB back-propagates $L(x+\delta_t)/K$ at each of its K steps without zeroing
# the gradients in between, so after the loop
# $$\texttt{.grad} = \sum_{t} \nabla_\theta \tfrac1K L(x+\delta_t) = \nabla_\theta\, \tfrac1K \sum_t L(x+\delta_t),$$
# the gradient of the mean loss over K perturbed copies of the batch: a batch K times larger, whose
# extra examples are the points the ascent visited. PGD keeps only the last of them.
#
# ### Your turn: write the accumulation
# Complete the lines marked `←`: the same dropout masks at every step (restore the RNG state), the loss at
# $x+\delta_t$, a backward of its K-th share, and δ's ascent step (vlat's `ascend`: $\delta + \eta\,
# g/\lVert g\rVert$ per example, masked, projected when ε > 0).
#
# **Predict before you run:** will your accumulated gradient equal FreeLB's exactly, or only up to
# rounding? (Think of the order of the additions.)

# %%
def my_freelb(model, batch, freelb):
    deltas = freelb.new_deltas(model, batch, "uniform", freelb.init_mag)     # δ₀, drawn as FreeLB draws it
    masks = torch.get_rng_state()                                            # the dropout masks' random state
    model.zero_grad()
    for t in range(freelb.steps):
        torch.set_rng_state(masks)                                           # ← the same masks at every step
        with perturbed(model, deltas, batch):
            loss = model(batch, "itm").loss                                  # ← the loss at x + δ_t
        (loss / freelb.steps).backward()                                     # ← θ's gradient: a 1/K share
        if t < freelb.steps - 1:
            deltas = freelb.ascend(model, batch, deltas, {k: d.grad for k, d in deltas.items()})   # ← δ's step
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


model.zero_grad()
rng = torch.get_rng_state()
freelb.trace = False
freelb.accumulate(StepContext.standalone(model, "itm", TrainConfig(seed=SEED)), batch)
accumulated = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
torch.set_rng_state(rng)                                                     # FreeLB's draws, once more
check("your accumulated gradient", my_freelb(model, batch, freelb), accumulated, atol=1e-6,
      hint="divide each step's loss by K; restore the RNG state before every forward")

# %% [markdown]
# Answer: equal up to rounding at most. Both add the same K terms in the same order, so here they agree
# exactly; a different order (the mean of separately computed gradients) differs in the last bits.

# %% [markdown]
# ## 3 · Why the dropout masks must stay fixed
# If each step drew new dropout masks, δ would chase a different network every step. FreeLB reuses
# them (here: the RNG state is restored before each step). Fresh masks change the loss surface under δ:

# %%
with torch.no_grad():
    torch.manual_seed(1)
    a = model(batch, "itm").loss.item()
    torch.manual_seed(1)
    b = model(batch, "itm").loss.item()
    c = model(batch, "itm").loss.item()
print(f"same masks: {a:.4f} vs {b:.4f}   new masks: {c:.4f}")

# %% [markdown]
# ## 4 · Fine-tuning with FreeLB vs PGD at the same K
# FreeLB-3 costs 3 passes, PGD-3 costs 4; both start from the shipped model (0.87 clean) and train at
# ε = 0.3 on the words (at ε = 1, PGD-10 leaves every arm near 0 after so short a fine-tuning). Compare
# what each buys.

# %%
CKPT = checkpoint("single_stream_tiny_itm")
norm = site_norms(load_model(CKPT).to(DEVICE), batch, "itm")["text"]
print(f"ε = 0.3 on the words is {100 * 0.3 / norm:.0f} % of a caption's embedding norm ({norm:.2f})")
data = WorldDataset("itm", "train", TRAIN_SCENES, SEED)
test = WorldDataset("itm", "test", EVAL_SCENES, SEED)
attack = {"PGD-10 (text, eps 0.3)": PGD(sites=("text",), eps=0.3, step_size=0.075, steps=10)}
rows = compare_training({"clean": None,
                         "PGD-3": PGD(sites=("text",), eps=0.3, step_size=0.12, steps=3),
                         "FreeLB-3": FreeLB(sites=("text",), steps=3, step_size=0.12, init_mag=0.06, eps=0.3)},
                        lambda: load_model(CKPT).to(DEVICE), "itm", data, test, attack,
                        TrainConfig(epochs=EPOCHS, lr=3e-4, seed=SEED, progress=False))
print(markdown_table(rows))
ood_bars({k: {c: v for c, v in r.items() if c != "train s"} for k, r in rows.items()}, "clean vs PGD-10 accuracy")

# %% [markdown]
# ## Exercises
# Work each one out, type your answer in place of the value given (the solutions ship filled in;
# `python -m vlat.exercises notebooks/04_freelb.ipynb mine.ipynb` blanks them), and run the cell.
#
# **1.** K = 3 steps whose parameter gradients (of the unscaled loss) are (1, 2), (3, 0) and (2, 4). What
# does FreeLB leave in `.grad`?

# %%
answer = [2.0, 2.0]                                          # ← the mean of the three
theta = torch.zeros(2, requires_grad=True)
for g_t in ([1.0, 2.0], [3.0, 0.0], [2.0, 4.0]):
    ((torch.tensor(g_t) * theta).sum() / 3).backward()      # a loss whose gradient is g_t, a 1/K share
grade("1. the accumulated gradient", answer, theta.grad)

# %% [markdown]
# **2.** FreeLB's δ₀ is uniform in $[-1, 1]$ per entry, times init_mag / √(len · D) on a caption's len
# tokens of width D. Its expected squared L2 norm is init_mag² · E[U²]. With init_mag = 0.2, what is the
# root-mean-square ‖δ₀‖₂? (E[U²] for U uniform on [-1, 1] is 1/3.)

# %%
answer = 0.2 / 3**0.5                                       # ← init_mag / √3
big = collate([WorldDataset("itm", "train", 256, SEED)[k] for k in range(256)])
d0 = FreeLB(sites=("text",), init_mag=0.2).new_deltas(model, big, "uniform", 0.2)["text"]
grade("2. the size of δ₀", answer, per_example_norm(d0).pow(2).mean().sqrt(), tol=0.005)

# %% [markdown]
# **3.** Passes per batch of FreeLB-3 and of PGD-3 (a forward and a backward count as one pass)?

# %%
answer = [3, 4]                                             # ← [K, K + 1]
grade("3. passes", answer, [registry.get("freelb").passes(FreeLB(steps=3), 0.0),
                            registry.get("pgd").passes(PGD(steps=3), 0.0)])

# %% [markdown]
# ## Recap and where to go next
# FreeLB keeps the parameter gradient of every ascent step, each a 1/K share: after K steps `.grad` is the
# gradient of the mean loss over the K points the ascent visited, a virtual batch K times larger, for K
# passes (PGD-K needs K + 1 and trains on its last point only). The dropout masks stay fixed so that δ
# climbs one network. Next: notebook 05 (SMART) keeps the whole output distribution steady, not only
# the label; notebook 07 (VILLA) is FreeLB on both modalities with a KL term.
