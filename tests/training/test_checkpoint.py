import torch

from training import checkpoint


def _save(folder, step: int) -> None:
    checkpoint.save(folder, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep=3)


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    (tmp_path / ".tmp-step-00000040").mkdir()  # a save killed before its rename: never read
    assert checkpoint.latest(tmp_path).name == "step-00000030"
    for path in (tmp_path / "step-00000030").iterdir():
        path.unlink()
    (tmp_path / "step-00000030").rmdir()  # the folder `latest` names is gone
    assert checkpoint.latest(tmp_path).name == "step-00000020"
    (tmp_path / checkpoint.LATEST).unlink()
    assert checkpoint.latest(tmp_path).name == "step-00000020"
    weights, state = checkpoint.load(checkpoint.latest(tmp_path))
    assert state["step"] == 20 and torch.equal(weights["w"], torch.full((2,), 20.0))
    assert checkpoint.latest(tmp_path / "empty") is None
