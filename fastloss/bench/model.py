"""What fastloss-bench trains and on what: the generated image and its noisy crops, the DnCNN-style
denoiser, and the loss configurations (``CONFIGS``) with the fast backend a ``-fast`` one runs on."""
import contextlib
import torch
import torch.nn as nn

import fastloss
from fastloss import _backend

PERCEPTUAL_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


# ----------------------------------------------------------------------------- data and model
def make_image(size=256, seed=0):
    """A deterministic synthetic RGB image in [0, 1] (3, size, size): smooth gradients, waves of
    several frequencies, hard-edged shapes and fine texture, so denoising has edges to keep."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    channels = []
    for c in range(3):
        f = torch.rand(4, generator=g) * 12 + 2
        ph = torch.rand(4, generator=g) * 6.28
        img = 0.35 + 0.25 * (xx * (c + 1) / 3 + yy * (3 - c) / 3) / 2
        img = img + 0.08 * torch.sin(f[0] * xx * 6.28 + ph[0]) * torch.cos(f[1] * yy * 6.28 + ph[1])
        img = img + 0.04 * torch.sin((f[2] * xx + f[3] * yy) * 6.28 + ph[2])
        channels.append(img)
    img = torch.stack(channels)
    for _ in range(24):  # rectangles and discs with random colours
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.18]) + torch.tensor([0, 0, 0.03])).tolist()
        colour = torch.rand(3, 1, 1, generator=g)
        if torch.rand(1, generator=g).item() < 0.5:
            mask = ((xx - cx).abs() < r) & ((yy - cy).abs() < r * 0.6)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img = torch.where(mask, 0.7 * colour + 0.3 * img, img)
    img = img + 0.03 * torch.randn(3, size, size, generator=g)  # texture
    return img.clamp(0, 1)


def random_batch(image, batch, crop, sigma, generator):
    """(noisy, clean) crops of ``image`` with Gaussian noise of std ``sigma``."""
    _, h, w = image.shape
    ys = torch.randint(0, h - crop + 1, (batch,), generator=generator)
    xs = torch.randint(0, w - crop + 1, (batch,), generator=generator)
    clean = torch.stack([image[:, y:y + crop, x:x + crop] for y, x in zip(ys.tolist(), xs.tolist())])
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
    return noisy, clean


class DnCNN(nn.Module):
    """A DnCNN-style denoiser: conv+ReLU, (depth-2) x conv+BN+ReLU, conv; predicts the noise."""

    def __init__(self, depth=8, width=32):
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x - self.body(x)


# ----------------------------------------------------------------------------- loss configurations
class VGGPerceptual(nn.Module):
    """The hand-written baseline, as users write it today (BasicSR's VGG feature extractor + L1):
    L1 + weight * sum_l mean|Phi_l(u) - Phi_l(v)| on VGG16 features, the torchvision-layout
    ``nn.Sequential`` run as it is (float32, NCHW), one pass per loss; ``autocast=True`` runs the
    same code under ``torch.autocast(bfloat16)``, as a user turns mixed precision on by hand."""

    def __init__(self, layers, weight, vgg_weights, autocast=False):
        super().__init__()
        from ..features import VGG

        vgg = VGG("vgg16", layers=layers, weights=vgg_weights)  # the weights and the layer indices
        self.features, self.out_index = vgg.features, dict(vgg._out_index)
        self.register_buffer("mean", vgg.mean, persistent=False)
        self.register_buffer("std", vgg.std, persistent=False)
        self.layers, self.weight, self.autocast = layers, weight, autocast

    def _run(self, x):
        x = (x - self.mean) / self.std
        out = {}
        for i, module in enumerate(self.features):
            x = module(x)
            if i in self.out_index:
                out[self.out_index[i]] = x
        return out

    def forward(self, u, v):
        ctx = torch.autocast(u.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            fu = self._run(u)
            with torch.no_grad():
                fv = self._run(v)
            return (u - v).abs().mean() + self.weight * sum((fu[k] - fv[k]).abs().mean() for k in self.layers)


class _L1Plus(nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, u, v):
        return (u - v).abs().mean() + self.loss(u, v)


def _fast(device):
    """The backend auto picks for float32 tensors on ``device`` (without warning)."""
    for name in _backend.AUTO_ORDER.get(torch.device(device).type, ()):
        if name != "reference" and _backend.why_not(name, torch.device(device), torch.float32) is None:
            return name
    return None


def _layers(args):
    """The perceptual layers of the vgg and pdl configurations (``--layers``)."""
    return tuple(getattr(args, "layers", None) or PERCEPTUAL_LAYERS)


def _pdl(backend, args, compute_dtype=None):
    return fastloss.PDLLoss(layers=_layers(args), weight=0.01, pixel_weight=1.0,
                            extractor_weights=args.vgg_weights, backend=backend, compute_dtype=compute_dtype)


def _perceptual_and_pdl(backend, args, compute_dtype=None, combined=False):
    """L1 + L1-perceptual + PDL on VGG16: fastloss's two modules added (two backbone passes), or
    ``fastloss.combine`` of them (one pass); the pixel term once."""
    torch.manual_seed(args.seed)
    perceptual = fastloss.PerceptualLoss(layers=_layers(args), weight=0.01, pixel_weight=1.0,
                                         extractor_weights=args.vgg_weights, compute_dtype=compute_dtype)
    pdl = fastloss.PDLLoss(layers=_layers(args), weight=0.01, pixel_weight=0.0, extractor_weights=args.vgg_weights,
                           backend=backend, compute_dtype=compute_dtype)
    pdl.extractor.load_state_dict(perceptual.vgg.state_dict())  # random weights (None): the same draw
    return fastloss.combine(perceptual, pdl) if combined else _Sum(perceptual, pdl)


class _Sum(nn.Module):
    def __init__(self, *losses):
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, u, v):
        return sum(loss(u, v) for loss in self.losses)


def _d2sm(backend, args):
    if not hasattr(fastloss, "D2SMLoss"):
        raise RuntimeError("fastloss.D2SMLoss is not available in this version")
    # the module's defaults (VGG19 conv5_4, a queue of 256): what a user gets; the loss itself is
    # a small part of such a step, whose cost is VGG19's forward and backward
    return _L1Plus(fastloss.D2SMLoss(extractor_weights=args.vgg_weights, backend=backend))


def _mdf(backend, args):
    if not hasattr(fastloss, "MDFLoss"):
        raise RuntimeError("fastloss.MDFLoss is not available in this version")
    return _L1Plus(fastloss.MDFLoss(backend=backend))


def _fdl(backend, args):
    # the published defaults (VGG19 relu1_2 ... relu5_4, 256 projections of 5 x 5, phase weight 1):
    # what a user of FDL runs; the trainer's pixel L1 is the row's own term
    return _L1Plus(fastloss.FDLLoss(extractor_weights=args.vgg_weights, backend=backend))


# Configurations left out of ``--configs all`` (the default), run when named: FDL's reference step
# takes seconds on a CPU (five VGG19 layers, 256 projections of both branches sorted by torch.sort),
# which would multiply the default run's time. Crops below 80 pixels leave relu5_4 smaller than a
# 5 x 5 patch: the rows are then skipped with FDLLoss's error.
OPT_IN = ("fdl-ref", "fdl-fast")

# name -> (label, loss family, backend kind, factory(backend, args))
CONFIGS = {
    "l1": ("L1 (pixel only)", "l1", None, lambda b, a: _L1Plus(lambda u, v: u.new_zeros(()))),
    "vgg": ("L1 + VGG16 L1-perceptual", "vgg", None,
            lambda b, a: VGGPerceptual(_layers(a), 0.01, a.vgg_weights)),
    "vgg-autocast": ("L1 + VGG16 L1-perceptual, autocast bf16 by hand", "vgg", None,
                     lambda b, a: VGGPerceptual(_layers(a), 0.01, a.vgg_weights, autocast=True)),
    "pdl-ref": ("L1 + PDL (reference)", "pdl", "reference", _pdl),
    "pdl-fast": ("L1 + PDL (fast)", "pdl", "fast", _pdl),
    "pdl-bf16": ("L1 + PDL (fast, bf16 backbone)", "pdl", "fast", lambda b, a: _pdl(b, a, torch.bfloat16)),
    "perc+pdl": ("L1 + perceptual + PDL, two modules", "combined", "fast", _perceptual_and_pdl),
    "combined": ("L1 + perceptual + PDL, combine()", "combined", "fast",
                 lambda b, a: _perceptual_and_pdl(b, a, combined=True)),
    "perc+pdl-bf16": ("L1 + perceptual + PDL, two modules, bf16", "combined", "fast",
                      lambda b, a: _perceptual_and_pdl(b, a, torch.bfloat16)),
    "combined-bf16": ("L1 + perceptual + PDL, combine(), bf16", "combined", "fast",
                      lambda b, a: _perceptual_and_pdl(b, a, torch.bfloat16, combined=True)),
    "d2sm-ref": ("L1 + D2SM (reference)", "d2sm", "reference", _d2sm),
    "d2sm-fast": ("L1 + D2SM (fast)", "d2sm", "fast", _d2sm),
    "mdf-ref": ("L1 + MDF (reference)", "mdf", "reference", _mdf),
    "mdf-fast": ("L1 + MDF (fast)", "mdf", "fast", _mdf),
    "fdl-ref": ("L1 + FDL (reference)", "fdl", "reference", _fdl),
    "fdl-fast": ("L1 + FDL (fast)", "fdl", "fast", _fdl),
}
