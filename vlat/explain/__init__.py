"""Views shared by the notebooks and the explorer: functions that return plotly figures."""

from vlat.explain.figures import loss_curve, ood_bars, scene_grid

__all__ = ["loss_curve", "ood_bars", "scene_grid"]
