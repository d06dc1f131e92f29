"""``unclip quickstart``: the whole pipeline on the built-in tiny config, on this machine.

Local storage under ``runs/quickstart``, a local Ray, the tiny config of every stage: synthetic
data, CLIP, embeddings, prior, decoder, upsampler, samples for the sample config's prompts, and the
evaluation report. It prints where the grid, the report and the run's log file are (the log holds
what the quiet terminal leaves out: Ray's and Ray Data's own lines, and where Ray keeps the
workers' output).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from jobs.commands import stages
from jobs.entry import CONFIG_DIR, main_of
from pipeline import config as configlib
from pipeline import logs
from pipeline.cluster.connect import connect
from pipeline.stage_config import StageConfig
from pipeline.storage import Storage, join
from unclip.fields import param


@dataclass
class QuickstartConfig(StageConfig):
    """The quickstart: which size of every stage's config to run, under one root."""

    size: str = param("tiny", "config size: configs/<stage>/<size>.yaml")
    smoke: bool = param(
        False, "a run-through in minutes: 512 images and 10 steps per training (no learning)"
    )


def stage_configs(cfg: QuickstartConfig) -> dict[str, StageConfig]:
    """Every stage's config at ``cfg.size``, moved under the quickstart's root and storage."""
    out = {}
    for name, command in stages().items():
        folder = command.folder
        data = configlib.read_yaml(str(CONFIG_DIR / folder / f"{cfg.size}.yaml"))
        data["root"] = cfg.root
        data["storage"] = configlib.to_dict(cfg.storage)
        data["ray"] = configlib.to_dict(cfg.ray)
        if cfg.smoke:
            _smoke(data)
        out[name] = configlib.from_dict(
            command.config_cls, data, source=f"configs/{folder}/{cfg.size}.yaml"
        )
    return out


def _smoke(data: dict) -> None:
    """Shrink a stage's YAML data to a run-through: little data, 10 steps, small batches."""
    if "num_samples" in data:
        data.update(num_samples=512, samples_per_shard=128)
    if "train" in data:
        data["train"] = {**data["train"], "steps": 10, "log_every": 5}
        data["train"]["batch_size"] = min(data["train"].get("batch_size", 32), 16)
        data["checkpoint"] = {**data.get("checkpoint", {}), "every_steps": 10}
        data["optim"] = {**data.get("optim", {}), "warmup_steps": 2}
        if "diffusion" in data:  # the pictures at each checkpoint: a few sampling steps
            data["diffusion"] = {**data["diffusion"], "sampling_steps": 5}
    elif "decoder" in data:  # generation and evaluation: a few images, a few sampling steps
        data.update(decoder_steps=5, upsampler_steps=5)
        few = {"prior_steps": 5, "samples_per_prompt": 1, "num_prompts": 4, "num_heldout": 2}
        for key, value in few.items():
            if key in data:
                data[key] = value


def run(name: str, cfg: QuickstartConfig) -> int:
    from pipeline.data import synth
    from pipeline.embed.job import run_embedding
    from pipeline.eval.run import run_eval
    from pipeline.generate import sampling
    from pipeline.train.driver import run_training

    started = time.time()
    storage = Storage(cfg.storage)
    configs = stage_configs(cfg)  # every stage's config is checked before anything runs
    storage.check(cfg.root, write=True)
    resources = connect(cfg.ray)
    saved = join(cfg.root, "configs")
    for name, stage_cfg in configs.items():
        storage.write_text(join(saved, f"{name}.yaml"), configlib.dumps(stage_cfg))
    report = [
        ("storage root", cfg.root),
        ("Ray", f"local, {resources.get('CPU', 0):.0f} CPUs"),
        ("stage configs", f"{len(configs)} checked and saved under {saved}/"),
    ]

    def stage(title: str, line: str) -> None:
        report.append((title, line))
        logs.end_status()
        print(
            f"\n=== quickstart: {title} done ({time.time() - started:.0f} s): {line}\n", flush=True
        )

    data = synth.generate(configs["synth"], storage)
    stage(
        "synthetic data",
        f"{data['samples']} captioned images in {data['shards']} shards at {data['output']}",
    )
    for name, title in (("train-clip", "CLIP"),):
        result = run_training(name, configs[name], storage)
        stage(title, f"step {result['step']}, loss {result['loss']:.4f}: {result['checkpoint']}")
    store = run_embedding(configs["embed"], storage)
    stage(
        "embeddings",
        f"{store['rows']} rows ({store['skipped']} skipped) by {store['clip']} at {store['store']}",
    )
    for name, title in (
        ("train-prior", "prior"),
        ("train-decoder", "decoder"),
        ("train-upsampler", "upsampler"),
    ):
        result = run_training(name, configs[name], storage)
        detail = "samples.png and loss.png inside" if name != "train-prior" else "loss.png inside"
        stage(
            title,
            f"step {result['step']}, loss {result['loss']:.4f}: {result['checkpoint']} ({detail})",
        )
    samples = sampling.run_sample(configs["sample"], storage)
    stage("samples", f"{samples['images']} images, grid at {samples['grid']}")
    evaluation = run_eval(configs["eval"], storage)
    headline = evaluation["metrics"].get("prior", {})
    stage(
        "evaluation",
        f"colour {_percent(headline.get('color'))}, shape {_percent(headline.get('shape'))} "
        f"(diffusion prior, training-like captions): {evaluation['markdown']}",
    )
    log_url = logs.announce()
    if log_url:
        report.append(
            ("log", f"{log_url} (Ray's and Ray Data's own lines, and where the workers' logs are)")
        )
    width = max(len(name) for name, _ in report)
    lines = "\n".join(f"  {name:<{width}}  {text}" for name, text in report)
    print(f"\nunclip quickstart finished in {time.time() - started:.0f} s\n{lines}\n")
    return 0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


main = main_of("quickstart")

if __name__ == "__main__":
    sys.exit(main())
