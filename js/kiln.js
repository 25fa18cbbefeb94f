// Kiln frontend: a live loss chart on every Train node (LoRA and DreamBooth), fed by the "kiln.loss" events the
// Train nodes send each optimizer step (step, total, loss, lr, seconds, epoch, val_loss, saved): raw and smoothed
// loss over the whole planned run, the learning rate on a second axis, validation points, save markers. Sample previews need no code
// here: ComfyUI shows the node's progress preview image itself.
// And a button on nodes with "advanced" inputs (the Train nodes' widgets beyond registry.SHOWN): the frontend hides
// those until the node's "Show Advanced"; the button is that toggle, one click away, saying how many are hidden.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// every Train node (SD1, SDXL, SD3, Flux, any model, DreamBooth) carries the chart: a new family needs no entry here
const isTrainNode = (name) => name.startsWith("KilnTrain");
const HEIGHT = 190;
// the same colours as trainer_core/plot.py (the loss_plot IMAGE), so the live chart and the image read alike
const C = {background: "#18181c", frame: "#50505a", grid: "#2c2c34", text: "#dcdcdc", label: "#aaaaaa",
           raw: "#5a6ea0", smooth: "#ffaa3c", lr: "#c86ee6", val: "#5ad27a", save: "#6ec8dc"};
const PAD = {left: 40, right: 46, top: 40, bottom: 18};  // room for the loss, lr and step tick labels
const FONT_PX = 11;

function movingAverage(values, window) {
  const out = [];
  let acc = 0;
  values.forEach((v, i) => {
    acc += v;
    if (i >= window) acc -= values[i - window];
    out.push(acc / Math.min(i + 1, window));
  });
  return out;
}

// plot.smoothing_window: 1/20 of the steps, at least 3 (but at most a quarter of them)
const smoothingWindow = (n) => Math.max(1, Math.min(Math.floor(n / 4), Math.max(3, Math.floor(n / 20))));

// at most count+1 ticks inside [lo, hi], spaced 1, 2 or 5 x 10^k (plot.nice_ticks)
function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const base = 10 ** Math.floor(Math.log10(span / count));
  const step = [1, 2, 5, 10].map((m) => base * m).find((s) => span / s <= count);
  const first = Math.ceil(lo / step - 1e-9) * step;
  const out = [];
  for (let k = 0; first + k * step <= hi + 1e-9 * step; k++) out.push(Number((first + k * step).toPrecision(12)));
  return out;
}

const fmtLr = (v) => (v === 0 ? "0" : v.toExponential(1).replace(".0e", "e"));

