"use strict";
/*
 * deepscope serve: the labelling page.
 *
 * The viewer is a stack of canvases (image, probabilities, uncertainty, classes, labels, cursor), each drawn from
 * 256-px PNG tiles of the pyramid level that matches the zoom, so only what is on screen is fetched. A tile stays
 * drawn until its newer version (new contrast, labels version or prediction) has arrived: no flicker while
 * updating. A stroke is drawn locally at once, sent on pointer-up (strokes are sent one after another, in order),
 * and the overlays are reloaded with the versions of the reply; the live status is then polled until the
 * server's background prediction of the rest of the image is done.
 *
 * The body's data attributes say where the page stands (data-image, data-labels-version, data-model-version,
 * data-pending, data-busy, data-ready = every visible tile of the shown layers is at its current version and
 * nothing is pending, data-error), for scripts and tests to wait on.
 */

const TILE_REQUESTS = 6;       // tiles fetched at once
const CACHED_TILES = 400;      // per layer
const POLL_MS = 400;
const MAX_POINTS = 10000;      // the server's limit per stroke
const MIN_SCALE_FACTOR = 0.25; // of the scale that fits the image
const MAX_SCALE = 64;          // screen pixels per image pixel
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const OVERLAYS = [  // bottom to top: [kind, shown at start, opacity]
  ["probabilities", true, 0.45], ["uncertainty", false, 0.6], ["classes", false, 0.5], ["labels", true, 0.85]];

const $ = (id) => document.getElementById(id);
/** Tools added by other scripts (models, proofreading): name -> {start(point, event), move(point, event), end(),
 *  pointer: true for a tool that picks what is under the pointer (a crosshair, not the brush)}, points in image
 *  coordinates. Those scripts also listen to "deepscope:image" (an image or slice was opened). */
const tools = {};
const body = document.body;
const viewer = $("viewer");
const cursorCanvas = $("layer-cursor");

const state = {
  project: null, images: [], image: null, z: 0,
  tool: "brush", classValue: null, radius: 6,
  view: { scale: 1, x: 0, y: 0 },          // client = viewer origin + (x, y) + image coordinate * scale
  size: { width: 1, height: 1, dpr: 1 },
  contrast: null,                          // null: the server's default limits
  labelsVersion: 0, model: null, predictions: 0, colours: 0,
  generation: 0,                           // bumped when the image or slice changes: late tiles are dropped
  strokes: [], drawing: null, panning: null, space: false, pointer: null, toolActive: false,
  pending: 0, polling: false, pollAgain: false, renderQueued: false,
};

// ---- messages and server calls ---------------------------------------------------------------------------------

function say(text, kind = "info") {
  const line = $("status");
  line.textContent = text;
  line.className = kind;
  if (kind === "error") body.dataset.error = text;
}

