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
# FGM, PGD and FreeLB ask that the *label* survive the perturbation. **SMART** (Jiang et al., ACL 2020)
# asks that the *prediction* barely move, with no label at all:
#
# $$\min_\theta\; L_\text{task}(f(x), y) + \lambda_s \max_{\lVert\delta\rVert\le\varepsilon}
#   \big[\mathrm{KL}(p(x+\delta)\,\Vert\,p(x)) + \mathrm{KL}(p(x)\,\Vert\,p(x+\delta))\big]$$
#
# The inner max starts from tiny noise $\delta_0\sim\mathcal N(0,\sigma^2)$, $\sigma = 10^{-5}$, and takes
# K (usually one) ascent steps. In the authors' code (mt-dnn's `SmartPerturbation`) a step does not
# project onto a ball: it *normalises*, $\delta \leftarrow (\delta + \eta g) / \max_d|\delta + \eta g|$ for every
# token, so each word's δ ends with a largest entry of (just under) 1. vlat's `SMART()` does exactly that;
# `eps` rescales that size. Optionally, a Bregman proximal term keeps each update near an EMA teacher.
#
# **Headline:** regularising the prediction inside the ball, without a label at the adversarial point,
# buys robustness: fine-tuned with TRADES or LLR, the shipped model keeps 0.45-0.52 accuracy under PGD-10
# on the words (clean fine-tuning: 0.36) at almost no clean cost. SMART, with the authors' own step, does
# not: it costs a little clean accuracy (0.86 → 0.82) and buys no robustness, which fits its purpose
# (smoother fine-tuning for *clean* accuracy on GLUE, not robustness). Numbers of fast mode on a 2-core
# CPU; sections 4 and 6 print those of your run.

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
TRAIN_SCENES = 768 if FAST else 4000   # scenes for sections 4 and 6 (fine-tuning the shipped model)
EPOCHS = 2 if FAST else 3
EVAL_SCENES = 128 if FAST else 500
SEED = 0

# %%
import torch

import torch.nn.functional as F

from vlat.adversarial import LLR, PGD, SMART, TRADES, Frozen
from vlat.adversarial.trades import trades_loss
from vlat.evaluate import compare_training, markdown_table
from vlat.exercises import check, grade
from vlat.explain import ood_bars
from vlat.models import load_model, perturbed
from vlat.objectives import kl_logits, symmetric_kl
from vlat.resources import checkpoint
from vlat.train import TrainConfig
from vlat.world import Collator, WorldDataset, load_tokenizer

torch.manual_seed(SEED)
tok = load_tokenizer()
collate = Collator(tok, "itm")
CKPT = checkpoint("single_stream_tiny_itm")
model = load_model(CKPT).to(DEVICE)
batch = collate([WorldDataset("itm", "test", 32, SEED)[k] for k in range(32)])

# %% [markdown]
# ## 1 · KL is not symmetric; SMART uses both directions

# %%
p, q = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
print(f"KL(p‖q) = {kl_logits(p, q):.4f}   KL(q‖p) = {kl_logits(q, p):.4f}   symmetric = {symmetric_kl(p, q):.4f}")
print(f"symmetric KL of a distribution with itself: {symmetric_kl(p, p):.1e}")

# %% [markdown]
# Why both directions. $\mathrm{KL}(p\Vert q) = \sum_c p_c \log(p_c/q_c)$ is large where $q$ puts little mass
# on what $p$ believes, and $\mathrm{KL}(q\Vert p)$ the other way round; their sum is symmetric and zero
# only when the two agree. For a small change, $q = p + \Delta$, both directions agree to second order:
# $\mathrm{KL}(p\Vert p+\Delta) \approx \mathrm{KL}(p+\Delta\Vert p) \approx \tfrac12 \sum_c \Delta_c^2 / p_c$ (the
# Fisher information's quadratic form), so the symmetric KL $\approx \sum_c \Delta_c^2/p_c$. The regulariser
# is a local *smoothness* penalty: it grows with the square of how far the prediction moves.
#
# ### Your turn: write the symmetric KL
# Complete the lines marked `←`, from logits (work in log-probabilities: `log_softmax`), averaged over the
# batch. The check compares it with vlat's `symmetric_kl` on the clean and the SMART-perturbed prediction.

