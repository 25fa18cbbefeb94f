// Kiln frontend: a live loss chart on every Train node (LoRA and DreamBooth), fed by the "kiln.loss" events the
// Train nodes send each optimizer step (step, total, loss, lr, seconds). Sample previews need no code
// here: ComfyUI shows the node's progress preview image itself.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODES = new Set(["KilnTrainSD1", "KilnTrainSDXL", "KilnTrainSD3", "KilnTrainDreamBooth"]);
const HEIGHT = 140;

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

function draw(canvas, state) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300;
  canvas.width = w * dpr;
  canvas.height = HEIGHT * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.fillStyle = "#18181c";
  g.fillRect(0, 0, w, HEIGHT);
  g.fillStyle = "#ddd";
  g.font = "11px sans-serif";
  const pts = state.losses;
  if (!pts.length) {
    g.fillText("loss: waiting for training to start", 8, 16);
    return;
  }
  const last = state.last;
  const rate = last.step / Math.max(last.seconds, 1e-6);
  const eta = rate > 0 ? (last.total - last.step) / rate : 0;
  const epoch = last.epochs > 1 ? `epoch ${last.epoch}/${last.epochs}  ` : "";
  g.fillText(`${epoch}step ${last.step}/${last.total}  loss ${last.loss.toFixed(4)}  lr ${last.lr.toExponential(1)}  ` +
             `${rate.toFixed(2)} it/s  ETA ${Math.round(eta)}s`, 8, 14);
  const top = 22, left = 6, bottom = HEIGHT - 6, right = w - 6;
  const val = state.val || [];  // validation loss: [step index, loss], drawn as green dots
  const all = pts.concat(val.map((v) => v[1]));
  const lo = Math.min(...all), hi = Math.max(...all);
  const span = hi > lo ? hi - lo : 1e-8;
  const x = (i) => left + (right - left) * (pts.length > 1 ? i / (pts.length - 1) : 0);
  const y = (v) => top + (bottom - top) * (1 - (v - lo) / span);
  const line = (values, colour, width) => {
    g.strokeStyle = colour;
    g.lineWidth = width;
    g.beginPath();
    values.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
    g.stroke();
  };
  line(pts, "#5a6ea0", 1);
  line(movingAverage(pts, Math.max(1, Math.floor(pts.length / 20))), "#ffaa3c", 2);
  g.fillStyle = "#5ad27a";
  val.forEach(([i, v]) => g.fillRect(x(i) - 2, y(v) - 2, 4, 4));
  if (val.length) g.fillText(`val ${val[val.length - 1][1].toFixed(4)}`, right - 70, 14);
}

app.registerExtension({
  name: "kiln.training",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TRAIN_NODES.has(nodeData.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      const canvas = document.createElement("canvas");
      canvas.className = "kiln-loss-chart";
      canvas.style.width = "100%";
      canvas.style.height = `${HEIGHT}px`;
      this.kiln = { losses: [], last: null, canvas };
      this.addDOMWidget("kiln_loss", "kiln-loss", canvas, { serialize: false, getMinHeight: () => HEIGHT });
      draw(canvas, this.kiln);
      return r;
    };
  },
  setup() {
    api.addEventListener("kiln.loss", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node?.kiln) return;
      if (detail.step === 1 || (node.kiln.last && detail.step <= node.kiln.last.step)) {
        node.kiln.losses = [];
        node.kiln.val = [];
      }
      node.kiln.losses.push(detail.loss);
      if (detail.val_loss !== null && detail.val_loss !== undefined) {
        (node.kiln.val ||= []).push([node.kiln.losses.length - 1, detail.val_loss]);
      }
      node.kiln.last = detail;
      draw(node.kiln.canvas, node.kiln);
      node.setDirtyCanvas(true, false);
    });
  },
});
