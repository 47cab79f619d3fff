import json
import math

import pytest
import torch

from conftest import interrupted_at, make_batch
from vlat.cli import main as vlat
from vlat.evaluate import recall_at_k
from vlat.models import build_model, load_model
from vlat.train import TrainConfig, clean_step, make_optimizer, train
from vlat.world import Collator, WorldDataset


def _run(tmp_path, tok, **kw):
    torch.manual_seed(0)
    model = build_model("single_stream", "nano")
    data = WorldDataset("itm", size=48)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-3, out_dir=str(tmp_path), progress=False, **kw)
    return model, data, cfg


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tok):
    model, data, cfg = _run(tmp_path / "full", tok)
    full = train(model, "itm", data, cfg, collate_fn=Collator(tok, "itm"))
    assert len(full.losses) == 9
    # the same run crashes during step 5 (mid-epoch 2) after a checkpoint at step 4 ...
    model, data, cfg = _run(tmp_path / "part", tok, save_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(model, "itm", data, cfg, step_fn=interrupted_at(5), collate_fn=Collator(tok, "itm"))
    # ... and is resumed in a fresh process-like setting: new model, new data, scrambled global RNG
    model2, data2, cfg2 = _run(tmp_path / "part", tok)
    torch.manual_seed(123)
    resumed = train(model2, "itm", data2, cfg2, collate_fn=Collator(tok, "itm"),
                    resume=tmp_path / "part" / "last.safetensors")
    assert resumed.losses == full.losses  # exact, not approximately
    b = make_batch("itm")
    final = load_model(tmp_path / "full" / "last.safetensors")
    assert torch.equal(final(b, "itm").logits, model2.eval()(b, "itm").logits)


def test_non_finite_batches_are_skipped_and_counted(tmp_path, tok):
    model, data, cfg = _run(tmp_path, tok, max_steps=5)
    calls = {"n": 0}

    def step(ctx, batch):
        calls["n"] += 1
        out = ctx.forward(batch)
        loss = out.loss * (float("nan") if calls["n"] in (2, 4) else 1.0)
        ctx.backward(loss)
        ctx.optimizer_step(loss)
        return loss.detach()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = train(model, "itm", data, cfg, step_fn=step, collate_fn=Collator(tok, "itm"))
    assert state.skipped == 2 and state.step == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_schedule_warms_up_then_decays_to_zero():
    model = build_model("clip", "nano")
    opt, sched = make_optimizer(model, TrainConfig(lr=1.0, warmup_frac=0.1), total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)), abs=0.02)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_clean_step_matches_a_hand_written_update(tok):
    torch.manual_seed(0)
    a = build_model("clip", "nano")
    b = build_model("clip", "nano")
    b.load_state_dict(a.state_dict())
    batch = make_batch("itc", n=8)
    cfg = TrainConfig(lr=1e-2, grad_clip=0.0, device="cpu")
    from vlat.train import StepContext

    clean_step(StepContext.standalone(a, "itc", cfg, total_steps=10), batch)
    opt_b, _ = make_optimizer(b, cfg, 10)
    b(batch, "itc").loss.backward()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb)


def test_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    truth = torch.eye(3, dtype=torch.bool)
    r = recall_at_k(scores, truth, ks=(1, 2))
    # rows: image0 -> caption0 (hit), image1 -> caption2 (miss), image2 -> caption0 (miss)
    assert r["TR@1"] == pytest.approx(1 / 3)
    # top-2: image1 -> {2, 1} hit, image2 -> {0, 1} miss
    assert r["TR@2"] == pytest.approx(2 / 3)
    # columns: caption0 -> image0 (hit), caption1 -> image2 (miss), caption2 -> image1 (miss)
    assert r["IR@1"] == pytest.approx(1 / 3)


