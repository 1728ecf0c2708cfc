"use strict";

// Only same-site paths are followed after logging in (no open redirect).
function nextPath() {
  const next = new URL(location.href).searchParams.get("next") || "/";
  return next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/\\") ? next : "/";
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const result = await TB.api("POST", "/login", { token: document.getElementById("token").value });
    if (!result.ok) return TB.showError(document.getElementById("login-error"), result);
    location.href = nextPath();
  });
});
