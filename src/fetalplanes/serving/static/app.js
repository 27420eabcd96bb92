// fetalplanes web app: plain JavaScript, no dependencies, nothing loaded from the internet.
// Files are sent to /api/v1/predict in small batches; every result becomes a card.
"use strict";

const API = "/api/v1";
const BATCH_FILES = 8; // files per request: keeps progress visible and requests small
const PARALLEL = 2; // requests in flight; the server micro-batches them anyway
const PALETTE = ["#0f766e", "#4338ca", "#b45309", "#be185d", "#0369a1", "#4d7c0f", "#7c3aed"];
const NOT_TARGET = "not_target";

const state = {
  classes: [],
  columns: [],
  minConfidence: 0.5,
  limits: { max_file_bytes: 20 * 1024 * 1024, max_request_bytes: 200 * 1024 * 1024, max_files: 500 },
  explain: { available: false, reason: "model details not loaded yet" },
  items: [], // {id, file, url, card, result, error, done}
  queue: [],
  inFlight: 0,
  nextId: 0,
};

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ small DOM helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

const pct = (p) => `${(100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1)}%`;
const MiB = 1024 * 1024;
const mb = (bytes) => (bytes < MiB
  ? `${Math.max(1, Math.round(bytes / 1024))} KB`
  : `${(bytes / MiB).toFixed(bytes < 10 * MiB ? 1 : 0).replace(/\.0$/, "")} MB`);
const planeName = (label) => (label === NOT_TARGET ? "Not a target plane" : label);
const shortName = (label) => (label === NOT_TARGET ? "Not target" : label);
const colorOf = (label) => {
  const i = state.classes.indexOf(label);
  return i < 0 ? "#64748b" : PALETTE[i % PALETTE.length];
};

// ------------------------------------------------------------------ model details
async function loadModel() {
  try {
    const res = await fetch(`${API}/model`);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const info = await res.json();
    state.classes = info.classes;
    state.columns = info.csv_columns;
    state.minConfidence = info.min_confidence;
    state.limits = info.limits;
    state.explain = info.explain;
    showModel(info);
  } catch (err) {
    $("model-info").textContent = `Could not load model details (${err.message}).`;
  }
  showExplainOption();
  renderCounts();
}

function showModel(info) {
  // Held-out test metrics when `evaluate` recorded them; else say it is validation.
  const test = info.metrics && info.metrics.test;
  const val = info.metrics && info.metrics.val;
  const held = test && typeof test.balanced_accuracy === "number";
  const acc = held ? test.balanced_accuracy : val && val.balanced_accuracy;
  const accText = held
    ? ` · held-out test balanced accuracy ${pct(test.balanced_accuracy)}` +
      (test.n_images ? ` (${test.n_images} images)` : "")
    : ` · validation balanced accuracy ${pct(acc)}` +
      (val && val.n_images ? ` (${val.n_images} images)` : "");
  const parts = [
    "Model ", el("strong", { text: info.architecture }),
    ` · ${info.classes.filter((c) => c !== NOT_TARGET).length} planes`,
  ];
  if (info.model_classes.join("|") !== info.classes.join("|")) {
    parts.push(` · zero-shot from ${info.model_classes.length} model classes`);
  }
  if (typeof acc === "number") parts.push(accText);
  $("model-info").replaceChildren(...parts);
  $("limit-file").textContent = mb(info.limits.max_file_bytes);
  $("min-conf").textContent = `${Math.round(100 * info.min_confidence)}%`;
}

function showExplainOption() {
  const box = $("explain");
  const note = $("explain-note");
  if (state.explain.available) {
    box.disabled = false;
    note.hidden = true;
    return;
  }
  box.checked = false;
  box.disabled = true;
  note.hidden = false;
  note.textContent = `Heat maps are unavailable: ${state.explain.reason}`;
  box.setAttribute("aria-describedby", "explain-note");
}

