// Shared helpers for the console pages. All user-supplied text goes through textContent.
"use strict";

const TB = {};

TB.cookie = function (name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return "";
};

// A random key per form submission: the server turns a repeated key into the same job (double clicks).
TB.newKey = function () {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
};

// fetch with the CSRF header; resolves to {ok, status, data}. Login expiry sends the user to /login.
TB.api = async function (method, url, body) {
  const opts = { method, headers: { "X-CSRF-Token": TB.cookie("turbobot_csrf") }, credentials: "same-origin" };
  if (body instanceof FormData) {
    opts.body = body;
  } else if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(url, opts);
  } catch (err) {
    return { ok: false, status: 0, data: { message: "The console could not be reached: " + err } };
  }
  if (resp.status === 401 && !url.startsWith("/login")) {
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
  }
  let data = {};
  const text = await resp.text();
  try { data = text ? JSON.parse(text) : {}; } catch (e) { data = { message: text }; }
  return { ok: resp.ok, status: resp.status, data };
};

TB.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
};

TB.fmtTime = function (iso) {
  if (!iso) return "";
  return new Date(iso).toLocaleString();
};

TB.fmtSeconds = function (s) {
  if (s === null || s === undefined) return "";
  if (s < 120) return Math.max(0, Math.round(s)) + " s";
  return Math.round(s / 60) + " min";
};

TB.fmtBytes = function (n) {
  if (n >= 1048576) return (n / 1048576).toFixed(1) + " MB";
  return Math.round(n / 1024) + " KB";
};

// The job's main settings in one line: the fields the server marks as the video's identity (not the seed,
// shown apart), with the labels it sends.
TB.paramsLine = function (job) {
  const p = job.params;
  const parts = [job.mode, `${p.width}x${p.height}`];
  for (const f of job.fields) if (f.identity && f.name !== "seed") parts.push(`${f.label} ${f.shown}`);
  return parts.join(" · ");
};

TB.showError = function (box, result) {
  box.textContent = (result.data && result.data.message) || `Request failed (${result.status}).`;
  box.hidden = false;
};

// Live updates for one job over server-sent events; returns a function that stops watching.
TB.watchJob = function (jobId, onJob) {
  const source = new EventSource(`/api/jobs/${jobId}/events`);
  source.addEventListener("job", (ev) => onJob(JSON.parse(ev.data)));
  const stop = () => source.close();
  source.addEventListener("end", stop);
  source.addEventListener("gone", stop);
  return stop;
};

// The remix form of a job: its prompt and main settings (the server's identity fields), pre-filled; only
// what changes is sent.
TB.remixForm = function (job, onDone) {
  const err = TB.el("div", { class: "error", hidden: true });
  const prompt = TB.el("textarea", { class: "remix-prompt", name: "prompt" });
  prompt.value = job.prompt;
  const shown = job.fields.filter((f) => f.identity);
  const field = (f) => {
    const numeric = f.kind === "int" || f.kind === "float";
    const input = TB.el("input", { type: numeric ? "number" : "text", name: f.name, class: "remix-" + f.name,
      step: f.kind === "float" ? "any" : undefined });
    input.value = f.value === null || f.value === undefined ? "" : f.value;
    return TB.el("label", {}, f.label, input);
  };
  const rows = [];
  for (let i = 0; i < shown.length; i += 2) rows.push(TB.el("div", { class: "row" }, ...shown.slice(i, i + 2).map(field)));
  const form = TB.el("form", { class: "remix-form params" },
    TB.el("label", {}, "Prompt (same seed unless you change it)"), prompt, ...rows, err,
    TB.el("button", { class: "primary btn-remix-submit", type: "submit" }, "Remix"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const options = {};
    for (const f of shown) {
      const v = form.elements[f.name].value.trim();
      if (v !== "" && String(v) !== String(f.value)) options[f.name] = v;
    }
    const result = await TB.api("POST", `/api/jobs/${job.id}/remix`, { prompt: prompt.value, options, client_key: TB.newKey() });
    if (!result.ok) return TB.showError(err, result);
    onDone(result.data.job);
  });
  return form;
};

