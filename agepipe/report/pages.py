"""HTML pages of the reports, rendered by Jinja2 from `templates/`: static files, no server.

`render(name, **context)` fills one template (HTML-escaped by default). The filters the templates use
to print figures are `percent` (0.123 -> "12.3%"), `number` (thousands separators, None -> "–") and
`years` (one decimal). The quality report's site (visualize_image_information.py) and the model's report
card (model_card.py) both go through here, so every page looks the same.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"
MISSING = "–"


def percent(value, digits: int = 1) -> str:
    """A share as a percentage; a missing value as a dash.

    Examples
    --------
    >>> percent(0.1234), percent(None)
    ('12.3%', '–')
    """
    return MISSING if _missing(value) else f"{100 * float(value):.{digits}f}%"


def number(value) -> str:
    """A count with thousands separators, or a figure with three significant digits; a dash when missing.

    Examples
    --------
    >>> number(12345), number(0.12345), number(float("nan"))
    ('12,345', '0.123', '–')
    """
    if _missing(value):
        return MISSING
    return (
        f"{value:,}"
        if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1
        else f"{float(value):.3g}"
    )


def years(value) -> str:
    return MISSING if _missing(value) else f"{float(value):.1f}"


def link(path: str) -> str:
    """A relative file path as a link's address: every character a browser would read otherwise
    (#, ?, %, \\, spaces) percent-encoded.

    Examples
    --------
    >>> link("../data/a #2?.jpg")
    '../data/a%20%232%3F.jpg'
    """
    from urllib.parse import quote

    return quote(path, safe="/")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@functools.cache
def environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(percent=percent, number=number, years=years, link=link)
    return env


def render(name: str, **context) -> str:
    """The template `templates/<name>` filled with `context`."""
    return environment().get_template(name).render(**context)
