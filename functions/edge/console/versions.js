// The console's views of versions' numbers: the models list with each served version's accuracy, and two
// versions of a model side by side (Custom Vision's iterations). A module of its own, given the page's
// helpers (`ui`: el, api, pct, when, route) by console.js, so it imports nothing back from it.

/** The models, a page at a time (the worker reads two small files per model), with a button for the next page. */
export async function modelsList(ui) {
  const { el, api, pct, when, route } = ui;
  const first = await api("/v1/models");
  if (first.models.length === 0) return null;
  const body = el("tbody", {});
  const more = el("p", {});
  const add = (page) => {
    body.append(
      ...page.models.map((m) =>
        el(
          "tr",
          { "data-model": m.name },
          el("td", {}, el("a", { href: route("models", m.name) }, m.name)),
          el("td", {}, m.version ?? el("span", { class: "muted" }, "none promoted")),
          el("td", { class: "num" }, m.accuracy === null ? "–" : pct(m.accuracy)),
          el("td", { class: "num" }, m.evaluatedOn === null ? "–" : String(m.evaluatedOn)),
          el("td", {}, when(m.promotedAt)),
        ),
      ),
    );
    more.replaceChildren(
      ...(page.next
        ? [
            el(
              "button",
              {
                type: "button",
                id: "more-models",
                onclick: async (e) => {
                  e.target.disabled = true;
                  try {
                    add(await api(`/v1/models?after=${encodeURIComponent(page.next)}`));
                  } catch (err) {
                    more.replaceChildren(el("span", { class: "error" }, err.message));
                  }
                },
              },
              "More models",
            ),
          ]
        : []),
    );
  };
  add(first);
  return [
    el(
      "div",
      { class: "scroll" },
      el(
        "table",
        { id: "models" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            ["Model", "Served version", "Accuracy", "Held-out images", "Promoted"].map((h, i) => el("th", { class: i === 2 || i === 3 ? "num" : null }, h)),
          ),
        ),
        body,
      ),
    ),
    el("p", { class: "muted" }, "Accuracy is the served version's, on its own held-out images."),
    more,
  ];
}

/**
 * Two selects and a Compare link under a model's versions: by default the served version against the
 * newest other one. `versions` is what the versions listing returned (capped: it says so itself).
 */
export function compareForm(ui, name, versions, current) {
  const { el, route } = ui;
  if (versions.length < 2) return null;
  const newestFirst = [...versions].reverse().map((v) => v.version);
  const a = current && newestFirst.includes(current) ? current : newestFirst[1];
  const b = newestFirst.find((v) => v !== a);
  const pick = (id, selected, label) =>
    el(
      "select",
      { id, "aria-label": label },
      newestFirst.map((v) => el("option", { value: v, selected: v === selected }, v === current ? `${v} (served)` : v)),
    );
  const first = pick("compare-a", a, "first version");
  const second = pick("compare-b", b, "second version");
  const go = el("a", { class: "button", id: "compare-go", href: route("compare", name, a, b) }, "Compare");
  const update = () => {
    go.href = route("compare", name, first.value, second.value);
  };
  first.addEventListener("change", update);
  second.addEventListener("change", update);
  return el("p", { class: "compare-form" }, "Compare ", first, " with ", second, " ", go);
}

