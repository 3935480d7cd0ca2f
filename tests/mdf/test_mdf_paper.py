"""MDFLoss(formula="paper"): the paper's Eq. 2 on every backend that runs here, against an
independent plain-PyTorch Eq. 2 on both published files (value within 1e-4, gradient in norm
within 1e-3, float64 and float32), and against the reference on random sets (float64 to 1e-10).

Eq. 2 (Mustafa et al., WACV 2022, section 3.2): per sample, the sum over the first K
discriminators and their four LeakyReLU outputs (head, body.block1, block2, block3) of
sum_{c,h,w} (phi(pred) - phi(target))^2; then the mean over the batch.
"""
import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import _backend
from fastloss.mdf import ops as L

from test_mdf_loss import _backends, _images, _norm_rel, _rel, _value_and_grad, published  # noqa: F401 (fixture)
from test_mdf_weights import needs_official, random_set

PAPER_VALUE_RTOL = 1e-4
PAPER_GRAD_NORM_RTOL = 1e-3
F64_RTOL = 1e-10


def eq2(x, y, ds, num_scales=8, ascending=True):
    """Eq. 2 written out with torch.nn.functional on the published state dicts: the four
    LeakyReLU outputs of each of the first ``num_scales`` discriminators, squared L2 distances
    summed over channels and pixels, per sample, then the batch mean."""

    def phi(d, h):
        outs = []
        for name in ("head", "body.block1", "body.block2", "body.block3"):
            h = F.conv2d(h, d[name + ".conv.weight"], d[name + ".conv.bias"])
            h = F.batch_norm(h, d[name + ".norm.running_mean"], d[name + ".norm.running_var"],
                             d[name + ".norm.weight"], d[name + ".norm.bias"], False, 0.1, 1e-5)
            h = F.leaky_relu(h, 0.2)
            outs.append(h)
        return outs  # no tail: it has no ReLU after it

    per_sample = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(num_scales):
        d = {k: v.to(x.dtype) for k, v in ds[i if ascending else len(ds) - 1 - i].items()}
        for fx, fy in zip(phi(d, x), phi(d, y)):
            per_sample = per_sample + ((fx - fy) ** 2).flatten(1).sum(1)
    return per_sample.mean()


def _paper_backends():
    return ["reference"] + _backends()


def _small_blocks(backend, monkeypatch):
    if backend == "triton":
        from fastloss.kernels import mdf as triton_mdf

        monkeypatch.setattr(triton_mdf, "TRITON_BLOCK", 4096)  # few interpreted programs


@needs_official
@pytest.mark.parametrize("name", ["Ds_JPEG.pth", "Ds_Denoising.pth"])
@pytest.mark.parametrize("backend", _paper_backends())
def test_paper_formula_is_eq2_on_the_published_files(published, name, backend, monkeypatch):  # noqa: F811
    _small_blocks(backend, monkeypatch)
    w = published[name]
    shape = (1, 3, 11, 12) if backend == "triton" else (2, 3, 24, 19)
    crit = fastloss.MDFLoss(w, backend=backend, formula="paper")
    for dtype in (torch.float64, torch.float32):
        x, y = _images(shape, dtype, 11)
        v, g, _ = _value_and_grad(crit, x, y, upstream=0.6)
        ev, eg, _ = _value_and_grad(lambda a, b: eq2(a, b, w.discriminators), x.double(), y.double(), upstream=0.6)
        assert v.dtype == dtype
        assert _rel(v, ev) <= PAPER_VALUE_RTOL, (backend, dtype, v, ev)
        assert _norm_rel(g, eg) <= PAPER_GRAD_NORM_RTOL, (backend, dtype)
        if dtype == torch.float64:  # the same function, not merely close
            assert _rel(v, ev) <= F64_RTOL and _rel(g, eg) <= F64_RTOL


@needs_official
def test_paper_and_published_formulas_differ(published):  # noqa: F811
    # the switch does something: Eq. 2 sums four feature maps, the published code averages three
    w = published["Ds_JPEG.pth"]
    x, y = _images((1, 3, 16, 16), torch.float64, 3)
    paper = fastloss.MDFLoss(w, backend="reference", formula="paper")(x, y)
    pub = fastloss.MDFLoss(w, backend="reference")(x, y)
    assert paper > 10 * pub
    assert fastloss.mdf.mdf_reference(x, y, w, formula="paper") == paper
    assert fastloss.MDFLoss(w, backend="reference", formula="paper")(x, x) == 0


