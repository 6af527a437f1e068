"""txt2img and img2img over an engine folder: the same images as diffusers for the same seed.

Stages are small functions (encode prompts, prepare latents, denoise, decode) over the graphs of a
backend; the host work is NumPy (schedulers, guidance, the torch-compatible RNG), so the loop is
the same whatever runs the networks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import schedulers
from engine.backends.options import Switch
from engine.errors import Cancelled, EngineError, RequestError
from engine.manifest import Manifest, read_manifest
from engine.pipeline.guidance import Conditioning, fused_feeds, guide, unet_feeds
from engine.pipeline.images import image_to_array, to_pil
from engine.pipeline.loras import LoraRuntime, LoraSet, te_key
from engine.pipeline.request import GenerationRequest, StepCallback, StepControl, StepInfo
from engine.rng import TorchGenerator, randn_batch, seeded_generators
from engine.runtime import BackendName, Graph, GraphLoader, bound, check_finite, finite_outputs, open_backend
from engine.sampling.registry import a1111_label
from engine.specs import CONDITIONING_INPUTS, GraphSpec, Network
from engine.text.conditioning import EmbeddingCache, encode_weighted
from engine.text.tokenizer import ClipTokenizer
from engine.text.xl import TIME_IDS, XlEncoder, encode_xl, time_ids

log = logging.getLogger(__name__)

__all__ = ["BackendName", "GenerationRequest", "GenerationResult", "Pipeline", "StepControl", "StepInfo"]


@dataclass(frozen=True)
class GenerationResult:
    images: list[Any]  # PIL.Image.Image
    seeds: list[int]
    parameters: dict[str, Any]
    timings: dict[str, float]  # milliseconds
    latents: np.ndarray | None = field(default=None, repr=False)  # final latents, before the VAE
    steps_done: int | None = None  # UNet evaluations run; fewer than planned when a callback stopped early

    @property
    def stopped_early(self) -> bool:
        """Whether a step callback ended sampling before the last step (the images are partly denoised)."""
        return self.steps_done is not None and self.steps_done < int(self.timings.get("steps_planned", 0))

    def infotext(self, index: int) -> str:
        """A1111 infotext of image ``index`` (its own seed and batch position), for PNG Info."""
        from engine.infotext import format_infotext

        return format_infotext({**self.parameters, "seed": self.seeds[index], "batch_pos": index})

    def save(self, index: int, path: str | Path) -> Path:
        """Write image ``index`` as a PNG carrying its infotext (atomically; see infotext.save_png)."""
        from engine.infotext import save_png

        return save_png(self.images[index], path, self.infotext(index))


class Pipeline:
    """Generate images from an engine folder on one backend."""

    def __init__(
        self,
        engine_dir: Path,
        manifest: Manifest,
        load_graph: GraphLoader,
        fused_cfg: Switch | str | bool | None = None,
        lora_dir: str | Path | None = None,
    ) -> None:
        self.engine_dir = engine_dir
        self.manifest = manifest
        check_xl(manifest)
        self.tokenizers = tuple(ClipTokenizer.from_folder(engine_dir / d) for d in manifest.tokenizer_dirs)
        self.tokenizer = self.tokenizers[0]
        self.fused_cfg = resolve_fused_cfg(engine_dir, manifest, Switch.of(fused_cfg).as_optional())
        self._load_graph = load_graph
        self._graphs: dict[Network, Graph] = {}
        self._patched: dict[Network, Graph] = {}  # this request's LoRA graphs, see use_loras
        self.embeddings = EmbeddingCache()
        self.loras = LoraRuntime(manifest, load_graph, Path(lora_dir) if lora_dir is not None else None)
        unet = Network.UNET_CFG if self.fused_cfg else Network.UNET
        for network in (*self.text_networks, unet, Network.VAE_DECODER):
            self.graph(network)

    @property
    def is_xl(self) -> bool:
        """Whether the engine folder holds an SDXL model (two text encoders, text_time conditioning)."""
        return self.manifest.dims.is_xl

    @property
    def text_networks(self) -> tuple[Network, ...]:
        """The text encoders, first to last (SDXL: text_encoder and text_encoder_2)."""
        return (Network.TEXT_ENCODER, Network.TEXT_ENCODER_2) if self.is_xl else (Network.TEXT_ENCODER,)

    @property
    def default_sampler(self) -> str:
        """The sampler a request that names none gets: SDXL folders' own scheduler (scheduler_config's
        ``_class_name`` as diffusers' pipeline runs it, under its A1111 label when one runs the same:
        "Euler" for SDXL base); SD 1.x / 2.x: "Euler a", A1111's default."""
        own = self.manifest.scheduler_config.get("_class_name")
        if not self.is_xl or not own:
            return GenerationRequest.sampler
        return a1111_label(str(own), self.manifest.scheduler_config) or str(own)

    @classmethod
    def load(
        cls,
        engine_dir: str | Path,
        backend: BackendName | str = BackendName.ONNXRUNTIME,
        fused_cfg: Switch | str | bool | None = None,
        lora_dir: str | Path | None = None,
        **options: Any,
    ) -> Pipeline:
        """Open an engine folder on a backend (see :mod:`engine.runtime` for the names; options go to
        the backend: device, cuda_graph, precision and its own, see :mod:`engine.backends.options`).

        fused_cfg: run classifier-free guidance inside the ``unet_cfg`` graph (B latents in, B guided
        noises out) instead of combining 2B predictions on the host. None / auto: whenever the engine
        folder has that graph. Requests with guidance off or guidance_rescale > 0 use the plain UNet.

        lora_dir: where ``<lora:NAME>`` tags and ``loras={"NAME": m}`` find LoRA files (by file stem or
        ``ss_output_name`` alias, subfolders included); see :mod:`engine.pipeline.loras`.
        """
        root = Path(engine_dir)
        manifest = read_manifest(root)
        return cls(root, manifest, open_backend(backend, root, manifest, options), fused_cfg, lora_dir)

    def graph(self, network: Network) -> Graph:
        """A network's graph, loaded on first use (the VAE encoder only for img2img); the LoRA-patched
        one while a request with LoRAs runs."""
        if network in self._patched:
            return self._patched[network]
        if network not in self._graphs:
            if network not in self.manifest.graphs:
                raise EngineError(f"engine folder {self.engine_dir} has no {network.value} graph")
            self._graphs[network] = self._load_graph(network)
        return self._graphs[network]

    @property
    def model_hash(self) -> str | None:
        """A1111's short ``Model hash`` of the exported model: the first 10 hex digits of the
        checkpoint file's sha256 (for a diffusers folder, of its stable folder hash; see
        :func:`engine.models.source.folder_hash`). None for engine folders exported before it was
        recorded (an ONNX graph's hash would match nothing A1111 tools know)."""
        return self.manifest.source.get("short_hash")

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = "",
        *,
        on_step: StepCallback | None = None,
        **settings: Any,
    ) -> GenerationResult:
        """Make images: ``GenerationRequest.create(prompt, negative_prompt, **settings)``, then :meth:`run`.

        An unknown setting raises a one-line RequestError (a ValueError) listing the valid ones. Without
        ``sampler`` the model's default is used (see :attr:`default_sampler`).
        """
        settings.setdefault("sampler", self.default_sampler)
        return self.run(GenerationRequest.create(prompt, negative_prompt, **settings), on_step)

    def run(self, request: GenerationRequest, on_step: StepCallback | None = None) -> GenerationResult:
        """Make the request's images; ``on_step`` sees every UNet evaluation and can stop or cancel
        (see :class:`StepControl`).

        Only the checks that depend on the model happen here (RequestError); the request checked the rest.
        """
        return self._run(request, [request], seeded_generators(request.seed, request.num_images), on_step)[0]

    def run_batch(
        self, requests: Sequence[GenerationRequest], on_step: StepCallback | None = None
    ) -> list[GenerationResult]:
        """Several txt2img requests with the same :attr:`GenerationRequest.batch_key` as one UNet batch
        (dynamic batching): result i holds exactly the images ``run(requests[i])`` gives, each image
        drawing its noise from its own seed's generator. Raises RequestError for incompatible requests."""
        if len(requests) == 1:
            return [self.run(requests[0], on_step)]
        merged = GenerationRequest.merge(requests)
        generators = [g for r in requests for g in seeded_generators(r.seed, r.num_images)]
        return self._run(merged, list(requests), generators, on_step)

    def _run(
        self,
        request: GenerationRequest,
        parts: Sequence[GenerationRequest],
        generators: list[TorchGenerator],
        on_step: StepCallback | None,
    ) -> list[GenerationResult]:
        """Generate ``request``'s images, one generator each, and hand them back split as ``parts``."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        sched = schedulers.create(request.sampler, self.manifest.scheduler_config)
        dims = self.manifest.dims
        request.check_model(dims.vae_scale_factor, dims.latent_channels, sched.config.num_train_timesteps)
        sched.set_timesteps(request.steps, strength=request.strength if request.is_img2img else 1.0)
        loras = self.timed(timings, "lora", lambda: self.use_loras(request))
        context = self.timed(timings, "text_encoder", lambda: self.conditioning(request, te_key(loras)))
        latents = self.timed(timings, "prepare", lambda: self.prepare_latents(request, sched, generators))
        latents, done = self.denoise(request, sched, latents, context, generators, timings, on_step)
        pixels = self.timed(timings, "vae_decode", lambda: self.decode(latents))
        images = to_pil(pixels)
        timings["total"] = (time.perf_counter() - start) * 1000
        timings["steps_planned"] = float(len(sched.timesteps))
        results, first = [], 0
        for part in parts:
            end = first + part.num_images
            params = self.result_parameters(part, loras)
            part_latents = latents[first:end]
            results.append(
                GenerationResult(images[first:end], part.seeds, params, timings, part_latents, done)
            )
            first = end
        return results

    @staticmethod
    def timed(timings: dict[str, float], name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = work()
        timings[name] = (time.perf_counter() - start) * 1000
        return value

    # -- stages ---------------------------------------------------------------------------------

    def use_loras(self, request: GenerationRequest) -> LoraSet:
        """Switch the text encoder and UNet graphs to the request's LoRAs (prompt tags and ``loras``);
        the exported graphs when it has none. RequestError / AdapterError for unknown or unfit LoRAs."""
        loras = self.loras.resolve(request.prompts, request.loras)
        unet = Network.UNET_CFG if self.uses_fused_cfg(request) else Network.UNET
        self._patched = {}  # the previous request's patched graphs may be dropped while switching
        self._patched = self.loras.graphs(loras, [*self.text_networks, unet])
        return loras

    def encode_text(self, texts: Sequence[str], clip_skip: int, weights_key: Hashable = ()) -> np.ndarray:
        """Embeddings (N, 77k, D) for texts in A1111's prompt syntax (weights, BREAK, 75-token chunks,
        the shorter rows padded with the empty prompt's chunks; see :mod:`engine.text.conditioning`):
        each distinct chunk encoded once, the LRU used across requests. weights_key: what the text
        encoder's weights depend on (its LoRAs), part of the cache key."""

        graph = self.graph(Network.TEXT_ENCODER)
        check_clip_skip(graph.spec, clip_skip)

        def encode(ids: np.ndarray) -> np.ndarray:
            return clip_skip_layer(finite_outputs(graph, graph.run({"input_ids": ids})), clip_skip)

        return encode_weighted(texts, self.tokenizer, encode, self.embeddings, clip_skip, weights_key)

    def encode_prompts(self, request: GenerationRequest, weights_key: Hashable = ()) -> np.ndarray:
        """UNet context (N, 77 K, D): [negatives; positives] (CFG) or positives, each repeated per image."""
        return self.conditioning(request, weights_key).context

    def conditioning(self, request: GenerationRequest, weights_key: Hashable = ()) -> Conditioning:
        """The UNet's conditioning, [negatives; positives] (CFG) or positives, each row repeated per image:
        the context, plus SDXL's pooled text_embeds and time_ids (see :mod:`engine.text.xl`)."""
        texts = [*request.negative_prompts, *request.prompts] if request.do_cfg else list(request.prompts)
        if not self.is_xl:
            return Conditioning(self.encode_text(texts, request.clip_skip, weights_key)).repeat(
                request.batch_size
            )
        empty = (i for i, text in enumerate(request.negative_prompts) if text == "")
        zero = frozenset(empty) if request.do_cfg and self.zero_empty_negative else frozenset()
        first, second = (
            self.xl_encoder(network, tokenizer, request.clip_skip)
            for network, tokenizer in zip(self.text_networks, self.tokenizers, strict=True)
        )
        context, pooled = encode_xl(
            texts, (first, second), self.embeddings, request.clip_skip, weights_key, zero
        )
        added = {"text_embeds": pooled, "time_ids": time_ids(request.height, request.width, len(texts))}
        return Conditioning(context, added).repeat(request.batch_size)

    @property
    def zero_empty_negative(self) -> bool:
        """SDXL's ``force_zeros_for_empty_prompt`` (model_index.json; true for SDXL base and Turbo): an
        empty negative prompt conditions on zeros, not on the encoding of ""."""
        return bool(self.manifest.source.get("force_zeros_for_empty_prompt", True))

    def xl_encoder(self, network: Network, tokenizer: ClipTokenizer, clip_skip: int) -> XlEncoder:
        """One SDXL text encoder for :func:`engine.text.xl.encode_xl`: the hidden states A1111's clip skip
        picks (1: the penultimate layer, SDXL's conditioning) and, from text_encoder_2, text_embeds."""
        graph = self.graph(network)
        layers = int(graph.spec.outputs[0].dims[1])
        if clip_skip >= layers:
            raise RequestError(
                f"clip_skip {clip_skip} needs {clip_skip + 1} layers; this model's {network.value} "
                f"has {layers}"
            )

        def encode(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            outputs = finite_outputs(graph, graph.run({"input_ids": ids}))
            return outputs["hidden_states"][:, -(clip_skip + 1)], outputs.get("text_embeds")

        return XlEncoder(tokenizer, encode)

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int]:
        dims = self.manifest.dims
        factor = dims.vae_scale_factor
        return (request.num_images, dims.latent_channels, request.height // factor, request.width // factor)

    def prepare_latents(
        self, request: GenerationRequest, sched: schedulers.Scheduler, generators: list[TorchGenerator]
    ) -> np.ndarray:
        """Initial latents the way diffusers draws them from per-image generators."""
        shape = self.latent_shape(request)
        if request.is_img2img:
            clean = self.encode_image(request, generators)
            noise = randn_batch(generators, shape) if request.latents is None else request.latents
            return sched.add_noise(clean, noise, 0).astype(np.float32)
        noise = randn_batch(generators, shape) if request.latents is None else request.latents
        return (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)

    def encode_image(self, request: GenerationRequest, generators: list[TorchGenerator]) -> np.ndarray:
        """img2img: a posterior sample per image (one draw from each generator), scaled."""
        pixels = image_to_array(request.image, request.width, request.height)
        encoder = self.graph(Network.VAE_ENCODER)
        posterior = finite_outputs(encoder, encoder.run({"image": pixels}))
        mean, std = posterior["latent_mean"], posterior["latent_std"]
        draws = [g.randn(mean.shape) for g in generators]
        sample = np.concatenate([mean + std * d for d in draws])
        return (sample * np.float32(self.manifest.scaling_factor)).astype(np.float32)

    def denoise(
        self,
        request: GenerationRequest,
        sched: schedulers.Scheduler,
        latents: np.ndarray,
        context: Conditioning,
        generators: list[TorchGenerator],
        timings: dict[str, float],
        on_step: StepCallback | None = None,
    ) -> tuple[np.ndarray, int]:
        """The sampling loop: scale, UNet (both CFG halves in one call) and guidance, step. Returns the
        latents and the number of steps run (fewer when ``on_step`` asked to stop)."""
        fused = self.uses_fused_cfg(request)
        unet = self.graph(Network.UNET_CFG if fused else Network.UNET)
        unet_ms: list[float] = []
        host_ms: list[float] = []
        total = len(sched.timesteps)
        done = 0
        make_feeds = fused_feeds if fused else unet_feeds
        # The conditioning (and the guidance scale) stays the same all generation: bound once, so a backend
        # with device buffers copies it once, not at every step.
        first = make_feeds(latents, 0.0, context, request)
        names = (*CONDITIONING_INPUTS, "guidance_scale")
        constants = {name: first[name] for name in names if name in first}
        with bound(unet, constants) as run_unet:
            for i, t in enumerate(sched.timesteps):
                begin = time.perf_counter()
                model_in = sched.scale_model_input(latents, i).astype(np.float32)
                feeds = make_feeds(model_in, t, context, request)
                varying = {name: value for name, value in feeds.items() if name not in constants}
                middle = time.perf_counter()
                outputs = run_unet(varying)
                after = time.perf_counter()
                finite_outputs(unet, outputs, f"at step {i + 1}/{total}")  # host time, not the UNet's
                guided = outputs["guided_noise"] if fused else guide(outputs["noise_pred"], request)
                noise = randn_batch(generators, latents.shape) if sched.noise_steps[i] else None
                latents = sched.step(guided, i, latents, noise=noise).astype(np.float32)
                end = time.perf_counter()
                unet_ms.append((after - middle) * 1000)
                host_ms.append((middle - begin + end - after) * 1000)
                done = i + 1
                if notify(on_step, StepInfo(done, total, float(t), latents)) is StepControl.STOP:
                    break
        timings["unet_total"] = sum(unet_ms)
        timings["unet_per_step"] = float(np.mean(unet_ms)) if unet_ms else 0.0
        timings["scheduler_per_step"] = float(np.mean(host_ms)) if host_ms else 0.0
        return latents, done

    def uses_fused_cfg(self, request: GenerationRequest) -> bool:
        """Whether a request runs the fused-guidance graph (it cannot rescale)."""
        return self.fused_cfg and request.do_cfg and request.guidance_rescale == 0

    def decode(self, latents: np.ndarray) -> np.ndarray:
        scaled = (latents / np.float32(self.manifest.scaling_factor)).astype(np.float32)
        check_finite("latents after denoising", {"latents": scaled}, "the sampler's steps overflowed")
        decoder = self.graph(Network.VAE_DECODER)
        return finite_outputs(decoder, decoder.run({"latent": scaled}))["image"]

    def result_parameters(self, request: GenerationRequest, loras: LoraSet) -> dict[str, Any]:
        """:meth:`parameters` plus A1111's ``Lora hashes``; LoRAs given outside the prompt (``loras``)
        are added to the recorded prompt as tags, so pasting the infotext reproduces the image."""
        params = {**self.parameters(request), "lora_hashes": self.loras.hashes(loras)}
        if request.loras:
            tags = self.loras.tags(request.loras)
            prompts = params["prompt"] if isinstance(params["prompt"], list) else [params["prompt"]]
            shown = [f"{prompt} {tags}" for prompt in prompts]
            params["prompt"] = shown if isinstance(params["prompt"], list) else shown[0]
        return params

    @property
    def model_name(self) -> str:
        """A1111's ``Model``: the checkpoint's stem or the model folder's name, else the engine folder's."""
        source = self.manifest.source
        name = source.get("name") or (Path(source["model_dir"]).name if source.get("model_dir") else None)
        return name or self.engine_dir.resolve().name

    def parameters(self, request: GenerationRequest) -> dict[str, Any]:
        """What made the images (the seed as recorded, the sampler's canonical name), for the infotext."""
        return {
            "prompt": request.prompts[0] if len(request.prompts) == 1 else list(request.prompts),
            "negative_prompt": request.negative_prompts[0]
            if len(request.negative_prompts) == 1
            else list(request.negative_prompts),
            "steps": request.steps,
            "sampler": request.sampler,
            "guidance_scale": request.guidance_scale,
            "guidance_rescale": request.guidance_rescale,
            "seed": request.seed,
            "width": request.width,
            "height": request.height,
            "clip_skip": request.clip_skip,
            "strength": request.strength if request.is_img2img else None,
            "batch_size": request.batch_size,
            "model_hash": self.model_hash,
            "model_name": self.model_name,
            "prediction_type": self.manifest.prediction_type,
            **vae_parameters(self.manifest.source.get("vae")),
        }


def vae_parameters(vae: Mapping[str, Any] | None) -> dict[str, Any]:
    """A1111's ``VAE hash`` and ``VAE`` infotext fields, when export swapped the model's VAE."""
    return {"vae_hash": vae["short_hash"], "vae_name": vae["name"]} if vae else {}


def resolve_fused_cfg(engine_dir: Path, manifest: Manifest, wanted: bool | None) -> bool:
    """None: fused when the engine folder has the graph; True: required; False: never."""
    present = Network.UNET_CFG in manifest.graphs
    if wanted and not present:
        raise EngineError(
            f"engine folder {engine_dir} has no {Network.UNET_CFG.value} graph for fused guidance; "
            "re-export it with `sd-engine export` (or turn fused guidance off)"
        )
    return present if wanted is None else wanted


def notify(on_step: StepCallback | None, info: StepInfo) -> StepControl:
    """What the callback asks; False or StepControl.CANCEL raise Cancelled."""
    answer = StepControl.CONTINUE if on_step is None else on_step(info)
    if answer is False or answer == StepControl.CANCEL:
        raise Cancelled(f"generation cancelled at step {info.step}/{info.total}")
    return StepControl.STOP if answer == StepControl.STOP else StepControl.CONTINUE


# Engine folders exported before the stacked output carry only the penultimate layer (clip skip 2).
_PENULTIMATE = "penultimate_hidden_state"


def check_xl(manifest: Manifest) -> None:
    """EngineError for an SDXL-shaped engine folder this pipeline cannot drive: no second text encoder
    graph, or time ids other than SDXL base's 6 (the refiner's aesthetic score)."""
    dims = manifest.dims
    if not dims.is_xl:
        return
    if Network.TEXT_ENCODER_2 not in manifest.graphs:
        raise EngineError(
            "this SDXL engine folder has no text_encoder_2 graph; re-export it with all networks"
        )
    if dims.time_ids_size != TIME_IDS:
        raise EngineError(
            f"this SDXL model takes {dims.time_ids_size} time ids; only SDXL base's {TIME_IDS} (sizes and "
            "crop) are supported (refiner models take an aesthetic score)"
        )


def check_clip_skip(spec: GraphSpec, clip_skip: int) -> None:
    """RequestError unless the text encoder graph has the layer ``clip_skip`` picks (1 = last)."""
    names = spec.output_names
    if clip_skip == 1 or (clip_skip == 2 and _PENULTIMATE in names):
        return
    if "normed_hidden_states" not in names:
        raise RequestError(
            f"clip_skip {clip_skip}: this engine folder's text encoder only gives clip skip 1 and 2; "
            "re-export the model with this sd-engine for 1..12"
        )
    layers = int(next(t for t in spec.outputs if t.name == "normed_hidden_states").dims[1])
    if clip_skip > layers:
        raise RequestError(f"clip_skip {clip_skip}: this model's text encoder has only {layers} layers")


def clip_skip_layer(outputs: Mapping[str, np.ndarray], clip_skip: int) -> np.ndarray:
    """The text embeddings (N, S, H) A1111's clip skip picks: the output of layer ``num_layers -
    clip_skip + 1`` after the final layer norm (clip skip 1: ``last_hidden_state``)."""
    if clip_skip == 1:
        return outputs["last_hidden_state"]
    if "normed_hidden_states" in outputs:
        return outputs["normed_hidden_states"][:, -clip_skip]
    return outputs[_PENULTIMATE]
