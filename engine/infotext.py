"""Generation parameters as A1111-style "infotext" in a PNG ``parameters`` text chunk.

The format is AUTOMATIC1111 stable-diffusion-webui's, so its PNG Info tab, civitai and similar
tools read our images back::

    a lighthouse at dusk
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, Model: sd15

The prompt comes first (it may span lines), then an optional ``Negative prompt:`` line, then one
line of ``key: value`` pairs; values holding ``,``, ``:`` or a newline are JSON-quoted.
Torch-free: pillow only.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.fsutil import write_atomic

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

# A1111's pattern for one "key: value" pair of the last line (modules/infotext_utils.py).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
# A1111 needs at least this many pairs before it takes the last line for parameters.
_MIN_PAIRS = 3


def quote(value: Any) -> str:
    """A1111's ``quote``: JSON-quote a value that would otherwise break the ``k: v, ...`` line."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111's ``unquote``: undo :func:`quote`; text that is not valid JSON stays as it is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def _fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """The key: value pairs, in the order A1111 writes them; None means "leave out"."""
    batch_size = int(params.get("batch_size") or 1)
    clip_skip = int(params.get("clip_skip") or 1)
    return {
        "Steps": params["steps"],
        "Sampler": params["sampler"],
        "CFG scale": params["guidance_scale"],
        "Seed": params["seed"],
        "Size": f"{params['width']}x{params['height']}",
        "Model hash": params.get("model_hash") or None,
        "Model": params.get("model_name") or None,
        "VAE hash": params.get("vae_hash") or None,
        "VAE": params.get("vae_name") or None,
        "Batch size": batch_size if batch_size > 1 else None,
        "Batch pos": int(params.get("batch_pos") or 0) if batch_size > 1 else None,
        "Denoising strength": params.get("strength"),
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Prediction type": "v_prediction" if params.get("prediction_type") == "v_prediction" else None,
        "Lora hashes": params.get("lora_hashes") or None,
    }


def format_infotext(params: Mapping[str, Any]) -> str:
    """A1111 infotext for one image.

    ``params`` has the keys of ``GenerationResult.parameters``: prompt, negative_prompt, steps,
    sampler, guidance_scale, seed (this image's), width, height, and optionally model_hash,
    model_name, vae_hash and vae_name (a swapped VAE), batch_size, batch_pos (0-based, as A1111),
    strength (img2img only, else None), clip_skip (written only above 1) and prediction_type
    (written only for "v_prediction": A1111 assumes epsilon where it is absent), lora_hashes (A1111's
    ``Lora hashes``: "name: first 12 hex of the file's addnet hash, ...", quoted).
    """
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in _fields(params).items() if value is not None)
    negative = params.get("negative_prompt") or ""
    negative_line = f"\n{NEGATIVE_PREFIX} {negative}" if negative else ""
    return f"{params.get('prompt', '')}{negative_line}\n{pairs}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """Read infotext back the way A1111's PNG Info does: ``{"Prompt", "Negative prompt", key: value}``.

    Values are strings, unquoted; ``Size`` stays ``"WxH"``. As in A1111, the last line holds the
    parameters only if it has at least three ``key: value`` pairs, and prompt lines are stripped.
    """
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < _MIN_PAIRS:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    fields = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _PAIR.findall(last):
        fields[key] = unquote(value)
    return fields


def to_parameters(fields: Mapping[str, str]) -> dict[str, Any]:
    """Typed parameters (the keys :func:`format_infotext` takes) from :func:`parse_infotext`'s fields.

    Keys this engine does not write are dropped; a malformed number raises ValueError.
    """
    params: dict[str, Any] = {
        "prompt": fields.get("Prompt", ""),
        "negative_prompt": fields.get("Negative prompt", ""),
        "steps": int(fields["Steps"]),
        "sampler": fields["Sampler"],
        "guidance_scale": float(fields["CFG scale"]),
        "seed": int(fields["Seed"]),
        "model_hash": fields.get("Model hash"),
        "model_name": fields.get("Model"),
        "vae_hash": fields.get("VAE hash"),
        "vae_name": fields.get("VAE"),
        "batch_size": int(fields.get("Batch size", 1)),
        "batch_pos": int(fields.get("Batch pos", 0)),
        "strength": float(fields["Denoising strength"]) if "Denoising strength" in fields else None,
        "clip_skip": int(fields.get("Clip skip", 1)),
        "prediction_type": fields.get("Prediction type", "epsilon"),
        "lora_hashes": fields.get("Lora hashes"),
    }
    size = _SIZE.match(fields.get("Size", ""))
    if size is None:
        raise ValueError(f"infotext has no valid Size (WxH): {fields.get('Size')!r}")
    params["width"], params["height"] = int(size.group(1)), int(size.group(2))
    return params


def png_info(infotext: str) -> PngInfo:
    """A ``parameters`` text chunk: tEXt when the text is latin-1, else UTF-8 iTXt."""
    info = PngInfo()
    try:
        infotext.encode("latin-1")
    except UnicodeEncodeError:
        info.add_itxt(PNG_KEY, infotext)
    else:
        info.add_text(PNG_KEY, infotext)
    return info


def save_png(image: Image.Image, path: str | Path, infotext: str) -> Path:
    """Write ``image`` as a PNG carrying ``infotext``; atomic: a temp file beside it, then a rename.

    A failure or interrupt leaves the old file (if any) untouched and no temp file behind. The new
    file gets the usual umask-filtered permissions.
    """
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=png_info(infotext))
    return write_atomic(Path(path), encoded.getvalue())
