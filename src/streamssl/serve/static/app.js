// The microphone page of `streamssl serve`: capture with getUserMedia and an AudioWorklet, send the
// device's samples (float32, its own rate: the server resamples to 16 kHz), show the input level, the
// model and its declared latency, partials (final words plain, the tail that may change grey), finals
// and latency. URL parameters for unattended runs: ?autostart=1 starts at once, &seconds=S stops after S
// seconds of audio.
"use strict";

const params = new URLSearchParams(location.search);
const el = (id) => document.getElementById(id);
let session = null;

function setStatus(text) { el("status").textContent = text; }

function percentile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q / 100 * sorted.length))];
}

function ms(value) { return value === null || value === undefined ? "-" : `${value.toFixed(0)} ms`; }

function showPartial(stable, unstable) {
  el("partial").querySelector(".stable").textContent = stable;
  el("partial").querySelector(".unstable").textContent = unstable;
}

// Level of a block in dBFS (RMS), shown as a bar from -60 dB (empty) to 0 dB (full): the user sees the
// microphone work before any word comes back.
function showLevel(block) {
  let sum = 0;
  for (let i = 0; i < block.length; i++) sum += block[i] * block[i];
  const db = 10 * Math.log10(sum / Math.max(1, block.length) + 1e-12);
  el("meter-bar").style.width = `${Math.max(0, Math.min(100, (db + 60) / 60 * 100)).toFixed(0)}%`;
  el("level").textContent = `${db.toFixed(0)} dBFS`;
}

class Session {
  constructor(limitSeconds) {
    this.limitSeconds = limitSeconds;
    this.sentSamples = 0;
    this.sendEnds = [];     // samples sent up to and including each message
    this.sendTimes = [];    // performance.now() when it was sent
    this.clientDelays = []; // ms from sending a token's last sample to receiving the token
    this.stopped = false;
  }

  async start() {
    setStatus("starting microphone");
    this.media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    this.context = new AudioContext();
    await this.context.audioWorklet.addModule("capture-worklet.js");
    this.rate = this.context.sampleRate;
    const source = this.context.createMediaStreamSource(this.media);
    this.node = new AudioWorkletNode(this.context, "capture-processor",
      { processorOptions: { blockSamples: Math.round(this.rate / 50) } });
    this.limitSamples = this.limitSeconds ? Math.round(this.limitSeconds * this.rate) : Infinity;
    setStatus("connecting");
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/asr`;
    this.socket = new WebSocket(url);
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => this.onMessage(JSON.parse(event.data));
    this.socket.onclose = (event) => this.onClose(event);
    await new Promise((resolve, reject) => {
      this.socket.onopen = resolve;
      this.socket.onerror = () => reject(new Error("websocket connection failed"));
    });
    const start = { type: "start", sample_rate: this.rate, format: "float32" };
    const hotwords = el("hotwords").value.split("\n").map((line) => line.trim()).filter((line) => line);
    if (hotwords.length) start.hotwords = hotwords;
    this.socket.send(JSON.stringify(start));
    this.node.port.onmessage = (event) => this.onAudio(event.data);
    source.connect(this.node);
    await this.context.resume();
    setStatus(`streaming at ${this.rate} Hz`);
  }

  onAudio(block) {
    showLevel(block);
    if (this.stopped || this.socket.readyState !== WebSocket.OPEN) return;
    let samples = block;
    if (this.sentSamples + samples.length >= this.limitSamples) {
      samples = samples.subarray(0, this.limitSamples - this.sentSamples);
    }
    for (let i = 0; i < samples.length; i++) samples[i] = Math.max(-1, Math.min(1, samples[i]));
    if (samples.length) {
      this.socket.send(samples.slice().buffer);
      this.sentSamples += samples.length;
      this.sendEnds.push(this.sentSamples);
      this.sendTimes.push(performance.now());
    }
    if (this.sentSamples >= this.limitSamples) this.stop();
  }

  sentAt(endSeconds) {
    const needed = Math.ceil(endSeconds * this.rate - 1e-6);
    const i = this.sendEnds.findIndex((end) => end >= needed);
    return this.sendTimes[i === -1 ? this.sendTimes.length - 1 : i];
  }

  onMessage(message) {
    const now = performance.now();
    if (message.type === "ready") {
      this.declared = message.declared_latency_ms;
      el("model").textContent = `model: ${message.model}, ${message.decoder} decoder` +
        `${message.hotwords ? `, ${message.hotwords} hotword phrase(s)` : ""}; declared latency` +
        ` ${ms(message.declared_latency_ms)} (look-ahead ${ms(message.lookahead_ms)} + chunk ${ms(message.chunk_ms)})`;
      this.showLatency(null);
    } else if (message.type === "partial") {
      for (const token of message.tokens) this.clientDelays.push(now - this.sentAt(token.end_s));
      showPartial(message.stable, message.unstable);
    } else if (message.type === "final") {
      const item = document.createElement("li");
      item.dataset.segment = message.segment;
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = message.text;
      const meta = document.createElement("span");
      meta.className = "meta";
      const delays = message.words.map((w) => `${w.text} ${w.delay_ms.toFixed(0)}`).join(", ");
      meta.textContent = ` [${message.start_s.toFixed(2)}-${message.end_s.toFixed(2)} s, ${message.reason};` +
        ` word delays ms: ${delays}]`;
      item.append(text, meta);
      el("finals").append(item);
      showPartial("", "");
      this.showLatency(message.latency);
    } else if (message.type === "done") {
      this.showLatency(message.latency);
      setStatus("done");
    } else if (message.type === "error") {
      setStatus(`error: ${message.message}`);
    }
  }

  showLatency(server) {
    const parts = [`declared ${ms(this.declared)}`];
    if (server) {
      parts.push(`server word delay p50 ${ms(server.word_delay_p50_ms)}, p95 ${ms(server.word_delay_p95_ms)}` +
        ` (${server.words} words)`);
    }
    parts.push(`measured here, send to token: p50 ${ms(percentile(this.clientDelays, 50))},` +
      ` p95 ${ms(percentile(this.clientDelays, 95))} (${this.clientDelays.length} tokens)`);
    el("latency").textContent = parts.join("; ");
  }

  stop() {
    if (this.stopped) return;
    this.stopped = true;
    if (this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: "stop" }));
    this.media.getTracks().forEach((track) => track.stop());
    this.context.close();
    setStatus("finishing");
    el("start").disabled = false;
    el("stop").disabled = true;
  }

  onClose(event) {
    if (event.code !== 1000) setStatus(`closed: ${event.code} ${event.reason}`);
    if (!this.stopped) this.stop();
  }
}

async function start() {
  el("start").disabled = true;
  el("stop").disabled = false;
  el("finals").textContent = "";
  showPartial("", "");
  session = new Session(parseFloat(params.get("seconds")) || 0);
  try {
    await session.start();
  } catch (error) {
    setStatus(`error: ${error.message}`);
    el("start").disabled = false;
    el("stop").disabled = true;
  }
}

el("start").onclick = start;
el("stop").onclick = () => session && session.stop();
if (params.get("autostart")) start();
