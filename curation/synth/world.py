"""A generated image-text world with known ground truth, for the end-to-end quality benchmark.

The world has `concepts` concepts, each an English noun (its name, which is also its metadata
entry) with a fixed visual signature: a background color and a foreground color (an ordered
pair of distinct colors of `COLORS`, drawn once per world). An image of a concept is its
background with one shape (disk, square, diamond, ring or cross; a nuisance, never named) in its
foreground color at a random place and size, plus brightness jitter and pixel noise. A model
can only learn a concept's name from pairs that show it: the names are arbitrary.

What is written under `out` (any fsspec URL), byte-identical for the same `WorldConfig`:

- `pool/`: the raw web pool in DataComp's layout, `metadata/NNNNN.parquet` beside
  `shards/NNNNN.tar` (webdataset: `<uid>.jpg`, `<uid>.txt`, `<uid>.json`). Image concepts follow
  a Zipf law (p_k ∝ 1 / k**zipf over the concept ranks k = 1..K). Each pair is one of
  - `clean`: the caption names the image's concept (one of `TEMPLATES`, sometimes with a filler
    word);
  - `mismatch` (`mismatch_rate`): the caption names another concept, drawn from the same Zipf
    law (web alt-texts that do not describe the image);
  - `boilerplate` (`boilerplate_rate`): a caption that names no concept (`BOILERPLATE`: "click
    to enlarge", file names, ...).
  Original sizes (`original_width`/`original_height`, what DataComp's basic filter reads) are
  drawn independently of everything else: 85% photo-sized, 15% small or extreme.
  The truth columns `kind`, `image_concept` and `caption_concept` (-1: none) are in the Parquet.
- `clean/shards/`: a small clean split (same Zipf law, no mismatches, no boilerplate), e.g. to
  train the CLIP scorer that CLIP-score filtering uses.
- `tasks/classification/`: a balanced zero-shot test set in CLIP_benchmark's layout, every
  concept `test_per_concept` times; `classnames.txt` = the concept names.
- `tasks/retrieval/`: the same kind of images, `retrieval_per_concept` per concept, each with
  one caption per image from `TEMPLATES`.
- `metadata.json`: the concept names (a MetaCLIP-style JSON list) for matching.
- `world.json`: the config, the concepts (name, rank, Zipf probability, colors), and the pool's
  truth counts per concept (image and caption matches) and per kind.

No name is a substring of another name, of a template, a filler or a boilerplate caption, so
substring matching (MetaCLIP's rule) finds exactly the named concept.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.core import fsio
from curation.synth.eval_tasks import _text
from curation.synth.images import COLORS, _tar

__all__ = [
    "BOILERPLATE",
    "NOUNS",
    "TEMPLATES",
    "WORLD_VERSION",
    "WorldConfig",
    "concept_names",
    "write_world",
]

WORLD_VERSION = 1

#: Concrete English nouns; the first `concepts` that survive the substring check are used,
#: in an order shuffled by the world seed.
NOUNS = (
    "apple", "anchor", "badger", "banjo", "barrel", "beaver", "bicycle", "blender", "bottle",
    "bucket", "butterfly", "cactus", "camel", "candle", "canoe", "carrot", "castle", "cherry",
    "chimney", "cobra", "compass", "cookie", "coyote", "crayon", "cricket", "crocodile",
    "cucumber", "dolphin", "donkey", "dragonfly", "drum", "eagle", "eggplant", "elephant",
    "falcon", "feather", "ferret", "flamingo", "flute", "fountain", "giraffe", "glacier",
    "goblet", "goose", "gorilla", "guitar", "hammer", "harp", "hedgehog", "helmet", "hippo",
    "honey", "iguana", "jaguar", "jellyfish", "kangaroo", "kayak", "kettle", "kiwi", "koala",
    "ladder", "lantern", "lemon", "leopard", "lizard", "llama", "lobster", "mango", "marble",
    "meadow", "melon", "mitten", "monkey", "moose", "mushroom", "napkin", "necklace", "octopus",
    "olive", "orchid", "ostrich", "otter", "owl", "paddle", "panda", "parrot", "peacock",
    "peanut", "pelican", "pepper", "piano", "pillow", "pineapple", "pumpkin", "puzzle", "rabbit",
    "raccoon", "radish", "robot", "rocket", "saddle", "salmon", "scarf", "scooter", "seahorse",
    "shovel", "skunk", "sloth", "snail", "spider", "spoon", "squirrel", "starfish", "strawberry",
    "submarine", "sunflower", "swan", "teapot", "tiger", "tomato", "tractor", "trumpet",
    "tulip", "turtle", "umbrella", "unicorn", "vase", "violin", "volcano", "walrus", "wagon",
    "waffle", "whale", "windmill", "wizard", "wolf", "yacht", "zebra", "acorn", "avocado",
    "bagel", "beetle", "bison", "broom", "buffalo", "cabbage", "carousel", "cello", "cheetah",
    "clarinet", "coconut", "croissant", "cupcake", "dinosaur", "dumpling", "gazelle", "glove",
    "hamster", "harmonica", "igloo", "jackal", "lighthouse", "mermaid", "moth", "muffin",
    "nightingale", "pancake", "penguin", "pretzel", "quail", "reindeer", "sandal", "sparrow",
    "stapler", "toucan", "trombone", "vulture", "weasel", "yak",
)  # fmt: skip
#: Clean captions; `{}` is the concept's name.
TEMPLATES = (
    "a photo of a {}", "a picture of the {}", "{} on a plain background", "my favourite {}",
    "close-up of a {}", "the {} in the studio", "a small {}", "a large {}", "stock image of a {}",
    "a {} for sale", "{}, front view", "an old {}", "look at this {}",
)  # fmt: skip
#: Filler words sometimes put before a clean caption.
FILLERS = ("wow", "beautiful", "vintage", "cute", "new", "rare", "amazing", "classic")
#: Captions that name no concept.
BOILERPLATE = (
    "click to enlarge", "free shipping on all orders", "IMG_0423.JPG", "image", "thumbnail",
    "view larger image", "download now", "no description available", "DSC01234", "photo 1 of 12",
    "untitled", "buy it now for the best price", "copyright all rights reserved", "logo",
    "share this post with your friends", "read more", "placeholder", "banner ad",
)  # fmt: skip
SHAPES = ("disk", "square", "diamond", "ring", "cross")
JPEG_QUALITY = 90
KINDS = ("clean", "mismatch", "boilerplate")


@dataclass(frozen=True)
class WorldConfig:
    """The world's parameters (all of them go into `world.json`)."""

    concepts: int = 100
    pool_size: int = 30_000
    zipf: float = 1.0
    mismatch_rate: float = 0.25
    boilerplate_rate: float = 0.10
    small_image_rate: float = 0.15
    clean_size: int = 3_000
    test_per_concept: int = 10
    retrieval_per_concept: int = 2
    samples_per_shard: int = 5_000
    image_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        n_colors = len(COLORS)
        if not 2 <= self.concepts <= min(len(concept_names(0, None)), n_colors * (n_colors - 1)):
            raise ValueError(f"concepts must be in [2, {len(concept_names(0, None))}]")
        for name in ("pool_size", "clean_size", "test_per_concept", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.retrieval_per_concept < 0:
            raise ValueError("retrieval_per_concept must be >= 0")
        if not 0 <= self.mismatch_rate + self.boilerplate_rate <= 1:
            raise ValueError("mismatch_rate + boilerplate_rate must be in [0, 1]")
        if not 0 <= self.small_image_rate <= 1 or self.zipf < 0:
            raise ValueError("small_image_rate must be in [0, 1] and zipf >= 0")
        if not 16 <= self.image_size <= 512:
            raise ValueError("image_size must be in [16, 512]")


def _usable_nouns() -> list[str]:
    """NOUNS without those that are a substring of another noun or of any fixed caption text."""
    fixed = [t.replace("{}", " ") for t in TEMPLATES] + list(FILLERS)
    fixed += [b.lower() for b in BOILERPLATE]
    out = []
    for n in NOUNS:
        if any(n in m for m in NOUNS if m != n) or any(n in f for f in fixed):
            continue
        out.append(n)
    return out


def concept_names(seed: int, k: int | None) -> list[str]:
    """The world's concept names in rank order (rank 1 = most frequent)."""
    nouns = _usable_nouns()
    order = _rng(seed, "names").permutation(len(nouns))
    names = [nouns[i] for i in order]
    return names if k is None else names[:k]


def _rng(seed: int, *key: Any) -> np.random.Generator:
    words = [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=4).digest(), "little")
             for k in key]  # fmt: skip
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


