"""Where a perturbation went: per-token and per-patch magnitudes of δ, and their figures."""

from __future__ import annotations

import torch

from vlat.models.base import PerturbationSite


def token_magnitudes(delta: torch.Tensor, site: PerturbationSite) -> torch.Tensor:
    """L2 norm of δ per token ``[B, N]`` (tokens as the site defines them: words, patches, pixels)."""
    return site.tokens(delta.detach().float()).norm(dim=-1)


def nearest_tokens(site: PerturbationSite, input_ids: torch.Tensor, delta: torch.Tensor, tokenizer) -> list[list[str]]:
    """What a text δ says in words: for each position, the vocabulary token whose embedding is nearest (L2)
    to the perturbed embedding ``E[id] + δ`` (``[B][L]``, padding included). The site's module must be the
    word-embedding table (every vlat model's ``text`` site is). Usually every word stays itself: δ moves
    the embeddings off the vocabulary, not onto other words."""
    table = site.module.weight.detach().float()                              # [V, D]
    with torch.no_grad():
        moved = table[input_ids.to(table.device)] + delta.detach().float().to(table.device)   # [B, L, D]
        ids = torch.cdist(moved.flatten(0, 1), table).argmin(-1).view(input_ids.shape)
    return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids.cpu()]


def patch_grid(delta: torch.Tensor, site: PerturbationSite, image_size: int, patch_size: int) -> torch.Tensor:
    """Per-patch magnitude as an ``[B, h, w]`` grid, for any image site (pixels are pooled into patches)."""
    mags = token_magnitudes(delta, site)                                     # [B, N]
    if site.token_axes == "BCHW":                                            # pixels: pool into patches
        side = int(mags.shape[1] ** 0.5)
        px = mags.view(-1, 1, side, side) ** 2
        return torch.nn.functional.avg_pool2d(px, patch_size).mul(patch_size**2).sqrt()[:, 0]
    n = image_size // patch_size
    return mags.view(-1, n, n)


def numbered(tokens: list[str]) -> list[str]:
    """``0. [CLS]``, ``1. a``, ...: token labels for a chart's axis, unique even when a word occurs twice."""
    return [f"{k}. {w}" for k, w in enumerate(tokens)]


def token_bars(tokens: list[str], magnitudes, title: str = "‖δ‖ per token"):
    """Bars of δ's size on each word (padding already dropped by the caller), one row per token in
    reading order, so that the words never run into each other on a narrow screen."""
    import plotly.graph_objects as go

    m = [float(v) for v in magnitudes]
    fig = go.Figure(go.Bar(y=numbered(tokens), x=m, orientation="h", hovertemplate="%{y}: %{x:.4f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="‖δ‖₂", yaxis=dict(autorange="reversed", automargin=True),
                      height=max(260, 90 + 18 * len(tokens)), margin=dict(l=5, r=5, t=40, b=5))
    fig.update_xaxes(nticks=5)
    return fig


def image_heatmap(image: torch.Tensor, grid: torch.Tensor, title: str = "‖δ‖ per patch"):
    """The image beside a heat map of per-patch magnitude."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from vlat.explain.figures import image_array

    fig = make_subplots(rows=1, cols=2, subplot_titles=("image", title))
    fig.add_trace(go.Image(z=image_array(image)), row=1, col=1)
    fig.add_trace(go.Heatmap(z=grid.detach().float().cpu().numpy(), colorscale="Inferno", showscale=True), row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_layout(height=300, width=620, margin=dict(l=5, r=5, t=40, b=5))
    return fig


def magnify(delta: torch.Tensor) -> torch.Tensor:
    """A pixel δ rescaled to fill [0, 1] around mid-grey, so that a tiny perturbation can be seen."""
    d = delta.detach().float()
    return 0.5 + 0.5 * d / d.abs().max().clamp_min(1e-12)


def adversarial_triptych(image: torch.Tensor, delta: torch.Tensor, titles=("x", "δ (magnified)", "x + δ")):
    """Clean image, δ rescaled to fill [0, 1], and the clamped adversarial image."""
    from vlat.explain.figures import scene_grid

    d, image = delta.detach().float().cpu(), image.detach().float().cpu()
    return scene_grid(torch.stack([image, magnify(d), (image + d).clamp(0, 1)]), list(titles), cols=3, size=200)
