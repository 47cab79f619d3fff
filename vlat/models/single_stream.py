"""A single-stream UNITER-style model: image patches and words in one BERT encoder.

UNITER (Chen et al. 2020), the model VILLA was built on, concatenates Faster R-CNN region features and
word embeddings and runs one transformer over both. Here the "regions" are the image's ``p x p``
patches flattened to raw feature vectors (``3 p^2`` values), projected and layer-normed like UNITER's
region features, plus a learned per-patch position embedding. The encoder is a ``transformers``
``BertModel``, so ``bert-base-uncased`` or any BERT checkpoint can be its starting point
(:meth:`SingleStreamModel.from_bert`).

Sequence layout: ``[CLS] w_1 .. w_n [SEP] <pad> | r_1 .. r_N``; text keeps BERT positions 0..L-1,
image tokens use token type 1 and their own patch positions.

Heads: ITM (match / no match), TF (true / false statement), QA (answer vocabulary) on the [CLS]
state; MLM on the word states.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlat.models.base import (PerturbationSite, TaskOutput, VLModel, attention_rollout, full_mask, per_example_ce,
                              text_mask)
from vlat.world.captions import ANSWERS


@dataclass
class SingleStreamConfig:
    vocab_size: int = 112           # the toy world's WordPiece vocabulary
    hidden_size: int = 128          # BERT hidden size D
    num_layers: int = 4             # transformer blocks
    num_heads: int = 4              # attention heads
    intermediate_size: int = 256    # FFN width
    image_size: int = 64            # square input images, pixels
    patch_size: int = 8             # side of a patch ("region"); 64 / 8 -> 64 regions
    max_text_len: int = 32          # longest caption, tokens, [CLS]/[SEP] included
    dropout: float = 0.1            # hidden and attention dropout
    num_answers: int = len(ANSWERS)  # QA answer vocabulary
    tokenizer: str | None = None    # None: the toy world's tokenizer; else a path / hub id
    bert: str | None = None         # None: random init; else the BERT checkpoint it started from

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS = {
    # ~0.5M parameters, 16 regions of 16x16 px, no dropout: about a minute per 10 epochs of 2,000
    # scenes on a 2-core CPU (from scratch, binding words to regions is slow; dropout slowed it further)
    "tiny": SingleStreamConfig(patch_size=16, num_layers=2, dropout=0.0),
    # for tests: a few seconds
    "nano": SingleStreamConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, patch_size=16),
    # UNITER-base-sized; use with SingleStreamModel.from_bert("bert-base-uncased") on a GPU
    "base": SingleStreamConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                               intermediate_size=3072, image_size=224, patch_size=32, max_text_len=64),
}


class SingleStreamModel(VLModel):
    """UNITER-style single-stream model over the :class:`VLModel` contract.

    Tasks: ``itm``, ``tf``, ``qa`` (classification on [CLS]), ``mlm`` (``batch["mlm_labels"]``
    holds targets, -100 elsewhere; ``input_ids`` already masked) and ``pretrain`` (MLM + ITM with
    in-batch negatives, :meth:`pretrain`).

    >>> model = SingleStreamModel(PRESETS["nano"])       # doctest: +SKIP
    >>> out = model(batch, "itm"); out.logits.shape       # [B, 2]
    """

    kind = "single_stream"
    tasks = ("itm", "tf", "qa", "mlm", "pretrain")
    default_task = "itm"
    primary_task = "itm"

    def __init__(self, config: SingleStreamConfig, bert: nn.Module | None = None):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = c = config
        if bert is None:
            bc = BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                            num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                            max_position_embeddings=c.max_text_len, type_vocab_size=2,
                            hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
                            pad_token_id=0)
            bc._attn_implementation = "eager"  # attention maps on request
            bert = BertModel(bc, add_pooling_layer=False)
        self.bert = bert
        d, feat = c.hidden_size, 3 * c.patch_size**2
        self.pixel_input = nn.Identity()     # site "pixels": [B, 3, H, W] in [0, 1]
        self.region_features = nn.Identity()  # site "image": raw region features [B, N, 3 p^2]
        self.image_proj = nn.Linear(feat, d)
        self.image_norm = nn.LayerNorm(d)
        self.image_pos = nn.Parameter(torch.randn(1, c.num_patches, d) * 0.02)
        self.heads = nn.ModuleDict({
            "itm": nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 2)),
            "tf": nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 2)),
            "qa": nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.LayerNorm(2 * d), nn.Linear(2 * d, c.num_answers)),
            "mlm": nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, c.vocab_size)),
        })

    @classmethod
    def from_bert(cls, name_or_path: str, preset: str = "tiny", **overrides) -> "SingleStreamModel":
        """Start the encoder from a Hugging Face BERT checkpoint (a hub id on Colab, or a local folder).

        The tokenizer comes from the same checkpoint; sizes follow the checkpoint's config.
        """
        from transformers import BertModel

        bert = BertModel.from_pretrained(name_or_path, add_pooling_layer=False, attn_implementation="eager")
        bc = bert.config
        cfg = SingleStreamConfig(**{**asdict(PRESETS[preset]), **overrides, "vocab_size": bc.vocab_size,
                                    "hidden_size": bc.hidden_size, "num_layers": bc.num_hidden_layers,
                                    "num_heads": bc.num_attention_heads, "intermediate_size": bc.intermediate_size,
                                    "tokenizer": str(name_or_path), "bert": str(name_or_path)})
        return cls(cfg, bert=bert)

    # ---- the contract -------------------------------------------------------------------------
    def perturbation_sites(self) -> dict[str, PerturbationSite]:
        c = self.config
        return {
            "text": PerturbationSite("text", "text", self.bert.embeddings.word_embeddings,
                                     shape=lambda b: (*b["input_ids"].shape, c.hidden_size), mask=text_mask()),
            "image": PerturbationSite("image", "image", self.region_features,
                                      shape=lambda b: (b["pixel_values"].shape[0], c.num_patches, 3 * c.patch_size**2),
                                      mask=full_mask(3)),
            "pixels": PerturbationSite("pixels", "image", self.pixel_input, shape=lambda b: tuple(b["pixel_values"].shape),
                                       mask=full_mask(4), token_axes="BCHW", clamp=(0.0, 1.0)),
        }

    def layer_one(self, site: str):
        """Every site feeds the joint encoder, so layer one is the first BERT layer for all of them."""
        return self.bert.encoder.layer[0], lambda batch: self.encode(batch)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> image token embeddings ``[B, N, D]``."""
        p = self.config.patch_size
        x = self.pixel_input(pixel_values)
        x = (x - 0.5) / 0.25                                                  # roughly zero-mean, unit-scale
        x = x.unfold(2, p, p).unfold(3, p, p)                                 # [B, 3, h, w, p, p]
        x = x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)              # [B, N, 3 p^2]
        x = self.region_features(x)
        return self.image_norm(self.image_proj(x)) + self.image_pos          # [B, N, D]

    def encode(self, batch: dict, output_attentions: bool = False):
        """Run the joint encoder; returns ``(hidden [B, L+N, D], attentions or None, L)``."""
        pixels, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        self.check_pixels(pixels)
        B, L = ids.shape
        if L > self.bert.config.max_position_embeddings:
            raise ValueError(f"text of {L} tokens exceeds the model's {self.bert.config.max_position_embeddings}")
        words = self.bert.embeddings.word_embeddings(ids)                     # [B, L, D]
        img = self.embed_image(pixels)                                        # [B, N, D]
        N = img.shape[1]
        embeds = torch.cat([words, img], 1)                                   # [B, L+N, D]
        pos = torch.cat([torch.arange(L, device=ids.device), torch.zeros(N, dtype=torch.long, device=ids.device)])
        types = torch.cat([torch.zeros(L, dtype=torch.long, device=ids.device),
                           torch.ones(N, dtype=torch.long, device=ids.device)])
        mask = torch.cat([am, torch.ones(B, N, dtype=am.dtype, device=am.device)], 1)  # [B, L+N]
        out = self.bert(inputs_embeds=embeds, attention_mask=mask, position_ids=pos.expand(B, -1),
                        token_type_ids=types.expand(B, -1), output_attentions=output_attentions, return_dict=True)
        return out.last_hidden_state, (out.attentions if output_attentions else None), L

    def forward(self, batch: dict, task: str, output_attentions: bool = False, objective=None) -> TaskOutput:
        self.check_task(task)
        self.check_objective(objective)
        if task == "pretrain":
            return self.pretrain(batch)
        hidden, attn, L = self.encode(batch, output_attentions)
        if task == "mlm":
            logits = self.heads["mlm"](hidden[:, :L])                         # [B, L, V]
            labels = batch["mlm_labels"]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        else:
            logits = self.heads[task](hidden[:, 0])                           # [B, C]
            labels = batch["labels"]
        losses = per_example_ce(logits, labels)
        if task != "mlm":
            loss = losses.mean()
        return TaskOutput(loss=loss, logits=logits, labels=labels, attentions={"joint": attn} if attn else None,
                          losses=losses)

    def pretrain(self, batch: dict) -> TaskOutput:
        """UNITER's pre-training in miniature: MLM on the masked caption + ITM with in-batch negatives.

        ITM pairs every even row with its own caption and every odd row ``i`` with the caption of row
        ``i + 1`` (a negative, unless the two captions are the same words: then labelled a match). The
        loss is the sum; ``logits``/``labels`` are ITM's (what VILLA's KL term compares), the two parts
        are in ``extras``. A perturbation of the text site is added at both calls (per row)."""
        ids, am = batch["input_ids"], batch["attention_mask"]
        B = ids.shape[0]
        mlm = self.forward({**batch, "input_ids": batch["mlm_input_ids"]}, "mlm")
        rows = torch.arange(B, device=ids.device)
        other = torch.where(rows % 2 == 1, (rows + 1) % B, rows)
        labels = (ids[other] == ids).all(1).long()                            # 1: the same caption
        itm = self.forward({**batch, "input_ids": ids[other], "attention_mask": am[other], "labels": labels}, "itm")
        return TaskOutput(loss=mlm.loss + itm.loss, logits=itm.logits, labels=labels,
                          extras={"mlm": mlm.loss.detach(), "itm": itm.loss.detach()})

    @torch.no_grad()
    def image_attention(self, batch: dict) -> torch.Tensor:
        """Rollout of [CLS] over the image regions, ``[B, h, w]`` (the share of [CLS] drawn from each)."""
        _, attn, L = self.encode(batch, output_attentions=True)
        roll = attention_rollout(attn)[:, 0, L:]                              # [B, N]
        n = self.config.image_size // self.config.patch_size
        return roll.view(-1, n, n)
