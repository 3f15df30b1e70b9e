"""The server's limits and switches: one frozen dataclass, documented field by field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"  # loopback unless told: a server is opened to a network on purpose
    port: int = 7860  # A1111's port, so its tools find us where they look
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer KEY`
    max_images: int = 8  # per request: OpenAI's n, A1111's batch_size * n_iter
    max_steps: int = 150  # A1111's own slider maximum
    max_pixels: int = 1024 * 1024  # per image, width * height
    max_upload_bytes: int = 16 << 20  # per uploaded image (multipart file or decoded base64)
    max_prompt_chars: int = 4000  # longer text is refused before it reaches the tokenizer
    max_queue: int = 64  # requests waiting per model; past it: 429 with Retry-After
    max_batch: int = 8  # images in one denoising loop
    max_wait_ms: float = 25.0  # how long the first request of a batch waits for companions
    request_timeout_s: float = 600.0  # queue wait + run; past it the request gets 504 and is cancelled
    retry_after_s: int = 1  # the Retry-After a 429 carries

    def __post_init__(self):
        for name in ("max_images", "max_steps", "max_pixels", "max_upload_bytes", "max_queue", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_wait_ms", "request_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset for no key)")
