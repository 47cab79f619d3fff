"""Scenes generated per second on one core: ``python benchmarks/world_speed.py [N]``.

Times drawing and rendering (64x64) of N scenes for ID and every rendering shift, with torch and
numpy limited to one thread. Target: >= 2,000 scenes/s for the default (ID) rendering.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
import time

import numpy as np

from vlat.world.scenes import SHIFTS, make_scene, render


def scenes_per_second(n: int, shift=None, size: int = 64) -> float:
    t = time.perf_counter()
    for i in range(n):
        rng = np.random.default_rng((0, 0, 0, i))
        render(make_scene(rng, shift=shift), size, shift, rng)
    return n / (time.perf_counter() - t)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    scenes_per_second(200)  # warm-up
    print(f"{'shift':<12} scenes/s (64x64, one core, {n} scenes)")
    for shift in (None, *SHIFTS):
        rate = scenes_per_second(n, shift)
        print(f"{shift or 'id':<12} {rate:8.0f}   ratio to 2,000/s target: {rate / 2000:.2f}")
