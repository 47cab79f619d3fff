"""Time one explorer interaction: PGD-10 on one pair with every panel (attack, prediction, attention,
captum attributions and the five plotly figures), for each shipped tiny model.

    python benchmarks/explorer_speed.py            # median of 10 runs per model; target < 0.5 s on CPU

Run it on an otherwise idle machine: the target is for one interaction on 2 CPU cores, and a second job
on the same cores (a test suite) doubles the times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlat.explain.pair import explore  # noqa: E402
from vlat.explain.views import all_figures  # noqa: E402
from vlat.models import load_model, model_tokenizer  # noqa: E402
from vlat.resources import checkpoint, sample_pairs  # noqa: E402

TARGET = 0.5   # seconds per interaction (issue 20)
CHECKPOINTS = {"single-stream tiny": "single_stream_tiny_itm", "CLIP tiny": "clip_tiny_itc",
               "ALBEF tiny": "albef_tiny_pretrain"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--modality", default="both")
    a = ap.parse_args(argv)
    image = sample_pairs() / "images" / "00002.png"
    caption = "a purple circle left of a red circle"
    print(f"PGD-10 on {a.modality}, one pair, every panel; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | median s (all) | attack | attributions | figures | target |")
    print("|---|---|---|---|---|---|")
    for label, name in CHECKPOINTS.items():
        model = load_model(checkpoint(name))
        tok = model_tokenizer(model)
        explore(model, tok, image, caption, "PGD", a.modality, 0.1, 10)          # warm-up
        rows = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            ex = explore(model, tok, image, caption, "PGD", a.modality, 0.1, 10)
            t_fig = time.perf_counter()
            all_figures(ex)
            end = time.perf_counter()
            rows.append((end - t, ex.seconds["attack"], ex.seconds["attributions"], end - t_fig))
        med = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(f"| {label} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} | {med[3]:.3f} | "
              f"{'ok' if med[0] < TARGET else 'OVER'} (< {TARGET} s) |")


if __name__ == "__main__":
    main()
