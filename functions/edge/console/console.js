// The edgetune web console: plain browser JavaScript, no build step, no dependencies. It calls the
// same API as every client (/v1/*) with the key typed into the page, which is kept in sessionStorage
// (this tab only, gone when it closes). Every text from the API goes into the page through
// textContent, never as HTML: labels and model names are user data.

import { actionsPanel, versionActions } from "./actions.js";
import { compareForm, comparePage, modelsList } from "./versions.js";

const KEY = "edgetune.apiKey";
const view = document.getElementById("view");
const status = document.getElementById("status");

/** An element with attributes (on* are listeners) and children (strings become text nodes). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// A no-break space: "100.0 %" never breaks over two lines.
const pct = (v) => `${(v * 100).toFixed(1)}\u00a0%`;
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
const route = (...parts) => `#/${parts.map(encodeURIComponent).join("/")}`;
/** What the page modules (versions.js) draw with. */
const ui = { el, api, pct, when, route };

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** GET or POST under /v1 with the session's key; errors carry the API's own message. */
async function api(path, init = {}) {
  const key = sessionStorage.getItem(KEY);
  if (!key) throw new ApiFailure(401, "no_key", "Paste an API key above to see models: an operator key (CONSOLE_API_KEYS).");
  const res = await fetch(path, { ...init, headers: { ...init.headers, authorization: `Bearer ${key}` } });
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new ApiFailure(res.status, body?.error?.code ?? "http_error", body?.error?.message ?? `HTTP ${res.status}`);
  return body;
}

/** A raw response from the API with the session's key (a download), for actions.js. */
const fetchWithKey = (path) => fetch(path, { headers: { authorization: `Bearer ${sessionStorage.getItem(KEY)}` } });
/** What actions.js (the model's actions: requests the dispatcher applies) borrows from this file. */
const actionsUi = { ...ui, fetchWithKey };

/** An image from the API (it needs the key, so not a plain <img src>) as a blob: URL. */
async function apiImage(path) {
  const res = await fetch(path, { headers: { authorization: `Bearer ${sessionStorage.getItem(KEY)}` } });
  if (!res.ok) throw new ApiFailure(res.status, "image_unavailable", `The image could not be loaded (HTTP ${res.status}).`);
  const blob = await res.blob();
  // The sha256 of exactly the bytes displayed: a review decision is bound to them (the worker signs it,
  // the nightly job adds only bytes with that hash), so an image swapped after it was shown is refused.
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
  return { url: URL.createObjectURL(blob), sha256: Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("") };
}

/**
 * Renders overlap (a key typed, then a link clicked before the first answer came back): each gets a
 * number, and only the latest one may change the page, so a slow earlier answer cannot replace it.
 */
let latest = 0;
function showFor(render) {
  return (...nodes) => {
    if (render === latest) view.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined));
  };
}

function say(message, isError = false) {
  status.textContent = message;
  status.className = isError ? "error" : "muted";
}

// --- pages -------------------------------------------------------------------------------------

async function modelsPage(show) {
  const list = await modelsList(ui);
  if (!list)
    return show(
      el("h2", {}, "Models"),
      el(
        "p",
        {},
        "No models yet: push a dataset (npx edgetune push <folder> --dataset <name>; the model takes the dataset's name unless its manifest names another).",
      ),
    );
  show(el("h2", {}, "Models"), list);
}

