"""Typed configs: defaults and YAML files load, overrides apply, every kind of bad input is one clear
line that names the file (or override) and the key."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from jobs import cli
from jobs.commands import COMMANDS, stages
from jobs.entry import CONFIG_DIR, PROJECT_ROOT
from pipeline import config as configlib
from pipeline.cascade_config import EvalConfig, GenerateConfig, SampleConfig, VariationsConfig
from pipeline.config import ConfigError, load
from pipeline.stage_config import (
    DecoderConfig,
    EmbedConfig,
    IngestConfig,
    PriorConfig,
    SynthConfig,
    UpsamplerConfig,
)
from pipeline.storage import Secret


@pytest.mark.parametrize("stage", list(stages()))
def test_defaults_load(stage: str) -> None:
    config_cls = COMMANDS[stage].config_cls
    cfg = load(config_cls)
    assert cfg == config_cls()
    assert cfg.url("shards") == "runs/quickstart/shards"


def _yaml_files() -> list[tuple[str, type]]:
    folders = {c.folder: c.config_cls for c in stages().values()}
    files = sorted(glob.glob(str(CONFIG_DIR / "*" / "*.yaml")))
    assert files, "no configs found"
    return [(f, folders[os.path.basename(os.path.dirname(f))]) for f in files]


@pytest.mark.parametrize(("path", "config_cls"), _yaml_files(), ids=lambda v: str(v)[-30:])
def test_every_shipped_config_loads_and_round_trips(path: str, config_cls: type) -> None:
    cfg = load(config_cls, path)
    again = configlib.from_dict(
        config_cls, configlib.read_yaml_text(configlib.dumps(cfg)), source="x"
    )
    assert again == cfg


def test_yaml_values_are_applied(tmp_path) -> None:
    path = tmp_path / "prior.yaml"
    path.write_text("run: p1\nmodel: {width: 64, heads: 2}\noptim: {lr: 1e-4}\n")
    cfg = load(PriorConfig, str(path))
    assert (cfg.run, cfg.model.width, cfg.model.heads) == ("p1", 64, 2)
    assert cfg.optim.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.model.depth == PriorNetDefault.depth  # untouched keys keep their defaults


PriorNetDefault = PriorConfig().model


def test_overrides_apply() -> None:
    cfg = load(
        DecoderConfig,
        str(CONFIG_DIR / "decoder" / "tiny.yaml"),
        [
            "optim.lr=3e-4",
            "model.channel_mult=[1,2,4,8]",
            "scaling.use_gpu=true",
            "optim.grad_clip=null",
            "train.steps=2e3",
            "root=s3://bucket/unclip",
            "storage.endpoint_url=http://127.0.0.1:9000",
            "scaling.resources_per_worker={GPU_H100: 1}",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.channel_mult == (1, 2, 4, 8)
    assert cfg.scaling.use_gpu is True
    assert cfg.optim.grad_clip is None
    assert cfg.train.steps == 2000 and isinstance(cfg.train.steps, int)
    assert cfg.run_url() == "s3://bucket/unclip/checkpoints/decoder"
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.scaling.resources_per_worker == {"GPU_H100": 1.0}
    assert cfg.model.channels == 16  # from the file


def _error(config_cls: type, yaml_text: str | None, overrides=(), tmp_path=None) -> str:
    path = None
    if yaml_text is not None:
        path = str(tmp_path / "stage.yaml")
        with open(path, "w") as handle:
            handle.write(yaml_text)
    with pytest.raises(ConfigError) as info:
        load(config_cls, path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        # wrong types
        ("optim: {lr: fast}", (), "stage.yaml: optim.lr: expected a number, got 'fast'"),
        ("train: {steps: 1.5}", (), "stage.yaml: train.steps: expected an integer, got 1.5"),
        ("scaling: {use_gpu: 2}", (), "stage.yaml: scaling.use_gpu: expected true or false, got 2"),
        ("run: [a, b]", (), "stage.yaml: run: expected a string, got a list"),
        ("optim: 3", (), "stage.yaml: optim: expected a mapping, got 3"),
        ("", ["optim.lr=abc"], "override 'optim.lr=abc': optim.lr: expected a number, got 'abc'"),
        # unknown keys, with a suggestion
        ("optim: {lrr: 0.1}", (), "stage.yaml: optim.lrr: unknown key (did you mean 'optim.lr'?)"),
        (
            "",
            ["modle.width=3"],
            "override 'modle.width=3': modle: unknown key (did you mean 'model'?)",
        ),
        # impossible values
        ("optim: {lr: -1}", (), "stage.yaml: optim.lr: must be greater than 0, got -1.0"),
        ("ema: {decay: 1.0}", (), "stage.yaml: ema.decay: must be less than 1, got 1.0"),
        (
            "model: {kind: gan}",
            (),
            "stage.yaml: model.kind: expected one of 'diffusion', 'autoregressive', got 'gan'",
        ),
        (
            "model: {width: 100, heads: 3}",
            (),
            "stage.yaml: model.heads: must divide width (100), got 3",
        ),
        (
            "diffusion: {timesteps: 10, sampling_steps: 64}",
            (),
            "stage.yaml: diffusion.sampling_steps: must be at most timesteps (10), got 64",
        ),
        (
            "train: {batch_size: 33}\nscaling: {num_workers: 2}",
            (),
            "stage.yaml: train.batch_size: must be divisible by the data streams × optim.grad_accum "
            "(2 × 1; streams: train.data_streams, else the most scaling.num_workers), got 33",
        ),
        (
            "train: {data_streams: 2}\nscaling: {num_workers: 4}",
            (),
            "stage.yaml: train.data_streams: must be at least scaling.num_workers (4): every "
            "worker serves a data stream of its own, got 2",
        ),
        # elastic ranges: the streams default to the most workers, which the batch must divide
        (
            "train: {batch_size: 32}\nscaling: {num_workers: 2..3}",
            (),
            "stage.yaml: train.batch_size: must be divisible by the data streams × optim.grad_accum "
            "(3 × 1; streams: train.data_streams, else the most scaling.num_workers), got 32",
        ),
        (
            "train: {data_streams: 2}\nscaling: {num_workers: 1..4}",
            (),
            "stage.yaml: train.data_streams: must be at least scaling.num_workers (1..4): every "
            "worker serves a data stream of its own, got 2",
        ),
        (
            "scaling: {num_workers: 3..2}",
            (),
            "stage.yaml: scaling.num_workers: a range min..max needs 1 <= min <= max, got 3..2",
        ),
        (
            "",
            ("scaling.num_workers=two",),
            "scaling.num_workers: expected a number or a range min..max (e.g. 2..8), got 'two'",
        ),
        (
            "run: a/b",
            (),
            "stage.yaml: run: must be a plain folder name under <root>/checkpoints/, got 'a/b': "
            "'/' separates folders",
        ),
    ],
)
def test_bad_values_name_the_key_and_source(tmp_path, yaml_text, overrides, expected) -> None:
    message = _error(PriorConfig, yaml_text, overrides, tmp_path)
    assert message.endswith(expected), message
    if not overrides:
        assert message.startswith(str(tmp_path / "stage.yaml"))


# Names joined into URLs as one folder: each of these would leave <root>/checkpoints/ (or the
# store root), hide the folder from listings, or put a separator or a control character in a key.
BAD_NAMES = [
    ("..", "'..' names the folder above"),
    (".", "'.' names this folder"),
    (".hidden", "a name starting with '.' is hidden: storage listings skip it"),
    ("../../elsewhere", "'/' separates folders"),
    ("a/../b", "'/' separates folders"),
    ("/abs", "'/' separates folders"),
    ("a\\b", "a backslash separates folders on Windows"),
    ("a\tb", "it contains the control character '\\t'"),
    ("a\nb", "it contains the control character '\\n'"),
    ("a\x00b", "it contains the control character '\\x00'"),
    ("a\x7fb", "it contains the control character '\\x7f'"),
    ("   ", "it is empty or blank"),
]


@pytest.mark.parametrize(("name", "problem"), BAD_NAMES, ids=[repr(n) for n, _ in BAD_NAMES])
@pytest.mark.parametrize("config_cls", [PriorConfig, DecoderConfig, UpsamplerConfig])
def test_run_names_that_leave_the_checkpoint_folder_are_refused(
    tmp_path, config_cls: type, name: str, problem: str
) -> None:
    yaml_text = f'run: "{_yaml_escaped(name)}"'
    message = _error(config_cls, yaml_text, (), tmp_path)
    assert message.startswith(f"{tmp_path / 'stage.yaml'}: run: must be a plain folder name ")
    assert f"under <root>/checkpoints/, got {name!r}: {problem}" in message


def _yaml_escaped(text: str) -> str:
    """``text`` for a double-quoted YAML string (backslash, quote and control characters)."""
    out = text.replace("\\", "\\\\").replace('"', '\\"')
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in out)


def test_bad_names_in_overrides_name_the_override_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        load(PriorConfig, None, ["run=.."])
    assert str(info.value) == (
        "override 'run=..': run: must be a plain folder name under <root>/checkpoints/, "
        "got '..': '..' names the folder above"
    )
    for config_cls in (EmbedConfig, PriorConfig, DecoderConfig):
        with pytest.raises(ConfigError) as info:
            load(config_cls, None, ["clip_id=../other"])
        assert str(info.value) == (
            "override 'clip_id=../other': clip_id: must be a plain folder name under <store>/, "
            "got '../other': '/' separates folders"
        )
    for override in ("clip_id=.", "clip_id=a/b", "clip_id=.cache"):
        with pytest.raises(ConfigError, match=r": clip_id: must be a plain folder name under"):
            load(EmbedConfig, None, [override])


@pytest.mark.parametrize(
    "config_cls",
    [SynthConfig, IngestConfig, SampleConfig, VariationsConfig, GenerateConfig, EvalConfig],
)
@pytest.mark.parametrize(
    ("output", "problem"),
    [
        ("..", "it has a '..' segment"),
        ("../outside", "it has a '..' segment"),
        ("samples/../../x", "it has a '..' segment"),
        ("./samples", "it has a '.' segment"),
        ("s3://bucket/a/../b", "it has a '..' segment"),
        ("out\\put", "it has a backslash: separate folders with '/'"),
        ("out\nput", "it contains the control character '\\n'"),
        ("", "it is empty or blank"),
    ],
)
def test_output_folders_that_leave_their_folder_are_refused(config_cls, output, problem) -> None:
    with pytest.raises(ConfigError) as info:
        configlib.from_dict(config_cls, {"output": output}, source="x.yaml")
    assert str(info.value) == (
        "x.yaml: output: must be a folder under root (or an absolute path or URL), "
        f"got {output!r}: {problem}"
    )


def test_embedding_store_folder_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^x\.yaml: store: must be a folder under root .*'\.\.'"):
        configlib.from_dict(EmbedConfig, {"store": "../embeddings"}, source="x.yaml")


def test_plain_names_and_folders_are_accepted() -> None:
    cfg = load(PriorConfig, None, ["run=prior-v2_1.5", "clip_id=ViT-B-32--laion2b"])
    assert (cfg.run, cfg.clip_id) == ("prior-v2_1.5", "ViT-B-32--laion2b")
    assert cfg.run_url() == "runs/quickstart/checkpoints/prior-v2_1.5"
    for output in ("samples", "out/a/b", "/abs/out", "s3://bucket/gen", "file:///tmp/x"):
        assert load(SampleConfig, None, [f"output={output}"]).output == output
    assert load(EmbedConfig, None, ["store=emb/v1", "clip_id=mine"]).store == "emb/v1"
    assert load(IngestConfig, None, ["output=s3://bucket/shards"]).output == "s3://bucket/shards"


def test_malformed_files_and_overrides(tmp_path) -> None:
    assert _error(PriorConfig, "optim: {lr: [1,\n", (), tmp_path).startswith(
        f"{tmp_path}/stage.yaml: invalid YAML at line"
    )
    assert _error(PriorConfig, "- a\n- b\n", (), tmp_path).endswith(
        "stage.yaml: expected a mapping of keys at the top, got a list"
    )
    with pytest.raises(ConfigError, match=r"^nope\.yaml: config file not found$"):
        load(PriorConfig, "nope.yaml")
    with pytest.raises(ConfigError, match=r"override 'optim\.lr': expected key\.sub=value"):
        load(PriorConfig, None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"override 'run\.x=1': run is not a section"):
        load(PriorConfig, None, ["run=a", "run.x=1"])


def test_upsampler_and_embed_checks(tmp_path) -> None:
    assert _error(UpsamplerConfig, "model: {low_res: 256, high_res: 256}", (), tmp_path).endswith(
        "model.high_res: must be larger than low_res (256)"
    )
    assert _error(EmbedConfig, "concurrency: 0", (), tmp_path).endswith(
        "concurrency: must be at least 1, got 0"
    )


def test_secrets_are_typed_and_never_saved() -> None:
    cfg = load(
        EmbedConfig,
        None,
        ["storage.access_key_id=AKIAEXAMPLE", "storage.secret_access_key=s3cr3t-value"],
    )
    assert isinstance(cfg.storage.secret_access_key, Secret)
    assert cfg.storage.secret_access_key.reveal() == "s3cr3t-value"
    text = configlib.dumps(cfg) + repr(cfg)
    assert "s3cr3t-value" not in text and "AKIAEXAMPLE" not in text
    assert configlib.to_dict(cfg)["storage"]["secret_access_key"] is None


def test_describe_lists_every_key_with_docs() -> None:
    rows = {key: (tp, default, doc) for key, tp, default, doc in configlib.describe(PriorConfig)}
    assert rows["optim.lr"][1] == 1e-4 and rows["optim.lr"][2] == "peak learning rate"
    assert rows["model.kind"][0] == "one of 'diffusion', 'autoregressive'"
    assert rows["storage.secret_access_key"][1] is None
    assert "model" not in rows  # sections are flattened into their keys


def test_cli_help_lists_commands(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"  {command} " in out


def test_cli_config_error_is_one_line_with_status_2(capsys) -> None:
    assert cli.main(["config", "train-prior", "optim.lr=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "unclip config train-prior: error: override 'optim.lr=abc': "
        "optim.lr: expected a number, got 'abc'"
    )


def test_cli_unknown_command(capsys) -> None:
    assert cli.main(["trian-prior"]) == 2
    assert "unknown command 'trian-prior'" in capsys.readouterr().err


def test_jobs_run_as_modules_for_ray_job_submit() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.show_config", "train-decoder", "train.steps=7"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert configlib.from_dict(
        DecoderConfig, configlib.read_yaml_text(proc.stdout), source="stdout"
    ) == load(DecoderConfig, str(CONFIG_DIR / "decoder" / "tiny.yaml"), ["train.steps=7"])
