// fetalplanes Live panel: a camera, a capture card (the scanner's video output: it shows up
// as a camera) or a shared window, classified as it plays through the WebSocket /api/v1/live.
// Frames go out as JPEG, at most two unanswered at a time (the server keeps only the newest
// waiting frame, so the answer is never far behind the probe). Each answer names the frame
// by `seq` (the n-th frame sent); the page keeps the last frames it sent, so a best frame
// the server reports is shown from the page's own copy: nothing is stored on the server.
// Uses app.js's helpers ($, el, pct, colorOf, planeName, state, API, SCAN_* colours).
"use strict";

(() => {
  const MAX_SIDE = 1024; // frames are scaled down to this many pixels on their long side
  const IN_FLIGHT = 2; // frames sent and not yet answered
  const MAX_FPS = 30; // frames sent per second, at most
  const RING = 120; // frames kept to show best frames (their answers come a few frames late)
  const STRIP = 300; // smoothed rows drawn in the strip (20 s at 15 fps)
  const WINDOW = 5; // smoothing window (frames), as scan's default

  const live = {
    ws: null, stream: null, running: false, frozen: false, encoding: false,
    seq: 0, lastAnswered: -1, lastSent: 0, sent: new Map(), own: new Map(),
    rows: [], best: new Map(), checklist: null, latencies: [], answers: [], counts: null,
    canvas: document.createElement("canvas"), started: null,
  };

  // ---------------------------------------------------------------- sources
  async function listCameras() {
    const select = $("live-camera");
    if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) {
      select.replaceChildren(el("option", { value: "" }, "no camera access in this browser"));
      return;
    }
    const devices = (await navigator.mediaDevices.enumerateDevices())
      .filter((d) => d.kind === "videoinput");
    const chosen = select.value;
    select.replaceChildren(...(devices.length ? devices.map((d, i) => el("option", {
      value: d.deviceId, selected: d.deviceId === chosen,
    }, d.label || `Camera ${i + 1}`)) : [el("option", { value: "" }, "no camera found")]));
  }

  async function openSource(kind) {
    const md = navigator.mediaDevices;
    if (!md) throw new Error("this page needs https or localhost for camera access");
    if (kind === "window") return md.getDisplayMedia({ video: true, audio: false });
    const id = $("live-camera").value;
    return md.getUserMedia({ video: id ? { deviceId: { exact: id } } : true, audio: false });
  }

  // ---------------------------------------------------------------- session
  async function start(kind) {
    stop(false);
    resetSession();
    const status = $("live-status");
    try {
      live.stream = await openSource(kind);
    } catch (err) {
      status.textContent = `Could not open the ${kind === "window" ? "window" : "camera"}: ${err.message}`;
      return;
    }
    const video = $("live-video");
    video.srcObject = live.stream;
    await video.play().catch(() => {});
    listCameras().catch(() => {});
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}${API}/live?window=${WINDOW}`);
    live.ws = ws;
    live.running = true;
    live.started = performance.now();
    ws.onmessage = (event) => onMessage(JSON.parse(event.data));
    ws.onclose = (event) => {
      if (live.ws !== ws) return;
      if (live.running) {
        status.textContent = `Connection closed (${event.code}${event.reason ? `: ${event.reason}` : ""}).`;
      }
      stop(false);
    };
    status.textContent = "Connecting…";
    setButtons();
  }

  function stop(sayEnd = true) {
    const ws = live.ws;
    live.running = false;
    if (ws && ws.readyState === WebSocket.OPEN && sayEnd) {
      ws.send(JSON.stringify({ type: "stop" })); // the server answers with the last rows
    } else if (ws && ws.readyState <= WebSocket.OPEN) {
      live.ws = null;
      ws.close();
    }
    if (live.stream) live.stream.getTracks().forEach((t) => t.stop());
    live.stream = null;
    live.frozen = false;
    $("live-overlay").classList.remove("is-frozen");
    setButtons();
  }

  function resetSession() {
    for (const b of live.best.values()) URL.revokeObjectURL(b.url);
    Object.assign(live, {
      seq: 0, lastAnswered: -1, lastSent: 0, sent: new Map(), own: new Map(), rows: [],
      best: new Map(), checklist: null, latencies: [], answers: [], counts: null,
    });
    $("live-strip").replaceChildren();
    $("live-best").replaceChildren();
    $("live-plane").textContent = "–";
    $("live-conf").textContent = "";
  }

  function setButtons() {
    const on = live.running;
    $("live-freeze").disabled = !on;
    $("live-freeze").setAttribute("aria-pressed", String(live.frozen));
    $("live-freeze").textContent = live.frozen ? "Unfreeze" : "Freeze";
    $("live-stop").disabled = !on;
    $("live-save").disabled = live.rows.length === 0 && live.best.size === 0;
  }

  function freeze() {
    live.frozen = !live.frozen;
    const video = $("live-video");
    if (live.frozen) video.pause(); else video.play().catch(() => {});
    $("live-overlay").classList.toggle("is-frozen", live.frozen);
    setButtons();
  }

  // ---------------------------------------------------------------- sending frames
  function pump() {
    const ws = live.ws;
    const video = $("live-video");
    if (!live.running || live.frozen || live.encoding || !ws || ws.readyState !== WebSocket.OPEN) return;
    if (live.seq - live.lastAnswered - 1 >= IN_FLIGHT) return;
    if (video.readyState < 2 || !video.videoWidth) return;
    const now = performance.now();
    if (now - live.lastSent < 1000 / MAX_FPS) return;
    const scale = Math.min(1, MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
    const canvas = live.canvas;
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    live.encoding = true;
    live.lastSent = now;
    canvas.toBlob((blob) => {
      live.encoding = false;
      if (!blob || !live.running || live.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
      const seq = live.seq++;
      live.sent.set(seq, { t: performance.now(), blob });
      if (live.sent.size > RING) live.sent.delete(live.sent.keys().next().value);
      ws.send(blob);
    }, "image/jpeg", 0.9);
  }

  // ---------------------------------------------------------------- answers
  function onMessage(msg) {
    if (msg.type === "start") {
      $("live-status").textContent = "Live: classifying as the video plays.";
      live.checklist = msg.checklist;
      renderChecklist();
    } else if (msg.type === "frame") {
      onFrame(msg);
    } else if (msg.type === "end") {
      (msg.final || []).forEach(onSmoothed);
      onBest(msg.best || []);
      if (msg.checklist) { live.checklist = msg.checklist; renderChecklist(); }
      live.counts = msg;
      renderStats();
      $("live-status").textContent = `Stopped: ${msg.processed} frames classified, ` +
        `${msg.dropped} dropped. Save the session to keep its best frames and timeline.`;
      setButtons();
    } else if (msg.type === "error") {
      $("live-status").textContent = msg.detail;
    }
  }

  function onFrame(msg) {
    const sent = live.sent.get(msg.seq);
    const now = performance.now();
    if (sent) live.latencies.push(now - sent.t);
    if (live.latencies.length > 60) live.latencies.shift();
    live.answers.push(now);
    if (live.answers.length > 31) live.answers.shift();
    live.lastAnswered = Math.max(live.lastAnswered, msg.seq);
    live.counts = msg;
    if (!msg.error) live.own.set(msg.seq, msg);
    if (msg.smoothed) onSmoothed(msg.smoothed);
    if (msg.best) onBest(msg.best);
    if (msg.checklist) { live.checklist = msg.checklist; renderChecklist(); }
    renderStats();
  }

  const smoothKey = (s) => (s.not_target ? NOT_TARGET : s.uncertain ? "uncertain" : s.label);

  function onSmoothed(s) {
    const own = live.own.get(s.seq);
    for (const k of live.own.keys()) { if (k <= s.seq) live.own.delete(k); else break; }
    if (own) live.rows.push(csvRow(own, s));
    const key = smoothKey(s);
    const overlay = $("live-overlay");
    $("live-plane").textContent = key === "uncertain" ? `${s.label}?` : planeName(key);
    $("live-conf").textContent = pct(s.confidence);
    overlay.style.setProperty("--accent", scanColor(s));
    overlay.dataset.plane = key;
    const cell = el("span", { title: `${scanLabel(key)}: frame ${s.seq}, ${seconds(s.time_s)}`,
      "data-plane": key });
    cell.style.background = scanColor(s);
    const strip = $("live-strip");
    strip.append(cell);
    while (strip.childElementCount > STRIP) strip.firstElementChild.remove();
    if (live.rows.length === 1) setButtons();
  }

  function onBest(list) {
    for (const b of list) {
      const held = live.best.get(b.plane);
      if (held && held.kept) continue;
      if (held && held.frame === b.frame) continue;
      const sent = live.sent.get(b.frame);
      if (!sent) continue; // older than the frames kept: the next change will show
      if (held) URL.revokeObjectURL(held.url);
      live.best.set(b.plane, { ...b, blob: sent.blob, url: URL.createObjectURL(sent.blob), kept: false });
    }
    renderBest();
  }

  // ---------------------------------------------------------------- drawing
  function renderStats() {
    const c = live.counts;
    if (!c) return;
    const a = live.answers;
    const fps = a.length > 1 ? (1000 * (a.length - 1)) / (a[a.length - 1] - a[0]) : 0;
    const lat = [...live.latencies].sort((x, y) => x - y);
    const median = lat.length ? lat[Math.floor(lat.length / 2)] : 0;
    $("live-stats").textContent = `${fps.toFixed(1)} frames/s · latency ${Math.round(median)} ms · ` +
      `${c.received} sent, ${c.processed} classified, ${c.dropped} dropped`;
    const stats = $("live-stats");
    stats.dataset.fps = fps.toFixed(2);
    stats.dataset.latency = String(Math.round(median));
    stats.dataset.dropped = String(c.dropped);
    stats.dataset.processed = String(c.processed);
  }

  function renderBest() {
    const planes = state.classes.filter((c) => live.best.has(c));
    $("live-best").replaceChildren(...planes.map((plane) => {
      const b = live.best.get(plane);
      const keep = el("button", { type: "button", class: "btn btn-small live-best-keep",
        "aria-pressed": String(b.kept) }, b.kept ? "Kept" : "Keep this one");
      keep.addEventListener("click", () => { b.kept = !b.kept; renderBest(); });
      const figure = el("figure", { "data-plane": plane },
        el("img", { src: b.url, alt: `Best frame of ${plane}: frame ${b.frame}` }),
        el("figcaption", {}, el("strong", { text: plane }),
          `frame ${b.frame} · ${seconds(b.time_s)} · ${pct(b.confidence)}`, el("br"), keep));
      figure.style.setProperty("--accent", colorOf(plane));
      return el("li", {}, figure);
    }));
    setButtons();
  }

  function renderChecklist() {
    const c = live.checklist;
    $("live-checklist").hidden = !c;
    if (!c) return;
    $("live-checklist-title").textContent =
      `${c.checklist.title}: ${c.present.length} of ${c.summary.assessed} present`;
    $("live-checklist-rows").replaceChildren(...c.items.map((it) => {
      const word = it.status === "present" ? "present"
        : it.status === "missing" ? "not yet seen" : "not assessed by this model";
      return el("tr", { class: `study-${it.status}`, "data-item": it.id },
        el("td", { text: it.name }), el("td", { class: "study-status", text: word }));
    }));
  }

  // ---------------------------------------------------------------- saving
  function cell(value) {
    if (value === null || value === undefined) return "";
    if (typeof value === "boolean") return value ? "1" : "0";
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(6);
    let text = String(value);
    if (/^[=+\-@\t\r]/.test(text)) text = `'${text}`; // no spreadsheet formulas
    return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function csvRow(own, s) {
    const row = {};
    for (const col of state.columns) {
      if (col.startsWith("p_")) row[col] = own.probabilities ? own.probabilities[col.slice(2)] : "";
      else if (col === "path") row[col] = `live#frame=${own.seq}`;
      else row[col] = own[col];
    }
    Object.assign(row, { smoothed_label: s.label, smoothed_confidence: s.confidence,
      smoothed_not_target: s.not_target, smoothed_uncertain: s.uncertain });
    for (const c of state.classes) row[`smoothed_p_${c}`] = s.probabilities[c];
    return row;
  }

  // Columns holding decimals: written with six decimals, as timeline.csv of `scan` does.
  const DECIMAL = /^(p_|smoothed_p_)|^(time_s|confidence|model_confidence|rejection_score|smoothed_confidence)$/;

  function timelineCsv() {
    const cols = [...state.columns, "smoothed_label", "smoothed_confidence",
      "smoothed_not_target", "smoothed_uncertain", ...state.classes.map((c) => `smoothed_p_${c}`)];
    const lines = [cols.map(cell).join(",")];
    for (const r of live.rows) {
      lines.push(cols.map((c) => (DECIMAL.test(c) && typeof r[c] === "number"
        ? r[c].toFixed(6) : cell(r[c]))).join(","));
    }
    return `${lines.join("\r\n")}\r\n`;
  }

  const fileName = (plane) => `${plane.replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^[._]+|[._]+$/g, "") || "plane"}.jpg`;

  async function saveSession() {
    const files = [{ name: "timeline.csv", data: new TextEncoder().encode(timelineCsv()) }];
    for (const plane of state.classes) {
      const b = live.best.get(plane);
      if (b) files.push({ name: `best/${fileName(plane)}`, data: new Uint8Array(await b.blob.arrayBuffer()) });
    }
    const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
    const url = URL.createObjectURL(new Blob([zip(files)], { type: "application/zip" }));
    const a = el("a", { href: url, download: `fetalplanes-live-${stamp}.zip` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  // A ZIP file of stored (uncompressed) entries: enough for a CSV and a few JPEGs, and no
  // library to load from anywhere.
  const CRC_TABLE = (() => {
    const t = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      t[n] = c >>> 0;
    }
    return t;
  })();

  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  function zip(files) {
    const parts = [];
    const central = [];
    let offset = 0;
    const d = new Date();
    const time = (d.getHours() << 11) | (d.getMinutes() << 5) | (d.getSeconds() >> 1);
    const date = ((d.getFullYear() - 1980) << 9) | ((d.getMonth() + 1) << 5) | d.getDate();
    for (const f of files) {
      const name = new TextEncoder().encode(f.name);
      const crc = crc32(f.data);
      const head = new DataView(new ArrayBuffer(30));
      [[0, 0x04034b50, 4], [4, 20, 2], [6, 0, 2], [8, 0, 2], [10, time, 2], [12, date, 2],
        [14, crc, 4], [18, f.data.length, 4], [22, f.data.length, 4], [26, name.length, 2],
        [28, 0, 2]].forEach(([at, v, n]) => (n === 4 ? head.setUint32(at, v, true) : head.setUint16(at, v, true)));
      const dir = new DataView(new ArrayBuffer(46));
      [[0, 0x02014b50, 4], [4, 20, 2], [6, 20, 2], [8, 0, 2], [10, 0, 2], [12, time, 2],
        [14, date, 2], [16, crc, 4], [20, f.data.length, 4], [24, f.data.length, 4],
        [28, name.length, 2], [30, 0, 2], [32, 0, 2], [34, 0, 2], [36, 0, 2], [38, 0, 4],
        [42, offset, 4]].forEach(([at, v, n]) => (n === 4 ? dir.setUint32(at, v, true) : dir.setUint16(at, v, true)));
      parts.push(head, name, f.data);
      central.push(dir, name);
      offset += 30 + name.length + f.data.length;
    }
    const size = central.reduce((n, p) => n + p.byteLength, 0);
    const end = new DataView(new ArrayBuffer(22));
    [[0, 0x06054b50, 4], [4, 0, 2], [6, 0, 2], [8, files.length, 2], [10, files.length, 2],
      [12, size, 4], [16, offset, 4], [20, 0, 2]].forEach(([at, v, n]) => (n === 4 ? end.setUint32(at, v, true) : end.setUint16(at, v, true)));
    return new Blob([...parts, ...central, end]);
  }

  // ---------------------------------------------------------------- wiring
  $("live-start").addEventListener("click", () => start("camera"));
  $("live-share").addEventListener("click", () => start("window"));
  $("live-stop").addEventListener("click", () => stop(true));
  $("live-freeze").addEventListener("click", freeze);
  $("live-save").addEventListener("click", () => { saveSession().catch((err) => {
    $("live-status").textContent = `Could not save the session: ${err.message}`;
  }); });
  if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) $("live-share").hidden = true;
  listCameras().catch(() => {});
  setInterval(pump, 5);
  setButtons();
  renderChecklist();
})();
