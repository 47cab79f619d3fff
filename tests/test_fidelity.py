"""The authors' released training steps, re-computed in a few lines of our own, against vlat's.

One section per method. Each re-implements what the authors' loop computes (cited by repository, file
and commit; written here from reading it, not copied), runs it and vlat on the same tiny model, batch
and δ initialisation, and compares δ, the loss and the parameter gradients. Dropout is off in both, so
the two differ only by what they compute.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch
from vlat.adversarial import SMART
from vlat.models import build_model, perturbed
from vlat.objectives import stable_kl
from vlat.train import StepContext, TrainConfig


def no_dropout(model):
    model.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
    return model


def tiny(name="single_stream"):
    torch.manual_seed(0)
    return no_dropout(build_model(name, "nano").train())


def run_step(step, model, task, batch, sgd=None):
    """Run one vlat training step; return (loss it reported, {param name: gradient it was about to apply},
    δ₀ it drew, every δ its ascent produced). The optimiser is replaced by a recorder, which also takes a
    plain SGD step of learning rate ``sgd`` when given (methods that step inside their loop: FreeAT)."""
    ctx = StepContext.standalone(model, task, TrainConfig(lr=1e-3, device="cpu", grad_clip=0.0), total_steps=10)
    grads, starts, ascents = {}, [], []

    def record(loss=None):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        if sgd:
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= sgd * p.grad
        model.zero_grad(set_to_none=True)
        return True

    ctx.optimizer_step = record
    start, ascend = step.start, step.ascend
    step.start = lambda *a, **k: starts.append(start(*a, **k)) or starts[-1]
    step.ascend = lambda *a, **k: ascents.append(ascend(*a, **k)) or ascents[-1]
    loss = step(ctx, batch)
    return loss, grads, starts, ascents


def assert_grads_close(got: dict, want: dict, atol=1e-6):
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=atol, rtol=1e-5), n


# ---- SMART: namisan/mt-dnn, mt_dnn/perturbation.py (SmartPerturbation.forward) and mt_dnn/loss.py
# (stable_kl, SymKlCriterion), commit 676b48b120e04c25ad138f5affb0d6842ba366af ----------------------------
def mtdnn_stable_kl(logit, target, epsilon=1e-6):
    """loss.py's stable_kl with reduce=False: 2 Σ p (r_p - r_y), r = detached log-odds with a guard."""
    p = F.softmax(logit.float().view(-1, logit.size(-1)), 1)
    y = F.softmax(target.float().view(-1, target.size(-1)), 1)
    rp = (1.0 / (p + epsilon) - 1 + epsilon).detach().log().neg()
    ry = (1.0 / (y + epsilon) - 1 + epsilon).detach().log().neg()
    return (2 * p * (rp - ry)).sum()


def mtdnn_smart(model, batch, task, site, noise, step_size=1e-3, epsilon=1e-6, k=1, adv_alpha=1.0):
    """SmartPerturbation.forward then model.py's ``loss + adv_alpha * adv_loss``; returns (δ, total loss,
    parameter gradients). ``noise`` is their generate_noise draw (here: vlat's δ₀)."""
    out = model(batch, task)
    logits = out.logits
    noise = noise.detach().clone().requires_grad_()
    for _ in range(k):
        with perturbed(model, {site: noise}, batch):
            adv_logits = model(batch, task).logits
        (g,) = torch.autograd.grad(mtdnn_stable_kl(adv_logits, logits.detach()), noise)
        moved = noise + g * step_size
        noise = (moved / (moved.abs().max(-1, keepdim=True)[0] + epsilon)).detach().requires_grad_()
    with perturbed(model, {site: noise}, batch):
        adv_logits = model(batch, task).logits
    lsm, sm = F.log_softmax, F.softmax
    sym = (F.kl_div(lsm(logits.float(), -1), sm(adv_logits.detach().float(), -1), reduction="batchmean")
           + F.kl_div(lsm(adv_logits.float(), -1), sm(logits.detach().float(), -1), reduction="batchmean"))
    total = out.loss + adv_alpha * sym
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, [dict(model.named_parameters())[n] for n in names], allow_unused=True)
    return noise.detach(), total.detach(), {n: g for n, g in zip(names, grads) if g is not None}


def test_stable_kl_by_hand():
    """p = (.75, .25), q = (.5, .5): log-odds ±log 3 and 0, so 2 (.75 log 3 - .25 log 3) = log 3."""
    p, q = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    assert float(stable_kl(p, q)) == pytest.approx(math.log(3.0), rel=1e-5)
    assert float(stable_kl(q, q)) == 0.0
    two = torch.cat([p, p])
    assert float(stable_kl(two, torch.zeros(2, 2), reduce=False)) == pytest.approx(2 * math.log(3.0), rel=1e-5)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("site", ["text", "image"])
def test_smart_defaults_are_the_authors_step(site, k):
    model = tiny()
    batch = make_batch("itm")
    loss, grads, starts, ascents = run_step(SMART(sites=(site,), steps=k), model, "itm", batch)
    model.zero_grad(set_to_none=True)
    delta, total, want = mtdnn_smart(model, batch, "itm", site, starts[0][site], k=k)
    mask = model.perturbation_sites()[site].mask(batch)
    assert torch.allclose(ascents[-1][site].detach(), delta * mask, atol=1e-6)
    assert_grads_close(grads, want)
    # the authors' update normalises δ: every real token ends at an L-inf size just under 1 (the 1e-6
    # guard takes a few per cent while max |δ + ηg| is of the order of σ = 1e-5)
    per_token = delta.abs().amax(-1)[mask.expand_as(delta).amax(-1) > 0]
    assert ((per_token > 0.9) & (per_token <= 1.0)).all()
    assert float(starts[0][site].detach().abs().max()) < 1e-3                     # from σ = 1e-5 noise


