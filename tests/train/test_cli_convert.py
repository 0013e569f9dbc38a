import pytest
import torch

from reformer import ReformerLM
from reformer.cli import main
from tests.models.test_hf import hf_model

transformers = pytest.importorskip("transformers")


def test_convert_command_round_trip(tmp_path):
    hf = hf_model(("lsh", "local")).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = ReformerLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(1, 40, (1, 64))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_convert_command_reports_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
