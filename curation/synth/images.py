"""Synthetic webdataset image-text pools with a known ground truth.

`write_synthetic_image_pool` writes `images-NNNNN.tar` shards (webdataset layout: members
`KEY.jpg`, `KEY.json`, `KEY.txt` per sample, KEY = uid) with an `images-NNNNN.parquet` beside
each (one row per sample, img2dataset-style columns plus the truth), and `synth_truth.json`.

Every image is drawn from a scene of a small fixed vocabulary of drawable concepts: one to three
groups of one to three shapes (`SHAPES`) of one color each (`COLORS`, distinct within a scene),
each plain or textured (`TEXTURES`: stripes, dots or checks where the background shows through),
on a background of another color, sometimes with a word (`WORDS`) rendered in Pillow's bitmap
font in a band at the top or bottom. Images are `image_size` pixels square, a quarter of them
with another aspect ratio (320x200, 200x320, 384x216, 256x171 at 256). The caption says what was drawn ("a photo of a red
striped circle and two blue stars on a white background"), except for mismatched samples
(`mismatch_rate` of the decodable ones, exactly `round(rate * n)` per shard): they carry the
caption of another sample that mentions at least one concept the image lacks. `concepts` lists
what was drawn as `kind:value` strings (`color:red`, `shape:circle`, `texture:striped`,
`count:2`, `word:cat`, `background:white`; `count` only for groups of two or more) and
`true_caption` is the caption that describes the image. The tar's `.json` also gives the
layout: `objects` (color, shape, texture, count and one `[x0, y0, x1, y1]` box per copy) and
`word` (text and box).

With `fault_rate` > 0, exactly `round(rate * n)` samples per shard get broken image bytes, so
that a reader's quarantine can be checked: `truncated` (an encoded image cut at 20-70% of its
length), `not_an_image` (an HTML or JSON error body, an empty file or binary junk under the image
name) and, rarely, `bomb` (a ~110 KB 1-bit PNG declaring 30000 x 30000 pixels, all zeros, which
Pillow refuses with `DecompressionBombError`). Faulty samples are never mismatched; their
`width`/`height` are null. Faults are in the parquet `fault` column and in `synth_truth.json`,
not in the tar's `.json`.

Reproducible: shard `i` depends only on `(seed, i)` (NumPy `PCG64` seeded with
`SeedSequence(seed, spawn_key=(i,))`); tar headers carry mtime 0, uid/gid 0, no owner names and
mode 0o444; JPEG and PNG are encoded with fixed settings. Byte identity across machines needs the
same Pillow (libjpeg / zlib) and pyarrow builds. URLs use the reserved `img.example.com` host.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tarfile
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs

from curation.core import fsio
from curation.core.text import uid_of_url

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "COLORS",
    "FAULT_KINDS",
    "IMAGE_FORMATS",
    "SHAPES",
    "TEXTURES",
    "WORDS",
    "ImagePoolSummary",
    "SynthImageShard",
    "ImageShardTruth",
    "generate_image_shard",
    "image_shard_name",
    "write_synthetic_image_pool",
]

SYNTH_IMAGES_VERSION = 1
TRUTH_FILE = "synth_truth.json"
IMAGE_FORMATS = ("jpg", "png")
FAULT_KINDS = ("truncated", "not_an_image", "bomb")
_FAULT_P = (0.45, 0.45, 0.10)
JPEG_QUALITY = 90
PNG_COMPRESS_LEVEL = 3  # level 6 halves PNG throughput for ~15% smaller files
BOMB_SIDE = 30_000

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 210),
    "yellow": (245, 210, 40),
    "orange": (245, 135, 25),
    "purple": (125, 50, 170),
    "pink": (240, 130, 185),
    "brown": (125, 80, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 215),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
TEXTURES = ("plain", "striped", "dotted", "checkered")
WORDS = ("cat", "dog", "sale", "hello", "stop", "open", "love", "home", "sun", "tree", "car",
         "book", "coffee", "music", "fish", "moon")  # fmt: skip

_COLOR_NAMES = tuple(COLORS)
_COLOR_RGB = tuple(COLORS.values())
_TEXTURE_P = (0.55, 0.15, 0.15, 0.15)
_COUNT_P = (0.7, 0.2, 0.1)  # 1, 2, 3 copies of a group
_GROUPS_P = (0.5, 0.35, 0.15)  # 1, 2, 3 groups per scene
_WORD_RATE = 0.3
_BG_MENTION_RATE = 0.5
_CAPITALIZE_RATE = 0.3
_ODD_ASPECT_RATE = 0.25
# (width, height) as fractions of image_size: 320x200, 200x320, 384x216, 256x171 at 256.
_ODD_ASPECTS = ((1.25, 0.78125), (0.78125, 1.25), (1.5, 0.84375), (1.0, 2.0 / 3.0))
_MAX_GROUPS = 3
_MAX_SLOTS = 16  # cells of the layout grid (at most 9 shapes)

_COUNT_WORDS = ("", "a", "two", "three")
_PREFIXES = ("", "", "", "a photo of ", "an image of ", "clip art of ", "a drawing of ",
             "illustration: ", "stock photo: ", "a picture showing ", "icon: ")  # fmt: skip
_JOINERS = (" and ", " next to ", " with ", " beside ")
_WORD_PHRASES = (' with the word "{}"', ' and the text "{}"', ' labeled "{}"', ', text: "{}"')
_SUFFIXES = ("", "", "", ", high quality", " - free download", " | synthetic art", " (vector)",
             ", hd wallpaper")  # fmt: skip
_NOT_AN_IMAGE = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body>"
    b"</html>\n",
    b'{"error": "rate limited", "retry_after": 30}\n',
    b"",
    b"BINARY\x00\x01\x02\x03junk payload, not an image\xff\xfe\x00\x00" * 8,
)


@dataclass
class ImageShardTruth:
    """Ground truth of one generated image shard."""

    samples: int
    mismatched: int
    faults: dict[str, int]


@dataclass
class SynthImageShard:
    """One generated shard: the tar bytes, its per-sample table and its truth."""

    tar: bytes
    table: pa.Table
    truth: ImageShardTruth


@dataclass
class ImagePoolSummary:
    """What `write_synthetic_image_pool` wrote, with the ground truth per tar."""

    files: list[str]
    parquet_files: list[str]
    samples_per_file: dict[str, int]
    mismatched_per_file: dict[str, int]
    faults_per_file: dict[str, dict[str, int]]
    seconds: float

    @property
    def total_samples(self) -> int:
        return sum(self.samples_per_file.values())

    @property
    def total_mismatched(self) -> int:
        return sum(self.mismatched_per_file.values())

    @property
    def total_faults(self) -> int:
        return sum(sum(f.values()) for f in self.faults_per_file.values())


SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("mismatched", pa.bool_()),
        ("concepts", pa.list_(pa.string())),
        ("true_caption", pa.string()),
        ("fault", pa.string()),
    ]
)


def image_shard_name(index: int) -> str:
    """File name (without extension) of image shard `index`: `images-00000`."""
    return f"images-{index:05d}"


# --------------------------------------------------------------------------------------------
# Pillow (optional dependency) and cached drawing assets
# --------------------------------------------------------------------------------------------


def _pil() -> Any:
    try:
        from PIL import Image, ImageChops, ImageDraw, ImageFont
    except ImportError as e:  # pragma: no cover - Pillow is in the `images` extra
        raise ImportError(
            "synthetic image pools need Pillow: pip install 'curation[images]'"
        ) from e
    return Image, ImageChops, ImageDraw, ImageFont


@lru_cache(maxsize=128)
def _pattern(texture: int, variant: int, period: int, side: int) -> PILImage.Image:
    """An `L` mask (255 = second tone) of a texture over a `side` x `side` canvas."""
    Image = _pil()[0]
    h = side
    yy, xx = np.mgrid[0:side, 0:side]
    half = max(period // 2, 1)
    name = TEXTURES[texture]
    if name == "striped":
        t = (yy, xx, xx + yy, xx - yy + h)[variant % 4]
        on = (t // half) % 2 == 1
    elif name == "dotted":
        ox = (yy // period) % 2 * half if variant % 2 else 0
        dx = (xx + ox) % period - half
        dy = yy % period - half
        on = dx * dx + dy * dy <= (period * 0.3) ** 2
    else:  # checkered
        on = (xx // half + yy // half) % 2 == 1
    return Image.fromarray((on * 255).astype(np.uint8))


@lru_cache(maxsize=256)
def _word_mask(word: str, scale: int) -> PILImage.Image:
    """`word` in Pillow's bitmap font as an `L` mask, scaled up `scale` times (nearest)."""
    Image, _, ImageDraw, ImageFont = _pil()
    font = (
        ImageFont.load_default_imagefont()
        if hasattr(ImageFont, "load_default_imagefont")
        else ImageFont.load_default()
    )
    _, _, tw, th = font.getbbox(word)
    im = Image.new("L", (max(tw, 1), max(th, 1)), 0)
    ImageDraw.Draw(im).text((0, 0), word, fill=255, font=font)
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)


