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
  base: "/v1", // the routes of the chosen product: /v1 (one model) or /v1/models/NAME
  record: false, // whether the service keeps an inspection record (--record): review and history views
  reviewBefore: null, // the review queue's next page
};

// The chosen product's routes: /v1/predict, /v1/good and /v1/model, or /v1/models/NAME/{predict,good} and itself.
const route = (what) => (state.base === "/v1" ? `/v1/${what}` : what === "model" ? state.base : `${state.base}/${what}`);

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

async function loadProducts() {
  let listed = [];
  try {
    const response = await fetch("/v1/models");
    if (response.ok) listed = await readJson(response);
  } catch {
    listed = [];
  }
  const chooser = byId("product");
  if (Array.isArray(listed) && listed.length > 1) {
    chooser.replaceChildren(...listed.map((info) => {
      const option = document.createElement("option");
      option.value = info.name;
      option.textContent = `${info.name} (${info.model_file || "model"})`;
      return option;
    }));
    byId("product-choice").hidden = false;
    state.base = `/v1/models/${encodeURIComponent(listed[0].name)}`;
  }
  await loadModel();
}

async function loadModel() {
  let response;
  try {
    response = await fetch(route("model"));
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
  state.record = info.record === true;
  byId("view-tabs").hidden = !state.record;
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
    response = await fetch(route("good"), { method: "POST", body: form });
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
      response = await fetch(route("predict"), { method: "POST", body: form });
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
  byId("product").addEventListener("change", () => {
    state.base = `/v1/models/${encodeURIComponent(byId("product").value)}`;
    state.results = [];
    byId("results").replaceChildren();
    byId("summary").textContent = "";
    byId("threshold").disabled = true;
    loadModel();
  });
  for (const tab of document.querySelectorAll("#view-tabs button")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  byId("review-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadReview(false);
  });
  byId("review-more").addEventListener("click", () => loadReview(true));
  byId("history-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadHistory();
  });
  loadProducts();
}

// -- the record's views: review queue and history (only with --record) ---------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll("#view-tabs button")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
  }
  for (const view of ["inspect", "review", "history"]) byId(`${view}-view`).hidden = view !== name;
  if (name === "review") {
    loadRecordModels().then(() => loadReview(false));
  } else if (name === "history") {
    loadRecordModels().then(loadHistory);
  }
}

async function loadRecordModels() {
  const response = await fetch("/v1/record/models");
  const models = response.ok ? await readJson(response) : [];
  for (const id of ["review-model", "history-model"]) {
    const chooser = byId(id);
    const chosen = chooser.value;
    const options = models.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = `${m.name} · ${m.id.slice(0, 8)} (${m.inspections} inspections, since ${m.first_seen})`;
      return option;
    });
    if (id === "review-model") {
      const all = document.createElement("option");
      all.value = "";
      all.textContent = "every model";
      options.unshift(all);
    }
    chooser.replaceChildren(...options);
    if (chosen && models.some((m) => m.id === chosen)) chooser.value = chosen;
  }
}

function reviewQuery() {
  const query = new URLSearchParams();
  const verdict = byId("review-verdict").value;
  if (verdict) query.set("verdict", verdict);
  if (byId("review-since").value) query.set("since", byId("review-since").value);
  if (byId("review-until").value) {
    const until = new Date(`${byId("review-until").value}T00:00:00Z`);
    until.setUTCDate(until.getUTCDate() + 1); // the whole day chosen
    query.set("until", until.toISOString().slice(0, 10));
  }
  if (byId("review-model").value) query.set("model", byId("review-model").value);
  query.set("limit", "20");
  return query;
}

async function loadReview(more) {
  const list = byId("review-list");
  const moreButton = byId("review-more");
  const query = reviewQuery();
  if (more) {
    // The next page: ids below the last one shown. At the end there is none, and nothing is loaded again.
    if (state.reviewBefore === null || moreButton.disabled) return;
    query.set("before", String(state.reviewBefore));
  }
  moreButton.disabled = true;
  let response;
  try {
    response = await fetch(`/v1/review?${query}`);
  } catch {
    byId("review-status").textContent = "Cannot reach the spade-ad server. Is it still running?";
    moreButton.disabled = false;
    return;
  }
  const body = await readJson(response);
  moreButton.disabled = false;
  if (!response.ok) {
    byId("review-status").textContent = `The queue could not be read: ${body.error || response.statusText}.`;
    return;
  }
  if (!more) list.replaceChildren();
  const shown = new Set(Array.from(list.children, (card) => card.dataset.id));
  for (const item of body.items) {
    if (!shown.has(String(item.id))) list.append(reviewCard(item));
  }
  state.reviewBefore = body.next_before;
  moreButton.hidden = body.next_before === null;
  byId("review-empty").hidden = list.children.length > 0;
}