# %%
def my_symmetric_kl(p_logits, q_logits):
    p_log = p_logits.float().log_softmax(-1)                           # ← log p
    q_log = q_logits.float().log_softmax(-1)                           # ← log q
    kl_pq = (p_log.exp() * (p_log - q_log)).sum(-1)                    # ← KL(p‖q), one per example
    kl_qp = (q_log.exp() * (q_log - p_log)).sum(-1)                    # ← KL(q‖p), one per example
    return (kl_pq + kl_qp).mean()


smart = SMART(sites=("text",), eps=0.1)
smart_delta = smart.attack(model, batch, "itm")
with torch.no_grad():
    clean_logits = model(batch, "itm").logits
    with perturbed(model, smart_delta, batch):
        adv_logits = model(batch, "itm").logits
check("your symmetric KL", my_symmetric_kl(clean_logits, adv_logits), symmetric_kl(clean_logits, adv_logits),
      hint="KL(p‖q) sums p · (log p - log q) over the classes; average over the examples last")

# %% [markdown]
# ## 2 · The regulariser as δ grows
# **Predict before you run:** from ε = 1e-3 to 1e-2, δ grows ten times. By how much does the symmetric KL
# grow, if the prediction moves in proportion to δ?
#
# How far does the prediction move when every word's δ is normalised to a largest entry of ε? ε = 1 is
# the authors' step. Compare it with the size of the word embeddings themselves: the authors' δ was made
# for BERT's embedding output, whose entries are of order 1; this model's are far smaller.

# %%
from vlat.adversarial.base import site_norms

print(f"largest entry of a caption's word embeddings: {site_norms(model, batch, 'itm', ('text',), 'linf')['text']:.3f}")
with torch.no_grad():
    clean_logits = model(batch, "itm").logits
for eps in (1e-3, 1e-2, 1e-1, 1.0):
    smart = SMART(sites=("text",), eps=eps)
    reg = smart.regulariser(Frozen(model, "itm"), batch, clean_logits)   # Frozen: the model, fixed, on one task
    print(f"eps {eps:6.3f}: symmetric KL = {reg.item():.2e}")

# %% [markdown]
# Answer: about a hundred times, if the prediction moves in proportion to δ and the KL is quadratic in
# that move (see above). The printed values grew about 70 times from 1e-3 to 1e-2 and about 330 times
# from 1e-2 to 1e-1: the one ascent step finds a different direction at each ε, so the growth is
# quadratic only roughly, and at ε = 1 δ is no longer small.
#
# ## 3 · The NaN/Inf guard
# A non-finite gradient (from an overflow, say) must not poison training: the regulariser becomes 0 for
# that batch and the event is counted.

# %%
bad = clean_logits.clone()
bad[0, 0] = float("nan")
smart = SMART(sites=("text",))
print("regulariser:", smart.regulariser(Frozen(model, "itm"), batch, bad).item(), " skipped:", smart.skipped)

# %% [markdown]
# ## 4 · Fine-tuning with SMART (and with the Bregman proximal term)
# Every arm starts from the shipped model (0.86 clean); same data, seed and epochs. SMART runs the
# authors' step (`SMART()`: ε = 1, σ = 1e-5, η = 1e-3, K = 1, λ = 1). It costs about K + 2 passes
# (clean, ascent, regulariser), plus one teacher forward with the proximal term.

# %%
data = WorldDataset("itm", "train", TRAIN_SCENES, SEED)
test = WorldDataset("itm", "test", EVAL_SCENES, SEED)
attack = {"PGD-10 (text, eps 0.3)": PGD(sites=("text",), eps=0.3, step_size=0.075, steps=10)}
rows = compare_training({"clean": None,
                         "SMART λ=1": SMART(sites=("text",), weight=1.0),
                         "SMART + proximal μ=1": SMART(sites=("text",), mu=1.0)},
                        lambda: load_model(CKPT).to(DEVICE), "itm", data, test, attack,
                        TrainConfig(epochs=EPOCHS, lr=3e-4, seed=SEED, progress=False))