async function modelPage(show, name) {
  const data = await api(`/v1/models/${encodeURIComponent(name)}/versions`);
  const newestFirst = [...data.versions].reverse();
  const actions = actionsPanel(actionsUi, name, data, () => render());
  show(
    el("h2", {}, name),
    el(
      "p",
      {},
      el("a", { href: route("review", name), id: "review-link" }, "Review captured traffic"),
      " · ",
      el("a", { href: route("monitor", name), id: "monitor-link" }, "Monitor"),
    ),
    classifyPanel(name, data.current),
    actions.panel,
    el("h3", {}, "Versions"),
    el(
      "table",
      { id: "versions" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ["Version", "Trained", "Accuracy", "Held-out images", "Strategy", "Base", "Images", "", ""].map((h, i) =>
            el("th", { class: i >= 2 && i <= 3 ? "num" : null }, h),
          ),
        ),
      ),
      el(
        "tbody",
        {},
        newestFirst.map((v) =>
          el(
            "tr",
            { "data-version": v.version },
            el("td", {}, el("a", { href: route("models", name, v.version) }, v.version), " ", v.current ? el("span", { class: "badge" }, "served") : null),
            el("td", {}, when(v.createdAt)),
            el("td", { class: "num" }, pct(v.accuracy)),
            el("td", { class: "num" }, String(v.evaluatedOn)),
            el("td", {}, v.strategy),
            el("td", {}, v.base),
            el("td", { class: "num" }, String(v.images)),
            el("td", {}, el("a", { href: route("models", name, v.version) }, "report")),
            el("td", {}, versionActions(actionsUi, name, v, actions)),
          ),
        ),
      ),
    ),
    data.truncated
      ? el("p", { class: "muted" }, "Not every version is shown (the served one and its history come first); edgetune models lists them all.")
      : null,
    compareForm(ui, name, data.versions, data.current),
  );
}

async function reportPage(show, name, version) {
  const r = await api(`/v1/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/report`);
  const labels = r.dataset.labels;
  show(
    el("p", {}, el("a", { href: route("models", name) }, `← ${name}`)),
    el("h2", {}, `${name} ${version}`),
    el(
      "div",
      { class: "panel", id: "summary" },
      el("p", {}, "Accuracy ", el("strong", {}, pct(r.metrics.accuracy)), ` on ${r.metrics.evaluatedOn} held-out images.`),
      el("p", {}, r.promotion.promoted ? "Promoted: " : "Kept back: ", r.promotion.reason),
      el(
        "p",
        { class: "muted" },
        `Base ${r.base.id}${r.base.choice ? ` (${r.base.choice.requested}: ${r.base.choice.reason})` : ""} · ${r.options.strategy ?? ""} · backend ${r.backend.name} · ${r.export.dtype} weights`,
      ),
      // The worker has no Node to convert with: the dispatcher stores an export when asked (the model's
      // page, actions.js), not one for every version (ARCHITECTURE.md, "Export").
      el(
        "p",
        { id: "export" },
        "To run it anywhere: Export ONNX on the model's page, or ",
        el("code", {}, `npx edgetune export ${name} ${version}`),
        " (add --format tfjs for the tfjs files).",
      ),
      r.warnings.length
        ? el(
            "ul",
            {},
            r.warnings.map((w) => el("li", {}, w)),
          )
        : null,
    ),
    answersSummary(r),
    el("h3", {}, "Per label"),
    el(
      "table",
      { id: "per-class" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ["Label", "Precision", "Recall", "F1", "Held-out", "Threshold"].map((h, i) => el("th", { class: i ? "num" : null }, h)),
        ),
      ),
      el(
        "tbody",
        {},
        Object.entries(r.metrics.perClass).map(([label, m]) =>
          el(
            "tr",
            {},
            el("td", {}, label),
            el("td", { class: "num" }, pct(m.precision)),
            el("td", { class: "num" }, pct(m.recall)),
            el("td", { class: "num" }, pct(m.f1)),
            el("td", { class: "num" }, String(m.support)),
            // Versions trained before per-label thresholds have none; the none-of-these class has none.
            el("td", { class: "num" }, r.thresholds?.byLabel[label] ? pct(r.thresholds.byLabel[label].threshold) : "–"),
          ),
        ),
      ),
    ),
    el("h3", {}, "Confusion (rows: true label, columns: predicted)"),
    el(
      "table",
      { class: "confusion", id: "confusion" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", {}, ""),
          labels.map((l) => el("th", {}, l)),
        ),
      ),
      el(
        "tbody",
        {},
        r.confusion.map((row, i) =>
          el(
            "tr",
            {},
            el("th", {}, labels[i]),
            row.map((v, j) => el("td", { class: i === j ? "diag" : null }, String(v))),
          ),
        ),
      ),
    ),
    r.mistakes.length
      ? [
          el("h3", {}, "Most confident mistakes"),
          el(
            "div",
            { class: "mistakes" },
            r.mistakes.map((m) =>
              el(
                "figure",
                {},
                m.thumbnail?.startsWith("data:image/") ? el("img", { src: m.thumbnail, alt: m.key }) : null,
                el("figcaption", {}, `${m.label} → ${m.predicted} (${pct(m.score)})`),
              ),
            ),
          ),
        ]
      : null,
    el("h3", {}, "Phases"),
    el(
      "ul",
      {},
      r.phases.map((p) => el("li", {}, `${p.name}: ${p.seconds.toFixed(1)} s`)),
    ),
  );
}

