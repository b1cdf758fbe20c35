"""Request helpers shared by the routes of ``deepscope serve``: query and JSON values checked with one-line errors
(a ``DeepscopeError`` is answered 400 by the app), and the response headers the routes use."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from deepscope.errors import DeepscopeError, shown
from deepscope.serve.folder import ServedImage
from deepscope.serve.tiles import level_count

NO_STORE = {"Cache-Control": "no-store"}
TILE_CACHE = {"Cache-Control": "private, max-age=300"}  # a tile's URL names everything it shows but the file itself


def param(params: QueryParams, key: str, default: str | None = None) -> str:
    """A query parameter, or DeepscopeError (answered 400) naming it when missing."""
    value = params.get(key, default)
    if value is None or value == "":
        raise DeepscopeError(f"query parameter {key!r} is missing")
    return value


def integer(value: Any, what: str) -> int:
    """An integer from a query string or JSON value (a JSON integer exactly, however large); DeepscopeError naming
    ``what`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        number = float(value) if isinstance(value, str | float) else math.nan
    except ValueError:
        number = math.nan
    if not number.is_integer():  # also NaN and infinity
        raise DeepscopeError(f"{what}: expected an integer, got {shown(value)}")
    return int(number)


def slice_index(image: ServedImage, value: Any) -> int | None:
    """The slice of a 3D stack (0 when not given); None for a 2D image, which has only slice 0."""
    z = 0 if value in (None, "") else integer(value, "z")
    if image.ndim == 2:
        if z != 0:
            raise DeepscopeError(f"z={z}: {image.name} is a 2D image")
        return None
    if not 0 <= z < image.spatial[0]:
        raise DeepscopeError(f"z={z}: {image.name} has slices 0 to {image.spatial[0] - 1}")
    return z


def parse_contrast(text: str | None, image: ServedImage) -> list[tuple[float, float]]:
    """``lo,hi;lo,hi`` (one pair per channel) as display limits; the image's defaults when not given."""
    if not text:
        return image.contrast()
    try:
        limits = [tuple(float(v) for v in pair.split(",")) for pair in text.split(";")]
    except ValueError:
        raise DeepscopeError(f"contrast {shown(text)}: expected numbers as lo,hi;lo,hi") from None
    if len(limits) != image.channels or any(len(p) != 2 or not np.isfinite(p).all() or p[0] >= p[1] for p in limits):
        raise DeepscopeError(
            f"contrast {shown(text)}: expected {image.channels} pair(s) lo,hi of finite numbers with lo < hi"
        )
    return [(lo, hi) for lo, hi in limits]


def visible_region(value: Any, image: ServedImage, level: Any = None) -> tuple[slice, slice] | None:
    """``[y0, y1, x0, x1]`` of the viewed plane, clipped to the image, seen at pyramid ``level`` (slices of step
    2**level: a zoomed-out view needs only the pixels its overlay tiles show); None (the whole plane) when not given."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 4:
        raise DeepscopeError(f"visible {shown(value)}: expected [y0, y1, x0, x1]")
    y0, y1, x0, x1 = (integer(v, "visible") for v in value)
    height, width = image.spatial[-2:]
    y0, y1, x0, x1 = max(0, y0), min(height, y1), max(0, x0), min(width, x1)
    if y0 >= y1 or x0 >= x1:
        raise DeepscopeError(f"visible {shown(value)}: the region does not overlap the image ({height} x {width})")
    level = 0 if level is None else integer(level, "level")
    if not 0 <= level < level_count((height, width)):
        raise DeepscopeError(f"level {level}: {image.name} has pyramid levels 0 to {level_count((height, width)) - 1}")
    return slice(y0, y1, 2**level), slice(x0, x1, 2**level)


def png(data: bytes, headers: dict[str, str]) -> Response:
    return Response(data, media_type="image/png", headers=headers)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object ({} when empty); the size limit is enforced by Starlette (413). Python's reader also
    takes NaN and Infinity, which are not JSON and which no check downstream should have to expect; nesting too deep
    for it and integers of thousands of digits are refused as well."""
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise DeepscopeError("request body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError, as is a too long integer
        raise DeepscopeError(f"request body: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise DeepscopeError("request body: expected a JSON object")
    return body