CASES = [  # (shape, scales, ascending, target_grad)
    ((1, 3, 11, 11), 3, True, False),
    ((2, 3, 13, 17), 3, False, True),
    ((3, 3, 12, 19), 2, True, False),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_paper_backend_parity_with_reference(backend, case, monkeypatch):
    _small_blocks(backend, monkeypatch)
    shape, scales, ascending, target_grad = case
    w = random_set(widths=(4, 6, 4), seed=3)
    ref = fastloss.MDFLoss(w, scales=scales, ascending=ascending, backend="reference", formula="paper")
    for dtype in (torch.float64, torch.float32):
        x, y = _images(shape, dtype, 5)
        if dtype == torch.float32:
            x = x.contiguous(memory_format=torch.channels_last)
        for grouped in (False, True):
            crit = fastloss.MDFLoss(w, scales=scales, ascending=ascending, backend=backend, grouped=grouped,
                                    formula="paper")
            v, g, gt = _value_and_grad(crit, x, y, upstream=0.37, target_grad=target_grad)
            rv, rg, rgt = _value_and_grad(ref, x, y, upstream=0.37, target_grad=target_grad)
            assert v.dtype == rv.dtype == dtype
            if dtype == torch.float64:
                assert _rel(v, rv) <= F64_RTOL and _rel(g, rg) <= F64_RTOL
                assert not target_grad or _rel(gt, rgt) <= F64_RTOL
            else:
                assert _rel(v, rv) <= 1e-5 and _norm_rel(g, rg) <= 2e-3
                assert not target_grad or _norm_rel(gt, rgt) <= 2e-3


@pytest.mark.skipif(not _backend.status("cpu")[0], reason="the cpu extension is not built")
def test_paper_gradcheck_float64():
    w = random_set(widths=(3, 2), seed=1)
    crit = fastloss.MDFLoss(w, scales=2, backend="cpu", formula="paper")
    x, y = _images((1, 3, 11, 12), torch.float64, 2)
    x.requires_grad_()
    y.requires_grad_()
    # check_undefined_grad off: the saved tensors are outputs of the op whose gradients never exist
    assert torch.autograd.gradcheck(crit, (x, y), eps=1e-6, atol=1e-6, rtol=1e-5, check_undefined_grad=False,
                                    fast_mode=True)


@pytest.mark.skipif(not _backend.status("cpu")[0], reason="the cpu extension is not built")
def test_paper_mdf_forward_opcheck():
    w = random_set(widths=(3, 2), seed=1)
    crit = fastloss.MDFLoss(w, scales=2, backend="cpu")
    params, sizes = crit.params(torch.device("cpu"), torch.float32, False)
    x, y = _images((2, 3, 12, 13), torch.float32, 4)
    torch.library.opcheck(L.mdf_forward, (x.requires_grad_(), y, params, sizes, 0.2, True, False, "cpu", True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_formula():
    with pytest.raises(ValueError, match="MDFLoss: formula must be 'published' or 'paper', got 'eq2'"):
        fastloss.MDFLoss(random_set(), scales=2, formula="eq2")
    x = torch.rand(1, 3, 12, 12)
    with pytest.raises(ValueError, match="mdf_reference: formula must be"):
        fastloss.mdf.mdf_reference(x, x, random_set(), scales=2, formula=None)


# ---------------------------------------------------------------------------- issue 12: the Triton slope
@pytest.mark.skipif(not _backend.status("triton")[0], reason="triton cannot run here")
@pytest.mark.parametrize("dtype,acc", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                       (torch.bfloat16, torch.float32)])
def test_triton_slope_travels_as_an_acc_dtype_tensor(dtype, acc, monkeypatch):
    # A Python float argument is an fp32 scalar to Triton on a GPU (0.2 -> 0.20000000298), which puts
    # float64 MDF ~1e-8 off; the interpreter computes in float64 whatever it is given, so the check
    # here is on what the kernel receives, plus the float64 value with a slope fp32 cannot hold.
    from fastloss.kernels import mdf as triton_mdf

    real = triton_mdf._bias_lrelu_kernel
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(args)
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(triton_mdf, "_bias_lrelu_kernel", Spy())
    slope = 0.1 + 2.0 ** -40  # not representable in float32
    y = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    ref = F.leaky_relu(y + b.view(1, -1, 1, 1), slope)
    out = triton_mdf.bias_leaky_relu_(y.to(dtype), b.to(dtype), slope)
    (args,) = seen
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    assert not any(isinstance(a, float) for a in args), "the slope must not reach Triton as a Python float"
    slope_arg = [t for t in tensors if t.numel() == 1]
    assert len(slope_arg) == 1 and slope_arg[0].dtype == acc and slope_arg[0].item() == float(torch.tensor(slope, dtype=acc))
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
