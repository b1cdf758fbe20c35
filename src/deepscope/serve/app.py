"""``deepscope serve``: the web app that shows a folder's images as tiles, takes brush strokes of class labels and
answers each with the live pixel classifier's updated prediction.

Starlette (a small, maintained ASGI toolkit: routing, static files, a request body limit and a test client, no extra
schema layer) served by uvicorn. Every route resolves image names through :class:`ServedFolder`, so no request can
read outside the folder; errors caused by the request are one-line JSON (``{"error": ...}``), never a traceback.

Who may talk to the server: by default it listens on the loopback only, answers only requests whose ``Host`` names
the loopback (a web page cannot reach it through DNS rebinding) and takes state changes only as JSON (a cross-site
page cannot send JSON without a CORS preflight, which this server never grants). Any other address requires the
random token printed in the start URL, sent as ``?token=``, ``X-Deepscope-Token`` or the cookie set by the page; a
request changing state on the strength of the cookie alone must also come from the server's own page (its Origin, or
Referer, names this host), since a browser sends the cookie with requests that other local pages make too.

One server per folder (``claim.claim_folder``): a second one would overwrite the first one's label files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import ExitStack, asynccontextmanager, closing, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepscope.atomic import WriteError
from deepscope.errors import DeepscopeError, one_line
from deepscope.serve import jobs, models, proofread
from deepscope.serve.claim import claim_folder
from deepscope.serve.folder import AccessError, ServedFolder, ServedImage, UnknownImageError
from deepscope.serve.http import (
    NO_STORE,
    TILE_CACHE,
    integer,
    json_body,
    param,
    parse_contrast,
    png,
    slice_index,
    visible_region,
)
from deepscope.serve.labels import Box, LabelStore, Stroke
from deepscope.serve.live import LiveClassifier
from deepscope.serve.project import LabelClass, Project
from deepscope.serve.tiles import TILE, labels_png, level_count, overlay_region, probabilities_png, uncertainty_png
from deepscope.serve.tiles import image_png as render_image_png
from deepscope.tasks.pixel.features import FILTERS, SCALES

STATIC = Path(__file__).with_name("static")
TOKEN_COOKIE = "deepscope_token"
TOKEN_HEADER = "x-deepscope-token"
CLASSIFIER_FILE = "pixel-classifier.safetensors"  # beside the images, where users look for it
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})  # methods that may change state
OVERLAYS = ("labels", "probabilities", "uncertainty", "classes")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to listen on, or a Host header's name) is this machine only."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(headers: Headers) -> str:
    """The name in a Host header without its port (``[::1]:8000`` -> ``::1``)."""
    host = headers.get("host", "")
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def same_origin(url: str | None, host: str) -> bool:
    """Whether ``url`` (an Origin or Referer header) names ``host`` (the Host header: name and port)."""
    try:
        return bool(url) and bool(host) and urlsplit(url).netloc.lower() == host.lower()
    except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 address)
        return False


def token_matches(offered: str | None, token: str) -> bool:
    """Whether ``offered`` is ``token``, in constant time; compared as bytes, because ``compare_digest`` refuses
    strings with non-ASCII characters (a request could send any)."""
    if not offered:
        return False
    return secrets.compare_digest(offered.encode("utf-8", "surrogatepass"), token.encode())


class Guard:
    """ASGI middleware deciding who may send requests: the token (when set), the Host header (when restricted to
    ``hosts``), same-origin browsers only, and JSON for every request that changes state (see the module docstring).
    A valid ``?token=`` sets a cookie, so the page's own tile and API requests need not repeat it."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: Collection[str] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = self.refusal(scope, headers)
        if problem is not None:
            await JSONResponse({"error": problem[1]}, problem[0], headers=NO_STORE)(scope, receive, send)
            return
        if self.token and token_matches(QueryParams(scope.get("query_string", b"")).get("token"), self.token):
            send = self.setting_cookie(send)
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        """(status, message) when the request must not reach the routes, else None."""
        host = headers.get("host", "")
        if self.hosts is not None and host_name(headers) not in self.hosts:
            return 403, f"host {host!r} is not served; open the address printed at start"
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, host):
            return 403, f"requests from {origin!r} are not allowed; open the page the server prints at start"
        if self.token is not None:
            credential = self.credential(scope, headers)
            if credential is None:
                return 401, "this server needs its token: open the address printed at start (with ?token=...)"
            if (
                credential == "cookie"
                and scope["method"] in CHANGING
                and not same_origin(origin if origin is not None else headers.get("referer"), host)
            ):
                return (
                    403,
                    "a change sent with the page's cookie must come from the page (no matching Origin or Referer)",
                )
        if scope["method"] in CHANGING and headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return 415, "send the request body as JSON (Content-Type: application/json)"
        return None

    def credential(self, scope: Scope, headers: Headers) -> str | None:
        """How the request proves it knows the token: "query" or "header" (a client given the token), "cookie" (a
        browser that opened the page, or a page of another local site: see ``refusal``), or None."""
        assert self.token is not None
        offered = {
            "query": QueryParams(scope.get("query_string", b"")).get("token"),
            "header": headers.get(TOKEN_HEADER),
            "cookie": Request(scope).cookies.get(TOKEN_COOKIE),
        }
        return next((how for how, value in offered.items() if token_matches(value, self.token)), None)

    def setting_cookie(self, send: Send) -> Send:
        cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
            await send(message)

        return sending


