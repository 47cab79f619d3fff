"""The vlat explorer: what a perturbation does to one image-text pair.

    vlat explore                       # http://127.0.0.1:7860, no share link, no analytics
    python -m vlat.apps.explorer --port 7861

This folder (``apps/`` in the repository) installs as ``vlat.apps``. Pick a pair from the gallery
(the sample pairs shipped with vlat, :func:`vlat.resources.sample_pairs`) or upload an image, edit the caption, choose a
model, a method, the modality it perturbs, ε (a fraction of the input's own norm), the steps and the
step size, and press *Perturb*. The panels show where δ went (per patch over the image, per token on
the caption), the model's image attention before and after, the prediction before and after with
KL(p‖p_adv), KL(p_adv‖p) and their sum, and captum integrated gradients for tokens and patches.

All the logic is :func:`vlat.explain.pair.explore` and :mod:`vlat.explain.views`; this file is glue.
Requests are queued one at a time: the attack attaches forward hooks to a shared model, so two
requests running together would see each other's δ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import threading
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from vlat.explain.pair import (MAX_EPS, MAX_STEPS, MODALITIES, explore, explorer_methods, load_image,  # noqa: E402
                               steps_help)
from vlat.explain.views import all_figures, comparison_figure, setting  # noqa: E402
from vlat.resources import checkpoint, sample_pairs, samples_dir  # noqa: E402

SAMPLES = samples_dir()
MODELS = {
    "single-stream tiny (image-text matching)": checkpoint("single_stream_tiny_itm"),
    "CLIP tiny (which caption fits)": checkpoint("clip_tiny_itc"),
    "ALBEF tiny (image-text matching, cross-attention)": checkpoint("albef_tiny_pretrain"),
}
HUB_CHOICE = "a CLIP checkpoint (Hugging Face id or folder) ..."
MAX_UPLOAD_BYTES = 20 * 2**20    # larger uploads are refused (and deleted): the model sees 64 x 64 pixels
CACHE_SIZE = 4                   # models kept loaded at once (the least recently used one goes first)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PANELS = ("perturbation", "tokens", "attention", "confidence", "attribution")
PHASES = {"model": "loading the model", "attack": "attacking", "attention": "reading the attention",
          "attributions": "integrated gradients", "figures": "drawing the figures"}
GALLERY_SIZE = 24

INTRO = """# vlat explorer
Pick a pair (or upload an image), choose a method and ε, and press **Perturb**. ε is a fraction of the
perturbed input's own norm (0.1 = 10 %): the perturbation δ may be at most that large, per example. The
attack pushes the model away from its own clean prediction (it maximises the loss of that prediction).
The same views, step by step with the code: notebook `notebooks/09_explorer.ipynb`; each method's
formula and defaults: `docs/methods.md` (its section per method).
"""

TRY = """**What to try**
- Raise ε until the prediction flips; note the ε where it does.
- Same ε, *image* against *text*: which modality does this model lean on?
- FGSM (one step) against PGD (many) at the same ε: the KL bars show how much further PGD gets.
- FreeLB and VILLA use the attack for training, not to break the model: compare their KL with PGD's.
- *pixels* keeps the image a valid picture (values in [0, 1]): look at δ magnified.
- **Compare** (below the panels): FGSM against PGD, or FreeLB against VILLA, or one method at two ε, on
  the same pair.
