// One job: live status, player, every parameter, and its remix lineage (parent and children).
"use strict";

function paramsTable(job) {
  const p = job.params;
  const rows = [
    ["job", `#${job.id}`], ["state", job.state], ["platform / user", `${job.user.key}${job.user.name ? " (" + job.user.name + ")" : ""}`],
    ["mode", job.mode], ["size", `${p.width}x${p.height}, ${(p.frames / 16).toFixed(2)} s`],
    ...job.fields.map((f) => [f.name, f.shown]),
  ];
  rows.push(["created", TB.fmtTime(job.created_at)], ["started", TB.fmtTime(job.started_at)], ["finished", TB.fmtTime(job.finished_at)],
    ["attempts", String(job.attempts)]);
  for (const [k, v] of Object.entries(job.timings || {})) rows.push([`time: ${k}`, `${Number(v).toFixed(2)} s`]);
  if (job.error_code) rows.push(["error", `${job.error_code}: ${job.error_message}`]);
  return rows.map(([k, v]) => TB.el("tr", {}, TB.el("td", {}, k), TB.el("td", {}, v)));
}

async function load() {
  const id = location.pathname.split("/").pop();
  const result = await TB.api("GET", `/api/jobs/${id}`);
  if (!result.ok) return TB.showError(document.getElementById("job-error"), result);
  const { job, parent, children } = result.data;
  document.getElementById("title").textContent = `Job #${job.id}`;
  const goTo = (nj) => { location.href = `/jobs/${nj.id}`; };
  const card = TB.jobCard(job, {
    live: true, preload: "auto", allowDelete: true, onNewJob: goTo,
    onUpdate: (j) => document.getElementById("params").replaceChildren(...paramsTable(j)),
  });
  card.id = "main-job";
  document.getElementById("job").replaceChildren(card);
  document.getElementById("params").replaceChildren(...paramsTable(job));
  document.getElementById("parent").replaceChildren(parent ? TB.jobCard(parent, { onNewJob: goTo }) : TB.el("p", { class: "notice" }, "None: an original job."));
  document.getElementById("children").replaceChildren(...(children.length
    ? children.map((c) => TB.jobCard(c, { live: !c.terminal, onNewJob: goTo }))
    : [TB.el("p", { class: "notice" }, "No remixes yet.")]));
}

document.addEventListener("DOMContentLoaded", () => { TB.initNav(); load(); });
