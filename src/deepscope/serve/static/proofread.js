"use strict";
/*
 * deepscope serve: proofreading instance masks (the "Instances" section of the panel).
 *
 * Instances come from the open segment model or the saved mask (masks/<stem>.tif, loaded by itself when it exists)
 * and are shown as outlines (a tile layer under the cursor canvas). Tools: delete (click an object), merge (click
 * two objects; the first is filled until the second click, Escape forgets it) and split (draw a stroke across an
 * object; previewed on the outlines canvas until the server's answer). Edits are sent one after another, in order;
 * with an instance tool selected, ctrl+z / ctrl+shift+z undo and redo instance edits instead of label strokes.
 *
 * Uses app.js's top-level bindings (state, tools, layers, TileLayer, api, ...). document.body.dataset.instancesVersion
 * is the version of the instances shown ("" when none are loaded), for tests to wait on.
 */
(() => {
  const TOOLS = { "instance-delete": "delete", "instance-merge": "merge", "instance-split": "split" };
  const SAVE_POLL_MS = 500;
  const inst = { status: null, selected: null, first: null, stroke: null, watching: false };

  // ---- the outline layer ----------------------------------------------------------------------------------------

  const canvas = Object.assign(document.createElement("canvas"), { id: "layer-instances", className: "overlay" });
  $("viewer").insertBefore(canvas, $("layer-cursor"));
  const layer = new TileLayer("instances", {
    version: () => (inst.status && inst.status.loaded ? `${inst.status.version}.${inst.selected ?? ""}` : null),
    url: (level, ty, tx, v) => `/api/instances/overlay?${imageQuery({ level, ty, tx, v, selected: v.split(".")[1] || null })}`,
  });
  const drawTiles = layer.draw.bind(layer);
  layer.draw = (level, needed) => {
    const current = drawTiles(level, needed);
    drawPreview();
    return current;
  };
  layers.push(layer);
  resize();

  /** The split stroke being drawn, over the outlines (the layer's context is already scaled by the pixel ratio). */
  function drawPreview() {
    if (!inst.stroke) return;
    const ctx = layer.ctx;
    const { scale, x, y } = state.view;
    ctx.save();
    ctx.strokeStyle = ctx.fillStyle = "#00ffff";
    ctx.lineWidth = Math.max(1, 2 * state.radius * scale);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    inst.stroke.forEach(([py, px], i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x + px * scale, y + py * scale));
    if (inst.stroke.length === 1) ctx.lineTo(x + inst.stroke[0][1] * scale + 0.01, y + inst.stroke[0][0] * scale);
    ctx.stroke();
    ctx.restore();
  }

  // ---- the panel ------------------------------------------------------------------------------------------------

  const section = document.createElement("section");
  section.id = "instances-section";
  section.innerHTML = `
    <h2>Instances</h2>
    <div class="row">
      <button id="instances-load-model" type="button" title="the open segment model's instances of this image">load from model</button>
      <button id="instances-load-saved" type="button">load saved</button>
    </div>
    <div class="row">
      <label><input type="radio" name="tool" value="instance-delete"> delete</label>
      <label><input type="radio" name="tool" value="instance-merge"> merge</label>
      <label><input type="radio" name="tool" value="instance-split"> split</label>
    </div>
    <div class="row">
      <button id="instances-undo" type="button" title="ctrl+z while an instance tool is selected">undo</button>
      <button id="instances-redo" type="button" title="ctrl+shift+z while an instance tool is selected">redo</button>
    </div>
    <div id="instances-status" class="instances-status">no instances loaded</div>`;
  $("panel").insertBefore(section, $("panel").querySelector("section.help"));

  const row = Object.assign(document.createElement("div"), { className: "overlay-row" });
  const toggle = Object.assign(document.createElement("input"), { type: "checkbox", id: "overlay-instances", checked: true });
  const label = document.createElement("label");
  label.append(toggle, " instances");
  const opacity = Object.assign(document.createElement("input"), { type: "range", min: 0, max: 1, step: 0.05, value: 0.9, id: "opacity-instances", title: "opacity" });
  row.append(label, opacity);
  $("overlays").append(row);
  canvas.style.opacity = opacity.value;
  toggle.addEventListener("change", () => {
    layer.shown = toggle.checked;
    scheduleRender();
  });
  opacity.addEventListener("input", () => { canvas.style.opacity = opacity.value; });

  for (const input of section.querySelectorAll("input[name=tool]")) {
    input.addEventListener("change", () => {
      forget();
      setTool(input.value);
    });
  }
  $("instances-load-model").addEventListener("click", () => edit("load", { source: "model" }));
  $("instances-load-saved").addEventListener("click", () => edit("load", { source: "saved" }));
  $("instances-undo").addEventListener("click", () => edit("undo", {}));
  $("instances-redo").addEventListener("click", () => edit("redo", {}));

  function showStatus(status) {
    inst.status = status;
    body.dataset.instancesVersion = status.loaded ? String(status.version) : "";
    let text;
    if (!status.loaded) text = "no instances loaded: load them from a segment model";
    else if (status.error) text = `${status.objects} objects · not saved: ${status.error}`;
    else text = `${status.objects} objects · ${status.dirty ? "saving…" : `saved in ${status.saved}`}`;
    $("instances-status").textContent = text;
    $("instances-status").classList.toggle("error", Boolean(status.error));
    scheduleRender();
    if (status.dirty && !status.error) watchSaving();
  }

  /** Poll the status until the writer has saved the last edit, so the panel says when the file is up to date. */
  async function watchSaving() {
    if (inst.watching) return;
    inst.watching = true;
    try {
      while (inst.status && inst.status.dirty && !inst.status.error && state.image) {
        await new Promise((resolve) => setTimeout(resolve, SAVE_POLL_MS));
        const generation = state.generation;
        const status = await api("GET", `/api/instances/status?${imageQuery({})}`);
        if (generation !== state.generation) break;
        if (inst.status && status.version === inst.status.version) showStatus(status);
      }
    } catch (err) {
      say(err.message, "error");
    } finally {
      inst.watching = false;
    }
  }

  // ---- edits ----------------------------------------------------------------------------------------------------

  /** Run server calls one after another, counted in data-pending; a late answer for another plane is dropped. */
  let chain = Promise.resolve();
  function queued(work) {
    const generation = state.generation;
    chain = chain.then(() => tracked(async () => {
      try {
        await work(() => generation === state.generation);
      } catch (err) {
        say(err.message, "error");
      }
    }));
    return chain;
  }

  function edit(action, payload) {
    if (!state.image) return chain;
    return queued(async (current) => {
      const reply = await api("POST", `/api/instances/${action}?${imageQuery({})}`, payload);
      if (!current()) return;
      showStatus(reply);
      if (action === "load") say(`${reply.objects} objects loaded from the ${payload.source === "model" ? "model" : "saved mask"}`);
      else if (reply.box === null) say(`nothing to ${action}`);
      else say(`${action}: ${reply.ids === null ? "the whole slice" : `objects ${reply.ids.join(", ")}`} changed`);
    });
  }

  function loaded() {
    if (inst.status && inst.status.loaded) return true;
    say("load instances first, from a segment model or the saved mask", "error");
    return false;
  }

  function forget() {
    inst.first = inst.selected = inst.stroke = null;
    scheduleRender();
  }

  const pixel = ([y, x]) => [Math.floor(y), Math.floor(x)];
  const idle = { move() {}, end() {} };

  tools["instance-delete"] = {
    pointer: true,
    ...idle,
    start(point) {
      if (loaded()) edit("delete", { point: pixel(point) });
    },
  };

  tools["instance-merge"] = {
    pointer: true,
    ...idle,
    start(point) {
      if (!loaded()) return;
      const clicked = pixel(point);
      if (inst.first === null) {
        queued(async (current) => {  // ask which object was clicked: it is filled until the second click
          const [y, x] = clicked;
          const status = await api("GET", `/api/instances/status?${imageQuery({ y, x })}`);
          if (!current()) return;
          if (status.at === 0) {
            say("merge: click an object, not the background", "error");
            return;
          }
          inst.first = clicked;
          inst.selected = status.at;
          scheduleRender();
          say(`merge: object ${status.at} picked; click the object to merge it with (Escape cancels)`);
        });
      } else {
        const first = inst.first;
        inst.first = null;
        edit("merge", { points: [first, clicked] }).then(() => {
          inst.selected = null;
          scheduleRender();
        });
      }
    },
  };

  tools["instance-split"] = {
    start(point) {
      if (!loaded()) return;
      inst.stroke = [point];
      scheduleRender();
    },
    move(point) {
      if (!inst.stroke) return;
      const last = inst.stroke[inst.stroke.length - 1];
      if (Math.hypot(point[0] - last[0], point[1] - last[1]) >= 0.5) inst.stroke.push(point);
      scheduleRender();
    },
    end() {
      if (!inst.stroke) return;
      const { points, radius } = strokeBody({ points: inst.stroke, radius: state.radius, label: 0 });
      edit("split", { points, radius }).then(() => {
        inst.stroke = null;
        scheduleRender();
      });
    },
  };

  // captured before app.js's handler, which would undo label strokes instead
  window.addEventListener("keydown", (event) => {
    if (!(state.tool in TOOLS) || typing(event.target)) return;
    const key = event.key.toLowerCase();
    if ((event.ctrlKey || event.metaKey) && (key === "z" || key === "y")) {
      event.preventDefault();
      event.stopPropagation();
      edit(key === "y" || event.shiftKey ? "redo" : "undo", {});
    } else if (event.key === "Escape") {
      forget();
    }
  }, true);

  /** A new image or slice: its instances' status (the server loads the saved mask when there is one). */
  function opened() {
    forget();
    inst.status = null;
    body.dataset.instancesVersion = "";
    $("instances-status").textContent = "…";
    queued(async (current) => {
      const status = await api("GET", `/api/instances/status?${imageQuery({})}`);
      if (current()) showStatus(status);
    });
  }
  document.addEventListener("deepscope:image", opened);
  if (state.image) opened();  // app.js may have opened the first image before this script ran
})();
