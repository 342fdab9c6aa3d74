// The page of `pacl-fast serve`: plain JavaScript, no build step, nothing loaded from elsewhere.
// It asks /v1/info for the method and the presets, posts the image and class names to /v1/segment,
// decodes the returned palette PNG into a label map (palette colour -> class index), draws the
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
  $("model").textContent = info.model;
  $("method").textContent = info.method;
  const select = $("templates");
  for (const name of info.templates) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    option.selected = name === info.default_templates;
    select.appendChild(option);
  }
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
  form.append("templates", $("templates").value);
  if ($("use-threshold").checked) form.append("background_threshold", $("threshold").value);
  if ($("sliding").checked) form.append("sliding_window", "true");
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

function decodePng(base64) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the label map PNG could not be decoded"));
    image.src = `data:image/png;base64,${base64}`;
  });
}

async function showResult(body) {
  // Label map: palette PNG (index = class, 255 = background) -> RGB on a canvas -> class by colour.
  const png = await decodePng(body.labels_png);
  const scratch = document.createElement("canvas");
  scratch.width = body.width;
  scratch.height = body.height;
  const scratchContext = scratch.getContext("2d", { willReadFrequently: true });
  scratchContext.drawImage(png, 0, 0);
  const rgba = scratchContext.getImageData(0, 0, body.width, body.height).data;
  const byColour = new Map(body.palette.map((c, index) => [(c[0] << 16) | (c[1] << 8) | c[2], index]));
  const labels = new Int16Array(body.width * body.height);
  let unknown = 0;
  for (let i = 0; i < labels.length; i++) {
    const key = (rgba[4 * i] << 16) | (rgba[4 * i + 1] << 8) | rgba[4 * i + 2];
    const index = byColour.get(key);
    if (index === undefined) {
      labels[i] = BACKGROUND;
      if (key !== 0) unknown++;
    } else {
      labels[i] = index;
    }
  }
  if (unknown) showError(`${unknown} label-map pixels have colours outside the palette (shown as background)`);
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
