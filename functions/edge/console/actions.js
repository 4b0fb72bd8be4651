// The console's actions on a model (issue #30): roll back, serve a version, train now, apply reviewed
// captures now, export a version as ONNX. The worker may write only under captures/, so each is a request
// it signs with the operator's key and the dispatcher applies (POST /v1/models/{name}/requests); the page
// shows each request's state until the dispatcher's outcome comes back: done, refused or failed, with why.
// Kept apart from console.js (which passes in its helpers) so pages and actions change independently.

const POLL_MS = 1500;
/** How long a provisional refusal is polled for: the dispatcher's CLAIM_IN_PROGRESS_MS. */
const PROVISIONAL_MS = 15 * 60 * 1000;
const KIND_WORDS = {
  rollback: "Roll back",
  promote: "Serve",
  train: "Train now",
  "apply-reviewed": "Apply reviewed captures",
  "export-onnx": "Export ONNX",
};

/**
 * The model's actions and its recent requests. `ui` is console.js's { el, api, fetchWithKey, when };
 * `onServedChanged` runs when a rollback or promotion asked on this page is done (the versions change);
 * an export done only adds its row's download link, so nothing else on the page (a classified image) is lost.
 */
export function actionsPanel(ui, name, data, onServedChanged) {
  const { el } = ui;
  const list = el("div", { id: "requests" });
  const panel = el(
    "div",
    { class: "panel", id: "actions" },
    el("h3", {}, "Actions"),
    el(
      "p",
      { class: "muted" },
      "Carried out by the dispatcher with the bucket's rights (the worker only records what you asked, signed with your key); the outcome appears below.",
    ),
    el(
      "div",
      { class: "decide" },
      el(
        "button",
        {
          type: "button",
          id: "action-rollback",
          disabled: data.history.length === 0,
          title: data.history[0] ? `serve ${data.history[0]} again` : "no earlier version",
        },
        "Roll back",
      ),
      el("button", { type: "button", id: "action-train" }, "Train now"),
      el("button", { type: "button", id: "action-apply-reviewed" }, "Apply reviewed captures now"),
    ),
    list,
  );
  /** Each version row's "look for an export again", registered by versionActions. */
  const exportChecks = new Map();
  const tracker = requestTracker(ui, name, list, (r) => {
    if (r.kind === "export-onnx") exportChecks.get(r.version)?.();
    else onServedChanged();
  });
  panel.querySelector("#action-rollback").addEventListener("click", () => tracker.ask({ kind: "rollback" }));
  panel.querySelector("#action-train").addEventListener("click", () => tracker.ask({ kind: "train" }));
  panel.querySelector("#action-apply-reviewed").addEventListener("click", () => tracker.ask({ kind: "apply-reviewed" }));
  tracker.refresh();
  return { panel, ask: tracker.ask, exportChecks };
}

/** A version's row actions: serve it (unless it is served), export it, and download its export once there is one. */
export function versionActions(ui, name, version, actions) {
  const { el } = ui;
  const ask = actions.ask;
  const cell = el(
    "span",
    { class: "version-actions" },
    version.current ? null : el("button", { type: "button", class: "serve", onclick: () => ask({ kind: "promote", version: version.version }) }, "Serve"),
    el("button", { type: "button", class: "export", onclick: () => ask({ kind: "export-onnx", version: version.version }) }, "Export ONNX"),
  );
  // The link only once the dispatcher stored the file (GET …/export says null until then).
  const check = () =>
    ui
      .api(`/v1/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version.version)}/export`)
      .then(({ onnx }) => {
        if (!onnx) return;
        cell.querySelector("a.download")?.remove();
        cell.append(downloadLink(ui, name, version.version, onnx));
      })
      .catch(() => {});
  actions.exportChecks.set(version.version, check);
  check();
  return cell;
}

