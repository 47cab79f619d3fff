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
# # 06 · ALBEF: align the two encoders, then fuse them
#
# **ALBEF** (Li et al., NeurIPS 2021) first makes an image encoder and a text encoder agree
# (**ITC**, a contrastive loss). Only then does it fuse them with cross-attention, for image-text
# matching (**ITM**) and masked words (**MLM**). A **momentum** copy of the model supplies two things:
# a queue of extra negatives, and soft targets that forgive noisy web captions.
#
# $$L = L_{itc} + L_{itm} + L_{mlm},\qquad
#   q = \alpha\,\mathrm{softmax}(\tilde s/\tau) + (1-\alpha)\,y,\qquad
#   \tilde\theta \leftarrow 0.995\,\tilde\theta + 0.005\,\theta$$
#
# This notebook takes one piece at a time: ITC, the queue, ITM with hard negatives, MLM, then
# momentum distillation. Then it pre-trains a tiny ALBEF and retrieves captions with it.
#
# **Headline:** aligned first, the two encoders retrieve: among 64 test scenes the shipped ALBEF ranks a true
# caption first for a quarter of the images and within the top 10 for all of them (TR@1 0.25, TR@10 1.00);
# and its momentum model gives a paired caption 0.108 of its probability when the caption is right and 0.013
# when it is noise, so the distilled targets lean less on a wrong caption than the one-hot label does.
# Numbers of fast mode on a 2-core CPU; sections 7 and 8 print those of your run.

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
TRAIN_SCENES = 256 if FAST else 4096
EPOCHS = 1 if FAST else 8
BATCH = 64                     # divides the queue (1,024)
NOISE = 0.2                    # share of training captions replaced by noise
EVAL_SCENES = 64 if FAST else 500
SEED = 0

# %%
import torch

from vlat.evaluate import retrieval
from vlat.exercises import check, grade
from vlat.explain import image_heatmap, loss_curve, scene_grid, similarity_heatmap, target_bars
from vlat.models import build_model, load_model
from vlat.objectives import distilled_targets, hard_negatives, itc_loss
from vlat.resources import checkpoint
from vlat.train import TrainConfig, train
from vlat.world import Collator, WorldDataset, load_tokenizer

