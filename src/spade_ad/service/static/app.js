// spade-ad web page: upload images to /v1/predict one at a time, show each overlay, score, p-value and verdict, and
// why (defect regions, nearest good images, and for a flagged image the picture of where its strongest region matched
// in the nearest good image); with --allow-add, "This one is good" adds an image to the model (/v1/good) and scores it
// again; the threshold slider re-draws the verdicts in the page (no new request).
// With a calibrated model the slider is in normalised units: 1 = the model's threshold, 0 = the median good image.
// No dependencies, no build step.
"use strict";

const MAX_RETRIES = 5;

const state = {
  modelThreshold: null, // the model's calibrated image threshold (raw score), or null
  median: null, // the median good score (0 on the normalised scale), or null
  limits: null, // the service limits from /v1/model
  allowAdd: false, // whether /v1/good may add images to the model (--allow-add)
  results: [], // {card, score, normalized, verdict (element)} per scored image
  queue: Promise.resolve(), // uploads run one after another
};

const byId = (id) => document.getElementById(id);
const fmt = (x) => Number(x).toPrecision(4);
const fmt2 = (x) => Number(x).toFixed(2);
// Normalised units when the model has a threshold (each result then has a normalized_score), else raw scores.
const normalised = () => state.modelThreshold !== null;
const sliderValue = (result) => (normalised() && result.normalized !== null ? result.normalized : result.score);
const megabytes = (n) => `${(n / 2 ** 20).toFixed(1)} MB`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function showError(message) {
  const box = byId("error");
  box.textContent = message;
  box.hidden = !message;
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return {};
  }
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/model");
  } catch {
    showError("Cannot reach the spade-ad server. Is it still running?");
    return;
  }
  const info = await readJson(response);
  if (!response.ok) {
    showError(`The server could not describe its model: ${info.error || response.statusText}.`);
    return;
  }
  state.modelThreshold = info.image_threshold;
  state.median = info.calibration ? info.calibration.median : null;
  state.limits = info.limits;
  state.allowAdd = info.allow_add === true;
  const cal = info.calibration;
  let threshold = "it has no calibrated threshold: set one with the slider.";
  if (info.image_threshold !== null) {
    threshold = `its threshold is ${fmt(info.image_threshold)}`;
    if (cal && cal.n > 0 && cal.guaranteed_rate !== null) {
      threshold += ` (from ${cal.n} good images: at most ${(100 * cal.guaranteed_rate).toPrecision(2)}% of good ` +
        "parts flagged)";
    }
    threshold += ".";
  }
  byId("model-info").textContent =
    `Model: ${info.backbone} fitted on ${info.n_train_images} good images; ${threshold}`;
  byId("calibration-note").textContent = cal && cal.note ? `Note: ${cal.note}.` : "";
  byId("threshold-label").textContent = normalised() ? "Threshold (normalised: 1 = the model's)" : "Threshold (score)";
  byId("limits").textContent = `PNG, JPEG, BMP, TIFF or WebP; at most ${megabytes(info.limits.max_upload_bytes)} ` +
    `and ${(info.limits.max_pixels / 1e6).toFixed(0)} megapixels per image.`;
  updateSlider();
}

function makeCard(name) {
  const card = document.createElement("article");
  card.className = "result";
  const title = document.createElement("p");
  title.className = "name";
  title.textContent = name;
  const status = document.createElement("p");
  status.className = "status";
  status.textContent = "Waiting…";
  card.append(title, status);
  byId("results").append(card);
  return card;
}

function setStatus(card, text) {
  card.querySelector(".status").textContent = text;
}

function showCardError(card, message) {
  const status = card.querySelector(".status");
  status.className = "error";
  status.textContent = message;
}

