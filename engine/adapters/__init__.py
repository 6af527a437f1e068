"""LoRA and LyCORIS files at run time, torch-free: reading, matching to an engine's weights, merging.

``read_lora`` parses a .safetensors LoRA (kohya / A1111, diffusers / PEFT, LyCORIS LoCon, LoHa, LoKr,
full diffs, DoRA), ``match_lora`` pairs its modules with an engine's weights and checks the base
family and shapes, ``merge_weight`` computes ``W + sum m * delta``. ``find_lora`` / ``list_loras``
look names up in a LoRA folder the way A1111 does; ``lora_hash`` is A1111's hash for the infotext.
NumPy only: no torch, no safetensors package.
"""

from __future__ import annotations

from engine.adapters.files import AdapterError, LoraFile, lora_hash, read_header, read_lora
from engine.adapters.formats import DeltaKind, ModuleDelta
from engine.adapters.keys import FAMILY_NAMES, Component, FamilyGuess, Target, guess_family, ldm_unet_paths
from engine.adapters.library import LoraInfo, find_lora, list_loras, lora_files
from engine.adapters.merge import LoraMatch, match_lora, merge_weight

__all__ = [
    "FAMILY_NAMES",
    "AdapterError",
    "Component",
    "DeltaKind",
    "FamilyGuess",
    "LoraFile",
    "LoraInfo",
    "LoraMatch",
    "ModuleDelta",
    "Target",
    "find_lora",
    "guess_family",
    "ldm_unet_paths",
    "list_loras",
    "lora_files",
    "lora_hash",
    "match_lora",
    "merge_weight",
    "read_header",
    "read_lora",
]
