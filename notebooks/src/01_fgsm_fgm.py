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
# # 01 · FGSM and FGM: one gradient step is enough to fool a model
#
# **FGSM** (Goodfellow et al., 2015) moves every input entry by ε in the direction that raises the loss:
# $\delta = \varepsilon\,\mathrm{sign}(\nabla_x L)$. **FGM** (Miyato et al., 2017) takes the L2 version,
# $\delta = \varepsilon\, g/\lVert g\rVert_2$, and applies it where text models can be perturbed: on the
# word embeddings. Training on $x+\delta$ as well as $x$ is the simplest adversarial defence.
#
# **Headline:** one gradient step on the words takes the (fine-tuned) shipped model from 0.86 accuracy to 0.33;
# fine-tuning on FGM examples wins part of it back (0.46). Numbers of fast mode on a 2-core CPU; section 5
# prints those of your run.
#
# The rhythm of this notebook: clean prediction → the attack → what δ looks like → the defence →
# clean vs adversarial side by side.

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
TRAIN_SCENES = 1024 if FAST else 4000  # scenes for the defence experiment (fine-tuning the shipped model)
EPOCHS = 2 if FAST else 3              # its epochs (same for both runs)
EVAL_SCENES = 128 if FAST else 500     # test scenes
SEED = 0

# %%
import torch

from vlat.adversarial import FGM, FGSM, normalize_grad, site_norms
from vlat.evaluate import compare_training, markdown_table
from vlat.exercises import check, grade
from vlat.explain import adversarial_triptych, image_heatmap, ood_bars, patch_grid, token_bars, token_magnitudes
from vlat.explain.perturbation import nearest_tokens
from vlat.models import load_model, perturbed
from vlat.resources import checkpoint
from vlat.train import TrainConfig
from vlat.world import Collator, WorldDataset, load_tokenizer

torch.manual_seed(SEED)
CKPT = checkpoint("single_stream_tiny_itm")
model = load_model(CKPT).to(DEVICE)
tok = load_tokenizer()
collate = Collator(tok, "itm")

# %% [markdown]
# ## 1 · A clean prediction
# The shipped single-stream model answers "does this caption match this image?" (ITM).

# %%
test = WorldDataset("itm", "test", 64, SEED)
with torch.no_grad():  # the matching pair the model is surest of: the attack has to undo a confident answer
    p_all = model(collate([test[k] for k in range(64)]), "itm").logits.softmax(-1)[:, 1]
positives = [k for k in range(64) if test[k]["label"] == 1]
i = max(positives, key=lambda k: p_all[k].item())
batch = collate([test[i]])
with torch.no_grad():
    clean = model(batch, "itm")
p_clean = clean.logits.softmax(-1)[0, 1].item()
print(f"caption: {test[i]['text']!r}   P(match) = {p_clean:.3f}   loss = {clean.loss.item():.3f}")

# %% [markdown]
# ## 2 · FGSM on pixels
# One gradient, its sign, times ε = 8/255: a change of at most 8 grey levels per pixel.

# %%
fgsm = FGSM(sites=("pixels",), eps=8 / 255)
delta = fgsm.attack(model, batch, "itm")
with torch.no_grad(), perturbed(model, delta, batch):
    adv = model(batch, "itm")
print(f"P(match): clean {p_clean:.3f} -> FGSM {adv.logits.softmax(-1)[0, 1].item():.3f}; "
      f"max |δ| = {delta['pixels'].abs().max().item() * 255:.1f}/255")
adversarial_triptych(batch["pixel_values"][0], delta["pixels"][0])

# %% [markdown]
# ### Why the sign: the steepest step in L∞
# To first order, $L(x+\delta) \approx L(x) + g^\top \delta$ with $g = \nabla_x L$. Among all $\delta$ with
# $\lVert\delta\rVert_\infty \le \varepsilon$, the gain $g^\top\delta = \sum_i g_i \delta_i$ is largest when each
# $\delta_i$ is as large as allowed and has the sign of $g_i$: $\delta = \varepsilon\,\mathrm{sign}(g)$. The
# gain is then $\varepsilon \lVert g\rVert_1$ (Hölder's inequality, $g^\top\delta \le \lVert g\rVert_1
# \lVert\delta\rVert_\infty$, holds with equality). In L2 the same argument (Cauchy-Schwarz) gives FGM's
# $\varepsilon\, g/\lVert g\rVert_2$, with gain $\varepsilon\lVert g\rVert_2$.
#
# ### Your turn: write FGSM
# Complete the four lines marked `←` (this copy ships them filled in; `python -m vlat.exercises
# notebooks/01_fgsm_fgm.ipynb mine.ipynb` writes a copy with them blanked). The pixel site adds δ to the
# image, and the result must stay a valid image in [0, 1].

