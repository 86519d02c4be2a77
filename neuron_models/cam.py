"""Grad-CAM maps from the forward pass.

For a global-average-pool + linear head, Grad-CAM on the rectified final feature map A equals CAM from the classifier
weights: the gradient of logit k with respect to A_c is W[k, c] / (h*w) everywhere, so the Grad-CAM weights are the
classifier weights up to one positive scale, which the min-max normalisation removes (Zhou et al. 2016, "Learning
Deep Features for Discriminative Localization"; Selvaraju et al. 2017, Grad-CAM, section 3.1). Every label's map
therefore comes out of the forward pass, with no backward pass and no hooks, and the same tensors on CPU and GPU.
The tests check this against the ``grad-cam`` package on a layer whose output nothing modifies in place: that package
keeps activations with ``.cpu()``, which aliases an in-place ReLU's tensor on the CPU and copies it on CUDA, so at
torchxrayvision's ``features[-1]`` (followed by ``relu(inplace=True)``) its maps depend on the device.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """features (B, C, h, w) rectified; weight (K, C); classes (B, k) label indices -> (B, k, h, w), ReLU'd."""
    w = weight[classes]  # (B, k, C)
    return F.relu(torch.einsum("bkc,bchw->bkhw", w, features))


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1], the same formula as pytorch-grad-cam's ``scale_cam_image``."""
    flat = maps.flatten(-2)
    lo = flat.min(dim=-1, keepdim=True).values
    flat = flat - lo
    flat = flat / (1e-7 + flat.max(dim=-1, keepdim=True).values)
    return flat.view_as(maps)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear with half-pixel centres (what cv2.resize does), (B, k, h, w) -> (B, k, size, size)."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET-coloured map over the preprocessed image. image: (C, H, W) in [0, 1]; cam: (H, W) in [0, 1].
    Returns BGR uint8 for cv2.imwrite."""
    base = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)[..., ::-1]
    base = np.clip(base * 255.0, 0, 255).astype(np.uint8)
    if base.ndim == 2:
        base = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap(np.clip(cam * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(heat, alpha, base, 1.0 - alpha, 0.0)


def jet_table(device: torch.device) -> torch.Tensor:
    """OpenCV's JET colour map as a (256, 3) BGR uint8 table on the device."""
    table = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), cv2.COLORMAP_JET)
    return torch.from_numpy(table.reshape(256, 3)).to(device)


def overlay_batch(images: torch.Tensor, maps: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``overlay`` for a whole batch on the device, bit for bit: images (N, C, S, S) in [0, 1], maps (N, k, S, S) in
    [0, 1] -> (N, k, S, S, 3) BGR uint8, ready for the PNG writer. cv2.addWeighted(heat, 0.5, base, 0.5, 0) rounds
    half to even, as torch.round does; both truncate the [0, 1] -> [0, 255] scaling the same way."""
    base = (images * 255.0).clamp(0, 255).to(torch.uint8)
    base = base.expand(-1, 3, -1, -1) if base.shape[1] == 1 else base.flip(1)  # RGB -> BGR
    base = base.permute(0, 2, 3, 1).unsqueeze(1).to(torch.float32)  # (N, 1, S, S, 3)
    heat = table[(maps * 255.0).clamp(0, 255).to(torch.uint8).long()].to(torch.float32)  # (N, k, S, S, 3)
    return torch.round(heat * 0.5 + base * 0.5).to(torch.uint8)