@lru_cache(maxsize=1)
def _bomb_png() -> bytes:
    """A valid 1-bit grayscale PNG of BOMB_SIDE x BOMB_SIDE zeros (~110 KB, 900 Mpixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)
    row = bytes(1 + (BOMB_SIDE + 7) // 8)  # filter byte 0 + packed zero bits
    comp = zlib.compressobj(9)
    rows_per_chunk = 1000
    parts = [comp.compress(row * rows_per_chunk) for _ in range(BOMB_SIDE // rows_per_chunk)]
    parts.append(comp.compress(row * (BOMB_SIDE % rows_per_chunk)))
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def _regular(n: int, cx: float, cy: float, r: float, angle: float, inner: float = 1.0) -> list:
    """Vertices of a regular polygon (or a star when `inner` < 1) around (cx, cy)."""
    pts = []
    k = n * (2 if inner < 1.0 else 1)
    for j in range(k):
        a = angle + 2.0 * math.pi * j / k
        rr = r * (inner if j % 2 else 1.0) if inner < 1.0 else r
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


# Plus sign inside the unit circle (corner radius ~0.99).
_CROSS = ((-.94, -.31), (-.31, -.31), (-.31, -.94), (.31, -.94), (.31, -.31), (.94, -.31),
          (.94, .31), (.31, .31), (.31, .94), (-.31, .94), (-.31, .31), (-.94, .31))  # fmt: skip


def _draw_shape(draw: Any, shape: int, x0: int, y0: int, s: int, angle: float, fill: Any) -> None:
    """Draw shape `shape` filling the square box (x0, y0, s) with `fill`."""
    name = SHAPES[shape]
    x1, y1 = x0 + s - 1, y0 + s - 1
    r = (s - 1) / 2.0
    cx, cy = x0 + r, y0 + r
    if name == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif name == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(2, s // 5))
    elif name == "square":
        draw.polygon(_regular(4, cx, cy, r, angle), fill=fill)
    elif name == "triangle":
        draw.polygon(_regular(3, cx, cy, r, -math.pi / 2 + (angle - math.pi) * 0.1), fill=fill)
    elif name == "star":
        draw.polygon(_regular(5, cx, cy, r, -math.pi / 2 + angle, 0.45), fill=fill)
    elif name == "hexagon":
        draw.polygon(_regular(6, cx, cy, r, angle), fill=fill)
    elif name == "diamond":
        c, sn = math.cos(angle * 0.3), math.sin(angle * 0.3)
        pts = ((0, -1), (0.65, 0), (0, 1), (-0.65, 0))
        draw.polygon(
            [(cx + r * (x * c - y * sn), cy + r * (x * sn + y * c)) for x, y in pts], fill=fill
        )
    else:  # cross
        c, sn = math.cos(angle), math.sin(angle)
        draw.polygon(
            [(cx + r * (x * c - y * sn), cy + r * (x * sn + y * c)) for x, y in _CROSS], fill=fill
        )


# --------------------------------------------------------------------------------------------
# Scenes: concepts, captions, drawing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scene:
    groups: tuple[tuple[int, int, int, int], ...]  # (color, shape, texture, count)
    background: int
    word: int  # -1: none
    mention_bg: bool
    prefix: int
    joiners: tuple[int, int]
    word_phrase: int
    suffix: int
    capitalize: bool


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _caption(sc: _Scene) -> str:
    phrases = []
    for color, shape, texture, count in sc.groups:
        words = [_COLOR_NAMES[color]]
        if texture:
            words.append(TEXTURES[texture])
        words.append(
            SHAPES[shape] + (("es" if SHAPES[shape].endswith("s") else "s") if count > 1 else "")
        )
        lead = _article(words[0]) if count == 1 else _COUNT_WORDS[count]
        phrases.append(lead + " " + " ".join(words))
    if len(phrases) == 1:
        objects = phrases[0]
    elif len(phrases) == 2:
        objects = phrases[0] + _JOINERS[sc.joiners[0]] + phrases[1]
    else:
        objects = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    text = _PREFIXES[sc.prefix] + objects
    if sc.word >= 0:
        text += _WORD_PHRASES[sc.word_phrase].format(WORDS[sc.word])
    if sc.mention_bg:
        bg = _COLOR_NAMES[sc.background]
        text += f" on {_article(bg)} {bg} background"
    text += _SUFFIXES[sc.suffix]
    return text[:1].upper() + text[1:] if sc.capitalize else text


def _concepts(sc: _Scene) -> list[str]:
    """Drawn concepts as `kind:value`, first occurrence order."""
    out: list[str] = []
    for color, shape, texture, count in sc.groups:
        out += [f"color:{_COLOR_NAMES[color]}", f"texture:{TEXTURES[texture]}",
                f"shape:{SHAPES[shape]}"]  # fmt: skip
        if count > 1:
            out.append(f"count:{count}")
    if sc.word >= 0:
        out.append(f"word:{WORDS[sc.word]}")
    out.append(f"background:{_COLOR_NAMES[sc.background]}")
    return list(dict.fromkeys(out))


def _mentioned(sc: _Scene) -> frozenset[str]:
    """Concepts a caption of this scene states (plain texture and an unmentioned bg are not)."""
    return frozenset(
        c
        for c in _concepts(sc)
        if c != "texture:plain" and (sc.mention_bg or not c.startswith("background:"))
    )


def _shifted(sc: _Scene) -> _Scene:
    """The scene with every group's color moved to the next color: a caption that must be false."""
    groups = tuple(((c + 1) % len(COLORS), s, t, n) for c, s, t, n in sc.groups)
    return _Scene(groups, sc.background, sc.word, False, sc.prefix, sc.joiners, sc.word_phrase,
                  sc.suffix, sc.capitalize)  # fmt: skip


