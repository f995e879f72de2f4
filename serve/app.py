"""The HTTP interface: FastAPI routes over a ``Service``, and the guard in front of them.

Every error, whatever answers it (a route, the multipart parser, FastAPI's validation, the guard, the HTTP
protocol layer in ``command.py``), is JSON ``{"detail": "<one sentence>"}`` with no server path in it:
400 for a malformed request, 401 without the token (when one is set), 404 for an unknown job, 408 for a
body sent too slowly, 409 for a result that is not ready, 410 for a result gone from the server's disk,
413 for a body over the upload limit, 415 for a body that is not multipart/form-data, 422 for a bad option
or image (or a job that could never fit the memory budget), 429 when the queue or the memory budget is full
(with ``Retry-After``), 500 for a bug, 503 while the server shuts down or has too many connections, 507
when the state dir's disk is full. See docs/service.md.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import os
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import QueueFull, UserError
from engine.images import to_pil

from .service import RETRY_SECONDS, Busy, Recorder, Service, ServiceStopping
from .store import FINAL, Row, StoreBusy, StoreFull
from .uploads import CLIENT_OPTIONS, display_name, options_schema, parse_options
from .video import VideoJobs

STATIC = Path(__file__).parent / "static"
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
# The bundled samples the page offers, by name: a client names one of these, never a path.
SAMPLES = {p.name: p for p in sorted(SAMPLES_DIR.glob("*.jpg"))} if SAMPLES_DIR.is_dir() else {}
# Reachable without the token: the health check, and the page itself (static HTML and script that holds no
# data; it asks for the token and sends it with every request).
OPEN_PATHS = ("/health", "/")
# A request body must keep coming: each piece within ``body_seconds`` (``nst serve --body-timeout``), the
# whole within BODY_TOTAL times that.
BODY_SECONDS = 30.0
BODY_TOTAL = 10
SSE_POLL_SECONDS = 0.1
# An absolute path (two parts at least) in a sentence meant for a client: replaced, never shown.
_PATH = re.compile(r"(?<![\w.~/-])/(?:[\w.+@~-]+/)+[\w.+@~-]*")


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


def client_sentence(text: str) -> str:
    """A sentence as a client sees it: one line, and no file path of the server's (a path whose first part
    is a folder at the root of this machine's filesystem; a URL path such as /jobs/ID is not one)."""

    def hide(match: re.Match) -> str:
        first = match.group(0).split("/")[1]
        return "(a file on the server)" if first and _root_folder(first) else match.group(0)

    return _PATH.sub(hide, " ".join(str(text).split()))


@functools.lru_cache(maxsize=256)
def _root_folder(name: str) -> bool:
    return os.path.isdir(os.path.join(os.sep, name))


