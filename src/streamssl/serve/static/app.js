// The microphone page of `streamssl serve`: capture with getUserMedia and an AudioWorklet, send the
// device's samples (float32, its own rate: the server resamples to 16 kHz), show partials, finals and
// latency. URL parameters for unattended runs: ?autostart=1 starts at once, &seconds=S stops after S
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
    this.socket.send(JSON.stringify({ type: "start", sample_rate: this.rate, format: "float32" }));
    this.node.port.onmessage = (event) => this.onAudio(event.data);
    source.connect(this.node);
    await this.context.resume();
    setStatus(`streaming at ${this.rate} Hz`);
  }

  onAudio(block) {
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
      this.showLatency(null);
    } else if (message.type === "partial") {
      for (const token of message.tokens) this.clientDelays.push(now - this.sentAt(token.end_s));
      el("partial").textContent = message.text;
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
      el("partial").textContent = "";
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
  el("partial").textContent = "";
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
