"""BatchNorm groups too small to normalise: refused before training with the values that
work (common/nets/batchnorm.py)."""
import pytest

import main_moco
import main_simclr
from common.errors import UserError
from common.nets.batchnorm import MIN_VALUES, bn_group_warning, fewest_positions


def finalize(module, argv, tmp_path):
    return module.finalize_args(module.get_args_parser().parse_args(argv + ["--output-dir", str(tmp_path)]))


@pytest.mark.slow
def test_fewest_positions_follow_the_stem_and_the_crop():
    assert fewest_positions("resnet18", small_images=False, crop_size=32) == 1  # layer4 at 1x1
    assert fewest_positions("resnet18", small_images=True, crop_size=32) == 16  # 4x4
    assert fewest_positions("resnet50", small_images=False, crop_size=224) == 49  # 7x7


@pytest.mark.parametrize("argv", [
    ["-b", "2", "--bn-splits", "2", "--moco-k", "32"],  # 1 sample per group: torch's ValueError
    ["-a", "resnet50", "-b", "16", "--bn-splits", "8", "--moco-k", "32"],  # 2 values: diverges silently
])
def test_moco_refuses_bn_groups_too_small_to_normalise(argv, tmp_path):
    with pytest.raises(UserError, match="too few for BatchNorm statistics") as e:
        finalize(main_moco, ["--dataset", "synthetic", "--no-small-images", "--crop-size", "32"] + argv, tmp_path)
    assert "raise -b, lower --bn-splits" in str(e.value) and f"at least {MIN_VALUES} values" in str(e.value)


@pytest.mark.slow
def test_workable_groups_pass_and_borderline_ones_warn(tmp_path, capsys):
    finalize(main_moco, ["--dataset", "synthetic", "--no-small-images", "-b", "16", "--bn-splits", "2",
                         "--moco-k", "32"], tmp_path)  # 8 samples x 1x1: runs, with a warning
    assert "warning: BatchNorm normalises 8 sample(s) x 1 position(s)" in capsys.readouterr().out
    finalize(main_moco, ["--dataset", "synthetic", "-b", "16", "--bn-splits", "8", "--moco-k", "32"],
             tmp_path / "small")  # the CIFAR stem keeps a 4x4 map: 2 x 16 values
    assert "BatchNorm" not in capsys.readouterr().out
    finalize(main_simclr, ["--dataset", "synthetic", "--no-small-images", "-b", "4"], tmp_path / "s")
    assert "BatchNorm normalises 8 sample(s) x 1 position(s) = 8 value(s) per channel in its smallest map (two " \
           "views of -b 4)" in capsys.readouterr().out
    assert bn_group_warning(256, 49, "x", "y") is None