// ------------------------------------------------------------------ adding files
function addFiles(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  for (const file of files) {
    const item = { id: state.nextId++, file, url: URL.createObjectURL(file), result: null };
    item.card = el("li", { class: "card", "aria-busy": "true" });
    state.items.push(item);
    $("cards").append(item.card);
    if (file.size > state.limits.max_file_bytes) {
      item.error = `${file.name}: file too large (${mb(file.size)}; limit ${mb(state.limits.max_file_bytes)})`;
      item.done = true;
    } else {
      state.queue.push(item);
    }
    renderCard(item);
  }
  $("empty").hidden = true;
  $("clear").disabled = false;
  updateStatus();
  pump();
}

function nextBatch() {
  const batch = [];
  let bytes = 0;
  while (state.queue.length && batch.length < BATCH_FILES) {
    const size = state.queue[0].file.size + 1024; // plus multipart headers
    if (batch.length && bytes + size > state.limits.max_request_bytes) break;
    batch.push(state.queue.shift());
    bytes += size;
  }
  return batch;
}

function pump() {
  while (state.inFlight < PARALLEL && state.queue.length) {
    const batch = nextBatch();
    state.inFlight += 1;
    send(batch).finally(() => {
      state.inFlight -= 1;
      updateStatus();
      pump();
    });
  }
}

async function send(batch) {
  const form = new FormData();
  for (const item of batch) form.append("files", item.file, item.file.name);
  const explain = $("explain").checked && state.explain.available;
  try {
    const res = await fetch(`${API}/predict?explain=${explain}`, { method: "POST", body: form });
    const body = await res.json().catch(() => ({ detail: `HTTP ${res.status}` }));
    if (Array.isArray(body.results) && body.results.length === batch.length) {
      batch.forEach((item, i) => finish(item, body.results[i], null));
    } else {
      batch.forEach((item) => finish(item, null, body.detail || `HTTP ${res.status}`));
    }
  } catch (err) {
    batch.forEach((item) => finish(item, null, `upload failed (${err.message})`));
  }
}

function finish(item, result, error) {
  item.result = result && !result.error ? result : null;
  item.error = error || (result && result.error) || null;
  item.done = true;
  renderCard(item);
}

// ------------------------------------------------------------------ cards
function thumbnail(item) {
  const figure = el("figure", { class: "thumb" });
  const img = el("img", { src: item.url, alt: `Image ${item.file.name}` });
  img.addEventListener("error", () => {
    img.replaceWith(el("span", { class: "no-preview", text: "No preview for this file type" }));
  }, { once: true });
  figure.append(img);
  return figure;
}

function renderCard(item) {
  const card = item.card;
  card.className = "card";
  card.removeAttribute("aria-busy");
  card.style.removeProperty("--accent");
  const body = el("div", { class: "card-body" },
    el("p", { class: "filename", title: item.file.name, text: item.file.name }));
  if (!item.done) {
    card.setAttribute("aria-busy", "true");
    body.append(el("p", { class: "pending", text: "Classifying…" }));
  } else if (item.error) {
    card.classList.add("is-error");
    body.append(
      el("div", { class: "plane-row" }, el("h3", { class: "plane", text: "Not classified" })),
      el("p", { class: "error-text", text: item.error }),
    );
  } else {
    fillResult(card, body, item);
  }
  card.replaceChildren(thumbnail(item), body);
}

function fillResult(card, body, item) {
  const r = item.result;
  const top = topClass(r);
  card.classList.toggle("is-not-target", r.not_target);
  card.classList.toggle("is-uncertain", r.uncertain);
  if (!r.not_target) card.style.setProperty("--accent", colorOf(r.label));
  // A rejected image shows no percentage beside "Not a target plane": the confidence
  // belongs to the closest plane, which is named below with its own probability.
  const heading = el("div", { class: "plane-row" },
    el("h3", { class: "plane", text: planeName(r.label) }));
  if (!r.not_target) {
    heading.append(
      el("span", { class: "conf", title: "calibrated confidence", text: pct(r.confidence) }));
  }
  body.append(heading);
  if (r.not_target) {
    const [plane, p] = closestPlane(r);
    body.append(el("p", { class: "closest", text: `closest: ${plane} (${pct(p)})` }));
  }
  if (r.model_label) {
    const own = `Model class: ${r.model_label} (${pct(r.model_confidence || 0)})`;
    body.append(el("p", { class: "closest", text: own }));
  }
  const badges = el("div", { class: "badges" });
  if (r.uncertain) badges.append(el("span", { class: "badge badge-warn", text: "uncertain" }));
  if (r.not_target) badges.append(el("span", { class: "badge badge-reject", text: "not target" }));
  body.append(badges, probabilityList(r, top), heatmapControls(card, item));
}

