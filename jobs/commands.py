"""Every command of ``unclip``, in one table: its name, the module ``python -m`` runs, its help, its
typed config and the folder of its YAML files, what runs it, and its positional inputs and flags.

The console script (:mod:`jobs.cli`), ``unclip config``, ``unclip submit``, the quickstart, the
per-command modules (``python -m jobs.<module>``, what ``ray job submit`` runs) and the KubeRay
renderer (``infra/kuberay/render.py``) all read this table; a command is added here and nowhere
else but its module. Config classes and runners are named as ``"module:attribute"`` and imported
only when used, so ``unclip --help`` stays fast (the configs import torch).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Inputs:
    """Positional command-line inputs of a command: they set the config key ``key`` (a list, or
    one string with ``single``). With ``paths``, local paths are taken relative to the working
    directory (made absolute), where config files' paths are relative to the storage root."""

    key: str
    metavar: str
    help: str
    paths: bool = False
    single: bool = False

    def override(self, values: Sequence[str]) -> str:
        """The ``key=value`` override that sets the inputs (the values as JSON, which is YAML)."""
        if self.paths:
            values = [v if "://" in v else os.path.abspath(v) for v in values]
        value: Any = list(values)
        if self.single:
            if len(values) != 1:
                from pipeline.config import ConfigError

                raise ConfigError(
                    f"expected one {self.metavar}, got {len(values)}: {' '.join(values)}"
                )
            value = values[0]
        return f"{self.key}={json.dumps(value, ensure_ascii=False)}"


def _resolve(ref: str) -> Any:
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Command:
    """One command. ``run(name, cfg) -> exit status`` gets the checked config."""

    name: str
    module: str  # jobs.<module>: what `python -m` and `ray job submit` run
    summary: str  # its line in `unclip --help`
    description: str = ""  # its own --help (default: the summary)
    config: str | None = None  # "module:Class", its typed config
    folder: str | None = None  # configs/<folder>/: one YAML per size (tiny is the default)
    run: str | None = None  # "module:function"; none: the command parses its own arguments
    inputs: Inputs | None = None
    # flags that stand for an override: (flag, override, help); an override with "{}" takes the
    # flag's value read as YAML, one with "{text}" takes it as a string, verbatim (captions)
    flags: tuple[tuple[str, str, str], ...] = ()
    submittable: bool = True  # can run as a Ray job (`unclip submit`)

    @property
    def config_cls(self) -> type:
        if self.config is None:
            raise TypeError(f"command {self.name!r} has no config")
        return _resolve(self.config)

    @property
    def runner(self) -> Callable[[str, Any], int]:
        if self.run is None:
            raise TypeError(f"command {self.name!r} parses its own arguments")
        return _resolve(self.run)

    @property
    def default_config(self) -> str | None:
        """The default YAML file, relative to ``configs/``."""
        return f"{self.folder}/tiny.yaml" if self.folder else None

    @property
    def help(self) -> str:
        return self.description or self.summary


