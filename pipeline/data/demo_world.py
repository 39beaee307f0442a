"""A small, deterministic "web" of image-caption pairs where MoDE has something to find.

Four training domains with their own vocabulary (shapes, digits, textures, scenes), one held-out
domain (arrows) for adding an expert later, web noise (mismatched captions, junk alt-text,
duplicates, empty captions), and one zero-shot task per domain. Output layout (all under --out)::

    train/00000.tar ...        img2dataset webdataset shards: {key}.jpg, {key}.txt, {key}.json
    new_domain/00000.tar ...   the held-out domain's web pairs, same layout
    eval/<task>/classnames.txt, zeroshot_classification_templates.txt, test/0.tar ({key}.jpg,
                               {key}.cls), test/nshards.txt   (clip_benchmark's wds layout)
    eval/<task>/val/0.tar      a validation split: other images of the same classes, as many;
                               what the report tunes its routing on (pipeline/evaluation/eval.py)
    eval/retrieval/test/0.tar  held-out clean pairs ({key}.jpg, {key}.txt) for retrieval
    truth.parquet              one row per web pair, columns below
    world.json                 what was generated: domains, classes, counts, seed, composite

With ``DemoConfig.composite`` every image of a training domain holds two concepts, as web images
do: a foreground (a digit or a shape) drawn over a background that fills the image (a texture or
a scene). Its caption names one of them, drawn as in the plain world (DOMAIN_SHARES stay the
shares of captions naming each domain); the other is drawn uniformly from the other layer.
Similar-looking images then carry different captions, the false negatives MoDE's caption
clustering separates. Zero-shot images are composites too, labelled with the task's concept,
and retrieval pairs are composites with their captions. Arrows (the held-out domain) are drawn
on plain colours in either world, so new_domain stays one concept per image.

truth.parquet::

    key, split
    domain, label          the concept the image was captioned with: the plain world's only
                           concept; a mismatched pair keeps it while carrying another's caption
    noise                  clean | mismatch | junk | duplicate | empty
    caption_domain,        what the caption the pair carries names: for a mismatch the other
    caption_label          pair's concept; "junk" / "empty" and "" for captions naming nothing
    fg_domain, fg_label,   the concepts the image holds, by layer; "" for a layer of plain
    bg_domain, bg_label    colour. Plain shapes, digits and arrows are foregrounds on a plain
                           colour; plain textures and scenes are backgrounds filling the image

Every random draw comes from a generator seeded by (seed, split, index), and the tar headers
carry fixed metadata, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline.core.config import DemoConfig, StorageConfig
from pipeline.core.storage import expand_shards, filesystem, join, strip_scheme

TRAIN_DOMAINS = ("shapes", "digits", "textures", "scenes")
NEW_DOMAIN = "arrows"
# The layers of a composite image: a foreground concept drawn over a background concept.
FOREGROUND_DOMAINS = ("shapes", "digits")
BACKGROUND_DOMAINS = ("textures", "scenes")
# Web data is not uniform over topics: unequal shares make unequal experts, as in the paper.
DOMAIN_SHARES = {"shapes": 0.30, "digits": 0.25, "textures": 0.25, "scenes": 0.20}
NOISE_SHARES = {"mismatch": 0.15, "junk": 0.05, "duplicate": 0.03, "empty": 0.02}
JUNK = ("IMG_2041.JPG", "click to enlarge", "DSC_0042.jpg", "image", "thumbnail", "untitled-1.png",
        "photo", "Download now", "img_0931", "screenshot 2019-03-02", "no description available",
        "banner.gif", "view full size")
EMPTY = ("", " ", "\n", "\t ")

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "pink": (240, 130, 180),
    "cyan": (40, 200, 210), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "grey": (128, 128, 128),
               "beige": (230, 215, 180), "navy": (20, 30, 80)}


@dataclass(frozen=True)
class Domain:
    name: str
    classes: tuple[str, ...]
    captions: tuple[str, ...]      # web caption templates; fields filled per sample
    prompts: tuple[str, ...]       # zero-shot prompt templates with {c}


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEXTURE_NAMES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard",
                 "polka dots", "grid", "zigzag", "speckled noise")
SCENE_NAMES = ("sunrise", "midday", "sunset", "night", "cloudy day", "snowfall", "rain", "fog")
ARROW_NAMES = ("up", "down", "left", "right", "up left", "up right", "down left", "down right")

DOMAINS = {
    "shapes": Domain(
        "shapes", ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring"),
        ("a {color} {label}", "{color} {label} on a {bg} background",
         "simple {label} icon, {color}", "vector clipart of a {label} shape",
         "flat {color} {label} logo design"),
        ("a {c}.", "a drawing of a {c}.", "a {c} shape.", "an icon of a {c}.")),
    "digits": Domain(
        "digits", DIGIT_WORDS,
        ("the number {label}", "digit {digit} in {color}", "house number {digit} sign",
         "a printed {label} on {bg} paper", "numeral {digit} sticker"),
        ("the number {c}.", "a printed digit {c}.", "a sign showing {c}.")),
    "textures": Domain(
        "textures", TEXTURE_NAMES,
        ("{label} pattern", "seamless {label} texture in {color}",
         "{color} and {bg} {label} fabric", "background with {label}",
         "wallpaper with a {label} design"),
        ("a {c} pattern.", "a texture of {c}.", "fabric with {c}.")),
    "scenes": Domain(
        "scenes", SCENE_NAMES,
        ("landscape at {label}", "the sky over the hills during {label}",
         "photo of the countryside, {label}", "beautiful {label} view",
         "{label} weather in the valley"),
        ("a landscape at {c}.", "a photo of the countryside during {c}.", "the sky at {c}.")),
    "arrows": Domain(
        "arrows", ARROW_NAMES,
        ("an arrow pointing {label}", "{color} arrow sign, {label}", "direction icon {label}",
         "road sign showing the way {label}", "cursor arrow {label}"),
        ("an arrow pointing {c}.", "a direction sign pointing {c}.", "an arrow icon: {c}.")),
}


# ----------------------------------------------------------------------------- rendering
# Everything is drawn at SUPER x the target size and downsampled, so small shapes keep edges.
SUPER = 4


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 25):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _colors(rng: np.random.Generator) -> tuple[str, str]:
    """A foreground colour name and a background name that differ enough to see."""
    while True:
        color, bg = _pick(rng, list(COLORS)), _pick(rng, list(BACKGROUNDS))
        if np.abs(np.subtract(COLORS[color], BACKGROUNDS[bg])).sum() > 150:
            return color, bg


def _regular_polygon(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _shape_mask(rng, s, label):
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    r = s * rng.uniform(0.22, 0.42)
    cx, cy = s / 2 + rng.uniform(-0.12, 0.12) * s, s / 2 + rng.uniform(-0.12, 0.12) * s
    rot = rng.uniform(0, 2 * math.pi)
    if label == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif label == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(2, int(r * 0.35)))
    elif label == "square":
        d.polygon(_regular_polygon(cx, cy, r * 1.2, 4, rot), fill=255)
    elif label == "diamond":
        pts = _regular_polygon(cx, cy, r * 1.2, 4, rot)
        d.polygon([(cx + (x - cx) * 0.6, y) for x, y in pts], fill=255)
    elif label == "triangle":
        d.polygon(_regular_polygon(cx, cy, r * 1.2, 3, rot), fill=255)
    elif label == "hexagon":
        d.polygon(_regular_polygon(cx, cy, r * 1.1, 6, rot), fill=255)
    elif label == "star":
        outer = _regular_polygon(cx, cy, r * 1.25, 5, rot)
        inner = _regular_polygon(cx, cy, r * 0.5, 5, rot + math.pi / 5)
        d.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif label == "cross":
        w = r * 0.35
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
        c, sn = math.cos(rot), math.sin(rot)
        d.polygon([(cx + x * c - y * sn, cy + x * sn + y * c) for x, y in arm], fill=255)
    return mask


def _digit_mask(rng, s, label):
    font = ImageFont.load_default(size=int(s * rng.uniform(0.55, 0.85)))
    glyph = Image.new("L", (s, s), 0)
    gd = ImageDraw.Draw(glyph)
    text = str(DIGIT_WORDS.index(label))
    gd.text((s / 2 + rng.uniform(-0.1, 0.1) * s, s / 2 + rng.uniform(-0.1, 0.1) * s), text,
            fill=255, font=font, anchor="mm")
    return glyph.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)


# Foreground concepts are masks, so the same draw lands on a plain colour or on a background concept.
MASKS = {"shapes": _shape_mask, "digits": _digit_mask}


def _on_plain(mask_fn):
    def draw(rng, size, label, color, bg):
        s = size * SUPER
        im = Image.new("RGB", (s, s), _jitter(rng, BACKGROUNDS[bg]))
        mask = mask_fn(rng, s, label)
        im.paste(_jitter(rng, COLORS[color]), (0, 0, s, s), mask)
        return im
    return draw


def _draw_texture(rng, size, label, color, bg):
    s = size
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    period = rng.uniform(3.0, 8.0)
    phase = rng.uniform(0, period)
    if label == "horizontal stripes":
        mask = ((y + phase) % period) < period / 2
    elif label == "vertical stripes":
        mask = ((x + phase) % period) < period / 2
    elif label == "diagonal stripes":
        sign = _pick(rng, (1, -1))
        mask = ((x + sign * y + phase) % (period * 1.4)) < period * 0.7
    elif label == "checkerboard":
        mask = (((x + phase) // (period / 2 + 1)) + ((y + phase) // (period / 2 + 1))) % 2 == 0
    elif label == "polka dots":
        cell = period + 2
        mask = ((x + phase) % cell - cell / 2) ** 2 + ((y + phase) % cell - cell / 2) ** 2 < (cell / 3.2) ** 2
    elif label == "grid":
        cell = period + 2
        mask = (((x + phase) % cell) < 1.2) | (((y + phase) % cell) < 1.2)
    elif label == "zigzag":
        amp = period / 2
        mask = ((y + amp * np.abs(((x + phase) % (2 * amp)) - amp)) % period) < period / 2
    else:  # speckled noise
        mask = rng.random((s, s)) < rng.uniform(0.3, 0.6)
    fg = np.array(_jitter(rng, COLORS[color]), np.float32)
    bgc = np.array(_jitter(rng, BACKGROUNDS[bg]), np.float32)
    arr = np.where(mask[..., None], fg, bgc) + rng.normal(0, 10, (s, s, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((s * SUPER, s * SUPER))


_SKIES = {  # top colour, horizon colour, ground colour
    "sunrise": ((90, 110, 190), (250, 170, 120), (70, 110, 60)),
    "midday": ((60, 130, 230), (160, 200, 245), (70, 150, 60)),
    "sunset": ((70, 50, 120), (245, 110, 50), (60, 80, 40)),
    "night": ((5, 5, 30), (25, 30, 70), (10, 20, 15)),
    "cloudy day": ((130, 140, 150), (175, 180, 185), (80, 110, 70)),
    "snowfall": ((160, 170, 185), (205, 210, 220), (235, 235, 240)),
    "rain": ((80, 90, 105), (120, 130, 140), (50, 80, 50)),
    "fog": ((185, 185, 185), (205, 205, 205), (150, 160, 150)),
}


def _draw_scene(rng, size, label, color, bg):
    s = size * SUPER
    top, horizon, ground = (np.array(_jitter(rng, c, 30), np.float32) for c in _SKIES[label])
    h = int(s * rng.uniform(0.55, 0.75))
    t = np.linspace(0, 1, h)[:, None, None]
    arr = np.empty((s, s, 3), np.float32)
    arr[:h] = top * (1 - t) + horizon * t
    arr[h:] = ground
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    sx = rng.uniform(0.15, 0.85) * s
    if label in ("sunrise", "sunset"):
        r = s * 0.1
        sy = h - r * rng.uniform(0.2, 0.9)
        d.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 200, 80) if label == "sunrise" else (240, 90, 40))
    elif label == "midday":
        r, sy = s * 0.08, s * rng.uniform(0.1, 0.25)
        d.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 250, 210))
    elif label == "night":
        for _ in range(int(rng.integers(8, 20))):
            px, py = rng.uniform(0, s), rng.uniform(0, h * 0.9)
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(230, 230, 200))
        r, sy = s * 0.07, s * rng.uniform(0.1, 0.3)
        d.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(235, 235, 210))
    if label in ("cloudy day", "rain", "snowfall"):
        for _ in range(int(rng.integers(3, 7))):
            cx, cy, r = rng.uniform(0, s), rng.uniform(0, h * 0.7), s * rng.uniform(0.08, 0.18)
            shade = int(rng.integers(150, 230)) if label == "cloudy day" else int(rng.integers(90, 150))
            d.ellipse([cx - 1.8 * r, cy - r, cx + 1.8 * r, cy + r], fill=(shade, shade, shade + 5))
    if label == "rain":
        for _ in range(int(rng.integers(25, 50))):
            px, py = rng.uniform(0, s), rng.uniform(0, s)
            d.line([px, py, px - 3, py + 12], fill=(170, 180, 200), width=2)
    if label == "snowfall":
        for _ in range(int(rng.integers(30, 60))):
            px, py = rng.uniform(0, s), rng.uniform(0, s)
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(250, 250, 250))
    if label == "fog":
        im = Image.blend(im.filter(ImageFilter.GaussianBlur(6)), Image.new("RGB", (s, s), (200, 200, 200)),
                         rng.uniform(0.3, 0.5))
    return im


_ARROW_ANGLES = {"right": 0, "down right": 45, "down": 90, "down left": 135, "left": 180,
                 "up left": 225, "up": 270, "up right": 315}


def _draw_arrow(rng, size, label, color, bg):
    s = size * SUPER
    im = Image.new("RGB", (s, s), _jitter(rng, BACKGROUNDS[bg]))
    d = ImageDraw.Draw(im)
    length, w = s * rng.uniform(0.3, 0.42), s * rng.uniform(0.06, 0.1)
    shape = [(-length, -w), (length * 0.25, -w), (length * 0.25, -2.4 * w), (length, 0),
             (length * 0.25, 2.4 * w), (length * 0.25, w), (-length, w)]
    a = math.radians(_ARROW_ANGLES[label] + rng.uniform(-8, 8))
    cx, cy = s / 2 + rng.uniform(-0.08, 0.08) * s, s / 2 + rng.uniform(-0.08, 0.08) * s
    pts = [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in shape]
    d.polygon(pts, fill=_jitter(rng, COLORS[color]))
    return im


RENDERERS: dict[str, Callable[..., Image.Image]] = {
    "shapes": _on_plain(_shape_mask), "digits": _on_plain(_digit_mask), "textures": _draw_texture,
    "scenes": _draw_scene, "arrows": _draw_arrow,
}


def _jpeg(rng: np.random.Generator, im: Image.Image, size: int) -> bytes:
    buf = io.BytesIO()
    im.resize((size, size), Image.LANCZOS).save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def render(rng: np.random.Generator, domain: str, label: str, size: int) -> tuple[bytes, str, str]:
    """Draw one image; returns (JPEG bytes, colour name, background name)."""
    color, bg = _colors(rng)
    return _jpeg(rng, RENDERERS[domain](rng, size, label, color, bg), size), color, bg


def _dilate(mask: Image.Image, r: int) -> Image.Image:
    """``mask`` grown by ``r`` pixels on every side: PIL's MaxFilter(2r + 1) as two 1-D maxima,
    because the square filter took longer than drawing both concepts of the image."""
    a = np.pad(np.asarray(mask), r)
    n = a.shape[0] - 2 * r
    a = np.max([a[i:i + n] for i in range(2 * r + 1)], axis=0)
    return Image.fromarray(np.max([a[:, i:i + n] for i in range(2 * r + 1)], axis=0))


def render_composite(rng: np.random.Generator, fg: tuple[str, str], bg: tuple[str, str],
                     size: int) -> tuple[bytes, str, str, str]:
    """A foreground concept (domain, label) drawn over a background concept that fills the image;
    returns (JPEG bytes, foreground colour, background's colour, background's base colour)."""
    color, base = _colors(rng)
    im = RENDERERS[bg[0]](rng, size, bg[1], color, base)
    s = size * SUPER
    mask = MASKS[fg[0]](rng, s, fg[1])
    fg_color = _pick(rng, list(COLORS))
    fill = _jitter(rng, COLORS[fg_color])
    # A one-pixel rim of the opposite lightness keeps a digit readable on stripes of its own colour.
    rim = (20, 20, 20) if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 128 else (245, 245, 245)
    im.paste(rim, (0, 0, s, s), _dilate(mask, SUPER))
    im.paste(fill, (0, 0, s, s), mask)
    return _jpeg(rng, im, size), fg_color, color, base


def _layers(rng: np.random.Generator, domain: str, label: str,
            composite: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    """(foreground, background) concepts of an image that shows ``label`` of ``domain``; a layer
    that is a plain colour is ``("", "")``. Composite images add a random concept of the other
    layer; arrows are drawn on plain colours in either world."""
    if domain in BACKGROUND_DOMAINS:
        if not composite:
            return ("", ""), (domain, label)
        other = _pick(rng, FOREGROUND_DOMAINS)
        return (other, _pick(rng, DOMAINS[other].classes)), (domain, label)
    if composite and domain in FOREGROUND_DOMAINS:
        other = _pick(rng, BACKGROUND_DOMAINS)
        return (domain, label), (other, _pick(rng, DOMAINS[other].classes))
    return (domain, label), ("", "")


def _image(rng: np.random.Generator, domain: str, label: str, size: int,
           composite: bool) -> tuple[bytes, tuple[str, str], tuple[str, str], str, str]:
    """An image showing ``label`` of ``domain``: (JPEG bytes, foreground, background, and the
    colour and background names a caption of that concept may use)."""
    fg, bg = _layers(rng, domain, label, composite)
    if not (fg[0] and bg[0]):
        jpg, color, base = render(rng, domain, label, size)
        return jpg, fg, bg, color, base
    jpg, fg_color, color, base = render_composite(rng, fg, bg, size)
    return jpg, fg, bg, fg_color if domain == fg[0] else color, base


def caption(rng: np.random.Generator, domain: str, label: str, color: str, bg: str) -> str:
    template = _pick(rng, DOMAINS[domain].captions)
    digit = str(DIGIT_WORDS.index(label)) if domain == "digits" else ""
    return template.format(label=label, color=color, bg=bg, digit=digit)


# ----------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class Pair:
    key: str
    jpg: bytes
    txt: str
    domain: str         # the concept the image was captioned with (before any noise)
    label: str
    noise: str          # clean | mismatch | junk | duplicate | empty
    caption_domain: str     # what the caption it carries names: a domain, or "junk" / "empty"
    caption_label: str      # the class that caption names; "" for junk and empty
    fg_domain: str          # the image's concepts by layer; "" for a layer of plain colour
    fg_label: str
    bg_domain: str
    bg_label: str


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    stream_id = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, stream_id, index])


def web_pairs(seed: int, stream: str, n: int, size: int, domains: dict[str, float],
              shard_size: int, composite: bool = False) -> list[Pair]:
    """``n`` web pairs over ``domains`` (name -> share of the captions naming it), with the web
    noise of NOISE_SHARES; ``composite`` draws composite images (see ``_layers``)."""
    names = list(domains)
    shares = np.array([domains[d] for d in names], np.float64)
    plan = _rng(seed, stream + "/plan", 0)
    dom_idx = plan.choice(len(names), size=n, p=shares / shares.sum())
    noise = plan.choice(["clean", *NOISE_SHARES], size=n,
                        p=[1 - sum(NOISE_SHARES.values()), *NOISE_SHARES.values()])
    partner = plan.integers(0, n, size=n)
    clean: list[Pair] = []
    for i in range(n):
        rng = _rng(seed, stream, i)
        domain = names[dom_idx[i]]
        label = _pick(rng, DOMAINS[domain].classes)
        jpg, fg, bg, color, base = _image(rng, domain, label, size, composite)
        clean.append(Pair(_key(i, shard_size), jpg, caption(rng, domain, label, color, base), domain,
                          label, "clean", domain, label, *fg, *bg))
    pairs = list(clean)
    for i in range(n):
        kind, p = noise[i], pairs[i]
        rng = _rng(seed, stream + "/noise", i)
        if kind == "mismatch":
            j = int(partner[i]) if partner[i] != i else (i + 1) % n
            pairs[i] = replace(p, txt=clean[j].txt, noise=kind, caption_domain=clean[j].domain,
                               caption_label=clean[j].label)
        elif kind in ("junk", "empty"):
            pairs[i] = replace(p, txt=_pick(rng, JUNK if kind == "junk" else EMPTY), noise=kind,
                               caption_domain=kind, caption_label="")
        elif kind == "duplicate" and i > 0:
            src = pairs[int(partner[i]) % i]  # an earlier pair, copied whole under a new key
            pairs[i] = replace(src, key=p.key, noise=kind)
    return pairs


def _key(i: int, shard_size: int) -> str:
    # img2dataset's key: 5-digit shard id then the index inside the shard.
    width = max(4, len(str(shard_size - 1)))
    return f"{i // shard_size:05d}{i % shard_size:0{width}d}"


def tar_bytes(members: Iterator[tuple[str, bytes]]) -> bytes:
    """A tar with fixed header metadata (mtime 0, root, 0644), so equal input gives equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _web_members(pairs: list[Pair]) -> Iterator[tuple[str, bytes]]:
    for p in pairs:
        meta = {"key": p.key, "caption": p.txt, "status": "success", "url": f"demo://{p.key}.jpg"}
        yield f"{p.key}.jpg", p.jpg
        yield f"{p.key}.txt", p.txt.encode()
        yield f"{p.key}.json", json.dumps(meta, sort_keys=True).encode()


