"use strict";
/*
 * deepscope serve: the Models panel. Lists the checkpoints of the served folder, opens one, predicts the current
 * image with it in the background (a progress bar fed by polling /api/models/status) and shows what it found:
 * tile overlays (probabilities, classes, instance outlines, the denoised image), a classifier's class probabilities
 * as text, a detector's boxes on a canvas of their own with a score threshold.
 *
 * Everything lives inside this function so that no name collides with app.js or the other panels. For tests and
 * the other panels: window.deepscopeModels = {open(path), refresh(), state}, and document.body.dataset.modelState
 * (idle | running | done | failed) and data-model-path (the open checkpoint).
 */
(() => {
  const KINDS = [  // bottom to top: [kind, tasks or targets that make it, shown at first, opacity]
    ["denoised", (d) => d.task === "denoise", true, 1],
    ["probabilities", (d) => d.task === "segment", false, 0.5],
    ["classes", (d) => d.target === "semantic", true, 0.5],
    ["outlines", (d) => d.task === "segment", true, 0.9],
  ];
  const MODEL_POLL_MS = 300;
  const BOX_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];

  const models = {
    description: null,  // of the open checkpoint
    status: null,       // the last status of the current image
    boxes: [],          // detections of the current image
    minScore: 0.5,
    polling: false,
  };
  const element = (tag, props = {}) => Object.assign(document.createElement(tag), props);

  // ---- panel ------------------------------------------------------------------------------------------------------

  const section = element("section", { id: "models-section" });
  section.innerHTML = `
    <h2>Models</h2>
    <div class="row"><button id="models-refresh" type="button">refresh</button>
      <span id="models-count" class="models-muted"></span></div>
    <ul id="models-list" class="list"></ul>
    <div id="model-info" class="models-muted">no model open</div>
    <div class="row"><button id="model-predict" type="button" disabled>predict this image</button>
      <progress id="model-progress" max="1" value="0"></progress></div>
    <div id="model-summary"></div>
    <div id="model-overlays"></div>
    <ol id="model-scores" hidden></ol>
    <label id="model-score-row" class="row" hidden>score ≥ <input id="model-score" type="range" min="0" max="1"
      step="0.05" value="0.5"> <output id="model-score-value">0.5</output></label>`;
  $("panel").insertBefore(section, document.querySelector("#panel section.help"));

  function overlayCanvas(name) {
    const canvas = element("canvas", { id: `layer-${name}`, className: "overlay" });
    viewer.insertBefore(canvas, $("layer-cursor"));
    return canvas;
  }

  // ---- layers -----------------------------------------------------------------------------------------------------

  function produces(kind) {
    const entry = KINDS.find(([k]) => k === kind);
    return models.description !== null && entry[1](models.description);
  }

  function resultVersion(kind) {
    const status = models.status;
    if (!status || !status.computed || !produces(kind)) return null;
    return kind === "denoised" ? `${status.version}|${contrastText()}` : String(status.version);
  }

  const tileLayers = {};
  for (const [kind, , shown, opacity] of KINDS) {
    overlayCanvas(`model-${kind}`).style.opacity = opacity;
    const layer = new TileLayer(`model-${kind}`, {
      version: () => resultVersion(kind),
      url: (level, ty, tx, v) => `/api/models/overlay?${imageQuery({
        kind, level, ty, tx, v, contrast: kind === "denoised" ? contrastText() || null : null })}`,
    });
    layer.shown = shown;
    tileLayers[kind] = layer;
    layers.push(layer);
  }

  /** The detector's boxes, drawn in screen space on every render (a layer in app.js's terms). */
  const boxLayer = {
    name: "model-boxes",
    canvas: overlayCanvas("model-boxes"),
    shown: true,
    clear() { models.boxes = []; },
    draw() {
      const ctx = this.canvas.getContext("2d");
      ctx.setTransform(state.size.dpr, 0, 0, state.size.dpr, 0, 0);
      ctx.clearRect(0, 0, state.size.width, state.size.height);
      if (!this.shown) return true;
      const { scale, x, y } = state.view;
      const names = models.description ? models.description.classes : [];
      ctx.lineWidth = 2;
      ctx.font = "12px system-ui, sans-serif";
      for (const box of models.boxes) {
        if (box.score < models.minScore) continue;
        const colour = BOX_COLOURS[Math.max(0, names.indexOf(box.class)) % BOX_COLOURS.length];
        const left = x + box.x0 * scale, top = y + box.y0 * scale;
        ctx.strokeStyle = ctx.fillStyle = colour;
        ctx.strokeRect(left, top, (box.x1 - box.x0) * scale, (box.y1 - box.y0) * scale);
        ctx.fillText(`${box.class} ${box.score.toFixed(2)}`, left + 2, Math.max(12, top - 3));
      }
      return true;
    },
  };
  layers.push(boxLayer);
  resize();

  function renderOverlayControls() {
    const box = $("model-overlays");
    box.replaceChildren();
    for (const [kind] of KINDS) {
      if (!produces(kind)) continue;
      const layer = tileLayers[kind];
      const row = element("div", { className: "overlay-row" });
      const toggle = element("input", { type: "checkbox", id: `model-overlay-${kind}`, checked: layer.shown });
      toggle.addEventListener("change", () => {
        layer.shown = toggle.checked;
        scheduleRender();
      });
      const label = element("label");
      label.append(toggle, ` ${kind}`);
      const slider = element("input", { type: "range", min: 0, max: 1, step: 0.05, value: layer.canvas.style.opacity,
        id: `model-opacity-${kind}`, title: "opacity" });
      slider.addEventListener("input", () => { layer.canvas.style.opacity = slider.value; });
      row.append(label, slider);
      box.append(row);
    }
  }

  // ---- checkpoints ------------------------------------------------------------------------------------------------

  async function refresh() {
    try {
      const found = await api("GET", "/api/models");
      const list = $("models-list");
      list.replaceChildren();
      for (const entry of found) {
        // a deepscope 0.1 checkpoint is a pickle: its task is read only when it is opened (safely)
        const task = entry.task ?? "older checkpoint, task known once opened";
        const item = element("li", { textContent: entry.path, title: entry.error || `${task}, ${entry.modified}` });
        item.dataset.path = entry.path;
        item.append(element("span", { className: "detail", textContent: entry.error || `${task} · ${entry.modified.replace("T", " ")}` }));
        if (entry.error) item.classList.add("broken");
        else item.addEventListener("click", () => open(entry.path));
        item.classList.toggle("current", models.description !== null && models.description.path === entry.path);
        list.append(item);
      }
      $("models-count").textContent = found.length ? `${found.length} checkpoint(s)` : "no checkpoints (*.pt) in this folder";
      return found;
    } catch (err) {
      say(`models: ${err.message}`, "error");
      return [];
    }
  }

  /** Show the open model (just opened here, or found open on the server when the page loads). */
  function describe(d) {
    models.description = d;
    models.status = null;
    models.boxes = [];
    body.dataset.modelPath = d.path;
    $("model-info").textContent = `${d.path}: ${d.task}${d.target ? ` (${d.target})` : ""}, ${d.ndim}D, ` +
      `${d.channels} channel(s)${d.classes.length ? `, classes ${d.classes.join(", ")}` : ""} on ${d.device}`;
    $("model-predict").disabled = false;
    $("model-score-row").hidden = d.task !== "detect";
    renderOverlayControls();
    show({ state: "idle", progress: 0, summary: null, error: null, computed: false });
    for (const item of $("models-list").children) item.classList.toggle("current", item.dataset.path === d.path);
  }

  /** Open a checkpoint (a path relative to the served folder): its description, or null when it cannot be opened. */
  function open(path) {
    return tracked(async () => {
      try {
        say(`opening ${path}…`, "busy");
        describe(await api("POST", "/api/models/open", { path }));
        say(`model ${path} open: predict this image to see what it finds`);
        await loadStatus();
        return models.description;
      } catch (err) {
        say(`${path}: ${err.message}`, "error");
        return null;
      }
    });
  }

  // ---- predicting -------------------------------------------------------------------------------------------------

  function statusQuery() {
    return imageQuery({});
  }

  /** The status in the panel; a prediction of another slice leaves this one idle. */
  function show(status) {
    const stateName = status.state === "done" && !status.computed ? "idle" : status.state;
    body.dataset.modelState = stateName;
    $("model-progress").value = status.progress;
    const text = stateName === "failed" ? status.error
      : stateName === "running" ? `predicting… ${Math.round(100 * status.progress)}%`
      : stateName === "done" ? status.summary : "";
    $("model-summary").textContent = text;
    $("model-summary").className = stateName === "failed" ? "models-error" : "";
    const scores = $("model-scores");
    scores.hidden = !(status.scores && status.computed);
    scores.replaceChildren(...(status.scores || []).map((s) => element("li", {
      textContent: `${s.class}: ${(100 * s.probability).toFixed(1)}%` })));
  }

  /** Take a status of the current image: the progress bar, the overlays' version, the boxes when they changed. */
  async function apply(status, image, z) {
    if (!state.image || state.image.name !== image || state.z !== z) return;  // the user moved on
    if (status.description && (!models.description || models.description.path !== status.description.path)) {
      describe(status.description);
    }
    if (!models.description) return;
    const before = models.status;
    models.status = status;
    show(status);
    if (status.computed && (!before || before.version !== status.version) && models.description.task === "detect") {
      models.boxes = await api("GET", `/api/models/boxes?${query({ image })}`);
    }
    scheduleRender();
  }

  async function loadStatus() {
    if (!state.image) return;
    const image = state.image.name, z = state.z;
    try {
      const status = await api("GET", `/api/models/status?${statusQuery()}`);
      await apply(status, image, z);
      if (status.state === "running") pollStatus();
    } catch (err) {
      say(`models: ${err.message}`, "error");
    }
  }

  function predict() {
    if (!state.image || !models.description) return Promise.resolve();
    return tracked(async () => {
      const image = state.image.name, z = state.z;
      try {
        const status = await api("POST", `/api/models/predict?${statusQuery()}`, {});
        await apply(status, image, z);
        if (status.state === "running") pollStatus();
        else if (status.state === "failed") say(status.error, "error");
      } catch (err) {
        say(`predict: ${err.message}`, "error");
      }
    });
  }

  /** Poll until the current image's prediction is no longer running (one loop at a time). */
  async function pollStatus() {
    if (models.polling) return;
    models.polling = true;
    try {
      while (models.description && state.image) {
        await new Promise((resolve) => setTimeout(resolve, MODEL_POLL_MS));
        const image = state.image.name, z = state.z;
        const status = await api("GET", `/api/models/status?${statusQuery()}`);
        await apply(status, image, z);
        if (status.state !== "running") {
          if (status.state === "failed") say(status.error, "error");
          else say(`${models.description.path}: ${status.summary}`);
          break;
        }
      }
    } catch (err) {
      say(`models: ${err.message}`, "error");
    } finally {
      models.polling = false;
    }
  }

  // ---- wiring -----------------------------------------------------------------------------------------------------

  $("models-refresh").addEventListener("click", refresh);
  $("model-predict").addEventListener("click", predict);
  $("model-score").addEventListener("input", () => {
    models.minScore = Number($("model-score").value);
    $("model-score-value").textContent = models.minScore;
    scheduleRender();
  });
  document.addEventListener("deepscope:image", () => {
    models.status = null;
    models.boxes = [];
    show({ state: "idle", progress: 0, summary: null, error: null, computed: false });
    loadStatus();
  });
  body.dataset.modelState = "idle";
  window.deepscopeModels = { open, refresh, predict, state: models };
  refresh();
})();
