"""Frozen VGG feature extractors for perceptual losses, defined here (no torchvision needed).

``VGG(arch, layers)`` runs ``x`` through the convolutional part of VGG16 or VGG19 up to the
deepest requested layer and returns ``{layer_name: activation}`` in the order requested.
``features`` is an ``nn.Sequential`` with exactly torchvision's indices, so torchvision
state dicts (``features.0.weight``, ``features.0.bias``, ``features.2.weight``, ...) load as
they are.

Layer names, in network order (one Sequential index each):

- vgg16: ``conv1_1 relu1_1 conv1_2 relu1_2 pool1  conv2_1 relu2_1 conv2_2 relu2_2 pool2
  conv3_1 relu3_1 ... conv3_3 relu3_3 pool3  conv4_1 ... relu4_3 pool4  conv5_1 ... relu5_3 pool5``
- vgg19: the same with four convs in blocks 3, 4 and 5 (``conv3_4``, ``relu4_4``, ``conv5_4``...).

The models are frozen: parameters have ``requires_grad=False`` and the module stays in eval
mode whatever ``.train()`` is asked (VGG has no dropout or batch norm in ``features``, so this
only guards against surprises). Gradients still flow to the input.
"""
from __future__ import annotations

import os
import sys
import urllib.parse
from typing import Dict, Iterable, List, Mapping, NamedTuple, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import autocast_off

__all__ = ["VGG", "vgg16", "vgg19", "layer_names", "TORCHVISION_CHECKPOINTS", "TORCHVISION_URLS",
           "torchvision_weights", "COMPUTE_DTYPES"]

# What a frozen backbone may compute in: None (its own dtype, float32; bfloat16 under a bfloat16
# autocast region) or bfloat16. float16 is not offered: see ``VGG.run_dtype``.
COMPUTE_DTYPES = (None, torch.bfloat16)

# torchvision's `cfgs["D"]` (vgg16) and `cfgs["E"]` (vgg19): output channels per conv, "M" = max pool.
_CFGS: Dict[str, List[Union[int, str]]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

# Where ``weights="torchvision"`` comes from: torchvision's own ImageNet files, the URLs its
# ``VGG16_Weights.IMAGENET1K_V1`` / ``VGG19_Weights.IMAGENET1K_V1`` name. The file name carries the
# first hex digits of the file's SHA-256, which the download checks (as torch.hub does). Tests point
# an entry at a local server (monkeypatch this dict); ``FASTLOSS_WEIGHTS_URL`` (a folder URL, a
# mirror of https://download.pytorch.org/models/) replaces the folder and keeps the file name.
TORCHVISION_URLS: Dict[str, str] = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}
# File names torch.hub gives torchvision's ImageNet weights (the suffix is a hash prefix).
TORCHVISION_CHECKPOINTS: Dict[str, str] = {
    "vgg16": "vgg16-397923af.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
}
OFFLINE_ENV = "FASTLOSS_OFFLINE"
WEIGHTS_URL_ENV = "FASTLOSS_WEIGHTS_URL"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

WeightsArg = Union[None, str, "os.PathLike[str]"]


def _check_arch(arch: str) -> None:
    if arch not in _CFGS:
        raise ValueError(f"VGG: unknown arch {arch!r}; expected one of {sorted(_CFGS)}")


def _layout(arch: str) -> List[Tuple[str, str, int, int]]:
    """[(name, kind, in_channels, out_channels)] per Sequential index; kind is conv|relu|pool."""
    _check_arch(arch)
    out: List[Tuple[str, str, int, int]] = []
    block, conv, channels = 1, 0, 3
    for v in _CFGS[arch]:
        if v == "M":
            out.append((f"pool{block}", "pool", channels, channels))
            block, conv = block + 1, 0
        else:
            conv += 1
            out.append((f"conv{block}_{conv}", "conv", channels, int(v)))
            out.append((f"relu{block}_{conv}", "relu", int(v), int(v)))
            channels = int(v)
    return out


def layer_names(arch: str = "vgg16") -> Tuple[str, ...]:
    """All layer names of ``arch`` in network order; position i is ``features[i]``."""
    return tuple(name for name, _, _, _ in _layout(arch))