EVAL_SPLITS = ("test", "val")


def _eval_pairs(seed: int, domain: str, per_class: int, size: int, split: str = "test",
                composite: bool = False) -> Iterator[tuple[str, bytes, int]]:
    d = DOMAINS[domain]
    stream = f"eval/{domain}" if split == "test" else f"eval-{split}/{domain}"   # disjoint draws
    i = 0
    for c, label in enumerate(d.classes):
        for _ in range(per_class):
            jpg = _image(_rng(seed, stream, i), domain, label, size, composite)[0]
            yield f"{i:06d}", jpg, c
            i += 1


def generate(out: str, cfg: DemoConfig, storage: StorageConfig, log=print) -> dict:
    """Write the whole demo world under ``out`` (local or s3://); returns world.json's content."""
    fs, root = filesystem(out, storage)
    fs.makedirs(root, exist_ok=True)
    truth = []
    counts = {}
    web = {"train": (cfg.samples, DOMAIN_SHARES), "new_domain": (cfg.new_domain_samples, {NEW_DOMAIN: 1.0})}
    for split, (n, domains) in web.items():
        if n == 0:
            continue
        pairs = web_pairs(cfg.seed, split, n, cfg.image_size, domains, cfg.samples_per_shard,
                          cfg.composite)
        shards = _write_shards(fs, join(root, split), pairs, cfg.samples_per_shard)
        log(f"  {split}: {n} pairs in {shards} shards")
        truth += _truth(pairs, split)
        counts[split] = {"pairs": n, "shards": shards,
                         "noise": {k: sum(p.noise == k for p in pairs) for k in ["clean", *NOISE_SHARES]}}
    tasks = {}
    for domain in (*TRAIN_DOMAINS, NEW_DOMAIN):
        d = DOMAINS[domain]
        base = join(root, "eval", domain)
        fs.pipe_file(join(base, "classnames.txt"), ("\n".join(d.classes) + "\n").encode())
        fs.pipe_file(join(base, "zeroshot_classification_templates.txt"),
                     ("\n".join(d.prompts) + "\n").encode())
        for split in EVAL_SPLITS:
            samples = list(_eval_pairs(cfg.seed, domain, cfg.eval_per_class, cfg.image_size, split,
                                       cfg.composite))
            members = (m for k, jpg, c in samples
                       for m in ((f"{k}.jpg", jpg), (f"{k}.cls", str(c).encode())))
            fs.pipe_file(join(base, split, "0.tar"), tar_bytes(members))
            fs.pipe_file(join(base, split, "nshards.txt"), b"1\n")
        tasks[domain] = {"classes": len(d.classes), "images": len(samples)}
    log(f"  eval: {len(tasks)} zero-shot tasks, {cfg.eval_per_class} images per class in "
        f"each of {' and '.join(EVAL_SPLITS)}")
    retrieval = web_pairs(cfg.seed, "retrieval", 100 * len(TRAIN_DOMAINS), cfg.image_size,
                          DOMAIN_SHARES, 10_000, cfg.composite)
    fs.pipe_file(join(root, "eval", "retrieval", "test", "0.tar"),
                 tar_bytes(m for p in retrieval if p.noise == "clean"
                           for m in ((f"{p.key}.jpg", p.jpg), (f"{p.key}.txt", p.txt.encode()))))
    fs.pipe_file(join(root, "eval", "retrieval", "test", "nshards.txt"), b"1\n")
    _write_truth(fs, root, truth)
    world = {
        "seed": cfg.seed, "image_size": cfg.image_size, "composite": cfg.composite,
        "train_domains": {d: list(DOMAINS[d].classes) for d in TRAIN_DOMAINS},
        "new_domain": {NEW_DOMAIN: list(DOMAINS[NEW_DOMAIN].classes)},
        "domain_shares": DOMAIN_SHARES, "noise_shares": NOISE_SHARES,
        "splits": counts, "tasks": tasks,
        "retrieval_pairs": sum(p.noise == "clean" for p in retrieval),
    }
    fs.pipe_file(join(root, "world.json"), (json.dumps(world, indent=2) + "\n").encode())
    return world