def _uid(seed: int, split: str, i: int) -> str:
    return hashlib.blake2b(f"world:{seed}:{split}:{i}".encode(), digest_size=16).hexdigest()


class _Painter:
    """Renders concept images as uint8 arrays and encodes them as JPEG."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.size = cfg.image_size
        rgb = np.asarray(list(COLORS.values()), dtype=np.float32)
        n = len(rgb)
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
        pick = _rng(cfg.seed, "colors").permutation(len(pairs))[: cfg.concepts]
        self.pairs = [pairs[i] for i in pick]
        self.rgb = rgb
        yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float32)
        self.yy, self.xx = yy, xx

    def mask(self, shape: int, cx: float, cy: float, r: float) -> np.ndarray:
        dx, dy = self.xx - cx, self.yy - cy
        if shape == 0:
            return dx * dx + dy * dy <= r * r
        if shape == 1:
            return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
        if shape == 2:
            return np.abs(dx) + np.abs(dy) <= r
        if shape == 3:
            d = dx * dx + dy * dy
            return (d <= r * r) & (d >= (0.55 * r) ** 2)
        w = r * 0.35
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))

    def images(self, concepts: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        """JPEG bytes of one image per concept index in `concepts`."""
        from PIL import Image

        n, s = len(concepts), self.size
        shape = rng.integers(0, len(SHAPES), n)
        r = rng.uniform(0.16, 0.34, n) * s
        cx = rng.uniform(0.3, 0.7, n) * s
        cy = rng.uniform(0.3, 0.7, n) * s
        gain = rng.uniform(0.85, 1.15, n).astype(np.float32)
        out = []
        for i in range(n):
            bg, fg = self.pairs[int(concepts[i])]
            img = np.empty((s, s, 3), np.float32)
            img[:] = self.rgb[bg]
            img[self.mask(int(shape[i]), cx[i], cy[i], r[i])] = self.rgb[fg]
            img = img * gain[i] + rng.normal(0.0, 8.0, (s, s, 3)).astype(np.float32)
            arr = np.clip(img, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
            out.append(buf.getvalue())
        return out


def _zipf_p(cfg: WorldConfig) -> np.ndarray:
    p = 1.0 / np.arange(1, cfg.concepts + 1, dtype=np.float64) ** cfg.zipf
    return p / p.sum()


def _captions(names: list[str], caption_concept: np.ndarray, rng: np.random.Generator) -> list[str]:
    n = len(caption_concept)
    tmpl = rng.integers(0, len(TEMPLATES), n)
    filler = np.where(rng.random(n) < 0.2, rng.integers(0, len(FILLERS), n), -1)
    junk = rng.integers(0, len(BOILERPLATE), n)
    out = []
    for i in range(n):
        c = int(caption_concept[i])
        if c < 0:
            out.append(BOILERPLATE[int(junk[i])])
            continue
        text = TEMPLATES[int(tmpl[i])].format(names[c])
        if filler[i] >= 0:
            text = f"{FILLERS[int(filler[i])]} {text}"
        out.append(text)
    return out


def _sizes(n: int, small_rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Original (web) image sizes: photo-sized, or small / extreme with `small_rate`."""
    w = rng.integers(240, 1600, n)
    h = (w / rng.uniform(0.6, 1.8, n)).astype(np.int64)
    odd = rng.random(n) < small_rate
    tiny = rng.random(n) < 0.5
    w = np.where(odd & tiny, rng.integers(32, 200, n), w)
    h = np.where(odd & tiny, rng.integers(32, 200, n), h)
    h = np.where(odd & ~tiny, np.maximum(1, w // rng.integers(4, 9, n)), h)  # banners
    return w.astype(np.int32), np.maximum(h, 1).astype(np.int32)


def _write_pairs(
    cfg: WorldConfig,
    painter: _Painter,
    names: list[str],
    split: str,
    out_dir: str,
    n: int,
    *,
    mismatch_rate: float,
    boilerplate_rate: float,
    metadata: bool,
) -> dict[str, Any]:
    """A split of `n` pairs as webdataset tars (and DataComp metadata Parquet); its truth."""
    p = _zipf_p(cfg)
    k = cfg.concepts
    image_c = np.zeros(n, np.int64)
    caption_c = np.zeros(n, np.int64)
    kinds = np.zeros(n, np.int8)
    shards = (n + cfg.samples_per_shard - 1) // cfg.samples_per_shard
    for s in range(shards):
        lo, hi = s * cfg.samples_per_shard, min(n, (s + 1) * cfg.samples_per_shard)
        m = hi - lo
        rng = _rng(cfg.seed, split, s)
        img = rng.choice(k, m, p=p)
        u = rng.random(m)
        kind = np.where(u < mismatch_rate, 1, np.where(u < mismatch_rate + boilerplate_rate, 2, 0))
        other = rng.choice(k, m, p=p)
        other = np.where(other == img, (other + 1 + rng.integers(0, k - 1, m)) % k, other)
        cap = np.where(kind == 0, img, np.where(kind == 1, other, -1))
        captions = _captions(names, cap, rng)
        w, h = _sizes(m, cfg.small_image_rate, rng)
        jpgs = painter.images(img, rng)
        uids = [_uid(cfg.seed, split, i) for i in range(lo, hi)]
        urls = [f"https://img.example.com/world/{cfg.seed}/{split}/{i}.jpg" for i in range(lo, hi)]
        members = []
        for i in range(m):
            meta = {
                "uid": uids[i],
                "url": urls[i],
                "caption": captions[i],
                "original_width": int(w[i]),
                "original_height": int(h[i]),
            }
            members += [
                (f"{uids[i]}.jpg", jpgs[i]),
                (f"{uids[i]}.json", json.dumps(meta, sort_keys=True).encode()),
                (f"{uids[i]}.txt", captions[i].encode()),
            ]
        fsio.atomic_write_bytes(fsio.join(out_dir, "shards", f"{s:05d}.tar"), _tar(members))
        if metadata:
            table = pa.table(
                {
                    "uid": pa.array(uids, pa.string()),
                    "url": pa.array(urls, pa.string()),
                    "text": pa.array(captions, pa.string()),
                    "original_width": pa.array(w, pa.int32()),
                    "original_height": pa.array(h, pa.int32()),
                    "kind": pa.array([KINDS[int(x)] for x in kind], pa.string()),
                    "image_concept": pa.array(img, pa.int32()),
                    "caption_concept": pa.array(cap, pa.int32()),
                }
            )
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            fsio.atomic_write_bytes(
                fsio.join(out_dir, "metadata", f"{s:05d}.parquet"), buf.getvalue()
            )
        image_c[lo:hi], caption_c[lo:hi], kinds[lo:hi] = img, cap, kind
    named = caption_c[caption_c >= 0]
    return {
        "pairs": n,
        "shards": shards,
        "kinds": {KINDS[j]: int((kinds == j).sum()) for j in range(len(KINDS))},
        "image_counts": np.bincount(image_c, minlength=k).tolist(),
        "caption_counts": np.bincount(named, minlength=k).tolist(),
    }


def _write_tasks(cfg: WorldConfig, painter: _Painter, names: list[str], out: str) -> None:
    k = cfg.concepts
    cls_dir = fsio.join(out, "tasks", "classification")
    concepts = np.repeat(np.arange(k), cfg.test_per_concept)
    rng = _rng(cfg.seed, "test")
    concepts = concepts[rng.permutation(len(concepts))]
    jpgs = painter.images(concepts, rng)
    members = []
    for i, (c, jpg) in enumerate(zip(concepts.tolist(), jpgs, strict=True)):
        members += [(f"t{i:06d}.cls", str(c).encode()), (f"t{i:06d}.jpg", jpg)]
    fsio.atomic_write_bytes(fsio.join(cls_dir, "test", "0.tar"), _tar(members))
    fsio.atomic_write_bytes(fsio.join(cls_dir, "classnames.txt"), _text(names))
    fsio.atomic_write_bytes(
        fsio.join(cls_dir, "zeroshot_classification_templates.txt"),
        _text([t.replace("{}", "{c}") for t in TEMPLATES[:4]]),
    )
    if not cfg.retrieval_per_concept:
        return
    ret_dir = fsio.join(out, "tasks", "retrieval")
    concepts = np.repeat(np.arange(k), cfg.retrieval_per_concept)
    rng = _rng(cfg.seed, "retrieval")
    concepts = concepts[rng.permutation(len(concepts))]
    jpgs = painter.images(concepts, rng)
    caps = _captions(names, concepts, rng)
    members = []
    for i, (jpg, cap) in enumerate(zip(jpgs, caps, strict=True)):
        members += [(f"r{i:06d}.jpg", jpg), (f"r{i:06d}.txt", _text([cap]))]
    fsio.atomic_write_bytes(fsio.join(ret_dir, "test", "0.tar"), _tar(members))
    fsio.atomic_write_bytes(fsio.join(ret_dir, "dataset_type.txt"), _text(["retrieval"]))


def write_world(out: str, cfg: WorldConfig | None = None) -> dict[str, Any]:
    """Write the world described in the module docstring under `out`; returns `world.json`."""
    cfg = cfg or WorldConfig()
    names = concept_names(cfg.seed, cfg.concepts)
    painter = _Painter(cfg)
    pool = _write_pairs(
        cfg,
        painter,
        names,
        "pool",
        fsio.join(out, "pool"),
        cfg.pool_size,
        mismatch_rate=cfg.mismatch_rate,
        boilerplate_rate=cfg.boilerplate_rate,
        metadata=True,
    )
    clean = _write_pairs(
        cfg,
        painter,
        names,
        "clean",
        fsio.join(out, "clean"),
        cfg.clean_size,
        mismatch_rate=0.0,
        boilerplate_rate=0.0,
        metadata=False,
    )
    _write_tasks(cfg, painter, names, out)
    fsio.atomic_write_bytes(fsio.join(out, "metadata.json"), json.dumps(names, indent=0).encode())
    colors = list(COLORS)
    p = _zipf_p(cfg)
    doc = {
        "version": WORLD_VERSION,
        "config": asdict(cfg),
        "concepts": [
            {
                "name": names[i],
                "rank": i + 1,
                "p": float(p[i]),
                "background": colors[painter.pairs[i][0]],
                "foreground": colors[painter.pairs[i][1]],
            }
            for i in range(cfg.concepts)
        ],
        "pool": pool,
        "clean": {k: v for k, v in clean.items() if k != "kinds"},
    }
    fsio.atomic_write_json(fsio.join(out, "world.json"), doc)
    return doc