# %%
def my_fgsm(model, batch, eps):
    x = batch["pixel_values"]
    delta = torch.zeros_like(x, requires_grad=True)
    with perturbed(model, {"pixels": delta}, batch):
        loss = model(batch, "itm").loss                     # ← the loss at x + δ (here δ = 0: the clean loss)
    (g,) = torch.autograd.grad(loss, delta)                 # ← its gradient with respect to δ
    delta = eps * g.sign()                                  # ← the steepest L∞ step
    return ((x + delta).clamp(0, 1) - x).detach()           # ← what is left of it inside [0, 1]


check("your FGSM δ", my_fgsm(model, batch, 8 / 255), fgsm.attack(model, batch, "itm")["pixels"],
      hint="the sign of the gradient times ε, then clip x + δ to [0, 1]")

# %% [markdown]
# ## 3 · FGM on the words and on the image regions
# Text models cannot change a pixel: FGM perturbs the *embedding* of each word, under an L2 ball for
# the whole caption. Which words did the gradient pick?

# %%
fgm = FGM(sites=("text", "image"), eps=1.0)
delta = fgm.attack(model, batch, "itm")
with torch.no_grad(), perturbed(model, delta, batch):
    adv = model(batch, "itm")
print(f"P(match): clean {p_clean:.3f} -> FGM {adv.logits.softmax(-1)[0, 1].item():.3f}")
sites = model.perturbation_sites()
n = int(batch["attention_mask"][0].sum())
words = tok.convert_ids_to_tokens(batch["input_ids"][0, :n].tolist())
token_bars(words, token_magnitudes(delta["text"], sites["text"])[0, :n])

# %%
grid = patch_grid(delta["image"], sites["image"], model.config.image_size, model.config.patch_size)
image_heatmap(batch["pixel_values"][0], grid[0], "‖δ‖ per region")

# %% [markdown]
# ### What ε = 1 means
# ε is a length in the space of each site's input, so it only means something against that input's own
# size. The caption's word embeddings, all together, have an L2 norm of about 1.3 here. So ε = 1 lets FGM
# change them by three quarters of what they measure: a large attack. The image regions' features are
# far larger, so the same ε is a small nudge there:

# %%
norms = site_norms(model, batch, "itm")
for name in ("text", "image"):
    print(f"{name:5s}: ‖x‖₂ = {norms[name]:8.3f}   ε = 1 is {100 / norms[name]:6.1f} % of it")

# %% [markdown]
# Still, δ does not turn a word into another word. Each perturbed embedding $e_w + \delta_w$ is closest to
# this vocabulary entry (a change would be marked):

# %%
after = nearest_tokens(sites["text"], batch["input_ids"], delta["text"], tok)[0][:n]
print("  ".join(w if w == a else f"{w}→{a}" for w, a in zip(words, after)))

# %% [markdown]
# ## 4 · How large must ε be?
# **Predict before you run:** P(match) is about 1 at ε = 0. Will it fall in proportion to ε (half the
# effect at half the ε), or stay high and then collapse? Think of the softmax of a logit that falls
# linearly in ε, then run the cell.
#
# Drag ε and watch P(match) fall (in CI the slider is only drawn).

# %%
import ipywidgets as widgets


def p_match(eps: float) -> float:
    d = FGM(sites=("text",), eps=eps).attack(model, batch, "itm")
    with torch.no_grad(), perturbed(model, d, batch):
        return model(batch, "itm").logits.softmax(-1)[0, 1].item()


for eps in (0.0, 0.25, 0.5, 1.0, 2.0):
    print(f"eps {eps:4.2f}: P(match) = {p_match(eps):.3f}")
widgets.interact(lambda eps: print(f"P(match) = {p_match(eps):.3f}"),
                 eps=widgets.FloatSlider(value=0.5, min=0.0, max=3.0, step=0.1, description="ε"));

