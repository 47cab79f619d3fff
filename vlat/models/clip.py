"""A CLIP dual encoder on ``transformers.CLIPModel``, with zero-shot classification from prompts.

The tiny presets are ordinary ``CLIPModel``s with small configs and the toy world's WordPiece
vocabulary; :meth:`ClipDualEncoder.from_pretrained` loads a real checkpoint (``openai/clip-vit-base-patch32``
on Colab, or any folder written by ``save_pretrained``) through the same class.

Tasks:

- ``itc``: in-batch image-text contrastive loss (symmetric InfoNCE at CLIP's learned temperature);
  logits ``[B, B]`` image-to-text. A batch with hard negatives (``neg_input_ids``, one minimally wrong
  caption per image: :class:`vlat.world.WorldDataset` with ``hard_negatives=True``) adds them as extra
  columns of the image-to-text softmax, as NegCLIP does (Yuksekgonul et al. 2023, "When and why
  vision-language models behave like bags-of-words"); text-to-image stays over the true captions.
- ``classify``: zero-shot classification, logits ``[B, C]`` = scaled cosine similarity of each image to
  the C class prompts in ``batch["class_input_ids"]``; cross-entropy on ``labels``.

Sites: ``text`` (token-embedding output, of the captions for ``itc``, hard negatives stacked under
them when the batch has some, or of the class prompts for ``classify``), ``image`` (patch-embedding
conv output ``[B, D, h, w]``, before class token and positions) and ``pixels``. CLIP's text model takes
no ``inputs_embeds``, so δ enters through a hook on the token-embedding module, which is exactly what
:func:`vlat.models.base.perturbed` does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlat import distributed
from vlat.models.base import PerturbationSite, TaskOutput, VLModel, attention_rollout, caption_ids, full_mask

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipConfig:
    vocab_size: int = 112            # the toy world's WordPiece vocabulary
    text_hidden: int = 128           # text transformer width
    text_layers: int = 3             # text transformer blocks
    vision_hidden: int = 128         # vision transformer width
    vision_layers: int = 3           # vision transformer blocks
    num_heads: int = 4               # heads in both towers
    projection_dim: int = 128        # shared embedding space
    image_size: int = 64             # input images, pixels
    patch_size: int = 8              # ViT patch side; 64 / 8 -> 64 patches
    max_text_len: int = 32           # text positions
    pad_token_id: int = 0            # [PAD] in the toy vocabulary
    eos_token_id: int = 3            # [SEP] ends every caption: the pooled text token
    image_mean: tuple = (0.5, 0.5, 0.5)  # pixel normalisation applied inside the model
    image_std: tuple = (0.25, 0.25, 0.25)
    tokenizer: str | None = None     # None: the toy world's tokenizer; else a path / hub id
    pretrained: str | None = None    # the checkpoint it was loaded from, if any
    gather_negatives: bool = False   # under torchrun, itc contrasts with every process's pairs, not its own block

    def to_hf(self):
        from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

        text = CLIPTextConfig(vocab_size=self.vocab_size, hidden_size=self.text_hidden,
                              intermediate_size=4 * self.text_hidden, num_hidden_layers=self.text_layers,
                              num_attention_heads=self.num_heads, max_position_embeddings=self.max_text_len,
                              pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, bos_token_id=2,
                              projection_dim=self.projection_dim)
        vision = CLIPVisionConfig(hidden_size=self.vision_hidden, intermediate_size=4 * self.vision_hidden,
                                  num_hidden_layers=self.vision_layers, num_attention_heads=self.num_heads,
                                  image_size=self.image_size, patch_size=self.patch_size,
                                  projection_dim=self.projection_dim)
        cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         projection_dim=self.projection_dim)
        cfg._attn_implementation = "eager"
        return cfg


PRESETS = {
    # ~1.3M parameters; trains contrastively on the toy world on a CPU in a few minutes
    "tiny": ClipConfig(),
    # for tests: seconds
    "nano": ClipConfig(text_hidden=32, text_layers=1, vision_hidden=32, vision_layers=1, num_heads=2,
                       projection_dim=32),
}


class ClipDualEncoder(VLModel):
    """CLIP behind the :class:`VLModel` contract.

    >>> model = ClipDualEncoder(PRESETS["nano"])                         # doctest: +SKIP
    >>> model(batch, "classify").logits.shape                            # [B, 24]
    """

    kind = "clip"
    tasks = ("itc", "classify")
    default_task = "itc"
    primary_task = "classify"          # zero-shot classification over the 24 class prompts
    takes_objective = True
    feature_scores = True              # retrieval by cosine of the unimodal features
    hard_negatives = True              # NegCLIP: hard-negative captions as extra itc columns
    retired_config = ("loss", "mpm_temp", "mpm_eps", "mpm_margin")   # now TrainConfig.objective (older files)

    def __init__(self, config: ClipConfig, clip: nn.Module | None = None):
        super().__init__()
        from transformers import CLIPModel

        self.config = config
        self.clip = clip if clip is not None else CLIPModel(config.to_hf())
        self.pixel_input = nn.Identity()  # site "pixels"
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    # ---- loading real checkpoints ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "ClipDualEncoder":
        """Load a ``CLIPModel`` checkpoint (hub id or local folder) and its tokenizer through this class.

        A folder written by :meth:`save_pretrained` keeps vlat's settings (``vlat_clip.json``);
        any other checkpoint gets OpenAI's pixel statistics and the checkpoint's own sizes.
        """
        from transformers import CLIPModel

        clip, info = CLIPModel.from_pretrained(str(name_or_path), attn_implementation="eager", output_loading_info=True)
        missing = sorted(info.get("missing_keys") or ())
        if missing:                            # never fall back to random weights in silence
            raise ValueError(f"{name_or_path}: not a complete CLIP checkpoint ({len(missing)} weights missing, "
                             f"e.g. {missing[0]})")
        extra = Path(name_or_path) / "vlat_clip.json"
        if extra.is_file():
            cfg = ClipConfig(**{**json.loads(extra.read_text()), "tokenizer": str(name_or_path),
                                "pretrained": str(name_or_path)})
        else:
            t, v = clip.config.text_config, clip.config.vision_config
            cfg = ClipConfig(vocab_size=t.vocab_size, text_hidden=t.hidden_size, text_layers=t.num_hidden_layers,
                             vision_hidden=v.hidden_size, vision_layers=v.num_hidden_layers,
                             num_heads=v.num_attention_heads, projection_dim=clip.config.projection_dim,
                             image_size=v.image_size, patch_size=v.patch_size, max_text_len=t.max_position_embeddings,
                             pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_id, image_mean=OPENAI_MEAN,
                             image_std=OPENAI_STD, tokenizer=str(name_or_path), pretrained=str(name_or_path))
        return cls(cfg, clip=clip)

    @classmethod
    def pretrained(cls, name_or_path: str, preset: str = "tiny", **overrides) -> "ClipDualEncoder":
        """``vlat train --pretrained``: a ``CLIPModel`` checkpoint; its sizes are the checkpoint's."""
        if overrides:
            raise ValueError("--model-overrides does not apply to a pretrained CLIP: its sizes are the checkpoint's")
        return cls.from_pretrained(name_or_path)

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """Write a Hugging Face checkpoint folder (plus ``vlat_clip.json``) that :meth:`from_pretrained` reads."""
        path = Path(path)
        self.clip.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        cfg = {k: v for k, v in asdict(self.config).items() if k not in ("tokenizer", "pretrained")}
        (path / "vlat_clip.json").write_text(json.dumps(cfg, indent=1))

    # ---- the contract ---------------------------------------------------------------------------
    def perturbation_sites(self) -> dict[str, PerturbationSite]:
        c = self.config
        n = c.image_size // c.patch_size

        return {
            "text": PerturbationSite("text", "text", self.clip.text_model.get_input_embeddings(),
                                     shape=lambda b: (*self.texts(b)[0].shape, c.text_hidden),
                                     mask=lambda b: self.texts(b)[1].unsqueeze(-1).float()),
            "image": PerturbationSite("image", "image", self.clip.vision_model.embeddings.patch_embedding,
                                      shape=lambda b: (b["pixel_values"].shape[0], c.vision_hidden, n, n),
                                      mask=full_mask(4), token_axes="BDHW"),
            "pixels": PerturbationSite("pixels", "image", self.pixel_input, shape=lambda b: tuple(b["pixel_values"].shape),
                                       mask=full_mask(4), token_axes="BCHW", clamp=(0.0, 1.0)),
        }

    def layer_one(self, site: str):
        """The first block of the tower the site belongs to (and only that tower is run)."""
        if site == "text":
            return self.clip.text_model.encoder.layers[0], lambda b: self.text_features(*self.texts(b))
        return self.clip.vision_model.encoder.layers[0], lambda b: self.image_features(b["pixel_values"])

    def image_features(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        """L2-normalised image embeddings ``[B, P]`` (and the vision attentions when asked)."""
        self.check_pixels(pixel_values)
        x = (self.pixel_input(pixel_values.to(self.device)) - self.mean) / self.std
        out = self.clip.get_image_features(pixel_values=x, output_attentions=output_attentions, return_dict=True)
        return F.normalize(out.pooler_output.float(), dim=-1), out.attentions

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_attentions: bool = False):
        """L2-normalised text embeddings ``[T, P]`` (and the text attentions when asked)."""
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds the model's {self.config.max_text_len}")
        dev = self.device
        out = self.clip.get_text_features(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                                          output_attentions=output_attentions, return_dict=True)
        return F.normalize(out.pooler_output.float(), dim=-1), out.attentions

    @torch.no_grad()
    def image_attention(self, batch: dict) -> torch.Tensor:
        """Rollout of the vision [CLS] token over the patches, ``[B, h, w]``."""
        _, attn = self.image_features(batch["pixel_values"], output_attentions=True)
        n = self.config.image_size // self.config.patch_size
        return attention_rollout(attn)[:, 0, 1:].reshape(-1, n, n)

    @staticmethod
    def texts(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of every text the batch runs through the text tower: the class
        prompts (``classify``), else the captions with their hard negatives, if any, stacked under them."""
        if "class_input_ids" in batch:
            return batch["class_input_ids"], batch["class_attention_mask"]
        if "neg_input_ids" in batch:
            return (torch.cat([batch["input_ids"], batch["neg_input_ids"]]),
                    torch.cat([batch["attention_mask"], batch["neg_attention_mask"]]))
        return batch["input_ids"], batch["attention_mask"]

    def score_task(self, task: str) -> str:
        """Contrastive training (``itc``) is scored by zero-shot classification."""
        return "classify" if task == "itc" else super().score_task(task)

    def _objective(self, objective, batch, task, img, txt, logits) -> TaskOutput:
        """A training objective over image/text features (:class:`vlat.objectives.MPMNCE`): ``itc``
        groups identical captions of the batch; ``classify`` pairs each image with its class prompt, images
        of one class being positives (FLYP-style)."""
        if task == "classify":
            labels = batch["labels"]
            loss = objective(img, txt[labels], labels)
        else:
            labels = torch.arange(logits.shape[0], device=logits.device)
            loss = objective(img, txt, caption_ids(batch["input_ids"]))
        return TaskOutput(loss=loss, logits=logits, labels=labels)

    @staticmethod
    def _gathered_itc(img, txt, negatives, scale) -> torch.Tensor:
        """Symmetric InfoNCE of this process's pairs against every process's (``gather_negatives``): the
        per-example losses of one process on the global batch. The logits this returns elsewhere (and the
        KL terms of SMART, TRADES, VILLA) stay within the process's own block."""
        all_img, all_txt = distributed.gather_with_grad(img), distributed.gather_with_grad(txt)
        columns = torch.cat([all_txt, distributed.gather_with_grad(negatives)]) if len(negatives) else all_txt
        labels = torch.arange(len(img), device=img.device) + distributed.rank() * len(img)
        return 0.5 * (F.cross_entropy(scale * img @ columns.t(), labels, reduction="none") +
                      F.cross_entropy(scale * txt @ all_img.t(), labels, reduction="none"))

    def forward(self, batch: dict, task: str, output_attentions: bool = False, objective=None) -> TaskOutput:
        """``objective``: a contrastive training objective to use instead of the task's loss (the
        training loop passes :attr:`vlat.train.TrainConfig.objective`)."""
        self.check_task(task)
        img, img_attn = self.image_features(batch["pixel_values"], output_attentions)
        if task == "itc" and "class_input_ids" in batch:
            raise ValueError("task 'itc' needs captions (input_ids); this batch holds class prompts (task 'classify')")
        txt_all, txt_attn = self.text_features(*self.texts(batch), output_attentions)
        scale = self.clip.logit_scale.exp().clamp(max=100.0)
        n_txt = len(txt_all) if task == "classify" else len(batch["input_ids"])
        txt = txt_all[:n_txt]                                                 # without the hard negatives
        logits = scale * img @ txt.t()                                        # [B, C] or [B, B]
        if objective is not None:
            if len(txt_all) > n_txt:
                raise ValueError("hard negatives are columns of CLIP's own ITC loss; the objective "
                                 f"{type(objective).__name__} has no place for them (drop hard_negatives)")
            return self._objective(objective, batch, task, img, txt, logits)
        if task == "classify":
            labels = batch["labels"]
            losses = F.cross_entropy(logits, labels, reduction="none")
        else:  # symmetric InfoNCE; the i-th caption belongs to the i-th image; example i's share: its row and column
            labels = torch.arange(logits.shape[0], device=logits.device)
            if self.training and self.config.gather_negatives and distributed.is_distributed():
                losses = self._gathered_itc(img, txt, txt_all[n_txt:], scale)
            else:
                i2t = scale * img @ txt_all.t()                               # [B, B (+ B hard negatives)]
                losses = 0.5 * (F.cross_entropy(i2t, labels, reduction="none") +
                                F.cross_entropy(logits.t(), labels, reduction="none"))
        loss = losses.mean()
        attn = {"image": img_attn, "text": txt_attn} if output_attentions else None
        return TaskOutput(loss=loss, logits=logits, labels=labels, attentions=attn, losses=losses)