TRUTH_COLUMNS = ["key", "split", "domain", "label", "noise", "caption_domain", "caption_label",
                 "fg_domain", "fg_label", "bg_domain", "bg_label"]


def _write_shards(fs, folder: str, pairs: list[Pair], per_shard: int) -> int:
    """Web pairs as webdataset tars ``folder/00000.tar``...; returns the number of shards."""
    shards = [pairs[i:i + per_shard] for i in range(0, len(pairs), per_shard)]
    for s, shard in enumerate(shards):
        fs.pipe_file(join(folder, f"{s:05d}.tar"), tar_bytes(_web_members(shard)))
    return len(shards)


def _truth(pairs: list[Pair], split: str) -> list[dict]:
    return [{"split": split, **{c: getattr(p, c) for c in TRUTH_COLUMNS if c != "split"}}
            for p in pairs]


def _write_truth(fs, root: str, rows: list[dict]) -> None:
    buf = io.BytesIO()
    pd.DataFrame(rows, columns=TRUTH_COLUMNS).to_parquet(buf, index=False)
    fs.pipe_file(join(root, "truth.parquet"), buf.getvalue())


def same_content_negatives(truth: pd.DataFrame) -> float:
    """The chance that, for two distinct samples i and j drawn at random from ``truth`` (rows of
    truth.parquet, e.g. one expert's training data), image j holds the concept caption i names:
    a negative the contrastive loss pushes away although caption i is as true of it as of image i.

    With A_c the captions naming concept c, B_c the images holding c (in either layer) and
    D the samples whose own image holds what their caption names (the pairs i = j)::

        (sum over c of A_c * B_c  -  D) / (n * (n - 1))

    Junk and empty captions name no concept. In the plain world this is the chance that two
    samples are captioned with the same concept (noise aside); composites add the images whose
    unnamed layer is the concept named.
    """
    n = len(truth)
    if n < 2:
        raise ValueError(f"same_content_negatives needs at least 2 rows, got {n}")
    named = truth["caption_label"] != ""
    caption = list(zip(truth["caption_domain"], truth["caption_label"], strict=True))
    fg = list(zip(truth["fg_domain"], truth["fg_label"], strict=True))
    bg = list(zip(truth["bg_domain"], truth["bg_label"], strict=True))
    captions = Counter(c for c, keep in zip(caption, named, strict=True) if keep)
    images = Counter(c for c in fg + bg if c[0])
    both = sum(a * images[c] for c, a in captions.items())
    own = sum(keep and (c == f or c == b) for c, f, b, keep in zip(caption, fg, bg, named, strict=True))
    return float((both - own) / (n * (n - 1)))


