// The page of `pacl-fast serve`: plain JavaScript, no build step, nothing loaded from elsewhere.
// It asks /v1/info for the model, the presets and the model's defaults (templates, background threshold,
// sliding window: its controls start from them, as predict and the command line do), posts the image, the
// class names and every control's value to /v1/segment,
// decodes the returned label PNG into a label map (8-bit palette or 16-bit grey: class indices), draws the
// overlay from it (the same blend as Segmentation.overlay: alpha 0.5, round half to even), and
// answers "which class is under the cursor" from that label map.
"use strict";

const BACKGROUND = -1;
const ALPHA = 0.5;

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  file: null,
  photo: null, // the decoded photo as an HTMLImageElement
  result: null, // { classes, palette, width, height, labels: Int16Array, shares, backgroundShare, response }
};
window.paclPage = state; // for people poking at the page from the console (and the browser test)

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

async function apiError(response) {
  // The API answers errors as {"error": kind, "detail": sentence}; anything else is shown as text.
  let detail = "";
  try {
    const body = await response.json();
    detail = body.detail || body.error || JSON.stringify(body);
  } catch (e) {
    detail = response.statusText || "no details";
  }
  const retry = response.headers.get("Retry-After");
  return `Error ${response.status}: ${detail}${retry ? ` (retry in ${retry} s)` : ""}`;
}

async function loadInfo() {
  for (;;) {
    let response;
    try {
      response = await fetch("/v1/info", { headers: { Accept: "application/json" } });
    } catch (e) {
      $("model").textContent = "cannot reach the server";
      showError(`Cannot reach the server: ${e.message}`);
      await new Promise((r) => setTimeout(r, 2000));
      continue;
    }
    if (response.status === 503) {
      $("model").textContent = "the model is loading…";
      await new Promise((r) => setTimeout(r, 1000));
      continue;
    }
    if (!response.ok) {
      showError(await apiError(response));
      return;
    }
    showError("");
    setupControls(await response.json());
    return;
  }
}

function setupControls(info) {
  state.info = info;
  // The model's short name and what runs it; the full identity and why that encoder are in the tooltip.
  $("model").textContent = `${info.model} · ${info.encoder} ${info.precision}`;
  $("model").title = `${info.identity}\n${info.choices}`;
  $("method").textContent = info.method;
  const defaults = info.defaults;
  const select = $("templates");
  if (typeof defaults.templates !== "string") {
    // The model's own template list (not a preset): sent as no choice, which the server reads as the model's.
    const option = document.createElement("option");
    option.value = "";
    option.textContent = `the model's (${defaults.templates.length})`;
    option.selected = true;
    select.appendChild(option);
  }
  for (const name of info.templates) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    option.selected = name === defaults.templates;
    select.appendChild(option);
  }
  // The background threshold starts as the model's (e.g. the demo model's 0.95), or off when it has none.
  const threshold = defaults.background_threshold;
  $("use-threshold").checked = threshold !== null;
  $("threshold").disabled = threshold === null;
  if (threshold !== null) $("threshold").value = String(threshold);
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  $("sliding").checked = defaults.sliding_window !== null;
  $("sliding-detail").textContent = `crop, stride, short side: ${info.default_sliding_window}`;
  const names = { voc: "VOC", ade20k: "ADE20K", cityscapes: "Cityscapes", shapes: "Synthetic shapes" };
  for (const [key, labels] of Object.entries(info.label_presets)) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = names[key] || key;
    button.dataset.preset = key;
    button.addEventListener("click", () => {
      $("labels").value = labels.join(", ");
      updateRunButton();
    });
    $("presets").appendChild(button);
  }
  updateRunButton();
}

function updateRunButton() {
  $("run").disabled = !(state.info && state.file && $("labels").value.trim());
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.result = null;
  $("file-name").textContent = `${file.name} (${Math.round(file.size / 1024)} KiB)`;
  showError("");
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => {
    state.photo = image;
    drawPhoto(image.naturalWidth, image.naturalHeight);
    clearResult();
    updateRunButton();
  };
  image.onerror = () => {
    state.photo = null;
    showError(`Your browser cannot display ${file.name}; the server may still read it.`);
    updateRunButton();
  };
  image.src = url;
}

function drawPhoto(width, height) {
  const canvas = $("photo");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  if (state.photo) context.drawImage(state.photo, 0, 0, width, height);
  return context;
}

function clearResult() {
  const overlay = $("overlay");
  overlay.width = overlay.height = 0;
  $("legend").hidden = true;
  $("download").hidden = true;
  $("hover").textContent = "Point at an image to see the class under the cursor.";
}

