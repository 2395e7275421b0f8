// Live sessions: one table fed by server-sent events, observe (xterm.js, read-only), kill.
"use strict";

(() => {
  const rows = new Map();      // session id -> {tr, data, at}
  const groups = new Map();    // fan-out id -> tbody
  const table = document.getElementById("live");
  const singles = document.getElementById("singles");
  let observing = null;

  const tbodyFor = (s) => {
    if (!s.fanout_id) return singles;
    let body = groups.get(s.fanout_id);
    if (!body) {
      body = table.createTBody();
      body.className = "fanout";
      body.dataset.fanout = s.fanout_id;
      const head = body.insertRow();
      head.className = "fanout-head";
      const td = Rune.cell(head, "");
      td.colSpan = 12;
      groups.set(s.fanout_id, body);
    }
    return body;
  };

  const label = (body) => {
    if (body === singles) return;
    const n = body.rows.length - 1;
    const first = rows.get(body.rows[1]?.dataset.session || "");
    if (!first || !first.data) return;
    const text = "fan-out " + body.dataset.fanout.slice(0, 8) + " · " + n + " instance" +
      (n === 1 ? "" : "s") + " · " + Rune.argv(first.data.argv);
    const cell = body.rows[0].cells[0];
    if (cell.textContent !== text) cell.textContent = text;
  };

  const render = (entry) => {
    const s = entry.data, tr = entry.tr, now = Date.now() / 1000;
    const idle = s.idle + (now - entry.at);
    const texts = [s.user, s.namespace, s.instance, s.host, Rune.argv(s.argv), s.tty ? "yes" : "no",
      Rune.clock(s.started), Rune.seconds(now - s.started), Rune.seconds(idle), Rune.bytes(s.bytes_in),
      Rune.bytes(s.bytes_out)];
    texts.forEach((t, i) => { if (tr.cells[i].textContent !== t) tr.cells[i].textContent = t; });
  };

  const upsert = (s) => {
    let entry = rows.get(s.session_id);
    if (!entry) {
      const body = tbodyFor(s);
      const tr = body.insertRow();
      tr.dataset.session = s.session_id;
      for (let i = 0; i < 11; i++) tr.insertCell();
      tr.cells[4].className = "argv";
      const actions = tr.insertCell();
      const watch = document.createElement("button");
      watch.textContent = "Observe";
      watch.className = "observe";
      watch.addEventListener("click", () => observe(s.session_id));
      const kill = document.createElement("button");
      kill.textContent = "Kill";
      kill.className = "kill";
      kill.addEventListener("click", () => askKill(s.session_id));
      actions.append(watch, " ", kill);
      entry = {tr, body};
      rows.set(s.session_id, entry);
    }
    entry.data = {...(entry.data || {}), ...s};
    entry.at = Date.now() / 1000;
    render(entry);
    label(entry.body);
  };

  const remove = (sid) => {
    const entry = rows.get(sid);
    if (!entry) return;
    entry.tr.remove();
    rows.delete(sid);
    if (entry.body !== singles) {
      if (entry.body.rows.length <= 1) { entry.body.remove(); groups.delete(entry.body.dataset.fanout); }
      else label(entry.body);
    }
  };

  const count = () => { document.getElementById("count").textContent = rows.size; };

  const fromEvent = (e) => ({session_id: e.session_id, user: e.user, namespace: e.namespace,
    instance: e.instance, host: e.host, argv: e.argv, tty: e.tty,
    started: Date.parse(e.time) / 1000, idle: 0, bytes_in: 0, bytes_out: 0, fanout_id: e.fanout_id || ""});

  const connect = () => {
    const status = document.getElementById("status");
    const source = new EventSource("/api/live");
    source.addEventListener("open", () => { status.textContent = "live"; });
    source.addEventListener("error", () => { status.textContent = "reconnecting…"; });
    source.addEventListener("snapshot", (m) => {
      const data = JSON.parse(m.data);
      const seen = new Set();
      for (const s of data.sessions) { seen.add(s.session_id); upsert(s); }
      for (const sid of [...rows.keys()]) if (!seen.has(sid)) remove(sid);
      count();
      if (!window.runeFirstPaint) {
        window.runeFirstPaint = performance.now();
        document.body.dataset.painted = "1";
      }
    });
    source.addEventListener("audit", (m) => {
      const e = JSON.parse(m.data);
      if (e.event === "session.started") upsert(fromEvent(e));
      else if (e.event === "session.ended" || e.event === "session.failed") remove(e.session_id);
      count();
    });
    source.addEventListener("failure", (m) => {
      Rune.failure(JSON.parse(m.data).error);
      source.close();
      status.textContent = "stopped";
    });
  };

  setInterval(() => { for (const entry of rows.values()) render(entry); }, 1000);

  // --- observe: the session's output in a read-only terminal ---------------------------
  // xterm.js is loaded on first use, so the table paints without waiting for it.
  let xterm = null;
  const loadTerminal = () => xterm || (xterm = new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = "/static/vendor/xterm.js";
    script.onload = () => resolve(window.Terminal);
    script.onerror = () => reject(new Error("cannot load the terminal renderer"));
    document.head.append(script);
  }));

  const observe = async (sid) => {
    stopObserving();
    const Terminal = await loadTerminal();
    const section = document.getElementById("observer");
    const status = document.getElementById("observe-status");
    const entry = rows.get(sid);
    document.getElementById("observed").textContent = entry
      ? entry.data.user + "@" + entry.data.instance + ": " + Rune.argv(entry.data.argv) : sid;
    section.hidden = false;
    const el = document.getElementById("terminal");
    el.replaceChildren();
    const term = new Terminal({disableStdin: true, convertEol: false, scrollback: 5000,
                               cols: 80, rows: 24});
    term.open(el);
    status.textContent = "connecting…";
    const source = new EventSource("/api/sessions/" + encodeURIComponent(sid) + "/observe");
    observing = {source, term, sid};
    source.addEventListener("open", () => { status.textContent = "watching live"; });
    source.addEventListener("size", (m) => {
      const d = JSON.parse(m.data);
      term.resize(Math.min(d.width, 500), Math.min(d.height, 200));
    });
    source.addEventListener("output", (m) => {
      const d = JSON.parse(m.data);
      const raw = atob(d.data), buf = new Uint8Array(raw.length);
      for (let i = 0; i < raw.length; i++) buf[i] = raw.charCodeAt(i);
      term.write(buf);
      if (d.dropped) status.textContent = "watching live (" + Rune.bytes(d.dropped) + " skipped: too slow)";
    });
    const finish = (text) => { status.textContent = text; source.close(); };
    source.addEventListener("end", (m) => finish("session over: " + JSON.parse(m.data).reason));
    source.addEventListener("failure", (m) => finish("cannot observe: " + JSON.parse(m.data).error));
    source.addEventListener("error", () => { if (source.readyState === EventSource.CLOSED) finish("disconnected"); });
  };

  const stopObserving = () => {
    if (!observing) return;
    observing.source.close();
    observing.term.dispose();
    observing = null;
    document.getElementById("observer").hidden = true;
  };

  // --- kill with a reason ------------------------------------------------------------
  const dialog = document.getElementById("kill-dialog");
  let killing = null;
  const askKill = (sid) => {
    killing = sid;
    const entry = rows.get(sid);
    document.getElementById("kill-target").textContent = entry
      ? entry.data.user + "@" + entry.data.instance : sid;
    document.getElementById("kill-reason").value = "";
    document.getElementById("kill-error").textContent = "";
    dialog.showModal();
  };

  document.getElementById("kill-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const reason = document.getElementById("kill-reason").value.trim();
    if (!reason) { document.getElementById("kill-error").textContent = "A reason is required."; return; }
    try {
      await Rune.post("/api/sessions/" + encodeURIComponent(killing) + "/kill", {reason});
      dialog.close();
    } catch (err) {
      document.getElementById("kill-error").textContent = err.message;
    }
  });
  document.getElementById("kill-cancel").addEventListener("click", () => dialog.close());
  document.getElementById("stop-observing").addEventListener("click", stopObserving);

  connect();
})();
