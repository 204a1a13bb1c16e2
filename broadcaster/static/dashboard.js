// The broadcaster dashboard: draws the snapshots that dashboard/events streams, one a second.
"use strict";

// Points kept per chart: three minutes of one-second snapshots.
const WINDOW = 180;
const CHARTS = ["connections", "topics", "publish-rate", "delivery-rate", "drop-rate"];
const series = Object.fromEntries(CHARTS.map((name) => [name, []]));
let previous = null;

const total = (value) =>
  typeof value === "number" ? value : Object.values(value || {}).reduce((a, b) => a + b, 0);
const whole = (value) => Math.round(value).toLocaleString("en-US").replaceAll(",", " ");
const rate = (value) => (value >= 100 ? whole(value) : value.toFixed(1));

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function chart(name, value) {
  const points = series[name];
  points.push(value);
  if (points.length > WINDOW) points.shift();
  const svg = document.getElementById("chart-" + name);
  const top = Math.max(1, ...points);
  // The newest point at the right edge; the chart fills from the right as snapshots arrive.
  const start = WINDOW - points.length;
  const coords = points.map((v, i) => `${((start + i) / (WINDOW - 1)) * 100},${40 - (v / top) * 38}`);
  svg.setAttribute("viewBox", "0 0 100 40");
  svg.setAttribute("preserveAspectRatio", "none");
  let line = svg.querySelector("polyline");
  if (!line) {
    line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
  }
  line.setAttribute("points", coords.join(" "));
}

function table(id, head, rows) {
  const element = document.getElementById(id);
  element.replaceChildren();
  const header = element.insertRow();
  for (const [label, numeric] of head) {
    const th = document.createElement("th");
    th.textContent = label;
    if (numeric) th.className = "n";
    header.appendChild(th);
  }
  if (!rows.length) {
    const cell = element.insertRow().insertCell();
    cell.colSpan = head.length;
    cell.className = "empty";
    cell.textContent = "none";
  }
  for (const row of rows) {
    const tr = element.insertRow();
    row.forEach((value, i) => {
      const cell = tr.insertCell();
      cell.textContent = value ?? "–";
      if (head[i][1]) cell.className = "n";
    });
  }
}

function counts(id, label, values) {
  const rows = Object.entries(values || {}).sort((a, b) => b[1] - a[1]);
  table(id, [[label, false], ["count", true]], rows.map(([k, v]) => [k, whole(v)]));
}

function draw(snapshot) {
  const m = snapshot.metrics;
  const now = {
    time: snapshot.time,
    published: total(m.broadcaster_messages_published_total),
    delivered: total(m.broadcaster_messages_sent_total),
    dropped: total(m.broadcaster_messages_dropped_total),
  };
  const seconds = previous ? Math.max(now.time - previous.time, 0.001) : 0;
  const per = (key) => (previous ? Math.max(0, now[key] - previous[key]) / seconds : 0);
  const rates = { publish: per("published"), delivery: per("delivered"), drop: per("dropped") };
  previous = now;

  text("connections", whole(m.broadcaster_connections));
  text("topics", whole(m.broadcaster_topics));
  text("publish-rate", rate(rates.publish));
  text("delivery-rate", rate(rates.delivery));
  text("drop-rate", rate(rates.drop));
  text("published", whole(now.published));
  text("delivered", whole(now.delivered));
  text("dropped", whole(now.dropped));
  chart("connections", m.broadcaster_connections);
  chart("topics", m.broadcaster_topics);
  chart("publish-rate", rates.publish);
  chart("delivery-rate", rates.delivery);
  chart("drop-rate", rates.drop);

  counts("closes", "code", m.broadcaster_connections_closed_total);
  counts("slow-causes", "cause", m.broadcaster_slow_consumer_disconnects_total);
  counts("refusals", "reason", m.broadcaster_refused_total);
  table(
    "slowest",
    [["connection", false], ["peer", false], ["mode", false], ["topics", true],
     ["queued", true], ["queued bytes", true], ["oldest (s)", true], ["sent", true],
     ["dropped", true], ["age (s)", true]],
    snapshot.connections.map((c) => [
      c.conn_id, c.peer, c.mode, c.subscriptions, c.queued_messages, c.queued_bytes,
      c.oldest_queued_seconds, c.sent, c.dropped, Math.round(c.connected_seconds),
    ]),
  );
  const backplane = snapshot.backplane;
  text(
    "backplane",
    backplane === null
      ? "backplane: memory (single node)"
      : `backplane: ${backplane.up ? "up" : "down"}, ${backplane.subscribed} topics, ` +
        `${backplane.links} links` + (backplane.error ? `, last error: ${backplane.error}` : ""),
  );
  document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
}

function connect() {
  const token = new URLSearchParams(location.search).get("token");
  const url = "dashboard/events" + (token ? "?token=" + encodeURIComponent(token) : "");
  const source = new EventSource(url);
  const status = document.getElementById("status");
  source.onopen = () => {
    status.textContent = "live";
    status.className = "live";
  };
  source.onerror = () => {
    status.textContent = "disconnected, retrying…";
    status.className = "down";
  };
  source.onmessage = (event) => draw(JSON.parse(event.data));
}

connect();
