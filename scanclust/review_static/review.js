// The review page: plain DOM, no framework. The server holds the state; every action posts
// one edit and re-renders from the state it answers. Names and paths only ever go into
// textContent and attribute values, never into HTML, so a file name cannot become markup.
"use strict";

const FIRST = 60; // thumbnails first shown per cluster ...
const MORE = 120; // ... and added per "show more"
let state = null;
const shown = new Map(); // cluster -> how many thumbnails are shown
const selected = new Set(); // rows of assignments.csv
let anchor = null; // the row clicked last, for shift-click ranges

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

async function call(path, body) {
  let response, data;
  try {
    response = await fetch(path, body === undefined ? {cache: "no-store"} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    data = await response.json();
  } catch (err) {
    showMessage("the review server does not answer (was it stopped?)");
    return false;
  }
  if (!response.ok) {
    if (state) render(); // back to what is saved: a refused name leaves its input
    showMessage(data.error || `HTTP ${response.status}`);
    return false;
  }
  showMessage("");
  state = data;
  render();
  return true;
}

const edit = (body) => call("api/edit", body);

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function describe(change) {
  const images = change.images ? plural(change.images.length, "image") : "";
  if (change.op === "rename") {
    return change.name ? `name cluster ${change.cluster} “${change.name}”`
      : `clear the name of cluster ${change.cluster}`;
  }
  if (change.op === "merge") return `merge cluster ${change.cluster} into ${change.into}`;
  if (change.op === "move") return `move ${images} to cluster ${change.to}`;
  return `${change.op} ${images}`;
}

function groups() {
  const rows = new Map(state.clusters.map((c) => [c.cluster, []]));
  state.cluster.forEach((c, row) => rows.get(c).push(row));
  const sign = $("order").value === "asc" ? 1 : -1;
  const confidence = state.confidence;
  for (const list of rows.values()) {
    list.sort((a, b) => sign * (confidence[a] - confidence[b]) || a - b);
  }
  return rows;
}

function options(clusters) {
  return clusters.map((c) => el("option", {value: c.cluster, text: `${c.cluster}: ${c.name}`}));
}

function render() {
  const excluded = new Set(state.excluded);
  const rows = groups();
  document.title = `scanclust review: ${state.run}`;
  $("title").textContent = `Review of ${state.run}`;
  $("summary").textContent = `${plural(state.paths.length, "image")} of ${state.folder} in ` +
    `${plural(state.clusters.length, "cluster")}, ${excluded.size} excluded; ` +
    `${plural(state.edits, "edit")} saved in labels.json; model: ${state.stage}`;
  const target = $("target");
  const kept = target.value;
  target.replaceChildren(...options(state.clusters),
    el("option", {value: "new", text: "a new cluster"}));
  if ([...target.options].some((o) => o.value === kept)) target.value = kept;
  $("undo").disabled = !state.last;
  $("undo").textContent = state.last ? `Undo: ${describe(state.last)}` : "Undo";
  $("nav").replaceChildren(...state.clusters.map((c) => el("a",
    {href: `#cluster-${c.cluster}`, text: `${c.name} (${c.size})`})));
  $("clusters").replaceChildren(...state.clusters.map(
    (c) => section(c, rows.get(c.cluster), excluded)));
  updateSelection();
}

function section(info, rows, excluded) {
  const c = info.cluster;
  const name = el("input", {class: "name", value: info.named ? info.name : "",
    placeholder: info.name, maxlength: 100, "aria-label": `name of cluster ${c}`});
  name.addEventListener("keydown", (event) => {
    if (event.key === "Enter") name.blur();
  });
  name.addEventListener("change", () => edit({op: "rename", cluster: c, name: name.value}));
  const into = el("select", {class: "merge", "aria-label": `merge cluster ${c} into`},
    el("option", {value: "", text: "merge into…"}),
    ...options(state.clusters.filter((o) => o.cluster !== c)));
  const mean = rows.length ? rows.reduce((s, r) => s + state.confidence[r], 0) / rows.length : 0;
  const stats = plural(rows.length, "image") + (info.excluded ? `, ${info.excluded} excluded` : "") +
    (rows.length ? `, mean confidence ${mean.toFixed(2)}` : "");
  const grid = el("div", {class: "grid"});
  const more = el("button", {class: "more"});
  const show = (count) => {
    const from = grid.children.length;
    grid.append(...rows.slice(from, count).map((r) => figure(r, rows, excluded)));
    shown.set(c, count);
    const left = rows.length - grid.children.length;
    more.hidden = left <= 0;
    more.textContent = `Show ${Math.min(MORE, left)} more (${left} not shown)`;
  };
  more.addEventListener("click", () => {
    show(grid.children.length + MORE);
    updateSelection();
  });
  show(shown.get(c) || FIRST);
  return el("section", {id: `cluster-${c}`, class: "cluster", "data-cluster": c},
    el("div", {class: "head"},
      el("span", {class: "id", text: `Cluster ${c}`}), name,
      el("span", {class: "muted stats", text: stats}),
      el("button", {class: "select-all", text: "Select shown", onclick: () => {
        for (const fig of grid.children) selected.add(Number(fig.dataset.row));
        updateSelection();
      }}),
      el("span", {class: "merge-box"}, into, " ", el("button", {class: "merge-button",
        text: "Merge", onclick: () => into.value !== "" &&
          edit({op: "merge", cluster: c, into: Number(into.value)})}))),
    rows.length ? grid : el("p", {class: "muted empty",
      text: "No images: move some here, or merge this cluster into another."}), more);
}

function figure(row, rows, excluded) {
  const path = state.paths[row];
  const confidence = state.confidence[row];
  const model = state.model[row];
  const moved = (state.merged[model] ?? model) !== state.cluster[row]; // by hand, not by a merge
  const fig = el("figure", {class: "t" + (excluded.has(row) ? " excluded" : "") +
    (moved ? " moved" : ""), "data-row": row,
    title: `${path}\nconfidence ${confidence.toFixed(3)}; model cluster ${model}` +
      (excluded.has(row) ? "; excluded" : "")},
  el("img", {src: `thumb/${row}`, loading: "lazy", alt: "", width: 96, height: 96,
    onerror: (event) => event.target.classList.add("broken")}),
  el("span", {class: "p", text: confidence.toFixed(2)}),
  el("figcaption", {text: path.split("/").pop()}));
  fig.addEventListener("click", (event) => toggle(row, event.shiftKey, rows));
  fig.addEventListener("dblclick", () => window.open(`image/${row}`, "_blank", "noopener"));
  return fig;
}

function toggle(row, range, rows) {
  if (range && anchor !== null && rows.includes(anchor)) {
    const [i, j] = [rows.indexOf(anchor), rows.indexOf(row)].sort((a, b) => a - b);
    rows.slice(i, j + 1).forEach((r) => selected.add(r));
  } else if (selected.has(row)) {
    selected.delete(row);
  } else {
    selected.add(row);
  }
  anchor = row;
  updateSelection();
}

function updateSelection() {
  for (const fig of document.querySelectorAll("figure.t")) {
    fig.classList.toggle("selected", selected.has(Number(fig.dataset.row)));
  }
  $("selected").textContent = `${selected.size} selected`;
  for (const id of ["move", "exclude", "include", "clear"]) $(id).disabled = !selected.size;
}

async function onSelected(body) {
  if (await edit({...body, rows: [...selected]})) {
    selected.clear();
    updateSelection();
  }
}

$("move").addEventListener("click", () => {
  const to = $("target").value;
  onSelected({op: "move", to: to === "new" ? "new" : Number(to)});
});
$("exclude").addEventListener("click", () => onSelected({op: "exclude"}));
$("include").addEventListener("click", () => onSelected({op: "include"}));
$("clear").addEventListener("click", () => {
  selected.clear();
  updateSelection();
});
$("undo").addEventListener("click", () => call("api/undo", {}));
$("order").addEventListener("change", render);
call("api/state");
