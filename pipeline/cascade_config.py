"""The typed configs of the generation commands (``sample``, ``variations``, ``interpolate``,
``textdiff``, ``generate``) and of ``eval``: the trained cascade they load and how it samples.

The sections they share with the other stages (storage, Ray) and the :class:`StageConfig` base are
in :mod:`pipeline.stage_config`; :mod:`pipeline.config` reads and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.stage_config import ClipSource, StageConfig, require_folder
from unclip.fields import param, require


@dataclass
class CascadeConfig(StageConfig):
    """What every generation command shares: the trained decoder and upsamplers it loads, the CLIP
    that encodes its inputs, how the image stages sample, the seed, and where the images go."""

    decoder: str = param("checkpoints/decoder", "decoder run folder or checkpoint")
    upsamplers: list[str] = param(
        factory=list, doc="upsampler run folders or checkpoints, lowest resolution first"
    )
    clip: ClipSource | None = param(
        None,
        "the CLIP that made the decoder's embedding store, to encode prompts and images (null: "
        "from the store's manifest, which names open_clip pretrained tags; give it for a "
        "checkpoint or a custom model). Checked against the store's CLIP before anything runs",
    )
    decoder_steps: int | None = param(None, "decoder sampling steps (null: the run's)", ge=1)
    upsampler_steps: int | None = param(None, "upsampler sampling steps (null: each run's)", ge=1)
    decoder_guidance: float | None = param(
        None, "decoder classifier-free guidance scale (null: the run's)", ge=0
    )
    seed: int = param(0, "random seed: the same seed gives the same images")
    device: Literal["auto", "cpu", "cuda"] = param(
        "auto", "where the models run (auto: a GPU if any)"
    )
    output: str = param("samples", "where the images and the grid go")

    def validate(self) -> None:
        super().validate()
        require_folder(self.output, "output")


@dataclass
class TextConditionedConfig(CascadeConfig):
    """What text → image generation adds to the cascade: a prior and how it samples (section
    2.2), and the image stages' samplers. ``sample``/``generate`` and ``eval`` share these."""

    prior: str | None = param(
        "checkpoints/prior", "prior run folder or checkpoint (null: conditioning without a prior)"
    )
    prior_steps: int | None = param(None, "prior sampling steps (null: the run's config)", ge=1)
    prior_guidance: float = param(1.0, "prior classifier-free guidance scale", ge=0)
    num_candidates: int | None = param(
        None, "prior samples per caption, keeping the closest to the text (null: the run's)", ge=1
    )
    temperature: float | None = param(
        None, "autoregressive prior: sampling temperature (null: its default)", gt=0
    )
    decoder_sampler: Literal["ddpm", "ddim"] | None = param(
        None, "decoder sampler (null: the run's diffusion.sampler)"
    )
    upsampler_sampler: Literal["ddpm", "ddim"] | None = param(
        None, "upsamplers' sampler (null: each run's diffusion.sampler)"
    )


@dataclass
class TextToImageConfig(TextConditionedConfig):
    """The text → image cascade (section 2): what the decoder is conditioned on, and the batch."""

    conditioning: Literal["prior", "text_embedding", "caption"] = param(
        "prior",
        "what the decoder is conditioned on (section 5.1): z_i from the prior, the CLIP text "
        "embedding in its place, or the caption alone",
    )
    batch_size: int = param(16, "images generated at once", ge=1)

    def validate(self) -> None:
        super().validate()
        require(
            self.conditioning != "prior" or bool(self.prior),
            "prior",
            'conditioning "prior" needs a prior run',
        )


@dataclass
class SampleConfig(TextToImageConfig):
    """``unclip sample``: text → prior → decoder → upsamplers, written as images and a grid."""

    prompts: list[str] = param(
        factory=list, doc="captions to draw (or give them on the command line)"
    )
    samples_per_prompt: int = param(4, "images per caption", ge=1)