print(markdown_table(rows))
ood_bars({k: {c: v for c, v in r.items() if c != "train s"} for k, r in rows.items()}, "clean vs PGD-10 accuracy")

# %% [markdown]
# SMART's paper claims better *clean* accuracy from a smoother model, on GLUE with BERT. Here it costs a
# little clean accuracy instead and leaves accuracy under attack where clean fine-tuning has it. Its δ is
# about four times the largest entry of a word embedding, so "smooth" here means "barely listen to the
# words"; the proximal term (μ) keeps each update near the previous weights.

# %% [markdown]
# ## 5 · LLR: how far is the loss from its own tangent plane?
# SMART's seed article names a second regulariser, **local linearity** (Qin et al., NeurIPS 2019). If the
# loss inside the ball were exactly linear, its worst case would be $\varepsilon\lVert\nabla_x\ell\rVert$
# and a gradient attack would find it; a bumpy surface hides adversarial examples. LLR measures the gap
#
# $$g(\delta; x) = \big|\ell(x+\delta) - \ell(x) - \delta^\top\nabla_x\ell(x)\big|,\qquad
#   \gamma(\varepsilon, x) = \max_{\lVert\delta\rVert\le\varepsilon} g(\delta; x)$$
#
# and trains on $\ell(x) + \lambda\,\gamma(\varepsilon, x) + \mu\,\lvert\delta_\text{LLR}^\top\nabla_x\ell(x)\rvert$.
# For a smooth loss the gap grows like $\varepsilon^2$ (the second-order term): the last column should
# stay roughly flat while ε is small.

# %%
run = Frozen(model, "itm")
for frac in (0.01, 0.03, 0.1, 0.3):
    llr = LLR(sites=("text",), norm="l2", eps=frac, step_size=frac / 2, steps=3).calibrate(model, batch, "itm")
    gap = float(llr.objective(run, batch, llr.attack(model, batch, "itm"), llr.clean_reference(run, batch)).detach())
    print(f"eps {frac:4.2f} of the caption norm: worst gap γ = {gap:.2e}   γ / eps² = {gap / frac ** 2:.3f}")

# %% [markdown]
# ## 6 · TRADES: the clean loss plus how far the prediction moves
# TRADES (Zhang et al., ICML 2019) looks like SMART with one KL and a different justification: the robust
# error is the natural error plus the error *near the decision boundary*, so it trains on
#
# $$\mathrm{CE}(f(x), y) + \beta\,\max_{\lVert\delta\rVert\le\varepsilon}\mathrm{KL}\big(p(x)\,\Vert\,p(x+\delta)\big)$$
#
# Two details from the authors' code: the attack runs with the model in eval mode, and the clean side of
# the KL is **not** detached in the outer loss (SMART detaches the target side of each of its two KLs). β trades clean accuracy
# for robustness; the reference uses β = 6 on CIFAR-10.

# %%
clean_logits = model(batch, "itm").logits.detach()
trades = TRADES(sites=("text",), norm="l2", eps=0.1, step_size=0.05, steps=3).calibrate(model, batch, "itm")
deltas = trades.attack(model, batch, "itm")
with torch.no_grad(), perturbed(model, deltas, batch):
    adv_logits = model(batch, "itm").logits
print(f"KL(p‖p_adv) = {kl_logits(clean_logits, adv_logits):.4f}   KL(p_adv‖p) = {kl_logits(adv_logits, clean_logits):.4f}")

# %% [markdown]
# ### Your turn: write TRADES' outer loss
# Complete the lines marked `←`: the natural cross-entropy on $x$ plus β times $\mathrm{KL}(p(x)\Vert p(x+\delta))$,
# with the gradient flowing through **both** sides of the KL. The check compares the value and the gradient
# with respect to the clean logits with vlat's `trades_loss`; a detached clean side would show there.

