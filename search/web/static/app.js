// The matchmap search page: record or drop a spoken query, see the hits, their heatmaps, and live
// highlighting over the top hit while speaking. Plain ES modules, no build step.

const $ = (id) => document.getElementById(id);
const state = {
  config: null, token: localStorage.getItem("matchmap-token") || "", hits: [], collection: "",
  query: null,          // {blob, samples, rate} of the last query
  recorder: null,       // the recording in progress
  images: new Map(),    // image URL -> object URL (fetched with the token)
  detailRequest: 0,     // latest heatmap request of the detail view; older answers are dropped
};

// ---- talking to the server ---------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    const limit = state.config ? ` (uploads over ${state.config.max_upload_mb} MB are refused)` : "";
    throw new ApiError(0, `the server could not be reached or closed the connection${limit}`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch { /* not our JSON */ }
    if (response.status === 401) $("token-field").hidden = false;
    throw new ApiError(response.status, message);
  }
  return response;
}

const collectionPath = (c, id, what) => `/api/collections/${encodeURIComponent(c)}/images/${encodeURIComponent(id)}/${what}`;

async function imageURL(path) {
  if (!state.images.has(path)) {
    const blob = await (await api(path)).blob();
    state.images.set(path, URL.createObjectURL(blob));
  }
  return state.images.get(path);
}

async function loadImage(path) {
  const img = new Image();
  img.src = await imageURL(path);
  await img.decode();
  return img;
}

// ---- status and errors ---------------------------------------------------------------------------

function setStatus(text, phase) {
  $("status").textContent = text;
  if (phase) document.body.dataset.phase = phase;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? (error.status ? `Error ${error.status}: ${error.message}` : error.message) : "";
  box.hidden = !error;
  if (error) { document.body.dataset.phase = "error"; setStatus(""); }
}

// ---- collections -----------------------------------------------------------------------------------

async function loadCollections() {
  try {
    const answer = await (await api("/api/collections")).json();
    const select = $("collection");
    select.replaceChildren();
    for (const c of answer.collections) {
      const option = new Option(`${c.name} (${c.images} images)`, c.name);
      option.disabled = !c.searchable;
      if (!c.searchable) option.text += " — indexed with another model";
      select.add(option);
    }
    const first = answer.collections.find((c) => c.searchable);
    if (first) select.value = first.name;
    state.collection = select.value;
    $("collection-info").textContent = first ? "" : "no searchable collection yet: run `matchmap index` first";
    $("record").disabled = !first;
    showError(null);
    setStatus(first ? "Press Record and describe a picture, or drop a recording." : "", "ready");
  } catch (error) {
    showError(error);
  }
}

// ---- recording -------------------------------------------------------------------------------------

async function startRecording() {
  showError(null);
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (error) {
    showError(new ApiError(0, `the microphone is not available (${error.name}); you can drop a recording instead`));
    return;
  }
  const context = new AudioContext();
  await context.audioWorklet.addModule("/static/recorder-worklet.js");
  const source = context.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(context, "recorder");
  const mute = context.createGain();
  mute.gain.value = 0;
  source.connect(node).connect(mute).connect(context.destination);
  const recorder = { stream, context, node, blocks: [], samples: 0, live: null };
  node.port.onmessage = (event) => {
    recorder.blocks.push(event.data);
    recorder.samples += event.data.length;
    recorder.live?.push(event.data);
    const seconds = recorder.samples / context.sampleRate;
    setStatus(`Recording… ${seconds.toFixed(1)} s (press Stop when done)`);
    if (state.config && seconds >= state.config.max_audio_seconds - 0.1) stopRecording();
  };
  if (state.hits.length) recorder.live = openLive(state.hits[0], context.sampleRate);
  state.recorder = recorder;
  const button = $("record");
  button.setAttribute("aria-pressed", "true");
  button.querySelector(".label").textContent = "Stop";
  setStatus("Recording… speak now", "recording");
}