function topClass(r) {
  return Object.entries(r.probabilities).reduce((a, b) => (b[1] > a[1] ? b : a))[0];
}

function closestPlane(r) {
  return Object.entries(r.probabilities)
    .filter(([name]) => name !== NOT_TARGET)
    .reduce((a, b) => (b[1] > a[1] ? b : a), ["none", 0]);
}

function probabilityList(r, top) {
  const names = state.classes.length ? state.classes : Object.keys(r.probabilities);
  const list = el("ul", { class: "probs", "aria-label": "Probability per plane" });
  for (const name of names) {
    const p = r.probabilities[name] || 0;
    const fill = el("span");
    fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
    list.append(el("li", { class: name === top ? "top" : "" },
      el("span", { class: "pname", title: planeName(name), text: shortName(name) }),
      el("span", { class: "bar", "aria-hidden": "true" }, fill),
      el("span", { class: "pval", text: pct(p) })));
  }
  return list;
}

function heatmapControls(card, item) {
  const r = item.result;
  const noteId = `heat-note-${item.id}`;
  const button = el("button", {
    type: "button", class: "btn btn-small heat-toggle", "aria-pressed": "false",
  }, "Heat map");
  const foot = el("div", { class: "card-foot" }, button);
  const why = !state.explain.available
    ? "Heat maps are unavailable on this server (see “Add images”)."
    : r.heatmap_error;
  if (why) {
    button.disabled = true;
    const described = state.explain.available ? noteId : `${noteId} explain-note`;
    button.setAttribute("aria-describedby", described);
    foot.append(el("p", { class: "note heat-note", id: noteId, text: why }));
    return foot;
  }
  button.addEventListener("click", () => toggleHeatmap(card, item, button));
  return foot;
}

// Heat maps not computed with the upload are fetched when first asked for (the file is
// still in the browser), so classifying a whole study stays fast.
async function fetchHeatmap(item) {
  const form = new FormData();
  form.append("files", item.file, item.file.name);
  const res = await fetch(`${API}/predict?explain=true`, { method: "POST", body: form });
  const body = await res.json().catch(() => ({}));
  const r = Array.isArray(body.results) ? body.results[0] : null;
  if (!r || !r.heatmap) throw new Error((r && (r.heatmap_error || r.error)) || body.detail || `HTTP ${res.status}`);
  item.result.heatmap = r.heatmap;
}

async function toggleHeatmap(card, item, button) {
  if (button.hasAttribute("aria-busy")) return; // already fetching
  if (!item.result.heatmap) {
    button.setAttribute("aria-busy", "true");
    button.textContent = "Heat map…";
    try {
      await fetchHeatmap(item);
    } catch (err) {
      item.result.heatmap_error = err.message;
      renderCard(item);
      return;
    } finally {
      button.removeAttribute("aria-busy");
      button.textContent = "Heat map";
    }
  }
  showHeatmap(card, item, button);
}

function showHeatmap(card, item, button) {
  const on = button.getAttribute("aria-pressed") !== "true";
  button.setAttribute("aria-pressed", String(on));
  const figure = card.querySelector(".thumb");
  if (on) {
    figure.replaceChildren(
      el("img", { src: `data:image/png;base64,${item.result.heatmap}`, class: "heat",
        alt: `Heat map of where the model looked in ${item.file.name}` }),
      el("figcaption", { text: "heat map on model input" }));
  } else {
    figure.replaceWith(thumbnail(item));
  }
}