torch.manual_seed(SEED)
tok = load_tokenizer()
collate = Collator(tok, "pretrain")
data = WorldDataset("pretrain", "train", TRAIN_SCENES, SEED, noise_rate=NOISE)
batch = collate([data[k] for k in range(8)])
model = build_model("albef", "tiny", alpha_warmup_steps=max(1, TRAIN_SCENES // BATCH)).to(DEVICE)
captions = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
scene_grid(batch["pixel_values"], captions)

# %% [markdown]
# ## 1 · ITC: two encoders, one space
# Each image's [CLS] state and each caption's [CLS] state are projected and L2-normalised. Their
# dot products divided by a temperature τ are the logits of an "which caption is mine" softmax. The
# right answers sit on the diagonal. Untrained, the matrix is noise; after pre-training (section 6)
# the diagonal lights up.

# %%
model.eval()
with torch.no_grad():
    img, _ = model.image_features(batch["pixel_values"])
    txt, _ = model.text_features(batch["input_ids"], batch["attention_mask"])
similarity_heatmap(img @ txt.t(), [f"image {i}" for i in range(8)], captions, "cosine similarity, untrained")

# %% [markdown]
# ## 2 · The queue: more negatives than the batch holds
# The momentum encoders' features of the last steps wait in a queue (1,024 here, 65,536 in the
# paper). Every image is contrasted with the batch's captions *and* the queue's. With α = 0 the
# target is one-hot on the positive, so the loss is InfoNCE over B + Q candidates.

# %%
with torch.no_grad():
    img_m, _ = model.image_features(batch["pixel_values"], momentum=True)
    txt_m, _ = model.text_features(batch["input_ids"], batch["attention_mask"], momentum=True)
    image_all = torch.cat([img_m, model.image_queue])
    text_all = torch.cat([txt_m, model.text_queue])
    loss, sim_i2t, sim_t2i = itc_loss(img, txt, image_all, text_all, model.temp, alpha=0.0)
print(f"queue {tuple(model.image_queue.shape)}; logits per image: {sim_i2t.shape[1]} = {len(img)} batch + "
      f"{len(model.image_queue)} queue; ITC loss {loss.item():.3f} (ln {sim_i2t.shape[1]} = "
      f"{torch.log(torch.tensor(float(sim_i2t.shape[1]))).item():.3f} would be a uniform guess)")

# %% [markdown]
# ## 3 · ITM with hard negatives
# The fusion encoder judges "does this caption match this image?". Easy negatives teach little. So
# for each image, ALBEF draws a caption from the batch with probability ∝ softmax of the ITC
# similarity, the positive excluded. Each caption gets an image the same way. The batch becomes
# B positives + 2B negatives.

# %%
neg_text = hard_negatives(sim_i2t[:, :8], torch.Generator(sim_i2t.device).manual_seed(SEED))
for i, j in enumerate(neg_text.tolist()):
    print(f"image {i}: positive «{captions[i]}»   hard negative «{captions[j]}»")
assert (neg_text.cpu() != torch.arange(8)).all()

# %% [markdown]
# ## 4 · MLM: fill in words, looking at the image
# 15 % of the tokens are chosen (never [CLS] or padding); 80 % of those become [MASK], 10 % a random
# word, 10 % stay. Masking happens once, when the batch is collated, so every forward of an
# adversarial method sees the same masked text. "a small [MASK] circle" can only be filled in from
# the image.

# %%
for k in range(3):
    n = int(batch["attention_mask"][k].sum())
    masked = tok.convert_ids_to_tokens(batch["mlm_input_ids"][k, :n].tolist())
    targets = [tok.convert_ids_to_tokens(int(t)) if t != -100 else "·" for t in batch["mlm_labels"][k, :n]]
    print(" ".join(masked), "   targets:", " ".join(targets))

# %% [markdown]
# ## 5 · Momentum distillation: soft targets
# A web caption may be wrong, and another caption in the batch may fit an image as well as its own
# (our toy world is full of "there is a red circle"). The momentum model's own similarities give
# soft targets, mixed with the one-hot label by α (0.4, ramped up over the first epoch). Slide α to
# see the target for image 0 change:

# %%
onehot = torch.zeros_like(sim_i2t)
onehot[:, :8] = torch.eye(8, device=onehot.device)
with torch.no_grad():
    teacher = img_m @ text_all.t() / model.temp
labels = [c[:18] for c in captions]
target_bars({"one-hot": onehot[0, :8], "α = 0.4": distilled_targets(onehot, teacher, 0.4)[0, :8]}, labels,
            "ITC targets of image 0 over the batch's captions")

# %%
import ipywidgets as widgets


def show_alpha(alpha):
    q = distilled_targets(onehot, teacher, alpha)[0, :8]
    target_bars({"one-hot": onehot[0, :8], f"α = {alpha:.2f}": q}, labels, "ITC targets of image 0").show()


widgets.interact(show_alpha, alpha=widgets.FloatSlider(value=0.4, min=0.0, max=1.0, step=0.05))

# %% [markdown]
# ### The loss with soft targets, derived
# Row $i$ of the image-to-text logits is $s_{ij} = \langle v_i, t_j\rangle/\tau$ over the batch's and the
# queue's captions. With a target distribution $q_i$ the loss is the cross-entropy $-\sum_j q_{ij}\log
# \mathrm{softmax}(s_i)_j$. Its gradient with respect to the logits is $\mathrm{softmax}(s_i) - q_i$, so the
# model is pulled towards exactly the target: with the one-hot $y$ (α = 0) all of the mass onto the paired
# caption, with $q = \alpha\,\mathrm{softmax}(\tilde s_i) + (1-\alpha)\,y$ some of it onto the captions the
# momentum model $\tilde s$ also finds plausible. ITC averages the image-to-text and the text-to-image losses.
#
# ### Your turn: write ITC with momentum distillation
# Complete the lines marked `←`, from the features of sections 1 and 2; the check compares with vlat's
# `itc_loss` at α = 0.4.
#
# **Predict before you run:** is the loss with α = 0.4 larger or smaller than with α = 0 on this untrained
# model? (What does an untrained teacher's softmax look like?)

# %%
def my_itc(img, txt, image_all, text_all, img_m, txt_m, temp, alpha):
    B = len(img)
    sim_i2t = img @ text_all.t() / temp                                            # ← image-to-text logits
    sim_t2i = txt @ image_all.t() / temp                                           # ← text-to-image logits
    y = torch.zeros_like(sim_i2t)
    y[:, :B] = torch.eye(B, device=y.device)                                       # the paired caption / image
    q_i2t = alpha * (img_m @ text_all.t() / temp).softmax(1) + (1 - alpha) * y     # ← soft targets, image side
    q_t2i = alpha * (txt_m @ image_all.t() / temp).softmax(1) + (1 - alpha) * y    # ← soft targets, text side
    ce = lambda logits, q: -(q * logits.log_softmax(1)).sum(1).mean()              # ← soft cross-entropy
    return (ce(sim_i2t, q_i2t) + ce(sim_t2i, q_t2i)) / 2


with torch.no_grad():
    mine = {a: my_itc(img, txt, image_all, text_all, img_m, txt_m, model.temp, a) for a in (0.0, 0.4)}
    theirs = {a: itc_loss(img, txt, image_all, text_all, model.temp, alpha=a, image_m=img_m, text_m=txt_m)[0]
              for a in (0.0, 0.4)}
check("your ITC loss", {f"α={a}": v for a, v in mine.items()}, {f"α={a}": v for a, v in theirs.items()},
      hint="q mixes the teacher's softmax with the one-hot; the loss averages both directions")

# %% [markdown]
# Answer: smaller here. Before any training the momentum copy *is* the model, so 40 % of the target is
# the model's own softmax, and the cross-entropy of a softmax with itself is its entropy, the least a
# cross-entropy can be. Only the one-hot part, 60 % of the target, is charged at the one-hot loss (which is
# above ln(B + Q): the untrained model is confidently wrong, not uniform). The printed pair shows by how much.

# %%
print(f"ITC loss at α = 0: {theirs[0.0]:.4f}   at α = 0.4: {theirs[0.4]:.4f}")

# %% [markdown]
# ## 6 · Pre-train it
# One call of the shared training loop. The loop calls `model.after_optimizer_step()` once per update,
# and that moves the momentum copy and the queue. So an adversarial method that runs several forwards
# per step (FreeLB, VILLA) does not advance them several times. `drop_last` keeps every batch the
# size the queue expects.

# %%
model = build_model("albef", "tiny", alpha_warmup_steps=max(1, TRAIN_SCENES // BATCH)).to(DEVICE)
state = train(model, "pretrain", data, TrainConfig(epochs=EPOCHS, batch_size=BATCH, seed=SEED, drop_last=True,
                                                   progress=not FAST), collate_fn=collate)
print(f"{state.step} steps in {state.seconds:.0f} s; α now {model.current_alpha():.2f}")
loss_curve(state.losses, "ITC + ITM + MLM")

# %% [markdown]
# In fast mode those few steps teach the model nothing yet, so the rest of the notebook uses the shipped
# ALBEF, pre-trained with the same three losses and the same caption noise for 20 epochs of 8,000 scenes,
# with 16 × 16 patches (its exact command is in `data_samples/checkpoints/RESULTS.md`). With the full
# settings it uses the model you just trained.

# %%
if FAST:
    model = load_model(checkpoint("albef_tiny_pretrain")).to(DEVICE)
model.eval()

# %% [markdown]
# ## 7 · Momentum distillation on noisy captions
# A fifth of the training captions belong to another scene or are keyword soup. The one-hot ITC target
# insists that each image's paired caption is right, noisy or not; the distilled target
# $q = \alpha\,\mathrm{softmax}(\tilde s/\tau) + (1-\alpha)\,y$ gives the paired caption only what the
# momentum model believes of it (the shipped file keeps no momentum copy: loaded, the copy starts equal to
# the model). How much weight does each kind of pair get?

# %%
own, teacher, noisy = [], [], []
with torch.no_grad():
    for start in range(0, len(data) - BATCH + 1, BATCH):
        b = collate([data[k] for k in range(start, start + BATCH)])
        im, _ = model.image_features(b["pixel_values"], momentum=True)
        tx, _ = model.text_features(b["input_ids"], b["attention_mask"], momentum=True)
        logits = im @ tx.t() / model.temp
        own.append(distilled_targets(torch.eye(BATCH, device=logits.device), logits, 0.4).diag().cpu())
        teacher.append(logits.softmax(1).diag().cpu())
        noisy.append(torch.from_numpy(data.noisy[start:start + BATCH]))
own, teacher, noisy = torch.cat(own), torch.cat(teacher), torch.cat(noisy)
print(f"the momentum model's own probability for the paired caption: clean pairs {teacher[~noisy].mean():.3f}, "
      f"noisy pairs {teacher[noisy].mean():.3f}")
print(f"ITC target on the paired caption (α = 0.4): clean pairs {own[~noisy].mean():.3f}, "
      f"noisy pairs {own[noisy].mean():.3f}; one-hot gives 1.00 to both")

# %% [markdown]
# ## 8 · Retrieval with the aligned features
# Zero-shot retrieval uses ITC alone: one relational caption per test image; R@k counts a hit when a
# true caption is among the top k (64 test scenes in fast mode: with so few candidates R@10 is easy).

# %%
test = WorldDataset("itc", "test", EVAL_SCENES, SEED)
print({k: round(v, 3) for k, v in retrieval(model, test, tok).items()})
pixels = test.images[:4].float() / 255
with torch.no_grad():
    feats, _ = model.image_features(pixels)
    pool = [c for s in range(min(64, len(test))) for c in test.captions[s][:2]]
    enc = tok(pool, padding=True, return_tensors="pt")
    tfeats, _ = model.text_features(enc["input_ids"], enc["attention_mask"])
best = (feats @ tfeats.t()).topk(3, dim=1).indices
scene_grid(test.images[:4], [" | ".join(pool[j] for j in row) for row in best.tolist()])

# %% [markdown]
# ## 9 · Where the fused text looks: cross-attention
# The fusion layers' cross-attention from the caption's [CLS] to the image patches, averaged over
# layers and heads (the explorer shows the same map).

# %%
pair = Collator(tok, "itm")([WorldDataset("itm", "test", 4, SEED)[0]])
att = model.image_attention(pair)[0]
image_heatmap(pair["pixel_values"][0], att, f"cross-attention of «{tok.decode(pair['input_ids'][0], skip_special_tokens=True)}»")

# %% [markdown]
# ## Exercises
# Work each one out, type your answer in place of the value given (the solutions ship filled in;
# `python -m vlat.exercises notebooks/06_albef.ipynb mine.ipynb` blanks them), and run the cell.
#
# **1.** A model that knows nothing gives every candidate the same logit. What is its ITC loss with the
# batch of B = 8 and the queue of Q = 1,024 (one-hot targets)?

# %%
import math

answer = math.log(8 + 1024)                                  # ← ln(B + Q)
flat = torch.zeros(8, 8 + 1024)
grade("1. the loss of a uniform guess", answer, -flat.log_softmax(1)[:, 0].mean())

# %% [markdown]
# **2.** With α = 0.4 and a teacher whose softmax over the paired caption is 0.5, what weight does the
# distilled target give the paired caption? (And what does α do to a noisy pair whose teacher says 0.05?)

# %%
answer = 0.4 * 0.5 + 0.6 * 1.0                               # ← α · p_teacher + (1 - α) · 1
teacher_logits = torch.tensor([[0.0, 0.0]])                 # two candidates, each 0.5
grade("2. the distilled target's weight", answer, distilled_targets(torch.tensor([[1.0, 0.0]]), teacher_logits, 0.4)[0, 0])

# %% [markdown]
# **3.** The soft cross-entropy's gradient with respect to the logits is softmax(s) − q. For logits
# s = (0, 0) and target q = (0.8, 0.2), what is it?

# %%
answer = [0.5 - 0.8, 0.5 - 0.2]                              # ← softmax(s) - q
s_ = torch.zeros(1, 2, requires_grad=True)
(-(torch.tensor([[0.8, 0.2]]) * s_.log_softmax(1)).sum()).backward()
grade("3. the gradient at the logits", answer, s_.grad[0])

# %% [markdown]
# ## Recap and where to go next
# ALBEF aligns two unimodal encoders with a contrastive loss against the batch and a queue of momentum
# features, then fuses them with cross-attention trained on ITM (with hard negatives drawn from the ITC
# similarities) and MLM. Momentum distillation replaces the one-hot target with a mix of it and the
# momentum model's softmax, whose gradient pulls the model's softmax towards that softer target, and gives
# noisy pairs less weight. Next: notebook 07 (VILLA) trains such models adversarially on both modalities.