async function stopRecording() {
  const recorder = state.recorder;
  if (!recorder) return;
  state.recorder = null;
  const button = $("record");
  button.setAttribute("aria-pressed", "false");
  button.querySelector(".label").textContent = "Record";
  recorder.node.port.onmessage = null;
  recorder.stream.getTracks().forEach((track) => track.stop());
  const rate = recorder.context.sampleRate;
  await recorder.context.close();
  recorder.live?.end();
  const samples = concat(recorder.blocks);
  if (samples.length < rate * 0.3) {
    showError(new ApiError(0, "the recording is shorter than 0.3 s: hold Record while you speak"));
    return;
  }
  await search({ blob: encodeWav(samples, rate), samples, rate });
}

function concat(blocks) {
  const out = new Float32Array(blocks.reduce((n, b) => n + b.length, 0));
  let at = 0;
  for (const b of blocks) { out.set(b, at); at += b.length; }
  return out;
}

function toInt16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = Math.max(-1, Math.min(1, samples[i])) * 0x7fff;
  return out;
}

function encodeWav(samples, rate) {
  const pcm = toInt16(samples);
  const view = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((ch, i) => view.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + pcm.byteLength, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, pcm.byteLength, true);
  return new Blob([view, pcm], { type: "audio/wav" });
}

// ---- dropped or chosen files -------------------------------------------------------------------------

async function searchFile(file) {
  showError(null);
  let samples = null, rate = 0;
  try {  // for the waveform only; the server decides whether the file is usable audio
    const context = new OfflineAudioContext(1, 1, 44100);
    const decoded = await context.decodeAudioData(await file.arrayBuffer());
    samples = decoded.getChannelData(0);
    rate = decoded.sampleRate;
  } catch { /* not decodable here: the server says why */ }
  await search({ blob: file, samples, rate, name: file.name });
}

// ---- search and the grid -----------------------------------------------------------------------------

async function search(query) {
  state.collection = $("collection").value;
  setStatus("Searching…", "searching");
  const started = performance.now();
  try {
    const params = new URLSearchParams({ collection: state.collection, top_k: $("top-k").value });
    const response = await api(`/api/search?${params}`, {
      method: "POST", body: query.blob, headers: { "Content-Type": query.blob.type || "application/octet-stream" },
    });
    const answer = await response.json();
    state.query = query;
    state.hits = answer.hits;
    showError(null);
    renderHits(answer.hits);
    const ms = performance.now() - started;
    setStatus(`${answer.hits.length} hits among ${answer.collection_size} images for ${answer.audio_seconds.toFixed(1)} s of speech ` +
              `(${ms.toFixed(0)} ms; server ${answer.timings.total_ms.toFixed(0)} ms). Select a hit to see where the words land.`, "results");
  } catch (error) {
    showError(error);
  }
}

function basename(uri) { return uri.split(/[\\/]/).pop(); }

function renderHits(hits) {
  const list = $("results");
  list.replaceChildren();
  $("results-title").hidden = hits.length === 0;
  $("detail").hidden = true;
  hits.forEach((hit, i) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hit";
    button.dataset.imageId = hit.image_id;
    button.dataset.name = basename(hit.uri);
    button.setAttribute("aria-label", `Hit ${i + 1}: ${basename(hit.uri)}, score ${hit.score.toFixed(3)}. Show its heatmap.`);
    const img = document.createElement("img");
    img.alt = "";
    img.width = img.height = 150;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.innerHTML = `<span>#${i + 1}</span><span>${hit.score.toFixed(3)}</span>`;
    button.append(img, meta);
    button.addEventListener("click", () => showDetail(hit, i, button));
    item.append(button);
    list.append(item);
    imageURL(collectionPath(state.collection, hit.image_id, "thumbnail"))
      .then((url) => { img.src = url; img.decode().then(() => { img.dataset.loaded = "1"; }, () => {}); })
      .catch((error) => { img.alt = `thumbnail unavailable: ${error.message}`; });
  });
}

// ---- heatmaps ----------------------------------------------------------------------------------------------

