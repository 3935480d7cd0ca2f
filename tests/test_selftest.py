"""The CPU part of `python -m fastloss.selftest`, and proof that it can fail."""
import importlib
import io

import pytest

from fastloss import selftest

from conftest import requires_cpu_ext

pdl_module = importlib.import_module("fastloss.pdl")  # the module, not the function fastloss.pdl


@requires_cpu_ext
def test_selftest_cpu_quick_passes():
    buf = io.StringIO()
    assert selftest.run("cpu", quick=True, backends=["cpu"], reps=1, out=buf) == 0
    text = buf.getvalue()
    assert "PASS" in text and "FAIL" not in text and "all passed" in text


@requires_cpu_ext
def test_selftest_reports_a_wrong_backend(monkeypatch):
    real = pdl_module._forward_impl

    def wrong(backend, *args):
        w, *rest = real(backend, *args)
        return (w * 1.01, *rest)

    monkeypatch.setattr(pdl_module, "_forward_impl", wrong)
    buf = io.StringIO()
    assert selftest.run("cpu", quick=True, backends=["cpu"], reps=1, out=buf) > 0
    assert "FAIL" in buf.getvalue()
    assert selftest.main(["--device", "cpu", "--quick", "--backends", "cpu", "--reps", "1"]) == 1


def test_selftest_bad_option_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        selftest.main(["--dtype", "int8"])
    assert e.value.code != 0