@dataclass
class VariationsConfig(CascadeConfig):
    """``unclip variations``: images that keep what an image's CLIP embedding encodes (§3.1)."""

    images: list[str] = param(
        factory=list,
        doc="input images (command line: paths from the working directory; config: from root)",
    )
    num: int = param(4, "variations per image", ge=1)
    eta: float = param(
        1.0, "DDIM η of the decoder and upsamplers (> 0: each variation differs)", ge=0
    )
    latent: Literal["inverted", "random"] = param(
        "inverted",
        "x_T of the bipartite latent: the image's DDIM inversion (the paper's), or random noise",
    )
    output: str = param("variations", "where the images and the grid go")


@dataclass
class InterpolateConfig(CascadeConfig):
    """``unclip interpolate``: slerp between two images' CLIP embeddings, decoded (§3.2)."""

    images: list[str] = param(
        factory=list,
        doc="the two input images (command line: from the working directory; config: from root)",
    )
    num: int = param(5, "interpolation steps from the first image to the second", ge=2)
    latent: Literal["random", "inverted"] = param(
        "random",
        "x_T: one random latent fixed for the row, or the slerp of the two images' DDIM inversions",
    )
    output: str = param("interpolations", "where the images and the grid go")

    def validate(self) -> None:
        super().validate()
        require(
            len(self.images) in (0, 2), "images", f"expected two images, got {len(self.images)}"
        )


@dataclass
class TextDiffConfig(CascadeConfig):
    """``unclip textdiff``: move an image's CLIP embedding along a text diff (§3.3)."""

    images: list[str] = param(
        factory=list,
        doc="input images (command line: paths from the working directory; config: from root)",
    )
    from_caption: str = param("", "a caption of the input image (z_t0; --from on the command line)")
    to_caption: str = param("", "the caption to move towards (z_t; --to on the command line)")
    num: int = param(5, "steps from the image towards the target caption", ge=1)
    max_theta: float = param(
        0.5, "the last step's slerp weight towards the text diff (paper: 0.25 to 0.5)", gt=0, le=1
    )
    output: str = param("textdiffs", "where the images and the grid go")


@dataclass
class CascadeActors:
    """The Ray actors that each hold the whole cascade (``unclip generate``, ``unclip eval``)."""

    concurrency: int = param(1, "generator actors, each holding the whole cascade", ge=1)
    gpus_per_actor: float | None = param(
        None, "GPUs per generator actor (null: 1 when the cluster has GPUs, else 0)", ge=0
    )
    cpus_per_actor: float = param(1.0, "CPUs reserved per generator actor", gt=0)
    threads_per_actor: int | None = param(
        None, "torch threads per generator actor (null: Ray's default)", ge=1
    )
    stall_timeout_s: float | None = param(
        3600.0,
        "fail when no generated rows arrive for this long (actor start-up and cascade loading "
        "included), e.g. after a node loss stalls the actor pool (null: wait forever)",
        gt=0,
    )


@dataclass
class GenerateConfig(TextToImageConfig, CascadeActors):
    """``unclip generate``: a caption file → images and a parquet index, as a Ray Data job that
    generates ``batch_size`` rows per cascade call and, rerun, only the rows not yet done
    (:mod:`pipeline.generate.batch`)."""

    captions: str = param("captions.txt", "caption file, one caption per line (local or s3://)")
    samples_per_caption: int = param(1, "images per caption", ge=1)
    output: str = param(
        "generated", "where job.json, images/, index/ (a part per batch) and index.parquet go"
    )
    batch_size: int = param(
        16,
        "rows per cascade call of a generator actor (prior, decoder and upsamplers over them at "
        "once) and per index part; the images do not depend on it (up to float rounding)",
        ge=1,
    )