// ------------------------------------------------------------------ summary and status
function renderCounts() {
  const counts = new Map(state.classes.filter((c) => c !== NOT_TARGET).map((c) => [c, 0]));
  let notTarget = 0, uncertain = 0, failed = 0;
  for (const item of state.items) {
    if (!item.done) continue;
    if (item.error) failed += 1;
    else if (item.result.not_target) notTarget += 1;
    else counts.set(item.result.label, (counts.get(item.result.label) || 0) + 1);
    if (item.result && item.result.uncertain) uncertain += 1;
  }
  const row = (label, n, color) => {
    const dot = el("span", { class: "dot", "aria-hidden": "true" });
    dot.style.background = color;
    return el("li", { class: n ? "" : "zero" }, dot, label, el("span", { class: "n", text: n }));
  };
  $("counts").replaceChildren(...[...counts].map(([c, n]) => row(c, n, colorOf(c))));
  $("flags").replaceChildren(
    row("Not a target plane", notTarget, "#8a1526"),
    row("Uncertain", uncertain, "#b7791f"),
    row("Not classified", failed, "#a4161a"),
  );
}

function updateStatus() {
  const total = state.items.length;
  const done = state.items.filter((i) => i.done).length;
  const failed = state.items.filter((i) => i.done && i.error).length;
  const bar = $("progress");
  bar.hidden = total === 0 || done === total;
  $("progress-bar").style.width = total ? `${(100 * done) / total}%` : "0";
  let text = "No images yet.";
  if (total && done < total) text = `Classifying… ${done} of ${total} images done.`;
  else if (total) {
    text = `${total - failed} of ${total} image${total === 1 ? "" : "s"} classified`;
    text += failed ? `; ${failed} could not be read.` : ".";
  }
  $("status").textContent = text;
  $("download").disabled = !(total && done === total && done > failed);
  renderCounts();
}