function draw(canvas, state) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300;
  canvas.width = w * dpr;
  canvas.height = HEIGHT * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.fillStyle = C.background;
  g.fillRect(0, 0, w, HEIGHT);
  g.font = `${FONT_PX}px sans-serif`;
  const labels = [];  // every text box drawn, for the browser test's readability check
  const text = (s, x, y, colour, align = "left", baseline = "alphabetic") => {
    g.fillStyle = colour;
    g.textAlign = align;
    g.textBaseline = baseline;
    g.fillText(s, x, y);
    const m = g.measureText(s);
    const x0 = align === "left" ? x : align === "right" ? x - m.width : x - m.width / 2;
    const y0 = baseline === "alphabetic" ? y - FONT_PX * 0.8 : baseline === "top" ? y : y - FONT_PX / 2;
    labels.push({text: s, x: x0, y: y0, w: m.width, h: FONT_PX});
  };
  const pts = state.points;  // [step, loss]
  const ph = state.phase;  // what the run is doing besides training steps ("kiln.phase" events)
  const phase = ph && ph.phase !== "training"
    ? (ph.total ? `${ph.phase} ${ph.done}/${ph.total}` : ph.phase) : null;
  if (!pts.length) {
    text(phase ? `${phase}…` : "loss: waiting for training to start", 8, 16, C.text);
    state.layout = {width: w, height: HEIGHT, labels, box: null, header: labels[0].text};
    return;
  }
  const last = state.last;
  // training steps by their own time; the ETA (the node's) counts the previews and saves to come as well
  const rate = (last.step - pts[0][0] + 1) / Math.max(last.train_seconds ?? last.seconds, 1e-6);
  const eta = state.eta ?? (rate > 0 ? (last.total - last.step) / rate : 0);
  const head = {phase, epoch: last.epochs > 1 ? `epoch ${last.epoch}/${last.epochs}` : null,
                step: `step ${last.step}/${last.total}`, loss: `loss ${last.loss.toFixed(4)}`, lr: `lr ${fmtLr(last.lr)}`,
                rate: `${rate.toFixed(2)} it/s`, eta: `ETA ${Math.round(eta)}s`};
  const shown = () => Object.values(head).filter(Boolean);
  for (const less of ["lr", "rate", "epoch", "loss"]) {  // a narrow node: the phase, the step and the ETA stay
    if (g.measureText(shown().join("  ")).width <= w - 12) break;
    head[less] = null;
  }
  const parts = shown();
  text(parts.join("  "), 6, 14, C.text);
  const val = state.val, saves = state.saves, lrs = state.lrs;
  const items = [["raw", "raw"], ["smoothed", "smooth"], ["lr", "lr"]];
  if (val.length) items.push([`val ${val[val.length - 1][1].toFixed(3)}`, "val"]);
  if (saves.length) items.push(["save", "save"]);
  let lx = 6;
  for (const [label, key] of items) {
    g.fillStyle = C[key];
    g.fillRect(lx, 24, 9, 3);
    text(label, lx + 12, 29, C[key]);
    lx += 12 + g.measureText(label).width + 10;
  }
  const left = PAD.left, top = PAD.top, right = w - PAD.right, bottom = HEIGHT - PAD.bottom;
  const x0 = pts[0][0], x1 = Math.max(last.total, pts[pts.length - 1][0], x0 + 1);  // the whole planned run
  const all = pts.map((p) => p[1]).concat(val.map((v) => v[1]));
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi - lo < 1e-12) { lo -= 0.5 * (Math.abs(lo) || 1); hi += 0.5 * (Math.abs(hi) || 1); }
  const margin = 0.04 * (hi - lo);
  lo -= margin; hi += margin;
  const lrMax = Math.max(0, ...lrs.map((p) => p[1])) * 1.08;
  const x = (s) => left + (right - left) * (s - x0) / (x1 - x0);
  const y = (v) => bottom - (bottom - top) * (v - lo) / (hi - lo);
  const yLr = (v) => bottom - (bottom - top) * v / lrMax;
  g.lineWidth = 1;
  const hline = (x_0, y_0, x_1, y_1, colour) => {
    g.strokeStyle = colour;
    g.beginPath();
    g.moveTo(x_0, y_0);
    g.lineTo(x_1, y_1);
    g.stroke();
  };
  for (const t of niceTicks(lo, hi, 4)) {
    const yy = Math.round(y(t)) + 0.5;
    hline(left, yy, right, yy, C.grid);
    hline(left - 3, yy, left, yy, C.frame);
    text(t.toPrecision(3).replace(/\.?0+$/, ""), left - 5, yy, C.label, "right", "middle");
  }
  const stepTicks = niceTicks(x0, x1, Math.max(2, Math.floor((right - left) / 36)));
  for (const t of stepTicks) {
    const xx = Math.round(x(t)) + 0.5;
    hline(xx, top, xx, bottom, C.grid);
    hline(xx, bottom, xx, bottom + 3, C.frame);
    text(String(t), xx, bottom + 4, C.label, "center", "top");
  }
  if (lrMax > 0) {
    for (const t of niceTicks(0, lrMax, 3)) {
      const yy = Math.round(yLr(t)) + 0.5;
      hline(right, yy, right + 3, yy, C.lr);
      text(fmtLr(t), right + 5, Math.min(yy, bottom - FONT_PX / 2), C.lr, "left", "middle");  // 0: clear of the step labels
    }
  }
  g.strokeStyle = C.frame;
  g.strokeRect(left + 0.5, top + 0.5, right - left, bottom - top);
  for (const s of saves) {  // intermediate saves: a dashed line through the plot and a marker above it
    const xx = Math.round(x(s)) + 0.5;
    g.setLineDash([3, 3]);
    hline(xx, top + 1, xx, bottom - 1, C.save);
    g.setLineDash([]);
    g.fillStyle = C.save;
    g.beginPath();
    g.moveTo(xx - 4, top - 7);
    g.lineTo(xx + 4, top - 7);
    g.lineTo(xx, top - 1);
    g.fill();
  }
  const line = (series, yOf, colour, width) => {
    if (series.length < 2) return;
    g.strokeStyle = colour;
    g.lineWidth = width;
    g.beginPath();
    series.forEach(([s, v], i) => (i ? g.lineTo(x(s), yOf(v)) : g.moveTo(x(s), yOf(v))));
    g.stroke();
  };
  line(pts, y, C.raw, 1);
  const avg = movingAverage(pts.map((p) => p[1]), smoothingWindow(pts.length));
  line(pts.map((p, i) => [p[0], avg[i]]), y, C.smooth, 2);
  if (lrMax > 0) line(lrs, yLr, C.lr, 1.5);
  g.fillStyle = C.val;
  val.forEach(([s, v]) => g.fillRect(x(s) - 3, y(v) - 3, 6, 6));
  state.layout = {width: w, height: HEIGHT, labels, header: parts.join("  "), box: [left, top, right, bottom], fontPx: FONT_PX,
                  x: Object.fromEntries([...pts.map((p) => p[0]), ...saves].map((s) => [s, x(s)])),
                  saveX: saves.map((s) => Math.round(x(s)) + 0.5), stepTicks,
                  lrY: lrs.map(([s, v]) => [x(s), yLr(v)]), valXY: val.map(([s, v]) => [x(s), y(v)])};
}

