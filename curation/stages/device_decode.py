"""JPEG decode and resize/crop on the scorer's device (`curation score --decode device`).

The exact path (`--decode pil`, the default) decodes with Pillow and resizes with open_clip's own
PIL transform in CPU tasks (`curation.io.images.PixelTransform`). On a GPU that leaves the
model waiting for CPU decoders, so with `--decode device`:

- the CPU task reads the shard and only opens each image's **header** (`probe_images`: format,
  declared pixel count against `max_pixels`, the same quarantine reasons as the exact path) and
  ships the raw bytes of plain JPEGs (`device_decodable`: baseline or progressive, RGB or
  grayscale, ending with the EOI marker). Everything else (PNG, WebP, CMYK JPEGs, a JPEG
  without EOI, ...) is decoded on that CPU task by the exact path, as before;
- the scorer actor (`DevicePreprocess.finish`) decodes the JPEGs in batches with
  `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, libjpeg-turbo on CPU),
  resizes and crops them on the device with torchvision's tensor ops under open_clip's eval
  semantics (`shortest`: shortest side to `size` then center crop; `squash`; `longest`: longest
  side to `size` then center crop-or-pad with 0), bicubic (or bilinear) with antialiasing,
  rounded back to uint8. A JPEG the device cannot decode is redone on the exact CPU path in
  the actor, which decodes it or quarantines it with the exact path's reason.

The result is **not** bit-identical to the exact path (a different resampling implementation;
on CUDA also nvJPEG's IDCT and chroma upsampling): on the CPU, pixels differ by at most 2
levels (0.2% of values differ) and the tiny trained scorer's CLIP scores by 2e-5 on average,
7e-4 at most, leaving the top-30% selection unchanged (`bench/bench_score_decode.py` measures
it, on a GPU too). It is deterministic on a given device: the same chunk gives the same pixels.
Rows whose JPEG header is valid but whose entropy-coded data is damaged are quarantined with
the exact path's reason when libjpeg / nvJPEG reject them (such a record comes last in its
chunk's quarantine list instead of in row order); a decoder more lenient than Pillow (nvJPEG's
hardware path may be) can keep a row that the exact path drops.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from curation.core.accounting import drop_rows
from curation.io.images import ImageLimits, PixelTransform, decode_images

__all__ = ["DECODE_MODES", "RESIZE_MODES", "DevicePreprocess", "device_decodable"]

#: `--decode` choices: `pil` (exact, default) or `device` (this module).
DECODE_MODES = ("pil", "device")
#: open_clip eval resize modes reproduced on the device.
RESIZE_MODES = ("shortest", "squash", "longest")
#: Full-size pixels decoded at once on the device (before the resize shrinks them), ~400 MB.
DECODE_PIXELS = 1 << 27
#: Most images in one batched `decode_jpeg` call.
DECODE_IMAGES = 256


def device_decodable(data: bytes, kind: tuple[str, str]) -> bool:
    """Whether an image whose header Pillow read as `kind` = (format, mode) goes to the device.

    Only YCbCr/RGB and grayscale JPEGs that end with the end-of-image marker: CMYK (whose
    conversion to RGB Pillow does its own way) and truncated files take the exact CPU path.
    """
    return kind[0] == "JPEG" and kind[1] in ("RGB", "L") and data[-2:] == b"\xff\xd9"


class DevicePreprocess:
    """The scorer-side half of `--decode device`: JPEG bytes → uint8 `(n, 3, size, size)`.

    Built by the flow from the model's preprocessing (cheap, picklable); `finish(chunk, device)`
    runs on the scorer actor. `limits` bound the exact-path fallback the same way as the CPU
    tasks do.
    """

    def __init__(
        self, size: int, interpolation: str, resize_mode: str, limits: ImageLimits | None = None
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"--decode device: resize_mode {resize_mode!r} is not supported (one of "
                f"{RESIZE_MODES}); use --decode pil"
            )
        if interpolation not in ("bicubic", "bilinear", "random"):
            raise ValueError(
                f"--decode device: interpolation {interpolation!r} is not supported; use "
                "--decode pil"
            )
        self.size = int(size)
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.limits = limits or ImageLimits()

    def pixel_transform(self) -> PixelTransform:
        """The exact path's transform for the same preprocessing (the fallback)."""
        return PixelTransform(self.size, self.interpolation, self.resize_mode)

    # -- resize / crop ---------------------------------------------------------------------
    def resize_crop(self, images: Sequence[Any]) -> Any:
        """uint8 `(3, h, w)` tensors (one device) → uint8 `(n, 3, size, size)`, in order.

        Images of the same shape are resized together (one kernel per shape, not per image);
        each image's result does not depend on the others.
        """
        import torch

        s = self.size
        if not images:
            return torch.zeros((0, 3, s, s), dtype=torch.uint8)
        out = torch.empty((len(images), 3, s, s), dtype=torch.uint8, device=images[0].device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault((int(im.shape[-2]), int(im.shape[-1])), []).append(i)
        for (h, w), rows in groups.items():
            batch = torch.stack([images[i] for i in rows])
            out[torch.tensor(rows, device=out.device)] = self._resize_crop(batch, h, w)
        return out

    def _resize_crop(self, x: Any, h: int, w: int) -> Any:
        import torchvision.transforms.v2.functional as F
        from open_clip.transform import center_crop_or_pad
        from torchvision.transforms import InterpolationMode

        s = self.size
        mode = (
            InterpolationMode.BILINEAR
            if self.interpolation == "bilinear"
            else InterpolationMode.BICUBIC
        )
        if self.resize_mode == "squash":  # torchvision Resize((s, s))
            return F.resize(x, [s, s], interpolation=mode, antialias=True)
        if self.resize_mode == "shortest":  # Resize(s) (int: shortest side) + CenterCrop(s)
            x = F.resize(x, [s], interpolation=mode, antialias=True)
            return F.center_crop(x, [s, s])
        # longest: open_clip's ResizeKeepRatio(longest=1) + CenterCropOrPad(fill=0)
        ratio = max(h / s, w / s)
        x = F.resize(x, [round(h / ratio), round(w / ratio)], interpolation=mode, antialias=True)
        return center_crop_or_pad(x, [s, s], fill=0)

    # -- decode ----------------------------------------------------------------------------
    def decode(
        self, jpegs: Sequence[bytes], sizes: np.ndarray, device: str
    ) -> tuple[Any, np.ndarray, list[tuple[str, str]], Counter]:
        """Decode and resize JPEG bytes on `device`: `(pixels, ok, failures, counts)`.

        `pixels` uint8 `(n_ok, 3, size, size)` on `device`; `failures` the exact path's
        `(reason, detail)` of each row with `ok == False`, in row order. `sizes[n, 2]` are the
        headers' (width, height), used to bound the pixels decoded at once.
        """
        n = len(jpegs)
        blobs = _byte_tensors(jpegs)
        parts: list[Any] = []
        failed: list[int] = []
        for lo, hi in _batches(sizes, DECODE_PIXELS, DECODE_IMAGES):
            decoded = _decode_jpegs(blobs[lo:hi], device)
            if decoded is None:  # one bad image fails the batch: find it
                decoded = []
                for i in range(lo, hi):
                    one = _decode_jpegs(blobs[i : i + 1], device)
                    if one is None:
                        failed.append(i)
                    else:
                        decoded += one
            if decoded:
                parts.append(self.resize_crop(decoded))
        counts: Counter = Counter(images_decoded_device=n - len(failed))
        if not failed:
            return (
                _place(n, self.size, device, [(np.arange(n), parts)]),
                np.ones(n, bool),
                [],
                counts,
            )
        # The exact path decides: it decodes what Pillow can, else says why not.
        counts["images_device_fallback"] += len(failed)
        px, ok_cpu, failures, _ = decode_images(
            [jpegs[i] for i in failed], self.pixel_transform(), self.limits
        )
        ok = np.ones(n, dtype=bool)
        ok[failed] = ok_cpu
        rows = np.flatnonzero(ok)
        on_dev = np.isin(rows, failed, invert=True)
        pixels = _place(
            len(rows),
            self.size,
            device,
            [(np.flatnonzero(on_dev), parts), (np.flatnonzero(~on_dev), px)],
        )
        return pixels, ok, failures, counts

    def finish(self, chunk: dict[str, Any], device: str) -> dict[str, Any]:
        """A `--decode device` chunk (see `curation.stages.score.probe_chunks`) → the exact
        path's chunk layout with `pixels` a uint8 `(n, 3, size, size)` tensor on `device`."""
        meta: pa.Table = chunk["meta"]
        on_device = chunk["on_device"]
        dev_px, ok, failures, counts = self.decode(chunk["jpeg"], chunk["jpeg_sizes"], device)
        dev_rows = np.flatnonzero(on_device)
        keep = np.ones(meta.num_rows, dtype=bool)
        keep[dev_rows[~ok]] = False
        pixels = _place(
            int(keep.sum()),
            self.size,
            device,
            [
                (np.flatnonzero(on_device[keep]), [dev_px]),
                (np.flatnonzero(~on_device[keep]), chunk["pixels"]),
            ],
        )
        counts = Counter(chunk["counts"]) + counts
        quarantine = list(chunk["quarantine"])
        if failures:
            keys = meta.column("key").to_pylist()
            drop_rows(
                counts,
                quarantine,
                chunk.get("stage", "score"),
                chunk["shard"],
                chunk["input"],
                ((keys[row], f) for row, f in zip(dev_rows[~ok], failures, strict=True)),
            )
            meta = meta.filter(pa.array(keep))
        return {"meta": meta, "pixels": pixels, "counts": counts, "quarantine": quarantine}


def _place(n: int, size: int, device: str, parts: list[tuple[np.ndarray, Any]]) -> Any:
    """uint8 `(n, 3, size, size)` on `device` from `(rows, pixels)` pairs: `pixels` is a list of
    NCHW tensors (concatenated) or a numpy NHWC array, its k-th image goes to `rows[k]`."""
    import torch

    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    for rows, px in parts:
        if not len(rows):
            continue
        if isinstance(px, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(px)).permute(0, 3, 1, 2)
        else:
            x = torch.cat(px)
        if len(rows) != len(x):
            raise RuntimeError(f"{len(x)} images for {len(rows)} rows")
        if len(rows) == n:  # one part holds every row, in order: no copy
            return x.to(device)
        out[torch.from_numpy(rows).to(device)] = x.to(device)
    return out


def _batches(sizes: np.ndarray, max_pixels: int, max_images: int) -> list[tuple[int, int]]:
    """Consecutive `[lo, hi)` runs of images within `max_pixels` (at least one image each)."""
    out = []
    lo, total = 0, 0
    for i, px in enumerate((sizes[:, 0].astype(np.int64) * sizes[:, 1]).tolist()):
        if i > lo and (total + px > max_pixels or i - lo >= max_images):
            out.append((lo, i))
            lo, total = i, 0
        total += px
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


def _byte_tensors(jpegs: Sequence[bytes]) -> list[Any]:
    """Each JPEG as a 1-D uint8 CPU tensor: views of one copy of all of them."""
    import torch

    if not jpegs:
        return []
    ends = np.cumsum([len(b) for b in jpegs]).tolist()
    data = torch.from_numpy(np.frombuffer(b"".join(jpegs), dtype=np.uint8).copy())
    return [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _decode_jpegs(blobs: list[Any], device: str) -> list[Any] | None:
    """`decode_jpeg` of a list as RGB on `device`; None when it refuses any of them."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its image decoders
            out = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):
        return None
    return list(out)
