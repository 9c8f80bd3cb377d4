// The storefront: plain DOM, no build step. Every call goes to the same origin's JSON API.
"use strict";
const $ = (id) => document.getElementById(id);
const filterSelects = () => Array.from(document.querySelectorAll("select[data-filter]"));

function filterParams(params) {
  for (const select of filterSelects()) {
    if (select.value && !select.disabled) params.set(select.dataset.filter, select.value);
  }
  return params;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function render(data, clientMs, what) {
  showError("");
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of data.results) {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = hit.image;
    img.alt = hit.title;
    img.loading = "lazy";
    const body = document.createElement("div");
    body.className = "body";
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = hit.title;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = [hit.articleType, hit.baseColour, hit.gender].filter(Boolean).join(" · ");
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = "score " + hit.score.toFixed(3);
    const more = document.createElement("button");
    more.className = "more";
    more.type = "button";
    more.textContent = "More like this";
    more.addEventListener("click", () => similar(hit.id, hit.title));
    body.append(title, meta, score, more);
    card.append(img, body);
    grid.append(card);
  }
  $("model-version").textContent = data.model.label;
  let status = `${data.count} results for ${what} · server ${data.latency_ms.toFixed(1)} ms · page ${clientMs.toFixed(0)} ms · model ${data.model.label}`;
  if (data.note) status += " · " + data.note;
  $("status").textContent = status;
  document.body.dataset.state = "results";
}

async function call(url, options, what) {
  const started = performance.now();
  document.body.dataset.state = "loading";
  try {
    const response = await fetch(url, options);
    const data = await response.json();
    if (!response.ok) {
      const err = data.error || {};
      showError((err.field ? err.field + ": " : "") + (err.message || response.statusText));
      document.body.dataset.state = "error";
      return;
    }
    render(data, performance.now() - started, what);
  } catch (e) {
    showError("request failed: " + e);
    document.body.dataset.state = "error";
  }
}

function search(event) {
  if (event) event.preventDefault();
  const q = $("q").value.trim();
  if (!q) { showError("q: type some words to search for"); return; }
  const params = filterParams(new URLSearchParams({ q }));
  call("/search?" + params, {}, `"${q}"`);
}

function similar(id, title) {
  call(`/similar/${encodeURIComponent(id)}?` + filterParams(new URLSearchParams()), {}, `more like "${title}"`);
}

function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  call("/search/image?" + filterParams(new URLSearchParams()), { method: "POST", body: form }, `image ${file.name}`);
}

async function loadFacets() {
  try {
    const response = await fetch("/facets");
    if (!response.ok) return;
    const data = await response.json();
    $("model-version").textContent = data.model.label;
    for (const select of filterSelects()) {
      const values = data.filters[select.dataset.filter];
      if (!values) { select.disabled = true; select.hidden = true; continue; }
      for (const value of values) select.append(new Option(value, value));
    }
  } catch (e) { /* the page still searches without filters */ }
}

$("search-form").addEventListener("submit", search);
$("upload").addEventListener("change", upload);
loadFacets();
