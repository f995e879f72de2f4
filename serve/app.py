"""The HTTP interface: FastAPI routes over a ``Service``, and the guard in front of them.

Every error is JSON ``{"detail": "<one sentence>"}``: 401 without the token (when one is set), 404 for an
unknown job, 409 for a result that is not ready, 413 for a body over the upload limit, 422 for a bad
option or image, 429 when the queue is full, 503 while the server shuts down.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import QueueFull, UserError
from engine.images import to_pil

from .service import Service, ServiceStopping
from .store import FINAL, Row
from .uploads import CLIENT_OPTIONS, check_image, display_name, parse_options

STATIC = Path(__file__).parent / "static"
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
# The bundled samples the page offers, by name: a client names one of these, never a path.
SAMPLES = {p.name: p for p in sorted(SAMPLES_DIR.glob("*.jpg"))} if SAMPLES_DIR.is_dir() else {}
# Reachable without the token: the health check, and the page itself (static HTML and script that holds no
# data; it asks for the token and sends it with every request).
OPEN_PATHS = ("/health", "/")
MAX_STYLES = 8


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the bearer token, and the request body's size (counted, not only as declared)."""

    def __init__(self, app, token: Optional[str], max_bytes: int):
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return await _send_error(
                    send, 401, "this server needs its token: send the header 'Authorization: Bearer TOKEN'"
                )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, _too_large(self.max_bytes))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        return await self.app(scope, counted, send)