function jet(v) {  // the colormap of the CLI's pictures
  const c = (x) => Math.round(255 * Math.max(0, Math.min(1, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

function drawHeatmap(canvas, img, heat) {
  const scale = Math.min(canvas.dataset.fit || 480, 480) / Math.max(img.naturalWidth, img.naturalHeight);
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (!heat) return;
  const cells = new OffscreenCanvas(heat.cols, heat.rows);
  const pixels = cells.getContext("2d").createImageData(heat.cols, heat.rows);
  heat.heatmap.forEach((v, i) => {
    const [r, g, b] = jet(v);
    pixels.data.set([r, g, b, Math.round(255 * 0.6 * v)], 4 * i);
  });
  cells.getContext("2d").putImageData(pixels, 0, 0);
  const [x0, y0, x1, y1] = heat.heatmap_box.map((x) => x * scale);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(cells, x0, y0, x1 - x0, y1 - y0);
}

async function localize(hit, start = 0, end = 0) {
  const params = new URLSearchParams({ collection: state.collection, image_id: hit.image_id,
                                       start_seconds: start, end_seconds: end });
  const response = await api(`/api/localize?${params}`, {
    method: "POST", body: state.query.blob, headers: { "Content-Type": state.query.blob.type || "application/octet-stream" },
  });
  return response.json();
}

async function showDetail(hit, index, button) {
  document.querySelectorAll(".hit").forEach((b) => b.removeAttribute("aria-current"));
  button.setAttribute("aria-current", "true");
  const detail = $("detail");
  detail.hidden = false;
  detail.dataset.ready = "";
  $("detail-title").textContent = `Hit ${index + 1}: ${basename(hit.uri)} (score ${hit.score.toFixed(3)})`;
  const request = ++state.detailRequest;
  try {
    const [img, whole] = await Promise.all([loadImage(collectionPath(state.collection, hit.image_id, "image")), localize(hit)]);
    if (request !== state.detailRequest) return;
    drawHeatmap($("heat-canvas"), img, whole);
    const frames = whole.frame_scores.length;
    const moment = $("moment");
    moment.max = frames - 1;
    moment.value = -1;
    $("moment-info").textContent = `The whole query (${whole.end_seconds.toFixed(2)} s). Move along the recording to follow each moment.`;
    drawWave(whole, -1);
    state.detail = { hit, img, whole };
    detail.dataset.ready = "1";
    detail.scrollIntoView({ behavior: "smooth", block: "nearest" });
  } catch (error) {
    showError(error);
  }
}

function drawWave(whole, frame) {
  const canvas = $("wave");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const duration = whole.frame_scores.length * whole.frame_seconds;
  const samples = state.query.samples;
  if (samples && state.query.rate) {
    ctx.fillStyle = "#8a93a6";
    const per = Math.max(1, Math.floor(samples.length / width));
    const shown = Math.min(1, (samples.length / state.query.rate) / duration);
    for (let x = 0; x < width * shown; x++) {
      let peak = 0;
      for (let i = Math.floor(x / shown) * per, end = i + per; i < end && i < samples.length; i++) peak = Math.max(peak, Math.abs(samples[i]));
      const h = Math.max(1, peak * height * 0.9);
      ctx.fillRect(x, (height - h) / 2, 1, h);
    }
  }
  const scores = whole.frame_scores;  // how strongly each moment matches the image
  const lo = Math.min(...scores), hi = Math.max(...scores);
  ctx.strokeStyle = "#2357d9";
  ctx.lineWidth = 2;
  ctx.beginPath();
  scores.forEach((s, t) => {
    const x = ((t + 0.5) / scores.length) * width, y = height - 4 - ((s - lo) / (hi - lo || 1)) * (height - 8);
    t ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  if (frame >= 0) {
    ctx.fillStyle = "#b3261e55";
    const span = momentSpan(frame, whole);
    ctx.fillRect((span[0] / duration) * width, 0, ((span[1] - span[0]) / duration) * width, height);
  }
}

function momentSpan(frame, whole) {  // about 0.3 s around a frame
  const half = Math.max(1, Math.round(0.15 / whole.frame_seconds));
  return [Math.max(0, frame - half) * whole.frame_seconds, (Math.min(whole.frame_scores.length, frame + half + 1)) * whole.frame_seconds];
}

let momentTimer = 0;
function showMoment(frame) {
  const d = state.detail;
  if (!d) return;
  $("moment").value = frame;
  drawWave(d.whole, frame);
  clearTimeout(momentTimer);
  if (frame < 0) { drawHeatmap($("heat-canvas"), d.img, d.whole); return; }
  momentTimer = setTimeout(async () => {
    const [start, end] = momentSpan(frame, d.whole);
    const request = ++state.detailRequest;
    try {
      const heat = await localize(d.hit, start, end);
      if (request !== state.detailRequest) return;
      drawHeatmap($("heat-canvas"), d.img, heat);
      $("moment-info").textContent = `${heat.start_seconds.toFixed(2)}–${heat.end_seconds.toFixed(2)} s of the query`;
    } catch (error) { showError(error); }
  }, 40);
}

// ---- live highlighting over the top hit ----------------------------------------------------------------------

function openLive(hit, rate) {
  const section = $("live");
  section.hidden = false;
  section.dataset.frames = "0";
  const canvas = $("live-canvas");
  const pending = [];
  let img = null, frames = 0, ended = false;
  loadImage(collectionPath(state.collection, hit.image_id, "image")).then((i) => { img = i; drawHeatmap(canvas, img, null); }, () => {});
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/highlight`;
  const socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    socket.send(JSON.stringify({ collection: state.collection, image_id: hit.image_id, sample_rate: rate,
                                 window_seconds: 1.0, token: state.token || undefined }));
    pending.splice(0).forEach((chunk) => socket.send(chunk));
    if (ended) socket.send(JSON.stringify({ end: true }));
  };
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.error) { showError(new ApiError(message.error.status, `live highlighting: ${message.error.message}`)); return; }
    frames += 1;
    section.dataset.frames = String(frames);
    if (img) drawHeatmap(canvas, img, message);
    $("live-info").textContent = `${basename(hit.uri)}: the heatmap of ${message.start_seconds.toFixed(1)}–${message.end_seconds.toFixed(1)} s`;
  };
  return {
    push(samples) {
      const chunk = toInt16(samples).buffer;
      socket.readyState === WebSocket.OPEN ? socket.send(chunk) : pending.push(chunk);
    },
    end() {
      ended = true;
      if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ end: true }));
    },
  };
}

// ---- wiring --------------------------------------------------------------------------------------------------

async function main() {
  try {
    state.config = await (await fetch("/api/config")).json();
  } catch { /* the page still tries the API */ }
  if (state.config?.token_required) $("token-field").hidden = false;
  $("token").value = state.token;
  $("token").addEventListener("change", () => {
    state.token = $("token").value.trim();
    localStorage.setItem("matchmap-token", state.token);
    loadCollections();
  });
  $("collection").addEventListener("change", () => { state.collection = $("collection").value; });
  $("record").addEventListener("click", () => (state.recorder ? stopRecording() : startRecording()));
  $("file").addEventListener("change", (event) => { const f = event.target.files[0]; if (f) searchFile(f); event.target.value = ""; });
  document.addEventListener("dragover", (event) => { event.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) searchFile(file);
  });
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; document.querySelector(".hit[aria-current]")?.focus(); });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape" && !$("detail").hidden) $("close-detail").click(); });
  $("moment").addEventListener("input", (event) => showMoment(Number(event.target.value)));
  const wave = $("wave");
  const frameAt = (event) => {
    const d = state.detail;
    const x = (event.offsetX / wave.clientWidth) * d.whole.frame_scores.length;
    return Math.max(0, Math.min(d.whole.frame_scores.length - 1, Math.floor(x)));
  };
  wave.addEventListener("mousemove", (event) => { if (state.detail) showMoment(frameAt(event)); });
  wave.addEventListener("mouseleave", () => { if (state.detail) showMoment(-1); });
  await loadCollections();
}

main();
