"""``fastloss-bench`` (also ``python -m fastloss.bench``): steps/sec of real training steps.

It trains a small DnCNN-style denoiser under each loss configuration in turn (pixel L1; L1 +
VGG16 L1-perceptual; L1 + each fastloss loss on its reference and on its fast backend) and
reports steps/sec relative to pixel-only and each fast backend's speed-up over its reference.

- ``model``: the generated image, its noisy crops, the denoiser and the loss configurations
- ``run``: the timed training steps, rounds, result rows and machine details
- ``report``: the table, the chart and the sections of BENCHMARKS.md
- ``demo``: ``--demo``, side-by-side PNGs of the denoiser trained with L1 and with L1 + PDL
- ``cli``: the command line (``main``), whose ``--help`` tells the rest
"""
from .cli import main, parse_args
from .demo import run_demo
from .model import CONFIGS, OPT_IN, PERCEPTUAL_LAYERS, DnCNN, VGGPerceptual, make_image, random_batch
from .report import (MARKDOWN_SECTIONS, NO_MATPLOTLIB, PDL_PAPER_TABLE_I, bar_chart, format_table, markdown_report,
                     pdl_paper_report, write_markdown_section)
from .run import add_ratios, machine_details, result_row, run_config, run_round, setup_config, train_steps

__all__ = ["main", "parse_args", "run_demo", "CONFIGS", "OPT_IN", "PERCEPTUAL_LAYERS", "DnCNN", "VGGPerceptual", "make_image",
           "random_batch", "MARKDOWN_SECTIONS", "NO_MATPLOTLIB", "PDL_PAPER_TABLE_I", "bar_chart", "format_table",
           "markdown_report", "pdl_paper_report", "write_markdown_section", "add_ratios", "machine_details",
           "result_row", "run_config", "run_round", "setup_config", "train_steps"]
