"""ALBEF (Li et al. 2021, "Align before Fuse"): align unimodal features contrastively, then fuse.

Three encoders built from ``transformers`` blocks:

- **image**: a ViT (``ViTModel``); its [CLS] state, projected and L2-normalised, is the image feature;
- **text**: the first half of a BERT (``BertModel`` with ``text_layers`` layers); its [CLS] state,
  projected and normalised, is the text feature;
- **fusion**: the second half of the BERT (``BertLayer`` s with cross-attention from the text tokens to
  the image tokens). The ITM head reads its [CLS]; the MLM head reads every word.

Pre-training (``task="pretrain"``, docs/methods.md#albef) sums three losses, unweighted:

- **ITC** against the batch and a queue of the momentum encoders' features (learnable temperature
  clamped to [0.001, 0.5]), with momentum-distilled soft targets ``α softmax(s̃/τ) + (1-α) y``;
- **ITM** on B positives + B hard-negative texts + B hard-negative images, drawn with probability
  ∝ softmax of the in-batch ITC similarity, the positive excluded;
- **MLM** on the masked caption (masked once, when collated: 15 %, 80/10/10, PAD/CLS never), fused
  with the image, with the momentum model's predictions as soft targets.

**Momentum model and queues.** Every trained module has a momentum copy (no gradient). They advance in
:meth:`after_optimizer_step`, which the training loop calls once per applied update, not per forward:
an adversarial method runs several forwards per step, and the EMA (``θ̃ ← 0.995 θ̃ + 0.005 θ``) and
the enqueue must happen once. The reference updates θ̃ at the start of the next forward; this is the
same sequence. The δ hooks of :func:`vlat.models.perturbed` sit on the trained modules only, so the
momentum teacher always sees the clean pair. α ramps linearly from 0 over ``alpha_warmup_steps``
(the reference: the first epoch; ``vlat train`` sets it to one epoch). The hard negatives of one
update are drawn with a generator seeded by the update count, so all inner steps of a method see the
same negatives. Under an attack the similarities they are drawn from move with δ, so the draw can
change; the seed keeps the uniforms fixed, not the negatives.

Tasks: ``pretrain``; ``itc`` (the contrastive loss alone; logits ``[B, B]`` in-batch image-to-text);
``itm`` (fusion ITM on given pairs, labels 1 match / 0 not: fine-tuning and evaluation); ``mlm``.
Sites: ``text`` (word embeddings, ``[B, L, D]``), ``image`` (ViT patch embeddings, ``[B, N, D]``) and
``pixels``. :meth:`cross_attention` returns the fusion layers' text-to-patch attention.

**Identical captions are positives** (``same_caption_positives``, on by default). The toy world's
captions repeat: among 1,088 training captions only 345 are distinct, and a 1,024-entry queue holds on
average 32 copies of a batch caption's own words. Plain ITC pushes every copy away as a negative. So a
queue of caption ids sits beside the feature queues, every entry with the same words is a positive
(the hard target spread evenly over them), and ITM never draws a same-caption pair as a hard
negative. This is ALBEF's own ``idx`` queue from its retrieval fine-tuning code (COCO/Flickr have five
captions per image), used here in pre-training too. Measured (README, ALBEF retrieval table, 3 seeds):
it raised zero-shot IR@1 from 0.083 to 0.133 and made TR@1 stable across seeds (0.035 ± 0.005 against
0.092 ± 0.086). A one-batch queue (``queue_size=64``) did better still in this world (TR@1 0.081, IR@1
0.188); the default keeps the reference's design of a long queue.

**ITM skips captions the world knows to be true** (``truth_negatives``, on by default). A toy caption is
one claim, so another scene's caption is often true of this image too ("two objects", "there is a red
circle"). As ITC improves, the hard-negative sampler draws exactly those, and ITM learns "no match" for
true pairs: trained without this rule (patch 16, 8,000 scenes) ITM validation accuracy rose to 0.70 by
epoch 6 and fell back to 0.54 by epoch 15. A ``pretrain`` batch of the toy world carries ``truth[i, j]``
(caption j holds in scene i), and the sampler leaves those pairs out. Web data has no such matrix; the
rule then does nothing and the sampler is the reference's.

Deviation from the reference, on purpose: the ViT starts from random weights (the reference uses
DeiT-B/16 from ImageNet; offline there is none). :meth:`AlbefModel.from_bert` starts the text and
fusion halves from a Hugging Face BERT, as the reference does with ``bert-base-uncased``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlat import distributed
from vlat.models.base import (PerturbationSite, TaskOutput, VLModel, caption_ids, full_mask, per_example_ce,
                              text_mask)
from vlat.objectives import ema_, hard_negatives, itc_loss, mlm_loss


@dataclass
class AlbefConfig:
    vocab_size: int = 112            # the toy world's WordPiece vocabulary
    hidden_size: int = 128           # width of all three encoders (cross-attention reads image states)
    text_layers: int = 2             # BERT layers of the text encoder (the first half)
    fusion_layers: int = 2           # BERT layers with cross-attention (the second half)
    vision_layers: int = 3           # ViT layers
    num_heads: int = 4
    intermediate_size: int = 256     # FFN width
    image_size: int = 64
    patch_size: int = 8              # 64 / 8 -> 64 patches
    max_text_len: int = 32
    embed_dim: int = 64              # ITC projection
    queue_size: int = 1024           # reference: 65,536; must be a multiple of the batch size
    momentum: float = 0.995          # EMA of the momentum encoders
    alpha: float = 0.4               # weight of the distilled soft targets after warm-up
    alpha_warmup_steps: int = 100    # linear ramp of alpha from 0 (reference: the first epoch)
    distill: bool = True             # momentum distillation on/off (the ablation)
    temp: float = 0.07               # initial ITC temperature (learnable, clamped to [temp_min, 0.5])
    temp_min: float = 0.001          # the clamp's floor (reference 0.001; CLIP's cap of 100 on 1/τ is 0.01)
    learn_temp: bool = True          # False: τ stays at ``temp``
    same_caption_positives: bool = True  # ITC: pairs with identical captions (batch + queue) are positives
    truth_negatives: bool = True     # ITM: never draw a caption the batch's ``truth`` marks true of the image
    dropout: float = 0.0             # hidden and attention dropout
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.25, 0.25, 0.25)
    seed: int = 0                    # seeds the hard-negative draws (with the update count)
    tokenizer: str | None = None     # None: the toy world's tokenizer; else a path / hub id
    bert: str | None = None          # the BERT checkpoint the text and fusion halves started from


PRESETS = {
    # 1.16M trained parameters (and as many in the momentum copy)
    "tiny": AlbefConfig(),
    # for tests: seconds
    "nano": AlbefConfig(hidden_size=32, text_layers=1, fusion_layers=1, vision_layers=1, num_heads=2,
                        intermediate_size=64, patch_size=16, embed_dim=16, queue_size=48),
}

MOMENTUM_PAIRS = (("vision", "vision_m"), ("text", "text_m"), ("fusion", "fusion_m"),
                  ("vision_proj", "vision_proj_m"), ("text_proj", "text_proj_m"), ("mlm_head", "mlm_head_m"))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L]`` 1/0 mask -> ``[B, 1, 1, L]`` additive mask (0 where kept, very negative where masked)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class AlbefModel(VLModel):
    """ALBEF behind the :class:`VLModel` contract.

    >>> model = AlbefModel(PRESETS["nano"])                            # doctest: +SKIP
    >>> out = model(batch, "pretrain"); out.extras["itc"], out.extras["itm"], out.extras["mlm"]
    """

    kind = "albef"
    tasks = ("pretrain", "itc", "itm", "mlm")
    default_task = "pretrain"
    primary_task = "itm"
    full_batches = True                 # the queues advance one whole batch per step
    feature_scores = True               # retrieval by ITC cosine (its ITM head re-ranks nothing here)

    def prepare_training(self, steps_per_epoch: int) -> None:
        """α (the distillation weight) ramps up over the first epoch, as in the reference."""
        self.config.alpha_warmup_steps = max(1, steps_per_epoch)

    def __init__(self, config: AlbefConfig, bert: nn.Module | None = None):
        super().__init__()
        from transformers import BertConfig, BertModel, ViTConfig, ViTModel
        from transformers.models.bert.modeling_bert import BertLayer

        self.config = c = config
        bc = BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.text_layers,
                        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                        max_position_embeddings=c.max_text_len, hidden_dropout_prob=c.dropout,
                        attention_probs_dropout_prob=c.dropout, pad_token_id=0)
        bc._attn_implementation = "eager"
        self.text = BertModel(bc, add_pooling_layer=False)
        fc = copy.deepcopy(bc)
        fc.is_decoder, fc.add_cross_attention = True, True   # transformers only builds cross-attention for decoders
        self.fusion = nn.ModuleList(BertLayer(fc, layer_idx=i) for i in range(c.fusion_layers))
        for layer in self.fusion:                             # ... but ALBEF's fusion is bidirectional
            layer.attention.self.is_causal = False
        vc = ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.vision_layers, num_attention_heads=c.num_heads,
                       intermediate_size=c.intermediate_size, image_size=c.image_size, patch_size=c.patch_size,
                       hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout)
        vc._attn_implementation = "eager"
        self.vision = ViTModel(vc, add_pooling_layer=False)
        if bert is not None:
            self._load_bert(bert)
        d = c.hidden_size
        self.vision_proj = nn.Linear(d, c.embed_dim)
        self.text_proj = nn.Linear(d, c.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, c.vocab_size))
        self.temp = nn.Parameter(torch.tensor(float(c.temp)), requires_grad=c.learn_temp)
        self.pixel_input = nn.Identity()                      # site "pixels"
        self.register_buffer("mean", torch.tensor(c.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.image_std).view(1, 3, 1, 1), persistent=False)
        for name, m_name in MOMENTUM_PAIRS:                   # momentum copies start equal, get no gradient
            setattr(self, m_name, copy.deepcopy(getattr(self, name)).requires_grad_(False))
        self.register_buffer("image_queue", F.normalize(torch.randn(c.queue_size, c.embed_dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(c.queue_size, c.embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("idx_queue", torch.full((c.queue_size,), -1, dtype=torch.long))  # caption ids
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.updates, self.ptr = 0, 0                         # host copies of num_updates, queue_ptr (no syncs)
        self._pending = None                                  # momentum features waiting to be enqueued

    # ---- construction from a real BERT ------------------------------------------------------------
    @classmethod
    def from_bert(cls, name_or_path: str, preset: str = "tiny", **overrides) -> "AlbefModel":
        """Text encoder = the checkpoint's first half of layers, fusion = its second half (their
        cross-attention is new, randomly initialised); the tokenizer comes from the same checkpoint."""
        from transformers import BertModel

        bert = BertModel.from_pretrained(str(name_or_path), add_pooling_layer=False, attn_implementation="eager")
        b = bert.config
        half = b.num_hidden_layers // 2
        cfg = AlbefConfig(**{**asdict(PRESETS[preset]), **overrides, "vocab_size": b.vocab_size,
                             "hidden_size": b.hidden_size, "text_layers": half,
                             "fusion_layers": b.num_hidden_layers - half, "num_heads": b.num_attention_heads,
                             "intermediate_size": b.intermediate_size, "max_text_len": b.max_position_embeddings,
                             "tokenizer": str(name_or_path), "bert": str(name_or_path)})
        return cls(cfg, bert=bert)

    def _load_bert(self, bert: nn.Module) -> None:
        half = self.config.text_layers
        self.text.embeddings.load_state_dict(bert.embeddings.state_dict())
        for i, layer in enumerate(self.text.encoder.layer):
            layer.load_state_dict(bert.encoder.layer[i].state_dict())
        for j, layer in enumerate(self.fusion):
            missing, unexpected = layer.load_state_dict(bert.encoder.layer[half + j].state_dict(), strict=False)
            if unexpected or any(not k.startswith("crossattention.") for k in missing):
                raise ValueError(f"BERT layer {half + j} does not fit a fusion layer: {missing} {unexpected}")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A file without the momentum copies (a shipped, inference-sized checkpoint) loads too: the copies
        then start equal to the trained weights, as at the start of pre-training."""
        momentum = tuple(f"{m}." for _, m in MOMENTUM_PAIRS)
        no_copy = not any(k.startswith(momentum) for k in state_dict)
        if "idx_queue" not in state_dict:  # saved before the caption-id queue existed: an empty one
            state_dict = {**state_dict, "idx_queue": self.idx_queue.new_full(self.idx_queue.shape, -1)}
        if no_copy:
            state_dict = {**{k: v for k, v in self.state_dict().items() if k.startswith(momentum)}, **state_dict}
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if no_copy:
            self.reset_momentum()
        self.updates, self.ptr = int(self.num_updates), int(self.queue_ptr)
        return result

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Momentum copies ← trained weights."""
        for name, m_name in MOMENTUM_PAIRS:
            for pm, p in zip(getattr(self, m_name).parameters(), getattr(self, name).parameters()):
                pm.copy_(p)

    def inference_state(self) -> dict:
        """The state without the momentum copies (half the size): what a shipped checkpoint needs."""
        momentum = tuple(f"{m}." for _, m in MOMENTUM_PAIRS)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(momentum)}

    # ---- the contract ---------------------------------------------------------------------------
    def perturbation_sites(self) -> dict[str, PerturbationSite]:
        c = self.config
        n = (c.image_size // c.patch_size) ** 2
        return {
            "text": PerturbationSite("text", "text", self.text.embeddings.word_embeddings,
                                     shape=lambda b: (*b["input_ids"].shape, c.hidden_size), mask=text_mask()),
            "image": PerturbationSite("image", "image", self.vision.embeddings.patch_embeddings,
                                      shape=lambda b: (b["pixel_values"].shape[0], n, c.hidden_size),
                                      mask=full_mask(3)),
            "pixels": PerturbationSite("pixels", "image", self.pixel_input, shape=lambda b: tuple(b["pixel_values"].shape),
                                       mask=full_mask(4), token_axes="BCHW", clamp=(0.0, 1.0)),
        }

    def layer_one(self, site: str):
        """The first block after the site: BERT layer 0 for the text, ViT layer 0 for image and pixels."""
        if site == "text":
            return self.text.encoder.layer[0], lambda b: self.encode_text(b["input_ids"], b["attention_mask"])
        return self.vision.layers[0], lambda b: self.encode_image(b["pixel_values"])

    # ---- encoders ---------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ViT states ``[B, 1 + N, D]`` ([CLS] first)."""
        self.check_pixels(pixel_values)
        vision = self.vision_m if momentum else self.vision
        x = pixel_values if momentum else self.pixel_input(pixel_values)   # the teacher never sees δ
        x = (x - self.mean) / self.std
        return vision(pixel_values=x).last_hidden_state

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """Unimodal text states ``[B, L, D]`` (the first half of BERT)."""
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds the model's {self.config.max_text_len}")
        text = self.text_m if momentum else self.text
        return text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor, image_states: torch.Tensor,
             momentum: bool = False) -> torch.Tensor:
        """Fusion layers: text self-attention + cross-attention to every image token -> ``[B, L, D]``."""
        h, mask = text_states, _additive(attention_mask, text_states.dtype)
        for layer in (self.fusion_m if momentum else self.fusion):
            h = layer(h, attention_mask=mask, encoder_hidden_states=image_states)
        return h

    def image_features(self, pixel_values: torch.Tensor, momentum: bool = False):
        """L2-normalised ITC image features ``[B, P]`` (and the ViT states)."""
        states = self.encode_image(pixel_values.to(self.device), momentum)
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(states[:, 0]).float(), dim=-1), states

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False):
        """L2-normalised ITC text features ``[B, P]`` (and the text states)."""
        states = self.encode_text(input_ids.to(self.device), attention_mask.to(self.device), momentum)
        proj = self.text_proj_m if momentum else self.text_proj
        return F.normalize(proj(states[:, 0]).float(), dim=-1), states

    # ---- momentum model and queues ----------------------------------------------------------------
    def current_alpha(self) -> float:
        c = self.config
        if not c.distill:
            return 0.0
        return c.alpha * min(1.0, self.updates / c.alpha_warmup_steps) if c.alpha_warmup_steps > 0 else c.alpha

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Enqueue the last batch's momentum features, then ``θ̃ ← m θ̃ + (1 - m) θ``; clamp τ."""
        if self._pending is not None:
            img, txt, idx = (distributed.gather_rows(t) for t in self._pending)   # every rank's rows, in order
            B, ptr = img.shape[0], self.ptr
            self.image_queue[ptr:ptr + B] = img
            self.text_queue[ptr:ptr + B] = txt
            self.idx_queue[ptr:ptr + B] = idx
            self.ptr = (ptr + B) % self.config.queue_size
            self.queue_ptr.fill_(self.ptr)
            self._pending = None
        for name, m_name in MOMENTUM_PAIRS:
            ema_(getattr(self, m_name).parameters(), getattr(self, name).parameters(), self.config.momentum)
        self.temp.clamp_(self.config.temp_min, 0.5)
        self.updates += 1
        self.num_updates += 1
        super().after_optimizer_step()          # submodules that follow the optimiser (adapters), if any

    def _check_queue(self, B: int) -> None:
        Q = self.config.queue_size
        if Q % B:
            raise ValueError(f"queue_size {Q} is not a multiple of the batch size {B}: the queue advances one "
                             f"whole batch per step. Pick a batch size that divides {Q}, or a queue_size that "
                             f"is a multiple of {B} (train with drop_last so the last batch is not short)")

    # ---- tasks ------------------------------------------------------------------------------------
    def forward(self, batch: dict, task: str, output_attentions: bool = False, objective=None) -> TaskOutput:
        """``output_attentions``: the fusion encoder's text-to-image cross-attention of the first fused
        batch (the rows of ``logits``: the pairs for ``itm``/``mlm``, positives + hard negatives for
        ``pretrain``), ``{"cross": per-layer [B', heads, L, 1 + N]}``; ``itc`` fuses nothing: ``{}``."""
        self.check_task(task)
        self.check_objective(objective)
        if not output_attentions:
            return self._forward(batch, task)
        maps, handles = [], []
        for layer in self.fusion:
            handles.append(layer.crossattention.self.register_forward_hook(lambda m, a, out: maps.append(out[1])))
        try:
            out = self._forward(batch, task)
        finally:
            for h in handles:
                h.remove()
        out.attentions = {"cross": tuple(maps[:len(self.fusion)])} if maps else {}
        return out

    def _forward(self, batch: dict, task: str) -> TaskOutput:
        pixels, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        if task == "itm":  # given pairs, given labels
            image_states = self.encode_image(pixels)
            logits = self.itm_head(self.fuse(self.encode_text(ids, am), am, image_states)[:, 0])
            losses = per_example_ce(logits, batch["labels"])
            return TaskOutput(loss=losses.mean(), logits=logits, labels=batch["labels"], losses=losses)
        if task == "mlm":
            image_states = self.encode_image(pixels)
            logits = self.mlm_head(self.fuse(self.encode_text(ids, am), am, image_states))
            return TaskOutput(loss=mlm_loss(logits, batch["mlm_labels"]), logits=logits, labels=batch["mlm_labels"],
                              losses=per_example_ce(logits, batch["mlm_labels"]))

        B = pixels.shape[0]
        if self.training:
            self._check_queue(B * distributed.world_size())
        alpha = self.current_alpha()
        temp = self.temp.clamp(self.config.temp_min, 0.5)
        img, image_states = self.image_features(pixels)
        txt, text_states = self.text_features(ids, am)
        with torch.no_grad():
            img_m, image_states_m = self.image_features(pixels, momentum=True)
            txt_m, _ = self.text_features(ids, am, momentum=True)
            image_all = torch.cat([img_m, self.image_queue])                 # [B + Q, P] (a copy: the queue may move)
            text_all = torch.cat([txt_m, self.text_queue])
        idx = caption_ids(ids)
        same = None
        if self.config.same_caption_positives:
            same = idx[:, None] == torch.cat([idx, self.idx_queue])[None, :]     # [B, B + Q], diagonal set
        loss_itc, sim_i2t, sim_t2i = itc_loss(img, txt, image_all, text_all, temp, alpha,
                                              img_m if alpha else None, txt_m if alpha else None, same)
        if self.training:
            self._pending = (img_m.detach(), txt_m.detach(), idx)
        labels = torch.arange(B, device=pixels.device)
        if task == "itc":
            return TaskOutput(loss=loss_itc, logits=sim_i2t[:, :B], labels=labels, extras={"itc": loss_itc.detach()})

        # ITM: B positives, then each image with a hard-negative text, then each text with a hard-negative image
        g = torch.Generator(device=pixels.device).manual_seed(self.config.seed * 1_000_003 + self.updates)
        dup = same[:, :B] if same is not None else None                       # a same-caption pair is no negative
        if self.config.truth_negatives and "truth" in batch:                  # nor is a caption true of the image
            dup = batch["truth"] if dup is None else dup | batch["truth"]
        neg_text = hard_negatives(sim_i2t[:, :B], g, dup)                     # [B] caption for image i
        neg_image = hard_negatives(sim_t2i[:, :B], g, None if dup is None else dup.t())   # [B] image for caption i
        text_cat = torch.cat([text_states, text_states[neg_text], text_states])
        mask_cat = torch.cat([am, am[neg_text], am])
        image_cat = torch.cat([image_states, image_states, image_states[neg_image]])
        itm_logits = self.itm_head(self.fuse(text_cat, mask_cat, image_cat)[:, 0])  # [3B, 2]
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long, device=pixels.device),
                                torch.zeros(2 * B, dtype=torch.long, device=pixels.device)])
        loss_itm = F.cross_entropy(itm_logits.float(), itm_labels)

        # MLM on the masked caption, fused with the image; the momentum model's predictions as soft targets
        mids = batch["mlm_input_ids"]
        mlm_logits = self.mlm_head(self.fuse(self.encode_text(mids, am), am, image_states))
        teacher = None
        if alpha:
            with torch.no_grad():
                teacher = self.mlm_head_m(self.fuse(self.encode_text(mids, am, momentum=True), am,
                                                    image_states_m, momentum=True))
        loss_mlm = mlm_loss(mlm_logits, batch["mlm_labels"], teacher, alpha)
        loss = loss_itc + loss_itm + loss_mlm
        extras = {"itc": loss_itc.detach(), "itm": loss_itm.detach(), "mlm": loss_mlm.detach(),
                  "neg_text": neg_text, "neg_image": neg_image}
        return TaskOutput(loss=loss, logits=itm_logits, labels=itm_labels, extras=extras)

    # ---- attention --------------------------------------------------------------------------------
    @torch.no_grad()
    def cross_attention(self, batch: dict) -> torch.Tensor:
        """Text-to-image cross-attention of every fusion layer, ``[B, layers, heads, L, 1 + N]`` (key 0 is
        the image [CLS]); each row sums to 1 over the image tokens."""
        maps, handles = [], []
        for layer in self.fusion:
            handles.append(layer.crossattention.self.register_forward_hook(lambda m, a, out: maps.append(out[1])))
        try:
            image_states = self.encode_image(batch["pixel_values"])
            am = batch["attention_mask"]
            self.fuse(self.encode_text(batch["input_ids"], am), am, image_states)
        finally:
            for h in handles:
                h.remove()
        return torch.stack(maps, 1).float()

    def image_attention(self, batch: dict) -> torch.Tensor:
        """The text [CLS]'s cross-attention to the patches, averaged over fusion layers and heads, ``[B, h, w]``."""
        att = self.cross_attention(batch)[:, :, :, 0, 1:].mean((1, 2))       # [B, N]
        n = self.config.image_size // self.config.patch_size
        return att.view(-1, n, n)
