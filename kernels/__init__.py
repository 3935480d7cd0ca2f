"""Triton kernels of fastloss, installed as ``fastloss.kernels``."""
