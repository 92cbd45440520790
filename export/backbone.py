"""The backbone of a checkpoint, exported in one format, checked against our features and
described by a JSON beside it: export_backbone.py's work, and --export-at-end's."""
import hashlib
import json
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from common.ckpt.pretrained import extract_backbone, load_backbone
from common.errors import UserError
from common.files.atomic import atomic_path
from common.log.progress import log
from common.nets.backbones import family
from common.nets.models import build_backbone
from export import detectron2, formats
from export.meta import describe, hashed_name, weights_meta


def backbone_and_head(ckpt: Dict, info: Dict, path: str, with_head: bool) -> Tuple[nn.Module, Dict]:
    """Our backbone with the checkpoint's weights (fc = Identity, or a lincls linear fc), in
    eval mode on the CPU, and the torchvision-format state_dict that holds exactly its weights."""
    weights, layout = extract_backbone(ckpt["state_dict"])
    state = ckpt["state_dict"]
    prefix = "module." if any(k.startswith("module.fc.") for k in state) else ""
    head = {k[len(prefix) + 3:]: v for k, v in state.items() if k.startswith(prefix + "fc.")}
    linear_head = layout == "classifier" and set(head) == {"weight", "bias"} and head["weight"].ndim == 2
    # the first layer as trained: an --in-channels run's reads its own count (describe: 3 for older checkpoints)
    model = build_backbone(info["arch"], small_images=info["small_images"], in_channels=info["in_channels"])
    load_backbone(model, ckpt, path)  # a missing, extra or misshapen tensor is a plain error naming the flags
    model.fc = nn.Identity()
    if with_head and linear_head:
        model.fc = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        model.fc.load_state_dict(head)
        weights = {**weights, **{"fc." + k: v for k, v in head.items()}}
        info["num_classes"] = head["weight"].shape[0]
    elif with_head and head and layout == "classifier":
        log("=> the classifier's head is not a single linear layer (--head mlp or --head-bn): exporting the "
            "backbone alone")
    return model.eval(), {k: v.detach().cpu().clone().contiguous() for k, v in weights.items()}


def sidecar(out: str) -> str:
    """The JSON beside an export: named after the whole file, so a .pth and a .pt of one
    checkpoint each keep their own."""
    return out + ".json"


def os_reason(e: OSError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_model(fmt: str, model: nn.Module, weights: Dict, info: Dict, ckpt: Dict, path: str, out: str,
                 hash_in_name: bool = False) -> str:
    """Write `model` (weights `weights`, from checkpoint `ckpt` at `path`) as `out` in `fmt`,
    `out`.json beside it; with `hash_in_name` (torchvision format) the name becomes
    `<name>-<sha256[:8]>.<ext>`. Returns the file written. Both files are written under
    temporary names, the export read back and compared with our features, then moved into
    place (the export first, the JSON that describes it last): a failed check or write
    leaves nothing, and an earlier export of that name intact."""
    info["family"] = family(model)  # not ResNet: rebuilt with build_backbone (`body.*` layout when wrapped)
    if fmt == "detectron2":
        detectron2.check_convertible(info)
    torch.manual_seed(0)
    x = torch.randn(4, info["in_channels"], info["crop_size"], info["crop_size"])  # every format traces on it
    with torch.no_grad():
        expected = model(x)
    if not torch.isfinite(expected).all():
        raise UserError(f"{path!r} gives NaN or infinite features on a random batch; export a checkpoint from "
                        f"before the run diverged")
    info["feature_dim"] = model.fc.in_features if "num_classes" in info else int(expected.shape[1])
    info.update(weights_meta(model, info, ckpt, path))
    data = formats.payload(fmt, weights)
    if hash_in_name and fmt == "torchvision":
        out = hashed_name(out, hashlib.sha256(data).hexdigest())
    info.update(format=fmt, file=os.path.abspath(out))
    try:
        with atomic_path(sidecar(out)) as tmp_json, atomic_path(out) as tmp:
            formats.write(fmt, model, data, x[:2], tmp)
            forward = formats.exported_forward(fmt, tmp, info)
            if forward is not None:
                with torch.no_grad():
                    got = forward(x[1:])  # another batch size than the trace's: the export is not fixed to it
                ok, err, rel = formats.matches(got, expected[1:])
                if not ok:
                    raise UserError(f"the {fmt} export does not reproduce the backbone's features (max difference "
                                    f"{err:.2e}, {rel:.1e} of the largest feature); nothing was written; please "
                                    f"report this with the checkpoint")
                info.update(max_abs_difference=err, max_rel_difference=rel)
            info["sha256"] = _sha256(tmp)
            with open(tmp_json, "w") as f:
                json.dump(info, f, indent=1, default=str)
    except OSError as e:
        raise UserError(f"could not write {out} ({os_reason(e)}); nothing was written; pass -o a path in a folder "
                        f"you can write to, with space left") from e
    return out


def export_at_end(ckpt: Dict, path: str, output_dir: str) -> Optional[str]:
    """--export-at-end: the backbone of the run's last checkpoint (`ckpt`, saved as `path`)
    as OUTPUT_DIR/exported/backbone-<hash>.pth + its JSON, as export_backbone.py writes it."""
    info = describe(ckpt, path)
    model, weights = backbone_and_head(ckpt, info, path, with_head=False)
    os.makedirs(os.path.join(output_dir, "exported"), exist_ok=True)
    out = export_model("torchvision", model, weights, info, ckpt, path,
                       os.path.join(output_dir, "exported", "backbone.pth"), hash_in_name=True)
    log(f"=> --export-at-end: {out} ({info['arch']} backbone, {info['feature_dim']}-d features; "
        f"torch.hub.load(<this repo>, 'backbone', path={out!r}, source='local') builds it)")
    return out