// One job as a card with live state, player and Retry / Remix / Cancel / Delete buttons.
// opts.onNewJob(job) is called with jobs created by Retry/Remix; opts.live watches it over SSE.
TB.jobCard = function (job, opts) {
  opts = opts || {};
  const card = TB.el("div", { class: "job-card", dataset: { jobId: job.id } });
  let stop = null;
  let current = job;
  let remixOpen = null; // kept across live re-renders

  const render = (j) => {
    current = j;
    card.dataset.state = j.state;
    card.replaceChildren();
    const title = TB.el("a", { href: `/jobs/${j.id}` }, `#${j.id}`);
    card.append(TB.el("div", { class: "head" },
      TB.el("span", {}, title, " · seed ", TB.el("span", { class: "seed" }, String(j.seed))),
      TB.el("span", { class: `state job-state ${j.state}` }, j.state)));
    card.append(TB.el("div", { class: "prompt" }, j.prompt));
    if (j.original_prompt) card.append(TB.el("div", { class: "meta expanded-from" }, `Expanded from: ${j.original_prompt}`));
    card.append(TB.el("div", { class: "meta" }, TB.paramsLine(j)));
    card.append(TB.el("div", { class: "meta" },
      `${j.user.platform}:${j.user.id}${j.user.name ? " (" + j.user.name + ")" : ""} · ${TB.fmtTime(j.created_at)}`,
      j.parent_id ? TB.el("span", {}, ({ retry: " · retry of ", extend: " · extension of " })[j.lineage] || " · remix of ", TB.el("a", { href: `/jobs/${j.parent_id}` }, `#${j.parent_id}`)) : null));
    if (j.input_url) card.append(TB.el("img", { class: "input", src: j.input_url, alt: "input image" }));
    if (j.state === "queued") {
      const pos = j.position ? `Position in queue: #${j.position}${j.queue_length ? " of " + j.queue_length : ""}` : "Queued";
      card.append(TB.el("div", { class: "queue-position" }, pos));
    }
    if (j.state === "running") {
      const total = j.progress.total || 1;
      card.append(TB.el("progress", { class: "step-progress", max: total, value: j.progress.step }));
      card.append(TB.el("div", { class: "meta step-text" }, j.progress.total ? `step ${j.progress.step}/${j.progress.total}` : "starting…"));
      // The live preview (a small looping GIF of the current estimate); its URL changes with each new one.
      if (j.preview) card.append(TB.el("img", { class: "live-preview", src: j.preview.url, alt: "live preview (rough)" }));
    }
    if (j.cancel_requested && !j.terminal) card.append(TB.el("div", { class: "meta" }, "Cancel requested: it stops after the current step."));
    if (j.eta && !j.terminal) {
      const secs = (new Date(j.eta) - new Date()) / 1000;
      card.append(TB.el("div", { class: "meta eta" }, `Expected done in about ${TB.fmtSeconds(secs)}`));
    }
    if (j.state === "succeeded" && j.output) {
      const video = TB.el("video", { src: j.output.url, controls: true, loop: true, muted: true, playsinline: true,
        preload: opts.preload || "metadata", class: "result-video" });
      video.muted = true;
      card.append(video);
      const o = j.output;
      const took = j.timings && j.timings.total ? ` · ${j.timings.total.toFixed(1)} s` : "";
      card.append(TB.el("div", { class: "meta" }, `${o.width}x${o.height} · ${o.frames} frames @ ${o.fps} fps · ${TB.fmtBytes(o.bytes)} · ${o.model_label}${took}`));
      if (j.demo_note) card.append(TB.el("div", { class: "demo" }, j.demo_note));
    }
    if (j.state === "failed") card.append(TB.el("div", { class: "error job-error" }, j.error_message || "Failed."));
    const err = TB.el("div", { class: "error", hidden: true });
    const act = async (what) => {
      const makes = what === "retry" || what === "extend";
      const result = await TB.api("POST", `/api/jobs/${j.id}/${what}`, makes ? { client_key: TB.newKey() } : {});
      if (!result.ok) return TB.showError(err, result);
      if (makes && opts.onNewJob) opts.onNewJob(result.data.job);
      else if (what === "extend") location.href = `/jobs/${result.data.job.id}`;
      if (what === "cancel") render(result.data.job);
      if (what === "delete") card.remove();
    };
    const actions = TB.el("div", { class: "actions" });
    actions.append(TB.el("button", { type: "button", class: "btn-retry", onclick: () => act("retry") }, "Retry"));
    actions.append(TB.el("button", { type: "button", class: "btn-remix", onclick: () => {
      if (remixOpen) { remixOpen.remove(); remixOpen = null; return; }
      remixOpen = TB.remixForm(current, (nj) => {
        remixOpen.remove(); remixOpen = null;
        if (opts.onNewJob) opts.onNewJob(nj); else location.href = `/jobs/${nj.id}`;
      });
      card.append(remixOpen);
    } }, "Remix"));
    if (j.state === "succeeded") actions.append(TB.el("button", { type: "button", class: "btn-extend", onclick: () => act("extend") }, "Extend"));
    if (!j.terminal) actions.append(TB.el("button", { type: "button", class: "danger btn-cancel", onclick: () => act("cancel") }, "Cancel"));
    if (j.terminal && opts.allowDelete) actions.append(TB.el("button", { type: "button", class: "danger btn-delete", onclick: () => {
      if (confirm(`Delete job #${j.id} and its video?`)) act("delete");
    } }, "Delete"));
    card.append(actions, err);
    if (remixOpen) card.append(remixOpen);
  };

  render(job);
  if (opts.live && !job.terminal) {
    stop = TB.watchJob(job.id, (j) => { render(j); if (opts.onUpdate) opts.onUpdate(j); });
  }
  card.stopWatching = () => { if (stop) stop(); };
  card.current = () => current;
  return card;
};

TB.initNav = async function () {
  const me = await TB.api("GET", "/api/whoami");
  const out = document.getElementById("logout");
  if (out && me.ok && me.data.auth) {
    out.hidden = false;
    out.addEventListener("click", async () => { await TB.api("POST", "/logout", {}); location.href = "/login"; });
  }
};
