// The fleet page: polls /api/fleet every two seconds and redraws with textContent only (an
// agent's words never become markup).
"use strict";

const REFRESH_MS = 2000;

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  return Math.floor(s / 3600) + "h ago";
}

// An agent's SSH certificate: the time it has left, flagged once renewal is overdue.
function certLeft(c) {
  if (!c) return ["-", ""];
  const s = c.valid_before_unix_s - Math.floor(Date.now() / 1000);
  if (s <= 0) return ["expired", "down"];
  const left = s >= 86400 ? Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h"
    : s >= 3600 ? Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m"
    : Math.floor(s / 60) + "m " + (s % 60) + "s";
  return c.expiring ? ["expiring: " + left, "down"] : [left + " left", ""];
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(id, items, draw) {
  const body = document.getElementById(id);
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    draw(tr, item);
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    cell(tr, "none", "muted").colSpan = body.parentElement.tHead.rows[0].cells.length;
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function draw(v) {
  const online = v.agents.filter((a) => a.online).length;
  document.getElementById("summary").textContent =
    `version ${v.version} · ${online}/${v.agents.length} agents online · ${v.firing.length} alerts firing`;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();

  const c = v.coordinators;
  document.getElementById("standing").textContent =
    `store ${c.store} · this page from ${c.this} (${c.standing}) · leader: ${c.leader || "none: an election is under way"}`;
  fill("coordinators", c.coordinators, (tr, k) => {
    tr.dataset.coordinator = k.name;
    cell(tr, k.name);
    const leads = c.leader === k.name;
    cell(tr, leads ? "leader" : "follower", leads ? "up" : "");
    cell(tr, String(c.agents[k.name] || 0));
    cell(tr, k.admin);
    cell(tr, ago(k.started_unix_ms));
  });

  fill("endpoints", v.endpoints, (tr, e) => {
    tr.dataset.endpoint = e.endpoint;
    cell(tr, e.group);
    cell(tr, e.endpoint + (e.active ? " (active)" : "") + (e.drained ? " (drained)" : ""));
    cell(tr, e.degraded ? e.state + ", degraded" : e.state, e.degraded ? "degraded" : e.state);
    cell(tr, e.degraded ? "degraded: " + e.degraded : e.last_detail || "");
    cell(tr, e.agents.join(", "));
  });

  fill("agents", v.agents, (tr, a) => {
    const s = a;
    tr.dataset.agent = s.id;
    cell(tr, s.id);
    const state = s.revoked ? "revoked" : s.online ? "online" : s.connected ? "silent" : "offline";
    cell(tr, state, s.online ? "online" : "offline");
    const where = a.placement.map((p) =>
      p.profile + " → " + p.endpoint + (p.follows ? "" : " (diverged" + (p.reason ? ": " + p.reason : "") + ")"));
    cell(tr, where.join("; ") || "-", a.placement.some((p) => !p.follows) ? "diverged" : "");
    cell(tr, `${s.tunnels_up}/${s.tunnels} up`, s.tunnels_up < s.tunnels ? "down" : "up");
    cell(tr, s.applied_version == null ? "-" : String(s.applied_version) + (s.applied_ok ? "" : " (failed)"));
    cell(tr, ago(s.last_seen_unix_ms));
    const [cert, certClass] = certLeft(s.ssh_cert);
    cell(tr, cert, certClass).dataset.cert = "";
  });

  fill("firing", v.firing, (tr, a) => {
    tr.dataset.alert = a.kind;
    cell(tr, a.kind);
    cell(tr, a.severity, a.severity);
    cell(tr, a.subject);
    cell(tr, a.summary);
    cell(tr, ago(a.fired_unix_ms));
  });
  fill("recent", v.recent, (tr, a) => {
    cell(tr, a.kind);
    cell(tr, a.subject);
    cell(tr, ago(a.fired_unix_ms));
    cell(tr, ago(a.resolved_unix_ms));
  });

  const section = document.getElementById("rollout-section");
  const r = v.rollout;
  section.hidden = !r;
  if (r) {
    document.getElementById("rollout").textContent =
      `version ${r.version} (${r.state}): ${r.what}, by ${r.started_by}, ${ago(r.started_unix_ms).replace(" ago", "")} ago`;
    fill("stages", r.stages, (tr, s) => {
      const i = r.stages.indexOf(s);
      const state = s.passed_unix_ms ? "passed" : i === r.current ? r.state : "waiting";
      cell(tr, s.name);
      cell(tr, state, state);
      cell(tr, s.agents.join(", "));
    });
    const reasons = Object.entries(r.reasons).map(([agent, why]) => {
      const li = document.createElement("li");
      li.textContent = agent + ": " + why;
      return li;
    });
    document.getElementById("rollout-reasons").replaceChildren(...reasons);
  }
}

async function refresh() {
  try {
    const resp = await fetch("/api/fleet", { credentials: "same-origin", cache: "no-store" });
    if (resp.status === 401) {
      window.location.assign("/login");
      return;
    }
    if (resp.ok) {
      const v = await resp.json();
      try {
        draw(v);
      } catch (e) {
        document.getElementById("updated").textContent = "cannot show the answer: " + e;
      }
    } else {
      document.getElementById("updated").textContent = "coordinator answered " + resp.status;
    }
  } catch (e) {
    document.getElementById("updated").textContent = "coordinator unreachable: " + e;
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
