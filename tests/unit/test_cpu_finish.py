"""CpuFinish (the CPU pipeline's resize/flip/normalize in torch) against DALI's own operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastafd.data.cpu_finish import CpuFinish

dali = pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [(100, 80), (300, 250), (224, 224), (50, 60), (400, 130)]  # down, down, same, up, mixed
LEVEL = torch.tensor([1 / (255 * s) for s in STD]).view(1, 3, 1, 1)  # one grey level, normalised


def crops(seed: int = 0) -> list[np.ndarray]:
    """Smooth random images (natural-ish content) of the sizes above, uint8 HWC."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).copy())
    return out


def dali_reference(images: list[np.ndarray], flips: list[bool], size: int) -> torch.Tensor:
    """What the GPU pipeline computes (fn.resize + crop_mirror_normalize), run on the CPU."""

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, layout="HWC", batch=True)
        m = fn.external_source(source=lambda: [np.array(f, dtype=np.int32) for f in flips], batch=True)
        x = fn.resize(x, resize_x=size, resize_y=size)
        return fn.crop_mirror_normalize(x, mirror=m, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255 * a for a in MEAN], std=[255 * a for a in STD])

    p = pipe()
    p.build()
    return torch.from_numpy(np.asarray(p.run()[0].as_tensor()).copy())


def test_matches_dali_resize_flip_normalize_to_one_grey_level() -> None:
    images, flips = crops(), [True, False, True, False, True]
    ref = dali_reference(images, flips, 224)
    out = CpuFinish(224, MEAN, STD, channels_last=False)([torch.from_numpy(c) for c in images], flips)
    assert out.shape == ref.shape == (5, 3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()
    levels = (out - ref).abs() / LEVEL
    assert levels.max() <= 1.01  # rounding of DALI's uint8 resize output
    assert levels.mean() < 0.3
    wrong = CpuFinish(224, MEAN, STD, channels_last=False)([torch.from_numpy(c) for c in images], [not f for f in flips])
    assert ((wrong - ref).abs() / LEVEL).amax(dim=(1, 2, 3)).min() > 5  # the flips matter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channels_last_and_training_dtype(dtype) -> None:
    images = [torch.from_numpy(c) for c in crops(1)]
    ref = CpuFinish(64, MEAN, STD, channels_last=False)(images, [False] * 5)
    out = CpuFinish(64, MEAN, STD, channels_last=True, dtype=dtype)(images, [False] * 5)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.01)


def test_restores_the_intra_op_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        CpuFinish(16, MEAN, STD, channels_last=False)([torch.from_numpy(c) for c in crops(2)], [True] * 5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
