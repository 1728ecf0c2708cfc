// Playground: every request parameter (rendered from the declaration) with its allowed values, submit, live status, Retry/Remix/Cancel.
"use strict";

let OPTIONS = null;
let currentCard = null;

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => TB.el("option", { value: v, selected: String(v) === String(selected) }, v)));
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

// One form field per declared request parameter (generator/params.py, served by /api/options).
function paramField(p) {
  let input;
  if (p.kind === "bool") {
    input = TB.el("select", {});
    fillSelect(input, ["off", "on"], p.default ? "on" : "off");
  } else if (p.free_text) {  // LoRA styles: "name:scale, ..." typed, the names on offer as the hint
    input = TB.el("input", { type: "text", value: p.default || "" });
    input.placeholder = p.available.length ? p.available.join(", ") : "none on this server";
  } else if (p.kind === "str") {
    input = TB.el("select", {});
    if (Array.isArray(p.choices)) fillSelect(input, p.choices, p.default);
  } else if (p.kind === "int" && p.default !== null && p.step === 1 && p.max - p.min <= 10) {
    input = TB.el("select", {});
    const values = [];
    for (let v = p.min; v <= p.max; v++) values.push(v);
    fillSelect(input, values, p.default);
  } else {
    input = TB.el("input", { type: "number", min: p.min, max: p.max, step: p.step });
    if (p.default !== null) input.value = p.default;
    else if (p.kind === "int") input.placeholder = "random";
  }
  input.id = p.name;
  input.name = p.name;
  input.title = p.help;
  let control = input;
  if (p.kind === "int" && p.default === null) {  // an optional whole number (the seed): offer one now
    const pick = TB.el("button", { type: "button", title: "Pick one now" }, "Random");
    pick.addEventListener("click", () => {
      const a = new Uint32Array(1);
      crypto.getRandomValues(a);
      input.value = (a[0] % 2147483646) + 1;
    });
    control = TB.el("div", { class: "seedrow" }, input, pick);
  }
  const box = TB.el("div", { class: "param" }, TB.el("label", { for: p.name }, p.label), control);
  if (p.free_text && OPTIONS.loras && OPTIONS.loras.styles.length) {  // the console's /loras: each style, described
    const l = OPTIONS.loras;
    box.append(TB.el("ul", { class: "hint lora-list" }, ...l.styles.map((s) =>
      TB.el("li", {}, TB.el("code", {}, s.name), s.description ? `: ${s.description}` : ""))),
      TB.el("small", { class: "hint" }, `name or name:scale, up to ${l.max_per_job}, scale -${l.max_scale} to ${l.max_scale}`));
  }
  box.dataset.modes = p.modes.join(" ");
  return box;
}

function applyMode() {
  const m = mode();
  for (const p of OPTIONS.params) {
    if (p.kind === "str" && !p.free_text && !Array.isArray(p.choices)) fillSelect(document.getElementById(p.name), p.choices[m], p.choices[m][0]);
  }
  for (const box of document.querySelectorAll("#param-fields .param")) box.hidden = !box.dataset.modes.split(" ").includes(m);
  for (const [name, byMode] of Object.entries(OPTIONS.mode_defaults)) document.getElementById(name).placeholder = `default ${byMode[m]}`;
  document.getElementById("image-box").hidden = m !== "i2v";
  document.getElementById("prompt").placeholder = m === "i2v"
    ? `optional: ${OPTIONS.i2v_prompt}` : "a red fox running through snow at dusk, cinematic light";
}

function updateSize() {
  const key = `${document.getElementById("resolution").value} ${document.getElementById("aspect").value}`;
  const size = OPTIONS.sizes[key];
  document.getElementById("size-hint").textContent = size ? `Output ${size[0]}x${size[1]} pixels` : "";
  const frames = document.getElementById("frames");
  document.getElementById("frames-hint").textContent =
    `${frames.min}-${frames.max}, one more than a multiple of 4 (${(Number(frames.value) / 16).toFixed(2)} s at 16 fps)`;
}

async function loadOptions() {
  const result = await TB.api("GET", "/api/options");
  if (!result.ok) throw new Error("cannot load options");
  OPTIONS = result.data;
  const o = OPTIONS;
  const boxes = o.params.map(paramField);
  const rows = [];
  for (let i = 0; i < boxes.length; i += 2) rows.push(TB.el("div", { class: "row" }, ...boxes.slice(i, i + 2)));
  document.getElementById("param-fields").replaceChildren(...rows);
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
    for (const p of OPTIONS.params) {
      if (!p.modes.includes(m)) continue;
      const v = form.elements[p.name].value.trim();
      if (v !== "") data.append(p.name, v);
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
