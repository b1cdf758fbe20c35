"use strict";
/*
 * deepscope serve: the Training section. Starts a U-Net training job on the folder's labels (POST /api/jobs), lists
 * the jobs with a live progress bar and a small curve of the training loss and the validation metric per epoch
 * (polling /api/jobs about once a second while one is queued or running), cancels them, and opens a finished job's
 * checkpoint through the models panel (window.deepscopeModels.open).
 *
 * The body's data-job-state is the state of the newest job ("" when there is none), for scripts and tests to wait on.
 * Everything lives inside this function, so its names cannot clash with those of the page's other scripts.
 */
(() => {
  const JOB_POLL_MS = 1000;
  const CHOICES = [  // [kind, source, label]
    ["segment", "labels", "U-Net from the painted labels"],
    ["pixel-deep", "labels", "U-Net from the live forest (pixel deep)"],
    ["segment", "instances", "U-Net from corrected instances"],
  ];
  const CURVE = { width: 240, height: 56, pad: 3 };
  const LOSS_COLOUR = "#4ea1ff", METRIC_COLOUR = "#ff7f0e";
  const ACTIVE = ["queued", "running"];
  let polling = false;

  function element(tag, properties = {}, ...children) {
    const made = Object.assign(document.createElement(tag), properties);
    made.append(...children);
    return made;
  }

  function buildSection() {
    const choice = element("select", { id: "job-kind", title: "what to train" });
    CHOICES.forEach(([kind, source, label], index) => choice.append(element("option", { value: index, textContent: label })));
    const minutes = element("input", { id: "job-minutes", type: "number", min: 0.5, max: 10080, step: 0.5, value: 5, title: "time limit" });
    const epochs = element("input", { id: "job-epochs", type: "number", min: 1, step: 1, placeholder: "auto", title: "empty: planned" });
    const startButton = element("button", { id: "job-start", type: "button", textContent: "start training" });
    startButton.addEventListener("click", () => startJob(CHOICES[Number(choice.value)], Number(minutes.value),
      epochs.value === "" ? null : Number(epochs.value)));
    const section = element("section", { id: "jobs-section" },
      element("h2", { textContent: "Training" }),
      element("div", { className: "row" }, choice),
      element("label", { className: "row" }, "at most ", minutes, " minutes"),
      element("label", { className: "row" }, "epochs ", epochs),
      element("div", { className: "row" }, startButton),
      element("ul", { id: "jobs", className: "list" }));
    $("panel").insertBefore(section, document.querySelector("#panel section.help"));
  }

  async function startJob([kind, source], minutes, epochs) {
    await tracked(async () => {
      try {
        const job = await api("POST", "/api/jobs", { kind, source, max_minutes: minutes, epochs });
        say(`training job ${job.id} ${job.state === "queued" ? "queued behind the running one" : "started"}`);
      } catch (err) {
        say(`training: ${err.message}`, "error");
      }
    });
    await refresh();
  }

  async function cancelJob(id) {
    try {
      const job = await api("POST", "/api/jobs/cancel", { id });
      say(`training job ${id}: ${job.state}`);
    } catch (err) {
      say(`cancel ${id}: ${err.message}`, "error");
    }
    await refresh();
  }

  function openCheckpoint(path) {
    const models = window.deepscopeModels;
    if (!models || typeof models.open !== "function") {
      say(`cannot open ${path}: the models panel is not loaded (models.js)`, "error");
      return;
    }
    Promise.resolve(models.open(path)).catch((err) => say(`open ${path}: ${err.message}`, "error"));
  }

  /** Poll the job list while a job is queued or running; one loop at a time. */
  async function refresh() {
    let jobs;
    try {
      jobs = (await api("GET", "/api/jobs")).jobs;
    } catch (err) {
      say(`training jobs: ${err.message}`, "error");
      return;
    }
    render(jobs);
    if (!polling && jobs.some((job) => ACTIVE.includes(job.state))) {
      polling = true;
      setTimeout(() => {
        polling = false;
        refresh();
      }, JOB_POLL_MS);
    }
  }

  function render(jobs) {
    const list = $("jobs");
    list.replaceChildren(...jobs.slice().reverse().map(jobItem));
    body.dataset.jobState = jobs.length ? jobs[jobs.length - 1].state : "";
  }

  function jobItem(job) {
    const share = Math.round(100 * job.progress);
    const title = element("div", { className: "job-title", textContent: `${job.kind} (${job.source}) ${job.state}` });
    const bar = element("div", { className: "job-bar", title: `${share}%` }, element("div", { style: `width: ${share}%` }));
    const item = element("li", { className: `job ${job.state}` }, title, bar, element("div", { className: "detail", textContent: detail(job) }));
    item.dataset.id = job.id;
    if (job.history.length) {
      const legend = element("div", { className: "job-legend" },
        element("span", { textContent: "train loss", style: `color: ${LOSS_COLOUR}` }), " ",
        element("span", { textContent: `${job.metric} (0–1)`, style: `color: ${METRIC_COLOUR}` }));
      item.append(curve(job.history, job.metric), legend);
    }
    const actions = element("div", { className: "row" });
    if (ACTIVE.includes(job.state)) {
      const cancel = element("button", { type: "button", className: "job-cancel", textContent: "cancel" });
      cancel.addEventListener("click", () => cancelJob(job.id));
      actions.append(cancel);
    }
    if (job.checkpoint) {
      const open = element("button", { type: "button", className: "job-open", textContent: "open", title: job.checkpoint });
      open.addEventListener("click", () => openCheckpoint(job.checkpoint));
      actions.append(open);
    }
    if (actions.childElementCount) item.append(actions);
    if (job.error) item.append(element("pre", { className: "job-error", textContent: job.error }));
    return item;
  }

  function detail(job) {
    const parts = [job.id];
    if (job.epochs) parts.push(`epoch ${Math.min(job.epochs, job.epoch + (job.state === "running" ? 1 : 0))}/${job.epochs}`);
    if (typeof job.loss === "number") parts.push(`loss ${job.loss.toFixed(4)}`);
    const last = job.history[job.history.length - 1];
    if (last && typeof last[job.metric] === "number") parts.push(`${job.metric} ${last[job.metric].toFixed(3)}`);
    if (job.state === "running") parts.push(`${Math.round(100 * job.progress)}%`);
    return parts.join(" · ");
  }

  /** Training loss (scaled to its own range) and the validation metric (0..1) per epoch, as an inline SVG. */
  function curve(history, metric) {
    const { width, height, pad } = CURVE;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("class", "job-curve");
    const x = (i) => pad + (history.length > 1 ? i * (width - 2 * pad) / (history.length - 1) : (width - 2 * pad) / 2);
    const losses = history.map((h) => h.train_loss).filter((v) => typeof v === "number");
    const low = Math.min(...losses), high = Math.max(...losses);
    const series = [
      ["train_loss", LOSS_COLOUR, (v) => high > low ? (v - low) / (high - low) : 0.5],
      [metric, METRIC_COLOUR, (v) => Math.min(1, Math.max(0, v))],
    ];
    for (const [key, colour, unit] of series) {
      const points = history.map((h, i) => typeof h[key] === "number" ? [x(i), pad + (1 - unit(h[key])) * (height - 2 * pad)] : null)
        .filter(Boolean);
      if (!points.length) continue;
      const line = document.createElementNS(svg.namespaceURI, points.length > 1 ? "polyline" : "circle");
      if (points.length > 1) line.setAttribute("points", points.map((p) => p.join(",")).join(" "));
      else [["cx", points[0][0]], ["cy", points[0][1]], ["r", 2.5]].forEach(([name, value]) => line.setAttribute(name, value));
      line.setAttribute(points.length > 1 ? "stroke" : "fill", colour);
      line.setAttribute("data-series", key);
      const tip = document.createElementNS(svg.namespaceURI, "title");
      tip.textContent = `${key}: ${history.map((h) => typeof h[key] === "number" ? h[key].toFixed(4) : "–").join(", ")}`;
      line.append(tip);
      svg.append(line);
    }
    return svg;
  }

  buildSection();
  refresh();
})();
