"""``tr1 train``'s data: the train split skips bad labels (counted), the evaluated splits keep every label."""
import json

from megatron_tr1.data.synthetic import generate
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.rl.train_cli import prepare_data


def test_test_and_ood_keep_every_label_train_skips(tmp_path):
    generate(tmp_path / "d", num=12, seed=0, size=32, progress=False)
    for split in ("train", "test", "ood"):
        path = tmp_path / "d" / f"{split}.json"
        records = json.loads(path.read_text())
        records[0]["solution"] = records[0]["solution"][::-1]  # start > end
        path.write_text(json.dumps(records))
    cfg = TrainConfig()
    cfg.data.train, cfg.data.test, cfg.data.ood = (str(tmp_path / "d" / f"{s}.yaml") for s in ("train", "test", "ood"))
    samples = prepare_data(cfg, tmp_path / "run")
    sizes = {s: len(json.loads((tmp_path / "d" / f"{s}.json").read_text())) for s in ("train", "test", "ood")}
    assert len(samples["train"]) == sizes["train"] - 1
    for split in ("test", "ood"):
        assert len(samples[split]) == sizes[split] and samples[split][0].start > samples[split][0].end