# %%
def my_trades_loss(clean_logits, adv_logits, labels, beta):
    ce = F.cross_entropy(clean_logits, labels)                               # ← the natural loss on x
    p_log, q_log = clean_logits.log_softmax(-1), adv_logits.log_softmax(-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean()                      # ← KL(p(x) ‖ p(x + δ))
    return ce + beta * kl                                                    # ← TRADES' outer loss


labels = batch["labels"].to(DEVICE)
results = {}
for name, fn in (("mine", lambda c, a: my_trades_loss(c, a, labels, 6.0)),
                 ("vlat", lambda c, a: trades_loss(F.cross_entropy(c, labels), c, a, 6.0))):
    c = clean_logits.float().clone().requires_grad_(True)
    loss = fn(c, adv_logits.float())
    (grad,) = torch.autograd.grad(loss, c)
    results[name] = {"loss": loss.detach(), "∇ clean logits": grad}
check("your TRADES loss", results["mine"], results["vlat"], hint="keep the gradient through p(x) in the KL")

# %%
rows = {"clean": rows["clean"], **compare_training({
                         "TRADES β=1": TRADES(sites=("text",), norm="l2", eps=0.3, step_size=0.15, steps=3, beta=1.0),
                         "TRADES β=6": TRADES(sites=("text",), norm="l2", eps=0.3, step_size=0.15, steps=3, beta=6.0),
                         "LLR λ=4 μ=3": LLR(sites=("text",), norm="l2", eps=0.3, step_size=0.15, steps=3)},
                        lambda: load_model(CKPT).to(DEVICE), "itm", data, test, attack,
                        TrainConfig(epochs=EPOCHS, lr=3e-4, seed=SEED, progress=False))}   # the clean row of section 4
print(markdown_table(rows))

# %% [markdown]
# ## Exercises
# Work each one out, type your answer in place of the value given (the solutions ship filled in;
# `python -m vlat.exercises notebooks/05_smart.ipynb mine.ipynb` blanks them), and run the cell.
#
# **1.** $p = (0.5, 0.5)$ and $q = (0.9, 0.1)$. Compute $\mathrm{KL}(p\Vert q)$ and $\mathrm{KL}(q\Vert p)$ by hand.

# %%
import math

kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)       # ← KL(p‖q)
kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)       # ← KL(q‖p)
answer = [kl_pq, kl_qp]
P, Q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()   # log-probabilities are logits
grade("1. both KLs", answer, [kl_logits(P, Q), kl_logits(Q, P)])

# %% [markdown]
# **2.** Their sum, SMART's regulariser for this pair. Which direction is larger, and why (where does each
# distribution put mass the other lacks)?

# %%
answer = 0.5108 + 0.3681                                     # ← KL(p‖q) + KL(q‖p)
grade("2. the symmetric KL", answer, symmetric_kl(P, Q), tol=1e-3)

# %% [markdown]
# **3.** LLR's gap for $\ell(x) = x^2$ at $x = 1$ and $\delta = 0.1$: $\lvert \ell(x+\delta) - \ell(x) -
# \delta\,\ell'(x)\rvert$. (It is the second-order term: why does that make it grow like δ²?)

# %%
answer = 0.1**2                                              # ← δ² (ℓ'' = 2, times δ²/2)
x = torch.tensor(1.0, requires_grad=True)
(slope,) = torch.autograd.grad(x**2, x)
grade("3. LLR's gap", answer, abs((x.detach() + 0.1) ** 2 - x.detach() ** 2 - 0.1 * slope))

# %% [markdown]
# **Recap.** SMART, TRADES and LLR all regularise what happens *inside* the ball instead of training on
# one adversarial point: SMART and TRADES keep the prediction steady (two-sided vs one-sided KL), LLR keeps
# the loss close to linear so that the gradient tells the truth about the worst case. All three are
# `vlat train --method smart|trades|llr`, and the explorer shows their inner maximisation on one pair.
The symmetric KL is, to second order, a quadratic form in the change of the prediction, so it measures
smoothness; LLR's gap is the loss's second-order term. Next: notebook 06 (ALBEF) builds the vision-language
model whose training VILLA (notebook 07) makes adversarial.