def project_json(project: Project) -> dict[str, Any]:
    return {
        "classes": [asdict(c) for c in project.classes],
        "features": project.features,
        "normalize": project.normalize,
        "classifier": project.classifier,
        "filters": list(FILTERS),
        "scales": list(SCALES),
    }


def classes_from_json(value: Any) -> list[LabelClass]:
    """The classes of a project request, not yet checked (``Project.check`` does)."""
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise DeepscopeError("project classes: expected a list of {value, name, colour}")
    try:
        return [LabelClass(value=c["value"], name=c["name"], colour=c["colour"]) for c in value]
    except KeyError as exc:
        raise DeepscopeError(f"project classes: every class needs value, name and colour; {exc} is missing") from None


class Session:
    """What the routes share: the folder, its labels, project and live classifier.

    Label changes are serialised (``editing``) so they are applied, and made durable, in the order they arrive.
    Refits are serialised too (``fitting``) and coalesce: a refit covers every change made before it started, so
    strokes that queued behind a slow refit share the next one instead of each paying for its own.
    """

    def __init__(self, root: str | Path) -> None:
        self.folder = ServedFolder(root)
        self.project = Project.load(self.folder)
        self.store = LabelStore(self.folder)
        self.live = LiveClassifier(self.folder, self.store, self.project)
        self.models = models.ModelService(self.folder)
        self.instances = proofread.InstanceEditor(self.folder, self.models)
        self.jobs = jobs.JobService(self.folder, self.project, self.store, self.classifier_path)
        self.editing = threading.Lock()
        self.fitting = threading.Lock()
        self.changes, self.fitted = 1, 0  # labels on disk count as a change: the first prediction fits them
        self.model: int | None = None

    def close(self) -> None:
        """Stop every part, each even when an earlier one failed (a failed save must not skip writing the labels)."""
        with ExitStack() as stack:
            for close in (
                self.store.close,
                self.store.flush,
                self.live.close,
                self.models.close,
                self.instances.close,
                self.jobs.close,
            ):
                stack.callback(close)  # run last-in first-out: jobs first, the labels last

    def image(self, params: QueryParams) -> ServedImage:
        return self.folder.open(param(params, "image"))

    # --- reading -------------------------------------------------------------------------------------------------

    def images(self) -> list[dict[str, Any]]:
        return [asdict(entry) for entry in self.folder.images()]

    def info(self, params: QueryParams) -> dict[str, Any]:
        image = self.image(params)
        return {
            "name": image.name,
            "spatial": list(image.spatial),
            "channels": image.channels,
            "ndim": image.ndim,
            "dtype": image.dtype,
            "levels": level_count((image.spatial[-2], image.spatial[-1])),
            "tile": TILE,
            "contrast": [list(pair) for pair in image.contrast()],
            "labels_version": self.store.version(image.name),
            "model": self.model,
        }

    def tile(self, params: QueryParams) -> bytes:
        image = self.image(params)
        z = slice_index(image, params.get("z"))
        level, ty, tx = (integer(param(params, key), key) for key in ("level", "ty", "tx"))
        values = image.pyramid(z).tile(level, ty, tx)
        return render_image_png(values, parse_contrast(params.get("contrast"), image))

    def overlay(self, params: QueryParams) -> bytes:
        kind = param(params, "kind")
        if kind not in OVERLAYS:
            raise DeepscopeError(f"overlay kind {kind!r}: expected one of {', '.join(OVERLAYS)}")
        image = self.image(params)
        z = slice_index(image, params.get("z"))
        level, ty, tx = (integer(param(params, key), key) for key in ("level", "ty", "tx"))
        labels = self.store.labels(image.name)
        labels = labels if z is None else labels[z]
        if kind == "labels":
            return labels_png(overlay_region(labels, level, ty, tx), self.colours())
        empty = np.zeros_like(overlay_region(labels, level, ty, tx))  # checks the tile; shown until predicted
        if kind == "uncertainty":
            uncertainty = self.live.uncertainty(image.name, z)
            return uncertainty_png(empty if uncertainty is None else overlay_region(uncertainty, level, ty, tx))
        probs, classes = self.live.probabilities(image.name, z), self.live.classes()
        if probs is None or len(probs) != len(classes):  # not predicted, or only by a model of other classes so far
            return labels_png(empty, {})
        region = overlay_region(probs, level, ty, tx)
        colours = self.colours()
        if kind == "probabilities":
            return probabilities_png(region, [colours.get(v, "#808080") for v in classes])
        values = np.asarray(classes, np.uint8)[region.argmax(axis=0)]
        values[region.max(axis=0) == 0] = 0  # not predicted yet
        return labels_png(values, colours)

    def colours(self) -> dict[int, str]:
        return {c.value: c.colour for c in self.project.classes}

    def status(self, params: QueryParams) -> dict[str, Any]:
        """The live model's progress on the image, its labels' version, and why its label file could not be written
        (``labels_error``, None when it could: the strokes are safe in the journal either way)."""
        image = self.image(params)
        error = self.store.write_error(image.name)
        # no server paths in the page
        return {
            **self.live.status(image.name),
            "labels_version": self.store.version(image.name),
            "labels_error": error and error.replace(f"{self.folder.root}/", ""),
        }

    # --- changing ------------------------------------------------------------------------------------------------

    def change(self, params: QueryParams, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Apply a stroke, undo or redo (durably), refit and predict the visible region; the reply of the three."""
        image = self.image(params)
        z, region = self.viewed(image, body)  # checked first: a refused request changes nothing
        with self.editing:
            changed: Box | None
            if action == "stroke":
                stroke = Stroke.from_json(body, image.spatial)
                if stroke.label and stroke.label not in self.colours():
                    raise DeepscopeError(f"label {stroke.label} is not a class of the project; add the class first")
                if stroke.label:  # first: a project that cannot be saved refuses the stroke rather than answer
                    self.project.record(self.folder, "labelled", image.name)  # an error for a stroke it made
                changed = self.store.apply(image.name, stroke)
            else:
                changed = self.store.undo(image.name) if action == "undo" else self.store.redo(image.name)
            if changed is not None:
                self.changes += 1
        reply = self.predict_visible(image, z, region)
        reply["bbox"] = None if changed is None else [[s.start, s.stop] for s in changed]
        return reply

    @staticmethod
    def viewed(image: ServedImage, body: dict[str, Any]) -> tuple[int | None, tuple[slice, slice] | None]:
        """The slice and the visible region a request names (``z``, ``visible`` seen at ``level``)."""
        return slice_index(image, body.get("z")), visible_region(body.get("visible"), image, body.get("level"))

    def predict_visible(self, image: ServedImage, z: int | None, region: tuple[slice, slice] | None) -> dict[str, Any]:
        """Refit when labels changed since the last fit, then predict the visible region with the current model."""
        with self.fitting:
            if self.fitted < self.changes:
                self.fitted = self.changes
                self.model = self.live.refit()
            if self.model is not None:
                self.live.predict(image.name, region, z)
            return {"labels_version": self.store.version(image.name), "model": self.model}

    def update_project(self, body: dict[str, Any]) -> dict[str, Any]:
        """New class names and colours, added classes, and a new feature selection (the next prediction refits)."""
        unknown = set(body) - {"classes", "features"}
        if unknown:
            raise DeepscopeError(
                f"project: unknown setting(s) {', '.join(sorted(unknown))}; expected classes, features"
            )
        with self.fitting:
            classes = self.project.classes
            if "classes" in body:
                classes = classes_from_json(body["classes"])
            features = body.get("features", self.project.features)
            candidate = Project(
                classes=classes, features=features, normalize=self.project.normalize, classifier=self.project.classifier
            )
            candidate.check(self.folder)  # every value of the request checked first, then how they relate
            removed = sorted(set(self.colours()) - {c.value for c in classes})
            if removed:  # their labels would be left without a class
                raise DeepscopeError(
                    f"project classes: class(es) {removed} cannot be removed, only renamed or recoloured"
                )
            if features != self.project.features:
                self.live.set_features(features)
                self.fitted, self.model = 0, None  # the next prediction fits on the new features
            self.project.classes, self.project.features = candidate.classes, candidate.features
            self.project.save(self.folder)
        return project_json(self.project)

    def save_classifier(self) -> dict[str, Any]:
        """Save the live forest where ``deepscope pixel predict`` can use it, and record it in the project."""
        with self.fitting:
            classifier = self.live.classifier()
        if classifier is None:
            raise DeepscopeError("no classifier to save yet: label pixels of at least two classes")
        path = self.folder.root / CLASSIFIER_FILE
        classifier.save(path)
        self.project.classifier = CLASSIFIER_FILE
        self.project.save(self.folder)
        return {"path": str(path), "classes": classifier.classes, "model": self.model}

    def classifier_path(self) -> Path:
        """The live forest saved (for a shallow-to-deep job), its path."""
        return Path(self.save_classifier()["path"])


def create_app(
    folder: str | Path, token: str | None = None, max_body: int = 1 << 20, hosts: Collection[str] | None = None
) -> Starlette:
    """The app serving ``folder``; ``token`` is required of every request when given, and ``hosts`` (Host header
    names) restricts who may be talked to when given (``serve`` passes the loopback names)."""
    session = Session(folder)

    def reading(method: Any, headers: dict[str, str] | None = None) -> Any:
        """A GET route answering ``method(params)``, JSON or (with ``headers``) PNG bytes. Starlette runs plain
        functions in worker threads, so tiles keep coming while another is encoded or a refit runs."""

        def endpoint(request: Request) -> Response:
            result = method(request.query_params)
            return png(result, headers) if headers else JSONResponse(result, headers=NO_STORE)

        return endpoint

    def changing(action: str) -> Any:
        async def endpoint(request: Request) -> Response:
            body = await json_body(request)
            return JSONResponse(
                await run_in_threadpool(session.change, request.query_params, action, body), headers=NO_STORE
            )

        return endpoint

    async def predict(request: Request) -> Response:
        body = await json_body(request)
        params = request.query_params
        if "z" in params:
            body["z"] = params["z"]

        def run() -> dict[str, Any]:
            image = session.image(params)
            return session.predict_visible(image, *session.viewed(image, body))

        return JSONResponse(await run_in_threadpool(run), headers=NO_STORE)

    async def put_project(request: Request) -> Response:
        body = await json_body(request)
        return JSONResponse(await run_in_threadpool(session.update_project, body), headers=NO_STORE)

    async def save_classifier(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(session.save_classifier), headers=NO_STORE)

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=NO_STORE)

    routes = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/api/images", reading(lambda params: session.images())),
        Route("/api/info", reading(session.info)),
        Route("/api/tile", reading(session.tile, TILE_CACHE)),
        Route("/api/overlay", reading(session.overlay, NO_STORE)),
        Route("/api/status", reading(session.status)),
        Route("/api/project", reading(lambda params: project_json(session.project))),
        Route("/api/project", put_project, methods=["PUT"]),
        Route("/api/stroke", changing("stroke"), methods=["POST"]),
        Route("/api/undo", changing("undo"), methods=["POST"]),
        Route("/api/redo", changing("redo"), methods=["POST"]),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/classifier/save", save_classifier, methods=["POST"]),
        *models.routes(session.models),
        *proofread.routes(session.instances),
        *jobs.routes(session.jobs),
    ]

    def error(status: int) -> Any:
        async def handler(request: Request, exc: Exception) -> Response:
            return JSONResponse({"error": one_line(str(exc))}, status, headers=NO_STORE)

        return handler

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=NO_STORE)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises the exception after this reply, so uvicorn logs its traceback on the server's side
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details"}, 500)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(session.close)

    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, token=token, hosts=hosts)],
        lifespan=lifespan,
        exception_handlers={
            AccessError: error(403),
            UnknownImageError: error(404),
            DeepscopeError: error(400),
            WriteError: error(507),  # the disk is full: nothing wrong with the request
            HTTPException: http_error,
            Exception: internal_error,
        },
        max_body_size=max_body,
    )
    app.state.session = session
    return app


def listening(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port``, bound here rather than by uvicorn: a busy port is a one-line error,
    and ``--port 0`` can print the port it got."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise DeepscopeError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); choose another --port"
        ) from None
    sock.listen(2048)  # before the address is printed: a client may connect at once (uvicorn accepts from the backlog)
    return sock


def serve(folder: str | Path = ".", host: str = "127.0.0.1", port: int = 8000, open_token: bool | None = None) -> None:
    """Run the app until Ctrl-C. ``open_token``: require a token (None: only when ``host`` is not the loopback, where
    a token is always required; False there is refused). A folder another server holds is refused, naming it."""
    import uvicorn

    loopback = is_loopback(host)
    if open_token is False and not loopback:
        raise DeepscopeError(f"--host {host}: other machines can reach this address, so a token is required")
    token = secrets.token_urlsafe(24) if (open_token or not loopback) else None
    root = ServedFolder(folder).root
    with claim_folder(root) as announce, closing(listening(host, port)) as sock:
        shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
        url = f"http://{shown}:{sock.getsockname()[1]}/"
        announce(url)
        app = create_app(root, token=token, hosts=None if token else LOOPBACK_NAMES | {host.strip("[]").lower()})
        print(f"deepscope serve: open {url}" + (f"?token={token}" if token else "") + "  (Ctrl-C stops)", flush=True)
        # Ctrl-C: uvicorn shuts the app down cleanly (labels written), then passes Ctrl-C on
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


@contextmanager
def background_server(app: Starlette) -> Iterator[str]:
    """``app`` (from ``create_app``) served on a free loopback port by a thread of this process, for notebooks,
    scripts and tests that drive the page; yields its URL and shuts it down (labels written) on leaving. Its folder
    is claimed as ``serve`` claims it."""
    import uvicorn

    with claim_folder(app.state.session.folder.root) as announce, closing(listening("127.0.0.1", 0)) as sock:
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            for _ in range(400):
                if server.started or not thread.is_alive():
                    break
                thread.join(0.05)
            if not server.started:
                raise DeepscopeError("the server did not start")
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
            announce(url)
            yield url
        finally:
            server.should_exit = True
            thread.join(30)