function reviewCard(item) {
  const card = document.createElement("article");
  card.className = "result review-item";
  card.dataset.id = String(item.id);
  const title = document.createElement("p");
  title.className = "name";
  title.textContent = item.source;
  card.append(title);
  if (item.overlay) {
    const image = document.createElement("img");
    image.className = "overlay";
    image.src = item.overlay;
    image.alt = `Overlay of ${item.source}`;
    card.append(image);
  }
  const verdict = document.createElement("p");
  const flagged = item.verdict === "defect";
  verdict.className = `verdict ${flagged ? "anomalous" : item.verdict === "error" ? "error" : "normal"}`;
  verdict.textContent = flagged ? "Anomalous" : item.verdict === "error" ? "Not readable" : "Borderline";
  const score = document.createElement("p");
  score.className = "score";
  score.textContent = item.verdict === "error" ? item.error :
    `Score ${fmt(item.score)}` + (item.normalized_score !== null ? ` · normalised ${fmt2(item.normalized_score)}` : "");
  const when = document.createElement("p");
  when.className = "p-value";
  when.textContent = `${item.at.replace("T", " ").replace("+00:00", " UTC")} · ${item.model_name} · ${item.origin}`;
  card.append(verdict, score, when);
  if (item.regions.length || item.why) {
    const why = document.createElement("details");
    why.className = "why";
    const summary = document.createElement("summary");
    summary.textContent = "Why?";
    const regions = document.createElement("ol");
    regions.className = "regions";
    for (const region of item.regions) {
      regions.append(listItem(`box ${region.box.join(", ")} · area ${region.area} px · peak ${fmt(region.peak)}`));
    }
    why.append(summary, regions);
    if (item.why) {
      const picture = document.createElement("img");
      picture.className = "why-picture";
      picture.src = item.why;
      picture.alt = `Strongest region of ${item.source} next to the nearest good training image`;
      why.append(picture);
    }
    card.append(why);
  }
  if (item.verdict === "error") {  // nothing was scored: there is no verdict to confirm or correct
    const note = document.createElement("p");
    note.className = "hint";
    note.textContent = "Not scored, so not labelled: fix or remove the file at the camera.";
    card.append(note);
    return card;
  }
  const buttons = document.createElement("p");
  buttons.className = "label-buttons";
  for (const label of ["good", "defect"]) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `label-${label}`;
    button.textContent = label === "good" ? "Good" : "Defect";
    button.title = label === "good"
      ? (state.allowAdd ? "A false alarm: label it good and add it to the model" : "A false alarm: label it good")
      : "A real defect: label it (kept for calibrate --record)";
    button.addEventListener("click", () => labelItem(card, item, label));
    buttons.append(button);
  }
  card.append(buttons);
  return card;
}

async function labelItem(card, item, label) {
  for (const button of card.querySelectorAll("button")) button.disabled = true;
  const status = byId("review-status");
  status.textContent = `Labelling ${item.source} ${label}…`;
  let response;
  try {
    response = await fetch(`/v1/inspections/${item.id}/label`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label }),
    });
  } catch {
    status.textContent = "Cannot reach the spade-ad server. Is it still running?";
    for (const button of card.querySelectorAll("button")) button.disabled = false;
    return;
  }
  const body = await readJson(response);
  if (!response.ok) {
    status.textContent = `Not labelled: ${body.error || response.statusText}.`;
    for (const button of card.querySelectorAll("button")) button.disabled = false;
    return;
  }
  card.remove();
  byId("review-empty").hidden = byId("review-list").children.length > 0;
  let line = `Labelled ${item.source} ${label}.`;
  if (body.added) {
    line += ` Added to the model as a good image (it now has ${body.added.n_train_images} good images).`;
    state.modelThreshold = body.added.image_threshold;
  } else if (body.note) {
    line += ` ${body.note.charAt(0).toUpperCase()}${body.note.slice(1)}.`;
  }
  status.textContent = line;
}

// The SVG namespace, from an <svg> element of the page (the HTML parser gives it; no URI spelled out here).
const svgNamespace = () => byId("svg-namespace").namespaceURI;

