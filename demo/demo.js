// The demo page: every knob sends one small JSON request to demo.py on this machine.
"use strict";
const $ = (id) => document.getElementById(id);
let running = Promise.resolve();          // one request at a time, in order

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function knobs() {                        // what every request reads; the LoRA strength only with an adapter
  const k = { label: +$("label").value, guidance: +$("guidance").value, sampler: $("sampler").value,
              steps: +$("steps").value, seed: +$("seed").value, n: +$("n").value, adapter: $("adapter").value };
  if (k.adapter !== "none") k.scale = +$("scale").value;
  return k;
}

function queue(task) {                    // run after the request before it, whatever became of that one
  running = running.then(task, task).catch((e) => showError(String(e)));
  return running;
}

const GONE = "the demo server does not answer: is `python demo.py` still running?";

async function post(path, body) {
  let reply;
  try {
    reply = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify(body) });
  } catch (e) { throw new Error(GONE); }
  if (!reply.ok) {
    let message = "the demo answered " + reply.status;
    try { message = (await reply.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return reply;
}

function onFilmEvent(e) {
  if (e.error) { showError(e.error); return; }
  if (e.grid) {
    $("grid").src = e.grid;
    $("grid").dataset.count = +$("grid").dataset.count + 1;
    $("status").textContent += " - done in " + e.seconds + " s";
    return;
  }
  $("xt").src = e.x_t;
  $("x0").src = e.x0;
  $("status").textContent = "step " + e.step + " of " + e.of;
  $("attn-step").max = e.of;
}

async function generate() {
  showError("");
  try {
    const reply = await post("/api/generate", knobs());
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {                                           // one JSON line per denoising step, as it is drawn
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (line) onFilmEvent(JSON.parse(line));
      }
    }
  } catch (e) { showError(e.message); }
}

// ----- the canvas -----
const canvas = $("canvas");
const pen = canvas.getContext("2d");
function clearCanvas() {
  pen.fillStyle = "#000";
  pen.fillRect(0, 0, canvas.width, canvas.height);
}
let drawing = false;
function at(e) {
  const r = canvas.getBoundingClientRect();
  return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
}
canvas.addEventListener("pointerdown", (e) => {
  drawing = true;
  const [x, y] = at(e);
  pen.beginPath(); pen.moveTo(x, y); pen.lineTo(x + 0.1, y); pen.stroke();
});
canvas.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const [x, y] = at(e);
  pen.lineTo(x, y); pen.stroke();
});
for (const end of ["pointerup", "pointerleave"]) canvas.addEventListener(end, () => { drawing = false; });

function pixels() {                        // the drawing as MNIST sees a digit: 28 x 28 grey levels
  const small = document.createElement("canvas");
  small.width = small.height = 28;
  const c = small.getContext("2d");
  c.imageSmoothingEnabled = true;
  c.imageSmoothingQuality = "high";
  c.drawImage(canvas, 0, 0, 28, 28);
  const rgba = c.getImageData(0, 0, 28, 28).data;
  const grey = [];
  for (let i = 0; i < rgba.length; i += 4) grey.push(rgba[i]);
  return grey;
}

async function edit() {
  showError("");
  try {
    const mode = $("mode").value;          // img2img reads the strength, inpainting what to keep
    const body = { ...knobs(), pixels: pixels(), mode,
                   ...(mode === "img2img" ? { strength: +$("edit-strength").value } : { keep: $("keep").value }) };
    const result = await (await post("/api/edit", body)).json();
    $("edit-input").src = result.input;
    $("edit-grid").src = result.grid;
    $("edit-grid").dataset.count = +$("edit-grid").dataset.count + 1;
  } catch (e) { showError(e.message); }
}

async function attention() {
  showError("");
  try {
    const { n, ...shared } = knobs();     // the maps are of the first digit: the same one at any n
    const body = { ...shared, step: +$("attn-step").value, size: +$("attn-size").value };
    const result = await (await post("/api/attention", body)).json();
    const maps = $("attn-maps");
    maps.replaceChildren();
    result.maps.forEach((src, i) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      const cap = document.createElement("figcaption");
      img.src = src;
      cap.textContent = result.names[i] + (i === 0 ? " (t = " + result.t + ")" : "");
      fig.append(img, cap);
      maps.append(fig);
    });
  } catch (e) { showError(e.message); }
}

// ----- wiring -----
for (const id of ["guidance", "steps", "n", "scale", "edit-strength", "attn-step"]) {
  $(id).addEventListener("input", () => { $(id + "-value").textContent = $(id).value; });
}
let redraw = null;                         // the same seed re-drawn as the LoRA strength moves
$("scale").addEventListener("input", () => {
  clearTimeout(redraw);
  redraw = setTimeout(() => queue(generate), 150);
});
$("adapter").addEventListener("change", () => { $("scale").disabled = $("adapter").value === "none"; });
$("generate").addEventListener("click", () => queue(generate));
$("edit").addEventListener("click", () => queue(edit));
$("attn").addEventListener("click", () => queue(attention));
$("clear").addEventListener("click", clearCanvas);

async function start() {
  clearCanvas();
  pen.strokeStyle = "#fff"; pen.lineWidth = 24; pen.lineCap = "round"; pen.lineJoin = "round";
  for (let d = 0; d < 10; d++) $("label").add(new Option(String(d), String(d), d === 7, d === 7));
  try {
    const info = await (await fetch("/api/info")).json();
    $("source").textContent = "model: " + info.source;
    for (const name of info.adapters) if (name !== "none") $("adapter").add(new Option(name, name));
    $("steps").max = info.steps;
    $("n").max = info.limits.n;
    for (const size of info.sizes) $("attn-size").add(new Option(size + " x " + size, String(size)));
  } catch (e) { showError(GONE); }
}
start();