/**
 * The review queue: what the edge captured (unsure or sampled answers), each with its image, the model's
 * answer and a label to accept it under. Decisions are recorded at once and applied by the nightly run,
 * which moves accepted images into the dataset and retrains.
 */
async function reviewPage(show, name) {
  const [queue, model] = await Promise.all([api(`/v1/models/${encodeURIComponent(name)}/captures`), api(`/v1/models/${encodeURIComponent(name)}`)]);
  const s = queue.settings;
  // No number set: capture follows the answer's own "unsure" (contracts/capture.ts, captureRule).
  const rule =
    s.belowConfidence === undefined
      ? "answers the served version is unsure of (below their label's threshold)"
      : `answers scored below ${s.belowConfidence} (a number set with edgetune capture --below)`;
  const settings = s.enabled
    ? `Capture is on: ${rule} and ${pct(s.sampleRate)} of the others, at most ${s.maxPerDay} a day.`
    : `Capture is off (edgetune capture ${name} --on).`;
  const cards = queue.captures.map((c) => {
    const top = c.predictions[0];
    const img = el("img", { alt: `capture ${c.id}` });
    let shown; // the sha256 of the image displayed; an accept waits for it
    apiImage(`/v1/models/${encodeURIComponent(name)}/captures/${encodeURIComponent(c.id)}/image`)
      .then(({ url, sha256 }) => {
        img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
        img.src = url;
        shown = sha256;
      })
      .catch((e) => img.replaceWith(el("p", { class: "error" }, e.message)));
    const select = el(
      "select",
      { "aria-label": "true label" },
      model.labels.map((l) => el("option", { value: l, selected: l === top.label }, l)),
    );
    const outcome = el("p", { class: "muted outcome" });
    const decide = async (action) => {
      try {
        if (action === "accept" && !shown) throw new Error("The image has not been shown yet; wait for it, then accept.");
        const body = { action, ...(action === "accept" ? { label: select.value } : {}), ...(shown ? { imageSha256: shown } : {}) };
        const r = await api(`/v1/models/${encodeURIComponent(name)}/captures/${encodeURIComponent(c.id)}/decision`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(body),
        });
        card.classList.add("decided");
        outcome.textContent = r.action === "accept" ? `Accepted as ${r.label}: joins the dataset at the next nightly run.` : "Discarded.";
      } catch (e) {
        outcome.textContent = e.message;
        outcome.className = "error outcome";
      }
    };
    const card = el(
      "figure",
      { class: "capture", "data-id": c.id },
      img,
      el("figcaption", {}, `${top.label} (${pct(top.score)}) · ${c.reason === "sampled" ? "sampled" : "unsure"} · ${when(c.capturedAt)} · ${c.version}`),
      c.refused ? el("p", { class: "error" }, `Not applied last time: ${c.refused.reason}`) : null,
      el(
        "div",
        { class: "decide" },
        select,
        el("button", { type: "button", class: "accept", onclick: () => decide("accept") }, "Accept"),
        el("button", { type: "button", class: "discard", onclick: () => decide("discard") }, "Discard"),
      ),
      outcome,
    );
    return card;
  });
  show(
    el("p", {}, el("a", { href: route("models", name) }, `← ${name}`)),
    el("h2", {}, `Review ${name}`),
    el("p", { class: "muted", id: "capture-settings" }, settings),
    cards.length ? el("div", { class: "captures", id: "captures" }, cards) : el("p", { id: "captures-empty" }, "Nothing is waiting for review."),
    queue.truncated ? el("p", { class: "muted" }, "Only the newest captures are shown; decide on these and reload for more (or use edgetune review).") : null,
  );
}