async function segment() {
  if (!state.file) return;
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  form.append("labels", $("labels").value);
  if ($("templates").value) form.append("templates", $("templates").value);
  // Every control is sent, so what the page shows is what runs (a threshold of 0 is none).
  form.append("background_threshold", $("use-threshold").checked ? $("threshold").value : "0");
  form.append("sliding_window", $("sliding").checked ? "true" : "false");
  $("run").disabled = true;
  showError("");
  setStatus("segmenting…");
  const started = performance.now();
  try {
    let response;
    try {
      response = await fetch("/v1/segment", { method: "POST", body: form, headers: { Accept: "application/json" } });
    } catch (e) {
      throw new Error(`Cannot reach the server: ${e.message}`);
    }
    if (!response.ok) throw new Error(await apiError(response));
    const body = await response.json();
    await showResult(body);
    const ms = Math.round(performance.now() - started);
    setStatus(`${body.classes.length} classes, ${body.width}×${body.height} px, ${ms} ms (batch of ${body.batch_size})`);
  } catch (e) {
    setStatus("");
    showError(e.message);
  } finally {
    updateRunButton();
  }
}

// ---------------------------------------------------------------------------- the label map PNG
// The API's labels_png holds class indices: an 8-bit palette PNG (255 = background) up to 255 classes,
// 16-bit grey over 255 (65535 = background). A canvas cannot read 16-bit values (browsers reduce them
// to 8 bits), so the page decodes the PNG itself: chunks, zlib (DecompressionStream), row filters.

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

function base64Bytes(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

async function inflate(chunks) {
  const stream = new Blob(chunks).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function pngChunks(bytes) {
  // -> { header: {width, height, depth, colourType, interlace}, data: [IDAT payloads] }
  if (bytes.length < 8 || PNG_SIGNATURE.some((value, i) => bytes[i] !== value)) throw new Error("not a PNG");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const data = [];
  let header = null;
  for (let offset = 8; offset + 12 <= bytes.length; ) {
    const length = view.getUint32(offset);
    const type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    const body = bytes.subarray(offset + 8, offset + 8 + length);
    if (body.length !== length) throw new Error(`truncated ${type} chunk`);
    if (type === "IHDR") {
      header = { width: view.getUint32(offset + 8), height: view.getUint32(offset + 12), depth: body[8], colourType: body[9], interlace: body[12] };
    } else if (type === "IDAT") {
      data.push(body);
    } else if (type === "IEND") {
      break;
    }
    offset += 12 + length;
  }
  if (!header || !data.length) throw new Error("no image header or data");
  return { header, data };
}

function paeth(a, b, c) {
  const p = a + b - c;
  const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  if (pa <= pb && pa <= pc) return a;
  return pb <= pc ? b : c;
}

function unfilter(raw, height, rowBytes, pixelBytes) {
  // PNG's five row filters undone: -> height * rowBytes bytes of samples.
  const out = new Uint8Array(height * rowBytes);
  if (raw.length < height * (rowBytes + 1)) throw new Error("image data shorter than its header says");
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (rowBytes + 1)];
    const line = raw.subarray(y * (rowBytes + 1) + 1, (y + 1) * (rowBytes + 1));
    const row = out.subarray(y * rowBytes, (y + 1) * rowBytes);
    const above = y > 0 ? out.subarray((y - 1) * rowBytes, y * rowBytes) : new Uint8Array(rowBytes);
    for (let x = 0; x < rowBytes; x++) {
      const left = x >= pixelBytes ? row[x - pixelBytes] : 0;
      const upLeft = x >= pixelBytes ? above[x - pixelBytes] : 0;
      let predicted;
      if (filter === 0) predicted = 0;
      else if (filter === 1) predicted = left;
      else if (filter === 2) predicted = above[x];
      else if (filter === 3) predicted = (left + above[x]) >> 1;
      else if (filter === 4) predicted = paeth(left, above[x], upLeft);
      else throw new Error(`unknown PNG row filter ${filter}`);
      row[x] = (line[x] + predicted) & 255;
    }
  }
  return out;
}

async function decodeLabelPng(base64, width, height) {
  // -> { values: Uint32Array of raw sample values, background: the value that marks background }
  const { header, data } = pngChunks(base64Bytes(base64));
  const { depth, colourType, interlace } = header;
  const palette = colourType === 3 && [1, 2, 4, 8].includes(depth);
  const grey = colourType === 0 && (depth === 8 || depth === 16);
  if (!(palette || grey) || interlace !== 0) {
    throw new Error(`unexpected label map PNG (colour type ${colourType}, ${depth} bits, interlace ${interlace})`);
  }
  if (header.width !== width || header.height !== height) {
    throw new Error(`label map is ${header.width}x${header.height}, the answer says ${width}x${height}`);
  }
  const rowBytes = Math.ceil((width * depth) / 8);
  const samples = unfilter(await inflate(data), height, rowBytes, Math.max(1, depth / 8));
  const values = new Uint32Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if (depth === 16) values[i] = (samples[y * rowBytes + 2 * x] << 8) | samples[y * rowBytes + 2 * x + 1];
      else if (depth === 8) values[i] = samples[y * rowBytes + x];
      else {
        const bit = x * depth;
        values[i] = (samples[y * rowBytes + (bit >> 3)] >> (8 - depth - (bit & 7))) & ((1 << depth) - 1);
      }
    }
  }
  return { values, background: depth === 16 ? 65535 : 255 };
}

