// Audit search: filters run on the apiserver, pages follow its cursor, export as JSONL.
"use strict";

(() => {
  const MAX_ROWS = 2000;  // the page keeps this many rows; older ones make way (use export)
  const form = document.getElementById("filters");
  const body = document.querySelector("#results tbody");
  const more = document.getElementById("more");
  const summary = document.getElementById("summary");
  let query = null, cursor = "", shown = 0, scanned = 0;

  const params = () => {
    const p = new URLSearchParams();
    const data = new FormData(form);
    for (const key of ["user", "namespace", "instance", "event", "exit_code"]) {
      const v = String(data.get(key) || "").trim();
      if (v) p.set(key, v);
    }
    if (data.get("denied_only")) p.set("denied_only", "1");
    for (const key of ["since", "until"]) {
      const v = String(data.get(key) || "");
      if (v) p.set(key, String(new Date(v).getTime() / 1000));  // the browser's local time
    }
    return p;
  };

  const result = (e) => {
    if (e.event === "session.ended") return e.signal ? "signal " + e.signal : "exit " + e.exit_code;
    if (e.event === "session.denied" || e.event === "session.failed") return (e.code || "") + ": " + (e.reason || "");
    if (e.event === "session.killed") return "by " + e.user + ": " + (e.reason || "");
    if (e.event === "session.observed") return "by " + e.user;
    return "";
  };

  const addRow = (e) => {
    const tr = body.insertRow();
    tr.dataset.session = e.session_id || "";
    tr.dataset.event = e.event;
    Rune.cell(tr, String(e.time || "").replace("T", " ").replace("Z", ""));
    Rune.cell(tr, Rune.printable(e.event));
    Rune.cell(tr, Rune.printable(e.session_user || e.user));
    Rune.cell(tr, Rune.printable(e.namespace));
    Rune.cell(tr, Rune.printable(e.instance || e.target));
    Rune.cell(tr, Rune.argv(e.argv), "argv");
    Rune.cell(tr, Rune.printable(result(e)));
    const td = tr.insertCell();
    if (e.session_id) {
      const code = document.createElement("code");
      code.textContent = e.session_id.slice(0, 12);
      td.append(code);
      if (e.tty && e.event !== "session.started") {
        const a = document.createElement("a");
        a.href = "/play?session=" + encodeURIComponent(e.session_id);
        a.textContent = " play";
        a.className = "play";
        td.append(a);
      }
    }
    while (body.rows.length > MAX_ROWS) body.deleteRow(0);
  };

  const load = async () => {
    const p = new URLSearchParams(query);
    if (cursor) p.set("cursor", cursor);
    p.set("limit", "200");
    more.disabled = true;
    try {
      const page = await Rune.getJSON("/api/audit?" + p);
      Rune.failure("");
      page.events.forEach(addRow);
      shown += page.events.length;
      scanned += page.scanned;
      cursor = page.next_cursor;
      more.hidden = !cursor;
      summary.textContent = shown + " matching events (" + scanned + " looked at)" +
        (cursor ? "; more may follow" : "; that is all") +
        (shown > MAX_ROWS ? " — the page keeps the last " + MAX_ROWS + ", export for all" : "");
    } catch (err) {
      Rune.failure(err.message);
    } finally {
      more.disabled = false;
    }
  };

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    query = params();
    cursor = ""; shown = 0; scanned = 0;
    body.replaceChildren();
    document.getElementById("export").href = "/api/audit/export?" + query;
    load();
  });
  form.addEventListener("input", () => {
    document.getElementById("export").href = "/api/audit/export?" + params();
  });
  more.addEventListener("click", load);
  // The last hour at first: a useful page without reading the whole history.
  const since = new Date(Date.now() - 3600 * 1000 - new Date().getTimezoneOffset() * 60000);
  form.elements.since.value = since.toISOString().slice(0, 19);
  form.requestSubmit();
})();
