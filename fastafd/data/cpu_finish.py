"""The CPU pipeline's last steps in torch: resize, flip and normalize a batch of decoded crops.

Without a GPU, DALI decodes the random-resized-crop window (ROI decode) on its CPU threads and
hands over the crops as they are (uint8 HWC, one size each) with the flip decisions it drew;
:class:`CpuFinish` then resizes every crop with torch's antialiased bilinear uint8 kernel (the
vectorised port of Pillow's; the filter DALI's ``resize`` applies too, linear with antialiasing,
and the result equals DALI's ``resize`` + ``crop_mirror_normalize`` to one grey level), flips, and
writes ``(x / 255 - mean) / std`` straight into the batch in the model's layout and dtype. DALI's
CPU ``resize`` is not vectorised: ``benchmarks/data.py`` measures the whole pipeline both ways.
On CUDA none of this runs: decode, resize and normalize all stay in the DALI GPU pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class CpuFinish:
    """Crops (H, W, 3) uint8 + flip flags -> normalised (B, 3, size, size) batch."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *, channels_last: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        self.size, self.channels_last, self.dtype = size, channels_last, dtype
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)  # x * scale + shift == (x / 255 - mean) / std
        self._shift = -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t

    def __call__(self, crops: Sequence[torch.Tensor], flips: Sequence[bool]) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((len(crops), 3, self.size, self.size), dtype=self.dtype, memory_format=fmt)
        # One image is too small to split over threads, and the DALI threads keep the other cores
        # busy: intra-op threads would only contend with them for the cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, (crop, flip) in enumerate(zip(crops, flips, strict=True)):
                x = crop.permute(2, 0, 1).unsqueeze(0)  # a channels-last view: the kernel's fast path
                if x.shape[-2:] != (self.size, self.size):
                    x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                      align_corners=False)
                if flip:
                    x = x.flip(-1)
                torch.addcmul(self._shift, x, self._scale, out=out[i : i + 1])
        finally:
            torch.set_num_threads(threads)
        return out
