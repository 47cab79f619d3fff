"""Plot helpers that return ``plotly`` figures (never show them), for notebooks and the app alike."""

from __future__ import annotations

import torch


def image_array(image: torch.Tensor):
    """``[3, H, W]`` in [0, 1] -> ``H x W x 3`` uint8, what ``go.Image`` draws."""
    return (image.detach().cpu().clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def scene_grid(images: torch.Tensor, titles: list[str] | None = None, cols: int = 4, size: int = 170):
    """Images ``[N, 3, H, W]`` (uint8 or float in [0, 1]) in a grid, each with a wrapped title."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    images = images.detach().cpu()
    imgs = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    n = len(imgs)
    rows = (n + cols - 1) // cols
    wrap = [("<br>".join([t[i:i + 28] for i in range(0, len(t), 28)]) if t else "") for t in (titles or [""] * n)]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=wrap, horizontal_spacing=0.02, vertical_spacing=0.12)
    for k, im in enumerate(imgs):
        fig.add_trace(go.Image(z=image_array(im)), row=k // cols + 1, col=k % cols + 1)
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_annotations(font_size=10)
    fig.update_layout(height=rows * size + 40, width=cols * size, margin=dict(l=5, r=5, t=40, b=5))
    return fig


def ood_bars(rows: dict[str, dict[str, float]], title: str = "ID vs OOD"):
    """Grouped bars: one group per column (``id`` and each shift), one bar per row (model or method)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, row in rows.items():
        cols = list(row)
        fig.add_bar(name=name, x=cols, y=[row[c] for c in cols], text=[f"{row[c]:.2f}" for c in cols])
    fig.update_layout(barmode="group", title=title, yaxis=dict(range=[0, 1], title="score"), height=380)
    return fig


def loss_curve(losses: list[float], title: str = "training loss", smooth: int = 10):
    """Per-step loss with a moving average."""
    import plotly.graph_objects as go

    avg = [sum(losses[max(0, i - smooth + 1):i + 1]) / len(losses[max(0, i - smooth + 1):i + 1])
           for i in range(len(losses))]
    fig = go.Figure()
    fig.add_scatter(y=losses, mode="lines", name="loss", opacity=0.35)
    fig.add_scatter(y=avg, mode="lines", name=f"mean of {smooth}")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", height=320)
    return fig


def similarity_heatmap(sim: torch.Tensor, rows: list[str], cols: list[str], title: str = "similarity"):
    """A ``[R, C]`` score matrix as a heat map with labelled rows (e.g. images) and columns (captions)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=sim.detach().float().cpu().numpy(), x=cols, y=rows, colorscale="Viridis"))
    fig.update_layout(title=title, height=120 + 28 * len(rows), yaxis=dict(autorange="reversed"),
                      xaxis=dict(tickangle=45), margin=dict(l=10, r=10, t=40, b=10))
    return fig


def target_bars(targets: dict[str, torch.Tensor], labels: list[str], title: str = "targets"):
    """Grouped bars of distributions over the same labels (one-hot vs soft targets, say)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, t in targets.items():
        fig.add_bar(name=name, x=labels, y=t.detach().float().cpu().tolist())
    fig.update_layout(barmode="group", title=title, yaxis=dict(title="probability"), height=330)
    return fig


def histograms(values: dict[str, torch.Tensor], title: str = "distribution", xaxis: str = "value", bins: int = 30):
    """Overlaid histograms, one per named 1-D tensor (e.g. the KL shift of two models under one attack)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, v in values.items():
        fig.add_histogram(x=v.detach().float().cpu().tolist(), name=name, opacity=0.6, nbinsx=bins)
    fig.update_layout(barmode="overlay", title=title, xaxis_title=xaxis, yaxis_title="examples", height=330)
    return fig


def ablation_bars(runs: list[dict], columns: list[str], title: str = "ablation", group: str = "method"):
    """Benchmark rows (one dict per run and seed, as the ``--json`` files hold them) as grouped bars of the
    mean over seeds with ± one standard deviation: one group per column, one bar per ``group`` value."""
    import statistics

    import plotly.graph_objects as go

    names = list(dict.fromkeys(r[group] for r in runs))
    fig = go.Figure()
    for name in names:
        rows = [r for r in runs if r[group] == name]
        means = [statistics.mean(r[c] for r in rows) for c in columns]
        sds = [statistics.stdev([r[c] for r in rows]) if len(rows) > 1 else 0.0 for c in columns]
        fig.add_bar(name=f"{name} (n={len(rows)})", x=columns, y=means, error_y=dict(type="data", array=sds))
    fig.update_layout(barmode="group", title=title, yaxis=dict(range=[0, 1], title="accuracy"), height=400)
    return fig


def id_ood_scatter(points: dict[str, tuple[float, float]], title: str = "ID vs OOD", baseline: str | None = None):
    """Each method as a point (ID score, OOD-mean score); with ``baseline`` (a key of ``points``) a dashed line
    through it of slope 1: points above it have *effective robustness* (more OOD than their ID predicts)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, (x, y) in points.items():
        fig.add_scatter(x=[x], y=[y], mode="markers+text", name=name, text=[name], textposition="top center",
                        marker=dict(size=11))
    if baseline is not None:
        x0, y0 = points[baseline]
        xs = [min(p[0] for p in points.values()), max(p[0] for p in points.values())]
        fig.add_scatter(x=xs, y=[y0 + (x - x0) for x in xs], mode="lines", line=dict(dash="dash", color="grey"),
                        name=f"slope 1 through {baseline}")
    fig.update_layout(title=title, xaxis_title="ID", yaxis_title="OOD mean", height=480, showlegend=False)
    return fig