"""

CSS = ".stale { opacity: 0.35; transition: opacity 0.15s; }"   # earlier results while new ones are computed

COMPARE = """### Compare two settings on this pair
Setting A is the one above (method, perturb, ε, steps). Choose B and press **Compare**: where each δ went,
the prediction under each, and each one's objective per ascent step (one point for a one-step method).
Attributions are skipped here to keep it quick.
"""

PANEL_TITLES = {"perturbation": "where δ went in the image", "tokens": "where δ went in the caption",
                "attention": "attention before and after", "confidence": "confidence and KL",
                "attribution": "integrated gradients (captum)"}
EXPLAIN = {   # one or two sentences beside each panel: what it shows and how to read it
    "perturbation": "‖δ‖ per image patch, over the image (brighter: more change there). In *pixels* mode, δ "
                    "itself, magnified. Where the attack spends its budget is where the model looks.",
    "tokens": "‖δ_t‖ per caption token (the L2 norm of the change to that word's embedding). A text δ does not "
              "change the words: it moves their embeddings off the vocabulary.",
    "attention": "Where the model looks in the image, before and after δ: attention rollout of [CLS] (Abnar & "
                 "Zuidema 2020; each layer's attention mixed with the residual path and multiplied through) for "
                 "the single-stream model and CLIP, the caption's cross-attention to the patches for ALBEF.",
    "confidence": "The prediction before and after δ, and KL(p‖p_adv), KL(p_adv‖p) and their sum, the symmetric "
                  "KL that SMART and VILLA use as a regulariser: 0 means δ changed nothing.",
    "attribution": "Integrated gradients (captum): each token's and patch's share of the clean prediction's "
                   "logit; red pushes towards the predicted outcome, blue away from it.",
}


def method_note(label: str) -> str:
    """One line on the chosen method: what it does, its paper, and its section of the method sheet."""
    from vlat.adversarial import registry

    try:
        spec = registry.get(label)
    except ValueError:
        return ""
    first = spec.paper.authors.replace(" & ", ",").split(",")[0].strip()
    return (f"**{spec.label}** ({first} et al. {spec.paper.year}): "
            f"{spec.summary}. Math and defaults: `{spec.docs}`; step by step: notebook `09_explorer`.")


def gallery_pairs(root: Path | None = None, n: int = GALLERY_SIZE) -> list[tuple[str, str]]:
    """``(image path, caption)`` for the first ``n`` pairs of a folder in the sample pairs' format
    (default: the shipped sample pairs); the caption is the pair's longest (a relation, where the scene has one)."""
    root = sample_pairs() if root is None else root
    index = root / "captions.jsonl"
    if not index.exists():
        return []
    pairs = []
    for line in index.read_text().splitlines()[:n]:
        rec = json.loads(line)
        pairs.append((str(root / rec["image"]), max(rec["captions"], key=len)))
    return pairs


def host_warning(host: str) -> str | None:
    """What to tell a person who binds the explorer beyond this machine (``None`` on a loopback address)."""
    if host in LOOPBACK:
        return None
    return (f"warning: the explorer listens on {host}: anyone on your network who can reach this machine can use "
            "it (and run the models it offers). Use --host 127.0.0.1 to keep it to yourself.")