/** "Download ONNX": the file needs the key, so it is fetched, then saved from a blob: URL. */
function downloadLink(ui, name, version, info) {
  const { el } = ui;
  const link = el(
    "a",
    { href: "#", class: "download", title: `sha256 ${info.sha256} · opset ${info.opset}` },
    `Download ONNX (${(info.bytes / 1e6).toFixed(1)} MB)`,
  );
  link.addEventListener("click", async (e) => {
    e.preventDefault();
    link.textContent = "Downloading…";
    try {
      const res = await ui.fetchWithKey(`/v1/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/export/model.onnx`);
      if (!res.ok) {
        const body = await res.json().catch(() => null);
        throw new Error(body?.error?.message ?? `The download failed (HTTP ${res.status}).`);
      }
      const blob = await res.blob();
      // Checked against the export's description before it is saved: a file replaced in storage is not handed on.
      const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
      const sha256 = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
      if (sha256 !== info.sha256) throw new Error("The downloaded file does not match its export (sha256): not saved. Export it again.");
      const url = URL.createObjectURL(blob);
      const save = el("a", { href: url, download: `${name}-${version}.onnx`, hidden: true });
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
      link.textContent = `Download ONNX (${(info.bytes / 1e6).toFixed(1)} MB)`;
    } catch (err) {
      link.replaceWith(el("span", { class: "error" }, err.message));
    }
  });
  return link;
}

/** Posts requests and shows the recent ones, polling while any is pending (and the panel is on the page). */
function requestTracker(ui, name, list, onDone) {
  const { el, api, when } = ui;
  const base = `/v1/models/${encodeURIComponent(name)}/requests`;
  const settled = new Set(); // ids seen done/refused/failed: onDone runs once per request
  let timer;
  let first = true;
  const describe = (r) => `${r.kind ? (KIND_WORDS[r.kind] ?? r.kind) : "A request"}${r.version ? ` ${r.version}` : ""}`;
  const stateText = (r) =>
    `${r.verified ? "" : "unverified (not signed by an operator key; the edge's credentials may have leaked): "}${r.state === "pending" ? "waiting for the dispatcher…" : `${r.state}: ${r.message}`}`;
  async function refresh() {
    clearTimeout(timer);
    if (!first && !list.isConnected) return; // another page
    first = false;
    let body;
    try {
      body = await api(base);
    } catch (e) {
      list.replaceChildren(el("p", { class: "error" }, e.message));
      return;
    }
    const changed = body.requests.filter((r) => r.verified && r.state === "done" && !settled.has(r.id) && r.kind !== "train" && r.kind !== "apply-reviewed");
    // A provisional refusal (a job that claimed it has not answered yet) is not the answer: it may still be replaced.
    const open = (r) => r.state === "pending" || (r.provisional && Date.now() - Date.parse(r.at) < PROVISIONAL_MS);
    for (const r of body.requests) if (!open(r)) settled.add(r.id);
    list.replaceChildren(
      body.requests.length
        ? el(
            "table",
            { id: "requests-table" },
            el("thead", {}, el("tr", {}, el("th", {}, "Asked"), el("th", {}, "Action"), el("th", {}, "State"))),
            el(
              "tbody",
              {},
              body.requests.map((r) =>
                el(
                  "tr",
                  { "data-request": r.id, "data-state": r.state, class: r.state === "done" ? null : r.state === "pending" ? "muted" : "error" },
                  el("td", {}, when(r.issuedAt)),
                  el("td", {}, describe(r)),
                  el("td", { class: "request-state" }, stateText(r)),
                ),
              ),
            ),
          )
        : el("p", { class: "muted", id: "requests-empty" }, "No requests yet."),
    );
    if (body.requests.some(open)) timer = setTimeout(refresh, POLL_MS);
    // Seen pending on this page, now done: the served version or an export changed.
    for (const r of changed) if (pendingHere.has(r.id)) onDone(r);
  }
  const pendingHere = new Set();
  async function ask(body) {
    try {
      const r = await api(base, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      pendingHere.add(r.id);
    } catch (e) {
      list.prepend(el("p", { class: "error" }, e.message));
      return;
    }
    await refresh();
  }
  return { refresh, ask };
}
