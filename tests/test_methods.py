import math

import pytest
import torch

from conftest import make_batch
from vlat.adversarial import (FGM, FGSM, PGD, SMART, VILLA, YOPO, FreeAT, FreeLB, METHODS, Frozen, per_example_norm,
                             project, registry)
from vlat.adversarial.base import init_delta, normalize_grad
from vlat.models import build_model, perturbed
from vlat.objectives import kl_logits, symmetric_kl
from vlat.train import StepContext, TrainConfig



def ctx_for(model, task, lr=1e-3):
    return StepContext.standalone(model, task, TrainConfig(lr=lr, device="cpu", grad_clip=0.0), total_steps=10)


def at_site(method_cls, site, **kw):
    """A method perturbing one site (VILLA names it by modality)."""
    if method_cls is VILLA:
        return VILLA(**({"modality": "text"} if site == "text" else {"modality": "image", "image_site": site}), **kw)
    return method_cls(sites=(site,), **kw)


def small(method_cls, site, **kw):
    return at_site(method_cls, site, **{"eps": 0.5, "step_size": 0.2, **kw})


ALL_METHODS = [s.cls for s in registry.specs()]        # every registered method, old and new


# ---- base plumbing, by hand ------------------------------------------------------------------------
def test_norms_normalisation_projection_by_hand():
    d = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]]])                           # [2, 1, 2]
    assert torch.allclose(per_example_norm(d), torch.tensor([5.0, 0.5]))
    assert torch.allclose(per_example_norm(d, "linf"), torch.tensor([4.0, 0.4]))
    assert torch.allclose(normalize_grad(d), torch.tensor([[[0.6, 0.8]], [[0.6, 0.8]]]))
    p = project(d, 1.0)
    assert torch.allclose(p[0], torch.tensor([[0.6, 0.8]])) and torch.equal(p[1], d[1])  # inside: unchanged
    assert torch.equal(project(d, 0.35, "linf"), torch.tensor([[[0.35, 0.35]], [[0.3, 0.35]]]))
    assert torch.equal(project(d, 0.0), d)                                      # eps 0: no projection


def test_freelb_uniform_init_scale():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).unsqueeze(-1)
    d = init_delta((2, 4, 8), mask, "uniform", magnitude=0.6, norm="l2", generator=torch.Generator().manual_seed(0))
    assert (d[0, 2:] == 0).all()
    bound = torch.tensor([0.6 / math.sqrt(2 * 8), 0.6 / math.sqrt(4 * 8)])
    assert (d.abs().flatten(1).amax(1) <= bound + 1e-7).all()


def test_fgm_on_a_hand_worked_example():
    """Linear 'model': loss = w·(x+δ) summed; ∇_δ = w, so δ = ε w / ||w|| exactly."""
    w = torch.tensor([[3.0, 0.0, -4.0]])
    x = torch.zeros(1, 1, 3)
    d = torch.zeros_like(x, requires_grad=True)
    (w * (x + d)).sum().backward()
    delta = 2.0 * normalize_grad(d.grad)
    assert torch.allclose(delta, torch.tensor([[[1.2, 0.0, -1.6]]]))
    assert torch.allclose(FGSM.eps * normalize_grad(d.grad, "linf"), torch.tensor([[[8 / 255, 0.0, -8 / 255]]]))


def test_pgd_on_a_linear_model_matches_closed_form():
    """max_{||δ||₂ ≤ ε} w·δ is attained at δ* = ε w/||w||; PGD from 0 reaches it in one step and stays."""
    torch.manual_seed(0)
    model = build_model("clip", "nano").eval()
    batch = make_batch("classify")
    w = torch.randn(*model.perturbation_sites()["image"].shape(batch))

    class Linear(torch.nn.Module):  # wraps the model so the loss is linear in the image δ
        def __init__(self, m):
            super().__init__()
            self.m = m

        def perturbation_sites(self):
            return self.m.perturbation_sites()

        def forward(self, batch, task):
            seen = {}
            h = self.m.clip.vision_model.embeddings.patch_embedding.register_forward_hook(
                lambda mod, a, o: seen.setdefault("o", o))
            self.m(batch, task)
            h.remove()
            return type("O", (), {"loss": (w * seen["o"]).sum()})()

    lin = Linear(model)
    delta = PGD(sites=("image",), eps=0.7, step_size=0.3, steps=8).attack(lin, batch, "classify", random_start=False)
    star = 0.7 * w / per_example_norm(w).view(-1, 1, 1, 1)
    assert torch.allclose(delta["image"], star, atol=1e-5)


