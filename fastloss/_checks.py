"""Input checks shared by the image losses (PDLLoss, D2SMLoss, MDFLoss): every message names the
loss and the argument, says what was wrong in the user's terms and how to fix it."""
import math
import warnings

import torch
from torch import Tensor

INPUT_RANGES = ((0, 1), (-1, 1))


def check_image(loss, name, x, rgb=True):
    """Raise before any kernel runs unless ``x`` is a floating (B, C, H, W) tensor (C == 3 if ``rgb``)."""
    if not isinstance(x, Tensor):
        kind = type(x)
        if kind.__module__ == "numpy" and hasattr(x, "shape"):
            raise TypeError(f"{loss}: {name} is a numpy array (shape {tuple(x.shape)}, dtype {x.dtype}), expected a "
                            "torch.Tensor of shape (B, 3, H, W) in [0, 1]; convert an HWC uint8 image with "
                            "torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255")
        if kind.__module__.startswith("PIL"):
            raise TypeError(f"{loss}: {name} is a PIL image, expected a torch.Tensor of shape (B, 3, H, W) in [0, 1]; "
                            "convert it with torchvision.transforms.functional.to_tensor(img)[None]")
        raise TypeError(f"{loss}: {name} must be a torch.Tensor, got {kind.__name__} (expected a (B, 3, H, W) "
                        "image tensor)")
    if not x.is_floating_point():
        hint = (" (0..255 integers?): pass x.float() / 255" if x.dtype == torch.uint8 else ": pass x.float()")
        raise TypeError(f"{loss}: {name} must be a floating-point tensor (an image in [0, 1]), got dtype "
                        f"{x.dtype}{hint}")
    shape, want = tuple(x.shape), "(B, 3, H, W)" if rgb else "(B, C, H, W)"
    if x.dim() == 3:
        raise ValueError(f"{loss}: {name} must be {want}, got shape {shape}: one image? add the batch "
                         "dimension with x.unsqueeze(0)")
    if x.dim() != 4:
        raise ValueError(f"{loss}: {name} must be {want}, got shape {shape}")
    if rgb and shape[1] != 3:
        if shape[3] == 3:
            raise ValueError(f"{loss}: {name} has shape {shape}, channels last (B, H, W, 3)? expected (B, 3, H, W): "
                             "pass x.permute(0, 3, 1, 2)")
        if shape[1] == 1:
            raise ValueError(f"{loss}: {name} must have 3 channels (RGB), got a grayscale image (1 channel, shape "
                             f"{shape}): pass x.expand(-1, 3, -1, -1)")
        raise ValueError(f"{loss}: {name} must have 3 channels (RGB), got {shape[1]} in shape {shape}")


def check_input_range(loss, input_range):
    """``input_range`` as a tuple of two ints, one of INPUT_RANGES."""
    try:
        r = tuple(input_range)
    except TypeError:
        r = None
    if r not in INPUT_RANGES:
        raise ValueError(f"{loss}: input_range must be (0, 1) or (-1, 1), got {input_range!r}")
    return tuple(int(v) for v in r)


def to_unit_range(x, input_range):
    """Images in ``input_range`` mapped to [0, 1] (the extractors' convention)."""
    return x if input_range == (0, 1) else (x + 1) * 0.5


class RangeCheck:
    """One warning per loss instance for images clearly outside ``input_range`` (more than 10% of
    its width below it, or 50% above it: [0, 255] images, [-1, 1] images given as [0, 1]). The
    losses pass their target (clean) images only: they show the data's convention, while a
    network's output, early in training above all, may stray far from it without anything wrong.

    Sampled on the first call only (one host read of min and max, then never again), so a GPU
    training step pays no synchronisation after the first; skipped while torch.compile traces.

    ``takes_input_range``: whether ``loss`` has the ``input_range`` argument (every image loss
    does); the hint then says to pass it to that loss, else to map the images."""

    def __init__(self, loss, input_range=(0, 1), takes_input_range=True):
        self.loss, self.input_range, self.done = loss, tuple(input_range), False
        self.takes_input_range = takes_input_range

    def __call__(self, *images):
        if self.done or torch.compiler.is_compiling() or any(x.device.type == "meta" for x in images):
            return  # meta tensors (shape checks) have no values to sample
        self.done = True
        with torch.no_grad():
            stats = torch.stack([s for x in images if x.numel()
                                 for s in (x.detach().amin().float(), x.detach().amax().float())])
            values = stats.tolist()  # the one host read
        lo, hi = min(values[0::2]), max(values[1::2])
        a, b = self.input_range
        if lo < a - 0.1 * (b - a) or hi > b + 0.5 * (b - a):
            hint = ""
            if hi > 2.0 * max(b, 1) + 1:
                hint = (" They look like [0, 255]: divide by 255." if self.input_range == (0, 1) else
                        " They look like [0, 255]: pass x / 127.5 - 1.")
            elif self.input_range == (0, 1) and lo < -0.1:
                hint = (f" They look like [-1, 1]: build the loss as {self.loss}(..., input_range=(-1, 1)), or pass "
                        "(x + 1) / 2." if self.takes_input_range else " They look like [-1, 1]: pass (x + 1) / 2.")
            warnings.warn(f"{self.loss}: images range over [{lo:.3g}, {hi:.3g}], clearly outside the expected "
                          f"[{a}, {b}]; the loss is computed as if they were in [{a}, {b}].{hint} "
                          "(Checked on the first call only; this warning is shown once per loss.)",
                          UserWarning, stacklevel=3)


def check_pixel_weight(loss, pixel_weight):
    """``pixel_weight`` as a float: a finite number >= 0 (the weight of the pixel L1 term)."""
    if isinstance(pixel_weight, bool) or not isinstance(pixel_weight, (int, float)) \
            or not math.isfinite(pixel_weight) or pixel_weight < 0:
        raise ValueError(f"{loss}: pixel_weight must be a finite number >= 0 (the weight of the pixel L1 term, "
                         f"0 = none), got {pixel_weight!r}")
    return float(pixel_weight)


def pixel_term(pixel_weight, restored, clean):
    """The one pixel-term convention of every fastloss image loss: ``pixel_weight * mean|restored -
    clean|`` on images mapped to [0, 1]; nothing (a Python 0.0) when the weight is 0, the default,
    since trainers configure their pixel loss on its own (BasicSR's ``pixel_opt``)."""
    return pixel_weight * (restored - clean).abs().mean() if pixel_weight else 0.0