function fillCard(card, result, file, note) {
  card.querySelector(".status").remove();
  if (note) {
    const added = document.createElement("p");
    added.className = "added";
    added.textContent = note;
    card.append(added);
  }
  const image = document.createElement("img");
  image.className = "overlay";
  image.src = result.overlay;
  image.alt = `Heat map overlay of ${result.file}`;
  image.title = "Click to switch between the overlay and the heat map";
  image.addEventListener("click", () => {
    const showHeatmap = image.classList.toggle("heatmap");
    image.classList.toggle("overlay", !showHeatmap);
    image.src = showHeatmap ? result.heatmap : result.overlay;
  });
  const score = document.createElement("p");
  score.className = "score";
  score.textContent = `Score ${fmt(result.score)}`;
  if (result.normalized_score !== null) {
    score.textContent += ` · normalised ${fmt2(result.normalized_score)}`;
    score.title = "Normalised score: 0 is the median good image, 1 the threshold; above 1 is anomalous.";
  }
  const pValue = document.createElement("p");
  pValue.className = "p-value";
  if (result.p_value !== null) {
    pValue.textContent = `p-value ${Number(result.p_value).toPrecision(2)}`;
    pValue.title = "Share of good images that scored at least as high: small means unlike the good images.";
  }
  const verdict = document.createElement("p");
  verdict.className = "verdict";
  card.append(image, score, pValue, verdict, makeWhy(result));
  if (state.allowAdd && file) card.append(makeGoodButton(card, file));
  state.results.push({ card, score: result.score, normalized: result.normalized_score, verdict });
  updateSlider();
}

function listItem(text) {
  const item = document.createElement("li");
  item.textContent = text;
  return item;
}

// The "why" toggle: the defect regions (at the model's thresholds) and the nearest good training images.
function makeWhy(result) {
  const why = document.createElement("details");
  why.className = "why";
  const summary = document.createElement("summary");
  summary.textContent = "Why?";
  const regionsTitle = document.createElement("p");
  const regions = document.createElement("ol");
  regions.className = "regions";
  if (result.regions.length) {
    regionsTitle.textContent = `Defect regions (${result.regions.length}, strongest first; boxes in pixels ` +
      "left, top, right, bottom):";
    for (const region of result.regions) {
      const [left, top, right, bottom] = region.box;
      regions.append(listItem(`box ${left}, ${top}, ${right}, ${bottom} · area ${region.area} px · ` +
        `peak ${fmt(region.peak)}`));
    }
  } else {
    regionsTitle.textContent = {
      true: "No region stands above the pixel threshold.",
      false: "No defect regions: not flagged at the server's threshold.",
    }[result.is_anomalous] ?? "No defect regions: the model has no thresholds.";
  }
  const neighboursTitle = document.createElement("p");
  const neighbours = document.createElement("ol");
  neighbours.className = "neighbours";
  if (result.neighbours.length) {
    neighboursTitle.textContent = "Nearest good training images (squared feature distance):";
    for (const neighbour of result.neighbours) {
      neighbours.append(listItem(`${neighbour.name} (${fmt(neighbour.distance)})`));
    }
  }
  why.append(summary, regionsTitle, regions, neighboursTitle, neighbours);
  if (result.why) {
    const pictureTitle = document.createElement("p");
    pictureTitle.textContent = "Left: this image, its strongest region boxed. Right: the nearest good training " +
      "image, the area that region matched boxed.";
    const picture = document.createElement("img");
    picture.className = "why-picture";
    picture.src = result.why;
    picture.alt = `Strongest region of ${result.file} next to the nearest good training image`;
    why.append(pictureTitle, picture);
  }
  return why;
}

// "This one is good": add the file to the model as a good image, then score it again in the same card.
function makeGoodButton(card, file) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "good";
  button.textContent = "This one is good";
  button.title = "Add this image to the model as a good one (the model file is saved) and score it again";
  button.addEventListener("click", () => {
    button.disabled = true;
    state.queue = state.queue.then(() => addGood(card, file, button));
  });
  return button;
}

async function addGood(card, file, button) {
  const done = (message) => {
    let line = card.querySelector(".good-outcome");
    if (!line) {
      line = document.createElement("p");
      line.className = "good-outcome";
      card.append(line);
    }
    line.textContent = message;
  };
  done("Adding it to the model as a good image…");
  const form = new FormData();
  form.append("files", file, file.name);
  let response;
  try {
    response = await fetch("/v1/good", { method: "POST", body: form });
  } catch {
    done("Not added: cannot reach the spade-ad server. Is it still running?");
    button.disabled = false;
    return;
  }
  const body = await readJson(response);
  if (!response.ok) {
    done(body.error ? `Not added: ${body.error.replace(/\.$/, "")}.` :
      `Not added: the server answered ${response.status} ${response.statusText}.`);
    button.disabled = response.status === 403;
    return;
  }
  state.modelThreshold = body.image_threshold;
  const note = `Added to the model as a good image (it now has ${body.n_train_images} good images` +
    (body.image_threshold !== null ? `; threshold ${fmt(body.image_threshold)}` : "") + "). Scored again:";
  // Score it again in the same card: drop the old result and its elements, keep the name.
  state.results = state.results.filter((entry) => entry.card !== card);
  for (const child of Array.from(card.children)) {
    if (!child.classList.contains("name")) child.remove();
  }
  const status = document.createElement("p");
  status.className = "status";
  card.append(status);
  await scoreFile(file, card, note);
}