def test_smart_regulariser_zero_at_zero_and_symmetric():
    p, q = torch.randn(4, 5), torch.randn(4, 5)
    assert float(symmetric_kl(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(symmetric_kl(p, q)) == pytest.approx(float(symmetric_kl(q, p)), rel=1e-6)
    # KL by hand for two-point distributions
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])    # (.5,.5) vs (.75,.25)
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(kl_logits(a, b)) == pytest.approx(want, rel=1e-6)
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("itm")
    clean = model(batch, "itm").logits
    reg = SMART(sites=("text",), eps=1e-5, sigma=0.0, step_size=0.0).regulariser(Frozen(model, "itm"), batch, clean)
    assert float(reg.detach()) == pytest.approx(0.0, abs=1e-6)


# ---- invariants over every method, site and model family ------------------------------------------
SITES = [("single_stream", "itm", "text"), ("single_stream", "itm", "image"), ("single_stream", "qa", "pixels"),
         ("clip", "itc", "text"), ("clip", "classify", "image"), ("clip", "itc", "pixels"),
         ("albef", "pretrain", "text"), ("albef", "itm", "image"), ("albef", "pretrain", "pixels")]


@pytest.mark.parametrize("name,task,site", SITES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.__name__)
def test_attack_stays_in_ball_respects_mask_and_leaves_parameters(name, task, site, norm, method):
    """Every method's inner maximisation on a fixed model (what the explorer shows)."""
    torch.manual_seed(0)
    model = build_model(name, "nano").eval()
    batch = make_batch(task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adv = small(method, site, norm=norm)
    delta = adv.attack(model, batch, task)[site]
    eps = adv.eps
    if method is SMART:  # its δ is normalised per token (the authors' update): the bound holds per token
        tokens = model.perturbation_sites()[site].tokens(delta)
        size = tokens.abs().amax(-1) if norm == "linf" else tokens.norm(dim=-1)
        assert (size <= eps * (1 + 1e-5)).all()
    else:
        assert (per_example_norm(delta, norm) <= eps * (1 + 1e-5)).all()
    mask = model.perturbation_sites()[site].mask(batch)
    assert (delta * (1 - mask)).abs().sum() == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name,task,site", SITES)
def test_pgd_does_not_lower_the_loss_and_robust_le_clean(name, task, site):
    torch.manual_seed(0)
    model = build_model(name, "nano").eval()
    batch = make_batch(task, n=8)
    clean = model(batch, task)
    delta, losses = PGD(sites=(site,), eps=0.5, step_size=0.2, steps=5).attack(model, batch, task, random_start=False,
                                                                               return_losses=True)
    with perturbed(model, delta, batch):
        adv = model(batch, task)
    assert float(adv.loss.detach()) > float(clean.loss.detach())


@pytest.mark.parametrize("name,task,site", [("single_stream", "itm", "image"), ("clip", "classify", "pixels")])
def test_robust_accuracy_le_clean_accuracy(name, task, site):
    from vlat.evaluate import accuracy, robust_accuracy
    from vlat.world import WorldDataset

    torch.manual_seed(0)
    model = build_model(name, "nano").eval()
    data = WorldDataset(task, "test", 40)
    kw = {"norm": "linf", "eps": 8 / 255, "step_size": 2 / 255} if site == "pixels" else {"eps": 1.0, "step_size": 0.3}
    clean = accuracy(model, data, task)
    robust = robust_accuracy(model, data, task, PGD(sites=(site,), steps=5, **kw))
    assert 0.0 <= robust <= clean
    none = robust_accuracy(model, data, task, PGD(sites=(site,), steps=1, eps=1e-12, step_size=1e-12))
    assert none == pytest.approx(clean)  # a vanishing ball changes nothing


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("name,task,site", [("single_stream", "itm", "text"), ("clip", "itc", "image"),
                                            ("single_stream", "tf", "pixels"), ("albef", "pretrain", "text"),
                                            ("albef", "pretrain", "image")])
def test_every_method_trains_every_family(method, name, task, site):
    torch.manual_seed(0)
    model = build_model(name, "nano").train()
    batch = make_batch(task)
    before = [p.detach().clone() for p in model.parameters()]
    kw = {"norm": "linf", "eps": 8 / 255} if site == "pixels" else {}
    fields = method.__dataclass_fields__
    if method is SMART:
        kw = {}
    elif "steps" in fields:
        kw.update(steps=2)
    if method is YOPO:
        kw.update(outer=2, inner=2)
    step = at_site(method, site, **kw)
    loss = step(ctx_for(model, task), batch)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # the step applied and cleared its gradients


def test_freelb_gradient_is_the_mean_of_the_K_step_gradients():
    """FreeLB's accumulated θ-gradient equals the mean of K separately computed per-step gradients."""
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    batch = make_batch("itm")
    method = FreeLB(sites=("text",), steps=3, step_size=0.3, init_mag=0.2)
    ctx = ctx_for(model, "itm")
    rng = torch.get_rng_state()
    _, final = method.accumulate(ctx, batch)
    used = [p for p in model.parameters() if p.grad is not None]  # the ITM path (other heads get none)
    assert used
    accumulated = [p.grad.clone() for p in used]
    # replay by hand: same init (same RNG), same dropout masks, one step at a time
    torch.set_rng_state(rng)
    deltas = method.new_deltas(model, batch, "uniform", method.init_mag)
    dropout_rng = torch.get_rng_state()
    per_step = []
    for t in range(3):
        model.zero_grad()
        torch.set_rng_state(dropout_rng)
        with perturbed(model, deltas, batch):
            loss = model(batch, "itm").loss
        loss.backward()
        per_step.append([p.grad.clone() for p in used])
        if t < 2:
            deltas = method.ascend(model, batch, deltas, {k: d.grad for k, d in deltas.items()})
    for k, acc in enumerate(accumulated):
        mean = sum(g[k] for g in per_step) / 3
        assert torch.allclose(acc, mean, atol=1e-6)
    assert torch.allclose(final["text"], deltas["text"], atol=1e-6)  # g/K vs g: same direction


def test_freelb_reuses_dropout_masks_across_steps():
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    assert model.config.dropout > 0
    masks = []
    drop = model.bert.encoder.layer[0].output.dropout
    drop.register_forward_hook(lambda m, a, o: masks.append((o == 0) & (a[0] != 0)))
    FreeLB(sites=("text",), steps=3).accumulate(ctx_for(model, "itm"), make_batch("itm"))
    assert len(masks) == 3 and masks[0].any()
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])