def _render(
    sc: _Scene, w: int, h: int, u: np.ndarray, pat: np.ndarray, side: int
) -> tuple[Any, dict]:
    """Draw scene `sc` on a `w` x `h` canvas; `u` (slots x 5 uniforms) places the shapes.

    Texture masks are crops of canvases `side` pixels square, shared by all images.
    Returns the image and the layout (per group boxes, word box) for the sample's JSON.
    """
    Image, ImageChops, ImageDraw, _ = _pil()
    bg = _COLOR_RGB[sc.background]
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    top, bottom = 0, h
    word_box = None
    if sc.word >= 0:  # a band across the top or bottom fifth
        band = max(h // 5, 12)
        word = WORDS[sc.word]
        base = _word_mask(word, 1)
        scale = max(1, min(int(0.9 * w / base.width), int(0.8 * band / base.height)))
        mask = _word_mask(word, scale)
        lum = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
        ink = (15, 15, 15) if lum > 140 else (250, 250, 250)
        at_top = u[-1, 0] < 0.5
        by = (top if at_top else h - band) + (band - mask.height) // 2
        bx = int((w - mask.width) * (0.1 + 0.8 * u[-1, 1]))
        img.paste(ink, (bx, by, bx + mask.width, by + mask.height), mask)
        word_box = [bx, by, bx + mask.width, by + mask.height]
        if at_top:
            top = band
        else:
            bottom = h - band
    n_shapes = sum(g[3] for g in sc.groups)
    ah = bottom - top
    cols = max(1, math.ceil(math.sqrt(n_shapes * w / max(ah, 1))))
    rows = math.ceil(n_shapes / cols)
    cw, ch = w // cols, ah // rows
    cells = np.argsort(u[: cols * rows, 4])  # at most 13 cells for 9 shapes
    objects = []
    slot = 0
    for gi, (color, shape, texture, count) in enumerate(sc.groups):
        rgb = _COLOR_RGB[color]
        boxes = []
        for _ in range(count):
            cell = int(cells[slot])
            cx0, cy0 = (cell % cols) * cw, top + (cell // cols) * ch
            s = max(8, int(min(cw, ch) * (0.6 + 0.3 * u[slot, 0])))
            x0 = cx0 + int((cw - s) * u[slot, 1])
            y0 = cy0 + int((ch - s) * u[slot, 2])
            angle = float(u[slot, 3]) * 2.0 * math.pi
            if texture == 0:
                _draw_shape(draw, shape, x0, y0, s, angle, rgb)
            else:
                mask = Image.new("L", (s, s), 0)
                _draw_shape(ImageDraw.Draw(mask), shape, 0, 0, s, angle, 255)
                box = (x0, y0, x0 + s, y0 + s)
                tex = _pattern(texture, int(pat[gi, 0]), int(pat[gi, 1]), side).crop(box)
                # the second tone of a texture is the background showing through
                img.paste(rgb, box, ImageChops.subtract(mask, tex))
            boxes.append([x0, y0, x0 + s, y0 + s])
            slot += 1
        objects.append(
            {
                "color": _COLOR_NAMES[color],
                "shape": SHAPES[shape],
                "texture": TEXTURES[texture],
                "count": count,
                "boxes": boxes,
            }  # fmt: skip
        )
    layout = {"objects": objects, "word": None}
    if word_box is not None:
        layout["word"] = {"text": WORDS[sc.word], "box": word_box}
    return img, layout


def _encode(img: Any, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False)
    else:
        img.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of regular files with fixed metadata (mtime 0, uid/gid 0, no names, mode 0o444)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            ti.mode = 0o444
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.type = tarfile.REGTYPE
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _cdf_draw(rng: np.random.Generator, p: tuple[float, ...], size: Any) -> np.ndarray:
    c = np.cumsum(p)
    return np.minimum(np.searchsorted(c / c[-1], rng.random(size), side="right"), len(p) - 1)


# --------------------------------------------------------------------------------------------
# Shards and pool
# --------------------------------------------------------------------------------------------


def generate_image_shard(
    seed: int,
    index: int,
    n: int,
    *,
    image_size: int = 256,
    mismatch_rate: float = 0.2,
    fault_rate: float = 0.0,
    image_format: str = "jpg",
) -> SynthImageShard:
    """Generate image shard `index` of a pool with `seed`: `n` samples, tar bytes and table.

    Depends only on the arguments. Scene parameters are drawn per shard as arrays; only the
    drawing and encoding run per image.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))

    # ---- faults, then mismatches among the decodable samples (exact counts) -----------------
    n_fault = int(round(fault_rate * n))
    fault_of = np.full(n, -1, dtype=np.int64)
    fault_idx = rng.choice(n, n_fault, replace=False) if n_fault else np.empty(0, np.int64)
    fault_of[fault_idx] = _cdf_draw(rng, _FAULT_P, n_fault)
    cut = rng.uniform(0.2, 0.7, n)
    junk = rng.integers(0, len(_NOT_AN_IMAGE), n)
    ok_idx = np.flatnonzero(fault_of < 0)
    n_mis = int(round(mismatch_rate * len(ok_idx)))
    mismatched = np.zeros(n, dtype=bool)
    if n_mis:
        mismatched[rng.choice(ok_idx, n_mis, replace=False)] = True

    # ---- scene parameters, one row per sample ------------------------------------------------
    n_colors = len(COLORS)
    odd = rng.random(n) < _ODD_ASPECT_RATE
    aspect = rng.integers(0, len(_ODD_ASPECTS), n)
    n_groups = _cdf_draw(rng, _GROUPS_P, n) + 1
    color_order = np.argsort(rng.random((n, n_colors)), axis=1)
    shapes = rng.integers(0, len(SHAPES), (n, _MAX_GROUPS))
    textures = _cdf_draw(rng, _TEXTURE_P, (n, _MAX_GROUPS))
    counts = _cdf_draw(rng, _COUNT_P, (n, _MAX_GROUPS)) + 1
    words = np.where(rng.random(n) < _WORD_RATE, rng.integers(0, len(WORDS), n), -1)
    mention_bg = rng.random(n) < _BG_MENTION_RATE
    prefix = rng.integers(0, len(_PREFIXES), n)
    joiners = rng.integers(0, len(_JOINERS), (n, 2))
    word_phrase = rng.integers(0, len(_WORD_PHRASES), n)
    suffix = rng.integers(0, len(_SUFFIXES), n)
    capitalize = rng.random(n) < _CAPITALIZE_RATE
    pat = np.stack(
        [
            rng.integers(0, 4, (n, _MAX_GROUPS)),
            rng.choice(np.array([12, 16, 20, 24]), (n, _MAX_GROUPS)),
        ],
        axis=2,
    )
    pat[:, :, 1] = np.maximum(2, pat[:, :, 1] * image_size // 256)
    place = rng.random((n, _MAX_SLOTS, 5))
    donors = rng.integers(0, max(n - 1, 1), (n, 4))
    donors += donors >= np.arange(n)[:, None]  # never the sample itself

    scenes = [
        _Scene(
            groups=tuple(
                (int(color_order[i, g]), int(shapes[i, g]), int(textures[i, g]), int(counts[i, g]))
                for g in range(int(n_groups[i]))
            ),
            background=int(color_order[i, _MAX_GROUPS]),
            word=int(words[i]),
            mention_bg=bool(mention_bg[i]),
            prefix=int(prefix[i]),
            joiners=(int(joiners[i, 0]), int(joiners[i, 1])),
            word_phrase=int(word_phrase[i]),
            suffix=int(suffix[i]),
            capitalize=bool(capitalize[i]),
        )
        for i in range(n)
    ]
    true_captions = [_caption(sc) for sc in scenes]
    concepts = [_concepts(sc) for sc in scenes]
    captions = list(true_captions)
    for i in np.flatnonzero(mismatched).tolist():
        drawn = set(concepts[i])
        for d in donors[i].tolist():
            if d < n and not _mentioned(scenes[d]) <= drawn:
                captions[i] = true_captions[d]
                break
        else:
            captions[i] = _caption(_shifted(scenes[i]))

    # ---- draw, encode, pack ------------------------------------------------------------------
    sizes = [(image_size, image_size)] + [
        (max(16, round(image_size * fw)), max(16, round(image_size * fh)))
        for fw, fh in _ODD_ASPECTS
    ]
    side = max(max(wh) for wh in sizes)  # texture masks cover every canvas of the shard
    size_idx = np.where(odd, aspect + 1, 0)
    ext = image_format
    urls = [f"https://img.example.com/synth/{seed}/{index}/{i}.{ext}" for i in range(n)]
    keys = [uid_of_url(u) for u in urls]
    widths: list[int | None] = []
    heights: list[int | None] = []
    faults: list[str | None] = []
    members: list[tuple[str, bytes]] = []
    for i in range(n):
        w, h = sizes[int(size_idx[i])]
        fk = int(fault_of[i])
        layout: dict[str, Any] = {"objects": None, "word": None}
        if fk == 1:
            data = _NOT_AN_IMAGE[int(junk[i])]
        elif fk == 2:
            data = _bomb_png()
        else:
            img, layout = _render(scenes[i], w, h, place[i], pat[i], side)
            data = _encode(img, image_format)
            if fk == 0:
                data = data[: max(1, int(len(data) * float(cut[i])))]
        good = fk < 0
        widths.append(w if good else None)
        heights.append(h if good else None)
        faults.append(None if good else FAULT_KINDS[fk])
        meta = {
            "key": keys[i],
            "uid": keys[i],
            "url": urls[i],
            "caption": captions[i],
            "status": "success",
            "error_message": None,
            "width": widths[-1],
            "height": heights[-1],
            "original_width": widths[-1],
            "original_height": heights[-1],
            "mismatched": bool(mismatched[i]),
            "concepts": concepts[i],
            "true_caption": true_captions[i],
            **layout,
        }
        sample = [
            (f"{keys[i]}.{ext}", data),
            (f"{keys[i]}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()),
            (f"{keys[i]}.txt", captions[i].encode("utf-8")),
        ]
        members += sorted(sample)

    table = pa.table(
        {
            "key": keys,
            "uid": keys,
            "url": urls,
            "caption": captions,
            "status": ["success"] * n,
            "error_message": pa.nulls(n, pa.string()),
            "width": widths,
            "height": heights,
            "original_width": widths,
            "original_height": heights,
            "mismatched": mismatched,
            "concepts": concepts,
            "true_caption": true_captions,
            "fault": faults,
        },
        schema=SCHEMA,
    )
    fault_counts = {k: int(np.sum(fault_of == j)) for j, k in enumerate(FAULT_KINDS)}
    return SynthImageShard(_tar(members), table, ImageShardTruth(n, n_mis, fault_counts))


def write_synthetic_image_pool(
    out_dir: str,
    shards: int,
    samples_per_shard: int,
    seed: int,
    *,
    image_size: int = 256,
    mismatch_rate: float = 0.2,
    fault_rate: float = 0.0,
    image_format: str = "jpg",
) -> ImagePoolSummary:
    """Write `shards` webdataset tars with a parquet each and `synth_truth.json` under `out_dir`.

    `out_dir` is any fsspec URL. Each tar holds `samples_per_shard` samples; see the module
    docstring for the layout, the mismatches and the faults. Same arguments give byte-identical
    files. File URLs are spelled as `curation.core.fsio.expand_inputs` spells them.
    """
    if shards < 0:
        raise ValueError("shards must be >= 0")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if samples_per_shard < 0:
        raise ValueError("samples_per_shard must be >= 0")
    if not 16 <= image_size <= 4096:
        raise ValueError(f"image_size must be in [16, 4096], got {image_size}")
    if not 0.0 <= mismatch_rate <= 1.0:
        raise ValueError("mismatch_rate must be in [0, 1]")
    if not 0.0 <= fault_rate <= 1.0:
        raise ValueError("fault_rate must be in [0, 1]")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    _pil()
    t0 = time.perf_counter()
    fs, root = url_to_fs(out_dir)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    files: list[str] = []
    parquets: list[str] = []
    samples: dict[str, int] = {}
    mism: dict[str, int] = {}
    faults: dict[str, dict[str, int]] = {}
    for i in range(shards):
        shard = generate_image_shard(
            seed,
            i,
            samples_per_shard,
            image_size=image_size,
            mismatch_rate=mismatch_rate,
            fault_rate=fault_rate,
            image_format=image_format,
        )
        name = image_shard_name(i)
        url = fsio.full_url(fs, f"{root}/{name}.tar")
        pq_url = fsio.full_url(fs, f"{root}/{name}.parquet")
        fsio.atomic_write_parquet(pq_url, shard.table)
        fsio.atomic_write_bytes(url, shard.tar)
        files.append(url)
        parquets.append(pq_url)
        samples[url] = shard.truth.samples
        mism[url] = shard.truth.mismatched
        faults[url] = shard.truth.faults
    params: dict[str, Any] = {
        "shards": shards,
        "samples_per_shard": samples_per_shard,
        "image_size": image_size,
        "mismatch_rate": mismatch_rate,
        "fault_rate": fault_rate,
        "image_format": image_format,
        "jpeg_quality": JPEG_QUALITY,
        "synth_images_version": SYNTH_IMAGES_VERSION,
    }
    totals = {k: sum(f[k] for f in faults.values()) for k in FAULT_KINDS}
    fsio.atomic_write_json(
        fsio.full_url(fs, f"{root}/{TRUTH_FILE}"),
        {
            "kind": "images",
            "files": files,
            "parquet_files": parquets,
            "samples_per_file": samples,
            "mismatched_per_file": mism,
            "faults_per_file": faults,
            "total_samples": sum(samples.values()),
            "total_mismatched": sum(mism.values()),
            "total_faults": totals,
            "seed": seed,
            "params": params,
        },
    )
    return ImagePoolSummary(
        files=files,
        parquet_files=parquets,
        samples_per_file=samples,
        mismatched_per_file=mism,
        faults_per_file=faults,
        seconds=time.perf_counter() - t0,
    )
