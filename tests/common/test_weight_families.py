"""A weight file of the wrong family gets a message naming what the file is: MDF sets given to the
VGG extractor, VGG state dicts given to MDFLoss."""
import os

import pytest
import torch

import fastloss
from fastloss.features import VGG
from fastloss.mdf import WeightFileError, shipped_path

from helpers import MDF_OFFICIAL

OFFICIAL = os.path.join(MDF_OFFICIAL, "Ds_Denoising.pth")


@pytest.mark.skipif(not os.path.isdir(MDF_OFFICIAL), reason=f"{MDF_OFFICIAL} (../shared beside the checkout) is absent")
def test_published_mdf_pth_given_to_vgg_is_named():
    assert os.path.isfile(OFFICIAL), f"{MDF_OFFICIAL} is there but {OFFICIAL} is not"
    with pytest.raises(ValueError, match=r"is an MDF discriminator set \(the published SinGAN .pth.*MDFLoss"):
        fastloss.PDLLoss(extractor_weights=OFFICIAL)


def test_shipped_mdf_set_given_to_vgg_is_named():
    with pytest.raises(ValueError, match=r"is an MDF discriminator set in fastloss's format.*MDFLoss"):
        VGG("vgg16", layers=("relu1_2",), weights=shipped_path("denoise"))


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_vgg_state_dict_given_to_mdf_is_named(tmp_path, ext):
    sd = {k: v.contiguous() for k, v in (("features." + k, v) for k, v in
                                         VGG("vgg16", layers=("relu1_2",)).features.state_dict().items())}
    path = str(tmp_path / f"vgg.{ext}")
    if ext == "pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, path)
    with pytest.raises(WeightFileError, match=r"a VGG state dict .*not an MDF.*extractor_weights="):
        fastloss.MDFLoss(weights=path)
    VGG("vgg16", layers=("relu1_2",), weights=path)  # and it is a good VGG file
