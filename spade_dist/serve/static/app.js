// spade-serve page: a label-id canvas (one id per generator pixel), brushes per class in the dataset's
// colours, a style row, and the generated image beside it. Everything the server sends is shown as text
// (textContent), never as HTML.
"use strict";

const DONTCARE_ID = 255;
const UNDO_LIMIT = 50;
const DEBOUNCE_MS = 200;
const INFO_POLL_MS = 2000;
const BACKGROUND_ID = 0;  // the class a new canvas is filled with, and the first brush selected

const $ = (id) => document.getElementById(id);
const state = {
  info: null, width: 0, height: 0, ids: null, palette: [], selected: 0, tool: "brush", size: 4,
  undo: [], redo: [], seed: 0, key: "canvas", styleFile: null, styleSample: null, inFlight: false, pending: false,
  timer: null,
  step: null, drawing: false, last: null, imageUrl: null,
  version: 0,  // bumped on every change of the label map; the image records the version it shows
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

function render() {
  state.version += 1;
  $("canvas").dataset.version = String(state.version);
  const ctx = $("canvas").getContext("2d");
  const image = ctx.createImageData(state.width, state.height);
  for (let i = 0; i < state.ids.length; i++) {
    const id = state.ids[i];
    const color = id === DONTCARE_ID || id >= state.palette.length ? [0, 0, 0] : state.palette[id];
    image.data[4 * i] = color[0];
    image.data[4 * i + 1] = color[1];
    image.data[4 * i + 2] = color[2];
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function pushUndo() {
  state.undo.push(state.ids.slice());
  if (state.undo.length > UNDO_LIMIT) state.undo.shift();
  state.redo = [];
}

// Undo / redo (buttons, Ctrl+Z / Ctrl+Shift+Z): each moves the current map onto the other stack.
function stepHistory(from, to) {
  const ids = from.pop();
  if (!ids) return;
  to.push(state.ids);
  if (to.length > UNDO_LIMIT) to.shift();
  state.ids = ids;
  render();
  scheduleGenerate();
}

function showBrushCursor(event) {
  const cursor = $("brush-cursor");
  if (state.tool !== "brush" || !event) { cursor.hidden = true; return; }
  const rect = $("canvas").getBoundingClientRect();
  const diameter = Math.max(2, (state.size * rect.width) / state.width);
  const wrap = $("canvas-wrap").getBoundingClientRect();
  cursor.style.width = cursor.style.height = `${diameter}px`;
  cursor.style.left = `${event.clientX - wrap.left}px`;
  cursor.style.top = `${event.clientY - wrap.top}px`;
  cursor.hidden = false;
}

function canvasPoint(event) {
  const rect = $("canvas").getBoundingClientRect();
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * state.width);
  const y = Math.floor(((event.clientY - rect.top) / rect.height) * state.height);
  return [Math.min(Math.max(x, 0), state.width - 1), Math.min(Math.max(y, 0), state.height - 1)];
}

function paintDisc(cx, cy) {
  const r = state.size / 2;
  const r2 = r * r;
  for (let y = Math.floor(cy - r); y <= Math.ceil(cy + r); y++) {
    if (y < 0 || y >= state.height) continue;
    for (let x = Math.floor(cx - r); x <= Math.ceil(cx + r); x++) {
      if (x < 0 || x >= state.width) continue;
      const dx = x - cx, dy = y - cy;
      if (dx * dx + dy * dy <= r2 || (x === cx && y === cy)) state.ids[y * state.width + x] = state.selected;
    }
  }
}

function paintLine(from, to) {
  const steps = Math.max(Math.abs(to[0] - from[0]), Math.abs(to[1] - from[1]), 1);
  for (let s = 0; s <= steps; s++) {
    paintDisc(Math.round(from[0] + ((to[0] - from[0]) * s) / steps), Math.round(from[1] + ((to[1] - from[1]) * s) / steps));
  }
}

function floodFill(x, y) {
  const target = state.ids[y * state.width + x];
  if (target === state.selected) return;
  const stack = [[x, y]];
  while (stack.length) {
    const [px, py] = stack.pop();
    const i = py * state.width + px;
    if (state.ids[i] !== target) continue;
    state.ids[i] = state.selected;
    if (px > 0) stack.push([px - 1, py]);
    if (px < state.width - 1) stack.push([px + 1, py]);
    if (py > 0) stack.push([px, py - 1]);
    if (py < state.height - 1) stack.push([px, py + 1]);
  }
}

function labelsBlob() {
  // little-endian uint16 ids, whatever the browser's byte order
  const view = new DataView(new ArrayBuffer(state.ids.length * 2));
  state.ids.forEach((id, i) => view.setUint16(2 * i, id, true));
  return new Blob([view.buffer], { type: "application/octet-stream" });
}

function labelsForm() {
  const form = new FormData();
  form.append("labels", labelsBlob(), "labels.bin");
  form.append("width", String(state.width));
  form.append("height", String(state.height));
  return form;
}

function scheduleGenerate() {
  clearTimeout(state.timer);
  state.timer = setTimeout(generate, DEBOUNCE_MS);
}

async function generate() {
  if (state.inFlight) { state.pending = true; return; }
  state.inFlight = true;
  state.pending = false;
  $("status").textContent = "generating…";
  const version = state.version;
  const seed = state.seed;
  const key = state.key;
  const styleName = state.styleFile ? state.styleFile.name : state.styleSample !== null ? `sample ${state.styleSample}` : "";
  const form = labelsForm();
  form.append("seed", String(seed));
  form.append("key", key);
  if (state.styleFile) form.append("style", state.styleFile, state.styleFile.name);
  else if (state.styleSample !== null) form.append("style_sample", String(state.styleSample));
  try {
    const response = await fetch("/api/generate", { method: "POST", body: form });
    if (!response.ok) {
      showError(await errorText(response));
      $("status").textContent = "";
    } else {
      const blob = await response.blob();
      if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
      state.imageUrl = URL.createObjectURL(blob);
      const img = $("result");
      const step = response.headers.get("X-Step");
      img.dataset.step = step || "";
      img.dataset.seed = String(seed);
      img.dataset.key = key;
      img.dataset.version = String(version);
      img.dataset.style = styleName;
      img.src = state.imageUrl;
      $("download-image").href = state.imageUrl;
      $("status").textContent = (step ? `step ${step} · ` : "") + `seed ${seed} · key ${key}` +
        ` · batch of ${response.headers.get("X-Batch-Size")}`;
      clearError();
    }
  } catch (err) {
    showError(`request failed: ${err}`);
  } finally {
    state.inFlight = false;
    if (state.pending) scheduleGenerate();
  }
}

function loadIds(payload) {
  if (payload.width !== state.width || payload.height !== state.height) {
    showError(`label map is ${payload.width}x${payload.height}, the canvas ${state.width}x${state.height}`);
    return;
  }
  pushUndo();
  state.ids = Uint16Array.from(payload.ids);
  state.key = payload.key || "canvas";
  render();
  scheduleGenerate();
}

function selectClass(id) {
  state.selected = id;
  document.querySelectorAll(".brush").forEach((b) => b.classList.toggle("active", Number(b.dataset.id) === id));
}

function buildBrushes(classes) {
  const box = $("brushes");
  box.replaceChildren();
  for (const cls of classes) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "brush";
    button.dataset.id = String(cls.id);
    button.dataset.name = cls.name;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${cls.color.join(",")})`;
    const name = document.createElement("span");
    name.textContent = `${cls.id} ${cls.name}`;
    button.append(swatch, name);
    button.addEventListener("click", () => selectClass(cls.id));
    box.append(button);
  }
}

function setTool(tool) {
  state.tool = tool;
  $("tool-brush").classList.toggle("active", tool === "brush");
  $("tool-fill").classList.toggle("active", tool === "fill");
  if (tool !== "brush") showBrushCursor(null);
}

function showSeed() {
  $("seed").textContent = `seed ${state.seed}`;
}

function markStyle(button) {
  document.querySelectorAll(".style").forEach((b) => b.classList.toggle("active", b === button));
}

function styleButton(title, onPick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "style";
  button.title = title;
  const img = document.createElement("img");
  img.alt = title;
  button.append(img);
  button.addEventListener("click", () => { markStyle(button); onPick(); scheduleGenerate(); });
  $("style-row").append(button);
  return img;
}

// Thumbnails of fixed seeds: the model's image of the starting canvas for each seed.
async function seedThumbnail(img, seed) {
  const form = labelsForm();
  form.append("seed", String(seed));
  form.append("key", state.key);  // the key and seed a click on it generates with
  const response = await fetch("/api/generate", { method: "POST", body: form });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

// The style row (GauGAN's row of style images): shard photos through the encoder, or fixed seeds.
function buildStyles(styles) {
  $("style-note").textContent = styles.note;
  $("style-row").replaceChildren();
  for (const item of styles.items) {
    if (styles.kind === "photos") {
      const img = styleButton(item.key, () => {
        state.styleSample = item.sample;
        state.styleFile = null;
        $("upload-style").value = "";
      });
      img.src = `/api/samples/${encodeURIComponent(item.sample)}/photo.png`;
      img.dataset.sample = String(item.sample);
    } else {
      const img = styleButton(`seed ${item.seed}`, () => {
        state.seed = item.seed;
        state.styleSample = null;
        showSeed();
      });
      img.dataset.seed = String(item.seed);
      seedThumbnail(img, item.seed);
    }
  }
}

function showModel(info) {
  const where = info.step !== null ? `step ${info.step}` : "generator file";
  $("model").textContent = `${info.source} · ${where} · ${info.width}x${info.height}` +
    (info.follows_run ? " · following the run" : "");
  $("model").dataset.step = info.step === null ? "" : String(info.step);
  if (info.checkpoint_error) $("model").textContent += ` · newest checkpoint not loaded: ${info.checkpoint_error}`;
}

async function pollInfo() {
  try {
    const response = await fetch("/api/info");
    if (response.ok) {
      const info = await response.json();
      showModel(info);
      if (info.step !== state.step) {
        state.step = info.step;
        scheduleGenerate();
      }
    }
  } catch (_) { /* server restarting: try again later */ }
  setTimeout(pollInfo, INFO_POLL_MS);
}

async function uploadLabels(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch("/api/labelmap", { method: "POST", body: form });
  if (!response.ok) { showError(await errorText(response)); return; }
  loadIds(await response.json());
}

async function loadSamples(count) {
  if (!count) return;
  const response = await fetch("/api/samples");
  if (!response.ok) return;
  const select = $("samples");
  const none = document.createElement("option");
  none.value = "";
  none.textContent = "(choose)";
  select.append(none);
  (await response.json()).keys.forEach((key, index) => {
    const option = document.createElement("option");
    option.value = String(index);
    option.textContent = key;
    select.append(option);
  });
  $("samples-box").hidden = false;
}

async function downloadLabels(event) {
  event.preventDefault();
  const response = await fetch("/api/labelmap.png", { method: "POST", body: labelsForm() });
  if (!response.ok) { showError(await errorText(response)); return; }
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = `${state.key.replace(/[^A-Za-z0-9_.-]/g, "_")}.png`;  // keys come from files and shards
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function wire() {
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    const point = canvasPoint(event);
    pushUndo();
    if (state.tool === "fill") {
      floodFill(point[0], point[1]);
      render();
      scheduleGenerate();
      return;
    }
    state.drawing = true;
    state.last = point;
    paintDisc(point[0], point[1]);
    render();
  });
  canvas.addEventListener("pointermove", (event) => {
    showBrushCursor(event);
    if (!state.drawing) return;
    const point = canvasPoint(event);
    paintLine(state.last, point);
    state.last = point;
    render();
  });
  const endStroke = () => {
    if (!state.drawing) return;
    state.drawing = false;
    scheduleGenerate();
  };
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("pointerleave", () => showBrushCursor(null));
  document.addEventListener("keydown", (event) => {
    if (!(event.ctrlKey || event.metaKey) || event.altKey) return;
    if (event.target instanceof HTMLInputElement && event.target.type !== "range") return;  // text undo there
    const key = event.key.toLowerCase();
    if (key === "z" && !event.shiftKey) stepHistory(state.undo, state.redo);
    else if ((key === "z" && event.shiftKey) || key === "y") stepHistory(state.redo, state.undo);
    else return;
    event.preventDefault();
  });

  $("brush-size").addEventListener("input", (event) => {  // the cursor shows the new size at the next move
    state.size = Number(event.target.value);
    $("brush-size-value").textContent = String(state.size);
  });
  $("tool-brush").addEventListener("click", () => setTool("brush"));
  $("tool-fill").addEventListener("click", () => setTool("fill"));
  $("undo").addEventListener("click", () => stepHistory(state.undo, state.redo));
  $("redo").addEventListener("click", () => stepHistory(state.redo, state.undo));
  $("clear").addEventListener("click", () => {
    pushUndo();
    state.ids.fill(state.selected);
    state.key = "canvas";
    render();
    scheduleGenerate();
  });
  $("class-filter").addEventListener("input", (event) => {
    const text = event.target.value.toLowerCase();
    document.querySelectorAll(".brush").forEach((b) => {
      b.hidden = text !== "" && !`${b.dataset.id} ${b.dataset.name}`.toLowerCase().includes(text);
    });
  });
  $("upload-labels").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    event.target.value = "";  // the same file can be chosen again
    if (file) await uploadLabels(file);
  });
  $("samples").addEventListener("change", async (event) => {
    if (event.target.value === "") return;
    const response = await fetch(`/api/samples/${encodeURIComponent(event.target.value)}`);
    if (!response.ok) { showError(await errorText(response)); return; }
    loadIds(await response.json());
  });
  $("new-style").addEventListener("click", () => {
    state.seed = Math.floor(Math.random() * 2147483647);
    state.styleSample = null;
    markStyle(null);
    showSeed();
    scheduleGenerate();
  });
  $("upload-style").addEventListener("change", (event) => {
    state.styleFile = event.target.files[0] || null;
    if (state.styleFile) { state.styleSample = null; markStyle(null); }
    scheduleGenerate();
  });
  $("clear-style").addEventListener("click", () => {
    state.styleFile = null;
    state.styleSample = null;
    markStyle(null);
    $("upload-style").value = "";
    scheduleGenerate();
  });
  $("download-labels").addEventListener("click", downloadLabels);
}

async function start() {
  wire();
  const response = await fetch("/api/info");
  if (!response.ok) { showError(await errorText(response)); return; }
  const info = await response.json();
  state.info = info;
  state.width = info.width;
  state.height = info.height;
  state.palette = info.classes.map((c) => c.color);
  state.ids = new Uint16Array(info.width * info.height).fill(BACKGROUND_ID);
  state.step = info.step;
  const canvas = $("canvas");
  canvas.width = info.width;
  canvas.height = info.height;
  $("brush-size").max = String(Math.max(2, Math.floor(Math.max(info.width, info.height) / 2)));
  state.size = Math.max(1, Math.round(Math.max(info.width, info.height) / 16));
  $("brush-size").value = String(state.size);
  $("brush-size-value").textContent = String(state.size);
  buildBrushes(info.classes);
  selectClass(BACKGROUND_ID);  // the brush shows the class the canvas is filled with
  showSeed();
  $("style-box").hidden = !(info.use_vae && info.has_encoder);
  $("new-style").disabled = !info.use_vae;
  $("new-style").title = info.use_vae ? "a random seed" : info.styles.note;
  buildStyles(info.styles);
  showModel(info);
  render();
  await loadSamples(info.num_samples);
  document.body.dataset.ready = "1";
  generate();
  setTimeout(pollInfo, INFO_POLL_MS);
}

// Read-only hooks for the browser tests (tests/test_serve.py).
window.spadeServe = { ids: () => state.ids.slice(), seed: () => state.seed, selected: () => state.selected };

start();