// ------------------------------------------------------------------ CSV download
function csvCell(value) {
  let s = value === null || value === undefined ? "" : String(value);
  if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`; // keep spreadsheets from running formulas
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

// The server's result schema (`csv_columns` of /api/v1/model): the same columns as
// `fetalplanes predict --format csv`, the sort journal and evaluate's predictions.csv.
function csvValue(column, item) {
  const r = item.result;
  if (column === "path") return item.file.name;
  if (column === "error") return item.error || "";
  if (!r) return "";
  if (column.startsWith("p_")) {
    const p = r.probabilities ? r.probabilities[column.slice(2)] : undefined;
    return p === undefined ? "0.000000" : p.toFixed(6);
  }
  const v = r[column];
  if (v === null || v === undefined) return "";
  if (typeof v === "boolean") return Number(v);
  if (typeof v === "number" && column !== "frame") return v.toFixed(6);
  if (Array.isArray(v)) return v.join("x");
  return v;
}

function resultsCsv() {
  const columns = state.columns;
  const lines = [columns];
  for (const item of state.items) lines.push(columns.map((c) => csvValue(c, item)));
  return lines.map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n";
}

function downloadCsv() {
  const blob = new Blob([resultsCsv()], { type: "text/csv;charset=utf-8" });
  const stamp = new Date().toISOString().slice(0, 16).replace(/[-:T]/g, "");
  const link = el("a", { href: URL.createObjectURL(blob), download: `fetalplanes-${stamp}.csv` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function clearAll() {
  if (state.inFlight) return;
  for (const item of state.items) URL.revokeObjectURL(item.url);
  state.items = [];
  state.queue = [];
  $("cards").replaceChildren();
  $("empty").hidden = false;
  $("clear").disabled = true;
  updateStatus();
  $("pick").focus();
}

// ------------------------------------------------------------------ wiring
function wire() {
  const input = $("file-input");
  const zone = $("dropzone");
  $("pick").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  $("download").addEventListener("click", downloadCsv);
  $("clear").addEventListener("click", clearAll);
  let depth = 0; // dragenter/leave fire for children too
  const over = (on) => zone.classList.toggle("is-over", on);
  window.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; over(true); });
  window.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) over(false); });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault(); // never let the browser navigate to a dropped file
    depth = 0;
    over(false);
    if (e.target.closest && e.target.closest("#study")) return; // the study panel's own
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles(e.dataTransfer.files);
  });
}

wire();
loadModel();

// ------------------------------------------------------------------ sweep scan
// One video or DICOM cine goes to /api/v1/scan; the answer is drawn as a strip (one stretch
// per run of frames with the same smoothed plane) and the best frame of each plane found.
const SCAN_REJECTED = "#cbd5e1";
const SCAN_UNCERTAIN = "#facc15";

function scanColor(s) {
  if (s.not_target) return SCAN_REJECTED;
  return s.uncertain ? SCAN_UNCERTAIN : colorOf(s.label);
}

function scanKey(s) {
  if (s.not_target) return NOT_TARGET;
  return s.uncertain ? "uncertain" : s.label;
}

function scanRuns(timeline) {
  const runs = [];
  for (const row of timeline) {
    const key = scanKey(row.smoothed);
    const last = runs[runs.length - 1];
    if (last && last.key === key) {
      last.n += 1;
      last.end = row;
    } else {
      runs.push({ key, n: 1, start: row, end: row, color: scanColor(row.smoothed) });
    }
  }
  return runs;
}

const seconds = (t) => `${t.toFixed(2)} s`;
const scanLabel = (key) => (key === "uncertain" ? "Uncertain" : planeName(key));

function renderScanStrip(body) {
  const strip = $("scan-strip");
  strip.replaceChildren(...scanRuns(body.timeline).map((run) => {
    const span = el("span", {
      title: `${scanLabel(run.key)}: frames ${run.start.frame}-${run.end.frame}, ` +
        `${seconds(run.start.time_s)}-${seconds(run.end.time_s)}`,
    });
    span.style.flexGrow = String(run.n);
    span.style.background = run.color;
    return span;
  }));
  $("scan-t1").textContent = seconds(body.duration_s);
  const keys = [...body.classes.filter((c) => c !== NOT_TARGET), NOT_TARGET, "uncertain"];
  $("scan-legend").replaceChildren(...keys.map((key) => {
    const dot = el("span", { class: "dot", "aria-hidden": "true" });
    dot.style.background = key === NOT_TARGET ? SCAN_REJECTED
      : key === "uncertain" ? SCAN_UNCERTAIN : colorOf(key);
    return el("li", {}, dot, scanLabel(key));
  }));
}

function renderScanBest(body) {
  $("scan-best").replaceChildren(...body.best.map((best) => {
    const figure = el("figure", {},
      el("img", { src: `data:image/png;base64,${best.png}`,
        alt: `Best frame of ${best.plane}: frame ${best.frame}` }),
      el("figcaption", {}, el("strong", { text: best.plane }),
        `frame ${best.frame} · ${seconds(best.time_s)} · ${pct(best.confidence)}`));
    figure.style.setProperty("--accent", colorOf(best.plane));
    return el("li", {}, figure);
  }));
}

function renderScan(body) {
  const found = body.found.length;
  $("scan-status").textContent =
    `${body.name}: ${body.frames_scanned} frames scanned, ${found} plane${found === 1 ? "" : "s"} found.`;
  $("scan-summary").textContent = body.segments.map((s) =>
    `${s.plane} ${seconds(s.start_s)}-${seconds(s.end_s)}`).join(" · ") || "No plane held steady.";
  $("scan-missing").textContent = body.missing.length ? `Missing: ${body.missing.join(", ")}` : "";
  renderScanStrip(body);
  renderScanBest(body);
  $("scan-result").hidden = false;
}

async function scanSweep(file) {
  const status = $("scan-status");
  if (file.size > state.limits.max_file_bytes) {
    status.textContent = `${file.name}: file too large (${mb(file.size)}; limit ${mb(state.limits.max_file_bytes)})`;
    return;
  }
  const every = Math.max(1, Math.min(1000, parseInt($("scan-every").value, 10) || 1));
  const form = new FormData();
  form.append("files", file, file.name);
  $("scan-pick").disabled = true;
  $("scan-result").hidden = true;
  status.textContent = `Scanning ${file.name}…`;
  try {
    const res = await fetch(`${API}/scan?every=${every}`, { method: "POST", body: form });
    const body = await res.json().catch(() => ({ detail: `HTTP ${res.status}` }));
    if (!res.ok) throw new Error(body.detail || `HTTP ${res.status}`);
    renderScan(body);
  } catch (err) {
    status.textContent = `Could not scan ${file.name}: ${err.message}`;
  } finally {
    $("scan-pick").disabled = false;
  }
}

function wireScan() {
  const input = $("scan-input");
  $("scan-pick").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    if (input.files.length) scanSweep(input.files[0]);
    input.value = "";
  });
}

wireScan();

// ------------------------------------------------------------------ study checklist
// Files go to /api/v1/audit (images in small batches, each video or cine alone); every answer
// is the checklist of those files, and the page merges it into the study's checklist: an item
// is present when any upload showed it, its best frame is the most confident one, frame counts
// add up. The server keeps nothing between requests.
const STUDY_BATCH = 8;
const RECORDING = /\.(mp4|avi|mov|m4v|mkv|webm|mpe?g|wmv)$/i;
const study = { checklists: [], name: null, files: [], items: null, busy: false, seen: 0 };

function studyChecklist() {
  return study.checklists.find((c) => c.name === study.name);
}

function emptyItems() {
  const list = studyChecklist();
  if (!list) return [];
  return list.items.map((it) => ({
    ...it, status: list.assessed.includes(it.id) ? "missing" : "not_assessed",
    best: null, thumb: null, frames: 0, uncertain_frames: 0, first: null, last: null,
    sources: [],
  }));
}

function mergeItems(held, got) {
  const byId = new Map(got.items.map((it) => [it.id, it]));
  for (const mine of held) {
    const it = byId.get(mine.id);
    if (!it) continue;
    if (it.status === "present") mine.status = "present";
    if (it.best && (!mine.best || it.best.confidence > mine.best.confidence)) {
      mine.best = it.best;
      mine.thumb = got.thumbnails[it.id] || null;
    }
    mine.frames += it.frames;
    mine.uncertain_frames += it.uncertain_frames;
    mine.first = mine.first || it.first;
    mine.last = it.last || mine.last;
    for (const s of it.sources) if (!mine.sources.includes(s)) mine.sources.push(s);
  }
}

const whereText = (w) => (w.frame === null || w.frame === undefined
  ? w.source : `${w.source}, frame ${w.frame} at ${seconds(w.time_s)}`);

function renderStudy() {
  const items = study.items || emptyItems();
  const assessed = items.filter((i) => i.status !== "not_assessed" && i.required !== false);
  const present = assessed.filter((i) => i.status === "present");
  const missing = assessed.filter((i) => i.status === "missing");
  const notAssessed = items.filter((i) => i.status === "not_assessed").length;
  $("study-summary").textContent = study.seen
    ? `${present.length} of ${assessed.length} views this model can assess are present` +
      (notAssessed ? `; ${notAssessed} checklist items are not assessed by this model.` : ".")
    : "";
  $("study-missing").textContent = study.seen && missing.length
    ? `Missing: ${missing.map((i) => i.name).join(", ")}` : "";
  $("study-rows").replaceChildren(...items.map((it) => {
    const word = it.status === "present" ? "present"
      : it.status === "missing" ? (study.seen ? "missing" : "not yet seen")
        : "not assessed by this model";
    const img = it.thumb ? el("img", { src: `data:image/png;base64,${it.thumb}`,
      alt: `Best frame of ${it.name}` }) : "";
    const where = it.best ? el("span", {}, whereText(it.best),
      el("br"), `${it.best.view} · ${pct(it.best.confidence)} · ${it.frames} frame(s)`) : "";
    return el("tr", { class: `study-${it.status}`, "data-item": it.id },
      el("td", {}, el("strong", { text: it.name }), el("br"),
        el("span", { class: "muted", text: it.section })),
      el("td", { class: "study-status", text: word }), el("td", {}, img), el("td", {}, where));
  }));
}

async function auditBatch(files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const res = await fetch(`${API}/audit?checklist=${encodeURIComponent(study.name)}`,
    { method: "POST", body: form });
  const body = await res.json().catch(() => ({ detail: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.detail || `HTTP ${res.status}`);
  return body;
}

function studyBatches(files) {
  const batches = [];
  let images = [];
  for (const f of files) {
    if (RECORDING.test(f.name) || f.type.startsWith("video/")) batches.push([f]);
    else {
      images.push(f);
      if (images.length === STUDY_BATCH) { batches.push(images); images = []; }
    }
  }
  if (images.length) batches.push(images);
  return batches;
}

async function auditFiles(files) {
  const status = $("study-status");
  const tooBig = files.filter((f) => f.size > state.limits.max_file_bytes);
  const ok = files.filter((f) => f.size <= state.limits.max_file_bytes);
  const problems = tooBig.map((f) => `${f.name}: file too large (${mb(f.size)})`);
  study.busy = true;
  $("study-pick").disabled = true;
  let done = 0;
  for (const batch of studyBatches(ok)) {
    status.textContent = `Classifying… ${done} of ${ok.length} files done.`;
    try {
      const body = await auditBatch(batch);
      if (!study.items) study.items = emptyItems();
      mergeItems(study.items, body);
      problems.push(...body.failures);
      study.seen += batch.length;
    } catch (err) {
      problems.push(`${batch.map((f) => f.name).join(", ")}: ${err.message}`);
    }
    done += batch.length;
    renderStudy();
  }
  status.textContent = `${study.seen} file(s) in this study.` +
    (problems.length ? ` Not read: ${problems.join("; ")}` : "");
  study.busy = false;
  $("study-pick").disabled = false;
  $("study-new").disabled = study.files.length === 0;
}

function addStudyFiles(list) {
  const files = [...list];
  if (!files.length || study.busy || !study.name) return;
  study.files.push(...files);
  auditFiles(files);
}

function newStudy() {
  study.files = [];
  study.items = null;
  study.seen = 0;
  $("study-new").disabled = true;
  $("study-status").textContent = "No files yet.";
  renderStudy();
}

function renderModelCard(card) {
  const body = $("study-card-body");
  const parts = [];
  for (const [key, title] of [["summary", "Model"], ["intended_use", "Intended use"],
    ["training_data", "Training data"], ["folding", "Classes"],
    ["not_medical_device", "Status"]]) {
    if (card[key]) parts.push(el("p", {}, el("strong", { text: `${title}. ` }), card[key]));
  }
  if (card.accuracy && card.accuracy.length) {
    parts.push(el("p", {}, el("strong", { text: "Measured accuracy." })));
    parts.push(el("ul", {}, ...card.accuracy.map((a) =>
      el("li", {}, `${a.what}: `, el("strong", { text: a.result })))));
  }
  if (card.failure_modes && card.failure_modes.length) {
    parts.push(el("p", {}, el("strong", { text: "Known failure modes." })));
    parts.push(el("ul", {}, ...card.failure_modes.map((f) => el("li", { text: f }))));
  }
  body.replaceChildren(...parts);
}

async function loadStudy() {
  try {
    const res = await fetch(`${API}/checklists`);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    study.checklists = body.checklists.filter((c) => c.assessed.length);
    study.name = body.default;
    $("study-checklist").replaceChildren(...study.checklists.map((c) =>
      el("option", { value: c.name, selected: c.name === study.name }, c.title)));
    renderStudy();
  } catch (err) {
    $("study-status").textContent = `Could not load the checklists (${err.message}).`;
  }
  try {
    const res = await fetch(`${API}/model/card`);
    if (res.ok) renderModelCard(await res.json());
  } catch (err) {
    $("study-card-body").textContent = `Could not load the model card (${err.message}).`;
  }
}

function wireStudy() {
  const input = $("study-input");
  const zone = $("study-drop");
  $("study-pick").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addStudyFiles(input.files);
    input.value = "";
  });
  $("study-new").addEventListener("click", newStudy);
  $("study-checklist").addEventListener("change", (e) => {
    study.name = e.target.value;
    const files = study.files;
    newStudy();
    if (files.length) { study.files = files; auditFiles(files); } // the same files, re-checked
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("is-over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("is-over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("is-over");
    if (e.dataTransfer && e.dataTransfer.files.length) addStudyFiles(e.dataTransfer.files);
  });
}

wireStudy();
loadStudy();
