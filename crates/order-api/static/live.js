// orderflow's live page. Reads, with the admin key the person gives it:
// GET /events (every order's steps, retries and dead letters, as SSE),
// GET /dashboard/queues (queue depths each second, as SSE),
// GET /dashboard/orders (notified and audited, for the orders shown) and
// GET /dashboard/dead-letters. Everything from the server is put on the page
// as text, never as markup.
"use strict";

const WINDOW_MS = 5 * 60 * 1000;
const RATE_WINDOW_MS = 5000;
const SHOWN_ORDERS = 30;
const COLOURS = ["#2f6fdf", "#e8590c", "#2b8a3e", "#ae3ec9", "#f08c00", "#0c8599", "#c92a2a", "#5c940d", "#495057", "#d6336c"];

const state = {
  key: sessionStorage.getItem("orderflow-key") || "",
  generation: 0,
  // Ends the streams of the previous connection (each holds one of the
  // key's stream slots).
  streams: new AbortController(),
  samples: [], // {at, depths: Map(queue -> ready)}
  peak: 0,
  orders: new Map(), // id -> {row, lane, steps, standing}
  accepted: [],
  decided: [],
  processors: new Map(),
  colours: new Map(),
  waitingExpress: new Map(), // express order id -> its demo line
};

const $ = (selector) => document.querySelector(selector);