/** Two versions side by side: what each was measured on, accuracy, per-label precision and recall, confusion. */
export async function comparePage(ui, show, name, a, b) {
  const { el, api, pct, when, route } = ui;
  const c = await api(`/v1/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(a)}/compare/${encodeURIComponent(b)}`);
  const [x, y] = c.versions;
  const change = (from, to) => {
    const d = (to - from) * 100;
    return Math.abs(d) < 0.05 ? "±0.0" : `${d > 0 ? "+" : "−"}${Math.abs(d).toFixed(1)}`;
  };
  const head = (...cells) =>
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        cells.map(([text, num]) => el("th", { class: num ? "num" : null }, text)),
      ),
    );
  const summary = el(
    "table",
    { id: "compare-summary" },
    head(["", false], [x.version, true], [y.version, true]),
    el(
      "tbody",
      {},
      [
        ["Served", x.current ? "yes" : "no", y.current ? "yes" : "no"],
        ["Trained", when(x.createdAt), when(y.createdAt)],
        ["Accuracy", pct(x.accuracy), pct(y.accuracy)],
        ["Held-out images", String(x.evaluatedOn), String(y.evaluatedOn)],
        ["Dataset", `${x.dataset.name}, ${x.dataset.images} images`, `${y.dataset.name}, ${y.dataset.images} images`],
        ["Strategy", x.strategy, y.strategy],
        ["Base", x.base, y.base],
      ].map(([label, p, q]) => el("tr", {}, el("th", {}, label), el("td", { class: "num" }, p), el("td", { class: "num" }, q))),
    ),
  );
  // Labels of both (a relabelled model may differ): the first version's order, then the second's new ones.
  const labels = [...new Set([...x.labels, ...y.labels])];
  // Own keys only: a label may be named like a built-in property ("constructor", "toString").
  const of = (v, label) => (Object.hasOwn(v.perClass, label) ? v.perClass[label] : undefined);
  const metric = (v, label, key) => (of(v, label) ? pct(of(v, label)[key]) : "–");
  const delta = (label, key) => (of(x, label) && of(y, label) ? change(of(x, label)[key], of(y, label)[key]) : "–");
  // Two header rows: the metric over its three columns, then the versions and the change under each.
  const sub = [
    [x.version, true],
    [y.version, true],
    ["Δ", true, "change in percentage points"],
  ];
  const perLabel = el(
    "table",
    { id: "compare-per-label" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        el("th", { rowspan: 2 }, "Label"),
        el("th", { colspan: 3, class: "group" }, "Precision"),
        el("th", { colspan: 3, class: "group" }, "Recall"),
        el("th", { rowspan: 2, class: "num" }, "Held-out"),
      ),
      el(
        "tr",
        {},
        [...sub, ...sub].map(([text, num, title]) => el("th", { class: num ? "num" : null, title }, text)),
      ),
    ),
    el(
      "tbody",
      {},
      labels.map((label) =>
        el(
          "tr",
          { "data-label": label },
          el("td", {}, label),
          el("td", { class: "num" }, metric(x, label, "precision")),
          el("td", { class: "num" }, metric(y, label, "precision")),
          el("td", { class: "num" }, delta(label, "precision")),
          el("td", { class: "num" }, metric(x, label, "recall")),
          el("td", { class: "num" }, metric(y, label, "recall")),
          el("td", { class: "num" }, delta(label, "recall")),
          el(
            "td",
            { class: "num", title: `held-out images of ${label}: ${x.version} / ${y.version}` },
            `${of(x, label)?.support ?? "–"} / ${of(y, label)?.support ?? "–"}`,
          ),
        ),
      ),
    ),
  );
  const matrix = (v) =>
    el(
      "figure",
      { class: "matrix", "data-version": v.version },
      el("figcaption", {}, `${v.version}${v.current ? " (served)" : ""}: ${pct(v.accuracy)} on ${v.evaluatedOn} held-out images`),
      v.confusion.length
        ? el(
            "div",
            { class: "scroll" },
            el(
              "table",
              { class: "confusion" },
              el(
                "thead",
                {},
                el(
                  "tr",
                  {},
                  el("th", {}, ""),
                  v.labels.map((l) => el("th", { title: l }, l)),
                ),
              ),
              el(
                "tbody",
                {},
                v.confusion.map((row, i) =>
                  el(
                    "tr",
                    {},
                    el("th", { title: v.labels[i] }, v.labels[i]),
                    row.map((n, j) => el("td", { class: i === j ? "diag" : null }, String(n))),
                  ),
                ),
              ),
            ),
          )
        : el("p", { class: "muted" }, v.note ?? "The report has no confusion matrix for these labels."),
    );
  show(
    el("p", {}, el("a", { href: route("models", name) }, `← ${name}`)),
    el("h2", {}, `Compare ${name}`),
    // Plainly first: numbers measured on different images do not say which version is better.
    el("p", { id: "held-out", class: c.heldOut.same === true ? "notice same" : "notice differs" }, c.heldOut.message),
    el("div", { class: "scroll" }, summary),
    el("h3", {}, "Per label"),
    el("div", { class: "scroll" }, perLabel),
    el("p", { class: "muted" }, `Δ: ${y.version} minus ${x.version}, in percentage points. Held-out: the label's images in each one's held-out set.`),
    el("h3", {}, "Confusion (rows: true label, columns: predicted)"),
    el("div", { class: "side-by-side", id: "compare-confusion" }, matrix(x), matrix(y)),
    el(
      "p",
      { class: "muted" },
      "Reports: ",
      el("a", { href: route("models", name, x.version) }, x.version),
      " · ",
      el("a", { href: route("models", name, y.version) }, y.version),
    ),
  );
}
