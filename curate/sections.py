"""Each finding as files and a report section: its csv (every row), its PNG grid(s) and a
table of the first rows, with thumbnails where no grid pictures them (each image is shown
once), and the rows the embedding map marks."""
import csv
import os
from typing import List, Optional, Sequence

import torch

from common.files.atomic import atomic_path
from curate.duplicates import Pair, groups_of
from curate.grids import captioned_grid, group_grids, thumbnail
from curate.items import Items
from curate.outliers import TWIN
from curate.report import Section, write_csv

SHOWN = 24  # rows of a finding shown in report.html and its grids (the csv has all)


def _thumb(items: Items, out: str, row: int) -> str:
    return thumbnail(items.image(row), os.path.join(out, "thumbnails"), row)


def duplicates_section(items: Items, pairs: Sequence[Pair], rule: str, out: str) -> Section:
    """`rule`: the near-duplicate rule in words."""
    rows = [[p.group, "exact" if p.exact else "near", int(p.cross_split), p.test, f"{p.similarity:.4f}",
             f"{p.relative:.4f}", items.paths[p.a],
             items.splits[p.a], items.class_of(items.labels[p.a]), items.paths[p.b], items.splits[p.b],
             items.class_of(items.labels[p.b])] for p in pairs]
    csv_path = write_csv(os.path.join(out, "duplicates.csv"),
                         ["group", "kind", "cross_split", "test", "score", "relative", "path_a", "split_a", "class_a",
                          "path_b", "split_b", "class_b"], rows)
    groups = groups_of(pairs)
    exact = sum(p.exact for p in pairs)
    cross_exact = sum(p.cross_split and p.exact for p in pairs)
    cross_near = sum(p.cross_split and not p.exact for p in pairs)
    ordered = list(dict.fromkeys(p.group for p in pairs))  # in the order of their first pair
    shown = ordered[:SHOWN]
    kinds: dict = {}
    for p in pairs:
        kinds.setdefault(p.group, set()).update(["exact" if p.exact else "near"] + ["cross-split"] * p.cross_split)
    grid_groups = [(f"group {g}: {', '.join(sorted(kinds[g], key=['exact', 'near', 'cross-split'].index))}"
                    + (f" ({len(groups[g])} images, 8 shown)" if len(groups[g]) > 8 else ""),
                    [(items.image(r), f"{items.splits[r]} {items.class_of(items.labels[r])}\n"
                                      f"{os.path.basename(items.paths[r])}") for r in groups[g][:8]]) for g in shown]
    s = Section("Duplicates", f"{len(pairs)} pairs in {len(groups)} groups: {exact} exact copies (same bytes), "
                f"{len(pairs) - exact} near ({rule}); leakage across splits, listed first: {cross_exact} exact and "
                f"{cross_near} near pairs", [csv_path],
                header=["group", "kind", "test", "score", "relative", "image a", "image b"])
    s.grids = group_grids(grid_groups, os.path.join(out, "grids"), "duplicates") if grid_groups else []
    s.files += s.grids
    # the grid pictures every image of a group once: the table names the pairs in text only
    s.rows = [[("", str(p.group)), ("", ("exact" if p.exact else "near") + (" cross-split" if p.cross_split else "")),
               ("", p.test), ("", f"{p.similarity:.3f}"), ("", f"{p.relative:.3f}"),
               ("", f"{items.splits[p.a]}: {items.paths[p.a]}"),
               ("", f"{items.splits[p.b]}: {items.paths[p.b]}")] for p in pairs[:SHOWN]]
    s.marked = [r for g in ordered for r in groups[g]]
    return s


