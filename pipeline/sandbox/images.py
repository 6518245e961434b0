"""Cheap, deterministic PNGs and the tool models' real transforms (slice, cut out, upscale)."""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache

from PIL import Image, ImageChops

_GRID = 8  # cells per side of the colour grid every generated image is made of
_COMPRESS_LEVEL = 1  # fast zlib: the sandbox must never be what limits a benchmark
MAX_SIDE = 8192


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of `image`, encoded quickly."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=_COMPRESS_LEVEL)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    """Open image bytes; raise ValueError if they are not an image Pillow can read."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # Pillow raises many types for garbage input
        raise ValueError(f"not a readable image: {exc}") from exc
    return image


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def grid_image(key: str, width: int, height: int) -> Image.Image:
    """An 8x8 colour grid derived from `key`, scaled to width x height."""
    colours = hashlib.shake_256(key.encode()).digest(_GRID * _GRID * 3)
    small = Image.frombytes("RGB", (_GRID, _GRID), colours)
    # A uniform border ring makes the corner colour the "background" that removal cuts out.
    border = colours[:3]
    for i in range(_GRID):
        for xy in ((i, 0), (i, _GRID - 1), (0, i), (_GRID - 1, i)):
            small.putpixel(xy, (border[0], border[1], border[2]))
    return small.resize((width, height), Image.Resampling.NEAREST)


def generated_png(key: str, width: int, height: int) -> bytes:
    """A deterministic text-to-image output: same key and size give the same bytes."""
    return encode_png(grid_image(key, width, height))


def img2img_png(key: str, width: int, height: int, source: bytes, strength: float) -> bytes:
    """An image-to-image output: the grid blended over the input by `strength`."""
    base = decode(source).convert("RGB").resize((width, height), Image.Resampling.NEAREST)
    return encode_png(Image.blend(base, grid_image(key, width, height), strength))


def inpaint_png(
    key: str, width: int, height: int, source: bytes, mask: bytes, strength: float
) -> bytes:
    """An inpainting output: img2img where the mask is white, the input elsewhere."""
    base = decode(source).convert("RGB").resize((width, height), Image.Resampling.NEAREST)
    painted = Image.blend(base, grid_image(key, width, height), strength)
    area = decode(mask).convert("L").resize((width, height), Image.Resampling.NEAREST)
    area = area.point(lambda value: 255 if value >= 128 else 0)
    return encode_png(Image.composite(painted, base, area))


@lru_cache(maxsize=32)
def slice_png(source: bytes, x_subdivisions: int, y_subdivisions: int) -> tuple[bytes, ...]:
    """Cut the image into x by y tiles, returned in reading order (row by row)."""
    image = decode(source)
    width, height = image.size
    tiles = []
    for row in range(y_subdivisions):
        for col in range(x_subdivisions):
            box = (
                col * width // x_subdivisions,
                row * height // y_subdivisions,
                (col + 1) * width // x_subdivisions,
                (row + 1) * height // y_subdivisions,
            )
            tiles.append(encode_png(image.crop(box)))
    return tuple(tiles)


def remove_background_png(source: bytes, background_color: str | None = None) -> bytes:
    """Make the top-left corner's colour transparent (or paint it `background_color`)."""
    image = decode(source).convert("RGBA")
    corner = image.getpixel((0, 0))
    assert isinstance(corner, tuple)
    solid = Image.new("RGBA", image.size, corner)
    distance = ImageChops.difference(image.convert("RGB"), solid.convert("RGB")).convert("L")
    # Near the corner colour -> alpha 0, everything else stays opaque.
    alpha = distance.point(lambda value: 255 if value > 12 else 0)
    image.putalpha(alpha)
    if background_color:
        backdrop = Image.new("RGBA", image.size, background_color)
        backdrop.alpha_composite(image)
        return encode_png(backdrop.convert("RGB"))
    return encode_png(image)


def upscale_png(source: bytes, factor: int) -> bytes:
    """The image resized by an integer factor."""
    width, height = image_size(source)
    return resize_png(source, width * factor, height * factor)


def resize_png(source: bytes, width: int, height: int) -> bytes:
    """The image resized to width x height (nearest neighbour, alpha kept)."""
    return encode_png(decode(source).resize((width, height), Image.Resampling.NEAREST))


def to_jpeg(data: bytes) -> bytes:
    """Encoded image bytes re-encoded as JPEG (alpha flattened onto white)."""
    image = decode(data)
    if image.mode in ("RGBA", "LA", "P"):
        backdrop = Image.new("RGBA", image.size, "white")
        backdrop.alpha_composite(image.convert("RGBA"))
        image = backdrop
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def dominant_colour(source: bytes) -> str:
    """The most common colour of a small thumbnail, as #rrggbb (used by captions)."""
    thumb = decode(source).convert("RGB").resize((16, 16), Image.Resampling.NEAREST)
    counts = thumb.getcolors(256) or [(1, (0, 0, 0))]
    _, rgb = max(counts, key=lambda item: item[0])
    assert isinstance(rgb, tuple)
    return "#{:02x}{:02x}{:02x}".format(*rgb[:3])