def test_cli_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    code = vlat(["train", "--model", "clip", "--preset", "nano", "--epochs", "1", "--train-size", "64",
                 "--batch-size", "32", "--out", str(out), "--eval-size", "20", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed and "sketch" in printed
    assert (out / "model.safetensors").is_file() and json.loads((out / "history.json").read_text())["step"] == 2
    code = vlat(["eval", "--checkpoint", str(out / "model.safetensors"), "--eval-size", "20", "--shifts",
                 "sketch", "--json", str(tmp_path / "t.json")])
    assert code == 0
    table = json.loads((tmp_path / "t.json").read_text())
    assert set(table) == {"id", "sketch", "ood_mean"} and 0 <= table["id"] <= 1


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert vlat(["train", "--model", "uniter", "--out", str(tmp_path)]) == 2
    assert "unknown model 'uniter'" in capsys.readouterr().err
    assert vlat(["eval", "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    assert vlat(["eval", "--checkpoint", str(tmp_path / "bad.safetensors")]) == 2
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vlat(["train", "--task", "vqa"])


def test_help_explains_every_option(capsys):
    from vlat.cli import build_parser

    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"option {action.option_strings} has no help"


def test_cli_adversarial_training_and_robust_eval(tmp_path, capsys):
    out = tmp_path / "adv"
    assert vlat(["train", "--model", "single_stream", "--preset", "nano", "--method", "pgd", "--sites", "text,image",
                 "--steps", "2", "--eps", "0.5", "--epochs", "1", "--train-size", "32", "--batch-size", "16",
                 "--out", str(out), "--eval-size", "16", "--no-progress"]) == 0
    assert vlat(["eval", "--checkpoint", str(out / "model.safetensors"), "--eval-size", "16", "--shifts", "none",
                 "--attack", "pgd", "--site", "pixels", "--steps", "2", "--json", str(tmp_path / "r.json")]) == 0
    table = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= table["robust_pgd_pixels"] <= table["id"]
    capsys.readouterr()
    assert vlat(["train", "--model", "clip", "--method", "freeat", "--init-mag", "2", "--out", str(out)]) == 2
    assert "does not apply to freeat" in capsys.readouterr().err
    assert vlat(["train", "--model", "clip", "--method", "fgm", "--eps", "-1", "--out", str(out)]) == 2
    assert "eps must lie in" in capsys.readouterr().err


def test_version_license_and_citation_agree_with_the_package(capsys):
    """`vlat --version` prints the package version; LICENSE and CITATION.cff match pyproject."""
    import tomllib
    from pathlib import Path

    import vlat
    from vlat.cli import main

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vlat {vlat.__version__}"
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert meta["version"] == vlat.__version__
    assert meta["license"]["text"] == "MIT" and (root / "LICENSE").read_text().startswith("MIT License")
    cff = (root / "CITATION.cff").read_text()
    assert f"version: {vlat.__version__}" in cff and "license: MIT" in cff


@pytest.mark.parametrize("name", ["clean", *__import__("vlat.adversarial", fromlist=["registry"]).registry.names()])
def test_gradient_accumulation_equals_the_large_batch(name, tok, monkeypatch):
    """The gradient an update applies, from a batch of 8 in 2 or 4 micro-batches, is the batch of 8's (the
    single-stream model: examples do not interact in a batch). FreeAT, which steps inside its batch,
    refuses accumulation."""
    from vlat.adversarial import registry
    from vlat.train import StepContext
    from vlat.world import WorldDataset

    applied = []
    real = StepContext.optimizer_step

    def spy(self, loss=None):
        if self.micro == self.micros - 1:        # the accumulated gradient, as the optimiser gets it
            applied.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        return real(self, loss)

    monkeypatch.setattr(StepContext, "optimizer_step", spy)

    def run(k):
        applied.clear()
        torch.manual_seed(0)
        model = build_model("single_stream", "nano", dropout=0.0)
        step = clean_step if name == "clean" else registry.get(name).cls()
        train(model, "itm", WorldDataset("itm", "train", 16, seed=0), TrainConfig(batch_size=8, max_steps=2,
              device="cpu", progress=False, grad_accum=k), step_fn=step, collate_fn=Collator(tok, "itm"))
        return list(applied)

    one = run(1)
    if name == "freeat":
        with pytest.raises(ValueError, match="several optimiser steps"):
            run(2)
        return
    for k in (2, 4):
        parts = run(k)
        assert len(parts) == len(one) == 2
        a, b = one[0], parts[0]       # the first update (Adam turns float noise of near-zero gradients into
        assert a.keys() == b.keys()   # lr-sized steps, so later updates start from slightly other weights)
        for key in a:                 # to float error: sums in another order (SMART's per-token scaling: 5e-5)
            assert (b[key] - a[key]).abs().max() <= 1e-4 * a[key].abs().max() + 1e-6, (k, key)


def test_dataloader_workers_train_exactly_like_the_training_process(tmp_path, tok):
    """Batches prepared by two worker processes are the ones the loop collates itself (same order, same
    content), so the run's losses and final weights are equal; a max_steps stop mid-epoch still resumes."""
    runs = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        model = build_model("clip", "nano")
        cfg = TrainConfig(epochs=2, batch_size=8, max_steps=5, progress=False, workers=workers, device="cpu")
        state = train(model, "itc", WorldDataset("itc", size=24), cfg, collate_fn=Collator(tok, "itc"))
        runs[workers] = (state, model)
    (s0, m0), (s2, m2) = runs[0], runs[2]
    assert len(s0.losses) == 5 and s0.losses == s2.losses
    assert (s0.epoch, s0.batch_in_epoch) == (s2.epoch, s2.batch_in_epoch) == (1, 2)   # stopped mid-epoch 2
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        TrainConfig(workers=-1)


@pytest.mark.parametrize("family,task", [("single_stream", "itm"), ("clip", "itc"), ("albef", "pretrain")])
def test_activation_checkpointing_leaves_gradients_unchanged(family, task, monkeypatch):
    """Recomputing the blocks' activations in the backward (``checkpoint_activations``) gives the same loss
    and gradients, for a clean step and a PGD step, and really goes through torch.utils.checkpoint."""
    import torch.utils.checkpoint as tuc

    from vlat.adversarial import PGD

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = make_batch(task, n=4)

    def grads(checkpointing):
        torch.manual_seed(0)
        model = build_model(family, "nano").train()
        if checkpointing:
            model.checkpoint_activations()
        pgd = PGD(sites=("text",), eps=0.05, step_size=0.02, steps=2)
        torch.manual_seed(1)
        deltas = pgd.attack(model, batch, task)
        from vlat.models.base import perturbed

        with perturbed(model, deltas, batch):
            loss = model(batch, task).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = grads(False)
    assert not calls
    ck_loss, ck = grads(True)
    assert calls, "no block was checkpointed"
    assert torch.allclose(plain_loss, ck_loss, atol=1e-6) and plain.keys() == ck.keys()
    for n in plain:
        assert torch.allclose(plain[n], ck[n], atol=1e-6, rtol=1e-4), n
