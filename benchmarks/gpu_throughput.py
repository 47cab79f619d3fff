"""Training throughput and peak memory of a CLIP ViT-B/32-sized model, clean and under every method.

    python benchmarks/gpu_throughput.py [--size vitb32] [--batch 128] [--site image] [--repeats 6]
                                        [--amp auto] [--grad-checkpointing]

The model has CLIP ViT-B/32's sizes with random weights (no download): a 12-block, 768-wide vision
transformer on 224 x 224 images in 32 x 32 patches, a 12-block, 512-wide text transformer over a 49,408-word
vocabulary, 512-d projections. (vlat's ``ClipConfig`` has one head count for both towers: 8 here, where
OpenAI's vision tower has 12; heads split the same width, so the work per step is the same.) Each method
is its explorer preset with K = 3 ascent steps at one site (``methods_cost.methods``), trained with the
loop's own autocast (``--amp auto``: bf16 where the GPU has it, else fp16 with a loss scaler).

Printed per row: samples/s, peak memory (CUDA), the time and memory ratio to clean training, the
method's pass count (``MethodSpec.passes``) and ratio / passes; a row over 1.10 x its pass count is
flagged. ``--size nano`` is a seconds-long smoke run for a CPU (no meaningful numbers there).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods_cost import layer_one_fraction, methods, time_step  # noqa: E402

from vlat.models.clip import PRESETS, ClipConfig, ClipDualEncoder  # noqa: E402
from vlat.train import TrainConfig, to_device  # noqa: E402
from vlat.world import Collator, WorldDataset, load_tokenizer  # noqa: E402

SIZES = {
    "vitb32": ClipConfig(vocab_size=49408, text_hidden=512, text_layers=12, vision_hidden=768, vision_layers=12,
                         num_heads=8, projection_dim=512, image_size=224, patch_size=32, max_text_len=77),
    "nano": PRESETS["nano"],
}
TARGET = 1.10          # time ratio per clean pass a method may cost


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="vitb32", help="vitb32 (GPU) or nano (CPU smoke run)")
    ap.add_argument("--batch", type=int, default=128, help="examples per training step")
    ap.add_argument("--site", default="image", help="where the methods perturb: text, image or pixels")
    ap.add_argument("--repeats", type=int, default=6, help="timed steps per method (median reported)")
    ap.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"], help="autocast dtype")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    ap.add_argument("--methods", default=None, help="comma-separated display names (default: all)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = ClipDualEncoder(SIZES[a.size]).to(device).train()
    if a.grad_checkpointing:
        model.checkpoint_activations()
    data = WorldDataset("itc", size=a.batch, image_size=model.config.image_size)
    batch = to_device(Collator(load_tokenizer(), "itc")([data[i] for i in range(a.batch)]), device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    config = TrainConfig(device=str(device), amp=a.amp, progress=False)
    print(f"CLIP {a.size} ({params:.1f}M parameters, random weights), itc, batch {a.batch}, site {a.site}, "
          f"amp {a.amp}{', gradient checkpointing' if a.grad_checkpointing else ''}; {describe_device(device)}, "
          f"torch {torch.__version__}")
    rows_in = methods(a.site)
    if a.methods:
        keep = {m.strip().lower() for m in a.methods.split(",")} | {"clean"}
        rows_in = [r for r in rows_in if r[0].split(" (")[0].lower() in keep]
    rows = []
    for name, spec, step in rows_in:
        model.load_state_dict(state)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        seconds, peak = time_step(step, model, "itc", batch, device, a.repeats, config)
        rows.append({"method": name, "spec": spec, "step": step, "seconds": seconds, "peak": peak})
    clean = rows[0]
    frac = layer_one_fraction(model, a.site, batch, clean["seconds"], a.repeats)
    print(f"(a layer-one pass costs {frac:.2f} of a clean step)")
    print(f"{'method':<34}{'samples/s':>11}{'peak GiB':>10}{'time ratio':>12}{'mem ratio':>11}{'passes':>8}"
          f"{'ratio/passes':>14}")
    for r in rows:
        passes = 1.0 if r["spec"] is None else round(r["spec"].passes(r["step"], frac), 2)
        r["samples_per_s"] = a.batch / r["seconds"]
        r["ratio"] = r["seconds"] / clean["seconds"]
        r["passes"] = passes
        mem = f"{r['peak'] / clean['peak']:.2f}" if clean["peak"] else "-"
        gib = f"{r['peak'] / 2**30:.2f}" if r["peak"] else "-"
        flag = "" if r["ratio"] <= TARGET * passes else "  over target"
        print(f"{r['method']:<34}{r['samples_per_s']:>11.1f}{gib:>10}{r['ratio']:>12.2f}{mem:>11}{passes:>8}"
              f"{r['ratio'] / passes:>14.2f}{flag}")
    return [{k: v for k, v in r.items() if k not in ("spec", "step")} for r in rows]


if __name__ == "__main__":
    main()