async def _send_error(send, status: int, sentence: str) -> None:
    body = json.dumps({"detail": sentence}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> str:
    return f"the request is larger than this server's {limit / 2**20:g} MiB upload limit; send smaller images"


def _error(status: int, sentence: str, **headers) -> JSONResponse:
    return JSONResponse({"detail": sentence}, status_code=status, headers=headers or None)


def create_app(service: Service, token: Optional[str] = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(
        title="nst serve",
        summary="Neural style transfer as a service: queue jobs, follow them, fetch the results.",
        lifespan=lifespan,
    )
    app.add_middleware(Guard, token=token, max_bytes=service.limits.upload.max_bytes)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc):
        return _error(413, _too_large(service.limits.upload.max_bytes))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "the request"
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/", include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health():
        """Whether the server is up; open to everyone (no token), and says whether the others need one."""
        return {"status": "stopping" if service.stopping else "ok", "token_required": bool(token)}

    @app.get("/samples")
    def samples():
        """The bundled sample images a job may name instead of uploading (``content_sample``, ``style_sample``)."""
        return {"samples": list(SAMPLES)}

    @app.get("/samples/{name}")
    def sample(name: str):
        if name not in SAMPLES:
            return _error(404, f"no sample named {name[:40]!r}; the samples are {', '.join(SAMPLES) or 'none'}")
        return FileResponse(SAMPLES[name], media_type="image/jpeg")

    @app.post("/jobs", status_code=201, openapi_extra=_job_form_schema())
    async def create_job(request: Request):
        """Queue a job: a content and one or more style images (uploads or sample names), and options."""
        staging = service.store.staging()
        try:
            async with request.form(max_files=1 + MAX_STYLES, max_fields=len(CLIENT_OPTIONS) + 2 + MAX_STYLES) as form:
                images, names, options = await _read_form(form, staging, service)
            row = await asyncio.to_thread(service.submit, staging, images[0], images[1:], options, names)
        except QueueFull as exc:
            service.store.discard(staging)
            return _error(429, str(exc), **{"Retry-After": "10"})
        except ServiceStopping as exc:
            service.store.discard(staging)
            return _error(503, str(exc))
        except UserError as exc:
            service.store.discard(staging)
            return _error(422, str(exc))
        except BaseException:
            service.store.discard(staging)
            raise
        return JSONResponse(_job_json(row, service), status_code=201)

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str):
        """A job's state, options, latest progress, error (one sentence) and loss curve."""
        row = service.store.get(job_id)
        return _unknown(job_id) if row is None else _job_json(row, service, curve=True)

    @app.delete("/jobs/{job_id}")
    def cancel_job(job_id: str):
        """Cancel a queued or running job (a finished one is left as it is)."""
        row = service.cancel(job_id)
        return _unknown(job_id) if row is None else _job_json(row, service)

    @app.get("/jobs/{job_id}/events")
    async def events(job_id: str):
        """Server-sent events: ``progress`` (step, total_steps, scale, loss, parts, seconds) in order, then one
        of ``done``, ``failed`` (with ``error``), ``cancelled``; ``stopped`` when the server shuts down
        (the job goes on when it is back)."""
        if service.store.get(job_id) is None:
            return _unknown(job_id)
        return StreamingResponse(
            _event_stream(service, job_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get("/jobs/{job_id}/preview")
    async def preview(job_id: str):
        """The current image as JPEG (the result once done); 204 before the job's first step."""
        row = service.store.get(job_id)
        if row is None:
            return _unknown(job_id)
        image = service.preview(job_id)
        if image is None and row.state == "done":
            return Response(_jpeg_of_file(service.result_path(row, 8)), media_type="image/jpeg")
        if image is None:
            return Response(status_code=204)
        return Response(await asyncio.to_thread(_jpeg, image), media_type="image/jpeg", headers=_no_store())

    @app.get("/jobs/{job_id}/result")
    def result(job_id: str, bits: str = "8"):
        """The result as PNG, 8 bits per channel, or 16 with ``?bits=16``."""
        row = service.store.get(job_id)
        if row is None:
            return _unknown(job_id)
        if bits not in ("8", "16"):
            return _error(422, f"bits must be 8 or 16, not {bits[:20]!r}")
        if row.state != "done":
            why = f"failed: {row.error}" if row.state == "failed" else f"is {row.state}"
            return _error(409, f"job {job_id} has no result: it {why}")
        return FileResponse(
            service.result_path(row, int(bits)),
            media_type="image/png",
            filename=f"nst-{job_id[:8]}{'-16bit' if bits == '16' else ''}.png",
        )

    return app


async def _read_form(form, staging: Path, service: Service):
    """The request's images (content first), their names as shown back, and the options; files go into
    ``staging`` as received, to be decoded again if the job is resumed after a restart."""
    uploads = {"content": [], "style": []}
    samples = {"content": [], "style": []}
    texts = {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):  # an uploaded file
            if key not in uploads:
                raise UserError(f"unexpected file field {key[:40]!r}; send 'content' and 'style' files")
            uploads[key].append(value)
        elif key in ("content_sample", "style_sample"):
            samples[key.split("_")[0]].append(value)
        elif key in ("content", "style"):
            raise UserError(f"{key} must be an uploaded file; to use a bundled sample, send {key}_sample=NAME")
        elif key in texts:
            raise UserError(f"option {key[:40]!r} is given twice")
        else:
            texts[key] = value
    options = parse_options(texts)  # before reading any image: a bad option costs no decoding
    if len(uploads["content"]) + len(samples["content"]) != 1:
        raise UserError("send exactly one content image: a 'content' file or a 'content_sample' name")
    if not uploads["style"] and not samples["style"]:
        raise UserError("send at least one style image: 'style' files or 'style_sample' names")
    if len(uploads["style"]) + len(samples["style"]) > MAX_STYLES:
        raise UserError(f"send at most {MAX_STYLES} style images")
    images, names = [], {"content": None, "styles": []}
    plan = [("content", "content image", f) for f in uploads["content"] + samples["content"]]
    styles = uploads["style"] + samples["style"]
    plan += [
        ("style", f"style image {i + 1}" if len(styles) > 1 else "the style image", f) for i, f in enumerate(styles)
    ]
    for index, (kind, what, item) in enumerate(plan):
        if isinstance(item, str):
            if item not in SAMPLES:
                raise UserError(f"no sample named {item[:40]!r}; the samples are {', '.join(SAMPLES) or 'none'}")
            data, name = SAMPLES[item].read_bytes(), item
        else:
            data, name = await item.read(), display_name(item.filename, kind)
        images.append(await asyncio.to_thread(check_image, data, f"{what} {name!r}", service.limits.upload))
        (staging / ("content.img" if index == 0 else f"style-{index - 1}.img")).write_bytes(data)
        if kind == "content":
            names["content"] = name
        else:
            names["styles"].append(name)
    return images, names, options


async def _event_stream(service: Service, job_id: str):
    sent = 0
    while True:
        live = service.live.get(job_id)
        if live is None:  # finished in an earlier run, or waiting in a restart's backlog
            row = service.store.get(job_id)
            if row.state in FINAL:
                if row.progress:
                    yield _sse(0, row.progress)
                yield _sse(1, _final_event(row))
                return
        else:
            events = live.events[sent:]
            for event in events:
                yield _sse(sent, event)
                sent += 1
                if event["type"] in ("done", "failed", "cancelled", "stopped"):
                    return
        if service.stopping:
            yield _sse(sent, {"type": "stopped"})
            return
        await asyncio.sleep(0.1)


def _final_event(row: Row) -> dict:
    event = {"type": row.state}
    if row.error:
        event["error"] = row.error
    if row.seconds is not None:
        event["seconds"] = row.seconds
    return event


def _sse(number: int, event: dict) -> str:
    return f"id: {number}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


def _job_json(row: Row, service: Service, curve: bool = False) -> dict:
    live = service.live.get(row.id)
    out = {
        "id": row.id,
        "state": row.state,
        "created": row.created,
        "updated": row.updated,
        "inputs": row.inputs,
        "options": row.options,
        "progress": row.progress,
        "error": row.error,
        "seconds": row.seconds,
        "resumed": row.resumed,
    }
    if live is not None and live.events and live.events[-1].get("type") == "progress":
        out["progress"] = live.events[-1]  # fresher than the table, which is written every few seconds
    if curve:
        out["curve"] = list(live.curve) if live is not None else row.history
    return out


def _unknown(job_id: str) -> JSONResponse:
    return _error(404, f"no job with id {job_id[:40]!r}")


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _jpeg_of_file(path: Path) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _no_store() -> dict:
    return {"Cache-Control": "no-store"}


def _job_form_schema() -> dict:
    """The multipart body of ``POST /jobs`` for the OpenAPI page (the route reads the form itself, so that
    every refusal is one sentence)."""
    properties = {
        "content": {"type": "string", "format": "binary", "description": "the content image"},
        "style": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "one or more style images",
        },
        "content_sample": {"type": "string", "description": "a bundled sample instead of a content upload"},
        "style_sample": {"type": "string", "description": "a bundled sample instead of a style upload"},
    }
    for name in CLIENT_OPTIONS:
        properties[name] = {"type": "string", "description": "as the nst stylize option of this name"}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object", "properties": properties}}},
        }
    }