def upload_status(path: str) -> tuple[str | None, str | None, str]:
    """An uploaded file -> (image path for the preview, image path, status message). A file over
    ``MAX_UPLOAD_BYTES``, a non-image or an unreadable one is refused with the reason and deleted."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return None, None, "⚠️ the upload did not arrive; try again"
    message = None
    if size > MAX_UPLOAD_BYTES:
        message = (f"⚠️ the file is {size / 2**20:.1f} MB; the largest accepted upload is "
                   f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB (the model sees 64 x 64 pixels)")
    else:
        try:
            load_image(path, 64)
        except ValueError as e:
            message = f"⚠️ {e}"
        except Exception as e:  # anything PIL raises on a strange file
            message = f"⚠️ this file could not be read as an image ({type(e).__name__})"
    if message is not None:
        with contextlib.suppress(OSError):
            os.remove(path)
        return None, None, message
    return path, path, "Image loaded. Type a caption and press **Perturb**."


class ModelCache:
    """Loads each model once (thread-safe), with its tokenizer, keeping at most ``size`` (least recently
    used out first). Models: the shipped ones, and a CLIP checkpoint (Hub id or folder) only if it was
    named at start-up (``allow``, ``vlat explore --allow-model``)."""

    def __init__(self, size: int = CACHE_SIZE, allow=()):
        self._lock = threading.Lock()
        self._models: OrderedDict[str, tuple] = OrderedDict()
        self.size, self.allow = max(1, int(size)), {str(a).strip() for a in allow}

    def __len__(self) -> int:
        return len(self._models)

    def get(self, choice: str, hub_id: str = ""):
        from vlat.models import load_model, model_tokenizer
        from vlat.models.clip import ClipDualEncoder

        key = hub_id.strip() if choice == HUB_CHOICE else choice
        if not key:
            raise ValueError("type a Hugging Face id (e.g. openai/clip-vit-base-patch32) or a local folder")
        if choice == HUB_CHOICE and key not in self.allow:
            raise ValueError(f"{key!r} was not offered when the explorer started; start it with "
                             f"--allow-model {key} to use it")
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
            else:
                if choice == HUB_CHOICE:
                    try:
                        model = ClipDualEncoder.from_pretrained(key)
                    except Exception as e:  # offline, unknown id, not a CLIP checkpoint: say which
                        raise ValueError(f"could not load {key!r} as a CLIP checkpoint ({type(e).__name__}: "
                                         f"{str(e)[:200]})") from e
                elif choice in MODELS:
                    if not MODELS[choice].exists():
                        raise ValueError(f"{MODELS[choice]} is missing: run from a clone of the repository")
                    model = load_model(MODELS[choice])
                else:
                    raise ValueError(f"unknown model {choice!r}")
                self._models[key] = (model.eval(), model_tokenizer(model))
                while len(self._models) > self.size:
                    self._models.popitem(last=False)
            return self._models[key]


def build_app(pairs: list[tuple[str, str]] | None = None, allow=()) -> gr.Blocks:
    """The explorer as a ``gr.Blocks`` (not launched); ``allow``: CLIP checkpoints (Hub ids or folders)
    it may load besides the shipped models."""
    pairs = gallery_pairs() if pairs is None else pairs
    cache = ModelCache(allow=allow)

    def pick(index: int) -> tuple[str, str]:
        """Gallery pair ``index`` -> (image path, caption)."""
        if not pairs:
            raise gr.Error("no gallery: data_samples/pairs is missing")
        index = int(index)
        if not 0 <= index < len(pairs):
            raise gr.Error(f"pair index must lie in [0, {len(pairs) - 1}]")
        return pairs[index]

    def on_select(evt: gr.SelectData):
        path, caption = pick(evt.index)
        return path, path, caption, ""

    def upload(file):
        """An uploaded file -> (image path for the preview, status message). Non-images, huge images
        and unreadable files are refused here, with the reason."""
        if file is None:
            return None, None, ""
        return upload_status(file if isinstance(file, str) else getattr(file, "name", str(file)))

    def in_phases(work, n_outputs: int):
        """Run ``work(phase)`` in a thread and yield a progress line per phase it reports (the other
        outputs unchanged), then its result; an error becomes a message, never a traceback."""
        phases, box = queue.Queue(), {}

        def target():
            try:
                box["out"] = work(phases.put)
            except ValueError as e:
                box["error"] = f"⚠️ {e}"
            except Exception as e:  # never a traceback in the page
                box["error"] = f"⚠️ something went wrong: {type(e).__name__}: {str(e)[:200]}"
            finally:
                phases.put(None)

        threading.Thread(target=target, daemon=True).start()
        done = []
        while (phase := phases.get()) is not None:
            done.append(PHASES.get(phase, phase))
            yield [f"⏳ {' → '.join(done)} ...", *[gr.skip()] * (n_outputs - 1)]
        if "error" in box:
            yield [box["error"], *[None] * (n_outputs - 2), {}]
        else:
            yield box["out"]

    def run(image, caption, model_choice, hub_id, method, modality, eps, steps, step_size):
        """Perturb one pair; yields progress by phase, then the status line, the five figures and the
        numbers as JSON."""
        yield from in_phases(lambda phase: perturb(phase, image, caption, model_choice, hub_id, method, modality,
                                                   eps, steps, step_size), len(PANELS) + 2)

    def settings(eps, steps, step_size):
        return (float(eps) if eps is not None else eps, int(steps) if steps is not None else steps,
                float(step_size) if step_size else None)

    def perturb(phase, image, caption, model_choice, hub_id, method, modality, eps, steps, step_size):
        phase("model")
        model, tok = cache.get(model_choice, hub_id or "")
        ex = explore(model, tok, image, caption, method, modality, *settings(eps, steps, step_size), on_phase=phase)
        phase("figures")
        figs = all_figures(ex)
        numbers = {"prediction": dict(zip(("clean", "attacked"), ex.prediction)),
                   "probs_clean": [round(float(p), 4) for p in ex.probs_clean],
                   "probs_attacked": [round(float(p), 4) for p in ex.probs_adv],
                   "outcomes": ex.names, "kl": {k: round(v, 5) for k, v in ex.kl.items()},
                   "losses": [round(v, 4) for v in ex.losses],
                   "seconds": {k: round(v, 3) for k, v in ex.seconds.items()}}
        status = f"{ex.summary()} · {ex.seconds['total']:.2f} s"
        return [status, *[figs[p] for p in PANELS], numbers]

    def compare(image, caption, model_choice, hub_id, method, modality, eps, steps, step_size, method_b,
                modality_b, eps_b):
        """Setting A (the main controls) and setting B on the same pair: one comparison figure."""
        def work(phase):
            phase("model")
            model, tok = cache.get(model_choice, hub_id or "")
            a = explore(model, tok, image, caption, method, modality, *settings(eps, steps, step_size),
                        attributions=False, on_phase=phase)
            b = explore(model, tok, image, caption, method_b, modality_b, *settings(eps_b, steps, step_size),
                        attributions=False, on_phase=phase)
            phase("figures")
            status = (f"**A** ({setting(a)}): {a.summary()}  \n**B** ({setting(b)}): {b.summary()}  \n"
                      f"symmetric KL: A {a.kl['symmetric KL']:.3f}, B {b.kl['symmetric KL']:.3f}")
            numbers = {"A": {"setting": setting(a), "kl": a.kl, "losses": a.losses},
                       "B": {"setting": setting(b), "kl": b.kl, "losses": b.losses}}
            return [status, comparison_figure(a, b), numbers]

        yield from in_phases(work, 3)

    first_image, first_caption = pairs[0] if pairs else (None, "")   # the page opens on the first pair
    # uploads (and Gradio's other cached files) older than an hour are deleted, checked every hour
    with gr.Blocks(title="vlat explorer", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2):
                gallery = gr.Gallery(value=[(p, c) for p, c in pairs], label="gallery (data_samples/pairs)", columns=6,
                                     height=260, allow_preview=False, elem_id="gallery")
                upload_box = gr.File(label="or upload an image", file_types=["image"], elem_id="upload")
            with gr.Column(scale=1):
                preview = gr.Image(value=first_image, label="image", type="filepath", interactive=False, height=200,
                                   elem_id="image")
                # what /explore reads: a file, not an image component, so that a file which is not an
                # image reaches explore() and gets its message instead of failing in Gradio's decoding
                image = gr.File(value=first_image, visible=False, elem_id="current")
                caption = gr.Textbox(value=first_caption, label="caption", max_length=300, elem_id="caption",
                                     placeholder="a red circle left of a blue square")
        with gr.Row():
            model_choice = gr.Dropdown([*MODELS, HUB_CHOICE], value=next(iter(MODELS)), label="model", elem_id="model")
            hub_id = gr.Textbox(label="Hugging Face id or folder (online / local only)",
                                placeholder="openai/clip-vit-base-patch32")
            method = gr.Dropdown(list(explorer_methods()), value="PGD", label="method", elem_id="method")
            modality = gr.Radio(list(MODALITIES), value="image", label="perturb", elem_id="modality")
        with gr.Row():
            eps = gr.Slider(0.01, MAX_EPS, value=0.1, step=0.01, label="ε (fraction of the input's norm)",
                            elem_id="eps")
            steps = gr.Slider(1, MAX_STEPS, value=10, step=1, label="steps (K; FreeAT replays; YOPO passes)",
                              info=steps_help())
            step_size = gr.Number(value=0, label="step size (0: 2.5 ε / steps)", minimum=0)
            go = gr.Button("Perturb", variant="primary", elem_id="run")
        note = gr.Markdown(method_note("PGD"), elem_id="method-note")
        status = gr.Markdown(elem_id="status")

        def panel(name: str) -> gr.Plot:
            """A figure under its title (a heading, not Gradio's label, which covers the plot's own titles),
            with its explanation under it."""
            with gr.Column():
                gr.Markdown(f"#### {PANEL_TITLES[name]}", elem_id=f"title-{name}")
                plot = gr.Plot(show_label=False, elem_id=f"plot-{name}")
                gr.Markdown(EXPLAIN[name], elem_id=f"explain-{name}")
            return plot

        with gr.Row():
            perturbation, tokens = panel("perturbation"), panel("tokens")
        with gr.Row():
            attention, confidence = panel("attention"), panel("confidence")
        attribution = panel("attribution")
        gr.Markdown(TRY, elem_id="what-to-try")
        numbers = gr.JSON(label="numbers", elem_id="numbers")
        gr.Markdown(COMPARE, elem_id="compare-intro")
        with gr.Row():
            method_b = gr.Dropdown(list(explorer_methods()), value="FGSM", label="method B", elem_id="method-b")
            modality_b = gr.Radio(list(MODALITIES), value="image", label="perturb (B)", elem_id="modality-b")
            eps_b = gr.Slider(0.01, MAX_EPS, value=0.1, step=0.01, label="ε (B)", elem_id="eps-b")
            compare_go = gr.Button("Compare", variant="secondary", elem_id="compare")
        compare_status = gr.Markdown(elem_id="compare-status")
        compare_plot = gr.Plot(show_label=False, elem_id="plot-compare")
        compare_numbers = gr.JSON(label="numbers (A and B)", visible=False)

        method.change(method_note, method, note, queue=False, api_visibility="private")
        gallery.select(on_select, None, [preview, image, caption, status], api_visibility="private")
        upload_box.upload(upload, upload_box, [preview, image, status], api_name="upload")
        gr.api(pick, api_name="pair")
        # while a pair runs: Perturb is disabled and says so, the page scrolls to the results, and the last
        # results stay, greyed (the "stale" class), until the new ones arrive
        plots = [perturbation, tokens, attention, confidence, attribution]
        busy = go.click(lambda: [gr.update(interactive=False, value="Perturbing ..."),
                                 *[gr.update(elem_classes=["stale"])] * len(plots)], None, [go, *plots], queue=False)
        busy.then(run, [image, caption, model_choice, hub_id, method, modality, eps, steps, step_size],
                  [status, *plots, numbers], api_name="explore", scroll_to_output=True, show_progress="minimal").then(
            lambda: [gr.update(interactive=True, value="Perturb"), *[gr.update(elem_classes=[])] * len(plots)],
            None, [go, *plots], queue=False)
        busy_b = compare_go.click(lambda: gr.update(interactive=False, value="Comparing ..."), None, compare_go,
                                  queue=False)
        busy_b.then(compare, [image, caption, model_choice, hub_id, method, modality, eps, steps, step_size, method_b,
                              modality_b, eps_b], [compare_status, compare_plot, compare_numbers], api_name="compare",
                    scroll_to_output=True, show_progress="minimal").then(
            lambda: gr.update(interactive=True, value="Compare"), None, compare_go, queue=False)
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, allow=(), **kw) -> gr.Blocks:
    """Start the explorer: local only unless ``host`` says otherwise (then a warning is printed), no share
    link, requests queued one at a time; returns the app (with ``prevent_thread_lock=True`` the call
    returns at once and ``app.close()`` stops it)."""
    warning = host_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    app = build_app(allow=allow)
    app.queue(default_concurrency_limit=1, max_size=64)
    app.launch(server_name=host, server_port=port, share=False, show_error=False, allowed_paths=[str(SAMPLES)],
               css=CSS, **kw)
    return app


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="the vlat explorer (Gradio)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--allow-model", action="append", default=[], metavar="ID_OR_FOLDER",
                    help="a CLIP checkpoint (Hugging Face id or local folder) the page may load; repeatable")
    a = ap.parse_args(argv)
    launch(a.host, a.port, allow=a.allow_model)


if __name__ == "__main__":
    main()
