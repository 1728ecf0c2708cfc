// Gallery: recent jobs from every front end, filtered by user, state, mode, platform or prompt.
"use strict";

let nextBefore = null;

function query(before) {
  const form = document.getElementById("filters");
  const params = new URLSearchParams();
  for (const name of ["user", "state", "mode", "platform", "q"]) {
    const v = form.elements[name].value.trim();
    if (v) params.set(name, v);
  }
  params.set("limit", "24");
  if (before) params.set("before", before);
  return params;
}

async function load(append) {
  const params = query(append ? nextBefore : null);
  const result = await TB.api("GET", "/api/jobs?" + params.toString());
  const box = document.getElementById("gallery");
  const err = document.getElementById("gallery-error");
  err.hidden = true;
  if (!result.ok) return TB.showError(err, result);
  const cards = result.data.jobs.map((j) => TB.jobCard(j, { live: !j.terminal, allowDelete: true, preload: "metadata" }));
  if (append) box.append(...cards);
  else {
    for (const c of box.children) if (c.stopWatching) c.stopWatching();
    box.replaceChildren(...cards);
    if (!cards.length) box.append(TB.el("p", { class: "notice" }, "No jobs match."));
    params.delete("limit");
    history.replaceState(null, "", "/gallery" + (params.toString() ? "?" + params : ""));
  }
  nextBefore = result.data.next_before;
  document.getElementById("more").hidden = !nextBefore;
}

document.addEventListener("DOMContentLoaded", () => {
  TB.initNav();
  const form = document.getElementById("filters");
  const initial = new URL(location.href).searchParams;
  for (const name of ["user", "state", "mode", "platform", "q"]) if (initial.get(name)) form.elements[name].value = initial.get(name);
  form.addEventListener("submit", (ev) => { ev.preventDefault(); load(false); });
  for (const s of form.querySelectorAll("select")) s.addEventListener("change", () => load(false));
  document.getElementById("more").addEventListener("click", () => load(true));
  load(false);
});
