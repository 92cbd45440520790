"""--recipe small: fills the flags left at their defaults, keeps the ones given, fits the
MoCo queue to the dataset, prints every value it set, and stores them in the args."""
import main_moco
import main_simclr


def finalize(module, argv, tmp_path):
    parser = module.get_args_parser()
    return module.finalize_args(parser.parse_args(argv + ["--output-dir", str(tmp_path)]))


def test_moco_small_recipe_fits_the_queue_and_keeps_given_flags(tmp_path, capsys):
    args = finalize(main_moco, ["--dataset", "synthetic", "--synthetic-size", "1736", "--recipe", "small",
                                "--moco-t", "0.2"], tmp_path)
    out = capsys.readouterr().out
    assert args.moco_k == 128 and args.batch_size == 64  # a tenth of 1,736 images, a multiple of the batch
    assert (args.lr, args.cos, args.mlp, args.aug_plus, args.moco_m, args.crop_min) == (0.06, True, True, True,
                                                                                        0.99, 0.3)
    assert args.moco_t == 0.2  # given on the command line: kept
    assert args.epochs == 115  # 200,000 images seen (common.recipes.SMALL_DATA_BUDGET) / 1,736
    assert "--recipe small for 1736 images at 32 px sets:" in out and "--moco-k 128" in out
    assert "kept from the command line: --moco-t 0.2" in out
    default = finalize(main_moco, ["--dataset", "synthetic"], tmp_path / "d")
    assert (default.moco_k, default.moco_m, default.mlp) == (65536, 0.999, False)  # the default recipe: untouched


def test_simclr_small_recipe_uses_sgd_and_a_short_warmup(tmp_path, capsys):
    args = finalize(main_simclr, ["--dataset", "synthetic", "--recipe", "small", "--epochs", "20"], tmp_path)
    out = capsys.readouterr().out
    assert (args.optimizer, args.lr, args.lr_scaling, args.temperature, args.batch_size) == ("sgd", 0.1, "none",
                                                                                            0.2, 64)
    assert args.warmup_epochs == 2.0 and "--warmup-epochs 2" in out
    assert args.epochs == 20 and "kept from the command line: --epochs 20" in out
    budget = finalize(main_simclr, ["--dataset", "synthetic", "--synthetic-size", "2000", "--recipe", "small"],
                      tmp_path / "e")
    assert budget.epochs == 50 and budget.warmup_epochs == 5.0  # 100,000 images seen; a tenth of them warm up
    big = finalize(main_simclr, ["/data/photos", "--dataset", "synthetic", "--recipe", "small", "--crop-size",
                                 "96"], tmp_path / "b")
    assert big.crop_min is None  # 0.3 is for <= 64 px objects; 96 px keeps SimCLR's 0.08
