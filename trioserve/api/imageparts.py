"""Image content parts of chat messages (OpenAI's ``image_url`` part), as the wire carries them.

``{"type": "image_url", "image_url": {"url": ..., "detail": "auto" | "low" | "high"}}``, and the string form
``"image_url": "..."`` some clients send. ``detail`` is accepted and has no effect: how many tokens an
image takes is the model's processor's choice. Only user messages carry images (as OpenAI's API).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict

from trioserve.api.validation import WireModel


class ImageUrl(WireModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(WireModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageUrl | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url
