// aioproxy dashboard: JSON forms with the CSRF token, charts (uPlot), the playground stream.
"use strict";

const csrfToken = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

function fieldValue(input, emptyAs) {
  const raw = input.value.trim();
  const type = input.dataset.type;
  if (type === "bool") return raw === "true";
  if (raw === "") return emptyAs;
  if (type === "number") return Number(raw);
  if (type === "list") return raw.split(",").map((s) => s.trim()).filter(Boolean);
  if (type === "time") return new Date(raw).toISOString();
  return raw;
}

async function submitJson(form) {
  const error = form.querySelector(".error");
  if (error) error.textContent = "";
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
  const emptyAs = form.dataset.empty === "null" ? null : undefined;
  const body = {};
  let token = csrfToken();
  for (const input of form.querySelectorAll("input[name], select[name], textarea[name]")) {
    if (input.name === "csrf") { token = input.value; continue; }
    const value = fieldValue(input, emptyAs);
    if (value !== undefined) body[input.name] = value;
  }
  const method = (form.getAttribute("method") || "post").toUpperCase();
  const response = await fetch(form.action, {
    method,
    headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
    body: method === "DELETE" ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = answer.error?.message || `Failed (${response.status})`;
    if (error) error.textContent = message; else window.alert(message);
    return;
  }
  if (answer.key) return showSecret(answer.key);
  if (answer.redirect) window.location.assign(answer.redirect);
  else window.location.reload();
}

function showSecret(secret) {
  const box = document.getElementById("secret");
  document.getElementById("secret-value").textContent = secret;
  box.hidden = false;
  document.getElementById("new-key").reset();
}

function setUpForms() {
  for (const form of document.querySelectorAll("form[data-json]")) {
    form.addEventListener("submit", (event) => { event.preventDefault(); submitJson(form); });
  }
  document.getElementById("copy-secret")?.addEventListener("click", () => {
    navigator.clipboard?.writeText(document.getElementById("secret-value").textContent);
  });
  document.getElementById("secret-done")?.addEventListener("click", () => window.location.reload());
}

// -- charts ----------------------------------------------------------------------------------

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];

function chartSize(element) {
  return { width: Math.max(280, element.clientWidth || 400), height: 180 };
}

function lineChart(element, times, named) {
  const series = [{}, ...Object.keys(named).map((label, i) => ({
    label, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: true,
  }))];
  // eslint-disable-next-line no-undef
  return new uPlot({ ...chartSize(element), series }, [times, ...Object.values(named)], element);
}

function barChart(element, labels, values) {
  const xs = labels.map((_, i) => i);
  const opts = {
    ...chartSize(element),
    scales: { x: { time: false, range: [-0.5, Math.max(0.5, labels.length - 0.5)] } },
    axes: [
      { values: (_, ticks) => ticks.map((t) => labels[t] ?? "") },
      { values: (_, ticks) => ticks.map((v) => "$" + Number(v.toPrecision(3))) },
    ],
    series: [{ label: "" }, { label: "USD", fill: COLOURS[0], stroke: COLOURS[0],
      paths: uPlot.paths.bars({ size: [0.6, 80] }), points: { show: false } }],
  };
  // eslint-disable-next-line no-undef
  return new uPlot(opts, [xs, values], element);
}

function readJson(id) {
  const element = document.getElementById(id);
  return element ? JSON.parse(element.textContent) : null;
}

function setUpCharts() {
  if (typeof uPlot === "undefined") return;
  const overview = readJson("overview-data");
  if (overview) {
    for (const element of document.querySelectorAll(".chart[data-series]")) {
      const named = {};
      for (const name of element.dataset.series.split(",")) named[name] = overview[name];
      lineChart(element, overview.times, named);
    }
  }
  const spend = readJson("spend-data");
  if (spend && spend.labels.length) {
    barChart(document.getElementById("spend-chart"), spend.labels, spend.cost);
  }
}

// -- playground --------------------------------------------------------------------------------

async function streamChat(form) {
  const answer = document.getElementById("answer");
  const error = form.querySelector(".error");
  answer.textContent = "";
  error.textContent = "";
  const response = await fetch(form.action, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
    body: JSON.stringify({
      model: form.elements.model.value,
      messages: [{ role: "user", content: form.elements.message.value }],
      stream: true,
    }),
    credentials: "same-origin",
  });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    error.textContent = body.error?.message || `Failed (${response.status})`;
    return;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { answer.dataset.done = "true"; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) { error.textContent = chunk.error.message; continue; }
        answer.textContent += chunk.choices?.[0]?.delta?.content || "";
      }
    }
  }
  answer.dataset.done = "true";
}

function setUpPlayground() {
  const form = document.getElementById("playground");
  if (!form) return;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    delete document.getElementById("answer").dataset.done;
    streamChat(form).catch((e) => { form.querySelector(".error").textContent = String(e); });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpForms();
  setUpCharts();
  setUpPlayground();
  document.body.dataset.ready = "true";
});