function svgElement(name, attributes, text) {
  const element = document.createElementNS(svgNamespace(), name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

// A small chart: points or bars over time, with a horizontal reference line; no library.
function chart(target, { xs, ys, kinds, bars, reference, referenceLabel, yLabel, stepLine }) {
  const width = 900;
  const height = 240;
  const pad = { left: 60, right: 20, top: 16, bottom: 30 };
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  svg.append(svgElement("title", {}, yLabel));
  const finite = ys.filter((y) => y !== null && Number.isFinite(y));
  const values = finite.concat(reference !== null && reference !== undefined ? [reference] : [])
    .concat(stepLine ? stepLine.filter((y) => y !== null) : []);
  if (!xs.length || !values.length) {
    svg.append(svgElement("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "Nothing recorded yet"));
    target.replaceChildren(svg);
    return;
  }
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs) + (bars ? bars : 0);
  const y0 = bars ? 0 : Math.min(...values);
  const y1 = Math.max(...values) * 1.05 || 1;
  const sx = (x) => pad.left + (x1 > x0 ? ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right) : 0);
  const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0 || 1)) * (height - pad.top - pad.bottom);
  svg.append(svgElement("line", { x1: pad.left, y1: sy(y0), x2: width - pad.right, y2: sy(y0), class: "axis" }));
  svg.append(svgElement("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: sy(y0), class: "axis" }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.append(svgElement("text", { x: pad.left - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick" },
      bars ? `${(100 * y).toFixed(1)}%` : fmt(y)));
  }
  for (const x of [x0, x1]) {
    svg.append(svgElement("text", { x: sx(x), y: height - 8, "text-anchor": x === x0 ? "start" : "end",
      class: "tick" }, new Date(x).toISOString().slice(0, 16).replace("T", " ")));
  }
  xs.forEach((x, i) => {
    if (ys[i] === null) return;
    if (bars) {
      const left = sx(x);
      const right = sx(x + bars);
      svg.append(svgElement("rect", { x: left + 1, y: sy(ys[i]), width: Math.max(1, right - left - 2),
        height: sy(y0) - sy(ys[i]), class: "bar" }));
    } else {
      svg.append(svgElement("circle", { cx: sx(x), cy: sy(ys[i]), r: 2.5, class: `point ${kinds[i]}` }));
    }
  });
  if (stepLine) {
    const points = xs.map((x, i) => (stepLine[i] === null ? null : `${sx(x)},${sy(stepLine[i])}`)).filter(Boolean);
    svg.append(svgElement("polyline", { points: points.join(" "), class: "reference" }));
  }
  if (reference !== null && reference !== undefined) {
    svg.append(svgElement("line", { x1: pad.left, y1: sy(reference), x2: width - pad.right, y2: sy(reference),
      class: "reference" }));
    svg.append(svgElement("text", { x: width - pad.right, y: sy(reference) - 4, "text-anchor": "end",
      class: "tick" }, referenceLabel));
  }
  target.replaceChildren(svg);
}

async function loadHistory() {
  const model = byId("history-model").value;
  const bucket = byId("history-bucket").value;
  const query = new URLSearchParams({ bucket });
  if (model) query.set("model", model);
  const [historyResponse, driftResponse] = await Promise.all([
    fetch(`/v1/history?${query}`), fetch(`/v1/drift?${new URLSearchParams(model ? { model } : {})}`),
  ]);
  const history = await readJson(historyResponse);
  const drift = await readJson(driftResponse);
  if (!historyResponse.ok) {
    byId("drift-line").textContent = history.error || "Nothing recorded yet.";
    return;
  }
  byId("drift-line").textContent = driftResponse.ok ? drift.verdict : drift.error || "";
  byId("drift-line").className = driftResponse.ok && drift.drifted ? "drifted" : "";
  const points = history.scores;
  chart(byId("score-chart"), {
    xs: points.map((p) => p.at_ms), ys: points.map((p) => p.score),
    kinds: points.map((p) => p.verdict), stepLine: points.map((p) => p.threshold),
    yLabel: "Score of each inspection, with the threshold in force",
  });
  const size = bucket === "day" ? 86400000 : 3600000;
  const rate = history.calibrated_rate;
  chart(byId("rate-chart"), {
    xs: history.buckets.map((b) => b.start_ms), ys: history.buckets.map((b) => b.rate), bars: size,
    reference: rate, referenceLabel: rate === null ? "" : `calibrated ${(100 * rate).toFixed(1)}%`,
    yLabel: `Flag rate per ${bucket} against the calibrated false-alarm rate`,
  });
  byId("history-caption").textContent = `${history.model.name} (${history.model.id.slice(0, 12)}): ` +
    `${points.length} latest scores (dots: green passed, red flagged) and the threshold line; ` +
    `flag rate per ${bucket} (bars) against the calibrated rate (line).`;
}

document.addEventListener("DOMContentLoaded", setUp);
