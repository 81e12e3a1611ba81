"""Request helpers shared by the resources."""

from __future__ import annotations

import falcon


def require_media_type(req: falcon.Request, *types: str) -> str:
    media = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media not in types:
        raise falcon.HTTPUnsupportedMediaType(
            title="Unsupported Media Type",
            description=f"Content-Type must be {' or '.join(types)}, got {media or 'none'!r}")
    return media


def read_body(req: falcon.Request, limit: int) -> bytes:
    length = req.content_length  # parsed from the header on every access: read once
    if length is not None and length > limit:
        raise falcon.HTTPContentTooLarge(title="Content Too Large",
                                         description=f"body is {length} bytes; "
                                                     f"the limit is {limit}")
    # Falcon's bounded_stream needs a Content-Length; a chunked body is read from the server's
    # input, which decodes the chunks and ends at the last one.
    stream = req.bounded_stream if length is not None else req.env["wsgi.input"]
    data = stream.read(limit + 1)
    if length is not None and len(data) < length:
        raise falcon.HTTPBadRequest(title="Bad Request",
                                    description=f"the body ended after {len(data)} of the "
                                                f"{length} bytes its Content-Length "
                                                "announced")
    if len(data) > limit:
        raise falcon.HTTPContentTooLarge(title="Content Too Large",
                                         description=f"body exceeds {limit} bytes")
    return data