def test_smart_eps_runs_the_authors_step_in_units_of_eps():
    """eps = r: u = δ/r takes the authors' step with the gradient w.r.t. u (r g), and δ = r u, so every
    token ends at size r; r = 1 is the authors' arithmetic (the test above)."""
    model, batch, r = tiny(), make_batch("itm"), 0.05
    _, _, starts, ascents = run_step(SMART(sites=("text",), eps=r), model, "itm", batch)
    model.zero_grad(set_to_none=True)
    d0 = starts[0]["text"].detach().clone().requires_grad_()
    assert float(d0.detach().abs().max()) < 1e-5 * r * 6                       # σ r N(0, 1)
    clean = model(batch, "itm").logits.detach()
    with perturbed(model, {"text": d0}, batch):
        (g,) = torch.autograd.grad(mtdnn_stable_kl(model(batch, "itm").logits, clean), d0)
    u = d0.detach() / r + 1e-3 * r * g
    mask = model.perturbation_sites()["text"].mask(batch)
    want = r * u / (u.abs().amax(-1, keepdim=True) + 1e-6) * mask
    assert torch.allclose(ascents[-1]["text"].detach(), want, atol=1e-8)
    per_token = want.abs().amax(-1)[mask.expand_as(want).amax(-1) > 0]
    assert ((per_token > 0.9 * r) & (per_token <= r)).all()              # just under r (the guard)


# ---- YOPO: a1600012888/YOPO-You-Only-Propagate-Once, experiments/CIFAR10/pre-res18.yopo-5-3/
# training_function.py (FastGradientLayerOneTrainer.step, train_one_epoch) and loss.py (Hamiltonian),
# commit 484acff10e46ec4e37f372613be38b4cc8d123d1 -----------------------------------------------------------
def authors_yopo(model, batch, task, site, eta, K, inner, sigma, eps):
    """One batch of their train_one_epoch (no pixel clamp: a token site): returns (η, parameter grads).
    ``net.layer_one`` is the model's layer one (embeddings + first block); ``layer_one_out`` its output."""
    from vlat.models.base import run_layer_one

    block, _ = model.layer_one(site)
    eta = eta.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    for _ in range(K):
        box = {}

        def keep(module, args, output):
            box["out"] = output[0] if isinstance(output, tuple) else output
            box["out"].retain_grad()

        h = block.register_forward_hook(keep)
        with perturbed(model, {site: eta.detach()}, batch):
            loss = model(batch, task).loss
        h.remove()
        loss.backward()                                          # TotalLoss.backward(): summed over the K passes
        p = -1.0 * box["out"].grad.detach()                      # p = -layer_one_out.grad
        for _ in range(inner):                                   # LayerOneTrainer.step
            with perturbed(model, {site: eta}, batch):
                H = (run_layer_one(model, site, batch) * p).sum()   # Hamiltonian(x, p) = sum(layer(x) * p)
            eta = eta - torch.autograd.grad(H, eta)[0].sign() * sigma
            eta = eta.clamp(-eps, eps).detach().requires_grad_()
        with perturbed(model, {site: eta.detach()}, batch):
            (-1.0 * (run_layer_one(model, site, batch) * p).sum()).backward()   # loss = -H, into layer one
    return eta.detach(), {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}


@pytest.mark.parametrize("site", ["text", "image"])
def test_yopo_is_the_authors_loop(site):
    from vlat.adversarial import YOPO

    model, batch = tiny(), make_batch("itm")
    K, inner, sigma, eps = 3, 2, 0.02, 0.05
    step = YOPO(sites=(site,), norm="linf", eps=eps, step_size=sigma, outer=K, inner=inner, sum_passes=True)
    _, grads, starts, ascents = run_step(step, model, "itm", batch)
    d0 = starts[0][site]
    mask = model.perturbation_sites()[site].mask(batch)
    assert eps / 2 < float(d0.detach().abs().max()) <= eps     # δ₀ ~ U(-ε, ε), masked
    eta, want = authors_yopo(model, batch, "itm", site, d0, K, inner, sigma, eps)
    assert torch.allclose(ascents[-1][site].detach(), eta * mask, atol=1e-7)
    assert_grads_close(grads, want, atol=1e-6)
    # averaged passes (vlat's default): the same δ and exactly 1/K of every gradient
    model.zero_grad(set_to_none=True)
    step.sum_passes, step.start = False, lambda *a, **k: {site: d0.clone().requires_grad_()}
    _, mean_grads, _, _ = run_step(step, model, "itm", batch)
    assert_grads_close(mean_grads, {n: g / K for n, g in want.items()}, atol=1e-7)


def test_yopo_without_the_hamiltonian_update_differs_in_layer_one_only():
    """layer_one_update=False (vlat before this harness) gives other gradients in the embeddings and the
    first block, and the same ones in every block past it: the harness can tell the two apart."""
    from vlat.adversarial import YOPO

    model, batch = tiny(), make_batch("itm")
    runs = []
    for update in (True, False):
        step = YOPO(sites=("text",), eps=0.05, step_size=0.02, outer=2, inner=2, layer_one_update=update,
                    random_start=False)
        runs.append(run_step(step, model, "itm", batch)[1])
        model.zero_grad(set_to_none=True)
    with_h, without = runs
    differs = {n for n in with_h if not torch.allclose(with_h[n], without[n], atol=1e-8)}
    assert any(n.startswith("bert.encoder.layer.0.") for n in differs)
    deep = [n for n in with_h if n.startswith("bert.encoder.layer.") and not n.startswith("bert.encoder.layer.0.")]
    assert deep and not differs & set(deep)