def generate_web(out: str, cfg: DemoConfig, storage: StorageConfig, domains: dict[str, float],
                 seed: int, log=print) -> int:
    """Only web shards (``out/*.tar``) and their ``truth.parquet``: ``cfg.samples`` pairs over
    ``domains`` (name -> share, e.g. ``{"shapes": 0.5, "arrows": 0.5}`` for a mixed set in the
    same shards), from world seed ``seed``. For adding data to a trained run (docs/growth.md)."""
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; domains: {sorted(DOMAINS)}")
    fs, root = filesystem(out, storage)
    fs.makedirs(root, exist_ok=True)
    pairs = web_pairs(seed, "web", cfg.samples, cfg.image_size, domains, cfg.samples_per_shard,
                      cfg.composite)
    _write_shards(fs, root, pairs, cfg.samples_per_shard)
    _write_truth(fs, root, _truth(pairs, "web"))
    log(f"  {len(pairs)} pairs over {domains} (seed {seed}) at {out}")
    return len(pairs)


def write_parquet_copy(src_tar_uri: str, dst_uri: str, storage: StorageConfig) -> int:
    """Convert webdataset shards to img2dataset-style parquet (key, caption, jpg); returns rows.

    The tars are read with Python's tarfile: this is a test-and-demo utility for making a
    parquet twin of the demo world, not an ingest path.
    """
    fs_src, _ = filesystem(src_tar_uri, storage)
    fs_dst, dst = filesystem(dst_uri, storage)
    fs_dst.makedirs(dst, exist_ok=True)
    total = 0
    for uri in expand_shards(src_tar_uri, storage, (".tar",)):
        rows: dict[str, dict] = {}
        with fs_src.open(strip_scheme(uri), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                base, ext = member.name.rsplit(".", 1)
                data = tar.extractfile(member).read()
                rows.setdefault(base, {"key": base})[{"txt": "caption"}.get(ext, ext)] = data
        table = pd.DataFrame([{"key": r["key"], "caption": r["caption"].decode("utf-8"),
                               "jpg": r["jpg"]} for r in rows.values()])
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        name = uri.rsplit("/", 1)[-1].replace(".tar", ".parquet")
        fs_dst.pipe_file(join(dst, name), buf.getvalue())
        total += len(table)
    return total