def test_freeat_takes_one_optimizer_step_per_replay():
    torch.manual_seed(0)
    model = build_model("clip", "nano").train()
    ctx = ctx_for(model, "itc")
    steps = []
    orig = ctx.optimizer.step
    ctx.optimizer.step = lambda *a, **k: (steps.append(1), orig(*a, **k))[1]
    FreeAT(sites=("text",), replays=3)(ctx, make_batch("itc"))
    assert len(steps) == 3


def test_smart_nan_guard_zeroes_the_regulariser():
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("itm")
    clean = model(batch, "itm").logits
    smart = SMART(sites=("text",))
    bad = clean.detach().clone()
    bad[0, 0] = float("nan")
    reg = smart.regulariser(Frozen(model, "itm"), batch, bad)
    assert float(reg) == 0.0 and smart.skipped == 1


@pytest.mark.parametrize("kw,msg", [({"eps": -1.0}, "eps"), ({"norm": "l3"}, "norm"), ({"steps": 0}, "steps"),
                                    ({"eps": float("nan")}, "eps"), ({"sites": ("audio",)}, "unknown site")])
def test_bad_settings_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        m = PGD(**kw)
        m.attack(build_model("clip", "nano"), make_batch("itc"), "itc")


def test_registry_lists_every_method():
    assert set(METHODS) >= {"fgsm", "fgm", "pgd", "freeat", "freelb", "smart", "yopo", "villa"}


