// Kiln's example workflows in ComfyUI's template browser: the frontend (1.32 to 1.49 at least) titles a custom
// node's template by its file name (0.3.75's frontend repeats it as the description), with no field for either. Each
// example's Note starts with its title and a one-line description (scripts/workflows.py writes them): this puts
// them on the template cards, found by their thumbnail; nothing changes when the dialog differs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const texts = new Map();  // template name -> {title, description}

// this pack's folder under custom_nodes/, as ComfyUI serves its js/ (/extensions/<folder>/templates.js)
const MODULE = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2));

async function loadTexts() {
  const names = (await (await api.fetchApi("/workflow_templates")).json())[MODULE] ?? [];
  for (const name of names) {
    try {
      const wf = await (await api.fetchApi(`/workflow_templates/${MODULE}/${name}.json`)).json();
      const note = wf.nodes?.find((n) => n.type === "Note" && n.title === "Read me: what to change");
      if (!note) continue;
      const [title, description] = String(note.widgets_values[0]).split("\n");
      texts.set(name, {title, description});
    } catch (e) { /* not a workflow: the card stays as the frontend shows it */ }
  }
}

// the card's text nodes that show the file name (as title, and as description with - and _ as spaces); the card's
// thumbnail has the template's name as its alt text (its src is a cached blob: URL). Frontend 1.49 shows no
// description on a card (only the title, in an element of its own): the description goes in a line of ours below it.
function relabel(img) {
  const name = img.getAttribute("alt");
  if (!texts.has(name)) return;
  const {title, description} = texts.get(name);
  const plain = name.replace(/[-_]/g, " ").trim();
  for (let card = img.parentElement; card; card = card.parentElement) {
    const walker = document.createTreeWalker(card, NodeFilter.SHOW_TEXT);
    const hits = [];
    for (let t = walker.nextNode(); t; t = walker.nextNode()) {
      if (t.nodeValue.trim() === name) hits.push([t, title]);
      else if (t.nodeValue.trim() === plain) hits.push([t, description]);
    }
    if (!hits.length) continue;
    const heading = hits.length === 1 && hits[0][1] === title ? hits[0][0].parentElement : null;
    for (const [t, text] of hits) {
      t.nodeValue = text;  // the node's own value: Vue keeps it until the template itself changes
      if (t.parentElement?.title) t.parentElement.title = text;
    }
    if (heading?.childNodes.length === 1 && heading.parentElement && !card.querySelector(".kiln-description"))
      heading.after(descriptionLine(description));
    return;
  }
}

function descriptionLine(text) {
  const p = document.createElement("p");
  p.className = "kiln-description";
  p.title = text;
  p.textContent = text;
  Object.assign(p.style, {margin: "0", fontSize: "0.75rem", lineHeight: "1rem", opacity: "0.7", overflow: "hidden",
                          display: "-webkit-box", webkitLineClamp: "2", webkitBoxOrient: "vertical"});
  return p;
}

app.registerExtension({
  name: "kiln.templates",
  setup() {  // not awaited: the app does not wait for the examples' files
    loadTexts().then(() => {
      if (!texts.size) return;
      const scan = (root) => root.querySelectorAll?.("img[alt]").forEach(relabel);
      scan(document.body);
      new MutationObserver((records) => records.forEach((r) => {
        if (r.type === "attributes") relabel(r.target);
        else r.addedNodes.forEach((n) => { if (n.nodeName === "IMG") relabel(n); else scan(n); });
      })).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ["src", "alt"]});
    }).catch((e) => console.warn("Kiln: the template cards keep their file names:", e.message));
  },
});
