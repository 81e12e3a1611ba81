"""The bare HTTP stack: the same routes as shmmel, answered in-process (no IPC).

``bench --baseline`` serves ``app`` with gunicorn under the instance's settings, so a
figure divided by this one is the cost of shmmel above plain gunicorn + Falcon:

* ``POST /process`` parses and checks the JSON like shmmel, reverses the message;
* the audio routes read the body and answer as many bytes as they read: what shmmel
  answers for s16le audio at 80 mels (100 frames x 80 float32 = 32,000 bytes a second of
  audio, as many as 16 kHz s16le), so a 1 s chunk moves 32 KB and a 10 s file 320 KB each
  way in both (``/audio/streams`` makes an id; a DELETE, with no body, answers none).

``SHMMEL_BASELINE_SWITCH_US`` (set by :func:`shmmel.loadgen.targets.baseline`): the GIL switch
interval of the bare processes, when a comparison wants shmmel's ``http_switch_interval_us``
on both sides; unset or 0 keeps Python's stock 5 ms.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import falcon

_ids = itertools.count(1)
if _switch_us := int(os.environ.get("SHMMEL_BASELINE_SWITCH_US") or 0):
    sys.setswitchinterval(_switch_us / 1e6)


class Process:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = json.loads(req.bounded_stream.read())
        message = body["message"]
        if len(message.encode("utf-8")) > 4096:
            raise falcon.HTTPContentTooLarge()
        resp.media = {"result": message[::-1]}


class Audio:
    def on_post(self, req: falcon.Request, resp: falcon.Response, stream_id: str = "") -> None:
        stream = req.bounded_stream if req.content_length is not None else req.env["wsgi.input"]
        size = 0
        while data := stream.read(1 << 16):
            size += len(data)
        resp.content_type = "application/octet-stream"
        resp.data = bytes(size)

    on_delete = on_post


class Streams:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.status = falcon.HTTP_201
        resp.media = {"stream_id": f"b{next(_ids)}"}


class Ready:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"ready": 1}


def create_app() -> falcon.App:
    app = falcon.App()
    app.add_route("/process", Process())
    app.add_route("/audio/stream", Audio())
    app.add_route("/audio/streams", Streams())
    app.add_route("/audio/streams/{stream_id}", Audio())
    app.add_route("/readyz", Ready())
    app.add_route("/healthz", Ready())
    return app


app = create_app()