def _load_error_summary(e: Exception) -> str:
    """The informative lines of a torch.load error, without its boilerplate."""
    # torch's weights_only message opens by suggesting weights_only=False, which is exactly the
    # advice not to follow for a file that failed here; keep only the lines saying what was wrong.
    boilerplate = ("Weights only load failed", "Please", "Check the documentation")
    lines = [ln.split(" Please ")[0].strip() for ln in str(e).splitlines()]
    kept = [ln for ln in lines
            if ln and not ln.startswith(boilerplate) and "weights_only" not in ln]
    return " ".join(kept) if kept else "see the chained exception for details"


def _refuse_mdf_set(sd, path: str, who: str = "VGG", arg: str = "weights") -> None:
    if isinstance(sd, Mapping) and any(isinstance(k, str) and k.startswith("D0.") for k in sd):
        raise ValueError(
            f"{who}: {arg}={path!r} is an MDF discriminator set in fastloss's format (tensors D0., D1., ...), "
            "not VGG weights; pass it to fastloss.MDFLoss(weights=...) instead"
        )


def _load_state_dict_file(path: str, who: str = "VGG", arg: str = "weights") -> Mapping[str, object]:
    """Read a state dict from ``path`` without ever executing code stored in the file; errors
    name ``who`` (``VGG``, or the loss that built it) and its keyword ``arg``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{who}: weights file not found: {arg}={path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{who}: {arg}={path!r} is a directory, expected a state dict file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(
                f"{who}: {arg}={path!r} is a .safetensors file but the `safetensors` package is "
                "not installed; install it (pip install safetensors) or save the state dict with "
                "torch.save"
            ) from e
        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError on bad headers
            raise ValueError(
                f"{who}: could not read {arg}={path!r} as safetensors: {type(e).__name__}: {e}"
            ) from e
        _refuse_mdf_set(sd, path, who, arg)
        return sd
    try:
        # weights_only=True: a pickle that names anything but tensors/containers is refused.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "SinGAN" in str(e) or "WDiscriminator" in str(e):
            raise ValueError(
                f"{who}: {arg}={path!r} is an MDF discriminator set (the published SinGAN .pth of the MDF "
                "paper), not VGG weights; pass it to fastloss.MDFLoss(weights=...) instead, and give VGG a "
                "torchvision state dict or 'torchvision'"
            ) from e
        raise ValueError(
            f"{who}: could not read {arg}={path!r} as a state dict saved with torch.save "
            f"(read with weights_only=True, which refuses files that would run code): "
            f"{type(e).__name__}: {_load_error_summary(e)}"
        ) from e
    _refuse_mdf_set(sd, path, who, arg)
    if not isinstance(sd, Mapping):
        raise ValueError(
            f"{who}: {arg}={path!r} holds a {type(sd).__name__}, expected a state dict "
            "(a dict of tensor name -> tensor)"
        )
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{who}: {arg}={path!r} is not a dict of tensors: key {k!r} holds a "
            f"{type(sd[k]).__name__}" + (f" ({len(bad) - 1} more such keys)" if len(bad) > 1 else "")
        )
    return sd


def offline() -> bool:
    """Whether ``FASTLOSS_OFFLINE`` forbids downloads (set to anything but ``""``, ``0``, ``false``, ``no``)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def torchvision_weights(arch: str) -> Dict[str, object]:
    """Where ``weights="torchvision"`` (a loss's ``extractor_weights="torchvision"``) takes ``arch``'s
    ImageNet weights from: ``{"arch", "url", "file", "path", "hash_prefix", "present", "offline"}``.

    ``path`` is torchvision's own cache file, ``torch.hub.get_dir()/checkpoints/<file>`` (``TORCH_HOME``
    or ``torch.hub.set_dir`` move it), so a file torchvision downloaded is used as it is, and the
    reverse. ``url`` is ``TORCHVISION_URLS[arch]``, its folder replaced by ``$FASTLOSS_WEIGHTS_URL``
    when that is set (a mirror); ``hash_prefix`` the hex digits between the last ``-`` and the
    extension of the file name, which the download checks against the file's SHA-256 (``None`` when
    the name carries none). Nothing here touches the network."""
    _check_arch(arch)
    url = TORCHVISION_URLS[arch]
    fname = os.path.basename(urllib.parse.urlparse(url).path)
    base = os.environ.get(WEIGHTS_URL_ENV, "").strip()
    if base:
        url = base.rstrip("/") + "/" + fname
    match = torch.hub.HASH_REGEX.search(fname)  # torch.hub's own rule: "name-<hex>.ext"
    path = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    return {"arch": arch, "url": url, "file": fname, "path": path,
            "hash_prefix": match.group(1) if match and match.group(1) else None,
            "present": os.path.isfile(path), "offline": offline()}


