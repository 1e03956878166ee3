// The imagesearch page: one query image (dropped, picked, pasted, or a gallery
// image for "more like this") searched through POST /api/search. The search
// state lives in the URL, so a link to a gallery image's search shows the same
// results. Every name is shown with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["collection", "top_k", "min_score", "query_expansion", "rerank"];
let info = { collections: [], max_image_bytes: null, gallery: false };
let query = null;      // {file: File} or {gallery: name}
let last = null;       // the last answer, for the JSON download

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function thumbUrl(name) {
  return "/thumbs/" + name.split("/").map(encodeURIComponent).join("/");
}

function buildFilters(selected) {
  const box = $("filters");
  box.replaceChildren();
  const coll = info.collections.find((c) => c.name === $("collection").value);
  for (const [key, values] of Object.entries(coll ? coll.attributes : {})) {
    const label = document.createElement("label");
    label.append(key + " ");
    const select = document.createElement("select");
    select.dataset.key = key;
    const wanted = selected.filter((f) => f.key === key).map((f) => f.value);
    for (const value of ["", ...new Set([...values, ...wanted])]) {
      const option = new Option(value === "" ? "any" : value, value);
      option.selected = wanted.includes(value);
      select.append(option);
    }
    label.append(select);
    box.append(label);
  }
}

function formParams() {
  const params = new URLSearchParams();
  for (const id of FIELDS) if ($(id).value !== "") params.set(id, $(id).value);
  for (const select of $("filters").querySelectorAll("select")) {
    if (select.value !== "") params.append("filter", `${select.dataset.key}=${select.value}`);
  }
  return params;
}

function restore(url) {
  const params = new URL(url).searchParams;
  const coll = params.get("collection");
  if (coll && ![...$("collection").options].some((o) => o.value === coll)) {
    $("collection").append(new Option(coll, coll));  // gone, or a typo: searching says so
  }
  for (const id of FIELDS) if (params.has(id)) $(id).value = params.get(id);
  const filters = params.getAll("filter").map((f) => {
    const at = f.indexOf("=");
    return { key: f.slice(0, at), value: f.slice(at + 1) };
  });
  buildFilters(filters);
  return params.get("gallery");
}

function showQuery() {
  const img = $("query-img");
  if (query && query.file) img.src = URL.createObjectURL(query.file);
  else if (query && info.gallery) img.src = thumbUrl(query.gallery);
  img.alt = query ? (query.file ? query.file.name : query.gallery) : "";
  img.hidden = !query;
  $("drop-text").hidden = Boolean(query);
}

function render(answer) {
  const list = $("results");
  list.replaceChildren();
  for (const m of answer.matches) {
    const card = $("card").content.firstElementChild.cloneNode(true);
    const img = card.querySelector(".thumb");
    if (info.gallery) { img.src = thumbUrl(m.name); img.alt = m.name; } else img.remove();
    card.querySelector(".rank").textContent = `#${m.rank}`;
    card.querySelector(".score").textContent = m.score.toFixed(3);
    card.querySelector(".name").textContent = m.name;
    const attrs = card.querySelector(".attrs");
    const keys = (info.collections.find((c) => c.name === answer.collection) || { attributes: {} }).attributes;
    for (const [key, value] of Object.entries(m.attributes)) {
      if (!(key in keys)) continue;  // the index's own file keys (sha256, size, mtime) stay out
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = key;
      dd.textContent = value;
      attrs.append(dt, dd);
    }
    const more = card.querySelector(".more");
    if (info.gallery) more.addEventListener("click", () => search({ gallery: m.name }, "push"));
    else more.remove();
    list.append(card);
  }
}

async function search(source, history = "replace") {
  query = source;
  showQuery();
  if (query.file && info.max_image_bytes && query.file.size > info.max_image_bytes) {
    say(`${query.file.name} is ${query.file.size.toLocaleString()} bytes, over the limit of ` +
        `${info.max_image_bytes.toLocaleString()} bytes: pick a smaller image.`, true);
    return;
  }
  const params = formParams();
  const body = new FormData();
  if (query.file) body.append("image", query.file, query.file.name || "pasted image");
  else body.append("gallery_name", query.gallery);
  const shown = new URLSearchParams(params);
  if (query.gallery) shown.set("gallery", query.gallery);
  const url = "?" + shown.toString();
  if (history === "push") window.history.pushState(null, "", url);
  else if (history === "replace") window.history.replaceState(null, "", url);
  say("Searching...");
  $("again").disabled = false;
  let response, answer;
  try {
    response = await fetch("/api/search?" + params.toString(), { method: "POST", body });
    answer = await response.json();
  } catch (err) {
    say("The page's server did not answer: is `imagesearch web` still running? Reload once it is.", true);
    return;
  }
  if (!response.ok) {
    last = null;
    $("download").disabled = true;
    $("results").replaceChildren();
    say(`Error ${response.status}: ${answer.error}`, true);
    return;
  }
  last = answer;
  $("download").disabled = false;
  render(answer);
  say(`${answer.matches.length} matches in ${answer.collection} for ${answer.query}` +
      (answer.matches.length ? "" : " (filters or the minimum score left none)"));
}

function download() {
  // The CLI's results format: {query file: [ranked gallery files]}.
  const data = { [last.query]: last.matches.map((m) => m.name) };
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(data, null, 1) + "\n"], { type: "application/json" }));
  a.download = "results.json";
  a.click();
}

function pick(files) {
  const file = [...files].find((f) => f.type.startsWith("image/")) || files[0];
  if (file) search({ file });
}

async function start() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("file").addEventListener("change", () => pick($("file").files));
  document.addEventListener("paste", (e) => pick(e.clipboardData.files));
  $("collection").addEventListener("change", () => buildFilters([]));
  $("search").addEventListener("submit", (e) => { e.preventDefault(); if (query) search(query); });
  $("download").addEventListener("click", download);
  window.addEventListener("popstate", () => {
    const gallery = restore(window.location.href);
    if (gallery) search({ gallery }, "none");
  });
  let response;
  try {
    response = await fetch("/api/collections");
    const answer = await response.json();
    if (!response.ok) throw new Error(`Error ${response.status}: ${answer.error}`);
    info = answer;
  } catch (err) {
    say(`Cannot list the collections. ${err.message}`, true);
    return;
  }
  for (const c of info.collections) $("collection").append(new Option(
    c.alias_of ? `${c.name} → ${c.alias_of} (${c.count})` : `${c.name} (${c.count})`, c.name));
  for (const r of info.rerank) $("rerank").append(new Option(r, r));
  $("top_k").max = info.max_top_k;
  if (!info.collections.length) say("The ranker holds no collection yet: index a gallery first " +
                                    "(imagesearch index GALLERY_DIR --collection NAME).", true);
  const gallery = restore(window.location.href);
  if (gallery) search({ gallery }, "none");
}

start();
