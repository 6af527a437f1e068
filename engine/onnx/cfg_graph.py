"""Derive the fused-guidance UNet graph (``unet_cfg``) from an exported UNet graph.

Classifier-free guidance runs the UNet on [negatives; positives] and combines the two halves. Done on
the host, each step ships 2B latents in and 2B noise predictions out; inside the graph, B latents go in
and B guided noises come out, and the combine runs on the device. This module rewrites the ONNX
graph instead of exporting the UNet twice: the new graph wraps the same nodes and refers to the same
external weight file, so it costs a few MB on disk and no export time. Its numbers are checked like
every other conversion (see :func:`engine.export.parity_gate`, against
:class:`engine.models.torch_modules.GuidedUNet`).

The rewrite: ``sample`` and ``timestep`` are concatenated with themselves (Concat on axis 0) before
the original nodes; the conditioning inputs (embeddings; SDXL's text_embeds and time_ids) take the
doubled batch as they are; the original output is split in two (uncond, text) and combined as
``uncond + guidance_scale * (text - uncond)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.specs import CONTEXT_BATCH, GraphSpec, TensorSpec

PREFIX = "cfg/"


def derive_cfg_graph(unet_path: Path, out_path: Path, unet: GraphSpec, fused: GraphSpec) -> None:
    """Write ``out_path``: the graph of ``unet_path`` with guidance fused in (weights stay shared)."""
    import onnx

    model = onnx.load(str(unet_path), load_external_data=False)
    graph = model.graph
    sample, timestep = (t.name for t in unet.inputs[:2])
    conditioning = [t.name for t in unet.inputs[2:]]  # embeddings (SDXL: text_embeds, time_ids too)
    output = unet.outputs[0].name
    check_interface(graph, unet)
    taken = all_names(graph)
    doubled = {name: unique(f"{PREFIX}{name}_x2", taken) for name in (sample, timestep)}
    raw = unique(f"{PREFIX}{output}_x2", taken)
    rename_uses(graph.node, {**doubled, output: raw})
    scale = fused.inputs[-1]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(doubling_nodes(doubled))
    graph.node.extend(body)
    graph.node.extend(combine_nodes(raw, scale.name, fused.outputs[0].name, taken))
    for name in conditioning:
        set_context_batch(graph, name)
    graph.input.append(value_info(scale))
    replace_output(graph, output, fused.outputs[0])
    del graph.value_info[:]  # the inner batch is now twice the input's: the old annotations would lie
    graph.name = f"{graph.name or 'unet'}_cfg"
    onnx.save(model, str(out_path))


def check_interface(graph: Any, spec: GraphSpec) -> None:
    inputs = [v.name for v in graph.input]
    outputs = [v.name for v in graph.output]
    if inputs != spec.input_names or outputs != spec.output_names:
        raise EngineError(
            f"cannot fuse guidance: the UNet graph has inputs {inputs} and outputs {outputs}, "
            f"expected {spec.input_names} and {spec.output_names}"
        )


def all_names(graph: Any) -> set[str]:
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def rename_uses(nodes: Iterable[Any], renames: dict[str, str]) -> None:
    """Point every node input and output named in renames at its new name."""
    for node in nodes:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name in renames:
                    field[i] = renames[name]


def doubling_nodes(doubled: dict[str, str]) -> list[Any]:
    from onnx import helper

    return [
        helper.make_node("Concat", [name, name], [target], name=f"{target}/Concat", axis=0)
        for name, target in doubled.items()
    ]


def combine_nodes(raw: str, scale: str, output: str, taken: set[str]) -> list[Any]:
    """uncond, text = split(raw); output = uncond + scale * (text - uncond)."""
    from onnx import helper

    uncond, text, delta, scaled = (
        unique(f"{PREFIX}{n}", taken) for n in ("uncond", "text", "delta", "scaled")
    )
    return [
        helper.make_node("Split", [raw], [uncond, text], name=f"{PREFIX}Split", axis=0, num_outputs=2),
        helper.make_node("Sub", [text, uncond], [delta], name=f"{PREFIX}Sub"),
        helper.make_node("Mul", [delta, scale], [scaled], name=f"{PREFIX}Mul"),
        helper.make_node("Add", [uncond, scaled], [output], name=f"{PREFIX}Add"),
    ]


def set_context_batch(graph: Any, name: str) -> None:
    """A conditioning input's batch axis becomes its own symbol: twice the latents' batch."""
    (value,) = [v for v in graph.input if v.name == name]
    first = value.type.tensor_type.shape.dim[0]
    first.ClearField("dim_value")
    first.dim_param = CONTEXT_BATCH


def value_info(tensor: TensorSpec) -> Any:
    import numpy as np
    from onnx import helper

    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
    return helper.make_tensor_value_info(tensor.name, elem_type, list(tensor.dims))


def replace_output(graph: Any, old: str, new: TensorSpec) -> None:
    (output,) = [v for v in graph.output if v.name == old]
    output.CopyFrom(value_info(new))
