"""I3D-style inflation of 2D ResNet weights into an R3D VideoResNet.

Each k x k kernel becomes t x k x k, where t is the target conv's temporal size:
  "average": the 2D kernel repeated over t and divided by t (I3D), so a static clip gives the
             2D response wherever the temporal window lies inside the clip;
  "center":  the 2D kernel in the middle temporal slice, zeros elsewhere, so at first each output
             frame depends only on its own input frame and training learns time from there.
BatchNorm parameters and statistics are copied. The 2D model and the R3D model must have the same
width and depths (BasicBlock: resnet18 -> r3d_18).

When is the inflated net equal to the 2D one on a clip of identical frames? Temporal striding is
harmless (all frames are the same), but the R3D must have the 2D stem's max-pool
(`stem_pool=True`) and, for "average", `temporal_padding="replicate"`: zero padding gives the first
and last frames a truncated kernel.
"""

import re
from collections.abc import Mapping

from torch import Tensor

from pipeline.models.video import VideoResNet

TIME_KERNEL_MODES = ("average", "center")

# 2D torchvision ResNet name -> R3D name; the 3D BasicBlock keeps conv+BN in Sequential conv1/conv2
_RENAMES = (
    (re.compile(r"^conv1\."), "stem.0."),
    (re.compile(r"^bn1\."), "stem.1."),
    (re.compile(r"^(layer\d\.\d+)\.conv(\d)\."), r"\1.conv\2.0."),
    (re.compile(r"^(layer\d\.\d+)\.bn(\d)\."), r"\1.conv\2.1."),
)


def r3d_name(name_2d: str) -> str:
    """The R3D parameter name that takes the 2D ResNet parameter `name_2d`."""
    for pattern, replacement in _RENAMES:
        name_3d, count = pattern.subn(replacement, name_2d)
        if count:
            return name_3d
    return name_2d  # downsample.* and fc.* keep their names


def inflate_kernel(kernel_2d: Tensor, time_size: int, *, time_kernel: str) -> Tensor:
    """(O, I, kh, kw) -> (O, I, time_size, kh, kw) by the chosen mode (see module doc)."""
    if time_kernel == "average":
        return kernel_2d.unsqueeze(2).repeat(1, 1, time_size, 1, 1) / time_size
    if time_kernel == "center":
        kernel_3d = kernel_2d.new_zeros(*kernel_2d.shape[:2], time_size, *kernel_2d.shape[2:])
        kernel_3d[:, :, time_size // 2] = kernel_2d
        return kernel_3d
    raise ValueError(f"time_kernel must be one of {TIME_KERNEL_MODES}, got {time_kernel!r}")


def inflate_resnet2d_into_r3d(
    state_dict_2d: Mapping[str, Tensor],
    model_3d: VideoResNet,
    *,
    time_kernel: str = "average",
    keep_fc: bool = False,
) -> VideoResNet:
    """Load a 2D ResNet state dict into `model_3d` (an r3d_18 VideoResNet) in place; return it.

    `keep_fc=False` leaves model_3d's classifier as it is (its classes usually differ).
    Raises ValueError naming every 2D parameter without a 3D counterpart or with a shape that
    does not fit, so a wrong width/depth/architecture never loads silently.
    """
    if time_kernel not in TIME_KERNEL_MODES:
        raise ValueError(f"time_kernel must be one of {TIME_KERNEL_MODES}, got {time_kernel!r}")
    target = model_3d.state_dict()
    inflated: dict[str, Tensor] = {}
    problems: list[str] = []
    for name_2d, value in state_dict_2d.items():
        if name_2d.startswith("fc.") and not keep_fc:
            continue
        name_3d = r3d_name(name_2d)
        if name_3d not in target:
            problems.append(f"{name_2d}: no R3D parameter {name_3d}")
            continue
        wanted = target[name_3d].shape
        if value.dim() == 4 and len(wanted) == 5:
            value = inflate_kernel(value, wanted[2], time_kernel=time_kernel)
        if value.shape != wanted:
            problems.append(
                f"{name_2d}: shape {tuple(value.shape)} does not fit {name_3d} {tuple(wanted)}"
            )
            continue
        inflated[name_3d] = value
    missing = sorted(
        set(target) - set(inflated) - {k for k in target if k.startswith("fc.") and not keep_fc}
    )
    problems += [f"{name}: not in the 2D state dict" for name in missing]
    if problems:
        raise ValueError("cannot inflate the 2D ResNet into this R3D:\n  " + "\n  ".join(problems))
    model_3d.load_state_dict({**target, **inflated}, strict=True)
    return model_3d
