"""Plotly figures of an :class:`~vlat.explain.pair.Exploration`, one per explorer panel."""

from __future__ import annotations

import torch

from vlat.explain.figures import image_array
from vlat.explain.pair import Exploration
from vlat.explain.perturbation import magnify

HEIGHT = 300


def _row(titles, panels, colorscale="Inferno"):
    """One row of panels: a ``[3, H, W]`` tensor is drawn as an image, an ``[h, w]`` one as a heat map
    (all heat maps of the row share one colour range, shown once)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(panels)
    fig = make_subplots(rows=1, cols=n, subplot_titles=titles, horizontal_spacing=0.06)
    grids = [p for p in panels if p.dim() == 2]
    zmax = max([float(g.max()) for g in grids] + [1e-12])
    last = max(i for i, p in enumerate(panels, start=1) if p.dim() == 2) if grids else 0
    for i, p in enumerate(panels, start=1):
        if p.dim() == 3:
            fig.add_trace(go.Image(z=image_array(p)), row=1, col=i)
            continue
        fig.add_trace(go.Heatmap(z=p.float().numpy(), colorscale=colorscale, zmin=0, zmax=zmax, showscale=i == last,
                                 colorbar=dict(len=0.9, thickness=12)), row=1, col=i)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i}", row=1, col=i)
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_layout(height=HEIGHT, margin=dict(l=5, r=5, t=40, b=5))
    return fig


def perturbation_figure(ex: Exploration):
    """Where δ went in the image: ‖δ‖ per patch over the image (pixel mode: δ magnified and x + δ too)."""
    if ex.patch_delta is None:
        return _note("no image perturbation (text only)")
    if ex.pixel_delta is None:
        return _row(["image", "‖δ‖ per patch"], [ex.image, ex.patch_delta])
    d = ex.pixel_delta.float()
    return _row(["image", "‖δ‖ per patch", "δ magnified", "x + δ"],
                [ex.image, ex.patch_delta, magnify(d), (ex.image + d).clamp(0, 1)])


def _note(text: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_layout(height=120, margin=dict(l=5, r=5, t=5, b=5))
    return fig


def token_figure(ex: Exploration):
    """‖δ‖ on each caption token (special tokens included)."""
    if ex.token_delta is None:
        return _note("no text perturbation (image only)")
    from vlat.explain.perturbation import token_bars

    return token_bars(ex.tokens, ex.token_delta, title="‖δ‖ per caption token")


def attention_figure(ex: Exploration):
    """The image, and the model's image attention (rollout / cross-attention) before and after δ."""
    return _row(["image", "attention, clean", "attention, attacked"],
                [ex.image, ex.attention_clean, ex.attention_adv], colorscale="Viridis")


def confidence_figure(ex: Exploration, top: int = 5):
    """Probabilities before and after δ (the top outcomes), and KL(p‖p_adv), KL(p_adv‖p), their sum."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    order = [0, 1] if ex.task == "itm" else \
        torch.argsort(torch.maximum(ex.probs_clean, ex.probs_adv), descending=True)[:top].tolist()
    names = [_short(ex.names[i]) for i in order]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.68, 0.32],
                        subplot_titles=("prediction before and after", "divergence"))
    fig.add_trace(go.Bar(name="clean", x=names, y=[float(ex.probs_clean[i]) for i in order],
                         marker_color="#4C78A8"), row=1, col=1)
    fig.add_trace(go.Bar(name="attacked", x=names, y=[float(ex.probs_adv[i]) for i in order],
                         marker_color="#E45756"), row=1, col=1)
    fig.add_trace(go.Bar(x=["KL(p‖p_adv)", "KL(p_adv‖p)", "symmetric"], y=list(ex.kl.values()),
                         marker_color="#72B7B2", showlegend=False,
                         text=[f"{v:.3f}" for v in ex.kl.values()], textposition="outside"), row=1, col=2)
    fig.update_yaxes(range=[0, 1], title_text="probability", row=1, col=1)
    fig.update_layout(barmode="group", height=HEIGHT + 40, margin=dict(l=5, r=5, t=40, b=5),
                      legend=dict(orientation="h", yanchor="top", y=-0.12, x=0))
    return fig


def _short(s: str, n: int = 28) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def attribution_figure(ex: Exploration):
    """captum integrated gradients of the predicted outcome: per caption token and per image patch
    (red: pushes towards the prediction; blue: against it)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if ex.ig_tokens is None:
        return _note("attributions were not computed")
    t = [float(v) for v in ex.ig_tokens]
    fig = make_subplots(rows=1, cols=3, column_widths=[0.5, 0.25, 0.25], horizontal_spacing=0.06,
                        subplot_titles=("tokens", "image", "patches"))
    fig.add_trace(go.Bar(x=list(range(len(t))), y=t, marker_color=["#D62728" if v > 0 else "#1F77B4" for v in t],
                         showlegend=False), row=1, col=1)
    fig.update_xaxes(tickvals=list(range(len(t))), ticktext=ex.tokens, row=1, col=1)
    fig.add_trace(go.Image(z=image_array(ex.image)), row=1, col=2)
    z = ex.ig_patches.float()
    m = float(z.abs().max()) or 1.0
    fig.add_trace(go.Heatmap(z=z.numpy(), colorscale="RdBu", reversescale=True, zmin=-m, zmax=m, zmid=0,
                             colorbar=dict(len=0.9, thickness=12)), row=1, col=3)
    fig.update_yaxes(autorange="reversed", scaleanchor="x3", row=1, col=3)
    for c in (2, 3):
        fig.update_xaxes(visible=False, row=1, col=c).update_yaxes(visible=False, row=1, col=c)
    fig.update_layout(height=HEIGHT, margin=dict(l=5, r=5, t=40, b=5))
    return fig


def all_figures(ex: Exploration) -> dict:
    """Every panel of the explorer, by name."""
    return {"perturbation": perturbation_figure(ex), "tokens": token_figure(ex), "attention": attention_figure(ex),
            "confidence": confidence_figure(ex), "attribution": attribution_figure(ex)}
