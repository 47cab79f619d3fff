"""Plotly figures of an :class:`~vlat.explain.pair.Exploration`, one per explorer panel."""

from __future__ import annotations

import torch

from vlat.explain.figures import image_array
from vlat.explain.pair import Exploration
from vlat.explain.perturbation import magnify, numbered

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


def outcome_order(ex: Exploration, top: int = 5) -> list[int]:
    """The outcomes a figure shows: both for ITM; else the caption (always) and the most likely others."""
    if ex.task == "itm":
        return [0, 1]
    ranked = torch.argsort(torch.maximum(ex.probs_clean, ex.probs_adv), descending=True).tolist()
    return [0] + [i for i in ranked if i != 0][:top - 1]


def probability_bars(fig, ex: Exploration, order: list[int], series, row: int) -> None:
    """Add horizontal bars of the outcomes ``order`` of ``ex`` to subplot ``row`` (column 1), one bar per
    ``(name, probabilities, colour)`` of ``series``: wrapped labels, the full outcome on hover."""
    import plotly.graph_objects as go

    labels = [wrap(ex.names[i]) for i in order]
    for name, probs, colour in series:
        fig.add_trace(go.Bar(name=name, y=labels, x=[float(probs[i]) for i in order], orientation="h",
                             marker_color=colour, hovertext=[ex.names[i] for i in order],
                             hovertemplate="%{hovertext}: %{x:.3f}<extra>" + name + "</extra>"), row=row, col=1)
    fig.update_xaxes(range=[0, 1], row=row, col=1)
    fig.update_yaxes(autorange="reversed", automargin=True, row=row, col=1)


def label_lines(ex: Exploration, order: list[int]) -> int:
    """Lines the wrapped labels of outcomes ``order`` take (a figure sizes its rows from it)."""
    return sum(wrap(ex.names[i]).count("<br>") + 1 for i in order)


def confidence_figure(ex: Exploration, top: int = 5):
    """Probabilities before and after δ (the outcomes as wrapped labels, the user's caption always among
    them and never cut; hover for the full text) and, under them, KL(p‖p_adv), KL(p_adv‖p) and their sum
    (stacked, not side by side, so that no label runs into another on a narrow screen)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    order = outcome_order(ex, top)
    lines = label_lines(ex, order)
    fig = make_subplots(rows=2, cols=1, row_heights=[max(2, lines), 3], vertical_spacing=0.2,
                        subplot_titles=("probability before and after δ", "KL divergence"))
    probability_bars(fig, ex, order, (("clean", ex.probs_clean, "#4C78A8"), ("attacked", ex.probs_adv, "#E45756")), 1)
    kl = list(ex.kl.values())
    fig.add_trace(go.Bar(y=["KL(p‖p_adv)", "KL(p_adv‖p)", "symmetric"], x=kl, orientation="h", marker_color="#72B7B2",
                         showlegend=False, text=[f"{v:.3f}" for v in kl], textposition="outside", cliponaxis=False,
                         hovertemplate="%{y} %{x:.4f}<extra></extra>"), row=2, col=1)
    fig.update_xaxes(range=[0, 1.3 * max(kl + [1e-3])], row=2, col=1)
    fig.update_yaxes(autorange="reversed", automargin=True, row=2, col=1)
    fig.update_layout(barmode="group", height=170 + 20 * lines + 110, margin=dict(l=5, r=5, t=60, b=5),
                      legend=dict(orientation="h", yanchor="bottom", y=1.06, x=0))
    return fig


def wrap(text: str, width: int = 22) -> str:
    """``text`` on lines of at most ``width`` characters (at spaces; a longer word gets a line of its own),
    joined with ``<br>`` for a plotly label: long captions are wrapped, never cut."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "<br>".join(lines + [line] if line else lines)


def attribution_figure(ex: Exploration):
    """captum integrated gradients of the predicted outcome: per caption token and per image patch
    (red: pushes towards the prediction; blue: against it)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if ex.ig_tokens is None:
        return _note("attributions were not computed")
    t = [float(v) for v in ex.ig_tokens]
    fig = make_subplots(rows=1, cols=3, column_widths=[0.4, 0.3, 0.3], horizontal_spacing=0.08,
                        subplot_titles=("tokens", "image", "patches"))
    fig.add_trace(go.Bar(y=numbered(ex.tokens), x=t, orientation="h", showlegend=False,
                         marker_color=["#D62728" if v > 0 else "#1F77B4" for v in t],
                         hovertemplate="%{y}: %{x:.4f}<extra></extra>"), row=1, col=1)
    fig.update_yaxes(autorange="reversed", automargin=True, tickfont_size=11, row=1, col=1)
    fig.update_xaxes(nticks=4, row=1, col=1)
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


def setting(ex: Exploration) -> str:
    """A short name of an exploration's setting: method, modality and ε (for legends and titles)."""
    return f"{ex.method} {ex.modality} ε={ex.eps:g}"


def comparison_figure(a: Exploration, b: Exploration):
    """Two settings on the same pair, stacked so that it reads on a phone too: where each δ went in the
    image (side by side, one colour range), the prediction clean / under A / under B, and each one's
    objective per ascent step (one point for a one-step method); the legend names A and B."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = (setting(a), setting(b))
    order = outcome_order(a, 4)
    lines = label_lines(a, order)
    fig = make_subplots(rows=3, cols=2, specs=[[{}, {}], [{"colspan": 2}, None], [{"colspan": 2}, None]],
                        row_heights=[4, max(3, lines), 3], vertical_spacing=0.09, horizontal_spacing=0.06,
                        subplot_titles=("A: ‖δ‖ per patch", "B: ‖δ‖ per patch", "prediction", "objective per step"))
    grids = [ex.patch_delta for ex in (a, b)]
    zmax = max([float(g.max()) for g in grids if g is not None] + [1e-12])
    for col, g in enumerate(grids, start=1):
        if g is None:                                  # text only: no image δ to show
            fig.add_trace(go.Image(z=image_array(a.image)), row=1, col=col)
            continue
        fig.add_trace(go.Heatmap(z=g.float().numpy(), colorscale="Inferno", zmin=0, zmax=zmax, showscale=col == 2,
                                 colorbar=dict(len=0.3, y=0.86, thickness=10)), row=1, col=col)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{col}", row=1, col=col)
    for col in (1, 2):
        fig.update_xaxes(visible=False, row=1, col=col).update_yaxes(visible=False, row=1, col=col)
    probability_bars(fig, a, order, (("clean", a.probs_clean, "#4C78A8"), (f"A: {names[0]}", a.probs_adv, "#E45756"),
                                     (f"B: {names[1]}", b.probs_adv, "#F58518")), 2)
    for ex, name, colour in ((a, "A", "#E45756"), (b, "B", "#F58518")):
        ys = ex.losses or [float("nan")]
        fig.add_trace(go.Scatter(x=list(range(1, len(ys) + 1)), y=ys, mode="lines+markers", line_color=colour,
                                 name=f"{name}: symmetric KL {ex.kl['symmetric KL']:.3f}"), row=3, col=1)
    fig.update_xaxes(dtick=1, row=3, col=1)
    fig.update_layout(barmode="group", height=640 + 18 * lines, margin=dict(l=5, r=5, t=40, b=5),
                      legend=dict(orientation="h", yanchor="top", y=-0.04, x=0))
    return fig


def all_figures(ex: Exploration) -> dict:
    """Every panel of the explorer, by name."""
    return {"perturbation": perturbation_figure(ex), "tokens": token_figure(ex), "attention": attention_figure(ex),
            "confidence": confidence_figure(ex), "attribution": attribution_figure(ex)}