async function api(method, path, payload) {
  const options = { method, headers: {} };
  if (method !== "GET") {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(payload || {});
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`the server cannot be reached (${err.message})`);
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function errorText(response) {
  try {
    return (await response.json()).error || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function query(values) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(values)) if (value !== null && value !== undefined) params.set(key, value);
  return params.toString();
}

function imageQuery(extra) {
  return query({ image: state.image.name, z: state.image.ndim === 3 ? state.z : null, ...extra });
}

// ---- tiles --------------------------------------------------------------------------------------------------------

class TileLayer {
  constructor(name, { opaque = false, version, url }) {
    this.name = name;
    this.canvas = $(`layer-${name}`);
    this.ctx = this.canvas.getContext("2d");
    this.opaque = opaque;        // opaque layers show coarser cached levels under missing tiles
    this.version = version;      // () => current version string, or null when there is nothing to show
    this.url = url;              // (level, ty, tx, version) => URL
    this.shown = true;
    this.tiles = new Map();      // "level/ty/tx" -> {level, ty, tx, version, bitmap}; Map order = recency
  }

  clear() {
    for (const tile of this.tiles.values()) tile.bitmap.close();
    this.tiles.clear();
  }

  keep(job, bitmap) {
    const key = `${job.level}/${job.ty}/${job.tx}`;
    const old = this.tiles.get(key);
    if (old && job.version !== this.version()) {  // a late answer must not replace a newer tile
      bitmap.close();
      return;
    }
    if (old) old.bitmap.close();
    this.tiles.delete(key);
    this.tiles.set(key, { ...job, bitmap });
    while (this.tiles.size > CACHED_TILES) {
      const [oldest, tile] = this.tiles.entries().next().value;
      tile.bitmap.close();
      this.tiles.delete(oldest);
    }
  }

  /** Draw the visible tiles of `level`, requesting those missing or out of date; true when all are current. */
  draw(level, needed) {
    const ctx = this.ctx;
    ctx.setTransform(state.size.dpr, 0, 0, state.size.dpr, 0, 0);
    ctx.clearRect(0, 0, state.size.width, state.size.height);
    const want = this.version();
    if (!this.shown || want === null) return true;
    ctx.imageSmoothingEnabled = this.opaque && state.view.scale < 1;  // class maps stay crisp at every zoom
    if (this.opaque) {
      const coarser = [...this.tiles.values()].filter((t) => t.level > level).sort((a, b) => b.level - a.level);
      for (const tile of coarser) drawTile(ctx, tile);
    }
    let complete = true;
    for (const [ty, tx] of needed) {
      const tile = this.tiles.get(`${level}/${ty}/${tx}`);
      if (tile) drawTile(ctx, tile);
      if (!tile || tile.version !== want) {
        complete = false;
        request(this, level, ty, tx, want);
      }
    }
    return complete;
  }
}

function drawTile(ctx, tile) {
  const factor = 2 ** tile.level * state.view.scale;
  const span = state.image.tile * 2 ** tile.level;
  ctx.drawImage(tile.bitmap, state.view.x + tile.tx * span * state.view.scale, state.view.y + tile.ty * span * state.view.scale,
    tile.bitmap.width * factor, tile.bitmap.height * factor);
}

const queue = [];
const inFlight = new Set();
const failed = new Set();

function request(layer, level, ty, tx, version) {
  const id = `${state.generation}|${layer.name}|${level}/${ty}/${tx}|${version}`;
  if (!inFlight.has(id) && !failed.has(id)) queue.push({ id, layer, level, ty, tx, version, generation: state.generation });
}

function pump() {
  while (inFlight.size < TILE_REQUESTS && queue.length) {
    const job = queue.shift();
    if (inFlight.has(job.id)) continue;
    inFlight.add(job.id);
    fetchTile(job).finally(() => {
      inFlight.delete(job.id);
      scheduleRender();
    });
  }
}

async function fetchTile(job) {
  try {
    const response = await fetch(job.layer.url(job.level, job.ty, job.tx, job.version));
    if (!response.ok) throw new Error(await errorText(response));
    const bitmap = await createImageBitmap(await response.blob());
    if (job.generation === state.generation) job.layer.keep(job, bitmap);
    else bitmap.close();
  } catch (err) {
    failed.add(job.id);
    say(`${job.layer.name} tile: ${err.message}`, "error");
  }
}

function labelsVersion() {
  return `${state.labelsVersion}.${state.colours}`;
}

function predictionVersion() {
  return state.model === null ? null : `${state.model}.${state.predictions}.${state.colours}`;
}

function overlayLayer(kind, version) {
  return new TileLayer(kind, {
    version,
    url: (level, ty, tx, v) => `/api/overlay?${imageQuery({ kind, level, ty, tx, v })}`,
  });
}

const layers = [
  new TileLayer("image", {
    opaque: true,
    version: () => contrastText(),
    url: (level, ty, tx, v) => `/api/tile?${imageQuery({ level, ty, tx, contrast: v || null })}`,
  }),
  overlayLayer("probabilities", predictionVersion),
  overlayLayer("uncertainty", predictionVersion),
  overlayLayer("classes", predictionVersion),
  overlayLayer("labels", labelsVersion),
];
const labelsLayer = layers[layers.length - 1];
const layerNamed = (name) => layers.find((layer) => layer.name === name);

// ---- view ---------------------------------------------------------------------------------------------------------

function plane() {
  const spatial = state.image.spatial;
  return [spatial[spatial.length - 2], spatial[spatial.length - 1]];
}

function resize() {
  const dpr = window.devicePixelRatio || 1;
  const width = viewer.clientWidth, height = viewer.clientHeight;
  state.size = { width, height, dpr };
  for (const canvas of viewer.querySelectorAll("canvas")) {
    canvas.width = Math.max(1, Math.round(width * dpr));
    canvas.height = Math.max(1, Math.round(height * dpr));
  }
  scheduleRender();
}

function fitScale() {
  const [height, width] = plane();
  return Math.min(state.size.width / width, state.size.height / height);
}

function fit() {
  const [height, width] = plane();
  const scale = fitScale() * 0.95;
  state.view = { scale, x: (state.size.width - width * scale) / 2, y: (state.size.height - height * scale) / 2 };
}

function zoom(factor, cx, cy) {
  const view = state.view;
  const scale = Math.min(MAX_SCALE, Math.max(fitScale() * MIN_SCALE_FACTOR, view.scale * factor));
  view.x = cx - (cx - view.x) * scale / view.scale;
  view.y = cy - (cy - view.y) * scale / view.scale;
  view.scale = scale;
  scheduleRender();
}

/** The pyramid level whose pixels are at least as fine as the screen's. */
function currentLevel() {
  const level = Math.floor(Math.log2(1 / (state.view.scale * state.size.dpr)) + 1e-9);
  return Math.max(0, Math.min(state.image.levels - 1, level));
}

/** [y0, y1, x0, x1] of the image on screen (integers, clipped), or null when none of it is. */
function visibleRect() {
  const [height, width] = plane();
  const { scale, x, y } = state.view;
  const y0 = Math.max(0, Math.floor(-y / scale)), y1 = Math.min(height, Math.ceil((state.size.height - y) / scale));
  const x0 = Math.max(0, Math.floor(-x / scale)), x1 = Math.min(width, Math.ceil((state.size.width - x) / scale));
  return y0 < y1 && x0 < x1 ? [y0, y1, x0, x1] : null;
}

function visibleTiles(level) {
  const rect = visibleRect();
  if (!rect) return [];
  const span = state.image.tile * 2 ** level;
  const tiles = [];
  for (let ty = Math.floor(rect[0] / span); ty <= Math.floor((rect[1] - 1) / span); ty++) {
    for (let tx = Math.floor(rect[2] / span); tx <= Math.floor((rect[3] - 1) / span); tx++) tiles.push([ty, tx]);
  }
  return tiles;
}

/** Every change comes here: data-ready stays "0" until a render has found everything current. */
function scheduleRender() {
  body.dataset.ready = "0";
  if (!state.renderQueued) {
    state.renderQueued = true;
    requestAnimationFrame(render);
  }
}

function render() {
  state.renderQueued = false;
  queue.length = 0;  // rebuilt below from what is visible now
  if (!state.image) return;
  const level = currentLevel();
  const needed = visibleTiles(level);
  const current = layers.map((layer) => layer.draw(level, needed));
  if (current[layers.indexOf(labelsLayer)]) {
    // strokes acknowledged and now drawn by the label tiles need no local copy any more
    state.strokes = state.strokes.filter((s) => s.version === null || s.version > state.labelsVersion);
  }
  const complete = current.every(Boolean);
  drawStrokes();
  drawCursor();
  pump();
  body.dataset.ready = complete && state.pending === 0 && !state.polling ? "1" : "0";
}

function drawStrokes() {
  const ctx = labelsLayer.ctx;
  const { scale, x, y } = state.view;
  for (const stroke of state.drawing ? [...state.strokes, state.drawing] : state.strokes) {
    ctx.save();
    ctx.globalCompositeOperation = stroke.label === 0 ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = stroke.label === 0 ? "#000" : colourOf(stroke.label);
    ctx.lineWidth = 2 * stroke.radius * scale;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    const [first, ...rest] = stroke.points;
    if (rest.length === 0) {
      ctx.arc(x + first[1] * scale, y + first[0] * scale, stroke.radius * scale, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(x + first[1] * scale, y + first[0] * scale);
      for (const [py, px] of rest) ctx.lineTo(x + px * scale, y + py * scale);
      ctx.stroke();
    }
    ctx.restore();
  }
}

function drawCursor() {
  const ctx = cursorCanvas.getContext("2d");
  ctx.setTransform(state.size.dpr, 0, 0, state.size.dpr, 0, 0);
  ctx.clearRect(0, 0, state.size.width, state.size.height);
  if (!state.pointer || state.space || state.panning || !state.image) return;
  ctx.beginPath();
  if (tools[state.tool] && tools[state.tool].pointer) {  // a tool that picks what is under the pointer: a crosshair
    const [px, py] = state.pointer;
    ctx.moveTo(px - 8, py); ctx.lineTo(px + 8, py); ctx.moveTo(px, py - 8); ctx.lineTo(px, py + 8);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 1.5;
    ctx.stroke();
    return;
  }
  ctx.arc(state.pointer[0], state.pointer[1], Math.max(1, state.radius * state.view.scale), 0, 2 * Math.PI);
  ctx.setLineDash(state.tool === "eraser" ? [4, 3] : []);
  ctx.strokeStyle = state.tool === "eraser" ? "#fff" : colourOf(state.classValue);
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

function colourOf(value) {
  const found = state.project && state.project.classes.find((c) => c.value === value);
  return found ? found.colour : "#808080";
}

function clientOrigin() {
  const rect = cursorCanvas.getBoundingClientRect();
  return [rect.left, rect.top];
}

/** Image coordinates (continuous: pixel i spans [i, i + 1)) of a pointer event. */
function toImage(event) {
  const [left, top] = clientOrigin();
  return [(event.clientY - top - state.view.y) / state.view.scale, (event.clientX - left - state.view.x) / state.view.scale];
}

// ---- painting -----------------------------------------------------------------------------------------------------

function startStroke(event) {
  const label = state.tool === "eraser" ? 0 : state.classValue;
  if (label === null) {
    say("add a class before painting", "error");
    return;
  }
  state.drawing = { points: [toImage(event)], radius: state.radius, label, version: null };
  scheduleRender();
}

function extendStroke(event) {
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const point = toImage(e);
    const last = state.drawing.points[state.drawing.points.length - 1];
    if (Math.hypot(point[0] - last[0], point[1] - last[1]) >= 0.5) state.drawing.points.push(point);
  }
  scheduleRender();
}

/** The stroke in the server's terms: pixel centres, points inside the image, at most MAX_POINTS. */
function strokeBody(stroke) {
  const [height, width] = plane();
  let points = stroke.points.map(([y, x]) => [
    Math.min(height - 1, Math.max(0, y - 0.5)), Math.min(width - 1, Math.max(0, x - 0.5))]);
  if (points.length > MAX_POINTS) {
    const step = Math.ceil(points.length / MAX_POINTS);
    points = points.filter((_, i) => i % step === 0 || i === points.length - 1);
  }
  return { points, radius: Math.max(0.5, stroke.radius), label: stroke.label, ...viewed() };
}

function finishStroke() {
  const stroke = state.drawing;
  state.drawing = null;
  state.strokes.push(stroke);
  send(`/api/stroke?${imageQuery({})}`, strokeBody(stroke), stroke);
}

/** Post a label change or prediction request; one at a time, in order, so the server applies strokes as painted. */
let chain = Promise.resolve();
function send(path, payload, stroke = null) {
  const generation = state.generation;
  setPending(+1);
  chain = chain.then(async () => {
    try {
      const reply = await api("POST", path, payload);
      if (stroke) stroke.version = reply.labels_version;
      if (generation === state.generation) applyReply(reply);
    } catch (err) {
      if (stroke) state.strokes = state.strokes.filter((s) => s !== stroke);
      say(err.message, "error");
    } finally {
      setPending(-1);
      scheduleRender();
    }
  });
  return chain;
}

/** Run a server call counted in data-pending, so that data-ready waits for it too. */
async function tracked(work) {
  setPending(+1);
  try {
    return await work();
  } finally {
    setPending(-1);
  }
}

function setPending(change) {
  state.pending += change;
  body.dataset.pending = String(state.pending);
  scheduleRender();
}

function applyReply(reply) {
  state.labelsVersion = reply.labels_version;
  state.model = reply.model;
  state.predictions += 1;  // the visible region was just predicted again
  body.dataset.labelsVersion = String(reply.labels_version);
  body.dataset.modelVersion = reply.model === null ? "" : String(reply.model);
  if (reply.model === null) say("label at least two classes to see predictions");
  poll();
}

/** What the server predicts first: the slice, and the region on screen at the pyramid level the overlays show. */
function viewed() {
  return { visible: visibleRect(), level: currentLevel(), z: state.image.ndim === 3 ? state.z : null };
}

function predictVisible() {
  return send(`/api/predict?${imageQuery({})}`, viewed());
}

function undoRedo(action) {
  if (state.image) send(`/api/${action}?${imageQuery({})}`, viewed());
}

/** Poll the live status until the background prediction of the rest of the image is done; the overlays are
 *  reloaded whenever more of the image has been predicted. */
function poll() {
  state.pollAgain = true;
  body.dataset.busy = "1";
  if (!state.polling) pollLoop();
}

async function pollLoop() {
  state.polling = true;
  let busy = true, predicted = null;
  try {
    while ((busy || state.pollAgain) && state.image) {
      state.pollAgain = false;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      const status = await api("GET", `/api/status?${imageQuery({})}`);
      busy = status.busy;
      if (predicted !== null && status.predicted !== predicted) {
        state.predictions += 1;
        scheduleRender();
      }
      predicted = status.predicted;
      if (status.labels_error) say(`${status.labels_error}; your strokes are kept and saved once writing works again`, "error");
      else if (status.model !== null) {
        const share = Math.round(100 * status.predicted);
        if (busy) say(`model ${status.model}: predicting the rest of the image (${share}%)`, "busy");
        else if (status.predicted === 0) say(`model ${status.model} was fitted on images with other channels or dimensions; label this image to fit one for images like it`);
        else say(`model ${status.model}: ${share}% predicted`);
      }
    }
  } catch (err) {
    say(err.message, "error");
  } finally {
    state.polling = false;
    body.dataset.busy = "0";
    scheduleRender();
  }
}

// ---- pointer and keyboard -----------------------------------------------------------------------------------------

cursorCanvas.addEventListener("pointerdown", (event) => {
  if (!state.image || state.drawing || state.panning) return;
  if (event.button === 1 || (event.button === 0 && state.space)) {
    event.preventDefault();
    state.panning = { x: event.clientX, y: event.clientY };
    cursorCanvas.classList.add("panning");
  } else if (event.button === 0 && tools[state.tool]) {
    state.toolActive = true;
    tools[state.tool].start(toImage(event), event);
  } else if (event.button === 0) {
    startStroke(event);
  } else {
    return;
  }
  cursorCanvas.setPointerCapture(event.pointerId);
});

cursorCanvas.addEventListener("pointermove", (event) => {
  const [left, top] = clientOrigin();
  state.pointer = [event.clientX - left, event.clientY - top];
  if (state.panning) {
    state.view.x += event.clientX - state.panning.x;
    state.view.y += event.clientY - state.panning.y;
    state.panning = { x: event.clientX, y: event.clientY };
    scheduleRender();
  } else if (state.drawing) {
    extendStroke(event);
  } else if (state.toolActive) {
    tools[state.tool].move(toImage(event), event);
  } else {
    drawCursor();
  }
});

function pointerEnd() {
  if (state.panning) {
    state.panning = null;
    cursorCanvas.classList.toggle("panning", state.space);
  } else if (state.drawing) {
    finishStroke();
  } else if (state.toolActive) {
    state.toolActive = false;
    tools[state.tool].end();
  }
}
cursorCanvas.addEventListener("pointerup", pointerEnd);
cursorCanvas.addEventListener("pointercancel", pointerEnd);
cursorCanvas.addEventListener("pointerleave", () => {
  state.pointer = null;
  drawCursor();
});
cursorCanvas.addEventListener("auxclick", (event) => event.preventDefault());
cursorCanvas.addEventListener("contextmenu", (event) => event.preventDefault());
cursorCanvas.addEventListener("wheel", (event) => {
  event.preventDefault();
  if (!state.image) return;
  const [left, top] = clientOrigin();
  zoom(Math.exp(-event.deltaY * (event.deltaMode === 1 ? 0.05 : 0.0015)), event.clientX - left, event.clientY - top);
}, { passive: false });

function typing(target) {
  return target.matches("input[type=text], input[type=number], textarea, select");
}

document.addEventListener("keydown", (event) => {
  if (typing(event.target)) return;
  const key = event.key.toLowerCase();
  if (event.ctrlKey || event.metaKey) {
    if (key === "z" || key === "y") {
      event.preventDefault();
      undoRedo(key === "y" || event.shiftKey ? "redo" : "undo");
    }
    return;
  }
  if (event.altKey) return;
  if (event.code === "Space") {
    event.preventDefault();
    document.activeElement.blur();  // a focused button would otherwise be pressed by the space bar
    state.space = true;
    cursorCanvas.classList.add("panning");
    drawCursor();
  } else if (key === "b" || key === "e") {
    setTool(key === "b" ? "brush" : "eraser");
  } else if (event.key === "[" || event.key === "]") {
    setRadius(event.key === "]" ? state.radius * 1.25 : state.radius / 1.25);
  } else if (/^[1-9]$/.test(event.key) && state.project) {
    const chosen = state.project.classes[Number(event.key) - 1];
    if (chosen) selectClass(chosen.value);
  }
});

document.addEventListener("keyup", (event) => {
  if (event.code === "Space") {
    state.space = false;
    cursorCanvas.classList.toggle("panning", Boolean(state.panning));
    drawCursor();
  }
});

// ---- controls -----------------------------------------------------------------------------------------------------

function setTool(tool) {
  state.tool = tool;
  for (const input of document.querySelectorAll("input[name=tool]")) input.checked = input.value === tool;
  drawCursor();
}

function setRadius(radius) {
  state.radius = Math.min(64, Math.max(0.5, Math.round(radius * 2) / 2));
  $("radius").value = state.radius;
  $("radius-value").textContent = state.radius;
  drawCursor();
}

function selectClass(value) {
  state.classValue = value;
  setTool("brush");
  for (const input of document.querySelectorAll("input[name=class]")) input.checked = Number(input.value) === value;
}

function renderImages() {
  const list = $("images");
  list.replaceChildren();
  for (const entry of state.images) {
    const item = document.createElement("li");
    item.textContent = entry.name;
    const detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = entry.error || (entry.shape ? entry.shape.join(" × ") : "");
    item.append(detail);
    item.dataset.name = entry.name;
    if (entry.error) {
      item.classList.add("broken");
      item.title = entry.error;
    } else {
      item.addEventListener("click", () => openImage(entry.name));
    }
    item.classList.toggle("current", state.image !== null && state.image.name === entry.name);
    list.append(item);
  }
}

function renderClasses() {
  const list = $("classes");
  list.replaceChildren();
  state.project.classes.forEach((cls, index) => {
    const item = document.createElement("li");
    const radio = Object.assign(document.createElement("input"), { type: "radio", name: "class", value: cls.value, checked: cls.value === state.classValue });
    radio.addEventListener("change", () => selectClass(cls.value));
    const colour = Object.assign(document.createElement("input"), { type: "color", value: cls.colour, title: "colour" });
    colour.addEventListener("change", () => saveClasses(state.project.classes.map((c) => c.value === cls.value ? { ...c, colour: colour.value } : c)));
    const name = Object.assign(document.createElement("input"), { type: "text", value: cls.name, title: `class ${cls.value}` });
    name.addEventListener("change", () => saveClasses(state.project.classes.map((c) => c.value === cls.value ? { ...c, name: name.value } : c)));
    const key = Object.assign(document.createElement("span"), { className: "key", textContent: index < 9 ? String(index + 1) : "" });
    item.append(key, radio, colour, name);
    list.append(item);
  });
}

/** Send the edited class list; true when the server took it. */
function saveClasses(classes) {
  return tracked(async () => {
    try {
      setProject(await api("PUT", "/api/project", { classes }));
      state.colours += 1;
      say("classes saved");
      return true;
    } catch (err) {
      renderClasses();  // back to what the server holds
      say(err.message, "error");
      return false;
    }
  });
}

function addClass() {
  const values = state.project.classes.map((c) => c.value);
  const value = Math.max(0, ...values) + 1;
  if (value > 255) {
    say("at most 255 classes", "error");
    return;
  }
  saveClasses([...state.project.classes, { value, name: `class ${value}`, colour: PALETTE[(value - 1) % PALETTE.length] }])
    .then((saved) => saved && selectClass(value));
}

function setProject(project) {
  state.project = project;
  if (!project.classes.some((c) => c.value === state.classValue)) state.classValue = project.classes.length ? project.classes[0].value : null;
  renderClasses();
  renderFeatures();
}

function renderFeatures() {
  const table = $("features");
  const { filters, scales, features } = state.project;
  const head = document.createElement("tr");
  head.append(Object.assign(document.createElement("th"), { textContent: "σ" }));
  for (const scale of scales) head.append(Object.assign(document.createElement("th"), { textContent: scale }));
  const rows = filters.map((filter) => {
    const row = document.createElement("tr");
    row.append(Object.assign(document.createElement("th"), { textContent: filter }));
    for (const scale of scales) {
      const cell = document.createElement("td");
      cell.append(Object.assign(document.createElement("input"), {
        type: "checkbox", checked: (features[filter] || []).includes(scale), title: `${filter} at σ ${scale}`,
      }));
      cell.firstChild.dataset.filter = filter;
      cell.firstChild.dataset.scale = scale;
      row.append(cell);
    }
    return row;
  });
  table.replaceChildren(head, ...rows);
}

function applyFeatures() {
  const features = {};
  for (const box of $("features").querySelectorAll("input:checked")) {
    (features[box.dataset.filter] ||= []).push(Number(box.dataset.scale));
  }
  return tracked(async () => {
    try {
      say("features changed: computing them and fitting again…", "busy");
      setProject(await api("PUT", "/api/project", { features }));
      if (state.image) await predictVisible();
    } catch (err) {
      say(err.message, "error");
    }
  });
}

function saveClassifier() {
  return tracked(async () => {
    try {
      const saved = await api("POST", "/api/classifier/save", {});
      say(`saved ${saved.path}: use it with deepscope pixel predict ${saved.path} IMAGES --out OUT`);
    } catch (err) {
      say(err.message, "error");
    }
  });
}

function renderOverlays() {
  const box = $("overlays");
  for (const [kind, shown, opacity] of OVERLAYS) {
    const layer = layerNamed(kind);
    layer.shown = shown;
    layer.canvas.style.opacity = opacity;
    const row = Object.assign(document.createElement("div"), { className: "overlay-row" });
    const label = document.createElement("label");
    const toggle = Object.assign(document.createElement("input"), { type: "checkbox", id: `overlay-${kind}`, checked: shown });
    toggle.addEventListener("change", () => {
      layer.shown = toggle.checked;
      scheduleRender();
    });
    label.append(toggle, ` ${kind}`);
    const slider = Object.assign(document.createElement("input"), { type: "range", min: 0, max: 1, step: 0.05, value: opacity, id: `opacity-${kind}`, title: "opacity" });
    slider.addEventListener("input", () => { layer.canvas.style.opacity = slider.value; });
    row.append(label, slider);
    box.append(row);
  }
}

function contrastText() {
  return state.contrast === null ? "" : state.contrast.map(([lo, hi]) => `${+lo.toPrecision(7)},${+hi.toPrecision(7)}`).join(";");
}

function renderContrast() {
  const box = $("contrast");
  box.replaceChildren();
  const defaults = state.image.contrast;
  defaults.forEach(([lo, hi], channel) => {
    const span = hi - lo || 1;
    const row = Object.assign(document.createElement("div"), { className: "contrast-row", title: `channel ${channel}` });
    const limits = [lo, hi].map((value) => Object.assign(document.createElement("input"), {
      type: "range", min: lo - span / 2, max: hi + span / 2, step: span / 500, value,
    }));
    limits.forEach((slider, which) => slider.addEventListener("input", () => {
      let [low, high] = limits.map((s) => Number(s.value));
      if (low >= high) {  // keep low < high: move the other limit
        if (which === 0) high = low + span / 500; else low = high - span / 500;
        limits[1 - which].value = which === 0 ? high : low;
      }
      state.contrast = (state.contrast || defaults.map((pair) => [...pair]));
      state.contrast[channel] = [low, high];
      scheduleRender();
    }));
    row.append(Object.assign(document.createElement("span"), { textContent: channel }), ...limits);
    box.append(row);
  });
}

function renderSlice() {
  const stack = state.image.ndim === 3;
  $("slice-section").hidden = !stack;
  if (stack) {
    $("slice").max = state.image.spatial[0] - 1;
    $("slice").value = state.z;
    $("slice-value").textContent = state.z;
  }
}

function changeSlice(z) {
  state.z = z;
  $("slice-value").textContent = z;
  newPlane();
  predictVisible();
}

/** Forget the tiles and local strokes of the plane shown so far. */
function newPlane() {
  state.generation += 1;
  state.strokes = [];
  failed.clear();
  for (const layer of layers) layer.clear();
  document.dispatchEvent(new CustomEvent("deepscope:image", { detail: { image: state.image, z: state.z } }));
  scheduleRender();
}

async function openImage(name) {
  try {
    const info = await api("GET", `/api/info?${query({ image: name })}`);
    state.image = info;
    state.z = 0;
    state.contrast = null;
    state.labelsVersion = info.labels_version;
    state.model = info.model;
    body.dataset.image = name;
    body.dataset.labelsVersion = String(info.labels_version);
    body.dataset.modelVersion = info.model === null ? "" : String(info.model);
    history.replaceState(null, "", `${location.pathname}#${encodeURIComponent(name)}`);
    newPlane();
    fit();
    renderImages();
    renderSlice();
    renderContrast();
    say(`${name}: ${info.spatial.join(" × ")}, ${info.channels} channel(s), ${info.dtype}`);
    predictVisible();
  } catch (err) {
    say(`${name}: ${err.message}`, "error");
  }
}

function bindControls() {
  for (const input of document.querySelectorAll("input[name=tool]")) input.addEventListener("change", () => setTool(input.value));
  $("radius").addEventListener("input", () => setRadius(Number($("radius").value)));
  $("undo").addEventListener("click", () => undoRedo("undo"));
  $("redo").addEventListener("click", () => undoRedo("redo"));
  $("add-class").addEventListener("click", addClass);
  $("features-apply").addEventListener("click", applyFeatures);
  $("save-classifier").addEventListener("click", saveClassifier);
  $("slice").addEventListener("input", () => changeSlice(Number($("slice").value)));
  $("contrast-reset").addEventListener("click", () => {
    state.contrast = null;
    if (state.image) renderContrast();
    scheduleRender();
  });
  new ResizeObserver(resize).observe(viewer);
  renderOverlays();
}

async function start() {
  bindControls();
  resize();
  try {
    setProject(await api("GET", "/api/project"));
    state.images = await api("GET", "/api/images");
    renderImages();
    const wanted = decodeURIComponent(location.hash.slice(1));
    const usable = state.images.filter((entry) => !entry.error);
    const first = usable.find((entry) => entry.name === wanted) || usable[0];
    if (first) await openImage(first.name);
    else say(state.images.length ? "none of the images in this folder can be shown (see the list)" : "no images in this folder", "error");
  } catch (err) {
    say(err.message, "error");
  }
}

/** For the console and tests: where an image point (continuous coordinates) is in the viewport and on the canvases. */
window.deepscope = {
  state,
  toClient(y, x) {
    const [left, top] = clientOrigin();
    return [left + state.view.x + x * state.view.scale, top + state.view.y + y * state.view.scale];
  },
  toCanvas(y, x) {
    const dpr = state.size.dpr;
    return [Math.floor((state.view.x + x * state.view.scale) * dpr), Math.floor((state.view.y + y * state.view.scale) * dpr)];
  },
};

start();