/** Traffic per day against the served version's held-out split, with the drift flags of the nightly summary. */
async function monitorPage(show, name) {
  let m;
  try {
    m = await api(`/v1/models/${encodeURIComponent(name)}/monitor`);
  } catch (e) {
    if (e.status !== 404) throw e;
    return show(
      el("p", {}, el("a", { href: route("models", name) }, `← ${name}`)),
      el("h2", {}, `Monitor ${name}`),
      el("p", { id: "monitor-empty" }, e.message),
    );
  }
  const top = (labels, total) =>
    Object.entries(labels)
      .sort((a, b) => b[1] - a[1])
      .slice(0, 3)
      .map(([l, n]) => `${l} ${pct(n / Math.max(1, total))}`)
      .join(", ");
  const ref = m.reference;
  show(
    el("p", {}, el("a", { href: route("models", name) }, `← ${name}`)),
    el("h2", {}, `Monitor ${name}`),
    el("p", { class: "muted" }, `Summary written ${when(m.writtenAt)} by the nightly run.`),
    ref
      ? el(
          "p",
          { id: "reference" },
          `Held-out split of ${ref.version} (${ref.evaluatedOn} images): ${ref.lowConfidence === null ? `answers under ${m.threshold} not known exactly for this version` : `${Math.round(ref.lowConfidence * ref.evaluatedOn)} of ${ref.evaluatedOn} answers under ${m.threshold}`}; predicted ${top(ref.labels, 1)}.`,
        )
      : null,
    el(
      "table",
      { id: "monitor" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ["Day", "Answers", `Under ${m.threshold}`, "Top predicted", "Captured", "Drift"].map((h, i) =>
            el("th", { class: i === 1 || i === 2 || i === 4 ? "num" : null }, h),
          ),
        ),
      ),
      el(
        "tbody",
        {},
        [...m.days]
          .reverse()
          .map((d) =>
            el(
              "tr",
              { class: d.drift.length ? "drift" : null },
              el("td", {}, d.day),
              el("td", { class: "num" }, String(d.requests)),
              el("td", { class: "num" }, pct(d.lowConfidence / Math.max(1, d.requests))),
              el("td", {}, top(d.labels, d.requests)),
              el("td", { class: "num" }, String(d.captured)),
              el("td", {}, d.drift.length ? d.drift.join("; ") : "—"),
            ),
          ),
      ),
    ),
  );
}

/** Calibration and the thresholds' effect, for versions that have them. */
function answersSummary(r) {
  const c = r.calibration;
  const t = r.thresholds;
  if (!c || !t) return null;
  return el(
    "p",
    { id: "answers-summary" },
    `Scores calibrated (temperature ${c.temperature.toFixed(2)}): calibration error ${pct(c.eceBefore)} before, ${pct(c.eceAfter)} after. ` +
      `Thresholds (${t.policy}): ${pct(t.answered)} of held-out images answered with a label, ${pct(t.answeredAccuracy)} of those right; ${pct(t.unsure)} unsure` +
      (r.noneLabel || r.novelty ? `, ${pct(t.none)} none of these` : "") +
      (r.noneLabel ? ` (class ${r.noneLabel})` : "") +
      (r.novelty ? `. None of these also below a similarity of ${r.novelty.floor.toFixed(3)} to every label's training images.` : "."),
  );
}

