// Playback with asciinema-player: the cast streams from the recordings stream on demand.
"use strict";

(() => {
  const sid = new URLSearchParams(location.search).get("session") || "";
  const url = "/api/recordings/" + encodeURIComponent(sid) + "/cast";
  const el = document.getElementById("player");
  document.getElementById("session").textContent = sid;
  document.getElementById("download").href = url;
  let player = null;

  const mount = async (at) => {
    const speed = Number(document.getElementById("speed").value);
    const idle = document.getElementById("skip-idle").checked ? 1 : undefined;
    if (player) player.dispose();
    el.replaceChildren();
    player = AsciinemaPlayer.create({url, fetchOpts: {credentials: "same-origin"}}, el,
      {speed, idleTimeLimit: idle, autoPlay: true, preload: true, fit: "width",
       startAt: at || 0});
    player.addEventListener("ended", () => { document.body.dataset.ended = "1"; });
    player.addEventListener("playing", () => { document.body.dataset.playing = "1"; });
    window.runePlayer = player;
  };

  const check = async () => {
    const r = await fetch(url, {method: "HEAD", credentials: "same-origin"});
    if (!r.ok) { Rune.failure(r.status === 404 ? "no recording of this session" : "cannot play: " + r.status); return false; }
    return true;
  };

  const now = async () => (player ? await player.getCurrentTime() : 0) || 0;
  document.getElementById("speed").addEventListener("change", async () => mount(await now()));
  document.getElementById("skip-idle").addEventListener("change", async () => mount(await now()));
  document.getElementById("seek").addEventListener("click", () => {
    const t = Number(document.getElementById("seek-to").value);
    if (player && Number.isFinite(t)) player.seek(t);
  });
  check().then((ok) => { if (ok) mount(0); });
})();
