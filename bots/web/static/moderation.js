// Moderation: the queue of blocked prompts, images and outputs (who, where, what matched) with the operator's
// overrides (release or delete a held video, block or unblock the user), and every community's settings with
// its age-restricted policy.
"use strict";

const ACTIONS = {
  blocked_prompt: "Prompt blocked",
  nsfw_prompt: "Age-restricted prompt",
  blocked_image: "Input image blocked",
  blocked_output: "Video held",
  released_output: "Held video released",
  deleted_held: "Held video deleted",
  expired_held: "Held video expired",
  community_settings: "Settings changed",
};
const POLICIES = ["block", "nsfw_channels", "allow"];

function userButtons(key) {
  if (!key || key.startsWith("web:")) return null;
  const err = TB.el("div", { class: "error", hidden: true });
  const ok = TB.el("span", { class: "kv" });
  const act = (verb) => TB.el("button", { type: "button", class: verb === "block" ? "danger btn-mod-block" : "btn-mod-unblock", onclick: async () => {
    const r = await TB.api("POST", `/api/admin/users/${verb}`, { user_key: key, reason: "moderation" });
    if (!r.ok) return TB.showError(err, r);
    err.hidden = true; ok.textContent = verb === "block" ? " blocked" : " unblocked";
  } }, verb === "block" ? "Block user" : "Unblock user");
  return TB.el("div", {}, act("block"), " ", act("unblock"), ok, err);
}

// A held video waits for the operator: look at it, then release it (delivered to the original chat) or delete it.
function heldButtons(e) {
  if (e.action !== "blocked_output" || !e.held || !e.job) return null;
  const err = TB.el("div", { class: "error", hidden: true });
  const act = (verb, label, cls) => TB.el("button", { type: "button", class: cls, onclick: async () => {
    if (verb === "delete" && !confirm(`Delete the held video of job #${e.job} for good?`)) return;
    const r = await TB.api("POST", `/api/admin/moderation/${verb}`, { job: e.job });
    if (!r.ok) return TB.showError(err, r);
    load();
  } }, label);
  return TB.el("div", { class: "held-actions" },
    TB.el("a", { href: `/api/admin/moderation/held/${e.job}/video.mp4`, target: "_blank", rel: "noopener" }, "View"), " ",
    act("release", "Release", "btn-release"), " ", act("delete", "Delete", "danger btn-held-delete"), err);
}

function renderQueue(events) {
  const body = document.getElementById("moderation-queue");
  if (!events.length) return body.replaceChildren(TB.el("tr", {}, TB.el("td", { colspan: 7, class: "notice" }, "Nothing was blocked.")));
  body.replaceChildren(...events.map((e) => {
    let matched = e.action === "community_settings" ? JSON.stringify(e.changes || {}) : (e.entry || "");
    if (e.by) matched += ` · by ${e.by}`;
    const tone = e.action === "community_settings" ? "queued" : e.action === "released_output" ? "succeeded" : "failed";
    const what = TB.el("td", {}, TB.el("span", { class: `state ${tone}` }, ACTIONS[e.action] || e.action),
      e.job ? TB.el("div", { class: "kv" }, TB.el("a", { href: `/jobs/${e.job}` }, `#${e.job}`)) : null);
    return TB.el("tr", { class: "moderation-row", dataset: { action: e.action, eventId: e.id, job: e.job || "" } },
      TB.el("td", {}, TB.fmtTime(e.at)), what,
      TB.el("td", {}, e.who || "", e.name ? TB.el("div", { class: "kv" }, e.name) : null),
      TB.el("td", {}, e.where || ""), TB.el("td", {}, matched),
      TB.el("td", {}, TB.el("div", { class: "prompt" }, e.prompt || "")),
      TB.el("td", {}, heldButtons(e), userButtons(e.who)));
  }));
}

function renderCommunities(list) {
  const body = document.getElementById("communities");
  if (!list.length) return body.replaceChildren(TB.el("tr", {}, TB.el("td", { colspan: 7, class: "notice" }, "No community has changed its settings.")));
  body.replaceChildren(...list.map((v) => {
    const err = TB.el("div", { class: "error", hidden: true });
    const select = TB.el("select", { name: "policy", class: "policy-select" }, POLICIES.map((p) => TB.el("option", { value: p }, p)));
    select.value = v.policy;
    select.addEventListener("change", async () => {
      const r = await TB.api("POST", "/api/admin/communities", { platform: v.platform, community: v.community, changes: { policy: select.value } });
      if (!r.ok) { select.value = v.policy; return TB.showError(err, r); }
      err.hidden = true; load();
    });
    const defaults = Object.entries(v.defaults || {}).map(([k, x]) => `${k}=${x}`).join(", ");
    return TB.el("tr", { class: "community-row", dataset: { community: `${v.platform}:${v.community}` } },
      TB.el("td", {}, `${v.platform}:${v.community}`),
      TB.el("td", {}, TB.el("span", { class: `state ${v.enabled ? "succeeded" : "failed"}` }, v.enabled ? "on" : "off")),
      TB.el("td", {}, v.channels.length ? v.channels.join(", ") : "all"),
      TB.el("td", {}, v.daily_limit ? String(v.daily_limit) : "bot's limit"),
      TB.el("td", {}, select, v.nsfw_chat ? TB.el("div", { class: "kv" }, "chat opted in") : null, err),
      TB.el("td", {}, defaults || "none"),
      TB.el("td", {}, v.updated_by || "", v.updated_at ? TB.el("div", { class: "kv" }, TB.fmtTime(v.updated_at)) : null));
  }));
}

async function load() {
  const err = document.getElementById("moderation-error");
  const [q, c] = await Promise.all([TB.api("GET", "/api/admin/moderation"), TB.api("GET", "/api/admin/communities")]);
  if (!q.ok) return TB.showError(err, q);
  if (!c.ok) return TB.showError(err, c);
  err.hidden = true;
  renderQueue(q.data.events);
  renderCommunities(c.data.communities);
}

document.addEventListener("DOMContentLoaded", () => {
  TB.initNav();
  load();
  setInterval(() => { if (!document.hidden) load(); }, 10000);
});
