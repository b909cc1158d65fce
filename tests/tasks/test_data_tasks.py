"""Data configs name each dataset's task (``task:``, default from the format); samples carry it;
``tr1 make-synthetic`` writes the multiple-choice splits."""
import pytest
import yaml

from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.data.synthetic import generate
from megatron_tr1.errors import ConfigError
from megatron_tr1.tasks import check_tasks


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_tasks")
    generate(out, num=2, num_test=4, num_ood=0, size=32, progress=False)
    return out


def _config(root, name, datasets):
    (root / name).write_text(yaml.safe_dump({"datasets": datasets}))
    return load_data_config(root / name)


def test_make_synthetic_writes_multiple_choice_splits(synthetic):
    assert (synthetic / "mc_train.yaml").is_file() and (synthetic / "mc_test.yaml").is_file()
    samples = load_samples(load_data_config(synthetic / "mc_test.yaml")).samples
    assert len(samples) == 8 and {s.task for s in samples} == {"videoqa_mc"}
    which = samples[0]
    assert which.answer == "A" and which.problem.startswith("Which happens in this video?\n(A) ")
    assert which.problem.count("\n(") == 4 and which.duration is None


def test_task_defaults_from_the_format_and_mixes(synthetic):
    cfg = _config(synthetic, "mixed.yaml", [
        {"json_path": "test.json", "data_folder": "videos"},  # Temporal-R1 JSON: temporal_grounding
        {"json_path": "mc_test/which_event.json", "data_folder": "videos"},  # sniffed: MVBench layout
        {"json_path": "mc_test/when_event.json", "data_folder": "videos", "format": "mvbench", "task": "videoqa_mc"},
    ])
    samples = load_samples(cfg).samples
    assert check_tasks(samples) == {"temporal_grounding": 4, "videoqa_mc": 8}
    assert all(s.answer is None for s in samples[:4]) and all(s.answer in "ABC" for s in samples[8:])


def test_an_unknown_task_is_named(synthetic):
    cfg = _config(synthetic, "bogus.yaml", [{"json_path": "test.json", "data_folder": "videos", "task": "captions"}])
    samples = load_samples(cfg).samples
    assert {s.task for s in samples} == {"captions"}
    with pytest.raises(ConfigError, match=r"bogus.yaml: sample .* task 'captions', which is not one of "
                                          r"temporal_grounding, videoqa_mc \(datasets\[\].task\)"):
        check_tasks(samples, "bogus.yaml")
    with pytest.raises(ConfigError, match="format: 'mcq' is not one of auto, .*mvbench"):
        _config(synthetic, "fmt.yaml", [{"json_path": "test.json", "format": "mcq"}])


def test_training_takes_other_tasks_in_grpo_on_train_only(synthetic):
    from megatron_tr1.rl.config import TrainConfig
    from megatron_tr1.rl.train_cli import check_split_tasks

    mc = load_samples(load_data_config(synthetic / "mc_test.yaml")).samples
    cfg = TrainConfig()
    for stage in ("base", "sft"):
        getattr(cfg.stages, stage).enabled = False
    check_split_tasks(cfg, "train", "mixed.yaml", mc)  # GRPO only: fine
    with pytest.raises(ConfigError, match=r"data.test \(t.yaml\) holds videoqa_mc samples.*tr1 eval --task mvbench"):
        check_split_tasks(cfg, "test", "t.yaml", mc)
    cfg.stages.sft.enabled = True
    with pytest.raises(ConfigError, match=r"stages sft \(train on data.train\) cannot use"):
        check_split_tasks(cfg, "train", "mixed.yaml", mc)