@pytest.mark.parametrize("name,task,site,last", [
    ("single_stream", "itm", "text", lambda m: m.bert.encoder.layer[-1]),
    ("clip", "itc", "image", lambda m: m.clip.vision_model.post_layernorm),   # nano CLIP has one block
    ("clip", "itc", "text", lambda m: m.clip.text_model.final_layer_norm),
    ("albef", "itm", "text", lambda m: m.itm_head),                          # nano ALBEF: one text layer
    ("albef", "itm", "image", lambda m: m.itm_head)])
def test_yopo_inner_steps_run_layer_one_only(name, task, site, last):
    torch.manual_seed(0)
    model = build_model(name, "nano").train()
    calls = {"first": 0, "last": 0}
    first, _ = model.layer_one(site)
    first.register_forward_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1))
    last(model).register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    YOPO(sites=(site,), outer=3, inner=4)(ctx_for(model, task), make_batch(task))
    assert calls["last"] == 3                      # m full passes only: the rest never runs in inner steps
    assert calls["first"] == 3 + 3 * 4 + 3         # plus m*n layer-one passes, and m for the Hamiltonian's update


def test_yopo_inner_steps_raise_the_loss():
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("itm")
    ctx = ctx_for(model, "itm")
    clean = float(model(batch, "itm").loss.detach())
    seen = []
    orig = YOPO.ascend

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        seen.append(out)
        return out

    YOPO.ascend = spy
    try:
        YOPO(sites=("text",), outer=1, inner=5, eps=0.5, step_size=0.05, norm="l2")(ctx, batch)
    finally:
        YOPO.ascend = orig
    model.zero_grad()
    with torch.no_grad(), perturbed(model, seen[-1], batch):
        adv = float(model(batch, "itm").loss)
    assert adv > clean


@pytest.mark.parametrize("cls", ["WeightTableFGM", "WeightTablePGD"])
def test_weight_table_snippet_restores_the_embedding_matrix_before_the_update(cls):
    from vlat.adversarial import weight_table

    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    ctx = ctx_for(model, "itm")
    emb = model.bert.embeddings.word_embeddings.weight
    before = emb.detach().clone()
    seen = {}
    orig = ctx.optimizer.step
    ctx.optimizer.step = lambda *a, **k: (seen.setdefault("emb", emb.detach().clone()), orig(*a, **k))[1]
    getattr(weight_table, cls)(eps=0.5)(ctx, make_batch("itm"))
    assert torch.equal(seen["emb"], before)        # the perturbation never leaks into the weights
    assert not torch.equal(emb.detach(), before)   # and the update itself happened


@pytest.mark.parametrize("name,task,site", SITES)
def test_captured_site_gradient_equals_the_zero_delta_gradient(name, task, site):
    """The clean pass of FGM/PGD reads ∇_x L from the kept site output; it must equal ∇_δ L at δ = 0."""
    from vlat.adversarial.base import forward_capturing, site_grads

    torch.manual_seed(0)
    model = build_model(name, "nano").eval()
    batch = make_batch(task)
    out, outputs = forward_capturing(Frozen(model, task), batch, (site,))
    out.loss.backward()
    captured = site_grads(outputs)[site]
    model.zero_grad()
    zero = torch.zeros(model.perturbation_sites()[site].shape(batch), requires_grad=True)
    with perturbed(model, {site: zero}, batch):
        model(batch, task).loss.backward()
    mask = model.perturbation_sites()[site].mask(batch)
    assert captured.abs().sum() > 0
    assert torch.allclose(captured * mask, zero.grad, atol=1e-7)


