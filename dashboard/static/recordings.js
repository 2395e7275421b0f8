// Recorded sessions, newest first, each with a link to its playback.
"use strict";

(async () => {
  const body = document.querySelector("#recordings tbody");
  try {
    const data = await Rune.getJSON("/api/recordings");
    document.getElementById("summary").textContent = data.sessions.length + " recordings";
    for (const s of data.sessions) {
      const tr = body.insertRow();
      tr.dataset.session = s.session_id;
      Rune.cell(tr, Rune.clock(s.started));
      Rune.cell(tr, Rune.printable(s.user));
      Rune.cell(tr, Rune.printable(s.namespace));
      Rune.cell(tr, Rune.printable(s.instance));
      Rune.cell(tr, Rune.argv(s.argv), "argv");
      Rune.cell(tr, Rune.seconds(s.duration));
      Rune.cell(tr, s.state !== "recorded" ? s.state : s.signal ? "signal " + s.signal
        : s.exited ? "exit " + s.exit_code : "ended");
      const a = document.createElement("a");
      a.href = "/play?session=" + encodeURIComponent(s.session_id);
      a.textContent = "Play";
      a.className = "play";
      tr.insertCell().append(a);
    }
  } catch (err) {
    document.getElementById("summary").textContent = "";
    Rune.failure(err.message);
  }
})();