# ---- FreeAT: mahyarnajibi/FreeAdversarialTraining, main_free.py (train), commit
# d70774030871fa3207e09ce8528c1b84cd690603 --------------------------------------------------------------------
def authors_free(model, batches, task, site, n_repeats, fgsm_step, clip_eps, lr):
    """Their train loop over ``batches`` with one global noise carried across them; plain SGD stands in
    for their SGD with momentum (the same on both sides). Returns the final global noise."""
    noise = None
    for batch in batches:
        shape = model.perturbation_sites()[site].shape(batch)
        noise = torch.zeros(shape) if noise is None else noise
        for _ in range(n_repeats):
            noise_batch = noise[0:shape[0]].clone().requires_grad_(True)
            with perturbed(model, {site: noise_batch}, batch):
                loss = model(batch, task).loss
            model.zero_grad(set_to_none=True)
            loss.backward()
            noise[0:shape[0]] += fgsm_step * noise_batch.grad.sign()      # pert = fgsm(grad, step)
            noise.clamp_(-clip_eps, clip_eps)
            with torch.no_grad():                                         # optimizer.step()
                for p in model.parameters():
                    if p.grad is not None:
                        p -= lr * p.grad
    return noise


@pytest.mark.parametrize("carry", [True, False])
def test_freeat_is_the_authors_loop_with_carry(carry):
    from vlat.adversarial import FreeAT

    batches = [make_batch("itm", n=6, seed=s) for s in range(3)]
    kw = dict(sites=("image",), norm="linf", eps=0.05, step_size=0.02, replays=3)
    ours, theirs = tiny(), tiny()
    step = FreeAT(carry=carry, **kw)
    for batch in batches:
        _, _, _, ascents = run_step(step, ours, "itm", batch, sgd=0.05)
    if carry:
        noise = authors_free(theirs, batches, "itm", "image", 3, 0.02, 0.05, 0.05)
        assert torch.allclose(ascents[-1]["image"].detach(), noise, atol=1e-7)
    else:                                                   # vlat's default: δ from zero at every batch
        for batch in batches:
            authors_free(theirs, [batch], "itm", "image", 3, 0.02, 0.05, 0.05)
    for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_freeat_carry_refuses_a_text_site():
    from vlat.adversarial import FreeAT

    with pytest.raises(ValueError, match="same shape in every batch"):
        FreeAT(sites=("text",), carry=True)


# ---- FreeLB: zhuchen03/FreeLB, huggingface-transformers/examples/run_glue_freelb.py (train, the
# "Code for adversarial training" block), commit 2100e7437909f7a56db20975c00e7ca5fe715a55 --------------------
def authors_freelb(model, batch, task, delta, adv_steps, adv_lr, adv_max_norm, norm_type):
    """Their K steps for one batch: returns (δ of the last step, parameter gradients before the optimiser)."""
    model.zero_grad(set_to_none=True)
    delta = delta.detach().clone()
    for astep in range(adv_steps):
        delta.requires_grad_()
        with perturbed(model, {"text": delta}, batch):
            loss = model(batch, task).loss / adv_steps
        loss.backward()
        if astep == adv_steps - 1:
            break
        g = delta.grad.clone().detach()
        p = 2 if norm_type == "l2" else float("inf")
        denorm = torch.norm(g.view(g.size(0), -1), dim=1, p=p).view(-1, 1, 1).clamp(min=1e-8)
        delta = (delta + adv_lr * g / denorm).detach()
        if adv_max_norm > 0 and norm_type == "l2":
            delta_norm = torch.norm(delta.view(delta.size(0), -1).float(), p=2, dim=1).detach()
            exceed = (delta_norm > adv_max_norm).to(delta)
            delta = (delta * (adv_max_norm / delta_norm * exceed + (1 - exceed)).view(-1, 1, 1)).detach()
        elif adv_max_norm > 0:
            delta = delta.clamp(-adv_max_norm, adv_max_norm).detach()
    return delta.detach(), {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}


@pytest.mark.parametrize("norm,max_norm", [("l2", 0.0), ("l2", 0.3), ("linf", 0.0), ("linf", 0.02)])
def test_freelb_is_the_authors_loop(norm, max_norm):
    from vlat.adversarial import FreeLB

    model, batch = tiny(), make_batch("itm")
    step = FreeLB(sites=("text",), norm=norm, eps=max_norm, step_size=0.1, steps=3, init_mag=0.2)
    _, grads, starts, ascents = run_step(step, model, "itm", batch)
    d0 = starts[0]["text"].detach()
    if norm == "l2":   # their L2 init: U(-1, 1) ⊙ m · init_mag / sqrt(len · D)
        mask = model.perturbation_sites()["text"].mask(batch)
        dims = mask.squeeze(-1).sum(1) * d0.shape[-1]
        assert (d0.flatten(1).abs().amax(1) <= 0.2 / dims.sqrt() + 1e-7).all()
    delta, want = authors_freelb(model, batch, "itm", d0, 3, 0.1, max_norm, norm)
    assert torch.allclose(ascents[-1]["text"].detach(), delta, atol=1e-7)
    assert_grads_close(grads, want)


# ---- PGD: torchattacks (Harry24k/adversarial-attacks-pytorch), torchattacks/attacks/pgd.py (PGD.forward),
# the L-inf evaluation attack on pixels -----------------------------------------------------------------------
def torchattacks_pgd(model, batch, task, start, eps, alpha, steps):
    """Their loop from the random start ``clamp(x + U(-ε, ε))`` (here: ``x + δ₀``, our draw): sign steps on
    the loss at the image, δ clipped to ε and the image to [0, 1]. Returns the final δ."""
    images = batch["pixel_values"]
    adv = (images + start).clamp(0, 1).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        cost = model({**batch, "pixel_values": adv}, task).loss
        grad = torch.autograd.grad(cost, adv)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        adv = torch.clamp(images + delta, 0, 1).detach()
    return adv - images


