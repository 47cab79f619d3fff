"""Torch datasets over the toy world, one per task, and the collate function that tokenizes.

Tasks (the papers' benchmarks in miniature):

=========  ====================================================  =====================
task       item                                                  label
=========  ====================================================  =====================
itm        image + caption, half of them negatives                1 match / 0 not
itc        image + one of its true captions (multi-positive)      scene index (group)
classify   image whose main object is large, + class prompts      colour-shape class
qa         image + question                                       index into ANSWERS
tf         image + statement                                      1 true / 0 false
mlm        image + caption, masked when collated                 masked words
pretrain   image + caption (ALBEF: ITC + ITM + MLM in one batch)  scene index; masked
           ``input_ids`` stay whole, ``mlm_input_ids`` masked;    words in ``mlm_labels``
           ``truth[i, j]``: caption j is true of image i
=========  ====================================================  =====================

Scene ``i`` of a split is drawn from ``default_rng((seed, split, shift, i))`` and is the same on every
machine. Per-item randomness (which caption, which negative) also depends on the epoch set by
:meth:`WorldDataset.set_epoch`, so training sees fresh pairs each epoch and still resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

import vlat.world.captions as C
from vlat.world.masking import mask_tokens
from vlat.world.scenes import ALL_PAIRS, SHIFTS, check_shift, make_scene, render
from vlat.world.tokenizer import MAX_TEXT_LEN

TASKS = ("itm", "itc", "classify", "qa", "tf", "mlm", "pretrain")
SPLITS = ("train", "val", "test")
CLASS_NAMES = tuple(f"{c} {s}" for c, s in ALL_PAIRS)  # 24 colour-shape classes


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def class_prompts(paraphrase: bool = False) -> list[str]:
    return [C.class_prompt(c, s, paraphrase) for c, s in ALL_PAIRS]


class WorldDataset(Dataset):
    """Scenes of one split (and optionally one shift) rendered once, served as task items.

    Args:
        task: one of :data:`TASKS`.
        split: ``train`` / ``val`` / ``test`` (disjoint seeds).
        size: number of scenes.
        seed: world seed; the same seed gives the same scenes everywhere.
        shift: ``None`` (in-distribution) or one of :data:`vlat.world.scenes.SHIFTS`.
        noise_rate: fraction of captions replaced by noise (another scene's caption or keyword
            soup), only for ``itc``/``itm``/``mlm``/``pretrain`` positives; the noisy-web-text setting of ALBEF.
        image_size: side of the square images in pixels.
        hard_negatives: ``itc`` only: each item also carries ``negative``, a minimally wrong caption of its
            own scene (:func:`vlat.world.captions.false_claim`), which the collated batch holds as
            ``neg_input_ids`` (NegCLIP's hard negatives; Yuksekgonul et al. 2023).
    """

    def __init__(self, task: str = "itm", split: str = "train", size: int = 2000, seed: int = 0,
                 shift: str | None = None, noise_rate: float = 0.0, image_size: int = 64,
                 hard_negatives: bool = False):
        check_task(task)
        check_shift(shift)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"noise_rate must lie in [0, 1], got {noise_rate}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if hard_negatives and task != "itc":
            raise ValueError(f"hard negatives are captions for contrastive training (task 'itc'), not {task!r}")
        self.task, self.split, self.size, self.seed = task, split, size, seed
        self.shift, self.noise_rate, self.image_size = shift, noise_rate, image_size
        self.hard_negatives = hard_negatives
        self.epoch = 0
        # Shifts that only re-render or re-word keep the ID scenes (a controlled shift: same content,
        # new look or wording); the composition shift draws scenes of its own.
        key = (seed, SPLITS.index(split), 1 + SHIFTS.index(shift) if shift == "composition" else 0)
        self.scenes, images = [], np.empty((size, image_size, image_size, 3), dtype=np.uint8)
        for i in range(size):
            rng = np.random.default_rng(key + (i,))
            scene = make_scene(rng, shift=shift, main_object=(task == "classify"))
            self.scenes.append(scene)
            images[i] = render(scene, image_size, shift, rng)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] uint8
        self.paraphrase = shift == "paraphrase"
        self.claims: list[list] = [C.true_claims(s) for s in self.scenes]   # the claim of each caption (None: soup)
        self.captions = [[C.caption_text(c, self.paraphrase) for c in claims] for claims in self.claims]
        self.noisy = np.zeros(size, dtype=bool)
        if noise_rate > 0:  # which scenes carry a wrong caption is fixed for the dataset's life
            rng = np.random.default_rng(key + (2**31,))
            self.noisy = rng.random(size) < noise_rate
            for i in np.flatnonzero(self.noisy):
                j = (i + 1 + int(rng.integers(size - 1))) % size if size > 1 else i
                soup = rng.random() < 0.5 or j == i
                self.captions[i] = [C.keyword_soup(rng) if soup else self.captions[j][0]]
                self.claims[i] = [None if soup else self.claims[j][0]]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose captions / negatives / questions ``__getitem__`` serves."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def pixels(self, i: int) -> torch.Tensor:
        return self.images[i].float().div_(255.0)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, SPLITS.index(self.split), self.epoch, i, 7))

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng, scene = self._rng(i), self.scenes[i]
        item = {"pixel_values": self.pixels(i), "index": i}
        caps = self.captions[i]
        if self.task in ("itc", "mlm", "pretrain"):
            k = int(rng.integers(len(caps)))
            item["text"] = caps[k]
            if self.task == "pretrain":  # what the collator needs to say which captions of a batch are true where
                item["scene"], item["claim"] = scene, self.claims[i][k]
            item["label"] = i
            item["mask_seed"] = int(rng.integers(2**31))
            if self.hard_negatives:  # drawn last, so the other fields are those of a dataset without negatives
                item["negative"] = C.caption_text(C.false_claim(scene, rng), self.paraphrase)
        elif self.task == "itm":
            positive = rng.random() < 0.5
            if positive:
                item["text"] = caps[int(rng.integers(len(caps)))]
            elif rng.random() < 0.5 and self.size > 1:  # easy negative: a true caption of another scene
                item["text"] = self._other_scene_caption(i, rng)
            else:  # hard negative: a minimally wrong claim
                item["text"] = C.caption_text(C.false_claim(scene, rng), self.paraphrase)
            item["label"] = int(positive)
        elif self.task == "classify":
            item["text"] = None
            item["label"] = ALL_PAIRS.index((scene[0].colour, scene[0].shape))
        elif self.task == "qa":
            q, a = C.question(scene, rng)
            item["text"], item["label"] = q, C.ANSWERS.index(a)
        elif self.task == "tf":
            truth = rng.random() < 0.5
            claim = C.true_claims(scene)[int(rng.integers(len(C.true_claims(scene))))] if truth \
                else C.false_claim(scene, rng)
            item["text"], item["label"] = C.statement_text(claim), int(truth)
        return item

    def _other_scene_caption(self, i: int, rng: np.random.Generator) -> str:
        for _ in range(20):
            j = (i + 1 + int(rng.integers(self.size - 1))) % self.size
            claims = C.true_claims(self.scenes[j])
            claim = claims[int(rng.integers(len(claims)))]
            if not C.holds(self.scenes[i], claim):
                return C.caption_text(claim, self.paraphrase)
        return C.caption_text(C.false_claim(self.scenes[i], rng), self.paraphrase)


def encode_text(tokenizer, texts: list[str], max_length: int = MAX_TEXT_LEN) -> dict:
    """Tokenize captions, refusing empty and overlong ones with a message that says what to do."""
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"empty caption {t!r}: give the text to match against the image")
    enc = tokenizer(list(texts), padding=True, truncation=False, return_tensors="pt")
    n = enc["attention_mask"].sum(1)
    if int(n.max()) > max_length:
        k = int(n.argmax())
        raise ValueError(f"caption {texts[k][:60]!r}... has {int(n[k])} tokens; the model accepts at most "
                         f"{max_length} (shorten it, or build the model with a larger max_text_len)")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def truth_matrix_of(items: list[dict]) -> torch.Tensor:
    """``[B, B]`` booleans: is item j's caption true of item i's scene (a keyword-soup caption is true of
    nothing, not even its own image). The toy world knows this; web data does not."""
    return torch.tensor([[b["claim"] is not None and C.holds(a["scene"], b["claim"]) for b in items] for a in items],
                        dtype=torch.bool)


@dataclass
class Collator:
    """Stack images, tokenize texts and, for ``classify``, add the tokenized class prompts."""

    tokenizer: object
    task: str = "itm"
    max_length: int = MAX_TEXT_LEN
    paraphrase_prompts: bool = False
    class_texts: list | None = None     # classify: these prompts instead of the toy world's (your own classes)

    def __post_init__(self):
        self._prompts = None
        if self.task == "classify":
            texts = self.class_texts if self.class_texts is not None else class_prompts(self.paraphrase_prompts)
            self._prompts = encode_text(self.tokenizer, list(texts), self.max_length)

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("an empty batch: give the collator at least one item")
        batch = {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
        if self.task == "classify":
            batch["class_input_ids"] = self._prompts["input_ids"]
            batch["class_attention_mask"] = self._prompts["attention_mask"]
        elif "negative" in items[0]:  # captions and their hard negatives padded to one length, then split
            enc = encode_text(self.tokenizer, [it["text"] for it in items] + [it["negative"] for it in items],
                              self.max_length)
            n = len(items)
            batch.update({k: v[:n] for k, v in enc.items()})
            batch.update({f"neg_{k}": v[n:] for k, v in enc.items()})
        else:
            batch.update(encode_text(self.tokenizer, [it["text"] for it in items], self.max_length))
        if self.task in ("mlm", "pretrain"):  # mask once here, so every inner step of a method sees the same text
            # items of your own pairs (FolderDataset) carry no mask_seed: their index seeds the mask
            g = torch.Generator().manual_seed(sum(it.get("mask_seed", it["index"]) for it in items) % (2**63))
            tk = self.tokenizer
            masked, batch["mlm_labels"] = mask_tokens(
                batch["input_ids"], pad_id=tk.pad_token_id, cls_id=tk.cls_token_id, mask_id=tk.mask_token_id,
                vocab_size=len(tk), generator=g)
            batch["mlm_input_ids" if self.task == "pretrain" else "input_ids"] = masked
        if self.task == "pretrain" and "claim" in items[0]:
            batch["truth"] = truth_matrix_of(items)
        return batch