async function showResult(body) {
  // Label map: the PNG's values are class indices (see decodeLabelPng).
  const { values, background } = await decodeLabelPng(body.labels_png, body.width, body.height);
  const classes = body.classes.length;
  const labels = new Int16Array(body.width * body.height);
  let unknown = 0;
  for (let i = 0; i < labels.length; i++) {
    const value = values[i];
    if (value < classes) {
      labels[i] = value;
    } else {
      labels[i] = BACKGROUND;
      if (value !== background) unknown++;
    }
  }
  if (unknown) showError(`${unknown} label-map pixels hold no class index (shown as background)`);
  state.result = {
    classes: body.classes,
    palette: body.palette,
    width: body.width,
    height: body.height,
    labels,
    shares: body.shares,
    backgroundShare: body.background_share,
    response: body,
  };

  // Overlay: photo blended with class colours, background pixels left as they are.
  const photo = drawPhoto(body.width, body.height).getImageData(0, 0, body.width, body.height);
  const overlay = $("overlay");
  overlay.width = body.width;
  overlay.height = body.height;
  const context = overlay.getContext("2d", { willReadFrequently: true });
  const out = context.createImageData(body.width, body.height);
  for (let i = 0; i < labels.length; i++) {
    const label = labels[i];
    for (let c = 0; c < 3; c++) {
      const base = photo.data[4 * i + c];
      out.data[4 * i + c] = label === BACKGROUND ? base : blend(base, body.palette[label][c]);
    }
    out.data[4 * i + 3] = 255;
  }
  context.putImageData(out, 0, 0);
  showLegend();
  const link = $("download");
  link.href = `data:image/png;base64,${body.labels_png}`;
  const stem = (state.file && state.file.name.replace(/\.[^.]*$/, "")) || "image";
  link.download = `${stem}_labels.png`;
  link.hidden = false;
}

function blend(base, colour) {
  // base * (1 - ALPHA) + colour * ALPHA, rounded half to even as numpy does (server overlays match).
  const value = base * (1 - ALPHA) + colour * ALPHA;
  const floor = Math.floor(value);
  const fraction = value - floor;
  if (fraction > 0.5) return floor + 1;
  if (fraction < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

function showLegend() {
  const result = state.result;
  const body = $("legend").tBodies[0];
  body.replaceChildren();
  const rows = result.classes.map((name, index) => ({ name, index, share: result.shares[index] }));
  if (result.backgroundShare > 0) rows.push({ name: "(background)", index: BACKGROUND, share: result.backgroundShare });
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.dataset.index = String(row.index);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = row.index === BACKGROUND ? "transparent" : `rgb(${result.palette[row.index].join(",")})`;
    const cells = [swatch, document.createTextNode(row.name), document.createTextNode(`${(100 * row.share).toFixed(1)} %`)];
    for (const content of cells) {
      const td = document.createElement("td");
      td.appendChild(content);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  $("legend").hidden = false;
}

function classAt(canvas, event) {
  const result = state.result;
  if (!result || !canvas.width) return null;
  const rect = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * result.width);
  const y = Math.floor(((event.clientY - rect.top) / rect.height) * result.height);
  if (x < 0 || y < 0 || x >= result.width || y >= result.height) return null;
  const label = result.labels[y * result.width + x];
  return { x, y, label, name: label === BACKGROUND ? "(background)" : result.classes[label] };
}

function onHover(event) {
  const hit = classAt(event.currentTarget, event);
  for (const tr of $("legend").tBodies[0].rows) tr.classList.toggle("active", hit !== null && tr.dataset.index === String(hit.label));
  $("hover").textContent = hit ? `(${hit.x}, ${hit.y}): ${hit.name}` : "Point at an image to see the class under the cursor.";
}

document.addEventListener("DOMContentLoaded", () => {
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) chooseFile(e.dataTransfer.files[0]);
  });
  $("labels").addEventListener("input", updateRunButton);
  $("labels").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("run").disabled) segment();
  });
  $("use-threshold").addEventListener("change", (e) => ($("threshold").disabled = !e.target.checked));
  $("threshold").addEventListener("input", (e) => ($("threshold-value").textContent = Number(e.target.value).toFixed(2)));
  $("run").addEventListener("click", segment);
  for (const id of ["photo", "overlay"]) $(id).addEventListener("mousemove", onHover);
  loadInfo();
});