@pytest.mark.parametrize("name,task", [("single_stream", "itm"), ("clip", "classify")])
def test_pgd_attack_is_torchattacks_pgd(name, task):
    from vlat.adversarial import PGD

    model, batch = tiny(name).eval(), make_batch(task)
    eps, alpha = 0.3, 0.1   # large enough to reach the [0, 1] edges (pixels here lie in [0.12, 0.93])
    pgd = PGD(sites=("pixels",), norm="linf", eps=eps, step_size=alpha, steps=10)
    starts = []
    start = pgd.start
    pgd.start = lambda *a, **k: starts.append(start(*a, **k)) or starts[-1]
    ours = pgd.attack(model, batch, task, generator=torch.Generator().manual_seed(0))["pixels"]
    d0 = starts[0]["pixels"].detach()
    x = batch["pixel_values"]
    assert ((x + d0) >= 0).all() and ((x + d0) <= 1).all() and d0.abs().max() <= eps   # a feasible random start
    assert ((x + ours) >= 0).all() and ((x + ours) <= 1).all()
    # step by step from the same δ_k: their update equals ours wherever the sign of ∇ is not float noise.
    # (Run as one 10-step loop, a pixel whose gradient is ~1e-11 can take opposite signs in the two graphs,
    # vlat's hook at the pixel site and their leaf image, and the runs then drift apart by one step there.)
    delta, chained = d0, PGD(sites=("pixels",), norm="linf", eps=eps, step_size=alpha, steps=1)
    for _ in range(10):
        chained.start = lambda *a, _d=delta, **k: {"pixels": _d.clone().requires_grad_(True)}
        mine = chained.attack(model, batch, task)["pixels"]
        want = torchattacks_pgd(model, batch, task, delta, eps, alpha, 1)
        adv = (x + delta).requires_grad_(True)
        g = torch.autograd.grad(model({**batch, "pixel_values": adv}, task).loss, adv)[0].abs()
        signal = g > 1e-6 * g.max()
        assert signal.float().mean() > 0.99
        assert torch.allclose(mine[signal], want[signal], atol=1e-6)
        delta = mine
    assert torch.allclose(delta, ours, atol=1e-6)          # the chained steps are the 10-step attack


# ---- VILLA: zhegan27/VILLA, train_vqa_adv.py (the "Code for adversarial training" block), commit
# 8aa6ac25a389f0168f873581079e2fc02a9ab674; vlat's task loss stands in for their VQA BCE ----------------------
def authors_villa(model, batch, task, modality, adv_steps, adv_lr, kl_weight):
    """Their K steps from δ = 0 with the clean scores kept with gradient: returns (final δ per modality,
    parameter gradients before the optimiser)."""
    sites = model.perturbation_sites()
    gt = model(batch, task).logits
    gt_prob, gt_logprob = F.softmax(gt, dim=1), F.log_softmax(gt, dim=1)
    txt = torch.zeros(sites["text"].shape(batch))
    img = torch.zeros(sites["image"].shape(batch))
    model.zero_grad(set_to_none=True)

    def scored(deltas):
        with perturbed(model, deltas, batch):
            out = model(batch, task)
        kl = (F.kl_div(F.log_softmax(out.logits, dim=1), gt_prob, reduction="none")
              + F.kl_div(gt_logprob, F.softmax(out.logits, dim=1), reduction="none"))
        return out.loss, kl.mean() * gt.size(1)                       # "instance-level": per-example sums

    active = {"text": ["text"], "image": ["image"], "both": ["text", "image"],
              "alternating": ["text", "image"]}[modality]
    for astep in range(adv_steps):
        txt = txt.detach().requires_grad_("text" in active)
        img = img.detach().requires_grad_("image" in active)
        if modality != "alternating":
            bce, kl = scored({"text": txt, "image": img})
            loss = (bce + kl_weight * kl) / adv_steps
        else:
            bce1, kl1 = scored({"text": txt})
            bce2, kl2 = scored({"image": img})
            loss = (bce1 + bce2 + kl_weight * (kl1 + kl2)) / (adv_steps * 2)
        loss.backward(retain_graph=True)
        if astep == adv_steps - 1:
            break
        for name in active:
            d = txt if name == "text" else img
            g = d.grad.clone().detach()
            denorm = torch.norm(g.view(g.size(0), -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
            d = (d + adv_lr * g / denorm).detach()
            txt, img = (d, img) if name == "text" else (txt, d)
    grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}
    return {"text": txt.detach(), "image": img.detach()}, grads


@pytest.mark.parametrize("modality", ["text", "image", "both", "alternating"])
def test_villa_is_the_authors_loop(modality):
    from vlat.adversarial import VILLA

    model, batch = tiny(), make_batch("itm")
    step = VILLA(modality=modality, kl_weight=1.5, steps=3, step_size=0.3)
    _, grads, _, ascents = run_step(step, model, "itm", batch)
    deltas, want = authors_villa(model, batch, "itm", modality, 3, 0.3, 1.5)
    for name, d in ascents[-1].items():
        assert torch.allclose(d.detach(), deltas[name], atol=1e-6), name
    assert_grads_close(grads, want, atol=2e-6)


# ---- FGM (Miyato, Dai & Goodfellow 2017: r_adv = ε g / ||g||₂ per example, trained on L(x) + L(x + r_adv))
# and FGSM (Goodfellow et al. 2015: x_adv = clamp(x + ε sign(g))), as the survey's pseudo-code writes them ----
def one_step(model, batch, task, site, eps, norm):
    """Returns (δ, parameter gradients of L(x) + L(x + δ)) with δ from the gradient at x."""
    model.zero_grad(set_to_none=True)
    zero = torch.zeros(model.perturbation_sites()[site].shape(batch), requires_grad=True)
    with perturbed(model, {site: zero}, batch):
        clean = model(batch, task).loss
    (g,) = torch.autograd.grad(clean, zero, retain_graph=True)
    if norm == "l2":
        delta = eps * g / g.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, *[1] * (g.dim() - 1))
    else:
        delta = eps * g.sign()
        x = batch["pixel_values"]
        delta = (x + delta).clamp(0, 1) - x                           # x_adv = clamp(x + ε sign(g))
    with perturbed(model, {site: delta}, batch):
        adv = model(batch, task).loss
    (clean + adv).backward()
    return delta, {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}