def test_trace_records_every_inner_step():
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    fl = FreeLB(sites=("text",), steps=3, trace=True)
    fl(ctx_for(model, "itm"), make_batch("itm"))
    assert [r["step"] for r in fl.last_trace] == [0, 1, 2]
    pgd = PGD(sites=("image",), eps=0.5, steps=4, trace=True)
    pgd.attack(model.eval(), make_batch("itm"), "itm")
    assert len(pgd.last_trace) == 4 and all(r["|δ| image"] <= 0.5 + 1e-5 for r in pgd.last_trace)
    assert FreeLB(sites=("text",)).last_trace == []  # off by default: no host syncs in the inner loop


def test_smart_with_several_ascent_steps_raises_the_kl():
    """K > 1: each step ascends from the last δ (δ must stay a leaf that takes gradients)."""
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("itm")
    clean = model(batch, "itm").logits.detach()
    one = SMART(sites=("text",), eps=0.5, step_size=0.1, sigma=1e-3, steps=1).regulariser(Frozen(model, "itm"), batch, clean)
    three = SMART(sites=("text",), eps=0.5, step_size=0.1, sigma=1e-3, steps=3).regulariser(Frozen(model, "itm"), batch, clean)
    assert float(three.detach()) > float(one.detach()) > 0


def test_site_norms_measure_the_masked_clean_input():
    """The text site's norm is the per-caption norm of its word embeddings over real tokens only."""
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("itm", 4)
    from vlat.adversarial import site_norms

    got = site_norms(model, batch, "itm", ("text", "image"))
    emb = (model.bert.embeddings.word_embeddings(batch["input_ids"]) * batch["attention_mask"].unsqueeze(-1)).detach()
    assert got["text"] == pytest.approx(float(emb.flatten(1).norm(dim=1).mean()), rel=1e-5)
    assert got["image"] > 10 * got["text"]        # raw region features dwarf word embeddings


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_calibrated_eps_is_a_fraction_of_each_sites_norm(norm):
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("itm", 4)
    pgd = PGD(sites=("text", "image"), norm=norm, eps=0.1, step_size=0.05, steps=3).calibrate(model, batch, "itm")
    deltas = pgd.attack(model, batch, "itm", generator=torch.Generator().manual_seed(0))
    for site, d in deltas.items():
        n = per_example_norm(d, norm)
        assert (n <= 0.1 * pgd.scales[site] * (1 + 1e-5)).all()
        assert n.max() > 0.05 * pgd.scales[site]   # it did move out to a real fraction of the ball
    assert pgd.scales["image"] > 10 * pgd.scales["text"]


@pytest.mark.parametrize("method", [s.cls for s in registry.specs() if not s.steps_mean.startswith("one step")],
                         ids=lambda m: m.__name__)
@pytest.mark.parametrize("name,task,site", [("single_stream", "itm", "text"), ("clip", "classify", "image"),
                                            ("albef", "itm", "text")])
def test_inner_maximisation_raises_its_objective(method, name, task, site):
    """The δ each method's attack() returns scores higher on its objective than its starting point."""
    torch.manual_seed(0)
    model = build_model(name, "nano").eval()
    batch = make_batch(task)
    fields = method.__dataclass_fields__
    kw = {"steps": 4} if "steps" in fields else {"replays": 4} if "replays" in fields else {"outer": 2}
    adv = at_site(method, site, norm="l2", eps=0.5, step_size=0.2, **kw)
    g = torch.Generator().manual_seed(0)
    deltas, losses = adv.attack(model, batch, task, generator=g, return_losses=True)
    run = Frozen(model, task)
    final = float(adv.objective(run, batch, deltas, adv.clean_reference(run, batch)).detach())
    assert final > losses[0]


def test_prediction_shift_agrees_with_robust_accuracy_and_vanishes_with_the_ball():
    from vlat.evaluate import prediction_shift, robust_accuracy
    from vlat.world import WorldDataset

    torch.manual_seed(0)
    model = build_model("single_stream", "nano").eval()
    data = WorldDataset("itm", "test", 24)
    attack = PGD(sites=("image",), eps=1.0, step_size=0.3, steps=3)
    shift = prediction_shift(model, data, "itm", attack)
    assert shift["kl"].shape == (24,) and (shift["kl"] >= -1e-6).all() and shift["kl"].max() > 0
    assert float(shift["robust"].mean()) == pytest.approx(robust_accuracy(model, data, "itm", attack))
    none = prediction_shift(model, data, "itm", PGD(sites=("image",), steps=1, eps=1e-12, step_size=1e-12))
    assert torch.allclose(none["kl"], torch.zeros(24), atol=1e-6)
    assert torch.allclose(none["conf"], none["conf_adv"], atol=1e-6)


