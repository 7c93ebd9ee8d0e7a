"""``GET /``: the upload page, rendered by Jinja2 with autoescape on."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from .. import __version__


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                              autoescape=True)


def render_index(svc) -> str:
    targets = list(svc.models.defaults) if svc.models else list(svc.config.targets)
    return _env().get_template("index.html").render(version=__version__, targets=targets, ready=svc.ready,
                                                    auth=svc.keys.enabled,
                                                    max_caption_chars=svc.config.max_caption_chars)