def outliers_section(items: Items, scores: torch.Tensor, signals: Sequence[str], twin: Optional[torch.Tensor], k: int,
                     group_k: int, per_class: bool, score: str, out: str) -> Section:
    """`scores`: the combined robust z-score of each row, `signals`: the signal that gave it,
    `twin`: its best pixel correlation with another image (None without the copy search)."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    csv_path = write_csv(os.path.join(out, "outliers.csv"), ["rank", "score", "signal", "twin", "path", "split", "class"],
                         [[n, f"{float(scores[r]):.4f}", signals[r], "" if twin is None else f"{float(twin[r]):.4f}",
                           items.paths[r], items.splits[r], items.class_of(items.labels[r])] for n, r in enumerate(order)])
    cells = [(items.image(r), f"#{n} z {float(scores[r]):.1f} {signals[r]}\n"
                              f"{os.path.basename(items.paths[r])}") for n, r in enumerate(order[:SHOWN])]
    grid = captioned_grid([cells[s:s + 8] for s in range(0, len(cells), 8)], os.path.join(out, "grids", "outliers.png"))
    where = "of its class" if per_class else "image"
    how = (f"1 - cosine to its {k}-th nearest {where}" if score == "kth" else
           f"its distance to its {k}-th nearest {where} over that of its {k} nearest (LOF-style)")
    flagged = {name: sum(signals[r] == name for r in order[:max(1, len(order) // 100)]) for name in set(signals)}
    top = ", ".join(f"{c} by {name}" for name, c in sorted(flagged.items(), key=lambda kv: -kv[1]) if c)
    twins = "" if twin is None else (f"; the embedding's score does not count for the {int((twin >= TWIN).sum())} "
                                     f"images that another image matches on the pixels (correlation >= {TWIN})")
    return Section("Outliers", f"every image ranked by the largest robust z-score of its signals: embedding ({how}), "
                   f"group (1 - cosine to its {group_k}-th nearest {where}: a group of look-alike foreign images) "
                   f"and pixel statistics (brightness, contrast, entropy, high frequency, saturation, aspect, "
                   f"size){twins}; the top 1 %: {top}; the first {len(cells)} shown", [csv_path, grid], [grid],
                   ["rank", "z", "signal", "path"],
                   [[("", str(n)), ("", f"{float(scores[r]):.1f}"), ("", signals[r]), ("", items.paths[r])]
                    for n, r in enumerate(order[:SHOWN])], marked=order[:SHOWN])


def label_errors_section(items: Items, rows: torch.Tensor, suspected: torch.Tensor, suggested: torch.Tensor,
                         self_conf: torch.Tensor, method: str, out: str, notes: Sequence[str] = ()) -> Section:
    """`rows`: the labelled rows the other tensors describe; `notes` (the probabilities'
    out-of-fold accuracy, a warning when it is weak) open the csv as '#' lines and end the
    report's summary, so the count is never read without them."""
    order = [int(i) for i in torch.argsort(self_conf, stable=True) if bool(suspected[i])]
    table = [[n, f"{float(self_conf[i]):.4f}", items.paths[int(rows[i])], items.splits[int(rows[i])],
              items.class_of(items.labels[rows[i]]), items.class_of(suggested[i])] for n, i in enumerate(order)]
    csv_path = os.path.join(out, "label_errors.csv")
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        f.writelines(f"# {note}\n" for note in notes)  # pandas: read_csv(path, comment="#")
        csv.writer(f).writerows([["rank", "self_confidence", "path", "split", "given", "suggested"]] + table)
    cells = [(items.image(int(rows[i])), f"given {items.class_of(items.labels[rows[i]])}\nsuggested "
              f"{items.class_of(suggested[i])}\n{os.path.basename(items.paths[int(rows[i])])}") for i in order[:SHOWN]]
    files: List[str] = [csv_path]
    grids = [captioned_grid([cells[s:s + 8] for s in range(0, len(cells), 8)],
                            os.path.join(out, "grids", "label_errors.png"))] if cells else []
    return Section("Suspected label errors", f"{len(order)} of {len(rows)} labelled images, ranked by the "
                   f"out-of-fold ({method}) probability of their given label" + "".join(f"; {n}" for n in notes),
                   files + grids, grids,
                   ["p(given)", "given", "suggested", "path"],
                   [[("", f"{float(self_conf[i]):.3f}"), ("", items.class_of(items.labels[rows[i]])),
                     ("", items.class_of(suggested[i])), ("", items.paths[int(rows[i])])]
                    for i in order[:SHOWN]], marked=[int(rows[i]) for i in order])


def suggestions_section(items: Items, rows: torch.Tensor, probs: torch.Tensor, out: str) -> Section:
    conf, best = probs.max(1)
    order = torch.argsort(conf, descending=True, stable=True).tolist()
    csv_path = write_csv(os.path.join(out, "label_suggestions.csv"), ["path", "label", "confidence", "split"],
                         [[items.paths[int(rows[i])], items.class_of(best[i]), f"{float(conf[i]):.4f}",
                           items.splits[int(rows[i])]] for i in order])
    return Section("Label suggestions", f"{len(rows)} unlabelled images with the class their labelled neighbours "
                   f"vote for (path,label columns: a --dataset csv manifest)", [csv_path], [],
                   ["confidence", "suggested", "image"],
                   [[("", f"{float(conf[i]):.3f}"), ("", items.class_of(best[i])),
                     (_thumb(items, out, int(rows[i])), items.paths[int(rows[i])])] for i in order[:SHOWN]])


def selection_section(items: Items, picks: Sequence[int], scores: Sequence[float], pool: int, how: str,
                      score: str, out: str) -> Section:
    """`how`: the method in words; `score`: what `scores` holds for each pick (its column)."""
    csv_path = write_csv(os.path.join(out, "select.csv"), ["path", "label", "rank", score],
                         [[items.paths[r], "", n, f"{g:.4f}"] for n, (r, g) in enumerate(zip(picks, scores))])
    return Section("What to label next", f"{len(picks)} of {pool} unlabelled images by {how}, in pick order (fill "
                   f"the label column: select.csv is a --dataset csv manifest)", [csv_path], [],
                   ["rank", score, "image"],
                   [[("", str(n)), ("", f"{g:.3f}"), (_thumb(items, out, r), items.paths[r])]
                    for n, (r, g) in enumerate(list(zip(picks, scores))[:SHOWN])])
