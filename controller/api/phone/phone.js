// callfabric /phone: talk to an AI agent from a browser. SIP over a secure WebSocket to the
// edge (JsSIP), the microphone sent as WebRTC media (DTLS-SRTP; the edge's rtpengine turns it
// into plain RTP toward the agent), the agent's voice played back. Bundled with esbuild at setup
// time (package.json): the page loads nothing from anywhere else.
//
// The page's settings come from the controller (the JSON in #cf-config: the edge's WebSocket URL);
// the caller's short-lived phone token from the address's fragment (#token=…, never sent to a
// server in a request line or a log) or query; the token names who the page calls. `window.cfPhone`
// shows the call's state and audio levels, for people (the page) and for tests.
import JsSIP from "jssip";

const config = JSON.parse(document.getElementById("cf-config").textContent);
const params = new URLSearchParams(location.hash.slice(1) || location.search.slice(1));
const query = new URLSearchParams(location.search.slice(1));
const token = params.get("token") || query.get("token") || "";
// the token names who it may call ("<expiry>.<callee>.<signature>"; "*": ?to= says who)
const callee = token.split(".")[1] || "";
const to = callee && callee !== "*" ? callee : query.get("to") || "";
const $ = (id) => document.getElementById(id);

const state = {
  status: "idle", // idle | connecting | calling | up | ended | failed
  cause: "",
  to,
  micLevel: 0, // RMS (0..1) of what the microphone sends, last 100 ms
  level: 0, // RMS (0..1) of what the page hears, last 100 ms
  peakLevel: 0, // highest `level` so far
  heardMs: 0, // time the page heard sound (level above 0.01)
  answeredAt: 0,
};
window.cfPhone = { state, call, hangup };

let ua = null;
let session = null;
let audioContext = null;

function show(status, cause = "") {
  state.status = status;
  state.cause = cause;
  $("status").textContent = cause ? `${status}: ${cause}` : status;
  $("call").disabled = ["connecting", "calling", "up"].includes(status);
  $("hangup").disabled = !["connecting", "calling", "up"].includes(status);
}

function meter(stream, onLevel) {
  audioContext = audioContext || new AudioContext();
  const analyser = audioContext.createAnalyser();
  analyser.fftSize = 2048;
  audioContext.createMediaStreamSource(stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const timer = setInterval(() => {
    if (state.status === "ended" || state.status === "failed") clearInterval(timer);
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    onLevel(Math.sqrt(sum / samples.length));
  }, 100);
}

function heard(level) {
  state.level = level;
  state.peakLevel = Math.max(state.peakLevel, level);
  if (level > 0.01) state.heardMs += 100;
  $("heard").value = Math.min(1, level * 4);
}

function call() {
  if (!token) {
    show("failed", "no phone token in the page's address (#token=…)");
    return;
  }
  const socket = new JsSIP.WebSocketInterface(`${config.ws_url}?token=${encodeURIComponent(token)}`);
  ua = new JsSIP.UA({
    sockets: [socket],
    uri: `sip:browser@${config.domain}`,
    register: false,
    session_timers: false,
    user_agent: "callfabric-phone",
  });
  show("connecting");
  ua.on("connected", () => {
    if (session) return;
    show("calling");
    session = ua.call(`sip:${to}@${config.domain}`, {
      mediaConstraints: { audio: true, video: false },
      pcConfig: { iceServers: [], rtcpMuxPolicy: "require" },
    });
    session.on("confirmed", () => {
      state.answeredAt = Date.now();
      show("up");
    });
    session.on("ended", (e) => end("ended", e.cause));
    session.on("failed", (e) => end("failed", e.cause));
    session.connection.addEventListener("track", (event) => {
      const remote = event.streams[0] || new MediaStream([event.track]);
      $("remote").srcObject = remote;
      meter(remote, heard);
    });
    session.on("sending", () => {
      const local = session.connection.getSenders().map((s) => s.track).filter(Boolean);
      if (local.length) meter(new MediaStream(local), (level) => { state.micLevel = level; });
    });
  });
  ua.on("disconnected", () => {
    if (state.status === "connecting") end("failed", "the edge refused the connection (token, origin or TLS)");
  });
  ua.start();
}

function end(status, cause) {
  show(status, cause);
  if (ua) ua.stop();
  session = null;
  ua = null;
}

function hangup() {
  if (session) session.terminate();
  else end("ended", "hung up");
}

$("to").textContent = to;
$("call").addEventListener("click", call);
$("hangup").addEventListener("click", hangup);
show("idle");