function el(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function say(text) {
  const line = el("li", {}, text);
  $("#demo-output").prepend(line);
  return line;
}

async function api(method, path, body, headers = {}) {
  const init = { method, headers: { Authorization: `Bearer ${state.key}`, ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  return { status: response.status, headers: response.headers, json };
}

function errorText(answer) {
  const error = answer.json && answer.json.error;
  return error ? `${answer.status} ${error.code}: ${error.message}` : `HTTP ${answer.status}`;
}

// Server-Sent Events over fetch (EventSource cannot send the key), read
// until the server or the page ends them; then again after a second.
async function follow(path, onEvent, generation) {
  const signal = state.streams.signal;
  while (generation === state.generation) {
    try {
      const response = await fetch(path, { signal, headers: { Authorization: `Bearer ${state.key}`, Accept: "text/event-stream" } });
      if (!response.ok) {
        const answer = { status: response.status, json: await response.json().catch(() => null) };
        setConnection("disconnected", `${path}: ${errorText(answer)}`);
        if (response.status === 401 || response.status === 403) return;
      } else {
        setConnection("live", "live");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done || generation !== state.generation) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let name = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) name = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            }
            if (data.length) onEvent(name, data.join("\n"));
          }
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      setConnection("disconnected", `${path}: ${error.message}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function setConnection(which, text) {
  const node = $("#connection");
  node.dataset.state = which;
  node.textContent = text;
}

// --- Orders and their journeys -------------------------------------------

function orderEntry(id, lane) {
  let entry = state.orders.get(id);
  if (entry) return entry;
  const row = el("tr", { "data-order": id, "data-stage": "accepted" });
  row.append(el("td", {}, id.slice(0, 8)), el("td", { class: "lane" }, lane || ""), el("td", { class: "journey" }));
  $("#orders tbody").prepend(row);
  entry = { row, accepted: false, processedBy: null, outcome: null, reason: null, failures: [], notified: false, audited: false, standing: null };
  state.orders.set(id, entry);
  while (state.orders.size > SHOWN_ORDERS) {
    const [oldest, old] = state.orders.entries().next().value;
    old.row.remove();
    state.orders.delete(oldest);
  }
  return entry;
}

// The journey in its order, whatever order the news came in: accepted →
// taken by a processor → retries and dead letters → processed or rejected
// → notified, audited.
function render(entry) {
  const steps = [];
  if (entry.accepted) steps.push(["accepted", "ok"]);
  if (entry.processedBy) steps.push([`taken by ${entry.processedBy}`, "ok"]);
  for (const failure of entry.failures) steps.push(failure);
  if (entry.outcome === "processed") steps.push(["processed", "ok"]);
  if (entry.outcome === "rejected") steps.push([`rejected: ${entry.reason}`, "bad"]);
  if (entry.notified) steps.push(["notified", "ok"]);
  if (entry.audited) steps.push(["audited", "ok"]);
  const journey = entry.row.querySelector(".journey");
  journey.replaceChildren(...steps.map(([text, kind, title]) => {
    const step = el("span", { class: `step ${kind}` }, text);
    if (title) step.title = title;
    return step;
  }));
  const dead = entry.failures.length && entry.failures[entry.failures.length - 1][0].startsWith("dead letter");
  entry.row.dataset.stage = entry.notified && entry.audited ? "notified" : entry.outcome || (dead ? "dead_lettered" : "accepted");
}

function onLiveEvent(name, data) {
  let event;
  try { event = JSON.parse(data); } catch { return; }
  if (name === "lagged") return;
  const now = Date.now();
  const entry = orderEntry(event.order_id, event.lane);
  if (event.lane) entry.row.querySelector(".lane").textContent = event.lane;
  if (name === "accepted") {
    state.accepted.push(now);
    entry.accepted = true;
  } else if (name === "processed" || name === "rejected") {
    state.decided.push(now);
    if (event.processed_by) state.processors.set(event.processed_by, (state.processors.get(event.processed_by) || 0) + 1);
    entry.accepted = true;
    entry.processedBy = event.processed_by || entry.processedBy;
    entry.outcome = name;
    entry.reason = event.reason;
    const demo = state.waitingExpress.get(event.order_id);
    if (demo) {
      const standard = [...latestDepths().entries()].filter(([q]) => q.endsWith("orders.standard")).reduce((n, [, d]) => n + d, 0);
      demo.textContent = `Express order ${event.order_id.slice(0, 8)} ${name} while ${standard} standard orders were still queued: it overtook them.`;
      demo.dataset.overtook = String(standard);
      state.waitingExpress.delete(event.order_id);
    }
  } else if (name === "retrying") {
    entry.failures.push(["retrying", "retry", event.reason]);
    entry.row.dataset.retried = "true";
  } else if (name === "held") {
    markHeld(entry, event.reason);
    refreshDeadLetters();
  } else if (name === "dead_lettered") {
    entry.failures.push([`dead letter: ${event.reason}`, "bad"]);
    refreshDeadLetters();
  } else if (name === "notified") {
    entry.notified = true;
  }
  render(entry);
}

// Notified and audited are written by the subscribers to Postgres; ask for
// the orders on the page that are not yet both. What the live stream missed
// (a page that fell behind is dropped and reconnects) comes from here too.
async function refreshStandings(generation) {
  while (generation === state.generation) {
    const ids = [...state.orders.entries()]
      .filter(([, e]) => !(e.notified && e.audited))
      .map(([id]) => id);
    if (ids.length) {
      try {
        const answer = await api("GET", `/dashboard/orders?ids=${ids.join(",")}`);
        if (answer.status === 200) for (const standing of answer.json) applyStanding(standing);
      } catch { /* shown by the streams' state */ }
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// An order whose message waits in the dead letters: one step saying why,
// whether the live event or the standings told first.
function markHeld(entry, reason) {
  const last = entry.failures[entry.failures.length - 1];
  if (!(last && last[0].startsWith("dead letter"))) entry.failures.push([`dead letter: ${reason}`, "bad"]);
}

function applyStanding(standing) {
  const entry = state.orders.get(standing.id);
  if (!entry) return;
  entry.accepted = true;
  entry.row.querySelector(".lane").textContent = standing.lane;
  if (standing.status === "processed" || standing.status === "rejected") {
    entry.outcome = standing.status;
    entry.reason = standing.reason;
    entry.processedBy = standing.processed_by || entry.processedBy;
  } else if (standing.status === "held") {
    markHeld(entry, standing.reason);
  }
  entry.notified = entry.notified || standing.notified;
  entry.audited = entry.audited || standing.audited;
  render(entry);
}

// --- Queue depths ----------------------------------------------------------

function latestDepths() {
  const last = state.samples[state.samples.length - 1];
  return last ? last.depths : new Map();
}

function colourOf(queue) {
  if (!state.colours.has(queue)) state.colours.set(queue, COLOURS[state.colours.size % COLOURS.length]);
  return state.colours.get(queue);
}

// Which way orders and events travel (WORK_QUEUE, EVENT_BUS).
function showTransports(transports) {
  if (!transports) return;
  const via = (t) => (t === "postgres" ? "Postgres" : "RabbitMQ");
  $("#transports").textContent =
    `watching: orders via ${via(transports.work_queue)}, events via ${via(transports.event_bus)}`;
}

function onQueues(name, data) {
  if (name !== "queues" && name !== "broker_unavailable") return;
  const sample = JSON.parse(data);
  showTransports(sample.transports);
  if (name === "broker_unavailable") {
    $("#broker-state").textContent = "· RabbitMQ unreachable: its depths paused";
    if (!sample.queues.length) return;
  } else {
    $("#broker-state").textContent = "";
  }
  const depths = new Map(sample.queues.map((q) => [q.name, q.messages]));
  const at = Date.now();
  state.samples.push({ at, depths });
  while (state.samples.length && state.samples[0].at < at - WINDOW_MS) state.samples.shift();
  // Dead letters wait for a person, not a consumer: not part of the backlog.
  const total = sample.queues.filter((q) => !q.name.endsWith(".dead")).reduce((n, q) => n + q.messages, 0);
  state.peak = Math.max(state.peak, total);
  $("#depth-total").textContent = String(total);
  $("#depth-peak").textContent = String(state.peak);
  const body = $("#queues tbody");
  for (const queue of sample.queues) {
    let row = body.querySelector(`tr[data-queue="${CSS.escape(queue.name)}"]`);
    if (!row) {
      row = el("tr", { "data-queue": queue.name });
      const label = el("td");
      label.append(el("span", { class: "swatch" }), document.createTextNode(queue.name));
      label.firstChild.style.background = colourOf(queue.name);
      row.append(label, el("td", { class: "num depth" }), el("td", { class: "num consumers" }));
      body.append(row);
    }
    row.querySelector(".depth").textContent = String(queue.messages);
    row.querySelector(".consumers").textContent = String(queue.consumers);
  }
  drawChart();
  updateRates();
}

function drawChart() {
  const canvas = $("#depth-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const now = Date.now();
  const max = Math.max(10, ...state.samples.flatMap((s) => [...s.depths.values()]));
  const x = (at) => width - ((now - at) / WINDOW_MS) * width;
  const y = (depth) => height - 16 - (depth / max) * (height - 28);
  g.fillStyle = "#7b8794";
  g.font = "11px system-ui, sans-serif";
  g.fillText(String(max), 4, 12);
  g.fillText("0", 4, height - 4);
  g.fillText("now", width - 24, height - 4);
  g.fillText("−5 min", 28, height - 4);
  for (const queue of state.colours.keys()) {
    g.strokeStyle = colourOf(queue);
    g.lineWidth = 2;
    g.beginPath();
    let started = false;
    for (const sample of state.samples) {
      const depth = sample.depths.get(queue);
      if (depth === undefined) continue;
      if (started) g.lineTo(x(sample.at), y(depth));
      else { g.moveTo(x(sample.at), y(depth)); started = true; }
    }
    g.stroke();
  }
}

function updateRates() {
  const since = Date.now() - RATE_WINDOW_MS;
  for (const list of [state.accepted, state.decided]) while (list.length && list[0] < since) list.shift();
  $("#accepted-rate").textContent = (state.accepted.length / (RATE_WINDOW_MS / 1000)).toFixed(1);
  $("#decided-rate").textContent = (state.decided.length / (RATE_WINDOW_MS / 1000)).toFixed(1);
  const body = $("#processors tbody");
  for (const [name, count] of [...state.processors.entries()].sort()) {
    let row = body.querySelector(`tr[data-processor="${CSS.escape(name)}"]`);
    if (!row) {
      row = el("tr", { "data-processor": name });
      row.append(el("td", {}, name), el("td", { class: "num count" }));
      body.append(row);
    }
    row.querySelector(".count").textContent = String(count);
  }
}

// --- Dead letters ----------------------------------------------------------

// A listing takes every letter off the queue and gives it back, so there is
// one at a time, and the asks that come in meanwhile share one more after it.
// The page asks when it connects, when a dead letter is announced, after a
// replay, and every 30 s (for letters the broker made itself).
let listing = null;
let listAgain = false;
function refreshDeadLetters() {
  if (listing) {
    listAgain = true;
    return listing;
  }
  listing = listDeadLetters().finally(() => {
    listing = null;
    if (listAgain) {
      listAgain = false;
      refreshDeadLetters();
    }
  });
  return listing;
}

async function listDeadLetters() {
  if (!state.key) return;
  const answer = await api("GET", "/dashboard/dead-letters").catch(() => null);
  if (!answer || answer.status !== 200) return;
  const body = $("#dead-letters tbody");
  body.replaceChildren();
  for (const letter of answer.json) {
    const row = el("tr", { "data-message-id": letter.message_id, "data-order": letter.order_id });
    const replay = el("button", { class: "replay" }, "Replay");
    replay.addEventListener("click", () => replayLetter(letter));
    const cell = el("td");
    cell.append(replay);
    row.append(el("td", {}, letter.order_id.slice(0, 8)), el("td", {}, letter.reason), el("td", { class: "num" }, String(letter.attempts)), el("td", {}, letter.service), cell);
    body.append(row);
  }
  $("#dead-empty").hidden = answer.json.length > 0;
}

async function replayLetter(letter) {
  const answer = await api("POST", "/dashboard/dead-letters/replay", { message_id: letter.message_id });
  if (answer.status === 200) {
    say(`Dead letter of order ${letter.order_id.slice(0, 8)} replayed onto ${letter.queue}: it keeps its message id, so if it had been processed the processor's dedupe skips it.`);
    const entry = state.orders.get(letter.order_id);
    if (entry) {
      entry.failures.push(["replayed", "retry"]);
      render(entry);
    }
  } else {
    say(`Replay failed: ${errorText(answer)}`);
  }
  refreshDeadLetters();
}

// --- The demos -------------------------------------------------------------

function order(customer, extra = {}) {
  return { customer_id: customer, email: "ada@example.com", items: [{ sku: "WIDGET", quantity: 1 }], ...extra };
}

async function place(body, headers = {}) {
  const answer = await api("POST", "/orders", body, headers);
  if (answer.status !== 202) throw new Error(errorText(answer));
  orderEntry(answer.json.id, answer.json.lane);
  return answer;
}

async function demo(run) {
  try { await run(); } catch (error) { say(`Failed: ${error.message}`); }
}

const demos = {
  place: async () => {
    const answer = await place(order("c-live"));
    say(`Order ${answer.json.id.slice(0, 8)} accepted (202): one processor of the pool takes it from the work queue; its event fans out to notification and logging.`);
  },
  burst: async () => {
    const line = say("Placing 1,000 orders at once…");
    const answer = await api("POST", "/dashboard/burst", { count: 1000 });
    if (answer.status !== 200) throw new Error(errorText(answer));
    line.textContent = `Burst: ${answer.json.accepted} orders accepted at once. Watch orders.standard rise, then drain at the processors' pace: the queue levels the load.`;
  },
  express: async () => {
    const line = say("Queueing 500 standard orders, then one express order…");
    const backlog = await api("POST", "/dashboard/burst", { count: 500 });
    if (backlog.status !== 200) throw new Error(errorText(backlog));
    const answer = await place(order("c-express", { express: true }));
    line.textContent = `Express order ${answer.json.id.slice(0, 8)} placed behind ${backlog.json.accepted} standard orders…`;
    state.waitingExpress.set(answer.json.id, line);
  },
  flaky: async () => {
    const answer = await place(order("flaky-2"));
    say(`Flaky order ${answer.json.id.slice(0, 8)}: its payment fails twice; each failure parks it in a retry queue for a growing delay, then it is processed.`);
  },
  doomed: async () => {
    const answer = await place(order("doomed"));
    say(`Doomed order ${answer.json.id.slice(0, 8)}: every attempt fails; after the last retry it is dead-lettered with its reason (see Dead letters).`);
  },
  twice: async () => {
    const key = `live-${crypto.randomUUID()}`;
    const body = order("c-twice");
    const first = await place(body, { "Idempotency-Key": key });
    const second = await api("POST", "/orders", body, { "Idempotency-Key": key });
    const replayed = second.headers.get("Idempotent-Replayed") === "true";
    const same = second.json && second.json.id === first.json.id;
    const line = say(`Same request twice with Idempotency-Key ${key.slice(0, 13)}…: first ${first.status} order ${first.json.id.slice(0, 8)}; second ${second.status} order ${second.json ? second.json.id.slice(0, 8) : "?"}${replayed ? ", Idempotent-Replayed: true" : ""}. ${same && replayed ? "One order: the second answer is the first one again." : "NOT the same order!"}`);
    line.dataset.idempotent = String(same && replayed);
  },
};

function connect() {
  state.streams.abort();
  state.streams = new AbortController();
  state.generation += 1;
  const generation = state.generation;
  follow("/events", onLiveEvent, generation);
  follow("/dashboard/queues", onQueues, generation);
  refreshStandings(generation);
  refreshDeadLetters();
}

window.addEventListener("DOMContentLoaded", () => {
  $("#key").value = state.key;
  $("#connect").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("#key").value.trim();
    sessionStorage.setItem("orderflow-key", state.key);
    connect();
  });
  for (const [id, run] of Object.entries(demos)) $(`#${id}`).addEventListener("click", () => demo(run));
  setInterval(updateRates, 1000);
  setInterval(refreshDeadLetters, 30000);
  if (state.key) connect();
});
