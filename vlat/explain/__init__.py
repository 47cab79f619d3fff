"""Views shared by the notebooks and the explorer: pure functions and functions that return plotly figures."""

from vlat.explain.figures import (ablation_bars, histograms, id_ood_scatter, loss_curve, ood_bars, scene_grid, similarity_heatmap,
                                  target_bars)
from vlat.explain.perturbation import adversarial_triptych, image_heatmap, patch_grid, token_bars, token_magnitudes

__all__ = ["ablation_bars", "adversarial_triptych", "histograms", "id_ood_scatter", "image_heatmap", "loss_curve", "ood_bars",
           "patch_grid", "scene_grid", "similarity_heatmap", "target_bars", "token_bars", "token_magnitudes"]
