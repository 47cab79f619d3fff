"""The toy vision-language world: procedural scenes, captions, tasks, shifts, datasets, tokenizer."""

from vlat.world.captions import ANSWERS, class_prompt, holds, question, true_claims
from vlat.world.datasets import CLASS_NAMES, TASKS, Collator, WorldDataset, class_prompts, encode_text
from vlat.world.folder import ClassFolderDataset, FolderDataset, train_test_pairs, write_folder
from vlat.world.scenes import ALL_PAIRS, COLOURS, HELD_OUT_PAIRS, SHAPES, SHIFTS, SIZES, Obj, make_scene, render
from vlat.world.tokenizer import MAX_TEXT_LEN, load_tokenizer

__all__ = ["ALL_PAIRS", "ANSWERS", "CLASS_NAMES", "COLOURS", "ClassFolderDataset", "Collator", "FolderDataset", "HELD_OUT_PAIRS",
           "MAX_TEXT_LEN", "Obj", "SHAPES", "SHIFTS", "SIZES", "TASKS", "WorldDataset",
           "class_prompt", "class_prompts", "encode_text", "holds", "load_tokenizer", "make_scene",
           "question", "render", "train_test_pairs", "true_claims", "write_folder"]