@dataclass
class EvalConfig(TextConditionedConfig, CascadeActors):
    """``unclip eval``: the conditionings of section 5.1 (figure 7) compared on one cascade.

    The decoder is conditioned on the caption alone, on the CLIP text embedding in place of z_i,
    or on z_i from each prior given; every conditioning draws the same prompts with the same seed.
    Each gets a CLIP score, a Fréchet distance to the real images in CLIP image-embedding space, an
    FID (with ``inception_weights``) and, on the captioned-shapes dataset, the colour and shape
    accuracy of what the prompts name, on prompts like the training captions and on prompts with a
    held-out colour-shape pair.

    The prompts drawn from the store and the real images come from one seeded sample of at most
    ``store_files`` store files (:func:`pipeline.embed.sampling.sample_rows`), never from a listing
    of every key: the cost does not grow with the store. ``num_real`` is independent of the prompt
    count, so the distances rest on thousands of real images, and the report says how many
    samples each figure rests on.
    """

    prior: str | None = param(
        "checkpoints/prior", "prior run folder or checkpoint (null: no prior row)"
    )
    ar_prior: str | None = param(
        None, "a second prior, e.g. the autoregressive one (paper-ar), compared beside the first"
    )
    conditionings: list[Literal["caption", "text_embedding", "prior", "ar_prior"]] = param(
        factory=list,
        doc="what to compare (section 5.1): caption, text_embedding, prior, ar_prior (the priors "
        "of the keys of those names); empty: all that the config can run",
    )
    store: str | None = param(
        None,
        "embedding store folder (<store root>/<clip-id>) whose captions are the prompts and whose "
        "image embeddings are the real images (null: the store the decoder was trained on)",
    )
    shards: str | None = param(
        None,
        "source shards with the real images, for FID and their attribute accuracy (null: the "
        "shards the store was made from, as its manifest records)",
    )
    prompts: list[str] = param(
        factory=list,
        doc="captions to draw; empty: num_prompts captions drawn from the store (seed)",
    )
    num_prompts: int = param(32, "captions drawn from the store when prompts is empty", ge=1)
    heldout_pairs: list[str] = param(
        factory=list,
        doc="'colour shape' pairs the training data left out (the synth config's holdout): "
        "num_heldout prompts of captioned-shapes scenes each naming one; empty: no such set",
    )
    num_heldout: int = param(16, "held-out prompts, when heldout_pairs is given", ge=1)
    samples_per_prompt: int = param(1, "images per prompt and conditioning", ge=1)
    num_real: int = param(
        2000,
        "real images the Fréchet distances and the real row rest on, a seeded sample of the store "
        "independent of the prompt count (fewer when the store holds fewer): FD/FID on a few dozen "
        "images are noise",
        ge=2,
    )
    store_files: int = param(
        64,
        "store files the prompts and real images are sampled from (more only when that many would "
        "hold under twice the rows drawn); each one's source tar is streamed for the real images: "
        "more spreads the draw over more of the data, at the cost of reading more",
        ge=1,
    )
    inception_weights: str | None = param(
        None,
        "torchvision Inception-v3 weights file for FID (local or from root; nothing is "
        "downloaded); FID is skipped, with a note, without it",
    )
    batch_size: int = param(16, "images generated (and encoded) at once", ge=1)
    grid_prompts: int = param(8, "prompts of each set shown in each conditioning's grid", ge=1)
    output: str = param("eval", "where report.json, report.md, the plot and the grids go")

    def selected(self) -> list[str]:
        """The conditionings to compare: those listed, or every one the config can run."""
        if self.conditionings:
            return list(self.conditionings)
        names = ["caption", "text_embedding"]
        return names + [name for name in ("prior", "ar_prior") if getattr(self, name)]

    def holdout_pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset(tuple(p.split()) for p in self.heldout_pairs)  # type: ignore[misc]

    def validate(self) -> None:
        super().validate()
        from pipeline.data.shapes import COLORS, SHAPES

        for name in ("prior", "ar_prior"):
            require(
                name not in self.conditionings or bool(getattr(self, name)),
                name,
                f'conditioning "{name}" needs a prior run here',
            )
        require(
            len(set(self.conditionings)) == len(self.conditionings),
            "conditionings",
            "lists a conditioning twice",
        )
        for i, pair in enumerate(self.heldout_pairs):
            words = pair.split()
            require(
                len(words) == 2 and words[0] in COLORS and words[1] in SHAPES,
                f"heldout_pairs[{i}]",
                f"expected 'colour shape' with a colour in {', '.join(COLORS)} and a shape in "
                f"{', '.join(SHAPES)}, got {pair!r}",
            )
