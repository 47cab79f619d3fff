"""Cost of each method per training batch, relative to a clean step (docs/methods.md#costs).

    python benchmarks/methods_cost.py [--model single_stream] [--preset tiny] [--batch 64] [--repeats 10]

For every method on the same model and batch: median time per batch / median clean time per batch,
printed beside the method's pass count, and (on CUDA) peak memory / clean peak memory. Target: every
ratio <= 1.15 x its pass count. Also times our FGM and PGD against the common "weight-table" snippet
(perturbing the embedding matrix; :mod:`vlat.adversarial.weight_table`). Runs on CUDA when present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlat.adversarial import registry  # noqa: E402
from vlat.adversarial.weight_table import WeightTableFGM, WeightTablePGD  # noqa: E402
from vlat.models import build_model  # noqa: E402
from vlat.train import StepContext, TrainConfig, clean_step, to_device  # noqa: E402
from vlat.world import Collator, WorldDataset, load_tokenizer  # noqa: E402

K = 3


def methods(site: str):
    """``(name, step)`` for clean training and every registered method, as its explorer preset with K steps
    at an absolute radius (8/255 L-inf on pixels, 0.05 elsewhere): the pass count depends on K, not ε."""
    pix = site == "pixels"
    eps = 8 / 255 if pix else 0.05
    rows = [("clean", None, clean_step)]
    for spec in registry.specs():
        step = spec.build((site,), eps, K)
        if pix and "norm" in step.__dataclass_fields__:
            step.norm = "linf"
        rows.append((f"{spec.label} ({spec.steps_mean.split(' (')[0]} = {K})" if not spec.steps_mean.startswith("one step")
                     else spec.label, spec, step))
    return rows


def time_step(step, model, task, batch, device, repeats: int, config: TrainConfig | None = None) -> tuple[float, int]:
    """Median seconds of one ``step`` call (after two warm-up calls) and, on CUDA, the peak memory."""
    config = config or TrainConfig(device=str(device), progress=False)
    ctx = StepContext.standalone(model, task, config, total_steps=10_000)
    for _ in range(2):  # warm-up
        step(ctx, batch)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        t = time.perf_counter()
        step(ctx, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return statistics.median(times), peak


def layer_one_fraction(model, site, batch, clean_time, repeats) -> float:
    """Time of one layer-one forward + δ-gradient, as a fraction of a clean training step."""
    from vlat.models.base import perturbed, run_layer_one

    shape = model.perturbation_sites()[site].shape(batch)
    times = []
    for _ in range(repeats + 2):
        d = torch.zeros(shape, device=batch["pixel_values"].device, requires_grad=True)
        t = time.perf_counter()
        with perturbed(model, {site: d}, batch):
            f0 = run_layer_one(model, site, batch)
        torch.autograd.grad(f0.sum(), [d])
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) / clean_time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="single_stream", help="single_stream or clip")
    ap.add_argument("--preset", default="tiny", help="model preset")
    ap.add_argument("--task", default=None, help="default: itm (single_stream) / itc (clip)")
    ap.add_argument("--site", default="text", help="text, image or pixels")
    ap.add_argument("--batch", type=int, default=64, help="batch size")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per method (median reported)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = a.task or ("itm" if a.model == "single_stream" else "itc")
    torch.manual_seed(0)
    model = build_model(a.model, a.preset).to(device).train()
    data = WorldDataset(task, size=a.batch, image_size=model.config.image_size)
    batch = to_device(Collator(load_tokenizer(), task)([data[i] for i in range(a.batch)]), device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"{a.model}/{a.preset}, task {task}, site {a.site}, batch {a.batch}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':<34}{'ms/batch':>10}{'ratio':>8}{'passes':>8}{'ratio/passes':>14}{'mem ratio':>11}")
    rows = methods(a.site)
    if a.site == "text":
        rows += [("weight-table FGM", None, WeightTableFGM()), (f"weight-table PGD-{K}", None, WeightTablePGD(steps=K))]
    # methods are timed in interleaved rounds: on a shared CPU, slow drifts of the machine then hit all
    # methods alike instead of whichever ran last
    rounds = 3
    samples = {name: [] for name, _, _ in rows}
    peaks = {name: 0 for name, _, _ in rows}
    for _ in range(rounds):
        for name, _, step in rows:
            model.load_state_dict(state)
            t, m = time_step(step, model, task, batch, device, max(1, a.repeats // rounds))
            samples[name].append(t)
            peaks[name] = max(peaks[name], m)
    results = {name: statistics.median(ts) for name, ts in samples.items()}
    base_t, base_m = results["clean"], peaks["clean"]
    frac = layer_one_fraction(model, a.site, batch, base_t, a.repeats)   # a layer-one pass, in clean steps
    print(f"  (layer one = {frac:.2f} of a clean step)")
    fixed = {"clean": 1, "weight-table FGM": 2, f"weight-table PGD-{K}": K + 1}
    for name, spec, step in rows:
        t, m = results[name], peaks[name]
        passes = round(fixed[name] if spec is None else spec.passes(step, frac), 2)
        ratio = t / base_t
        mem = f"{m / base_m:.2f}" if base_m else "-"
        flag = "" if ratio <= 1.15 * passes else "  over target"
        print(f"{name:<34}{1000 * t:>10.1f}{ratio:>8.2f}{passes:>8}{ratio / passes:>14.2f}{mem:>11}{flag}")
    if "weight-table FGM" in results:
        ours = {spec.name: name for name, spec, _ in rows if spec is not None}
        print(f"\nours / weight-table: FGM {results[ours['fgm']] / results['weight-table FGM']:.2f}, "
              f"PGD-{K} {results[ours['pgd']] / results[f'weight-table PGD-{K}']:.2f} (<= 1 means ours is no slower)")


if __name__ == "__main__":
    main()