def _torchvision_path(arch: str, who: str = "VGG", arg: str = "weights") -> str:
    """The local path of ``arch``'s torchvision ImageNet file, downloaded into the torch hub cache
    first when it is missing (``torch.hub.download_url_to_file``: a progress bar on stderr, the
    SHA-256 prefix of the file name checked, the file moved into place only when complete and
    correct). ``FASTLOSS_OFFLINE=1`` never downloads. Any failure is one ``FileNotFoundError``
    naming ``who`` and its keyword ``arg`` and both ways out."""
    src = torchvision_weights(arch)
    path, url, fname = src["path"], src["url"], src["file"]
    if src["present"]:
        return path

    def unavailable(why: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"{who}: {arg}='torchvision' needs torchvision's ImageNet {arch} weights, {fname}, which are not "
            f"in the torch hub cache ({os.path.dirname(path)}), and {why}. Either let fastloss download "
            f"them (unset {OFFLINE_ENV}, on a machine that reaches {url}) or put the file at {path} yourself "
            f"(TORCH_HOME moves the cache); or pass {arg}='/path/to/{fname}' (any torchvision-format state "
            f"dict), or {arg}=None (random weights, for speed tests only)"
        )

    if src["offline"]:
        raise unavailable(f"{OFFLINE_ENV}={os.environ.get(OFFLINE_ENV)} forbids downloading them")
    sys.stderr.write(f'{who}: downloading "{url}" to {path}\n')
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # writes <path>.<uuid>.partial, checks the hash, then moves it to path; the partial file is
        # removed whatever happens, so a failed or corrupted download leaves nothing in the cache
        torch.hub.download_url_to_file(url, path, hash_prefix=src["hash_prefix"], progress=True)
    except Exception as e:  # URLError (refused, unreachable), HTTPError (404), RuntimeError (hash), OSError
        what = str(e)
        if isinstance(e, RuntimeError) and "invalid hash value" in what:
            what = (f"the downloaded file's SHA-256 does not start with {src['hash_prefix']!r}, the prefix its "
                    f"name carries ({what}); it was not kept")
        else:
            what = f"{type(e).__name__}: {what}"
        raise unavailable(f"downloading them from {url} failed: {what}") from e
    return path


