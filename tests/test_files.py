"""The file helpers: checkpoints that torch cannot read, and load_state_dict's error shortened."""

import pytest
import torch
import torch.nn as nn

from urda_fast.files import load_torch_file, state_dict_mismatch


def _load_error(model: nn.Module, state: dict) -> RuntimeError:
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state)
    return info.value


def test_state_dict_mismatch_counts_and_names_a_few():
    wide = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    other = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(4, 4, 1))
    message = state_dict_mismatch(_load_error(wide, other.state_dict()))
    # wide has 10 keys; other's 0.weight/0.bias are there with other shapes, 1.* are there too (shape mismatch on
    # 1.weight only), 2.*, 3.*, 4.* are missing
    assert message.startswith("6 missing key(s): 2.weight, 2.bias, 3.weight, ...")
    assert "3 shape mismatch(es): 0.weight [3, 4] in the file vs [4, 4] here, 0.bias [3] in the file vs [4] here, " \
           "1.weight [4, 4, 1, 1] in the file vs [4, 4] here" in message
    extra = dict(wide.state_dict(), **{"head.weight": torch.zeros(1)})
    assert state_dict_mismatch(_load_error(wide, extra)) == "1 unexpected key(s): head.weight"
    assert state_dict_mismatch(RuntimeError("something else\nentirely")) == "something else\nentirely"


def test_load_torch_file_names_a_foreign_or_cut_file(tmp_path):
    path = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3)}, path)
    assert torch.equal(load_torch_file(str(path), who="test")["w"], torch.arange(3))
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    (tmp_path / "text.pt").write_text("weights: none")
    for name in ("cut.pt", "text.pt"):
        with pytest.raises(ValueError, match=f"test: '.*{name}' is not a checkpoint torch can read"):
            load_torch_file(str(tmp_path / name), who="test")
    with pytest.raises(FileNotFoundError):
        load_torch_file(str(tmp_path / "missing.pt"), who="test")
    torch.save({"f": print}, tmp_path / "code.pt")  # not plain tensors: refused where only weights are expected
    with pytest.raises(ValueError, match="UnpicklingError"):
        load_torch_file(str(tmp_path / "code.pt"), who="test", weights_only=True)
