"""The quickstart entrypoint on the embedded default: every stage config checked and saved, and
every stage run in its smoke size, through the samples and the evaluation report."""

from __future__ import annotations

import re

from jobs import quickstart
from jobs.commands import stages
from pipeline import config as configlib
from pipeline.data.shards import completed_shards
from pipeline.storage import Storage, join
from pipeline.train import checkpoints


def test_quickstart_runs_every_stage(ray_local, tmp_path, capfd, monkeypatch) -> None:
    """As the README runs it: a root relative to the working directory (the workers of Ray Train
    run elsewhere: they get the absolute path). Read at the file descriptors, where Ray core's own
    C++ log lines and the raylet's forwarded lines land too."""
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "qs")
    assert quickstart.main(["root=qs", "smoke=true"]) == 0
    out, err = capfd.readouterr()
    storage = Storage()
    # Ray core's warnings about the project's own actors, which a newcomer met on every run (Ray
    # Data's MapWorker may still draw the first one: ray-project/ray#53727)
    assert "'ShardReader' and ID" not in out + err
    assert "killed by `ray.kill`" not in out + err
    assert f"storage root    {root}" in out
    assert f"512 captioned images in 4 shards at {root}/shards" in out
    assert "512 rows (0 skipped) by tiny-clip--ckpt-" in out
    for run in ("clip", "prior", "decoder", "upsampler-256"):
        assert checkpoints.list_checkpoints(storage, join(root, "checkpoints", run))[-1][0] == 10
    expected = quickstart.stage_configs(quickstart.QuickstartConfig(root=root, smoke=True))
    for stage, command in stages().items():
        text = storage.read_text(join(root, "configs", f"{stage}.yaml"))
        saved = configlib.from_dict(
            command.config_cls, configlib.read_yaml_text(text), source=stage
        )
        assert saved == expected[stage]
        assert saved.root == root
    assert completed_shards(storage, join(root, "shards")) == list(range(4))
    samples = storage.read_json(join(root, "samples", "index.json"))
    assert len(samples["images"]) == 4  # four prompts, one image each in smoke mode
    assert f"grid at {root}/samples/grid.png" in out
    report = storage.read_json(join(root, "eval", "report.json"))
    assert set(report["order"]) == {"caption", "text_embedding", "prior"}
    assert f"(diffusion prior, training-like captions): {root}/eval/report.md" in out
    assert "| diffusion prior |" in storage.read_text(join(root, "eval", "report.md"))
    # the summary names the run's log, which holds what the quiet terminal left out
    named = re.search(r"^  log +(\S+) \(Ray's", out, re.MULTILINE)
    assert named and named[1].startswith(f"{root}/logs/quickstart-"), out
    assert "\nlog: " not in out  # named once, by the summary
    text = storage.read_text(named[1])
    assert "Starting execution of Dataset" in text  # Ray Data's own lines
    assert "Ray's own logs on this node" in text
    assert "argument ``concurrency`` is deprecated" not in text
    for run in ("clip", "prior", "decoder", "upsampler-256"):  # what the progress lines read
        progress = storage.read_json(join(root, "checkpoints", run, "progress.json"))
        assert progress["step"] == progress["steps"] == 10


def test_quickstart_refuses_a_bad_config_before_starting(capsys) -> None:
    assert quickstart.main(["size=huge"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"configs/\w+/huge\.yaml: config file not found", err), err
