"""A label tree's per-level metrics against a hand-computed example, and consistent decoding
(common/eval/label_tree.py, lincls/hierarchy.py decode)."""
import pytest
import torch
import torch.nn.functional as F

from common.eval.label_tree import LabelTree, consistency_rate, path_accuracy
from lincls.hierarchy import HierarchicalLoss, decode, hierarchical_report


def small_tree() -> LabelTree:
    return LabelTree([("a", "x"), ("a", "y"), ("b", "x")], ["family", "type"])


def test_level_metrics_match_a_hand_computed_example():
    tree = small_tree()  # level 1: a, b; level 2: a/x, a/y, b/x
    # deepest targets a/x, a/y, b/x, b/x, a/x; columns: level-1 logits (a, b), level-2 (a/x, a/y, b/x)
    target = torch.tensor([0, 1, 2, 2, 0])
    logits = torch.tensor([[2., 0, 3, 0, 1],   # a,   a/x: right, right
                           [0., 1, 0, 2, 1],   # b,   a/y: wrong, right; top-down: b -> b/x
                           [0., 2, 0, 0, 2],   # b,   b/x: right, right
                           [1., 0, 2, 0, 1],   # a,   a/x: wrong, wrong
                           [3., 0, 1, 0, 2]])  # a,   b/x: right, wrong; top-down: a -> a/x (right)
    rep = hierarchical_report(logits, target, tree, "independent", [1.0, 1.0])
    l1, l2 = rep["levels"]
    assert l1["confusion"].tolist() == [[2, 1], [1, 1]] and l2["confusion"].tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert l1["acc1"] == pytest.approx(60.0) and l2["acc1"] == pytest.approx(60.0)
    # level 1: P = R = F1 = 2/3 (a), 1/2 (b); level 2: 1/2, 1, 1/2
    for key in ("macro_precision", "macro_recall", "macro_f1"):
        assert l1[key] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2) and l2[key] == pytest.approx(100 * 2 / 3)
    assert [r["class"] for r in l2["per_class"]] == ["a/x", "a/y", "b/x"] and l2["per_class"][1]["f1"] == 100.0
    assert rep["consistency_rate"] == pytest.approx(60.0)  # samples 2 and 5 predict a child of the other family
    assert rep["path_acc1"] == rep["acc1"] == pytest.approx(40.0)  # samples 1 and 3 right at both levels
    targets1 = torch.tensor([0, 0, 1, 1, 0])
    expected = F.cross_entropy(logits[:, :2], targets1) + 0.5 * F.cross_entropy(logits[:, 2:], target)
    assert HierarchicalLoss(tree, [1.0, 0.5])(logits, target).item() == pytest.approx(expected.item())
    assert hierarchical_report(logits, target, tree, "independent", [1.0, 0.5])["val_loss"] == pytest.approx(
        expected.item())

    top = hierarchical_report(logits, target, tree, "top-down", [1.0, 1.0])
    assert top["levels"][0]["confusion"].tolist() == l1["confusion"].tolist()  # level 1 is not constrained
    assert top["levels"][1]["acc1"] == pytest.approx(60.0) and top["path_acc1"] == pytest.approx(60.0)
    assert top["consistency_rate"] == 100.0 and top["independent_consistency_rate"] == pytest.approx(60.0)


def test_consistent_decoding_never_leaves_the_predicted_parent():
    # three families, types repeating under two of them, one family with a single type
    tree = LabelTree([("a", "x"), ("a", "y"), ("a", "z"), ("b", "x"), ("b", "w"), ("c", "x")], ["l1", "l2"])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, sum(tree.sizes), generator=g) * 3
    logits[:10] = 0.0  # exact ties everywhere
    independent = [s.argmax(1) for s in decode(logits, tree)]
    assert consistency_rate(independent, tree) < 80  # random heads disagree often: the test has teeth
    for decoding in ("top-down", "path"):
        preds = [s.argmax(1) for s in decode(logits, tree, decoding)]
        parents = tree.parents[1][preds[1]]
        assert torch.equal(parents, preds[0]), decoding
        assert consistency_rate(preds, tree) == 100.0
    # top-down keeps level 1's own decision; path picks the best sum of log-probabilities
    top = [s.argmax(1) for s in decode(logits, tree, "top-down")]
    assert torch.equal(top[0], independent[0])
    logp = [F.log_softmax(x, 1) for x in tree.split(logits)]
    brute = torch.stack([logp[0][:, tree.ancestors[0][leaf]] + logp[1][:, leaf] for leaf in range(6)], 1).argmax(1)
    path = [s.argmax(1) for s in decode(logits, tree, "path")]
    assert torch.equal(path[1], brute) and torch.equal(path[0], tree.ancestors[0][brute])
    targets = [tree.level_targets(brute, 0), brute]
    assert path_accuracy(path, targets) == 100.0 and path_accuracy(independent, targets) < 100.0