# %% [markdown]
# Answer: it stays high, then collapses (here 0.96 at ε = 0.25, 0.79 at 0.5, 0.02 at 1). The attack
# lowers the match logit roughly in proportion to ε, and the softmax turns a straight line into a cliff.

# %% [markdown]
# ## 5 · The defence: fine-tune on clean + FGM examples
# Both arms start from the shipped model (0.87 clean) and fine-tune on the same data for the same epochs;
# only the step function differs. FGM costs two passes per batch.

# %%
data = WorldDataset("itm", "train", TRAIN_SCENES, SEED)
test = WorldDataset("itm", "test", EVAL_SCENES, SEED)
rows = compare_training({"clean fine-tuning": None, "FGM fine-tuning": FGM(sites=("text", "image"), eps=1.0)},
                        lambda: load_model(CKPT).to(DEVICE), "itm", data, test,
                        {"FGM (text, eps 1)": FGM(sites=("text",), eps=1.0)},
                        TrainConfig(epochs=EPOCHS, lr=3e-4, seed=SEED, progress=False))
print(markdown_table(rows))
ood_bars({k: {c: v for c, v in r.items() if c != "train s"} for k, r in rows.items()}, "clean vs adversarial accuracy")

# %%
for name, r in rows.items():
    print(f"{name}: loses {r['clean acc'] - r['acc under FGM (text, eps 1)']:.3f} accuracy to the attack")

# %% [markdown]
# Read the two gaps: adversarial fine-tuning shrinks the loss to the attack it trained against, for a
# little clean accuracy. On a 2-core CPU (torch 2.13) this cell gave, in fast mode (1,024 scenes, 2 epochs,
# 128 test scenes), accuracy under FGM 0.33 → 0.46 at clean 0.86 → 0.81. Whether a defence holds against a
# stronger, multi-step attacker is the question of the next notebook (PGD).
#
# ## Exercises
# Work each one out on paper, type your answer in place of the value given (the solutions ship filled in;
# the blanked copy has `...`), and run the cell: `grade` compares it with what vlat computes.
#
# **1.** A gradient $g = (0.5, 0, -2)$ and ε = 0.1. What is FGSM's δ?

# %%
g = torch.tensor([[0.5, 0.0, -2.0]])
answer = [0.1, 0.0, -0.1]                                   # ← your δ
grade("1. FGSM's δ", answer, 0.1 * normalize_grad(g, "linf")[0], hint="sign(0) = 0")

# %% [markdown]
# **2.** The same $g$ and ε, now in L2: how much does FGM's δ raise the loss, to first order ($g^\top\delta$)?

# %%
answer = 0.1 * (0.5**2 + 2.0**2) ** 0.5                     # ← ε ‖g‖₂
grade("2. FGM's first-order gain", answer, (g * 0.1 * normalize_grad(g, "l2")).sum())

# %% [markdown]
# **3.** And FGSM's first-order gain for the same $g$ and ε? Which of the two is larger, and why may the
# comparison mislead (look at the two balls' sizes)?

# %%
answer = 0.1 * (0.5 + 0.0 + 2.0)                            # ← ε ‖g‖₁
grade("3. FGSM's first-order gain", answer, (g * 0.1 * normalize_grad(g, "linf")).sum(),
      hint="Hölder: the L∞ ball's best gain is ε times the L1 norm of g")

# %% [markdown]
# **4.** From the word embeddings themselves (`sites["text"].module` is the embedding table), compute the
# caption's embedding norm, over its real tokens only, and the fraction of it that ε = 1 is.

# %%
emb = sites["text"].module(batch["input_ids"])[0, :n]       # the caption's word embeddings, padding dropped
answer = 1.0 / emb.norm().item()                            # ← ε / ‖x‖₂
grade("4. ε = 1 as a fraction of the caption", answer, 1.0 / norms["text"])

# %% [markdown]
# ## Recap and where to go next
# FGSM and FGM take one step along the gradient, the longest one the ball allows: the sign of g in L∞
# (Hölder), g/‖g‖₂ in L2 (Cauchy-Schwarz). One step on the word embeddings flips a confident
# prediction. ε is measured against the input's own norm, and a text δ moves embeddings off the
# vocabulary without turning one word into another. Training on FGM examples buys part of the accuracy
# back. Next: notebook 02 takes many small projected steps (PGD), the attack that adversarial training
# is usually judged against.