// input name -> default, for the advanced inputs of a node definition (from /object_info)
function advancedDefaults(nodeData) {
  const out = {};
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData.input?.[section] ?? {})) {
      if (spec?.[1]?.advanced) out[name] = spec[1].default;
    }
  }
  return out;
}

const sameValue = (a, b) => (typeof a === "number" && typeof b === "number"
  ? Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(b)) : (a ?? "") === (b ?? ""));

function fitHeight(node) {
  node.setSize([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas(true, true);
}

// Frontend 1.32 (ComfyUI 0.3.75) skips hidden widgets when it draws and sizes a node, but still gives each its
// height when it lays the widgets out, leaving gaps: a hidden widget measures nothing here instead.
const NO_SIZE = () => [0, -4];  // the layout adds 4 px of margin to a widget's height

function measuresNothingWhen(widget, isHidden) {
  let own = widget.computeSize;  // the widget's own or its class's; undefined for widgets sized by their layout
  Object.defineProperty(widget, "computeSize", {configurable: true, get: () => (isHidden() ? NO_SIZE : own),
                                                set: (v) => { own = v; }});
}

function updateAdvancedButton(node) {
  const hidden = node.widgets.filter((w) => w.advanced).length;
  node.kilnAdvanced.button.label = node.kilnAdvanced.button.name = hidden === 0 ? "" :
    node.showAdvanced ? `▾ hide ${hidden} advanced inputs` : `▸ show ${hidden} advanced inputs`;
  node.kilnAdvanced.button.hidden = hidden === 0;
}

// the advanced flag on each widget (frontends that keep it only in the widget's options too), and the toggle button
function addAdvancedToggle(node, defaults) {
  for (const w of node.widgets ?? []) {
    if (!(w.name in defaults)) continue;
    w.advanced = true;
    measuresNothingWhen(w, () => w.advanced && !node.showAdvanced);
  }
  const button = node.addWidget("button", "advanced", null, () => {
    node.showAdvanced = !node.showAdvanced;
    updateAdvancedButton(node);
    fitHeight(node);
  }, { serialize: false });
  button.serialize = false;  // never among widgets_values: saved workflows keep their positions
  measuresNothingWhen(button, () => button.hidden);
  node.kilnAdvanced = {defaults, button};
  updateAdvancedButton(node);
}

// a loaded workflow that sets an advanced input away from its default shows it: nothing it sets is out of sight
function revealChanged(node) {
  const {defaults} = node.kilnAdvanced;
  for (const w of node.widgets) if (w.advanced && !sameValue(w.value, defaults[w.name])) w.advanced = false;
  updateAdvancedButton(node);
  fitHeight(node);
}

// The text a Kiln node returns (ui "text": its summary, where a file went, "note: ..." warnings), shown on the node
// after a run in a read-only box like the frontend's own text previews; warnings in amber with a mark.
const TEXT_LINE_PX = 16, TEXT_MAX_LINES = 14;
const isWarning = (line) => /^(note|warning):/i.test(line.trim());

function addTextBox(node) {
  const box = document.createElement("div");
  box.className = "kiln-node-text";
  Object.assign(box.style, {font: "12px monospace", lineHeight: `${TEXT_LINE_PX}px`, color: "#dcdcdc",
                            background: "#1e1e22", border: "1px solid #50505a", borderRadius: "4px",
                            padding: "4px 6px", overflowY: "auto", whiteSpace: "pre-wrap", wordBreak: "break-word",
                            boxSizing: "border-box", userSelect: "text"});
  const height = () => (node.kilnText.lines ? Math.min(node.kilnText.lines, TEXT_MAX_LINES) * TEXT_LINE_PX + 12 : 0);
  const widget = node.addDOMWidget("kiln_text", "kiln-text", box, {serialize: false, getMinHeight: height,
                                                                   getMaxHeight: height, hideOnZoom: false});
  widget.serialize = false;
  node.kilnText = {box, widget, lines: 0, text: ""};
  measuresNothingWhen(widget, () => node.kilnText.lines === 0);
  widget.hidden = true;
}

function showText(node, text) {
  const t = node.kilnText;
  if (!t || text === t.text) return;
  t.text = text;
  t.box.replaceChildren(...text.split("\n").map((line) => {
    const div = document.createElement("div");
    div.textContent = isWarning(line) ? `⚠ ${line}` : line;
    if (isWarning(line)) Object.assign(div.style, {color: "#ffb454", fontWeight: "bold"});
    return div;
  }));
  t.box.dataset.warnings = String(text.split("\n").filter(isWarning).length);
  t.box.title = text;
  // wrapped lines count too: about one per 7 px of width at 12 px monospace
  const perLine = Math.max(20, Math.floor((node.size[0] - 40) / 7.2));
  t.lines = text.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / perLine)), 0);
  t.widget.hidden = t.lines === 0;
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

