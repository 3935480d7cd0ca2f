"""``python -m fastloss.info``: what was built, what can run here, and why. Paste it into bug reports."""
import os
import platform
import shutil
import subprocess
import sys

import torch

import fastloss
from fastloss import _backend, _ext


def _tool_version(cmd):
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return f"error: {e}"
    return out[-1] if cmd[0] == "nvcc" and out else (out[0] if out else "unknown")


def report():
    """The report as a list of lines."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    ext, _ = _ext.load("_C")
    lines = [
        f"fastloss {fastloss.__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"platform {platform.platform()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()})",
        f"torch threads {torch.get_num_threads()}",
        f"triton {triton_version}",
        f"C++ extension compiler {ext.compiler if ext else 'n/a (not built)'}",
        f"host c++ {_tool_version(['c++', '--version'])}",
        f"nvcc {_tool_version(['nvcc', '--version'])}",
        "",
        "backends:",
    ]
    for name, info in _backend.backends().items():
        lines.append(f"  {name:<10} {'yes' if info['available'] else 'no ':<4} {info['reason']}")
    lines.append("auto order: " + "; ".join(f"{dev}: {' -> '.join(order)}" for dev, order in _backend.AUTO_ORDER.items()))
    lines += ["", *weights_report()]
    return lines


def weights_report():
    """Where each extractor's weights come from: the VGGs' ``extractor_weights="torchvision"`` file
    (cache path, there or not, downloaded on first use or not), and MDF's shipped sets."""
    from fastloss import features, mdf

    off = features.offline()
    lines = ["extractor weights (extractor_weights='torchvision': torchvision's ImageNet files in the torch hub cache, "
             + (f"{features.OFFLINE_ENV} is set: never downloaded)" if off else
                f"downloaded on first use; {features.OFFLINE_ENV}=1 forbids it)")]
    for arch in sorted(features.TORCHVISION_URLS):
        src = features.torchvision_weights(arch)
        state = ("present" if src["present"] else
                 "missing, offline: building the loss will raise" if off else "missing: downloaded on first use")
        lines.append(f"  {arch:<10} {src['path']} ({state}) <- {src['url']}")
    lines.append(f"  {'mdf':<10} shipped sets {', '.join(mdf.SHIPPED)} in {os.path.dirname(mdf.shipped_path(mdf.SHIPPED[0]))} "
                 "(in the package; nothing is downloaded)")
    return lines


def main():
    print("\n".join(report()))


if __name__ == "__main__":
    main()
