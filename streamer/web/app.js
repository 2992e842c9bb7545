// Live captions: microphone -> AudioWorklet (mono s16le PCM) -> the daemon's native websocket
// protocol (/v1/stream) -> partial and final captions on the page. With ?listen=NAME the page is a
// viewer of stream NAME (/v1/listen/NAME) and uses no microphone. ?name=NAME pre-fills the settings.
// ?token=TOKEN: with the right token the server keeps it in an HttpOnly cookie, which the browser sends
// with the websocket, and loads the page again without it; a token typed in the settings (or a wrong
// one in the address) goes in the websocket's address. Either way the page's address loses it, so
// it stays out of the browser's history. No build step, no dependencies.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const listenName = params.get("listen");
  const mode = listenName ? "listen" : "capture";
  const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;
  const LANG_RE = /^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$/; // a BCP 47 tag, as [model] language checks it
  const BACKOFF_S = [1, 2, 4, 8, 15, 30];
  const STOP_GRACE_MS = 5000; // after "stop", how long the server gets to send its last finals
  const MAX_BUFFERED = 1 << 20; // audio is dropped, not queued, when the network falls behind
  const AGAIN = " and press “" + (mode === "listen" ? "Follow captions" : "Start captions") + "” again.";

  const ui = {
    body: document.body,
    title: $("title"),
    statusText: $("status-text"),
    message: $("message"),
    captions: $("captions"),
    placeholder: $("placeholder"),
    finals: $("finals"),
    partial: $("partial"),
    toggle: $("toggle"),
    level: $("level-bar"),
    txt: $("download-txt"),
    vtt: $("download-vtt"),
    clear: $("clear"),
    form: $("settings-form"),
    token: $("token"),
    name: $("name"),
    viewerLink: $("viewer-link"),
    viewerHref: $("viewer-href"),
  };

  const st = {
    want: false, // the user wants captions running
    ws: null,
    conn: 0, // id of the current connection; events of older sockets are ignored
    opened: false,
    streaming: false,
    lastError: null,
    attempt: 0,
    retryTimer: null,
    stopTimer: null,
    audio: null,
    rate: 16000,
    captured: 0, // samples captured since the microphone started
    offset: 0, // page time (s) of the current connection's t = 0
    finals: [], // {start, end, text}
  };

  // -- presentation ----------------------------------------------------------------------

  function setState(name, text) {
    ui.body.dataset.state = name;
    ui.statusText.textContent = text;
  }

  function showMessage(text, kind) {
    ui.message.textContent = text;
    ui.message.dataset.kind = kind || "error";
    ui.message.hidden = false;
  }

  function clearMessage() {
    ui.message.hidden = true;
    ui.message.textContent = "";
    delete ui.message.dataset.kind;
  }

  function updateControls() {
    const busy = ui.body.dataset.state === "stopping";
    ui.toggle.disabled = busy;
    if (mode === "listen") ui.toggle.textContent = st.want ? "Stop following" : "Follow captions";
    else ui.toggle.textContent = st.want ? "Stop captions" : "Start captions";
    ui.toggle.setAttribute("aria-pressed", String(st.want));
    const none = st.finals.length === 0;
    ui.txt.disabled = none;
    ui.vtt.disabled = none;
    ui.clear.disabled = none && !ui.partial.textContent;
  }

  function nearBottom() {
    const c = ui.captions;
    return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
  }

  function keepScrolled(stick) {
    if (stick) ui.captions.scrollTop = ui.captions.scrollHeight;
  }

  function showPartial(text) {
    const stick = nearBottom();
    ui.partial.textContent = text || "";
    if (text) ui.placeholder.hidden = true;
    keepScrolled(stick);
  }

  // The captions' language (not the page's: its buttons stay English) picks fonts and line breaking
  // (CJK); ?lang=TAG wins over the model's own ([model] language, sent in "ready" when known).
  // Each line's direction comes from its own text (dir="auto"), so Arabic reads right to left
  // next to English even when no language is known.
  function setLanguage(tag) {
    if (!tag || !LANG_RE.test(tag)) return;
    ui.finals.lang = tag;
    ui.partial.lang = tag;
    updateViewerLink();
  }

  function addFinal(ev) {
    const text = (ev.text || "").trim();
    showPartial("");
    if (!text) return;
    const stick = nearBottom();
    st.finals.push({ start: st.offset + Number(ev.start || 0), end: st.offset + Number(ev.end || 0), text });
    const line = document.createElement("p");
    line.className = "line";
    line.dir = "auto";
    line.textContent = text;
    ui.finals.append(line);
    ui.placeholder.hidden = true;
    keepScrolled(stick);
    updateControls();
  }

  // -- connection --------------------------------------------------------------------------

  function token() {
    return ui.token.value.trim();
  }

  function endpoint() {
    const path = mode === "listen" ? "v1/listen/" + encodeURIComponent(listenName) : "v1/stream";
    const url = new URL(path, document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    if (token()) url.searchParams.set("token", token());
    return url.href;
  }

  function startMessage() {
    const msg = { type: "start", sample_rate: st.rate, encoding: "s16le", channels: 1 };
    const name = ui.name.value.trim();
    if (NAME_RE.test(name)) msg.name = name;
    return msg;
  }

  function connect() {
    clearTimeout(st.retryTimer);
    st.retryTimer = null;
    const id = ++st.conn;
    st.opened = false;
    st.streaming = false;
    st.lastError = null;
    setState("connecting", st.attempt ? "Reconnecting…" : "Connecting…");
    let ws;
    try {
      ws = new WebSocket(endpoint());
    } catch (err) {
      fail("Cannot open a connection to " + location.host + ": " + err.message, "Connection failed");
      return;
    }
    ws.binaryType = "arraybuffer";
    st.ws = ws;
    ws.onopen = () => {
      if (id !== st.conn) return;
      st.opened = true;
      if (mode === "capture" && st.want) {
        st.offset = st.captured / st.rate;
        ws.send(JSON.stringify(startMessage()));
        st.streaming = true;
      }
    };
    ws.onmessage = (ev) => {
      if (id !== st.conn || typeof ev.data !== "string") return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      onEvent(msg);
    };
    ws.onclose = (ev) => {
      if (id !== st.conn) return;
      st.ws = null;
      st.streaming = false;
      onClose(ev);
    };
  }

  function onEvent(msg) {
    switch (msg.type) {
      case "ready":
        if (!params.has("lang")) setLanguage(msg.language);
        st.attempt = 0;
        clearMessage();
        if (st.want) setState("listening", mode === "listen" ? "Following “" + listenName + "”" : "Listening");
        break;
      case "partial":
        showPartial(msg.text);
        updateControls();
        break;
      case "final":
        addFinal(msg);
        break;
      case "error":
        st.lastError = msg;
        break;
      default:
        break; // "end" and anything newer
    }
  }

  async function onClose(ev) {
    const err = st.lastError;
    clearTimeout(st.stopTimer);
    showPartial("");
    if (!st.want) {
      setState("idle", "Stopped");
      updateControls();
      return;
    }
    if (ev.code === 1013 || (err && err.code === "busy")) {
      retry("Server busy: all of its caption streams are in use.", "Server busy");
      return;
    }
    if (!st.opened) {
      // The browser hides why a websocket failed before it opened (a 401 for a wrong token
      // looks the same as a dead server), so ask the server over plain HTTP whether it is up.
      const id = st.conn;
      const up = await reachable();
      if (id !== st.conn || !st.want) return;
      if (up) {
        fail(token()
          ? "The server refused the connection: the access token is wrong. Check the token in Settings" + AGAIN
          : "The server refused the connection: it needs an access token. Enter it in Settings (or add ?token=… to the page address)" + AGAIN,
        "Access denied", "auth");
        $("settings").open = true; // the token field, ready to be corrected
        return;
      }
      retry("Cannot reach the server at " + location.host + ".", "Offline");
      return;
    }
    const detail = err && err.message ? err.message : ev.reason;
    if ([1003, 1007, 1008, 1009].includes(ev.code)) {
      fail("The server rejected the stream" + (detail ? ": " + detail : ".") , "Stopped: error");
      return;
    }
    if (ev.code === 1001) retry("The server is restarting.", "Server restarting");
    else if (ev.code === 1000) retry("The server ended the stream" + (detail ? " (" + detail + ")." : "."), "Reconnecting");
    else retry("Connection lost" + (detail ? ": " + detail : "") + ".", "Connection lost");
  }

  async function reachable() {
    try {
      const ctrl = new AbortController();
      const timer = setTimeout(() => ctrl.abort(), 4000);
      await fetch(new URL("healthz", document.baseURI), { cache: "no-store", signal: ctrl.signal });
      clearTimeout(timer);
      return true;
    } catch {
      return false;
    }
  }

  function retry(reason, label) {
    const base = BACKOFF_S[Math.min(st.attempt, BACKOFF_S.length - 1)];
    const delay = Math.max(1, Math.round(base * (0.8 + 0.4 * Math.random())));
    st.attempt += 1;
    showMessage(reason + " Trying again automatically.", "warning");
    setState("reconnecting", label + ": retrying in " + delay + " s");
    st.retryTimer = setTimeout(() => {
      st.retryTimer = null;
      if (st.want) connect();
    }, delay * 1000);
    updateControls();
  }

  function fail(text, label, kind) {
    st.want = false;
    clearTimeout(st.retryTimer);
    stopAudio();
    if (st.ws) {
      st.conn++;
      st.ws.close();
      st.ws = null;
    }
    setState("error", label);
    showMessage(text, kind || "error");
    updateControls();
  }

  // -- microphone --------------------------------------------------------------------------

  function micMessage(err) {
    const name = err && err.name;
    if (name === "InsecureContext")
      return "This browser allows the microphone only on secure pages: open this page over https:// or at http://localhost.";
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError")
      return "Microphone access was denied. Allow the microphone for this page (see the icon in the address bar)" + AGAIN;
    if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError")
      return "No microphone was found. Connect one" + AGAIN;
    if (name === "NotReadableError" || name === "AbortError" || name === "TrackStartError")
      return "The microphone could not be opened: another application may be using it.";
    return "Could not start the microphone: " + ((err && err.message) || err);
  }

  async function startAudio() {
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      const err = new Error("insecure context");
      err.name = "InsecureContext";
      throw err;
    }
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: true },
      video: false,
    });
    let ctx = null;
    try {
      let source;
      try {
        // 16 kHz: the browser resamples the microphone, the worklet sends the daemon's own format.
        ctx = new AudioContext({ sampleRate: 16000 });
        source = ctx.createMediaStreamSource(stream);
      } catch {
        // Some browsers cannot connect a microphone to a context at another rate: send the
        // context's rate instead; the daemon resamples.
        if (ctx) ctx.close();
        ctx = new AudioContext();
        source = ctx.createMediaStreamSource(stream);
      }
      await ctx.audioWorklet.addModule(new URL("capture-worklet.js", document.baseURI));
      const node = new AudioWorkletNode(ctx, "pcm-capture", {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { chunkMs: 100 },
      });
      const mute = ctx.createGain(); // keeps the graph pulled without playing the microphone back
      mute.gain.value = 0;
      source.connect(node);
      node.connect(mute);
      mute.connect(ctx.destination);
      node.port.onmessage = (e) => onPcm(e.data);
      if (ctx.state === "suspended") await ctx.resume();
      for (const track of stream.getAudioTracks()) {
        track.addEventListener("ended", () => {
          if (st.want) fail("The microphone stopped (unplugged or turned off).", "Microphone stopped");
        });
      }
      st.audio = { ctx, stream, node };
      st.rate = ctx.sampleRate;
      st.captured = 0;
    } catch (err) {
      for (const t of stream.getTracks()) t.stop();
      if (ctx) ctx.close();
      throw err;
    }
  }

  function stopAudio() {
    const a = st.audio;
    st.audio = null;
    ui.level.style.width = "0";
    if (!a) return;
    a.node.port.onmessage = null;
    for (const t of a.stream.getTracks()) t.stop();
    a.ctx.close().catch(() => {});
  }

  function onPcm(data) {
    st.captured += data.pcm.byteLength / 2;
    ui.level.style.width = Math.min(100, Math.round(Math.sqrt(data.peak) * 100)) + "%";
    const ws = st.ws;
    if (st.streaming && ws && ws.readyState === WebSocket.OPEN && ws.bufferedAmount < MAX_BUFFERED) ws.send(data.pcm);
  }

  // -- start / stop ------------------------------------------------------------------------

  async function start() {
    if (st.want) return;
    st.want = true;
    st.attempt = 0;
    clearMessage();
    updateControls();
    if (mode === "capture") {
      ui.placeholder.textContent = "Captions appear here as you speak.";
      setState("starting", "Starting the microphone…");
      try {
        await startAudio();
      } catch (err) {
        if (st.want) fail(micMessage(err), "Microphone unavailable", "microphone");
        return;
      }
      if (!st.want) {
        stopAudio();
        return;
      }
    }
    connect();
  }

  function stop() {
    st.want = false;
    clearTimeout(st.retryTimer);
    st.retryTimer = null;
    stopAudio();
    const ws = st.ws;
    if (ws && st.streaming && ws.readyState === WebSocket.OPEN) {
      // The server answers "stop" with the last finals and "end", then closes.
      ws.send(JSON.stringify({ type: "stop" }));
      st.streaming = false;
      setState("stopping", "Finishing…");
      st.stopTimer = setTimeout(() => ws.close(), STOP_GRACE_MS);
    } else if (ws) {
      setState("stopping", "Disconnecting…");
      ws.close();
    } else {
      setState("idle", "Stopped");
    }
    updateControls();
  }

  // -- downloads -----------------------------------------------------------------------------

  function pad(n, w) {
    return String(n).padStart(w || 2, "0");
  }

  function vttTime(t) {
    const ms = Math.max(0, Math.round(t * 1000));
    const h = Math.floor(ms / 3600000);
    const m = Math.floor(ms / 60000) % 60;
    const s = Math.floor(ms / 1000) % 60;
    return pad(h) + ":" + pad(m) + ":" + pad(s) + "." + pad(ms % 1000, 3);
  }

  function vttText(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function toVtt() {
    const cues = st.finals.map((f, i) => {
      const end = Math.max(f.end, f.start + 0.001);
      return i + 1 + "\n" + vttTime(f.start) + " --> " + vttTime(end) + "\n" + vttText(f.text) + "\n";
    });
    return "WEBVTT\n\n" + cues.join("\n");
  }

  function toTxt() {
    return st.finals.map((f) => f.text).join("\n") + "\n";
  }

  function download(ext) {
    const body = ext === "vtt" ? toVtt() : toTxt();
    const blob = new Blob([body], { type: ext === "vtt" ? "text/vtt" : "text/plain" });
    const d = new Date();
    const stamp = d.getFullYear() + pad(d.getMonth() + 1) + pad(d.getDate()) + "-" + pad(d.getHours()) + pad(d.getMinutes());
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "captions-" + stamp + "." + ext;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  function clearCaptions() {
    st.finals = [];
    ui.finals.replaceChildren();
    ui.partial.textContent = "";
    ui.placeholder.hidden = false;
    updateControls();
  }

  // -- setup -----------------------------------------------------------------------------------

  function updateViewerLink() {
    const name = ui.name.value.trim();
    const ok = NAME_RE.test(name);
    ui.viewerLink.hidden = !ok;
    if (ok) {
      const url = new URL(location.pathname, location.href);
      url.searchParams.set("listen", name);
      if (ui.finals.lang) url.searchParams.set("lang", ui.finals.lang); // a viewer's "ready" has no language
      ui.viewerHref.href = url.href;
      ui.viewerHref.textContent = url.href;
    }
  }

  ui.body.dataset.mode = mode;
  ui.token.value = params.get("token") || "";
  if (params.has("token")) {
    const url = new URL(location.href);
    url.searchParams.delete("token");
    history.replaceState(history.state, "", url.href);
  }
  ui.name.value = params.get("name") || "";
  setLanguage(params.get("lang"));
  ui.toggle.addEventListener("click", () => (st.want ? stop() : start()));
  ui.txt.addEventListener("click", () => download("txt"));
  ui.vtt.addEventListener("click", () => download("vtt"));
  ui.clear.addEventListener("click", clearCaptions);
  ui.form.addEventListener("submit", (e) => e.preventDefault());
  ui.name.addEventListener("input", updateViewerLink);
  window.addEventListener("pagehide", () => {
    if (st.want) stop();
  });
  updateViewerLink();

  if (mode === "listen") {
    ui.title.textContent = "Live captions: " + listenName;
    document.title = listenName + " · live captions";
    ui.placeholder.textContent = "Waiting for captions from “" + listenName + "”…";
    if (NAME_RE.test(listenName)) start();
    else showMessage("“" + listenName + "” is not a stream name: use 1-64 letters, digits, '_', '-' or '.'.");
  }
  updateControls();
})();