// the sample preview ComfyUI draws below a node's widgets gets room inside the node's frame before it arrives
const PREVIEW_ROOM = 240;
function roomForPreview(node) {
  const need = node.computeSize()[1] + PREVIEW_ROOM;
  if (node.size[1] < need) {
    node.setSize([node.size[0], need]);
    node.setDirtyCanvas(true, true);
  }
}

function addChart(node) {
  const canvas = document.createElement("canvas");
  canvas.className = "kiln-loss-chart";
  canvas.style.width = "100%";
  canvas.style.height = `${HEIGHT}px`;
  node.kiln = {points: [], lrs: [], val: [], saves: [], last: null, canvas};
  const chart = node.addDOMWidget("kiln_loss", "kiln-loss", canvas, { serialize: false, getMinHeight: () => HEIGHT });
  chart.serialize = false;  // no trailing null in widgets_values
  draw(canvas, node.kiln);
}

app.registerExtension({
  name: "kiln.training",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("Kiln")) return;
    const defaults = advancedDefaults(nodeData);
    const advanced = Object.keys(defaults).length > 0;
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = executed?.apply(this, arguments);
      const text = output?.text;
      if (text !== undefined) showText(this, (Array.isArray(text) ? text : [text]).join("\n"));
      if (this.kiln?.last) {  // the run is over: no phase, nothing left
        Object.assign(this.kiln, {phase: null, eta: 0});
        draw(this.kiln.canvas, this.kiln);
      }
      return r;
    };
    const configure = nodeType.prototype.onConfigure;
    if (advanced) {
      nodeType.prototype.onConfigure = function () {
        const r = configure?.apply(this, arguments);
        if (this.kilnAdvanced) revealChanged(this);
        return r;
      };
    }
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      if (advanced) addAdvancedToggle(this, defaults);
      if (isTrainNode(nodeData.name)) addChart(this);
      addTextBox(this);
      if (advanced) fitHeight(this);
      return r;
    };
  },
  setup() {
    api.addEventListener("kiln.loss", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node?.kiln) return;
      const k = node.kiln;
      if (k.last && detail.step <= k.last.step) Object.assign(k, {points: [], lrs: [], val: [], saves: []});  // a new run
      if (k.phase?.phase !== "saving" && k.phase?.phase !== "sampling") k.phase = {phase: "training"};
      k.eta = detail.eta ?? null;
      k.points.push([detail.step, detail.loss]);
      k.lrs.push([detail.step, detail.lr]);
      if (detail.val_loss !== null && detail.val_loss !== undefined) k.val.push([detail.step, detail.val_loss]);
      if (detail.saved) k.saves.push(detail.step);
      node.kiln.last = detail;
      draw(node.kiln.canvas, node.kiln);
      node.setDirtyCanvas(true, false);
    });
    api.addEventListener("kiln.phase", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node?.kiln) return;
      const k = node.kiln;
      if (detail.step === 0 && (detail.phase === "caching" || detail.phase === "preparing") && k.points.length) {
        Object.assign(k, {points: [], lrs: [], val: [], saves: [], last: null});  // a new run
      }
      k.phase = detail;
      k.eta = detail.eta ?? k.eta ?? null;
      if (detail.phase === "sampling") roomForPreview(node);
      draw(k.canvas, k);
      node.setDirtyCanvas(true, false);
    });
  },
});