class VGG(nn.Module):
    """Frozen VGG16/VGG19 feature extractor returning ``{layer: activation}`` for ``layers``.

    Args:
        arch: ``"vgg16"`` or ``"vgg19"``.
        layers: layer names such as ``"relu2_2"`` or ``("relu1_2", "relu3_3")``; see
            :func:`layer_names` for the valid names of each arch. Only the layers up to the
            deepest requested one are built and run.
        weights: ``None`` for random init (torchvision's init scheme, deterministic given torch's
            RNG; for speed tests only), a path (str or PathLike) to a torchvision-format state dict
            saved with ``torch.save`` or as ``.safetensors``, or ``"torchvision"`` for torchvision's
            ImageNet weights (``vgg16-397923af.pth`` / ``vgg19-dcbb9e9d.pth``) in the torch hub cache
            (``torch.hub.get_dir()/checkpoints``), downloaded there on first use with torch's own
            download (progress bar, the SHA-256 prefix of the file name checked) unless
            ``FASTLOSS_OFFLINE=1``; see :func:`torchvision_weights` for where they come from
            (``TORCHVISION_URLS``, ``FASTLOSS_WEIGHTS_URL``). Paths and ``None`` never touch the
            network. Files are read with ``torch.load(weights_only=True)``. Keys other than
            ``features.*`` are ignored.
        normalize: subtract the ImageNet mean and divide by its std (inputs expected in [0, 1]).
        compute_dtype: ``None`` (float32, or bfloat16 inside a ``torch.autocast(dtype=torch.bfloat16)``
            region of the input's device type) or ``torch.bfloat16`` (always). The convolutions run
            in that dtype on weights cast once (and cached); the ImageNet normalization in float32.
            Features come back in the compute dtype: losses upcast them before their formula.
        channels_last: run the convolutions in NHWC (``True``), NCHW (``False``), or ``None``: where
            it measured not slower (see ``channels_last_default``).

    The module is frozen: parameters never require grad and it always stays in eval mode.
    """

    def __init__(
        self,
        arch: str = "vgg16",
        layers: Union[str, Iterable[str]] = ("relu4_3",),
        weights: WeightsArg = None,
        normalize: bool = True,
        compute_dtype: "torch.dtype | None" = None,
        channels_last: "bool | None" = None,
        *,
        _caller: Tuple[str, str] = ("VGG", "weights"),
    ) -> None:
        super().__init__()
        _check_arch(arch)

        self.compute_dtype = check_compute_dtype("VGG", compute_dtype)
        if channels_last not in (None, True, False):
            raise ValueError(f"VGG: channels_last must be None, True or False, got {channels_last!r}")
        self.channels_last = channels_last
        self._cast_cache: Dict[tuple, List[torch.Tensor]] = {}
        layout = _layout(arch)
        index = {name: i for i, (name, _, _, _) in enumerate(layout)}

        if isinstance(layers, str):
            layers = (layers,)
        elif not isinstance(layers, Iterable):
            raise TypeError(f"VGG: layers must be a layer name or an iterable of names, got {type(layers).__name__}")
        requested = tuple(dict.fromkeys(layers))  # drop repeats, keep order
        if not requested:
            raise ValueError("VGG: layers is empty; ask for at least one layer, e.g. ('relu4_3',)")
        unknown = [name for name in requested if name not in index]
        if unknown:
            raise ValueError(
                f"VGG: unknown layer(s) {unknown} for {arch}; valid names are: "
                + ", ".join(index)
            )

        self.arch = arch
        self.layers: Tuple[str, ...] = requested
        self.normalize = bool(normalize)
        self._out_index = {index[name]: name for name in requested}
        last = max(self._out_index)
        self._deepest = layout[last][0]

        modules: List[nn.Module] = []
        for _, kind, cin, cout in layout[: last + 1]:
            if kind == "conv":
                conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                modules.append(conv)
            elif kind == "relu":
                # not in place: a requested conv output must survive the ReLU after it
                modules.append(nn.ReLU(inplace=False))
            else:
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*modules)

        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

        if weights is not None:
            # _caller: (who, keyword) that the weight errors name; a loss building its extractor
            # passes ("PDLLoss", "extractor_weights"), the keyword its users wrote
            self._load_weights(weights, *_caller)

        self.requires_grad_(False)
        self.train(False)

    def _load_weights(self, weights: WeightsArg, who: str = "VGG", arg: str = "weights") -> None:
        if isinstance(weights, str) and weights == "torchvision":
            path = _torchvision_path(self.arch, who, arg)
        elif isinstance(weights, (str, os.PathLike)):
            path = os.fspath(weights)
        else:
            raise TypeError(
                f"{who}: {arg} must be None, 'torchvision' or a path (str or os.PathLike) to a "
                f"state dict file, got {type(weights).__name__}"
            )
        sd = _load_state_dict_file(path, who, arg)

        own = self.features.state_dict()  # "0.weight" ... up to the deepest requested layer
        problems = []
        picked = {}
        for key, param in own.items():
            full = f"features.{key}"
            if full not in sd:
                problems.append(f"missing key {full} (expected shape {tuple(param.shape)})")
                continue
            t = sd[full]
            if tuple(t.shape) != tuple(param.shape):
                problems.append(
                    f"key {full} has shape {tuple(t.shape)}, expected {tuple(param.shape)}"
                )
            elif not t.is_floating_point():
                problems.append(f"key {full} has dtype {t.dtype}, expected a floating dtype")
            else:
                picked[key] = t
        if problems:
            raise ValueError(
                f"{who}: {arg}={path!r} does not fit {self.arch} up to {self._deepest}: "
                + "; ".join(problems)
            )
        self.features.load_state_dict(picked, strict=True)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): the cast weights are stale
        self._cast_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "VGG":
        """Kept for the nn.Module API; the extractor is frozen and always stays in eval mode."""
        return super().train(False)

    def run_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the convolutions run in for input ``x``: ``compute_dtype`` if set; else
        bfloat16 inside a bfloat16 autocast region of x's device type; else the module's own
        (float32). A float16 autocast region runs the backbone in float32: VGG's activations and,
        under a GradScaler, its scaled gradients are not bounded by float16's range (65504), and
        the loss must never be the source of an Inf or NaN (README, "Fast steps")."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        own = self.features[0].weight.dtype
        dev = x.device.type
        if own != torch.float64 and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev) \
                and torch.get_autocast_dtype(dev) == torch.bfloat16:
            return torch.bfloat16
        return own

    def _weights(self, dtype: torch.dtype, channels_last: bool) -> List[torch.Tensor]:
        """[weight, bias] of every conv in ``dtype`` (and NHWC), cast once and kept until the
        parameters change (``.to()``, ``load_state_dict``)."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if torch.compiler.is_compiling():  # traced: the casts become part of the compiled graph
            return [t for c in convs for t in (c.weight.to(dtype).contiguous(memory_format=fmt), c.bias.to(dtype))]
        stamp = tuple((c.weight.data_ptr(), c.weight._version, c.bias._version) for c in convs)
        key = (dtype, channels_last, convs[0].weight.device)
        hit = self._cast_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        if dtype == convs[0].weight.dtype and not channels_last:
            cast = [t for c in convs for t in (c.weight, c.bias)]  # no copy
        else:
            cast = [t for c in convs for t in (c.weight.to(dtype).contiguous(memory_format=fmt), c.bias.to(dtype))]
        self._cast_cache[key] = (stamp, cast)
        return cast

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{layer: features(x) at that layer}`` in requested order; x is [N, 3, H, W] of any
        floating dtype. The ImageNet normalization runs in the module's dtype (float32), the
        convolutions in ``run_dtype(x)``; the features come back in that dtype (float16 images
        are computed in float32 and give float32 features)."""
        self._check_input(x)
        dtype = self.run_dtype(x)
        cl = channels_last_default(x.device, dtype) if self.channels_last is None else self.channels_last
        params = self._weights(dtype, cl)
        with autocast_off(x.device):
            x = x.to(self.features[0].weight.dtype)
            if self.normalize:
                x = (x - self.mean) / self.std
            x = x.to(dtype, memory_format=torch.channels_last if cl else torch.preserve_format)
            found: Dict[str, torch.Tensor] = {}
            k = 0
            for i, module in enumerate(self.features):
                if isinstance(module, nn.Conv2d):
                    x = F.conv2d(x, params[k], params[k + 1], padding=1)
                    k += 2
                elif isinstance(module, nn.ReLU):
                    x = F.relu(x)
                else:
                    x = F.max_pool2d(x, 2, 2)
                if i in self._out_index:
                    found[self._out_index[i]] = x
        return {name: found[name] for name in self.layers}

    def pair(self, u: torch.Tensor, v: torch.Tensor):
        """``(features of u, features of v)``: u's with autograd, v's without (a loss's prediction
        and its target), both in ``run_dtype(u)``."""
        fu = self(u)
        with torch.no_grad():
            fv = self(v)
        return fu, fv

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"VGG: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"VGG: x must be a floating-point tensor (an image in [0, 1]), got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG: expected input of shape (N, 3, H, W), got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"VGG: x is empty, shape {tuple(x.shape)}")
        # every pool halves (rounding down) and needs at least 2 x 2 in
        need = 2 ** sum(1 for m in self.features if isinstance(m, nn.MaxPool2d))
        if x.shape[2] < need or x.shape[3] < need:
            raise ValueError(f"VGG: x is {x.shape[2]} x {x.shape[3]}, smaller than the {need} x {need} that "
                             f"{self.arch} needs up to {self._deepest}")
        device = self.features[0].weight.device
        if x.device != device:
            raise ValueError(f"VGG: x is on {x.device} but the extractor is on {device}; move one of them")

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, layers={self.layers}, normalize={self.normalize}, "
                f"compute_dtype={self.compute_dtype}, channels_last={self.channels_last}")


