// Admin: engine status from the workers table, the whole queue with cancel, users with quotas and blocks.
"use strict";

function sparkline(values) {
  const w = 120, h = 24;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("class", "spark");
  if (values.length < 2) return svg;
  const max = Math.max(...values), min = Math.min(...values);
  const pts = values.map((v, i) => `${(i / (values.length - 1)) * w},${h - ((v - min) / ((max - min) || 1)) * (h - 2) - 1}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.join(" ")); line.setAttribute("fill", "none"); line.setAttribute("stroke", "#3057d5");
  svg.append(line);
  return svg;
}

// The server words the engine status (api_admin.engine_status); the raw info only feeds the step-time charts.
function engineInfo(lines, info) {
  const rows = (lines || []).map((line) => TB.el("div", {}, line));
  const ema = (info || {}).ema;
  if (ema && ema.step) {
    for (const [shape, secs] of Object.entries(ema.step)) {
      rows.push(TB.el("div", {}, `step time ${shape}: ${Number(secs).toFixed(3)} s (moving average)`));
    }
  }
  if (Array.isArray((info || {}).step_times) && info.step_times.length) rows.push(TB.el("div", {}, "recent step times ", sparkline(info.step_times.map(Number))));
  return TB.el("div", { class: "kv" }, rows);
}

function renderHistory(history) {
  const steps = history.filter((h) => typeof h.step_mean === "number");
  const box = document.getElementById("step-history");
  if (!steps.length) return box.replaceChildren();
  const vals = steps.map((h) => h.step_mean);
  const last = steps[steps.length - 1];
  box.replaceChildren(TB.el("div", { class: "kv" }, `Step time over the last ${steps.length} videos `, sparkline(vals),
    ` latest ${last.step_mean.toFixed(3)} s/step (job #${last.job_id}), min ${Math.min(...vals).toFixed(3)}, max ${Math.max(...vals).toFixed(3)}`));
}

function renderEngine(workers, storage) {
  const box = document.getElementById("engine");
  // A full or read-only disk stops all work: say so above the workers.
  const warn = storage && !storage.ok ? TB.el("p", { class: "error", id: "storage-problem" }, `Storage: ${storage.reason}. New jobs are refused and queued jobs wait until it is fixed.`) : null;
  if (!workers.length) return box.replaceChildren(...[warn, TB.el("p", { class: "notice" }, "No worker has registered yet.")].filter(Boolean));
  const table = TB.el("table", { id: "workers-table" },
    TB.el("thead", {}, TB.el("tr", {}, ["Worker", "Device", "State", "Heartbeat", "Restarts", "Engine"].map((h) => TB.el("th", {}, h)))),
    TB.el("tbody", {}, workers.map((w) => TB.el("tr", { class: "worker-row" },
      TB.el("td", {}, w.id), TB.el("td", {}, w.device), TB.el("td", {}, TB.el("span", { class: `state ${w.fresh ? "succeeded" : "failed"}` }, w.fresh ? w.state.replace("_", " ") : `${w.state.replace("_", " ")} (stale)`)),
      TB.el("td", {}, `${w.heartbeat_age_s} s ago`), TB.el("td", {}, String(w.restarts)), TB.el("td", {}, engineInfo(w.engine, w.info))))));
  box.replaceChildren(...[warn, table].filter(Boolean));
}

function renderQueue(jobs) {
  const body = document.getElementById("queue");
  if (!jobs.length) return body.replaceChildren(TB.el("tr", {}, TB.el("td", { colspan: 7, class: "notice" }, "The queue is empty.")));
  body.replaceChildren(...jobs.map((j) => {
    const err = TB.el("div", { class: "error", hidden: true });
    const where = j.state === "queued"
      ? (j.position ? `#${j.position}${j.queue_length ? " of " + j.queue_length : ""}` : "queued")
      : (j.progress.total ? `step ${j.progress.step}/${j.progress.total}` : "starting");
    const cancel = TB.el("button", { type: "button", class: "danger btn-admin-cancel", onclick: async () => {
      const r = await TB.api("POST", `/api/jobs/${j.id}/cancel`, {});
      if (!r.ok) return TB.showError(err, r);
      refresh();
    } }, "Cancel");
    return TB.el("tr", { class: "queue-row", dataset: { jobId: j.id } },
      TB.el("td", {}, TB.el("a", { href: `/jobs/${j.id}` }, `#${j.id}`)),
      TB.el("td", {}, j.user.key, j.user.name ? TB.el("div", { class: "kv" }, j.user.name) : null),
      TB.el("td", {}, TB.el("span", { class: `state ${j.state}` }, j.state)),
      TB.el("td", {}, where),
      TB.el("td", {}, TB.el("div", { class: "prompt" }, j.prompt), TB.el("div", { class: "kv" }, TB.paramsLine(j))),
      TB.el("td", {}, TB.fmtTime(j.created_at)),
      TB.el("td", {}, cancel, err));
  }));
}

async function refresh() {
  const r = await TB.api("GET", "/api/admin/overview");
  const err = document.getElementById("admin-error");
  if (!r.ok) return TB.showError(err, r);
  err.hidden = true;
  renderEngine(r.data.workers, r.data.storage);
  renderHistory(r.data.step_history);
  renderQueue(r.data.queue);
  const c = r.data.counts;
  document.getElementById("counts").textContent =
    `${c.queued} queued (cap ${r.data.global_queue_cap}) · ${c.running} running · ${c.succeeded} done · ${c.failed} failed · ${c.cancelled} cancelled`;
}

function limitInput(name, value, placeholder) {
  const input = TB.el("input", { type: "number", name, min: 0, step: name === "daily_gpu_seconds" ? "any" : 1, placeholder: String(placeholder) });
  input.value = value === null ? "" : value;
  return TB.el("label", { class: "kv" }, name.replace(/_/g, " "), " ", input);
}

function renderUsers(data) {
  const d = data.defaults;
  document.getElementById("defaults").textContent =
    `Defaults: ${d.max_running} running, ${d.max_queued} queued, ${d.daily_jobs} jobs and ${d.daily_gpu_seconds} GPU-seconds a day.`;
  const body = document.getElementById("users");
  if (!data.users.length) return body.replaceChildren(TB.el("tr", {}, TB.el("td", { colspan: 6, class: "notice" }, "No users yet.")));
  body.replaceChildren(...data.users.map((u) => {
    const err = TB.el("div", { class: "error", hidden: true });
    const ok = TB.el("span", { class: "kv" });
    const form = TB.el("form", { class: "limits-form" },
      limitInput("max_queued", u.max_queued, d.max_queued), limitInput("daily_jobs", u.daily_jobs, d.daily_jobs),
      limitInput("daily_gpu_seconds", u.daily_gpu_seconds, d.daily_gpu_seconds),
      TB.el("button", { type: "submit" }, "Save"), ok, err);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = { user_key: u.key };
      for (const n of ["max_queued", "daily_jobs", "daily_gpu_seconds"]) body[n] = form.elements[n].value.trim() || null;
      const r = await TB.api("POST", "/api/admin/users/limits", body);
      if (!r.ok) return TB.showError(err, r);
      err.hidden = true; ok.textContent = " saved";
    });
    const reason = TB.el("input", { type: "text", name: "reason", placeholder: "reason" });
    const blockBtn = TB.el("button", { type: "button", class: u.blocked ? "btn-unblock" : "danger btn-block", onclick: async () => {
      const r = await TB.api("POST", `/api/admin/users/${u.blocked ? "unblock" : "block"}`, { user_key: u.key, reason: reason.value });
      if (!r.ok) return TB.showError(err, r);
      loadUsers();
    } }, u.blocked ? "Unblock" : "Block");
    const usage = (used, own, def, unit) => u.exempt ? `${used}${unit} (no limit: ${u.role})` : `${used}${unit} of ${own === null ? def : own}${unit}`;
    return TB.el("tr", { class: "user-row", dataset: { userKey: u.key } },
      TB.el("td", {}, u.key, u.display_name ? TB.el("div", { class: "kv" }, u.display_name) : null, TB.el("div", { class: "kv" }, `${u.total_jobs} jobs`)),
      TB.el("td", {}, u.role, u.blocked ? TB.el("div", { class: "state failed" }, "blocked" + (u.blocked_reason ? ": " + u.blocked_reason : "")) : null),
      TB.el("td", {}, `${u.running} running, ${u.queued} queued`),
      TB.el("td", {}, usage(u.jobs_today, u.daily_jobs, d.daily_jobs, " jobs"), TB.el("div", { class: "kv" }, usage(u.gpu_seconds_today.toFixed(1), u.daily_gpu_seconds, d.daily_gpu_seconds, " s GPU"))),
      TB.el("td", {}, form),
      TB.el("td", {}, u.blocked ? null : reason, blockBtn));
  }));
}

async function loadUsers() {
  const q = document.getElementById("user-search").elements.q.value.trim();
  const r = await TB.api("GET", "/api/admin/users" + (q ? "?q=" + encodeURIComponent(q) : ""));
  if (!r.ok) return TB.showError(document.getElementById("admin-error"), r);
  renderUsers(r.data);
}

document.addEventListener("DOMContentLoaded", () => {
  TB.initNav();
  document.getElementById("user-search").addEventListener("submit", (ev) => { ev.preventDefault(); loadUsers(); });
  refresh();
  loadUsers();
  setInterval(() => { if (!document.hidden) refresh(); }, 3000);
});
