"""``unclip quickstart``: the whole pipeline on the built-in tiny config, on this machine.

Local storage under ``runs/quickstart``, a local Ray, the tiny config of every stage. It runs each
stage that exists in order and prints where the outputs are.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.entry import CONFIG_DIR, Stage, run_stage
from pipeline import cluster
from pipeline import config as configlib
from pipeline.stage_config import STAGE_CONFIGS, StageConfig
from pipeline.storage import Storage, join
from unclip.fields import param


@dataclass
class QuickstartConfig(StageConfig):
    """The quickstart: which size of every stage's config to run, under one root."""

    size: str = param("tiny", "config size: configs/<stage>/<size>.yaml")


def stage_configs(cfg: QuickstartConfig) -> dict[str, StageConfig]:
    """Every stage's config at ``cfg.size``, moved under the quickstart's root and storage."""
    out = {}
    for name, (config_cls, folder) in STAGE_CONFIGS.items():
        data = configlib.read_yaml(str(CONFIG_DIR / folder / f"{cfg.size}.yaml"))
        data["root"] = cfg.root
        data["storage"] = configlib.to_dict(cfg.storage)
        data["ray"] = configlib.to_dict(cfg.ray)
        out[name] = configlib.from_dict(
            config_cls, data, source=f"configs/{folder}/{cfg.size}.yaml"
        )
    return out


def run(cfg: QuickstartConfig) -> int:
    from pipeline import embed, synth

    started = time.time()
    storage = Storage(cfg.storage)
    configs = stage_configs(cfg)  # every stage's config is checked before anything runs
    storage.check(cfg.root, write=True)
    resources = cluster.connect(cfg.ray)
    saved = join(cfg.root, "configs")
    for name, stage_cfg in configs.items():
        storage.write_text(join(saved, f"{name}.yaml"), configlib.dumps(stage_cfg))
    report = [
        ("storage root", cfg.root),
        ("Ray", f"local, {resources.get('CPU', 0):.0f} CPUs"),
        ("stage configs", f"{len(configs)} checked and saved under {saved}/"),
    ]

    data = synth.generate(configs["synth"], storage)
    report.append(
        (
            "synthetic data",
            f"{data['samples']} captioned images in {data['shards']} shards at {data['output']}",
        )
    )
    store = embed.run_embedding(configs["embed"], storage)
    report.append(
        (
            "embeddings",
            f"{store['rows']} rows ({store['skipped']} skipped) by {store['clip']} at {store['store']}",
        )
    )
    report.append(
        (
            "not yet built",
            "CLIP training (the embeddings use a random tiny CLIP until then), the prior, decoder "
            "and upsampler trainings, sampling and evaluation (the following issues)",
        )
    )
    width = max(len(name) for name, _ in report)
    lines = "\n".join(f"  {name:<{width}}  {text}" for name, text in report)
    print(f"\nunclip quickstart finished in {time.time() - started:.0f} s\n{lines}\n")
    return 0


STAGE = Stage(
    "quickstart",
    "the whole pipeline on the built-in tiny config, on this machine",
    QuickstartConfig,
    None,
    run,
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.quickstart") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