_IMAGES = "input image files"
_STAGE_CONFIG = "pipeline.stage_config:"
_CASCADE_CONFIG = "pipeline.cascade_config:"

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "quickstart",
            "quickstart",
            "the whole pipeline on the built-in tiny config, on this machine",
            config="jobs.quickstart:QuickstartConfig",
            run="jobs.quickstart:run",
        ),
        Command(
            "synth",
            "synth",
            "write the synthetic captioned-shapes dataset as webdataset shards",
            config=_STAGE_CONFIG + "SynthConfig",
            folder="synth",
            run="jobs.data:synth",
        ),
        Command(
            "ingest",
            "ingest",
            "download an image-text URL list into webdataset shards (img2dataset)",
            config=_STAGE_CONFIG + "IngestConfig",
            folder="ingest",
            run="jobs.data:ingest",
            flags=(
                (
                    "--retry-failed",
                    "retry_failed=true",
                    "try again only the samples that failed with a transient error (timeouts, 5xx)",
                ),
            ),
        ),
        Command(
            "embed",
            "embed",
            "CLIP image and text embeddings of the shards into the embedding store",
            "CLIP image and text embeddings of the shards into the embedding store (Ray Data)",
            config=_STAGE_CONFIG + "EmbedConfig",
            folder="embed",
            run="jobs.data:embed",
            flags=(
                (
                    "--import-clip-retrieval",
                    "import_clip_retrieval={}",
                    "import a clip-retrieval output folder (img_emb/, text_emb/, metadata/) instead",
                ),
            ),
        ),
        Command(
            "train-clip",
            "train_clip",
            "train (or fine-tune) an open_clip model on the shards",
            "train (or fine-tune) an open_clip model contrastively on the shards",
            config=_STAGE_CONFIG + "TrainClipConfig",
            folder="clip",
            run="jobs.training:run",
        ),
        Command(
            "train-prior",
            "train_prior",
            "train the prior: text → CLIP image embedding",
            "train the prior (text → CLIP image embedding) on the embedding store",
            config=_STAGE_CONFIG + "PriorConfig",
            folder="prior",
            run="jobs.training:run",
        ),
        Command(
            "train-decoder",
            "train_decoder",
            "train the 64px decoder: CLIP image embedding → image",
            "train the 64px decoder (CLIP image embedding → image)",
            config=_STAGE_CONFIG + "DecoderConfig",
            folder="decoder",
            run="jobs.training:run",
        ),
        Command(
            "train-upsampler",
            "train_upsampler",
            "train an upsampler: 64→256 or 256→1024",
            "train an upsampler (64→256 or 256→1024)",
            config=_STAGE_CONFIG + "UpsamplerConfig",
            folder="upsampler",
            run="jobs.training:run",
        ),
        Command(
            "sample",
            "sample",
            "text → image with trained checkpoints: PNGs, a captioned grid",
            "text → image with trained prior, decoder and upsamplers: PNGs, a captioned grid, "
            "index.json",
            config=_CASCADE_CONFIG + "SampleConfig",
            folder="sample",
            run="jobs.generation:run",
            inputs=Inputs("prompts", "PROMPT", "captions to draw (replace the config's prompts)"),
        ),
        Command(
            "variations",
            "variations",
            "variations of an image (DALL-E 2 section 3.1)",
            "variations of images that keep their CLIP image embedding (DALL-E 2 section 3.1)",
            config=_CASCADE_CONFIG + "VariationsConfig",
            folder="variations",
            run="jobs.generation:run",
            inputs=Inputs("images", "IMAGE", _IMAGES, paths=True),
        ),
        Command(
            "interpolate",
            "interpolate",
            "interpolations between two images (section 3.2)",
            "interpolations between two images' CLIP image embeddings (DALL-E 2 section 3.2)",
            config=_CASCADE_CONFIG + "InterpolateConfig",
            folder="interpolate",
            run="jobs.generation:run",
            inputs=Inputs("images", "IMAGE", "the two " + _IMAGES, paths=True),
        ),
        Command(
            "textdiff",
            "textdiff",
            "edit an image towards a caption with a text diff (section 3.3)",
            "language-guided image edits by CLIP text diffs (DALL-E 2 section 3.3)",
            config=_CASCADE_CONFIG + "TextDiffConfig",
            folder="textdiff",
            run="jobs.generation:run",
            inputs=Inputs("images", "IMAGE", _IMAGES, paths=True),
            flags=(
                (
                    "--from",
                    "from_caption={text}",
                    "a caption of the input image (config: from_caption)",
                ),
                ("--to", "to_caption={text}", "the caption to move towards (config: to_caption)"),
            ),
        ),
        Command(
            "generate",
            "generate",
            "batch generation of a caption file on Ray Data",
            "batch text → image on Ray Data: a caption file to PNGs and a parquet index",
            config=_CASCADE_CONFIG + "GenerateConfig",
            folder="generate",
            run="jobs.generation:generate",
            inputs=Inputs(
                "captions",
                "CAPTION_FILE",
                "caption file, one caption per line",
                paths=True,
                single=True,
            ),
        ),
        Command(
            "eval",
            "eval",
            "compare conditionings (section 5.1): CLIP score, FD, FID, accuracy",
            "compare the decoder's conditionings (caption, text embedding, prior): CLIP score, FD, "
            "FID, attribute accuracy; report.json, report.md, a plot and sample grids",
            config=_CASCADE_CONFIG + "EvalConfig",
            folder="eval",
            run="jobs.generation:evaluate",
        ),
        Command(
            "config",
            "show_config",
            "check a stage's config and print it resolved",
            submittable=False,
        ),
        Command(
            "submit",
            "submit",
            "run a command as a Ray job on a cluster and stream its logs",
            submittable=False,
        ),
    )
}


def stages() -> dict[str, Command]:
    """The commands with a config folder (every pipeline stage): ``unclip config`` and the
    quickstart run these."""
    return {name: c for name, c in COMMANDS.items() if c.folder}


def by_module(module: str) -> Command:
    """The command ``python -m jobs.<module>`` runs (``module`` with or without ``jobs.``)."""
    module = module.removeprefix("jobs.")
    for command in COMMANDS.values():
        if command.module == module:
            return command
    raise KeyError(f"no command runs as jobs.{module}")