class SharedPass(NamedTuple):
    """What a loss needs from a frozen extractor, for ``fastloss.combine()``: the module, its
    layers, the range its images are mapped from, and the compute dtype it runs in."""

    extractor: nn.Module
    layers: Tuple[str, ...]
    input_range: Tuple[int, int]
    compute_dtype: "torch.dtype | None"


def same_vgg(a: "VGG", b: "VGG") -> bool:
    """Whether two VGGs compute the same features where both have layers: same architecture,
    normalization, compute dtype, layout, and equal weights up to the shallower one's depth."""
    if (a.arch, a.normalize, a.compute_dtype, a.channels_last) != (b.arch, b.normalize, b.compute_dtype,
                                                                  b.channels_last):
        return False
    pa, pb = list(a.features.parameters()), list(b.features.parameters())
    return all(x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
               for x, y in zip(pa, pb))


def union_vgg(vggs: List["VGG"], layers: Iterable[str]) -> "VGG":
    """One VGG returning ``layers``, on the modules (the same weights, not a copy) of the deepest
    of ``vggs``, which ``same_vgg`` found equal."""
    deepest = max(vggs, key=lambda v: len(v.features))
    out = VGG(deepest.arch, layers=layers, normalize=deepest.normalize, compute_dtype=deepest.compute_dtype,
              channels_last=deepest.channels_last)
    out.features = deepest.features[:len(out.features)]  # shares the modules; drops its own random ones
    return out