# ---- one inner maximisation per method, shared by training and attack() --------------------------
def test_fgm_attack_returns_losses_like_every_other_method():
    """FGM.attack(..., return_losses=True) used to raise TypeError (FGM overrode attack without it)."""
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").eval()
    batch = make_batch("itm")
    deltas, losses = FGM(sites=("text",), eps=0.5).attack(model, batch, "itm", return_losses=True)
    assert len(losses) == 1 and losses[0] == pytest.approx(float(model(batch, "itm").loss.detach()), rel=1e-5)
    assert per_example_norm(deltas["text"]).max() == pytest.approx(0.5, rel=1e-5)


def test_fgm_training_step_perturbs_with_the_attack_delta():
    """The training step's δ (from the clean backward's site gradient) is the δ attack() returns."""
    torch.manual_seed(0)
    model = build_model("clip", "nano").eval()          # eval: no dropout, so both see one network
    batch = make_batch("itc")
    fgm = FGM(sites=("image",), eps=0.3)
    want = fgm.attack(model, batch, "itc")["image"]
    seen = {}
    orig = fgm.maximize

    def spy(*a, **k):
        seen["d"] = orig(*a, **k)
        return seen["d"]

    fgm.maximize = spy
    fgm(ctx_for(model, "itc"), batch)
    assert torch.allclose(seen["d"]["image"], want, atol=1e-6)


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.name)
def test_training_and_attack_run_the_same_inner_maximisation(spec):
    """Every method's training step goes through its maximize() (the loop attack() runs)."""
    torch.manual_seed(0)
    model = build_model("single_stream", "nano").train()
    batch = make_batch("itm")
    adv = spec.build(("text",), 0.5, 2)
    calls = []
    orig = adv.maximize
    adv.maximize = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    adv(ctx_for(model, "itm"), batch)
    assert calls, f"{spec.name}'s training step does not run maximize()"


def test_villa_checks_site_modality():
    """PerturbationSite.modality is what VILLA checks its text and image sites against."""
    model = build_model("single_stream", "nano")
    with pytest.raises(ValueError, match="text site"):
        VILLA(modality="image", image_site="text").attack(model, make_batch("itm"), "itm")
    with pytest.raises(ValueError, match="image site"):
        VILLA(modality="text", text_site="pixels").attack(model, make_batch("itm"), "itm")


def test_no_kind_checks_or_method_lists_outside_their_homes():
    """Model families dispatch through the model contract; method names live in the registry only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for d in ("vlat", "apps", "benchmarks", "scripts", "tests") for p in (root / d).rglob("*.py")]
    files += list((root / "notebooks" / "src").glob("*.py"))
    kind = [p for p in files if "models" not in p.parts and re.search(r"\.kind\s*[!=]=|kind\s*[!=]=\s*[\"'](single_stream|clip|albef)", p.read_text())]
    assert not kind
    names = registry.names()
    lists = []
    for p in files:
        if p.parent.name == "adversarial":
            continue
        for m in re.finditer(r"[\[(]([^\])]*)[\])]", p.read_text()):
            quoted = set(re.findall(r"[\"']([A-Za-z]+)[\"']", m.group(1)))
            if len({q.lower() for q in quoted} & set(names)) >= 3:
                lists.append((p.name, m.group(0)[:60]))
    assert not lists


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.name)
def test_every_registered_method_is_on_the_command_line(spec, capsys):
    """`vlat train --help` lists it with its paper year, and its options are flags there."""
    from vlat.cli import main

    assert spec.paper.url.startswith("https://")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())          # argparse wraps its lines
    assert f"{spec.name} (" in out and str(spec.paper.year) in out
    assert all(o.cli in out for o in spec.options)