class Guard:
    """ASGI middleware: the bearer token, and the request body (its size, counted, not only as declared,
    and its pace: a body that stalls is refused)."""

    def __init__(self, app, token: Optional[str], max_bytes: int, body_seconds: float = BODY_SECONDS):
        self.app, self.token, self.max_bytes, self.body_seconds = app, token, max_bytes, body_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return await send_error(
                    send, 401, "this server needs its token: send the header 'Authorization: Bearer TOKEN'"
                )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, 413, _too_large(self.max_bytes))
        seen, complete, deadline = 0, False, time.monotonic() + BODY_TOTAL * self.body_seconds

        async def counted():
            nonlocal seen, complete
            if complete:  # after the body: only http.disconnect is left, which may come at any time
                return await receive()
            wait = min(self.body_seconds, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                raise BodyTooSlow() from None
            seen += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        return await self.app(scope, counted, send)


async def send_error(send, status: int, sentence: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"detail": client_sentence(sentence)}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        raw.append((b"www-authenticate", b"Bearer"))
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> str:
    return f"the request is larger than this server's {limit / 2**20:g} MiB upload limit; send smaller images"


def _error(status: int, sentence: str, **headers) -> JSONResponse:
    return JSONResponse({"detail": client_sentence(sentence)}, status_code=status, headers=headers or None)


def _retry() -> dict:
    return {"Retry-After": str(RETRY_SECONDS)}


class _DroppedStreams(logging.Filter):
    """asyncio's "socket.send() raised exception." for every write to a stream its reader closed: the stream
    ends at its next check, and the line says nothing the operator can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "socket.send() raised exception" not in record.getMessage()


def create_app(service: Service, token: Optional[str] = None, body_seconds: float = BODY_SECONDS) -> FastAPI:
    logging.getLogger("asyncio").addFilter(_DroppedStreams())

    videos = VideoJobs(service)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        videos.start()
        yield
        await asyncio.to_thread(videos.close)  # first: its frames run on the engine service.close closes
        await asyncio.to_thread(service.close)

    app = FastAPI(
        title="nst serve",
        summary="Neural style transfer as a service: queue jobs, follow them, fetch the results.",
        lifespan=lifespan,
    )
    app.add_middleware(Guard, token=token, max_bytes=service.limits.upload.max_bytes, body_seconds=body_seconds)
    max_styles = service.limits.max_styles

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc):
        return _error(413, _too_large(service.limits.upload.max_bytes))

    @app.exception_handler(BodyTooSlow)
    async def too_slow(request, exc):
        return _error(
            408,
            f"the request body stalled (no data for {body_seconds:g} s, or not all of it within "
            f"{BODY_TOTAL * body_seconds:g} s); send it again",
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "the request"
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if exc.status_code == 404 and exc.detail == "Not Found":
            return _error(404, f"there is nothing at {request.url.path[:60]!r}; the API is described at /docs")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path[:60]!r}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def bug(request, exc):
        logging.getLogger("nst.serve").exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"the server failed on this request ({type(exc).__name__}); it goes on serving")

    @app.get("/", include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health():
        """Whether the server is up; open to everyone (no token), and says whether the others need one."""
        return {**service.health(), "token_required": bool(token)}

    @app.get("/options")
    def options():
        """Every option a job may set (name, type, default, help, choices), from ``engine.Config``, and the
        server's limits; the page builds its form from this."""
        used, budget = service.memory_in_use()
        return {
            "options": options_schema(service.base),
            "limits": {
                "max_styles": max_styles,
                "max_output_pixels": service.limits.max_pixels,
                "max_upload_bytes": service.limits.upload.max_bytes,
                "max_input_pixels": service.limits.upload.max_pixels,
                "memory_budget_bytes": budget,
                "memory_reserved_bytes": used,
            },
        }

    @app.get("/samples")
    def samples():
        """The bundled sample images a job may name instead of uploading (``content_sample``, ``style_sample``)."""
        return {"samples": list(SAMPLES)}

    @app.get("/samples/{name}")
    def sample(name: str):
        if name not in SAMPLES:
            return _error(404, f"no sample named {name[:40]!r}; the samples are {', '.join(SAMPLES) or 'none'}")
        return Response(SAMPLES[name].read_bytes(), media_type="image/jpeg")

    @app.post("/jobs", status_code=201, openapi_extra=_job_form_schema())
    async def create_job(request: Request):
        """Queue a job: a content and one or more style images (uploads or sample names), and options."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter: samples only
            return _error(
                415,
                f"send the job as multipart/form-data (not {kind[:40] or 'a body without a type'}): a 'content' "
                "file or 'content_sample' name, 'style' files or 'style_sample' names, and options as fields",
            )
        staging = None
        try:
            try:
                async with request.form(max_files=1 + max_styles, max_fields=len(CLIENT_OPTIONS) + 2 + max_styles) as f:
                    texts, plan = await _read_form(f, max_styles)
            except StarletteHTTPException as exc:  # the multipart parser's refusals, in our words
                return _error(400, _multipart_sentence(str(exc.detail), max_styles))
            options = parse_options(texts)  # before any image is decoded: a bad option costs nothing
            config = service.check(options, sum(1 for k, _, _, _ in plan if k == "style"))
            staging = await asyncio.to_thread(service.store.staging)
            images, names = [], {"content": None, "styles": []}
            for kind_, what, name, data in plan:
                decode = functools.partial(service.decode, data, f"{what} {name!r}", config, kind_)
                images.append(await asyncio.get_running_loop().run_in_executor(service.decoder, decode))
                if kind_ == "content":
                    names["content"] = name
                else:
                    names["styles"].append(name)
            row = await asyncio.to_thread(service.submit, staging, config, options, images[0], images[1:], names)
            staging = None  # it is the job's folder now
        except (QueueFull, Busy) as exc:
            return _error(429, str(exc), **_retry())
        except ServiceStopping as exc:
            return _error(503, str(exc), **_retry())
        except StoreFull as exc:
            return _error(507, str(exc), **_retry())
        except StoreBusy as exc:
            return _error(503, str(exc), **_retry())
        except UserError as exc:
            return _error(422, str(exc))
        finally:
            if staging is not None:
                service.store.discard(staging)
        return JSONResponse(_job_json(row, service), status_code=201)

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str):
        """A job's state, options, latest progress, error (one sentence) and loss curve."""
        row = service.store.get(job_id)
        return _unknown(job_id) if row is None else _job_json(row, service, curve=True)

    @app.delete("/jobs/{job_id}")
    async def cancel_job(job_id: str):
        """Cancel a queued or running job (a finished one is left as it is); answers once it took effect, or
        with "running" if the running step takes longer than a few seconds (it ends after that step)."""
        row = await asyncio.to_thread(service.cancel, job_id)
        return _unknown(job_id) if row is None else _job_json(row, service)

    @app.get("/jobs/{job_id}/events")
    async def events(job_id: str, request: Request):
        """Server-sent events from the job's start (after a restart too): ``progress`` (step, total_steps,
        scale, scales, loss, parts, seconds; ``replayed: true`` with step and loss only for the steps of an
        earlier run of the server), then one of ``done``, ``failed`` (with ``error``), ``cancelled``;
        ``stopped`` when the server shuts down (the job goes on when it is back). Each event has an ``id``;
        a client that reconnects with ``Last-Event-ID`` gets the events after it."""
        if service.store.get(job_id) is None:
            return _unknown(job_id)
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() else 0
        return StreamingResponse(
            _event_stream(service, job_id, request, start),
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
            try:
                data = await asyncio.to_thread(_jpeg_of_file, service.result_path(row, 8))
            except (OSError, ValueError):
                return _gone(job_id)
            return Response(data, media_type="image/jpeg")
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
        try:  # opened now: the answer is this file even if it is removed while it is sent
            handle = open(service.result_path(row, int(bits)), "rb")
        except OSError:
            return _gone(job_id)
        name = f"nst-{job_id[:8]}{'-16bit' if bits == '16' else ''}.png"
        return StreamingResponse(
            _chunks(handle),
            media_type="image/png",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    # Video jobs (serve/video.py) ----------------------------------------------------------------------------

    @app.post("/videos", status_code=201)
    async def create_video(request: Request):
        """Queue a video job: a 'video' file, one or more style images ('style' files or 'style_sample' names),
        and options as for /jobs; the frames are stylised with temporal consistency, as ``nst stylize VIDEO``."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            return _error(415, f"send the video job as multipart/form-data, not {kind[:40] or 'a body without a type'}")
        try:
            try:
                async with request.form(max_files=1 + max_styles, max_fields=len(CLIENT_OPTIONS) + 2 + max_styles) as f:
                    texts, video, plan = await _read_video_form(f, max_styles)
            except StarletteHTTPException as exc:
                return _error(400, _multipart_sentence(str(exc.detail), max_styles))
            options = parse_options(texts)
            config = service.check(options, len(plan))
            styles = []
            for what, name, data in plan:
                decode = functools.partial(service.decode, data, f"{what} {name!r}", config, "style")
                styles.append(await asyncio.get_running_loop().run_in_executor(service.decoder, decode))
            job = await asyncio.to_thread(videos.submit, video[1], video[0], styles, config, options)
        except (QueueFull, Busy) as exc:
            return _error(429, str(exc), **_retry())
        except ServiceStopping as exc:
            return _error(503, str(exc), **_retry())
        except UserError as exc:
            return _error(422, str(exc))
        return JSONResponse(job.as_json(), status_code=201)

    @app.get("/videos/{job_id}")
    def get_video(job_id: str):
        """A video job's state, frames done of all, seconds per frame (first, later) and error."""
        job = videos.get(job_id)
        return _unknown(job_id) if job is None else job.as_json()

    @app.delete("/videos/{job_id}")
    async def cancel_video(job_id: str):
        """Cancel a video job: a queued one at once, a running one after its current step."""
        job = await asyncio.to_thread(videos.cancel, job_id)
        return _unknown(job_id) if job is None else job.as_json()

    @app.get("/videos/{job_id}/preview")
    async def preview_video(job_id: str):
        """The frame being made, as JPEG (read every second or so; the last frame once done); 204 before."""
        job = videos.get(job_id)
        if job is None:
            return _unknown(job_id)
        image = job.preview
        if image is None:
            return Response(status_code=204)
        return Response(await asyncio.to_thread(_jpeg, image), media_type="image/jpeg", headers=_no_store())

    @app.get("/videos/{job_id}/result")
    def video_result(job_id: str):
        """The stylised video (H.264 in MP4, the input's frame rate, its audio copied)."""
        job = videos.get(job_id)
        if job is None:
            return _unknown(job_id)
        if job.state != "done":
            why = f"failed: {job.error}" if job.state == "failed" else f"is {job.state}"
            return _error(409, f"video job {job_id} has no result: it {why}")
        try:
            handle = open(videos.result_path(job), "rb")
        except OSError:
            return _gone(job_id)
        return StreamingResponse(
            _chunks(handle),
            media_type="video/mp4",
            headers={"Content-Disposition": f'attachment; filename="nst-{job_id[:8]}.mp4"'},
        )

    return app


async def _read_video_form(form, max_styles: int):
    """The option texts, the video ``(filename, bytes)`` and the styles to decode ``[(what, name, bytes)]``."""
    videos, styles, texts = [], [], {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            if key not in ("video", "style"):
                raise UserError(f"unexpected file field {key[:40]!r}; send a 'video' file and 'style' files")
            (videos if key == "video" else styles).append(value)
        elif key == "style_sample":
            styles.append(value)
        elif key in ("video", "style"):
            raise UserError(f"{key} must be an uploaded file")
        elif key in texts:
            raise UserError(f"option {key[:40]!r} is given twice")
        else:
            texts[key] = value
    parse_options(texts)
    if len(videos) != 1:
        raise UserError("send exactly one 'video' file")
    if not styles:
        raise UserError("send at least one style image: 'style' files or 'style_sample' names")
    if len(styles) > max_styles:
        raise UserError(f"send at most {max_styles} style images, not {len(styles)}")
    plan = []
    for i, item in enumerate(styles):
        what = f"style image {i + 1}" if len(styles) > 1 else "the style image"
        if isinstance(item, str):
            if item not in SAMPLES:
                raise UserError(f"no sample named {item[:40]!r}; the samples are {', '.join(SAMPLES) or 'none'}")
            plan.append((what, item, SAMPLES[item].read_bytes()))
        else:
            plan.append((what, display_name(item.filename, "style"), await item.read()))
    video = videos[0]
    return texts, (str(video.filename or ""), await video.read()), plan


def _chunks(handle, size: int = 1 << 20):
    with handle:
        while chunk := handle.read(size):
            yield chunk


def _multipart_sentence(detail: str, max_styles: int) -> str:
    if detail.startswith("Too many files"):
        return f"send at most {1 + max_styles} files: one content image and up to {max_styles} style images"
    if detail.startswith("Too many fields"):
        return f"the form has too many fields; a job takes the options {', '.join(CLIENT_OPTIONS)} and the images"
    if "maximum size" in detail:
        return "a form field is over 1 MiB; send images as files, options as short text fields"
    return f"the request body is not valid multipart/form-data ({detail.rstrip('.').lower()})"


async def _read_form(form, max_styles: int):
    """The option texts, and the images to decode: ``[(kind, what, name, bytes)]``, content first."""
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
    parse_options(texts)  # before reading any image: a bad option costs no decoding
    if len(uploads["content"]) + len(samples["content"]) != 1:
        raise UserError("send exactly one content image: a 'content' file or a 'content_sample' name")
    if not uploads["style"] and not samples["style"]:
        raise UserError("send at least one style image: 'style' files or 'style_sample' names")
    styles = uploads["style"] + samples["style"]
    if len(styles) > max_styles:
        raise UserError(f"send at most {max_styles} style images, not {len(styles)}")
    plan = [("content", "content image", f) for f in uploads["content"] + samples["content"]]
    plan += [
        ("style", f"style image {i + 1}" if len(styles) > 1 else "the style image", f) for i, f in enumerate(styles)
    ]
    out = []
    for kind, what, item in plan:
        if isinstance(item, str):
            if item not in SAMPLES:
                raise UserError(f"no sample named {item[:40]!r}; the samples are {', '.join(SAMPLES) or 'none'}")
            out.append((kind, what, item, SAMPLES[item].read_bytes()))
        else:
            out.append((kind, what, display_name(item.filename, kind), await item.read()))
    return texts, out


async def _event_stream(service: Service, job_id: str, request: Request, start: int):
    number = 0  # the id of the next event

    def sse(event: dict):
        nonlocal number
        number += 1
        return _sse(number - 1, event) if number - 1 >= start else None

    recorder = service.recorders.get(job_id)
    while recorder is None:  # finished in an earlier run, or waiting in a restart's backlog
        row = service.store.get(job_id)
        if row.state in FINAL:
            for text in _replay(row.history):
                if (out := sse(text)) is not None:
                    yield out
            if (out := sse(_final_event(row))) is not None:
                yield out
            return
        if service.stopping:
            yield _sse(number, {"type": "stopped"})
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(SSE_POLL_SECONDS)
        recorder = service.recorders.get(job_id)
    for event in _replay(recorder.before):
        if (out := sse(event)) is not None:
            yield out
    seen = 0
    while True:
        job = recorder.job  # read before ``events``: the recorder sets ``events`` before it lets the job go
        kept = recorder.events
        if job is None and kept is None and recorder._ready.is_set():  # refused on a restart: the table says why
            row = service.store.get(job_id)
            if row.state in FINAL:
                if (out := sse(_final_event(row))) is not None:
                    yield out
                return
        elif job is not None or kept is not None:
            # What is there now, without waiting: from the engine's Job while it runs, then from its events.
            source = job.events(start=seen, timeout=0) if job is not None else iter(kept[seen:])
            try:
                for event in source:
                    seen += 1
                    if event["type"] == "progress":
                        if (out := sse(_public_progress(event))) is not None:
                            yield out
                        continue
                    while not recorder.settled.is_set():  # the outcome is being recorded (the result saved)
                        await asyncio.sleep(SSE_POLL_SECONDS)
                    if (out := sse(_client_event(recorder.final))) is not None:
                        yield out
                    return
            except TimeoutError:
                pass  # no new event yet
        if service.stopping:
            yield _sse(number, {"type": "stopped"})
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(SSE_POLL_SECONDS)


def _replay(curve) -> list:
    return [{"type": "progress", "step": step, "loss": loss, "replayed": True} for step, loss in curve]


def _public_progress(event: dict) -> dict:
    keep = ("step", "total_steps", "scale", "scales", "loss", "parts", "seconds")
    return {"type": "progress", **{k: event[k] for k in keep if k in event}}


def _client_event(event: Optional[dict]) -> dict:
    event = dict(event or {"type": "failed", "error": "the job's outcome was not recorded"})
    if "error" in event:
        event["error"] = client_sentence(event["error"])
    return event


def _final_event(row: Row) -> dict:
    event = {"type": row.state}
    if row.error:
        event["error"] = client_sentence(row.error)
    if row.seconds is not None:
        event["seconds"] = row.seconds
    return event


def _sse(number: int, event: dict) -> str:
    return f"id: {number}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


def _job_json(row: Row, service: Service, curve: bool = False) -> dict:
    recorder: Optional[Recorder] = service.recorders.get(row.id)
    state = row.state
    if recorder is not None and recorder.job is not None and not recorder.settled.is_set():
        state = "running" if str(recorder.job.state) == "running" else row.state  # fresher than the table
    out = {
        "id": row.id,
        "state": state,
        "created": row.created,
        "updated": row.updated,
        "inputs": row.inputs,
        "options": row.options,
        "progress": row.progress,
        "error": client_sentence(row.error) if row.error else None,
        "seconds": row.seconds,
        "resumed": row.resumed,
    }
    if recorder is not None and recorder.last is not None and not recorder.settled.is_set():
        out["progress"] = recorder.last  # fresher than the table, which is written every few seconds
    if curve:
        out["curve"] = [list(p) for p in recorder.curve] if recorder is not None else row.history
    return out


def _unknown(job_id: str) -> JSONResponse:
    return _error(404, f"no job with id {job_id[:40]!r}")


def _gone(job_id: str) -> JSONResponse:
    return _error(410, f"job {job_id} is done but its result is no longer on the server's disk")


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
    every refusal is one sentence); the options' types, defaults and choices are at ``GET /options``."""
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
        properties[name] = {"type": "string", "description": "see GET /options"}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object", "properties": properties}}},
        }
    }