async function scoreFile(file, card, note) {
  const limits = state.limits;
  if (limits && file.size > limits.max_upload_bytes) {
    showCardError(card, `This file is ${megabytes(file.size)}; the server accepts at most ` +
      `${megabytes(limits.max_upload_bytes)}.`);
    return;
  }
  for (let attempt = 0; ; attempt += 1) {
    setStatus(card, "Scoring…");
    const form = new FormData();
    form.append("files", file, file.name);
    let response;
    try {
      response = await fetch("/v1/predict", { method: "POST", body: form });
    } catch {
      showCardError(card, "Cannot reach the spade-ad server. Is it still running?");
      return;
    }
    const body = await readJson(response);
    if (response.status === 503 && attempt < MAX_RETRIES) {
      const wait = Number(response.headers.get("Retry-After")) || 1;
      setStatus(card, `The server is busy; trying again in ${wait} s…`);
      await sleep(wait * 1000);
      continue;
    }
    if (!response.ok) {
      showCardError(card, body.error ? `Not scored: ${body.error.replace(/\.$/, "")}.` :
        `Not scored: the server answered ${response.status} ${response.statusText}.`);
      return;
    }
    fillCard(card, body.results[0], file, note);
    return;
  }
}

function handleFiles(fileList) {
  showError("");
  for (const file of fileList) {
    const card = makeCard(file.name);
    state.queue = state.queue.then(() => scoreFile(file, card));
  }
}

// The model's threshold in slider units.
const modelMark = () => (normalised() ? 1 : state.modelThreshold);

function updateSlider() {
  const slider = byId("threshold");
  const values = state.results.map(sliderValue);
  if (state.modelThreshold !== null) values.push(modelMark());
  if (values.length === 0) return;
  const low = Math.min(...values);
  const high = Math.max(...values);
  const pad = high > low ? 0.1 * (high - low) : 0.1 * Math.abs(high) || 1;
  const current = slider.disabled ? (modelMark() ?? (low + high) / 2) : Number(slider.value);
  slider.min = low - pad;
  slider.max = high + pad;
  slider.value = current;
  slider.disabled = false;
  byId("reset-threshold").disabled = state.modelThreshold === null;
  redraw();
}

function redraw() {
  const threshold = Number(byId("threshold").value);
  let shown = fmt(threshold);
  if (normalised()) {
    shown = fmt2(threshold);
    if (state.median !== null && state.modelThreshold > state.median) {
      shown += ` (score ${fmt(state.median + threshold * (state.modelThreshold - state.median))})`;
    }
  }
  byId("threshold-value").textContent = shown;
  let anomalous = 0;
  for (const result of state.results) {
    const { verdict } = result;
    const isAnomalous = sliderValue(result) > threshold;
    anomalous += isAnomalous;
    verdict.textContent = isAnomalous ? "Anomalous" : "Normal";
    verdict.className = `verdict ${isAnomalous ? "anomalous" : "normal"}`;
  }
  byId("summary").textContent = state.results.length
    ? `${anomalous} of ${state.results.length} anomalous` : "";
}

function setUp() {
  const input = byId("file-input");
  const zone = byId("drop-zone");
  input.addEventListener("change", () => {
    handleFiles(Array.from(input.files));
    input.value = ""; // choosing the same file again fires "change" again
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    handleFiles(Array.from(event.dataTransfer.files));
  });
  // A file dropped beside the zone must not make the browser navigate away from the page.
  for (const name of ["dragover", "drop"]) window.addEventListener(name, (event) => event.preventDefault());
  byId("threshold").addEventListener("input", redraw);
  byId("reset-threshold").addEventListener("click", () => {
    byId("threshold").value = modelMark();
    redraw();
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setUp);
