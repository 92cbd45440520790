"""Every shared flag of the scripts, in one place: each adder makes one named `--help` section
(argument group), and every on/off flag is a `switch` (--x / --no-x).

- parser.py: the ArgumentParser every script uses (help format, `given` flags), `switch`
- groups.py: data, network, optimization, run, distributed; add_training_args, add_eval_args
  and the checks shared by all scripts
- pretrain.py: views, pretraining run, recipe (the pretraining scripts)
- evaluation.py: labels, hierarchical labels (main_lincls.py, main_knn.py)

A script's own flags (its method's group) stay in the script, as in facebookresearch/moco;
tests/test_flags.py checks that a flag two scripts share means the same in both."""
from common.cli.evaluation import add_hierarchy_args, add_label_subset_args
from common.cli.groups import (ARCH_HELP, DEFAULT_WORKERS, add_checkpoint_args, add_data_args, add_dist_args,
                               add_eval_args, add_network_args, add_optimization_args, add_pretrained_arg,
                               add_run_args, add_training_args, available_cores, check_common_flags,
                               check_training_flags)
from common.cli.parser import NO_HELPS, ArgumentAdder, ArgumentParser, FlagSpec, Helps, HelpFormatter, given, switch
from common.cli.pretrain import RECIPES, add_pretrain_args, add_recipe_args, add_view_args

__all__ = ["ARCH_HELP", "DEFAULT_WORKERS", "NO_HELPS", "RECIPES", "ArgumentAdder", "ArgumentParser", "FlagSpec",
           "HelpFormatter", "Helps", "add_checkpoint_args", "add_data_args", "add_dist_args", "add_eval_args",
           "add_hierarchy_args", "add_label_subset_args", "add_network_args", "add_optimization_args",
           "add_pretrain_args", "add_pretrained_arg", "add_recipe_args", "add_run_args", "add_training_args",
           "add_view_args", "available_cores", "check_common_flags", "check_training_flags", "given", "switch"]
