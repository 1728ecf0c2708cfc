// Playground: every request parameter with its allowed values, submit, live status, Retry/Remix/Cancel.
"use strict";

let OPTIONS = null;
let currentCard = null;

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => TB.el("option", { value: v, selected: String(v) === String(selected) }, v)));
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function applyMode() {
  const m = mode();
  fillSelect(document.getElementById("model"), OPTIONS.models[m], OPTIONS.models[m][0]);
  document.getElementById("image-box").hidden = m !== "i2v";
  document.getElementById("i2v-only").hidden = m !== "i2v";
  document.getElementById("sigma_max").placeholder = `default ${OPTIONS.sigma_max.defaults[m]}`;
  document.getElementById("prompt").placeholder = m === "i2v"
    ? `optional: ${OPTIONS.defaults.i2v_prompt}` : "a red fox running through snow at dusk, cinematic light";
}

function updateSize() {
  const key = `${document.getElementById("resolution").value} ${document.getElementById("aspect").value}`;
  const size = OPTIONS.sizes[key];
  document.getElementById("size-hint").textContent = size ? `Output ${size[0]}x${size[1]} pixels` : "";
  const frames = Number(document.getElementById("frames").value);
  document.getElementById("frames-hint").textContent =
    `${OPTIONS.frames.min}-${OPTIONS.frames.max}, one more than a multiple of 4 (${(frames / 16).toFixed(2)} s at 16 fps)`;
}

async function loadOptions() {
  const result = await TB.api("GET", "/api/options");
  if (!result.ok) throw new Error("cannot load options");
  OPTIONS = result.data;
  const o = OPTIONS;
  fillSelect(document.getElementById("resolution"), o.resolutions, o.defaults.resolution);
  fillSelect(document.getElementById("aspect"), o.aspects, o.defaults.aspect);
  const steps = [];
  for (let s = o.steps.min; s <= o.steps.max; s++) steps.push(s);
  fillSelect(document.getElementById("steps"), steps, o.steps.default);
  fillSelect(document.getElementById("sampler"), o.samplers, o.defaults.sampler);
  fillSelect(document.getElementById("attention"), o.attentions, o.defaults.attention);
  const frames = document.getElementById("frames");
  Object.assign(frames, { min: o.frames.min, max: o.frames.max, step: o.frames.step, value: o.frames.default });
  const topk = document.getElementById("sla_topk");
  Object.assign(topk, { min: o.sla_topk.min, max: o.sla_topk.max, value: o.sla_topk.default });
  const sigma = document.getElementById("sigma_max");
  Object.assign(sigma, { min: o.sigma_max.min, max: o.sigma_max.max });
  const boundary = document.getElementById("boundary");
  Object.assign(boundary, { min: o.boundary.min, max: o.boundary.max, value: o.boundary.default });
  document.getElementById("seed").max = o.seed.max;
  document.getElementById("prompt").maxLength = o.max_prompt_chars;
  document.getElementById("prompt-max").textContent = o.max_prompt_chars;
  document.getElementById("image-hint").textContent =
    `Up to ${TB.fmtBytes(o.image.max_bytes)}, ${o.image.max_side} pixels a side.`;
  applyMode();
  updateSize();
}

function showCurrent(job) {
  if (currentCard) currentCard.stopWatching();
  const box = document.getElementById("current");
  currentCard = TB.jobCard(job, { live: true, preload: "auto", onNewJob: showCurrent, onUpdate: (j) => { if (j.terminal) refreshSide(); } });
  currentCard.id = "current-job";
  box.replaceChildren(currentCard);
  const url = new URL(location.href);
  url.searchParams.set("job", job.id);
  history.replaceState(null, "", url);
  refreshSide();
}

async function refreshSide() {
  const [queue, recent] = await Promise.all([
    TB.api("GET", "/api/queue"),
    TB.api("GET", "/api/jobs?user=" + encodeURIComponent(OPTIONS.operator) + "&limit=8"),
  ]);
  const qbox = document.getElementById("queue");
  if (queue.ok) {
    const q = queue.data.quota;
    const cap = (used, lim, unit) => lim === null ? `${used}${unit} (no limit)` : `${used}${unit} of ${lim}${unit}`;
    qbox.textContent = `${queue.data.total} job(s) waiting in the queue; yours: ${q.running} running, ${q.queued} queued. ` +
      `Jobs today ${cap(q.jobs_today, q.daily_jobs, "")}, GPU time today ${cap(Math.round(q.gpu_seconds_today), q.daily_gpu_seconds, " s")}.`;
  }
  if (recent.ok) {
    const currentId = currentCard ? Number(currentCard.dataset.jobId) : null;
    const box = document.getElementById("recent");
    for (const old of box.children) if (old.stopWatching) old.stopWatching();
    const cards = recent.data.jobs.filter((j) => j.id !== currentId)
      .map((j) => TB.jobCard(j, { onNewJob: showCurrent, preload: "metadata", live: !j.terminal }));
    box.replaceChildren(...cards);
  }
}

async function submit(ev) {
  ev.preventDefault();
  const form = ev.target;
  const err = document.getElementById("form-error");
  err.hidden = true;
  const button = document.getElementById("submit");
  button.disabled = true;
  try {
    const m = mode();
    const data = new FormData();
    data.append("mode", m);
    data.append("prompt", form.prompt.value);
    data.append("client_key", TB.newKey());
    const fields = ["model", "steps", "resolution", "aspect", "frames", "seed", "sampler", "attention", "sla_topk", "sigma_max"];
    if (m === "i2v") fields.push("boundary", "adaptive_resolution");
    for (const name of fields) {
      const v = form.elements[name].value.trim();
      if (v !== "") data.append(name, v);
    }
    if (m === "i2v" && form.image.files.length) data.append("image", form.image.files[0]);
    const result = await TB.api("POST", "/api/jobs", data);
    if (!result.ok) return TB.showError(err, result);
    showCurrent(result.data.job);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  TB.initNav();
  await loadOptions();
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", applyMode);
  for (const id of ["resolution", "aspect", "frames"]) document.getElementById(id).addEventListener("input", updateSize);
  const prompt = document.getElementById("prompt");
  prompt.addEventListener("input", () => { document.getElementById("prompt-count").textContent = prompt.value.length; });
  document.getElementById("seed-random").addEventListener("click", () => {
    const a = new Uint32Array(1);
    crypto.getRandomValues(a);
    document.getElementById("seed").value = (a[0] % 2147483646) + 1;
  });
  const image = document.getElementById("image");
  image.addEventListener("change", () => {
    const preview = document.getElementById("image-preview");
    const file = image.files[0];
    const err = document.getElementById("form-error");
    err.hidden = true;
    if (file && file.size > OPTIONS.image.max_bytes) {
      err.textContent = `That image is too big (${TB.fmtBytes(file.size)}); the limit is ${TB.fmtBytes(OPTIONS.image.max_bytes)}.`;
      err.hidden = false;
    }
    preview.hidden = !file;
    if (file) preview.src = URL.createObjectURL(file);
  });
  document.getElementById("job-form").addEventListener("submit", submit);
  const wanted = new URL(location.href).searchParams.get("job");
  if (wanted && /^\d+$/.test(wanted)) {
    const result = await TB.api("GET", `/api/jobs/${wanted}`);
    if (result.ok) return showCurrent(result.data.job);
  }
  refreshSide();
});