/** The answer in words: the label, or plainly unsure or none of these (absent from workers that predate them). */
function answerLine(body) {
  if (body.none)
    return el(
      "p",
      { class: "answer", id: "classify-answer" },
      body.noneBy === "novelty"
        ? `None of these: the image is unlike every label's training images (similarity ${body.similarity.toFixed(3)}, below ${body.similarityFloor.toFixed(3)}).`
        : "None of these: the image is none of the labels (the model's none-of-these class scored highest).",
    );
  const top = body.predictions[0];
  if (body.unsure && top)
    return el(
      "p",
      { class: "answer", id: "classify-answer" },
      `Unsure: the best label, ${top.label} (${pct(top.score)}), is below its threshold of ${pct(body.threshold ?? 0)}.`,
    );
  if (body.label)
    return el("p", { class: "answer", id: "classify-answer" }, `Answer: ${body.label}${body.threshold ? ` (threshold ${pct(body.threshold)})` : ""}`);
  return null;
}

/** A drop-an-image box that posts the file to the classify endpoint and draws the scores. */
function classifyPanel(name, servedVersion) {
  const result = el("div", { class: "result", id: "classify-result" });
  const input = el("input", { type: "file", accept: "image/*", id: "classify-file" });
  async function classify(file) {
    if (!file) return;
    // Said here in plain words; the API would answer a non-image with its multipart/content-type message.
    if (file.type && !file.type.startsWith("image/"))
      return result.replaceChildren(el("p", { class: "error" }, `${file.name} is not an image: drop a JPEG, PNG, WebP or GIF file.`));
    result.replaceChildren(el("p", { class: "muted" }, "Classifying…"));
    const preview = URL.createObjectURL(file);
    try {
      const body = await api(`/v1/models/${encodeURIComponent(name)}/classify?top_k=5`, {
        method: "POST",
        headers: { "content-type": file.type || "application/octet-stream" },
        body: file,
      });
      const img = el("img", { src: preview, alt: file.name });
      img.addEventListener("load", () => URL.revokeObjectURL(preview), { once: true });
      result.replaceChildren(
        img,
        el(
          "div",
          { class: "bars" },
          answerLine(body),
          body.predictions.map((p) =>
            el("div", { class: "bar" }, el("span", {}, p.label), el("meter", { min: 0, max: 1, value: p.score }), el("span", {}, pct(p.score))),
          ),
          el("p", { class: "muted" }, `version ${body.version} · ${body.timings.totalMs} ms in the worker`),
        ),
      );
    } catch (e) {
      URL.revokeObjectURL(preview);
      result.replaceChildren(el("p", { class: "error" }, e.message));
    }
  }
  input.addEventListener("change", () => classify(input.files[0]));
  const drop = el("div", { class: "drop", id: "drop" }, el("p", {}, "Drop an image here, or "), el("label", {}, "choose one: ", input));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classify(e.dataTransfer.files[0]);
  });
  return el(
    "div",
    { class: "panel" },
    el("h3", {}, "Classify"),
    servedVersion ? null : el("p", { class: "muted" }, "No version of this model is promoted yet; classify will answer 404."),
    drop,
    result,
  );
}

// --- routing and key handling ----------------------------------------------------------------------

async function render() {
  const mine = ++latest;
  const show = showFor(mine);
  say("");
  try {
    const [, page, name, version, other] = location.hash.split("/").map(decodeURIComponent);
    if (page === "compare" && name && version && other) await comparePage(ui, show, name, version, other);
    else if (page === "review" && name) await reviewPage(show, name);
    else if (page === "monitor" && name) await monitorPage(show, name);
    else if (page === "models" && name && version) await reportPage(show, name, version);
    else if (page === "models" && name) await modelPage(show, name);
    else await modelsPage(show);
  } catch (e) {
    if (mine !== latest) return; // a newer page is on its way
    show();
    // No key yet is where everyone starts: a hint, not an error.
    say(e.message, e.code !== "no_key");
  }
}

const keyForm = document.getElementById("key-form");
const forget = document.getElementById("forget-key");
function keyChanged() {
  const has = Boolean(sessionStorage.getItem(KEY));
  forget.hidden = !has;
  keyForm.key.placeholder = has ? "key set for this tab" : "an operator key (kept for this tab only)";
  render();
}
keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, keyForm.key.value.trim());
  keyForm.key.value = "";
  keyChanged();
});
forget.addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  keyChanged();
});
window.addEventListener("hashchange", render);
keyChanged();