def check_compute_dtype(owner: str, compute_dtype):
    """``compute_dtype`` if it is one of ``COMPUTE_DTYPES``, else a ValueError naming ``owner``."""
    if not any(compute_dtype is d for d in COMPUTE_DTYPES):
        raise ValueError(f"{owner}: compute_dtype must be None or torch.bfloat16, got {compute_dtype!r}")
    return compute_dtype


def channels_last_default(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the backbone runs NHWC by default: on the CPU always (oneDNN's NHWC convolutions
    measured faster in float32 and bfloat16, BENCHMARKS.md "backbone"); on CUDA in bfloat16 /
    float16, where cuDNN's tensor-core kernels are NHWC (not measured here: no GPU has run
    fastloss yet); float32 on CUDA stays NCHW."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def run_extractor(extractor: nn.Module, x: torch.Tensor, compute_dtype=None):
    """``extractor(x)``; a module other than ``VGG`` given a ``compute_dtype`` runs under
    ``torch.autocast`` in it (a ``VGG`` reads its own ``compute_dtype``)."""
    if compute_dtype is None or isinstance(extractor, VGG) or not torch.amp.is_autocast_available(x.device.type):
        return extractor(x)
    with torch.autocast(x.device.type, dtype=compute_dtype):
        return extractor(x)


def feature_pair(extractor: nn.Module, u: torch.Tensor, v: torch.Tensor, compute_dtype=None):
    """``(extractor(u), extractor(v))``, v's without autograd: ``VGG.pair`` for a VGG (its bfloat16
    path runs the target and the difference), two ``run_extractor`` calls for any other module."""
    if isinstance(extractor, VGG):
        return extractor.pair(u, v)
    fu = run_extractor(extractor, u, compute_dtype)
    with torch.no_grad():
        fv = run_extractor(extractor, v, compute_dtype)
    return fu, fv


def upcast(t: torch.Tensor) -> torch.Tensor:
    """A feature map as a loss formula takes it: bfloat16 / float16 upcast to float32 (the formulas
    always run in float32 or float64 on the features, whatever the backbone computed in)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def float32_features(feats: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``upcast`` of every feature map."""
    return {k: upcast(v) for k, v in feats.items()}




def extractor_module(loss: str, extractor, layers, weights, compute_dtype=None) -> nn.Module:
    """A loss's ``extractor`` argument as a module: any ``nn.Module`` as it is, or a frozen
    ``VGG("vgg16" | "vgg19", layers, weights, compute_dtype=compute_dtype)``."""
    check_compute_dtype(loss, compute_dtype)
    if isinstance(extractor, nn.Module):
        return extractor
    if isinstance(extractor, str) and extractor in ("vgg16", "vgg19"):
        return VGG(extractor, layers=layers, weights=weights, compute_dtype=compute_dtype,
                   _caller=(loss, "extractor_weights"))
    raise ValueError(f"{loss}: extractor must be 'vgg16', 'vgg19' or an nn.Module, got {extractor!r}")


def vgg16(
    layers: Union[str, Iterable[str]] = ("relu4_3",),
    weights: WeightsArg = None,
    normalize: bool = True,
) -> VGG:
    """Frozen VGG16 feature extractor; see :class:`VGG`."""
    return VGG("vgg16", layers=layers, weights=weights, normalize=normalize)


def vgg19(
    layers: Union[str, Iterable[str]] = ("relu4_3",),
    weights: WeightsArg = None,
    normalize: bool = True,
) -> VGG:
    """Frozen VGG19 feature extractor; see :class:`VGG`."""
    return VGG("vgg19", layers=layers, weights=weights, normalize=normalize)
