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


def test_flags_typed_at_their_default_value_are_kept(tmp_path, capsys):
    """A flag given on the command line is the user's choice even when it equals the
    default: the recipe must not replace it (argparse alone cannot tell them apart)."""
    args = finalize(main_moco, ["--dataset", "synthetic", "--recipe", "small", "--moco-t", "0.07", "--lr", "0.03",
                                "--moco-m", "0.999"], tmp_path)
    assert (args.moco_t, args.lr, args.moco_m) == (0.07, 0.03, 0.999)
    kept = capsys.readouterr().out.split("kept from the command line: ")[1]
    assert all(f in kept for f in ("--moco-t 0.07", "--lr 0.03", "--moco-m 0.999"))
    assert {"moco_t", "lr", "moco_m"} <= set(args.given_flags)
    simclr = finalize(main_simclr, ["--dataset", "synthetic", "--synthetic-size", "2000", "--recipe", "small",
                                    "-b", "256", "--lr", "0.3", "--temperature", "0.1", "--optimizer", "lars",
                                    "--epochs", "100"], tmp_path / "s")
    assert (simclr.batch_size, simclr.lr, simclr.temperature, simclr.optimizer, simclr.epochs) == (256, 0.3, 0.1,
                                                                                                  "lars", 100)
    assert simclr.warmup_epochs == 10.0  # a tenth of the 100 epochs in use, not of the recipe's 50


def test_the_queue_fits_the_batch_in_use(tmp_path):
    args = finalize(main_moco, ["--dataset", "synthetic", "--synthetic-size", "1736", "--recipe", "small",
                                "-b", "48"], tmp_path)
    assert args.batch_size == 48 and args.moco_k == 144  # a multiple of 48 within a tenth of 1,736 (173)
    sym = finalize(main_moco, ["--dataset", "synthetic", "--synthetic-size", "1736", "--recipe", "small",
                               "--symmetric"], tmp_path / "s")
    assert sym.moco_k == 128 and sym.moco_k % (2 * sym.batch_size) == 0  # two keys per image per step


def test_a_resumed_recipe_run_keeps_its_epochs_on_a_grown_dataset(tmp_path, capsys):
    from conftest import run_script
    tiny = ["--dataset", "synthetic", "-a", "resnet18", "-j", "0", "--recipe", "small", "--moco-dim", "16",
            "-p", "100", "--output-dir", str(tmp_path)]
    # 64 images: 200,000 images seen would be 3,125 epochs; stop the run after one
    run_script("main_moco.py", tiny + ["--synthetic-size", "64", "--epochs", "1"])
    ckpt_epochs = 1
    capsys.readouterr()
    args = finalize(main_moco, tiny[:-2] + ["--synthetic-size", "128", "--resume", "auto"], tmp_path)
    out = capsys.readouterr().out
    assert args.epochs == ckpt_epochs  # kept from the checkpoint, not 200,000 / 128
    assert args.moco_k == 64  # the queue it was built with (a tenth of 64 images, one batch)
    assert "the resumed run keeps the values it started with" in out and "would set --epochs 1562" in out