@pytest.mark.parametrize("method,site,norm,eps", [("FGM", "text", "l2", 0.5), ("FGM", "image", "l2", 2.0),
                                                  ("FGSM", "pixels", "linf", 0.2)])
def test_fgm_and_fgsm_are_the_papers_step(method, site, norm, eps):
    import vlat.adversarial as adv

    model, batch = tiny(), make_batch("itm")
    _, grads, _, ascents = run_step(getattr(adv, method)(sites=(site,), eps=eps), model, "itm", batch)
    delta, want = one_step(model, batch, "itm", site, eps, norm)
    assert torch.allclose(ascents[-1][site].detach(), delta, atol=1e-6)
    assert_grads_close(grads, want)


# ---- TRADES: yaodongyu/TRADES, trades.py (trades_loss, the l_inf branch), as its README's training loop
# calls it ------------------------------------------------------------------------------------------------------
def authors_trades(model, batch, task, start, epsilon, step_size, perturb_steps, beta):
    """Their trades_loss from x_adv = x + 0.001 N(0, 1) (here: x + δ₀, our draw): sign steps on
    KL(p(x) ‖ p(x_adv)) summed, projected to the ε-box and [0, 1]; then CE + β KL / B with the clean side
    kept. Returns (final δ, parameter gradients)."""
    x = batch["pixel_values"]
    kl = torch.nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = (x + start).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        loss_kl = kl(F.log_softmax(model({**batch, "pixel_values": x_adv}, task).logits, dim=1),
                     F.softmax(model(batch, task).logits, dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp(0.0, 1.0)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch, task)
    loss_robust = (1.0 / x.size(0)) * kl(F.log_softmax(model({**batch, "pixel_values": x_adv}, task).logits, dim=1),
                                         F.softmax(out.logits, dim=1))
    (out.loss + beta * loss_robust).backward()
    return x_adv - x, {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}


def test_trades_is_the_authors_loss():
    from vlat.adversarial import TRADES

    assert TRADES().sigma == 0.001                                    # their 0.001 N(0, 1) start
    model, batch = tiny(), make_batch("itm")
    eps, eta, k, beta = 0.1, 0.03, 5, 6.0
    # σ = 0.05 here: near δ = 0 the KL's gradient is of the order of float rounding, and a sign step then
    # follows rounding noise (the two sides compute the KL in different op orders): 5 % of the entries
    # differ at σ = 0.001, 0.1 % at σ = 0.05, where every parameter gradient still agrees to 1e-6
    step = TRADES(eps=eps, step_size=eta, steps=k, beta=beta, sigma=0.05)
    _, grads, starts, ascents = run_step(step, model, "itm", batch)
    d0 = starts[0]["pixels"].detach()
    delta, want = authors_trades(model, batch, "itm", d0, eps, eta, k, beta)
    differ = (ascents[-1]["pixels"].detach() - delta).abs() > 1e-6
    assert float(differ.float().mean()) < 0.005
    assert_grads_close(grads, want)


# ---- ALBEF: salesforce/ALBEF, models/model_pretrain.py (ALBEF.forward, _momentum_update, _dequeue_and_enqueue;
# commit 90541c975b01150ba8a1dfb880d3adb8bcd3af8b), models/model_retrieval.py (ALBEF.forward with its ``idx``
# queue; commit 69e9225506c76a4057c5099d0a7976b4f5e4d43c) and models/xbert.py (BertForMaskedLM.forward's
# soft-label MLM; commit 91de3c19c370f31283bac2699bf4416c918159d3). The encoders are vlat's (the reference's
# DeiT and xbert are not in the index of this test); what is checked is what the loop computes from them. ----
def albef_model(**overrides):
    torch.manual_seed(0)
    from vlat.models.albef import MOMENTUM_PAIRS

    settings = {"same_caption_positives": False, "truth_negatives": False, **overrides}   # model_pretrain.py's
    model = no_dropout(build_model("albef", "nano", **settings).train())
    with torch.no_grad():                   # a teacher that differs from the student, a queue with content
        for _, m_name in MOMENTUM_PAIRS:
            for p in getattr(model, m_name).parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.image_queue.copy_(F.normalize(torch.randn_like(model.image_queue), dim=1))
        model.text_queue.copy_(F.normalize(torch.randn_like(model.text_queue), dim=1))
    model.updates = model.config.alpha_warmup_steps      # α at its full 0.4
    return model


def albef_batch(n=8):
    """A pretrain batch of the toy world holding at least one pair of identical captions."""
    from vlat.models.base import caption_ids

    for seed in range(100):
        batch = make_batch("pretrain", n=n, seed=seed)
        idx = caption_ids(batch["input_ids"])
        if (idx[:, None] == idx[None, :]).sum() > n:
            return {k: v for k, v in batch.items() if k != "truth"}
    raise AssertionError("no batch with a repeated caption")


def albef_reference(model, batch, alpha, neg_text, neg_image, idx=None, image_queue=None, text_queue=None,
                    idx_queue=None):
    """ALBEF.forward of model_pretrain.py (``idx=None``) or model_retrieval.py (ITC targets spread over equal
    ``idx``, batch and queue), then loss_mlm + loss_ita + loss_itm as Pretrain.py sums them (the retrieval
    code has no MLM; it is added here so the two share one model). The queues are theirs: ``[P, Q]``.
    The hard negatives are the ones vlat drew (the draw itself is checked separately). Returns (total loss,
    (ita, itm, mlm), momentum features of the batch, ITM sampling weights (i2t, t2i))."""
    pixels, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    image_queue = model.image_queue.t() if image_queue is None else image_queue
    text_queue = model.text_queue.t() if text_queue is None else text_queue
    temp = model.temp
    image_embeds = model.encode_image(pixels)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_embeds = model.encode_text(ids, am)
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0, :]), dim=-1)
    bs = pixels.size(0)
    with torch.no_grad():
        image_embeds_m = model.encode_image(pixels, momentum=True)
        image_feat_m = F.normalize(model.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone()], dim=1)
        text_feat_m = F.normalize(model.text_proj_m(model.encode_text(ids, am, momentum=True)[:, 0, :]), dim=-1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone()], dim=1)
        if idx is None:
            sim_targets = torch.zeros(bs, bs + image_queue.shape[1])
            sim_targets.fill_diagonal_(1)
        else:
            idx = idx.view(-1, 1)
            pos_idx = torch.eq(idx, torch.cat([idx.t(), idx_queue.view(1, -1)], dim=1)).float()
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        i2t_targets = alpha * F.softmax(image_feat_m @ text_feat_all / temp, dim=1) + (1 - alpha) * sim_targets
        t2i_targets = alpha * F.softmax(text_feat_m @ image_feat_all / temp, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t2i_targets, dim=1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2

    output_pos = model.fuse(text_embeds, am, image_embeds)
    with torch.no_grad():
        if idx is None:
            weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1)
            weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1)
            weights_i2t.fill_diagonal_(0)
            weights_t2i.fill_diagonal_(0)
        else:
            weights_i2t = F.softmax(sim_i2t[:, :bs] + 1e-4, dim=1)
            weights_t2i = F.softmax(sim_t2i[:, :bs] + 1e-4, dim=1)
            mask = torch.eq(idx, idx.T)
            weights_i2t.masked_fill_(mask, 0)
            weights_t2i.masked_fill_(mask, 0)
    image_embeds_neg = torch.stack([image_embeds[j] for j in neg_image.tolist()])   # a negative image per text
    text_embeds_neg = torch.stack([text_embeds[j] for j in neg_text.tolist()])      # a negative text per image
    text_atts_neg = torch.stack([am[j] for j in neg_text.tolist()])
    text_embeds_all = torch.cat([text_embeds, text_embeds_neg], dim=0)
    text_atts_all = torch.cat([am, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
    output_neg = model.fuse(text_embeds_all, text_atts_all, image_embeds_all)
    vl_output = model.itm_head(torch.cat([output_pos[:, 0, :], output_neg[:, 0, :]], dim=0))
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
    loss_itm = F.cross_entropy(vl_output, itm_labels)

    mids, labels = batch["mlm_input_ids"], batch["mlm_labels"]       # their mask(), drawn once by the collator
    with torch.no_grad():
        logits_m = model.mlm_head_m(model.fuse(model.encode_text(mids, am, momentum=True), am, image_embeds_m,
                                               momentum=True))
    prediction_scores = model.mlm_head(model.fuse(model.encode_text(mids, am), am, image_embeds))
    V = prediction_scores.shape[-1]
    masked_lm_loss = F.cross_entropy(prediction_scores.view(-1, V), labels.view(-1))
    loss_distill = -torch.sum(F.log_softmax(prediction_scores, dim=-1) * F.softmax(logits_m, dim=-1), dim=-1)
    loss_distill = loss_distill[labels != -100].mean()
    loss_mlm = (1 - alpha) * masked_lm_loss + alpha * loss_distill
    total = loss_mlm + loss_ita + loss_itm
    return total, (loss_ita, loss_itm, loss_mlm), (image_feat_m, text_feat_m), (weights_i2t, weights_t2i)


def vlat_albef_step(model, batch, monkeypatch):
    """vlat's pretrain forward + backward; returns (output, gradients, the weights it drew negatives from)."""
    drawn = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda w, *a, **k: drawn.append(w.clone()) or real(w, *a, **k))
    model.zero_grad(set_to_none=True)
    out = model(batch, "pretrain")
    out.loss.backward()
    monkeypatch.setattr(torch, "multinomial", real)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, drawn


def reference_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_albef_pretrain_loss_and_gradients_are_the_authors(monkeypatch):
    model, batch = albef_model(), albef_batch()
    alpha = model.current_alpha()
    assert alpha == pytest.approx(0.4)
    out, grads, drawn = vlat_albef_step(model, batch, monkeypatch)
    want, parts, _, weights = albef_reference(model, batch, alpha, out.extras["neg_text"], out.extras["neg_image"])
    for got, ref in zip((out.extras["itc"], out.extras["itm"], out.extras["mlm"]), parts):
        assert torch.allclose(got, ref.detach(), atol=1e-6)
    assert torch.allclose(out.loss, want, atol=1e-6)
    # the hard negatives: their weights (softmax, the positive zeroed) as torch.multinomial normalises them
    for got, ref in zip(drawn, weights):
        assert torch.allclose(got, ref / ref.sum(1, keepdim=True), atol=1e-6)
    assert_grads_close(grads, reference_grads(model, want))


def test_albef_same_caption_positives_are_the_retrieval_codes_idx_queue(monkeypatch):
    from vlat.models.base import caption_ids

    model, batch = albef_model(same_caption_positives=True), albef_batch()
    idx = caption_ids(batch["input_ids"])
    Q = model.config.queue_size
    with torch.no_grad():           # a queue holding copies of the batch's captions: positives there too
        model.idx_queue.copy_(idx[torch.randint(len(idx), (Q,))])
        model.idx_queue[::3] = -1
    out, grads, drawn = vlat_albef_step(model, batch, monkeypatch)
    want, parts, _, weights = albef_reference(model, batch, model.current_alpha(), out.extras["neg_text"],
                                              out.extras["neg_image"], idx=idx, idx_queue=model.idx_queue)
    assert torch.allclose(out.extras["itc"], parts[0].detach(), atol=1e-6)
    assert torch.allclose(out.loss, want, atol=1e-6)
    for got, ref in zip(drawn, weights):        # same-caption pairs never drawn as negatives
        assert torch.allclose(got, ref / ref.sum(1, keepdim=True), atol=1e-6)
    assert_grads_close(grads, reference_grads(model, want))


def test_albef_momentum_and_queue_follow_the_authors_order_over_two_updates(monkeypatch):
    """Reference, per step: θ̃ ← m θ̃ + (1 - m) θ at the start of forward, features from θ̃, enqueue, backward,
    optimiser step. vlat: the same EMA and enqueue in after_optimizer_step, once per update."""
    import copy

    from vlat.models.albef import MOMENTUM_PAIRS

    lr, m = 0.05, 0.9
    ours = albef_model(momentum=m)
    ours.updates = 0                            # α = 0 at the first update, then ramps, as in their epoch 0
    ours.reset_momentum()                       # their copy_params: θ̃ = θ at the start
    ref = copy.deepcopy(ours)
    image_queue, text_queue = ref.image_queue.t().clone(), ref.text_queue.t().clone()
    ptr = 0
    for t in range(2):
        batch = albef_batch() if t == 0 else make_batch("pretrain", n=8, seed=123)
        batch.pop("truth", None)
        out, _, _ = vlat_albef_step(ours, batch, monkeypatch)
        with torch.no_grad():
            for p in ours.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        ours.after_optimizer_step()

        with torch.no_grad():                   # their temp.clamp_ and _momentum_update, at the start of forward
            ref.temp.clamp_(0.001, 0.5)
            for name, m_name in MOMENTUM_PAIRS:
                for pm, p in zip(getattr(ref, m_name).parameters(), getattr(ref, name).parameters()):
                    pm.data = pm.data * m + p.data * (1.0 - m)
        alpha = 0.4 * min(1, t / ref.config.alpha_warmup_steps)     # Pretrain.py: alpha * min(1, i / len(loader))
        loss, _, (img_m, txt_m), _ = albef_reference(ref, batch, alpha, out.extras["neg_text"],
                                                     out.extras["neg_image"], image_queue=image_queue,
                                                     text_queue=text_queue)
        B = img_m.shape[0]                      # their _dequeue_and_enqueue (one process)
        image_queue[:, ptr:ptr + B], text_queue[:, ptr:ptr + B] = img_m.T, txt_m.T
        ptr = (ptr + B) % ref.config.queue_size
        reference_grads(ref, loss)
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    # their next forward would first clamp τ and apply the EMA with the updated θ: vlat did both in
    # after_optimizer_step (lr 0.05 drives τ far above 0.5 here, so the clamp is exercised)
    with torch.no_grad():
        ref.temp.clamp_(0.001, 0.5)
        for name, m_name in MOMENTUM_PAIRS:
            for pm, p in zip(getattr(ref, m_name).parameters(), getattr(ref, name).parameters()):
                pm.data = pm.data * m + p.data * (1.0 - m)
    got, want = dict(ours.named_parameters()), dict(ref.named_parameters())
    bad = [n for n in want if not torch.allclose(got[n], want[n], atol=1e-6)]
    assert not bad, bad
    assert torch.allclose(ours.image_queue, image_queue.t(), atol=1e-6)
    assert torch.allclose(ours.text_queue, text_queue.t(), atol=1e-6)
    assert int(ours.queue_ptr) == ptr == 16


# ---- R-Adapter: tjddus9597/R-Adapter-ECCV2024, commit 9680117ce5b7a3721a8621f890f26852af439b7e:
# clip/loss.py (ClipLoss.forward, the label_smoothing branch = MPM-NCE, as src/main.py calls it with
# ground_labels), clip/loralib/adapter_layers.py (StochasticAdapter.forward, its timm DropPath) and
# clip/loralib/utils.py (reparameterize / Rep_AdaptWeight, ema_update) ----------------------------------------
def authors_mpm_nce(image_features, text_features, logit_scale, ground_labels, ls, mg):
    """ClipLoss.forward on one process with ``label_smoothing=True`` (their margin and smoothing)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    num_logits = logits_per_image.shape[0]
    equal_labels = (ground_labels.view(1, -1).repeat(num_logits, 1) == ground_labels.view(-1, 1)).float()
    margin_matrix = (1 - equal_labels) * mg * logit_scale
    logits_per_image = logits_per_image + margin_matrix
    logits_per_text = logits_per_text + margin_matrix
    num_pos = equal_labels.sum(1, keepdim=True)
    smooth_labels = (1 - ls) * equal_labels / num_pos + (ls / (num_logits - num_pos)) * (1 - equal_labels)
    image_exp = torch.exp(logits_per_image - torch.max(logits_per_image, dim=1, keepdim=True).values)
    text_exp = torch.exp(logits_per_text - torch.max(logits_per_text, dim=1, keepdim=True).values)
    image_nll = -torch.log(image_exp / image_exp.sum(1, keepdim=True))
    text_nll = -torch.log(text_exp / text_exp.sum(1, keepdim=True))
    return ((smooth_labels * image_nll).sum(1).mean() + (smooth_labels * text_nll).sum(1).mean()) / 2


def test_mpm_nce_is_the_authors_clip_loss_with_label_smoothing():
    from vlat.objectives import MPMNCE

    torch.manual_seed(0)
    loss = MPMNCE()
    assert (loss.temp, loss.eps, loss.margin) == (0.01, 0.02, 0.05)   # logit scale 100, --ls 0.02, --mg 0.05
    # cosines spread as a CLIP's do (within ~0.5 of each other): their exp-then-log underflows to inf when a
    # row's logits spread over ~87 (cosines over 0.87 at scale 100); vlat's log-softmax does not
    base = torch.randn(1, 8)
    image = F.normalize(base + 0.1 * torch.randn(12, 8), dim=1).requires_grad_()
    text = F.normalize(base + 0.1 * torch.randn(12, 8), dim=1).requires_grad_()
    far = F.normalize(torch.randn(12, 8), dim=1)
    assert not torch.isfinite(authors_mpm_nce(far, far.flip(0), 100.0, torch.arange(12), 0.02, 0.05))
    assert torch.isfinite(loss(far, far.flip(0), torch.arange(12)))
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 4, 0, 5, 5, 6, 7])
    ours = loss(image, text, labels)
    ours_g = torch.autograd.grad(ours, (image, text))
    want = authors_mpm_nce(image, text, 1 / loss.temp, labels, loss.eps, loss.margin)
    want_g = torch.autograd.grad(want, (image, text))
    assert torch.allclose(ours, want, atol=1e-5)
    for a, b in zip(ours_g, want_g):         # logits of ~100 in float32 carry ~1e-5 of rounding each
        assert torch.allclose(a, b, atol=5e-5)
    # a batch of one label: their ε / (B - |P|) is 0/0 and the loss NaN; vlat keeps the mass on the positives
    same = torch.zeros(12, dtype=torch.long)
    assert torch.isnan(authors_mpm_nce(image, text, 100.0, same, 0.02, 0.05))
    assert torch.isfinite(loss(image, text, same))


class AuthorsAdapter(torch.nn.Module):
    """StochasticAdapter with ``r <= embed_dim`` (their full-rank ``f``, no bias) after a linear layer, as
    forward_vit_block_adapter applies it: ``y + s · DropPath(f(y))`` in training (DropPath scales a kept
    branch by 1/keep), ``y + s · eval_scale · f(y)`` in eval; the ``*_cache`` copies are their EMA."""

    def __init__(self, linear, f_weight, s, drop_prob, eval_scale):
        super().__init__()
        self.linear, self.drop_prob, self.eval_scale = linear, drop_prob, eval_scale
        self.f = torch.nn.Parameter(f_weight.clone())
        self.s = torch.nn.Parameter(torch.tensor(float(s)))
        self.f_cache, self.s_cache = f_weight.clone(), torch.tensor(float(s))

    def forward(self, x, gate=None, ema=False):
        y = self.linear(x)
        f, s = (self.f_cache, self.s_cache) if (ema and not self.training) else (self.f, self.s)
        z = y @ f.t()
        if self.training and self.drop_prob > 0:
            z = z * gate / (1 - self.drop_prob)
        return y + z * (s if self.training else s * self.eval_scale)

    @torch.no_grad()
    def ema_update(self, m):
        self.f_cache = m * self.f_cache + (1 - m) * self.f.detach()
        self.s_cache = m * self.s_cache + (1 - m) * self.s.detach()

    @torch.no_grad()
    def reparameterized(self, ema=False):
        """Rep_AdaptWeight's reparameterize(...) twice, in their transposed convention: (weight, bias)."""
        f, s = (self.f_cache, self.s_cache) if ema else (self.f, self.s)
        adapt = (f.t() * (s * self.eval_scale) + torch.eye(f.shape[0])).t()          # reparameterize(f.T, scale)
        Wa, Wb = self.linear.weight.t(), adapt.t()
        return (Wa @ Wb).t(), self.linear.bias @ Wb


@pytest.mark.parametrize("gate_axis", ["sample", "position"])
def test_r_adapter_forward_gradients_ema_and_merge_are_the_authors(gate_axis, monkeypatch):
    from vlat.robust import RAdapter

    torch.manual_seed(0)
    d, p, m = 6, 0.5, 0.9
    lin = torch.nn.Linear(5, d)
    ours = RAdapter(lin, drop=p, ema=m, gate=gate_axis)
    with torch.no_grad():
        ours.weight.copy_(0.3 * torch.randn(d, d))
    theirs = AuthorsAdapter(lin, ours.weight.detach(), 0.1, p, eval_scale=0.5)
    theirs.f_cache, theirs.s_cache = torch.zeros(d, d), torch.tensor(0.1)      # their cache: a copy at init
    x = torch.randn(4, 7, 5)                                                    # [B, L, in], batch-first
    gates = []
    real = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda t, *a, **k: gates.append(real(t, *a, **k)) or gates[-1])
    for _ in range(3):                                  # training: forward, gradients, SGD, EMA
        out = ours.train()(x)
        gate = gates[-1]
        assert gate.shape == ((4, 1, 1) if gate_axis == "sample" else (1, 7, 1))
        want = theirs.train()(x, gate)
        assert torch.allclose(out, want, atol=1e-6)
        g_ours = torch.autograd.grad(out.square().sum(), (ours.weight, ours.scale))
        g_theirs = torch.autograd.grad(want.square().sum(), (theirs.f, theirs.s))
        for a, b in zip(g_ours, g_theirs):
            assert torch.allclose(a, b, atol=1e-5)
        with torch.no_grad():
            for q, g in zip((ours.weight, ours.scale, theirs.f, theirs.s), g_ours + g_theirs):
                q -= 0.01 * g
        ours.after_optimizer_step()
        theirs.ema_update(m)
    monkeypatch.setattr(torch, "bernoulli", real)
    ours.alpha = 0.5                                    # their eval_scale
    for ema in (False, True):                           # inference, then merged weights
        ours.use_ema = ema
        assert torch.allclose(ours.eval()(x), theirs.eval()(x, ema=ema), atol=1e-6)
        w, b = theirs.reparameterized(ema)
        ours.merge()
        assert torch.allclose(lin.weight, w, atol=1e-6) and torch.allclose(lin.bias, b, atol=1e-6)
        ours.unmerge()
