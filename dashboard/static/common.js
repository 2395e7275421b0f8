// Shared by every page: CSRF header, safe text, formats, sign-out.
"use strict";

const Rune = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  // Control characters (terminal escapes included) are shown as \xNN, never interpreted.
  const printable = (text) => String(text ?? "").replace(/[\u0000-\u001f\u007f-\u009f]/g,
    (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));

  const argv = (words) => (words || []).map((w) => {
    const p = printable(w);
    return /^[\w@%+=:,./-]+$/.test(p) ? p : "'" + p.replace(/'/g, "'\\''") + "'";
  }).join(" ");

  const seconds = (s) => {
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  };

  const bytes = (n) => n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB"
    : (n / 1048576).toFixed(1) + " MiB";

  // Today's times as a time of day; older ones with their date.
  const clock = (unix) => {
    const d = new Date(unix * 1000);
    return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
  };

  const cell = (row, text, cls) => {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  };

  const post = async (url, body) => {
    const r = await fetch(url, {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
      body: JSON.stringify(body || {})});
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  };

  const getJSON = async (url) => {
    const r = await fetch(url, {credentials: "same-origin"});
    if (r.status === 401) { location.href = "/login"; throw new Error("not signed in"); }
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  };

  const failure = (message) => {
    const p = document.getElementById("failure");
    p.textContent = message || "";
    p.hidden = !message;
  };

  document.addEventListener("DOMContentLoaded", () => {
    const out = document.getElementById("signout");
    if (out) out.addEventListener("click", async () => {
      await post("/logout").catch(() => null);
      location.href = "/login";
    });
  });

  return {csrf, printable, argv, seconds, bytes, clock, cell, post, getJSON, failure};
})();
