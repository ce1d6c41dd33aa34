"""Small zero-shot task folders in CLIP_benchmark's webdataset layout, from synthetic images.

Images come from `curation.synth.images.generate_image_shard` (no mismatches, no faults); only
those with a single color are kept, so that the color is the label:

- `write_color_task(DIR)`: classification; `classnames.txt` = the colors, one template per shape
  (`a photo of a {c} circle`, ...), `test/0.tar` with `<key>.jpg` + `<key>.cls`.
- `write_caption_task(DIR)`: retrieval; `dataset_type.txt` = `retrieval`, `<key>.jpg` +
  `<key>.txt` with the image's true caption, and a second, shorter one (`a <color> <shape>`)
  when the image shows one shape, so that some images have several captions.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

from curation.core import fsio
from curation.synth.images import COLORS, SHAPES, generate_image_shard

__all__ = ["write_color_task", "write_caption_task", "COLOR_TEMPLATES"]

#: one template per shape: the prompt ensemble averages a color over every shape
COLOR_TEMPLATES = tuple(f"a photo of a {{c}} {s}" for s in SHAPES)


def _single_color(seed: int, n: int, image_size: int) -> list[dict[str, Any]]:
    """At least `n` samples (key, jpg bytes, color, shapes, caption) with exactly one color."""
    out: list[dict[str, Any]] = []
    index = 0
    while len(out) < n:
        sh = generate_image_shard(
            seed, index, max(64, 2 * n), image_size=image_size, mismatch_rate=0.0
        )
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(sh.tar), mode="r") as tf:
            for m in tf:
                f = tf.extractfile(m)
                key, _, ext = m.name.partition(".")
                if f is not None:
                    members.setdefault(key, {})[ext] = f.read()
        for row in sh.table.to_pylist():
            colors = [c[6:] for c in row["concepts"] or [] if c.startswith("color:")]
            shapes = [c[6:] for c in row["concepts"] or [] if c.startswith("shape:")]
            img = members.get(row["key"], {}).get("jpg")
            if len(colors) == 1 and img and row["fault"] is None:
                out.append(
                    {
                        "key": f"s{len(out):06d}",
                        "jpg": img,
                        "color": colors[0],
                        "shapes": shapes,
                        "caption": row["true_caption"] or row["caption"],
                    }
                )
                if len(out) == n:
                    break
        index += 1
    return out


def _write_tar(url: str, members: list[tuple[str, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    fsio.atomic_write_bytes(url, buf.getvalue())


def _text(lines: list[str] | tuple[str, ...]) -> bytes:
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_color_task(
    out: str, *, n: int = 120, seed: int = 0, image_size: int = 64, shards: int = 1
) -> dict[str, Any]:
    """Write a color classification task of `n` images into `out`; returns its summary."""
    classnames = list(COLORS)
    samples = _single_color(seed, n, image_size)
    fsio.makedirs(fsio.join(out, "test"))
    fsio.atomic_write_bytes(fsio.join(out, "classnames.txt"), _text(classnames))
    fsio.atomic_write_bytes(
        fsio.join(out, "zeroshot_classification_templates.txt"), _text(COLOR_TEMPLATES)
    )
    per = -(-len(samples) // shards)
    for i in range(shards):
        part = samples[i * per : (i + 1) * per]
        members = []
        for s in part:
            members.append((f"{s['key']}.jpg", s["jpg"]))
            members.append((f"{s['key']}.cls", str(classnames.index(s["color"])).encode()))
        _write_tar(fsio.join(out, "test", f"{i}.tar"), members)
    labels = [classnames.index(s["color"]) for s in samples]
    return {"url": out, "images": len(samples), "classes": len(classnames), "labels": labels}


def write_caption_task(
    out: str, *, n: int = 60, seed: int = 1, image_size: int = 64
) -> dict[str, Any]:
    """Write a caption retrieval task of `n` images into `out`; returns its summary."""
    samples = _single_color(seed, n, image_size)
    fsio.makedirs(fsio.join(out, "test"))
    fsio.atomic_write_bytes(fsio.join(out, "dataset_type.txt"), _text(["retrieval"]))
    members = []
    texts = 0
    for s in samples:
        caps = [s["caption"]]
        if len(s["shapes"]) == 1:
            caps.append(f"a {s['color']} {s['shapes'][0]}")
        texts += len(caps)
        members.append((f"{s['key']}.jpg", s["jpg"]))
        members.append((f"{s['key']}.txt", _text(caps)))
    _write_tar(fsio.join(out, "test", "0.tar"), members)
    return {"url": out, "images": len(samples), "texts": texts}
